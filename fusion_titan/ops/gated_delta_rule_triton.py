"""Gated delta rule in Triton: chunked forward and backward, two custom ops joined by autograd.

Same math, layout and arguments as `chunk_gated_delta_rule` in gated_delta_rule.py (read its
docstring for the derivation). Per (batch, head) and chunk of BT tokens, with G the in-chunk
cumulative log decay, a = exp(G), D_ij = exp(G_i - G_j), s = scale and S the chunk-start state:

    A  = strict_lower(beta_i k_i.k_j D_ij),  Tm = (I + A)^-1    # _inverse_kernel  (parallel)
    u  = Tm (beta v),  w = Tm (beta a k)                         # _wu_kernel       (parallel)
    vn = u - w S,  S' = exp(G_last) S + (k exp(G_last - G))^T vn  # _fwd_state_kernel (sequential)
    o  = s (q a) S + (s q k^T * D, causal) vn                     # _fwd_output_kernel (parallel)

Backward: the in-chunk part of dvn (the gradient of vn) in parallel, one sequential pass for dS
(the gradient of every chunk-end state, from the last chunk back; it completes dvn) and one
parallel pass for everything else.
Only the chunk scans are sequential; the state stays in registers (fp32) across the chunk loop.
Forward and backward are custom ops joined by register_autograd, so they run in eager mode and
inside the compiled blocks alike.
Every product accumulates in fp32; G and Tm are stored in fp32, the larger intermediates (w, u,
vn, chunk states and their gradients) in the inputs' dtype for bf16/fp16, fp32 otherwise. Forward
and backward multiply in the inputs' dtype, as fla does (bf16 operands on the tensor cores: Tm,
the states, P and the gradient tiles rounded to bf16 for their products; sums in fp32); float32
inputs keep full fp32 (`ieee`) products. Only the inverse's merges stay fp32 in every case.
"""

from __future__ import annotations

import inspect
import os
import re

import torch
import triton
import triton.language as tl

# absolute: scripts/diagnose_gdn_triton.py loads this file by path, outside the package
from fusion_titan.ops.unit_lower_inverse_triton import SUB, blocked_unit_lower_inverse, store_unit_lower_blocks

__all__ = ["triton_chunk_gated_delta_rule"]

CHUNK = 64
# What the autotuner keys its choice on: the head dims and the problem's size in powers of two
# (sequences x heads, and chunks per sequence; arguments the kernels take for this alone). Keyed
# on the head dims only, a choice made at the tests' small shapes (cached on disk, below) most
# likely served the model's B4 T4096 on the H200 (the inverse at 120 us per call, where the same
# kernel tuned in another module took 69). Powers of two, not exact sizes: evaluation batches and
# prefills come in any length, and each new key benchmarks every config again.
SHAPE_KEY = ["BH_BUCKET", "N_BUCKET", "K", "V"]


def _size_buckets(B: int, H: int, N: int) -> tuple[int, int]:
    """BH_BUCKET and N_BUCKET (SHAPE_KEY) for B sequences of H heads and N chunks."""
    return triton.next_power_of_2(B * H), triton.next_power_of_2(N)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotune(configs: list[triton.Config], key: list[str], restore_value: list[str] | None = None):
    """triton.autotune on a GPU; under the interpreter (CPU tests) the first config, untimed.

    restore_value names the arguments a kernel updates in place: the autotuner runs every config
    several times on the first call, and without a restore each run would add to them again
    (right under the interpreter, which does not tune; wrong on the GPU).

    cache_results (where this Triton's autotune has it): the timings go to Triton's cache
    directory, keyed by the Triton version, the GPU target, the kernel's source, the configs and
    the tuning key (SHAPE_KEY's values), so a later process on the same machine (the next run of
    a sweep) takes the best config without benchmarking again; only a benchmark needs
    restore_value."""
    if _interpreting():
        return lambda fn: _FixedConfig(fn, configs[0].kwargs, key)
    cache = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=configs, key=key, restore_value=restore_value, **cache)


class _FixedConfig:
    """kernel[grid](*args) with the meta-parameters of one config (grid may read them)."""

    def __init__(self, fn, kwargs, key):
        self.fn, self.kwargs, self.keys = fn, kwargs, key  # keys: triton's Autotuner's name for it

    def __getitem__(self, grid):
        def launch(*args, **kw):
            g = grid(self.kwargs) if callable(grid) else grid
            return self.fn[g](*args, **kw, **self.kwargs)
        return launch


def _cfgs(values: list[tuple[int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BV": bv}, num_warps=nw, num_stages=ns) for bv, nw, ns in values]


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------


# The interpreter's tl.dot multiplies bf16 bit patterns as integers: there, 16-bit operands go
# through fp32 (the same products: 16-bit ones are exact in fp32).
_NATIVE_16BIT_DOT = tl.constexpr(not _interpreting())


@triton.jit
def _dot_as_loaded(a, b, PREC: tl.constexpr):
    """a @ b accumulated in fp32, from operands as loaded: in their own dtype when they share it
    (bf16 / fp16 products are exact in fp32, and the tensor cores take them natively), else in fp32."""
    if a.dtype == b.dtype and (_NATIVE_16BIT_DOT or a.dtype == tl.float32):
        return tl.dot(a, b, input_precision=PREC)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def _sub_chunk(g_ptr, beta_ptr, t0, i_b, i_h, T, H):
    """The 16 tokens from t0: their rows in the [B, T, H, *] inputs, mask (t < T), g and beta in
    fp32 (zeros past T: no decay, no write)."""
    t = t0 + tl.arange(0, SUB)
    m_t = t < T
    tok = (i_b * T + t) * H + i_h
    b_g = tl.load(g_ptr + tok, mask=m_t, other=0.0).to(tl.float32)
    b_beta = tl.load(beta_ptr + tok, mask=m_t, other=0.0).to(tl.float32)
    return tok, m_t, b_g, b_beta


@triton.jit
def _load_rows(ptr, tok, m_t, C: tl.constexpr, BC: tl.constexpr):
    """Rows tok of a [*, C] input as a [16, BC] tile in its own dtype, zeros where masked."""
    o_c = tl.arange(0, BC)
    return tl.load(ptr + tok[:, None] * C + o_c[None, :], mask=m_t[:, None] & (o_c < C)[None, :], other=0.0)


@triton.jit
def _kkt_block(k_i, k_j, G_i, G_j, beta_i, DIAGONAL: tl.constexpr, PREC: tl.constexpr):
    """Block (i, j) of A = strict_lower(beta_i k_i.k_j exp(G_i - G_j)) for sub-chunks i >= j."""
    diff = G_i[:, None] - G_j[None, :]
    if DIAGONAL:  # mask before exp: G_i - G_j > 0 above the diagonal could overflow
        o = tl.arange(0, SUB)
        diff = tl.where(o[:, None] > o[None, :], diff, float("-inf"))
    return _dot_as_loaded(k_i, tl.trans(k_j), PREC) * tl.exp(diff) * beta_i[:, None]


@_autotune([triton.Config({}, num_warps=nw) for nw in (4, 8, 2)], key=SHAPE_KEY[:-1])  # no V; 1 warp spills (sm_90)
@triton.jit
def _inverse_kernel(k_ptr, g_ptr, beta_ptr, G_ptr, Tm_ptr, T, H, Tp, BH_BUCKET, N_BUCKET, K: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Per chunk, as four 16-token sub-chunks: G = cumsum(g) and Tm = (I + A)^-1 (blocked,
    unit_lower_inverse_triton.py). Replaces an elementwise 63-step substitution over the whole
    64x64 tile, which was three quarters of the forward's time (H200 profile)."""
    tl.static_assert(BT == 4 * SUB)
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    t0 = i_c * BT
    row0 = i_bh * Tp + t0  # first row of the chunk in the [B*H, Tp, *] intermediates
    o_s = tl.arange(0, SUB)
    tok0, m0, g0, beta0 = _sub_chunk(g_ptr, beta_ptr, t0, i_b, i_h, T, H)
    tok1, m1, g1, beta1 = _sub_chunk(g_ptr, beta_ptr, t0 + SUB, i_b, i_h, T, H)
    tok2, m2, g2, beta2 = _sub_chunk(g_ptr, beta_ptr, t0 + 2 * SUB, i_b, i_h, T, H)
    tok3, m3, g3, beta3 = _sub_chunk(g_ptr, beta_ptr, t0 + 3 * SUB, i_b, i_h, T, H)
    G0 = tl.cumsum(g0, axis=0)
    G1 = tl.sum(g0, axis=0) + tl.cumsum(g1, axis=0)
    G2 = tl.sum(g0, axis=0) + tl.sum(g1, axis=0) + tl.cumsum(g2, axis=0)
    G3 = tl.sum(g0, axis=0) + tl.sum(g1, axis=0) + tl.sum(g2, axis=0) + tl.cumsum(g3, axis=0)
    tl.store(G_ptr + row0 + o_s, G0)
    tl.store(G_ptr + row0 + SUB + o_s, G1)
    tl.store(G_ptr + row0 + 2 * SUB + o_s, G2)
    tl.store(G_ptr + row0 + 3 * SUB + o_s, G3)

    k0 = _load_rows(k_ptr, tok0, m0, K, BK)
    k1 = _load_rows(k_ptr, tok1, m1, K, BK)
    k2 = _load_rows(k_ptr, tok2, m2, K, BK)
    k3 = _load_rows(k_ptr, tok3, m3, K, BK)
    Tm = blocked_unit_lower_inverse(
        _kkt_block(k0, k0, G0, G0, beta0, True, PREC),
        _kkt_block(k1, k0, G1, G0, beta1, False, PREC), _kkt_block(k1, k1, G1, G1, beta1, True, PREC),
        _kkt_block(k2, k0, G2, G0, beta2, False, PREC), _kkt_block(k2, k1, G2, G1, beta2, False, PREC),
        _kkt_block(k2, k2, G2, G2, beta2, True, PREC),
        _kkt_block(k3, k0, G3, G0, beta3, False, PREC), _kkt_block(k3, k1, G3, G1, beta3, False, PREC),
        _kkt_block(k3, k2, G3, G2, beta3, False, PREC), _kkt_block(k3, k3, G3, G3, beta3, True, PREC),
        "ieee")  # fp32 products in the merges, as the elementwise inverse had: tiny 16x16 dots
    store_unit_lower_blocks(Tm_ptr + row0 * BT, *Tm, BT)


@_autotune(_cfgs([(32, 8, 1), (64, 8, 1), (16, 8, 1)]), key=SHAPE_KEY)
@triton.jit
def _wu_kernel(k_ptr, v_ptr, beta_ptr, G_ptr, Tm_ptr, w_ptr, u_ptr,
               T, H, Tp, BH_BUCKET, N_BUCKET, K: tl.constexpr, V: tl.constexpr,
               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Per chunk: w = Tm (beta a k), u = Tm (beta v), a = exp(G), with Tm as one [BT, BT] tile.

    Its own kernel (as fla's recompute_w_u): fused into _inverse_kernel, with the ten 16x16
    blocks held through the V loop, it went past 255 registers and spilled (sm_90 compile)."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = tl.arange(0, BT)
    t = i_c * BT + o_t
    m_t = t < T
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    tok = (i_b * T + t) * H + i_h  # row of [B, T, H, *] inputs
    row = i_bh * Tp + t  # row of the [B*H, Tp, *] intermediates

    b_Tm = tl.load(Tm_ptr + row[:, None] * BT + o_t[None, :])
    b_beta = tl.load(beta_ptr + tok, mask=m_t, other=0.0).to(tl.float32)
    b_G = tl.load(G_ptr + row)
    b_k = tl.load(k_ptr + tok[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
    # Tm and the scaled rows in the inputs' dtype for the products (bf16 on the tensor cores, as fla)
    b_Tmx = b_Tm.to(b_k.dtype)
    b_w = _dot_as_loaded(b_Tmx, (b_k.to(tl.float32) * (b_beta * tl.exp(b_G))[:, None]).to(b_k.dtype), PREC)
    tl.store(w_ptr + row[:, None] * K + o_k[None, :], b_w.to(w_ptr.dtype.element_ty), mask=m_k[None, :])
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = tl.load(v_ptr + tok[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_u = _dot_as_loaded(b_Tmx, (b_v.to(tl.float32) * b_beta[:, None]).to(b_k.dtype), PREC)
        tl.store(u_ptr + row[:, None] * V + o_v[None, :], b_u.to(u_ptr.dtype.element_ty), mask=m_v[None, :])


@_autotune(_cfgs([(32, 4, 2), (16, 4, 2), (64, 8, 2), (16, 4, 3), (32, 4, 3)]), key=SHAPE_KEY)
@triton.jit
def _fwd_state_kernel(k_ptr, w_ptr, u_ptr, G_ptr, h0_ptr, S_ptr, vn_ptr, ht_ptr,
                      T, H, Tp, BH_BUCKET, N_BUCKET, N, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                      HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr):
    """The sequential pass: chunk-start states S (stored) and vn = u - w S, chunk after chunk."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv = o_k[:, None] * V + o_v[None, :]

    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_S += tl.load(h0_ptr + i_bh * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
    for i_c in range(0, N):
        t = i_c * BT + o_t
        m_t = t < T
        tok = (i_b * T + t) * H + i_h
        row = i_bh * Tp + t
        tl.store(S_ptr + (i_bh * N + i_c) * K * V + kv, b_S.to(S_ptr.dtype.element_ty), mask=m_kv)
        b_w = tl.load(w_ptr + row[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0)
        b_u = tl.load(u_ptr + row[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_k = tl.load(k_ptr + tok[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_G = tl.load(G_ptr + row)
        b_gl = tl.load(G_ptr + i_bh * Tp + i_c * BT + BT - 1)
        # operands in the storage dtype (bf16 products on the tensor cores, as fla), sums in fp32
        b_vn = b_u.to(tl.float32) - _dot_as_loaded(b_w, b_S.to(b_w.dtype), PREC)
        tl.store(vn_ptr + row[:, None] * V + o_v[None, :], b_vn.to(vn_ptr.dtype.element_ty), mask=m_v[None, :])
        # the decay on vn's [BT, BV] tile rather than k's [BT, K]
        b_vd = (b_vn * tl.exp(b_gl - b_G)[:, None]).to(b_w.dtype)
        b_S = b_S * tl.exp(b_gl) + _dot_as_loaded(tl.trans(b_k.to(b_w.dtype)), b_vd, PREC)
    if STORE_FINAL:
        tl.store(ht_ptr + i_bh * K * V + kv, b_S, mask=m_kv)


@_autotune(_cfgs([(64, 4, 2), (128, 8, 2), (32, 4, 2)]), key=SHAPE_KEY)
@triton.jit
def _fwd_output_kernel(q_ptr, k_ptr, G_ptr, S_ptr, vn_ptr, o_ptr, scale,
                       T, H, Tp, BH_BUCKET, N_BUCKET, N, K: tl.constexpr, V: tl.constexpr,
                       BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """o = s (q a) S + (s q k^T D, causal) vn, per chunk and block of V."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = tl.arange(0, BT)
    t = i_c * BT + o_t
    m_t = t < T
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    tok = (i_b * T + t) * H + i_h
    row = i_bh * Tp + t
    m_tk = m_t[:, None] & m_k[None, :]
    b_q = tl.load(q_ptr + tok[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
    b_k = tl.load(k_ptr + tok[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
    b_G = tl.load(G_ptr + row)
    b_S = tl.load(S_ptr + (i_bh * N + i_c) * K * V + o_k[:, None] * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.0)
    b_vn = tl.load(vn_ptr + row[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
    causal = o_t[:, None] >= o_t[None, :]
    decay = tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf")))
    # products of the tiles as stored (bf16 on the tensor cores, as fla), sums in fp32;
    # (q a) S = a * (q S): the decay and the scale go on the output rows
    b_P = _dot_as_loaded(b_q, tl.trans(b_k), PREC) * decay * scale
    b_o = _dot_as_loaded(b_q.to(b_S.dtype), b_S, PREC) * (scale * tl.exp(b_G))[:, None]
    b_o += _dot_as_loaded(b_P.to(b_vn.dtype), b_vn, PREC)
    tl.store(o_ptr + tok[:, None] * V + o_v[None, :], b_o.to(o_ptr.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------


@_autotune(_cfgs([(64, 4, 2), (128, 8, 2), (32, 4, 2)]), key=SHAPE_KEY)
@triton.jit
def _bwd_local_kernel(q_ptr, k_ptr, G_ptr, do_ptr, dvn_ptr, scale,
                      T, H, Tp, BH_BUCKET, N_BUCKET, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """The in-chunk part of dvn, (s q k^T D, causal)^T do: parallel, kept out of the scan."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = tl.arange(0, BT)
    t = i_c * BT + o_t
    m_t = t < T
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    tok = (i_b * T + t) * H + i_h
    row = i_bh * Tp + t
    m_tk = m_t[:, None] & m_k[None, :]
    b_q = tl.load(q_ptr + tok[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
    b_k = tl.load(k_ptr + tok[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
    b_do = tl.load(do_ptr + tok[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_G = tl.load(G_ptr + row)
    causal = o_t[:, None] >= o_t[None, :]
    decay = tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf")))
    b_P = _dot_as_loaded(b_q, tl.trans(b_k), PREC) * decay * scale
    b_dvn = _dot_as_loaded(tl.trans(b_P.to(b_q.dtype)), b_do, PREC)
    tl.store(dvn_ptr + row[:, None] * V + o_v[None, :], b_dvn.to(dvn_ptr.dtype.element_ty), mask=m_v[None, :])


@_autotune(_cfgs([(32, 4, 2), (16, 4, 2), (64, 8, 2), (16, 4, 3), (32, 4, 3)]), key=SHAPE_KEY,
           restore_value=["dvn_ptr"])
@triton.jit
def _bwd_state_kernel(q_ptr, k_ptr, w_ptr, G_ptr, do_ptr, dht_ptr, dS_ptr, dvn_ptr, dh0_ptr, scale,
                      T, H, Tp, BH_BUCKET, N_BUCKET, N, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                      HAS_DHT: tl.constexpr):
    """Chunks from last to first: dS_end of every chunk (stored), dvn (completed in place), dh0.

    dvn = dvn_local + (k exp(G_last - G)) dS_end
    dS_start = exp(G_last) dS_end + s (q a)^T do - w^T dvn
    """
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv = o_k[:, None] * V + o_v[None, :]

    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_dS += tl.load(dht_ptr + i_bh * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
    for j in range(0, N):
        i_c = N - 1 - j
        t = i_c * BT + o_t
        m_t = t < T
        tok = (i_b * T + t) * H + i_h
        row = i_bh * Tp + t
        m_tk = m_t[:, None] & m_k[None, :]
        tl.store(dS_ptr + (i_bh * N + i_c) * K * V + kv, b_dS.to(dS_ptr.dtype.element_ty), mask=m_kv)
        b_q = tl.load(q_ptr + tok[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(k_ptr + tok[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_w = tl.load(w_ptr + row[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0)
        b_do = tl.load(do_ptr + tok[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_dvn = tl.load(dvn_ptr + row[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0).to(tl.float32)
        b_G = tl.load(G_ptr + row)
        b_gl = tl.load(G_ptr + i_bh * Tp + i_c * BT + BT - 1)
        # operands rounded to the storage dtype (bf16 products, as fla's bwd_dhu), sums in fp32
        b_kd = (b_k.to(tl.float32) * tl.exp(b_gl - b_G)[:, None]).to(b_w.dtype)
        b_dvn += _dot_as_loaded(b_kd, b_dS.to(b_w.dtype), PREC)
        tl.store(dvn_ptr + row[:, None] * V + o_v[None, :], b_dvn.to(dvn_ptr.dtype.element_ty), mask=m_v[None, :])
        b_qa = (b_q.to(tl.float32) * (scale * tl.exp(b_G))[:, None]).to(b_w.dtype)
        b_dS = b_dS * tl.exp(b_gl) + _dot_as_loaded(tl.trans(b_qa), b_do, PREC)
        b_dS -= _dot_as_loaded(tl.trans(b_w), b_dvn.to(b_w.dtype), PREC)
    tl.store(dh0_ptr + i_bh * K * V + kv, b_dS, mask=m_kv)


# 8 warps, 1 stage: 4 warps or 2 stages spill 56-830 bytes (sm_90 compile, scripts/gdn_kernel_resources.py)
@_autotune(_cfgs([(64, 8, 1), (32, 8, 1), (16, 8, 1)]), key=SHAPE_KEY)
@triton.jit
def _bwd_grads_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, G_ptr, Tm_ptr, S_ptr, dS_ptr, vn_ptr, dvn_ptr,
                      do_ptr, dq_ptr, dk_ptr, dv_ptr, dg_ptr, dbeta_ptr, scale,
                      T, H, Tp, BH_BUCKET, N_BUCKET, N, K: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Per chunk, given S (start state), dS_end, vn and dvn: dq, dk, dv, dg, dbeta."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = tl.arange(0, BT)
    t = i_c * BT + o_t
    m_t = t < T
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    tok = (i_b * T + t) * H + i_h
    row = i_bh * Tp + t
    m_tk = m_t[:, None] & m_k[None, :]
    b_beta = tl.load(beta_ptr + tok, mask=m_t, other=0.0).to(tl.float32)
    b_G = tl.load(G_ptr + row)
    b_gl = tl.load(G_ptr + i_bh * Tp + i_c * BT + BT - 1)
    X = vn_ptr.dtype.element_ty  # the storage dtype: every product's operands (bf16 as fla)
    b_Tm = tl.load(Tm_ptr + row[:, None] * BT + o_t[None, :]).to(X)
    b_a = tl.exp(b_G)
    state = (i_bh * N + i_c) * K * V

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)  # do S^T
    b_dP = tl.zeros([BT, BT], dtype=tl.float32)  # do vn^T
    b_dk2 = tl.zeros([BT, BK], dtype=tl.float32)  # vn dS_end^T
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)  # -dvn S^T
    b_dTm = tl.zeros([BT, BT], dtype=tl.float32)  # du (beta v)^T, then + dw (beta a k)^T
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    b_SdS = tl.zeros([BK], dtype=tl.float32)  # rows of sum(S * dS_end): feeds d exp(G_last)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        kv = o_k[:, None] * V + o_v[None, :]
        # tiles as stored (bf16 for bf16 inputs), multiplied natively
        b_do = tl.load(do_ptr + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        b_v = tl.load(v_ptr + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        b_vn = tl.load(vn_ptr + row[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_dvn = tl.load(dvn_ptr + row[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
        b_S = tl.load(S_ptr + state + kv, mask=m_kv, other=0.0)
        b_dSe = tl.load(dS_ptr + state + kv, mask=m_kv, other=0.0)
        b_dq += _dot_as_loaded(b_do, tl.trans(b_S), PREC)
        b_dP += _dot_as_loaded(b_do, tl.trans(b_vn), PREC)
        b_dk2 += _dot_as_loaded(b_vn, tl.trans(b_dSe), PREC)
        b_dw -= _dot_as_loaded(b_dvn, tl.trans(b_S), PREC)
        b_SdS += tl.sum(b_S.to(tl.float32) * b_dSe.to(tl.float32), 1)
        # u = Tm (beta v), du = dvn
        b_dvb = _dot_as_loaded(tl.trans(b_Tm), b_dvn, PREC)
        tl.store(dv_ptr + tok[:, None] * V + o_v[None, :], (b_dvb * b_beta[:, None]).to(dv_ptr.dtype.element_ty),
                 mask=m_tv)
        b_v = b_v.to(tl.float32)
        b_dbeta += tl.sum(b_v * b_dvb, 1)
        b_dTm += _dot_as_loaded(b_dvn, tl.trans((b_v * b_beta[:, None]).to(X)), PREC)

    # q and k only from here on (loaded after the V loop: not held through it)
    b_qx = tl.load(q_ptr + tok[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(X)
    b_kx = tl.load(k_ptr + tok[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(X)
    b_k = b_kx.to(tl.float32)
    # o = s (q a) S: dq, and its dG through a
    b_dq = b_dq * (scale * b_a)[:, None]
    b_dG = tl.sum(b_qx.to(tl.float32) * b_dq, 1)
    # o += P vn with P = s q k^T D (causal)
    causal = o_t[:, None] >= o_t[None, :]
    decay = tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf")))
    b_P = _dot_as_loaded(b_qx, tl.trans(b_kx), PREC) * decay * scale
    b_dP = tl.where(causal, b_dP, 0.0)
    b_dPP = b_dP * b_P
    b_dG += tl.sum(b_dPP, 1) - tl.sum(b_dPP, 0)
    b_dQK = (b_dP * decay * scale).to(X)
    b_dq += _dot_as_loaded(b_dQK, b_kx, PREC)
    b_dk = _dot_as_loaded(tl.trans(b_dQK), b_qx, PREC)
    # S_end = exp(G_last) S + (k exp(G_last - G))^T vn
    b_dk2 = b_dk2 * tl.exp(b_gl - b_G)[:, None]
    b_dk += b_dk2
    b_kdk2 = tl.sum(b_k * b_dk2, 1)
    b_dG -= b_kdk2
    b_dgl = tl.sum(b_kdk2, 0) + tl.exp(b_gl) * tl.sum(b_SdS, 0)
    # vn = u - w S, w = Tm (beta a k)
    b_dwx = b_dw.to(X)
    b_dkb = _dot_as_loaded(tl.trans(b_Tm), b_dwx, PREC)
    b_dk += b_dkb * (b_beta * b_a)[:, None]
    b_kdkb = tl.sum(b_k * b_dkb, 1)
    b_dbeta += b_a * b_kdkb
    b_dG += b_beta * b_a * b_kdkb
    b_dTm += _dot_as_loaded(b_dwx, tl.trans((b_k * (b_beta * b_a)[:, None]).to(X)), PREC)
    # Tm = (I + A)^-1: dA = -Tm^T dTm Tm^T on the strict lower triangle
    strict = o_t[:, None] > o_t[None, :]
    b_dA = -_dot_as_loaded(_dot_as_loaded(tl.trans(b_Tm), b_dTm.to(X), PREC).to(X), tl.trans(b_Tm), PREC)
    b_dA = tl.where(strict, b_dA, 0.0)
    sdecay = tl.where(strict, decay, 0.0)
    b_kkD = _dot_as_loaded(b_kx, tl.trans(b_kx), PREC) * sdecay
    b_dbeta += tl.sum(b_dA * b_kkD, 1)
    b_dAA = b_dA * b_kkD * b_beta[:, None]
    b_dG += tl.sum(b_dAA, 1) - tl.sum(b_dAA, 0)
    b_dAk = (b_dA * sdecay * b_beta[:, None]).to(X)
    b_dk += _dot_as_loaded(b_dAk, b_kx, PREC) + _dot_as_loaded(tl.trans(b_dAk), b_kx, PREC)

    b_dG += tl.where(o_t == BT - 1, b_dgl, 0.0)
    b_dg = tl.cumsum(b_dG, axis=0, reverse=True)  # G = cumsum(g)
    tl.store(dq_ptr + tok[:, None] * K + o_k[None, :], b_dq.to(dq_ptr.dtype.element_ty), mask=m_tk)
    tl.store(dk_ptr + tok[:, None] * K + o_k[None, :], b_dk.to(dk_ptr.dtype.element_ty), mask=m_tk)
    tl.store(dg_ptr + tok, b_dg.to(dg_ptr.dtype.element_ty), mask=m_t)
    tl.store(dbeta_ptr + tok, b_dbeta.to(dbeta_ptr.dtype.element_ty), mask=m_t)


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs >= 16


def _precision(dtype: torch.dtype) -> str:
    # bf16/fp16 values are exact in tf32; fp32 inputs keep full fp32 products
    return "ieee" if dtype == torch.float32 else "tf32"


def _storage_dtype(dtype: torch.dtype) -> torch.dtype:
    # the large per-token/per-chunk intermediates (w, u, vn, chunk states, their gradients) are
    # stored in the inputs' 16-bit dtype, like fla, halving their traffic; float32 inputs keep float32
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


# Two custom ops, forward and backward, joined by register_autograd: torch.compile sees one
# opaque op per call (no graph break, so the whole-block fullgraph compile takes it), eager mode
# runs the same code. The namespace is per module: scripts/diagnose_gdn_triton.py loads other
# versions of this file next to it.
_OPS = "fusion_titan" if __name__ == "fusion_titan.ops.gated_delta_rule_triton" else (
    "fusion_titan_" + re.sub(r"\W", "_", __name__))


def _shapes(k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int, int]:
    B, T, H, K = k.shape
    N = triton.cdiv(T, CHUNK)
    return B, T, H, K, v.shape[-1], N, N * CHUNK


def _empty_intermediates(q, k, v, output_final_state: bool):
    """o, the final state (empty when not asked for) and what the backward reads: G, Tm, w, S, vn."""
    B, T, H, K, V, N, Tp = _shapes(k, v)
    f32 = dict(device=q.device, dtype=torch.float32)
    big = dict(device=q.device, dtype=_storage_dtype(q.dtype))
    o = torch.empty(v.shape, device=q.device, dtype=q.dtype)  # contiguous whatever v's strides
    ht = torch.empty(B, H, K, V, **f32) if output_final_state else torch.empty(0, **f32)
    return (o, ht, torch.empty(B * H, Tp, **f32), torch.empty(B * H, Tp, CHUNK, **f32),
            torch.empty(B * H, Tp, K, **big), torch.empty(B * H, N, K, V, **big),
            torch.empty(B * H, Tp, V, **big))


def _empty_grads(q, k, v, g, beta):
    """dq, dk, dv, dg, dbeta: contiguous (the kernels write them so, whatever the inputs' strides:
    the model's q/k/v come from a transposed short conv), in the inputs' dtypes."""
    return tuple(torch.empty(x.shape, device=x.device, dtype=x.dtype) for x in (q, k, v, g, beta))


def _meta(q: torch.Tensor, K: int, V: int) -> dict:
    return dict(K=K, V=V, BT=CHUNK, BK=_block(K), PREC=_precision(q.dtype))


@torch.library.custom_op(f"{_OPS}::gated_delta_rule_fwd", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, float scale, Tensor? initial_state, "
    "bool output_final_state) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"))
def _forward(q, k, v, g, beta, scale, initial_state, output_final_state):
    """o, the final state (empty when not asked for), G, Tm, w, S, vn."""
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    B, T, H, K, V, N, Tp = _shapes(k, v)
    o, ht, G, Tm, w, S, vn = _empty_intermediates(q, k, v, output_final_state)
    u = torch.empty_like(vn)
    h0 = None if initial_state is None else initial_state.contiguous()
    meta = _meta(q, K, V)
    tune = _size_buckets(B, H, N)
    _inverse_kernel[(N, B * H)](k, g, beta, G, Tm, T, H, Tp, *tune, K=K, BT=CHUNK, BK=meta["BK"],
                                PREC=meta["PREC"])
    _wu_kernel[(N, B * H)](k, v, beta, G, Tm, w, u, T, H, Tp, *tune, **meta)
    _fwd_state_kernel[lambda m: (triton.cdiv(V, m["BV"]), B * H)](
        k, w, u, G, h0 if h0 is not None else G, S, vn, ht if output_final_state else G,
        T, H, Tp, *tune, N, **meta, HAS_H0=h0 is not None, STORE_FINAL=output_final_state)
    _fwd_output_kernel[lambda m: (triton.cdiv(V, m["BV"]), N, B * H)](
        q, k, G, S, vn, o, scale, T, H, Tp, *tune, N, **meta)
    return o, ht, G, Tm, w, S, vn


@_forward.register_fake
def _(q, k, v, g, beta, scale, initial_state, output_final_state):
    return _empty_intermediates(q, k, v, output_final_state)


@torch.library.custom_op(f"{_OPS}::gated_delta_rule_bwd", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor G, Tensor Tm, Tensor w, Tensor S, "
    "Tensor vn, Tensor do, Tensor? dht, Tensor? initial_state, float scale) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"))
def _backward(q, k, v, g, beta, G, Tm, w, S, vn, do, dht, initial_state, scale):
    """dq, dk, dv, dg, dbeta and dh0 (empty without an initial state), in the inputs' dtypes."""
    q, k, v, beta, do = (x.contiguous() for x in (q, k, v, beta, do))
    B, T, H, K, V, N, Tp = _shapes(k, v)
    meta = _meta(q, K, V)
    big = dict(device=q.device, dtype=S.dtype)
    tune = _size_buckets(B, H, N)
    dS = torch.empty(B * H, N, K, V, **big)
    dvn = torch.empty(B * H, Tp, V, **big)
    dh0 = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
    dht = None if dht is None else dht.contiguous()
    _bwd_local_kernel[lambda m: (triton.cdiv(V, m["BV"]), N, B * H)](
        q, k, G, do, dvn, scale, T, H, Tp, *tune, **meta)
    _bwd_state_kernel[lambda m: (triton.cdiv(V, m["BV"]), B * H)](
        q, k, w, G, do, dht if dht is not None else dh0, dS, dvn, dh0, scale,
        T, H, Tp, *tune, N, **meta, HAS_DHT=dht is not None)
    dq, dk, dv, dg, dbeta = _empty_grads(q, k, v, g, beta)
    _bwd_grads_kernel[(N, B * H)](
        q, k, v, beta, G, Tm, S, dS, vn, dvn, do, dq, dk, dv, dg, dbeta, scale,
        T, H, Tp, *tune, N, **meta)
    dh0 = dh0.to(initial_state.dtype) if initial_state is not None else dh0.new_empty(0)
    return dq, dk, dv, dg, dbeta, dh0


@_backward.register_fake
def _(q, k, v, g, beta, G, Tm, w, S, vn, do, dht, initial_state, scale):
    B, T, H, K, V, _, _ = _shapes(k, v)
    dh0 = (q.new_empty(B, H, K, V, dtype=initial_state.dtype) if initial_state is not None
           else q.new_empty(0, dtype=torch.float32))
    return (*_empty_grads(q, k, v, g, beta), dh0)


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, scale, initial_state, _ = inputs
    _, _, G, Tm, w, S, vn = output
    ctx.mark_non_differentiable(G, Tm, w, S, vn)
    # no zero-filled gradients for the intermediates (hundreds of MB per layer at fusion_1b's
    # shapes) nor for an unused final state: they arrive as None
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, g, beta, G, Tm, w, S, vn, initial_state)
    ctx.scale = scale


def _autograd_backward(ctx, do, dht, *_intermediates):
    q, k, v, g, beta, G, Tm, w, S, vn, initial_state = ctx.saved_tensors
    if do is None:  # only the final state is used
        do = torch.zeros(v.shape, device=v.device, dtype=q.dtype)
    dht = dht if dht is not None and dht.numel() else None
    dq, dk, dv, dg, dbeta, dh0 = _backward(q, k, v, g, beta, G, Tm, w, S, vn, do, dht, initial_state,
                                           ctx.scale)
    return dq, dk, dv, dg, dbeta, None, dh0 if initial_state is not None else None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def triton_chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same I/O as chunk_gated_delta_rule (without document_ids); float32 intermediates,
    o in q's dtype, the final state in float32. Runs in eager mode and inside torch.compile
    (fullgraph too: one opaque op each way)."""
    if q.dtype == torch.float64:
        raise ValueError("the Triton gated delta rule computes in float32; use backend='torch' for float64")
    if not (q.is_cuda or _interpreting()):
        raise ValueError("the Triton gated delta rule needs CUDA tensors (or TRITON_INTERPRET=1); "
                         "use backend='torch' on CPU")
    if scale is None:
        scale = k.shape[-1] ** -0.5
    # contiguous before the op, not only inside it: under inductor the op's outputs were expected
    # in v's layout (the model's q/k/v come transposed from the short conv), not the fake's
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    initial_state = None if initial_state is None else initial_state.contiguous()
    o, ht, *_ = _forward(q, k, v, g, beta, float(scale), initial_state, output_final_state)
    return o, ht if output_final_state else None
