"""geomopt: geometry-aware optimizers for training large language models.

Swap ``torch.optim.AdamW`` for ``geomopt.POET`` (or ``geomopt.ReLoRAReset``,
``geomopt.DLRAMomentum``) and keep the training loop.
"""
from . import geometry, init, nn, optim, peft_lora, registry, schedules
from .in_backward import StepInBackward, step_in_backward
from .optim import POET, DLRAMomentum, FactorOptimizer, POETOptimizer, ReLoRAReset

__version__ = "0.1.0"

__all__ = ["POET", "DLRAMomentum", "POETOptimizer", "ReLoRAReset", "FactorOptimizer", "geometry", "init", "nn", "optim",
           "peft_lora", "registry", "schedules", "step_in_backward", "StepInBackward", "__version__"]
