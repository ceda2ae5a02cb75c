"""Normalised causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

With feature-mapped queries and keys phi(q), phi(k) (non-negative; the mixer applies phi):

    S_t = S_{t-1} + phi(k_t) v_t^T          [K, V] per head
    z_t = z_{t-1} + phi(k_t)                [K]
    o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps)

`linear_attention_recurrent` is that recurrence token by token (the reference);
`chunked_linear_attention` computes the same in chunks of C tokens: the causal C x C products
inside a chunk plus the state carried from the chunks before.

Layout [B, T, H, D]; the math runs in float32 (float64 stays float64), the output has v's dtype.
A state is the pair (S [B, H, K, V], z [B, H, K]).

Packed documents (document_ids [B, T], contiguous runs of one id per document): the recurrence
restarts at every boundary. In the chunked form a chunk's carried state belongs to the document
of the chunk's first token; a query of a later document in the chunk reads no carried state, and
the state passed on keeps only the keys of the document the next chunk starts in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LINEAR_CHUNK = 64

FEATURE_MAPS = {
    "elu": lambda x: F.elu(x) + 1.0,  # Katharopoulos et al.: positive, smooth
    "relu": F.relu,
}

State = tuple[torch.Tensor, torch.Tensor]


def feature_map(name: str):
    if name not in FEATURE_MAPS:
        raise ValueError(f"linear_feature_map {name!r} must be one of {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[name]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def empty_state(q: torch.Tensor, v: torch.Tensor) -> State:
    bsz, _, heads, k_dim = q.shape
    dtype = _compute_dtype(q)
    return (q.new_zeros(bsz, heads, k_dim, v.shape[-1], dtype=dtype),
            q.new_zeros(bsz, heads, k_dim, dtype=dtype))


def linear_attention_step(q, k, v, state: State, eps: float = 1e-6) -> tuple[torch.Tensor, State]:
    """One token: q, k [B, H, K], v [B, H, V] -> (o [B, H, V], new state); `state` is not mutated."""
    dtype = state[0].dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    s = state[0] + k[..., :, None] * v[..., None, :]
    z = state[1] + k
    num = torch.einsum("bhk,bhkv->bhv", q, s)
    den = (q * z).sum(-1, keepdim=True)
    return num / (den + eps), (s, z)


def linear_attention_recurrent(q, k, v, eps: float = 1e-6, initial_state: State | None = None):
    """The recurrence, token by token: (o [B, T, H, V], final state)."""
    state = initial_state if initial_state is not None else empty_state(q, v)
    outs = []
    for t in range(q.shape[1]):
        o, state = linear_attention_step(q[:, t], k[:, t], v[:, t], state, eps)
        outs.append(o)
    return torch.stack(outs, dim=1).to(v.dtype), state


def chunked_linear_attention(
    q, k, v, eps: float = 1e-6, chunk_size: int = LINEAR_CHUNK, initial_state: State | None = None,
    document_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State]:
    """Chunked form of the recurrence: (o [B, T, H, V], final state)."""
    if document_ids is not None and initial_state is not None:
        raise NotImplementedError("document_ids cannot be combined with an initial state (decoding)")
    bsz, seqlen, heads, k_dim = q.shape
    v_dim = v.shape[-1]
    dtype = _compute_dtype(q)
    pad = -seqlen % chunk_size
    n_chunks = (seqlen + pad) // chunk_size

    def chunks(x):  # [B, T, H, D] -> [B, H, N, C, D]; zero keys in the padding add nothing
        x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad))
        return x.view(bsz, n_chunks, chunk_size, heads, -1).permute(0, 3, 1, 2, 4)

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    if document_ids is None:
        intra_mask = causal
        reads_state = torch.ones(1, 1, n_chunks, chunk_size, 1, dtype=dtype, device=q.device)
    else:
        docs = F.pad(document_ids, (0, pad), value=-1).view(bsz, n_chunks, chunk_size)
        same_doc = docs[..., :, None] == docs[..., None, :]
        intra_mask = (causal & same_doc)[:, None]  # [B, 1, N, C, C]
        # the carried state is the document of the chunk's first token
        reads_state = (docs == docs[..., :1])[:, None, :, :, None].to(dtype)
        # the state passed to chunk n+1 keeps the keys of the document chunk n+1 starts in
        next_first = torch.cat([docs[:, 1:, :1], docs[:, -1:, -1:]], dim=1)  # [B, N, 1]
        passes_key = (docs == next_first)[:, None, :, :, None].to(dtype)  # [B, 1, N, C, 1]
        keeps_state = (docs[..., 0] == next_first[..., 0])[:, None, :, None, None].to(dtype)

    scores = torch.einsum("bhnik,bhnjk->bhnij", qc, kc).masked_fill(~intra_mask, 0.0)
    num = torch.einsum("bhnij,bhnjv->bhniv", scores, vc)
    den = scores.sum(-1, keepdim=True)

    s, z = initial_state if initial_state is not None else empty_state(q, v)
    s, z = s.to(dtype), z.to(dtype)
    inter_num, inter_den = [], []
    for n in range(n_chunks):
        qn = qc[:, :, n] * reads_state[:, :, n]
        inter_num.append(torch.einsum("bhik,bhkv->bhiv", qn, s))
        inter_den.append(torch.einsum("bhik,bhk->bhi", qn, z)[..., None])
        kn = kc[:, :, n] if document_ids is None else kc[:, :, n] * passes_key[:, :, n]
        if document_ids is not None:
            s, z = s * keeps_state[:, :, n], z * keeps_state[:, :, n, 0]
        s = s + torch.einsum("bhjk,bhjv->bhkv", kn, vc[:, :, n])
        z = z + kn.sum(2)
    num = num + torch.stack(inter_num, dim=2)
    den = den + torch.stack(inter_den, dim=2)
    out = (num / (den + eps)).permute(0, 2, 3, 1, 4).reshape(bsz, n_chunks * chunk_size, heads, v_dim)
    return out[:, :seqlen].to(v.dtype), (s, z)
