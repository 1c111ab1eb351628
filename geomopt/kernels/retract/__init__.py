"""Triton kernels for DLRAMomentum's retraction: CholeskyQR2 of the tall augmented bases [U, xu], [V, xv].

``tall_qr(x)`` has the signature and the result of ``geomopt.geometry.qr.tall_qr`` (the thin QR with
diag(R) >= 0, unique for full column rank). CholeskyQR2 with column equilibration:

    G = X^T X;  D = diag(G)^(1/2);  L L^T = D^-1 G D^-1;  R1 = L^T D;  Y = X R1^-1     (pass 1)
    L2 L2^T = Y^T Y;  Q = Y L2^-T;  R = L2^T R1                                         (pass 2)

The Gram products are fused into the passes over X: one kernel reads X once and writes G; one kernel
reads X once, writes Y = X T and its Gram Y^T Y in the same pass; the last one writes Q = Y T. Partial
Grams are summed per row panel in a fixed order (no atomics: the result does not depend on scheduling,
so data-parallel ranks stay bit-identical). The small c x c Cholesky factors and triangular inverses run
in torch. The equilibration makes the method insensitive to the scale of xu against U (the columns of U
have norm 1, those of xu the size of a gradient). When a Cholesky factor fails (rank-deficient X, e.g.
a zero xu), or c > 128, the Householder reference runs instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...geometry.qr import tall_qr as _reference
from ..tiling import launch

__all__ = ["tall_qr"]

MAX_COLS = 128


@triton.jit
def _panel_kernel(x_ptr, t_ptr, y_ptr, part_ptr, m, c, rows_per_prog, BR: tl.constexpr, C: tl.constexpr,
                  APPLY: tl.constexpr, GRAM: tl.constexpr, PREC: tl.constexpr):
    # rows [pid * rows_per_prog, ...): Z = X T (APPLY) or Z = X; store Z (APPLY); part[pid] = Z^T Z (GRAM)
    pid = tl.program_id(0)
    cols = tl.arange(0, C)
    cmask = cols < c
    if APPLY:
        t = tl.load(t_ptr + cols[:, None] * c + cols[None, :], mask=cmask[:, None] & cmask[None, :], other=0.0)
    gram = tl.zeros((C, C), dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_prog
    for r0 in range(0, rows_per_prog, BR):
        rows = start + r0 + tl.arange(0, BR)
        mask = (rows[:, None] < m) & ((r0 + tl.arange(0, BR))[:, None] < rows_per_prog) & cmask[None, :]
        z = tl.load(x_ptr + rows[:, None] * c + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if APPLY:
            z = tl.dot(z, t, input_precision=PREC)
            tl.store(y_ptr + rows[:, None] * c + cols[None, :], z.to(y_ptr.dtype.element_ty), mask=mask)
        if GRAM:
            gram += tl.dot(tl.trans(z), z, input_precision=PREC)
    if GRAM:
        tl.store(part_ptr + pid * C * C + cols[:, None] * C + cols[None, :], gram)


def _prec(x: torch.Tensor) -> str:
    return "ieee" if x.dtype in (torch.float32, torch.float64) else "tf32"


def _pass(x: torch.Tensor, t: torch.Tensor | None, gram: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(X T or None, (X T)^T (X T) or None) in one read of X; T in fp32."""
    m, c = x.shape
    cpad = max(16, triton.next_power_of_2(c))
    br = 32 if cpad > 64 else 64
    progs = max(1, min(triton.cdiv(m, br), 4 * _sm_count(x.device)))
    rows_per_prog = triton.cdiv(triton.cdiv(m, progs), br) * br
    progs = triton.cdiv(m, rows_per_prog)
    y = torch.empty_like(x) if t is not None else x
    part = torch.empty(progs, cpad, cpad, dtype=torch.float32, device=x.device) if gram else x
    launch("tall_qr", _panel_kernel, (progs,), [x, t, y if t is not None else None, part if gram else None],
           x, t if t is not None else x, y, part, m, c, rows_per_prog, BR=br, C=cpad, APPLY=t is not None, GRAM=gram,
           PREC=_prec(x))
    return (y if t is not None else None), (part.sum(0)[:c, :c] if gram else None)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _chol(g: torch.Tensor) -> torch.Tensor | None:
    """Upper factor R with R^T R = G (equilibrated), or None when G is not numerically positive definite."""
    d = g.diagonal().sqrt()
    if not bool(torch.isfinite(d).all() and (d > 0).all()):
        return None
    lower, info = torch.linalg.cholesky_ex(g / (d[:, None] * d[None, :]))
    if int(info) != 0 or not bool(torch.isfinite(lower).all()):
        return None
    return lower.mT * d[None, :]


def _inv_upper(r: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
    return torch.linalg.solve_triangular(r, eye, upper=True).contiguous()


def tall_qr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel of ``geomopt.geometry.qr.tall_qr``: CholeskyQR2 with fused Gram products."""
    if x.dim() != 2 or x.shape[1] > MAX_COLS or x.shape[0] < x.shape[1] or x.shape[1] == 0:
        return _reference(x)
    x = x.contiguous()
    _, g1 = _pass(x, None, gram=True)
    r1 = _chol(g1)
    if r1 is None:
        return _reference(x)
    y, g2 = _pass(x, _inv_upper(r1), gram=True)
    r2 = _chol(g2)
    if r2 is None:
        return _reference(x)
    q, _ = _pass(y, _inv_upper(r2), gram=False)
    return q, (r2 @ r1).to(x.dtype)
