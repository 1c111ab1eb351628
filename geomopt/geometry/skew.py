"""Skew-symmetric matrices stored packed: the b(b-1)/2 entries above the diagonal."""
from __future__ import annotations

import torch

from ..tensor_cache import tensor_cache

__all__ = ["skew_size", "unpack_skew", "pack_skew", "skew_norm_bound", "bound_from_powers"]


def skew_size(b: int) -> int:
    """Number of free entries of a b x b skew-symmetric matrix."""
    return b * (b - 1) // 2


@tensor_cache
def _triu(b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(b, b, offset=1, device=device)
    return rows, cols


@tensor_cache
def _triu_flat_pair(b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in a flattened b x b matrix (row-major) of the entries above the diagonal, and of their mirrors."""
    rows, cols = _triu(b, device)
    return rows * b + cols, cols * b + rows


def _triu_flat(b: int, device: torch.device) -> torch.Tensor:
    """Positions of the entries above the diagonal in a flattened b x b matrix (row-major)."""
    return _triu_flat_pair(b, device)[0]


def unpack_skew(q: torch.Tensor, b: int) -> torch.Tensor:
    """(..., b(b-1)/2) packed entries -> (..., b, b) skew matrix Q with Q[i, j] = q, Q[j, i] = -q (i < j).

    Differentiable in ``q``.
    """
    if q.shape[-1] != skew_size(b):
        raise ValueError(f"q has {q.shape[-1]} packed entries, a {b} x {b} skew matrix has {skew_size(b)}")
    upper = q.new_zeros(*q.shape[:-1], b * b).index_copy(-1, _triu_flat(b, q.device), q).view(*q.shape[:-1], b, b)
    return upper - upper.transpose(-2, -1)


def pack_skew(a: torch.Tensor) -> torch.Tensor:
    """(..., b, b) -> (..., b(b-1)/2): the entries above the diagonal (the inverse of unpack_skew on skew input)."""
    b = a.shape[-1]
    return a.reshape(*a.shape[:-2], b * b).index_select(-1, _triu_flat(b, a.device))


def skew_norm_bound(q: torch.Tensor, b: int) -> torch.Tensor:
    """Upper bound on the spectral norm of each packed skew block, shape ``q.shape[:-1]``.

    min(||Q||_F, ||Q||_inf, ||Q^4||_F^(1/4)): all three bound ||Q||_2 from above (for a skew matrix
    ||Q||_1 = ||Q||_inf, and ||Q||_2^4 = ||Q^4||_2 <= ||Q^4||_F). The first two are loose by about
    sqrt(b) for unstructured Q; the third is within a factor (b/2)^(1/8) of ||Q||_2 and costs two
    b x b products per block, less than the Cayley-Neumann map itself.
    """
    if b < 2:
        return q.new_zeros(q.shape[:-1])
    q = q.detach()
    Q = unpack_skew(q, b)
    q2 = Q @ Q
    return bound_from_powers(q, Q, q2 @ q2)


def bound_from_powers(q: torch.Tensor, Q: torch.Tensor, q4: torch.Tensor) -> torch.Tensor:
    """``skew_norm_bound`` from the packed ``q``, its unpacked ``Q`` and ``Q^4`` (when a caller has them)."""
    frob = q.square().sum(-1).mul(2.0).sqrt()
    inf = Q.abs().sum(-1).amax(-1)
    power = torch.linalg.matrix_norm(q4).pow(0.25)
    return torch.minimum(torch.minimum(frob, inf), power)
