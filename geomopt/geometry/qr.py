"""Thin QR of tall matrices with a unique sign convention, torch reference (the DLRA retraction's
orthonormalization; ``geomopt.geometry.dispatch`` may route CUDA tensors to the CholeskyQR2 kernel)."""
from __future__ import annotations

import torch

__all__ = ["tall_qr", "qr_input", "positive_diagonal"]


def tall_qr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a tall matrix (m x c, m >= c) with the sign fixed so that diag(R) >= 0.

    For full column rank this is the unique thin QR, so any algorithm (Householder here, CholeskyQR2 in
    the kernel) returns the same factors up to rounding. bf16/fp16 input is factored in fp32 (LAPACK and
    cuSOLVER have no half-precision QR) and the factors are returned in the input dtype.
    """
    q, r = torch.linalg.qr(qr_input(x))
    return positive_diagonal(q, r, x.dtype)


def qr_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as QR takes it: bf16 / fp16 in fp32 (LAPACK and cuSOLVER have no half-precision QR)."""
    return x if x.dtype.itemsize > 2 else x.float()


def positive_diagonal(q: torch.Tensor, r: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A QR pair (batched or not) with the signs of diag(R) moved into Q's columns, so that diag(R) >= 0 (the unique
    thin QR for full column rank), in ``dtype``."""
    sign = torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(r.dtype)
    return (q * sign.unsqueeze(-2)).to(dtype), (r * sign.unsqueeze(-1)).to(dtype)
