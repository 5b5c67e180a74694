"""Inference: how to iterate (incremental MM, and the methods it is compared with)."""

from .em import EM, batch_mm
from .gradient_em import GradientEM
from .history import FitHistory
from .incremental_mm import IncrementalMM
from .mirror_descent_em import MirrorDescentEM
from .schedules import ConstantStep, PowerDecay
from .stability import StatisticsTruncation

__all__ = [
    "EM",
    "ConstantStep",
    "FitHistory",
    "GradientEM",
    "IncrementalMM",
    "MirrorDescentEM",
    "PowerDecay",
    "StatisticsTruncation",
    "batch_mm",
]
