r"""Gate variants of the convergence paper (Section 3 and 4): the temperature (dense-to-sparse)
softmax gate and the two-level hierarchical softmax gate.

* Temperature gate: ``g_k(x) = softmax(omega_k^T u / T)``. A temperature ``T < 1`` sharpens the
  gate towards one active expert (sparse), ``T > 1`` flattens it (dense); annealing ``T`` from
  large to small is dense-to-sparse gating. With a linear router the temperature and the weights
  are confounded (only ``omega / T`` is identified: the paper's eq. 15), so a fixed ``T`` does
  not change the model family, only its parameterisation.
* Hierarchical gate: ``J`` groups of ``I`` experts,
  ``g_{j,i}(x) = softmax_j(a_j^T u) softmax_i(b_{j,i}^T u)``, reference group ``J`` and
  reference expert ``I`` in every group. Its log-probabilities are not linear in ``u`` up to one
  normaliser, so it is a different family from the one-level gate.
"""

import dataclasses

import torch

from .gating import gate_log_probs

__all__ = [
    "HierarchicalGateParams",
    "hierarchical_gate_log_probs",
    "temperature_gate_log_probs",
]


def temperature_gate_log_probs(
    gate_weight: torch.Tensor, gate_features: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``log softmax(omega^T u / T)``, shape ``(N, K)`` (reference expert ``K`` at zero).

    :param float temperature: ``T > 0``.
    """
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return gate_log_probs(gate_weight / temperature, gate_features)


@dataclasses.dataclass
class HierarchicalGateParams:
    """Weights of a two-level softmax gate with ``J`` groups of ``I`` experts.

    :ivar torch.Tensor outer: ``(J - 1, D_g)`` group weights ``a_j`` (group ``J`` is the
        reference).
    :ivar torch.Tensor inner: ``(J, I - 1, D_g)`` within-group weights ``b_{j,i}`` (expert
        ``I`` of every group is the reference).
    """

    outer: torch.Tensor
    inner: torch.Tensor


def hierarchical_gate_log_probs(
    params: HierarchicalGateParams, gate_features: torch.Tensor
) -> torch.Tensor:
    """``log g_{j,i}(x)``, shape ``(N, J * I)``, experts ordered group by group (``j`` major).

    Both levels are normalised by log-sum-exp.
    """
    outer = gate_log_probs(params.outer, gate_features)  # (N, J)
    inner = torch.stack(
        [gate_log_probs(weight, gate_features) for weight in params.inner], dim=1
    )  # (N, J, I)
    return (outer.unsqueeze(-1) + inner).flatten(-2)
