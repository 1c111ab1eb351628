"""Per-parameter state layouts: each optimizer declares what a weight's state holds, and this module checks a
loaded state against that declaration (keys, types, shapes, dtypes, permutations) and restores what torch's
``Optimizer.load_state_dict`` casts away.

A layout is a dict from state key to a spec (``Count()``, ``Perm(n)``, ``Floats(shape)``, ``Inner(shape)`` ...);
``check(layout, state, where)`` raises ValueError naming the key, what it holds and what it should hold. Keys a
layout does not name are allowed (a newer version's additions); ``Optional`` keys may be missing.
"""
from __future__ import annotations

from typing import Any

import torch

from ..geometry.rounding import CODE_DTYPE
from .sharded import is_dtensor, to_local

__all__ = ["factor_dtype", "mix_seed", "Spec", "Count", "Bound", "Choice", "Flag", "Seed", "Perm", "RngState", "Floats",
           "Rounding", "FloatsList", "Inner", "InnerList", "Settings", "Optional", "Step", "check", "copy_state",
           "adamw_layout", "ADAM_KEYS"]


def factor_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype of the factors of weight ``p``: fp32 for bf16/fp16 weights, else the weight's own."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def mix_seed(seed: int, count: int, stride: int) -> int:
    """A seed for draw ``count`` of a stream seeded ``seed`` (a positive 63-bit int): the per-parameter seeds of
    an optimizer (``count`` the parameter's index) and ReLoRA's draws of A (``count`` the weight's draws so far)
    use it with their own odd ``stride``, so the streams do not line up."""
    return (seed * 0x9E3779B97F4A7C15 + count * stride + 1) % (2**63 - 1)


def _what(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return f"{type(v).__name__} {v!r}"[:80]


class Spec:
    """One state entry's declaration; ``check`` returns None or what is wrong."""

    def check(self, value: Any) -> str | None:
        raise NotImplementedError


class Count(Spec):
    """An int >= 0 (a counter), or a 0-d integer tensor holding one (a capturable step counts on the device)."""

    def check(self, value):
        if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
                and value.dtype != torch.bool:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return "must be an int >= 0"
        return None


class Bound(Spec):
    """A float >= 0 (a norm bound)."""

    def check(self, value):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        return None if ok else "must be a number >= 0"


class Seed(Spec):
    """Any int."""

    def check(self, value):
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an int"


class Choice(Spec):
    """One of the given strings."""

    def __init__(self, choices: tuple[str, ...]):
        self.choices = tuple(choices)

    def check(self, value):
        return None if isinstance(value, str) and value in self.choices else f"must be one of {self.choices}"


class Flag(Spec):
    def check(self, value):
        return None if isinstance(value, bool) else "must be a bool"


class Step(Spec):
    """An optimizer step count: a number or a one-element tensor, >= 0 (torch saves both)."""

    def check(self, value):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.is_complex() or is_dtensor(value):
                return "must be a number or a one-element real tensor"
            value = float(value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number or a one-element tensor"
        return None if value >= 0 else "must be >= 0"


class Perm(Spec):
    """A permutation of range(n): an integer tensor of n distinct entries in [0, n) (a DTensor's local piece:
    distinct entries in range)."""

    def __init__(self, n: int):
        self.n = n

    def check(self, value):
        if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.is_complex() \
                or value.dtype == torch.bool:
            return f"must be an integer tensor (a permutation of range({self.n}))"
        if value.dim() != 1 or value.shape[0] != self.n:
            return f"must have {self.n} entries (a permutation of range({self.n}))"
        local = to_local(value).to("cpu", torch.int64)
        if local.numel() and (int(local.min()) < 0 or int(local.max()) >= self.n):
            return f"has entries outside [0, {self.n})"
        if local.unique().numel() != local.numel():
            return "has repeated entries: not a permutation"
        return None


class RngState(Spec):
    """A torch.Generator state (a uint8 tensor that ``Generator.set_state`` accepts)."""

    def check(self, value):
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
            return "must be a 1-D uint8 tensor (a torch.Generator state)"
        try:
            torch.Generator().set_state(value.cpu())
        except (RuntimeError, ValueError):
            return "is not a torch.Generator state"
        return None


class Floats(Spec):
    """A floating-point tensor of the given shape (of a DTensor: its global shape)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)

    def check(self, value):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return f"must be a floating-point tensor of shape {self.shape}"
        if tuple(value.shape) != self.shape:
            return f"must have shape {self.shape}"
        return None


class Rounding(Spec):
    """Lean mode's rounding buffer: int8 codes of the given shape (``geometry.rounding``), or the floating-point
    buffer of an older version (turned into codes at the next step)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)

    def check(self, value):
        if not isinstance(value, torch.Tensor) or not (value.dtype == CODE_DTYPE or value.is_floating_point()):
            return f"must be an {str(CODE_DTYPE).removeprefix('torch.')} tensor of codes (or an older floating-point " \
                   f"buffer) of shape {self.shape}"
        if tuple(value.shape) != self.shape:
            return f"must have shape {self.shape}"
        return None


class FloatsList(Spec):
    def __init__(self, shapes: list[tuple[int, ...]]):
        self.shapes = [tuple(s) for s in shapes]

    def check(self, value):
        if not isinstance(value, (list, tuple)) or len(value) != len(self.shapes):
            return f"must be a list of {len(self.shapes)} floating-point tensors of shapes {self.shapes}"
        got = [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in value]
        if got != self.shapes or not all(v.is_floating_point() for v in value):
            return f"must hold floating-point tensors of shapes {self.shapes}, got {got}"
        return None


class Inner(Spec):
    """The inner optimizer's state of one factor: a dict whose tensors are scalars (step counts) or shaped like
    the factor; with ``keys`` (torch Adam's), a non-empty state must hold exactly those moments."""

    def __init__(self, shape: tuple[int, ...], keys: tuple[str, ...] | None = None):
        self.shape, self.keys = tuple(shape), keys

    def check(self, value):
        if not isinstance(value, dict):
            return "must be a dict (an optimizer state)"
        if self.keys is not None and value and not set(self.keys) <= set(value):
            return f"must hold {list(self.keys)} (torch Adam's state) or nothing, has {sorted(value)}"
        for k, v in value.items():
            if k == "step":
                bad = Step().check(v)
                if bad:
                    return f"[{k!r}] {bad}"
            elif isinstance(v, torch.Tensor) and v.numel() > 1 and tuple(v.shape) != self.shape:
                return f"[{k!r}] has shape {tuple(v.shape)}, the factor's is {self.shape}"
            elif isinstance(v, torch.Tensor) and not (v.is_floating_point() or v.numel() <= 1):
                return f"[{k!r}] must be a floating-point tensor"
        return None


class InnerList(Spec):
    def __init__(self, shapes: list[tuple[int, ...]], keys: tuple[str, ...] | None = None):
        self.items = [Inner(s, keys) for s in shapes]

    def check(self, value):
        if not isinstance(value, (list, tuple)) or len(value) != len(self.items):
            return f"must be a list of {len(self.items)} optimizer states"
        for i, (spec, v) in enumerate(zip(self.items, value)):
            bad = spec.check(v)
            if bad:
                return f"[{i}] {bad}"
        return None


class Settings(Spec):
    """The group settings a weight's factors were built with: a dict of numbers, strings, bools and None."""

    def check(self, value):
        plain = (bool, int, float, str, type(None))
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, plain) for k, v in value.items())
        return None if ok else "must be a dict of settings (numbers, strings, bools, None)"


class Optional(Spec):
    """The key may be missing; when present it must satisfy ``spec``."""

    def __init__(self, spec: Spec):
        self.spec = spec

    def check(self, value):
        return self.spec.check(value)


ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


def adamw_layout(shape: tuple[int, ...]) -> dict[str, Spec]:
    """The state of a tensor the optimizer steps with AdamW."""
    return {"step": Step(), "exp_avg": Floats(shape), "exp_avg_sq": Floats(shape)}


def check(layout: dict[str, Spec], state: dict[str, Any], where: str) -> None:
    """Raise ValueError when ``state`` does not fit ``layout`` (``where``: which weight, for the message)."""
    for key, spec in layout.items():
        if key not in state:
            if isinstance(spec, Optional):
                continue
            raise ValueError(f"{where} lacks {key!r}: the state_dict comes from another optimizer, mode or "
                             "version")
        bad = spec.check(state[key])
        if bad:
            raise ValueError(f"{where}: {key!r} {bad}, got {_what(state[key])}")


def copy_state(value: Any, device: torch.device, key: Any = None) -> Any:
    """Deep copy of a state value, tensors moved to ``device`` with their saved dtype kept (torch's
    ``load_state_dict`` casts every state tensor but ``step`` to the parameter's dtype: permutations, generator
    states and fp32 factors of bf16 weights must survive)."""
    if isinstance(value, torch.Tensor):
        if key == "step":  # torch keeps non-capturable step counters where they were saved
            return value.clone()
        return value.to(device=device, copy=True)
    if isinstance(value, dict):
        return {k: copy_state(v, device, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(copy_state(v, device) for v in value)
    return value
