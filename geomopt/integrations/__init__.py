"""Helpers for the places users train: the HuggingFace Trainer, accelerate, plain loops.

``make_optimizer(model, "poet:lr=3e-3,block_size=32", total_steps=1000)`` builds the (optimizer, scheduler)
pair from a short spec, ready for ``Trainer(optimizers=...)``:

- The name is one of ``geomopt.registry``'s, the same names ``geomopt-bench --optimizers`` takes: ``adamw``
  (torch.optim.AdamW), ``poet``, ``poet-lean`` and ``poet-fs`` (geomopt.POET), ``relora`` (geomopt.ReLoRAReset),
  ``dlra`` (geomopt.DLRAMomentum with ``method="adam"``) and ``dlra-hb`` (its heavy-ball), and any name
  registered since. Keys after the colon are the optimizer's keyword arguments (ints, floats, bools,
  None or strings; ``include`` and ``exclude`` always strings, one pattern each), plus ``warmup``
  (scheduler warm-up steps, default 1% of ``total_steps``) and
  ``min_lr_ratio`` (default 0.1).
- The scheduler is a LambdaLR: cosine with warm-up (``geomopt.schedules.warmup_cosine``; the first step at
  lr / ``warmup``, none at lr 0), and for ReLoRA the jagged cosine
  (``geomopt.schedules.jagged_cosine``) that drops to 0 at every reset and warms up again over
  ``restart_warmup_steps`` (default: a tenth of ``reset_every``, at most 100); the optimizer's own
  post-reset warm-up is then off, so the warm-up happens once.

For ``Trainer(optimizer_cls_and_kwargs=(geomopt.POET, {...}))`` put the model in the kwargs,
``{"model": model, "lr": 3e-3}``: the Trainer then calls ``geomopt.POET(model, lr=3e-3)``, so embeddings and
the LM head are routed to AdamW as with a plain loop. Without it the Trainer passes unnamed parameter
lists and every 2-D tensor is factorized (geomopt warns).
"""
from __future__ import annotations

from typing import Any

import torch

from .. import registry
from ..optim import ReLoRAReset
from ..schedules import jagged_cosine, warmup_cosine

__all__ = ["parse_spec", "make_optimizer"]

_PATTERNS = ("include", "exclude")  # module-name patterns: text even when they read as numbers


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,..."`` -> (name, kwargs)."""
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string like 'poet:lr=3e-3', got {type(spec).__name__}")
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    try:
        registry.get(name)
    except ValueError as err:
        raise ValueError(f"spec {spec!r}: {err}") from None
    kwargs: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq or not key.isidentifier():
            raise ValueError(f"spec {spec!r}: expected key=value, got {item!r}")
        kwargs[key] = value if key in _PATTERNS else _value(value)
    return name, kwargs


def make_optimizer(model: torch.nn.Module, spec: str, total_steps: int):
    """(optimizer, scheduler) for ``model`` from ``spec`` (see the module docstring)."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    name, kwargs = parse_spec(spec)
    warmup = kwargs.pop("warmup", max(1, total_steps // 100))
    min_ratio = kwargs.pop("min_lr_ratio", 0.1)
    entry = registry.get(name)
    jagged = issubclass(entry.cls, ReLoRAReset)
    restart_warmup = None
    if jagged:
        restart_warmup = kwargs.pop("restart_warmup_steps", None)
        kwargs["restart_warmup_steps"] = 0
    try:
        opt = entry.build(model, **kwargs)
    except TypeError as err:
        raise TypeError(f"spec {spec!r}: {err}") from None
    if jagged:
        group = opt.param_groups[0]
        if restart_warmup is None:
            restart_warmup = min(100, group["reset_every"] // 10)
        fn = jagged_cosine(total_steps=total_steps, warmup_steps=warmup, restart_every=group["reset_every"],
                           restart_warmup_steps=restart_warmup, restart_offset=group["warm_start_steps"],
                           min_lr_ratio=min_ratio, warmup_offset=1)
    else:
        fn = warmup_cosine(total_steps=total_steps, warmup_steps=warmup, min_lr_ratio=min_ratio, warmup_offset=1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, fn)
