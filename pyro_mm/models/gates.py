r"""The gate of a mixture of experts, chosen with ``gate=`` when a model is built.

A gate says which Pyro params hold its weights, how they form its parameters as plain data
(``MoEParams.gate``) and how those give the log-probabilities ``log g_k(x)``:

* :class:`SoftmaxGate` (the default): ``softmax(omega^T u)``; one param ``gate_weight``
  ``(K - 1, D_g)``, a tensor in ``MoEParams.gate``.
* :class:`TemperatureGate`: ``softmax(omega^T u / T)`` for a fixed temperature ``T``; the same
  param ``gate_weight``. With a linear router only ``omega / T`` is identified, so a fixed
  ``T`` rescales the weights without changing the model family (see
  :mod:`pyro_mm.models.gate_variants`).
* :class:`HierarchicalGate`: ``J`` groups of ``I`` experts, ``softmax_j(a^T u)
  softmax_{i|j}(b_j^T u)``; params ``gate_outer`` ``(J - 1, D_g)`` and ``gate_inner``
  ``(J, I - 1, D_g)``, a :class:`~pyro_mm.models.gate_variants.HierarchicalGateParams` in
  ``MoEParams.gate``.

Gates are immutable values (frozen dataclasses): equal options compare equal, and their
``repr`` is how a checkpoint records which gate it was made with.
"""

import dataclasses
import math

import torch

from .gate_variants import (
    HierarchicalGateParams,
    hierarchical_gate_log_probs,
    temperature_gate_log_probs,
)
from .gating import gate_log_probs, gate_logits

__all__ = ["Gate", "SoftmaxGate", "TemperatureGate", "HierarchicalGate", "check_gate"]


class Gate:
    """Base class of the gates: the parameter layout and the log-probabilities.

    Subclasses set :attr:`param_names` and implement the methods below; the model creates one
    Pyro param per name, zero-initialised with the shapes of :meth:`param_shapes`.
    """

    #: names of the model's Pyro params holding the gate, in the order of :meth:`leaves`.
    param_names = ()

    def check(self, num_experts: int) -> None:
        """Raises ``ValueError`` when the gate cannot serve ``num_experts`` experts."""

    def param_shapes(self, num_experts: int, num_features: int) -> tuple:
        """The shapes of the params named :attr:`param_names`."""
        raise NotImplementedError

    def from_leaves(self, leaves):
        """The gate's parameters (``MoEParams.gate``) from its param tensors, in order."""
        raise NotImplementedError

    def leaves(self, params) -> tuple:
        """The param tensors of the gate's parameters ``params``, in :attr:`param_names` order.

        :raises TypeError: when ``params`` are not this gate's kind of parameters.
        """
        raise NotImplementedError

    def logits(self, params, gate_features: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-probabilities ``(N, K)`` (logits of a ``Categorical``)."""
        return self.log_probs(params, gate_features)

    def log_probs(self, params, gate_features: torch.Tensor) -> torch.Tensor:
        """``log g_k(x)``, shape ``(N, K)``, normalised by log-sum-exp."""
        raise NotImplementedError


class _WeightMatrixGate(Gate):
    """A gate whose parameters are one ``(K - 1, D_g)`` weight matrix, the param
    ``gate_weight`` (the softmax and temperature gates)."""

    param_names = ("gate_weight",)

    def param_shapes(self, num_experts, num_features):
        return ((num_experts - 1, num_features),)

    def from_leaves(self, leaves):
        return leaves[0]

    def leaves(self, params):
        if not isinstance(params, torch.Tensor):
            raise TypeError(
                f"the parameters of {self!r} are a (K - 1, D_g) tensor, got {type(params).__name__}"
            )
        return (params,)


@dataclasses.dataclass(frozen=True)
class SoftmaxGate(_WeightMatrixGate):
    r"""The one-level softmax gate ``g_k(x) = softmax(omega^T u(x))_k``, reference expert ``K``
    (the models' default)."""

    def logits(self, params, gate_features):
        return gate_logits(params, gate_features)

    def log_probs(self, params, gate_features):
        return gate_log_probs(params, gate_features)


@dataclasses.dataclass(frozen=True)
class TemperatureGate(_WeightMatrixGate):
    r"""The temperature softmax gate ``g_k(x) = softmax(omega^T u(x) / T)_k``.

    ``T < 1`` sharpens the gate towards one expert (sparse), ``T > 1`` flattens it (dense).

    :param float temperature: ``T``, a finite number ``> 0``.
    :raises ValueError: for any other temperature.
    """

    temperature: float

    def __post_init__(self):
        value = self.temperature
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"temperature must be a number > 0, got {value!r}")
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
        object.__setattr__(self, "temperature", float(value))

    def logits(self, params, gate_features):
        return gate_logits(params / self.temperature, gate_features)

    def log_probs(self, params, gate_features):
        return temperature_gate_log_probs(params, gate_features, self.temperature)


@dataclasses.dataclass(frozen=True)
class HierarchicalGate(Gate):
    r"""The two-level softmax gate over ``J`` groups of ``I`` experts,
    ``g_{j,i}(x) = softmax_j(a_j^T u) softmax_i(b_{j,i}^T u)``; the experts are numbered group
    by group (expert ``j I + i`` is expert ``i`` of group ``j``).

    :param int num_groups: ``J >= 2``.
    :param int group_size: ``I >= 2`` experts per group (a model with this gate has
        ``num_experts = J * I``).
    :raises ValueError: for a ``num_groups`` or ``group_size`` below 2 (one group, or groups of
        one expert, is the one-level :class:`SoftmaxGate`).
    """

    num_groups: int
    group_size: int
    param_names = ("gate_outer", "gate_inner")

    def __post_init__(self):
        for name in ("num_groups", "group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(
                    f"{name} must be an integer >= 2, got {value!r} (one group, or groups of "
                    f"one expert, is the one-level SoftmaxGate)"
                )

    def check(self, num_experts):
        if num_experts != self.num_groups * self.group_size:
            raise ValueError(
                f"{self!r} gates num_groups * group_size = "
                f"{self.num_groups * self.group_size} experts, but num_experts={num_experts}"
            )

    def param_shapes(self, num_experts, num_features):
        self.check(num_experts)
        return (
            (self.num_groups - 1, num_features),
            (self.num_groups, self.group_size - 1, num_features),
        )

    def from_leaves(self, leaves):
        return HierarchicalGateParams(outer=leaves[0], inner=leaves[1])

    def leaves(self, params):
        if not isinstance(params, HierarchicalGateParams):
            raise TypeError(
                f"the parameters of {self!r} are a HierarchicalGateParams, got "
                f"{type(params).__name__}"
            )
        return (params.outer, params.inner)

    def log_probs(self, params, gate_features):
        return hierarchical_gate_log_probs(params, gate_features)


def check_gate(gate, num_experts: int) -> Gate:
    """``gate`` validated for ``num_experts`` experts (``None``: a :class:`SoftmaxGate`).

    :raises TypeError: when ``gate`` is not a :class:`Gate`.
    :raises ValueError: when it cannot serve ``num_experts`` experts.
    """
    if gate is None:
        return SoftmaxGate()
    if not isinstance(gate, Gate):
        raise TypeError(
            f"gate must be a pyro_mm gate (SoftmaxGate(), TemperatureGate(temperature=...), "
            f"HierarchicalGate(num_groups=..., group_size=...)) or None, got {gate!r}"
        )
    gate.check(num_experts)
    return gate
