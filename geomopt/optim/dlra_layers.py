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

from typing import Any

import torch

from ..nn.lowrank import ROLES, lowrank_triples
from . import state as layout
from .routing import is_factorized

__all__ = ["FactoredLayers"]


class FactoredLayers:
    """The ``LowRankLinear`` half of ``DLRAMomentum``."""

    def _group_meta(self, group: dict[str, Any], tensors: list[torch.Tensor]) -> dict[str, Any]:
        triples = lowrank_triples(tensors) if group.get("factorize", True) else []
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
        """Step every layer of ``group`` whose three factors have gradients (``grads``, by id)."""
        for role_triple in {id(t[0]): t for _, t in self._layers(group).values()}.values():
            if all(id(p) in grads for p in role_triple):
                self._step_layer(role_triple, [grads[id(p)] for p in role_triple], group, lr)

    def _step_layer(self, triple: tuple[torch.Tensor, ...], grads: list[torch.Tensor], group: dict[str, Any],
                    lr: float) -> None:
        """One layer: the tangent coordinates from its factored gradients, the direction, the retraction and the
        transport (``DLRAMomentum._move``), the new factors and momentum committed together."""
        u_p, s_p, v_p = triple
        st = self.state[u_p]
        u, s, v = u_p.detach(), s_p.detach(), v_p.detach()
        gv, utgv, gtu = (g.to(u.dtype) for g in grads)
        xi = (utgv, gv - u @ utgv, gtu - v @ utgv.mT)
        direction, updates = self._direction(xi, st, group, u.shape[0], lambda t: t)
        if lr == 0:  # nothing moves (a schedule at zero): no retraction and its rounding
            return self._commit_many(list(triple), None, [updates, None, None])
        u2, s2, v2, exp_avg = self._move(u, s, v, direction, updates, group, lr, (u.shape[0], v.shape[0]))
        updates["exp_avg"] = exp_avg
        new = [t.to(p.dtype) for t, p in zip((u2, s2, v2), triple)]

        def write() -> None:
            for p, t in zip(triple, new):
                if p.shape == t.shape:
                    p.data.copy_(t)
                else:  # a new rank: the layer's forward follows the factors' shapes
                    p.data = t

        self._commit_many(list(triple), write, [updates, None, None])

    def _layer_ranks(self) -> list[int]:
        return [p.shape[0] for g in self.param_groups for role, (_, p, _v) in self._layers(g).values()
                if role == "S" and is_factorized(p, g)]
