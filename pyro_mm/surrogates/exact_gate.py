r"""The exact gate M-step of EM: a soft-label softmax regression, solved by Newton's method.

Given soft labels ``t_n`` on the simplex, the gate M-step is

.. math:: W^{new} = \arg\min_W \frac1N \sum_n \Big[\log\big(1 + \sum_{k<K} e^{w_k^\top u_n}\big)
          - \sum_{k<K} t_{nk}\, w_k^\top u_n\Big] + \frac{\lambda}{2}\|W\|^2 ,

whose optimality condition ``avg_n g_{1:K-1}(x_n; W) u_n^T + lambda W = avg_n t_{n,1:K-1} u_n^T``
says that the gate's mean parameters ``grad A(W) = avg_n g(x_n; W) u_n^T`` (``A`` the gate's
log-partition averaged over the inputs) match those of the targets. EM uses ``t = tau`` (the
responsibilities); mirror-descent EM with step size ``eta`` uses
``t = (1 - eta) g(x; W_t) + eta tau``, i.e. ``grad A(W_{t+1}) = (1 - eta) grad A(W_t) + eta avg tau u^T``.
The solver is :func:`~pyro_mm.surrogates.softmax_regression.fit_softmax_regression` (Newton with an
Armijo line search, run to a gradient tolerance), warm-started at the current gate.
"""

import torch

from .softmax_regression import SoftmaxRegressionResult, fit_softmax_regression

__all__ = ["exact_gate_m_step"]


def exact_gate_m_step(
    gate_features: torch.Tensor,
    targets: torch.Tensor,
    previous: torch.Tensor,
    *,
    ridge: float = 0.0,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> SoftmaxRegressionResult:
    """Solves the gate M-step above to the gradient tolerance ``tol``.

    :param torch.Tensor gate_features: ``(N, D_g)`` gate regressors ``u(x)``.
    :param torch.Tensor targets: ``(N, K)`` soft labels (rows on the simplex).
    :param torch.Tensor previous: ``(K - 1, D_g)`` current gate weights (the warm start).
    :param float ridge: ``lambda`` (``0``: the maximum-likelihood M-step).
    :param float tol: stop when the max-norm of the gradient is below ``tol``.
    :param int max_iter: Newton iteration cap.
    :returns: the :class:`~pyro_mm.surrogates.softmax_regression.SoftmaxRegressionResult`.
    """
    if previous.shape[0] == 0:
        # One expert: the gate has no free weights and the M-step is empty.
        return SoftmaxRegressionResult(previous.clone(), 0, 0.0, True)
    return fit_softmax_regression(
        gate_features, targets, init=previous, ridge=ridge, tol=tol, max_iter=max_iter
    )
