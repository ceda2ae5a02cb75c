"""(I + A)^-1 of a strictly lower 64x64 A in Triton, blocked as fla's chunk kernels do it.

The chunked gated delta rule needs, per chunk, the inverse of a unit lower triangular matrix.
Elementwise forward substitution takes 63 dependent steps over the whole 64x64 tile; here the
four 16x16 diagonal blocks are substituted together (14 steps on small tiles), and the blocks
below them are merged with matmuls (block forward substitution). The jit helpers are used inside
the gated delta rule's kernels; `unit_lower_inverse` runs them on their own (tests compare it
with a float64 triangular solve).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["SUB", "blocked_unit_lower_inverse", "store_unit_lower_blocks", "unit_lower_inverse"]

SUB = tl.constexpr(16)  # block size: tl.dot's smallest tile; a 64-token chunk is 4 sub-chunks
SIZE = 4 * 16


@triton.jit
def _substitute_row(X, sel):
    """Row r (sel) of X = (I + L)^-1 - I, L strictly lower, from X's rows above r.

    X holds -L from row r down, so -l_r is read from X itself, and -l_r X only meets the rows
    above r (l_r is zero from column r on): row r = -l_r - l_r X."""
    neg_l = tl.sum(tl.where(sel, X, 0.0), 0)
    return tl.where(sel, (neg_l + tl.sum(neg_l[:, None] * X, 0))[None, :], X)


@triton.jit
def blocked_unit_lower_inverse(A00, A10, A11, A20, A21, A22, A30, A31, A32, A33, PREC: tl.constexpr):
    """(I + A)^-1 of a strictly lower 64x64 A given by its 16x16 fp32 blocks A_ij (i >= j); the
    same blocks back.

    The four diagonal blocks by forward substitution, elementwise in fp32 and in one loop;
    then T_ij = -T_ii sum_{j<=l<i} A_il T_lj with matmuls."""
    o = tl.arange(0, SUB)
    X0, X1, X2, X3 = -A00, -A11, -A22, -A33  # rows 0 and 1 are final already
    for r in range(2, SUB):
        sel = (o == r)[:, None]
        X0 = _substitute_row(X0, sel)
        X1 = _substitute_row(X1, sel)
        X2 = _substitute_row(X2, sel)
        X3 = _substitute_row(X3, sel)
    eye = (o[:, None] == o[None, :]).to(tl.float32)
    T00, T11, T22, T33 = X0 + eye, X1 + eye, X2 + eye, X3 + eye
    T10 = -tl.dot(T11, tl.dot(A10, T00, input_precision=PREC), input_precision=PREC)
    T21 = -tl.dot(T22, tl.dot(A21, T11, input_precision=PREC), input_precision=PREC)
    T32 = -tl.dot(T33, tl.dot(A32, T22, input_precision=PREC), input_precision=PREC)
    T20 = -tl.dot(T22, tl.dot(A20, T00, input_precision=PREC) + tl.dot(A21, T10, input_precision=PREC),
                  input_precision=PREC)
    T31 = -tl.dot(T33, tl.dot(A31, T11, input_precision=PREC) + tl.dot(A32, T21, input_precision=PREC),
                  input_precision=PREC)
    T30 = -tl.dot(T33, tl.dot(A30, T00, input_precision=PREC) + tl.dot(A31, T10, input_precision=PREC)
                  + tl.dot(A32, T20, input_precision=PREC), input_precision=PREC)
    return T00, T10, T11, T20, T21, T22, T30, T31, T32, T33


@triton.jit
def _load_block(ptr, i: tl.constexpr, j: tl.constexpr, BT: tl.constexpr):
    """Block (i, j) of a row-major BT x BT matrix, as fp32."""
    o = tl.arange(0, SUB)
    return tl.load(ptr + (o + i * SUB)[:, None] * BT + (o + j * SUB)[None, :]).to(tl.float32)


@triton.jit
def _store_block(ptr, i: tl.constexpr, j: tl.constexpr, BT: tl.constexpr, x):
    o = tl.arange(0, SUB)
    tl.store(ptr + (o + i * SUB)[:, None] * BT + (o + j * SUB)[None, :], x)


@triton.jit
def store_unit_lower_blocks(ptr, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33, BT: tl.constexpr):
    """The 64x64 matrix of the ten blocks, zeros above the diagonal blocks, row-major at ptr."""
    zero = tl.zeros([SUB, SUB], dtype=tl.float32)
    _store_block(ptr, 0, 0, BT, T00)
    _store_block(ptr, 0, 1, BT, zero)
    _store_block(ptr, 0, 2, BT, zero)
    _store_block(ptr, 0, 3, BT, zero)
    _store_block(ptr, 1, 0, BT, T10)
    _store_block(ptr, 1, 1, BT, T11)
    _store_block(ptr, 1, 2, BT, zero)
    _store_block(ptr, 1, 3, BT, zero)
    _store_block(ptr, 2, 0, BT, T20)
    _store_block(ptr, 2, 1, BT, T21)
    _store_block(ptr, 2, 2, BT, T22)
    _store_block(ptr, 2, 3, BT, zero)
    _store_block(ptr, 3, 0, BT, T30)
    _store_block(ptr, 3, 1, BT, T31)
    _store_block(ptr, 3, 2, BT, T32)
    _store_block(ptr, 3, 3, BT, T33)


@triton.jit
def _unit_lower_inverse_kernel(A_ptr, Ai_ptr, BT: tl.constexpr, PREC: tl.constexpr):
    """One strictly lower BT x BT matrix per program."""
    tl.static_assert(BT == 4 * SUB)
    a = A_ptr + tl.program_id(0).to(tl.int64) * BT * BT
    Ti = blocked_unit_lower_inverse(
        _load_block(a, 0, 0, BT), _load_block(a, 1, 0, BT), _load_block(a, 1, 1, BT),
        _load_block(a, 2, 0, BT), _load_block(a, 2, 1, BT), _load_block(a, 2, 2, BT),
        _load_block(a, 3, 0, BT), _load_block(a, 3, 1, BT), _load_block(a, 3, 2, BT),
        _load_block(a, 3, 3, BT), PREC)
    store_unit_lower_blocks(Ai_ptr + tl.program_id(0).to(tl.int64) * BT * BT, *Ti, BT)


def unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I + A)^-1 of every strictly lower 64x64 matrix of a float32 [..., 64, 64] A (CUDA, or
    the Triton interpreter), fp32 products throughout."""
    if A.shape[-2:] != (SIZE, SIZE) or A.dtype != torch.float32:
        raise ValueError(f"unit_lower_inverse takes float32 [..., {SIZE}, {SIZE}] matrices, got {A.dtype} "
                         f"{tuple(A.shape)}")
    A = A.contiguous()
    out = torch.empty_like(A)
    n = A.numel() // (SIZE * SIZE)
    if n:
        _unit_lower_inverse_kernel[(n,)](A, out, BT=SIZE, PREC="ieee")
    return out
