"""Triton kernel of ``optim.factor_update.factor_update``: one block per program, held whole in registers through
the whole of POET's b x b work (see that module): the old map and its Newton-Schulz inverse, the gradient at the map,
the map's backward, the Adam update of the packed generator, the new map, the safeguard's bound and the rotation the
rewrite applies. The packed generator and its two moments are read as upper triangles of the tile and written back
packed; the block's gradient is read and what the rewrite applies written in its place. Nothing else is read or
written, so the b x b work moves about seven b x b words a block.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..cayley.kernel import eye_tile, poly, poly_adjoint, store_upper, upper_tile


@triton.jit
def _inverse(d, b, iterations, B: tl.constexpr, PREC: tl.constexpr):
    """(X ~ D^-1 after ``iterations`` Newton-Schulz steps from D^T, the largest entry of the last residual I - D X)."""
    eye = eye_tile(b, B)
    x = tl.trans(d)
    res = eye - tl.dot(d, x, input_precision=PREC)
    for _ in range(iterations):
        res = eye - tl.dot(d, x, input_precision=PREC)
        x = x + tl.dot(x, res, input_precision=PREC)
    return x, tl.max(tl.max(tl.abs(res), axis=1), axis=0)


@triton.jit
def _adam(p, g, m, v, up, lr, t, beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay,
          DECOUPLED: tl.constexpr):
    """One Adam / AdamW update of the upper triangle ``up`` of the generator ``p``: (p, m, v) new."""
    if DECOUPLED:
        p = p * (1.0 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    bc1 = 1.0 - tl.exp2(t * log2_beta1)
    bc2 = 1.0 - tl.exp2(t * log2_beta2)
    return tl.where(up, p - (lr / bc1) * m / (tl.sqrt(v) / tl.sqrt(bc2) + eps), 0.0), m, v


@triton.jit
def _bound(p, q, PREC: tl.constexpr):
    """``geometry.skew_norm_bound`` of the skew Q = p - p^T: min(||Q||_F, ||Q||_inf, ||Q^4||_F^(1/4))."""
    y = tl.dot(q, q, input_precision=PREC)
    y2 = tl.dot(y, y, input_precision=PREC)
    frob = tl.sqrt(2.0 * tl.sum(tl.sum(p * p, axis=1), axis=0))
    inf = tl.max(tl.sum(tl.abs(q), axis=1), axis=0)
    return tl.minimum(tl.minimum(frob, inf), tl.sqrt(tl.sqrt(tl.sqrt(tl.sum(tl.sum(y2 * y2, axis=1), axis=0)))))


@triton.jit
def _factor_update_kernel(mats_ptr, blocks_tab, tab, lr_ptr, step_ptr, q_out, m_out, v_out, steps_out, verdict_ptr,
                          verdict_stride, n_blocks, n_entries, b, nq, iterations, beta1, beta2, log2_beta1,
                          log2_beta2, eps, weight_decay, conv_tol, B: tl.constexpr, DEG: tl.constexpr,
                          SERIES: tl.constexpr, LEAN: tl.constexpr, DECOUPLED: tl.constexpr, PREC: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    e = tl.load(blocks_tab + blk)  # per block: its entry, and its place in the entry's tensors
    local = tl.load(blocks_tab + n_blocks + blk).to(tl.int64)
    r = tl.arange(0, B)[:, None]
    c = tl.arange(0, B)[None, :]
    inside = (r < b) & (c < b)
    # the table, a row per kind: the entries' generators, first and second moments, sides and owners
    qu = upper_tile(tl.load(tab + e).to(tl.pointer_type(tl.float32)) + local * nq, b, B)
    old = poly(qu - tl.trans(qu), b, B, DEG, SERIES, PREC)  # 1. the old map and its inverse
    x, worst = _inverse(old, b, iterations, B, PREC)
    grad = tl.load(mats_ptr + blk * b * b + r * b + c, mask=inside, other=0.0)
    row = tl.load(tab + 3 * n_entries + e) != 0
    if row:  # 2-3. the gradient at the map, then through the map's backward to the packed generator
        at_map = tl.dot(grad, tl.trans(x), input_precision=PREC)
    else:
        at_map = tl.dot(tl.trans(x), grad, input_precision=PREC)
    dq = poly_adjoint(qu - tl.trans(qu), at_map, b, B, DEG, SERIES, PREC)
    up = (r < c) & (c < b)
    t = tl.load(step_ptr + e) + 1.0  # 4. Adam / AdamW on the upper triangle
    if local == 0:
        tl.store(steps_out + e, t)
    m = upper_tile(tl.load(tab + n_entries + e).to(tl.pointer_type(tl.float32)) + local * nq, b, B)
    v = upper_tile(tl.load(tab + 2 * n_entries + e).to(tl.pointer_type(tl.float32)) + local * nq, b, B)
    p, m, v = _adam(qu, tl.where(up, dq - tl.trans(dq), 0.0), m, v, up, tl.load(lr_ptr + e), t, beta1, beta2,
                    log2_beta1, log2_beta2, eps, weight_decay, DECOUPLED)
    store_upper(q_out + blk * nq, p, b, B)
    store_upper(m_out + blk * nq, m, b, B)
    store_upper(v_out + blk * nq, v, b, B)
    qn = p - tl.trans(p)  # 5. the new map, its bound, and what the rewrite applies
    new = poly(qn, b, B, DEG, SERIES, PREC)
    owner = tl.load(tab + 4 * n_entries + e)  # max over the owner's blocks: the same whatever the order
    tl.atomic_max(verdict_ptr + owner, _bound(p, qn, PREC))
    if worst * worst > conv_tol:
        tl.atomic_max(verdict_ptr + verdict_stride + owner, 1.0)
    if LEAN:
        eye = eye_tile(b, B)
        if row:
            new = eye + tl.dot(new - old, x, input_precision=PREC)
        else:
            new = eye + tl.dot(x, new - old, input_precision=PREC)
    tl.store(mats_ptr + blk * b * b + r * b + c, new, mask=inside)
