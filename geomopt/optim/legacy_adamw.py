r"""``LegacyAdamW``: the AdamW of the official POET code (its ``POETAdamW``) and of transformers' old
``transformers.AdamW``, as an optimizer class that POET and ReLoRA take as ``inner=``.

It differs from ``torch.optim.AdamW`` in two places:

- ``eps`` is added to :math:`\sqrt{v_t}` before the bias correction, which then scales the step:

  .. math:: \theta_t = \theta_{t-1} - \eta\,\frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}\,
            \frac{m_t}{\sqrt{v_t} + \epsilon}

  the same as torch's update with :math:`\epsilon / \sqrt{1 - \beta_2^t}` in place of :math:`\epsilon` (a larger
  eps in the first steps: 32x at step 1 with :math:`\beta_2 = 0.999`);
- the decoupled weight decay comes after the update, from the updated value:
  :math:`\theta_t \leftarrow \theta_t - \eta \lambda\,\theta_t` (torch decays before the update).

Defaults are the official ones: ``eps=1e-6``, ``weight_decay=0``. The official optimizer also multiplies the lr of
its POET groups by ``poet_scale=0.5``; geomopt's ``lr`` is the factors' lr and ``dense_lr`` that of the other
tensors, so the official run at lr L is ``POET(lr=0.5 * L, dense_lr=L, lr_ref_block=None, inner=LegacyAdamW)``
(README, "Differences from the official code").
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from .checks import check_lr, check_number

__all__ = ["LegacyAdamW"]


class LegacyAdamW(Optimizer):
    """AdamW with ``eps`` added before the bias correction and the weight decay applied after the update.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the square root of the second moment before the bias correction (default 1e-6).
        weight_decay: decoupled weight decay, applied after the update (default 0).
        correct_bias: apply the bias correction (default True).
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True):
        check_lr(lr)
        check_number("eps", eps, low=0.0)
        check_number("weight_decay", weight_decay, low=0.0)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a pair of numbers, got {betas!r}")
        for i, beta in enumerate(betas):
            check_number(f"betas[{i}]", beta, low=0.0)
            if not beta < 1.0:
                raise ValueError(f"betas[{i}] must be < 1, got {beta!r}")
        if not isinstance(correct_bias, bool):
            raise TypeError(f"correct_bias must be a bool, got {correct_bias!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LegacyAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                                 exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                lr = float(group["lr"])  # a tensor lr too (read once per tensor)
                size = lr
                if group["correct_bias"]:
                    size = size * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-lr * group["weight_decay"])
        return loss
