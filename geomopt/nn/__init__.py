"""Layers: ``LowRankLinear`` (a linear layer stored and computed as U S V^T) and ``convert``, which swaps a model's
``nn.Linear`` layers for it."""
from __future__ import annotations

from typing import Any

from torch import nn

from .lowrank import LowRankLinear, lowrank_role, lowrank_triples

__all__ = ["LowRankLinear", "convert", "lowrank_role", "lowrank_triples"]


def convert(model: nn.Module, rank: int, include: Any = None, exclude: Any = None) -> list[str]:
    """Swap ``model``'s ``nn.Linear`` layers for ``LowRankLinear`` of ``rank`` (their weights' truncated SVD), in
    place. By default the layers whose weights the optimizers route to their method (not the LM head, embeddings or
    a classifier; README, "What POET does here"); ``include`` / ``exclude`` choose modules by name as the optimizers'
    arguments do. Returns the names of the swapped modules. A layer whose sides are shorter than ``rank`` raises
    ValueError naming it (exclude it, or choose a smaller rank); nothing is swapped then."""
    from ..optim.routing import build_param_groups

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    reasons: dict[int, tuple[str, bool, str]] = {}
    build_param_groups(model, warn=False, include=include, exclude=exclude, reasons=reasons)
    chosen = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and reasons.get(id(module.weight), ("", False, ""))[1]:
            m, n = module.weight.shape
            if rank > min(m, n):
                raise ValueError(f"rank={rank} exceeds min(out_features, in_features)={min(m, n)} of {name!r} "
                                 f"({n} -> {m}); exclude it or choose rank <= {min(m, n)}")
            chosen.append(name)
    for name in chosen:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LowRankLinear.from_linear(getattr(owner, child), rank))
    return chosen
