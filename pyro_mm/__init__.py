"""pyro_mm: incremental stochastic majorization-minimization for softmax-gated mixtures of
experts, as a Pyro plugin."""

from .infer import ConstantStep, FitHistory, IncrementalMM, PowerDecay
from .models import GaussianMoE, MoEParams, PolynomialFeatures

__version__ = "0.1.0"

__all__ = [
    "ConstantStep",
    "FitHistory",
    "GaussianMoE",
    "IncrementalMM",
    "MoEParams",
    "PolynomialFeatures",
    "PowerDecay",
    "__version__",
]
