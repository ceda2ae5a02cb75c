"""Held-out perplexity of a checkpoint, over the same batches training validation uses.

    python scripts/eval.py --config train_configs/debug_model.toml \
        --checkpoint outputs/debug_model/checkpoint --steps 20
    ... --validation.seq_len 512 --validation.local_batch_size 4   # any config override

Batches come from the data pipeline's held-out split (fusion_titan.training.validate
.validation_dataloader; [validation] local_batch_size / seq_len set their shape). The result is
the token-weighted mean CE (sum of the model's CE sums / number of predicted tokens) and
exp(mean CE). --json writes the numbers to a file.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_titan.inference import evaluate_perplexity, load_model  # noqa: E402
from fusion_titan.training.validate import validation_dataloader  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training TOML")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--steps", type=int, default=None,
                        help="batches to score (default: [validation] steps; -1 = all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default=None, help="write the result to this file")
    opts, overrides = parser.parse_known_args(argv)

    loaded = load_model(opts.config, opts.checkpoint, overrides=overrides, device=opts.device,
                        dtype=opts.dtype)
    cfg = loaded.job_config
    steps = cfg.validation.steps if opts.steps is None else opts.steps
    loader = validation_dataloader(1, 0, loaded.tokenizer, cfg)
    res = evaluate_perplexity(loaded.model, loader, steps=steps)
    out = {"checkpoint": str(loaded.checkpoint), "batches": res.batches, "tokens": res.tokens,
           "ce_sum": res.ce_sum, "mean_ce": res.mean_ce, "perplexity": res.perplexity,
           "seq_len": cfg.validation.seq_len, "local_batch_size": cfg.validation.local_batch_size}
    print(f"checkpoint: {out['checkpoint']}")
    print(f"batches: {res.batches}  tokens: {res.tokens}  "
          f"(batch {cfg.validation.local_batch_size} x seq {cfg.validation.seq_len})")
    print(f"mean CE: {res.mean_ce:.4f}  perplexity: {res.perplexity:.2f}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
