"""Wall-clock timing for the benchmarks (``geomopt-bench`` and every script in benchmarks/): the device synced
before and after each timed call, warm-up calls that are not counted, and the median with its spread."""
from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import torch

__all__ = ["sync", "Clock", "Timing", "timed"]


def sync(device: Any) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Seconds since the device last went idle: ``start()`` and ``lap()`` sync the device first, so queued GPU work
    lands in the interval it belongs to."""

    def __init__(self, device: Any):
        self.device = device
        self.t0 = 0.0

    def start(self) -> "Clock":
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def lap(self) -> float:
        """Seconds since ``start`` or the last ``lap``; the next interval starts now."""
        sync(self.device)
        now = time.perf_counter()
        out, self.t0 = now - self.t0, now
        return out


class Timing(NamedTuple):
    """Seconds per call over the timed calls: median, fastest, slowest, and all of them."""
    median: float
    low: float
    high: float
    times: list

    def row(self) -> dict[str, float]:
        """As JSON fields, in milliseconds."""
        return dict(median_ms=1000 * self.median, low_ms=1000 * self.low, high_ms=1000 * self.high)


def timed(fn: Callable[[], Any], device: Any, reps: int, warmup: int = 2,
          before: Callable[[], Any] | None = None) -> Timing:
    """Time ``fn()`` ``reps`` times after ``warmup`` uncounted calls; ``before()`` (untimed) runs ahead of every
    call (e.g. to set a gradient)."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    clock = Clock(device)
    times = []
    for i in range(warmup + reps):
        if before is not None:
            before()
        clock.start()
        fn()
        if i >= warmup:
            times.append(clock.lap())
    ordered = sorted(times)
    return Timing(ordered[len(ordered) // 2], ordered[0], ordered[-1], times)
