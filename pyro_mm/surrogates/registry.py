"""Which expert surrogate and which gate block fit which model: inference code asks here and
never names an expert family or a gate kind.

Adding an expert family means adding a model class and a surrogate class and registering the
pair with :func:`register_expert_surrogate`; adding a gate kind means adding a
:class:`~pyro_mm.models.gates.Gate` and its block and registering them with
:func:`register_gate_surrogate`. No inference code changes.
"""

import inspect

from ..models.base import MixtureOfExperts
from ..models.full_covariance_gaussian_moe import FullCovarianceGaussianMoE
from ..models.gates import HierarchicalGate, SoftmaxGate, TemperatureGate
from ..models.gaussian_moe import GaussianMoE
from ..models.multinomial_moe import MultinomialMoE
from .full_covariance_expert import FullCovarianceExpertSurrogate
from .gate import SoftmaxGateSurrogate
from .gate_variants import HierarchicalGateSurrogate, TemperatureGateSurrogate
from .gaussian_expert import GaussianExpertSurrogate
from .gaussian_mixture import gaussian_mixture_statistics
from .multinomial_expert import MultinomialExpertSurrogate

__all__ = [
    "register_expert_surrogate",
    "expert_surrogate_for",
    "expert_surrogate_options",
    "expert_surrogate_with_bound",
    "register_gate_surrogate",
    "gate_surrogate_for",
    "fused_statistics_for",
]

_REGISTRY = {}
_GATE_REGISTRY = {}


def register_expert_surrogate(model_class: type, surrogate_class: type) -> None:
    """Declares ``surrogate_class(**options)`` as the MM/EM expert block of ``model_class``."""
    _REGISTRY[model_class] = surrogate_class


def expert_surrogate_for(model: MixtureOfExperts, **options):
    """The expert surrogate block for ``model``, built with the regularisation ``options``; a
    block with a ridge that can leave the intercept alone is told the model's column of ones
    (``unpenalised_column``)."""
    if "unpenalised_column" in expert_surrogate_options(model):
        options.setdefault("unpenalised_column", model.expert_features.intercept_column)
    return expert_surrogate_class(model)(**options)


def expert_surrogate_options(model: MixtureOfExperts) -> frozenset:
    """The names of the options the expert surrogate of ``model`` accepts (e.g. ``"bound"``
    only for experts with a softmax)."""
    return frozenset(inspect.signature(expert_surrogate_class(model)).parameters)


def expert_surrogate_with_bound(model: MixtureOfExperts, expert_bound: str = None, **options):
    """:func:`expert_surrogate_for` with the curvature bound ``expert_bound`` of experts that have
    a softmax (``None``: the expert block's default).

    :raises ValueError: for a bound given to experts without a softmax (or unknown to them),
        before anything is built.
    """
    if expert_bound is None:
        return expert_surrogate_for(model, **options)
    if "bound" not in expert_surrogate_options(model):
        raise ValueError(
            f"expert_bound applies to experts with a softmax (MultinomialMoE); the experts "
            f"of {type(model).__name__} have no softmax bound"
        )
    return expert_surrogate_for(model, bound=expert_bound, **options)


def expert_surrogate_class(model: MixtureOfExperts) -> type:
    """The registered expert surrogate class of ``model`` (the nearest in its class's MRO)."""
    for cls in type(model).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    raise TypeError(
        f"no MM surrogate is registered for {type(model).__name__}; "
        f"known model classes: {sorted(c.__name__ for c in _REGISTRY)}"
    )


def register_gate_surrogate(gate_class: type, surrogate_class: type) -> None:
    """Declares ``surrogate_class(gate)`` as the MM/EM gate block of gates of ``gate_class``."""
    _GATE_REGISTRY[gate_class] = surrogate_class


def gate_surrogate_for(model: MixtureOfExperts):
    """The gate block of ``model``'s gate (the interface of
    :class:`~pyro_mm.surrogates.gate.SoftmaxGateSurrogate`: statistics, solve, surrogate value,
    exact M-step)."""
    for cls in type(model.gate).__mro__:
        if cls in _GATE_REGISTRY:
            return _GATE_REGISTRY[cls](model.gate)
    raise TypeError(
        f"no gate block is registered for {type(model.gate).__name__}; "
        f"known gates: {sorted(c.__name__ for c in _GATE_REGISTRY)}"
    )


def fused_statistics_for(model: MixtureOfExperts, expert_surrogate, gate_surrogate=None):
    """The one-pass statistics function of ``model``, its ``expert_surrogate`` and its
    ``gate_surrogate`` (default: the softmax gate's block)
    (:func:`~pyro_mm.surrogates.gaussian_mixture.gaussian_mixture_statistics`), or ``None``
    when the block-by-block :func:`~pyro_mm.surrogates.mixture.mixture_statistics` must run:
    another expert family, another gate than the one-level softmax, different gate and expert
    regressors, or one expert."""
    if gate_surrogate is None:
        gate_surrogate = gate_surrogate_for(model)
    if (
        type(expert_surrogate) is GaussianExpertSurrogate
        and type(gate_surrogate) is SoftmaxGateSurrogate
        and model.shares_features
        and model.num_experts >= 2
    ):
        return gaussian_mixture_statistics
    return None


register_expert_surrogate(GaussianMoE, GaussianExpertSurrogate)
register_expert_surrogate(MultinomialMoE, MultinomialExpertSurrogate)
register_expert_surrogate(FullCovarianceGaussianMoE, FullCovarianceExpertSurrogate)

register_gate_surrogate(SoftmaxGate, SoftmaxGateSurrogate)
register_gate_surrogate(TemperatureGate, TemperatureGateSurrogate)
register_gate_surrogate(HierarchicalGate, HierarchicalGateSurrogate)
