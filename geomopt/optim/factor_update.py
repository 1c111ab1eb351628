r"""POET's b x b work of a step as one stage (``factor_update``), the torch reference of the fused kernel
``geomopt.kernels.factor_update``: per block, from its gradient G_k (``tile_grads``) and its generator q,

1. the old rotation D = p(Q) (the map of ``RotationMap``) and its inverse X (``iterations`` Newton-Schulz steps from
   D^T, with a per-block flag: converged);
2. the gradient at the rotation, G_k X^T (row blocks) or X^T G_k (column blocks): M = R^-1 W, N = W P^-1 hold in
   both modes, so the block gradients are taken from W itself (``POETOptimizer``'s docstring);
3. through the map's backward, the packed generator's gradient;
4. torch's Adam / AdamW update of the generator (``functional``: per entry its own lr and step count);
5. the new rotation p(Q'), the safeguard's bound on ||Q'||_2 (``geometry.skew_norm_bound``), and what the rewrite
   applies: p(Q') (paper mode) or lean mode's incremental rotation, I + (p(Q') - D) X (rows), I + X (p(Q') - D)
   (columns).

The blocks of one size of a step (both sides) are one call: ``blocks`` (N, b, b) holds their gradients and receives
what the rewrite applies, in place; ``Entries`` lists the generator tensors they come from, in order.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..geometry.cayley import newton_schulz_inverse
from ..geometry.dispatch import REFERENCES, register_reference
from ..geometry.skew import skew_norm_bound
from .functional import prepared_adam
from .poet_settings import RotationMap

__all__ = ["Entries", "AdamHyper", "Updated", "factor_update", "entry_counts"]


class Entries(NamedTuple):
    """The generator tensors whose blocks fill a ``factor_update`` call, in order: per entry its packed generators
    (n_blocks, b(b-1)/2), its Adam state (``step``, ``exp_avg``, ``exp_avg_sq``), its lr, whether it is a row side,
    and its owner (the column of ``verdict`` its weight reports to)."""
    qs: list[torch.Tensor]
    states: list[dict[str, Any]]
    lrs: list[float]
    rows: list[bool]
    owners: list[int]


class AdamHyper(NamedTuple):
    """The inner Adam's settings (``inner.AdamRule``): AdamW with ``decoupled``, else Adam's L2 decay."""
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool


class Updated(NamedTuple):
    """What ``factor_update`` gives besides the rewritten ``blocks`` and ``verdict``: the new generators and moments
    (N, b(b-1)/2), and the entries' new step counts (E,) fp32."""
    q: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    steps: torch.Tensor


def entry_counts(entries: Entries) -> list[int]:
    return [q.shape[0] for q in entries.qs]


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts)


def factor_update(blocks: torch.Tensor, entries: Entries, rmap: RotationMap, lean: bool, iterations: int,
                  adam: AdamHyper, verdict: torch.Tensor) -> Updated:
    """See the module docstring; ``blocks`` (N, b, b) is read (the block gradients) and overwritten (the rotations
    the rewrite applies); ``verdict`` (2, W) fp32, the caller's (zeros before its first call), gathers per owner the
    largest bound of its blocks (row 0) and 1 where an inverse did not converge (row 1). Nothing else is changed:
    the new generators and moments are new tensors."""
    b = blocks.shape[-1]
    counts = entry_counts(entries)
    row = torch.tensor([r for r, c in zip(entries.rows, counts) for _ in range(c)], dtype=torch.bool,
                       device=blocks.device).view(-1, 1, 1)
    leaf = _cat(entries.qs).detach().requires_grad_()
    mapping = REFERENCES[rmap.name]
    with torch.enable_grad():
        old = mapping(leaf, b, rmap.terms)
    inv, converged = newton_schulz_inverse(old.detach(), iterations, per_block=True)
    at_map = torch.where(row, blocks @ inv.mT, inv.mT @ blocks)
    (grad,) = torch.autograd.grad(old, leaf, at_map)
    old = old.detach()
    q = leaf.detach().clone()
    m = _cat([s["exp_avg"] for s in entries.states]).clone()
    v = _cat([s["exp_avg_sq"] for s in entries.states]).clone()
    steps, start = [], 0
    for count, st, lr in zip(counts, entries.states, entries.lrs):
        part = slice(start, start + count)
        new = dict(step=st["step"].detach().clone(), exp_avg=m[part], exp_avg_sq=v[part])
        prepared_adam([q[part]], [grad[part]], [new], impl="single", lr=lr, beta1=adam.beta1, beta2=adam.beta2,
                      eps=adam.eps, weight_decay=adam.weight_decay, decoupled=adam.decoupled, amsgrad=False,
                      maximize=False)()
        steps.append(new["step"].to(blocks.device, torch.float32))
        start += count
    rot = mapping(q, b, rmap.terms)
    if lean:  # D_new D_old^-1 = I + (D_new - D_old) D_old^-1 (rows), E_old^-1 E_new on columns
        eye = torch.eye(b, dtype=rot.dtype, device=rot.device)
        step = rot - old
        rot = eye + torch.where(row, step @ inv, inv @ step)
    blocks.copy_(rot)
    owner = torch.tensor([o for o, c in zip(entries.owners, counts) for _ in range(c)], dtype=torch.long,
                         device=verdict.device)
    verdict[0].scatter_reduce_(0, owner, skew_norm_bound(q, b).to(verdict), "amax")
    verdict[1].scatter_reduce_(0, owner, (~converged).to(verdict), "amax")
    return Updated(q, m, v, torch.stack(steps))


register_reference("factor_update", factor_update)
