"""The paper's parameters as :class:`~pyro_mm.models.GaussianMoE` parameters.

Makkuva et al.'s model with the identity link, ``y = a_z^T x + sigma eps``,
``z | x ~ softmax(w_1^T x, ..., w_{k-1}^T x, 0)``, has no intercepts. A ``GaussianMoE`` with
degree-1 features ``u(x) = r(x) = [1, x]`` holds it exactly with the intercept columns at zero:
gate ``[0, w_i]``, expert weights ``[0, a_i]``, variances ``sigma^2``.
"""

import torch

from ..models.params import GaussianExpertParams, MoEParams

__all__ = ["glm_moe_params"]


def glm_moe_params(experts: torch.Tensor, gate: torch.Tensor, noise_std: float) -> MoEParams:
    """``(k, d)`` experts ``a_i``, ``(k - 1, d)`` gate rows ``w_i`` and ``sigma`` as
    ``GaussianMoE(k, d)`` parameters (intercepts zero)."""
    num_experts = experts.shape[0]
    if gate.shape != (num_experts - 1, experts.shape[1]):
        raise ValueError(
            f"gate must have shape {(num_experts - 1, experts.shape[1])}, got {tuple(gate.shape)}"
        )
    zeros = torch.zeros(num_experts, 1, dtype=experts.dtype)
    return MoEParams(
        gate=torch.cat([zeros[:-1], gate.to(experts.dtype)], dim=-1),
        experts=GaussianExpertParams(
            weight=torch.cat([zeros, experts], dim=-1).unsqueeze(1),
            variance=torch.full((num_experts, 1), float(noise_std) ** 2, dtype=experts.dtype),
        ),
    )
