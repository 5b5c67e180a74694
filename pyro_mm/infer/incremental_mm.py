"""Incremental stochastic majorization-minimization (the paper's Algorithms 1 and 2)."""

import math
import warnings

import torch

from ..models.base import MixtureOfExperts
from ..models.params import MoEParams, tree_leaves, tree_map, tree_to
from ..surrogates.mixture import mixture_statistics, solve_mixture
from ..surrogates.registry import (
    expert_surrogate_with_bound,
    fused_statistics_for,
    gate_surrogate_for,
)
from .batches import check_batch, check_model_dtype
from .centring import (
    FeatureCentring,
    centres_regressors,
    centring_from_moments,
    centring_is_exact,
    check_centre_regressors,
    load_centring,
    regressor_moments,
)
from .distributed import agree_on_failure, all_reduce_batch, broadcast_tree, resolve_process_group
from .em_like import check_fit_setup, count_floored_variances, fitter_initial_params
from .fit_loop import fit_batches
from .history import FitHistory
from .schedules import PowerDecay
from .state import (
    check_finite_state,
    check_matching_options,
    check_tree_shapes,
    load_schedule_state,
    load_tree_state,
    schedule_state,
    stored_options,
    tree_state,
    tree_unflatten,
)

__all__ = ["IncrementalMM"]

_BAD_BATCH_POLICIES = ("raise", "skip")
#: What a bad batch raises (all before any state changes); the "skip" policy catches these.
_BAD_BATCH_ERRORS = (ValueError, TypeError, FloatingPointError)


class IncrementalMM:
    r"""Incremental stochastic MM for softmax-gated mixtures of experts.

    Keeps running averages ``s_n`` of the statistics of a quadratic-bound/EM majoriser of the
    negative log-likelihood and updates, for each mini-batch ``z_{n+1}``,

    .. math:: s_{n+1} = s_n + \gamma_{n+1}\big(\bar S(\theta_n; z_{n+1}) - s_n\big), \qquad
              \theta_{n+1} = \arg\min_\theta\ -\psi(\theta) + \langle s_{n+1}, \phi(\theta)\rangle,

    where the argmin is closed form (weighted least squares for the experts, one linear solve for
    the gate). A batch of one sample is the paper's Algorithm 2 exactly. Used like Pyro's ``SVI``::

        model = GaussianMoE(num_experts=2, in_features=10)
        infer = IncrementalMM(model)
        for x_batch, y_batch in stream:
            loss = infer.step(x_batch, y_batch)

    The fitted parameters are written into ``model`` after every step (the Polyak average once
    averaging has started), so ``pyro.infer.Predictive(model, ...)`` uses them directly.

    **Bad batches and faults.** A batch is validated, and its log-likelihood and the update it
    would cause are checked for finiteness, before any state changes: a batch with NaN/inf
    values, the wrong width, no rows, labels outside the model's classes, or magnitudes that
    overflow the dtype raises a ``ValueError``/``TypeError`` naming the problem, or a
    ``FloatingPointError`` when only the statistics or the update overflow. With
    ``on_bad_batch="skip"`` such a batch is skipped instead, with a warning, and counted in
    ``regularisation["skipped_batches"]``. Magnitudes whose squares stay representable (up to
    about ``1e150`` in float64) are fitted exactly as the rescaled data would be. Degenerate but
    valid data is regularised and counted in :attr:`regularisation`: a singular Gram matrix
    (constant features) gets the ridge and ``gate_eps``; an expert with no responsibility keeps
    its parameters (``"empty_expert_steps"``); a collapsing variance is raised to
    ``variance_floor`` (``"floored_variances"``).

    **Checkpoints.** :meth:`state_dict` / :meth:`load_state_dict` save and restore everything
    the iteration depends on; resuming an interrupted stream from a checkpoint (through
    ``torch.save``/``torch.load``) gives bit-identical parameters to the uninterrupted run.

    **Data-parallel fitting.** With ``torch.distributed`` initialised (or a ``process_group``
    given), each rank steps on its own shard and the batch statistics are averaged over the ranks
    (weighted by their row counts, see :mod:`pyro_mm.infer.distributed`, which also shows the
    ``torchrun`` launch), so all ranks hold the parameters of one process fed the concatenation of
    their batches. The initial parameters are those of the group's first rank (K-means on its
    first batch), broadcast to the others. Every rank must call :meth:`step` the same number of
    times; a batch rejected on one rank makes every rank raise (or skip) together.

    :param MixtureOfExperts model: the model to fit; it is moved to ``dtype``.
    :param schedule: step sizes ``n -> gamma_n``; default :class:`PowerDecay` ``(1.0, 0.6)``.
    :param int polyak_start: start averaging the iterates at this step (``None``: no averaging).
    :param str gate_bound: curvature bound of the softmax, ``"bohning"`` or ``"paper"``, or for
        two experts the per-sample ``"jaakkola-jordan"`` (see ``benchmarks/bounds.py``). The
        gate block of the model's gate (:func:`~pyro_mm.surrogates.registry.gate_surrogate_for`)
        applies it (a hierarchical gate to each of its levels).
    :param str expert_bound: for experts with a softmax (``MultinomialMoE``), the curvature
        bound of their surrogate: ``"bohning"`` (``None``: the expert block's default),
        ``"paper"`` or the per-sample ``"jebara-choromanska"`` (see
        :class:`~pyro_mm.surrogates.multinomial_expert.MultinomialExpertSurrogate`).
    :param float gate_eps: the ``eps* I`` added to the gate curvature (keeps it definite).
    :param float ridge: ridge on the expert coefficients (relative to each expert's mass).
    :param float variance_floor: smallest expert variance (a collapsing variance is floored).
    :param str init: ``"auto"`` (K-means on the first batch unless the model is already
        fitted), ``"kmeans"``, ``"kmeans-logistic"`` (gate from a logistic regression of the
        cluster labels, the paper's "Incremental MM*"), ``"spectral"`` (the spectral method of
        :mod:`pyro_mm.spectral`) or ``"current"`` (the model's parameters); see
        :func:`pyro_mm.init.initial_params`.
    :param int seed: seed of the K-means initialisation.
    :param torch.dtype dtype: dtype of the statistics and parameters (float64 by default: the
        statistics are long-running averages; float32 is about twice as fast and safe for
        well-scaled data, see ``tests/test_float32.py``).
    :param process_group: ``None`` (the default ``torch.distributed`` group when it is
        initialised with several ranks, else a single process), ``False`` (a single process
        regardless) or a ``torch.distributed`` process group. Resolved at construction.
    :param str on_bad_batch: ``"raise"`` (default) or ``"skip"`` (a bad batch leaves the state
        unchanged, returns ``nan``, warns and is counted).
    :param penalty: a :class:`~pyro_mm.surrogates.penalties.CoefficientPenalty` (lasso/ridge)
        on the expert coefficients, passed to the expert block (MAP inside MM).
    :param gate_penalty: a :class:`~pyro_mm.surrogates.penalties.CoefficientPenalty` on the
        gate weights, inside the gate's quadratic-bound solve (gates whose block has
        ``supports_penalty``: the softmax gate).
    :param variance_prior: an :class:`~pyro_mm.surrogates.penalties.InverseGammaPrior` on the
        expert variances, passed to the expert block.
    :param stability: a :class:`~pyro_mm.infer.stability.StatisticsTruncation` keeping the
        running statistics in expanding compact sets (truncations counted in
        ``regularisation["truncations"]``); ``None``: no truncation.
    :param centre_regressors: ``True``: run the iteration on the regressors centred on the
        first batch's means, the intercept absorbing the shift (see
        :mod:`~pyro_mm.infer.centring`): the same fit in exact arithmetic, without the loss of
        accuracy that inputs far from zero cause. ``False``: in the model's own coordinates, as
        the paper writes it. ``"auto"`` (default): centred where that leaves the objective
        unchanged (:func:`~pyro_mm.infer.centring.centring_is_exact`: no penalty on an
        intercept, no statistics truncation; so not for multinomial experts, whose ridge covers
        their intercepts, and ``True`` there moves that ridge onto the centred intercepts) and
        some regressor's mean exceeds its standard deviation in the first batch (elsewhere
        centring buys no accuracy: :func:`~pyro_mm.infer.centring.centring_from_moments`).
        Real outputs are centred with the regressors (the experts' intercepts absorb their
        means too), and an output far from zero also makes ``"auto"`` centre.
    """

    def __init__(
        self,
        model: MixtureOfExperts,
        *,
        schedule=None,
        polyak_start: int = None,
        gate_bound: str = "bohning",
        expert_bound: str = None,
        gate_eps: float = 1e-6,
        ridge: float = 1e-8,
        variance_floor: float = 1e-6,
        init: str = "auto",
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        process_group=None,
        on_bad_batch: str = "raise",
        penalty=None,
        gate_penalty=None,
        variance_prior=None,
        stability=None,
        centre_regressors="auto",
    ):
        check_fit_setup(
            model,
            type(self).__name__,
            init=init,
            ridge=ridge,
            variance_floor=variance_floor,
            dtype=dtype,
        )
        if polyak_start is not None and (int(polyak_start) != polyak_start or polyak_start < 1):
            raise ValueError(
                f"polyak_start must be a positive integer or None, got {polyak_start!r}"
            )
        if not gate_eps >= 0:
            raise ValueError(f"gate_eps must be >= 0, got {gate_eps!r}")
        check_centre_regressors(centre_regressors)
        if on_bad_batch not in _BAD_BATCH_POLICIES:
            raise ValueError(
                f"on_bad_batch must be one of {_BAD_BATCH_POLICIES}, got {on_bad_batch!r}"
            )
        self.model = model.to(dtype)
        self.schedule = PowerDecay() if schedule is None else schedule
        self.polyak_start = polyak_start
        self.gate_bound = gate_bound
        self.gate_eps = float(gate_eps)
        self.init = init
        self.seed = seed
        self.dtype = dtype
        self.ridge = float(ridge)
        self.variance_floor = float(variance_floor)
        self._warned_floor = False
        self.on_bad_batch = on_bad_batch
        self.centre_regressors = centre_regressors
        self.process_group = resolve_process_group(process_group)
        self.gate_surrogate = gate_surrogate_for(model)
        if gate_penalty is not None and not self.gate_surrogate.supports_penalty:
            raise ValueError(
                f"gate_penalty is not available for the model's gate {model.gate!r}: its block "
                f"{type(self.gate_surrogate).__name__} has no penalised solve"
            )
        self.curvature = self.gate_surrogate.curvature(model.num_experts, gate_bound, dtype)
        options = {"penalty": penalty, "variance_prior": variance_prior}
        options = {name: value for name, value in options.items() if value is not None}
        self.expert_surrogate = expert_surrogate_with_bound(
            model, expert_bound, ridge=ridge, variance_floor=variance_floor, **options
        )
        self.expert_bound = expert_bound
        self._fused_statistics = fused_statistics_for(
            model, self.expert_surrogate, self.gate_surrogate
        )
        self.gate_penalty, self.stability, self.stability_state = gate_penalty, stability, None
        self._centres = centres_regressors(
            centre_regressors,
            centring_is_exact(model, self.expert_surrogate, gate_penalty, stability),
        )
        self._penalties = repr((penalty, gate_penalty, variance_prior, stability))
        #: the iterate ``theta_n`` and the Polyak average, in the centred coordinates the
        #: iteration runs in (see :attr:`centring`; :attr:`params` and :attr:`averaged_params`
        #: give them in the model's).
        self._iterate: MoEParams = None
        self._average: MoEParams = None
        #: the means of the regressors that the iteration subtracts (from the first batch; see
        #: :mod:`~pyro_mm.infer.centring`); ``None`` before initialisation.
        self.centring: FeatureCentring = None
        #: running statistics ``s_n`` (of the centred regressors).
        self.statistics = None
        #: number of steps taken.
        self.num_steps = 0
        #: samples consumed by ``step`` (over all ranks when distributed).
        self.samples_seen = 0
        #: regularisation counters: steps with an empty expert, variances floored, bad batches
        #: skipped (``on_bad_batch="skip"``).
        self.regularisation = {
            "empty_expert_steps": 0,
            "floored_variances": 0,
            "skipped_batches": 0,
            "truncations": 0,
        }
        self.history = FitHistory()

    # ------------------------------------------------------------------------------ checks
    def _check_batch(self, x, y):
        return check_batch(self.model, self.dtype, x, y)

    @property
    def _defers_finiteness(self) -> bool:
        """Whether a step may leave the inputs' finiteness to its log-likelihood: with the
        one-pass statistics a NaN or infinite input makes the batch's log-likelihood non-finite,
        which the step checks before any state changes (and then names the bad rows, see
        :meth:`_reduced_statistics`). Not for the first batch (K-means needs finite data) nor
        when distributed (every rank must reach the same collectives)."""
        return (
            self._fused_statistics is not None
            and self.process_group is None
            and self._iterate is not None
        )

    def _checked_batch(self, x, y):
        """``(x, y, None)`` validated, or ``(x, y, error)``: a distributed step must reach the
        collective that tells the other ranks about the error before raising it."""
        try:
            if self._defers_finiteness:
                return (*check_batch(self.model, self.dtype, x, y, finite=False), None)
            return (*self._check_batch(x, y), None)
        except (ValueError, TypeError) as err:
            if self.process_group is None:
                raise
            return x, y, err

    def _raise_on_failure(self, local_error, failed_ranks: int) -> None:
        if local_error is not None:
            raise local_error
        if failed_ranks:
            raise ValueError(
                f"{failed_ranks} other rank(s) rejected their batch; no rank changed its state"
            )

    # -------------------------------------------------------------------------------- verbs
    def initialize(self, x, y) -> None:
        """Sets ``theta_0`` (per ``init``) and ``s_0 = S(theta_0; batch)`` from a first batch.

        Called by the first :meth:`step` on its own batch when not called before. When
        distributed, ``theta_0`` comes from the group's first rank and ``s_0`` averages all
        ranks' batches.
        """
        x, y, local_error = self._checked_batch(x, y)
        params, centring = self._initial_params(x, y, local_error)
        stats, _, _, _ = self._reduced_statistics(params, x, y, None, centring)
        _check_finite_statistics(stats)
        self._warn_if_ill_conditioned(stats)
        self._iterate, self.centring, self.statistics = params, centring, stats
        self._average, self.num_steps = None, 0
        self.model.set_params(self.estimate, validate=False)

    def step(self, x, y) -> float:
        """One incremental MM step on a mini-batch.

        :param x: inputs ``(N, P)``.
        :param y: outputs ``(N, Q)`` (or ``(N,)`` for one output).
        :returns: the batch's mean negative log-likelihood at the parameters the step was given
            (over all ranks' batches when distributed; ``nan`` for a skipped bad batch).
        :rtype: float
        :raises ValueError: (or ``TypeError``, ``FloatingPointError``) for a bad batch, before
            any state changes.
        """
        # A model converted to another dtype, or a step size outside (0, 1], is the fit's own
        # configuration, not the batch's: raised whatever on_bad_batch says (skipping would skip
        # every batch). The schedule is the same on every rank; a rank's model is its own, so
        # when distributed its dtype is checked with the batch, which the other ranks learn of.
        if self.process_group is None:
            check_model_dtype(self.model, self.dtype)
        self._step_size()
        try:
            return self._step(x, y)
        except _BAD_BATCH_ERRORS as err:
            if self.on_bad_batch == "raise":
                raise
            self.regularisation["skipped_batches"] += 1
            warnings.warn(
                f"IncrementalMM skipped a bad batch, state unchanged: {err}",
                RuntimeWarning,
                stacklevel=2,
            )
            return math.nan

    def _step(self, x, y) -> float:
        x, y, local_error = self._checked_batch(x, y)
        params, centring = self._iterate, self.centring
        if params is None:
            params, centring = self._initial_params(x, y, local_error)
        batch_stats, loss, num_rows, overflow_probe = self._reduced_statistics(
            params, x, y, local_error, centring
        )
        if self.statistics is None:
            self._warn_if_ill_conditioned(batch_stats)
        stats = self._updated_statistics(batch_stats, num_rows)
        stability_state = self.stability_state
        if self.stability is not None:
            stats, stability_state = self.stability.project(stats, stability_state)
        if overflow_probe is None or self.stability is not None or self.statistics is None:
            _check_finite_statistics(stats)
        elif not math.isfinite(overflow_probe.item()):
            # The running statistics are finite and the update combines them linearly with the
            # batch's: the result is finite iff the batch's are (barring sums beyond the
            # dtype's range).
            raise FloatingPointError(_OVERFLOW_MESSAGE)
        new_params, report = solve_mixture(
            stats,
            params,
            self.expert_surrogate,
            self.curvature,
            self.gate_eps,
            self.gate_penalty,
            self.gate_surrogate,
        )
        if not _all_finite(tree_leaves(new_params)):
            raise FloatingPointError(
                "the MM update produced non-finite parameters; the state was left unchanged "
                "(increase gate_eps or ridge, or standardise the data)"
            )
        if stability_state is not None and self.stability_state is not None:
            self.regularisation["truncations"] += stability_state.count - self.stability_state.count
        self.statistics, self._iterate, self.stability_state = stats, new_params, stability_state
        self.centring = centring
        self.num_steps += 1
        self.samples_seen += num_rows
        self.regularisation["empty_expert_steps"] += int(bool(report.empty_experts.any()))
        count_floored_variances(self, type(self).__name__, report.floored_variances)
        self._update_average()
        self.model.set_params(self.estimate, validate=False)
        return loss

    def _updated_statistics(self, batch_stats, num_rows: int):
        """``s_{n+1} = s_n + gamma_{n+1} (S(theta_n; z_{n+1}) - s_n)`` from the batch's statistics
        (a pure function of the state: :meth:`_step` commits it only when the step succeeds). At
        the first step ``s_0 = S(theta_0; z_1)`` is the batch's own statistic."""
        gamma = self._step_size()
        previous = batch_stats if self.statistics is None else self.statistics
        # One fused call for all the statistics' tensors (the same lerp, bit for bit).
        averaged = torch._foreach_lerp(tree_leaves(previous), tree_leaves(batch_stats), gamma)
        return tree_unflatten(batch_stats, averaged)

    def _step_size(self) -> float:
        """``gamma_{n+1}`` of the next step, from the schedule.

        :raises ValueError: when it is not in ``(0, 1]``: the update is then no longer a convex
            combination of statistics, and the running Gram matrices could lose positive
            definiteness without any error.
        """
        gamma = float(self.schedule(self.num_steps + 1))
        if not 0.0 < gamma <= 1.0:
            raise ValueError(
                f"the step-size schedule returned gamma = {gamma!r} at step "
                f"{self.num_steps + 1}; it must lie in (0, 1]"
            )
        return gamma

    def evaluate_loss(self, x, y) -> float:
        """Mean negative log-likelihood of ``(x, y)`` at the current estimate (no state change)."""
        with torch.no_grad():
            return -self.model.log_prob(x, y).mean().item()

    def fit(
        self,
        x,
        y=None,
        *,
        batch_size: int = None,
        epochs: int = 1,
        shuffle: bool = False,
        progress: bool = True,
    ):
        """Runs :meth:`step` over a whole stream.

        :param x: inputs ``(N, P)``, or (with ``y=None``) an iterable of ``(x, y)`` batches.
        :param y: outputs, or ``None`` when ``x`` is a stream of batches.
        :param int batch_size: rows per step for array inputs (default 256, which reaches the
            MLE's NLL within 1e-3 nats in one pass of 10^5 samples in ``benchmarks/streaming.py``).
        :param int epochs: passes over the data.
        :param bool shuffle: take the rows of arrays in a new random order at each epoch (seeded
            by ``seed``). Without it they come in their order, which must then be random: rows
            sorted in any way (by class, by time, by an input) bias the stochastic updates.
        :param bool progress: show a tqdm progress bar.
        :returns: the :class:`FitHistory` of this call (also appended to ``self.history``).
        """
        if y is not None and batch_size is None:
            batch_size = 256
        return fit_batches(self, x, y, batch_size, epochs, shuffle=shuffle, progress=progress)

    # --------------------------------------------------------------------------- internals
    @property
    def params(self) -> MoEParams:
        """The current iterate ``theta_n`` in the model's coordinates (``None`` before
        initialisation)."""
        return self._model_params(self._iterate)

    @property
    def averaged_params(self) -> MoEParams:
        """The Polyak average of the iterates in the model's coordinates (``None`` until
        averaging starts)."""
        return self._model_params(self._average)

    @property
    def estimate(self) -> MoEParams:
        """The estimator, in the model's coordinates: the Polyak average once averaging has
        started, else the iterate."""
        return self._model_params(self._average if self._average is not None else self._iterate)

    def _model_params(self, params):
        if params is None or self.centring is None:
            return params
        return self.centring.model_params(params, self.model)

    def _batch_statistics(self, params, x, y, centring):
        """``(statistics, log_lik, overflow_probe)`` of a validated batch at ``params`` (both in
        the coordinates of ``centring``); the probe (``None`` on the block-by-block path) is a
        0-dim tensor finite iff the statistics are (see
        :func:`~pyro_mm.surrogates.gaussian_mixture.gaussian_mixture_statistics`)."""
        if self._fused_statistics is not None:
            # Inference mode skips autograd's bookkeeping on each of the E-step's ~60
            # operations. Its outputs are inference tensors, but only the batch's: the running
            # statistics and the parameters are computed from them outside it (normal tensors).
            with torch.inference_mode():
                design = self.model.regressors_and_outputs(x, y)
                if centring is not None:
                    # In place: the design is this step's own copy (a concatenation).
                    design = centring.centre_design_(design)
                return self._fused_statistics(params, design, self.curvature, self.gate_eps)
        u, r = self.model.features(x)
        if centring is not None:
            u, r = centring.features(u, r)
            y = centring.centred_outputs(y)
        stats, log_lik = mixture_statistics(
            self.expert_surrogate,
            params,
            u,
            r,
            y,
            self.curvature,
            self.gate_eps,
            self.gate_surrogate,
        )
        return stats, log_lik, None

    def _warn_if_ill_conditioned(self, stats) -> None:
        """Warns when the gate features' Gram matrix is too ill-conditioned for ``dtype``: the
        solves then lose ``log10(condition number)`` of the dtype's significant digits."""
        gram = self.gate_surrogate.feature_gram(stats.gate)
        if not bool(torch.isfinite(gram).all()):
            return  # overflowing statistics, which the step's finiteness check reports
        condition = float(torch.linalg.cond(gram.double()))
        if not condition * torch.finfo(self.dtype).eps < 1e-2:
            digits = -math.log10(torch.finfo(self.dtype).eps)
            # float64 is the widest dtype the solves support: suggest it only below it.
            wider = "" if self.dtype == torch.float64 else " (or use float64)"
            warnings.warn(
                f"the gate features' Gram matrix has condition number {condition:.1e} (constant, "
                f"duplicated or badly scaled features): the {self.dtype} solves, which carry "
                f"about {digits:.0f} significant digits, may lose most of them; standardise the "
                f"inputs{wider}",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def _is_first_rank(self) -> bool:
        if self.process_group is None:
            return True
        import torch.distributed as dist

        return dist.get_rank(self.process_group) == 0

    def _initial_params(self, x, y, local_error):
        """``(theta_0, centring)`` on every rank: ``theta_0`` per ``init`` from the first rank's
        batch, in the coordinates of the regressors centred on their means over all ranks'
        batches (``centring`` is ``None`` when the iteration is not centred)."""
        centring = None
        if self._centres:
            # The moments are a collective over every rank's batch: agree that all are valid
            # first. A single process fed the concatenated batches centres the same.
            self._raise_on_failure(
                local_error, agree_on_failure(self.process_group, local_error is not None)
            )
            moments = all_reduce_batch(
                self.process_group, regressor_moments(self.model, x, y), None, 0.0, x.shape[0]
            ).statistics
            centring = centring_from_moments(moments, self.model, self.centre_regressors is True)
        params, error = None, local_error
        if error is None and self._is_first_rank:
            try:
                params = fitter_initial_params(self, x, y, centring)
            except (ValueError, TypeError) as err:
                error = err
        self._raise_on_failure(error, agree_on_failure(self.process_group, error is not None))
        if self.process_group is not None:
            template = tree_to(self.model.get_params(), self.dtype) if params is None else params
            params = broadcast_tree(self.process_group, template)
        if centring is None:
            return params, None
        return centring.centred_params(params, self.model), centring

    def _reduced_statistics(self, params, x, y, local_error, centring):
        """The batch statistics at ``params``, its mean NLL, row count and overflow probe (see
        :meth:`_batch_statistics`), over all ranks.

        :raises ValueError: when a rank failed, an input is not finite, or the log-likelihood is
            not finite.
        """
        batch_stats, log_lik, log_lik_sum, num_rows, probe = None, None, 0.0, 0, None
        if local_error is None:
            batch_stats, log_lik, probe = self._batch_statistics(params, x, y, centring)
            log_lik_sum, num_rows = log_lik.sum(), x.shape[0]
        reduced = all_reduce_batch(
            self.process_group, batch_stats, self.statistics, log_lik_sum, num_rows
        )
        self._raise_on_failure(local_error, reduced.failed_ranks)
        loss = -reduced.log_lik_sum / reduced.num_rows
        if not math.isfinite(loss):
            if self._defers_finiteness:
                self._check_batch(x, y)  # names the rows holding NaN or inf, if any
            bad_rows = int((~torch.isfinite(log_lik)).sum())
            raise ValueError(
                f"the batch's log-likelihood is not finite at the current parameters ({bad_rows} "
                f"of this rank's {num_rows} rows; values too large for the model's dtype, or "
                f"far outside the data seen so far?); the state was left unchanged"
            )
        # Distributed statistics sum every rank's batch; the probe covers only this rank's.
        probe = probe if self.process_group is None else None
        return reduced.statistics, loss, reduced.num_rows, probe

    # ---------------------------------------------------------------------------- checkpoints
    def _options(self) -> dict:
        """What defines the iteration besides its state; a state loads only into a match."""
        return {
            "model": type(self.model).__name__,
            "num_experts": self.model.num_experts,
            "gate": repr(self.model.gate),
            "gate_bound": self.gate_bound,
            "expert_bound": self.expert_bound,
            "gate_eps": self.gate_eps,
            "ridge": self.ridge,
            "variance_floor": self.variance_floor,
            "dtype": str(self.dtype),
            "penalties_and_stability": self._penalties,
        }

    def state_dict(self) -> dict:
        """Everything the iteration depends on, as plain data (``torch.save`` it).

        Holds the options it was built with, the schedule (its class and parameters) and
        ``polyak_start``, the iterate, the Polyak average, the running statistics, the step and
        sample counters, the regularisation counters and the history. There is no random state
        after initialisation (K-means is seeded by ``seed``).
        """
        return {
            "options": self._options(),
            "schedule": schedule_state(self.schedule),
            "polyak_start": self.polyak_start,
            "params": tree_state(self._iterate),
            "averaged_params": tree_state(self._average),
            "centring": tree_state(self.centring),
            "statistics": tree_state(self.statistics),
            "num_steps": self.num_steps,
            "samples_seen": self.samples_seen,
            "regularisation": dict(self.regularisation),
            "history": self.history.as_dict(),
            "stability_state": tree_state(self.stability_state),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict` and writes its estimate into the model.

        The schedule and ``polyak_start`` are restored from the state (a schedule that is a
        plain function is not stored: pass the same one to the constructor).

        :raises ValueError: when the state was made with other options (bound, ``gate_eps``,
            ridge, floor, dtype, number of experts) or parameter shapes; nothing is changed then.
        """
        check_matching_options("IncrementalMM", stored_options(state), self._options())
        check_finite_state(state)
        params = load_tree_state(state["params"])
        averaged = load_tree_state(state["averaged_params"])
        stats = load_tree_state(state["statistics"])
        if (params is None) != (stats is None):
            raise ValueError("the state must hold both parameters and statistics, or neither")
        expected = tree_to(self.model.get_params(), self.dtype)
        check_tree_shapes("params", params, expected if params is not None else None)
        if averaged is not None:
            check_tree_shapes("averaged_params", averaged, expected)
        # A state saved before the iteration centred its regressors has no centring: its
        # parameters and statistics are in the model's coordinates, and go on in them.
        centring = load_centring(state.get("centring"), self.model, self.dtype)
        if stats is not None:
            solved, _ = solve_mixture(
                stats,
                params,
                self.expert_surrogate,
                self.curvature,
                self.gate_eps,
                gate_surrogate=self.gate_surrogate,
            )
            check_tree_shapes("the parameters solved from the statistics", solved, expected)
        schedule = load_schedule_state(self.schedule, state["schedule"])
        history = FitHistory(**state["history"])
        self.schedule, self.polyak_start = schedule, state["polyak_start"]
        self._iterate, self._average, self.statistics = params, averaged, stats
        self.centring = centring
        self.num_steps, self.samples_seen = int(state["num_steps"]), int(state["samples_seen"])
        self.regularisation = dict(state["regularisation"])
        self.history = history
        self.stability_state = load_tree_state(state.get("stability_state"))
        if params is not None:
            self.model.set_params(self.estimate, validate=False)

    def _update_average(self) -> None:
        if self.polyak_start is None or self.num_steps < self.polyak_start:
            return
        count = self.num_steps - self.polyak_start + 1
        if self._average is None:
            self._average = tree_map(torch.clone, self._iterate)
        else:
            self._average = tree_map(
                lambda avg, new: avg + (new - avg) / count, self._average, self._iterate
            )


_OVERFLOW_MESSAGE = (
    "the batch's statistics overflow the model's dtype (products of features or outputs too "
    "large: standardise the data); the state was left unchanged"
)


def _check_finite_statistics(stats) -> None:
    if not _all_finite(tree_leaves(stats)):
        raise FloatingPointError(_OVERFLOW_MESSAGE)


def _all_finite(tensors) -> bool:
    # A finite sum of sums proves every entry finite with one reduction per tensor (no
    # element-wise mask); only an overflowing sum needs the entry-wise check.
    if math.isfinite(sum(t.sum().item() for t in tensors)):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)
