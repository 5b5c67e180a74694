"""Inference: how to iterate (incremental MM, and the methods it is compared with)."""

from .compare import (
    LearningRateSearch,
    Method,
    MethodResult,
    compare_methods,
    fit_method,
    run_fit,
    tune_learning_rate,
)
from .em import EM, batch_mm
from .finite_sum_mm import FiniteSumMM
from .gradient_em import GradientEM
from .history import FitHistory
from .incremental_mm import IncrementalMM
from .mirror_descent_em import MirrorDescentEM
from .schedules import ConstantStep, ConstantThenDecay, PowerDecay
from .stability import StatisticsTruncation
from .svi_fit import SVIFit

__all__ = [
    "EM",
    "ConstantStep",
    "ConstantThenDecay",
    "FiniteSumMM",
    "FitHistory",
    "GradientEM",
    "IncrementalMM",
    "LearningRateSearch",
    "Method",
    "MethodResult",
    "MirrorDescentEM",
    "PowerDecay",
    "SVIFit",
    "StatisticsTruncation",
    "batch_mm",
    "compare_methods",
    "fit_method",
    "run_fit",
    "tune_learning_rate",
]
