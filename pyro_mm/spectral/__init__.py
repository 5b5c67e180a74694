"""The spectral (tensor) method of Makkuva et al. for softmax-gated mixtures of GLM experts:
experts from cross-moment tensors, the gate by EM with the experts fixed; and a spectral
initialisation of :class:`~pyro_mm.models.GaussianMoE` for incremental MM and EM."""

from .experts import SpectralExperts, spectral_experts
from .gate_em import GateEMResult, ball_softmax_regression, fit_gate_em
from .gaussianity import (
    NonGaussianInputWarning,
    standard_gaussian_pvalues,
    warn_if_not_standard_gaussian,
)
from .init import spectral_init
from .links import LINKS, Link, as_link, standard_normal_quadrature
from .metrics import (
    best_regressor_permutation,
    gating_fit,
    permutation_free_error,
    regressor_fit,
)
from .pipeline import SpectralMoEFit, fit_spectral_moe
from .scores import GaussianMixtureScore
from .synthetic import GLMMoETruth, glm_moe_truth, sample_glm_moe
from .tensor_power import TensorDecomposition, tensor_power_method
from .transforms import TransformConstants, transform_constants

__all__ = [
    "GLMMoETruth",
    "GateEMResult",
    "GaussianMixtureScore",
    "LINKS",
    "Link",
    "NonGaussianInputWarning",
    "SpectralExperts",
    "SpectralMoEFit",
    "TensorDecomposition",
    "TransformConstants",
    "as_link",
    "ball_softmax_regression",
    "best_regressor_permutation",
    "fit_gate_em",
    "fit_spectral_moe",
    "gating_fit",
    "glm_moe_truth",
    "permutation_free_error",
    "regressor_fit",
    "sample_glm_moe",
    "spectral_experts",
    "spectral_init",
    "standard_gaussian_pvalues",
    "standard_normal_quadrature",
    "tensor_power_method",
    "transform_constants",
    "warn_if_not_standard_gaussian",
]
