r"""The synthetic data of the incremental-MM paper (000, Sections 5.2 and 5.3), written down
exactly.

The paper parametrises the gate and the expert means per input coordinate, with one intercept
per coordinate, ``w_k(x) = sum_{d<=D} sum_p omega_{k,d,p} x_p^d``; here the intercept appears
once, so the paper's intercepts are summed over ``p`` (:func:`from_paper_layout`).

What the paper leaves open, and what is chosen here:

* **Inputs.** The paper says only "two generating Gaussian distributions, which correspond to
  two clusters. Each cluster consists of N = 1,000 samples". Here ``N = 2 x 1000 = 2000``
  inputs are drawn ``x ~ N(0, I_P)``, the expert label from the true gate and ``y`` from that
  expert, so each expert (cluster) gets about 1000 samples.
* **Section 5.2 (low-dimensional, K = 2, P = 2, Q = 1, D_W = D_V = 1).** The printed
  ``omega^0 = [[0, 8], [0, 0]]`` and ``v^0 = [[0, 0], [-2.5, 0]]`` have rows ``k`` and columns
  ``d`` (intercept, slope); as in Algorithm 4, they act on the first input coordinate and the
  coefficients of ``x_2`` are zero. ``sigma^0 = [[1], [1]]`` are variances (Algorithm 4 draws
  ``sigma^0[k, q, q]``, a covariance entry). So ``g_1(x) = sigmoid(8 x_1)``, expert 1 is
  ``N(0, 1)`` and expert 2 is ``N(-2.5, 1)``.
* **Algorithm 4 (P = 10).** The seeds of the paper's loops are kept (1-based ``k, q, p``,
  ``d`` from 0; each "set random seed s" is ``numpy.random.RandomState(s)``, one uniform draw
  from it); its Step 3 ranges ``d`` over ``D_V`` where ``D_W`` is meant.
* **Split.** The first 80% of the rows train, the last 20% test (the rows are i.i.d.).
"""

import dataclasses

import numpy as np
import torch

from ..models.params import GaussianExpertParams, MoEParams
from .synthetic import sample_gaussian_moe

__all__ = [
    "PaperSyntheticData",
    "from_paper_layout",
    "low_dimensional_truth",
    "algorithm4_truth",
    "paper_synthetic",
]

#: The paper's Section 5.2 parameters, rows = experts, columns = (intercept, slope of x_1).
LOW_DIMENSIONAL_GATE = [[0.0, 8.0], [0.0, 0.0]]
LOW_DIMENSIONAL_MEANS = [[0.0, 0.0], [-2.5, 0.0]]
LOW_DIMENSIONAL_VARIANCES = [[1.0], [1.0]]


@dataclasses.dataclass
class PaperSyntheticData:
    """One draw of a paper setup, split 80/20.

    :ivar torch.Tensor x_train: ``(1600, P)`` training inputs.
    :ivar torch.Tensor y_train: ``(1600, 1)`` training outputs.
    :ivar torch.Tensor x_test: ``(400, P)`` test inputs.
    :ivar torch.Tensor y_test: ``(400, 1)`` test outputs.
    :ivar MoEParams truth: the generating parameters (degree-1 features, one intercept).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    truth: MoEParams


def from_paper_layout(omega: np.ndarray, upsilon: np.ndarray, sigma: np.ndarray) -> MoEParams:
    r"""Converts the paper's per-coordinate layout to :class:`MoEParams` of degree-``D`` features
    ``[1, x, x^2, ..., x^D]`` with a single intercept.

    :param omega: gate, ``(P, K, D_W + 1)`` as in Algorithm 4; expert ``K`` must be zero.
    :param upsilon: expert means, ``(K, D_V + 1, Q, P)`` as in Algorithm 4.
    :param sigma: covariances ``(K, Q, Q)``; only the diagonal is used (diagonal experts).
    """
    omega, upsilon, sigma = (np.asarray(a, dtype=np.float64) for a in (omega, upsilon, sigma))
    if np.any(omega[:, -1, :] != 0):
        raise ValueError("the paper's reference expert K must have zero gate weights")
    diagonal = np.diagonal(sigma, axis1=1, axis2=2)
    if np.any(sigma != diagonal[:, :, None] * np.eye(sigma.shape[1])):
        raise ValueError("sigma must be diagonal (the experts have diagonal covariances)")
    # Gate row k: [sum_p omega[p, k, 0], omega[:, k, 1], omega[:, k, 2], ...].
    gate = np.concatenate(
        [omega[:, :-1, 0].sum(0)[:, None]] + [omega[:, :-1, d].T for d in range(1, omega.shape[2])],
        axis=1,
    )
    # Expert (k, q): [sum_p v[k, 0, q, p], v[k, 1, q, :], v[k, 2, q, :], ...].
    weight = np.concatenate(
        [upsilon[:, 0].sum(-1, keepdims=True)]
        + [upsilon[:, d] for d in range(1, upsilon.shape[1])],
        axis=-1,
    )
    return MoEParams(
        gate=torch.as_tensor(gate),
        experts=GaussianExpertParams(
            weight=torch.as_tensor(weight), variance=torch.as_tensor(diagonal.copy())
        ),
    )


def low_dimensional_truth() -> MoEParams:
    """The true parameters of Section 5.2 (K = 2, P = 2, Q = 1, D_W = D_V = 1)."""
    num_experts, in_features = 2, 2
    omega = np.zeros((in_features, num_experts, 2))
    omega[0] = LOW_DIMENSIONAL_GATE
    upsilon = np.zeros((num_experts, 2, 1, in_features))
    upsilon[:, :, 0, 0] = LOW_DIMENSIONAL_MEANS
    sigma = np.asarray(LOW_DIMENSIONAL_VARIANCES)[:, :, None]
    return from_paper_layout(omega, upsilon, sigma)


def algorithm4_truth(
    num_experts: int = 2,
    in_features: int = 10,
    out_features: int = 1,
    degree: int = 1,
    seed: int = 0,
) -> MoEParams:
    """The true parameters of Section 5.3 drawn by the paper's Algorithm 4.

    :param int num_experts: ``K``.
    :param int in_features: ``P``.
    :param int out_features: ``Q``.
    :param int degree: ``D_V = D_W``.
    :param int seed: the paper's ``s_e``.
    """
    if num_experts < 2 or in_features < 1 or out_features < 1 or degree < 1:
        raise ValueError("Algorithm 4 needs K >= 2, P >= 1, Q >= 1 and a degree >= 1")
    K, P, Q, D = num_experts, in_features, out_features, degree
    upsilon = np.zeros((K, D + 1, Q, P))
    sigma = np.zeros((K, Q, Q))
    omega = np.zeros((P, K, D + 1))
    for k in range(1, K + 1):
        for q in range(1, Q + 1):
            sigma[k - 1, q - 1, q - 1] = np.random.RandomState(seed + k * Q + q).uniform(0.5, 1.5)
    # Step 2 sets a seed for every (k, d, q, p) but draws only for p = 1.
    p = 1
    for k in range(1, K + 1):
        for d in range(D + 1):
            for q in range(1, Q + 1):
                draw_seed = seed + seed + k * (D + 1) * Q * P + d * Q * P + q * P + p
                value = np.random.RandomState(draw_seed).uniform(1.5, 5.0)
                upsilon[k - 1, d, q - 1, p - 1] = -value if (k > 1 and d > 0) else value
    omega[0, 0, 1] = 8.0
    return from_paper_layout(omega, upsilon, sigma)


def paper_synthetic(
    setup: str, seed: int = 0, num_samples: int = 2000, train_fraction: float = 0.8
) -> PaperSyntheticData:
    """A seeded draw of one of the paper's synthetic setups, split into train and test.

    :param str setup: ``"low"`` (Section 5.2) or ``"high"`` (Section 5.3, Algorithm 4 with
        ``P = 10`` and ``s_e = 0``).
    :param int seed: seed of the draws of ``(x, y)`` (the true parameters are fixed).
    :param int num_samples: rows in all (the paper: 2 x 1000).
    :param float train_fraction: share of the rows in the training split (the paper: 0.8).
    """
    if setup == "low":
        truth = low_dimensional_truth()
    elif setup == "high":
        truth = algorithm4_truth()
    else:
        raise ValueError(f"setup must be 'low' or 'high', got {setup!r}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction!r}")
    x, y = sample_gaussian_moe(truth, num_samples, seed=seed)
    num_train = int(round(train_fraction * num_samples))
    return PaperSyntheticData(
        x_train=x[:num_train],
        y_train=y[:num_train],
        x_test=x[num_train:],
        y_test=y[num_train:],
        truth=truth,
    )
