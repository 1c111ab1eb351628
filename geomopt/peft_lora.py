"""Helpers for models that carry peft LoRA layers (frozen base, compute savings in the forward)."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["merge_and_reinit"]


@torch.no_grad()
def merge_and_reinit(model: nn.Module) -> int:
    """ReLoRA's merge-and-reinit on peft LoRA layers: W_base += scaling * B A, then A is redrawn
    (Kaiming uniform, a = sqrt 5) and B zeroed, so the model's function is unchanged and the next cycle
    starts from a zero update. Works on every module with peft's ``lora_A`` / ``lora_B`` /
    ``scaling`` / ``base_layer`` attributes (Linear adapters). Returns the number of adapters reset.
    Pair it with pruning or resetting the optimizer state of the LoRA parameters.
    """
    count = 0
    for module in model.modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module.base_layer
        if not isinstance(base, nn.Linear):
            raise TypeError(f"merge_and_reinit supports LoRA on nn.Linear, got {type(base).__name__}")
        for name in lora_a:
            a, b = lora_a[name].weight, lora_b[name].weight
            delta = (b.float() @ a.float()) * float(module.scaling[name])
            if getattr(module, "fan_in_fan_out", False):
                delta = delta.T
            base.weight.add_(delta.to(base.weight.dtype))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
            count += 1
    return count
