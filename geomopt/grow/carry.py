"""Carrying an optimizer across a growth: every grown parameter is a new Parameter object, swapped for
the old one in every parameter group and in the state (whose tensors are extended); new parameters
(added layers) join the group of their template. Hooks registered on an old Parameter do not follow.

How a state follows its resized parameter is the optimizer's own knowledge: geomopt's optimizers implement
``prepare_resize()`` (before the weights change; POET merges) and ``resize_state(p, state, group, resize,
growth)`` (POET rebuilds its factors on the grown weight, ReLoRA grows A and B, DLRA grows and
re-orthonormalizes its bases: see each class). For any other torch optimizer every state tensor shaped like
the old parameter (AdamW's moments, SGD's momentum buffer, ...) is padded with zeros at the new entries;
scalars (``step``) stay.
"""
from __future__ import annotations

from typing import Any

import torch

from .resize import Growth, pad_like


def prepare(optimizer: Any) -> None:
    """Before the weights change (POET merges: its factors then hold nothing the weight lacks)."""
    getattr(optimizer, "prepare_resize", lambda: None)()


def _group_of(optimizer: Any, p: torch.Tensor) -> dict[str, Any] | None:
    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            return group
    return None


def carry(optimizer: Any, growth: Growth, model: torch.nn.Module) -> None:
    """After the weights changed: extend the state of every resized parameter, add the new ones, and list
    each group's parameters in the model's order (what a fresh optimizer built from the grown model has,
    so that a checkpoint of the grown run loads into it by position)."""
    for r in growth.resized:
        for group in optimizer.param_groups:
            group["params"] = [r.param if q is r.old else q for q in group["params"]]
        st = optimizer.state.pop(r.old, None)
        if not st:
            continue
        optimizer.state[r.param] = st
        follow = getattr(optimizer, "resize_state", None)
        if follow is not None:
            follow(r.param, st, _group_of(optimizer, r.param), r, growth)
        else:
            pad_like(st, r)
    for new, template in growth.added:
        group = _group_of(optimizer, template)
        if group is not None:
            group["params"].append(new)
    order = {id(p): i for i, p in enumerate(model.parameters())}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        if all(id(p) in order for p in group["params"]):
            group["params"].sort(key=lambda p: order[id(p)])
            if "param_names" in group:  # torch's param_names: the grown model's names (added layers shift them)
                group["param_names"] = [names[id(p)] for p in group["params"]]
