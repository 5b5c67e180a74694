"""The part every softmax-gated mixture of experts shares: features, the gate, the parameter
plumbing between a ``PyroModule`` and plain :class:`~pyro_mm.models.params.MoEParams`."""

import dataclasses
import functools
from typing import Dict, Mapping

import pyro
import torch
from pyro import poutine
from pyro.nn import PyroModule, PyroParam
from pyro.poutine.plate_messenger import PlateMessenger
from pyro.poutine.runtime import _PYRO_STACK
from torch.distributions import transform_to
from torch.distributions.transforms import identity_transform

from ..validation import check_features
from .features import as_feature_map
from .gates import check_gate
from .params import MoEParams, tree_leaves, tree_to
from .priors import check_prior_spec, prior_distributions

__all__ = ["MixtureOfExperts"]


@functools.lru_cache(maxsize=None)
def _inverse_transform(constraint):
    """The map from a constrained value to its unconstrained parameter (cached per constraint);
    ``None`` for an unconstrained parameter, which is copied as is."""
    inverse = transform_to(constraint).inv
    return None if inverse == identity_transform else inverse


def _inside_outer_plate() -> bool:
    """Whether the model runs inside a ``pyro.plate`` of its caller (it opens its own data plate
    only after building the observation distribution)."""
    return any(isinstance(frame, PlateMessenger) for frame in _PYRO_STACK)


class MixtureOfExperts(PyroModule):
    r"""Base class of softmax-gated mixtures of experts

    .. math:: p(y \mid x) = \sum_{k=1}^K g_k(x) \, e_k(y \mid x),
        \qquad g_k(x) = \frac{\exp(\omega_k^\top u(x))}{\sum_l \exp(\omega_l^\top u(x))},
        \quad \omega_K = 0,

    for the default gate; ``gate=`` chooses another (:mod:`pyro_mm.models.gates`), whose
    log-probabilities replace ``log g_k(x)`` everywhere (Pyro model, densities, predictions).

    Subclasses define the expert family through :meth:`expert_log_prob` and the parameter
    accessors. Every method that takes ``x`` validates it and casts it to the model's dtype.

    Priors (:meth:`set_priors`, see :mod:`pyro_mm.models.priors`) work for every subclass: the
    model is then called under ``poutine.lift``, which turns each parameter with a prior into a
    latent sample site of the same name, while the module's parameters keep a point estimate.

    Called as a Pyro model (``Predictive``, ``SVI``, ``poutine.trace``), a model runs with its
    own parameters and registers them in Pyro's param store under their names (``gate_weight``,
    ``expert_weight``, ...), replacing another model's entries of the same names: several fitted
    models can be used one after another without ``pyro.clear_param_store()``. To restore
    parameters, use ``set_param_values`` or ``load_state_dict``, not a loaded param store.

    :param int num_experts: number of experts ``K``.
    :param int in_features: number of input columns ``P``.
    :param gate_degree: polynomial degree of the gate, or a feature map.
    :param expert_degree: polynomial degree of the expert regressors, or a feature map.
    :param gate: the gate (:mod:`pyro_mm.models.gates`): ``None`` or
        :class:`~pyro_mm.models.gates.SoftmaxGate` (the one-level softmax above, param
        ``gate_weight``), a :class:`~pyro_mm.models.gates.TemperatureGate` or a
        :class:`~pyro_mm.models.gates.HierarchicalGate` (params ``gate_outer``, ``gate_inner``).
    :raises ValueError: for a gate that cannot serve ``num_experts`` experts.
    """

    def __init__(
        self, num_experts: int, in_features: int, gate_degree=1, expert_degree=1, gate=None
    ):
        if isinstance(num_experts, bool) or int(num_experts) != num_experts or num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
        if isinstance(in_features, bool) or int(in_features) != in_features or in_features < 1:
            raise ValueError(f"in_features must be a positive integer, got {in_features!r}")
        super().__init__()
        self.num_experts = int(num_experts)
        self.in_features = int(in_features)
        self.gate_features = as_feature_map(gate_degree, self.in_features)
        self.expert_features = as_feature_map(expert_degree, self.in_features)
        #: the gate (a :class:`~pyro_mm.models.gates.Gate`).
        self.gate = check_gate(gate, self.num_experts)
        shapes = self.gate.param_shapes(self.num_experts, self.gate_features.num_features)
        for name, shape in zip(self.gate.param_names, shapes):
            setattr(self, name, PyroParam(torch.zeros(shape)))
        self._dtype_source = self.gate.param_names[0] + "_unconstrained"
        #: ``True`` once an inference class has written fitted parameters.
        self.fitted = False
        self._priors = None

    # ----------------------------------------------------------------------------- plumbing
    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the parameters; inputs are cast to it."""
        # The stored Parameter itself: PyroModule's attribute lookup goes through the param
        # store, and every validated batch asks for the dtype.
        return self._parameters[self._dtype_source].dtype

    def _params_or_current(self, params):
        """``params`` in the model's dtype (cast like the inputs, see :meth:`check_x`), or the
        model's own when ``None``."""
        if params is None:
            return self.get_params()
        if any(
            leaf.is_floating_point() and leaf.dtype != self.dtype for leaf in tree_leaves(params)
        ):
            # A float64 truth at a float32 model made torch fail with "expected m1 and m2 to
            # have the same dtype".
            return tree_to(params, self.dtype)
        return params

    def check_x(self, x, finite: bool = True) -> torch.Tensor:
        """Validates ``x`` (shape, dtype, finiteness unless ``finite=False``) and casts it to the
        model's dtype."""
        return check_features(x, self.in_features, self.dtype, finite)

    def check_y(self, y, num_rows: int, finite: bool = True) -> torch.Tensor:
        """Validates ``y`` for this expert family; see subclasses. ``finite=False`` skips the
        finiteness check where a caller proves it otherwise (a family whose checks need finite
        values, as integer labels do, checks anyway)."""
        raise NotImplementedError

    def clustering_view(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` as real columns for K-means initialisation (the identity for real outputs)."""
        return y

    @property
    def real_output_columns(self) -> int:
        """The number ``Q`` of real output columns, which the fitting classes may centre
        (``0`` for class labels)."""
        return self.out_features

    def features(self, x: torch.Tensor):
        """Gate and expert regressors ``(u(x), r(x))`` of a validated batch (one tensor, computed
        once, when the two feature maps are equal)."""
        gate_features = self.gate_features(x)
        if self.expert_features == self.gate_features:
            return gate_features, gate_features
        return gate_features, self.expert_features(x)

    @property
    def shares_features(self) -> bool:
        """Whether the gate and the experts use the same regressors (``u(x) = r(x)``)."""
        return self.expert_features == self.gate_features

    def regressors_and_outputs(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The expert regressors and the real outputs ``(N, Q)`` of a validated batch,
        feature-major: ``[r(x), y]^T`` of shape ``(D_e + Q, N)``, in which weighting every row
        by a responsibility touches contiguous memory."""
        return self.expert_features.feature_major(x, y)

    def get_params(self) -> MoEParams:
        """A detached copy of the current parameters as plain data."""
        with torch.no_grad():
            return MoEParams(gate=self._gate_params(clone=True), experts=self.get_expert_params())

    def set_params(self, params: MoEParams, validate: bool = True) -> None:
        """Writes parameters into the module (and so into Pyro's param store) in place.

        :param MoEParams params: the parameters.
        :param bool validate: check every value (shape, finiteness, support: positive variances,
            positive definite covariances) before writing any; the fitting classes, whose updates
            are valid by construction and checked for finiteness, skip it on their hot path.
        :raises ValueError: for an invalid value, before anything is written.
        """
        if validate:
            named = dict(zip(self.gate.param_names, self.gate.leaves(params.gate)))
            for field in dataclasses.fields(params.experts):
                named[f"expert_{field.name}"] = getattr(params.experts, field.name)
            self._check_param_values(
                {name: value for name, value in named.items() if name in self._pyro_params}
            )
        with torch.no_grad():
            for name, value in zip(self.gate.param_names, self.gate.leaves(params.gate)):
                self._write_param(name, value)
            self.set_expert_params(params.experts)
        if not self.fitted:
            # PyroModule.__setattr__ is slow; this runs after every streaming step.
            self.fitted = True

    # ------------------------------------------------------------------------- module state
    def get_extra_state(self) -> dict:
        """Saved with the parameters by ``state_dict()``: whether they are fitted, so that a
        model restored by ``load_state_dict`` continues from them (``init="auto"``) instead of
        being re-initialised by K-means."""
        return {"fitted": self.fitted}

    def set_extra_state(self, state: dict) -> None:
        self.fitted = bool(state["fitted"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state saved before the fitted flag was part of it holds parameters given to the
        # model, as set_params does: they count as fitted (and the load stays strict-clean).
        key = prefix + "_extra_state"
        if key not in state_dict:
            state_dict[key] = {"fitted": True}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def param_values(self) -> Dict[str, torch.Tensor]:
        """Detached copies of the (constrained) parameters, keyed by parameter name."""
        return {name: value.clone() for name, (value, _) in self._constrained_params().items()}

    def set_param_values(self, values: Mapping[str, torch.Tensor], validate: bool = True) -> None:
        """Writes parameters given by name (or by Pyro site name, e.g. a guide's ``median()``).

        :param values: ``{name: value}``.
        :param bool validate: check every value's shape, finiteness and support before writing
            any (as :meth:`set_params`); a fitting class writing values valid by construction
            skips it.
        :raises ValueError: for a name that is not a parameter or (with ``validate``) an
            invalid value, before anything is written.
        """
        by_site = {self.site_name(name): name for name in self._pyro_params}
        named = {by_site.get(key, key): value for key, value in values.items()}
        unknown = sorted(set(named) - set(self._pyro_params))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown}; the model's are {sorted(self._pyro_params)}"
            )
        if validate:
            self._check_param_values(named)
        with torch.no_grad():
            for name, value in named.items():
                self._write_param(name, value)
        self.fitted = True

    def _check_param_values(self, named: Mapping[str, torch.Tensor]) -> None:
        """Raises a ``ValueError`` for a value of the wrong shape, not finite, or outside its
        parameter's support (a negative variance would be written as a NaN log-variance)."""
        for name, value in named.items():
            expected = tuple(self._parameters[name + "_unconstrained"].shape)
            if tuple(value.shape) != expected:
                raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
            if not torch.isfinite(value).all():
                raise ValueError(f"{name} has non-finite values")
            constraint = self._pyro_params[name][0]
            if not constraint.check(value.detach()).all():
                raise ValueError(f"{name} has values outside its support ({constraint})")

    def _constrained_params(self) -> dict:
        with torch.no_grad():
            return {
                name: (transform_to(constraint)(getattr(self, name + "_unconstrained")), constraint)
                for name, (constraint, _) in self._pyro_params.items()
            }

    def site_name(self, name: str) -> str:
        """The Pyro site name of parameter ``name`` (prefixed when nested in a PyroModule)."""
        prefix = self.__dict__.get("_pyro_name", "")
        return f"{prefix}.{name}" if prefix else name

    def _write_param(self, name: str, value: torch.Tensor) -> None:
        # Straight to the stored Parameter (the one Pyro's param store shares): this runs after
        # every streaming step, and PyroModule's attribute lookup and transform_to cost more
        # than the small copies.
        unconstrained = self._parameters[name + "_unconstrained"]
        inverse = _inverse_transform(self._pyro_params[name][0])
        unconstrained.copy_(value if inverse is None else inverse(value))

    # ---------------------------------------------------------------------------- priors
    def set_priors(self, priors) -> None:
        """Declares priors on the parameters (``None`` removes them).

        :param priors: ``None``, a :class:`~pyro_mm.models.priors.MoEPriors` (every parameter)
            or a dict ``{parameter name: distribution}`` (those parameters only).
        :raises ValueError: for unknown names, wrong shapes or supports, before any change.
        """
        priors = check_prior_spec(priors)
        lifted = prior_distributions(priors, self._constrained_params())
        self._priors = priors
        # A parameter with a prior is a latent site: the guide fits it, never a gradient on the
        # module's own tensor, which only shapes the prior. Not requiring grad, it can be read
        # inside a JIT-traced ELBO (JitTrace_ELBO inserts it as a constant, and refuses a
        # tensor that requires grad).
        for name in self._pyro_params:
            self._parameters[name + "_unconstrained"].requires_grad_(name not in lifted)

    @property
    def has_priors(self) -> bool:
        """Whether some parameter has a prior (and is a latent site of the Pyro model)."""
        return self._priors is not None and bool(self.prior_distributions())

    def prior_distributions(self) -> dict:
        """The priors keyed by parameter name, shaped like the parameters, in their dtype."""
        return prior_distributions(self._priors, self._constrained_params())

    def require_no_priors(self, method: str) -> None:
        """Raises for a fitting ``method`` that maximises the likelihood and cannot honour
        priors."""
        if self.has_priors:
            raise ValueError(
                f"{method} maximises the likelihood and would ignore the priors on "
                f"{sorted(self.prior_distributions())}; build the model without priors, or fit "
                f"it with SVIFit (an AutoDelta guide gives the MAP estimate)"
            )

    def __call__(self, *args, **kwargs):
        self._claim_param_store_names()
        priors = self.prior_distributions()
        if not priors:
            return super().__call__(*args, **kwargs)
        sites = {self.site_name(name): prior for name, prior in priors.items()}
        return poutine.lift(super().__call__, prior=sites)(*args, **kwargs)

    def _claim_param_store_names(self) -> None:
        """Lets this model's own parameters, not another tensor stored under their names, serve
        the Pyro model.

        When Pyro's global param store holds a different tensor under one of this model's site
        names (another model with the same names called before, e.g. a K = 2 fit and then a
        K = 3 one), PyroModule would replace the module's parameter by it during the call: a
        fitted model would silently run, and from then on hold, the other model's values. Such an
        entry is dropped, and PyroModule registers this model's own parameter in its place.
        """
        if pyro.settings.get("module_local_params"):
            return  # PyroModules then never read the store
        store = pyro.get_param_store()
        stored = dict(store.named_parameters())
        for name in self._pyro_params:
            site = self.site_name(name)
            if site in stored and stored[site] is not self._parameters[name + "_unconstrained"]:
                del store[site]

    # ----------------------------------------------------------------------- expert family
    def get_expert_params(self):
        raise NotImplementedError

    def set_expert_params(self, expert_params) -> None:
        raise NotImplementedError

    def expert_log_prob(self, expert_params, expert_features: torch.Tensor, y: torch.Tensor):
        """``log e_k(y | x)`` for every expert, shape ``(N, K)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ gate
    def _gate_params(self, clone: bool = False):
        """The gate's parameters read from its Pyro params (detached copies with ``clone``)."""
        leaves = [getattr(self, name) for name in self.gate.param_names]
        if clone:
            leaves = [leaf.detach().clone() for leaf in leaves]
        return self.gate.from_leaves(leaves)

    def gate_logits(self, gate_features: torch.Tensor) -> torch.Tensor:
        """Gate logits ``(N, K)`` at the module's parameters, read as Pyro params (so that
        priors lift them and traces record them): what :meth:`observation_distribution` mixes
        with."""
        return self.gate.logits(self._gate_params(), gate_features)

    def gate_log_probs(self, gate_params, gate_features: torch.Tensor) -> torch.Tensor:
        """``log g_k(x)``, shape ``(N, K)``, at the gate parameters ``gate_params``
        (``MoEParams.gate``)."""
        return self.gate.log_probs(gate_params, gate_features)

    # ------------------------------------------------------------------------ Pyro model
    def observation_distribution(self, gate_features, expert_features):
        """The distribution of ``y`` given the regressors, batched over rows (a Pyro
        distribution built from the module's parameters, so priors lift them)."""
        raise NotImplementedError

    def forward(self, x, y=None, num_data: int = None):
        """Pyro model with one observed site ``"y"`` per row, drawn from
        :meth:`observation_distribution`.

        :param x: inputs ``(N, P)``.
        :param y: observed outputs or ``None`` to sample them.
        :param int num_data: full data-set size when ``x`` is a mini-batch (scales the likelihood).
        """
        x = self.check_x(x)
        if y is not None:
            y = self.check_y(y, x.shape[0])
        try:
            distribution = self.observation_distribution(*self.features(x))
        except (ValueError, RuntimeError) as err:
            if self.has_priors and _inside_outer_plate():
                raise ValueError(
                    "the model's latent parameters were drawn with leading batch dimensions (an "
                    "outer pyro.plate, e.g. Predictive(..., parallel=True)); pyro_mm models "
                    "evaluate one parameter draw at a time: use Predictive(..., parallel=False)"
                ) from err
            raise
        size = x.shape[0] if num_data is None else num_data
        with pyro.plate("data", size=size, subsample=torch.arange(x.shape[0])):
            return pyro.sample("y", distribution, obs=y)

    # ------------------------------------------------------------------------- densities
    def log_joint_from_features(self, params: MoEParams, gate_features, expert_features, y):
        r"""``log g_k(x) + log e_k(y | x)``, shape ``(N, K)``, from precomputed regressors."""
        return self.gate.log_probs(params.gate, gate_features) + self.expert_log_prob(
            params.experts, expert_features, y
        )

    def log_joint(self, x, y, params: MoEParams = None) -> torch.Tensor:
        r"""Log joint of each sample with each expert, ``log g_k(x) + log e_k(y|x)``, ``(N, K)``.

        :param x: inputs ``(N, P)``.
        :param y: outputs for this expert family.
        :param MoEParams params: parameters to evaluate at (default: the module's).
        """
        x = self.check_x(x)
        y = self.check_y(y, x.shape[0])
        params = self._params_or_current(params)
        return self.log_joint_from_features(params, *self.features(x), y)

    def log_prob(self, x, y, params: MoEParams = None) -> torch.Tensor:
        """Per-sample log-likelihood ``log p(y_n | x_n)``, shape ``(N,)``."""
        return torch.logsumexp(self.log_joint(x, y, params), dim=-1)

    def responsibilities(self, x, y, params: MoEParams = None) -> torch.Tensor:
        r"""Posterior expert probabilities ``tau_{nk} = p(z_n = k | x_n, y_n)``, ``(N, K)``."""
        return torch.softmax(self.log_joint(x, y, params), dim=-1)

    def gate_probs(self, x, params: MoEParams = None) -> torch.Tensor:
        """Gate probabilities ``g_k(x)``, shape ``(N, K)``."""
        x = self.check_x(x)
        params = self._params_or_current(params)
        return self.gate.log_probs(params.gate, self.gate_features(x)).exp()
