"""geomopt optimizers."""
from .base import FactorOptimizer
from .dlra import DLRAMomentum
from .legacy_adamw import LegacyAdamW
from .poet import POET, POETOptimizer
from .relora import ReLoRAReset

__all__ = ["DLRAMomentum", "FactorOptimizer", "LegacyAdamW", "POET", "POETOptimizer", "ReLoRAReset"]
