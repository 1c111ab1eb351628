"""Triton kernels for POET's block rotations and block gradients on permuted index blocks.

Each launcher has exactly the signature of its torch reference in ``geomopt.geometry.blocks`` and
fuses the gather, the batched product and the scatter, so no permuted copy of the weight or of the
gradient is materialized. Tiles are at least 16 wide (``tl.dot``); ragged blocks (b = 5, 37, ...) are
masked inside the kernel. Accumulation is fp32 for every input dtype; fp32 products use IEEE
precision (no TF32) so that results match the reference to 1e-5.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rotate_rows", "rotate_cols", "row_block_grad", "col_block_grad"]


@triton.jit
def _rotate_kernel(x_ptr, y_ptr, idx_ptr, d_ptr, length, b, sx_major, sx_minor, sy_major, sy_minor, sd_i, sd_c,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    # y[idx[k, i] * sy_major + t * sy_minor] = sum_c d[k, i, c] * x[idx[k, c] * sx_major + t * sx_minor]
    # rows: (major, minor) = (row stride, 1) and d as stored; columns: (1, row stride) and d read
    # transposed (sd_i, sd_c) = (1, b), since (X E)^T = E^T X^T
    tiles = tl.cdiv(b, BM)
    k = tl.program_id(0) // tiles
    oi = (tl.program_id(0) % tiles) * BM + tl.arange(0, BM)
    ot = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kk in range(0, b, BK):
        oc = kk + tl.arange(0, BK)
        d = tl.load(d_ptr + k * b * b + oi[:, None] * sd_i + oc[None, :] * sd_c,
                    mask=(oi < b)[:, None] & (oc < b)[None, :], other=0.0).to(tl.float32)
        src = tl.load(idx_ptr + k * b + oc, mask=oc < b, other=0)
        xg = tl.load(x_ptr + src[:, None] * sx_major + ot[None, :] * sx_minor,
                     mask=(oc < b)[:, None] & (ot < length)[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(d, xg, input_precision=PREC)
    dst = tl.load(idx_ptr + k * b + oi, mask=oi < b, other=0)
    tl.store(y_ptr + dst[:, None] * sy_major + ot[None, :] * sy_minor, acc.to(y_ptr.dtype.element_ty),
             mask=(oi < b)[:, None] & (ot < length)[None, :])


@triton.jit
def _block_grad_kernel(a_ptr, c_ptr, idx_ptr, o_ptr, length, b, s_major, s_minor,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    # o[k, i, j] = sum_t a[idx[k, i] * s_major + t * s_minor] * c[idx[k, j] * s_major + t * s_minor]
    # rows (s_major = row stride, s_minor = 1): G[s_k] M[s_k]^T; columns (s_major = 1, s_minor = row
    # stride): N[:, t_k]^T G[:, t_k]
    tiles = tl.cdiv(b, BM)
    k = tl.program_id(0)
    om = (tl.program_id(1) // tiles) * BM + tl.arange(0, BM)
    on = (tl.program_id(1) % tiles) * BN + tl.arange(0, BN)
    im = tl.load(idx_ptr + k * b + om, mask=om < b, other=0)
    jn = tl.load(idx_ptr + k * b + on, mask=on < b, other=0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t0 in range(0, length, BK):
        ot = t0 + tl.arange(0, BK)
        av = tl.load(a_ptr + im[:, None] * s_major + ot[None, :] * s_minor,
                     mask=(om < b)[:, None] & (ot < length)[None, :], other=0.0).to(tl.float32)
        cv = tl.load(c_ptr + jn[None, :] * s_major + ot[:, None] * s_minor,
                     mask=(ot < length)[:, None] & (on < b)[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(av, cv, input_precision=PREC)
    tl.store(o_ptr + k * b * b + om[:, None] * b + on[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=(om < b)[:, None] & (on < b)[None, :])


def _tile(b: int) -> int:
    return 16 if b <= 16 else 32 if b <= 32 else 64


def _prec(*ts: torch.Tensor) -> str:
    return "ieee" if all(t.dtype in (torch.float32, torch.float64) for t in ts) else "tf32"


def _check(x: torch.Tensor, idx: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.dim() != 2 or idx.dim() != 2 or blocks.dim() != 3:
        raise ValueError(f"expected a 2-D matrix, (n_blocks, b) indices and (n_blocks, b, b) blocks, got "
                         f"{tuple(x.shape)}, {tuple(idx.shape)}, {tuple(blocks.shape)}")
    if not (x.device == idx.device == blocks.device):
        raise ValueError(f"tensors on different devices: {x.device}, {idx.device}, {blocks.device}")
    return x.contiguous(), idx.contiguous(), blocks.contiguous()


def rotate_rows(x: torch.Tensor, idx: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Kernel of ``geomopt.geometry.blocks.rotate_rows``."""
    return _rotate(x, idx, d, rows=True)


def rotate_cols(x: torch.Tensor, idx: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Kernel of ``geomopt.geometry.blocks.rotate_cols``."""
    return _rotate(x, idx, e, rows=False)


def _rotate(x: torch.Tensor, idx: torch.Tensor, d: torch.Tensor, rows: bool) -> torch.Tensor:
    x, idx, d = _check(x, idx, d)
    d = d.to(x.dtype)
    y = x.clone()
    nblk, b = idx.shape
    length = x.shape[1] if rows else x.shape[0]
    if nblk == 0 or length == 0:
        return y
    t = _tile(b)
    s = x.stride(0)  # x and y are contiguous and of one shape
    strides = (s, 1, s, 1, b, 1) if rows else (1, s, 1, s, 1, b)
    grid = (nblk * triton.cdiv(b, t), triton.cdiv(length, 64))
    _rotate_kernel[grid](x, y, idx, d, length, b, *strides, BM=t, BN=64, BK=t, PREC=_prec(x, d))
    return y


def row_block_grad(g: torch.Tensor, m: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Kernel of ``geomopt.geometry.blocks.row_block_grad``: blocks G[s_k] M[s_k]^T."""
    return _block_grad(g, m, idx, rows=True)


def col_block_grad(n: torch.Tensor, g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Kernel of ``geomopt.geometry.blocks.col_block_grad``: blocks N[:, t_k]^T G[:, t_k]."""
    return _block_grad(n, g, idx, rows=False)


def _block_grad(a: torch.Tensor, c: torch.Tensor, idx: torch.Tensor, rows: bool) -> torch.Tensor:
    if a.shape != c.shape:
        raise ValueError(f"the two matrices must have one shape, got {tuple(a.shape)} and {tuple(c.shape)}")
    a, idx, _ = _check(a, idx, torch.empty(0, 0, 0, device=a.device))
    c = c.contiguous().to(a.dtype)
    nblk, b = idx.shape
    out = torch.zeros(nblk, b, b, dtype=torch.promote_types(a.dtype, c.dtype), device=a.device)
    length = a.shape[1] if rows else a.shape[0]
    if nblk == 0 or length == 0:
        return out
    t = _tile(b)
    s_major, s_minor = (a.stride(0), 1) if rows else (1, a.stride(0))
    grid = (nblk, triton.cdiv(b, t) ** 2)
    _block_grad_kernel[grid](a, c, idx, out, length, b, s_major, s_minor, BM=t, BN=t, BK=32, PREC=_prec(a, c))
    return out
