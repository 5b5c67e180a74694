"""Feature maps that turn raw inputs ``x`` into gate and expert regressors.

The paper (Section 4.1.1) models the gate weights and the expert means as polynomials of the
inputs, coordinate by coordinate: ``w_k(x) = sum_{d <= D} omega_{k,d}^T x^d`` where ``x^d`` is the
element-wise power. Its feature vector repeats the intercept ``x_p^0 = 1`` once per input
dimension, which makes the Gram matrix singular; here the intercept appears once.
"""

import numbers
from typing import Callable, Union

import torch

__all__ = ["PolynomialFeatures", "CallableFeatures", "as_feature_map"]


class PolynomialFeatures:
    r"""Coordinate-wise polynomial features with a single intercept.

    Maps ``x`` of shape ``(N, P)`` to ``[1, x, x**2, ..., x**degree]`` of shape
    ``(N, 1 + P * degree)`` (no cross terms, as in the paper).

    :param int in_features: number of input columns ``P``.
    :param int degree: largest power ``D`` (``0`` gives the intercept alone).
    """

    def __init__(self, in_features: int, degree: int = 1):
        if int(in_features) != in_features or in_features < 1:
            raise ValueError(f"in_features must be a positive integer, got {in_features!r}")
        if int(degree) != degree or degree < 0:
            raise ValueError(f"degree must be a non-negative integer, got {degree!r}")
        self.in_features = int(in_features)
        self.degree = int(degree)
        self.num_features = 1 + self.in_features * self.degree

    #: the column of ones: the experts' ridge leaves its coefficient (the intercept) alone.
    intercept_column = 0

    def _powers(self, x: torch.Tensor) -> list:
        """``[x, x**2, ..., x**degree]`` element-wise (for either layout of ``x``)."""
        powers = [x] if self.degree > 0 else []
        for _ in range(self.degree - 1):
            powers.append(powers[-1] * x)
        return powers

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(x.shape[:-1] + (1,), dtype=x.dtype, device=x.device)
        return torch.cat([ones] + self._powers(x), dim=-1)

    def feature_major(self, x: torch.Tensor, append: torch.Tensor) -> torch.Tensor:
        """``[u(x), append]`` transposed, ``(num_features + append columns, N)``, built by one
        concatenation of transposed views (no separate transpose copy)."""
        ones = torch.ones(1, x.shape[0], dtype=x.dtype, device=x.device)
        return torch.cat([ones] + self._powers(x.T) + [append.T])

    def __eq__(self, other) -> bool:
        if not isinstance(other, PolynomialFeatures):
            return NotImplemented
        return (self.in_features, self.degree) == (other.in_features, other.degree)

    def __hash__(self) -> int:
        return hash((PolynomialFeatures, self.in_features, self.degree))

    def __repr__(self) -> str:
        return f"PolynomialFeatures(in_features={self.in_features}, degree={self.degree})"


class CallableFeatures:
    """Wraps a user function ``x -> features`` that returns ``num_features`` columns.

    The function must include its own intercept column if one is wanted.

    :param callable fn: maps a ``(N, P)`` tensor to a ``(N, num_features)`` tensor.
    :param int num_features: number of columns ``fn`` returns.
    :param int intercept_column: the index of ``fn``'s column of ones, if it has one: the
        experts' ridge leaves that coefficient alone, so that a fit does not depend on where
        ``y`` is centred (``None``: the ridge penalises every coefficient).
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        num_features: int,
        intercept_column: int = None,
    ):
        self.fn = fn
        self.num_features = int(num_features)
        if intercept_column is not None and not (
            isinstance(intercept_column, numbers.Integral)
            and not isinstance(intercept_column, bool)
            and 0 <= intercept_column < self.num_features
        ):
            raise ValueError(
                f"intercept_column must be None or a column index in [0, {self.num_features}), "
                f"got {intercept_column!r}"
            )
        self.intercept_column = None if intercept_column is None else int(intercept_column)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        features = self.fn(x)
        if features.shape[-1] != self.num_features:
            raise ValueError(
                f"feature map returned {features.shape[-1]} columns, expected {self.num_features}"
            )
        return features

    def feature_major(self, x: torch.Tensor, append: torch.Tensor) -> torch.Tensor:
        """``[fn(x), append]`` transposed, ``(num_features + append columns, N)``."""
        return torch.cat([self(x).T, append.T])

    def __repr__(self) -> str:
        intercept = (
            "" if self.intercept_column is None else f", intercept_column={self.intercept_column}"
        )
        return f"CallableFeatures({self.fn!r}, num_features={self.num_features}{intercept})"


FeatureSpec = Union[int, PolynomialFeatures, CallableFeatures]


def as_feature_map(spec: FeatureSpec, in_features: int):
    """Returns a feature map from a polynomial degree or an existing feature map."""
    if isinstance(spec, (PolynomialFeatures, CallableFeatures)):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool):
        return PolynomialFeatures(in_features, spec)
    raise TypeError(
        f"a feature specification must be a polynomial degree (int) or a feature map, got {spec!r}"
    )
