"""geomopt: geometry-aware optimizers for training large language models.

Swap ``torch.optim.AdamW`` for ``geomopt.POET`` and keep the training loop.
"""
from . import geometry, init, optim
from .optim import POET, FactorOptimizer, POETOptimizer

__version__ = "0.1.0"

__all__ = ["POET", "POETOptimizer", "FactorOptimizer", "geometry", "init", "optim", "__version__"]
