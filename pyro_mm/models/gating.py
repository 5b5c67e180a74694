"""The softmax gate with a reference expert, shared by every expert family."""

import torch

__all__ = ["gate_logits", "gate_log_probs"]


def gate_logits(gate_weight: torch.Tensor, gate_features: torch.Tensor) -> torch.Tensor:
    """Logits ``(N, K)`` of the softmax gate; the last column (reference expert) is zero.

    :param torch.Tensor gate_weight: ``(K - 1, D_g)`` gate weights.
    :param torch.Tensor gate_features: ``(N, D_g)`` gate regressors ``u(x)``.
    """
    free = gate_features @ gate_weight.transpose(-1, -2)
    return torch.nn.functional.pad(free, (0, 1))


def gate_log_probs(gate_weight: torch.Tensor, gate_features: torch.Tensor) -> torch.Tensor:
    """Log gate probabilities ``log g_k(x)``, shape ``(N, K)``, by log-sum-exp.

    Computed expert-major, ``(K, N)``, and returned as its transpose: with few experts the
    log-sum-exp over ``K`` then runs along contiguous rows of length ``N``, several times
    faster than a reduction over a short last dimension.
    """
    free = gate_weight @ gate_features.transpose(-1, -2)
    logits = torch.nn.functional.pad(free, (0, 0, 0, 1))
    return torch.log_softmax(logits, dim=-2).transpose(-1, -2)
