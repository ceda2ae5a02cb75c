"""Gated delta rule (Gated DeltaNet / Qwen3-Next linear attention), pure PyTorch.

Per head the state S is a [K, V] matrix. For every token t:

    S_t = exp(g_t) * S_{t-1}                           # gated decay (g_t <= 0 is a log decay)
    S_t = S_t + k_t (beta_t * (v_t - S_t^T k_t))^T     # delta rule: write the prediction error
    o_t = S_t^T (scale * q_t)

Layout and argument order follow fla's `chunk_gated_delta_rule`:
q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; state [B, H, K, V].
q and k are NOT l2-normalized here (the layer does it), like fla's default.

Three entry points:
  - chunk_gated_delta_rule: the chunked (WY / UT-transform) form used for training.
  - recurrent_gated_delta_rule: token-by-token reference, obviously correct.
  - gated_delta_rule: dispatcher between this chunked form, our Triton kernels
    (gated_delta_rule_triton.py, forward and backward) and fla's Triton kernel.

Reference: Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with
Delta Rule" (ICLR 2025), Sec. 3 (chunkwise algorithm).
"""

from __future__ import annotations

import logging
import re

import torch
import torch.nn.functional as F

from .precision import compute_dtype

logger = logging.getLogger(__name__)

__all__ = [
    "chunk_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "gated_delta_rule_step",
    "gated_delta_rule",
    "fla_is_safe",
]


# ---------------------------------------------------------------------------
# Reference: one token at a time
# ---------------------------------------------------------------------------


def gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. q, k [B, H, K]; v [B, H, V]; g, beta [B, H]; state [B, H, K, V].

    Returns (o [B, H, V] in q's dtype, new_state [B, H, K, V] in float32/float64).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out_dtype = q.dtype
    dt = compute_dtype(q.dtype)
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    S = state.to(dt) * g.exp()[..., None, None]  # decay first
    pred = torch.einsum("bhk,bhkv->bhv", k, S)  # what the memory currently returns for k
    delta = beta[..., None] * (v - pred)  # scaled prediction error
    S = S + k[..., :, None] * delta[..., None, :]  # rank-1 correction
    o = torch.einsum("bhk,bhkv->bhv", q * scale, S)
    return o.to(out_dtype), S


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    document_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Naive token-by-token recurrence (reference). Same I/O as chunk_gated_delta_rule.

    document_ids [B, T]: where the id changes from t-1 to t the state is zeroed before token t
    (a new document starts with an empty memory)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    dt = compute_dtype(q.dtype)
    if initial_state is None:
        state = q.new_zeros(B, H, K, V, dtype=dt)
    else:
        state = initial_state.to(dt)
    outs = []
    for t in range(T):
        if document_ids is not None and t > 0:
            same = (document_ids[:, t] == document_ids[:, t - 1]).to(dt)
            state = state * same[:, None, None, None]
        o_t, state = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, scale)
        outs.append(o_t)
    o = torch.stack(outs, dim=1).to(q.dtype)
    return o, (state if output_final_state else None)


# ---------------------------------------------------------------------------
# Chunked parallel form
# ---------------------------------------------------------------------------


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    document_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise-parallel gated delta rule (parallel inside chunks, a prefix scan across them).

    Derivation, inside one chunk with state S0 at its start and G_i = sum_{s<=i} g_s
    (cumulative log decay within the chunk):
        S_i   = exp(G_i) S0 + sum_{j<=i} exp(G_i - G_j) k_j n_j^T
        n_i   = beta_i (v_i - exp(G_i) S0^T k_i - sum_{j<i} exp(G_i - G_j) (k_i.k_j) n_j)
    i.e. (I + A) n = beta v - beta exp(G) k S0 with A_ij = beta_i k_i.k_j exp(G_i - G_j), j < i.
    With Tm = (I + A)^-1 (UT transform): n = u - w S0, u = Tm (beta v), w = Tm (beta exp(G) k).
    Then  o_i = scale q_i^T S_i  and the state carried to the next chunk is S_C.

    document_ids [B, T] (packed documents, intra-document masking): the state restarts empty
    wherever the id changes. Documents are contiguous, so inside a chunk this only zeroes terms:
    token pairs of different documents, the chunk-start state for tokens of a document that began
    inside the chunk, and the contribution to the chunk-end state of tokens whose document ended
    inside it (initial_state, if given, belongs to the first token's document).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    if scale is None:
        scale = K**-0.5
    out_dtype = q.dtype
    dt = compute_dtype(q.dtype)
    C = chunk_size

    # [B, T, H, *] -> [B, H, T, *] in the compute dtype.
    q, k, v = (x.transpose(1, 2).to(dt) for x in (q, k, v))
    g, beta = (x.transpose(1, 2).to(dt) for x in (g, beta))

    # Pad T up to a multiple of C. Padded tokens have g=0 (no decay) and beta=0 (no write),
    # so they leave the state untouched; their outputs are sliced away.
    pad = (C - T % C) % C
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    N = (T + pad) // C
    docs = None
    if document_ids is not None:
        if document_ids.shape != (B, T):
            raise ValueError(f"document_ids must be [B, T] = {(B, T)}, got {tuple(document_ids.shape)}")
        # padding continues the last document, so it never reads as a boundary
        docs = torch.cat([document_ids, document_ids[:, -1:].expand(B, pad)], dim=1).reshape(B, 1, N, C)

    # Split into chunks: [B, H, N, C, *].
    q = q.reshape(B, H, N, C, K) * scale
    k = k.reshape(B, H, N, C, K)
    v = v.reshape(B, H, N, C, V)
    beta = beta.reshape(B, H, N, C)
    G = g.reshape(B, H, N, C).cumsum(-1)  # cumulative log decay inside each chunk

    # Pairwise decays exp(G_i - G_j). Only j <= i is ever used; G_i - G_j > 0 for j > i
    # could overflow, so mask those entries to -inf *before* exponentiating.
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = causal.clone().fill_diagonal_(False)
    diff = G[..., :, None] - G[..., None, :]
    allowed = causal if docs is None else causal & (docs[..., :, None] == docs[..., None, :])
    decay = diff.masked_fill(~allowed, float("-inf")).exp()  # [B, H, N, C, C], 0 above diag
    if docs is None:
        reads_start = ends_chunk = 1.0
        carries = torch.ones_like(G[..., -1:])
    else:
        # The document that was running when the chunk started (for chunk 0: the first token's).
        before = torch.cat([docs[:, :, :1, :1], docs[:, :, :-1, -1:]], dim=2)  # [B, 1, N, 1]
        reads_start = (docs == before).to(dt)  # token i sees the chunk-start state
        ends_chunk = (docs == docs[..., -1:]).to(dt)  # token j reaches the chunk-end state
        carries = reads_start[..., -1:]  # no boundary inside the chunk: the state carries over

    # UT transform: solve (I + A) X = [beta v | beta exp(G) k] in one triangular solve.
    # A is strictly lower triangular; unitriangular=True treats the diagonal as 1 (the I).
    kk = k @ k.transpose(-1, -2)
    A = (beta[..., None] * kk * decay).masked_fill(~strict, 0.0)
    rhs = torch.cat([beta[..., None] * v, (beta * G.exp() * reads_start)[..., None] * k], dim=-1)
    X = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    u, w = X[..., :V], X[..., V:]

    # Intra-chunk "attention" scores (diagonal included) and decay factors for the state.
    qk = (q @ k.transpose(-1, -2)) * decay  # zero above the diagonal via decay
    q_dec = q * (G.exp() * reads_start)[..., None]  # query reads the decayed chunk-start state
    G_last = G[..., -1:]  # [B, H, N, 1]
    # key's decay until the chunk end (exponent <= 0)
    k_dec = k * ((G_last - G).exp() * ends_chunk)[..., None]
    chunk_decay = (G_last.exp() * carries)[..., None]  # [B, H, N, 1, 1]

    # Across chunks the state follows a linear recurrence, S_{n+1} = M_n S_n + b_n with
    #   M_n = exp(G_last) I - k_dec^T w   and   b_n = k_dec^T u   (substitute n_i = u_i - w_i S_n).
    # A parallel prefix scan solves it in log2(N) batched steps instead of N sequential ones
    # (each M_n is a product of contractions, so the combined transitions stay well scaled).
    eye = torch.eye(K, dtype=dt, device=q.device)
    M = chunk_decay * eye - k_dec.transpose(-1, -2) @ w  # [B, H, N, K, K]
    b = k_dec.transpose(-1, -2) @ u  # [B, H, N, K, V]
    S0 = None if initial_state is None else initial_state.to(dt)
    S_start, S_final = _scan_chunk_states(M, b, S0)  # [B, H, N, K, V], [B, H, K, V]

    # Every chunk's output at once, given the state at its start.
    new_v = u - w @ S_start
    o = q_dec @ S_start + qk @ new_v  # [B, H, N, C, V]
    o = o.reshape(B, H, N * C, V)[:, :, :T]
    o = o.transpose(1, 2).to(out_dtype)
    return o, (S_final if output_final_state else None)


def _scan_chunk_states(M: torch.Tensor, b: torch.Tensor, S0: torch.Tensor | None):
    """States at the start of every chunk, and after the last, for S_{n+1} = M_n S_n + b_n.

    Hillis-Steele inclusive scan over the chunk axis (dim 2) with the associative combine
    (M2, b2) o (M1, b1) = (M2 M1, M2 b1 + b2); afterwards (P_n, c_n) maps S_0 to S_{n+1}.
    """
    N = M.shape[2]
    P, c = M, b
    step = 1
    while step < N:
        later_P, later_c = P[:, :, step:], c[:, :, step:]
        c = torch.cat([c[:, :, :step], later_P @ c[:, :, :-step] + later_c], dim=2)
        if S0 is not None or step * 2 < N:  # the last level's products are only needed for S0
            P = torch.cat([P[:, :, :step], later_P @ P[:, :, :-step]], dim=2)
        step *= 2
    after = c if S0 is None else P @ S0[:, :, None] + c  # S_1 .. S_N
    first = torch.zeros_like(after[:, :, :1]) if S0 is None else S0[:, :, None].to(after.dtype)
    return torch.cat([first, after[:, :, :-1]], dim=2), after[:, :, -1]


# ---------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------


def _version_tuple(version: str) -> tuple[int, ...]:
    # "3.7.1+git123" -> (3, 7, 1); tolerant of local/dev suffixes.
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


_fla_safety: tuple[bool, str] | None = None  # cached result of fla_is_safe()


def fla_is_safe() -> tuple[bool, str]:
    """Whether fla's chunk_gated_delta_rule can be used here, and why (cached).

    fla 0.6.0's gated backward raises on Hopper (sm_90) with triton < 3.7.1 because of a
    triton miscompile (fla issue 640), so that combination is refused.
    """
    global _fla_safety
    if _fla_safety is None:
        _fla_safety = _check_fla()
    return _fla_safety


def _check_fla() -> tuple[bool, str]:
    try:
        import fla  # noqa: F401
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _  # noqa: F401
    except Exception as e:  # ImportError, or a broken triton install
        return False, f"fla (fla-core) is not importable: {type(e).__name__}: {e}"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    major, minor = torch.cuda.get_device_capability()
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:
        return False, f"triton is not importable: {type(e).__name__}: {e}"
    if major == 9 and _version_tuple(triton_version) < (3, 7, 1):
        return False, (
            f"Hopper GPU (sm_{major}{minor}) with triton {triton_version} < 3.7.1: fla's gated "
            "delta rule backward hits a triton miscompile (fla issue 640)"
        )
    return True, f"fla usable (sm_{major}{minor}, triton {triton_version})"


def _fla_chunk(q, k, v, g, beta, scale, initial_state, output_final_state):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

    return fla_chunk(
        q, k, v, g, beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
    )


_fla_failed = False  # set after the first runtime failure in "auto" mode


@torch.compiler.disable
def _fla_or_fallback(q, k, v, g, beta, scale, initial_state, output_final_state):
    # Kept out of the compiled graph: fla is itself compiler-disabled, and dynamo handles
    # graph breaks inside try/except badly.
    global _fla_failed
    try:
        return _fla_chunk(q, k, v, g, beta, scale, initial_state, output_final_state)
    except Exception as e:
        if not _fla_failed:
            logger.warning(
                "fla chunk_gated_delta_rule failed (%s: %s); falling back to our Triton "
                "kernels for the rest of this process.", type(e).__name__, e,
            )
        _fla_failed = True
        return _triton_chunk(q, k, v, g, beta, scale, initial_state, output_final_state)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    document_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch to our chunked PyTorch form, our Triton kernels or fla's Triton kernel.

    With document_ids (intra-document masking) the PyTorch form runs: the Triton kernels take
    no document ids, and fla takes documents only as cu_seqlens of one flattened sequence.

    backend: "torch" -> ours in PyTorch; "triton" -> ours in Triton (CUDA, float32/bf16/fp16);
    "fla" -> fla (raises if unsafe/unavailable); "auto" -> on CUDA, fla when safe and in
    bf16/fp16 (the dtypes fla's kernels target), else our Triton kernels (float64: PyTorch);
    on CPU the PyTorch form. A runtime failure of fla in "auto" mode warns once and falls back.
    Under torch.compile "auto" takes our Triton kernels on CUDA for bf16/fp16 (float32: the
    PyTorch form): they are two custom ops (forward, backward) that the compiled graph calls
    without a graph break, so the whole-block (fullgraph) compile takes them, while fla is
    compiler-disabled (a graph break). Measured on an H200 (fusion_1b, docs/performance.md):
    1.6-2.2% more tokens/s and 1.8 GiB less than the PyTorch form compiled into the block.
    """
    if backend not in ("auto", "torch", "triton", "fla"):
        raise ValueError(f"unknown gated_delta_rule backend {backend!r} (use 'auto', 'torch', 'triton' or 'fla')")
    if backend == "torch" or (document_ids is not None and backend == "auto"):
        return chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                      document_ids=document_ids)
    if document_ids is not None:
        raise ValueError(f"gated_delta_rule backend={backend!r} does not take document_ids; use 'auto' or 'torch'")
    compiling = torch.compiler.is_compiling()
    if backend == "triton":
        return _triton_chunk(q, k, v, g, beta, scale, initial_state, output_final_state)
    if backend == "fla":
        ok, reason = fla_is_safe()
        if not ok:
            raise RuntimeError(f"gated_delta_rule backend='fla' requested but unusable: {reason}")
        return _fla_chunk(q, k, v, g, beta, scale, initial_state, output_final_state)
    half = q.dtype in (torch.bfloat16, torch.float16)
    if not q.is_cuda or q.dtype == torch.float64 or (compiling and not half):
        # float32 under compile: the Triton kernels' float32 path (ieee products) took minutes
        # to compile inside a training run (docs/performance.md, Session 8); keep the form
        # inductor compiles into the block
        return chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state)
    if compiling:
        return _triton_chunk(q, k, v, g, beta, scale, initial_state, output_final_state)
    use_fla = half and not _fla_failed and fla_is_safe()[0]
    if use_fla:
        return _fla_or_fallback(q, k, v, g, beta, scale, initial_state, output_final_state)
    return _triton_chunk(q, k, v, g, beta, scale, initial_state, output_final_state)


def _triton_chunk(q, k, v, g, beta, scale, initial_state, output_final_state):
    # imported on use: CPU-only installs need neither triton nor its kernels
    from .gated_delta_rule_triton import triton_chunk_gated_delta_rule

    return triton_chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state)
