r"""Centred regressors for the incremental MM iteration.

Incremental MM carries running averages of the regressors' weighted second moments
(``avg tau_k r r^T``, the gate's ``avg u u^T``) and of their products with past iterates, and
solves linear systems in them at every step. An input far from zero relative to its spread (a
year, a temperature in kelvin, a timestamp) makes these matrices ill-conditioned, and the
recursion then loses accuracy that the batch methods, which re-evaluate everything at each
iteration, do not. One pass over 20,000 rows of a 2-expert model (batch 256) ended 5e-4 nats
per sample worse at ``x + 100``, 5e-3 at ``x + 300`` and 0.05 at ``x + 1000`` than on the same
rows centred (condition numbers of the gate's Gram matrix 4e8, 3e10 and 4e12; the
ill-conditioning warning starts at 4.5e13), while EM lost nothing.

The iteration is equivariant under a change of regressors ``r -> r - m`` that leaves the column
of ones alone (``m`` zero there): the coefficients ``w`` of ``r`` become ``w'`` of ``r - m`` with
``w'_0 = w_0 + w . m`` (the intercept absorbs the shift; logits and means are unchanged), and
every statistic and solve transforms accordingly. So IncrementalMM and FiniteSumMM run on
the regressors centred on the first batch's means and carry their iterate in those
coordinates, as do EM and mirror-descent EM (whose exact solves suffer the same way, only at
larger offsets: :mod:`~pyro_mm.infer.em_like`), and the K-means start solves on them; the
model always holds its own coordinates. In exact arithmetic the fit is the
same where no penalty acts on an intercept: the experts' conjugate ridge and
:class:`~pyro_mm.surrogates.penalties.CoefficientPenalty` leave it alone by default, and the
gate bound's ``eps * I`` term is a curvature term of the majoriser, not of the objective (with
``gate_eps = 0`` the centred iterates are the paper's, ``tests/test_incremental_mm.py``). Where
a penalty does act on an intercept (the multinomial experts' ridge), centring would move it, so
:func:`centring_is_exact` says no and ``IncrementalMM(centre_regressors="auto")`` does not
centre; nor where no regressor's mean exceeds its standard deviation (standardised inputs), as
centring buys no accuracy there (:func:`centring_from_moments`). A feature map without a
column of ones (a :class:`~pyro_mm.models.features.CallableFeatures` without
``intercept_column``) is not centred: nothing could absorb the shift.

Real outputs are centred with the regressors, on the first batch's means ``c``: ``y -> y - c``
is absorbed by the experts' intercepts (``v'_0 = v_0 + v . m - c``; variances and covariances
do not change), and it removes the cancellation in the variance statistics
``avg tau (y - v . r)^2`` (formed from ``avg tau y^2``, ``avg tau y r`` and ``avg tau r r^T``) that
outputs far from zero cause: over 20,000 rows of a 2-expert model with outputs of unit spread,
EM from the same start ended at a mean NLL of 0.8840 (not 0.8784) at ``y + 10^7`` and 349,350 at
``y + 10^8``, one pass of IncrementalMM at 1.787 (not 0.886) at ``y + 10^8`` and 129,959 at
``y + 10^9``; centred, the unshifted fit (``tests/test_em.py`` checks EM, mirror-descent EM
and IncrementalMM at ``y + 10^8``). Class labels are not centred.
"""

import dataclasses

import torch

from ..models.params import MoEParams, tree_map
from .state import check_tree_shapes, load_tree_state

__all__ = [
    "FeatureCentring",
    "centres_regressors",
    "check_centre_regressors",
    "RegressorMoments",
    "centring_is_exact",
    "centring_from_moments",
    "load_centring",
    "regressor_moments",
    "zero_centring",
]


def check_centre_regressors(value):
    """Returns the fitting classes' option ``centre_regressors`` when it is ``"auto"``, ``True``
    or ``False``, else raises."""
    if not (isinstance(value, bool) or value == "auto"):
        raise ValueError(f"centre_regressors must be 'auto', True or False, got {value!r}")
    return value


def centres_regressors(centre_regressors, exact: bool) -> bool:
    """Whether a fit with the option ``centre_regressors`` may run centred: always for
    ``True``, never for ``False``, and for ``"auto"`` where centring leaves its objective
    unchanged (``exact``, see :func:`centring_is_exact`); ``"auto"`` then centres only if the
    first batch has an input far from zero (:func:`centring_from_moments`)."""
    return centre_regressors is True or (centre_regressors == "auto" and exact)


@dataclasses.dataclass
class FeatureCentring:
    """Means of the gate and expert regressors, zero at their column of ones, and of the real
    outputs.

    :ivar torch.Tensor gate: ``(D_g,)``.
    :ivar torch.Tensor experts: ``(D_e,)``.
    :ivar torch.Tensor outputs: ``(Q,)`` for real outputs (zeros when the experts' regressors
        have no column of ones), ``(0,)`` for class labels; ``None`` in a state saved before
        outputs were centred (read as zeros, see :func:`load_centring`).
    """

    gate: torch.Tensor
    experts: torch.Tensor
    outputs: torch.Tensor = None

    def features(self, gate_features: torch.Tensor, expert_features: torch.Tensor) -> tuple:
        """The centred ``(u(x) - m_u, r(x) - m_r)`` of ``(N, D)`` regressors (computed once when
        the two are the same tensor)."""
        centred_gate = gate_features - self.gate
        if expert_features is gate_features:
            return centred_gate, centred_gate
        return centred_gate, expert_features - self.experts

    def centred_outputs(self, y: torch.Tensor) -> torch.Tensor:
        """The centred ``y - c`` of real outputs ``(N, Q)``; class labels as they are."""
        return y if not self.outputs.numel() else y - self.outputs

    def centre_design_(self, design: torch.Tensor) -> torch.Tensor:
        """Centres the regressors and outputs of a feature-major ``(D_e + Q, N)`` design
        ``[r(x), y]^T`` in place and returns it."""
        centre = torch.cat([self.experts, self.outputs]) if self.outputs.numel() else self.experts
        design[: len(centre)].sub_(centre.unsqueeze(-1))
        return design

    def centred_params(self, params: MoEParams, model) -> MoEParams:
        """The model's ``params`` in centred coordinates (``w'_0 = w_0 + w . m``)."""
        return _moved(params, self, model, 1.0)

    def model_params(self, params: MoEParams, model) -> MoEParams:
        """Centred ``params`` back in the model's coordinates (``w_0 = w'_0 - w' . m``)."""
        return _moved(params, self, model, -1.0)


@dataclasses.dataclass
class RegressorMoments:
    """Column means and mean squares of a batch's gate and expert regressors (each ``(D,)``)
    and real outputs (``(Q,)``, ``(0,)`` for class labels): all a data-parallel fit needs to
    all-reduce to choose and build its centring."""

    gate_mean: torch.Tensor
    gate_square: torch.Tensor
    expert_mean: torch.Tensor
    expert_square: torch.Tensor
    output_mean: torch.Tensor
    output_square: torch.Tensor


def regressor_moments(model, x: torch.Tensor, y: torch.Tensor) -> RegressorMoments:
    """The :class:`RegressorMoments` of ``model``'s regressors and real outputs on a validated
    batch ``(x, y)``."""
    gate_features, expert_features = model.features(x)
    outputs = _real_outputs(y, gate_features.dtype)
    return RegressorMoments(
        gate_mean=gate_features.mean(0),
        gate_square=gate_features.square().mean(0),
        expert_mean=expert_features.mean(0),
        expert_square=expert_features.square().mean(0),
        output_mean=outputs.mean(0),
        output_square=outputs.square().mean(0),
    )


def centring_from_moments(moments: RegressorMoments, model, always: bool = False):
    """The centring on the moments' means, or ``None`` when no regressor's mean exceeds its
    standard deviation (unless ``always``): then the Gram matrices are about as well
    conditioned centred or not, and the iteration is spared the change of coordinates (12
    operations, ~40 us of a ~850 us step at K = 2, P = 10, batch 4096). Measured on the
    20,000-row example of the module docstring (inputs of unit spread): uncentred, one pass
    ended 4e-8 nats per sample worse at ``x + 1``, 1.3e-6 at ``x + 5``, 2.1e-5 at ``x + 20``."""
    absorbed = getattr(model.expert_features, "intercept_column", None) is not None
    centring = FeatureCentring(
        gate=_centre(moments.gate_mean, model.gate_features),
        experts=_centre(moments.expert_mean, model.expert_features),
        # Without an intercept in the experts nothing could absorb the outputs' shift.
        outputs=moments.output_mean if absorbed else torch.zeros_like(moments.output_mean),
    )
    if always:
        return centring
    offsets = [
        (centring.gate, moments.gate_square - moments.gate_mean.square()),
        (centring.experts, moments.expert_square - moments.expert_mean.square()),
        (centring.outputs, moments.output_square - moments.output_mean.square()),
    ]
    # mean^2 > variance, written without a square root (a constant column has variance 0).
    far = any(bool((centre.square() > variance).any()) for centre, variance in offsets)
    return centring if far else None


def centring_is_exact(model, expert_surrogate, gate_penalty=None, stability=None) -> bool:
    """Whether the centred iteration has the model's own objective and iteration.

    Not when a penalty acts on an intercept (the multinomial experts' ridge, a
    :class:`~pyro_mm.surrogates.penalties.CoefficientPenalty` whose ``intercept_column`` is not
    the regressors' column of ones): centring moves the intercepts, so the penalty would change.
    Nor with a :class:`~pyro_mm.infer.stability.StatisticsTruncation`, whose compact sets are
    sets of statistics, which centring changes.
    """
    if stability is not None:
        return False
    gate_column = getattr(model.gate_features, "intercept_column", None)
    expert_column = getattr(model.expert_features, "intercept_column", None)
    gate_penalised = (
        gate_column is not None
        and gate_penalty is not None
        and gate_penalty.active
        and gate_penalty.intercept_column != gate_column
    )
    experts_penalised = expert_column is not None and expert_surrogate.penalises_column(
        expert_column
    )
    return not (gate_penalised or experts_penalised)


def zero_centring(model, dtype: torch.dtype) -> FeatureCentring:
    """Zeros shaped as a centring of the model's regressors and outputs (what a stored one must
    match)."""
    return FeatureCentring(
        gate=torch.zeros(model.gate_features.num_features, dtype=dtype),
        experts=torch.zeros(model.expert_features.num_features, dtype=dtype),
        outputs=torch.zeros(model.real_output_columns, dtype=dtype),
    )


def load_centring(state, model, dtype: torch.dtype):
    """The centring stored in a fitting class's state (``None``: the iteration was not
    centred), checked against the model's shapes. A state saved before outputs were centred
    holds none for them: its iterate has them uncentred, i.e. centred on zero.

    :raises ValueError: for a centring of other shapes or dtype.
    """
    centring = load_tree_state(state)
    if centring is None:
        return None
    expected = zero_centring(model, dtype)
    if centring.outputs is None:
        centring.outputs = expected.outputs
    check_tree_shapes("centring", centring, expected)
    return centring


def _real_outputs(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Validated outputs as ``(N, Q)`` real columns; ``(N, 0)`` for class labels."""
    if not y.is_floating_point():
        return torch.zeros(y.shape[0], 0, dtype=dtype)
    return y if y.dim() == 2 else y.unsqueeze(-1)


def _centre(means: torch.Tensor, feature_map) -> torch.Tensor:
    """``means`` with zero at the feature map's column of ones (all zeros without one: nothing
    would absorb the shift)."""
    column = getattr(feature_map, "intercept_column", None)
    if column is None:
        return torch.zeros_like(means)
    centre = means.clone()
    centre[column] = 0.0
    return centre


def _moved(params: MoEParams, centring: FeatureCentring, model, sign: float) -> MoEParams:
    gate_column = getattr(model.gate_features, "intercept_column", None)
    expert_column = getattr(model.expert_features, "intercept_column", None)
    gate = tree_map(
        lambda weight: _shift_intercept(weight, centring.gate, gate_column, sign), params.gate
    )
    # Every gate leaf is a weight matrix over u; of the experts' leaves only the coefficients
    # are (variances and covariances do not depend on the regressors).
    weight = _shift_intercept(params.experts.weight, centring.experts, expert_column, sign)
    if expert_column is not None and centring.outputs.numel():
        # Real outputs' weights are (K, Q, D_e): each output's intercept absorbs its centre.
        weight.select(-1, expert_column).sub_(centring.outputs, alpha=sign)
    experts = dataclasses.replace(params.experts, weight=weight)
    return MoEParams(gate=gate, experts=experts)


def _shift_intercept(weight: torch.Tensor, centre: torch.Tensor, column, sign: float):
    """``weight`` ``(..., D)`` with ``sign * weight . centre`` added to its ``column``."""
    if column is None:
        return weight
    shifted = weight.clone()
    shifted.select(-1, column).add_(weight @ centre, alpha=sign)
    return shifted
