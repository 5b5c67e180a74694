"""A model's parameters seen as Pyro sites: which sites there are, their constraints, their
current values, and the :class:`~pyro_mm.models.params.MoEParams` a set of site values means.

Fitting methods hand their results over in different forms (MM and EM write parameters into the
module, SVI leaves a guide, MCMC leaves samples); all of them are values of the model's parameter
sites (``pyro.param`` sites without priors, ``pyro.sample`` sites with priors). Working at this
level keeps the diagnostics independent of the expert family.
"""

import dataclasses

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn.module import pyro_method
from pyro.poutine.util import prune_subsample_sites

from ..models.base import MixtureOfExperts
from ..models.params import MoEParams

__all__ = [
    "ParameterSites",
    "module_parameters_only",
    "parameter_sites",
    "lift_parameters",
    "fix_sites",
    "params_from_sites",
]


def module_parameters_only():
    """A context in which PyroModules use their own parameters, not Pyro's global param store.

    By default a PyroModule run under a handler replaces its parameters by the store's entries
    of the same name, so tracing one fitted model after another with the same parameter names
    (say K = 1 after K = 2) would silently evaluate the first model's parameters. The
    diagnostics read what the fitting methods wrote into the module, as ``log_prob`` does; an
    empty param-store scope (restored on exit) gives them exactly that.
    """
    return pyro.get_param_store().scope()


@dataclasses.dataclass
class ParameterSites:
    """The parameter sites of a model, in the order the model visits them.

    :ivar tuple names: site names (e.g. ``gate_weight``, ``expert_weight``, ``expert_variance``).
    :ivar dict shapes: ``name -> torch.Size`` of one value.
    :ivar dict constraints: ``name -> constraint`` (the support of a value).
    :ivar dict kinds: ``name -> "param"`` (no prior) or ``"sample"`` (a prior was declared).
    :ivar dict values: ``name -> tensor``: the module's current (constrained) parameters.
    """

    names: tuple
    shapes: dict
    constraints: dict
    kinds: dict
    values: dict

    @property
    def has_priors(self) -> bool:
        """Whether any parameter is a sample site (declared with a prior)."""
        return any(kind == "sample" for kind in self.kinds.values())


def parameter_sites(model: MixtureOfExperts, x, y) -> ParameterSites:
    """Traces ``model(x, y)`` once and collects its parameter sites, with the module's current
    parameter values (its point estimate, also when priors are declared).

    :param MixtureOfExperts model: a pyro_mm model.
    :param x: inputs ``(N, P)``.
    :param y: outputs for ``x``.
    :raises ValueError: when the model has no observed site ``"y"``.
    """
    if not isinstance(model, MixtureOfExperts):
        raise TypeError(f"model must be a pyro_mm mixture of experts, got {type(model).__name__}")
    current = model.param_values()
    by_site = {model.site_name(name): name for name in current}
    # Parameters with priors are sample sites: traced at their current values, not at draws
    # from their priors (which only cost time and, for a Wishart, can warn of singular draws).
    at_current = poutine.condition(
        model, data={site: current[name] for site, name in by_site.items()}
    )
    with torch.no_grad():
        trace = prune_subsample_sites(poutine.trace(at_current).get_trace(x, y))
    if "y" not in trace.nodes or not trace.nodes["y"].get("is_observed", False):
        raise ValueError("the model has no observed sample site named 'y'")
    names, shapes, constraints, kinds, values = [], {}, {}, {}, {}
    for site_name, site in trace.nodes.items():
        latent = site["type"] == "sample" and (site_name in by_site or not site["is_observed"])
        if site["type"] != "param" and not latent:
            continue
        if site_name not in by_site:
            raise ValueError(
                f"the model's site {site_name!r} is not one of its parameters {sorted(current)}"
            )
        name = by_site[site_name]
        names.append(site_name)
        kinds[site_name] = site["type"]
        values[site_name] = current[name].detach()
        shapes[site_name] = current[name].shape
        # The parameter's own constraint (a traced ``pyro.param`` site records ``real``).
        constraints[site_name] = model._pyro_params[name][0]
    return ParameterSites(tuple(names), shapes, constraints, kinds, values)


def lift_parameters(model, sites: ParameterSites):
    """``model`` with every parameter a sample site, so that conditioning on draws, as
    :class:`pyro.infer.Predictive` does with ``posterior_samples``, fixes all of them.

    A parameter without a prior is lifted with a point mass at its current value: run without
    conditioning the lifted model behaves as the model does. Only the observed site's density
    is ever evaluated under these priors, never theirs.
    """
    point_masses = {
        name: dist.Delta(sites.values[name], event_dim=len(sites.shapes[name]))
        for name in sites.names
        if sites.kinds[name] == "param"
    }
    return poutine.lift(model, prior=point_masses) if point_masses else model


def fix_sites(model, sites: ParameterSites, values: dict):
    """``model`` with its parameter sites fixed to ``values`` (``name -> tensor``, one draw)."""
    missing = set(sites.names) - set(values)
    if missing:
        raise ValueError(f"no value given for the parameter site(s) {sorted(missing)}")
    return poutine.condition(lift_parameters(model, sites), data=values)


def params_from_sites(model: MixtureOfExperts, sites: ParameterSites, values: dict) -> MoEParams:
    """The :class:`MoEParams` that the site values ``values`` (one draw) stand for.

    Reads them through the model's own :meth:`get_params`, run as a Pyro method so that every
    parameter access is a ``pyro.param`` statement (priors are lifted only in ``forward``),
    with all values substituted.
    """
    missing = set(sites.names) - set(values)
    if missing:
        raise ValueError(f"no value given for the parameter site(s) {sorted(missing)}")
    data = {name: values[name] for name in sites.names}
    return poutine.substitute(pyro_method(type(model).get_params), data=data)(model)
