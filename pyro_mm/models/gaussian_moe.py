"""Softmax-gated Gaussian mixture of experts (the paper's Section 4.1)."""

import math

import pyro.distributions as dist
import torch
from pyro.nn import PyroParam
from torch.distributions import constraints

from ..validation import as_tensor, check_finite
from .base import MixtureOfExperts
from .gates import SoftmaxGate
from .params import GaussianExpertParams, MoEParams

__all__ = ["COVARIANCES", "GaussianMoE", "gaussian_expert_means", "gaussian_expert_log_prob"]

_LOG_2PI = math.log(2 * math.pi)
# Integer or boolean outputs given to a Gaussian family are most often class labels.
_LABELS_HINT = (
    "; Gaussian experts model real outputs: for class labels use "
    "MultinomialMoE(num_experts, in_features, num_classes), and cast whole-number real outputs "
    "to float"
)

#: Accepted values of ``GaussianMoE(..., covariance=)``.
COVARIANCES = ("diagonal", "full")


def gaussian_expert_means(weight: torch.Tensor, expert_features: torch.Tensor) -> torch.Tensor:
    """Expert means ``mu_k(x) = Upsilon_k r(x)``, shape ``(N, K, Q)``."""
    num_experts, out_features, num_features = weight.shape
    flat = expert_features @ weight.reshape(num_experts * out_features, num_features).T
    return flat.reshape(-1, num_experts, out_features)


def gaussian_expert_log_prob(
    params: GaussianExpertParams, expert_features: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """``log N(y; mu_k(x), diag sigma_k^2)`` for every expert, shape ``(N, K)``.

    Computed expert-major, ``(K, Q, N)``, and returned as the transpose of a ``(K, N)``
    tensor, so that the E-step's log-sum-exp over experts runs along contiguous rows.
    """
    num_experts, out_features, num_features = params.weight.shape
    variance = params.variance
    means = params.weight.reshape(num_experts * out_features, num_features) @ expert_features.T
    residual = y.T - means.reshape(num_experts, out_features, -1)
    scaled = (residual.square_() * (-0.5 / variance).unsqueeze(-1)).sum(-2)
    normaliser = -0.5 * (_LOG_2PI + variance.log()).sum(-1)
    return (scaled + normaliser.unsqueeze(-1)).T


class GaussianMoE(MixtureOfExperts):
    r"""Softmax-gated mixture of Gaussian regression experts with diagonal (default) or full
    output covariance.

    .. math:: p(y \mid x) = \sum_{k=1}^K g_k(x)\,
        \mathcal{N}\big(y;\ \Upsilon_k r(x),\ \mathrm{diag}(\sigma^2_{k,1..Q})\big)

    where ``u(x)`` and ``r(x)`` are polynomial features (one intercept) of degrees
    ``gate_degree`` and ``expert_degree``, and expert ``K`` is the gate's reference.

    ``forward(x, y=None)`` is a Pyro model with a single observed site ``"y"`` whose
    distribution is a :class:`~pyro.distributions.MixtureSameFamily`, so ``SVI``,
    ``Predictive`` and ``poutine`` handlers work on it. The parameters are Pyro params of the
    module: ``gate_weight`` ``(K-1, D_g)``, ``expert_weight`` ``(K, Q, D_e)`` and
    ``expert_variance`` ``(K, Q)`` (positive).

    ``GaussianMoE(..., covariance="full")`` builds the model with a full ``Q x Q`` covariance
    ``Sigma_k`` per expert instead (correlated outputs): an instance of
    :class:`~pyro_mm.models.FullCovarianceGaussianMoE` (parameter ``expert_covariance``
    ``(K, Q, Q)`` in place of ``expert_variance``), which every inference class fits with its
    full-covariance MM/EM block. It is a sibling class, not a subclass: its parameters are not
    those of the diagonal model, so code that needs the diagonal model's ``expert_variance``
    (e.g. ``init="spectral"``) refuses it by its type.

    :param int num_experts: number of experts ``K``.
    :param int in_features: number of input columns ``P``.
    :param int out_features: number of outputs ``Q``.
    :param gate_degree: polynomial degree ``D_W`` of the gate (or a feature map).
    :param expert_degree: polynomial degree ``D_V`` of the expert means (or a feature map).
    :param int seed: seed of the random initial expert weights (used by SVI-style fitting;
        the MM and EM initialisers replace them).
    :param priors: ``None`` (the parameters are Pyro params: SVI with an empty guide is maximum
        likelihood), a :class:`~pyro_mm.models.priors.MoEPriors` or a dict
        ``{parameter name: distribution}``: those parameters become latent sample sites of the
        Pyro model, for SVI with an autoguide (see :meth:`set_priors`).
    :param str covariance: ``"diagonal"`` (default: ``diag(sigma_k^2)``, this class) or
        ``"full"`` (``Sigma_k``: a :class:`~pyro_mm.models.FullCovarianceGaussianMoE`).
    :param gate: ``None`` (the softmax gate above) or a gate of :mod:`pyro_mm.models.gates`,
        e.g. ``TemperatureGate(temperature=0.5)`` or ``HierarchicalGate(num_groups=2,
        group_size=3)`` (then ``num_experts`` must be 6); every inference class fits it
        through its gate block (:func:`~pyro_mm.surrogates.registry.gate_surrogate_for`).
    :raises ValueError: for a ``covariance`` other than those of :data:`COVARIANCES`, or a
        gate that does not fit ``num_experts``.
    """

    #: the covariance of each expert's noise: ``"diagonal"`` here, ``"full"`` for
    #: :class:`~pyro_mm.models.FullCovarianceGaussianMoE`.
    covariance = "diagonal"

    def __new__(cls, *args, covariance: str = "diagonal", **kwargs):
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        if covariance == "full" and cls is GaussianMoE:
            from .full_covariance_gaussian_moe import FullCovarianceGaussianMoE

            # Not an instance of cls, so Python does not run GaussianMoE.__init__ on it.
            return FullCovarianceGaussianMoE(*args, **kwargs)
        return super().__new__(cls)

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
        covariance: str = "diagonal",
        gate=None,
    ):
        if covariance != self.covariance:
            raise ValueError(
                f"{type(self).__name__} has {self.covariance} covariances, got "
                f"covariance={covariance!r}; use GaussianMoE(..., covariance={covariance!r})"
            )
        super().__init__(num_experts, in_features, gate_degree, expert_degree, gate)
        self._init_expert_weight(out_features, seed)
        self.expert_variance = PyroParam(
            torch.ones(self.num_experts, self.out_features), constraint=constraints.positive
        )
        self.set_priors(priors)

    def extra_repr(self) -> str:
        # The default gate is left out, as keyword defaults are.
        gate = "" if self.gate == SoftmaxGate() else f", gate={self.gate!r}"
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, "
            f"out_features={self.out_features}, covariance={self.covariance!r}{gate}"
        )

    def _init_expert_weight(self, out_features: int, seed: int) -> None:
        """Validates ``out_features`` and draws the ``(K, Q, D_e)`` expert weights from ``seed``."""
        if isinstance(out_features, bool) or int(out_features) != out_features or out_features < 1:
            raise ValueError(f"out_features must be a positive integer, got {out_features!r}")
        self.out_features = int(out_features)
        generator = torch.Generator().manual_seed(seed)
        shape = (self.num_experts, self.out_features, self.expert_features.num_features)
        self.expert_weight = PyroParam(torch.randn(shape, generator=generator))

    def check_y(self, y, num_rows: int, finite: bool = True) -> torch.Tensor:
        """Validates ``y``: floating, finite (unless ``finite=False``), shape ``(N, Q)`` (or
        ``(N,)`` when ``Q = 1``)."""
        y = as_tensor("y", y, self.dtype, integer_hint=_LABELS_HINT)
        if y.dim() == 1 and self.out_features == 1:
            y = y.unsqueeze(-1)
        if y.dim() != 2 or y.shape[1] != self.out_features:
            raise ValueError(
                f"y must have shape (N, {self.out_features}) for out_features="
                f"{self.out_features}, got {tuple(y.shape)}"
            )
        if y.shape[0] != num_rows:
            raise ValueError(f"x has {num_rows} rows but y has {y.shape[0]}")
        if finite:
            check_finite("y", y)
        return y

    def get_expert_params(self) -> GaussianExpertParams:
        return GaussianExpertParams(
            weight=self.expert_weight.detach().clone(),
            variance=self.expert_variance.detach().clone(),
        )

    def set_expert_params(self, expert_params: GaussianExpertParams) -> None:
        self._write_param("expert_weight", expert_params.weight)
        self._write_param("expert_variance", expert_params.variance)

    def expert_log_prob(self, expert_params, expert_features, y):
        return gaussian_expert_log_prob(expert_params, expert_features, y)

    def predict(self, x, params: MoEParams = None) -> torch.Tensor:
        r"""The regression function ``E[y | x] = sum_k g_k(x) mu_k(x)`` (paper eq. 14),
        ``(N, Q)``."""
        x = self.check_x(x)
        params = self._params_or_current(params)
        u, r = self.features(x)
        gate = torch.softmax(self.gate.logits(params.gate, u), dim=-1)
        return (gate.unsqueeze(-1) * gaussian_expert_means(params.experts.weight, r)).sum(-2)

    def sample(self, x, params: MoEParams = None, generator: torch.Generator = None):
        """Draws ``y ~ p(y | x)`` once per row; returns ``(y, z)`` with ``z`` the expert index.

        :param torch.Generator generator: source of randomness (reproducible draws).
        """
        x = self.check_x(x)
        params = self._params_or_current(params)
        u, r = self.features(x)
        gate = torch.softmax(self.gate.logits(params.gate, u), dim=-1)
        z = torch.multinomial(gate, 1, generator=generator).squeeze(-1)
        means = gaussian_expert_means(params.experts.weight, r)
        rows = torch.arange(x.shape[0])
        noise = torch.randn(means[rows, z].shape, generator=generator, dtype=x.dtype)
        return means[rows, z] + params.experts.variance[z].sqrt() * noise, z

    def observation_distribution(self, gate_features, expert_features):
        """``MixtureSameFamily(Categorical(g(x)), Normal(mu(x), sigma))`` per row."""
        # The gate first: Pyro sites (and so guides and Laplace coordinates) follow access order.
        logits = self.gate_logits(gate_features)
        means = gaussian_expert_means(self.expert_weight, expert_features)
        scale = self.expert_variance.sqrt().expand(means.shape)
        return dist.MixtureSameFamily(
            dist.Categorical(logits=logits), dist.Normal(means, scale).to_event(1)
        )
