"""A fusion_titan export as a transformers model (load with trust_remote_code=True).

Self-contained plain-torch port of fusion_titan's inference forward pass (it imports nothing from
fusion_titan), reading the tensors under the names `dcp-to-hf` writes:

  tied embedding -> layers (`layer_types`: Multi-head Latent Attention + DeepSeekMoE or dense
  SwiGLU; Gated DeltaNet or Mamba-2 + dense SwiGLU) -> RMSNorm -> tied head: logits =
  softcap * tanh(logit_scale * h E^T / softcap), logit_scale = mup_base_dim / dim under muP.

RoPE rotates interleaved pairs (the export's DeepSeek-V3 layout, config `rope_interleave`). The
recurrent mixers run their token-by-token recurrence (exact, but O(T) Python steps: slow for
long prompts); MoE routing is the inference path (no capacity dropping); the multi-token-
prediction modules (`model.mtp.*`) are training-only and not loaded. No KV cache: generate()
recomputes the whole prefix at every step. Padding (attention_mask with zeros) is not supported.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_fusion import FusionConfig


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest along the last dim, ties to the lower index: the training router's rule
    (fusion_titan/model/routers.py), so an export picks the same experts on exact ties."""
    values, indices = x.sort(dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def _block_kinds(schedule: str, n_layers: int) -> list[str]:
    if schedule in ("mha", "ssm"):
        return ["attn" if schedule == "mha" else "gdn"] * n_layers
    n_attn, n_gdn = (int(x) for x in schedule.split(":"))
    return ["attn" if i % (n_attn + n_gdn) < n_attn else "gdn" for i in range(n_layers)]


def _rope_interleaved(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate x [B, T, H, D] at positions 0..T-1: pair (x[2i], x[2i+1]) by angle pos * theta^(-2i/D)."""
    seq_len, dim = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(seq_len, device=x.device, dtype=torch.float32), inv_freq)
    compute = _compute_dtype(x.dtype)
    cos, sin = (t.to(compute)[None, :, None, :] for t in (angles.cos(), angles.sin()))
    pairs = x.to(compute).unflatten(-1, (dim // 2, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 MLA: low-rank query, one compressed KV latent, decoupled rope key shared
    by all heads; kv_b_proj decompresses G = mla_kv_groups (0: n_heads) nope-key/value pairs."""

    def __init__(self, a: SimpleNamespace):
        super().__init__()
        self.a = a
        self.groups = a.mla_kv_groups or a.n_heads
        head = a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(a.dim, a.q_lora_rank, bias=False)
            self.q_a_layernorm = nn.RMSNorm(a.q_lora_rank, eps=a.norm_eps)
            self.q_b_proj = nn.Linear(a.q_lora_rank, a.n_heads * head, bias=False)
        else:
            self.q_proj = nn.Linear(a.dim, a.n_heads * head, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(a.dim, a.kv_lora_rank + a.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(a.kv_lora_rank, eps=a.norm_eps)
        self.kv_b_proj = nn.Linear(
            a.kv_lora_rank, self.groups * (a.qk_nope_head_dim + a.v_head_dim), bias=False)
        self.o_proj = nn.Linear(a.n_heads * a.v_head_dim, a.dim, bias=False)

    def forward(self, x):
        a, (bsz, seq_len, _) = self.a, x.shape
        nope, rope, heads = a.qk_nope_head_dim, a.qk_rope_head_dim, a.n_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if a.q_lora_rank > 0 else self.q_proj(x)
        q_nope, q_rope = q.view(bsz, seq_len, heads, nope + rope).split([nope, rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(bsz, seq_len, self.groups, -1)
        k_nope, v = kv.split([nope, a.v_head_dim], dim=-1)
        per_group = heads // self.groups  # consecutive heads share their group's key and value
        k_nope, v = k_nope.repeat_interleave(per_group, 2), v.repeat_interleave(per_group, 2)
        k_rope = _rope_interleaved(k_rope.unsqueeze(2), a.rope_theta).expand(-1, -1, heads, -1)
        q = torch.cat([q_nope, _rope_interleaved(q_rope, a.rope_theta)], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        pos = torch.arange(seq_len, device=x.device)
        allowed = pos[None, :] <= pos[:, None]
        if a.sliding_window > 0:  # a query sees itself and the window - 1 previous tokens
            allowed &= pos[None, :] > pos[:, None] - a.sliding_window
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed,
            scale=1.0 / math.sqrt(nope + rope))
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq_len, -1))


class MoEGate(nn.Module):
    def __init__(self, dim: int, n_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts))  # selection only


class DeepSeekMoE(nn.Module):
    """Router "deepseek": sigmoid affinities; top-k over the biased scores within the best
    n_limited_groups expert groups; weights = the chosen unbiased affinities, normalized, times
    route_scale. Router "softmax_topk": top-k of the softmax probabilities (renormalized with
    moe_router_norm_topk), no bias. Plus shared experts."""

    def __init__(self, a: SimpleNamespace):
        super().__init__()
        self.a = a
        self.gate = MoEGate(a.dim, a.n_routed_experts)
        self.experts = nn.ModuleList(SwiGLU(a.dim, a.moe_inter_dim) for _ in range(a.n_routed_experts))
        self.shared_experts = (SwiGLU(a.dim, a.moe_inter_dim * a.n_shared_experts)
                               if a.n_shared_experts > 0 else None)
        groups = a.n_expert_groups if a.n_expert_groups and a.n_expert_groups > 1 else 0
        self.n_groups = 0 if groups and a.n_limited_groups == groups else groups

    def forward(self, x):
        a, shape = self.a, x.shape
        x = x.reshape(-1, shape[-1])
        logits = F.linear(x, self.gate.weight)
        logits = logits.to(_compute_dtype(logits.dtype))
        route = self._softmax_topk if getattr(a, "moe_router", "deepseek") == "softmax_topk" else self._group_limited
        weights, indices = route(logits)
        out = torch.zeros(x.shape, dtype=weights.dtype, device=x.device)
        for e, expert in enumerate(self.experts):
            token, slot = (indices == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, weights[token, slot, None] * expert(x[token]).to(weights.dtype))
        out = out.type_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)

    def _softmax_topk(self, logits):
        a = self.a
        weights, indices = _top_k(torch.softmax(logits, dim=-1), a.n_activated_experts)
        if getattr(a, "moe_router_norm_topk", False):
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        return weights, indices

    def _group_limited(self, logits):
        a = self.a
        scores = torch.sigmoid(logits)
        choice = scores + self.gate.e_score_correction_bias.to(scores.dtype)
        if self.n_groups:
            grouped = choice.view(logits.shape[0], self.n_groups, -1)
            group_score = _top_k(grouped, min(2, grouped.shape[-1]))[0].sum(-1)
            keep = _top_k(group_score, a.n_limited_groups)[1]
            dropped = torch.ones_like(group_score, dtype=torch.bool).scatter(1, keep, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view_as(scores)
        indices = _top_k(choice, a.n_activated_experts)[1]
        weights = scores.gather(1, indices)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20) * a.route_scale
        return weights, indices


class ShortConv(nn.Module):
    """Causal depthwise conv over time + SiLU; weight [channels, kernel], last tap = current token."""

    def __init__(self, channels: int, kernel: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, kernel))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None

    def forward(self, x):
        xp = F.pad(x, (0, 0, self.weight.shape[1] - 1, 0)).transpose(1, 2)
        y = F.conv1d(xp, self.weight.unsqueeze(1), self.bias, groups=self.weight.shape[0])
        return F.silu(y.transpose(1, 2))


def _l2norm(x, eps: float = 1e-6):
    # in float32 (float64 stays), returned in x's dtype: as the trained model computes it
    xf = x if x.dtype == torch.float64 else x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """Qwen3-Next's Gated DeltaNet: S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - k_t^T exp(g_t)
    S_{t-1}))^T, o_t = S_t^T q_t / sqrt(head_k_dim); q, k L2-normalized after a short conv;
    output RMS-normalized per head, gated by silu(g_proj(x))."""

    def __init__(self, a: SimpleNamespace):
        super().__init__()
        self.a = a
        key_dim, value_dim = a.gdn_n_heads * a.gdn_head_k_dim, a.gdn_n_heads * a.gdn_head_v_dim
        for name, out in (("q_proj", key_dim), ("k_proj", key_dim), ("v_proj", value_dim),
                          ("a_proj", a.gdn_n_heads), ("b_proj", a.gdn_n_heads), ("g_proj", value_dim)):
            setattr(self, name, nn.Linear(a.dim, out, bias=False))
        self.q_conv1d = ShortConv(key_dim, a.gdn_conv_size)
        self.k_conv1d = ShortConv(key_dim, a.gdn_conv_size)
        self.v_conv1d = ShortConv(value_dim, a.gdn_conv_size)
        self.A_log = nn.Parameter(torch.empty(a.gdn_n_heads))
        self.dt_bias = nn.Parameter(torch.empty(a.gdn_n_heads))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.empty(a.gdn_head_v_dim))
        self.out_proj = nn.Linear(value_dim, a.dim, bias=False)

    def forward(self, x):
        a, (bsz, seq_len, _) = self.a, x.shape
        heads, dk, dv = a.gdn_n_heads, a.gdn_head_k_dim, a.gdn_head_v_dim
        compute = _compute_dtype(x.dtype)
        q = _l2norm(self.q_conv1d(self.q_proj(x)).view(bsz, seq_len, heads, dk)).to(compute)
        k = _l2norm(self.k_conv1d(self.k_proj(x)).view(bsz, seq_len, heads, dk)).to(compute)
        v = self.v_conv1d(self.v_proj(x)).view(bsz, seq_len, heads, dv).to(compute)
        beta = torch.sigmoid(self.b_proj(x)).to(compute)
        g = -self.A_log.to(compute).exp() * F.softplus(self.a_proj(x).to(compute) + self.dt_bias.to(compute))
        state = x.new_zeros(bsz, heads, dk, dv, dtype=compute)
        outs = []
        for t in range(seq_len):
            state = state * g[:, t].exp()[..., None, None]
            predicted = torch.einsum("bhk,bhkv->bhv", k[:, t], state)
            state = state + k[:, t, :, :, None] * (beta[:, t, :, None] * (v[:, t] - predicted))[:, :, None]
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * dk ** -0.5, state))
        o = torch.stack(outs, dim=1).to(x.dtype)
        z = self.g_proj(x).view(bsz, seq_len, heads, dv)
        of = o.to(compute)
        of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + a.norm_eps)
        o = (of * self.norm.weight.to(compute) * F.silu(z.to(compute))).to(x.dtype)
        return self.out_proj(o.reshape(bsz, seq_len, heads * dv))


class Mamba2(nn.Module):
    """Mamba-2 (SSD) with one B/C group: S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T,
    y_t = S_t C_t + D x_t, then RMSNorm(y * silu(z)) and out_proj."""

    def __init__(self, a: SimpleNamespace):
        super().__init__()
        self.a = a
        self.heads = 2 * a.dim // a.mamba_head_dim
        self.inner = self.heads * a.mamba_head_dim
        conv_dim = self.inner + 2 * a.mamba_d_state
        self.in_proj = nn.Linear(a.dim, 2 * self.inner + 2 * a.mamba_d_state + self.heads, bias=False)
        self.conv = ShortConv(conv_dim, a.gdn_conv_size, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.D = nn.Parameter(torch.empty(self.heads))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.empty(self.inner))
        self.out_proj = nn.Linear(self.inner, a.dim, bias=False)

    def forward(self, x):
        a, (bsz, seq_len, _) = self.a, x.shape
        heads, p, n = self.heads, a.mamba_head_dim, a.mamba_d_state
        compute = _compute_dtype(x.dtype)
        z, xbc, dt = self.in_proj(x).split([self.inner, self.inner + 2 * n, heads], dim=-1)
        xs, b, c = self.conv(xbc).split([self.inner, n, n], dim=-1)
        xs = xs.view(bsz, seq_len, heads, p)
        dt = F.softplus(dt.to(compute) + self.dt_bias.to(compute))
        decay_rate = -self.A_log.to(compute).exp()
        state = x.new_zeros(bsz, heads, p, n, dtype=compute)
        xf, bf, cf = xs.to(compute), b.to(compute), c.to(compute)
        ys = []
        for t in range(seq_len):
            state = (state * torch.exp(dt[:, t] * decay_rate)[..., None, None]
                     + (dt[:, t, :, None] * xf[:, t])[..., None] * bf[:, t, None, None, :])
            ys.append(torch.einsum("bhpn,bn->bhp", state, cf[:, t]))
        y = torch.stack(ys, dim=1).to(x.dtype) + xs * self.D.to(x.dtype)[:, None]
        gated = y.reshape(bsz, seq_len, self.inner).to(compute) * F.silu(z.to(compute))
        normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + a.norm_eps)
        return self.out_proj((normed * self.norm.weight.to(compute)).to(x.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, a: SimpleNamespace, kind: str):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(a.dim, eps=a.norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(a.dim, eps=a.norm_eps)
        if kind == "attn":
            self.self_attn = MultiHeadLatentAttention(a)
        elif a.ssm_type == "mamba2":
            self.mamba = Mamba2(a)
        else:
            self.linear_attn = GatedDeltaNet(a)
        self.mixer_name = "self_attn" if kind == "attn" else (
            "mamba" if a.ssm_type == "mamba2" else "linear_attn")
        self.mlp = (DeepSeekMoE(a) if kind == "attn" and a.n_routed_experts > 0
                    else SwiGLU(a.dim, a.ffn_hidden_dim))

    def forward(self, x):
        x = x + getattr(self, self.mixer_name)(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class FusionPreTrainedModel(PreTrainedModel):
    config_class = FusionConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"model\.mtp\."]  # training-only MTP modules

    def _init_weights(self, module):
        """Only for tensors missing from a checkpoint (there should be none): zeros would hide a
        gap, so draw them like the training code's base init."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)


class FusionTextModel(FusionPreTrainedModel):
    def __init__(self, config: FusionConfig):
        super().__init__(config)
        a = SimpleNamespace(**config.fusion_model_args)
        self.embed_tokens = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(DecoderLayer(a, kind)
                                    for kind in _block_kinds(a.layer_schedule, a.n_layers))
        self.norm = nn.RMSNorm(a.dim, eps=a.norm_eps)
        self.post_init()

    def forward(self, input_ids):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class FusionForCausalLM(FusionPreTrainedModel, GenerationMixin):
    def __init__(self, config: FusionConfig):
        super().__init__(config)
        if not getattr(config, "rope_interleave", False):
            raise ValueError("this export keeps fusion_titan's half-split rope rows (no "
                             "rope_interleave in config.json): re-export it with dcp-to-hf")
        self.model = FusionTextModel(config)
        a = config.fusion_model_args
        self.softcap = a["logit_softcap"]
        self.logit_scale = a["mup_base_dim"] / a["dim"] if a["mup"] else 1.0  # muP readout
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """No KV cache: every generation step runs the whole sequence so far."""
        return {"input_ids": input_ids}

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutput:
        """input_ids [B, T] -> logits [B, T, vocab] (float32); with labels (= input_ids, shifted
        here as in transformers), the mean next-token cross entropy."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("padded batches are not supported: pass unpadded sequences")
        h = self.model(input_ids)
        z = (h @ self.model.embed_tokens.weight.t()).to(_compute_dtype(h.dtype)) * self.logit_scale
        logits = self.softcap * torch.tanh(z / self.softcap) if self.softcap > 0 else z
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)
