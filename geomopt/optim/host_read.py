"""The step's reads of device values to the host (its flags, bounds and verdicts), through one function.

Under ``FakeTensorMode`` a tensor has shape, dtype and device but no values: ``benchmarks/memory_at_scale.py``
runs the real step on such tensors to count its memory at sizes that do not fit the machine. There a read
returns what the step reads on its common path (gradients finite, weights as the optimizer left them,
inverses converged, the safeguard quiet), so the simulated step takes the path a healthy training step takes
and allocates what that path allocates.
"""
from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

__all__ = ["to_host"]


def to_host(values: torch.Tensor, clean: Any) -> Any:
    """``values.tolist()`` (one host sync); ``clean`` (the same nesting) where ``values`` is a fake tensor."""
    if is_fake(values):
        return clean
    return values.tolist()
