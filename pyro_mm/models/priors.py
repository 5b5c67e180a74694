"""Priors on the parameters of a mixture of experts.

A model built with priors runs its ``forward`` under :func:`pyro.poutine.lift`: every parameter
with a prior becomes a latent sample site of the same name, so a guide from
:mod:`pyro.infer.autoguide` fits it with SVI (``AutoDelta``: MAP; ``AutoNormal``,
``AutoMultivariateNormal``: variational Bayes). The module's own parameters then hold a point
estimate (written by the fitting method, e.g. the guide's median), which ``log_prob``,
``predict`` and the metrics use. Without priors the parameters stay Pyro params and SVI with an
empty guide is maximum likelihood.
"""

from typing import Callable, Dict, Mapping, Union

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin
from torch.distributions import Distribution, constraints

__all__ = ["MoEPriors", "PriorSpec", "check_prior_spec", "prior_distributions"]


class MoEPriors:
    r"""Independent priors on every parameter of a mixture of experts, chosen by constraint.

    * real-valued parameters (gate weights, expert coefficients):
      ``Normal(0, weight_scale)`` element-wise;
    * positive parameters (expert variances):
      ``InverseGamma(variance_concentration, variance_rate)`` element-wise (the conjugate prior
      of a Gaussian variance; the defaults give a prior mean of 1 and a weight of about three
      pseudo-observations, negligible against a data set of hundreds of rows);
    * ``overrides`` replaces the prior of named parameters.

    Any expert family gets these defaults without code of its own, as long as its parameters are
    real or positive; a parameter with another constraint needs an override.

    :param float weight_scale: standard deviation of the normal prior on real parameters.
    :param float variance_concentration: shape ``a`` of the inverse-gamma prior.
    :param float variance_rate: rate (scale) ``b`` of the inverse-gamma prior.
    :param dict overrides: ``{parameter name: prior}``; a prior is a Pyro distribution (scalar,
        expanded to the parameter's shape, or already of the parameter's shape; a plain one is
        rebuilt in the parameter's dtype) or a callable ``value -> distribution`` given the
        parameter's current value (shape and dtype).
    """

    def __init__(
        self,
        weight_scale: float = 10.0,
        variance_concentration: float = 2.0,
        variance_rate: float = 1.0,
        overrides: Mapping = None,
    ):
        for name, value in [
            ("weight_scale", weight_scale),
            ("variance_concentration", variance_concentration),
            ("variance_rate", variance_rate),
        ]:
            if not float(value) > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        self.weight_scale = float(weight_scale)
        self.variance_concentration = float(variance_concentration)
        self.variance_rate = float(variance_rate)
        self.overrides = dict(overrides or {})

    def default_prior(self, name: str, value: torch.Tensor, constraint) -> Distribution:
        """The scalar prior of parameter ``name`` from its constraint (before any override)."""
        constraint = _unwrap(constraint)
        scalar = lambda v: torch.tensor(v, dtype=value.dtype, device=value.device)  # noqa: E731
        if _is_real(constraint):
            return dist.Normal(scalar(0.0), scalar(self.weight_scale))
        if _is_positive(constraint):
            return dist.InverseGamma(
                scalar(self.variance_concentration), scalar(self.variance_rate)
            )
        raise ValueError(
            f"no default prior for parameter {name!r} with constraint {constraint}; "
            f"give one in MoEPriors(overrides={{{name!r}: ...}})"
        )

    def __repr__(self) -> str:
        return (
            f"MoEPriors(weight_scale={self.weight_scale}, "
            f"variance_concentration={self.variance_concentration}, "
            f"variance_rate={self.variance_rate}, overrides={sorted(self.overrides)})"
        )


#: What ``priors=`` accepts: ``None`` (no priors: maximum likelihood), a :class:`MoEPriors`
#: (priors on every parameter) or a dict ``{parameter name: prior}`` (priors on those only).
PriorSpec = Union[None, MoEPriors, Mapping[str, Union[Distribution, Callable]]]


def check_prior_spec(priors: PriorSpec) -> PriorSpec:
    """Type-checks a prior specification (names are checked against a model later)."""
    if priors is None or isinstance(priors, MoEPriors):
        return priors
    if isinstance(priors, Mapping):
        for name, prior in priors.items():
            if not isinstance(name, str):
                raise TypeError(f"prior names must be parameter names (str), got {name!r}")
            _check_prior_type(name, prior)
        return dict(priors)
    raise TypeError(
        f"priors must be None, a MoEPriors or a dict {{parameter name: distribution}}, "
        f"got {type(priors).__name__}"
    )


def prior_distributions(priors: PriorSpec, parameters: Mapping) -> Dict[str, Distribution]:
    """The priors of a model's parameters, shaped like them, keyed by parameter name.

    :param priors: a prior specification (see :data:`PriorSpec`).
    :param dict parameters: ``{name: (current constrained value, constraint)}`` of the model.
    :returns: ``{name: distribution}`` whose ``event_shape`` is the parameter's shape, for every
        parameter with a prior.
    :raises ValueError: for a name that is not a parameter, a prior that cannot take the
        parameter's shape, or a prior whose support does not match the parameter's constraint.
    """
    if priors is None:
        return {}
    requested = priors.overrides if isinstance(priors, MoEPriors) else priors
    unknown = sorted(set(requested) - set(parameters))
    if unknown:
        raise ValueError(
            f"priors name unknown parameter(s) {unknown}; the model's parameters are "
            f"{sorted(parameters)}"
        )
    names = parameters if isinstance(priors, MoEPriors) else requested
    shaped = {}
    for name in names:
        value, constraint = parameters[name]
        prior = requested.get(name)
        if prior is None:
            prior = priors.default_prior(name, value, constraint)
        elif not isinstance(prior, Distribution):
            prior = prior(value)
            _check_prior_type(name, prior, called=True)
        shaped[name] = _shape_like(name, prior, value)
        _check_support(name, shaped[name], value, constraint)
    return shaped


def _check_prior_type(name, prior, called=False) -> None:
    if isinstance(prior, Distribution) or (callable(prior) and not called):
        return
    what = "returned" if called else "is"
    raise TypeError(
        f"the prior of {name!r} {what} a {type(prior).__name__}; expected a "
        f"torch/pyro distribution" + ("" if called else " or a callable value -> distribution")
    )


def _shape_like(name: str, prior: Distribution, value: torch.Tensor) -> Distribution:
    """Makes ``prior``'s event shape the parameter's shape (one joint site per parameter)."""
    if not isinstance(prior, TorchDistributionMixin):
        raise TypeError(
            f"the prior of {name!r} is a torch.distributions.{type(prior).__name__}; use its "
            f"pyro.distributions counterpart (it has .expand and .to_event)"
        )
    prior = _in_dtype(name, prior, value.dtype)
    shape = tuple(value.shape)
    if tuple(prior.batch_shape) + tuple(prior.event_shape) == shape:
        return prior.to_event(len(prior.batch_shape)) if prior.batch_shape else prior
    if prior.batch_shape == () and prior.event_shape == ():
        return prior.expand(shape).to_event(len(shape))
    raise ValueError(
        f"the prior of {name!r} has shape {tuple(prior.batch_shape) + tuple(prior.event_shape)}; "
        f"it must be scalar or match the parameter's shape {shape}"
    )


def _in_dtype(name: str, prior: Distribution, dtype: torch.dtype) -> Distribution:
    """``prior`` rebuilt from its parameters in ``dtype`` (``dist.Normal(0., 2.)`` is float32,
    the models float64): a prior's draws must match the parameters' dtype."""
    arguments = {key: getattr(prior, key) for key in prior.arg_constraints}
    if "scale_tril" in arguments:
        # MultivariateNormal, Wishart, ...: the covariance, precision and Cholesky factor are
        # alternative parameterisations, of which the constructor takes exactly one.
        arguments.pop("covariance_matrix", None)
        arguments.pop("precision_matrix", None)
    if all(not torch.is_tensor(v) or v.dtype == dtype for v in arguments.values()):
        rebuilt = prior
    else:
        try:
            rebuilt = type(prior)(
                **{k: v.to(dtype) if torch.is_tensor(v) else v for k, v in arguments.items()}
            )
        except (TypeError, ValueError, AssertionError) as err:
            raise TypeError(
                f"the prior of {name!r} cannot be converted to {dtype} ({err}); build it from "
                f"tensors of dtype {dtype}"
            ) from None
    try:
        mean_dtype = rebuilt.mean.dtype
    except NotImplementedError:
        return rebuilt
    if mean_dtype != dtype:
        raise TypeError(
            f"the prior of {name!r} has dtype {mean_dtype} but the parameter has {dtype}; "
            f"build it from tensors of dtype {dtype}"
        )
    return rebuilt


def _check_support(name, prior, value, constraint) -> None:
    constraint, support = _unwrap(constraint), _unwrap(prior.support)
    if _is_real(constraint):
        ok = _is_real(support)
    else:
        ok = bool(support.check(value).all())
        if ok and _is_positive(constraint):
            ok = not bool(support.check(-torch.ones_like(value)).any())
    if not ok:
        raise ValueError(
            f"the prior of {name!r} has support {support} but the parameter is constrained to "
            f"{constraint}; use a prior on the same domain (e.g. Normal for real parameters, "
            f"InverseGamma or LogNormal for positive ones)"
        )


def _unwrap(constraint):
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    return constraint


def _is_real(constraint) -> bool:
    return type(constraint) is type(constraints.real)


def _is_positive(constraint) -> bool:
    return (
        isinstance(constraint, (constraints.greater_than, constraints.greater_than_eq))
        and float(constraint.lower_bound) == 0.0
    )
