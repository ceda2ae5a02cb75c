#!/usr/bin/env bash
# On a CUDA machine: run the GPU-only tests, then a short fusion_1b training run.
#   bash scripts/gpu_checks.sh [LOG_DIR] [STEPS]
# Logs: LOG_DIR/gpu_tests.log, LOG_DIR/fusion_1b.log (tensorboard events under LOG_DIR/run).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:-./outputs/gpu_checks}
STEPS=${2:-30}
mkdir -p "$LOG_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG_DIR/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOG_DIR/device.txt"
python -m pytest -q -m gpu tests 2>&1 | tee "$LOG_DIR/gpu_tests.log"
CONFIG_FILE=train_configs/fusion_1b.toml NGPU=1 ./run_train.sh \
    --job.dump_folder "$LOG_DIR/run" --training.steps "$STEPS" --metrics.log_freq 5 \
    --checkpoint.enable false "${@:3}" 2>&1 | tee "$LOG_DIR/fusion_1b.log"
