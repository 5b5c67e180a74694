"""Incremental stochastic majorization-minimization (the paper's Algorithms 1 and 2)."""

import time

import torch

from ..init import check_enough_rows, kmeans_init
from ..models.base import MixtureOfExperts
from ..models.params import MoEParams, tree_leaves, tree_map, tree_to
from ..surrogates.mixture import mixture_statistics, solve_mixture
from ..surrogates.registry import expert_surrogate_for
from ..surrogates.softmax_bound import softmax_curvature
from .batches import iterate_batches
from .history import FitHistory
from .schedules import PowerDecay

__all__ = ["IncrementalMM"]

_INITS = ("auto", "kmeans", "kmeans-logistic", "current")


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

    :param MixtureOfExperts model: the model to fit; it is moved to ``dtype``.
    :param schedule: step sizes ``n -> gamma_n``; default :class:`PowerDecay` ``(1.0, 0.6)``.
    :param int polyak_start: start averaging the iterates at this step (``None``: no averaging).
    :param str gate_bound: curvature bound of the softmax, ``"bohning"`` or ``"paper"``.
    :param float gate_eps: the ``eps* I`` added to the gate curvature (keeps it definite).
    :param float ridge: ridge on the expert coefficients (relative to each expert's mass).
    :param float variance_floor: smallest expert variance (a collapsing variance is floored).
    :param str init: ``"auto"`` (K-means on the first batch unless the model is already
        fitted), ``"kmeans"``, ``"kmeans-logistic"`` (gate from a logistic regression of the
        cluster labels, the paper's "Incremental MM*") or ``"current"`` (the model's parameters).
    :param int seed: seed of the K-means initialisation.
    :param torch.dtype dtype: dtype of the statistics and parameters (float64 by default: the
        statistics are long-running averages).
    """

    def __init__(
        self,
        model: MixtureOfExperts,
        *,
        schedule=None,
        polyak_start: int = None,
        gate_bound: str = "bohning",
        gate_eps: float = 1e-6,
        ridge: float = 1e-8,
        variance_floor: float = 1e-6,
        init: str = "auto",
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ):
        if not isinstance(model, MixtureOfExperts):
            raise TypeError(
                f"model must be a pyro_mm mixture of experts, got {type(model).__name__}"
            )
        model.require_no_priors("IncrementalMM")
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if polyak_start is not None and (int(polyak_start) != polyak_start or polyak_start < 1):
            raise ValueError(
                f"polyak_start must be a positive integer or None, got {polyak_start!r}"
            )
        if gate_eps < 0 or ridge < 0 or variance_floor <= 0:
            raise ValueError("gate_eps and ridge must be >= 0 and variance_floor > 0")
        self.model = model.to(dtype)
        self.schedule = PowerDecay() if schedule is None else schedule
        self.polyak_start = polyak_start
        self.gate_bound = gate_bound
        self.gate_eps = float(gate_eps)
        self.init = init
        self.seed = seed
        self.dtype = dtype
        self.curvature = softmax_curvature(model.num_experts - 1, gate_bound, dtype)
        self.expert_surrogate = expert_surrogate_for(
            model, ridge=ridge, variance_floor=variance_floor
        )
        #: current iterate ``theta_n`` (``None`` before initialisation).
        self.params: MoEParams = None
        #: Polyak average of the iterates (``None`` until averaging starts).
        self.averaged_params: MoEParams = None
        #: running statistics ``s_n``.
        self.statistics = None
        #: number of steps taken.
        self.num_steps = 0
        #: samples consumed by ``step``.
        self.samples_seen = 0
        #: regularisation counters: steps with an empty expert, variances floored.
        self.regularisation = {"empty_expert_steps": 0, "floored_variances": 0}
        self.history = FitHistory()

    # ------------------------------------------------------------------------------ checks
    def _check_batch(self, x, y):
        x = self.model.check_x(x)
        return x, self.model.check_y(y, x.shape[0])

    # -------------------------------------------------------------------------------- verbs
    def initialize(self, x, y) -> None:
        """Sets ``theta_0`` (per ``init``) and ``s_0 = S(theta_0; batch)`` from a first batch.

        Called by the first :meth:`step` on its own batch when not called before.
        """
        x, y = self._check_batch(x, y)
        init = self.init
        if init == "auto":
            init = "current" if self.model.fitted else "kmeans"
        if init == "current":
            params = tree_to(self.model.get_params(), self.dtype)
        else:
            check_enough_rows(self.model, x.shape[0])
            gate = "logistic" if init == "kmeans-logistic" else "zero"
            params = kmeans_init(
                self.model, x, y, gate=gate, seed=self.seed, expert_surrogate=self.expert_surrogate
            )
        stats, _ = self._batch_statistics(params, x, y)
        self.params, self.statistics = params, stats
        self.averaged_params, self.num_steps = None, 0
        self.model.set_params(params)

    def step(self, x, y) -> float:
        """One incremental MM step on a mini-batch.

        :param x: inputs ``(N, P)``.
        :param y: outputs ``(N, Q)`` (or ``(N,)`` for one output).
        :returns: the batch's mean negative log-likelihood at the parameters the step was given.
        :rtype: float
        """
        x, y = self._check_batch(x, y)
        if self.params is None:
            self.initialize(x, y)
        batch_stats, log_lik = self._batch_statistics(self.params, x, y)
        loss = -log_lik.mean()
        if not torch.isfinite(loss):
            raise ValueError(
                "the batch's log-likelihood is not finite at the current parameters "
                "(values too large for the model's dtype?); the state was left unchanged"
            )
        gamma = float(self.schedule(self.num_steps + 1))
        stats = tree_map(lambda s, b: s + gamma * (b - s), self.statistics, batch_stats)
        params, report = solve_mixture(
            stats, self.params, self.expert_surrogate, self.curvature, self.gate_eps
        )
        if not all(bool(torch.isfinite(t).all()) for t in tree_leaves(params)):
            raise FloatingPointError(
                "the MM update produced non-finite parameters; the state was left unchanged "
                "(increase gate_eps or ridge)"
            )
        self.statistics, self.params = stats, params
        self.num_steps += 1
        self.samples_seen += x.shape[0]
        self.regularisation["empty_expert_steps"] += int(bool(report.empty_experts.any()))
        self.regularisation["floored_variances"] += report.floored_variances
        self._update_average()
        self.model.set_params(self.estimate)
        return loss.item()

    def evaluate_loss(self, x, y) -> float:
        """Mean negative log-likelihood of ``(x, y)`` at the current estimate (no state change)."""
        with torch.no_grad():
            return -self.model.log_prob(x, y).mean().item()

    def fit(self, x, y=None, *, batch_size: int = None, epochs: int = 1, progress: bool = True):
        """Runs :meth:`step` over a whole stream.

        :param x: inputs ``(N, P)``, or (with ``y=None``) an iterable of ``(x, y)`` batches.
        :param y: outputs, or ``None`` when ``x`` is a stream of batches.
        :param int batch_size: rows per step for array inputs (default 256, which reaches the
            MLE's NLL within 1e-3 nats in one pass of 10^5 samples in ``benchmarks/streaming.py``).
        :param int epochs: passes over the data.
        :param bool progress: show a tqdm progress bar.
        :returns: the :class:`FitHistory` of this call (also appended to ``self.history``).
        """
        from tqdm.auto import tqdm

        if y is not None and batch_size is None:
            batch_size = 256
        batches = iterate_batches(x, y, batch_size, epochs)
        total = None
        if y is not None:
            total = epochs * -(-len(x) // batch_size)
        history = FitHistory()
        start = time.perf_counter()
        with tqdm(batches, total=total, disable=not progress, desc="IncrementalMM") as bar:
            for x_batch, y_batch in bar:
                loss = self.step(x_batch, y_batch)
                history.append(loss, self.samples_seen, time.perf_counter() - start)
                self.history.append(loss, self.samples_seen, history.wall_time[-1])
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        return history

    # --------------------------------------------------------------------------- internals
    @property
    def estimate(self) -> MoEParams:
        """The estimator: the Polyak average once averaging has started, else the iterate."""
        return self.averaged_params if self.averaged_params is not None else self.params

    def _batch_statistics(self, params, x, y):
        u, r = self.model.features(x)
        return mixture_statistics(
            self.expert_surrogate, params, u, r, y, self.curvature, self.gate_eps
        )

    def _update_average(self) -> None:
        if self.polyak_start is None or self.num_steps < self.polyak_start:
            return
        count = self.num_steps - self.polyak_start + 1
        if self.averaged_params is None:
            self.averaged_params = tree_map(torch.clone, self.params)
        else:
            self.averaged_params = tree_map(
                lambda avg, new: avg + (new - avg) / count, self.averaged_params, self.params
            )
