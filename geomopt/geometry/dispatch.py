"""The one dispatch point between Triton kernels and the torch references.

``call(name, *args)`` runs the kernel registered under ``name`` when its first tensor argument is a
CUDA tensor and triton is importable; otherwise the torch reference in ``geomopt.geometry``. Kernels
register themselves from ``geomopt.kernels`` (loaded on the first CUDA call). The package imports and
works with no triton installed.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

import torch

from .blocks import col_block_grad, rotate_cols, rotate_rows, row_block_grad
from .cayley import cayley_exact, cayley_neumann

__all__ = ["REFERENCES", "register_kernel", "kernel_for", "call"]

REFERENCES: dict[str, Callable] = {
    "cayley_neumann": cayley_neumann,
    "cayley_exact": cayley_exact,
    "rotate_rows": rotate_rows,
    "rotate_cols": rotate_cols,
    "row_block_grad": row_block_grad,
    "col_block_grad": col_block_grad,
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


def kernel_for(name: str, x: torch.Tensor) -> Callable:
    """The function that ``call`` would run for ``name`` on tensor ``x``."""
    if x.is_cuda:
        if not _loaded:
            _load_kernels()
        fn = _KERNELS.get(name)
        if fn is not None:
            return fn
    return REFERENCES[name]


def call(name: str, x: torch.Tensor, *args, **kwargs):
    """Run ``name`` on ``(x, *args)`` with the kernel or the reference, chosen by ``x``."""
    return kernel_for(name, x)(x, *args, **kwargs)
