"""Lean mode's rounding compensation (POET ``compensate``): a bf16 / fp16 weight rewritten from its fp32 rotation
keeps, as int8 codes, what the rounding dropped (``geometry.rounding``), and the next rotation starts from the weight
plus it."""
from __future__ import annotations

import torch

from ..geometry.rounding import CODE_DTYPE, add_dropped_, codes_of, split_rounding

__all__ = ["split_rounding", "add_dropped_", "codes_of", "write_compensated", "CODE_DTYPE"]


def write_compensated(targets: list, low: list, comps: list, dropped: list) -> None:
    """The rewrite's commit: the rounded weights and their buffers, copied in place (nothing allocated)."""
    torch._foreach_copy_(targets, low)
    torch._foreach_copy_(comps, dropped)
