"""Triton kernels for the Cayley-Neumann map, forward and backward, over a batch of packed skew blocks.

``cayley_neumann(q, b, terms)`` has exactly the signature and the polynomial of
``geomopt.geometry.cayley.cayley_neumann``: the same Horner scheme

    S = I + Q;  S <- I + Q S  (terms - 1 times);  R = S + Q S  = (I + Q)(I + Q + ... + Q^terms),

so it agrees with the reference for every ``terms``, not up to a Q^(k+1) term. Q is unpacked from the
b(b-1)/2 stored entries inside the kernel (never materialized), each program owns one column strip of
one block (every product is a left multiplication, so strips evolve independently), and the running
matrices live in an fp32 scratch that stays in L2. The backward uses the same strips: for the
polynomial f(x) = 1 + 2x + ... + 2x^k + x^(k+1), dL/dQ is the upper-right block of f applied to
[[Q^T, G], [0, Q^T]] (the adjoint of the Frechet derivative), evaluated by Horner on (A, B) pairs, and
packed as dq[i<j] = dQ[i, j] - dQ[j, i] by exactly two adds into zero per entry (order-independent).
Accumulation is fp32 for every input dtype; fp32 products use IEEE precision (no TF32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["cayley_neumann"]


@triton.jit
def _skew_tile(q_ptr, q_off, rows, cols, b, SIGN: tl.constexpr):
    """SIGN * Q[rows, cols] read from the packed upper triangle (row-major, as torch.triu_indices)."""
    r = rows[:, None]
    c = cols[None, :]
    lo = tl.minimum(r, c)
    hi = tl.maximum(r, c)
    pidx = lo * b - lo * (lo + 1) // 2 + hi - lo - 1
    valid = (r < b) & (c < b) & (r != c)
    v = tl.load(q_ptr + q_off + pidx, mask=valid, other=0.0).to(tl.float32)
    return tl.where(r < c, v, -v) * SIGN


@triton.jit
def _eye_tile(rows, cols, b):
    return tl.where((rows[:, None] == cols[None, :]) & (rows[:, None] < b), 1.0, 0.0)


@triton.jit
def _cn_forward_kernel(q_ptr, out_ptr, buf_ptr, b, nq, terms, T: tl.constexpr, PREC: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * T + tl.arange(0, T)
    q_off = blk * nq
    bb = b * b
    base = blk * 2 * bb  # two b x b fp32 buffers per block: S and the next S
    cmask = cols[None, :] < b
    for i0 in range(0, b, T):  # S = I + Q
        rows = i0 + tl.arange(0, T)
        s = _eye_tile(rows, cols, b) + _skew_tile(q_ptr, q_off, rows, cols, b, 1.0)
        tl.store(buf_ptr + base + rows[:, None] * b + cols[None, :], s, mask=(rows[:, None] < b) & cmask)
    tl.debug_barrier()
    for it in range(0, terms):  # terms - 1 steps S <- I + Q S, then the last one R = S + Q S
        src = base + (it % 2) * bb
        dst = base + ((it + 1) % 2) * bb
        for i0 in range(0, b, T):
            rows = i0 + tl.arange(0, T)
            acc = tl.zeros((T, T), dtype=tl.float32)
            for k0 in range(0, b, T):
                ks = k0 + tl.arange(0, T)
                qt = _skew_tile(q_ptr, q_off, rows, ks, b, 1.0)
                st = tl.load(buf_ptr + src + ks[:, None] * b + cols[None, :], mask=(ks[:, None] < b) & cmask,
                             other=0.0)
                acc += tl.dot(qt, st, input_precision=PREC)
            omask = (rows[:, None] < b) & cmask
            if it < terms - 1:
                tl.store(buf_ptr + dst + rows[:, None] * b + cols[None, :], _eye_tile(rows, cols, b) + acc,
                         mask=omask)
            else:
                s = tl.load(buf_ptr + src + rows[:, None] * b + cols[None, :], mask=omask, other=0.0)
                tl.store(out_ptr + blk * bb + rows[:, None] * b + cols[None, :],
                         (s + acc).to(out_ptr.dtype.element_ty), mask=omask)
        tl.debug_barrier()


@triton.jit
def _cn_backward_kernel(q_ptr, g_ptr, dq_ptr, buf_ptr, b, nq, terms, T: tl.constexpr, PREC: tl.constexpr):
    # Horner on M = [[P, G], [0, P]], P = Q^T = -Q, for f with coefficients c_0 = c_(k+1) = 1, else 2:
    # (A, B) <- (c_j I + P A, P B + G A) for j = k .. 0, from (A, B) = (I, 0); B ends as dL/dQ.
    blk = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * T + tl.arange(0, T)
    q_off = blk * nq
    bb = b * b
    base = blk * 4 * bb  # A, A', B, B'
    cmask = cols[None, :] < b
    for i0 in range(0, b, T):  # j = k: A = 2 I + P, B = G
        rows = i0 + tl.arange(0, T)
        omask = (rows[:, None] < b) & cmask
        off = rows[:, None] * b + cols[None, :]
        a = 2.0 * _eye_tile(rows, cols, b) + _skew_tile(q_ptr, q_off, rows, cols, b, -1.0)
        g = tl.load(g_ptr + blk * bb + off, mask=omask, other=0.0).to(tl.float32)
        tl.store(buf_ptr + base + off, a, mask=omask)
        tl.store(buf_ptr + base + 2 * bb + off, g, mask=omask)
    tl.debug_barrier()
    for it in range(0, terms):  # j = k - 1 .. 0
        a_src = base + (it % 2) * bb
        a_dst = base + ((it + 1) % 2) * bb
        b_src = a_src + 2 * bb
        b_dst = a_dst + 2 * bb
        for i0 in range(0, b, T):
            rows = i0 + tl.arange(0, T)
            acc_a = tl.zeros((T, T), dtype=tl.float32)
            acc_b = tl.zeros((T, T), dtype=tl.float32)
            for k0 in range(0, b, T):
                ks = k0 + tl.arange(0, T)
                kmask = (ks[:, None] < b) & cmask
                koff = ks[:, None] * b + cols[None, :]
                pt = _skew_tile(q_ptr, q_off, rows, ks, b, -1.0)
                gt = tl.load(g_ptr + blk * bb + rows[:, None] * b + ks[None, :],
                             mask=(rows[:, None] < b) & (ks[None, :] < b), other=0.0).to(tl.float32)
                at = tl.load(buf_ptr + a_src + koff, mask=kmask, other=0.0)
                bt = tl.load(buf_ptr + b_src + koff, mask=kmask, other=0.0)
                acc_a += tl.dot(pt, at, input_precision=PREC)
                acc_b += tl.dot(pt, bt, input_precision=PREC)
                acc_b += tl.dot(gt, at, input_precision=PREC)
            omask = (rows[:, None] < b) & cmask
            off = rows[:, None] * b + cols[None, :]
            if it < terms - 1:
                tl.store(buf_ptr + a_dst + off, 2.0 * _eye_tile(rows, cols, b) + acc_a, mask=omask)
                tl.store(buf_ptr + b_dst + off, acc_b, mask=omask)
            else:  # pack: dq[(i, j)] += dQ[i, j] for i < j and -= dQ[i, j] for i > j
                r = rows[:, None]
                c = cols[None, :]
                lo = tl.minimum(r, c)
                hi = tl.maximum(r, c)
                pidx = lo * b - lo * (lo + 1) // 2 + hi - lo - 1
                tl.atomic_add(dq_ptr + q_off + pidx, tl.where(r < c, acc_b, -acc_b), mask=omask & (r != c))
        tl.debug_barrier()


def _tile(b: int) -> int:
    return 16 if b <= 16 else 32 if b <= 32 else 64


def _prec(t: torch.Tensor) -> str:
    return "ieee" if t.dtype in (torch.float32, torch.float64) else "tf32"


def _flat(q: torch.Tensor, b: int, terms: int) -> torch.Tensor:
    if terms < 1:
        raise ValueError(f"terms must be >= 1, got {terms}")
    nq = b * (b - 1) // 2
    if q.shape[-1] != nq:
        raise ValueError(f"q has {q.shape[-1]} packed entries, a {b} x {b} skew matrix has {nq}")
    return q.detach().reshape(-1, nq).contiguous()


def _forward(q: torch.Tensor, b: int, terms: int) -> torch.Tensor:
    flat = _flat(q, b, terms)
    nblk = flat.shape[0]
    out = torch.empty(nblk, b, b, dtype=q.dtype, device=q.device)
    if nblk == 0 or b < 2:
        out.copy_(torch.eye(b, dtype=q.dtype, device=q.device).expand_as(out))
    else:
        t = _tile(b)
        buf = torch.empty(nblk, 2, b, b, dtype=torch.float32, device=q.device)
        _cn_forward_kernel[(nblk, triton.cdiv(b, t))](flat, out, buf, b, flat.shape[1], terms, T=t, PREC=_prec(q))
    return out.reshape(*q.shape[:-1], b, b)


def _backward(q: torch.Tensor, grad: torch.Tensor, b: int, terms: int) -> torch.Tensor:
    flat = _flat(q, b, terms)
    nblk = flat.shape[0]
    dq = torch.zeros(nblk, flat.shape[1], dtype=torch.float32, device=q.device)
    if nblk and b >= 2:
        t = _tile(b)
        g = grad.reshape(nblk, b, b).contiguous()
        buf = torch.empty(nblk, 4, b, b, dtype=torch.float32, device=q.device)
        _cn_backward_kernel[(nblk, triton.cdiv(b, t))](flat, g, dq, buf, b, flat.shape[1], terms, T=t,
                                                        PREC=_prec(q))
    return dq.to(q.dtype).reshape(q.shape)


class _CayleyNeumann(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, b: int, terms: int) -> torch.Tensor:
        ctx.save_for_backward(q)
        ctx.b, ctx.terms = b, terms
        return _forward(q, b, terms)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (q,) = ctx.saved_tensors
        return _backward(q, grad, ctx.b, ctx.terms), None, None


def cayley_neumann(q: torch.Tensor, b: int, terms: int) -> torch.Tensor:
    """Kernel of ``geomopt.geometry.cayley.cayley_neumann`` (differentiable in ``q``)."""
    _flat(q, b, terms)  # argument errors before autograd sees them
    return _CayleyNeumann.apply(q, b, terms)
