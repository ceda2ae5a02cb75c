"""Generate text from a checkpoint: prefill the prompt, then decode with the model's cache.

    python scripts/generate.py --config train_configs/debug_model.toml \
        --checkpoint outputs/debug_model/checkpoint --prompt "def main(" --max-new-tokens 64
    ... --temperature 0.8 --top-p 0.95 --seed 0        # sampling instead of greedy
    ... --model.sliding_window 128                     # any config override (unknown flags)

--checkpoint takes a DCP step folder, the checkpoint folder (latest step) or a torch.save file;
without it the model is randomly initialized. Prints the continuation, prefill and decode
tokens/s, and the bytes the decoding cache holds (MLA latents + recurrent states).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_titan.inference import generate, load_model  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training TOML")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--prompt", default="def fibonacci(n):\n")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    parser.add_argument("--prefill-chunk", type=int, default=0, help="prompt tokens per prefill forward (0 = all)")
    parser.add_argument("--no-eos-stop", action="store_true", help="keep going after EOS")
    opts, overrides = parser.parse_known_args(argv)

    loaded = load_model(opts.config, opts.checkpoint, overrides=overrides, device=opts.device,
                        dtype=opts.dtype)
    tok = loaded.tokenizer
    prompt = tok.encode(opts.prompt) or [tok.eos_id]
    result = generate(loaded.model, prompt, opts.max_new_tokens, temperature=opts.temperature,
                      top_p=opts.top_p, top_k=opts.top_k, seed=opts.seed,
                      eos_id=None if opts.no_eos_stop else tok.eos_id,
                      prefill_chunk=opts.prefill_chunk)
    new = result.new_tokens[0]
    print(f"checkpoint: {loaded.checkpoint or 'none (random init)'}")
    print("----- prompt -----")
    print(opts.prompt)
    print("----- continuation -----")
    print(tok.decode(new))
    print("------------------------")
    print(f"prompt tokens: {len(prompt)}  new tokens: {len(new)}  "
          f"stopped at EOS: {result.finished[0]}")
    print(f"prefill: {result.prefill_tokens_per_s:.1f} tokens/s ({result.prefill_seconds * 1e3:.1f} ms)")
    print(f"decode: {result.decode_tokens_per_s:.1f} tokens/s ({result.decode_steps} steps, "
          f"{result.decode_seconds * 1e3:.1f} ms)")
    print(f"cache bytes: {result.cache_bytes} ({result.cache_bytes / 2**20:.3f} MiB at "
          f"{len(prompt) + len(new) - 1} cached tokens)")
    print(f"tokens: {result.tokens[0].tolist()}")


if __name__ == "__main__":
    main()
