"""lm-eval-harness with our model registered: the `lm_eval` command line, plus `--model fusion_titan`.

    pip install -e ".[eval]"
    python scripts/lm_eval.py --model fusion_titan \
        --model_args config=train_configs/debug_model.toml,checkpoint=outputs/debug_model/checkpoint \
        --tasks lambada_openai,hellaswag --batch_size 8 --device cuda

lm_eval's CLI only knows the models it ships; importing fusion_titan.inference.lm_eval_adapter
registers "fusion_titan" (see that module for the model_args), then lm_eval's own entry point
runs with the arguments given here (`--tasks`, `--limit`, `--include_path` for local task
YAMLs, `--output_path`, ...).
"""

import sys
from pathlib import Path

# This file is named like the package: drop its own folder from the path so `import lm_eval`
# finds the harness, and put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        sys.exit("lm-eval is not installed: pip install -e \".[eval]\" (or pip install lm-eval)")
    import fusion_titan.inference.lm_eval_adapter  # noqa: F401  (registers "fusion_titan")

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
