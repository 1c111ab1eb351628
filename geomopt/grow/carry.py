"""Carrying an optimizer across a growth: every grown parameter is a new Parameter object, swapped for
the old one in every parameter group and in the state (whose tensors are extended); new parameters
(added layers) join the group of their template. Hooks registered on an old Parameter do not follow.

- Any torch optimizer: every state tensor shaped like the old parameter (AdamW's moments, SGD's momentum
  buffer, ...) is padded with zeros at the new entries; scalars (``step``) stay.
- POET: merged before the growth (W0 <- W, Q <- 0, inner state reset; the weight does not change),
  then its skew factors are rebuilt for the new block layout, its permutations redrawn for the new
  dimensions from the parameter's saved generator, and W0 set to the grown weight. Counters stay.
- ReLoRAReset: A gains columns for new input dims (drawn like a fresh A), B gains zero rows for new
  output dims; the inner state of A and B is padded with zeros.
- DLRAMomentum: the rank stays. The bases gain rows (random where the transform leaves new entries
  arbitrary, zero where it needs them zero), are re-orthonormalized, and the triangular factors are
  absorbed into S, so the old entries of U S V^T are the old weight (times the transform's scale) and
  the new entries are on the rank-r manifold; the weight's new entries are set from the factors. The
  momentum is zero-padded and projected onto the new tangent space.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..geometry.lowrank import transport
from ..geometry.qr import tall_qr
from ..optim.dlra import DLRAMomentum
from ..optim.poet import POETOptimizer
from ..optim.relora import ReLoRAReset
from .resize import Growth, Resize, old_mask, scatter


def prepare(optimizer: Any) -> None:
    """Before the weights change: POET merges (its factors then hold nothing the weight lacks)."""
    if isinstance(optimizer, POETOptimizer):
        optimizer.merge()


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
        group = _group_of(optimizer, r.param)
        if isinstance(optimizer, POETOptimizer) and "perm_row" in st:
            _poet(optimizer, r, st, group)
        elif isinstance(optimizer, ReLoRAReset) and "draws" in st:
            _relora(optimizer, r, st)
        elif isinstance(optimizer, DLRAMomentum) and "U" in st:
            _dlra(r, st, growth)
        else:
            _pad_like(st, r)
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


def _pad_like(st: dict[str, Any], r: Resize) -> None:
    new_shape = tuple(r.param.shape)
    for key, v in list(st.items()):
        if isinstance(v, torch.Tensor) and tuple(v.shape) == r.old_shape and v.dim() > 0:
            st[key] = scatter(v, new_shape, r.maps)
        elif isinstance(v, dict):
            _pad_like(v, r)


def _pad_dim(t: torch.Tensor, dim: int, m: torch.Tensor | None, size: int, fresh: torch.Tensor | None = None):
    """Grow ``t`` along ``dim`` to ``size``: old slices at ``m``, the rest zero or taken from ``fresh``."""
    if m is None:
        return t
    maps = [None] * t.dim()
    maps[dim] = m
    shape = list(t.shape)
    shape[dim] = size
    out = scatter(t, tuple(shape), maps)
    if fresh is not None:
        keep = old_mask(tuple(shape), maps, t.device)
        out = torch.where(keep, out, fresh.to(out.dtype))
    return out


def _poet(opt: POETOptimizer, r: Resize, st: dict[str, Any], group: dict[str, Any]) -> None:
    opt._build_factors(r.param, st, group)  # merged already: counters and the generator state carry over


def _relora(opt: ReLoRAReset, r: Resize, st: dict[str, Any]) -> None:
    p = r.param
    m, n = p.shape
    if "A" in st:
        a, b = st["A"], st["B"]
        fresh = opt._draw_a(p, st, a.shape[0])  # new columns of A drawn like a fresh A, from its seed
        st["A"] = _pad_dim(a, 1, r.maps[1], n, fresh)
        st["B"] = _pad_dim(b, 0, r.maps[0], m)
        for key, dim, size in (("inner_A", 1, n), ("inner_B", 0, m)):
            for k, v in list(st[key].items()):
                if isinstance(v, torch.Tensor) and v.dim() == 2:
                    st[key][k] = _pad_dim(v, dim, r.maps[dim], size)
    if "inner_full" in st:
        _pad_like(st["inner_full"], r)


def _dlra(r: Resize, st: dict[str, Any], growth: Growth) -> None:
    p = r.param
    m, n = p.shape
    u, s, v = st["U"], st["S"], st["V"]
    rank = s.shape[0]
    bases = []
    for basis, dim, size in ((u, 0, m), (v, 1, n)):
        fresh = None
        if r.maps[dim] is not None and r.fills[dim] != "zero" and growth.init == "random":
            fresh = torch.randn(size, rank, generator=growth.gen, dtype=torch.float64).to(basis) / math.sqrt(size)
        padded = _pad_dim(basis, 0, r.maps[dim], size, fresh)
        q, tri = tall_qr(padded)
        bases.append((padded, q, tri))
    (u_pad, u_new, ru), (v_pad, v_new, rv) = bases
    s_new = ru @ (s * r.scale) @ rv.T
    with torch.no_grad():
        keep = old_mask(tuple(p.shape), r.maps, p.device)
        full = (u_pad @ (s * r.scale) @ v_pad.T).to(p.dtype)
        p.copy_(torch.where(keep, p, full))
    xs, xu, xv = st["exp_avg"]
    u0, v0 = _pad_dim(u, 0, r.maps[0], m), _pad_dim(v, 0, r.maps[1], n)
    moved = (xs, _pad_dim(xu, 0, r.maps[0], m), _pad_dim(xv, 0, r.maps[1], n))
    st["exp_avg"] = list(transport(u0, v0, u_new, v_new, moved))
    st["U"], st["S"], st["V"] = u_new, s_new, v_new
