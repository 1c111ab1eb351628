"""Triton kernel of ``geomopt.geometry.tiles.tile_rewrite`` (same signature): the rewrite of every weight of one
shape in one launch, both sides' products per tile, in place (see ``kernel.py``). The launch is prepared (tables and
outputs allocated) when it is called and runs when the returned function is, which allocates nothing: the optimizer
calls it inside the section that commits the weights with their state."""
from __future__ import annotations

from typing import Callable

import torch

from ...geometry.rounding import BINADE_MAX, CODE_DTYPE, CODE_MAX, unit_bounds
from ...geometry.tiles import TileLayout, check_keeps
from ..tile_grads import TL_TYPES, check_weights
from ..tiling import INTERPRETED, launch, pow2, precision, table, warps
from .kernel import _tile_rewrite_kernel

__all__ = ["tile_rewrite"]

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
#: the largest block whose tiles (the weight's, D's and E's) a program holds on chip
LIMITS = {"block": 64}


def check_codes(comps: list[torch.Tensor], xs: list[torch.Tensor]) -> None:
    """The rounding buffers: int8 codes laid out as their weights are (the kernel indexes both alike)."""
    for c, x in zip(comps, xs, strict=True):
        if c.dtype != CODE_DTYPE or c.shape != x.shape or c.stride() != x.stride():
            raise ValueError(f"comps must be {CODE_DTYPE} codes shaped and strided as their weights "
                             f"({tuple(x.shape)}, strides {x.stride()}), got {c.dtype} {tuple(c.shape)} with strides "
                             f"{c.stride()}")


def tile_rewrite(xs: list[torch.Tensor], srcs: list[torch.Tensor], comps: list[torch.Tensor] | None,
                 keeps: list[torch.Tensor | None], layout: TileLayout, mats: torch.Tensor, take: list[bool],
                 probe: torch.Tensor | None = None) -> tuple[Callable[[], None], torch.Tensor | None]:
    """Kernel of ``geomopt.geometry.tiles.tile_rewrite``."""
    x_dtype, src_dtype = check_weights(xs, layout, "xs"), check_weights(srcs, layout, "srcs")
    if comps is not None:
        check_codes(comps, xs)
    check_keeps(xs, srcs, keeps)
    if any(k is not None and (k.dtype != torch.float32 or not k.is_contiguous()) for k in keeps):
        raise ValueError("keeps must be contiguous fp32 tensors (or None)")
    if max(layout.rows.max_block, layout.cols.max_block) > LIMITS["block"] and not INTERPRETED:
        raise ValueError(f"blocks of more than {LIMITS['block']} indices do not fit on chip (POET's step keeps them on "
                         "the references)")
    if mats.dtype != torch.float32:
        raise ValueError(f"mats must be fp32 (the kernels' factor dtype), got {mats.dtype}")
    device = mats.device
    count, (m, n) = len(xs), layout.shape
    rows, cols = layout.rows, layout.cols
    sums = torch.zeros(count, m, dtype=torch.int32, device=device) if probe is not None else None
    ptrs = [t.data_ptr() if t is not None else 0 for t in [*xs, *srcs, *(comps or [None] * count), *keeps]]
    tab = table(ptrs + [int(t) for t in take], torch.int64, device)
    bt = max(layout.tile, pow2(max(rows.max_block, cols.max_block, 2)))
    lean = all(s is x for s, x in zip(srcs, xs))
    grid = (count * rows.segments.shape[0] * cols.segments.shape[0],)
    touched = [*xs, *srcs, *(comps or []), *keeps, tab, rows.order, cols.order, rows.segments, cols.segments,
               rows.offset_table, cols.offset_table, *rows.regions(mats), *cols.regions(mats), sums, probe]
    args = (tab, xs[0].stride(0), srcs[0].stride(0), rows.order, cols.order, rows.segments, cols.segments,
            rows.segments.shape[0], cols.segments.shape[0], rows.offset_table, cols.offset_table, mats,
            sums if sums is not None else tab, probe if probe is not None else tab, m, n, count)
    meta = dict(BT=bt, X_TY=TL_TYPES[x_dtype], SRC_TY=TL_TYPES[src_dtype], X_BITS=x_dtype.itemsize * 8,
                COMP=comps is not None, KEEP=any(k is not None for k in keeps), CHECKSUM=probe is not None,
                LEAN=lean, PREC=precision(device, torch.float32), num_warps=warps(bt))
    meta.update(zip(("UNIT_MIN", "UNIT_SCALE"), unit_bounds(x_dtype)), UNIT_MAX=BINADE_MAX, CODE_MAX=float(CODE_MAX))

    def write() -> None:
        launch("tile_rewrite", _tile_rewrite_kernel, grid, touched, *args, **meta)

    return write, sums
