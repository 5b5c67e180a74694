"""Softmax-gated mixture of multinomial-logistic classification experts (the paper's
Section 4.2)."""

import pyro.distributions as dist
import torch
from pyro.nn import PyroParam

from ..validation import as_tensor, class_labels
from .base import MixtureOfExperts
from .params import MoEParams, MultinomialExpertParams

__all__ = [
    "MultinomialMoE",
    "multinomial_expert_logits",
    "multinomial_expert_log_prob",
    "mixture_class_log_probs",
]


def multinomial_expert_logits(weight: torch.Tensor, expert_features: torch.Tensor) -> torch.Tensor:
    """Class logits of every expert, shape ``(N, K, M)``; the last class (reference) is zero.

    :param torch.Tensor weight: ``(K, M - 1, D_e)`` expert coefficients.
    :param torch.Tensor expert_features: ``(N, D_e)`` regressors ``r(x)``.
    """
    num_experts, num_free, num_features = weight.shape
    flat = expert_features @ weight.reshape(num_experts * num_free, num_features).T
    return torch.nn.functional.pad(flat.reshape(-1, num_experts, num_free), (0, 1))


def multinomial_expert_log_prob(
    params: MultinomialExpertParams, expert_features: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """``log e_k(y | x)`` for every expert, shape ``(N, K)``, by log-softmax.

    :param torch.Tensor y: ``(N,)`` integer labels in ``{0, ..., M - 1}``.
    """
    log_probs = torch.log_softmax(multinomial_expert_logits(params.weight, expert_features), -1)
    index = y.reshape(-1, 1, 1).expand(-1, log_probs.shape[1], 1)
    return log_probs.gather(-1, index).squeeze(-1)


def mixture_class_log_probs(
    log_gate: torch.Tensor, expert_weight: torch.Tensor, expert_features: torch.Tensor
) -> torch.Tensor:
    r"""``log p(y = m | x) = log sum_k g_k(x) e_k(m | x)`` for every class, shape ``(N, M)``;
    never above zero (round-off is clamped), so that ``exp`` gives probabilities in ``[0, 1]``.

    :param torch.Tensor log_gate: ``(N, K)`` gate log-probabilities ``log g_k(x)`` (of any gate).
    """
    log_experts = torch.log_softmax(multinomial_expert_logits(expert_weight, expert_features), -1)
    log_probs = torch.logsumexp(log_gate.unsqueeze(-1) + log_experts, dim=-2)
    # A mixture of probabilities is at most one, but the log-sum-exp of terms whose
    # probabilities sum to one rounds to a few ulps above zero in some rows (predict then gave
    # 1.0000000000000002, which probability consumers such as sklearn's log_loss reject).
    return log_probs.clamp_max(0.0)


class MultinomialMoE(MixtureOfExperts):
    r"""Softmax-gated mixture of multinomial-logistic (softmax regression) experts.

    .. math:: p(y = m \mid x) = \sum_{k=1}^K g_k(x)\,
        \frac{\exp(v_{m,k}^\top r(x))}{\sum_{l=1}^M \exp(v_{l,k}^\top r(x))},
        \qquad v_{M,k} = 0,

    for labels ``y in {0, ..., M - 1}`` (the paper's classes ``1..M``; the last class is every
    expert's reference), where ``u(x)`` and ``r(x)`` are polynomial features (one intercept) of
    degrees ``gate_degree`` and ``expert_degree``, and expert ``K`` is the gate's reference.

    ``forward(x, y=None)`` is a Pyro model with a single observed site ``"y"``: a
    :class:`~pyro.distributions.Categorical` whose log-probabilities are the mixture's
    ``log sum_k g_k e_k`` (computed by log-sum-exp), the exact marginal of the expert label, so
    ``SVI``, ``Predictive`` and ``poutine`` handlers work on it. The parameters are Pyro params
    of the module: ``gate_weight`` ``(K-1, D_g)`` and ``expert_weight`` ``(K, M-1, D_e)``.

    :param int num_experts: number of experts ``K``.
    :param int in_features: number of input columns ``P``.
    :param int num_classes: number of classes ``M >= 2``.
    :param gate_degree: polynomial degree ``D_W`` of the gate (or a feature map).
    :param expert_degree: polynomial degree ``D_V`` of the expert logits (or a feature map).
    :param int seed: seed of the random initial expert weights.
    :param float init_scale: standard deviation of the initial expert weights. They are small
        and random: random so that gradient-based fitting is not stuck at the symmetric point
        where all experts are equal, small so that the first MM solve starts near the uniform
        classifier (the MM and EM initialisers replace them).
    :param priors: ``None`` (the parameters are Pyro params: SVI with an empty guide is maximum
        likelihood), a :class:`~pyro_mm.models.priors.MoEPriors` or a dict
        ``{parameter name: distribution}``: those parameters become latent sample sites of the
        Pyro model, for SVI with an autoguide (see :meth:`set_priors`).
    :param gate: ``None`` (the softmax gate) or a gate of :mod:`pyro_mm.models.gates`.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        num_classes: int,
        gate_degree=1,
        expert_degree=1,
        seed: int = 0,
        init_scale: float = 0.1,
        priors=None,
        *,
        gate=None,
    ):
        super().__init__(num_experts, in_features, gate_degree, expert_degree, gate)
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.num_classes = int(num_classes)
        generator = torch.Generator().manual_seed(seed)
        shape = (self.num_experts, self.num_classes - 1, self.expert_features.num_features)
        self.expert_weight = PyroParam(init_scale * torch.randn(shape, generator=generator))
        self.set_priors(priors)

    def check_y(self, y, num_rows: int, finite: bool = True) -> torch.Tensor:
        """Validates class labels: shape ``(N,)``, whole numbers in ``{0, ..., M - 1}``.

        Floating labels are accepted when they are whole numbers (e.g. labels read from a CSV);
        they are always checked for finiteness (``finite`` is ignored: a label must be a whole
        number before anything else).

        :returns: the labels as an ``int64`` tensor.
        """
        y = as_tensor("y", y, allow_integer=True)
        if y.dim() != 1:
            raise ValueError(
                f"y must be a 1-D tensor of N class labels, got shape {tuple(y.shape)}"
            )
        if y.shape[0] != num_rows:
            raise ValueError(f"x has {num_rows} rows but y has {y.shape[0]}")
        return class_labels("y", y, self.num_classes)

    def clustering_view(self, y: torch.Tensor) -> torch.Tensor:
        """One-hot labels ``(N, M)``, so that K-means clusters ``(x, y)`` with real columns."""
        return torch.nn.functional.one_hot(y, self.num_classes).to(self.dtype)

    @property
    def real_output_columns(self) -> int:
        """``0``: the outputs are class labels."""
        return 0

    def get_expert_params(self) -> MultinomialExpertParams:
        return MultinomialExpertParams(weight=self.expert_weight.detach().clone())

    def set_expert_params(self, expert_params: MultinomialExpertParams) -> None:
        self._write_param("expert_weight", expert_params.weight)

    def expert_log_prob(self, expert_params, expert_features, y):
        return multinomial_expert_log_prob(expert_params, expert_features, y)

    def predict(self, x, params: MoEParams = None) -> torch.Tensor:
        """Class probabilities ``p(y = m | x) = sum_k g_k(x) e_k(m | x)``, shape ``(N, M)``."""
        x = self.check_x(x)
        params = self._params_or_current(params)
        u, r = self.features(x)
        log_gate = self.gate_log_probs(params.gate, u)
        return mixture_class_log_probs(log_gate, params.experts.weight, r).exp()

    def sample(self, x, params: MoEParams = None, generator: torch.Generator = None):
        """Draws ``y ~ p(y | x)`` once per row; returns ``(y, z)`` with ``z`` the expert index.

        :param torch.Generator generator: source of randomness (reproducible draws).
        :returns: ``(y, z)``, both ``int64`` of shape ``(N,)``.
        """
        x = self.check_x(x)
        params = self._params_or_current(params)
        u, r = self.features(x)
        gate = self.gate_log_probs(params.gate, u).exp()
        z = torch.multinomial(gate, 1, generator=generator).squeeze(-1)
        logits = multinomial_expert_logits(params.experts.weight, r)
        class_probs = torch.softmax(logits[torch.arange(x.shape[0]), z], -1)
        y = torch.multinomial(class_probs, 1, generator=generator).squeeze(-1)
        return y, z

    def observation_distribution(self, gate_features, expert_features):
        """``Categorical(sum_k g_k(x) e_k(. | x))`` per row, mixed in log space."""
        return dist.Categorical(
            logits=mixture_class_log_probs(
                torch.log_softmax(self.gate_logits(gate_features), -1),
                self.expert_weight,
                expert_features,
            )
        )
