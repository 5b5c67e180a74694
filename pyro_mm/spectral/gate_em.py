r"""Algorithm 2 of Makkuva et al.: the gate by EM with the experts held fixed.

With fixed expert means ``m_i(x)`` and Gaussian noise, the E-step gives responsibilities
``tau_ni ∝ g_i(x_n) N(y_n; m_i(x_n), sigma^2)`` and the M-step maximises
``Q(W) = mean_n [sum_i tau_ni w_i^T u_n - log sum_j exp(w_j^T u_n)]`` over the ball
``||W||_F <= R``: a soft-label softmax regression, strongly concave, solved exactly by Newton's
method (:func:`~pyro_mm.surrogates.softmax_regression.fit_softmax_regression`). On the ball the
constrained argmax is, by the KKT conditions, the unconstrained argmax of
``Q(W) - lambda / 2 ||W||^2`` for the ``lambda >= 0`` with ``||W(lambda)||_F = R``;
``||W(lambda)||`` decreases in ``lambda``, so ``lambda`` is found by Brent's method on
``log lambda``, each evaluation a warm-started Newton solve. (The paper's domain is a ball per
gate row; one ball on the whole gate keeps a single multiplier and the same role: bounded
iterates when the labels are nearly separable.) The noise variance is known in the paper; it
can also be re-estimated in closed form (one variance shared by the experts).
"""

import dataclasses
import math

import torch

from ..models.gating import gate_log_probs
from ..surrogates.softmax_regression import fit_softmax_regression, softmax_regression_loss

__all__ = ["GateEMResult", "ball_softmax_regression", "fit_gate_em"]

_LOG_2PI = math.log(2 * math.pi)


@dataclasses.dataclass
class GateEMResult:
    """Outcome of :func:`fit_gate_em`.

    :ivar torch.Tensor gate: ``(k - 1, D)`` fitted gate weights.
    :ivar float noise_variance: the noise variance (fixed or re-estimated).
    :ivar list log_likelihood: mean log-likelihood at the start of each iteration (non-decreasing).
    :ivar list gates: the gate after each iteration (``gates[0]`` is the start).
    :ivar int iterations: EM iterations taken.
    :ivar bool converged: whether the gate moved less than ``tol`` in the last iteration.
    :ivar bool on_boundary: whether the last M-step ended on the ball's boundary.
    """

    gate: torch.Tensor
    noise_variance: float
    log_likelihood: list
    gates: list
    iterations: int
    converged: bool
    on_boundary: bool


def ball_softmax_regression(features, targets, radius: float = None, init=None, tol=1e-9):
    """The soft-label softmax regression on the ball ``||W||_F <= radius``.

    :param torch.Tensor features: ``(N, D)`` regressors.
    :param torch.Tensor targets: ``(N, C)`` soft labels (class ``C`` the reference).
    :param float radius: the ball's radius (``None``: no constraint).
    :param torch.Tensor init: ``(C - 1, D)`` warm start.
    :param float tol: gradient tolerance of the Newton solves.
    :returns: ``(weight, on_boundary)``.
    """
    from scipy.optimize import brentq

    fit = fit_softmax_regression(features, targets, init=init, tol=tol)
    if radius is None or fit.weight.norm() <= radius:
        return fit.weight, False
    # First guess of the multiplier from the KKT condition grad f = -lambda W, evaluated at the
    # radial projection of the unconstrained solution.
    projected = (fit.weight * (radius / fit.weight.norm())).requires_grad_(True)
    (gradient,) = torch.autograd.grad(
        softmax_regression_loss(projected, features, targets), projected
    )
    guess = max(-(gradient * projected).sum().item() / radius**2, 1e-12)
    last = {"weight": projected.detach()}

    def excess(log_ridge: float) -> float:
        """``log ||W(lambda)|| - log R``, decreasing in ``lambda``."""
        last["weight"] = fit_softmax_regression(
            features, targets, init=last["weight"], ridge=math.exp(log_ridge), tol=tol
        ).weight
        return math.log(last["weight"].norm().item() / radius)

    low = high = math.log(guess)
    while excess(high) > 0:
        low, high = high, high + math.log(4.0)
    while excess(low) < 0:
        low, high = low - math.log(4.0), low
    root = brentq(excess, low, high, xtol=1e-12, rtol=1e-12)
    excess(root)
    weight = last["weight"]
    return weight * (radius / weight.norm().item()), True


def _log_joint(gate, gate_features, residuals, noise_variance):
    log_expert = -0.5 * (_LOG_2PI + math.log(noise_variance) + residuals.square() / noise_variance)
    return gate_log_probs(gate, gate_features) + log_expert


def fit_gate_em(
    gate_features: torch.Tensor,
    residuals: torch.Tensor,
    *,
    noise_variance: float = None,
    init: torch.Tensor = None,
    radius: float = 10.0,
    max_iter: int = 100,
    tol: float = 1e-6,
    variance_floor: float = 1e-10,
) -> GateEMResult:
    """EM for the gate of a mixture of fixed Gaussian experts.

    :param torch.Tensor gate_features: ``(N, D)`` gate regressors ``u(x)``.
    :param torch.Tensor residuals: ``(N, k)`` ``y_n - m_i(x_n)`` for each fixed expert.
    :param float noise_variance: the known ``sigma^2``; ``None`` re-estimates one shared variance
        in each M-step (``sum_ni tau_ni r_ni^2 / N``).
    :param torch.Tensor init: ``(k - 1, D)`` starting gate (default zeros: a uniform gate).
    :param float radius: the M-step's ball ``||W||_F <= radius`` (``None``: unconstrained).
    :param int max_iter: EM iterations cap.
    :param float tol: stop when ``max |W_{t+1} - W_t| < tol``.
    :param float variance_floor: smallest re-estimated variance.
    """
    num_rows, num_experts = residuals.shape
    if gate_features.shape[0] != num_rows:
        raise ValueError(
            f"gate_features has {gate_features.shape[0]} rows but residuals has {num_rows}"
        )
    if noise_variance is not None and not (math.isfinite(noise_variance) and noise_variance > 0):
        raise ValueError(f"noise_variance must be finite and > 0, got {noise_variance!r}")
    if radius is not None and not radius > 0:
        raise ValueError(f"radius must be > 0 or None, got {radius!r}")
    shape = (num_experts - 1, gate_features.shape[1])
    gate = torch.zeros(shape, dtype=gate_features.dtype) if init is None else init.clone()
    if gate.shape != shape:
        raise ValueError(f"init must have shape {shape}, got {tuple(gate.shape)}")
    estimate_variance = noise_variance is None
    if num_experts == 1:
        variance = residuals.square().mean().item() if estimate_variance else noise_variance
        loglik = _log_joint(gate, gate_features, residuals, max(variance, variance_floor))
        return GateEMResult(gate, variance, [loglik.mean().item()], [gate], 0, True, False)
    if estimate_variance:
        # Start from the nearest expert's residuals (a lower bound the first M-step corrects).
        noise_variance = max(residuals.square().min(-1).values.mean().item(), variance_floor)
    log_likelihood, gates = [], [gate]
    converged = on_boundary = False
    for _ in range(max_iter):
        log_joint = _log_joint(gate, gate_features, residuals, noise_variance)
        log_lik = torch.logsumexp(log_joint, -1)
        log_likelihood.append(log_lik.mean().item())
        resp = torch.exp(log_joint - log_lik.unsqueeze(-1))
        new_gate, on_boundary = ball_softmax_regression(gate_features, resp, radius, init=gate)
        if estimate_variance:
            noise_variance = max((resp * residuals.square()).sum(-1).mean().item(), variance_floor)
        change = (new_gate - gate).abs().max().item() if new_gate.numel() else 0.0
        gate = new_gate
        gates.append(gate)
        if change < tol:
            converged = True
            break
    return GateEMResult(
        gate, noise_variance, log_likelihood, gates, len(gates) - 1, converged, on_boundary
    )
