"""Cayley and Cayley-Neumann maps from packed skew generators to (near-)orthogonal blocks.

These are the torch reference implementations; ``geomopt.geometry.dispatch`` may route CUDA tensors
to fused kernels with the same signature.
"""
from __future__ import annotations

import torch

from .skew import unpack_skew

__all__ = ["cayley_exact", "cayley_neumann", "cayley"]


def _eye(b: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(b, dtype=like.dtype, device=like.device)


def cayley_neumann(q: torch.Tensor, b: int, terms: int) -> torch.Tensor:
    r"""Cayley-Neumann parameterization (POET, arXiv 2506.08001, Sec. 3.3).

    .. math:: R(Q) = (I + Q)\,(I + Q + Q^2 + \dots + Q^k),\qquad k = \text{terms}

    ``q``: (n_blocks, b(b-1)/2) packed skew generators. Returns (n_blocks, b, b). It differs from the
    exact Cayley map by O(||Q||^(k+1)); ``R^T R = (I - Q^{k+1})(I - (-Q)^{k+1})``, so its orthogonality
    error is O(||Q||^(k+1)) for odd k and O(||Q||^(2k+2)) for even k. Differentiable in ``q``.
    """
    if terms < 1:
        raise ValueError(f"terms must be >= 1, got {terms}")
    Q = unpack_skew(q, b)
    eye = _eye(b, q)
    s = eye + Q  # Horner: S = I + Q (I + Q (I + ...)), k - 1 products
    for _ in range(terms - 1):
        s = eye + Q @ s
    return s + Q @ s


def cayley_exact(q: torch.Tensor, b: int) -> torch.Tensor:
    r"""Exact Cayley map :math:`R = (I - Q)^{-1}(I + Q)`, orthogonal for every skew Q (batched solve)."""
    Q = unpack_skew(q, b)
    eye = _eye(b, q)
    return torch.linalg.solve(eye - Q, eye + Q)


def cayley(q: torch.Tensor, b: int, terms: int | None) -> torch.Tensor:
    """Exact Cayley when ``terms`` is None, else Cayley-Neumann with ``terms`` terms."""
    return cayley_exact(q, b) if terms is None else cayley_neumann(q, b, terms)
