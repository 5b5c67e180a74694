r"""Spectral initialisation of a :class:`~pyro_mm.models.GaussianMoE` (identity link).

Usage, before incremental MM or EM::

    model = GaussianMoE(num_experts=3, in_features=10)
    model.set_params(spectral_init(model, x_first, y_first, seed=0))
    infer = IncrementalMM(model, init="current")

Steps. Standardise the inputs, ``s = (x - m) C^{-1/2}`` (sample mean ``m`` and covariance ``C``),
centre and scale the outputs, ``v = (y - ybar) / sqrt(mean (y - ybar)^2)``, and run the
spectral experts on ``(s, v)`` with the identity transform ``P3(v) = v^3 - 3 v``,
``P2(v) = v^2``. That transform cancels the gate for experts of any common norm ``rho``, not just
``rho = 1``: the paper's ``beta = -3 (1 + sigma^2)`` is ``-3 E[y^2]`` under its model, and with
``E[v^2] = 1`` it is ``-3`` whatever ``rho`` and ``sigma`` are; the un-whitened components
``b_i`` keep their norms (``c = 6``, ``c' = 2`` for every norm). So no noise level is needed
for the experts. Back in the data's units the expert ``i`` has slopes
``sqrt(mean (y - ybar)^2) C^{-1/2} b_i`` and intercept ``ybar - slopes^T m``. The gate (on the
model's own gate features, intercept column included) and, unless ``sigma`` is given, one shared
noise variance then come from EM with these experts fixed.

The result is consistent under the paper's assumptions (Gaussian inputs, equal expert
intercepts, equal expert norms, gate orthogonal to the experts) and a biased but cheap start
otherwise; incremental MM or EM refines it.
"""

import math

import torch

from ..models.features import PolynomialFeatures
from ..models.gates import SoftmaxGate
from ..models.gaussian_moe import GaussianMoE
from ..models.params import GaussianExpertParams, MoEParams
from .experts import spectral_experts
from .gate_em import fit_gate_em
from .transforms import transform_constants

__all__ = ["spectral_init"]


def spectral_init(
    model: GaussianMoE,
    x,
    y,
    sigma: float = None,
    *,
    gate_radius: float = 100.0,
    max_iter: int = 100,
    tol: float = 1e-6,
    restarts: int = 10,
    iterations: int = 100,
    seed: int = 0,
    gaussian_test_level: float = 1e-3,
) -> MoEParams:
    """Initial parameters of a Gaussian MoE from the spectral method plus a gate-only EM.

    :param GaussianMoE model: a model with one output and degree-1 expert features
        (intercept and slopes); ``num_experts <= in_features``. Any gate feature map.
    :param x: ``(N, P)`` inputs (a first batch is enough; ``N > P``).
    :param y: ``(N,)`` or ``(N, 1)`` outputs.
    :param float sigma: the experts' noise standard deviation if known (``> 0``); ``None``
        estimates one shared variance in the gate EM.
    :param float gate_radius: the gate M-step's ball ``||W||_F <= gate_radius`` (in the units of
        the model's gate features), a guard against nearly separable responsibilities.
    :param int max_iter: gate EM iterations cap.
    :param float tol: gate EM stops when the gate moves less than ``tol``.
    :param int restarts: tensor power method starts per component.
    :param int iterations: tensor power steps per start.
    :param int seed: seed of the power method's starts.
    :param float gaussian_test_level: level of the Gaussianity tests of the standardised inputs
        (``0``: skip); a :class:`~pyro_mm.spectral.gaussianity.NonGaussianInputWarning` says the
        start may be biased.
    :returns: :class:`~pyro_mm.models.MoEParams` in ``float64``, for ``model.set_params``.
    """
    if not isinstance(model, GaussianMoE):
        raise TypeError(f"spectral_init needs a GaussianMoE, got {type(model).__name__}")
    if model.gate != SoftmaxGate():
        raise ValueError(
            f"spectral_init estimates the one-level softmax gate; the model's gate is "
            f"{model.gate!r} (use init='kmeans' or 'kmeans-logistic')"
        )
    features = model.expert_features
    if not (isinstance(features, PolynomialFeatures) and features.degree == 1):
        raise ValueError(
            f"spectral_init needs linear experts (expert_degree=1: intercept and slopes), got "
            f"{features!r}"
        )
    if model.out_features != 1:
        raise ValueError(f"spectral_init handles one output, got out_features={model.out_features}")
    if sigma is not None and not (math.isfinite(float(sigma)) and float(sigma) > 0):
        raise ValueError(f"sigma must be finite and > 0 (or None to estimate it), got {sigma!r}")
    num_experts, dim = model.num_experts, model.in_features
    if num_experts > dim:
        raise ValueError(
            f"the spectral method needs num_experts <= in_features, got {num_experts} > {dim}"
        )
    x = model.check_x(x).to(torch.float64)
    y = model.check_y(y, x.shape[0]).to(torch.float64).squeeze(-1)
    if x.shape[0] <= dim + 1:
        raise ValueError(f"need more than in_features + 1 = {dim + 1} rows, got {x.shape[0]}")
    mean = x.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(x.T, correction=0).reshape(dim, dim))
    if eigenvalues.min() <= 1e-12 * eigenvalues.max().clamp_min(1e-300):
        raise ValueError("x has (nearly) linearly dependent columns: its covariance is singular")
    inverse_root = (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T
    standardised = (x - mean) @ inverse_root
    centre = y.mean()
    scale = (y - centre).square().mean().sqrt()
    if scale <= 0:
        raise ValueError("y is constant: there is nothing for the experts to explain")
    experts = spectral_experts(
        standardised,
        (y - centre) / scale,
        num_experts,
        constants=transform_constants("identity", 0.0),
        restarts=restarts,
        iterations=iterations,
        seed=seed,
        gaussian_test_level=gaussian_test_level,
    )
    slopes = scale * experts.vectors @ inverse_root  # rows C^{-1/2} b_i (C^{-1/2} symmetric)
    intercepts = centre - slopes @ mean
    residuals = y.unsqueeze(-1) - intercepts - x @ slopes.T
    result = fit_gate_em(
        model.gate_features(x),
        residuals,
        noise_variance=None if sigma is None else float(sigma) ** 2,
        radius=gate_radius,
        max_iter=max_iter,
        tol=tol,
    )
    weight = torch.cat([intercepts.unsqueeze(-1), slopes], dim=-1).unsqueeze(1)
    variance = torch.full((num_experts, 1), result.noise_variance, dtype=torch.float64)
    return MoEParams(
        gate=result.gate, experts=GaussianExpertParams(weight=weight, variance=variance)
    )
