"""Lean mode's rounding compensation (POET ``compensate``): a bf16 / fp16 weight rewritten from its fp32 rotation
keeps, in a bf16 buffer, what the rounding dropped, and the next rotation starts from the weight plus it."""
from __future__ import annotations

import torch

__all__ = ["split_rounding", "write_compensated"]


def split_rounding(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(``x`` rounded to ``dtype``, what that rounding dropped, in bf16 rounded towards zero). Towards zero, the
    kept part is never larger than half a unit of the rounded value, so rounding their sum again gives the rounded
    value back: a step that does not move the weight (lr 0) leaves it as it is."""
    low = x.to(dtype)
    dropped = x - low.to(x.dtype)
    if dropped.dtype != torch.float32:
        dropped = dropped.float()
    dropped.view(torch.int32).bitwise_and_(-65536)  # bf16 is fp32's upper half: truncation rounds towards zero
    return low, dropped.to(torch.bfloat16)


def write_compensated(targets: list, low: list, comps: list, dropped: list) -> None:
    """The rewrite's commit: the rounded weights and their buffers, copied in place (nothing allocated)."""
    torch._foreach_copy_(targets, low)
    torch._foreach_copy_(comps, dropped)
