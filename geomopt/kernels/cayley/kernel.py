"""Triton device functions for packed skew blocks held whole in registers (one block per program), and the
Cayley-Neumann kernels built from them.

A block of side b sits in a B x B tile (B a power of two >= b, zero padded). ``skew_tile`` unpacks the b(b-1)/2
stored entries (row-major upper triangle, as ``torch.triu_indices``) with one masked gather; ``store_upper`` packs
by a masked scatter of the upper triangle, every entry written once (no atomics). The polynomial of the map,
p(x) = sum_j c_j x^j (``coef``: the paper's (1 + x)(1 + x + ... + x^k), coefficients 1, 2, ..., 2, 1 of degree
k + 1; or the series form I + 2(x + ... + x^(k-1))), is evaluated by Horner's scheme; its backward, dL/dQ =
sum_j c_j sum_(a+b=j-1) (Q^T)^a G (Q^T)^b, is the upper-right block of p applied to [[Q^T, G], [0, Q^T]], by
Horner's scheme on the pair of blocks: 3 products a degree. Every product accumulates in fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def upper_tile(ptr, b, B: tl.constexpr):
    """The packed entries at ``ptr`` as the strict upper triangle of a B x B fp32 tile (zeros elsewhere)."""
    r = tl.arange(0, B)[:, None]
    c = tl.arange(0, B)[None, :]
    up = (r < c) & (c < b)
    pidx = r * b - r * (r + 1) // 2 + c - r - 1
    return tl.load(ptr + pidx, mask=up, other=0.0).to(tl.float32)


@triton.jit
def skew_tile(ptr, b, B: tl.constexpr):
    """Q (B x B fp32, zero padded) from its packed upper triangle at ``ptr``: Q[i, j] = q, Q[j, i] = -q (i < j)."""
    u = upper_tile(ptr, b, B)
    return u - tl.trans(u)


@triton.jit
def store_upper(ptr, x, b, B: tl.constexpr):
    """Pack the strict upper triangle of tile ``x`` to ``ptr`` (in ``ptr``'s dtype)."""
    r = tl.arange(0, B)[:, None]
    c = tl.arange(0, B)[None, :]
    pidx = r * b - r * (r + 1) // 2 + c - r - 1
    tl.store(ptr + pidx, x.to(ptr.dtype.element_ty), mask=(r < c) & (c < b))


@triton.jit
def eye_tile(b, B: tl.constexpr):
    r = tl.arange(0, B)[:, None]
    c = tl.arange(0, B)[None, :]
    return tl.where((r == c) & (r < b), 1.0, 0.0)


@triton.jit
def coef(j: tl.constexpr, DEG: tl.constexpr, SERIES: tl.constexpr):
    """c_j of the map's polynomial: 1 at j = 0 (and at j = DEG for the paper's form), else 2."""
    if j == 0:
        return 1.0
    if (not SERIES) and j == DEG:
        return 1.0
    return 2.0


@triton.jit
def poly(q, b, B: tl.constexpr, DEG: tl.constexpr, SERIES: tl.constexpr, PREC: tl.constexpr):
    """p(Q) by Horner's scheme: F = c_DEG I, then F <- Q F + c_j I for j = DEG - 1 .. 0 (DEG products)."""
    eye = eye_tile(b, B)
    f = coef(DEG, DEG, SERIES) * eye
    for i in tl.static_range(DEG):
        f = tl.dot(q, f, input_precision=PREC) + coef(DEG - 1 - i, DEG, SERIES) * eye
    return f


@triton.jit
def poly_adjoint(q, g, b, B: tl.constexpr, DEG: tl.constexpr, SERIES: tl.constexpr, PREC: tl.constexpr):
    """dL/dQ for upstream gradient ``g`` of p(Q): with P = Q^T, (A, B) <- (P A + c_j I, P B + G A) from
    (c_DEG I, 0), j = DEG - 1 .. 0; B ends as the gradient."""
    eye = eye_tile(b, B)
    p = tl.trans(q)
    a = coef(DEG, DEG, SERIES) * p + coef(DEG - 1, DEG, SERIES) * eye  # the first step, without products
    acc = coef(DEG, DEG, SERIES) * g
    for i in tl.static_range(DEG - 1):
        acc = tl.dot(p, acc, input_precision=PREC) + tl.dot(g, a, input_precision=PREC)
        a = tl.dot(p, a, input_precision=PREC) + coef(DEG - 2 - i, DEG, SERIES) * eye
    return acc


@triton.jit
def _forward_kernel(q_ptr, out_ptr, b, nq, B: tl.constexpr, DEG: tl.constexpr, SERIES: tl.constexpr,
                    PREC: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    r = poly(skew_tile(q_ptr + blk * nq, b, B), b, B, DEG, SERIES, PREC)
    i = tl.arange(0, B)[:, None]
    j = tl.arange(0, B)[None, :]
    tl.store(out_ptr + blk * b * b + i * b + j, r.to(out_ptr.dtype.element_ty), mask=(i < b) & (j < b))


@triton.jit
def _backward_kernel(q_ptr, g_ptr, dq_ptr, b, nq, B: tl.constexpr, DEG: tl.constexpr, SERIES: tl.constexpr,
                     PREC: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, B)[:, None]
    j = tl.arange(0, B)[None, :]
    g = tl.load(g_ptr + blk * b * b + i * b + j, mask=(i < b) & (j < b), other=0.0).to(tl.float32)
    d = poly_adjoint(skew_tile(q_ptr + blk * nq, b, B), g, b, B, DEG, SERIES, PREC)
    store_upper(dq_ptr + blk * nq, d - tl.trans(d), b, B)
