r"""Plain Adam / AdamW updates: the functions the optimizer classes call (no hidden ``torch.optim`` instance).

``adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, denoms, *, ...)`` updates everything in
place with keyword-only hyperparameters, as ``torch.optim.adamw``'s functional form does, on one of three paths:

- ``"single"``: a loop over tensors, op for op what ``torch.optim.AdamW`` (foreach and fused off) computes;
- ``"foreach"``: the same update with ``torch._foreach_*`` ops over all tensors at once;
- ``"fused"``: torch's fused kernel (``torch._fused_adamw_`` / ``torch._fused_adam_``), one call per device and
  dtype. torch's CPU kernel ignores strides, so a tensor that is not contiguous (parameter, gradient or moment)
  always takes the single-tensor path.

Every path is allocation-free once ``prepare_grads`` (maximize, L2 decay, dtype) has run and ``denoms`` (one
buffer per tensor, ``new_denoms``) exist: a step that runs out of memory does so before it changes anything.

.. math:: m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2,\quad
          \theta_t = \theta_{t-1}(1 - \eta\lambda) - \eta\,\frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)}
          + \epsilon}

(AdamW, decoupled decay; with ``decoupled=False`` the decay is added to the gradient instead, torch's Adam).
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["IMPLS", "adam", "adam_state", "prepare_grads", "new_denoms", "choose_impl", "fused_supported",
           "prepared_adam"]

IMPLS = ("single", "foreach", "fused")


def fused_supported(tensors: list[torch.Tensor]) -> bool:
    """Whether torch has a fused Adam kernel for every tensor's device (floating-point tensors only)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return all(t.device.type in devices and t.is_floating_point() for t in tensors)


def choose_impl(tensors: list[torch.Tensor], *, foreach: bool | None, fused: bool | None, own: bool) -> str:
    """The path for ``tensors``: the flags when set; by default torch's choice for a user's tensors (foreach when
    all are on CUDA, else the loop) and, for tensors geomopt owns (``own``: contiguous factors), the fused kernel
    where torch has one (the same update in one call instead of a dozen per tensor)."""
    if fused:
        return "fused"
    if foreach:
        return "foreach"
    if fused is None and own and tensors and fused_supported(tensors):
        return "fused"
    if foreach is None and tensors and all(t.is_cuda for t in tensors):
        return "foreach"
    return "single"


def adam_state(t: torch.Tensor, amsgrad: bool = False, fused: bool = False) -> dict[str, Any]:
    """What torch Adam/AdamW (not capturable) put in a tensor's state before its first update."""
    from torch.optim.optimizer import _get_scalar_dtype

    def zeros() -> torch.Tensor:
        return torch.zeros_like(t, memory_format=torch.preserve_format)

    step = (torch.zeros((), dtype=_get_scalar_dtype(is_fused=True), device=t.device) if fused
            else torch.tensor(0.0, dtype=_get_scalar_dtype()))
    st = dict(step=step, exp_avg=zeros(), exp_avg_sq=zeros())
    if amsgrad:
        st["max_exp_avg_sq"] = zeros()
    return st


def prepare_grads(params: list[torch.Tensor], grads: list[torch.Tensor], *, maximize: bool, weight_decay: float,
                  decoupled: bool) -> list[torch.Tensor]:
    """The gradients the update reads: cast to the parameter's dtype, negated for ``maximize``, plus the L2 decay
    term for Adam (``decoupled=False``). Allocates; reads the parameters before any of them changes."""
    out = []
    for p, g in zip(params, grads):
        g = g if g.dtype == p.dtype else g.to(p.dtype)
        if maximize:
            g = -g
        if weight_decay != 0 and not decoupled:
            g = g.add(p, alpha=weight_decay)
        out.append(g)
    return out


def new_denoms(exp_avg_sqs: list[torch.Tensor], impl: str) -> list[torch.Tensor] | None:
    """The buffers the single and foreach paths write the denominator into (the fused kernel needs none)."""
    return None if impl == "fused" else [torch.empty_like(v) for v in exp_avg_sqs]


def adam(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
         exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor] | None, steps: list[torch.Tensor],
         denoms: list[torch.Tensor] | None, *, counts: list[float], lr: float, beta1: float, beta2: float,
         eps: float, weight_decay: float, decoupled: bool, amsgrad: bool, impl: str,
         found_inf: torch.Tensor | None = None) -> None:
    """One Adam / AdamW update of every tensor, in place (``grads`` from ``prepare_grads``, ``denoms`` from
    ``new_denoms``; ``steps``: the step counts, 0-d tensors, incremented here; ``counts``: their values after
    this step, read beforehand, so that the update reads nothing back from a tensor). ``found_inf`` (fused path
    only): a 0-d float tensor on the device, nonzero to leave every tensor as it is, step counts included,
    decided on the device (torch's GradScaler protocol)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    maxs = max_exp_avg_sqs if amsgrad else [None] * len(params)
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
                 amsgrad=amsgrad)
    if impl == "fused":
        if not all(t.is_contiguous() for x in (params, grads, exp_avgs, exp_avg_sqs) for t in x):
            raise ValueError("the fused path takes contiguous tensors only (prepared_adam routes the others)")
        _fused(params, grads, exp_avgs, exp_avg_sqs, maxs, steps, found_inf, **hyper)
    elif found_inf is not None:
        raise ValueError(f"found_inf is taken by the fused path only, not by {impl!r}")
    elif impl == "foreach":
        _foreach(params, grads, exp_avgs, exp_avg_sqs, maxs, steps, denoms, counts, **hyper)
    else:
        _single(params, grads, exp_avgs, exp_avg_sqs, maxs, steps, denoms, counts, **hyper)


def _corrections(step: float, beta1: float, beta2: float) -> tuple[float, float]:
    return 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5


def _single(params, grads, exp_avgs, exp_avg_sqs, maxs, steps, denoms, counts, *, lr, beta1, beta2, eps,
            weight_decay, decoupled, amsgrad) -> None:
    for p, g, m, v, vmax, step, denom, t in zip(params, grads, exp_avgs, exp_avg_sqs, maxs, steps, denoms, counts):
        step += 1
        if weight_decay != 0 and decoupled:
            p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc1, bc2_sqrt = _corrections(t, beta1, beta2)
        if amsgrad:
            torch.maximum(vmax, v, out=vmax)
        torch.sqrt(vmax if amsgrad else v, out=denom)
        denom.div_(bc2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bc1)


def _foreach(params, grads, exp_avgs, exp_avg_sqs, maxs, steps, denoms, counts, *, lr, beta1, beta2, eps,
             weight_decay, decoupled, amsgrad) -> None:
    if not params:
        return
    torch._foreach_add_(steps, 1)
    if weight_decay != 0 and decoupled:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if amsgrad:
        torch._foreach_maximum_(maxs, exp_avg_sqs)
    corr = [_corrections(t, beta1, beta2) for t in counts]
    torch._foreach_copy_(denoms, maxs if amsgrad else exp_avg_sqs)
    torch._foreach_sqrt_(denoms)
    torch._foreach_div_(denoms, [c[1] for c in corr])
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, [-lr / c[0] for c in corr])


def _fused(params, grads, exp_avgs, exp_avg_sqs, maxs, steps, found_inf, *, lr, beta1, beta2, eps, weight_decay,
           decoupled, amsgrad) -> None:
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    by_key: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        by_key.setdefault((p.device, p.dtype), []).append(i)
    for (device, _), ix in by_key.items():
        st = [steps[i] for i in ix]
        if any(s.device != device or s.dtype != torch.float32 for s in st):
            raise ValueError(f"fused Adam needs fp32 step counts on {device}, as prepared_adam makes them")
        torch._foreach_add_(st, 1)  # the kernel reads the incremented counts, as torch's own fused path does
        kernel([params[i] for i in ix], [grads[i] for i in ix], [exp_avgs[i] for i in ix],
               [exp_avg_sqs[i] for i in ix], [maxs[i] for i in ix] if amsgrad else [], st, amsgrad=amsgrad, lr=lr,
               beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=False,
               found_inf=None if found_inf is None else found_inf.to(device))
        if found_inf is not None:  # a skipped update does not count (as torch's fused Adam undoes it)
            torch._foreach_sub_(st, [found_inf.to(device)] * len(st))


def _ready_step(state: dict[str, Any], p: torch.Tensor, impl: str) -> torch.Tensor:
    """The state's step count as the path wants it (a 0-d tensor: fp32 on the parameter's device for the fused
    kernel, a CPU tensor otherwise); a number (an older state_dict) or a tensor elsewhere is converted, value kept."""
    from torch.optim.optimizer import _get_scalar_dtype

    step = state["step"]
    if impl == "fused":
        ok = isinstance(step, torch.Tensor) and step.device == p.device and step.dtype == torch.float32
        if not ok:
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
    elif not isinstance(step, torch.Tensor) or step.device.type != "cpu":
        state["step"] = torch.tensor(float(step), dtype=_get_scalar_dtype())
    return state["step"]


def prepared_adam(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]], *,
                  impl: str, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                  decoupled: bool, amsgrad: bool, maximize: bool, found_inf: torch.Tensor | None = None):
    """Everything ``adam`` needs allocated now (gradients, buffers, step counts), and the update itself returned
    as a function of no arguments that only writes in place: call it to commit. ``found_inf``: see ``adam`` (the
    fused path, contiguous tensors only)."""
    parts = {impl: list(range(len(params)))}
    if found_inf is not None and (impl != "fused" or not all(t.is_contiguous() for p, g, s in zip(
            params, grads, states) for t in (p, g, s["exp_avg"], s["exp_avg_sq"]))):
        raise ValueError("a step decided on the device (found_inf) runs torch's fused kernel on contiguous tensors "
                         "only")
    if impl == "fused":  # torch's CPU kernel ignores strides: those tensors take the loop
        strided = [i for i, (p, g, s) in enumerate(zip(params, grads, states))
                   if not all(t.is_contiguous() for t in (p, g, s["exp_avg"], s["exp_avg_sq"]))]
        parts = {"fused": [i for i in parts["fused"] if i not in strided], "single": strided}
    calls = []
    for path, ix in parts.items():
        ps, st = [params[i] for i in ix], [states[i] for i in ix]
        ready = prepare_grads(ps, [grads[i] for i in ix], maximize=maximize, weight_decay=weight_decay,
                              decoupled=decoupled or path == "fused")  # the fused kernel decays by itself
        sqs = [s["exp_avg_sq"] for s in st]
        steps = [_ready_step(s, p, path) for s, p in zip(st, ps)]
        calls.append((path, ps, ready, [s["exp_avg"] for s in st], sqs,
                      [s["max_exp_avg_sq"] for s in st] if amsgrad else None, steps, new_denoms(sqs, path),
                      [float(s) + 1 for s in steps] if path != "fused" else []))
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
                 amsgrad=amsgrad)

    def commit() -> None:
        for path, *tensors, counts in calls:
            if tensors[0]:
                adam(*tensors, counts=counts, **hyper, impl=path, found_inf=found_inf)

    return commit

