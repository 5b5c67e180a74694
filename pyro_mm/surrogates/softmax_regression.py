r"""Exact soft-label softmax (multinomial logistic) regression by Newton's method.

Both exact EM M-steps that have no closed form are this problem: the gate M-step (targets =
responsibilities ``tau``, features ``u(x)``) and a multinomial expert's M-step (targets = one-hot
labels, sample weights ``tau_k``, features ``r(x)``). The objective, with a reference class ``C``
whose weights are zero,

.. math:: f(W) = \frac{1}{N} \sum_n w_n \Big[\log\big(1 + \sum_{c<C} e^{(W x_n)_c}\big)
          - \sum_{c<C} t_{nc} (W x_n)_c\Big] + \frac{\lambda}{2} \|W\|^2,

is convex (strictly with a ridge or a full-rank design); Newton's method with a backtracking
(Armijo) line search converges to machine precision in a few iterations.
"""

import dataclasses

import torch

from .least_squares import least_squares

__all__ = ["SoftmaxRegressionResult", "fit_softmax_regression", "softmax_regression_loss"]


@dataclasses.dataclass
class SoftmaxRegressionResult:
    """Outcome of :func:`fit_softmax_regression`.

    :ivar torch.Tensor weight: ``(C - 1, D)`` fitted weights.
    :ivar int iterations: Newton iterations taken.
    :ivar float grad_norm: max-norm of the final gradient.
    :ivar bool converged: whether ``grad_norm < tol`` was reached.
    """

    weight: torch.Tensor
    iterations: int
    grad_norm: float
    converged: bool


def softmax_regression_loss(weight, features, targets, sample_weight=None, ridge: float = 0.0):
    """The objective ``f(W)`` above (mean over rows), differentiable in ``weight``."""
    logits = torch.nn.functional.pad(features @ weight.T, (0, 1))
    per_row = torch.logsumexp(logits, -1) - (targets[:, :-1] * logits[:, :-1]).sum(-1)
    if sample_weight is not None:
        per_row = sample_weight * per_row
    return per_row.mean() + 0.5 * ridge * weight.square().sum()


def _gradient_and_hessian(weight, features, targets, sample_weight, ridge):
    num_rows, num_features = features.shape
    num_free = weight.shape[0]
    probs = torch.softmax(torch.nn.functional.pad(features @ weight.T, (0, 1)), -1)[:, :-1]
    row_weight = (
        torch.ones(num_rows, dtype=features.dtype) if sample_weight is None else sample_weight
    )
    residual = row_weight.unsqueeze(-1) * (probs - targets[:, :-1])
    gradient = residual.T @ features / num_rows + ridge * weight
    hessian = features.new_zeros(num_free, num_features, num_free, num_features)
    # (C-1)^2 Gram products instead of one (N, (C-1)^2 D) intermediate: memory stays O(N D).
    for i in range(num_free):
        for j in range(i, num_free):
            curvature = row_weight * probs[:, i] * (float(i == j) - probs[:, j])
            block = (features * curvature.unsqueeze(-1)).T @ features / num_rows
            hessian[i, :, j, :] = block
            hessian[j, :, i, :] = block.T
    size = num_free * num_features
    hessian = hessian.reshape(size, size) + ridge * torch.eye(size, dtype=features.dtype)
    return gradient, hessian


def fit_softmax_regression(
    features: torch.Tensor,
    targets: torch.Tensor,
    sample_weight: torch.Tensor = None,
    init: torch.Tensor = None,
    ridge: float = 0.0,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> SoftmaxRegressionResult:
    """Minimises the soft-label softmax-regression objective by damped Newton steps.

    :param torch.Tensor features: ``(N, D)`` regressors.
    :param torch.Tensor targets: ``(N, C)`` soft labels (rows on the simplex); class ``C`` is
        the reference.
    :param torch.Tensor sample_weight: ``(N,)`` non-negative row weights (default ones).
    :param torch.Tensor init: ``(C - 1, D)`` starting weights (default zeros).
    :param float ridge: L2 penalty ``lambda`` (makes the problem strictly convex).
    :param float tol: stop when the max-norm of the gradient is below ``tol``.
    :param int max_iter: Newton iteration cap.
    """
    num_free = targets.shape[1] - 1
    weight = features.new_zeros(num_free, features.shape[1]) if init is None else init.clone()
    loss = softmax_regression_loss(weight, features, targets, sample_weight, ridge)
    grad_norm = float("inf")
    for iteration in range(1, max_iter + 1):
        gradient, hessian = _gradient_and_hessian(weight, features, targets, sample_weight, ridge)
        grad_norm = gradient.abs().max().item()
        if grad_norm < tol:
            return SoftmaxRegressionResult(weight, iteration - 1, grad_norm, True)
        # A rank-deficient design (constant or duplicated columns) gives a singular Hessian:
        # a jitter proportional to its scale keeps the Newton system solvable.
        jitter = 1e-12 * hessian.diagonal().abs().max().clamp_min(1e-300)
        factor, info = torch.linalg.cholesky_ex(
            hessian + jitter * torch.eye(len(hessian), dtype=hessian.dtype)
        )
        if info > 0:
            # NaN for an overflowed Hessian: the line search then finds no decrease and the
            # solve stops where it is, unconverged.
            direction = -least_squares(hessian, gradient.reshape(-1, 1)).reshape(gradient.shape)
        else:
            direction = -torch.cholesky_solve(gradient.reshape(-1, 1), factor).reshape(
                gradient.shape
            )
        slope = (gradient * direction).sum()
        if -slope <= 1e-14 * max(1.0, abs(loss.item())):
            # The predicted decrease is below the loss's round-off, so a line search cannot
            # see it; Newton is in its quadratic phase and the full step is the right one.
            weight = weight + direction
            loss = softmax_regression_loss(weight, features, targets, sample_weight, ridge)
            continue
        step = 1.0
        while True:
            candidate = weight + step * direction
            candidate_loss = softmax_regression_loss(
                candidate, features, targets, sample_weight, ridge
            )
            if candidate_loss <= loss + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        if step < 1e-10:
            # No decrease along the Newton direction: we are at the optimum to round-off.
            break
        weight, loss = candidate, candidate_loss
    gradient, _ = _gradient_and_hessian(weight, features, targets, sample_weight, ridge)
    grad_norm = gradient.abs().max().item()
    return SoftmaxRegressionResult(weight, iteration, grad_norm, grad_norm < tol)
