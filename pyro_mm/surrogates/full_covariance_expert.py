r"""The full-covariance Gaussian-expert block of the MM/EM surrogate.

Given responsibilities ``tau``, the expert part of the surrogate is

.. math:: \sum_k \operatorname{avg}\,\tau_k \Big[\tfrac12 \log|2\pi\Sigma_k|
    + \tfrac12 (y - \Upsilon_k r)^\top \Sigma_k^{-1} (y - \Upsilon_k r)\Big],

which depends on the data through ``avg tau_k``, ``avg tau_k r r^T``, ``avg tau_k y r^T`` (the
statistics of the diagonal block) and the full second moment ``avg tau_k y y^T``. Its argmin is
closed form: with common regressors for all outputs, generalised least squares reduces to
ordinary weighted least squares, so ``Upsilon_k`` is the diagonal block's solution whatever
``Sigma_k``, and ``Sigma_k`` is the weighted residual covariance.

The covariance estimate is regularised: the ridge ``lambda tr(Upsilon^T Sigma^{-1} Upsilon)/2``
(the conjugate matrix-normal prior, as in the diagonal block, which leaves the intercept's
coefficient alone), an optional
:class:`InverseWishartPrior` (MAP: ``Sigma = (R + Psi / N) / (avg tau + (nu + Q + 1) / N)``,
a shrinkage towards ``Psi``), and an eigenvalue floor (a collapsing direction is raised to the
floor and counted).
"""

import dataclasses
import math

import torch

from ..models.full_covariance_gaussian_moe import (
    FullCovarianceExpertParams,
    full_covariance_expert_log_prob,
)
from ..models.params import GaussianExpertParams
from .gaussian_expert import (
    GaussianExpertStatistics,
    expert_moments,
    ridge_diagonal,
    solve_gaussian_experts,
)
from .moments import weighted_gram
from .report import SolveReport

__all__ = [
    "FullCovarianceExpertStatistics",
    "FullCovarianceExpertSurrogate",
    "InverseWishartPrior",
    "full_covariance_expert_statistics",
    "solve_full_covariance_experts",
    "full_covariance_expert_surrogate_value",
]


@dataclasses.dataclass
class FullCovarianceExpertStatistics:
    """Averaged sufficient statistics of ``K`` full-covariance Gaussian experts.

    :ivar torch.Tensor weight: ``(K,)`` ``avg tau_k``.
    :ivar torch.Tensor gram: ``(K, D, D)`` ``avg tau_k r r^T``.
    :ivar torch.Tensor cross: ``(K, Q, D)`` ``avg tau_k y r^T``.
    :ivar torch.Tensor square: ``(K, Q, Q)`` ``avg tau_k y y^T``.
    """

    weight: torch.Tensor
    gram: torch.Tensor
    cross: torch.Tensor
    square: torch.Tensor


@dataclasses.dataclass(frozen=True)
class InverseWishartPrior:
    r"""Inverse-Wishart prior ``IW(Psi, nu)`` on each expert covariance, for a model fitted to
    ``num_data`` samples (the objective is the *average* negative log-likelihood, so the prior's
    negative log-density is divided by ``N``).

    :ivar torch.Tensor scale: ``(Q, Q)`` positive definite scale matrix ``Psi``.
    :ivar float df: degrees of freedom ``nu > Q - 1``.
    :ivar float num_data: ``N > 0``.
    """

    scale: torch.Tensor
    df: float
    num_data: float

    def __post_init__(self):
        scale = torch.as_tensor(self.scale)
        if scale.dim() != 2 or scale.shape[0] != scale.shape[1]:
            raise ValueError(
                f"InverseWishartPrior.scale must be a square matrix, got {scale.shape}"
            )
        if not bool((torch.linalg.eigvalsh(scale.double()) > 0).all()):
            raise ValueError("InverseWishartPrior.scale must be positive definite")
        if not self.df > scale.shape[0] - 1:
            raise ValueError(
                f"InverseWishartPrior.df must exceed Q - 1 = {scale.shape[0] - 1}, got {self.df!r}"
            )
        if not self.num_data > 0:
            raise ValueError(f"InverseWishartPrior.num_data must be > 0, got {self.num_data!r}")

    def value(self, covariance: torch.Tensor) -> torch.Tensor:
        """``((nu + Q + 1) log|Sigma| + tr(Psi Sigma^{-1})) / (2 N)`` per expert (the negative
        log-density up to a constant, per sample)."""
        out_features = covariance.shape[-1]
        scale = self.scale.to(covariance)
        log_det = torch.linalg.slogdet(covariance)[1]
        trace = torch.linalg.solve(covariance, scale.expand_as(covariance)).diagonal(0, -2, -1)
        return ((self.df + out_features + 1) * log_det + trace.sum(-1)) / (2 * self.num_data)


def full_covariance_expert_statistics(
    resp: torch.Tensor, expert_features: torch.Tensor, y: torch.Tensor
) -> FullCovarianceExpertStatistics:
    """Batch averages: those of the diagonal block with the full ``avg tau_k y y^T``, all blocks
    of one :func:`~pyro_mm.surrogates.gaussian_expert.expert_moments`."""
    return FullCovarianceExpertStatistics(*expert_moments(resp, expert_features, y))


def _residual_covariance(weight, stats, ridge) -> torch.Tensor:
    """``avg tau_k (y - Upsilon r)(y - Upsilon r)^T + Upsilon diag(ridge_k) Upsilon^T`` per
    expert (``ridge``: ``(K, D)``, see
    :func:`~pyro_mm.surrogates.gaussian_expert.ridge_diagonal`)."""
    cross_weight = stats.cross @ weight.mT  # (K, Q, Q)
    quadratic = weight @ stats.gram @ weight.mT + (weight * ridge[:, None, :]) @ weight.mT
    residual = stats.square - cross_weight - cross_weight.mT + quadratic
    return 0.5 * (residual + residual.mT)


def solve_full_covariance_experts(
    stats: FullCovarianceExpertStatistics,
    previous: FullCovarianceExpertParams,
    ridge: float = 1e-8,
    variance_floor: float = 1e-6,
    min_weight: float = 1e-8,
    covariance_prior: InverseWishartPrior = None,
    unpenalised_column: int = None,
):
    r"""Closed-form argmin of the full-covariance expert surrogate.

    ``Upsilon_k`` is the diagonal block's weighted least squares (with the same ridge);
    ``Sigma_k = [avg tau_k y y^T - C Upsilon^T - Upsilon C^T + Upsilon (G + lambda I)
    Upsilon^T] / avg tau_k`` (``C = avg tau_k y r^T``, ``G = avg tau_k r r^T``), or with an
    inverse-Wishart prior ``(that + Psi / N) / (avg tau_k + (nu + Q + 1) / N)``; eigenvalues
    below ``variance_floor`` are raised to it.

    :param int unpenalised_column: the regressors' column of ones, whose coefficient the ridge
        leaves alone (``None``: every coefficient is penalised).
    :returns: ``(FullCovarianceExpertParams, SolveReport)``; ``floored_variances`` counts the
        eigenvalues raised to the floor.
    """
    diagonal_stats = GaussianExpertStatistics(
        weight=stats.weight,
        gram=stats.gram,
        cross=stats.cross,
        square=stats.square.diagonal(0, -2, -1),
    )
    diagonal_previous = GaussianExpertParams(
        weight=previous.weight, variance=previous.covariance.diagonal(0, -2, -1)
    )
    diagonal, report = solve_gaussian_experts(
        diagonal_stats,
        diagonal_previous,
        ridge,
        variance_floor,
        min_weight,
        unpenalised_column=unpenalised_column,
    )
    empty = report.empty_experts
    mass = stats.weight.clamp_min(min_weight)
    penalty = ridge_diagonal(ridge * mass, stats.gram.shape[-1], unpenalised_column)
    residual = _residual_covariance(diagonal.weight, stats, penalty)
    denominator = mass
    if covariance_prior is not None:
        residual = residual + covariance_prior.scale.to(residual) / covariance_prior.num_data
        out_features = residual.shape[-1]
        denominator = denominator + (covariance_prior.df + out_features + 1) / (
            covariance_prior.num_data
        )
    covariance = residual / denominator[:, None, None]
    values, vectors = torch.linalg.eigh(covariance)
    floored = values < variance_floor
    values = values.clamp_min(variance_floor)
    covariance = vectors @ torch.diag_embed(values) @ vectors.mT
    covariance = 0.5 * (covariance + covariance.mT)
    covariance = torch.where(empty[:, None, None], previous.covariance, covariance)
    report = SolveReport(
        empty_experts=empty, floored_variances=int((floored & ~empty[:, None]).sum())
    )
    return FullCovarianceExpertParams(weight=diagonal.weight, covariance=covariance), report


def full_covariance_expert_surrogate_value(
    params: FullCovarianceExpertParams,
    stats: FullCovarianceExpertStatistics,
    ridge=0.0,
    unpenalised_column: int = None,
) -> torch.Tensor:
    """The expert surrogate (weighted NLL plus ridge) from statistics, summed over experts.

    ``ridge`` is absolute here (pass ``ridge * avg tau_k`` to match the solve's scaling).
    """
    penalty = torch.as_tensor(ridge, dtype=stats.weight.dtype).expand(stats.weight.shape)
    penalty = ridge_diagonal(penalty, stats.gram.shape[-1], unpenalised_column)
    residual = _residual_covariance(params.weight, stats, penalty)
    out_features = params.covariance.shape[-1]
    log_det = torch.linalg.slogdet(params.covariance)[1]
    trace = torch.linalg.solve(params.covariance, residual).diagonal(0, -2, -1).sum(-1)
    return 0.5 * (stats.weight * (out_features * math.log(2 * math.pi) + log_det) + trace).sum()


class FullCovarianceExpertSurrogate:
    """The full-covariance Gaussian-expert block as the inference classes use it.

    :param float ridge: ridge on the coefficients, relative to each expert's mass.
    :param float variance_floor: smallest eigenvalue of a covariance a solve returns.
    :param float min_weight: responsibility mass below which an expert counts as empty.
    :param InverseWishartPrior covariance_prior: conjugate prior on the covariances (MAP).
    :param int unpenalised_column: the regressors' column of ones, whose coefficient the ridge
        leaves alone (``None``: every coefficient is penalised).
    """

    def __init__(
        self,
        ridge: float = 1e-8,
        variance_floor: float = 1e-6,
        min_weight: float = 1e-8,
        covariance_prior: InverseWishartPrior = None,
        unpenalised_column: int = None,
    ):
        if covariance_prior is not None and not isinstance(covariance_prior, InverseWishartPrior):
            raise TypeError(
                f"covariance_prior must be an InverseWishartPrior or None, got {covariance_prior!r}"
            )
        self.ridge = ridge
        self.variance_floor = variance_floor
        self.min_weight = min_weight
        self.covariance_prior = covariance_prior
        self.unpenalised_column = unpenalised_column

    def penalises_column(self, column: int) -> bool:
        """Whether the ridge acts on the coefficients of regressor ``column``."""
        return self.ridge > 0 and self.unpenalised_column != column

    log_prob = staticmethod(full_covariance_expert_log_prob)

    def statistics(self, expert_params, expert_features, y, resp) -> FullCovarianceExpertStatistics:
        return full_covariance_expert_statistics(resp, expert_features, y)

    def solve(self, stats: FullCovarianceExpertStatistics, previous: FullCovarianceExpertParams):
        return solve_full_covariance_experts(
            stats,
            previous,
            self.ridge,
            self.variance_floor,
            self.min_weight,
            self.covariance_prior,
            self.unpenalised_column,
        )

    def mean_statistics(self, expert_params, expert_features, weight):
        """The statistics expected under the experts themselves: ``avg w_k``, ``G_k``,
        ``Upsilon_k G_k`` and ``Upsilon_k G_k Upsilon_k^T + avg w_k Sigma_k`` (the mean
        parameters used by :class:`~pyro_mm.infer.MirrorDescentEM`)."""
        mass = weight.mean(0)
        gram = weighted_gram(weight, expert_features)
        cross = expert_params.weight @ gram
        square = cross @ expert_params.weight.mT + mass[:, None, None] * expert_params.covariance
        return FullCovarianceExpertStatistics(weight=mass, gram=gram, cross=cross, square=square)

    def exact_m_step(self, previous: FullCovarianceExpertParams, expert_features, y, resp):
        """The exact EM M-step of the experts on a whole data set (closed form here)."""
        return self.solve(self.statistics(previous, expert_features, y, resp), previous)

    def value(self, params: FullCovarianceExpertParams, stats) -> torch.Tensor:
        """The surrogate at ``params`` (with the prior when there is one)."""
        mass = stats.weight.clamp_min(self.min_weight)
        value = full_covariance_expert_surrogate_value(
            params, stats, self.ridge * mass, self.unpenalised_column
        )
        if self.covariance_prior is not None:
            value = value + self.covariance_prior.value(params.covariance).sum()
        return value
