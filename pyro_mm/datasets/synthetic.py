"""Seeded synthetic data from softmax-gated mixtures of experts (Gaussian and multinomial).

Every generator here is written down exactly (the papers under-specify theirs), draws all its
randomness from one ``torch.Generator`` seeded by ``seed``, and returns the true parameters.
"""

import torch

from ..models.gaussian_moe import GaussianMoE
from ..models.multinomial_moe import MultinomialMoE
from ..models.params import GaussianExpertParams, MoEParams, MultinomialExpertParams
from ..validation import non_negative_number, positive_integer, positive_number

__all__ = [
    "gaussian_moe_truth",
    "sample_gaussian_moe",
    "gaussian_moe_stream",
    "multinomial_moe_truth",
    "sample_multinomial_moe",
    "multinomial_moe_stream",
]


def gaussian_moe_truth(
    num_experts: int = 2,
    in_features: int = 10,
    out_features: int = 1,
    *,
    gate_norm: float = 3.0,
    noise_std: float = 0.5,
    seed: int = 0,
) -> MoEParams:
    r"""True parameters of a linear (degree 1) Gaussian MoE, drawn as follows:

    * gate: for each non-reference expert ``k < K``, intercept ``0`` and slope
      ``gate_norm * a_k / ||a_k||`` with ``a_k ~ N(0, I_P)``;
    * experts: every coefficient (intercept and slopes) ``~ N(0, 1)``;
    * variances: ``noise_std ** 2`` for every expert and output.

    With ``x ~ N(0, I_P)`` (see :func:`sample_gaussian_moe`) the gate's logits have standard
    deviation ``gate_norm``, so both experts are active and well separated.

    :raises ValueError: for sizes that are not positive integers, a negative or non-finite
        ``gate_norm`` or a ``noise_std`` that is not positive.
    """
    num_experts, in_features = _truth_sizes(num_experts, in_features, gate_norm)
    out_features = positive_integer("out_features", out_features)
    positive_number("noise_std", noise_std)
    generator = torch.Generator().manual_seed(seed)
    slopes = torch.randn(num_experts - 1, in_features, generator=generator, dtype=torch.float64)
    slopes = gate_norm * slopes / slopes.norm(dim=-1, keepdim=True)
    gate = torch.cat([torch.zeros(num_experts - 1, 1, dtype=torch.float64), slopes], dim=-1)
    weight = torch.randn(
        num_experts, out_features, in_features + 1, generator=generator, dtype=torch.float64
    )
    variance = torch.full((num_experts, out_features), noise_std**2, dtype=torch.float64)
    return MoEParams(gate=gate, experts=GaussianExpertParams(weight=weight, variance=variance))


def sample_gaussian_moe(truth: MoEParams, num_samples: int, *, seed: int = 0, model=None):
    """Draws ``x ~ N(0, I_P)`` and ``y ~ p(y | x; truth)``.

    :param MoEParams truth: parameters of a linear Gaussian MoE (or of ``model``'s features).
    :param int num_samples: rows to draw.
    :param int seed: seed of the draws.
    :param GaussianMoE model: model whose features match ``truth`` (default: degree 1).
    :returns: ``(x, y)`` float64 tensors of shapes ``(N, P)`` and ``(N, Q)``.
    """
    num_experts, out_features, _ = truth.experts.weight.shape
    if model is None:
        in_features = truth.gate.shape[1] - 1
        model = GaussianMoE(num_experts, in_features, out_features).double()
    return _draw(model, truth, num_samples, seed)


def gaussian_moe_stream(
    truth: MoEParams, batch_size: int, num_batches: int = None, *, seed: int = 0
):
    """An endless (or ``num_batches``-long) stream of ``(x, y)`` batches drawn from ``truth``.

    Batch ``i`` uses seed ``seed * 1_000_003 + i``, so a stream can be replayed exactly.
    """
    return _replayable_stream(sample_gaussian_moe, truth, batch_size, num_batches, seed)


def multinomial_moe_truth(
    num_experts: int = 2,
    in_features: int = 2,
    num_classes: int = 3,
    *,
    gate_norm: float = 3.0,
    expert_scale: float = 2.0,
    seed: int = 0,
) -> MoEParams:
    r"""True parameters of a linear (degree 1) multinomial-logistic MoE, drawn as follows:

    * gate: as in :func:`gaussian_moe_truth`, for each non-reference expert ``k < K``,
      intercept ``0`` and slope ``gate_norm * a_k / ||a_k||`` with ``a_k ~ N(0, I_P)``;
    * experts: every coefficient (intercept and slopes) of the ``M - 1`` free classes
      ``~ N(0, expert_scale^2)``; class ``M`` is each expert's reference (zero weights).

    The gate draws come first from the generator, then the expert weights in
    ``(K, M - 1, P + 1)`` row-major order.

    :raises ValueError: for sizes that are not positive integers, fewer than 2 classes, or a
        negative or non-finite ``gate_norm`` or ``expert_scale``.
    """
    num_experts, in_features = _truth_sizes(num_experts, in_features, gate_norm)
    if positive_integer("num_classes", num_classes) < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes!r}")
    non_negative_number("expert_scale", expert_scale)
    generator = torch.Generator().manual_seed(seed)
    slopes = torch.randn(num_experts - 1, in_features, generator=generator, dtype=torch.float64)
    slopes = gate_norm * slopes / slopes.norm(dim=-1, keepdim=True)
    gate = torch.cat([torch.zeros(num_experts - 1, 1, dtype=torch.float64), slopes], dim=-1)
    weight = expert_scale * torch.randn(
        num_experts, num_classes - 1, in_features + 1, generator=generator, dtype=torch.float64
    )
    return MoEParams(gate=gate, experts=MultinomialExpertParams(weight=weight))


def sample_multinomial_moe(truth: MoEParams, num_samples: int, *, seed: int = 0, model=None):
    """Draws ``x ~ N(0, I_P)``, then per row an expert ``z ~ g(x)`` and a label
    ``y ~ e_z(. | x)`` (see :meth:`MultinomialMoE.sample`), all from one generator.

    :param MoEParams truth: parameters of a linear multinomial MoE (or of ``model``'s features).
    :param int num_samples: rows to draw.
    :param int seed: seed of the draws.
    :param MultinomialMoE model: model whose features match ``truth`` (default: degree 1).
    :returns: ``(x, y)``: float64 inputs ``(N, P)`` and int64 labels ``(N,)``.
    """
    num_experts, num_free, _ = truth.experts.weight.shape
    if model is None:
        in_features = truth.gate.shape[1] - 1
        model = MultinomialMoE(num_experts, in_features, num_free + 1).double()
    return _draw(model, truth, num_samples, seed)


def multinomial_moe_stream(
    truth: MoEParams, batch_size: int, num_batches: int = None, *, seed: int = 0
):
    """An endless (or ``num_batches``-long) stream of ``(x, y)`` batches drawn from ``truth``.

    Batch ``i`` uses seed ``seed * 1_000_003 + i``, so a stream can be replayed exactly.
    """
    return _replayable_stream(sample_multinomial_moe, truth, batch_size, num_batches, seed)


def _truth_sizes(num_experts, in_features, gate_norm) -> tuple:
    """The validated ``(num_experts, in_features)`` of a synthetic truth (``gate_norm`` checked
    too)."""
    non_negative_number("gate_norm", gate_norm)
    num_experts = positive_integer("num_experts", num_experts)
    return num_experts, positive_integer("in_features", in_features)


def _draw(model, truth: MoEParams, num_samples: int, seed: int):
    """``x ~ N(0, I_P)`` then ``y ~ p(y | x; truth)`` from one generator seeded by ``seed``."""
    num_samples = positive_integer("num_samples", num_samples)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, model.in_features, generator=generator, dtype=torch.float64)
    y, _ = model.sample(x, truth, generator=generator)
    return x, y


def _replayable_stream(sampler, truth: MoEParams, batch_size: int, num_batches, seed: int):
    """Batch ``i`` is ``sampler(truth, batch_size, seed=seed * 1_000_003 + i)`` (the sizes are
    checked at once, not at the first batch)."""
    positive_integer("batch_size", batch_size)
    if num_batches is not None:
        positive_integer("num_batches", num_batches)
    return _batches(sampler, truth, batch_size, num_batches, seed)


def _batches(sampler, truth: MoEParams, batch_size: int, num_batches, seed: int):
    index = 0
    while num_batches is None or index < num_batches:
        yield sampler(truth, batch_size, seed=seed * 1_000_003 + index)
        index += 1
