"""Inference: how to iterate (incremental MM, and the methods it is compared with)."""

from .history import FitHistory
from .incremental_mm import IncrementalMM
from .schedules import ConstantStep, PowerDecay

__all__ = ["ConstantStep", "FitHistory", "IncrementalMM", "PowerDecay"]
