"""geomopt optimizers."""
from .base import FactorOptimizer
from .dlra import DLRAMomentum
from .poet import POET, POETOptimizer
from .relora import ReLoRAReset

__all__ = ["DLRAMomentum", "FactorOptimizer", "POET", "POETOptimizer", "ReLoRAReset"]
