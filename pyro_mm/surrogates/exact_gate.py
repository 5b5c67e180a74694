r"""The exact gate M-step of EM: a soft-label softmax regression, solved by Newton's method.

Given soft labels ``t_n`` on the simplex, the gate M-step is

.. math:: W^{new} = \arg\min_W \frac1N \sum_n \Big[\log\big(1 + \sum_{k<K} e^{w_k^\top u_n}\big)
          - \sum_{k<K} t_{nk}\, w_k^\top u_n\Big] + \frac{\lambda}{2}\|W\|^2 ,

whose optimality condition ``avg_n g_{1:K-1}(x_n; W) u_n^T + lambda W = avg_n t_{n,1:K-1} u_n^T``
says that the gate's mean parameters ``grad A(W) = avg_n g(x_n; W) u_n^T`` (``A`` the gate's
log-partition averaged over the inputs) match those of the targets. EM uses ``t = tau`` (the
responsibilities); mirror-descent EM with step size ``eta`` uses
``t = (1 - eta) g(x; W_t) + eta tau``, i.e.
``grad A(W_{t+1}) = (1 - eta) grad A(W_t) + eta avg tau u^T``.
The solver is :func:`~pyro_mm.surrogates.softmax_regression.fit_softmax_regression` (Newton with an
Armijo line search, run to a gradient tolerance), warm-started at the current gate.

:func:`logistic_gate_weight` is the same problem for hard labels (e.g. K-means clusters), where the
unpenalised optimum can be at infinity: scikit-learn's weakly regularised logistic regression, the
warm start of the paper's "Incremental MM*".
"""

import numpy as np
import torch

from .softmax_regression import SoftmaxRegressionResult, fit_softmax_regression

__all__ = ["exact_gate_m_step", "logistic_gate_weight"]


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


def logistic_gate_weight(
    gate_features: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0
) -> torch.Tensor:
    """Gate weights ``(num_classes - 1, D_g)`` of a multinomial logistic regression of hard
    ``labels`` in ``{0, ..., num_classes - 1}`` on ``gate_features`` (scikit-learn, ``C = 1e4``,
    no intercept: the features carry it); zeros when fewer than two classes occur.

    :param int seed: the solver's ``random_state``.
    """
    from sklearn.linear_model import LogisticRegression

    labels = labels.cpu().numpy()
    present = np.unique(labels)
    if len(present) < 2:
        return torch.zeros(num_classes - 1, gate_features.shape[1], dtype=gate_features.dtype)
    fit = LogisticRegression(fit_intercept=False, C=1e4, max_iter=1000, random_state=seed)
    fit.fit(gate_features.double().cpu().numpy(), labels)
    coef = np.zeros((num_classes, gate_features.shape[1]))
    if len(present) == 2 and fit.coef_.shape[0] == 1:
        coef[present[1]] = fit.coef_[0]
    else:
        coef[present] = fit.coef_
    # sklearn's softmax has no reference class: shift so that the last class has zero weights.
    return torch.as_tensor(coef[:-1] - coef[-1]).to(gate_features.dtype)
