"""Triton kernel of ``geometry.tiles.tile_grads``: both sides' block gradients of every weight of one shape.

Programs come in two roles, by their index. A row program owns one output tile (T x T) of one row segment's b x b
gradient G[s_k] W[s_k]^T and reduces over all columns in their natural order (each row of G and W read whole and
contiguous); the program of a segment's diagonal tile also checks the segment's rows of G for non-finite entries,
sums the row checksums of W and compares them with the last record, so that every entry is checked once
(segments of rows no block holds get only this). A column program owns one output tile of a column block's
W[:, t_k]^T G[:, t_k] and reduces over all rows, reading the block's columns through its index vector. Both
reductions are sums in a fixed order, so reruns and data-parallel ranks agree to the bit; no permuted copy of G or W
is made. The weights are reached through tables of pointers (one launch for all of them), their rows at a stride,
their columns contiguous. (A program cannot hold both sides' accumulators of a weight: G and W are read once by the
row programs and once by the column programs, the second time from the cache where it still holds them.)
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..tiling import bits, dot


@triton.jit
def _report(tab, w, count, ra, inside, bad, sums, verdict_ptr, verdict_stride, sums_ptr, m, CHECKSUM: tl.constexpr):
    """A row segment's findings: a non-finite gradient entry; its row checksums, stored and compared with the
    weight's last record (the third row of the table; 0: none): any row that differs marks the weight changed."""
    if tl.max(bad, axis=0) > 0:
        tl.store(verdict_ptr + w, 1.0)
    if CHECKSUM:
        tl.store(sums_ptr + w * m + ra, sums, mask=inside)
        expected = tl.load(tab + 2 * count + w)
        if expected != 0:
            before = tl.load(expected.to(tl.pointer_type(tl.int32)) + ra, mask=inside, other=0)
            if tl.max(((before != sums) & inside).to(tl.int32), axis=0) > 0:
                tl.store(verdict_ptr + verdict_stride + w, 1.0)


@triton.jit
def _row_tile(g_ptr, w_ptr, g_stride, w_stride, ra, rc, ia, ic, seg_len, cls, diag, probe_ptr, n,
              T: tl.constexpr, BK: tl.constexpr, W_BITS: tl.constexpr, CHECKSUM: tl.constexpr, WIDE: tl.constexpr,
              PREC: tl.constexpr):
    """(G[s_k] W[s_k]^T's tile over all columns; on the diagonal tile, per row whether G holds a non-finite entry,
    and W's row checksums)."""
    acc = tl.zeros((T, T), dtype=tl.float32)
    bad = tl.zeros((T,), dtype=tl.int32)
    sums = tl.zeros((T,), dtype=tl.int32)
    for k0 in range(0, n, BK):
        cols = k0 + tl.arange(0, BK)
        gt = tl.load(g_ptr + ra[:, None] * g_stride + cols[None, :],
                     mask=(ia < seg_len)[:, None] & (cols < n)[None, :], other=0.0)
        wt = tl.load(w_ptr + rc[:, None] * w_stride + cols[None, :],
                     mask=(ic < seg_len)[:, None] & (cols < n)[None, :], other=0.0)
        if cls >= 0:
            acc += dot(gt, tl.trans(wt), WIDE, PREC)
        if diag:
            g32 = gt.to(tl.float32)
            bad = tl.maximum(bad, tl.max(((g32 - g32) != 0).to(tl.int32), axis=1))
            if CHECKSUM:
                pr = tl.load(probe_ptr + cols, mask=cols < n, other=0)
                sums += tl.sum(bits(wt, W_BITS) * pr[None, :], axis=1)
    return acc, bad, sums


@triton.jit
def _col_tile(g_ptr, w_ptr, g_stride, w_stride, ca, cc, ia, ic, seg_len, m, T: tl.constexpr, BK: tl.constexpr,
              WIDE: tl.constexpr, PREC: tl.constexpr):
    """W[:, t_k]^T G[:, t_k]'s tile, over all rows."""
    acc = tl.zeros((T, T), dtype=tl.float32)
    for k0 in range(0, m, BK):
        rows = (k0 + tl.arange(0, BK)).to(tl.int64)
        wt = tl.load(w_ptr + rows[:, None] * w_stride + ca[None, :],
                     mask=(rows < m)[:, None] & (ia < seg_len)[None, :], other=0.0)
        gt = tl.load(g_ptr + rows[:, None] * g_stride + cc[None, :],
                     mask=(rows < m)[:, None] & (ic < seg_len)[None, :], other=0.0)
        acc += dot(tl.trans(wt), gt, WIDE, PREC)
    return acc


@triton.jit
def _tile_grads_kernel(tab, g_stride, w_stride, order_r, order_c, segs, n_row_segs, n_col_segs, off_r, off_c,
                       out_ptr, verdict_ptr, verdict_stride, sums_ptr, probe_ptr, m, n, count,
                       T: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, G_TY: tl.constexpr,
                       W_TY: tl.constexpr, W_BITS: tl.constexpr, CHECKSUM: tl.constexpr, WIDE: tl.constexpr,
                       PREC: tl.constexpr):
    pid = tl.program_id(0)
    tt = pid % (SUB * SUB)  # the output tile within the block
    s = (pid // (SUB * SUB)) % (n_row_segs + n_col_segs)  # the segment: rows first, then the column blocks
    w = (pid // (SUB * SUB) // (n_row_segs + n_col_segs)).to(tl.int64)  # the weight
    start, seg_len = tl.load(segs + s * 4), tl.load(segs + s * 4 + 1)
    cls, jdx = tl.load(segs + s * 4 + 2), tl.load(segs + s * 4 + 3).to(tl.int64)
    ta, tc = tt // SUB, tt % SUB
    if (ta * T < seg_len) & (tc * T < seg_len) & ((cls >= 0) | (tt == 0)):
        ia = ta * T + tl.arange(0, T)
        ic = tc * T + tl.arange(0, T)
        g_ptr = tl.load(tab + w).to(tl.pointer_type(G_TY))  # the table: G, W and expected-checksum pointers
        w_ptr = tl.load(tab + count + w).to(tl.pointer_type(W_TY))
        if s < n_row_segs:
            ra = tl.load(order_r + w * m + start + ia, mask=ia < seg_len, other=0).to(tl.int64)
            rc = tl.load(order_r + w * m + start + ic, mask=ic < seg_len, other=0).to(tl.int64)
            acc, bad, sums = _row_tile(g_ptr, w_ptr, g_stride, w_stride, ra, rc, ia, ic, seg_len, cls, ta == tc,
                                       probe_ptr, n, T, BK, W_BITS, CHECKSUM, WIDE, PREC)
            if ta == tc:
                _report(tab, w, count, ra, ia < seg_len, bad, sums, verdict_ptr, verdict_stride, sums_ptr, m,
                        CHECKSUM)
            off = tl.load(off_r + w * 2 + tl.maximum(cls, 0))
        else:
            ca = tl.load(order_c + w * n + start + ia, mask=ia < seg_len, other=0).to(tl.int64)
            cc = tl.load(order_c + w * n + start + ic, mask=ic < seg_len, other=0).to(tl.int64)
            acc = _col_tile(g_ptr, w_ptr, g_stride, w_stride, ca, cc, ia, ic, seg_len, m, T, BK, WIDE, PREC)
            off = tl.load(off_c + w * 2 + tl.maximum(cls, 0))
        if cls >= 0:
            dst = out_ptr + off + jdx * seg_len * seg_len
            tl.store(dst + ia[:, None] * seg_len + ic[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=(ia < seg_len)[:, None] & (ic < seg_len)[None, :])
