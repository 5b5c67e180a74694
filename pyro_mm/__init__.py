"""pyro_mm: incremental stochastic majorization-minimization for softmax-gated mixtures of
experts, as a Pyro plugin."""

from .infer import (
    EM,
    ConstantStep,
    ConstantThenDecay,
    FiniteSumMM,
    FitHistory,
    GradientEM,
    IncrementalMM,
    MirrorDescentEM,
    PowerDecay,
    SVIFit,
    compare_methods,
)
from .models import (
    FullCovarianceGaussianMoE,
    GaussianMoE,
    HierarchicalGate,
    MoEParams,
    MoEPriors,
    MultinomialMoE,
    PolynomialFeatures,
    SoftmaxGate,
    TemperatureGate,
)

__version__ = "0.1.0"

__all__ = [
    "EM",
    "ConstantStep",
    "ConstantThenDecay",
    "FiniteSumMM",
    "FitHistory",
    "FullCovarianceGaussianMoE",
    "GaussianMoE",
    "GradientEM",
    "HierarchicalGate",
    "IncrementalMM",
    "MirrorDescentEM",
    "MoEParams",
    "MoEPriors",
    "MultinomialMoE",
    "PolynomialFeatures",
    "PowerDecay",
    "SVIFit",
    "SoftmaxGate",
    "TemperatureGate",
    "__version__",
    "compare_methods",
]
