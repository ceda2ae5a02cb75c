#!/usr/bin/env bash
# Launch fusion_titan training with torchrun (torchtitan's convention).
#   CONFIG_FILE=train_configs/fusion_7b.toml ./run_train.sh [--section.key value ...]
# NGPU defaults to the number of GPUs present; with none, one CPU process (gloo) is started.
# NGPU=2 on a CPU-only machine starts two CPU processes (FSDP over gloo).
# Python: the project's .venv (scripts/install.sh makes it) when present, else python3 / python.
set -euo pipefail
cd "$(dirname "$0")"

if [[ -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
else
    PYTHON=$(command -v python3 || command -v python)
fi
CONFIG_FILE=${CONFIG_FILE:-"./train_configs/debug_model.toml"}
if [[ -z "${NGPU:-}" ]]; then
    NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 1)" 2>/dev/null) \
        || { echo "run_train.sh: $PYTHON cannot import torch; run bash scripts/install.sh (it makes .venv)" >&2; exit 1; }
fi
LOG_RANK=${LOG_RANK:-0}
TRAIN_MODULE=${TRAIN_MODULE:-"fusion_titan.train"}
COLOR=()
[[ -t 1 ]] || COLOR=(--metrics.disable_color_printing)  # no ANSI codes in files and pipes

# fusion_titan.infra.torchrun is torchrun that reports a failed worker in one line
PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-"expandable_segments:True"} \
"$PYTHON" -m fusion_titan.infra.torchrun --nproc_per_node="${NGPU}" --rdzv_backend c10d \
    --rdzv_endpoint="localhost:0" --local-ranks-filter "${LOG_RANK}" --role rank --tee 3 \
    -m "${TRAIN_MODULE}" --job.config_file "${CONFIG_FILE}" ${COLOR[@]+"${COLOR[@]}"} "$@"
