#!/usr/bin/env bash
# Create the project's virtual environment .venv and install fusion_titan and everything it needs
# into it; the interpreter you have active is left alone. run_train.sh and the tests use .venv
# without activating it; for the other commands: source .venv/bin/activate.
#   bash scripts/install.sh            # torch 2.13.0: the CPU build unless a GPU is present
#   bash scripts/install.sh --gpu      # CUDA torch (>= 2.11) plus the fused loss kernels
# PYTHON=/path/to/python3.X picks the interpreter the environment is made from (3.10+).
set -euo pipefail
cd "$(dirname "$0")/.."

KERNELS=0
[[ "${1:-}" == "--gpu" ]] && KERNELS=1
HAVE_GPU=$KERNELS
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HAVE_GPU=1; fi
CPU_INDEX=https://download.pytorch.org/whl/cpu

PYTHON=${PYTHON:-$(command -v python3 || command -v python || true)}
if [[ -z "$PYTHON" ]]; then
    echo "install.sh: no python3 found; install Python 3.10+ or set PYTHON=/path/to/python3" >&2
    exit 1
fi
if ! "$PYTHON" -c "import sys; sys.exit(sys.version_info < (3, 10))"; then
    echo "install.sh: $PYTHON is $("$PYTHON" -V 2>&1); fusion_titan needs 3.10+ (set PYTHON=...)" >&2
    exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
    echo "install.sh: creating the virtual environment .venv from $PYTHON"
    if ! "$PYTHON" -m venv .venv; then
        rm -rf .venv
        echo "install.sh: '$PYTHON -m venv' failed; on Debian/Ubuntu: apt install python3-venv" >&2
        exit 1
    fi
fi
VENV_PYTHON=.venv/bin/python
reachable() {  # a URL answers within 5 s
    if command -v curl >/dev/null 2>&1; then
        curl --silent --fail --max-time 5 --output /dev/null "$1"
    else
        timeout 8 "$VENV_PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$1" >/dev/null 2>&1
    fi
}
"$VENV_PYTHON" -m pip install --quiet --upgrade pip

if ! "$VENV_PYTHON" -c "import torch" 2>/dev/null && [[ $HAVE_GPU == 0 ]]; then
    # Without a pin pip would fetch the multi-GB CUDA build. PyTorch's CPU index has the CPU
    # build; where it cannot be reached (offline mirrors) the default index is used: 2.13.0
    # resolves to a CPU wheel on machines set up like ours.
    if reachable "$CPU_INDEX/torch/"; then
        "$VENV_PYTHON" -m pip install "torch==2.13.0" --extra-index-url "$CPU_INDEX"
    else
        echo "install.sh: $CPU_INDEX not reachable; torch 2.13.0 from the default index"
        "$VENV_PYTHON" -m pip install "torch==2.13.0"
    fi
fi
if [[ $KERNELS == 1 ]]; then
    "$VENV_PYTHON" -m pip install -e ".[dev,eval,hf,kernels]"  # fused loss kernels (CUDA only)
else
    "$VENV_PYTHON" -m pip install -e ".[dev,eval,hf]"  # eval: lm-eval-harness (~35 s); hf: transformers (~30 s)
fi
"$VENV_PYTHON" -c "import torch, torchtitan, triton, tiktoken; print('installed into .venv: torch', torch.__version__, '| torchtitan', torchtitan.__version__, '| cuda', torch.cuda.is_available())"
