"""Small builders shared by the tests."""

import torch

from pyro_mm.models.params import GaussianExpertParams, MoEParams


def random_gaussian_params(num_experts, gate_dim, out_features, expert_dim, generator, scale=1.0):
    """Random (non-fitted) parameters of a Gaussian MoE, float64."""
    return MoEParams(
        gate=scale
        * torch.randn(num_experts - 1, gate_dim, generator=generator, dtype=torch.float64),
        experts=GaussianExpertParams(
            weight=torch.randn(
                num_experts, out_features, expert_dim, generator=generator, dtype=torch.float64
            ),
            variance=0.2
            + torch.rand(num_experts, out_features, generator=generator, dtype=torch.float64),
        ),
    )
