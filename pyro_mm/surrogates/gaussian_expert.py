r"""The Gaussian-expert block of the MM surrogate (paper Appendix A.5.2).

Given responsibilities ``tau``, the expert part of the surrogate is the weighted Gaussian
negative log-likelihood ``sum_k tau_k [1/2 log(2 pi sigma_kq^2) + (y_q - Upsilon_kq r)^2 /
(2 sigma_kq^2)]`` summed over outputs, which depends on the data only through the averages
``avg tau_k``, ``avg tau_k r r^T`` (one Gram matrix per expert, shared by all outputs),
``avg tau_k y_q r`` and ``avg tau_k y_q^2``. Its argmin is weighted least squares.

A ridge ``lambda`` adds ``lambda ||Upsilon_kq||^2 / (2 sigma_kq^2)`` (a conjugate Gaussian prior
with variance ``sigma^2 / lambda``), which keeps the joint argmin closed form. It leaves the
intercept's coefficient alone (``unpenalised_column``, the regressors' column of ones): the
variance estimate includes ``lambda ||Upsilon_kq||^2 / avg tau_k``, and an intercept near ``y``'s
location ``m`` would add ``lambda m^2 / avg tau_k`` to it, making the fit depend on where ``y``
is centred (at ``m = 1e5`` and the default ``lambda = 1e-8`` that was a variance of about 100
instead of 0.25).

MAP inside MM (:mod:`~pyro_mm.surrogates.penalties`): a :class:`CoefficientPenalty` ``pen``
(lasso and ridge, a Laplace/Gaussian prior independent of the variance) is added to the average
negative log-likelihood as it is. The coefficients are updated at the previous variance with the
lasso majorised at the previous coefficients (one linear solve per expert and output), then the
variance exactly given them; the two block updates make a descent step of the penalised
surrogate. (A penalty scaled by ``1 / sigma^2``, as the conjugate ridge above, would keep the
joint argmin closed form but adds ``2 pen / avg tau`` to the variance estimate: on the sparse
benchmark it inflated the variances and the held-out NLL.) An :class:`InverseGammaPrior` on the
variances keeps their update closed form.
"""

import dataclasses
import functools
import math

import torch

from ..models.gaussian_moe import gaussian_expert_log_prob
from ..models.params import GaussianExpertParams
from .least_squares import least_squares
from .moments import weighted_gram, weighted_moments
from .penalties import CoefficientPenalty, InverseGammaPrior
from .report import SolveReport

__all__ = [
    "GaussianExpertStatistics",
    "GaussianExpertSurrogate",
    "gaussian_expert_statistics",
    "gaussian_expert_mean_statistics",
    "solve_gaussian_experts",
    "gaussian_expert_surrogate_value",
]


@dataclasses.dataclass
class GaussianExpertStatistics:
    """Averaged sufficient statistics of ``K`` Gaussian experts.

    :ivar torch.Tensor weight: ``(K,)`` ``avg tau_k``.
    :ivar torch.Tensor gram: ``(K, D, D)`` ``avg tau_k r r^T``.
    :ivar torch.Tensor cross: ``(K, Q, D)`` ``avg tau_k y_q r``.
    :ivar torch.Tensor square: ``(K, Q)`` ``avg tau_k y_q^2``.
    """

    weight: torch.Tensor
    gram: torch.Tensor
    cross: torch.Tensor
    square: torch.Tensor


def expert_moments(resp: torch.Tensor, expert_features: torch.Tensor, y: torch.Tensor):
    """The blocks of ``avg tau_k z z^T`` for ``z = (r(x), y)``: ``(avg tau_k, avg tau_k r r^T,
    avg tau_k y r^T, avg tau_k y y^T)``, of shapes ``(K,)``, ``(K, D, D)``, ``(K, Q, D)`` and
    ``(K, Q, Q)`` (one weighted product per chunk of rows for all experts and blocks, see
    :func:`~pyro_mm.surrogates.moments.weighted_moments`)."""
    num_features = expert_features.shape[1]
    design = torch.cat([expert_features, y], 1)  # row-major (N, D + Q), one copy
    moments = weighted_moments(resp.T.contiguous(), design.T) / resp.shape[0]
    return (
        resp.mean(0),
        moments[:, :num_features, :num_features],
        moments[:, num_features:, :num_features],
        moments[:, num_features:, num_features:],
    )


def gaussian_expert_statistics(
    resp: torch.Tensor, expert_features: torch.Tensor, y: torch.Tensor
) -> GaussianExpertStatistics:
    """Batch averages of the expert statistics: the blocks of :func:`expert_moments`, of
    ``avg tau_k y y^T`` its diagonal (batched products, no per-expert loop)."""
    weight, gram, cross, square = expert_moments(resp, expert_features, y)
    return GaussianExpertStatistics(
        weight=weight, gram=gram, cross=cross, square=square.diagonal(dim1=-2, dim2=-1)
    )


def gaussian_expert_mean_statistics(
    params: GaussianExpertParams, expert_features: torch.Tensor, weight: torch.Tensor
) -> GaussianExpertStatistics:
    r"""The expert statistics' expectations when each ``y`` is drawn from the experts themselves.

    With ``y | z = k ~ N(Upsilon_k r, diag sigma_k^2)`` and ``z`` weighted by ``weight`` (the
    gate probabilities, for the complete-data mean parameters ``grad A(theta)``):
    ``avg w_k``, ``G_k = avg w_k r r^T``, ``avg w_k E[y_q] r = G_k Upsilon_kq`` and
    ``avg w_k E[y_q^2] = Upsilon_kq^T G_k Upsilon_kq + sigma_kq^2 avg w_k``. Solving these
    statistics returns ``params`` again (up to the ridge).

    :param GaussianExpertParams params: the experts the expectations are taken under.
    :param torch.Tensor expert_features: ``(N, D)`` regressors ``r(x)``.
    :param torch.Tensor weight: ``(N, K)`` non-negative weights of the experts per row.
    """
    mass = weight.mean(0)
    gram = weighted_gram(weight, expert_features)
    cross = torch.einsum("kde,kqe->kqd", gram, params.weight)
    square = (params.weight * cross).sum(-1) + params.variance * mass[:, None]
    return GaussianExpertStatistics(weight=mass, gram=gram, cross=cross, square=square)


def ridge_diagonal(penalty: torch.Tensor, num_features: int, unpenalised_column=None):
    """``(K, D)``: the ridge ``lambda_k`` of each expert on each regressor's coefficient, zero
    in ``unpenalised_column`` (the intercept; ``None``: every coefficient is penalised)."""
    diagonal = penalty[:, None].expand(penalty.shape[0], num_features)
    if unpenalised_column is None:
        return diagonal
    # One fill through a cached mask: the clone-and-assign it replaces cost a fifth of the
    # streaming step's expert solve (24 of 115 us, profiled at K = 2, P = 10, batch 4096).
    return diagonal.masked_fill(_column_mask(num_features, unpenalised_column, penalty.device), 0.0)


@functools.lru_cache(maxsize=64)
def _column_mask(num_features: int, column: int, device) -> torch.Tensor:
    """``True`` at ``column`` of ``num_features`` (read-only: shared by every call). A normal
    tensor even when first asked for inside ``torch.inference_mode``, so that autograd may
    save it (the surrogate's value is differentiated in the tests)."""
    with torch.inference_mode(False):
        mask = torch.zeros(num_features, dtype=torch.bool, device=device)
        mask[column] = True
    return mask


def _penalised_residual(weight, stats: GaussianExpertStatistics, ridge) -> torch.Tensor:
    """``avg tau_k (y_q - Upsilon_kq r)^2 + sum_d ridge_kd Upsilon_kqd^2`` for every ``(k, q)``
    (``ridge``: ``(K, D)``, see :func:`ridge_diagonal`)."""
    gram_weight = weight @ stats.gram.mT
    quadratic = (weight * gram_weight).sum(-1) + (ridge[:, None, :] * weight.square()).sum(-1)
    return stats.square - 2 * (weight * stats.cross).sum(-1) + quadratic


def _solve_definite(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``system^{-1} rhs`` for batched symmetric positive (semi-)definite systems."""
    factor, info = torch.linalg.cholesky_ex(system)
    if info.any():
        # Round-off made a nearly singular Gram matrix indefinite: fall back to a least-squares
        # solve, which is slower but never fails (NaN for overflowed statistics).
        return least_squares(system, rhs)
    return torch.cholesky_solve(rhs, factor)


def solve_gaussian_experts(
    stats: GaussianExpertStatistics,
    previous: GaussianExpertParams,
    ridge: float = 1e-8,
    variance_floor: float = 1e-6,
    min_weight: float = 1e-8,
    coefficient_penalty: CoefficientPenalty = None,
    variance_prior: InverseGammaPrior = None,
    unpenalised_column: int = None,
):
    r"""Closed-form argmin of the Gaussian-expert surrogate.

    ``Upsilon_kq = (avg tau_k r r^T + lambda I)^{-1} avg tau_k y_q r`` (Cholesky, batched over
    experts) and ``sigma^2_kq = [avg tau_k y_q^2 - 2 Upsilon_kq . avg tau_k y_q r +
    Upsilon_kq^T (avg tau_k r r^T + lambda I) Upsilon_kq] / avg tau_k``.

    With a ``coefficient_penalty`` ``pen``, ``Upsilon_kq`` minimises the surrogate plus ``pen``
    majorised at ``previous``, at the previous variance ``s^2``: the majoriser's diagonal
    ``D_kq`` joins the system, ``(avg tau_k r r^T + lambda I + s^2 D_kq) Upsilon_kq =
    avg tau_k y_q r`` (one solve per expert and output); the variance is then the exact
    minimiser given ``Upsilon_kq`` (``pen`` does not depend on it). With a ``variance_prior``,
    ``sigma^2 = (R + 2 b / N) / (avg tau_k + 2 (a + 1) / N)``. Both keep the update a descent
    step of the penalised surrogate.

    :param GaussianExpertStatistics stats: averaged statistics.
    :param GaussianExpertParams previous: parameters kept for experts with no data, and the
        expansion point of the lasso's majoriser.
    :param float ridge: ``lambda``, relative to the expert's mass ``avg tau_k``.
    :param float variance_floor: smallest variance returned (a collapsing variance is floored).
    :param float min_weight: experts with ``avg tau_k`` below this keep ``previous``.
    :param CoefficientPenalty coefficient_penalty: lasso/ridge on the coefficients (``None``:
        none).
    :param InverseGammaPrior variance_prior: prior on the variances (``None``: none).
    :param int unpenalised_column: the regressors' column of ones, whose coefficient the ridge
        leaves alone (``None``: the ridge penalises every coefficient).
    :returns: ``(GaussianExpertParams, SolveReport)``.
    """
    empty = stats.weight < min_weight
    mass = stats.weight.clamp_min(min_weight)
    penalty = ridge_diagonal(ridge * mass, stats.gram.shape[-1], unpenalised_column)
    system = stats.gram.clone()
    system.diagonal(dim1=-2, dim2=-1).add_(penalty)
    if coefficient_penalty is not None and coefficient_penalty.active:
        scaled = previous.variance.unsqueeze(-1) * coefficient_penalty.curvature(previous.weight)
        system = system.unsqueeze(1) + torch.diag_embed(scaled)
        weight = _solve_definite(system, stats.cross.unsqueeze(-1)).squeeze(-1)
        residual = _penalised_residual(weight, stats, penalty)
    else:
        weight = _solve_definite(system, stats.cross.transpose(1, 2)).transpose(1, 2)
        # At the solution of (G + lambda I) w = c, w^T (G + lambda I) w = w . c.
        residual = stats.square - (weight * stats.cross).sum(-1)
    denominator = mass[:, None]
    if variance_prior is not None:
        residual = residual + variance_prior.residual_shift
        denominator = denominator + variance_prior.mass_shift
    variance = residual / denominator
    floored = variance < variance_floor
    variance = variance.clamp_min(variance_floor)
    if empty.any():
        weight = torch.where(empty[:, None, None], previous.weight, weight)
        variance = torch.where(empty[:, None], previous.variance, variance)
        floored = floored & ~empty[:, None]
    report = SolveReport(empty_experts=empty, floored_variances=int(floored.sum()))
    return GaussianExpertParams(weight=weight, variance=variance), report


def gaussian_expert_surrogate_value(
    params: GaussianExpertParams,
    stats: GaussianExpertStatistics,
    ridge: float = 0.0,
    unpenalised_column: int = None,
) -> torch.Tensor:
    """The expert surrogate (weighted NLL plus ridge) from statistics, summed over ``k, q``.

    Its minimiser over ``params`` is :func:`solve_gaussian_experts` with the same ``ridge``
    and ``unpenalised_column`` (ridge here is absolute: pass ``ridge * avg tau_k`` to match the
    solve's scaling).
    """
    penalty = torch.as_tensor(ridge, dtype=stats.weight.dtype).expand(stats.weight.shape)
    ridge = ridge_diagonal(penalty, stats.gram.shape[-1], unpenalised_column)
    residual = _penalised_residual(params.weight, stats, ridge)
    log_term = stats.weight[:, None] * (math.log(2 * math.pi) + params.variance.log())
    return 0.5 * (log_term + residual / params.variance).sum()


class GaussianExpertSurrogate:
    """The Gaussian-expert block as the inference classes use it.

    :param float ridge: ridge on the coefficients, relative to each expert's mass.
    :param float variance_floor: smallest variance a solve returns.
    :param float min_weight: responsibility mass below which an expert counts as empty.
    :param CoefficientPenalty penalty: lasso/ridge on the coefficients, in units of each
        added to the average negative log-likelihood (MAP inside MM; see the module docstring).
    :param InverseGammaPrior variance_prior: conjugate prior on the variances.
    :param int unpenalised_column: the regressors' column of ones, whose coefficient the ridge
        leaves alone (:func:`~pyro_mm.surrogates.registry.expert_surrogate_for` passes the
        model's); ``None``: the ridge penalises every coefficient.
    """

    def __init__(
        self,
        ridge: float = 1e-8,
        variance_floor: float = 1e-6,
        min_weight: float = 1e-8,
        penalty: CoefficientPenalty = None,
        variance_prior: InverseGammaPrior = None,
        unpenalised_column: int = None,
    ):
        if penalty is not None and not isinstance(penalty, CoefficientPenalty):
            raise TypeError(f"penalty must be a CoefficientPenalty or None, got {penalty!r}")
        if variance_prior is not None and not isinstance(variance_prior, InverseGammaPrior):
            raise TypeError(
                f"variance_prior must be an InverseGammaPrior or None, got {variance_prior!r}"
            )
        self.ridge = ridge
        self.variance_floor = variance_floor
        self.min_weight = min_weight
        self.penalty = penalty
        self.variance_prior = variance_prior
        self.unpenalised_column = unpenalised_column

    def penalises_column(self, column: int) -> bool:
        """Whether the ridge or the penalty acts on the coefficients of regressor ``column``."""
        by_ridge = self.ridge > 0 and self.unpenalised_column != column
        penalty = self.penalty
        return by_ridge or (
            penalty is not None and penalty.active and penalty.intercept_column != column
        )

    log_prob = staticmethod(gaussian_expert_log_prob)

    def statistics(self, expert_params, expert_features, y, resp) -> GaussianExpertStatistics:
        return gaussian_expert_statistics(resp, expert_features, y)

    def solve(self, stats: GaussianExpertStatistics, previous: GaussianExpertParams):
        return solve_gaussian_experts(
            stats,
            previous,
            self.ridge,
            self.variance_floor,
            self.min_weight,
            self.penalty,
            self.variance_prior,
            self.unpenalised_column,
        )

    def mean_statistics(self, expert_params, expert_features, weight) -> GaussianExpertStatistics:
        """The statistics expected under the experts themselves (the mean parameters used by
        :class:`~pyro_mm.infer.MirrorDescentEM`); see :func:`gaussian_expert_mean_statistics`."""
        return gaussian_expert_mean_statistics(expert_params, expert_features, weight)

    def exact_m_step(self, previous: GaussianExpertParams, expert_features, y, resp):
        """The exact EM M-step of the experts on a whole data set (closed form here)."""
        return self.solve(self.statistics(previous, expert_features, y, resp), previous)

    def value(self, params: GaussianExpertParams, stats: GaussianExpertStatistics) -> torch.Tensor:
        """The surrogate at ``params`` (with the penalty and prior, not their majorisers)."""
        mass = stats.weight.clamp_min(self.min_weight)
        value = gaussian_expert_surrogate_value(
            params, stats, self.ridge * mass, self.unpenalised_column
        )
        if self.penalty is not None:
            value = value + self.penalty.value(params.weight).sum()
        if self.variance_prior is not None:
            value = value + self.variance_prior.value(params.variance).sum()
        return value
