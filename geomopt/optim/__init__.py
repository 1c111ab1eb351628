"""geomopt optimizers."""
from .base import FactorOptimizer
from .poet import POET, POETOptimizer

__all__ = ["FactorOptimizer", "POET", "POETOptimizer"]
