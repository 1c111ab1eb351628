"""LambdaLR-compatible schedules (functions of the step that return an lr multiplier)."""
from __future__ import annotations

import math
from typing import Callable

from .optim.checks import check_number

__all__ = ["warmup_cosine", "jagged_cosine", "RAMP_TARGETS"]

RAMP_TARGETS = ("current", "end")


def warmup_cosine(*, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1,
                  warmup_offset: int = 0) -> Callable[[int], float]:
    r"""Linear warm-up over ``warmup_steps``, then a cosine decay to ``min_lr_ratio`` at ``total_steps`` (and
    flat after it). During the warm-up the multiplier at step t is (t + ``warmup_offset``) / ``warmup_steps``:
    ``0`` (default) starts at 0, as transformers' ``get_cosine_schedule_with_warmup`` and the official ReLoRA code
    do; ``1`` starts at 1 / ``warmup_steps`` and reaches 1 one step earlier, so no step runs at lr 0 (what
    ``make_optimizer`` and ``geomopt-bench`` use).

    Example:
        >>> f = warmup_cosine(total_steps=100, warmup_steps=10)
        >>> f(0), f(5), f(10), round(f(100), 4)
        (0.0, 0.5, 1.0, 0.1)
        >>> warmup_cosine(total_steps=100, warmup_steps=10, warmup_offset=1)(0)
        0.1
    """
    check_number("total_steps", total_steps, low=1, integer=True)
    check_number("warmup_steps", warmup_steps, low=0, integer=True)
    if warmup_offset not in (0, 1) or isinstance(warmup_offset, bool):
        raise ValueError(f"warmup_offset must be 0 or 1, got {warmup_offset!r}")
    if isinstance(min_lr_ratio, bool) or not isinstance(min_lr_ratio, (int, float)) or not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be a number in [0, 1], got {min_lr_ratio!r}")

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + warmup_offset) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def jagged_cosine(*, total_steps: int, warmup_steps: int = 0, restart_every: int | None = None,
                  restart_warmup_steps: int = 0, restart_offset: int = 0,
                  min_lr_ratio: float = 0.1, ramp_target: str = "current",
                  warmup_offset: int = 0) -> Callable[[int], float]:
    r"""ReLoRA's schedule (arXiv 2307.05695, Sec. 3): linear warm-up, cosine decay to ``min_lr_ratio``,
    and at every restart (steps ``restart_offset + k * restart_every``, k >= 1) a drop to 0 followed by a
    linear warm-up over ``restart_warmup_steps`` back onto the cosine curve.

    Use with ``torch.optim.lr_scheduler.LambdaLR(opt, jagged_cosine(...))`` and, for
    ``geomopt.ReLoRAReset``, ``restart_every=reset_every``, ``restart_offset=warm_start_steps`` and
    ``restart_warmup_steps=0`` in the optimizer (the schedule then does the post-reset warm-up).
    The value at step t is the multiplier of the optimizer step that follows t scheduler steps.

    ``ramp_target``: what the post-restart ramp climbs to. ``"current"`` (default): the cosine's value at the
    current step, so the ramp ends on the curve. ``"end"``: a straight line to the cosine's value at the ramp's
    last step (restart + ``restart_warmup_steps``), what the official ReLoRA code's
    ``get_cosine_schedule_with_multiple_warmups`` computes; the two differ by less than the cosine's change over
    the ramp. Between restarts it is ``warmup_cosine`` (``warmup_offset`` as there).

    Example:
        >>> f = jagged_cosine(total_steps=1000, warmup_steps=100, restart_every=200, restart_warmup_steps=20)
        >>> f(0), f(100), f(400), round(f(420), 4) == round(jagged_cosine(total_steps=1000, warmup_steps=100)(420), 4)
        (0.0, 1.0, 0.0, True)
    """
    cosine = warmup_cosine(total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
                           warmup_offset=warmup_offset)
    check_number("restart_warmup_steps", restart_warmup_steps, low=0, integer=True)
    check_number("restart_offset", restart_offset, low=0, integer=True)
    if restart_every is not None:
        check_number("restart_every", restart_every, low=1, integer=True)
    if ramp_target not in RAMP_TARGETS:
        raise ValueError(f"ramp_target must be one of {RAMP_TARGETS}, got {ramp_target!r}")

    def f(step: int) -> float:
        value = cosine(step)
        if restart_every is not None and restart_warmup_steps > 0 and step > restart_offset:
            since = (step - restart_offset) % restart_every
            if step - restart_offset >= restart_every and since < restart_warmup_steps:
                if ramp_target == "end":
                    value = cosine(step - since + restart_warmup_steps)
                value *= since / restart_warmup_steps
        return value

    return f
