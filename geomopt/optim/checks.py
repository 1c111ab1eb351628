"""Argument and input checks shared by the optimizers: each raises TypeError/ValueError naming the argument and
the value, and none of them changes anything (the step runs them all before it touches a tensor)."""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["check_number", "check_lr", "check_hyper", "check_param", "check_grad", "check_rank", "finite_flags",
           "lr_value", "TORCH_FLAGS", "flag_defaults", "dense_defaults", "dense_hyper"]

#: torch.optim's implementation flags, geomopt's defaults for them
TORCH_FLAGS = {"maximize": False, "foreach": None, "fused": None, "capturable": False, "differentiable": False}


def flag_defaults(maximize: bool, foreach: bool | None, fused: bool | None, capturable: bool,
                  differentiable: bool) -> dict[str, Any]:
    return dict(maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable)


def dense_defaults(lr: Any, dense_lr: float | None, dense_weight_decay: float | None) -> dict[str, Any]:
    """The group settings of the AdamW-routed tensors: ``dense_lr`` becomes ``dense_lr_scale``, its ratio to
    ``lr`` (so that an LR scheduler, which sets ``lr``, drives both in proportion); ``dense_weight_decay`` None
    is the group's ``weight_decay``."""
    scale = 1.0
    if dense_lr is not None:
        check_number("dense_lr", dense_lr, low=0.0)
        base = lr_value(lr)
        if not (isinstance(base, (int, float)) and base > 0):
            raise ValueError(f"dense_lr={dense_lr!r} is kept in proportion to lr, which must then be > 0, got "
                             f"lr={lr!r} (or set a param group's 'dense_lr_scale' directly)")
        scale = dense_lr / base
    return dict(dense_lr_scale=scale, dense_weight_decay=dense_weight_decay)


def dense_hyper(group: dict[str, Any], lr: float) -> tuple[float, float]:
    """(lr, weight decay) of a group's AdamW-routed tensors at this step's ``lr``."""
    wd = group.get("dense_weight_decay")
    return lr * group.get("dense_lr_scale", 1.0), group["weight_decay"] if wd is None else wd


def check_number(name: str, value: Any, *, low: float | None = None, low_open: bool = False,
                 integer: bool = False) -> None:
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        kind = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")


def lr_value(lr: Any) -> float:
    """The learning rate as a float (a tensor lr, as torch allows, is read once per step)."""
    return float(lr) if isinstance(lr, torch.Tensor) else lr


def check_lr(lr: Any) -> None:
    """A number >= 0, or a one-element real floating tensor holding one (torch's tensor lr)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise TypeError(f"lr as a tensor must have one floating-point element, got a {lr.dtype} tensor of "
                            f"shape {tuple(lr.shape)}")
        check_number("lr", float(lr), low=0.0)
        return
    check_number("lr", lr, low=0.0)


def check_hyper(group: dict[str, Any], capturable: bool = False) -> None:
    """The hyperparameters every geomopt optimizer shares (lr, betas, eps, weight_decay, torch's flags);
    ``capturable``: whether the optimizer has a capturable step (it checks what that step needs itself)."""
    check_lr(group["lr"])
    check_number("eps", group["eps"], low=0.0)
    check_number("weight_decay", group["weight_decay"], low=0.0)
    check_number("dense_lr_scale", group.get("dense_lr_scale", 1.0), low=0.0)
    if group.get("dense_weight_decay") is not None:
        check_number("dense_weight_decay", group["dense_weight_decay"], low=0.0)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise TypeError(f"betas must be a pair of floats, got {betas!r}")
    for i, b in enumerate(betas):
        check_number(f"betas[{i}]", b, low=0.0)
        if b >= 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r}")
    if not isinstance(group["maximize"], bool):
        raise TypeError(f"maximize must be a bool, got {group['maximize']!r}")
    for key in ("foreach", "fused"):
        if group[key] is not None and not isinstance(group[key], bool):
            raise TypeError(f"{key} must be None or a bool, got {group[key]!r}")
    if group["foreach"] and group["fused"]:
        raise ValueError("foreach and fused cannot both be True")
    if not isinstance(group["capturable"], bool):
        raise TypeError(f"capturable must be a bool, got {group['capturable']!r}")
    if group["capturable"] and not capturable:
        raise ValueError(f"capturable={group['capturable']!r} is not supported: this optimizer's step reads values "
                         "on the host (non-finite checks, fingerprints), so it cannot be captured in a CUDA graph "
                         "(POET's lean mode has a capturable step)")
    if group["differentiable"] is not False:
        raise ValueError(f"differentiable={group['differentiable']!r} is not supported: a geomopt step rewrites the "
                         "weights in place from factors it owns, outside autograd")


def check_param(p: Any) -> None:
    """A real floating-point leaf tensor."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"params: expected Tensors, got an item of type {type(p).__name__}")
    if p.is_complex():
        raise TypeError(f"params: a {p.dtype} tensor of shape {tuple(p.shape)} cannot be optimized: geomopt takes "
                        "real floating-point parameters (view a complex one as real with torch.view_as_real)")
    if not p.is_floating_point():
        raise TypeError(f"params: a {p.dtype} tensor of shape {tuple(p.shape)} cannot be optimized "
                        "(floating-point parameters only)")
    if not (p.is_leaf or p.retains_grad):
        raise ValueError(f"params: a non-leaf tensor of shape {tuple(p.shape)} cannot be optimized")


def check_grad(owner: str, p: torch.Tensor) -> None:
    """``p.grad`` is something the step can take: dense (strided), real floating-point, p's shape and device (any
    floating dtype: the factors read it in their own dtype, AdamW casts it to the parameter's)."""
    g = p.grad
    where = f"parameter of shape {tuple(p.shape)}"
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError(f"{owner} does not support sparse gradients ({where}, a {g.layout} gradient)")
    if g.is_complex():
        raise TypeError(f"{owner} does not support complex gradients ({where}, a {g.dtype} gradient)")
    if not g.is_floating_point():
        raise TypeError(f"{owner}: the gradient of a {where} is a {g.dtype} tensor; floating-point gradients only")
    if tuple(g.shape) != tuple(p.shape) or g.device != p.device:
        raise ValueError(f"{owner}: the gradient of a {where} on {p.device} has shape {tuple(g.shape)} on "
                         f"{g.device}")


def check_rank(group: dict[str, Any], factorized: list[torch.Tensor]) -> None:
    """``group["rank"]`` is an int >= 1 and at most min(m, n) of every factorized weight."""
    check_number("rank", group["rank"], low=1, integer=True)
    for p in factorized:
        if group["rank"] > min(p.shape):
            raise ValueError(f"rank={group['rank']} exceeds min(m, n)={min(p.shape)} of a routed weight of "
                             f"shape {tuple(p.shape)}; pass rank <= {min(p.shape)} or exclude that weight")


def finite_flags(tensors: list[torch.Tensor]) -> torch.Tensor:
    """1-D bool tensor on the tensors' device: whether ``tensors[i]`` holds no NaN or Inf. Nothing is read on
    the host.

    One ``torch._foreach_norm`` per dtype instead of an ``isfinite().all()`` per tensor: a NaN or Inf entry always
    makes the 2-norm non-finite, and the norms of fp32 and narrower tensors are accumulated in fp64, where finite
    entries cannot overflow them, so the flags are exact. fp64 tensors, whose norm could overflow from finite
    entries, are checked entry by entry."""
    if not tensors:
        return torch.zeros(0, dtype=torch.bool)
    device = tensors[0].device
    norms: list[Any] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, ix in by_dtype.items():
        if dtype == torch.float64:  # a 0 for a finite tensor, NaN otherwise
            for i in ix:
                norms[i] = torch.where(torch.isfinite(tensors[i]).all(), 0.0, float("nan"))
            continue
        for i, n in zip(ix, torch._foreach_norm([tensors[i] for i in ix], 2, dtype=torch.float64)):
            norms[i] = n
    return torch.stack([n.to(device) for n in norms]).isfinite()
