r"""``DLRAMomentum`` on ``geomopt.nn.LowRankLinear`` layers (mixed into it): such a layer's factors (U, S, V) are the
point on the manifold, so the optimizer keeps only the momentum, under the U factor's state, and steps the three
together from their factored gradients (``geomopt.nn.lowrank``: U.grad = G V, S.grad = U^T G V, V.grad = G^T U).
The tangent coordinates follow without the m x n gradient:

.. math:: x_s = U^\top G V,\qquad x_u = G V - U x_s,\qquad x_v = G^\top U - V x_s^\top

A param group's ``lowrank`` key lists the positions of each layer's (U, S, V) in it, set when the group is made
(``_group_meta``), so it survives pickling, ``copy.deepcopy`` and ``state_dict``. The factors' state holds no copy of
them: an edit from outside is a new point, stepped from as it is. Rank adaptivity (``rank_tol``) writes factors of
the new rank into the parameters (their ``.data``), and the layer's forward follows them.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from ..nn.lowrank import ROLES, lowrank_triples
from . import state as layout
from .batching import key_runs
from .routing import is_factorized
from .sharded import is_dtensor

__all__ = ["FactoredLayers"]


class FactoredLayers:
    """The ``LowRankLinear`` half of ``DLRAMomentum``."""

    def _group_meta(self, group: dict[str, Any], tensors: list[torch.Tensor]) -> dict[str, Any]:
        triples = lowrank_triples(tensors) if group.get("factorize", True) else []
        sharded = [tensors[i] for t in triples for i in t if is_dtensor(tensors[i])]
        if sharded:
            raise TypeError(f"{type(self).__name__} does not step the factors of a LowRankLinear sharded by FSDP2 (a "
                            f"DTensor of shape {tuple(sharded[0].shape)}): leave those layers out of fully_shard, or "
                            "keep them nn.Linear")
        return {"lowrank": triples} if triples else {}

    @staticmethod
    def _layers(group: dict[str, Any]) -> dict[int, tuple[str, tuple[torch.Tensor, ...]]]:
        """Per id of a factor in ``group``: (its role, its layer's (U, S, V))."""
        params = group["params"]
        out = {}
        for at in group.get("lowrank", ()):
            triple = tuple(params[i] for i in at)
            for role, p in zip(ROLES, triple):
                out[id(p)] = (role, triple)
        return out

    def _rewrites(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return id(p) not in self._layers(group)

    def _part_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any] | None:
        """The state a factor of a layer starts with (the U factor: zero momentum and step 0; S and V: their role),
        or None for a dense weight."""
        entry = self._layers(group).get(id(p))
        if entry is None:
            return None
        role, (u, s, v) = entry
        st: dict[str, Any] = dict(factored=role)
        if role == "U":
            st.update(self._zero_momentum(dict(U=u.detach(), S=s.detach(), V=v.detach()), group["method"], None))
        return st

    def _part_layout(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any] | None:
        """The declared state layout of a layer's factor, or None for a dense weight."""
        entry = self._layers(group).get(id(p))
        if entry is None:
            return None
        role, (u, s, v) = entry
        out: dict[str, Any] = dict(factored=layout.Choice((role,)))
        if role == "U":
            r, m, n = s.shape[0], u.shape[0], v.shape[0]
            out.update(exp_avg=layout.FloatsList([(r, r), (m, r), (n, r)]), step=layout.Count(),
                       built_with=layout.Optional(layout.Settings()))
            if group["method"] == "adam":
                out["exp_avg_sq"] = layout.Floats((3,))
        return out

    def _step_layers(self, group: dict[str, Any], grads: dict[int, torch.Tensor], lr: float) -> None:
        """Step every layer of ``group`` whose three factors have gradients (``grads``, by id): one by one, or on
        the multi-tensor path (``_together``, fixed rank) the layers of one shape, rank, dtype and step count
        stacked, one batched call per stage."""
        triples = [t for t in {id(t[0]): t for _, t in self._layers(group).values()}.values()
                   if all(id(p) in grads for p in t)]
        together = self._together(group, [t[0] for t in triples]) and group["rank_tol"] is None

        def key(i: int) -> Any:
            u, s, v = triples[i]
            return (tuple(u.shape), tuple(v.shape), s.shape[0], u.dtype, u.device, self.state[u]["step"])

        keys = [key(i) for i in range(len(triples))]
        for run in key_runs(keys, [t[0].numel() + t[2].numel() for t in triples], together):
            run_triples = [triples[i] for i in run]
            self._step_layer_run(run_triples, [[grads[id(p)] for p in t] for t in run_triples], group, lr)

    def _step_layer_run(self, triples: list[tuple[torch.Tensor, ...]], grads: list[list[torch.Tensor]],
                        group: dict[str, Any], lr: float) -> None:
        """Layers of one shape and rank (or one layer): the tangent coordinates from the factored gradients, the
        direction, the retraction and the transport (``DLRAMomentum._move``), the new factors and momenta committed
        together."""
        one = len(triples) == 1
        sts = [self.state[t[0]] for t in triples]
        u, s, v = (_stacked([t[j].detach() for t in triples], one) for j in range(3))
        gv, utgv, gtu = (_stacked([g[j].to(u.dtype) for g in grads], one) for j in range(3))
        st = sts[0] if one else dict(step=sts[0]["step"], exp_avg=[torch.stack([x["exp_avg"][j] for x in sts])
                                                                    for j in range(3)])
        if "exp_avg_sq" in sts[0] and not one:
            st["exp_avg_sq"] = torch.stack([x["exp_avg_sq"] for x in sts])
        xi = (utgv, gv - u @ utgv, gtu - v @ utgv.mT)
        direction, new = self._direction(xi, st, group, u.shape[-2], lambda t: t)
        write = None
        if lr != 0:  # else nothing moves (a schedule at zero): no retraction and its rounding
            u2, s2, v2, new["exp_avg"] = self._move(u, s, v, direction, new, group, lr, (u.shape[-2], v.shape[-2]))
            factors = [(u2, s2, v2)] if one else list(zip(u2, s2, v2))
            write = functools.partial(_write, triples, [tuple(t.to(p.dtype) for t, p in zip(f, tr))  # made now
                                                        for f, tr in zip(factors, triples)])
        ups = [new] if one else [dict(step=new["step"], exp_avg=[x[i] for x in new["exp_avg"]],
                                      **({"exp_avg_sq": new["exp_avg_sq"][i]} if "exp_avg_sq" in new else {}))
                                 for i in range(len(triples))]
        self._commit_many([p for t in triples for p in t], write, [x for up in ups for x in (up, None, None)])

    def _layer_ranks(self) -> list[int]:
        """The rank of every ``LowRankLinear`` of the groups, in order."""
        return [p.shape[0] for g in self.param_groups for role, (_, p, _v) in self._layers(g).values()
                if role == "S" and is_factorized(p, g)]


def _stacked(ts: list[torch.Tensor], one: bool) -> torch.Tensor:
    return ts[0] if one else torch.stack(ts)


def _write(triples: list[tuple[torch.Tensor, ...]], new: list[tuple[torch.Tensor, ...]]) -> None:
    """The new factors into the layers' parameters (in the commit): in place, or where the rank changed as new
    tensors (the layer's forward follows the factors' shapes)."""
    for triple, factors in zip(triples, new):
        for p, t in zip(triple, factors):
            if p.shape == t.shape:
                p.data.copy_(t)
            else:
                p.data = t
