"""Softmax-gated mixture of Gaussian regression experts with full output covariance."""

import dataclasses
import math

import pyro.distributions as dist
import torch
from pyro.nn import PyroParam
from torch.distributions import constraints

from .base import MixtureOfExperts
from .gaussian_moe import GaussianMoE, gaussian_expert_means
from .params import MoEParams

__all__ = [
    "FullCovarianceExpertParams",
    "FullCovarianceGaussianMoE",
    "full_covariance_expert_log_prob",
]

_LOG_2PI = math.log(2 * math.pi)


@dataclasses.dataclass
class FullCovarianceExpertParams:
    """Parameters of ``K`` Gaussian regression experts with full covariance.

    :ivar torch.Tensor weight: ``(K, Q, D_e)`` regression coefficients ``Upsilon_k``.
    :ivar torch.Tensor covariance: ``(K, Q, Q)`` positive definite covariances ``Sigma_k``.
    """

    weight: torch.Tensor
    covariance: torch.Tensor


def full_covariance_expert_log_prob(
    params: FullCovarianceExpertParams, expert_features: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """``log N(y; Upsilon_k r(x), Sigma_k)`` for every expert, shape ``(N, K)``, through the
    Cholesky factors of the covariances (no inverse is formed)."""
    means = gaussian_expert_means(params.weight, expert_features)  # (N, K, Q)
    residual = (y.unsqueeze(-2) - means).permute(1, 2, 0)  # (K, Q, N)
    factor = torch.linalg.cholesky(params.covariance)
    whitened = torch.linalg.solve_triangular(factor, residual, upper=False)
    log_det = 2 * torch.diagonal(factor, dim1=-2, dim2=-1).log().sum(-1)
    out_features = params.covariance.shape[-1]
    log_prob = -0.5 * (whitened.square().sum(-2) + (log_det + out_features * _LOG_2PI)[:, None])
    return log_prob.T


class FullCovarianceGaussianMoE(MixtureOfExperts):
    r"""Softmax-gated mixture of Gaussian regression experts with a full ``Q x Q`` covariance
    per expert (correlated outputs)

    .. math:: p(y \mid x) = \sum_{k=1}^K g_k(x)\, \mathcal{N}\big(y;\ \Upsilon_k r(x),\
        \Sigma_k\big).

    The same model as :class:`~pyro_mm.models.GaussianMoE` with ``diag(sigma_k^2)`` replaced by
    ``Sigma_k``, and what ``GaussianMoE(..., covariance="full")`` builds (a sibling class of
    ``GaussianMoE``, not a subclass: the expert parameters differ); its parameters are the Pyro
    params ``gate_weight`` ``(K-1, D_g)``,
    ``expert_weight`` ``(K, Q, D_e)`` and ``expert_covariance`` ``(K, Q, Q)`` (positive
    definite). Its MM/EM block (closed-form weighted least squares and a regularised covariance
    estimate) is :class:`~pyro_mm.surrogates.full_covariance_expert.FullCovarianceExpertSurrogate`.

    :param int num_experts: number of experts ``K``.
    :param int in_features: number of input columns ``P``.
    :param int out_features: number of outputs ``Q``.
    :param gate_degree: polynomial degree of the gate (or a feature map).
    :param expert_degree: polynomial degree of the expert means (or a feature map).
    :param int seed: seed of the random initial expert weights.
    :param priors: priors on the parameters for SVI (see :class:`~pyro_mm.models.GaussianMoE`).
    :param gate: ``None`` (softmax) or a gate of :mod:`pyro_mm.models.gates`.
    """

    #: the covariance of each expert's noise (``GaussianMoE``'s is ``"diagonal"``).
    covariance = "full"

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int = 1,
        gate_degree=1,
        expert_degree=1,
        seed: int = 0,
        priors=None,
        *,
        gate=None,
    ):
        super().__init__(num_experts, in_features, gate_degree, expert_degree, gate)
        GaussianMoE._init_expert_weight(self, out_features, seed)
        eye = torch.eye(self.out_features).expand(self.num_experts, -1, -1).clone()
        self.expert_covariance = PyroParam(eye, constraint=constraints.positive_definite)
        self.set_priors(priors)

    # Outputs, the regression function and its features are those of the diagonal model.
    check_y = GaussianMoE.check_y
    predict = GaussianMoE.predict
    extra_repr = GaussianMoE.extra_repr

    def get_expert_params(self) -> FullCovarianceExpertParams:
        return FullCovarianceExpertParams(
            weight=self.expert_weight.detach().clone(),
            covariance=self.expert_covariance.detach().clone(),
        )

    def set_expert_params(self, expert_params: FullCovarianceExpertParams) -> None:
        self._write_param("expert_weight", expert_params.weight)
        self._write_param("expert_covariance", expert_params.covariance)

    def expert_log_prob(self, expert_params, expert_features, y):
        return full_covariance_expert_log_prob(expert_params, expert_features, y)

    def sample(self, x, params: MoEParams = None, generator: torch.Generator = None):
        """Draws ``y ~ p(y | x)`` once per row; returns ``(y, z)`` with ``z`` the expert index.

        :param torch.Generator generator: source of randomness (reproducible draws).
        """
        x = self.check_x(x)
        params = self._params_or_current(params)
        u, r = self.features(x)
        gate = torch.softmax(self.gate.logits(params.gate, u), dim=-1)
        z = torch.multinomial(gate, 1, generator=generator).squeeze(-1)
        rows = torch.arange(x.shape[0])
        means = gaussian_expert_means(params.experts.weight, r)[rows, z]
        factor = torch.linalg.cholesky(params.experts.covariance)[z]
        noise = torch.randn(means.shape, generator=generator, dtype=x.dtype)
        return means + (factor @ noise.unsqueeze(-1)).squeeze(-1), z

    def observation_distribution(self, gate_features, expert_features):
        """``MixtureSameFamily(Categorical(g(x)), MVN(mu(x), Sigma))`` per row."""
        # The gate first: Pyro sites (and so guides and Laplace coordinates) follow access order.
        logits = self.gate_logits(gate_features)
        means = gaussian_expert_means(self.expert_weight, expert_features)
        covariance = self.expert_covariance.expand(
            means.shape[:-1] + self.expert_covariance.shape[-2:]
        )
        return dist.MixtureSameFamily(
            dist.Categorical(logits=logits),
            dist.MultivariateNormal(means, covariance_matrix=covariance),
        )
