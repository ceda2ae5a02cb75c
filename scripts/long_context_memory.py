"""Decoding-cache memory vs context length: the hybrid against plain attention.

    python scripts/long_context_memory.py                              # CUDA: fusion_1b, bf16, 1K..32K
    python scripts/long_context_memory.py --device cpu --flavor debugmodel --max-len 512   # smoke

For each context length L (powers of two up to --max-len) and each variant, a fresh cache is
prefilled to L tokens (in chunks of --chunk tokens, random ids, randomly initialized weights:
memory does not depend on the values), then --decode tokens are decoded greedily. Variants:

  hybrid      the flavor as configured ("5:1": MLA blocks cache the compressed latent + rope
              key, Gated DeltaNet blocks a constant recurrent + conv state)
  all-MLA     the same model with layer_schedule "mha": every block caches the MLA latent
  plain-MHA   the hybrid's cache with every MLA latent replaced by the keys (nope + rope on every
              head) and values that plain multi-head attention of the same heads would cache,
              materialized from the same prefill (decoding is not run for it: no MHA decode path)

Reported per row: `cache` = the cache's tensors (numel x element size, summed), `allocated` =
torch.cuda.memory_allocated() with the prefilled cache alive minus before it existed (CUDA only;
read before decoding: on CUDA the decode steps leave allocator-held memory that grows with the
context and is not cache tensors), `peak` =
torch.cuda.max_memory_allocated() during prefill + decode minus the same baseline (includes the
chunk's transient activations; CUDA only), and prefill / decode tokens/s. Prints a markdown table.
"""

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion_titan.inference.loading import DTYPES, build_model  # noqa: E402
from fusion_titan.model.decoding import cache_nbytes, new_model_cache  # noqa: E402
from fusion_titan.model.flavors import FLAVORS  # noqa: E402
from fusion_titan.model.mixers.mla import MLACache, MultiHeadLatentAttention  # noqa: E402

MiB = 2 ** 20


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


@torch.no_grad()
def prefill(model, cache, n_tokens: int, chunk: int, gen: torch.Generator, device):
    """Feed n_tokens random ids; only the last position goes through the head (full-vocabulary
    logits of a whole chunk would dwarf the cache)."""
    vocab = model.model_args.vocab_size
    h = None
    for start in range(0, n_tokens, chunk):
        n = min(chunk, n_tokens - start)
        ids = torch.randint(0, vocab, (cache.batch_size, n), generator=gen).to(device)
        h = model.trunk(ids, cache)
    return model.logits(model.norm(h[:, -1:]))


@torch.no_grad()
def to_plain_mha(model, cache) -> int:
    """Replace each MLA latent cache by the K/V an MHA layer of the same heads would hold;
    returns those K/V bytes. The latent tensors are freed (the K/V are kept on the cache object
    so they stay allocated while memory is read)."""
    kv_bytes = 0
    for layer, layer_cache in zip(model.layers.values(), cache.layers):
        if not isinstance(layer_cache, MLACache):
            continue
        mixer: MultiHeadLatentAttention = layer.mixer
        k_nope, v = mixer.decompress(layer_cache.c_kv)
        heads = k_nope.shape[2]
        keys = torch.cat([k_nope, layer_cache.k_rope.unsqueeze(2).expand(-1, -1, heads, -1)], dim=-1)
        values = v.contiguous()
        del k_nope, v
        layer_cache.mha_kv = (keys, values)  # noqa: attribute only for this measurement
        layer_cache.c_kv = layer_cache.c_kv[:, :0].clone()
        layer_cache.k_rope = layer_cache.k_rope[:, :0].clone()
        kv_bytes += keys.nbytes + values.nbytes
    return kv_bytes


def measure(model, length: int, opts, device, plain_mha: bool = False) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = _allocated(device)
    gen = torch.Generator().manual_seed(0)
    cache = new_model_cache(model, opts.batch)
    _sync(device)
    t0 = time.perf_counter()
    logits = prefill(model, cache, length, opts.chunk, gen, device)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    row = {"length": length, "prefill_tps": length * opts.batch / prefill_s, "decode_tps": None}
    # Memory held once the context is in the cache (before any decode step).
    gc.collect()
    row["allocated"] = None if base is None else _allocated(device) - base
    if plain_mha:
        del logits
        kv = to_plain_mha(model, cache)
        row["cache"] = kv + cache_nbytes(cache)  # K/V + the recurrent layers' states
    else:
        t0 = time.perf_counter()
        for _ in range(opts.decode):
            nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
            logits = model(nxt, cache=cache)
        _sync(device)
        if opts.decode:
            row["decode_tps"] = opts.decode * opts.batch / (time.perf_counter() - t0)
        del logits
        row["cache"] = cache_nbytes(cache)
    if plain_mha:  # the K/V replace the latents: what is allocated now is the MHA cache
        gc.collect()
        row["allocated"] = None if base is None else _allocated(device) - base
    row["peak"] = None if base is None else torch.cuda.max_memory_allocated(device) - base
    del cache
    return row


def lengths_up_to(max_len: int) -> list[int]:
    if max_len >= 1024:
        out, n = [], 1024
        while n <= max_len:
            out.append(n)
            n *= 2
        return out
    return [max_len // 4, max_len // 2, max_len]


def fmt(b):
    return "n/a" if b is None else f"{b / MiB:.2f}"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="fusion_1b", choices=list(FLAVORS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--max-len", type=int, default=32768)
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--chunk", type=int, default=1024, help="prefill tokens per forward")
    parser.add_argument("--decode", type=int, default=16, help="decode steps after the prefill")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=["hybrid", "all-MLA", "plain-MHA"])
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    opts.dtype = opts.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    lengths = opts.lengths or lengths_up_to(opts.max_len)
    base_args = FLAVORS[opts.flavor].replace(max_seq_len=max(lengths) + opts.decode + 1, mtp_depth=0)
    torch.manual_seed(0)

    rows = []
    schedules = {"hybrid": base_args.layer_schedule, "all-MLA": "mha"}
    for name in ("hybrid", "all-MLA"):
        want = [v for v in opts.variants if v == name or (name == "hybrid" and v == "plain-MHA")]
        if not want:
            continue
        args = base_args.replace(layer_schedule=schedules[name])
        model = build_model(args, device=device, dtype=DTYPES[opts.dtype])
        kinds = args.block_kinds()
        desc = f"{kinds.count('mla')} MLA + {len(kinds) - kinds.count('mla')} {args.ssm_type.upper()}"
        for variant in want:
            for length in lengths:
                row = measure(model, length, opts, device, plain_mha=variant == "plain-MHA")
                row.update(variant=variant, layers=desc)
                rows.append(row)
                print(f"# {variant} L={length}: cache {fmt(row['cache'])} MiB, allocated "
                      f"{fmt(row['allocated'])} MiB, peak {fmt(row['peak'])} MiB", flush=True)
        del model
        gc.collect()

    print()
    print(f"{opts.flavor}, {opts.dtype}, batch {opts.batch}, device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"prefill chunk {opts.chunk}, {opts.decode} decode steps")
    print()
    print("| variant | layers | context | cache MiB | allocated MiB | peak MiB | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        dec = "-" if r["decode_tps"] is None else f"{r['decode_tps']:.1f}"
        print(f"| {r['variant']} | {r['layers']} | {r['length']} | {fmt(r['cache'])} | "
              f"{fmt(r['allocated'])} | {fmt(r['peak'])} | {r['prefill_tps']:.0f} | {dec} |")
    return rows


if __name__ == "__main__":
    main()
