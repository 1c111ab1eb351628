"""Lean mode's rounding compensation (POET ``compensate``): a bf16 / fp16 weight rewritten from its fp32 rotation
keeps, in a bf16 buffer, what the rounding dropped (``geometry.tiles.split_rounding``), and the next rotation starts
from the weight plus it."""
from __future__ import annotations

from ..geometry.tiles import split_rounding

__all__ = ["split_rounding", "write_compensated"]


def write_compensated(targets: list, low: list, comps: list, dropped: list) -> None:
    """The rewrite's commit: the rounded weights and their buffers, copied in place (nothing allocated)."""
    import torch

    torch._foreach_copy_(targets, low)
    torch._foreach_copy_(comps, dropped)
