"""What the kernels of ``geomopt.kernels`` share: on the host, tile sizes, the precision of fp32 products, tables of
host numbers (pointers, offsets) on the device, and the launch itself (noted for ``dispatch.record_launches`` and
run outside any torch dispatch mode, since Triton's interpreter moves its arguments with torch calls); in the
kernels, the tile product (``dot``) and the bit patterns of the row checksums (``bits``)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _disable_current_modes

from ..geometry.dispatch import note_launch

__all__ = ["pow2", "warps", "precision", "table", "pointers", "launch", "dot", "bits", "INTERPRETED"]

#: whether the kernels run under Triton's interpreter (on the CPU, for the tests)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2(b: int, low: int = 16) -> int:
    """The tile side that holds ``b`` (a power of two, at least ``low``: ``tl.dot`` takes 16 and up)."""
    return max(low, 1 << max(0, int(b) - 1).bit_length())


def warps(tile: int) -> int:
    """Warps per program for square tiles of side ``tile`` held whole in registers."""
    return 4 if tile <= 32 else 8 if tile <= 64 else 16


def precision(device: torch.device, *dtypes: torch.dtype) -> str:
    """``tl.dot``'s input precision: 16-bit inputs take the tensor cores as they are; fp32 inputs take three TF32
    products ("tf32x3", about fp32's accuracy at tensor-core speed) where the GPU has TF32 (compute capability 8.0
    and up), IEEE fp32 elsewhere and under the interpreter (which computes in fp32 whatever it is told)."""
    if any(d == torch.float32 for d in dtypes):
        if INTERPRETED or device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
            return "ieee"
        return "tf32x3"
    return "tf32"


def table(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D tensor of host numbers on ``device``: staged in pinned memory and copied without waiting on a GPU
    (a plain copy from pageable memory would synchronize the stream). Noted as a launch (``"copy_to_device"``),
    which it is on a GPU, wherever it runs."""
    host = torch.tensor(list(values), dtype=dtype)
    note_launch("copy_to_device", [host])
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def pointers(tensors: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """The data pointers of ``tensors`` (0 for None) as an int64 table on ``device``."""
    return table([0 if t is None else t.data_ptr() for t in tensors], torch.int64, device)


def launch(name: str, kernel: Any, grid: tuple[int, ...], touched: Sequence[torch.Tensor | None], *args: Any,
           **meta: Any) -> None:
    """Launch ``kernel[grid](*args, **meta)``, noted as ``name`` with the tensors it reads or writes (``touched``:
    its tensor arguments and those reached through its tables)."""
    note_launch(name, [t for t in touched if t is not None])
    if not all(grid):
        return
    with _disable_current_modes():
        kernel[grid](*args, **meta)


@triton.jit
def dot(a, b, WIDE: tl.constexpr, PREC: tl.constexpr):
    """a @ b accumulated in fp32; ``WIDE``: the operands converted to fp32 first (see ``tile_grads.wide``)."""
    if WIDE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def bits(x, BITS: tl.constexpr):
    """The entries' bit patterns as int32, as the row checksums read them (16-bit ones sign-extended)."""
    if BITS == 32:
        return x.to(tl.int32, bitcast=True)
    return x.to(tl.int16, bitcast=True).to(tl.int32)
