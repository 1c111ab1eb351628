"""The one dispatch point between Triton kernels and the torch references.

``call(name, *args)`` runs the kernel registered under ``name`` when its first tensor argument is a
CUDA tensor of fp32/bf16/fp16 and triton is importable; otherwise the torch reference in
``geomopt.geometry``. Kernels are opt-in (``GEOMOPT_KERNELS=1``): they match the references (under Triton's
interpreter in CI, and compiled on an H100), but on the H100 most of them are slower than the torch
references (BENCHMARKS.md, "Kernels and GPU"), so the references stay the default. Kernels
register themselves from ``geomopt.kernels`` (loaded on the first CUDA call). The package imports and
works with no triton installed.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable

import torch

from .blocks import col_block_grad, rotate_cols, rotate_rows, row_block_grad
from .cayley import cayley_exact, cayley_neumann
from .qr import tall_qr

__all__ = ["REFERENCES", "register_kernel", "kernel_for", "call"]

REFERENCES: dict[str, Callable] = {
    "cayley_neumann": cayley_neumann,
    "cayley_exact": cayley_exact,
    "rotate_rows": rotate_rows,
    "rotate_cols": rotate_cols,
    "row_block_grad": row_block_grad,
    "col_block_grad": col_block_grad,
    "tall_qr": tall_qr,
}
_KERNELS: dict[str, Callable] = {}
_loaded = False


def register_kernel(name: str, fn: Callable) -> None:
    """Register a kernel with exactly the signature of ``REFERENCES[name]``."""
    if name not in REFERENCES:
        raise ValueError(f"name must be one of {sorted(REFERENCES)}, got {name!r}")
    _KERNELS[name] = fn


def _load_kernels() -> None:
    global _loaded
    _loaded = True
    if importlib.util.find_spec("triton") is None:
        return
    importlib.import_module("geomopt.kernels")


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernels_enabled() -> bool:
    """True when the environment sets GEOMOPT_KERNELS=1. Off by default: measured on an H100, most
    kernels are slower than the torch references (BENCHMARKS.md)."""
    return os.environ.get("GEOMOPT_KERNELS", "0") == "1"


def _on_kernel_device(x: torch.Tensor) -> bool:
    """Whether ``x`` lives where the kernels run (CUDA). Tests patch this to route CPU tensors to the
    kernels under Triton's interpreter."""
    return x.is_cuda


def kernel_for(name: str, x: torch.Tensor) -> Callable:
    """The function that ``call`` would run for ``name`` on tensor ``x``: a registered kernel for CUDA
    tensors of fp32/bf16/fp16 (float64 stays on the reference) when kernels are enabled."""
    if _on_kernel_device(x) and x.dtype in KERNEL_DTYPES and kernels_enabled():
        if not _loaded:
            _load_kernels()
        fn = _KERNELS.get(name)
        if fn is not None:
            return fn
    return REFERENCES[name]


def call(name: str, x: torch.Tensor, *args, **kwargs):
    """Run ``name`` on ``(x, *args)`` with the kernel or the reference, chosen by ``x``."""
    return kernel_for(name, x)(x, *args, **kwargs)
