"""The plumbing shared by the EM-type iterations (:class:`~pyro_mm.infer.EM`,
:class:`~pyro_mm.infer.MirrorDescentEM`, :class:`~pyro_mm.infer.GradientEM`): their whole state is
the current parameters ``theta_t`` (plain :class:`~pyro_mm.models.params.MoEParams`), and each
step maps ``theta_t`` to ``theta_{t+1}`` from the E-step on the batch it is given.

The iterations whose updates are exact solves (EM, mirror-descent EM) are equivariant under
centring the regressors, and run on them centred on the first batch's means where that leaves
the objective unchanged (:mod:`~pyro_mm.infer.centring`): the gate's Newton solve and the
experts' least squares otherwise work on Gram matrices whose condition number grows as the
square of an input's offset. On 20,000 rows of a 2-expert model with inputs ``x + 10^4`` (unit
spread), uncentred EM had not converged after 1000 iterations and stood 0.0085 nats per sample
above its fit of the same rows at ``x``."""

import warnings

import torch

from ..init import check_init, initial_params
from ..models.base import MixtureOfExperts
from ..models.params import MoEParams, tree_leaves, tree_to
from ..surrogates.mixture import e_step
from ..surrogates.registry import expert_surrogate_with_bound, gate_surrogate_for
from ..validation import positive_integer, positive_number
from .batches import check_batch
from .centring import (
    FeatureCentring,
    centres_regressors,
    centring_from_moments,
    centring_is_exact,
    check_centre_regressors,
    load_centring,
    regressor_moments,
)
from .history import FitHistory
from .state import (
    check_finite_state,
    check_matching_options,
    check_tree_shapes,
    load_schedule_state,
    load_tree_state,
    schedule_state,
    stored_options,
    tree_state,
)

__all__ = [
    "EMLikeInference",
    "check_fit_setup",
    "fitter_initial_params",
    "gate_solver_options",
]


def count_floored_variances(fitter, name: str, count: int) -> None:
    """Adds a step's ``count`` floored expert variances to ``fitter.regularisation`` and, the
    first time in the fit, warns: a variance collapsing onto a few points (the floor is the
    intended regularisation) and outputs in units so small that their noise variance lies below
    the floor (the fit is then wrong, not regularised) look the same."""
    fitter.regularisation["floored_variances"] += count
    if not count or fitter._warned_floor:
        return
    fitter._warned_floor = True
    warnings.warn(
        f"{name} raised {count} expert variance(s) to variance_floor={fitter.variance_floor:g} "
        f"at step {fitter.num_steps}: a variance collapsing onto a few points, or outputs whose "
        f"noise variance is below the floor (rescale y, or lower variance_floor); counted in "
        f"regularisation['floored_variances'] (warned once per fit)",
        RuntimeWarning,
        stacklevel=4,
    )


def check_fit_setup(model, algorithm: str, *, init: str, ridge, variance_floor, dtype) -> None:
    """The checks every inference class makes of its model and common options, before any
    state is built: a pyro_mm mixture of experts without priors (``algorithm`` names the caller
    in the message), a known ``init``, ``ridge >= 0``, ``variance_floor > 0`` and a floating
    ``dtype``.

    :raises TypeError: for a model that is not a :class:`~pyro_mm.models.base.MixtureOfExperts`.
    :raises ValueError: for the rest.
    """
    if not isinstance(model, MixtureOfExperts):
        raise TypeError(f"model must be a pyro_mm mixture of experts, got {type(model).__name__}")
    model.require_no_priors(algorithm)
    check_init(init)
    if not ridge >= 0 or not variance_floor > 0:
        raise ValueError(
            f"ridge must be >= 0 and variance_floor > 0, got ridge={ridge!r}, "
            f"variance_floor={variance_floor!r}"
        )
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")


def fitter_initial_params(fitter, x, y, centring) -> MoEParams:
    """``theta_0`` of a fitting class (its ``model``, ``init``, ``seed`` and expert block) from a
    first batch, in the model's coordinates, its K-means solves on the regressors centred by
    ``centring`` (``None``: as they are); see :func:`~pyro_mm.init.initial_params`."""
    return initial_params(
        fitter.model,
        x,
        y,
        fitter.init,
        seed=fitter.seed,
        expert_surrogate=fitter.expert_surrogate,
        centring=centring,
    )


def gate_solver_options(gate_ridge, gate_tol, gate_max_iter) -> dict:
    """Validated keyword arguments of a gate block's ``exact_m_step`` (e.g.
    :func:`~pyro_mm.surrogates.exact_gate.exact_gate_m_step`)."""
    if (
        isinstance(gate_ridge, bool)
        or not isinstance(gate_ridge, (int, float))
        or not gate_ridge >= 0
    ):
        raise ValueError(f"gate_ridge must be a number >= 0, got {gate_ridge!r}")
    return {
        "ridge": float(gate_ridge),
        "tol": positive_number("gate_tol", gate_tol),
        "max_iter": positive_integer("gate_max_iter", gate_max_iter),
    }


class EMLikeInference:
    """Base class: validation, initialisation, the E-step, committing a new iterate, the loss.

    :param MixtureOfExperts model: the model to fit; it is moved to ``dtype``.
    :param float ridge: ridge on the expert coefficients (relative to each expert's mass).
    :param float variance_floor: smallest expert variance an expert solve returns.
    :param str init: ``"auto"`` (K-means on the first batch unless the model is already
        fitted), ``"kmeans"``, ``"kmeans-logistic"`` (gate from a logistic regression of the
        cluster labels), ``"spectral"`` or ``"current"`` (the model's parameters); see
        :func:`pyro_mm.init.initial_params`.
    :param int seed: seed of the K-means initialisation.
    :param torch.dtype dtype: dtype of the parameters and of the computations.
    :param str expert_bound: for experts with a softmax, the curvature bound of their surrogate
        (used by the subclasses whose expert step is an MM step; ``None``: the block's default).
    :param centre_regressors: ``"auto"``, ``True`` or ``False``, as in
        :class:`~pyro_mm.infer.IncrementalMM` (the subclasses whose steps are equivariant
        under centring offer it; ``False`` for the others).
    :param bool gate_penalises_intercept: whether the gate step penalises the gate's intercept
        (a gate ridge): then ``"auto"`` does not centre, which would move that penalty.
    """

    #: label of the progress bar.
    name = "EM"
    #: attributes that define the iteration besides its state: a state loads only into an
    #: object where they are equal.
    option_names = ()

    def __init__(
        self,
        model: MixtureOfExperts,
        *,
        ridge: float,
        variance_floor: float,
        init: str,
        seed: int,
        dtype: torch.dtype,
        expert_bound: str = None,
        centre_regressors=False,
        gate_penalises_intercept: bool = False,
    ):
        check_centre_regressors(centre_regressors)
        check_fit_setup(
            model, self.name, init=init, ridge=ridge, variance_floor=variance_floor, dtype=dtype
        )
        self.expert_surrogate = expert_surrogate_with_bound(
            model, expert_bound, ridge=ridge, variance_floor=variance_floor
        )
        self.expert_bound = expert_bound
        #: the gate block of the model's gate (exact M-step, log-probabilities).
        self.gate_surrogate = gate_surrogate_for(model)
        self.model = model.to(dtype)
        self.init = init
        self.seed = seed
        self.dtype = dtype
        self.ridge, self.variance_floor = float(ridge), float(variance_floor)
        self._warned_floor = False
        self.centre_regressors = centre_regressors
        self._centres = centres_regressors(
            centre_regressors,
            not gate_penalises_intercept and centring_is_exact(model, self.expert_surrogate),
        )
        #: the iterate ``theta_t`` in the coordinates the iteration runs in (see
        #: :attr:`centring`; :attr:`params` gives it in the model's).
        self._iterate: MoEParams = None
        #: the means the regressors are centred on (``None``: not centred; see
        #: :mod:`~pyro_mm.infer.centring`); ``None`` before initialisation.
        self.centring: FeatureCentring = None
        #: number of steps taken.
        self.num_steps = 0
        #: samples consumed by ``step``.
        self.samples_seen = 0
        #: regularisation counters: steps with an empty expert, variances floored, gate M-steps
        #: that stopped before their gradient tolerance.
        self.regularisation = {
            "empty_expert_steps": 0,
            "floored_variances": 0,
            "unconverged_gate_steps": 0,
        }
        self.history = FitHistory()

    @property
    def params(self) -> MoEParams:
        """The current iterate ``theta_t`` in the model's coordinates (``None`` before
        initialisation)."""
        if self._iterate is None or self.centring is None:
            return self._iterate
        return self.centring.model_params(self._iterate, self.model)

    # -------------------------------------------------------------------------------- verbs
    def initialize(self, x, y) -> None:
        """Sets ``theta_0`` per ``init`` from a first batch (called by the first step if needed)
        and, where the iteration centres its regressors, the centring on the batch's means."""
        x, y = self._check_batch(x, y)
        centring = None
        if self._centres:
            moments = regressor_moments(self.model, x, y)
            centring = centring_from_moments(moments, self.model, self.centre_regressors is True)
        params = fitter_initial_params(self, x, y, centring)
        self.centring, self.num_steps = centring, 0
        self._iterate = params if centring is None else centring.centred_params(params, self.model)
        self.model.set_params(params, validate=False)

    def evaluate_loss(self, x, y) -> float:
        """Mean negative log-likelihood of ``(x, y)`` at the current estimate (no state change)."""
        with torch.no_grad():
            return -self.model.log_prob(x, y).mean().item()

    # ---------------------------------------------------------------------------- checkpoints
    def _options(self) -> dict:
        options = {
            "model": type(self.model).__name__,
            "num_experts": self.model.num_experts,
            "gate": repr(self.model.gate),
            "ridge": self.ridge,
            "variance_floor": self.variance_floor,
            "dtype": str(self.dtype),
        }
        options.update({name: getattr(self, name) for name in self.option_names})
        return options

    def state_dict(self) -> dict:
        """Everything the iteration depends on, as plain data (``torch.save`` it): the options
        it was built with, the iterate ``theta_t``, the step-size schedule (if any), the step and
        sample counters, the regularisation counters and the history (the iterate in the
        coordinates the iteration runs in, with the ``centring`` that maps them to the model's).
        There is no random state after initialisation (K-means is seeded by ``seed``)."""
        state = {
            "options": self._options(),
            "params": tree_state(self._iterate),
            "centring": tree_state(self.centring),
            "num_steps": self.num_steps,
            "samples_seen": self.samples_seen,
            "regularisation": dict(self.regularisation),
            "history": self.history.as_dict(),
        }
        if hasattr(self, "schedule"):
            state["schedule"] = schedule_state(self.schedule)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict` (and its schedule) and writes ``theta_t`` into the model;
        resuming a stream from it gives bit-identical parameters to the uninterrupted run.

        :raises ValueError: when the state was made with other options or parameter shapes;
            nothing is changed then.
        """
        check_matching_options(self.name, stored_options(state), self._options())
        check_finite_state(state)
        params = load_tree_state(state["params"])
        if params is not None:
            check_tree_shapes("params", params, tree_to(self.model.get_params(), self.dtype))
        # A state saved before the iteration centred its regressors has no centring: its
        # iterate is in the model's coordinates, and goes on in them.
        centring = load_centring(state.get("centring"), self.model, self.dtype)
        if hasattr(self, "schedule"):
            self.schedule = load_schedule_state(self.schedule, state["schedule"])
        self._iterate, self.centring = params, centring
        self.num_steps, self.samples_seen = int(state["num_steps"]), int(state["samples_seen"])
        # A counter added after the state was saved starts at zero.
        self.regularisation = {**dict.fromkeys(self.regularisation, 0), **state["regularisation"]}
        self.history = FitHistory(**state["history"])
        if params is not None:
            self.model.set_params(self.params, validate=False)

    # --------------------------------------------------------------------------- internals
    def _check_batch(self, x, y):
        return check_batch(self.model, self.dtype, x, y)

    def _prepare(self, x, y):
        """Validates a batch, initialises on the first one, and runs the E-step at ``theta_t``.

        :returns: ``(x, y, u, r, gate_probs, resp, loss)`` with ``loss`` the mean NLL at
            ``theta_t`` (a 0-d tensor).
        """
        x, y = self._check_batch(x, y)
        if self._iterate is None:
            self.initialize(x, y)
        u, r = self.model.features(x)
        if self.centring is not None:
            u, r = self.centring.features(u, r)
            y = self.centring.centred_outputs(y)
        gate_probs, resp, log_lik = e_step(
            self.expert_surrogate, self._iterate, u, r, y, self.gate_surrogate
        )
        loss = -log_lik.mean()
        if not torch.isfinite(loss):
            raise ValueError(
                "the batch's log-likelihood is not finite at the current parameters "
                "(values too large for the model's dtype?); the state was left unchanged"
            )
        return x, y, u, r, gate_probs, resp, loss

    def _commit(self, params: MoEParams, num_rows: int, report=None, gate_fit=None) -> None:
        """Makes ``params`` (in the iteration's coordinates) the new iterate and writes it into
        the model (after checks)."""
        if not all(bool(torch.isfinite(t).all()) for t in tree_leaves(params)):
            raise FloatingPointError(
                f"the {self.name} update produced non-finite parameters; the state was left "
                f"unchanged (increase the ridge, or lower the step size)"
            )
        self._iterate = params
        self.num_steps += 1
        self.samples_seen += num_rows
        if report is not None:
            self.regularisation["empty_expert_steps"] += int(bool(report.empty_experts.any()))
            count_floored_variances(self, self.name, report.floored_variances)
        if gate_fit is not None and not gate_fit.converged:
            self.regularisation["unconverged_gate_steps"] += 1
        self.model.set_params(self.params, validate=False)
