"""The rule that updates the factors (POET's generators, ReLoRA's A and B): ``inner`` and ``inner_kwargs``.

``inner_rule(cls, kwargs)`` gives one of two rules with the same three methods:

- ``AdamRule`` for ``torch.optim.Adam`` / ``torch.optim.AdamW`` themselves: the plain update functions of
  ``geomopt.optim.functional`` with the class's hyperparameters (``betas``, ``eps``, ``weight_decay``, ``amsgrad``,
  ``foreach``, ``fused``; Adam's ``decoupled_weight_decay``); the state is torch's (``step``, ``exp_avg``,
  ``exp_avg_sq``), so checkpoints of either load into the other.
- ``OptimizerRule`` for any other ``torch.optim.Optimizer`` subclass (``torch_optimizer.Lamb`` ...): a private
  instance whose ``step`` runs unhooked (its class's function before torch wrapped it), so the global optimizer
  hooks fire once per user step, for the geomopt optimizer, and never per factor group.

``updated(factors, grads, states, lr)`` is out of place: it returns new factors and new states and changes none of
its arguments, so a step can compute everything before it commits anything. ``update_(...)`` returns a function
that updates the given tensors in place when called (allocation done first): for a weight stepped as a whole.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from .functional import adam_state, choose_impl, prepared_adam
from .state import ADAM_KEYS

__all__ = ["inner_rule", "AdamRule", "OptimizerRule", "clone_state", "copy_all"]

#: keys of ``inner_kwargs`` that the geomopt optimizer's own arguments set, or that its step cannot honour
_REFUSED = {"lr": "the group's lr drives the factors", "maximize": "pass maximize to the geomopt optimizer",
            "capturable": "the step is not CUDA-graph capturable", "differentiable": "the step is not differentiable"}


def clone_state(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of an optimizer state whose tensors are new tensors (values kept), nested lists and dicts too."""
    def copy(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.clone()
        if isinstance(v, dict):
            return {k: copy(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(copy(x) for x in v)
        return v

    return {k: copy(v) for k, v in state.items()}


def copy_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """New tensors with the values and layouts of ``tensors``, in one multi-tensor op instead of a clone each
    (``x * 1`` is exact for every float, signed zeros, infinities and NaNs included)."""
    return list(torch._foreach_mul(tensors, 1)) if tensors else []


def inner_rule(cls: Any, kwargs: dict[str, Any] | None) -> "AdamRule | OptimizerRule":
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        raise TypeError(f"inner must be a torch.optim.Optimizer subclass, got {cls!r}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"inner_kwargs must be a dict, got {type(kwargs).__name__}")
    if kwargs is None:
        kwargs = {"weight_decay": 0.0} if issubclass(cls, torch.optim.AdamW) else {}
    kwargs = dict(kwargs)
    for key, why in _REFUSED.items():
        if key in kwargs and (key == "lr" or kwargs[key]):
            raise ValueError(f"inner_kwargs must not set {key!r} (got {kwargs[key]!r}): {why}")
    if cls in (torch.optim.Adam, torch.optim.AdamW):
        return AdamRule(cls, kwargs)
    return OptimizerRule(cls, kwargs)


class AdamRule:
    """torch Adam / AdamW as plain update functions (default for AdamW: ``weight_decay=0``, factors not decayed)."""

    def __init__(self, cls: type, kwargs: dict[str, Any]):
        known = {"betas", "eps", "weight_decay", "amsgrad", "foreach", "fused", "maximize", "capturable",
                 "differentiable"} | ({"decoupled_weight_decay"} if cls is torch.optim.Adam else set())
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"inner_kwargs: {cls.__name__} takes no {unknown[0]!r} (got {kwargs[unknown[0]]!r})")
        if kwargs.get("foreach") and kwargs.get("fused"):
            raise ValueError("inner_kwargs: foreach and fused cannot both be True")
        cls([torch.zeros(1, requires_grad=True)], **kwargs)  # torch's own checks of the values, with its messages
        self.cls, self.kwargs = cls, kwargs
        self.betas = tuple(kwargs.get("betas", (0.9, 0.999)))
        self.eps = kwargs.get("eps", 1e-8)
        self.weight_decay = kwargs.get("weight_decay", 1e-2 if cls is torch.optim.AdamW else 0.0)  # torch's defaults
        self.amsgrad = bool(kwargs.get("amsgrad", False))
        self.decoupled = cls is torch.optim.AdamW or bool(kwargs.get("decoupled_weight_decay", False))

    def _impl(self, tensors: list[torch.Tensor], foreach: bool | None, fused: bool | None, own: bool) -> str:
        foreach = self.kwargs.get("foreach", foreach)
        fused = self.kwargs.get("fused", fused)
        return choose_impl(tensors, foreach=foreach, fused=fused, own=own)

    def fresh(self, factor: torch.Tensor, *, foreach: bool | None = None, fused: bool | None = None) -> dict:
        """The state before a first update (known for Adam: made up front, so the state's structure is fixed,
        which torch.distributed.checkpoint needs to load into a template)."""
        return adam_state(factor, self.amsgrad, fused=self._impl([factor], foreach, fused, True) == "fused")

    def _call(self, params, grads, states, lr, foreach, fused, own, found_inf=None) -> Callable[[], None]:
        return prepared_adam(params, grads, states, impl=self._impl(params, foreach, fused, own), lr=lr,
                             beta1=self.betas[0], beta2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay,
                             decoupled=self.decoupled, amsgrad=self.amsgrad, maximize=False, found_inf=found_inf)

    def updated(self, factors: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]],
                lr: float, *, foreach: bool | None = None, fused: bool | None = None,
                found_inf: torch.Tensor | None = None):
        """New factors and states (``found_inf``: a capturable step's device flag, see ``functional.adam``)."""
        if not factors:
            return [], []
        states = [s if s else self.fresh(f, foreach=foreach, fused=fused) for s, f in zip(states, factors)]
        keys = ADAM_KEYS + (("max_exp_avg_sq",) if self.amsgrad else ())
        tensors = [s[k] for s in states for k in keys]
        if not all(isinstance(t, torch.Tensor) for t in tensors):  # a step count saved as a number (old torch)
            new, new_states = [f.detach().clone() for f in factors], [clone_state(s) for s in states]
        else:  # the copies the update runs on, in one multi-tensor op
            with torch.no_grad():  # no graph: the copies need no detach
                copies = copy_all(factors + tensors)
            new, rest = copies[: len(factors)], copies[len(factors):]
            new_states = [dict(zip(keys, rest[i * len(keys): (i + 1) * len(keys)])) for i in range(len(states))]
        self._call(new, grads, new_states, lr, foreach, fused, True, found_inf)()  # in place on the copies: cheaper
        return new, new_states  # on CPU than torch's functional kernel

    def update_(self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]],
                lr: float, *, foreach: bool | None = None, fused: bool | None = None) -> Callable[[], None]:
        for s, p in zip(states, params):
            if not s:
                s.update(self.fresh(p, foreach=foreach, fused=False))
        return self._call(params, grads, states, lr, foreach, fused, False)


def _unhooked(opt: Optimizer) -> Callable[[], Any]:
    """``opt.step`` without the hooks torch wraps around it (global and per-instance)."""
    fn = type(opt).step
    if getattr(fn, "hooked", False):
        fn = fn.__wrapped__
    return lambda: fn(opt)


class OptimizerRule:
    """Any torch optimizer class as the rule: one private instance, lr set per call, state given per call."""

    def __init__(self, cls: type, kwargs: dict[str, Any]):
        cls([torch.zeros(1, requires_grad=True)], lr=1.0, **kwargs)  # the class's own argument checks
        self.cls, self.kwargs = cls, kwargs
        self._opt: Optimizer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"cls": self.cls, "kwargs": self.kwargs, "_opt": None}

    def fresh(self, factor: torch.Tensor, **_: Any) -> dict:
        """``{}``: the class creates its state lazily, at the factor's first update."""
        return {}

    def _run(self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]],
             lr: float) -> None:
        if self._opt is None:
            self._opt = self.cls([torch.zeros(1, requires_grad=True)], lr=1.0, **self.kwargs)
        opt = self._opt
        group = opt.param_groups[0]
        for p, g in zip(params, grads):
            p.grad = g
        opt.state = defaultdict(dict, zip(params, states))  # type: ignore[assignment]
        group["params"], group["lr"] = params, lr
        try:
            _unhooked(opt)()
        finally:
            for p, s in zip(params, states):
                s.update(opt.state[p])
                p.grad = None
            group["params"] = []
            opt.state = defaultdict(dict)  # type: ignore[assignment]

    def updated(self, factors: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]],
                lr: float, **_: Any):
        new = [f.detach().clone() for f in factors]
        new_states = [clone_state(s) for s in states]
        if new:
            self._run(new, grads, new_states, lr)
        return new, new_states

    def update_(self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]],
                lr: float, **_: Any) -> Callable[[], None]:
        """Computed on copies now; the returned function copies the results in (allocation-free)."""
        new, new_states = self.updated(params, grads, states, lr)

        def commit() -> None:
            for p, x, s, ns in zip(params, new, states, new_states):
                p.copy_(x)
                s.clear()
                s.update(ns)

        return commit
