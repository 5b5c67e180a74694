"""Pyro models of softmax-gated mixtures of experts."""

from .base import MixtureOfExperts
from .features import CallableFeatures, PolynomialFeatures
from .gaussian_moe import GaussianMoE
from .params import GaussianExpertParams, MoEParams

__all__ = [
    "CallableFeatures",
    "GaussianExpertParams",
    "GaussianMoE",
    "MixtureOfExperts",
    "MoEParams",
    "PolynomialFeatures",
]
