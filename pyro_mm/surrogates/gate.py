r"""The gate block of the MM surrogate (paper Section 4.1.3, Appendix A.5.1).

Per sample, ``-sum_k tau_k log g_k(x; omega)`` is majorised at ``omega_n`` by replacing the
log-partition by its quadratic bound with curvature ``B = C (x) u u^T + eps I``. Up to a constant
the surrogate is ``1/2 omega^T B omega - omega^T (B omega_n + xi - grad)``, an exponential-family
function of ``omega`` with statistics ``(avg(B omega_n + xi - grad), avg B)``. Since
``avg B = C (x) avg(u u^T) + eps I``, the statistics kept are the ``(K-1, D_g)`` linear term and the
``(D_g, D_g)`` Gram matrix of the gate features: no ``(K-1) D_g``-square matrix is ever formed.
"""

import dataclasses

import torch

from .softmax_bound import kronecker_quadratic_value, solve_kronecker

__all__ = ["GateStatistics", "gate_statistics", "solve_gate", "gate_surrogate_value"]


@dataclasses.dataclass
class GateStatistics:
    """Averaged sufficient statistics of the gate surrogate.

    :ivar torch.Tensor linear: ``(K - 1, D_g)``, the average of ``B omega_n + xi - grad`` in
        matrix form (``xi = tau_{1:K-1} u^T``, ``grad = g_{1:K-1}(x) u^T``).
    :ivar torch.Tensor gram: ``(D_g, D_g)``, the average of ``u u^T``.
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
    :param torch.Tensor curvature: ``(K - 1, K - 1)`` softmax curvature bound ``C``.
    :param float eps: the ``eps* I`` term of the bound (keeps ``avg B`` definite).
    """
    num_rows = gate_features.shape[0]
    gram = gate_features.T @ gate_features / num_rows
    residual = (resp - gate_probs)[:, :-1]
    linear = (
        residual.T @ gate_features / num_rows + curvature @ gate_weight @ gram + eps * gate_weight
    )
    return GateStatistics(linear=linear, gram=gram)


def solve_gate(stats: GateStatistics, curvature: torch.Tensor, eps: float) -> torch.Tensor:
    """The closed-form argmin ``omega = (avg B)^{-1} avg(B omega_n + xi - grad)``."""
    return solve_kronecker(curvature, stats.gram, eps, stats.linear)


def gate_surrogate_value(
    gate_weight: torch.Tensor, stats: GateStatistics, curvature: torch.Tensor, eps: float
) -> torch.Tensor:
    """The gate surrogate ``1/2 omega^T avg(B) omega - <linear, omega>`` (up to a constant)."""
    return kronecker_quadratic_value(curvature, stats.gram, eps, stats.linear, gate_weight)
