r"""The spectral method of Makkuva et al. end to end: experts from moments (Algorithm 1), then the
gate by EM with the experts fixed (Algorithm 2).

The paper's model, ``y = g(a_z^T x) + sigma eps`` with ``z | x ~ softmax(w_1^T x, ..., 0)``,
has no intercepts; with the identity link :meth:`SpectralMoEFit.moe_params` writes it as
:class:`~pyro_mm.models.GaussianMoE` parameters with zero intercepts
(:func:`~pyro_mm.spectral.parameterisation.glm_moe_params`).
"""

import dataclasses
import math

import torch

from ..models.params import MoEParams
from .experts import SpectralExperts, check_regression_data, spectral_experts
from .gate_em import GateEMResult, fit_gate_em
from .links import as_link
from .parameterisation import glm_moe_params
from .scores import GaussianMixtureScore

__all__ = ["SpectralMoEFit", "fit_spectral_moe"]


@dataclasses.dataclass
class SpectralMoEFit:
    """Outcome of :func:`fit_spectral_moe`.

    :ivar SpectralExperts experts: the experts (unit ``directions`` are the estimates ``a_i``).
    :ivar torch.Tensor gate: ``(k - 1, d)`` gate rows ``w_i`` (expert ``k`` is the reference).
    :ivar GateEMResult gate_em: the gate EM's trace.
    :ivar str link: the link's name.
    :ivar float noise_std: ``sigma``.
    """

    experts: SpectralExperts
    gate: torch.Tensor
    gate_em: GateEMResult
    link: str
    noise_std: float

    def moe_params(self) -> MoEParams:
        """The fit as :class:`~pyro_mm.models.GaussianMoE` parameters with degree-1 features
        (intercepts zero, variances ``sigma^2``); identity link only."""
        if self.link != "identity":
            raise ValueError(
                f"a GaussianMoE has linear experts; the {self.link!r} link has no such form"
            )
        return glm_moe_params(self.experts.directions, self.gate, self.noise_std)


def fit_spectral_moe(
    x,
    y,
    num_experts: int,
    *,
    link="identity",
    noise_std: float = None,
    score: GaussianMixtureScore = None,
    gate_init: str = "zeros",
    radius: float = 10.0,
    max_iter: int = 100,
    tol: float = 1e-6,
    restarts: int = 10,
    iterations: int = 100,
    seed: int = 0,
    gaussian_test_level: float = 1e-3,
) -> SpectralMoEFit:
    """Fits the paper's model: spectral experts, then EM for the gate with the experts fixed.

    :param x: ``(N, d)`` inputs (``x ~ N(0, I_d)`` in the paper's model; see ``score``).
    :param y: ``(N,)`` outputs.
    :param int num_experts: ``k <= d``.
    :param link: ``"identity"``, ``"sigmoid"``, ``"relu"`` or a
        :class:`~pyro_mm.spectral.links.Link`.
    :param float noise_std: the known noise level ``sigma > 0``.
    :param GaussianMixtureScore score: the input density's score (default ``N(0, I_d)``).
    :param str gate_init: ``"zeros"`` (uniform gate) or ``"random"`` (uniform in the unit ball,
        as in the paper's Algorithm 2), or a ``(k - 1, d)`` tensor.
    :param float radius: the M-step's ball ``||W||_F <= radius``.
    :param int max_iter: gate EM iterations cap.
    :param float tol: gate EM stops when the gate moves less than ``tol`` (max-norm).
    :param int restarts: tensor power method starts per component.
    :param int iterations: tensor power steps per start.
    :param int seed: seed of the power method's starts and of a random gate start.
    :param float gaussian_test_level: level of the input Gaussianity tests (``0``: skip).
    :raises ValueError: for an unknown or non-positive ``noise_std`` and everything
        :func:`~pyro_mm.spectral.experts.spectral_experts` rejects.
    """
    if noise_std is None:
        raise ValueError(
            "noise_std (sigma) is required: the spectral method assumes the noise level known "
            "(the transforms P3, P2 and the gate's E-step depend on it)"
        )
    noise_std = float(noise_std)
    if not (math.isfinite(noise_std) and noise_std > 0):
        raise ValueError(
            f"noise_std must be finite and > 0 (with sigma = 0 the gate's E-step is degenerate), "
            f"got {noise_std!r}"
        )
    x, y = check_regression_data(x, y)
    link = as_link(link)
    experts = spectral_experts(
        x,
        y,
        num_experts,
        link=link,
        noise_std=noise_std,
        score=score,
        restarts=restarts,
        iterations=iterations,
        seed=seed,
        gaussian_test_level=gaussian_test_level,
    )
    init = _gate_start(gate_init, num_experts, x.shape[1], seed)
    # The paper's experts have unit norm (Assumption 2): use the unit directions.
    residuals = y.unsqueeze(-1) - link(x @ experts.directions.T)
    result = fit_gate_em(
        x,
        residuals,
        noise_variance=noise_std**2,
        init=init,
        radius=radius,
        max_iter=max_iter,
        tol=tol,
    )
    return SpectralMoEFit(experts, result.gate, result, link.name, noise_std)


def _gate_start(gate_init, num_experts: int, dim: int, seed: int) -> torch.Tensor:
    if isinstance(gate_init, torch.Tensor):
        if gate_init.shape != (num_experts - 1, dim):
            raise ValueError(
                f"gate_init must have shape {(num_experts - 1, dim)}, got {tuple(gate_init.shape)}"
            )
        return gate_init.to(torch.float64)
    if gate_init == "zeros":
        return torch.zeros(num_experts - 1, dim, dtype=torch.float64)
    if gate_init == "random":
        generator = torch.Generator().manual_seed(seed)
        draws = torch.randn(num_experts - 1, dim, generator=generator, dtype=torch.float64)
        scale = torch.rand(num_experts - 1, 1, generator=generator, dtype=torch.float64)
        return draws / draws.norm(dim=-1, keepdim=True) * scale.pow(1 / dim)
    raise ValueError(f"gate_init must be 'zeros', 'random' or a tensor, got {gate_init!r}")
