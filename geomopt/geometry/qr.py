"""Thin QR of tall matrices with a unique sign convention, torch reference (the DLRA retraction's
orthonormalization; ``geomopt.geometry.dispatch`` may route CUDA tensors to the CholeskyQR2 kernel)."""
from __future__ import annotations

import torch

__all__ = ["tall_qr"]


def tall_qr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a tall matrix (m x c, m >= c) with the sign fixed so that diag(R) >= 0.

    For full column rank this is the unique thin QR, so any algorithm (Householder here, CholeskyQR2 in
    the kernel) returns the same factors up to rounding. bf16/fp16 input is factored in fp32 (LAPACK and
    cuSOLVER have no half-precision QR) and the factors are returned in the input dtype.
    """
    q, r = torch.linalg.qr(x if x.dtype.itemsize > 2 else x.float())
    sign = torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(r.dtype)
    return (q * sign.unsqueeze(-2)).to(x.dtype), (r * sign.unsqueeze(-1)).to(x.dtype)
