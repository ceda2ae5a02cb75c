"""Mamba-2 selective state space model (SSD), pure PyTorch.

Per head the state h is a [P, N] matrix (P = head dim, N = state size). For every token t:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T      # scalar decay per head, rank-1 write
    y_t = h_t C_t                                          # read out with C_t

Layout: x [b, T, H, P]; dt [b, T, H] (already softplus'ed, > 0); A [H] (< 0);
B, C [b, T, G, N] where group g is shared by heads g*H/G ... (g+1)*H/G - 1; state [b, H, P, N].
The D skip connection (y += D * x) is left to the layer.

Entry points:
  - ssd_step: one token (decoding).
  - ssd_recurrent: token-by-token reference built on ssd_step, obviously correct.
  - ssd_chunked: the chunked "state space duality" form used for training.

Reference: Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality" (ICML 2024), Sec. 6 (the SSD algorithm / Listing 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .precision import compute_dtype

__all__ = ["ssd_chunked", "ssd_recurrent", "ssd_step", "segsum"]


def _heads_per_group(x: torch.Tensor, B: torch.Tensor) -> int:
    H, G = x.shape[-2], B.shape[-2]
    if H % G != 0:
        raise ValueError(f"n_heads ({H}) must be a multiple of n_groups ({G})")
    return H // G


# ---------------------------------------------------------------------------
# Reference: one token at a time
# ---------------------------------------------------------------------------


def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. x [b, H, P]; dt [b, H]; A [H]; B, C [b, G, N]; state [b, H, P, N].

    Returns (y [b, H, P] in x's dtype, new_state [b, H, P, N] in float32/float64).
    The state is not modified in place.
    """
    out_dtype = x.dtype
    cdt = compute_dtype(x.dtype)
    r = _heads_per_group(x, B)
    x, dt, A, B, C = (t.to(cdt) for t in (x, dt, A, B, C))
    # Every head of a group sees the same B and C.
    B = B.repeat_interleave(r, dim=1)  # [b, H, N]
    C = C.repeat_interleave(r, dim=1)
    decay = torch.exp(dt * A)  # in (0, 1] since dt > 0, A < 0
    S = state.to(cdt) * decay[..., None, None] + (dt[..., None] * x)[..., :, None] * B[..., None, :]
    y = torch.einsum("bhpn,bhn->bhp", S, C)
    return y.to(out_dtype), S


def ssd_recurrent(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Naive token-by-token recurrence (reference). Same I/O as ssd_chunked; chunk_size is unused."""
    b, T, H, P = x.shape
    N = B.shape[-1]
    cdt = compute_dtype(x.dtype)
    if initial_state is None:
        state = x.new_zeros(b, H, P, N, dtype=cdt)
    else:
        state = initial_state.to(cdt)
    ys = []
    for t in range(T):
        y_t, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state)
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, H, P)
    return y, (state if output_final_state else None)


# ---------------------------------------------------------------------------
# Chunked parallel form
# ---------------------------------------------------------------------------


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a [..., L] -> S [..., L, L] with S[i, j] = a[j+1] + ... + a[i] for j <= i, -inf above the diagonal.

    exp(S) is the 1-semiseparable decay matrix: exp(S[i, j]) = prod of the step decays from j to i.
    Summing the masked copies directly (instead of cumsum[i] - cumsum[j]) avoids cancellation
    between two large cumulative sums, and the -inf mask is applied before exp so nothing above
    the diagonal can overflow (and no NaN gradients come from it).
    """
    L = a.shape[-1]
    ones = torch.ones(L, L, dtype=torch.bool, device=a.device)
    # Entry [i, j] of the expanded copy holds a[i]; keep only rows i > j, then sum over i.
    terms = a[..., :, None].expand(*a.shape, L).masked_fill(~ones.tril(-1), 0.0)
    S = terms.cumsum(dim=-2)
    return S.masked_fill(~ones.tril(0), float("-inf"))


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked SSD. x [b, T, H, P]; dt [b, T, H]; A [H]; B, C [b, T, G, N]; state [b, H, P, N].

    Returns (y [b, T, H, P] in x's dtype, final_state [b, H, P, N] in float32/float64 or None).

    The sequence is cut into chunks of length L. Inside a chunk the output is a masked
    "attention" (C_i . B_j) * decay(j -> i) applied to dt*x (quadratic form, matmul friendly);
    across chunks only the [P, N] states are passed on (linear recurrence over chunks).
    """
    b, T, H, P = x.shape
    G, N = B.shape[-2:]
    r = _heads_per_group(x, B)
    out_dtype = x.dtype
    cdt = compute_dtype(x.dtype)
    x, dt, A, B, C = (t.to(cdt) for t in (x, dt, A, B, C))

    # Short inputs (prefill of a few tokens) need no padding to a full chunk.
    L = max(1, min(chunk_size, T))
    pad = (-T) % L
    if pad:
        # Padded steps have dt = 0: decay exp(0) = 1 and no write, so the final state is unchanged.
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    nc = (T + pad) // L

    # Split heads into (group, head-in-group) so B and C are shared without copying them per head.
    x = x.view(b, nc, L, G, r, P)
    dt = dt.view(b, nc, L, G, r)
    B = B.view(b, nc, L, G, N)
    C = C.view(b, nc, L, G, N)

    xdt = x * dt[..., None]  # the discretized input dt_t x_t
    a = (dt * A.view(G, r)).permute(0, 1, 3, 4, 2)  # log decay per step, <= 0: [b, nc, G, r, L]
    a_cum = a.cumsum(dim=-1)  # log decay from the chunk start to step l (inclusive)

    # 1. Within each chunk (diagonal blocks): y_i = sum_{j <= i} (C_i . B_j) exp(a_{j+1..i}) dt_j x_j.
    decay = segsum(a).exp()  # [b, nc, G, r, L, L]
    scores = torch.einsum("bcign,bcjgn->bcgij", C, B)
    y = torch.einsum("bcgij,bcgrij,bcjgrp->bcigrp", scores, decay, xdt)

    # 2. What each chunk alone writes into the state, decayed to the end of the chunk.
    decay_to_end = (a_cum[..., -1:] - a_cum).exp()  # exponent <= 0
    chunk_states = torch.einsum("bcjgn,bcgrj,bcjgrp->bcgrpn", B, decay_to_end, xdt)

    # 3. Pass states across chunks: the state entering chunk c is the initial state and every
    # earlier chunk's contribution, each decayed through the chunks in between. This is the same
    # semiseparable structure one level up (chunk totals a_cum[..., -1] are the step decays),
    # done as one small matmul instead of a Python loop.
    if initial_state is None:
        h0 = x.new_zeros(b, 1, G, r, P, N)
    else:
        h0 = initial_state.to(cdt).view(b, 1, G, r, P, N)
    states = torch.cat([h0, chunk_states], dim=1)  # [b, nc + 1, G, r, P, N]
    chunk_decay = F.pad(a_cum[..., -1].permute(0, 2, 3, 1), (1, 0))  # [b, G, r, nc + 1]
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", segsum(chunk_decay).exp(), states)
    entering, final_state = states[:, :-1], states[:, -1]

    # 4. Contribution of the entering state to each output (off-diagonal blocks): C_i h exp(a_{1..i}).
    y = y + torch.einsum("bcign,bcgrpn,bcgri->bcigrp", C, entering, a_cum.exp())

    y = y.reshape(b, nc * L, H, P)[:, :T].to(out_dtype)
    if not output_final_state:
        return y, None
    return y, final_state.reshape(b, H, P, N)
