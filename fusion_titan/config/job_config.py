"""fusion_titan's TOML sections, merged into torchtitan's JobConfig via `[job] custom_config_module`.

Dataclasses named like torchtitan's sections (`Model`, `Optimizer`) add fields to those sections;
new sections (`Loss`, `Data`) are new tables in the TOML. Every field is documented in
docs/config.md; `tests/test_config.py` fails if one is missing there.
"""


from dataclasses import dataclass, field


@dataclass
class Model:
    """Overrides of the flavor's architecture. Unset (None) keeps the flavor's value."""

    layer_schedule: str | None = None
    layer_pattern: str | None = None
    residual: str | None = None
    hyper_streams: int | None = None
    hyper_mode: str | None = None
    hyper_dynamic: bool | None = None
    engram_layers: list[int] | None = None
    engram_ngram: int | None = None
    engram_table_size: int | None = None
    engram_dim: int | None = None
    engram_heads: int | None = None
    n_layers: int | None = None
    n_routed_experts: int | None = None
    n_activated_experts: int | None = None
    mtp_depth: int | None = None
    logit_softcap: float | None = None
    mup: bool | None = None
    sliding_window: int | None = None
    attn_backend: str | None = None
    gdn_backend: str | None = None
    moe_bias_update_rate: float | None = None
    use_grouped_mm: bool | None = None
    ssm_type: str | None = None
    moe_seq_aux_weight: float | None = None
    moe_capacity_factor: float | None = None
    moe_router: str | None = None
    moe_router_jitter: float | None = None
    moe_router_norm_topk: bool | None = None
    moe_router_z_loss_weight: float | None = None
    moe_aux_loss: str | None = None
    moe_aux_loss_weight: float | None = None
    moe_dispatch: str | None = None
    moe_group_align: int | None = None
    moe_combine: str | None = None
    ffn_hidden_dim: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    qk_norm: bool | None = None
    attn_gate: str | None = None
    rope_fraction: float | None = None
    attn_rope_theta: float | None = None
    attn_window: int | None = None
    block_sparse_block: int | None = None
    block_sparse_local: int | None = None
    block_sparse_global: int | None = None

    csa_stride: int | None = None
    csa_window: int | None = None
    linear_feature_map: str | None = None


@dataclass
class Compile:
    """How [compile] enable = true compiles the model (fusion_titan/infra/parallelize.py)."""

    granularity: str = "block"
    cudagraphs: bool = False


@dataclass
class Optimizer:
    """NorMuon + CautiousAdamW (name = "NorMuon") or Muon + AdamW (name = "Muon"): the muon_* keys
    configure the matrix rule, torchtitan's lr / weight_decay the rest; torchtitan's AdamW otherwise."""

    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_beta2: float = 0.95
    muon_weight_decay: float = 0.0
    ns_steps: int = 5
    muon_update_scale: str = "muon"
    muon_bucket_mb: float = 512.0
    engram_lr: float | None = None


@dataclass
class Training:
    """Ramps (fusion_titan/training/ramp.py); unset = constant seq_len / global batch."""

    seq_len_ramp: list[int] = field(default_factory=list)
    seq_len_ramp_steps: list[int] = field(default_factory=list)
    batch_ramp: list[int] = field(default_factory=list)
    batch_ramp_steps: list[int] = field(default_factory=list)


@dataclass
class LRScheduler:
    """torchtitan's warmup-stable-decay, with the warmup optionally a fraction of the run."""

    warmup_fraction: float | None = None


@dataclass
class Loss:
    mtp_weight: float = 0.3
    z_loss_weight: float = 0.0
    ce_chunk_size: int = 4096
    ce_impl: str = "auto"
    cce_filter_eps: str = "auto"


@dataclass
class Data:
    """Where tokens come from: the stdlib corpus on the fly, or prepared shards (docs/data.md)."""

    source: str = "stdlib"
    tokenizer: str = "qwen2.5"
    seed: int = 0
    max_documents: int = 0
    path: str = ""
    stage_weights: list[str] = field(default_factory=list)
    stage_steps: list[int] = field(default_factory=list)
    verify_checksums: bool = True
    prefetch: int = 4
    document_ids: bool = False
    val_path: str = ""


@dataclass
class Metrics:
    """What the console shows besides the one line per logged step (fusion_titan/training/metrics.py)."""

    console_extras_freq: int = 0


@dataclass
class JobConfig:
    model: Model = field(default_factory=Model)
    compile: Compile = field(default_factory=Compile)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    loss: Loss = field(default_factory=Loss)
    data: Data = field(default_factory=Data)
    metrics: Metrics = field(default_factory=Metrics)
