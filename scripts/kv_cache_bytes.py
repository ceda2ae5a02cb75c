"""Measure the decoding cache of one MLA layer against caching its uncompressed keys and values.

    python scripts/kv_cache_bytes.py [--tokens 1024] [--flavor fusion_7b ...]

For each flavor: one MLA layer with the flavor's dims (bf16, random init, CPU) prefills N tokens
through its latent cache; the bytes its cache tensors hold are divided by N. The K/V figure is
the bytes of the keys (nope + the shared rope key copied to every K/V head) and values that the
same layer would have to cache without latent compression, materialized from the same tokens:
one K/V head per `mla_kv_groups` group (MHA when it is 0, GQA otherwise). Both
are tensor.nbytes of real tensors, not formulas. Sliding windows are ignored here (N < window).
"""

import argparse

import torch

from fusion_titan.model.flavors import FLAVORS
from fusion_titan.model.mixers.mla import MultiHeadLatentAttention
from fusion_titan.model.rope import rope_cache


def measure(flavor: str, n_tokens: int) -> dict:
    args = FLAVORS[flavor].replace(sliding_window=0, max_seq_len=max(n_tokens, 16))
    torch.manual_seed(0)
    layer = MultiHeadLatentAttention(args).to(torch.bfloat16)
    std = args.init_std
    layer.init_weights(std, std)
    rope = rope_cache(args.qk_rope_head_dim, args.max_seq_len, args.rope_theta)
    x = torch.randn(1, n_tokens, args.dim, dtype=torch.bfloat16)
    cache = layer.new_cache(1)
    with torch.no_grad():
        layer(x, rope, cache=cache)
        c_kv, k_rope = layer.compress(x)
        k_nope, v = layer.decompress(c_kv)
        keys = torch.cat([k_nope, k_rope.unsqueeze(2).expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
    mla = cache.nbytes() / n_tokens
    mha = (keys.nbytes + v.nbytes) / n_tokens
    n_attn = args.block_kinds().count("mla")
    return {"flavor": flavor, "mla": mla, "mha": mha, "ratio": mha / mla, "attn_layers": n_attn,
            "kv_heads": k_nope.shape[2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--flavor", action="append", choices=list(FLAVORS))
    opts = parser.parse_args()
    print("| flavor | K/V heads | MLA bytes/token/layer | K/V bytes/token/layer | K/V / MLA | "
          "attention layers | MLA KiB/token (all layers) | K/V KiB/token (all layers) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in opts.flavor or ["fusion_1b", "fusion_7b"]:
        r = measure(name, opts.tokens)
        print(f"| {name} | {r['kv_heads']} | {r['mla']:.0f} | {r['mha']:.0f} | {r['ratio']:.1f}x | {r['attn_layers']} | "
              f"{r['mla'] * r['attn_layers'] / 1024:.1f} | {r['mha'] * r['attn_layers'] / 1024:.1f} |")


if __name__ == "__main__":
    main()
