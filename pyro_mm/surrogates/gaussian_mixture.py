r"""The whole surrogate's statistics of a Gaussian mixture of experts in one pass over a batch.

When the gate and the experts share their regressors (``u(x) = r(x)``, the default polynomial
features), every statistic of the MM surrogate is a block of one of ``K`` weighted second-moment
matrices of ``z = (r(x), y)``:

.. math:: M_k = \operatorname{avg}\ \tau_k z z^\top =
    \begin{pmatrix} \operatorname{avg} \tau_k r r^\top & \cdot \\
                    \operatorname{avg} \tau_k y r^\top & \operatorname{avg} \tau_k y y^\top
    \end{pmatrix},

and the gate's Gram matrix is ``sum_k M_k`` restricted to ``r`` (the responsibilities sum to one),
or, for the per-sample Jaakkola-Jordan bound, one more moment matrix weighted by the curvature.
The batch is held feature-major (``z`` as ``(D + Q, N)`` rows) and the E-step runs expert-major
(``(K, N)`` rows) from one product of ``r`` with the stacked gate and expert coefficients. So a
batch costs one matrix product for the E-step, one weighting and one product for all moment
matrices (per chunk of rows when the weighted design would outgrow the cache, see
:func:`~pyro_mm.surrogates.moments.weighted_moments`), and about thirty small element-wise
operations -- instead of the ~150 of the block-by-block path
(:func:`~pyro_mm.surrogates.mixture.mixture_statistics`), whose statistics this returns to
round-off (``tests/test_fast_paths.py``).
"""

import math

import torch
import torch.nn.functional as F

from ..models.params import MoEParams
from .gate import gate_statistics_from_moments
from .gaussian_expert import GaussianExpertStatistics
from .mixture import MoEStatistics
from .moments import weighted_moments
from .softmax_bound import JaakkolaJordanBound

__all__ = ["gaussian_mixture_statistics"]

_LOG_2PI = math.log(2 * math.pi)
# softplus(t) = t for t above this: log1p(exp(-40)) = 4e-18 is below float64 round-off, while
# torch's default threshold of 20 would drop 2e-9.
_SOFTPLUS_THRESHOLD = 40.0


def _gate_log_partition(free_logits: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum_k exp(free_logits_k))`` over the ``K - 1`` rows of ``free_logits``."""
    if free_logits.shape[0] == 1:
        return F.softplus(free_logits[0], threshold=_SOFTPLUS_THRESHOLD)
    top = free_logits.amax(0).clamp_min(0.0)
    return ((free_logits - top).exp().sum(0) + (-top).exp()).log() + top


def gaussian_mixture_statistics(
    params: MoEParams, design: torch.Tensor, curvature, eps: float
) -> tuple:
    """Batch-averaged statistics of the MM surrogate at ``params`` for Gaussian experts whose
    regressors are also the gate's.

    :param MoEParams params: expansion point: gate ``(K - 1, D)``, experts with weight
        ``(K, Q, D)`` and variance ``(K, Q)``; ``K >= 2``.
    :param torch.Tensor design: ``(D + Q, N)``, feature-major: the regressors ``r(x)`` of the
        ``N`` rows, then their outputs (see
        :meth:`~pyro_mm.models.base.MixtureOfExperts.regressors_and_outputs`).
    :param curvature: the gate's softmax curvature bound (a ``(K - 1, K - 1)`` matrix or a
        :class:`~pyro_mm.surrogates.softmax_bound.JaakkolaJordanBound`).
    :param float eps: the ``eps* I`` term of the gate bound.
    :returns: ``(MoEStatistics, log_lik, overflow_probe)``: the first two as
        :func:`~pyro_mm.surrogates.mixture.mixture_statistics`; ``overflow_probe`` is a 0-dim
        tensor that is finite iff every statistic is, when ``params`` and ``log_lik`` are finite
        (the sum of the moment matrices, of which every statistic is a block, a sum of blocks or,
        with bounded weights, a product with finite parameters): one reduction instead of one
        per statistic.
    """
    expert_weight, variance = params.experts.weight, params.experts.variance
    num_experts, out_features, num_features = expert_weight.shape
    num_rows = design.shape[1]
    features, outputs = design[:num_features], design[num_features:]
    # One product gives the gate logits (first K - 1 rows) and every expert mean.
    coefficients = torch.cat([params.gate, expert_weight.reshape(-1, num_features)])
    linear = coefficients @ features
    free_logits = linear[: num_experts - 1]
    residual = outputs - linear[num_experts - 1 :].view(num_experts, out_features, num_rows)
    normaliser = (-0.5 * (_LOG_2PI + variance.log())).sum(-1)
    if out_features == 1:
        log_joint = torch.addcmul(
            normaliser.unsqueeze(-1),
            residual.view(num_experts, num_rows).square_(),
            -0.5 / variance,
        )
    else:
        log_joint = (residual.square_() * (-0.5 / variance).unsqueeze(-1)).sum(1)
        log_joint += normaliser.unsqueeze(-1)
    # The gate's log-partition is common to all experts: it cancels in the responsibilities.
    log_joint[: num_experts - 1].add_(free_logits)
    top = log_joint.amax(0)
    joint = (log_joint - top).exp_()
    total = joint.sum(0)
    resp = joint.div_(total)
    gate_log_partition = _gate_log_partition(free_logits)
    log_lik = total.log_().add_(top).sub_(gate_log_partition)
    if num_experts == 2:
        gate_probs = torch.sigmoid(free_logits)
    else:
        gate_probs = (free_logits - gate_log_partition).exp_()
    gate_residual = resp[: num_experts - 1] - gate_probs

    weights = resp
    if isinstance(curvature, JaakkolaJordanBound):
        weights = torch.cat([resp, curvature.sample_curvature(free_logits[0]).unsqueeze(0)])
    moments = weighted_moments(weights, design)
    moments /= num_rows
    expert_moments = moments[:num_experts]
    if isinstance(curvature, JaakkolaJordanBound):
        gate_gram = moments[num_experts, :num_features, :num_features]
    else:
        gate_gram = expert_moments[:, :num_features, :num_features].sum(0)
    stats = MoEStatistics(
        gate=gate_statistics_from_moments(
            params.gate, gate_residual @ features.T / num_rows, gate_gram, curvature, eps
        ),
        experts=GaussianExpertStatistics(
            weight=resp.sum(1) / num_rows,
            gram=expert_moments[:, :num_features, :num_features],
            cross=expert_moments[:, num_features:, :num_features],
            square=expert_moments[:, num_features:, num_features:].diagonal(dim1=-2, dim2=-1),
        ),
    )
    return stats, log_lik, moments.sum()
