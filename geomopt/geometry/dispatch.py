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

import contextlib
import importlib
import importlib.util
import math
import os
from typing import Callable, Iterator

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
from .tiles import tile_grads, tile_rewrite

__all__ = ["REFERENCES", "register_reference", "register_kernel", "kernel_for", "call", "can", "limit",
           "record_launches", "note_launch", "Launch", "kernels_on_cpu"]

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
    # POET's two passes over the weights, grouped (``geometry.tiles``): both sides' block gradients with the finite
    # flags and row checksums from one read of G and W, and the two-sided rewrite of every tile
    "tile_grads": tile_grads,
    "tile_rewrite": tile_rewrite,
}
_REFERENCE_CAN: dict[str, frozenset[str]] = {"rotate_rows": frozenset({"in_place"}),
                                             "rotate_cols": frozenset({"in_place"}),
                                             "cayley_neumann": frozenset({"with_bound"})}
_KERNELS: dict[str, Callable] = {}
_KERNEL_CAN: dict[str, frozenset[str]] = {}
_KERNEL_LIMITS: dict[str, dict[str, int]] = {}
_loaded = False


def register_reference(name: str, fn: Callable, can: tuple[str, ...] = ()) -> None:
    """Register the torch reference of a stage that lives outside ``geomopt.geometry`` (a stage of an optimizer's
    step, such as POET's fused factor update); ``can`` as for ``register_kernel``."""
    REFERENCES[name] = fn
    _REFERENCE_CAN[name] = frozenset(can)


def register_kernel(name: str, fn: Callable, can: tuple[str, ...] = (), limits: dict[str, int] | None = None) -> None:
    """Register a kernel with exactly the signature of ``REFERENCES[name]``; ``can`` declares what it can do
    besides (see the module docstring; a kernel that declares ``"in_place"`` registers ``name + "_"`` too);
    ``limits`` what it takes at most (``"block"``: the largest block size whose tiles fit on chip), which callers
    read with ``limit``."""
    if name not in REFERENCES:
        raise ValueError(f"name must be one of {sorted(REFERENCES)}, got {name!r}")
    _KERNELS[name] = fn
    _KERNEL_CAN[name] = frozenset(can)
    _KERNEL_LIMITS[name] = dict(limits or {})


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


_ON_CPU = [False]


def _on_kernel_device(x: torch.Tensor) -> bool:
    """Whether ``x`` lives where the kernels run (CUDA; the CPU too inside ``kernels_on_cpu``)."""
    return x.is_cuda or (_ON_CPU[0] and x.device.type == "cpu")


@contextlib.contextmanager
def kernels_on_cpu() -> Iterator[None]:
    """Within the block, the kernels are enabled and take CPU tensors too: they run under Triton's interpreter,
    which must have been switched on (``TRITON_INTERPRET=1``) before triton was first imported. For the tests and
    ``benchmarks/step_cost.py --kernels``, which count a kernel step's launches and bytes on a machine without a
    GPU; the interpreter's speed means nothing."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernels_on_cpu needs Triton's interpreter: set TRITON_INTERPRET=1 before starting python")
    before, _ON_CPU[0] = (_ON_CPU[0], os.environ.get("GEOMOPT_KERNELS")), True
    os.environ["GEOMOPT_KERNELS"] = "1"
    try:
        yield
    finally:
        _ON_CPU[0] = before[0]
        if before[1] is None:
            os.environ.pop("GEOMOPT_KERNELS", None)
        else:
            os.environ["GEOMOPT_KERNELS"] = before[1]


def kernel_for(name: str, x: torch.Tensor) -> Callable:
    """The function that ``call`` would run for ``name`` on tensor ``x``: a registered kernel for CUDA
    tensors of fp32/bf16/fp16 (float64 stays on the reference) when kernels are enabled."""
    x = x[0] if isinstance(x, (list, tuple)) else x  # a grouped stage: the first of its tensors decides
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


def limit(name: str, x: torch.Tensor, what: str) -> int | None:
    """The limit ``what`` that the implementation ``call(name, x, ...)`` would run declares (None: no limit; the
    references have none)."""
    if kernel_for(name, x) is REFERENCES[name]:
        return None
    return _KERNEL_LIMITS.get(name, {}).get(what)


def call(name: str, x: torch.Tensor, *args, **kwargs):
    """Run ``name`` on ``(x, *args)`` with the kernel or the reference, chosen by ``x``."""
    return kernel_for(name, x)(x, *args, **kwargs)


class Launch:
    """One kernel launch as a recorder sees it: the kernel's name and the bytes of the distinct tensors it reads or
    writes (each counted once, at its elements times their size: tensors reached through a table of pointers
    included, the tables too)."""

    __slots__ = ("name", "bytes")

    def __init__(self, name: str, nbytes: int):
        self.name, self.bytes = name, nbytes

    def __repr__(self) -> str:
        return f"Launch({self.name!r}, {self.bytes})"


_RECORDERS: list[list[Launch]] = []


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Within the block, every kernel launch is appended to the yielded list (``benchmarks/step_cost.py`` counts
    them with the step's aten ops)."""
    out: list[Launch] = []
    _RECORDERS.append(out)
    try:
        yield out
    finally:
        _RECORDERS.remove(out)


def note_launch(name: str, tensors: list[torch.Tensor]) -> None:
    """Called by a kernel launcher before it launches: its name and every tensor it touches."""
    if not _RECORDERS:
        return
    seen: dict[tuple, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            seen[key] = math.prod(n for n, st in zip(t.shape, t.stride()) if st) * t.element_size()
    launch = Launch(name, sum(seen.values()))
    for rec in _RECORDERS:
        rec.append(launch)
