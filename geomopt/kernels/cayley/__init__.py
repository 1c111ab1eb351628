"""Triton kernels of the Cayley-Neumann map and its backward over a batch of packed skew blocks
(``geometry.cayley.cayley_neumann`` and ``cayley_series``: the same signatures and polynomials).

One program holds one block whole in registers: the forward is deg(p) products, the backward 3 a degree, each on
the full tile, with no scratch memory, no atomics and one launch for every block of the step (the reference path
batches them per block size). The packed gradient is written by a masked scatter of the upper triangle of
dQ - dQ^T. Tiles fit on chip up to b = 64 (``LIMITS``): larger blocks run the eager references on a GPU (under
Triton's interpreter the kernels take any b, for the tests).
"""
from __future__ import annotations

import torch

from ...geometry import cayley as reference
from ..tiling import INTERPRETED, launch, pow2, precision, warps
from .kernel import _backward_kernel, _forward_kernel

__all__ = ["cayley_neumann", "cayley_series"]

#: what a test compares with the reference: relative RMS error per dtype
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
#: the largest block whose tiles the kernels hold on chip
LIMITS = {"block": 64}


def _flat(q: torch.Tensor, b: int, terms: int, series: bool) -> torch.Tensor:
    if terms < (2 if series else 1):
        raise ValueError(f"terms must be >= {2 if series else 1}{' for the series form' if series else ''}, "
                         f"got {terms}")
    nq = b * (b - 1) // 2
    if q.shape[-1] != nq:
        raise ValueError(f"q has {q.shape[-1]} packed entries, a {b} x {b} skew matrix has {nq}")
    return q.detach().reshape(-1, nq).contiguous()


def _degree(terms: int, series: bool) -> int:
    return terms - 1 if series else terms + 1


def _forward(q: torch.Tensor, b: int, terms: int, series: bool) -> torch.Tensor:
    flat = _flat(q, b, terms, series)
    out = torch.empty(flat.shape[0], b, b, dtype=q.dtype, device=q.device)
    if b < 2:
        out.copy_(torch.eye(b, dtype=q.dtype, device=q.device).expand_as(out))
    else:
        B = pow2(b)
        launch("cayley_neumann", _forward_kernel, (flat.shape[0],), [flat, out], flat, out, b, flat.shape[1], B=B,
               DEG=_degree(terms, series), SERIES=series, PREC=precision(q.device, q.dtype), num_warps=warps(B))
    return out.reshape(*q.shape[:-1], b, b)


def _backward(q: torch.Tensor, grad: torch.Tensor, b: int, terms: int, series: bool) -> torch.Tensor:
    flat = _flat(q, b, terms, series)
    dq = torch.zeros_like(flat)
    if b >= 2 and flat.shape[0]:
        B = pow2(b)
        g = grad.reshape(-1, b, b).contiguous()
        launch("cayley_neumann_backward", _backward_kernel, (flat.shape[0],), [flat, g, dq], flat, g, dq, b,
               flat.shape[1], B=B, DEG=_degree(terms, series), SERIES=series,
               PREC=precision(q.device, q.dtype, g.dtype), num_warps=warps(B))
    return dq.reshape(q.shape)


class _Map(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, b: int, terms: int, series: bool) -> torch.Tensor:
        ctx.save_for_backward(q)
        ctx.b, ctx.terms, ctx.series = b, terms, series
        return _forward(q, b, terms, series)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (q,) = ctx.saved_tensors
        return _backward(q, grad, ctx.b, ctx.terms, ctx.series), None, None, None


def _on_chip(b: int) -> bool:
    return b <= LIMITS["block"] or INTERPRETED


def cayley_neumann(q: torch.Tensor, b: int, terms: int) -> torch.Tensor:
    """Kernel of ``geomopt.geometry.cayley.cayley_neumann`` (differentiable in ``q``)."""
    _flat(q, b, terms, False)  # argument errors before autograd sees them
    return _Map.apply(q, b, terms, False) if _on_chip(b) else reference.cayley_neumann(q, b, terms)


def cayley_series(q: torch.Tensor, b: int, terms: int) -> torch.Tensor:
    """Kernel of ``geomopt.geometry.cayley.cayley_series`` (differentiable in ``q``)."""
    _flat(q, b, terms, True)
    return _Map.apply(q, b, terms, True) if _on_chip(b) else reference.cayley_series(q, b, terms)
