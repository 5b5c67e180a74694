r"""MM and EM blocks of the gate variants in :mod:`pyro_mm.models.gate_variants`.

Both reduce to the one-level gate block (:mod:`~pyro_mm.surrogates.gate`), so each keeps a
closed-form MM update and an exact (Newton) EM M-step:

* **Temperature gate** ``softmax(omega^T u / T)``: in the coordinates ``V = omega / T`` it is the
  plain gate, so the quadratic bound's curvature in ``omega`` is ``C (x) u u^T / T^2`` and the
  update is ``omega = T * argmin_V``. (With a linear router the MM iterates of the gate
  probabilities therefore do not depend on a fixed ``T``: temperature only rescales the weights.)
* **Hierarchical gate** ``softmax_j(a^T u) softmax_{i|j}(b_j^T u)``: with leaf responsibilities
  ``tau_{j,i}`` and group responsibilities ``tau_j = sum_i tau_{j,i}``, the gate part of the
  surrogate splits into the outer gate with soft labels ``tau_j`` and, for each group ``j``, an
  inner gate with soft labels ``tau_{j,i} / tau_j`` and sample weights ``tau_j``:
  ``-sum_{j,i} tau_{j,i} log g_{j,i} = -sum_j tau_j log pi_j - sum_j tau_j sum_i
  (tau_{j,i}/tau_j) log pi_{i|j}``. Each level is majorised by its own quadratic bound (the
  inner ones with the weighted Gram matrices ``avg(tau_j u u^T)``), and the blocks are
  separable, so the update solves ``J + 1`` small systems.
"""

import dataclasses

import torch

from ..models.gate_variants import HierarchicalGateParams
from ..models.gating import gate_log_probs
from .gate import GateStatistics, gate_statistics, gate_surrogate_value, solve_gate
from .softmax_bound import JaakkolaJordanBound
from .softmax_regression import fit_softmax_regression

__all__ = [
    "HierarchicalGateStatistics",
    "hierarchical_gate_statistics",
    "solve_hierarchical_gate",
    "hierarchical_gate_surrogate_value",
    "hierarchical_gate_m_step",
    "temperature_gate_statistics",
    "solve_temperature_gate",
    "temperature_gate_surrogate_value",
    "temperature_gate_m_step",
]


def _check_temperature(temperature) -> float:
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return float(temperature)


def temperature_gate_statistics(
    gate_weight, gate_features, gate_probs, resp, curvature, eps, temperature
) -> GateStatistics:
    """The gate statistics in the coordinates ``V = omega / T`` (arguments as in
    :func:`~pyro_mm.surrogates.gate.gate_statistics`; ``gate_probs`` are the temperature gate's
    probabilities at ``omega``)."""
    temperature = _check_temperature(temperature)
    return gate_statistics(
        gate_weight / temperature, gate_features, gate_probs, resp, curvature, eps
    )


def solve_temperature_gate(stats: GateStatistics, curvature, eps, temperature) -> torch.Tensor:
    """The closed-form argmin ``omega = T (avg B)^{-1} avg(B V_n + xi - grad)``."""
    return _check_temperature(temperature) * solve_gate(stats, curvature, eps)


def temperature_gate_surrogate_value(gate_weight, stats, curvature, eps, temperature):
    """The surrogate at ``omega`` (up to a constant): the plain gate's at ``omega / T``."""
    return gate_surrogate_value(
        gate_weight / _check_temperature(temperature), stats, curvature, eps
    )


def temperature_gate_m_step(gate_features, resp, previous, temperature, **options):
    """The exact EM M-step of the temperature gate (Newton on ``V = omega / T``).

    :param options: passed to :func:`~pyro_mm.surrogates.softmax_regression.fit_softmax_regression`.
    :returns: the weights ``omega``.
    """
    temperature = _check_temperature(temperature)
    fit = fit_softmax_regression(gate_features, resp, init=previous / temperature, **options)
    return temperature * fit.weight


@dataclasses.dataclass
class HierarchicalGateStatistics:
    """Statistics of the two-level gate's surrogate.

    :ivar GateStatistics outer: linear ``(J - 1, D_g)``, Gram ``(D_g, D_g)``.
    :ivar GateStatistics inner: linear ``(J, I - 1, D_g)``, weighted Grams
        ``avg(tau_j u u^T)`` ``(J, D_g, D_g)``.
    """

    outer: GateStatistics
    inner: GateStatistics


def _levels(params: HierarchicalGateParams, resp: torch.Tensor):
    num_groups, group_size = params.inner.shape[0], params.inner.shape[1] + 1
    if resp.shape[-1] != num_groups * group_size:
        raise ValueError(
            f"resp has {resp.shape[-1]} columns; the gate has {num_groups} groups of "
            f"{group_size} experts"
        )
    leaf = resp.reshape(resp.shape[0], num_groups, group_size)
    return leaf, leaf.sum(-1)


def hierarchical_gate_statistics(
    params: HierarchicalGateParams,
    gate_features: torch.Tensor,
    resp: torch.Tensor,
    outer_curvature: torch.Tensor,
    inner_curvature: torch.Tensor,
    eps: float,
) -> HierarchicalGateStatistics:
    """Batch-averaged statistics at ``params`` of the hierarchical gate's surrogate.

    :param HierarchicalGateParams params: the expansion point.
    :param torch.Tensor gate_features: ``(N, D_g)`` regressors ``u(x)``.
    :param torch.Tensor resp: ``(N, J * I)`` leaf responsibilities (group-major).
    :param torch.Tensor outer_curvature: ``(J - 1, J - 1)`` constant bound of the outer softmax.
    :param torch.Tensor inner_curvature: ``(I - 1, I - 1)`` constant bound of the inner ones.
    :param float eps: the ``eps* I`` of every level.
    """
    if isinstance(outer_curvature, JaakkolaJordanBound) or isinstance(
        inner_curvature, JaakkolaJordanBound
    ):
        raise ValueError("the hierarchical gate takes constant bounds ('bohning' or 'paper')")
    leaf, group = _levels(params, resp)
    outer = gate_statistics(
        params.outer,
        gate_features,
        gate_log_probs(params.outer, gate_features).exp(),
        group,
        outer_curvature,
        eps,
    )
    linear, gram = [], []
    for j, weight in enumerate(params.inner):
        # The weighted problem sum_n w_n [lse(b u_n) - t_n . (b u_n)] with w_n = tau_j and
        # t_n = tau_{j,i} / tau_j is the unweighted block applied to sqrt(w_n) u_n,
        # sqrt(w_n) t_n and sqrt(w_n) pi_n: its residual and Gram carry exactly one w_n.
        root = group[:, j : j + 1].sqrt()
        labels = leaf[:, j] / group[:, j : j + 1].clamp_min(torch.finfo(leaf.dtype).tiny)
        probs = gate_log_probs(weight, gate_features).exp()
        stats = gate_statistics(
            weight, root * gate_features, root * probs, root * labels, inner_curvature, eps
        )
        linear.append(stats.linear)
        gram.append(stats.gram)
    inner = GateStatistics(linear=torch.stack(linear), gram=torch.stack(gram))
    return HierarchicalGateStatistics(outer=outer, inner=inner)


def solve_hierarchical_gate(
    stats: HierarchicalGateStatistics, outer_curvature, inner_curvature, eps
) -> HierarchicalGateParams:
    """The closed-form argmin: one gate solve per level and group."""
    inner = [
        solve_gate(GateStatistics(linear=linear, gram=gram), inner_curvature, eps)
        for linear, gram in zip(stats.inner.linear, stats.inner.gram)
    ]
    return HierarchicalGateParams(
        outer=solve_gate(stats.outer, outer_curvature, eps), inner=torch.stack(inner)
    )


def hierarchical_gate_surrogate_value(
    params: HierarchicalGateParams,
    stats: HierarchicalGateStatistics,
    outer_curvature,
    inner_curvature,
    eps,
) -> torch.Tensor:
    """The surrogate at ``params`` (up to a constant): the sum of the levels' quadratics."""
    value = gate_surrogate_value(params.outer, stats.outer, outer_curvature, eps)
    for weight, linear, gram in zip(params.inner, stats.inner.linear, stats.inner.gram):
        value = value + gate_surrogate_value(
            weight, GateStatistics(linear=linear, gram=gram), inner_curvature, eps
        )
    return value


def hierarchical_gate_m_step(
    gate_features: torch.Tensor, resp: torch.Tensor, previous: HierarchicalGateParams, **options
) -> HierarchicalGateParams:
    """The exact EM M-step of the hierarchical gate: Newton on each level (the outer gate with
    labels ``tau_j``, each inner gate with labels ``tau_{j,i}/tau_j`` and weights ``tau_j``).

    :param options: passed to :func:`~pyro_mm.surrogates.softmax_regression.fit_softmax_regression`.
    """
    leaf, group = _levels(previous, resp)
    outer = fit_softmax_regression(gate_features, group, init=previous.outer, **options).weight
    inner = []
    for j, weight in enumerate(previous.inner):
        labels = leaf[:, j] / group[:, j : j + 1].clamp_min(torch.finfo(leaf.dtype).tiny)
        fit = fit_softmax_regression(
            gate_features, labels, sample_weight=group[:, j], init=weight, **options
        )
        inner.append(fit.weight)
    return HierarchicalGateParams(outer=outer, inner=torch.stack(inner))
