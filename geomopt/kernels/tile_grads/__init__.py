"""Triton kernel of ``geomopt.geometry.tiles.tile_grads`` (same signature): the block gradients of both sides of
every weight of one shape in one launch, with the finite flags and the row checksums, from the weights' own storage
(see ``kernel.py``)."""
from __future__ import annotations

import torch
import triton.language as tl

from ...geometry.tiles import TileLayout
from ..tiling import INTERPRETED, launch, pointers, precision
from .kernel import _tile_grads_kernel

__all__ = ["tile_grads"]

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
#: the kernel asks POET's step for the tile pipeline (``optim.poet_tiled``) wherever it runs
CAN = {"tile_grads": ("tiled",)}
REDUCE = 32  # columns (rows) of G and W a program reads per step of its reduction

TL_TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def check_weights(tensors: list[torch.Tensor], layout: TileLayout, what: str) -> torch.dtype:
    """One dtype, the layout's shape, contiguous rows (any row stride), one device; returns the dtype."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in TL_TYPES:
        raise ValueError(f"{what} must share one of {sorted(map(str, TL_TYPES))}, got {sorted(map(str, dtypes))}")
    for t in tensors:
        if tuple(t.shape) != tuple(layout.shape) or t.stride(1) != 1:
            raise ValueError(f"{what} must be {tuple(layout.shape)} with contiguous rows, got {tuple(t.shape)} "
                             f"with strides {t.stride()}")
    return next(iter(dtypes))


def wide(*dtypes: torch.dtype) -> bool:
    """Whether products convert their operands to fp32 first: mixed or fp32 inputs, and every input under Triton's
    interpreter (whose bf16 products are wrong); 16-bit inputs of one dtype go to the tensor cores as they are,
    accumulating in fp32 (a product of two 16-bit numbers is exact in fp32)."""
    return INTERPRETED or len(set(dtypes)) > 1 or torch.float32 in dtypes


def tile_grads(gs: list[torch.Tensor], ws: list[torch.Tensor], layout: TileLayout, out: torch.Tensor,
               verdict: torch.Tensor, probe: torch.Tensor | None = None,
               expected: list[torch.Tensor | None] | None = None) -> torch.Tensor | None:
    """Kernel of ``geomopt.geometry.tiles.tile_grads``."""
    g_dtype, w_dtype = check_weights(gs, layout, "gs"), check_weights(ws, layout, "ws")
    device = out.device
    count, (m, n) = len(ws), layout.shape
    if verdict.dtype != torch.float32 or verdict.shape != (2, count) or verdict.stride(1) != 1:
        raise ValueError(f"verdict must be a (2, {count}) fp32 tensor with contiguous rows, got {verdict.dtype} "
                         f"{tuple(verdict.shape)}")
    expected = [None] * count if expected is None or probe is None else expected
    sums = torch.empty(count, m, dtype=torch.int32, device=device) if probe is not None else None
    rows, cols = layout.rows, layout.cols
    t = layout.tile  # a block of b > t takes (b / t)^2 programs, each reducing over the weight
    sub = -(-max(rows.max_block, cols.max_block, 2) // t)
    tab = pointers([*gs, *ws, *expected], device)
    segs = layout.grad_segments
    grid = (count * segs.shape[0] * sub * sub,)
    launch("tile_grads", _tile_grads_kernel, grid,
           [*gs, *ws, *[e for e in expected if e is not None], tab, rows.order, cols.order, segs, rows.offset_table,
            cols.offset_table, *rows.regions(out), *cols.regions(out), verdict, sums, probe],
           tab, gs[0].stride(0), ws[0].stride(0), rows.order, cols.order, segs, rows.segments.shape[0], cols.blocks,
           rows.offset_table, cols.offset_table, out, verdict, verdict.stride(0), sums if sums is not None else verdict,
           probe if probe is not None else verdict, m, n, count, T=t, SUB=sub, BK=REDUCE, G_TY=TL_TYPES[g_dtype],
           W_TY=TL_TYPES[w_dtype], W_BITS=w_dtype.itemsize * 8, CHECKSUM=probe is not None,
           WIDE=wide(g_dtype, w_dtype), PREC=precision(device, g_dtype, w_dtype), num_warps=4 if t <= 32 else 8)
    return sums
