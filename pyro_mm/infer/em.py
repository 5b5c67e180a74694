r"""Batch expectation-maximisation for softmax-gated mixtures of experts (paper 002, Section 3).

Each iteration computes the responsibilities ``tau_nk = p(z_n = k | x_n, y_n; theta_t)`` (E-step)
and minimises ``Q(theta | theta_t) = -avg_n sum_k tau_nk log[g_k(x_n; W) e_k(y_n | x_n; theta_E)]``
(M-step), which separates into

* the gate: a soft-label multinomial logistic regression with targets ``tau``, solved exactly by
  Newton's method with a line search to a gradient tolerance
  (:func:`~pyro_mm.surrogates.exact_gate.exact_gate_m_step`; for another gate, its block's
  ``exact_m_step``: e.g. one such regression per level of a hierarchical gate);
* the experts: the family's exact M-step ``exact_m_step`` (weighted least squares for Gaussian
  experts, weighted softmax regressions for multinomial ones).

Since ``Q(theta | theta_t) - L(theta) = H(theta | theta_t)`` (the cross-entropy of the posterior
of ``z``, minimal at ``theta = theta_t``), an exact M-step never increases the negative
log-likelihood ``L``. Note ``Q(theta | theta) = L(theta) + avg_n entropy(tau_n)``, not ``L(theta)``.
"""

import time
import warnings

import torch

from ..models.base import MixtureOfExperts
from ..models.params import MoEParams
from ..validation import positive_integer, positive_number
from .em_like import EMLikeInference, gate_solver_options
from .history import FitHistory
from .incremental_mm import IncrementalMM
from .schedules import ConstantStep
from .separation import warn_if_classes_separated

__all__ = ["EM", "batch_mm"]


class EM(EMLikeInference):
    r"""Batch EM with exact M-steps for softmax-gated mixtures of experts.

    Used like Pyro's ``SVI`` (``step`` returns the loss) or fitted to convergence::

        model = GaussianMoE(num_experts=2, in_features=10)
        em = EM(model)
        history = em.fit(x, y)          # until the mean NLL changes by less than tol
        em.converged, em.num_iterations

    The estimate is written into ``model`` after every step, so ``pyro.infer.Predictive(model)``
    uses it directly.

    :param MixtureOfExperts model: the model to fit; it is moved to ``dtype``.
    :param float tol: ``fit`` stops when the mean NLL changes by less than ``tol`` between two
        iterations.
    :param float ridge: ridge on the expert coefficients (relative to each expert's mass); ``0``
        gives the maximum-likelihood M-step.
    :param float variance_floor: smallest expert variance (a collapsing variance is floored).
    :param float gate_ridge: ridge on the gate weights in the gate M-step (``0``: maximum
        likelihood).
    :param float gate_tol: gradient tolerance (max-norm) of the gate's Newton solve.
    :param int gate_max_iter: Newton iteration cap of the gate solve.
    :param str init: ``"auto"`` (K-means on the first batch unless the model is already
        fitted), ``"kmeans"``, ``"kmeans-logistic"``, ``"spectral"`` or ``"current"``.
    :param int seed: seed of the K-means initialisation.
    :param torch.dtype dtype: dtype of the parameters and computations (float64 by default).
    :param centre_regressors: ``"auto"`` (default), ``True`` or ``False``: run the iteration on
        the regressors centred on the first batch's means, the intercepts absorbing the shift,
        as :class:`~pyro_mm.infer.IncrementalMM` does (the same fit in exact arithmetic, without
        the ill-conditioned solves that inputs far from zero cause; see
        :mod:`~pyro_mm.infer.em_like`). ``"auto"`` centres where that leaves the objective
        unchanged (no ``gate_ridge``, no ridge on the experts' intercepts, so not for
        multinomial experts) and some regressor's or real output's mean exceeds its standard
        deviation; real outputs are centred with the regressors.
    """

    name = "EM"
    option_names = ("gate_options",)

    def __init__(
        self,
        model: MixtureOfExperts,
        *,
        tol: float = 1e-8,
        ridge: float = 1e-8,
        variance_floor: float = 1e-6,
        gate_ridge: float = 0.0,
        gate_tol: float = 1e-10,
        gate_max_iter: int = 100,
        init: str = "auto",
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        centre_regressors="auto",
    ):
        self.tol = positive_number("tol", tol)
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
        )
        #: whether the last :meth:`fit` met ``tol`` (``None`` before any fit).
        self.converged = None
        #: iterations run by the last :meth:`fit`.
        self.num_iterations = 0
        #: outcome of the last gate M-step (Newton iterations, final gradient norm).
        self.last_gate_fit = None

    def step(self, x, y) -> float:
        """One EM iteration on the data given (normally the whole data set).

        :param x: inputs ``(N, P)``.
        :param y: outputs for the model's expert family.
        :returns: the mean negative log-likelihood at the parameters the step was given.
        :rtype: float
        """
        x, y, u, r, _, resp, loss = self._prepare(x, y)
        gate_fit = self.gate_surrogate.exact_m_step(
            u, resp, self._iterate.gate, **self.gate_options
        )
        experts, report = self.expert_surrogate.exact_m_step(self._iterate.experts, r, y, resp)
        self._commit(MoEParams(gate=gate_fit.weight, experts=experts), x.shape[0], report, gate_fit)
        self.last_gate_fit = gate_fit
        return loss.item()

    def fit(
        self, x, y, *, max_iter: int = 1000, tol: float = None, progress: bool = True
    ) -> FitHistory:
        """Iterates :meth:`step` on ``(x, y)`` until the mean NLL changes by less than ``tol``.

        Sets :attr:`converged` and :attr:`num_iterations`; warns when ``max_iter`` is reached
        first. The loss recorded for iteration ``t`` is the NLL at ``theta_{t-1}`` (the
        parameters that step was given), so the model ends one iteration past the last
        recorded loss.

        :param x: inputs ``(N, P)``.
        :param y: outputs.
        :param int max_iter: iteration cap.
        :param float tol: convergence tolerance on the change of the mean NLL (default: the
            constructor's).
        :param bool progress: show a tqdm progress bar.
        :returns: the :class:`FitHistory` of this call (also appended to ``self.history``).
        """
        from tqdm.auto import tqdm

        max_iter = positive_integer("max_iter", max_iter)
        tol = self.tol if tol is None else positive_number("tol", tol)
        x, y = self._check_batch(x, y)
        history = FitHistory()
        self.converged, self.num_iterations = False, 0
        change = float("inf")
        start = time.perf_counter()
        with tqdm(range(max_iter), disable=not progress, desc=self.name) as bar:
            for _ in bar:
                loss = self.step(x, y)
                history.append(loss, self.samples_seen, time.perf_counter() - start)
                self.history.append(loss, self.samples_seen, history.wall_time[-1])
                self.num_iterations += 1
                bar.set_postfix(loss=f"{loss:.6f}", refresh=False)
                if len(history) > 1:
                    change = abs(history.loss[-2] - loss)
                    if change < tol:
                        self.converged = True
                        break
        if not self.converged:
            warnings.warn(
                f"EM did not converge in {max_iter} iterations: the last change of the mean "
                f"NLL was {change:.3g} >= tol = {tol:.3g}; raise max_iter or tol",
                UserWarning,
                stacklevel=2,
            )
        warn_if_classes_separated(self.model, x, y)
        return history


def batch_mm(model: MixtureOfExperts, **options) -> IncrementalMM:
    r"""Batch MM: the comparison point between EM and incremental MM.

    Returns an :class:`~pyro_mm.infer.IncrementalMM` with ``gamma_n = 1``
    (:class:`~pyro_mm.infer.ConstantStep` ``(1.0)``); fed the whole data set at every step, its
    statistics are ``s_{t+1} = S(theta_t)``, so each step minimises the MM surrogate at
    ``theta_t``: the experts get EM's exact M-step and the gate **one** step of the
    quadratic-bound (Böhning) majoriser instead of EM's Newton solve. It is monotone like EM, and
    slower per iteration in the gate::

        mm = batch_mm(model)
        for _ in range(num_iterations):
            loss = mm.step(x, y)

    :param MixtureOfExperts model: the model to fit.
    :param options: any other :class:`~pyro_mm.infer.IncrementalMM` option (not ``schedule``).
    """
    if "schedule" in options:
        raise TypeError("batch_mm fixes schedule=ConstantStep(1.0); do not pass a schedule")
    return IncrementalMM(model, schedule=ConstantStep(1.0), **options)
