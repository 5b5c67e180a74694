"""Pyro models of softmax-gated mixtures of experts."""

from .base import MixtureOfExperts
from .features import CallableFeatures, PolynomialFeatures
from .gaussian_moe import GaussianMoE
from .multinomial_moe import MultinomialMoE
from .params import GaussianExpertParams, MoEParams, MultinomialExpertParams

__all__ = [
    "CallableFeatures",
    "GaussianExpertParams",
    "GaussianMoE",
    "MixtureOfExperts",
    "MoEParams",
    "MultinomialExpertParams",
    "MultinomialMoE",
    "PolynomialFeatures",
]
