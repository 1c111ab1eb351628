"""The optimizers geomopt knows by name, in one table: ``make_optimizer``'s spec strings
(``"poet-lean:lr=1e-3"``), ``geomopt-bench --optimizers`` and the generic tests (tests/optim_table.py wraps it,
as torch's test suite wraps ``optim_db``) all read it, so an optimizer registered here is built, benchmarked
and tested without another table to teach.

Each entry is an ``OptimizerSpec``: the class and the keyword arguments that make the variant, the lr
``geomopt-bench`` starts it at, the settings it takes from ``geomopt-bench``'s flags, and the settings the
generic tests use on their small problems.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .nn import convert
from .optim import POET, DLRAMomentum, FactorOptimizer, ReLoRAReset
from .optim.functional import fused_supported

__all__ = ["OptimizerSpec", "REGISTRY", "register", "get", "names"]


@dataclass(frozen=True)
class OptimizerSpec:
    """One named optimizer. ``takes_model``: the class is given the model (geomopt's optimizers route by module
    names), else its parameters (torch's). ``bench_args(args, model)``: the settings the variant takes from
    ``geomopt-bench``'s flags. ``test_kwargs``: the generic tests' settings (small blocks and cycles, an lr for
    their problems); ``test_tiny``: what a weight with a side of 1 needs on top."""
    name: str
    cls: type
    kwargs: dict = field(default_factory=dict)
    label: str = ""
    bench_lr: float = 1e-3
    bench_args: Callable[[argparse.Namespace, torch.nn.Module], dict] | None = None
    test_kwargs: dict = field(default_factory=dict)
    test_tiny: dict = field(default_factory=dict)
    #: what the variant does to ``geomopt-bench``'s model before it builds the optimizer (e.g. factorize its layers)
    bench_model: Callable[[torch.nn.Module, argparse.Namespace], None] | None = None

    @property
    def takes_model(self) -> bool:
        return issubclass(self.cls, FactorOptimizer)

    def build(self, model: torch.nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
        """The optimizer of ``model``: the variant's settings, then ``kwargs`` over them."""
        target = model if self.takes_model else model.parameters()
        return self.cls(target, **{**self.kwargs, **kwargs})

    def build_for_bench(self, model: torch.nn.Module, lr: float, args: argparse.Namespace,
                        **overrides: Any) -> torch.optim.Optimizer:
        """The optimizer ``geomopt-bench`` trains ``model`` with (the variant's ``bench_model`` applied to it first),
        ``overrides`` over the settings its flags give."""
        if self.bench_model is not None:
            self.bench_model(model, args)
        extra = self.bench_args(args, model) if self.bench_args is not None else {}
        return self.build(model, lr=lr, **{**extra, **overrides})


REGISTRY: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec`` under its name (ValueError if the name is taken or not a plain lower-case name)."""
    if not spec.name or spec.name != spec.name.strip().lower() or any(c in spec.name for c in ":,+ "):
        raise ValueError(f"optimizer name must be lower case without ':', ',', '+' or spaces, got {spec.name!r}")
    if spec.name in REGISTRY:
        raise ValueError(f"optimizer name {spec.name!r} is registered already")
    REGISTRY[spec.name] = spec
    return spec


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> OptimizerSpec:
    """The spec named ``name`` (ValueError naming the registered ones otherwise)."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"the optimizer must be one of {', '.join(REGISTRY)}, got {name!r}")
    return spec


def _poet_args(args: argparse.Namespace, blocks: bool = True) -> dict[str, Any]:
    """POET's settings from ``geomopt-bench``'s flags: ``block_size`` (``blocks``), ``merge_every``, and
    ``lr_ref_block`` (``none``: None), ``neumann_terms`` and ``exact_merge`` where a flag was given; otherwise
    POET's own defaults."""
    out: dict[str, Any] = dict(block_size=args.block_size) if blocks else {}
    out["merge_every"] = args.merge_every
    if args.lr_ref_block is not None:
        out["lr_ref_block"] = None if args.lr_ref_block == "none" else args.lr_ref_block
    if args.neumann_terms is not None:
        out["neumann_terms"] = args.neumann_terms
    if args.exact_merge:
        out["exact_merge"] = True
    return out


def _relora_args(args: argparse.Namespace) -> dict[str, Any]:
    return dict(rank=args.rank, alpha=args.rank, reset_every=args.reset_every,
                restart_warmup_steps=args.restart_warmup, warm_start_steps=args.warm_start)


def _dlra_args(args: argparse.Namespace) -> dict[str, Any]:
    return dict(rank=args.rank, retraction=getattr(args, "retraction", "svd"))


_POET_TESTS = dict(lr=1e-2, block_size=4, merge_every=7)
_RANK1 = dict(rank=1)

for _spec in (
    # the baseline: torch's fused AdamW where the device has the kernel (the strongest AdamW a user has)
    OptimizerSpec("adamw", torch.optim.AdamW, dict(weight_decay=0.01), "torch AdamW (fused where supported)",
                  bench_args=lambda a, m: dict(fused=fused_supported(list(m.parameters())))),
    OptimizerSpec("adamw-fused", torch.optim.AdamW, dict(weight_decay=0.01, fused=True), "torch AdamW, fused"),
    OptimizerSpec("adamw-foreach", torch.optim.AdamW, dict(weight_decay=0.01, foreach=True),
                  "torch AdamW, multi-tensor"),
    OptimizerSpec("adamw-loop", torch.optim.AdamW, dict(weight_decay=0.01, foreach=False),
                  "torch AdamW, one tensor at a time"),
    OptimizerSpec("poet", POET, {}, "POET, paper mode (W0 kept)", 3e-3, lambda a, m: _poet_args(a),
                  _POET_TESTS),
    OptimizerSpec("poet-lean", POET, dict(store_base=False), "POET, lean mode (no W0)", 3e-3,
                  lambda a, m: _poet_args(a), _POET_TESTS),
    OptimizerSpec("poet-fs", POET, dict(block_size=0.5, mode="fs"), "POET-FS (one block of half of each side)",
                  3e-3, lambda a, m: _poet_args(a, blocks=False), dict(lr=1e-2, merge_every=7)),
    OptimizerSpec("relora", ReLoRAReset, {}, "ReLoRA (merge, prune and reset every reset_every steps)", 2e-3,
                  lambda a, m: _relora_args(a), dict(lr=1e-2, rank=2, alpha=4, reset_every=7, restart_warmup_steps=2),
                  _RANK1),
    OptimizerSpec("dlra", DLRAMomentum, dict(method="adam"), "DLRA momentum, Adam on the manifold", 3e-3,
                  lambda a, m: _dlra_args(a), dict(lr=1e-2, rank=2), _RANK1),
    OptimizerSpec("dlra-hb", DLRAMomentum, dict(method="heavy_ball"), "DLRA momentum, geometric heavy-ball", 1e-1,
                  lambda a, m: _dlra_args(a), dict(lr=5e-2, rank=2), _RANK1),
    # the routed layers as geomopt.nn.LowRankLinear of the bench's rank: weights, gradients and forward in factors
    OptimizerSpec("dlra-factored", DLRAMomentum, dict(method="adam"),
                  "DLRA momentum (Adam) on LowRankLinear layers (the model stores and computes U S V^T)", 3e-3,
                  lambda a, m: _dlra_args(a), dict(lr=1e-2, rank=2), _RANK1,
                  bench_model=lambda m, a: convert(m, a.rank)),
):
    register(_spec)
