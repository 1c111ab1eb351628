"""A cache for the small constant tensors the step builds once per size and device (index tables, probes).

Keyed also on the active ``FakeTensorMode``: a tensor built while ``benchmarks/memory_at_scale.py`` runs the step
on fake tensors is never handed to a real step afterwards, nor a real one to a fake run.
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

from torch._guards import active_fake_mode

__all__ = ["tensor_cache", "clear_tensor_caches"]

F = TypeVar("F", bound=Callable)
_CACHES: list = []


def tensor_cache(fn: F) -> F:
    """``functools.lru_cache(maxsize=64)`` of ``fn`` (hashable positional arguments), per fake mode."""
    cached = functools.lru_cache(maxsize=64)(lambda mode, *args: fn(*args))

    @functools.wraps(fn)
    def wrapper(*args):
        return cached(active_fake_mode(), *args)

    wrapper.cache_clear = cached.cache_clear
    _CACHES.append(cached)
    return wrapper  # type: ignore[return-value]


def clear_tensor_caches() -> None:
    """Empty every cache of ``tensor_cache`` (a measurement that should count the tables its run builds)."""
    for cached in _CACHES:
        cached.cache_clear()
