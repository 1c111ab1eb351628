"""geomopt optimizers."""
from .base import FactorOptimizer
from .poet import POET, POETOptimizer
from .relora import ReLoRAReset

__all__ = ["FactorOptimizer", "POET", "POETOptimizer", "ReLoRAReset"]
