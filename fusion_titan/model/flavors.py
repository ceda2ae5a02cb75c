"""Named model sizes (`[model] flavor`). Parameter counts are in the README (scripts/count_params.py)."""

from __future__ import annotations

from collections.abc import Mapping

from .args import FusionModelArgs


class Flavors(Mapping):
    """A read-only name -> args table whose missing-key error lists the valid names.

    torchtitan indexes `train_spec.model_args[flavor]` and then mutates the args from the TOML,
    so each lookup hands out a fresh copy: two runs in one process never see each other's edits.
    """

    def __init__(self, table: dict[str, FusionModelArgs]):
        self._table = table

    def __getitem__(self, name: str) -> FusionModelArgs:
        if name not in self._table:
            raise KeyError(
                f"unknown model flavor {name!r} for model 'fusion'; choose one of "
                f"{sorted(self._table)} ([model] flavor in the TOML or --model.flavor)"
            )
        return self._table[name].replace()

    def __iter__(self):
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


# The playground's softmax-attention baselines: Qwen3-0.6B's shape (Qwen3 technical report,
# Table 1 / its config.json: 28 layers, dim 1024, 16 query / 8 KV heads of 128 with QK-norm,
# SwiGLU 3072, tied embedding, rope theta 1e6) on the Qwen2.5 vocabulary, no MTP; and its MoE
# counterpart at the same active parameters. Both keep this recipe's softcap and muP.
DENSE_0P6B = FusionModelArgs(
    dim=1024, n_layers=28, vocab_size=152064, layer_pattern="attn*28", ffn_hidden_dim=3072,
    n_heads=16, n_kv_heads=8, head_dim=128, qk_norm=True, attn_gate="none", rope_fraction=1.0,
    attn_rope_theta=1e6, max_seq_len=4096, n_routed_experts=0, mtp_depth=0, logit_softcap=15.0,
    mup=True, mup_base_dim=256,
)
# DeepSeekMoE's fine-grained routing (DeepSeekMoE-16B: 2 shared + top-6 of 64 routed experts) with
# experts 3072 / 8 = 384 wide, so the 8 experts a token touches are exactly dense_0p6b's SwiGLU;
# the only extra active parameters are the routers (64 x 1024 per layer, +0.3%). No group-limited
# routing (that is for cross-node expert parallelism).
MOE_0P6B = DENSE_0P6B.replace(
    n_routed_experts=64, n_activated_experts=6, n_shared_experts=2, moe_inter_dim=384,
    n_expert_groups=0, n_limited_groups=0,
)
# Their debug sizes: the same block kinds and options at dim 128 (CPU smoke runs).
DEBUG_0P6B = dict(dim=128, n_layers=4, layer_pattern="attn*4", ffn_hidden_dim=384, n_heads=4,
                  n_kv_heads=2, head_dim=32, max_seq_len=1024, mup_base_dim=128)
# The 95.7M seed's hybrid: 16 layers of (Gated DeltaNet, Gated DeltaNet, compressed sparse
# attention, softmax attention), dim 576; attention 9 query / 3 KV heads of 64 with QK-norm, a
# query gate and 50% partial RoPE at theta 20,000; GDN 9 heads of 112-dim keys and values; a
# dense SwiGLU everywhere (no MoE, no MTP), scaled residuals. The FFN width 1632 puts the model
# at 95.6M parameters with a 32K vocabulary; it runs on the Qwen2.5 vocabulary (152064, the
# tokenizer the data pipeline has), which makes it 164.7M (README, "Model sizes"). No muP: the
# seed's recipe is plain Muon + AdamW (train_configs/hybrid_95m.toml).
HYBRID_95M = FusionModelArgs(
    dim=576, n_layers=16, vocab_size=152064, layer_pattern="(gdn,gdn,csa,attn)*4",
    ffn_hidden_dim=1632, residual="scaled",
    n_heads=9, n_kv_heads=3, head_dim=64, qk_norm=True, attn_gate="query", rope_fraction=0.5,
    attn_rope_theta=20000.0, max_seq_len=1024, csa_stride=4, csa_window=64,
    n_routed_experts=0,
    gdn_n_heads=9, gdn_head_k_dim=112, gdn_head_v_dim=112, gdn_conv_size=4,
    mtp_depth=0, logit_softcap=15.0, mup=False,
)

FLAVORS = Flavors({
    # Trains in a few minutes on a 2-core CPU; the real Qwen2.5 vocabulary so it reads real text.
    "debugmodel": FusionModelArgs(
        dim=128, n_layers=6, vocab_size=152064, layer_schedule="5:1", ffn_hidden_dim=384,
        n_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, max_seq_len=1024, sliding_window=0,
        n_routed_experts=8, n_activated_experts=2, n_shared_experts=1, n_expert_groups=4,
        n_limited_groups=2, moe_inter_dim=128,
        gdn_n_heads=2, gdn_head_k_dim=32, gdn_head_v_dim=64, gdn_conv_size=4,
        mtp_depth=1, logit_softcap=15.0, mup=True, mup_base_dim=128,
    ),
    # One 80 GB GPU, for benchmarks: the 7b's shapes at half width and ~half depth.
    "fusion_1b": FusionModelArgs(
        dim=1024, n_layers=16, vocab_size=152064, layer_schedule="5:1", ffn_hidden_dim=3072,
        n_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_seq_len=4096, sliding_window=0,
        n_routed_experts=32, n_activated_experts=6, n_shared_experts=2, n_expert_groups=8,
        n_limited_groups=3, moe_inter_dim=768,
        gdn_n_heads=8, gdn_head_k_dim=64, gdn_head_v_dim=128, gdn_conv_size=4,
        mtp_depth=1, logit_softcap=15.0, mup=True, mup_base_dim=256,
    ),
    # The seed's reference dims, unchanged (see the README for what they really add up to).
    "fusion_7b": FusionModelArgs(
        dim=2048, n_layers=30, vocab_size=152064, layer_schedule="5:1", ffn_hidden_dim=6144,
        n_heads=32, q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_seq_len=4096, sliding_window=2048,
        mla_kv_groups=8,  # the seed's n_kv_groups: 4 query heads share each decompressed K/V
        n_routed_experts=64, n_activated_experts=6, n_shared_experts=4, n_expert_groups=8,
        n_limited_groups=3, moe_inter_dim=1536,
        gdn_n_heads=16, gdn_head_k_dim=64, gdn_head_v_dim=128, gdn_conv_size=4,
        mtp_depth=3, logit_softcap=15.0, mup=True, mup_base_dim=256,
    ),
    "dense_0p6b": DENSE_0P6B,
    "moe_0p6b": MOE_0P6B,
    "dense_0p6b_debug": DENSE_0P6B.replace(**DEBUG_0P6B),
    # 1 shared + top-3 of 8 experts of 96 = the debug dense SwiGLU's 384
    "moe_0p6b_debug": MOE_0P6B.replace(**DEBUG_0P6B, n_routed_experts=8, n_activated_experts=3,
                                       n_shared_experts=1, moe_inter_dim=96),
    "hybrid_95m": HYBRID_95M,
})
