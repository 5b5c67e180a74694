"""MM surrogate blocks: per block, pure functions ``statistics`` and ``solve``."""

from .gate import (
    GateStatistics,
    SoftmaxGateSurrogate,
    gate_statistics,
    gate_surrogate_value,
    solve_gate,
)
from .gate_variants import (
    HierarchicalGateStatistics,
    HierarchicalGateSurrogate,
    TemperatureGateSurrogate,
)
from .gaussian_expert import (
    GaussianExpertStatistics,
    GaussianExpertSurrogate,
    gaussian_expert_statistics,
    gaussian_expert_surrogate_value,
    solve_gaussian_experts,
)
from .mixture import MoEStatistics, e_step, mixture_statistics, solve_mixture
from .multinomial_expert import (
    MultinomialExpertStatistics,
    MultinomialExpertSurrogate,
    multinomial_expert_statistics,
    multinomial_expert_surrogate_value,
    solve_multinomial_experts,
)
from .penalties import CoefficientPenalty, InverseGammaPrior
from .registry import (
    expert_surrogate_for,
    expert_surrogate_options,
    gate_surrogate_for,
    register_expert_surrogate,
    register_gate_surrogate,
)
from .report import SolveReport
from .softmax_bound import (
    GATE_BOUNDS,
    SOFTMAX_BOUNDS,
    JaakkolaJordanBound,
    kronecker_quadratic_value,
    softmax_curvature,
    solve_kronecker,
)
from .softmax_regression import (
    SoftmaxRegressionResult,
    fit_softmax_regression,
    softmax_regression_loss,
)

__all__ = [
    "CoefficientPenalty",
    "GATE_BOUNDS",
    "GateStatistics",
    "JaakkolaJordanBound",
    "InverseGammaPrior",
    "GaussianExpertStatistics",
    "GaussianExpertSurrogate",
    "HierarchicalGateStatistics",
    "HierarchicalGateSurrogate",
    "MoEStatistics",
    "MultinomialExpertStatistics",
    "MultinomialExpertSurrogate",
    "SOFTMAX_BOUNDS",
    "SoftmaxGateSurrogate",
    "SoftmaxRegressionResult",
    "SolveReport",
    "TemperatureGateSurrogate",
    "e_step",
    "expert_surrogate_for",
    "expert_surrogate_options",
    "fit_softmax_regression",
    "gate_statistics",
    "gate_surrogate_for",
    "gate_surrogate_value",
    "gaussian_expert_statistics",
    "gaussian_expert_surrogate_value",
    "kronecker_quadratic_value",
    "mixture_statistics",
    "multinomial_expert_statistics",
    "multinomial_expert_surrogate_value",
    "register_expert_surrogate",
    "register_gate_surrogate",
    "softmax_curvature",
    "softmax_regression_loss",
    "solve_gate",
    "solve_gaussian_experts",
    "solve_kronecker",
    "solve_mixture",
    "solve_multinomial_experts",
]
