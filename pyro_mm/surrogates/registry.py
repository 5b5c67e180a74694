"""Which expert surrogate fits which model: inference code asks here and never names a family.

Adding an expert family means adding a model class and a surrogate class and registering the
pair with :func:`register_expert_surrogate`; no inference code changes.
"""

from ..models.base import MixtureOfExperts
from ..models.full_covariance_gaussian_moe import FullCovarianceGaussianMoE
from ..models.gaussian_moe import GaussianMoE
from ..models.multinomial_moe import MultinomialMoE
from .full_covariance_expert import FullCovarianceExpertSurrogate
from .gaussian_expert import GaussianExpertSurrogate
from .gaussian_mixture import gaussian_mixture_statistics
from .multinomial_expert import MultinomialExpertSurrogate

__all__ = ["register_expert_surrogate", "expert_surrogate_for", "fused_statistics_for"]

_REGISTRY = {}


def register_expert_surrogate(model_class: type, surrogate_class: type) -> None:
    """Declares ``surrogate_class(**options)`` as the MM/EM expert block of ``model_class``."""
    _REGISTRY[model_class] = surrogate_class


def expert_surrogate_for(model: MixtureOfExperts, **options):
    """The expert surrogate block for ``model``, built with the regularisation ``options``."""
    for cls in type(model).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls](**options)
    raise TypeError(
        f"no MM surrogate is registered for {type(model).__name__}; "
        f"known model classes: {sorted(c.__name__ for c in _REGISTRY)}"
    )


def fused_statistics_for(model: MixtureOfExperts, expert_surrogate):
    """The one-pass statistics function of ``model`` and its ``expert_surrogate``
    (:func:`~pyro_mm.surrogates.gaussian_mixture.gaussian_mixture_statistics`), or ``None``
    when the block-by-block :func:`~pyro_mm.surrogates.mixture.mixture_statistics` must run:
    another expert family, different gate and expert regressors, or one expert."""
    if (
        type(expert_surrogate) is GaussianExpertSurrogate
        and model.shares_features
        and model.num_experts >= 2
    ):
        return gaussian_mixture_statistics
    return None


register_expert_surrogate(GaussianMoE, GaussianExpertSurrogate)
register_expert_surrogate(MultinomialMoE, MultinomialExpertSurrogate)
register_expert_surrogate(FullCovarianceGaussianMoE, FullCovarianceExpertSurrogate)
