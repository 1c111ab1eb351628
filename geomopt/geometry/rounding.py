"""Lean mode's rounding buffer (POET ``compensate``), one int8 code per weight entry.

A bf16 / fp16 weight rewritten from its fp32 rotation loses what rounding to its dtype drops. The buffer keeps that
part, so that the next rotation can start from the weight plus it. It is stored in units of 1/256 of the entry's
last place: ``code = round(dropped / unit)`` (to nearest, ties to even), with ``unit = max(2^e, tiny) * eps / 256``,
where 2^e is the rounded entry's binade and tiny and eps come from the weight dtype's ``finfo``. That is 8 bits
below the weight's last place at 1 byte per entry. A bf16 residual (the format before) kept about as much at 2
bytes.

What follows from the format:
- Every unit is an exact power of two, so encoding and decoding are exact in fp32.
- The dropped part is at most half a place, and the codes are clipped to [-127, 127]. So the weight plus its
  decoded code rounds back to the weight: a step that does not move the weight (lr 0) leaves the weight and the
  code as they are. Where the place below a power of two is half as wide, the code stays within half of it, and
  a tie there goes to the power of two (its mantissa is even).
- Non-finite dropped parts are coded as 0, and an infinite weight stays infinite (not NaN).

The Triton kernel ``geomopt.kernels.tile_rewrite`` computes the same codes from this module's constants.
"""
from __future__ import annotations

import torch

__all__ = ["split_rounding", "add_dropped_", "dropped_of", "codes_of", "unit_bounds", "CODE_DTYPE", "CODE_MAX",
           "UNIT_SHIFT", "BINADE_MAX"]

#: the buffer's dtype, its largest code, and the number of bits the unit lies below the weight's last place
CODE_DTYPE = torch.int8
CODE_MAX = 127
UNIT_SHIFT = 8
_EXPONENT = 0x7F800000  # fp32's exponent field: the bits of 2^e for a normal fp32 number
#: the largest binade a unit is taken from: an infinite weight has a finite unit, so its code 0 adds 0
BINADE_MAX = 2.0 ** 127


def unit_bounds(dtype: torch.dtype) -> tuple[float, float]:
    """(the smallest binade 2^e the unit is taken from, the unit's factor eps / 256) for weights of ``dtype``."""
    info = torch.finfo(dtype)
    return float(info.tiny), float(info.eps) / 2 ** UNIT_SHIFT


def _binades(low: torch.Tensor, dtype: torch.dtype, over: bool = False) -> torch.Tensor:
    """The binade 2^e of each entry of ``low`` (fp32 copies of ``dtype`` values), at least the dtype's tiny and at
    most 2^127 (the unit over ``eps / 256``): a new fp32 tensor, or written over ``low`` where ``over``."""
    tiny, _ = unit_bounds(dtype)
    bits = low.view(torch.int32)
    bits = bits.bitwise_and_(_EXPONENT) if over else bits.bitwise_and(_EXPONENT)
    return bits.view(torch.float32).clamp_(min=tiny, max=BINADE_MAX)


def _encode(dropped: torch.Tensor, binades: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes of ``dropped`` (a tensor of the caller's, overwritten): nearest, ties to even, clipped."""
    _, scale = unit_bounds(dtype)
    codes = dropped.div_(binades).mul_(1 / scale).round_().clamp_(-CODE_MAX, CODE_MAX).nan_to_num_(0.0)
    return codes.to(CODE_DTYPE)


def split_rounding(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(``x`` rounded to ``dtype``, the int8 codes of what that rounding dropped); ``x`` is fp32 or wider."""
    low = x.to(dtype)
    lowf = low.float()
    dropped = torch.sub(x, lowf)
    return low, _encode(dropped, _binades(lowf, dtype, over=True), dtype)


def add_dropped_(base: torch.Tensor, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``base`` (fp32, holding the ``dtype`` weight's values) plus what its codes say the last rounding dropped,
    in place."""
    return base.addcmul_(_binades(base, dtype), codes, value=unit_bounds(dtype)[1])


def dropped_of(codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the codes of ``weight`` (bf16 / fp16) stand for, in fp32."""
    return _binades(weight.to(torch.float32, copy=True), weight.dtype, over=True).mul_(codes).mul_(
        unit_bounds(weight.dtype)[1])


def codes_of(dropped: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The codes of a dropped part given as numbers (the bf16 buffer of older state_dicts) for ``weight``."""
    binades = _binades(weight.to(torch.float32, copy=True), weight.dtype, over=True)
    return _encode(dropped.to(torch.float32, copy=True), binades, weight.dtype)
