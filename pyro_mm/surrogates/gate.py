r"""The gate block of the MM surrogate (paper Section 4.1.3, Appendix A.5.1).

Per sample, ``-sum_k tau_k log g_k(x; omega)`` is majorised at ``omega_n`` by replacing the
log-partition by its quadratic bound with curvature ``B = C (x) u u^T + eps I``. Up to a constant
the surrogate is ``1/2 omega^T B omega - omega^T (B omega_n + xi - grad)``, an exponential-family
function of ``omega`` with statistics ``(avg(B omega_n + xi - grad), avg B)``. Since
``avg B = C (x) avg(u u^T) + eps I``, the statistics kept are the ``(K-1, D_g)`` linear term and the
``(D_g, D_g)`` Gram matrix of the gate features: no ``(K-1) D_g``-square matrix is ever formed.

:class:`SoftmaxGateSurrogate` bundles these functions with the exact EM M-step
(:mod:`~pyro_mm.surrogates.exact_gate`) as the gate block of the one-level
:class:`~pyro_mm.models.gates.SoftmaxGate`, the interface every gate block shares (see
:func:`~pyro_mm.surrogates.registry.gate_surrogate_for`).
"""

import dataclasses

import torch

from ..models.gates import SoftmaxGate
from ..models.gating import gate_log_probs
from .exact_gate import exact_gate_m_step, logistic_gate_weight
from .penalties import CoefficientPenalty
from .softmax_bound import (
    JaakkolaJordanBound,
    kronecker_left,
    kronecker_quadratic_value,
    softmax_curvature,
    solve_kronecker,
)

__all__ = [
    "GateStatistics",
    "SoftmaxGateSurrogate",
    "gate_statistics",
    "gate_statistics_from_moments",
    "solve_gate",
    "gate_surrogate_value",
]

#: Largest number of gate weights ``(K - 1) D_g`` solved densely (see :func:`solve_gate`).
_DENSE_SIZE = 64


@dataclasses.dataclass
class GateStatistics:
    """Averaged sufficient statistics of the gate surrogate.

    :ivar torch.Tensor linear: ``(K - 1, D_g)``, the average of ``B omega_n + xi - grad`` in
        matrix form (``xi = tau_{1:K-1} u^T``, ``grad = g_{1:K-1}(x) u^T``).
    :ivar torch.Tensor gram: ``(D_g, D_g)``, the average of ``u u^T`` (for the per-sample
        :class:`~pyro_mm.surrogates.softmax_bound.JaakkolaJordanBound`, the weighted average
        ``avg(2 lambda(xi_n) u u^T)``, which then carries the whole curvature).
    """

    linear: torch.Tensor
    gram: torch.Tensor


def gate_statistics(
    gate_weight: torch.Tensor,
    gate_features: torch.Tensor,
    gate_probs: torch.Tensor,
    resp: torch.Tensor,
    curvature: torch.Tensor,
    eps: float,
) -> GateStatistics:
    """Batch-averaged gate statistics at the expansion point ``gate_weight``.

    :param torch.Tensor gate_weight: ``(K - 1, D_g)`` current gate weights ``omega_n``.
    :param torch.Tensor gate_features: ``(N, D_g)`` regressors ``u(x)``.
    :param torch.Tensor gate_probs: ``(N, K)`` gate probabilities at ``omega_n``.
    :param torch.Tensor resp: ``(N, K)`` responsibilities ``tau`` at ``theta_n``.
    :param curvature: ``(K - 1, K - 1)`` softmax curvature bound ``C``, or a
        :class:`~pyro_mm.surrogates.softmax_bound.JaakkolaJordanBound` (``K = 2``).
    :param float eps: the ``eps* I`` term of the bound (keeps ``avg B`` definite).
    """
    num_rows = gate_features.shape[0]
    if isinstance(curvature, JaakkolaJordanBound):
        logits = gate_features @ gate_weight[0]
        weighted = gate_features * curvature.sample_curvature(logits).unsqueeze(-1)
        gram = weighted.T @ gate_features / num_rows
    else:
        gram = gate_features.T @ gate_features / num_rows
    residual = (resp - gate_probs)[:, :-1]
    return gate_statistics_from_moments(
        gate_weight, residual.T @ gate_features / num_rows, gram, curvature, eps
    )


def gate_statistics_from_moments(
    gate_weight: torch.Tensor,
    residual_moment: torch.Tensor,
    gram: torch.Tensor,
    curvature,
    eps: float,
) -> GateStatistics:
    """The gate statistics from the batch moments ``avg((tau - g)_{1:K-1} u^T)`` (``(K - 1,
    D_g)``) and ``gram`` (:attr:`GateStatistics.gram`): ``linear = residual_moment +
    C omega_n gram + eps omega_n``. Shared by :func:`gate_statistics` and the one-pass
    Gaussian statistics (:mod:`~pyro_mm.surrogates.gaussian_mixture`)."""
    linear = residual_moment + kronecker_left(curvature) @ gate_weight @ gram + eps * gate_weight
    return GateStatistics(linear=linear, gram=gram)


def solve_gate(
    stats: GateStatistics,
    curvature: torch.Tensor,
    eps: float,
    penalty: CoefficientPenalty = None,
    previous: torch.Tensor = None,
) -> torch.Tensor:
    """The closed-form argmin ``omega = (avg B)^{-1} avg(B omega_n + xi - grad)``.

    Without a penalty the system is solved by one Cholesky factorisation of ``avg B`` when it
    has at most ``_DENSE_SIZE`` rows, else through the eigendecompositions of its Kronecker
    factors (:func:`~pyro_mm.surrogates.softmax_bound.solve_kronecker`); both are exact.

    With a ``penalty`` (lasso/ridge on the gate weights, majorised at ``previous``), its
    diagonal ``D`` joins the system: ``omega = (avg B + D)^{-1} avg(B omega_n + xi - grad)``.
    ``D`` breaks the Kronecker structure, so this system is solved densely (size
    ``(K - 1) D_g``).

    :param CoefficientPenalty penalty: penalty on the gate weights (``None``: none).
    :param torch.Tensor previous: ``(K - 1, D_g)`` the current gate weights ``omega_n``
        (needed with a penalty).
    """
    left = kronecker_left(curvature)
    if penalty is None or not penalty.active:
        if stats.linear.numel() <= _DENSE_SIZE:
            weight = _solve_small_kronecker(left, stats.gram, eps, stats.linear)
            if weight is not None:
                return weight
        return solve_kronecker(left, stats.gram, eps, stats.linear)
    if previous is None:
        raise ValueError("a gate penalty is majorised at the current gate: pass previous")
    diagonal = penalty.curvature(previous).reshape(-1) + eps
    system = torch.kron(left, stats.gram) + torch.diag(diagonal)
    factor = torch.linalg.cholesky(system)
    solution = torch.cholesky_solve(stats.linear.reshape(-1, 1), factor)
    return solution.reshape(stats.linear.shape)


def _solve_small_kronecker(left, gram, eps: float, rhs):
    """:func:`solve_kronecker` by one Cholesky factorisation of the ``(K - 1) D_g``-square
    matrix ``left (x) gram + eps I``: at sizes up to ``_DENSE_SIZE`` several times cheaper than
    two eigendecompositions. ``None`` when round-off makes the matrix indefinite."""
    system = torch.kron(left, gram)
    system.diagonal().add_(eps)
    factor, info = torch.linalg.cholesky_ex(system)
    if info:
        return None
    return torch.cholesky_solve(rhs.reshape(-1, 1), factor).reshape(rhs.shape)


def gate_surrogate_value(
    gate_weight: torch.Tensor, stats: GateStatistics, curvature: torch.Tensor, eps: float
) -> torch.Tensor:
    """The gate surrogate ``1/2 omega^T avg(B) omega - <linear, omega>`` (up to a constant)."""
    return kronecker_quadratic_value(
        kronecker_left(curvature), stats.gram, eps, stats.linear, gate_weight
    )


class SoftmaxGateSurrogate:
    """The MM block and the exact EM M-step of the one-level softmax gate.

    Every gate block has these methods; inference code calls them without knowing the gate's
    kind. ``curvature`` is whatever :meth:`curvature` returned (here the ``(K - 1, K - 1)`` bound
    ``C`` or a :class:`~pyro_mm.surrogates.softmax_bound.JaakkolaJordanBound`).

    :param SoftmaxGate gate: the model's gate.
    """

    #: whether :meth:`solve` takes a coefficient penalty on the gate weights.
    supports_penalty = True

    def __init__(self, gate: SoftmaxGate = None):
        self.gate = SoftmaxGate() if gate is None else gate

    def log_probs(self, params: torch.Tensor, gate_features: torch.Tensor) -> torch.Tensor:
        """``log g_k(x)``, shape ``(N, K)``."""
        return gate_log_probs(params, gate_features)

    def curvature(self, num_experts: int, bound: str, dtype: torch.dtype):
        """The softmax bound named ``bound`` (see
        :func:`~pyro_mm.surrogates.softmax_bound.softmax_curvature`)."""
        return softmax_curvature(num_experts - 1, bound, dtype)

    def statistics(self, params, gate_features, gate_probs, resp, curvature, eps):
        """Batch-averaged statistics at ``params`` (see :func:`gate_statistics`)."""
        return gate_statistics(params, gate_features, gate_probs, resp, curvature, eps)

    def solve(self, stats, previous, curvature, eps, penalty: CoefficientPenalty = None):
        """The closed-form argmin (see :func:`solve_gate`); ``penalty`` is majorised at
        ``previous``."""
        return solve_gate(stats, curvature, eps, penalty, previous)

    def surrogate_value(self, params, stats, curvature, eps) -> torch.Tensor:
        """The surrogate at ``params``, up to a constant."""
        return gate_surrogate_value(params, stats, curvature, eps)

    def feature_gram(self, stats: GateStatistics) -> torch.Tensor:
        """The ``(D_g, D_g)`` matrix whose conditioning the solves inherit."""
        return stats.gram

    def exact_m_step(self, gate_features, targets, previous, **options):
        """``argmin -avg sum_k t_k log g_k(x)`` for soft labels ``targets`` ``(N, K)`` (the
        EM M-step with ``targets = tau``), by Newton.

        :param options: ``ridge``, ``tol``, ``max_iter`` of
            :func:`~pyro_mm.surrogates.exact_gate.exact_gate_m_step`.
        :returns: a :class:`~pyro_mm.surrogates.softmax_regression.SoftmaxRegressionResult`
            whose ``weight`` is the new gate parameters.
        """
        return exact_gate_m_step(gate_features, targets, previous, **options)

    def from_labels(self, gate_features, labels, num_experts: int, seed: int = 0):
        """Gate parameters fitted to hard expert ``labels`` (a warm start, see
        :func:`~pyro_mm.surrogates.exact_gate.logistic_gate_weight`)."""
        return logistic_gate_weight(gate_features, labels, num_experts, seed)
