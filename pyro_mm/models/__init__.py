"""Pyro models of softmax-gated mixtures of experts."""

from .base import MixtureOfExperts
from .features import CallableFeatures, PolynomialFeatures
from .full_covariance_gaussian_moe import FullCovarianceExpertParams, FullCovarianceGaussianMoE
from .gate_variants import HierarchicalGateParams
from .gates import Gate, HierarchicalGate, SoftmaxGate, TemperatureGate
from .gaussian_moe import GaussianMoE
from .multinomial_moe import MultinomialMoE
from .params import GaussianExpertParams, MoEParams, MultinomialExpertParams
from .priors import MoEPriors

__all__ = [
    "CallableFeatures",
    "FullCovarianceExpertParams",
    "FullCovarianceGaussianMoE",
    "GaussianExpertParams",
    "GaussianMoE",
    "Gate",
    "HierarchicalGate",
    "HierarchicalGateParams",
    "MixtureOfExperts",
    "MoEParams",
    "MoEPriors",
    "MultinomialExpertParams",
    "MultinomialMoE",
    "PolynomialFeatures",
    "SoftmaxGate",
    "TemperatureGate",
]
