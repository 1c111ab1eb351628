"""The one dispatch point between Triton kernels and the torch references.

``call(name, *args)`` runs the kernel registered under ``name`` when its first tensor argument is a
CUDA tensor of fp32/bf16/fp16 and triton is importable; otherwise the torch reference in
``geomopt.geometry``. Each implementation declares what it can do beyond its signature (``can``): the
references of ``rotate_rows`` / ``rotate_cols`` also rotate in place, allocation-free (``"in_place"``, through
``rotate_rows_`` / ``rotate_cols_``), and that of ``cayley_neumann`` also returns the safeguard's bound from
the same products (``"with_bound"``, through ``cayley_neumann_with_bound``). Callers ask ``can``; they never
compare implementations. Kernels are opt-in (``GEOMOPT_KERNELS=1``): they match the references (under Triton's
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

from .blocks import (
    col_block_grad,
    col_block_grads,
    rotate_cols,
    rotate_cols_,
    rotate_cols_stacked_,
    rotate_rows,
    rotate_rows_,
    row_block_grad,
)
from .cayley import cayley_exact, cayley_neumann, cayley_neumann_with_bound, cayley_series
from .qr import tall_qr

__all__ = ["REFERENCES", "register_kernel", "kernel_for", "call", "can"]

REFERENCES: dict[str, Callable] = {
    "cayley_neumann": cayley_neumann,
    "cayley_exact": cayley_exact,
    "cayley_series": cayley_series,
    "rotate_rows": rotate_rows,
    "rotate_cols": rotate_cols,
    "row_block_grad": row_block_grad,
    "col_block_grad": col_block_grad,
    "tall_qr": tall_qr,
    # weights of one shape stacked (L, m, n): the column side (the row side is row_block_grad / rotate_rows on
    # the (L * m, n) view, see ``blocks.stacked_rows``)
    "col_block_grads": col_block_grads,
    "rotate_cols_stacked_": rotate_cols_stacked_,
    # what the references can do besides: the in-place rotations (on a tensor the caller owns, with work tensors
    # from ``blocks.rotation_buffers``) and the map with its bound
    "rotate_rows_": rotate_rows_,
    "rotate_cols_": rotate_cols_,
    "cayley_neumann_with_bound": cayley_neumann_with_bound,
}
_REFERENCE_CAN: dict[str, frozenset[str]] = {"rotate_rows": frozenset({"in_place"}),
                                             "rotate_cols": frozenset({"in_place"}),
                                             "cayley_neumann": frozenset({"with_bound"})}
_KERNELS: dict[str, Callable] = {}
_KERNEL_CAN: dict[str, frozenset[str]] = {}
_loaded = False


def register_kernel(name: str, fn: Callable, can: tuple[str, ...] = ()) -> None:
    """Register a kernel with exactly the signature of ``REFERENCES[name]``; ``can`` declares what it can do
    besides (see the module docstring; a kernel that declares ``"in_place"`` registers ``name + "_"`` too)."""
    if name not in REFERENCES:
        raise ValueError(f"name must be one of {sorted(REFERENCES)}, got {name!r}")
    _KERNELS[name] = fn
    _KERNEL_CAN[name] = frozenset(can)


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


def can(name: str, x: torch.Tensor, capability: str) -> bool:
    """Whether the implementation that ``call(name, x, ...)`` would run declares ``capability``."""
    kernel = kernel_for(name, x) is not REFERENCES[name]
    return capability in (_KERNEL_CAN.get(name, frozenset()) if kernel else _REFERENCE_CAN.get(name, frozenset()))


def call(name: str, x: torch.Tensor, *args, **kwargs):
    """Run ``name`` on ``(x, *args)`` with the kernel or the reference, chosen by ``x``."""
    return kernel_for(name, x)(x, *args, **kwargs)
