r"""EM as mirror descent with the KL (log-partition) Bregman divergence (paper 002, Theorem 4.1).

Write ``p_theta(y, z | x)`` for the complete-data model, ``A`` for its log-partition averaged over
the inputs, ``grad A(theta) = E_theta[S]`` for its mean parameters (the complete-data statistics
expected under the model itself) and ``s(theta_t) = E_{z | x, y; theta_t}[S]`` for the statistics
of the E-step. With step size ``eta`` in ``(0, 1]`` one step is, in mean-parameter form,

.. math:: \nabla A(\tilde\theta_{t+1}) = (1 - \eta)\, \nabla A(\theta_t) + \eta\, s(\theta_t),
          \qquad \theta_{t+1} = \text{M-projection of } \tilde\theta_{t+1},

equivalently ``theta_{t+1} = argmin_theta eta Q(theta | theta_t) + (1 - eta) K(theta_t, theta)``
with ``K(theta_t, theta) = avg_n KL(p_{theta_t}(y, z | x_n) || p_theta(y, z | x_n))``. Per block:

* **gate** (exact, no projection needed): ``grad A(W) = avg_n g(x_n; W) u_n^T``, so the step is
  the soft-label softmax regression with targets ``(1 - eta) g(x; W_t) + eta tau``, solved by
  Newton to a gradient tolerance:
  ``avg g(x; W_{t+1}) u^T = (1 - eta) avg g(x; W_t) u^T + eta avg tau u^T``.
  The same targets serve every gate (:mod:`pyro_mm.models.gates`): the gate's part of
  ``K(theta_t, theta)`` is ``-avg_n sum_k g_k(x_n; W_t) log g_k(x_n; W)`` up to a constant, so the
  step is that gate's exact M-step (its block's ``exact_m_step``) with the mixed targets, and
  stays monotone. For the hierarchical gate, whose log-probabilities are not linear in its
  weights, this is the proximal (KL-regularised) form of the step, not a mean-parameter identity.
* **experts** (exact for Gaussian experts, whose statistics are the complete-data sufficient
  statistics; one MM step for families with bound statistics): the expert step solves the mixed
  statistics ``(1 - eta) m(theta_t) + eta S(theta_t)``, where ``m`` are
  the statistics expected under the current experts with gate weights ``g(x; W_t)``
  (``mean_statistics`` of the expert surrogate). The solve is the M-projection: a Gaussian MoE is a
  curved family (the statistics ``tau_k r r^T`` outnumber the parameters), so
  ``grad A(theta_{t+1})`` equals the mixture only after projection, exactly as in the paper's
  projected mirror descent.

``eta = 1`` is EM step for step; ``eta < 1`` is a damped EM that still never increases the NLL:
``K >= 0`` and ``K(theta_t, theta_t) = 0`` give
``Q(theta_{t+1} | theta_t) <= Q(theta_t | theta_t)``, and ``L = Q(. | theta_t) - H(. | theta_t)``
with ``H(. | theta_t)`` (the cross-entropy of the posterior of ``z``) minimal at ``theta_t``.

**Stochastic version.** Given a mini-batch ``B`` instead of the data set, the same formula is used
with the batch's statistics *and* the batch's mean parameters (targets mixed on the current
mini-batch for the gate, ``m_B(theta_t)`` for the experts): exactly a stochastic mirror-descent
step whose Bregman divergence is the KL averaged over the batch's inputs. What is approximate: the
population mirror map ``A`` (an expectation over the unknown input distribution) is replaced by
its mini-batch estimate ``A_B``; in a regular exponential family with an input-free log-partition
this would be the online EM of Cappé & Moulines, here the log-partition depends on ``x`` and
cannot be carried as a running average. Consequences: use decreasing step sizes
(e.g. :class:`~pyro_mm.infer.PowerDecay`) over a stream, and batches in which every expert's
share (its rows' worth of weight, ``sum_n (1 - eta) g_k + eta tau_k``) is well above its number of
regressors: the batch's KL barely constrains the directions the batch does not span, and the
solve can set wild coefficients along them (flat directions, lost to the ridge, with fewer rows
than regressors). A step where some share is below the number of regressors is counted in
``regularisation["short_expert_share_steps"]`` and warned about once. For running-average
statistics with small batches use :class:`~pyro_mm.infer.IncrementalMM`.
"""

import warnings

import torch

from ..models.base import MixtureOfExperts
from ..models.params import MoEParams, tree_map
from ..validation import positive_integer
from .em_like import EMLikeInference, gate_solver_options
from .fit_loop import fit_batches
from .history import FitHistory
from .schedules import ConstantStep

__all__ = ["MirrorDescentEM"]


class MirrorDescentEM(EMLikeInference):
    r"""Mirror-descent EM (damped / stochastic EM) for softmax-gated mixtures of experts.

    See the module docstring for the update and what is exact. Usage::

        md = MirrorDescentEM(model, step_size=0.5)            # damped batch EM
        for _ in range(100):
            loss = md.step(x, y)

        online = MirrorDescentEM(model, step_size=PowerDecay(1.0, 0.6), batch_size=512)
        online.fit(stream)                                     # stochastic mirror descent

    The estimate is written into ``model`` after every step.

    :param MixtureOfExperts model: the model to fit; its expert surrogate must provide
        ``mean_statistics``. The expert step is exact when the surrogate's ``solve`` is the exact
        M-step of its statistics (Gaussian experts, diagonal or full covariance). Multinomial
        experts keep quadratic-bound statistics: their step is one MM step on the
        mirror-descent objective (still monotone, not its minimiser), so ``step_size=1`` is
        then EM for the gate but batch MM for the experts; use :class:`EM` for exact EM there.
    :param step_size: ``eta`` in ``(0, 1]``, or a schedule ``n -> eta_n`` (e.g.
        :class:`~pyro_mm.infer.PowerDecay` for a stream).
    :param int batch_size: rows per step used by :meth:`fit` on array inputs (``None``: the whole
        data set at every step, i.e. batch mirror descent).
    :param float ridge: ridge on the expert coefficients (relative to each expert's mass).
    :param float variance_floor: smallest expert variance.
    :param float gate_ridge: ridge on the gate weights in the gate step.
    :param float gate_tol: gradient tolerance of the gate's Newton solve.
    :param int gate_max_iter: Newton iteration cap of the gate solve.
    :param str expert_bound: for experts with a softmax (``MultinomialMoE``), the curvature bound
        of their MM step: ``"bohning"`` (``None``: the expert block's default), ``"paper"`` or the
        per-sample ``"jebara-choromanska"``, as in :class:`~pyro_mm.infer.IncrementalMM`.
    :param str init: as in :class:`~pyro_mm.infer.EM`.
    :param int seed: seed of the K-means initialisation.
    :param torch.dtype dtype: dtype of the parameters and computations.
    :param centre_regressors: ``"auto"`` (default), ``True`` or ``False``, as in
        :class:`~pyro_mm.infer.EM` (centred on the first batch's means).
    """

    name = "MirrorDescentEM"
    option_names = ("gate_options", "expert_bound")

    def __init__(
        self,
        model: MixtureOfExperts,
        step_size=1.0,
        batch_size: int = None,
        *,
        ridge: float = 1e-8,
        variance_floor: float = 1e-6,
        gate_ridge: float = 0.0,
        gate_tol: float = 1e-10,
        gate_max_iter: int = 100,
        expert_bound: str = None,
        init: str = "auto",
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        centre_regressors="auto",
    ):
        if callable(step_size):
            self.schedule = step_size
        elif isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
            raise TypeError(
                f"step_size must be a number in (0, 1] or a schedule n -> eta_n, got {step_size!r}"
            )
        elif not 0.0 < step_size <= 1.0:
            raise ValueError(f"step_size must lie in (0, 1], got {step_size!r}")
        else:
            self.schedule = ConstantStep(float(step_size))
        if batch_size is not None:
            batch_size = positive_integer("batch_size", batch_size)
        self.batch_size = batch_size
        #: keyword arguments of the gate's Newton solve (ridge, tol, max_iter).
        self.gate_options = gate_solver_options(gate_ridge, gate_tol, gate_max_iter)
        super().__init__(
            model,
            ridge=ridge,
            variance_floor=variance_floor,
            init=init,
            seed=seed,
            dtype=dtype,
            centre_regressors=centre_regressors,
            gate_penalises_intercept=gate_ridge > 0,
            expert_bound=expert_bound,
        )
        if not hasattr(self.expert_surrogate, "mean_statistics"):
            raise TypeError(
                f"MirrorDescentEM needs the expert family's mean parameters: the surrogate "
                f"{type(self.expert_surrogate).__name__} of {type(model).__name__} has no "
                f"mean_statistics method (use EM, or IncrementalMM, for this family)"
            )
        #: outcome of the last gate step (Newton iterations, final gradient norm).
        self.last_gate_fit = None
        self.regularisation["short_expert_share_steps"] = 0
        self._warned_short_share = False

    def step(self, x, y) -> float:
        """One mirror-descent step with the current step size on the batch given.

        :param x: inputs ``(N, P)`` (the whole data set, or a mini-batch of a stream).
        :param y: outputs.
        :returns: the batch's mean negative log-likelihood at the parameters the step was given.
        :rtype: float
        """
        eta = float(self.schedule(self.num_steps + 1))
        if not 0.0 < eta <= 1.0:
            raise ValueError(
                f"the step-size schedule returned eta = {eta!r} at step {self.num_steps + 1}; "
                f"it must lie in (0, 1]"
            )
        x, y, u, r, gate_probs, resp, loss = self._prepare(x, y)
        gate_targets = (1.0 - eta) * gate_probs + eta * resp
        # Each expert's mixed statistics weigh the rows by (1 - eta) g_k + eta tau_k: the
        # expert is fitted from that many rows' worth of weight.
        shares = gate_targets.sum(0)
        experts_t = self._iterate.experts
        gate_fit = self.gate_surrogate.exact_m_step(
            u, gate_targets, self._iterate.gate, **self.gate_options
        )
        stats = tree_map(
            lambda mean, observed: (1.0 - eta) * mean + eta * observed,
            self.expert_surrogate.mean_statistics(experts_t, r, gate_probs),
            self.expert_surrogate.statistics(experts_t, r, y, resp),
        )
        experts, report = self.expert_surrogate.solve(stats, experts_t)
        self._commit(MoEParams(gate=gate_fit.weight, experts=experts), x.shape[0], report, gate_fit)
        self.last_gate_fit = gate_fit
        self._report_short_shares(shares, *r.shape)
        return loss.item()

    def _report_short_shares(self, shares: torch.Tensor, num_rows: int, num_features: int) -> None:
        """Counts a step in which some expert's share of the batch (its rows' worth of weight in
        the mixed statistics) is below its number of regressors, and warns at the first.

        Such a solve rests on fewer effective rows than coefficients: the batch's KL barely
        constrains the directions it does not span, and the solved coefficients along them can
        be wild off the batch. With fewer rows than regressors it is a certainty (the statistics
        span at most that many directions; the solve zeroes the others up to the ridge).
        Measured on Communities and Crime with degree-2 experts (21 regressors, K = 2, 20
        passes): batches of 32 rows, every step short, test MSE 52 on one fold where batches
        of 128 (no step short) gave 0.028.
        """
        if not bool((shares < num_features).any()):
            return
        self.regularisation["short_expert_share_steps"] += 1
        if self._warned_short_share:
            return
        self._warned_short_share = True
        smallest = float(shares.min())
        spanned = (
            "; with fewer rows than regressors the solve also zeroes the coefficients along "
            "the directions the batch does not span"
            if num_rows < num_features
            else ""
        )
        warnings.warn(
            f"MirrorDescentEM's expert step on a batch of {num_rows} rows gave an expert a "
            f"share of {smallest:.3g} rows, fewer than its {num_features} expert regressors: "
            f"its solve rests on fewer effective rows than coefficients and can extrapolate "
            f"wildly off the batch{spanned}. Use batches of several times "
            f"{num_features} rows per expert, or IncrementalMM, whose statistics average over "
            f"batches (counted in regularisation['short_expert_share_steps'], warned once)",
            RuntimeWarning,
            stacklevel=3,
        )

    def fit(
        self,
        x,
        y=None,
        *,
        batch_size: int = None,
        epochs: int = 1,
        shuffle: bool = False,
        progress: bool = True,
    ) -> FitHistory:
        """Runs :meth:`step` over a whole stream.

        :param x: inputs ``(N, P)``, or (with ``y=None``) an iterable of ``(x, y)`` batches.
        :param y: outputs, or ``None`` when ``x`` is a stream of batches.
        :param int batch_size: rows per step for array inputs (default: the constructor's
            ``batch_size``; ``None`` there too means the whole data set per step).
        :param int epochs: passes over the data (for batch mirror descent: the number of steps).
        :param bool shuffle: take the rows of arrays in a new random order at each epoch
            (seeded by ``seed``); without it, in their order, which must then be random.
        :param bool progress: show a tqdm progress bar.
        :returns: the :class:`FitHistory` of this call (also appended to ``self.history``).
        """
        batch_size = self.batch_size if batch_size is None else batch_size
        return fit_batches(
            self, x, y, batch_size, epochs, shuffle=shuffle, progress=progress, desc=self.name
        )
