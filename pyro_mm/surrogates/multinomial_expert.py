r"""The multinomial-logistic expert block of the MM surrogate (paper Section 4.2.2, Appendix A.7).

Given responsibilities ``tau``, the expert part of the negative log-likelihood is
``sum_k tau_k [lse(V_k r) - t^T V_k r]`` with ``t`` the one-hot label of the ``M - 1`` free
classes and ``lse(eta) = log(1 + sum_{m<M} exp(eta_m))``. Each expert's log-partition is
majorised at the current ``V_k^n`` by the same quadratic bound as the gate
(:mod:`~pyro_mm.surrogates.softmax_bound`), with curvature ``tau_k C (x) r r^T``. Up to a
constant the surrogate of expert ``k`` is

.. math:: \tfrac12 \mathrm{vec}(V_k)^\top (C \otimes G_k + \lambda I)\,\mathrm{vec}(V_k)
          - \langle L_k, V_k \rangle,
          \qquad G_k = \overline{\tau_k r r^\top},
          \quad L_k = C V_k^n G_k + \overline{\tau_k (t - p_k) r^\top},

(bars are batch averages, ``p_k`` the expert's class probabilities at ``V_k^n``), so the
statistics are ``avg tau_k`` ``(K,)``, the Gram matrices ``G_k`` ``(K, D, D)`` and the linear
terms ``L_k`` ``(K, M-1, D)``: the paper's ``s_3, s_4`` without the ``(M-1) D``-square blocks.
The argmin is one Kronecker-structured solve per expert, batched.

A ridge ``lambda`` adds ``lambda/2 sum_k ||V_k||^2`` to the mean negative log-likelihood (a
Gaussian prior; a linearly separable expert has no finite maximum-likelihood estimate). Unlike
the Gaussian experts' ridge it is absolute, not relative to each expert's mass, so that MM and the
exact EM M-step both decrease one fixed penalised objective and share its stationary points.

With ``bound="jebara-choromanska"`` the constant ``C`` is replaced by a per-sample curvature
``Sigma_k(x)`` evaluated at the expert's current logits
(:class:`~pyro_mm.surrogates.softmax_bound.JebaraChoromanskaBound`; Jaakkola-Jordan for two
classes). It is far smaller than ``C`` where the expert is confident, so each MM step moves the
experts further. The surrogate keeps its form with ``C (x) G_k`` replaced by the full
``(M-1) D``-square matrix ``G_k = avg tau_k Sigma_k (x) r r^T`` and
``L_k = avg tau_k (Sigma_k V_k^n r + t - p_k) r^T``; the argmin is one dense Cholesky solve per
expert (``(M-1) D`` unknowns).
"""

import dataclasses

import torch

from ..models.multinomial_moe import multinomial_expert_log_prob, multinomial_expert_logits
from ..models.params import MultinomialExpertParams
from .moments import weighted_gram, weighted_outer_products
from .report import SolveReport
from .softmax_bound import (
    SOFTMAX_BOUNDS,
    JebaraChoromanskaBound,
    kronecker_quadratic_value,
    softmax_curvature,
    solve_kronecker,
)
from .softmax_regression import fit_softmax_regression

__all__ = [
    "EXPERT_BOUNDS",
    "MultinomialExpertStatistics",
    "MultinomialExpertSurrogate",
    "multinomial_expert_statistics",
    "multinomial_expert_mean_statistics",
    "solve_multinomial_experts",
    "multinomial_expert_surrogate_value",
]

#: Curvature bounds of the experts' softmax: the constant ones (Böhning's is the default) and
#: the per-sample Jebara-Choromanska bound.
EXPERT_BOUNDS = SOFTMAX_BOUNDS + ("jebara-choromanska",)


@dataclasses.dataclass
class MultinomialExpertStatistics:
    """Averaged sufficient statistics of ``K`` multinomial-logistic experts.

    :ivar torch.Tensor weight: ``(K,)`` ``avg tau_k``.
    :ivar torch.Tensor gram: ``(K, D, D)`` ``avg tau_k r r^T`` for a constant bound ``C``; for
        the per-sample bound the whole curvature ``avg tau_k Sigma_k (x) r r^T``, shape
        ``(K, (M - 1) D, (M - 1) D)`` (row-major ``vec`` of the ``(M - 1, D)`` weights).
    :ivar torch.Tensor linear: ``(K, M - 1, D)`` ``avg [tau_k C V_k^n r r^T + tau_k (t - p_k) r^T]``
        (``Sigma_k V_k^n r`` in place of ``C V_k^n r`` for the per-sample bound).
    """

    weight: torch.Tensor
    gram: torch.Tensor
    linear: torch.Tensor


def _bound_statistics(weight, expert_features, mass, residual, curvature):
    """Statistics from per-row expert weights ``mass`` ``(N, K)`` and residuals ``(N, K, M-1)``."""
    num_rows = expert_features.shape[0]
    if isinstance(curvature, JebaraChoromanskaBound):
        return _sample_bound_statistics(weight, expert_features, mass, residual, curvature)
    gram = weighted_gram(mass, expert_features)
    linear = torch.einsum("nkm,nd->kmd", residual, expert_features) / num_rows
    return MultinomialExpertStatistics(
        weight=mass.mean(0), gram=gram, linear=linear + curvature @ weight @ gram
    )


def _sample_bound_statistics(weight, expert_features, mass, residual, bound):
    """:func:`_bound_statistics` for a per-sample curvature ``Sigma_k(x)`` (dense blocks)."""
    num_rows, num_features = expert_features.shape
    num_experts, num_free = weight.shape[:2]
    logits = multinomial_expert_logits(weight, expert_features)[..., :-1]
    weighted = mass[..., None, None] * bound.sample_curvature(logits)
    gram = weighted_outer_products(weighted.reshape(num_rows, -1), expert_features) / num_rows
    gram = gram.reshape(num_experts, num_free, num_free, num_features, num_features)
    size = num_free * num_features
    gram = gram.permute(0, 1, 3, 2, 4).reshape(num_experts, size, size)
    pull = (weighted @ logits.unsqueeze(-1)).squeeze(-1) + residual
    linear = torch.einsum("nkm,nd->kmd", pull, expert_features) / num_rows
    return MultinomialExpertStatistics(weight=mass.mean(0), gram=gram, linear=linear)


def _solve_dense(gram, ridge, linear):
    """``vec(V_k) = (G_k + lambda I)^{-1} vec(L_k)`` per expert, by Cholesky."""
    system = gram + ridge * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    rhs = linear.reshape(linear.shape[0], -1, 1)
    factor, info = torch.linalg.cholesky_ex(system)
    if bool(info.any()):
        return torch.linalg.solve(system, rhs).reshape(linear.shape)
    return torch.cholesky_solve(rhs, factor).reshape(linear.shape)


def multinomial_expert_statistics(
    expert_params: MultinomialExpertParams,
    expert_features: torch.Tensor,
    y: torch.Tensor,
    resp: torch.Tensor,
    curvature: torch.Tensor,
) -> MultinomialExpertStatistics:
    """Batch averages of the expert statistics at the expansion point ``expert_params``
    (einsums batched over experts, no per-expert loop).

    :param MultinomialExpertParams expert_params: current experts ``V^n``.
    :param torch.Tensor expert_features: ``(N, D)`` regressors ``r(x)``.
    :param torch.Tensor y: ``(N,)`` integer labels.
    :param torch.Tensor resp: ``(N, K)`` responsibilities ``tau`` at ``theta_n``.
    :param curvature: ``(M - 1, M - 1)`` softmax curvature bound ``C``, or a
        :class:`~pyro_mm.surrogates.softmax_bound.JebaraChoromanskaBound`.
    """
    weight = expert_params.weight
    probs = torch.softmax(multinomial_expert_logits(weight, expert_features), -1)[..., :-1]
    targets = torch.nn.functional.one_hot(y, weight.shape[1] + 1)[:, :-1].to(probs.dtype)
    residual = resp.unsqueeze(-1) * (targets.unsqueeze(-2) - probs)
    return _bound_statistics(weight, expert_features, resp, residual, curvature)


def multinomial_expert_mean_statistics(
    expert_params: MultinomialExpertParams,
    expert_features: torch.Tensor,
    mass: torch.Tensor,
    curvature: torch.Tensor,
) -> MultinomialExpertStatistics:
    """The statistics expected under the experts themselves: labels drawn from ``e_k(. | x)``
    and responsibilities replaced by ``mass`` (the gate probabilities). The expected residual
    ``t - p_k`` is zero, so ``linear = C V_k^n G_k``.

    Mixed with :func:`multinomial_expert_statistics` as ``(1 - eta) mean + eta observed`` (what
    :class:`~pyro_mm.infer.MirrorDescentEM` does), they are the quadratic bound, at ``V^n``, of
    the mirror-descent expert objective ``eta Q + (1 - eta) KL`` (a weighted soft-label softmax
    regression), so their solve is one MM step on it (monotone, not its exact minimiser).

    :param torch.Tensor mass: ``(N, K)`` non-negative row weights of the experts.
    """
    residual = expert_features.new_zeros(mass.shape + (expert_params.weight.shape[1],))
    return _bound_statistics(expert_params.weight, expert_features, mass, residual, curvature)


def solve_multinomial_experts(
    stats: MultinomialExpertStatistics,
    previous: MultinomialExpertParams,
    curvature: torch.Tensor,
    ridge: float = 1e-8,
    min_weight: float = 1e-8,
):
    r"""Closed-form argmin ``vec(V_k) = (C (x) G_k + lambda I)^{-1} vec(L_k)``, batched.

    :param MultinomialExpertStatistics stats: averaged statistics.
    :param MultinomialExpertParams previous: parameters kept for experts with no data.
    :param curvature: ``(M - 1, M - 1)`` softmax curvature bound ``C`` (Kronecker solve), or a
        :class:`~pyro_mm.surrogates.softmax_bound.JebaraChoromanskaBound` (dense solve of the
        curvature held in ``stats.gram``).
    :param float ridge: ``lambda > 0``, the penalty ``lambda/2 ||V_k||^2`` per expert.
    :param float min_weight: experts with ``avg tau_k`` below this keep ``previous``.
    :returns: ``(MultinomialExpertParams, SolveReport)``.
    """
    empty = stats.weight < min_weight
    if isinstance(curvature, JebaraChoromanskaBound):
        weight = _solve_dense(stats.gram, ridge, stats.linear)
    else:
        weight = solve_kronecker(curvature, stats.gram, ridge, stats.linear)
    weight = torch.where(empty[:, None, None], previous.weight, weight)
    return MultinomialExpertParams(weight=weight), SolveReport(empty_experts=empty)


def multinomial_expert_surrogate_value(
    params: MultinomialExpertParams,
    stats: MultinomialExpertStatistics,
    curvature: torch.Tensor,
    ridge: float = 0.0,
) -> torch.Tensor:
    """The expert surrogate (up to a constant) from statistics, summed over experts, including
    the ridge penalty; its minimiser over ``params`` is :func:`solve_multinomial_experts`."""
    if isinstance(curvature, JebaraChoromanskaBound):
        flat = params.weight.reshape(params.weight.shape[0], -1, 1)
        quadratic = (flat.transpose(-1, -2) @ stats.gram @ flat).sum() + ridge * flat.square().sum()
        return 0.5 * quadratic - (stats.linear * params.weight).sum()
    return kronecker_quadratic_value(curvature, stats.gram, ridge, stats.linear, params.weight)


class MultinomialExpertSurrogate:
    """The multinomial-logistic expert block as the inference classes use it.

    :param float ridge: the penalty ``ridge/2 sum_k ||V_k||^2`` added to the mean negative
        log-likelihood; must be positive (a linearly separable expert has no finite
        maximum-likelihood estimate).
    :param float variance_floor: accepted for a uniform construction by the inference classes
        and ignored (these experts have no variance).
    :param float min_weight: responsibility mass below which an expert counts as empty.
    :param str bound: curvature bound of the experts' softmax: a constant bound, ``"bohning"``
        (the default) or ``"paper"`` (one Kronecker-structured solve per expert, ``O(M^3 +
        D^3)``), or the per-sample ``"jebara-choromanska"`` (tight where an expert is confident,
        so MM steps are longer, but one dense solve of ``(M - 1) D`` unknowns per expert: on
        ``digits``, M = 10 and D = 65, a fit took 120-150 s instead of 5 s). Which one fits
        better per sample seen depends on the data (``benchmarks/classification.py`` chooses
        it on a validation split).
    :param penalty: not supported (``None``): a lasso's diagonal curvature would break the
        Kronecker structure of the solve; use ``ridge``.
    :param variance_prior: not supported (``None``): these experts have no variance.
    """

    def __init__(
        self,
        ridge: float = 1e-8,
        variance_floor: float = None,
        min_weight: float = 1e-8,
        bound: str = "bohning",
        penalty=None,
        variance_prior=None,
    ):
        if penalty is not None or variance_prior is not None:
            raise ValueError(
                "multinomial experts take no coefficient penalty or variance prior (they have no "
                "variances, and a lasso would break the Kronecker-structured solve); regularise "
                "them with ridge="
            )
        if not ridge > 0:
            raise ValueError(
                f"multinomial experts need ridge > 0 (a linearly separable expert has no finite "
                f"maximum-likelihood estimate), got ridge={ridge!r}"
            )
        if bound not in EXPERT_BOUNDS:
            raise ValueError(f"unknown softmax bound {bound!r}; choose one of {EXPERT_BOUNDS}")
        self.ridge = float(ridge)
        self.min_weight = min_weight
        self.bound = bound

    def penalises_column(self, column: int) -> bool:
        """Whether the ridge acts on the coefficients of regressor ``column``: always (it is
        positive, and covers every coefficient)."""
        return True

    log_prob = staticmethod(multinomial_expert_log_prob)

    def curvature(self, num_classes: int, dtype: torch.dtype):
        """The ``(M - 1, M - 1)`` curvature bound ``C`` for ``num_classes = M``, or the
        :class:`~pyro_mm.surrogates.softmax_bound.JebaraChoromanskaBound`."""
        if self.bound == "jebara-choromanska":
            return JebaraChoromanskaBound(dtype)
        return softmax_curvature(num_classes - 1, self.bound, dtype)

    def statistics(self, expert_params, expert_features, y, resp) -> MultinomialExpertStatistics:
        weight = expert_params.weight
        curvature = self.curvature(weight.shape[1] + 1, weight.dtype)
        return multinomial_expert_statistics(expert_params, expert_features, y, resp, curvature)

    def mean_statistics(
        self, expert_params, expert_features, weight
    ) -> MultinomialExpertStatistics:
        """Statistics expected under the experts with row weights ``weight`` (used by
        :class:`~pyro_mm.infer.MirrorDescentEM`); see :func:`multinomial_expert_mean_statistics`."""
        curvature = self.curvature(expert_params.weight.shape[1] + 1, expert_params.weight.dtype)
        return multinomial_expert_mean_statistics(expert_params, expert_features, weight, curvature)

    def solve(self, stats: MultinomialExpertStatistics, previous: MultinomialExpertParams):
        curvature = self.curvature(stats.linear.shape[1] + 1, stats.linear.dtype)
        return solve_multinomial_experts(stats, previous, curvature, self.ridge, self.min_weight)

    def exact_m_step(self, previous: MultinomialExpertParams, expert_features, y, resp):
        """The exact EM M-step: per expert, a weighted softmax regression (Newton) with weights
        ``tau_k`` and the same ridge as :meth:`solve`; empty experts keep ``previous``.

        :returns: ``(MultinomialExpertParams, SolveReport)``.
        """
        num_classes = previous.weight.shape[1] + 1
        targets = torch.nn.functional.one_hot(y, num_classes).to(expert_features.dtype)
        mass = resp.mean(0)
        empty = mass < self.min_weight
        weight = previous.weight.clone()
        for k in torch.nonzero(~empty).flatten().tolist():
            fit = fit_softmax_regression(
                expert_features,
                targets,
                sample_weight=resp[:, k],
                init=previous.weight[k],
                ridge=self.ridge,
            )
            weight[k] = fit.weight
        return MultinomialExpertParams(weight=weight), SolveReport(empty_experts=empty)

    def value(
        self, params: MultinomialExpertParams, stats: MultinomialExpertStatistics
    ) -> torch.Tensor:
        curvature = self.curvature(stats.linear.shape[1] + 1, stats.linear.dtype)
        return multinomial_expert_surrogate_value(params, stats, curvature, self.ridge)
