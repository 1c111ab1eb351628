"""Triton kernel of ``geometry.tiles.tile_rewrite``: W[s_k, t_l] <- D_k X[s_k, t_l] E_l, one tile per program.

A program reads its tile of X (W0's in paper mode; lean mode: W's own, plus its rounding buffer) through the two
index vectors, applies the row block's and the column block's b x b matrices (the identity where an index is in no
block; both products in the one program, ragged blocks masked), and writes the tile of W in place (its dtype), the
new rounding buffer (the int8 codes of what the rounding dropped, ``geometry.rounding``) and, for a weight that
merges, the fp32 tile of the new W0. Tiles are disjoint, so the in-place update reads every entry before writing
it. Lean mode leaves the tiles that no block touches alone. The row checksums of what is written are summed per row
across the tiles with integer atomics (their sum does not depend on the order).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..tiling import bits


@triton.jit
def _seg(segs, s):
    return tl.load(segs + s * 4), tl.load(segs + s * 4 + 1), tl.load(segs + s * 4 + 2), tl.load(segs + s * 4 + 3)


@triton.jit
def _matrix(mats_ptr, off_tab, w, cls, jdx, seg_len, BT: tl.constexpr):
    """The b x b matrix of segment (``cls``, ``jdx``) of weight ``w``, as a BT x BT fp32 tile."""
    off = tl.load(off_tab + w * 2 + cls) + jdx.to(tl.int64) * seg_len * seg_len
    i = tl.arange(0, BT)[:, None]
    j = tl.arange(0, BT)[None, :]
    return tl.load(mats_ptr + off + i * seg_len + j, mask=(i < seg_len) & (j < seg_len), other=0.0).to(tl.float32)


@triton.jit
def _unit(v, UNIT_MIN: tl.constexpr, UNIT_MAX: tl.constexpr, UNIT_SCALE: tl.constexpr):
    """The rounding buffer's unit of each entry of fp32 ``v`` (``geometry.rounding``): its binade, at least
    ``UNIT_MIN`` and at most ``UNIT_MAX``, times ``UNIT_SCALE``."""
    binade = (v.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.minimum(tl.maximum(binade, UNIT_MIN), UNIT_MAX) * UNIT_SCALE


@triton.jit
def _nearest(v, X_TY: tl.constexpr):
    """fp32 ``v`` rounded to ``X_TY``, to nearest, ties to even, as torch rounds: for bf16 on the bits, because
    the interpreter truncates where a GPU rounds (an infinity stays, a NaN stays a NaN)."""
    if X_TY == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        even = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (even & -65536).to(tl.float32, bitcast=True)
        return tl.where(v == v, rounded, v).to(X_TY)
    return v.to(X_TY)


@triton.jit
def _tile_rewrite_kernel(tab, x_stride, src_stride, order_r, order_c, segs_r, segs_c, n_row_segs, n_col_segs,
                         off_r, off_c, mats_ptr, sums_ptr, probe_ptr, m, n, count,
                         BT: tl.constexpr, X_TY: tl.constexpr, SRC_TY: tl.constexpr, X_BITS: tl.constexpr,
                         COMP: tl.constexpr, KEEP: tl.constexpr, CHECKSUM: tl.constexpr, LEAN: tl.constexpr,
                         PREC: tl.constexpr, UNIT_MIN: tl.constexpr, UNIT_MAX: tl.constexpr, UNIT_SCALE: tl.constexpr,
                         CODE_MAX: tl.constexpr):
    pid = tl.program_id(0)
    per_w = n_row_segs * n_col_segs
    w = (pid // per_w).to(tl.int64)
    i = (pid % per_w) // n_col_segs
    j = pid % n_col_segs
    si, li, ci, ji = _seg(segs_r, i)
    sj, lj, cj, jj = _seg(segs_c, j)
    moved = (ci >= 0) | (cj >= 0)
    write = moved | (not LEAN)  # lean mode leaves a tile no block touches as it is
    # the table, a row per kind: the weights, their sources (W0 or the weights), rounding buffers, new W0s, take
    if (tl.load(tab + 4 * count + w) != 0) & (write | CHECKSUM):
        rr = tl.arange(0, BT)
        cc = tl.arange(0, BT)
        rows = tl.load(order_r + w * m + si + rr, mask=rr < li, other=0).to(tl.int64)
        cols = tl.load(order_c + w * n + sj + cc, mask=cc < lj, other=0).to(tl.int64)
        inside = (rr < li)[:, None] & (cc < lj)[None, :]
        x_ptr = tl.load(tab + w).to(tl.pointer_type(X_TY))
        src_ptr = tl.load(tab + count + w).to(tl.pointer_type(SRC_TY))
        at = rows[:, None] * x_stride + cols[None, :]
        src = tl.load(src_ptr + rows[:, None] * src_stride + cols[None, :], mask=inside, other=0.0)
        xt = src.to(tl.float32)
        if COMP:
            comp_ptr = tl.load(tab + 2 * count + w).to(tl.pointer_type(tl.int8))
            code = tl.load(comp_ptr + at, mask=inside, other=0).to(tl.float32)
            xt += code * _unit(xt, UNIT_MIN, UNIT_MAX, UNIT_SCALE)
        if ci >= 0:
            xt = tl.dot(_matrix(mats_ptr, off_r, w, ci, ji, li, BT), xt, input_precision=PREC)
        if cj >= 0:
            xt = tl.dot(xt, _matrix(mats_ptr, off_c, w, cj, jj, lj, BT), input_precision=PREC)
        low = _nearest(xt, X_TY)
        if write:
            tl.store(x_ptr + at, low, mask=inside)
            if COMP:
                lowf = low.to(tl.float32)
                v = (xt - lowf) / _unit(lowf, UNIT_MIN, UNIT_MAX, UNIT_SCALE)
                v = (v + 12582912.0) - 12582912.0  # to the nearest integer, ties to even (|v| <= 128.5 < 2^22)
                code = tl.minimum(tl.maximum(v, -CODE_MAX), CODE_MAX)
                tl.store(comp_ptr + at, tl.where(v == v, code, 0.0).to(tl.int8), mask=inside)
            if KEEP:
                keep = tl.load(tab + 3 * count + w)
                if keep != 0:
                    keep_ptr = keep.to(tl.pointer_type(tl.float32))
                    tl.store(keep_ptr + rows[:, None] * n + cols[None, :], xt, mask=inside)
        if CHECKSUM:
            if not write:  # a tile lean mode leaves: the weight as it is (its source)
                low = src.to(X_TY)
            pr = tl.load(probe_ptr + cols, mask=cc < lj, other=0)
            tl.atomic_add(sums_ptr + w * m + rows, tl.sum(tl.where(inside, bits(low, X_BITS) * pr[None, :], 0), axis=1),
                          mask=rr < li)
