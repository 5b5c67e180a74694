"""ArviZ ``InferenceData`` from any fit of a pyro_mm model.

Whatever produced the fit, it ends up as draws of the model's parameter sites:

* ``posterior=None``: the point estimate held by the model (IncrementalMM and EM write it
  there), repeated ``num_samples`` times;
* a :class:`~pyro_mm.diagnostics.LaplacePosterior`: ``num_samples`` draws from it;
* a Pyro guide (e.g. an ``AutoNormal`` after SVI on a model with priors): ``num_samples`` draws
  through :class:`pyro.infer.Predictive`;
* a :class:`pyro.infer.MCMC` run on a model with priors (e.g. with ``NUTS``): all its draws,
  kept in their chains, so that ``az.rhat`` and ``az.ess`` apply;
* a dict ``site name -> (S, ...)`` of draws (one chain).

From the draws come the groups ``posterior`` (experts relabelled to a common reference),
``posterior_predictive`` (one ``y`` per draw, from the model's ``sample``), ``log_likelihood``
(pointwise ``log p(y_n | x_n, theta_s)`` named ``y``, for ``az.loo``, ``az.waic``,
``az.compare``), ``observed_data`` (``y``) and ``constant_data`` (``x``).
"""

import dataclasses
import warnings

import pyro
import torch
from pyro.infer import MCMC, Predictive

from ..models.base import MixtureOfExperts
from ..models.features import PolynomialFeatures
from ..models.params import tree_map
from .label_switching import align_draws
from .laplace import LaplacePosterior
from .sites import (
    ParameterSites,
    lift_parameters,
    module_parameters_only,
    parameter_sites,
    params_from_sites,
)

__all__ = ["to_inference_data", "SUPPORTED_ARVIZ"]

#: The ArviZ versions :func:`to_inference_data` works with (the ``InferenceData`` API).
SUPPORTED_ARVIZ = ">=0.17, <1.0"
_PIP_SPEC = "arviz" + SUPPORTED_ARVIZ.replace(" ", "")

# Dimension names of the expert parameters, per expert family (after the leading "experts").
_EXPERT_DIMS = {
    "GaussianExpertParams": {
        "weight": ("outputs", "expert_features"),
        "variance": ("outputs",),
    },
    "MultinomialExpertParams": {"weight": ("classes", "expert_features")},
}
# Dimension names of the gate parameters that have them.
_GATE_DIMS = {"gate_weight": ["gate_experts", "gate_features"]}


def _import_arviz():
    try:
        with warnings.catch_warnings():
            # ArviZ 0.2x announces its own 1.0 refactor on import; not actionable here.
            warnings.simplefilter("ignore", FutureWarning)
            import arviz
    except ImportError:
        raise ImportError(
            f"to_inference_data needs ArviZ {SUPPORTED_ARVIZ}: pip install '{_PIP_SPEC}'"
        ) from None
    major = int(arviz.__version__.split(".")[0])
    if major >= 1:
        raise ImportError(
            f"pyro_mm.diagnostics supports ArviZ {SUPPORTED_ARVIZ} (the InferenceData API); "
            f"ArviZ {arviz.__version__} is installed, whose DataTree API is not supported yet. "
            f"Install a supported version: pip install '{_PIP_SPEC}'"
        )
    return arviz


def _check_num_samples(num_samples) -> int:
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 2:
        raise ValueError(
            f"num_samples must be an integer >= 2 (PSIS-LOO needs several draws), "
            f"got {num_samples!r}"
        )
    return int(num_samples)


def _site_draws(model, x, y, sites: ParameterSites, posterior, num_samples: int, seed: int):
    """Draws ``name -> (S, ...)`` of every parameter site, the kind of posterior, and the number
    of chains the ``S`` draws come in (one after another)."""
    if isinstance(posterior, MCMC):
        by_chain = posterior.get_samples(group_by_chain=True)
        if not by_chain:  # None before run()
            raise ValueError("the MCMC object holds no samples: call its run(x, y) first")
        num_chains, per_chain = next(iter(by_chain.values())).shape[:2]
        drawn = {
            name: value.reshape((num_chains * per_chain,) + value.shape[2:])
            for name, value in by_chain.items()
        }
        draws = _checked_draws(sites, _with_fixed_sites(sites, drawn), model.dtype)
        return draws, "mcmc", num_chains
    draws, kind = _single_chain_draws(model, x, y, sites, posterior, num_samples, seed)
    return draws, kind, 1


def _with_fixed_sites(sites: ParameterSites, drawn: dict) -> dict:
    """``drawn`` (draws of the latent sites) with the fixed value of every site without a
    prior, repeated for each draw."""
    count = next(iter(drawn.values())).shape[0]
    fixed = {
        name: sites.values[name].expand((count,) + sites.shapes[name])
        for name in sites.names
        if sites.kinds[name] == "param"
    }
    return {**fixed, **drawn}


def _single_chain_draws(model, x, y, sites, posterior, num_samples: int, seed: int):
    if posterior is None:
        return {name: sites.values[name].unsqueeze(0) for name in sites.names}, "point"
    if isinstance(posterior, LaplacePosterior):
        if posterior.sites.names != sites.names or posterior.sites.shapes != sites.shapes:
            raise ValueError(
                "the LaplacePosterior was built for other parameter sites "
                f"({dict(posterior.sites.shapes)}) than this model has ({dict(sites.shapes)})"
            )
        return posterior.sample(num_samples, seed=seed), "laplace"
    if isinstance(posterior, dict):
        return _checked_draws(sites, posterior, model.dtype), "samples"
    if callable(posterior):
        latent = [name for name in sites.names if sites.kinds[name] == "sample"]
        if not latent:
            raise ValueError(
                "the model declares no priors, so a guide has nothing to draw; build the model "
                "with priors for SVI, or pass posterior=None for its point estimate"
            )
        drawn = Predictive(model, guide=posterior, num_samples=num_samples, return_sites=latent)(
            x, y
        )
        # Predictive pads latent draws with singleton plate dimensions.
        drawn = {
            name: value.detach().reshape((num_samples,) + sites.shapes[name])
            for name, value in drawn.items()
        }
        return _with_fixed_sites(sites, drawn), "guide"
    raise TypeError(
        "posterior must be None (point estimate), a LaplacePosterior, a Pyro guide, a "
        f"pyro.infer.MCMC run or a dict of draws, got {type(posterior).__name__}"
    )


def _checked_draws(sites: ParameterSites, draws: dict, dtype: torch.dtype) -> dict:
    missing = set(sites.names) - set(draws)
    if missing:
        raise ValueError(f"the draws have no values for the parameter site(s) {sorted(missing)}")
    sizes = set()
    for name in sites.names:
        value = torch.as_tensor(draws[name])
        if value.shape[1:] != sites.shapes[name]:
            raise ValueError(
                f"draws of {name!r} must have shape (S, {', '.join(map(str, sites.shapes[name]))})"
                f", got {tuple(value.shape)}"
            )
        sizes.add(value.shape[0])
    if len(sizes) != 1:
        raise ValueError(f"every site needs the same number of draws, got {sorted(sizes)}")
    if sizes.pop() < 2:
        raise ValueError("give at least 2 draws (PSIS-LOO needs several)")
    return {name: torch.as_tensor(draws[name]).detach().to(dtype) for name in sites.names}


def _regressor_names(feature_map, input_names: list) -> list:
    if isinstance(feature_map, PolynomialFeatures):
        names = ["1"]
        for degree in range(1, feature_map.degree + 1):
            names += [name if degree == 1 else f"{name}^{degree}" for name in input_names]
        return names
    return [f"f{index}" for index in range(feature_map.num_features)]


def _names(names, count: int, default_prefix: str, what: str) -> list:
    if names is None:
        return [f"{default_prefix}{index}" for index in range(count)]
    names = [str(name) for name in names]
    if len(names) != count:
        raise ValueError(f"{what} has {len(names)} names, expected {count}")
    if len(set(names)) != count:
        raise ValueError(f"{what} must be distinct, got {names}")
    return names


def _posterior_predictive(model, x, sites: ParameterSites, draws: dict, params: list, count: int):
    """``(S, N, ...)`` draws of ``y``, one per parameter draw (``params`` holds the draws, or
    one point estimate that all ``count`` predictive draws use).

    A model with its own sampler (``sample(x, params)``, as every pyro_mm model has) is called
    once per draw: it draws from the same ``p(y | x)`` as the Pyro model, at a third of the cost
    of tracing the model once per draw as :class:`pyro.infer.Predictive` does. Any other model
    goes through ``Predictive``.
    """
    if callable(getattr(model, "sample", None)):
        per_draw = params if len(params) == count else params * count
        return torch.stack([model.sample(x, draw)[0] for draw in per_draw])
    if len(params) != count:
        draws = {name: value.expand((count,) + value.shape[1:]) for name, value in draws.items()}
    predictive = Predictive(
        lift_parameters(model, sites), posterior_samples=draws, return_sites=["y"]
    )
    return predictive(x)["y"]


def _evaluate(model, x, y, sites: ParameterSites, draws: dict, point: bool, count: int):
    """Parameters, pointwise log-likelihoods and posterior-predictive ``y`` of the draws.

    A point estimate is evaluated once; its ``count`` predictive draws all use it.
    """
    unique = 1 if point else count
    params = [
        params_from_sites(model, sites, {name: draws[name][index] for name in sites.names})
        for index in range(unique)
    ]
    log_likelihood = torch.stack([model.log_prob(x, y, p) for p in params])
    predictive = _posterior_predictive(model, x, sites, draws, params, count)
    return params, log_likelihood.expand(count, -1), predictive


def _posterior_variables(model, stacked, num_chains: int) -> tuple:
    """ArviZ variables ``name -> (chain, draw, ...)`` and their dimension names; the gate's are
    named after its params (leading dimensions other than ``gate_weight``'s are numbered)."""
    variables, dims = {}, {}
    for name, leaf in zip(model.gate.param_names, model.gate.leaves(stacked.gate)):
        variables[name] = _chain(leaf, num_chains)
        numbered = [f"{name}_dim_{axis}" for axis in range(leaf.dim() - 2)]
        dims[name] = _GATE_DIMS.get(name, [*numbered, "gate_features"])
    expert_dims = _EXPERT_DIMS.get(type(stacked.experts).__name__, {})
    for field in dataclasses.fields(stacked.experts):
        leaf = getattr(stacked.experts, field.name)
        name = f"expert_{field.name}"
        variables[name] = _chain(leaf, num_chains)
        default = [f"{name}_dim_{axis}" for axis in range(leaf.dim() - 2)]
        dims[name] = ["experts", *expert_dims.get(field.name, default)]
    return variables, dims


def _coords(model, x, y, feature_names: list, output_names: list) -> dict:
    coords = {
        "obs": list(range(x.shape[0])),
        "features": feature_names,
        "experts": list(range(model.num_experts)),
        "gate_experts": list(range(model.num_experts - 1)),
        "gate_features": _regressor_names(model.gate_features, feature_names),
        "expert_features": _regressor_names(model.expert_features, feature_names),
    }
    if y.dim() == 2:
        coords["outputs"] = output_names
    if hasattr(model, "num_classes"):
        coords["classes"] = list(range(model.num_classes - 1))
    return coords


def _chain(tensor: torch.Tensor, num_chains: int):
    """A NumPy array ``(chain, draw, ...)`` of draws ``(S, ...)`` that come chain after chain."""
    # The draws per chain given explicitly: NumPy cannot infer them for a parameter with no
    # entries (the gate of one expert).
    per_chain = tensor.shape[0] // num_chains
    return tensor.detach().cpu().numpy().reshape((num_chains, per_chain) + tuple(tensor.shape[1:]))


def to_inference_data(
    model: MixtureOfExperts,
    x,
    y,
    posterior=None,
    *,
    num_samples: int = 500,
    seed: int = 0,
    reference=None,
    feature_names=None,
    output_names=None,
):
    """An ``arviz.InferenceData`` of a fitted pyro_mm model on data ``(x, y)``.

    ``az.plot_ppc(idata)``, ``az.loo(idata)``, ``az.waic(idata)`` and ``az.compare`` work on
    the result directly. Dimensions: ``chain`` (one, or an MCMC run's chains), ``draw``,
    ``obs`` (rows of ``x``),
    ``features`` (columns of ``x``), ``outputs`` (columns of ``y``), ``experts``,
    ``gate_experts`` (the ``K - 1`` experts with free gate weights; the last expert is the
    reference), ``gate_features`` and ``expert_features`` (the regressors ``u(x)``, ``r(x)``).
    Posterior variables are named after the model's parameters: ``gate_weight`` and
    ``expert_<field>`` (``expert_weight``, ``expert_variance`` for Gaussian experts); a
    hierarchical gate gives ``gate_outer`` and ``gate_inner`` instead of ``gate_weight``, and its
    draws keep their expert labelling (they are not aligned). The posterior group's
    ``posterior_kind`` attribute says where the draws came from.

    A point estimate has no posterior spread: its draws are ``num_samples`` copies of it, so
    ``az.loo`` then reports the in-sample log-likelihood with ``p_loo = 0`` (and ArviZ warns
    about the Pareto shape). Use a :func:`~pyro_mm.diagnostics.laplace_posterior` for a
    meaningful LOO of an MM or EM fit.

    :param MixtureOfExperts model: the fitted model.
    :param x: inputs ``(N, P)``.
    :param y: observed outputs for ``x``.
    :param posterior: ``None`` (the model's point estimate), a :class:`LaplacePosterior`, a
        Pyro guide fitted by SVI on a model with priors, a :class:`pyro.infer.MCMC` that has
        run on the model (its chains become the ``chain`` dimension; parameters without a
        prior keep the model's value), or a dict ``site -> (S, ...)`` of draws.
    :param int num_samples: draws to take (ignored for MCMC and a dict of draws: all are used).
    :param int seed: seed of every random draw (posterior and posterior predictive).
    :param reference: :class:`~pyro_mm.models.params.MoEParams` whose expert labelling the
        draws are aligned to (default: the Laplace mode for a Laplace posterior, else the
        draws' own relabelled mean).
    :param feature_names: names of the ``P`` input columns (default ``x0, x1, ...``).
    :param output_names: names of the output columns (default ``y0, y1, ...``).
    :returns: ``arviz.InferenceData``.
    :raises ImportError: when ArviZ is missing or outside :data:`SUPPORTED_ARVIZ`.
    """
    arviz = _import_arviz()
    if not isinstance(model, MixtureOfExperts):
        raise TypeError(f"model must be a pyro_mm mixture of experts, got {type(model).__name__}")
    x = model.check_x(x)
    y = model.check_y(y, x.shape[0])
    num_samples = _check_num_samples(num_samples)
    feature_names = _names(feature_names, model.in_features, "x", "feature_names")
    if y.dim() == 2:
        output_names = _names(output_names, y.shape[1], "y", "output_names")
    with module_parameters_only(), torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        sites = parameter_sites(model, x, y)
        draws, kind, num_chains = _site_draws(model, x, y, sites, posterior, num_samples, seed)
        point = kind == "point"
        count = num_samples if point else next(iter(draws.values())).shape[0]
        params, log_likelihood, predictive = _evaluate(model, x, y, sites, draws, point, count)
        if reference is None and kind == "laplace":
            reference = params_from_sites(model, sites, posterior.mode)
    # Relabelling experts keeps a gate that is one tensor of per-expert rows; a structured gate
    # (e.g. hierarchical: a relabelling must keep the groups) is left in its draws' labelling.
    aligned = align_draws(params, reference) if isinstance(params[0].gate, torch.Tensor) else params
    stacked = tree_map(lambda *leaves: torch.stack(leaves), *aligned)
    stacked = tree_map(lambda leaf: leaf.expand((count,) + leaf.shape[1:]), stacked)
    variables, dims = _posterior_variables(model, stacked, num_chains)
    dims.update({"y": ["obs", "outputs"] if y.dim() == 2 else ["obs"], "x": ["obs", "features"]})
    used = {dim for variable_dims in dims.values() for dim in variable_dims}
    coords = _coords(model, x, y, feature_names, output_names)
    attrs = {
        "inference_library": "pyro",
        "inference_library_version": pyro.__version__,
        "model": type(model).__name__,
        "posterior_kind": kind,
    }
    return arviz.from_dict(
        posterior=variables,
        posterior_predictive={"y": _chain(predictive, num_chains)},
        log_likelihood={"y": _chain(log_likelihood, num_chains)},
        observed_data={"y": y.detach().cpu().numpy()},
        constant_data={"x": x.detach().cpu().numpy()},
        coords={dim: values for dim, values in coords.items() if dim in used},
        dims=dims,
        attrs=dict(attrs),
        posterior_attrs=dict(attrs),
    )
