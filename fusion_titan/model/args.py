"""Model hyper-parameters of the fusion hybrid, and how the TOML overrides them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch.nn as nn

from torchtitan.protocols.model import BaseModelArgs

# `[model]` keys that override a flavor field of the same name when set in the TOML (None = keep).
OVERRIDABLE_FIELDS = (
    "layer_schedule", "n_layers", "n_routed_experts", "n_activated_experts", "mtp_depth",
    "logit_softcap", "mup", "sliding_window", "attn_backend", "gdn_backend",
    "moe_bias_update_rate", "use_grouped_mm", "ssm_type", "moe_seq_aux_weight",
    "moe_capacity_factor", "layer_pattern", "residual", "moe_dispatch", "moe_group_align",
    "moe_combine", "moe_router", "moe_router_jitter", "moe_router_norm_topk", "moe_router_z_loss_weight",
    "moe_aux_loss", "moe_aux_loss_weight", "ffn_hidden_dim", "n_kv_heads", "head_dim",
    "qk_norm", "attn_gate", "rope_fraction", "attn_rope_theta", "attn_window",
    "block_sparse_block", "block_sparse_local", "block_sparse_global", "csa_stride",
    "csa_window", "linear_feature_map", "hyper_streams", "hyper_mode", "hyper_dynamic",
    "engram_layers", "engram_ngram", "engram_table_size", "engram_dim", "engram_heads",
)

# Fields that grow with the width (dim): muP's base model has them scaled by mup_base_dim / dim.
# Everything else (head dims, q/kv LoRA ranks, expert count, vocabulary, conv size) is a fixed
# dimension, the same in the base model.
MUP_WIDTH_FIELDS = ("n_heads", "ffn_hidden_dim", "moe_inter_dim", "gdn_n_heads")


@dataclass
class FusionModelArgs(BaseModelArgs):
    # trunk
    dim: int = 2048
    n_layers: int = 30
    vocab_size: int = 152064
    layer_schedule: str = "5:1"  # a preset period of MLA / recurrent blocks (model/layer_pattern.py)
    layer_pattern: str = ""  # per-layer block kinds, e.g. "(gdn,gdn,csa,attn)*4"; replaces layer_schedule
    residual: str = "plain"  # plain | scaled | hyper (model/residual.py)
    # hyper-connections (residual = "hyper"; model/hyper_connections.py)
    hyper_streams: int = 4  # n parallel residual streams
    hyper_mode: str = "hc"  # hc (Zhu et al. 2025) | mhc (Sinkhorn doubly-stochastic stream mixing)
    hyper_dynamic: bool = True  # add the input-dependent (dynamic) coefficients to the static ones
    # Engram n-gram memory (model/engram.py); empty engram_layers = off
    engram_layers: list[int] = dataclasses.field(default_factory=list)  # applied before these blocks
    engram_ngram: int = 3  # hashes the 2..N-grams ending at each position
    engram_table_size: int = 65536  # rows per hash head (rounded up to a distinct prime per head)
    engram_dim: int = 128  # memory width per n-gram order, split across the hash heads
    engram_heads: int = 4  # hash functions (heads) per n-gram order
    norm_eps: float = 1e-6
    ffn_hidden_dim: int = 6144  # dense SwiGLU width (GDN blocks, and attention blocks without MoE)

    # Multi-head Latent Attention (DeepSeek-V2/V3)
    n_heads: int = 32
    q_lora_rank: int = 512  # 0 = plain query projection
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    sliding_window: int = 0  # 0 = full causal attention
    attn_backend: str = "auto"  # auto | sdpa | flex | flash | reference (fusion_titan/ops/attention.py)
    mla_kv_groups: int = 0  # 0 = n_heads: every head decompresses its own K/V from the latent

    # Softmax-attention mixers other than MLA (attn, swa, block_sparse, csa; model/mixers/).
    # They share n_heads with MLA; each head is head_dim wide.
    n_kv_heads: int = 0  # 0 = n_heads (MHA); fewer = GQA (must divide n_heads)
    head_dim: int = 128
    qk_norm: bool = False  # RMSNorm on q and k per head
    attn_gate: str = "none"  # none | output | query: sigmoid gate from the block input
    rope_fraction: float = 1.0  # share of each head's dims that RoPE rotates (partial RoPE)
    attn_rope_theta: float = 10000.0
    attn_window: int = 0  # swa: sliding window in tokens (0 = not set)
    # block_sparse: a query sees its own block and the block_sparse_local - 1 previous ones
    # (blocks of block_sparse_block tokens), plus the first block_sparse_global tokens
    block_sparse_block: int = 128
    block_sparse_local: int = 4
    block_sparse_global: int = 128
    csa_stride: int = 4  # csa: consecutive keys / values summarised into one compressed entry
    csa_window: int = 64  # csa: exact causal attention over this many latest tokens
    linear_feature_map: str = "elu"  # linear: phi of keys and queries, "elu" (elu + 1) or "relu"

    # DeepSeekMoE
    n_routed_experts: int = 64  # 0 = every attention block gets a dense FFN
    n_activated_experts: int = 6
    n_shared_experts: int = 4
    n_expert_groups: int = 8
    n_limited_groups: int = 3
    moe_inter_dim: int = 1536
    route_scale: float = 1.0
    moe_bias_update_rate: float = 1e-3  # aux-loss-free balancing step; 0 = off
    moe_seq_aux_weight: float = 0.0  # DeepSeek-V3's complementary sequence-wise balance loss
    moe_capacity_factor: float = 0.0  # 0 = no token dropping
    moe_router: str = "deepseek"  # "deepseek" | "softmax_topk" (fusion_titan/model/routers.py)
    moe_router_jitter: float = 0.0  # Switch Transformer's multiplicative input noise; 0 = off
    moe_router_norm_topk: bool = False  # softmax_topk: renormalize the k weights to sum 1
    moe_router_z_loss_weight: float = 0.0  # ST-MoE router z-loss; 0 = off
    moe_aux_loss: str = "none"  # batch balance loss: "switch" | "gshard" | "none" (balance_losses.py)
    moe_aux_loss_weight: float = 0.01  # its weight (Switch Transformer's alpha)
    use_grouped_mm: bool = True  # used on CUDA only; CPU runs the per-expert loop
    moe_dispatch: str = "static"  # static (padded, sync-free, moe_dispatch.py) | legacy (torchtitan's)
    moe_group_align: int = 16  # static dispatch: rows per expert group padded to this multiple
    moe_combine: str = "sum"  # top-k weighting of the expert outputs: sum (fused) | einsum (batched matmul)

    # The recurrent ("gdn") blocks' mixer: "gdn" = Gated DeltaNet, "mamba2" = the seed's legacy SSD
    ssm_type: str = "gdn"
    mamba_head_dim: int = 64
    mamba_d_state: int = 128

    # Gated DeltaNet (Qwen3-Next style)
    gdn_n_heads: int = 16
    gdn_head_k_dim: int = 64
    gdn_head_v_dim: int = 128  # "state 128": each head keeps a head_k x head_v = 64 x 128 state
    gdn_conv_size: int = 4
    gdn_backend: str = "auto"

    # heads
    mtp_depth: int = 3
    logit_softcap: float = 15.0  # 0 = off

    # loss-side knobs the fused head needs (set from [loss] by update_from_config)
    ce_chunk_size: int = 4096
    ce_impl: str = "auto"
    cce_filter_eps: str = "auto"
    z_loss: bool = False

    # initialization (muP: per-matrix init std and Adam lr from each matrix's fan-in relative to the
    # same matrix in the base model, `mup_base()`; the head's logits times mup_base_dim / dim)
    mup: bool = True
    mup_base_dim: int = 256
    init_std: float = 0.02

    def layer_specs(self) -> list:
        """Each trunk layer's LayerSpec (mixer kind, FFN kind or None = the family default)."""
        from .layer_pattern import resolve_layers

        return resolve_layers(self.layer_pattern, self.layer_schedule, self.n_layers, self.ssm_type)

    def block_kinds(self) -> list[str]:
        """Each trunk layer's mixer kind ("mla", "gdn", "mamba2", ...)."""
        return [spec.mixer for spec in self.layer_specs()]

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def residual_streams(self) -> int:
        """Copies of the residual stream the trunk carries: hyper_streams with hyper-connections
        (the trunk is then [B, T, n, D]), else 1 ([B, T, D])."""
        return self.hyper_streams if self.residual == "hyper" else 1

    @property
    def width_mult(self) -> float:
        """dim / mup_base_dim: the tied head's muP output multiplier is 1 / width_mult."""
        return self.dim / self.mup_base_dim if self.mup else 1.0

    def mup_base(self) -> "FusionModelArgs":
        """The muP base model: this flavor at dim = mup_base_dim (docs/model.md, "muP").

        Each width field is scaled by mup_base_dim / dim (rounded, at least 1); heads grow in
        number, not in size, so head dims stay. MLA's KV groups and the attention mixers' KV heads
        (when set) scale like the heads and are made to divide the base head count. Mamba-2's
        heads follow dim by construction.
        """
        ratio = self.mup_base_dim / self.dim
        base = {name: max(1, round(getattr(self, name) * ratio)) for name in MUP_WIDTH_FIELDS}
        for grouped in ("mla_kv_groups", "n_kv_heads"):  # 0 = one per head: scales by itself
            if getattr(self, grouped):
                scaled = max(1, round(getattr(self, grouped) * ratio))
                base[grouped] = math.gcd(scaled, base["n_heads"])
        return self.replace(dim=self.mup_base_dim, **base)

    def validate(self) -> None:
        self._check_layers()
        if self.n_routed_experts:
            if self.n_activated_experts > self.n_routed_experts:
                raise ValueError("n_activated_experts cannot exceed n_routed_experts")
            if self.n_expert_groups and self.n_routed_experts % self.n_expert_groups:
                raise ValueError(
                    f"n_routed_experts ({self.n_routed_experts}) must be divisible by "
                    f"n_expert_groups ({self.n_expert_groups}); set n_expert_groups = 0 to "
                    "route without groups."
                )
        self._validate_router()
        if self.ssm_type not in ("gdn", "mamba2"):
            raise ValueError(f"ssm_type {self.ssm_type!r} must be 'gdn' or 'mamba2'")
        if self.logit_softcap < 0:
            raise ValueError("logit_softcap must be >= 0 (0 turns it off)")
        self._check_residual_and_memory()
        if self.mup and self.mup_base_dim <= 0:
            raise ValueError(f"mup_base_dim must be > 0 with mup = true, got {self.mup_base_dim}")

    def _check_layers(self) -> None:
        """Every layer's mixer and FFN name exists; one error names the offending item."""
        from .ffn import FFNS
        from .layer_pattern import parse_layer_pattern
        from .mixers import MIXERS
        from .residual import RESIDUALS

        # names first (a typo is the likelier mistake), then the length against n_layers
        specs = parse_layer_pattern(self.layer_pattern) if self.layer_pattern else self.layer_specs()
        for i, spec in enumerate(specs):
            where = f"layer {i} ({spec.mixer}{'+' + spec.ffn if spec.ffn else ''}) of layer_pattern {self.layer_pattern or self.layer_schedule!r}"
            if spec.mixer not in MIXERS:
                raise ValueError(f"unknown mixer {spec.mixer!r} at {where}; valid mixers: {sorted(MIXERS)}")
            if spec.ffn is not None and spec.ffn not in FFNS:
                raise ValueError(f"unknown FFN {spec.ffn!r} at {where}; valid FFNs: {sorted(FFNS)}")
            if spec.ffn == "moe" and self.n_routed_experts <= 0:
                raise ValueError(f"'+moe' at {where} needs n_routed_experts > 0")
        self.layer_specs()
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual {self.residual!r} must be one of {sorted(RESIDUALS)}")

    def _validate_router(self) -> None:
        from .balance_losses import balance_loss_fn
        from .routers import check_jitter, router_class

        router_class(self.moe_router)
        balance_loss_fn(self.moe_aux_loss)
        check_jitter(self.moe_router_jitter)
        for name in ("moe_router_z_loss_weight", "moe_aux_loss_weight", "moe_seq_aux_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")

    @property
    def moe_has_aux_loss(self) -> bool:
        """Whether the MoE layers add an auxiliary loss (their `aux_loss`) in training."""
        balance = self.moe_aux_loss != "none" and self.moe_aux_loss_weight > 0
        return bool(self.n_routed_experts) and (
            self.moe_seq_aux_weight > 0 or balance or self.moe_router_z_loss_weight > 0)

    def _check_residual_and_memory(self) -> None:
        if self.residual == "hyper":
            if self.hyper_streams < 1:
                raise ValueError(f"hyper_streams must be >= 1, got {self.hyper_streams}")
            if self.hyper_mode not in ("hc", "mhc"):
                raise ValueError(f"hyper_mode {self.hyper_mode!r} must be 'hc' or 'mhc'")
        bad = [i for i in self.engram_layers if not 0 <= i < self.n_layers]
        if bad or len(set(self.engram_layers)) != len(self.engram_layers):
            raise ValueError(f"engram_layers {self.engram_layers} must be distinct block indices "
                             f"in [0, n_layers = {self.n_layers})")
        if self.engram_layers:
            if self.engram_ngram < 2:
                raise ValueError(f"engram_ngram must be >= 2 (it hashes the 2..N-grams), got {self.engram_ngram}")
            if self.engram_heads < 1 or self.engram_dim % self.engram_heads:
                raise ValueError(f"engram_dim ({self.engram_dim}) must be a multiple of engram_heads "
                                 f"({self.engram_heads} >= 1): each hash head gets engram_dim / engram_heads")
            if self.engram_table_size < 2:
                raise ValueError(f"engram_table_size must be >= 2, got {self.engram_table_size}")

    def update_from_config(self, job_config, **kwargs) -> None:
        model_cfg = job_config.model
        for name in OVERRIDABLE_FIELDS:
            value = getattr(model_cfg, name, None)
            if value is not None:
                setattr(self, name, value)
        loss_cfg = getattr(job_config, "loss", None)
        if loss_cfg is not None:
            self.ce_chunk_size = loss_cfg.ce_chunk_size
            self.ce_impl = loss_cfg.ce_impl
            self.cce_filter_eps = loss_cfg.cce_filter_eps
            self.z_loss = loss_cfg.z_loss_weight > 0
        seq_len = job_config.training.seq_len
        self.max_seq_len = max(self.max_seq_len, seq_len)
        self.validate()

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        from .flops import count_params, flops_per_token

        counts = count_params(model, self)
        return counts.total, flops_per_token(self, seq_len, counts)

    def replace(self, **changes) -> "FusionModelArgs":
        return dataclasses.replace(self, **changes)
