#!/usr/bin/env bash
# Install fusion_titan and everything it needs into the active Python environment.
#   bash scripts/install.sh            # CPU-only machine: torch 2.13.0 CPU build, then the package
#   bash scripts/install.sh --gpu      # keep/install a CUDA torch (>= 2.11), then the package
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --upgrade pip >/dev/null
if [[ "${1:-}" != "--gpu" ]] && ! python -c "import torch" 2>/dev/null; then
    # Without an explicit pin pip would fetch a multi-GB CUDA build; 2.13.0 resolves to a CPU
    # wheel on CPU-only machines set up like ours (or use --index-url .../whl/cpu elsewhere).
    python -m pip install "torch==2.13.0"
fi
if [[ "${1:-}" == "--gpu" ]]; then
    python -m pip install -e ".[dev,eval,hf,kernels]"  # fused loss kernels (CUDA only)
else
    python -m pip install -e ".[dev,eval,hf]"  # eval: lm-eval-harness (~35 s); hf: transformers (~30 s)
fi
python -c "import torch, torchtitan, triton, tiktoken; print('torch', torch.__version__, '| torchtitan', torchtitan.__version__, '| cuda', torch.cuda.is_available())"
