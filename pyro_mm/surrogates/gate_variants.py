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

:class:`TemperatureGateSurrogate` and :class:`HierarchicalGateSurrogate` are these functions as the
gate blocks of :class:`~pyro_mm.models.gates.TemperatureGate` and
:class:`~pyro_mm.models.gates.HierarchicalGate`, with the interface of
:class:`~pyro_mm.surrogates.gate.SoftmaxGateSurrogate`.
"""

import dataclasses

import torch

from ..models.gate_variants import (
    HierarchicalGateParams,
    hierarchical_gate_log_probs,
    temperature_gate_log_probs,
)
from ..models.gates import HierarchicalGate, TemperatureGate
from ..models.gating import gate_log_probs
from .exact_gate import logistic_gate_weight
from .gate import GateStatistics, gate_statistics, gate_surrogate_value, solve_gate
from .softmax_bound import SOFTMAX_BOUNDS, JaakkolaJordanBound, softmax_curvature
from .softmax_regression import SoftmaxRegressionResult, fit_softmax_regression

__all__ = [
    "HierarchicalGateStatistics",
    "HierarchicalGateSurrogate",
    "TemperatureGateSurrogate",
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

    :param options: passed to :func:`~pyro_mm.surrogates.softmax_regression.fit_softmax_regression`
        (a ``ridge`` penalises ``V``, i.e. ``omega`` with ``ridge / T^2``).
    :returns: the :class:`~pyro_mm.surrogates.softmax_regression.SoftmaxRegressionResult` with
        ``weight`` the weights ``omega`` (its gradient norm is ``V``'s).
    """
    temperature = _check_temperature(temperature)
    fit = fit_softmax_regression(gate_features, resp, init=previous / temperature, **options)
    return dataclasses.replace(fit, weight=temperature * fit.weight)


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
    :returns: a :class:`~pyro_mm.surrogates.softmax_regression.SoftmaxRegressionResult` whose
        ``weight`` is the :class:`HierarchicalGateParams`, with the levels' total Newton
        iterations, their largest final gradient norm, and whether every level converged.
    """
    leaf, group = _levels(previous, resp)
    fits = [fit_softmax_regression(gate_features, group, init=previous.outer, **options)]
    for j, weight in enumerate(previous.inner):
        labels = leaf[:, j] / group[:, j : j + 1].clamp_min(torch.finfo(leaf.dtype).tiny)
        fits.append(
            fit_softmax_regression(
                gate_features, labels, sample_weight=group[:, j], init=weight, **options
            )
        )
    return SoftmaxRegressionResult(
        weight=HierarchicalGateParams(
            outer=fits[0].weight, inner=torch.stack([fit.weight for fit in fits[1:]])
        ),
        iterations=sum(fit.iterations for fit in fits),
        grad_norm=max(fit.grad_norm for fit in fits),
        converged=all(fit.converged for fit in fits),
    )


class TemperatureGateSurrogate:
    """The MM block and exact EM M-step of a :class:`~pyro_mm.models.gates.TemperatureGate`
    (the interface of :class:`~pyro_mm.surrogates.gate.SoftmaxGateSurrogate`). Every bound of
    the one-level gate applies, in the coordinates ``V = omega / T``.

    :param TemperatureGate gate: the model's gate.
    """

    #: gate penalties are not implemented for this gate.
    supports_penalty = False

    def __init__(self, gate: TemperatureGate):
        self.gate = gate
        self.temperature = gate.temperature

    def log_probs(self, params, gate_features):
        return temperature_gate_log_probs(params, gate_features, self.temperature)

    def curvature(self, num_experts, bound, dtype):
        return softmax_curvature(num_experts - 1, bound, dtype)

    def statistics(self, params, gate_features, gate_probs, resp, curvature, eps):
        return temperature_gate_statistics(
            params, gate_features, gate_probs, resp, curvature, eps, self.temperature
        )

    def solve(self, stats, previous, curvature, eps, penalty=None):
        _refuse_penalty(self.gate, penalty)
        return solve_temperature_gate(stats, curvature, eps, self.temperature)

    def surrogate_value(self, params, stats, curvature, eps):
        return temperature_gate_surrogate_value(params, stats, curvature, eps, self.temperature)

    def feature_gram(self, stats):
        return stats.gram

    def exact_m_step(self, gate_features, targets, previous, **options):
        return temperature_gate_m_step(
            gate_features, targets, previous, self.temperature, **options
        )

    def from_labels(self, gate_features, labels, num_experts, seed=0):
        # The logistic fit is in the plain gate's coordinates V = omega / T.
        return self.temperature * logistic_gate_weight(gate_features, labels, num_experts, seed)


class HierarchicalGateSurrogate:
    """The MM block and exact EM M-step of a :class:`~pyro_mm.models.gates.HierarchicalGate`
    (the interface of :class:`~pyro_mm.surrogates.gate.SoftmaxGateSurrogate`). Its curvature is
    the pair ``(outer, inner)`` of constant bounds (``"bohning"`` or ``"paper"``).

    :param HierarchicalGate gate: the model's gate.
    """

    #: gate penalties are not implemented for this gate.
    supports_penalty = False

    def __init__(self, gate: HierarchicalGate):
        self.gate = gate

    def log_probs(self, params, gate_features):
        return hierarchical_gate_log_probs(params, gate_features)

    def curvature(self, num_experts, bound, dtype):
        self.gate.check(num_experts)
        if bound not in SOFTMAX_BOUNDS:
            raise ValueError(
                f"the hierarchical gate takes a constant softmax bound, one of {SOFTMAX_BOUNDS}; "
                f"got {bound!r}"
            )
        return (
            softmax_curvature(self.gate.num_groups - 1, bound, dtype),
            softmax_curvature(self.gate.group_size - 1, bound, dtype),
        )

    def statistics(self, params, gate_features, gate_probs, resp, curvature, eps):
        # The levels' own probabilities enter the statistics, not the leaf probabilities.
        return hierarchical_gate_statistics(params, gate_features, resp, *curvature, eps)

    def solve(self, stats, previous, curvature, eps, penalty=None):
        _refuse_penalty(self.gate, penalty)
        return solve_hierarchical_gate(stats, *curvature, eps)

    def surrogate_value(self, params, stats, curvature, eps):
        return hierarchical_gate_surrogate_value(params, stats, *curvature, eps)

    def feature_gram(self, stats):
        # The outer level's Gram is the unweighted avg(u u^T); the inner ones are weighted by
        # the group responsibilities.
        return stats.outer.gram

    def exact_m_step(self, gate_features, targets, previous, **options):
        return hierarchical_gate_m_step(gate_features, targets, previous, **options)

    def from_labels(self, gate_features, labels, num_experts, seed=0):
        """The outer level fitted to the labels' groups, each inner level to the labels within
        its group on the rows of that group (zeros for a group without rows)."""
        size = self.gate.group_size
        group = torch.div(labels, size, rounding_mode="floor")
        inner = []
        for j in range(self.gate.num_groups):
            rows = group == j
            inner.append(logistic_gate_weight(gate_features[rows], labels[rows] % size, size, seed))
        return HierarchicalGateParams(
            outer=logistic_gate_weight(gate_features, group, self.gate.num_groups, seed),
            inner=torch.stack(inner),
        )


def _refuse_penalty(gate, penalty) -> None:
    if penalty is not None and penalty.active:
        raise ValueError(
            f"a gate penalty is implemented for the softmax gate only, not for {gate!r}"
        )
