"""Initializations used by the papers."""
from __future__ import annotations

import torch
from torch import nn

from .optim.routing import build_param_groups, linear_weights

__all__ = ["normalized_gaussian_"]


@torch.no_grad()
def normalized_gaussian_(model: nn.Module | torch.Tensor, generator: torch.Generator | None = None):
    """POET's initialization (arXiv 2506.08001, Sec. 4): Gaussian weights with unit-norm rows (neurons).

    Applied to every weight that POET would factorize (``nn.Linear`` weights other than the LM head
    and embeddings; GPT-2's ``Conv1D`` weights, stored transposed, get unit-norm columns), or to a single 2-D
    tensor. POET keeps the singular values of W0 for the whole run,
    so this choice fixes the spectrum. Returns its argument.
    """
    transposed: set[int] = set()
    if isinstance(model, torch.Tensor):
        weights = [model]
    elif isinstance(model, nn.Module):
        weights = [p for g in build_param_groups(model) if g["factorize"] for p in g["params"]]
        transposed = {k for k, kind in linear_weights(model).items() if kind == "Conv1D"}
    else:
        raise TypeError(f"model must be an nn.Module or a 2-D Tensor, got {type(model).__name__}")
    for w in weights:
        if w.dim() != 2:
            raise ValueError(f"normalized_gaussian_ needs 2-D weights, got shape {tuple(w.shape)}")
        z = torch.randn(w.shape, generator=generator, dtype=torch.float32, device="cpu")
        z /= z.norm(dim=0 if id(w) in transposed else 1, keepdim=True).clamp_min(1e-12)
        w.copy_(z)
    return model
