"""The base every factor-owning geomopt optimizer reuses.

It owns what no optimizer should re-implement: parameter routing (method vs AdamW), the dense AdamW
path, the inner optimizer of the factors (its state kept in ``self.state[param]``), per-parameter
seeded generators saved in state, the cycle counters, the non-finite-gradient guard, the lr = 0
zero-gradient no-op rule, and a ``load_state_dict`` that restores what torch's default casts away.
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from .routing import build_param_groups, is_factorized
from .sharded import gather, global_all, is_dtensor, scatter, to_local

__all__ = ["FactorOptimizer", "COMMON_ARGS_DOC", "NONFINITE_POLICIES", "factor_dtype", "finite_flags", "check_rank",
           "fill_args_doc"]

NONFINITE_POLICIES = ("skip", "raise")

COMMON_ARGS_DOC = r"""
    params: an ``nn.Module`` (routed: ``nn.Linear`` weights get the method, embeddings, the LM head
        and all non-2-D tensors get AdamW), ``model.named_parameters()`` (routed by name), plain
        parameters (every 2-D one is factorized; a warning says how to exclude embeddings), or param
        groups (dicts; a group may set ``factorize=False`` and any hyperparameter below).
    lr: learning rate of the factors and of the AdamW parameters; LR schedulers drive both.
    betas, eps, weight_decay: AdamW hyperparameters of the parameters that are not factorized
        (decoupled weight decay).
    inner: torch optimizer class that updates the factors (default ``torch.optim.AdamW``); any
        ``torch.optim.Optimizer`` subclass works (e.g. ``torch_optimizer.Lamb``). Its state lives in
        ``optimizer.state[param]``.
    inner_kwargs: keyword arguments of ``inner`` other than ``lr`` (default for AdamW:
        ``weight_decay=0``, so factors are not decayed).
    seed: seed of the per-parameter generators; every rank and every resumed run draws the same.
    nonfinite: ``"skip"`` (default) skips the step of a parameter whose gradient holds NaN/Inf and
        counts it in ``stats``; ``"raise"`` raises ``FloatingPointError``.
"""


def fill_args_doc(cls: type) -> type:
    """Class decorator: put ``COMMON_ARGS_DOC`` where the class docstring says ``<COMMON_ARGS>``
    (``<COMMON_ARGS_NO_INNER>``: the same without ``inner``/``inner_kwargs``)."""
    no_inner = COMMON_ARGS_DOC.split("    inner:")[0] + COMMON_ARGS_DOC[COMMON_ARGS_DOC.index("    seed:"):]
    doc = cls.__doc__ or ""
    cls.__doc__ = doc.replace("<COMMON_ARGS_NO_INNER>", no_inner.strip("\n")).replace(
        "<COMMON_ARGS>", COMMON_ARGS_DOC.strip("\n"))
    return cls


def _check_number(name: str, value: Any, *, low: float | None = None, low_open: bool = False,
                  integer: bool = False) -> None:
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        kind = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")


# flags torch.optim.Optimizer itself may add to defaults (not this method's settings)
_TORCH_FLAGS = frozenset({"differentiable", "foreach", "maximize", "capturable", "fused"})


def _adam_first_state(t: torch.Tensor, amsgrad: bool, fused: bool = False) -> dict[str, Any]:
    """What torch Adam/AdamW (not capturable) put in a tensor's state before its first update."""
    from torch.optim.optimizer import _get_scalar_dtype

    zeros = functools.partial(torch.zeros_like, t, memory_format=torch.preserve_format)
    step = (torch.zeros((), dtype=_get_scalar_dtype(is_fused=True), device=t.device) if fused
            else torch.tensor(0.0, dtype=_get_scalar_dtype()))
    st = dict(step=step, exp_avg=zeros(), exp_avg_sq=zeros())
    if amsgrad:
        st["max_exp_avg_sq"] = zeros()
    return st


def finite_flags(tensors: list[torch.Tensor]) -> torch.Tensor:
    """1-D bool tensor: whether ``tensors[i]`` holds no NaN or Inf.

    One ``torch._foreach_norm`` (fp32 2-norms) instead of an ``isfinite().all()`` per tensor: a NaN or Inf
    entry always makes the norm non-finite, and a norm that overflows from finite entries is re-checked
    entry by entry, so the flags are exact."""
    if not tensors:
        return torch.zeros(0, dtype=torch.bool)
    if any(t.is_sparse or t.layout != torch.strided or t.is_complex() for t in tensors):
        return torch.stack([torch.isfinite(t).all().to(tensors[0].device) for t in tensors])
    norms: list[Any] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, ix in by_dtype.items():  # half-precision norms in fp32, so they do not overflow at 65504
        wide = torch.promote_types(dtype, torch.float32)
        for i, n in zip(ix, torch._foreach_norm([tensors[i] for i in ix], 2, dtype=wide)):
            norms[i] = n
    ok = torch.stack([n.to(norms[0].device) for n in norms]).isfinite()
    if not bool(ok.all()):
        for i in (~ok).nonzero().flatten().tolist():
            ok[i] = torch.isfinite(tensors[i]).all()
    return ok


def _fused_supported(tensors: list[torch.Tensor]) -> bool:
    """Whether torch has a fused Adam/AdamW kernel for every tensor's device (floating-point tensors only)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return all(t.device.type in devices and t.is_floating_point() for t in tensors)


def _steps_on_device(params: list[torch.Tensor], states: list[dict[str, Any]]) -> None:
    """Fused Adam wants each step count as an fp32 tensor on its parameter's device; a state saved by torch's loop
    keeps it as a CPU tensor: move it."""
    for p, s in zip(params, states):
        step = s.get("step")
        if isinstance(step, torch.Tensor) and (step.device != p.device or step.dtype != torch.float32):
            s["step"] = step.to(p.device, torch.float32)


def factor_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype of the factors of weight ``p``: fp32 for bf16/fp16 weights, else the weight's own."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def check_rank(group: dict[str, Any], factorized: list[torch.Tensor]) -> None:
    """``group["rank"]`` is an int >= 1 and at most min(m, n) of every factorized weight."""
    _check_number("rank", group["rank"], low=1, integer=True)
    for p in factorized:
        if group["rank"] > min(p.shape):
            raise ValueError(f"rank={group['rank']} exceeds min(m, n)={min(p.shape)} of a routed weight of "
                             f"shape {tuple(p.shape)}; pass rank <= {min(p.shape)} or exclude that weight")


def _copy_state(value: Any, device: torch.device, key: Any = None) -> Any:
    """Deep copy of a state value, tensors moved to ``device`` with their saved dtype kept."""
    if isinstance(value, torch.Tensor):
        if key == "step":  # torch keeps non-capturable step counters where they were saved
            return value.clone()
        return value.to(device=device, copy=True)
    if isinstance(value, dict):
        return {k: _copy_state(v, device, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_state(v, device) for v in value)
    return value


class FactorOptimizer(Optimizer):
    """Base class: subclasses implement ``_init_factor_state``, ``_factor_step`` and ``_check_group``."""

    #: counters kept per factorized parameter, summed by ``stats``
    STAT_KEYS: tuple[str, ...] = ()

    def __init__(self, params: Any, defaults: dict[str, Any], *, inner: type = torch.optim.AdamW,
                 inner_kwargs: dict[str, Any] | None = None, seed: int = 0, nonfinite: str = "skip"):
        _check_number("lr", defaults["lr"], low=0.0)
        _check_number("eps", defaults["eps"], low=0.0)
        _check_number("weight_decay", defaults["weight_decay"], low=0.0)
        betas = defaults["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a pair of floats, got {betas!r}")
        for i, b in enumerate(betas):
            _check_number(f"betas[{i}]", b, low=0.0)
            if b >= 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r}")
        if not (isinstance(inner, type) and issubclass(inner, Optimizer)):
            raise TypeError(f"inner must be a torch.optim.Optimizer subclass, got {inner!r}")
        if inner_kwargs is not None and not isinstance(inner_kwargs, dict):
            raise TypeError(f"inner_kwargs must be a dict, got {type(inner_kwargs).__name__}")
        if "lr" in (inner_kwargs or {}):
            raise ValueError("inner_kwargs must not set 'lr': the group's lr drives the factors")
        _check_number("seed", seed, integer=True)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self._inner_cls = inner
        if inner_kwargs is None:
            inner_kwargs = {"weight_decay": 0.0} if issubclass(inner, torch.optim.AdamW) else {}
        self._inner_kwargs = dict(inner_kwargs)
        self._seed = seed
        self.nonfinite = nonfinite
        self._inner: Optimizer | None = None
        self._dense: torch.optim.AdamW | None = None
        self._building = True  # __init__ warns about unnamed parameters once; its add_param_group calls do not
        super().__init__(build_param_groups(params), defaults)
        self._building = False

    # ------------------------------------------------------------------ groups and arguments
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = build_param_groups([param_group], warn=not getattr(self, "_building", False))[0]
        merged = {**self.defaults, **group}
        params = merged["params"]
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params: expected Tensors, got an item of type {type(p).__name__}")
            if not (p.is_floating_point() or p.is_complex()):
                raise TypeError(f"params: a {p.dtype} tensor of shape {tuple(p.shape)} cannot be optimized "
                                "(floating-point parameters only)")
        for key in ("lr", "eps", "weight_decay"):
            _check_number(key, merged[key], low=0.0)
        self._check_group(merged, [p for p in params if is_factorized(p, merged)])
        super().add_param_group(group)

    def _check_group(self, group: dict[str, Any], factorized: list[torch.Tensor]) -> None:
        """Validate a group's method options; raise ValueError/TypeError naming argument and value."""

    # ------------------------------------------------------------------ generators
    def _param_seed(self, index: int) -> int:
        return (self._seed * 0x9E3779B97F4A7C15 + index * 0x632BE59BD9B4E019 + 1) % (2**63 - 1)

    @staticmethod
    def _generator(state: dict[str, Any]) -> torch.Generator:
        gen = torch.Generator()
        gen.set_state(state["rng"])
        return gen

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):  # type: ignore[override]
        """Perform one optimization step (see the class docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.nonfinite == "raise":  # check every group before any of them changes
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            ok = global_all(finite_flags([to_local(g) for g in grads]), grads)
            bad = [g for g, fine in zip(grads, ok) if not fine]
            if bad:
                raise FloatingPointError(f"non-finite gradient in {len(bad)} parameter(s) (first of shape "
                                         f"{tuple(bad[0].shape)}); nothing was updated")
        index = 0
        for group in self.param_groups:
            first_index = index
            index += len(group["params"])
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            sharded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            if any(is_dtensor(p) for p in params):  # FSDP2: step shards where the method can, else full copies
                params, sharded = gather(self, params, lambda p: not is_factorized(p, group)
                                         or self._steps_shard(p, group))
            try:
                for p in params:
                    if p.grad.is_sparse:
                        raise TypeError(f"{type(self).__name__} does not support sparse gradients "
                                        f"(parameter of shape {tuple(p.shape)})")
                    if p.grad.is_complex() or p.is_complex():
                        raise TypeError(f"{type(self).__name__} does not support complex parameters or gradients "
                                        f"(parameter of shape {tuple(p.shape)})")
                fact = [p for p in params if is_factorized(p, group)]
                for p in fact:
                    if not self.state[p]:
                        orig = sharded[id(p)][0] if id(p) in sharded else p
                        pos = next(i for i, q in enumerate(group["params"]) if q is orig)
                        self._init_factor_state(p, group, first_index + pos)
                if group["lr"] == 0 and all(global_all([~to_local(p.grad).any() for p in params], params)):
                    for p in params:  # the AdamW-routed tensors get their (zero) state too, with step 0
                        if not is_factorized(p, group) and not self.state[p]:
                            self._init_dense_state(p)
                    continue  # lr = 0 and zero gradients: state exists now, nothing else changes
                finite = global_all(finite_flags([to_local(p.grad) for p in params]), params)
                if not all(finite):
                    bad = [p for p, ok in zip(params, finite) if not ok]  # "skip" ("raise" checked above)
                    group["nonfinite_skips"] = group.get("nonfinite_skips", 0) + len(bad)
                    params = [p for p, ok in zip(params, finite) if ok]
                    fact = [p for p in fact if any(p is q for q in params)]
                dense = [p for p in params if not is_factorized(p, group)]
                if dense:
                    self._dense_step(group, dense)
                if fact:
                    self._factor_step(group, fact)
            finally:
                if sharded:
                    scatter(self, sharded)
        return loss

    def _auto_fused(self, tensors: list[torch.Tensor]) -> bool:
        """Whether the inner torch Adam/AdamW steps ``tensors`` with its fused kernel: by default (``inner_kwargs``
        sets none of fused, foreach, capturable, differentiable) wherever torch has one for their device. The
        fused kernel is the same update in one call, where the default loop costs a dozen calls per factor."""
        kw = self._inner_kwargs
        if self._inner_cls not in (torch.optim.Adam, torch.optim.AdamW) or any(
                k in kw for k in ("fused", "foreach", "capturable", "differentiable")):
            return False
        return _fused_supported(tensors)

    def _fresh_inner(self, factor: torch.Tensor) -> dict[str, Any]:
        """The inner optimizer's state for ``factor`` before its first step, when that state is known
        (torch Adam/AdamW, not capturable, fused only by default; a later step is then exactly a first step):
        creating it up front keeps the state's structure fixed, which torch.distributed.checkpoint needs (it
        loads into a template of the state). Other inner optimizers get ``{}`` and create their state lazily."""
        kw = self._inner_kwargs
        if self._inner_cls not in (torch.optim.Adam, torch.optim.AdamW) or kw.get("fused") or kw.get("capturable"):
            return {}
        return _adam_first_state(factor, bool(kw.get("amsgrad")), fused=self._auto_fused([factor]))

    def _reset_inner(self, st: dict[str, Any], factor: torch.Tensor) -> None:
        """Reset a factor's inner state to the state before a first step."""
        st.clear()
        st.update(self._fresh_inner(factor))

    def _init_dense_state(self, p: torch.Tensor) -> None:
        """The state the dense AdamW creates on its first step, before that step (so a later real step
        is the same as on a fresh optimizer)."""
        self.state[p].update(_adam_first_state(p, False, fused=_fused_supported([p])))

    def _dense_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """torch.optim.AdamW on ``params`` with the group's hyperparameters (its fused kernel where torch has one
        for their device: the same update in one call); state in self.state."""
        if self._dense is None:
            self._dense = torch.optim.AdamW([torch.zeros(1)])
        opt = self._dense
        opt.state = self.state  # type: ignore[assignment]
        g = opt.param_groups[0]
        fused = _fused_supported(params)
        if fused:
            _steps_on_device(params, [self.state[p] for p in params])
        g.update(params=params, lr=group["lr"], betas=tuple(group["betas"]), eps=group["eps"],
                 weight_decay=group["weight_decay"], maximize=group.get("maximize", False), fused=fused)
        opt.step()
        g["params"] = []

    def _inner_step(self, group: dict[str, Any], factors: list[torch.Tensor],
                    states: list[dict[str, Any]], lr_scale: float = 1.0, clear_grads: bool = True) -> None:
        """One step of the inner optimizer on ``factors`` (whose ``.grad`` is set); ``states[i]`` is
        the dict (kept inside ``self.state[param]``) that holds factor i's inner state. The factors'
        ``.grad`` is dropped afterwards unless ``clear_grads`` is False (a parameter's own gradient)."""
        if self._inner is None:
            self._inner = self._inner_cls([torch.zeros(1)], lr=1.0, **self._inner_kwargs)  # lr set per step
        opt = self._inner
        g = opt.param_groups[0]
        if self._auto_fused([]):  # fused where torch has the kernel (see _auto_fused)
            g["fused"] = self._auto_fused(factors)
            if g["fused"]:
                _steps_on_device(factors, states)
        view = defaultdict(dict)
        for f, s in zip(factors, states):
            view[f] = s
        opt.state = view  # type: ignore[assignment]
        g["params"] = factors
        g["lr"] = group["lr"] * lr_scale
        opt.step()
        g["params"] = []
        opt.state = defaultdict(dict)  # type: ignore[assignment]
        if clear_grads:
            for f in factors:
                f.grad = None

    # ------------------------------------------------------------------ subclass hooks
    def _steps_shard(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether factorized DTensor ``p`` steps on its local shard (else a full copy is gathered)."""
        return False

    def _init_factor_state(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        raise NotImplementedError

    def _factor_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _check_loaded_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Raise ValueError when ``state`` (from a state_dict) cannot belong to factorized ``p``."""

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like torch, then restore the saved dtypes (torch casts every state tensor but ``step``
        to the parameter's dtype: permutations, generator states and fp32 factors must survive)."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (from optimizer.state_dict())")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        pairs = []
        for gi, (sg, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(sg["params"]) != len(group["params"]):
                raise ValueError(f"param group {gi}: state_dict has {len(sg['params'])} parameters, "
                                 f"this optimizer has {len(group['params'])}")
            lacking = sorted(k for k in self.defaults if k not in sg and k not in _TORCH_FLAGS)
            if lacking:  # torch would replace the group by the saved one, dropping this method's settings
                raise ValueError(f"param group {gi} of the state_dict lacks {lacking[:4]}: it comes from another "
                                 f"optimizer than {type(self).__name__}")
            merged = {**group, **{k: v for k, v in sg.items() if k != "params"}}
            for sid, p in zip(sg["params"], group["params"]):
                st = state_dict["state"].get(sid)
                if st is None:
                    continue
                if not isinstance(st, dict):
                    raise ValueError(f"state of parameter {sid} must be a dict, got {type(st).__name__}")
                if is_factorized(p, merged):
                    self._check_loaded_state(p, merged, st)
                else:  # AdamW-routed: every tensor but the step count is shaped like the parameter
                    for key, t in st.items():
                        if key == "step":
                            continue
                        if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                            what = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                            raise ValueError(f"state of parameter {sid}: {key!r} ({what}) is not AdamW state of "
                                             f"a {tuple(p.shape)} tensor: the state_dict comes from another "
                                             "optimizer or model")
                pairs.append((sid, p))
        super().load_state_dict(state_dict)
        for sid, p in pairs:
            self.state[p] = _copy_state(state_dict["state"][sid], p.device)

    @property
    def stats(self) -> dict[str, int]:
        """Counters summed over parameters (merges, early merges, skipped non-finite steps, ...)."""
        out = dict.fromkeys(self.STAT_KEYS, 0)
        out["nonfinite_skips"] = sum(int(g.get("nonfinite_skips", 0)) for g in self.param_groups)
        for st in self.state.values():
            for k in self.STAT_KEYS:
                out[k] += int(st.get(k, 0))
        return out
