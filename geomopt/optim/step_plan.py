"""The first half of a step (``FactorOptimizer._plan``): every check for every group before any tensor changes
(hyperparameters, gradients' layout and dtype, non-finite gradients, group settings changed since a weight's
factors were built, weights changed outside the optimizer), read from the host and the device in one sync. A
check that fails raises with nothing changed; what passes is a ``GroupPlan`` per group, which
``FactorOptimizer._apply_group`` carries out."""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .checks import check_grad, check_hyper, finite_flags, lr_value
from .decisions import DeviceFlags, check_capturable_params, device_flags
from .route_table import check_routes_kept
from .routing import is_factorized
from .sharded import global_all, to_local

__all__ = ["GroupPlan", "StepPlanning"]


class GroupPlan(NamedTuple):
    """What a step does to one param group, decided before anything changes."""
    group: dict[str, Any]
    first: int  # index of the group's first parameter among all (per-parameter seeds)
    params: list[torch.Tensor]  # stepped: with a finite gradient, not done by an interrupted step
    lr: float
    init_only: bool  # lr = 0 and zero gradients: state is made, nothing else changes
    switch: list[torch.Tensor]  # state of the other route (``factorize`` changed): dropped
    rebuild: list[torch.Tensor]  # group settings changed since the factors were built
    rebase: list[torch.Tensor]  # weight changed outside the optimizer
    skipped: int  # non-finite gradients skipped
    device: DeviceFlags | None = None  # capturable groups: the decisions on the device (the step applies them)
    own: frozenset = frozenset()  # ids of the parameters whose gradient and fingerprint the method's step checks


class StepPlanning:
    """``_plan`` and its helpers, mixed into ``FactorOptimizer`` (they read its groups, state, policies and
    fingerprints)."""

    def _plan(self) -> list[GroupPlan]:
        """Every check of the step, nothing changed: host checks first, then one read of device values (the
        gradients' non-finite flags and the fingerprints of the weights a method rewrites), then the decisions."""
        name = type(self).__name__
        staged, first = [], 0
        routes = getattr(self, "_routes", None) or []
        for gi, group in enumerate(self.param_groups):
            check_hyper(group, self.CAPTURABLE)
            factorized = [p for p in group["params"] if is_factorized(p, group)]
            check_routes_kept(name, gi, group, factorized, routes[gi] if gi < len(routes) else [])
            self._check_group(group, factorized)
            params = [p for p in group["params"] if p.grad is not None and not self._retry.done(p)]
            for p in params:
                check_grad(name, p)
            if group["capturable"]:
                check_capturable_params(group, params)
            lr = lr_value(group["lr"])
            init_only = not group["capturable"] and lr == 0 and all(
                global_all([~to_local(p.grad).any() for p in params], params, clean=False))
            plan = self._settings_plan(group, params)
            pending = {id(p) for p in plan[0] + plan[1]}
            own = frozenset() if init_only else self._checks_in_step(group, [p for p in params
                                                                              if id(p) not in pending])
            staged.append((group, first, params, lr, init_only, *plan, own))
            first += len(group["params"])
        flat = [p for s in staged if not s[0]["capturable"] for p in s[2] if id(p) not in s[8]]
        watched = [p for s in staged if not s[4] and not s[0]["capturable"] for p in s[7] if id(p) not in s[8]]
        finite, same = self._read_flags(flat, watched)
        if self.nonfinite == "raise" and not all(finite):
            bad = [p for p, ok in zip(flat, finite) if not ok]
            raise FloatingPointError(f"non-finite gradient in {len(bad)} parameter(s) (first of shape "
                                     f"{tuple(bad[0].shape)}); nothing was updated")
        ok = {id(p) for p, fine in zip(flat, finite) if fine} | {  # decided on the device, or by the step
            id(p) for s in staged if s[0]["capturable"] for p in s[2]} | {i for s in staged for i in s[8]}
        edited = {id(p) for p, kept in zip(watched, same) if not kept and id(p) in ok}
        if edited and self.external_edits == "raise":
            p = next(p for p in watched if id(p) in edited)
            raise RuntimeError(f"a weight of shape {tuple(p.shape)} ({len(edited)} in all) was changed outside "
                               f"{name} since its last step; nothing was updated (pass external_edits='rebase' to "
                               "rebuild its factors on the weight as it is)")
        device = device_flags(self._edits, [p for s in staged if s[0]["capturable"] for p in s[2]],
                              [p for s in staged if s[0]["capturable"] for p in s[7]])  # one set for all of them
        plans = []
        for group, first, params, lr, init_only, switch, rebuild, _, own in staged:
            kept = [p for p in params if id(p) in ok]
            rebase = [p for p in kept if id(p) in edited]
            plans.append(GroupPlan(group, first, kept, lr, init_only, [p for p in switch if id(p) in ok],
                                   [p for p in rebuild if id(p) in ok and id(p) not in edited], rebase,
                                   len(params) - len(kept), device if group["capturable"] and params else None,
                                   own))
        return plans

    def _checks_in_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> frozenset:
        """The ids of those of ``params`` (stepped, with state of their route and settings unchanged) whose gradient
        (non-finite entries) and fingerprint (changed from outside) the method's step checks itself, from a pass
        over them that it makes anyway; the plan leaves them out of its own checks. None by default."""
        return frozenset()

    def _read_flags(self, flat: list[torch.Tensor], watched: list[torch.Tensor]) -> tuple[list[bool], list[bool]]:
        """(whether each gradient of ``flat`` is finite, whether each ``watched`` weight is as the optimizer
        wrote it): computed on the device and read in one host sync (one all-reduce under FSDP2)."""
        fine = finite_flags([to_local(p.grad) for p in flat])
        known, same = self._edits.same_flags(watched)
        if not flat and not known:
            return [], [True] * len(watched)
        parts = [t for t in (fine, same) if t.numel()]
        device = parts[0].device
        read = global_all(torch.cat([t.to(device) for t in parts]), flat + [watched[i] for i in known])
        out = [True] * len(watched)
        for i, kept in zip(known, read[len(flat):]):
            out[i] = kept
        return read[: len(flat)], out

    def _settings_plan(self, group: dict[str, Any], params: list[torch.Tensor]):
        """(switch, rebuild, watched) of a group's stepped parameters, from host values only: state of the other
        route, settings changed since the factors were built (raises for one that cannot change), and the
        weights whose fingerprints the step must check (the method rewrites them from its factors)."""
        switch, rebuild, watched = [], [], []
        now, overwrites = self._settings(group), self._overwrites(group)  # per group, not per weight
        for p in params:
            st = self.state.get(p)
            if not st:
                continue
            fact = is_factorized(p, group)
            if fact != self._is_factor_state(st):
                switch.append(p)
            elif fact:
                built = st.get("built_with", now)
                changed = [k for k in now if built.get(k) != now[k]  # a state built before a setting existed
                           and (k in built or k not in self.ADDED_SETTINGS)]  # keeps its factors
                fixed = [k for k in changed if k in self.FIXED]
                if fixed:
                    k = fixed[0]
                    raise ValueError(f"{k}={now[k]!r}: {type(self).__name__} cannot change {k!r} (was "
                                     f"{built.get(k)!r}) once a weight has state; build a new optimizer")
                if changed:
                    rebuild.append(p)
                if overwrites and self._rewrites(p, group):
                    watched.append(p)
        return switch, rebuild, watched
