"""The whole MM surrogate of a mixture of experts: the gate block plus the expert block.

The E-step (responsibilities) is computed once here from the model's log-densities and feeds both
blocks; every inference class builds on these two functions. The gate block is the model's
(:func:`~pyro_mm.surrogates.registry.gate_surrogate_for`); without one, the one-level softmax
gate's, and ``curvature`` is then a softmax bound.
"""

import dataclasses

from ..models.params import MoEParams
from .gate import SoftmaxGateSurrogate

_SOFTMAX_GATE = SoftmaxGateSurrogate()

__all__ = ["MoEStatistics", "e_step", "mixture_statistics", "solve_mixture"]


@dataclasses.dataclass
class MoEStatistics:
    """Running averages of the surrogate statistics: the gate block's ``gate`` (e.g.
    :class:`~pyro_mm.surrogates.gate.GateStatistics`) and the expert family's ``experts``."""

    gate: object
    experts: object


def e_step(
    expert_surrogate, params: MoEParams, gate_features, expert_features, y, gate_surrogate=None
):
    """Responsibilities at ``params``.

    :param gate_surrogate: the model's gate block (``None``: the softmax gate's).
    :returns: ``(gate_probs, resp, log_lik)``, shapes ``(N, K)``, ``(N, K)``, ``(N,)``;
        ``log_lik`` is the per-sample ``log p(y | x)`` (log-sum-exp of the log joint).
    """
    gate_surrogate = _SOFTMAX_GATE if gate_surrogate is None else gate_surrogate
    log_gate = gate_surrogate.log_probs(params.gate, gate_features)
    log_joint = log_gate + expert_surrogate.log_prob(params.experts, expert_features, y)
    # One fused log-sum-exp yields both the log-likelihood and the normalised responsibilities;
    # an infinite row maximum is replaced by 0, as torch.logsumexp does.
    shift = log_joint.amax(-1, keepdim=True).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    joint = (log_joint - shift).exp()
    total = joint.sum(-1, keepdim=True)
    log_lik = (total.log() + shift).squeeze(-1)
    return log_gate.exp(), joint / total, log_lik


def mixture_statistics(
    expert_surrogate,
    params: MoEParams,
    gate_features,
    expert_features,
    y,
    curvature,
    eps,
    gate_surrogate=None,
):
    """Batch-averaged statistics of the surrogate majorising the NLL at ``params``.

    :param curvature: the gate block's bound (its ``curvature(...)``).
    :param gate_surrogate: the model's gate block (``None``: the softmax gate's).

    :returns: ``(MoEStatistics, log_lik)`` with ``log_lik`` the per-sample log-likelihood at
        ``params`` (free by-product of the E-step).
    """
    gate_surrogate = _SOFTMAX_GATE if gate_surrogate is None else gate_surrogate
    gate_probs, resp, log_lik = e_step(
        expert_surrogate, params, gate_features, expert_features, y, gate_surrogate
    )
    stats = MoEStatistics(
        gate=gate_surrogate.statistics(
            params.gate, gate_features, gate_probs, resp, curvature, eps
        ),
        experts=expert_surrogate.statistics(params.experts, expert_features, y, resp),
    )
    return stats, log_lik


def solve_mixture(
    stats: MoEStatistics,
    previous: MoEParams,
    expert_surrogate,
    curvature,
    eps,
    gate_penalty=None,
    gate_surrogate=None,
):
    """The argmin of the surrogate: gate and experts solved separately (the blocks are separable).

    :param gate_penalty: a :class:`~pyro_mm.surrogates.penalties.CoefficientPenalty` on the
        gate weights, majorised at ``previous.gate`` (``None``: none).
    :param gate_surrogate: the model's gate block (``None``: the softmax gate's).
    :returns: ``(MoEParams, SolveReport)``.
    """
    experts, report = expert_surrogate.solve(stats.experts, previous.experts)
    gate_surrogate = _SOFTMAX_GATE if gate_surrogate is None else gate_surrogate
    gate = gate_surrogate.solve(stats.gate, previous.gate, curvature, eps, gate_penalty)
    return MoEParams(gate=gate, experts=experts), report
