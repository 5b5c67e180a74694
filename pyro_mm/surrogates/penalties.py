r"""Penalties and priors that keep the MM argmin closed form (MAP inside MM).

* :class:`CoefficientPenalty`: lasso plus ridge on regression coefficients,
  ``alpha sum_j |b_j| + lambda/2 sum_j b_j^2``. The absolute value is majorised at the current
  ``b_n`` by the classical quadratic (Hunter & Li, 2005)

  .. math:: |b| \approx \sqrt{b^2 + \epsilon^2} \le \frac{b^2 + \epsilon^2}{2 a_n}
      + \frac{a_n}{2}, \qquad a_n = \sqrt{b_n^2 + \epsilon^2},

  equal at ``b = b_n``. The penalty then adds the diagonal ``alpha / a_n + lambda`` to the
  quadratic term of a surrogate block, and each update stays one linear solve. ``epsilon`` keeps
  the weights finite at ``b_n = 0``; the fixed points are the minimisers of the objective with
  ``|b|`` replaced by ``sqrt(b^2 + epsilon^2)`` (within ``alpha * epsilon`` per coefficient of
  the lasso). A coefficient that reaches zero stays there (its weight is ``alpha / epsilon``).
  A Gaussian prior ``N(0, s^2)`` on each coefficient of a model fitted to ``N`` samples is
  ``lambda = 1 / (N s^2)`` (a Laplace prior of scale ``s``: ``alpha = 1 / (N s)``): the MM
  objective is the *average* negative log-likelihood.
* :class:`InverseGammaPrior`: the conjugate prior of a Gaussian expert variance.
"""

import dataclasses

import torch

__all__ = ["CoefficientPenalty", "InverseGammaPrior"]


@dataclasses.dataclass(frozen=True)
class CoefficientPenalty:
    """Lasso and ridge penalty on coefficients whose last dimension indexes the features.

    :ivar float l1: lasso strength ``alpha >= 0`` (per sample of the average objective).
    :ivar float l2: ridge strength ``lambda >= 0``.
    :ivar int intercept_column: the feature that is the constant ``1`` (column 0 of
        :class:`~pyro_mm.models.features.PolynomialFeatures`); ``None`` penalises every column.
    :ivar float eps: smoothing ``epsilon > 0`` of ``|b|``.
    """

    l1: float = 0.0
    l2: float = 0.0
    intercept_column: int = 0
    eps: float = 1e-8

    def __post_init__(self):
        for name in ("l1", "l2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"CoefficientPenalty.{name} must be a number >= 0, got {value!r}")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"CoefficientPenalty.eps must be > 0, got {self.eps!r}")

    def mask(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``1`` for penalised columns, ``0`` for the intercept, broadcastable to the input."""
        mask = torch.ones(coefficients.shape[-1], dtype=coefficients.dtype)
        if self.intercept_column is not None:
            mask[self.intercept_column] = 0.0
        return mask.to(coefficients.device)

    def smoothed_abs(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``sqrt(b^2 + epsilon^2)`` element-wise."""
        return torch.sqrt(coefficients.square() + self.eps**2)

    def curvature(self, anchor: torch.Tensor) -> torch.Tensor:
        """Diagonal ``alpha / a_n + lambda`` of the majoriser's quadratic, shaped like ``anchor``
        (``0`` at the intercept): the majoriser is ``1/2 sum_j curvature_j b_j^2 + const``."""
        return (self.l1 / self.smoothed_abs(anchor) + self.l2) * self.mask(anchor)

    def value(self, coefficients: torch.Tensor) -> torch.Tensor:
        """The penalty ``alpha sum sqrt(b^2 + eps^2) + lambda/2 sum b^2`` over the penalised
        columns, per leading index: shape ``coefficients.shape[:-1]``."""
        terms = self.l1 * self.smoothed_abs(coefficients) + 0.5 * self.l2 * coefficients.square()
        return (terms * self.mask(coefficients)).sum(-1)

    def majoriser_value(self, coefficients: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """The quadratic majoriser of :meth:`value` at ``anchor``, per leading index."""
        scale = self.smoothed_abs(anchor)
        lasso = self.l1 * ((coefficients.square() + self.eps**2) / (2 * scale) + scale / 2)
        terms = lasso + 0.5 * self.l2 * coefficients.square()
        return (terms * self.mask(coefficients)).sum(-1)

    @property
    def active(self) -> bool:
        """Whether the penalty is not identically zero."""
        return self.l1 > 0 or self.l2 > 0


@dataclasses.dataclass(frozen=True)
class InverseGammaPrior:
    r"""Inverse-gamma prior ``IG(concentration, rate)`` on each expert variance, for a model
    fitted to ``num_data`` samples.

    Its negative log-density divided by ``num_data`` (the MM objective is the *average* negative
    log-likelihood) adds ``((concentration + 1) log sigma^2 + rate / sigma^2) / num_data`` to
    the objective; the variance update stays closed form:
    ``sigma^2 = (R + 2 rate / N) / (avg tau + 2 (concentration + 1) / N)`` with ``R`` the
    (penalised) weighted residual.

    :ivar float concentration: shape ``a > 0``.
    :ivar float rate: scale ``b > 0``.
    :ivar float num_data: ``N > 0``, the number of samples the prior is weighed against.
    """

    concentration: float
    rate: float
    num_data: float

    def __post_init__(self):
        for name in ("concentration", "rate", "num_data"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"InverseGammaPrior.{name} must be a number > 0, got {value!r}")

    @property
    def residual_shift(self) -> float:
        """``2 rate / N``, added to the numerator of the variance update."""
        return 2 * self.rate / self.num_data

    @property
    def mass_shift(self) -> float:
        """``2 (concentration + 1) / N``, added to its denominator."""
        return 2 * (self.concentration + 1) / self.num_data

    def value(self, variance: torch.Tensor) -> torch.Tensor:
        """``((a + 1) log sigma^2 + b / sigma^2) / N`` element-wise (the negative log-density up
        to a constant, per sample)."""
        return ((self.concentration + 1) * variance.log() + self.rate / variance) / self.num_data
