r"""Seeded data from the model of Makkuva et al. (the spectral method's model):

.. math:: x \sim \textstyle\sum_j q_j \mathcal N(\mu_j, I_d) \ (\text{default } \mathcal N(0, I_d)),
          \quad z \mid x \sim \mathrm{softmax}(w_1^\top x, \dots, w_{k-1}^\top x, 0),
          \quad y = g(a_z^\top x) + \sigma\,\varepsilon,

with no intercepts, unit expert directions ``a_i`` drawn uniformly on the sphere and unit gate
rows ``w_i`` drawn uniformly on the sphere (projected onto the orthogonal complement of
``span{a_i}`` and renormalised for the paper's Assumption 3, ``orthogonal_gate=True``).
"""

import dataclasses

import torch

from ..models.gating import gate_logits
from ..models.params import MoEParams
from .links import as_link
from .parameterisation import glm_moe_params

__all__ = ["GLMMoETruth", "glm_moe_truth", "sample_glm_moe"]


@dataclasses.dataclass
class GLMMoETruth:
    """True parameters of the spectral method's model.

    :ivar torch.Tensor experts: ``(k, d)`` unit expert directions ``a_i``.
    :ivar torch.Tensor gate: ``(k - 1, d)`` gate rows ``w_i`` (expert ``k`` is the reference).
    :ivar str link: the link's name.
    :ivar float noise_std: ``sigma``.
    :ivar torch.Tensor input_weights: ``(J,)`` input mixture weights ``q_j``.
    :ivar torch.Tensor input_means: ``(J, d)`` input component means (identity covariances).
    """

    experts: torch.Tensor
    gate: torch.Tensor
    link: str
    noise_std: float
    input_weights: torch.Tensor
    input_means: torch.Tensor

    def moe_params(self) -> MoEParams:
        """The truth as ``GaussianMoE(k, d)`` parameters (identity link; intercepts zero)."""
        if self.link != "identity":
            raise ValueError(f"a GaussianMoE has linear experts, not the {self.link!r} link")
        return glm_moe_params(self.experts, self.gate, self.noise_std)


def _unit_rows(rows: int, dim: int, generator) -> torch.Tensor:
    draws = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    return draws / draws.norm(dim=-1, keepdim=True)


def glm_moe_truth(
    num_experts: int = 2,
    in_features: int = 10,
    *,
    link: str = "identity",
    noise_std: float = 0.1,
    orthogonal_gate: bool = False,
    input_mixture_weights=None,
    seed: int = 0,
) -> GLMMoETruth:
    """Draws the true parameters (Section 4 of the paper).

    :param bool orthogonal_gate: project the gate rows onto the orthogonal complement of the
        experts' span (needs ``k < d``).
    :param input_mixture_weights: ``(q_1, ..., q_J)`` for Gaussian-mixture inputs with means
        drawn uniformly on the unit sphere (Table 1 uses ``(p, 1 - p)``); ``None``: ``N(0, I)``.
    """
    if orthogonal_gate and num_experts >= in_features:
        raise ValueError("an orthogonal gate needs num_experts < in_features")
    generator = torch.Generator().manual_seed(seed)
    experts = _unit_rows(num_experts, in_features, generator)
    gate = _unit_rows(num_experts - 1, in_features, generator)
    if orthogonal_gate:
        basis, _ = torch.linalg.qr(experts.T)
        gate = gate - (gate @ basis) @ basis.T
        gate = gate / gate.norm(dim=-1, keepdim=True)
    if input_mixture_weights is None:
        weights = torch.ones(1, dtype=torch.float64)
        means = torch.zeros(1, in_features, dtype=torch.float64)
    else:
        weights = torch.as_tensor(input_mixture_weights, dtype=torch.float64)
        if weights.dim() != 1 or (weights <= 0).any() or abs(weights.sum().item() - 1) > 1e-12:
            raise ValueError(
                f"input_mixture_weights must be positive and sum to one, got {weights}"
            )
        means = _unit_rows(len(weights), in_features, generator)
    return GLMMoETruth(experts, gate, as_link(link).name, float(noise_std), weights, means)


def sample_glm_moe(truth: GLMMoETruth, num_samples: int, *, seed: int = 0):
    """Draws ``num_samples`` rows.

    :returns: ``(x, y, z)``: float64 ``(N, d)``, float64 ``(N,)`` and the int64 expert labels.
    """
    generator = torch.Generator().manual_seed(seed)
    dim = truth.experts.shape[1]
    component = torch.multinomial(truth.input_weights, num_samples, True, generator=generator)
    x = truth.input_means[component] + torch.randn(
        num_samples, dim, generator=generator, dtype=torch.float64
    )
    gate = torch.softmax(gate_logits(truth.gate, x), dim=-1)
    z = torch.multinomial(gate, 1, generator=generator).squeeze(-1)
    mean = as_link(truth.link)((x * truth.experts[z]).sum(-1))
    noise = torch.randn(num_samples, generator=generator, dtype=torch.float64)
    return x, mean + truth.noise_std * noise, z
