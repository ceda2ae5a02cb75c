"""Convert fusion_titan checkpoints (docs/checkpointing.md).

  python scripts/convert_checkpoint.py dcp-to-torch outputs/debug_model/checkpoint/step-60 model.pt [--model-only]
  python scripts/convert_checkpoint.py dcp-to-hf outputs/debug_model/checkpoint/step-60 hf_out \
      --config train_configs/debug_model.toml [--dtype bfloat16] [--no-tokenizer] [--model.n_layers 4 ...]
      (then: transformers.AutoModelForCausalLM.from_pretrained("hf_out", trust_remote_code=True))
  python scripts/convert_checkpoint.py hf-to-dcp hf_out dcp_out
      (then: ./run_train.sh --job.dump_folder NEW --checkpoint.initial_load_path dcp_out
                            --checkpoint.initial_load_model_only)

dcp-to-hf needs the model's arguments, which a DCP checkpoint does not store: pass the TOML and
the `--section.key value` overrides of the run that wrote it (they are read exactly as the
trainer reads them); they go into config.json, from which hf-to-dcp rebuilds them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fusion_titan.checkpoint import convert  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_args_from_config(config_file: str, overrides: list[str]):
    """(FusionModelArgs, `[data] tokenizer`) of a trainer run with this TOML and these overrides."""
    import fusion_titan.spec  # noqa: F401  (registers the spec, like the trainer)
    from fusion_titan.model.flavors import FLAVORS
    from torchtitan.config import ConfigManager

    job_config = ConfigManager().parse_args(["--job.config_file", config_file, *overrides])
    args = FLAVORS[job_config.model.flavor]
    args.update_from_config(job_config)
    return args, job_config.data.tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dcp-to-torch", help="DCP step folder -> one torch.save file")
    p.add_argument("dcp_dir")
    p.add_argument("out_file")
    p.add_argument("--model-only", action="store_true", help="only the model's tensors")
    p = sub.add_parser("dcp-to-hf", help="DCP step folder -> safetensors + index + config.json")
    p.add_argument("dcp_dir")
    p.add_argument("out_dir")
    p.add_argument("--config", required=True, help="the TOML of the run that wrote the checkpoint")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: as stored)")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--no-tokenizer", action="store_true",
                   help="skip the tokenizer files (their conversion takes ~30 s)")
    p = sub.add_parser("hf-to-dcp", help="HF folder from dcp-to-hf -> model-only DCP folder")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: as stored)")
    # anything unknown (`--model.n_layers 4`) is a trainer override for dcp-to-hf
    args, overrides = parser.parse_known_args(argv)
    if overrides and args.command != "dcp-to-hf":
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    dtype = DTYPES[args.dtype] if getattr(args, "dtype", None) else None

    if args.command == "dcp-to-torch":
        state = convert.dcp_to_torch(args.dcp_dir, args.out_file, model_only=args.model_only)
        print(f"wrote {args.out_file} ({len(state)} top-level entries)")
    elif args.command == "dcp-to-hf":
        model_args, tokenizer = model_args_from_config(args.config, overrides)
        hf = convert.dcp_to_hf(args.dcp_dir, args.out_dir, model_args, dtype=dtype,
                               max_shard_bytes=int(args.max_shard_gb * 1024**3),
                               tokenizer=None if args.no_tokenizer else tokenizer)
        print(f"wrote {len(hf)} tensors, config.json and the transformers code to {args.out_dir}; "
              "load it with transformers.AutoModelForCausalLM.from_pretrained(dir, "
              "trust_remote_code=True)")
    else:
        state = convert.hf_to_dcp(args.hf_dir, args.out_dir, dtype=dtype)
        print(f"wrote a model-only DCP checkpoint ({len(state)} tensors) to {args.out_dir}; start "
              f"a run from it with --checkpoint.initial_load_path {args.out_dir} "
              "--checkpoint.initial_load_model_only (and a fresh --job.dump_folder)")


if __name__ == "__main__":
    main()
