"""The base every factor-owning geomopt optimizer reuses.

A step is a plan, then a commit per weight:

1. ``_plan``: every check for every group before any tensor changes (hyperparameters, gradients' layout and dtype,
   non-finite gradients, group settings changed since a weight's factors were built, weights changed outside
   the optimizer). A check that fails raises with nothing changed.
2. ``_apply_group``: state made or re-based where the plan says so (consistent with the weight as it is), then the
   new values computed out of place (``functional``, ``inner``), then committed weight by weight (``_commit``:
   the weight and its state together, in a section that allocates nothing and holds Ctrl-C). An exception leaves
   every weight with the state that belongs to it; ``guard.Retry`` makes a retried step equal one step.

It also owns routing (method vs AdamW), the AdamW path (``functional.adam``), the inner rule of the factors,
per-parameter seeds, torch's flags, and a ``load_state_dict`` that checks each state against its declared layout.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from ..grow.resize import pad_like
from ..nn.lowrank import lowrank_role
from . import state as layout
from .checks import check_hyper, check_number, check_param, dense_hyper
from .functional import adam_state, choose_impl, fused_supported, prepared_adam
from .guard import plain_mode
from .inner import inner_rule
from .loading import checked_groups
from .pickling import Pickling
from .route_table import RoutingTable, route_log, routing_table
from .routing import build_param_groups, is_factorized, warn_if_nothing_routed
from .sharded import gather, is_dtensor, local_state, scatter, to_local
from .step_plan import GroupPlan, StepPlanning

__all__ = ["FactorOptimizer", "GroupPlan", "NONFINITE_POLICIES", "EDIT_POLICIES"]

NONFINITE_POLICIES = ("skip", "raise")
EDIT_POLICIES = ("rebase", "raise")

class FactorOptimizer(StepPlanning, Pickling, Optimizer):
    """Base class. A subclass declares ``STATE_MARKER`` (a key only its factor state has), ``STRUCTURAL`` (group
    keys whose change rebuilds a weight's factors) and ``FIXED`` (keys that cannot change once a weight has
    state), and implements ``_init_factor_state``, ``_factor_step``, ``_state_layout``, ``_rebuild``,
    ``_rebase`` and ``_check_group``; ``ADDED_SETTINGS`` lists the group settings newer than the class."""

    #: whether the class has a capturable step (``capturable=True``: decisions on the device, no host read)
    CAPTURABLE = False
    #: counters kept per factorized parameter, summed by ``stats``
    STAT_KEYS: tuple[str, ...] = ()
    STATE_MARKER = ""
    STRUCTURAL: tuple[str, ...] = ()
    FIXED: tuple[str, ...] = ()
    #: settings added after the class first shipped: a state_dict saved before may lack them (they take their
    #: defaults); lacking any other setting means the state_dict comes from another optimizer
    ADDED_SETTINGS: tuple[str, ...] = ()
    #: the method's cycles (merge or reset): the group setting that spaces them and the stat that counts them
    CYCLE_SETTING: str | None = None
    CYCLE_STAT: str | None = None
    #: whether a factorized weight stays at the group's ``rank`` (it can reach only targets of that rank)
    KEEPS_RANK = False
    #: the state entries a factorized weight trains in its place (tensors or lists of them)
    TRAINED_KEYS: tuple[str, ...] = ()
    INNER_RULE = True  #: whether the factors have an inner optimizer (``inner``, ``inner_kwargs``)

    def __init__(self, params: Any, defaults: dict[str, Any], *, inner: type | None = torch.optim.AdamW,
                 inner_kwargs: dict[str, Any] | None = None, seed: int = 0, nonfinite: str = "skip",
                 external_edits: str = "rebase", include: Any = None, exclude: Any = None):
        check_hyper(defaults, self.CAPTURABLE)
        check_number("seed", seed, integer=True)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if external_edits not in EDIT_POLICIES:
            raise ValueError(f"external_edits must be one of {EDIT_POLICIES}, got {external_edits!r}")
        self._inner = inner_rule(inner, inner_kwargs) if inner is not None else None
        self._seed = seed
        self.nonfinite = nonfinite
        self.external_edits = external_edits
        self._init_runtime()
        self._building = True  # __init__ warns about unnamed parameters once; its add_param_group calls do not
        reasons: dict[int, Any] = {}
        super().__init__(build_param_groups(params, include=include, exclude=exclude, reasons=reasons), defaults)
        self._building = False
        self._routes = route_log(self.param_groups, reasons)
        warn_if_nothing_routed(self)

    def routing(self) -> RoutingTable:
        """Each parameter's name, shape, route (the method or AdamW) and the reason; ``print`` draws a table."""
        return routing_table(self, getattr(self, "_routes", None))

    def __repr__(self) -> str:
        first, _, rest = super().__repr__().partition("\n")
        return f"{first}\n{self.routing().summary()}\n{rest}"

    # ------------------------------------------------------------------ groups and arguments
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = build_param_groups([param_group], warn=not getattr(self, "_building", False))[0]
        tensors = [p[1] if isinstance(p, tuple) else p for p in group["params"]]
        for p in tensors:
            check_param(p)
        merged = {**self.defaults, **group, "params": tensors}
        check_hyper(merged, self.CAPTURABLE)
        meta = self._group_meta(merged, tensors)  # a LowRankLinear the method cannot step is the first error
        self._check_group(merged, [p for p in tensors if is_factorized(p, merged)])
        group.update(meta)
        super().add_param_group(group)

    def _check_group(self, group: dict[str, Any], factorized: list[torch.Tensor]) -> None:
        """Validate a group's method options; raise ValueError/TypeError naming argument and value."""

    def _group_meta(self, group: dict[str, Any], tensors: list[torch.Tensor]) -> dict[str, Any]:
        """Keys a new group takes from its parameters (none here). A method that needs dense weights refuses the
        factors of a ``geomopt.nn.LowRankLinear`` routed to it."""
        if any(lowrank_role(p) for p in tensors if is_factorized(p, group)):
            raise TypeError(f"{type(self).__name__} steps dense weights, and a LowRankLinear holds none: only "
                            "DLRAMomentum steps its factors (U, S, V); use it, turn the layer back into an nn.Linear "
                            "(to_linear), or put its factors in a param group with factorize=False")
        return {}

    def _param_seed(self, index: int) -> int:
        return layout.mix_seed(self._seed, index, 0x632BE59BD9B4E019)

    @staticmethod
    def _generator(state: dict[str, Any]) -> torch.Generator:
        gen = torch.Generator()
        gen.set_state(state["rng"])
        return gen

    def _settings(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group settings a weight's factors are built with (saved in its state as ``built_with``)."""
        return {k: group[k] for k in self.STRUCTURAL + self.FIXED}

    def _is_factor_state(self, st: dict[str, Any]) -> bool:
        return self.STATE_MARKER in st

    def _rewrites(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether the method rewrites factorized ``p`` from factors it keeps (what ``_overwrites`` says of a group,
        per weight; a tensor that is itself a factor is not)."""
        return True

    def _overwrites(self, group: dict[str, Any]) -> bool:
        """Whether the method rewrites a weight from its factors (then edits from outside must be detected)."""
        return False

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):  # type: ignore[override]
        """Perform one optimization step (see the class docstring and README, "State and conventions")."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with plain_mode({p.device.type for g in self.param_groups for p in g["params"]}), self._interrupts:
            plans = self._plan()
            self._committed = []
            self._edits.fresh.clear()
            try:
                for gp in plans:
                    self._apply_group(gp)
            except BaseException:
                self._retry.remember(self._committed)
                self._committed = []
                raise
            self._committed = []
            self._retry.forget()
            for gp in plans:
                if gp.skipped:
                    gp.group["nonfinite_skips"] = gp.group.get("nonfinite_skips", 0) + gp.skipped
            first = next((gp for gp in plans if gp.device is not None), None)
            if first is not None:  # a step skipped on the device, counted there once (a 0-d tensor ``stats`` reads)
                first.group["nonfinite_skips"] = (~first.device.ok).long() + first.group.get("nonfinite_skips", 0)
        return loss

    def _apply_group(self, gp: GroupPlan) -> None:
        group, params = gp.group, gp.params
        self._step_checks = gp.own
        if not params:
            return
        sharded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if any(is_dtensor(p) for p in params):  # FSDP2: step shards where the method can, else full copies
            params, sharded = gather(self, params, lambda p: not is_factorized(p, group)
                                     or self._steps_shard(p, group))
        self._origin = {id(full): orig for orig, full in sharded.values()}
        here = {id(self._origin.get(id(p), p)): p for p in params}
        start = len(self._committed)
        try:
            fact = self._prepare_state(gp, here)
            if gp.init_only:
                for p in params:
                    if not is_factorized(p, group) and not self.state[p]:
                        self.state[p].update(adam_state(p))
                self._committed += list(gp.params)
                return
            dense = [p for p in params if not is_factorized(p, group)]
            if dense:
                self._dense_step(group, dense, gp.lr, None if gp.device is None else gp.device.ok)
            if fact:
                grads = [to_local(p.grad) for p in fact]
                grads = [-g for g in grads] if group["maximize"] else grads
                if gp.device is None:
                    self._factor_step(group, fact, grads, gp.lr)
                else:
                    self._factor_step(group, fact, grads, gp.lr, device=gp.device)
        finally:
            if sharded:
                scatter(self, sharded)
            self._origin = {}
            if self._overwrites(group):
                done = [p for p in self._committed[start:] if is_factorized(p, group) and id(p) not in
                        self._edits.fresh and self._rewrites(p, group)]
                with contextlib.suppress(Exception):  # a missing fingerprint only means "trust the weight"
                    self._edits.record(done, self._together(group, done))

    def _prepare_state(self, gp: GroupPlan, here: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """State changes the plan asked for, each consistent with the weight as it is (nothing is written):
        other-route state dropped, new factors made, factors rebuilt or re-based. Returns the factorized
        parameters (as stepped: FSDP2 fallback weights are full copies)."""
        group = gp.group
        for orig in gp.switch:
            self.state[here[id(orig)]].clear()
        pos = {id(q): i for i, q in enumerate(group["params"])}
        fact = [p for p in here.values() if is_factorized(p, group)]
        for p in fact:
            if not self.state[p]:
                self._init_factor_state(p, group, gp.first + pos[id(self._origin.get(id(p), p))])
                self.state[p]["built_with"] = self._settings(group)
        for orig, kind in [(o, "rebuilds") for o in gp.rebuild] + [(o, "rebases") for o in gp.rebase]:
            p = here[id(orig)]
            st = self.state[p]
            (self._rebuild if kind == "rebuilds" else self._rebase)(p, group, st)
            st["built_with"] = self._settings(group)
            st[kind] = st.get(kind, 0) + 1
            if kind == "rebases":
                self._edits.record([orig])  # the weight as it is is the base now: a retry re-bases nothing
        return fact

    def _commit(self, p: torch.Tensor, write: Callable[[], Any] | None = None,
                updates: dict[str, Any] | None = None) -> None:
        """Commit one weight: ``write()`` (in-place, allocation-free: the new weight) and its new state entries,
        together, with Ctrl-C held until both are done."""
        self._commit_many([p], write, [updates])

    def _commit_many(self, params: list[torch.Tensor], write: Callable[[], Any] | None,
                     updates: list[dict[str, Any] | None]) -> None:
        """``_commit`` of weights stepped together: one ``write()`` for all of them, then their state entries."""
        with self._interrupts.held:
            if write is not None:
                write()
            for p, up in zip(params, updates):
                if up:
                    self.state[p].update(up)
                self._committed.append(self._origin.get(id(p), p))

    @staticmethod
    def _together(group: dict[str, Any], params: list[torch.Tensor]) -> bool:
        """Whether the weights of one shape share their dense calls (the multi-tensor path): with ``foreach=True``,
        or ``fused=True`` and ``foreach`` unset; by default off the CPU (there each call is a launch; on a CPU the
        per-weight calls, whose gathers stay in cache, are faster)."""
        if group["foreach"] is not None:
            return bool(group["foreach"])
        if group["fused"]:
            return True
        return any(to_local(p).device.type != "cpu" for p in params)

    def _dense_step(self, group: dict[str, Any], params: list[torch.Tensor], lr: float,
                    ok: torch.Tensor | None = None) -> None:
        """AdamW (decoupled decay) on ``params`` with the group's hyperparameters and flags; one tensor at a time
        on the loop path (bounded temporary memory), all at once on the foreach and fused paths. ``ok`` (a
        capturable step): the fused kernel, which leaves everything as it is on the device where ``ok`` is False."""
        locs = [to_local(p) for p in params]
        impl = "fused" if ok is not None else choose_impl(locs, foreach=group["foreach"], fused=group["fused"],
                                                          own=False)
        for p, loc in zip(params, locs):
            if not self.state[p]:
                self.state[p].update(adam_state(p, fused=impl == "fused" and fused_supported([loc])))
        views = [local_state(self.state[p]) for p in params]
        beta1, beta2 = group["betas"]
        lr, decay = dense_hyper(group, lr)
        hyper = dict(impl=impl, lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=decay,
                     decoupled=True, amsgrad=False, maximize=group["maximize"],
                     found_inf=None if ok is None else (~ok).float())
        runs = [[i] for i in range(len(params))] if impl == "single" else [list(range(len(params)))]
        for ix in runs:
            commit = prepared_adam([locs[i] for i in ix], [to_local(params[i].grad) for i in ix],
                                   [views[i] for i in ix], **hyper)
            for i in ix:  # the step count as the path wants it (same value), before anything changes
                self.state[params[i]]["step"] = views[i]["step"]
            with self._interrupts.held:
                commit()
                self._committed += [self._origin.get(id(params[i]), params[i]) for i in ix]

    # ------------------------------------------------------------------ subclass hooks
    def _steps_shard(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether factorized DTensor ``p`` steps on its local shard (else a full copy is gathered)."""
        return False

    def _init_factor_state(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        raise NotImplementedError

    def _factor_step(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                     lr: float) -> None:
        """Step the factorized ``params`` (``grads``: their local gradients, negated for ``maximize``): compute
        out of place, then ``_commit`` each weight."""
        raise NotImplementedError

    def _rebuild(self, p: torch.Tensor, group: dict[str, Any], st: dict[str, Any]) -> None:
        """Rebuild the factors of ``p`` for the group's changed settings (``p`` itself does not change)."""
        raise NotImplementedError

    def _rebase(self, p: torch.Tensor, group: dict[str, Any], st: dict[str, Any]) -> None:
        """Rebuild the factors of ``p`` on the weight as it is now (it was changed outside the optimizer)."""
        self._rebuild(p, group, st)

    # ------------------------------------------------------------------ growth (``geomopt.grow``)
    def prepare_resize(self) -> None:
        """Called before ``geomopt.grow`` resizes parameters: leave nothing in the state that the weights lack."""

    def resize_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], resize: Any,
                     growth: Any) -> None:
        """Make ``state`` fit ``p``, just grown as ``resize`` (``geomopt.grow.resize.Resize``) describes, in place
        (``growth``: the call's generator and init). AdamW-routed state is zero-padded; factor state is the
        method's (``_resize_factors``)."""
        if self._is_factor_state(state):
            self._resize_factors(p, state, group, resize, growth)
        else:
            pad_like(state, resize)

    def _resize_factors(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], resize: Any,
                        growth: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot carry its factors across a growth")

    def _state_layout(self, p: torch.Tensor, group: dict[str, Any], st: dict[str, Any]) -> dict[str, Any]:
        """The declared layout (``geomopt.optim.state``) of factorized ``p``'s state under ``group``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def _declared_layout(self, p: torch.Tensor, group: dict[str, Any], st: dict[str, Any]) -> dict[str, Any]:
        """The method's layout of factorized ``p``'s state, with the counters the base keeps in it."""
        return {**self._state_layout(p, group, st), "rebases": layout.Optional(layout.Count()),
                "rebuilds": layout.Optional(layout.Count())}

    def _own_settings(self) -> list[str]:
        generic = {"lr", "betas", "eps", "weight_decay", "dense_lr_scale", "dense_weight_decay", "factorize",
                   "maximize", "foreach", "fused", "capturable", "differentiable"}
        return [k for k in self.defaults if k not in generic]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like torch after checking everything that can be checked (group sizes, each state against its
        declared layout: keys, shapes, dtypes, permutations), nothing changed on failure. Hyperparameters that
        a state_dict from an older version lacks take their defaults; saved dtypes are kept (torch casts every
        state tensor but ``step`` to the parameter's dtype: permutations, generator states and fp32 factors
        must survive)."""
        groups, pairs = checked_groups(self, state_dict)
        super().load_state_dict({**state_dict, "param_groups": groups})
        for sid, p, merged in pairs:
            st = layout.copy_state(state_dict["state"][sid], p.device)
            if st and is_factorized(p, merged):
                st.setdefault("built_with", self._settings(merged))
            self.state[p] = st
        self._init_runtime()  # the loaded state is the base of the weights as they are (or will be) loaded

    def trained_numel(self, p: torch.Tensor) -> int:
        """Scalars trained for ``p``: its own for an AdamW-routed tensor (or one without state), its factors'
        (``TRAINED_KEYS``) for a factorized weight."""
        st = self.state.get(p, {})
        if not self._is_factor_state(st) or not any(k in st for k in self.TRAINED_KEYS):
            return p.numel()
        return sum(t.numel() for k in self.TRAINED_KEYS if k in st
                   for t in (st[k] if isinstance(st[k], (list, tuple)) else [st[k]]))

    @property
    def stats(self) -> dict[str, int]:
        """Counters summed over parameters (merges, early merges, skipped non-finite steps, re-bases after edits
        from outside, rebuilds after changed group settings, ...)."""
        keys = self.STAT_KEYS + ("rebases", "rebuilds")
        out = dict.fromkeys(keys, 0)
        out["nonfinite_skips"] = sum(int(g.get("nonfinite_skips", 0)) for g in self.param_groups)
        for st in self.state.values():
            for k in keys:
                out[k] += int(st.get(k, 0))
        return out
