"""Input checks shared by models and inference: every bad batch is rejected at the door, with a
message naming the problem, before any state changes."""

import math
import numbers

import numpy as np
import torch

__all__ = [
    "as_tensor",
    "class_labels",
    "check_finite",
    "check_features",
    "non_negative_number",
    "positive_integer",
    "positive_number",
]


def as_tensor(
    name: str,
    value,
    dtype: torch.dtype = None,
    allow_integer: bool = False,
    integer_hint: str = "",
) -> torch.Tensor:
    """Converts an array-like to a tensor, rejecting non-numeric and (unless allowed) integer data.

    :param str name: the argument's name, used in error messages.
    :param value: a tensor, a NumPy array, a pandas object or a nested sequence.
    :param torch.dtype dtype: floating dtype to cast floating data to (``None`` keeps it).
    :param bool allow_integer: accept integer data (class labels) and keep it as ``int64``.
    :param str integer_hint: a sentence added to the error for integer or boolean data.
    """
    if hasattr(value, "to_numpy"):  # pandas
        value = value.to_numpy()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be numeric, got a NumPy array of dtype {value.dtype}")
        # A tensor must not alias read-only memory (pandas >= 3 hands out read-only views;
        # torch warns of undefined behaviour): such an array is copied.
        writable = value.flags.writeable
        value = np.ascontiguousarray(value) if writable else np.array(value, order="C")
        value = torch.from_numpy(value)
    elif not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a tensor or array-like of numbers: {err}") from None
    if value.is_complex():
        raise TypeError(f"{name} must be real, got dtype {value.dtype}")
    if value.dtype == torch.bool or not value.is_floating_point():
        if not allow_integer:
            raise TypeError(
                f"{name} has dtype {value.dtype}; pass floating-point data "
                f"(torch.float64 is recommended for fitting){integer_hint}"
            )
        return value.to(torch.int64)
    if dtype is not None and value.dtype != dtype:
        value = value.to(dtype)
    return value


def class_labels(name: str, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``labels`` (a tensor from :func:`as_tensor` with ``allow_integer=True``) as ``int64``
    class indices in ``{0, ..., num_classes - 1}``.

    Floating labels are accepted when they are whole numbers (labels read from a CSV, say).

    :raises ValueError: naming the first offending values and rows: a NaN or infinite label, a
        non-integer one, or one out of range.
    """
    if labels.is_floating_point():
        check_finite(name, labels)
        fractional = labels != labels.round()
        if fractional.any():
            rows = fractional.nonzero().flatten()
            raise ValueError(
                f"{name} must hold integer class labels, got non-integer values "
                f"{labels[rows[:5]].tolist()} at row(s) {rows[:5].tolist()}"
            )
        labels = labels.to(torch.int64)
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        rows = outside.nonzero().flatten()
        raise ValueError(
            f"class labels must lie in {{0, ..., {num_classes - 1}}} for "
            f"num_classes={num_classes}, got {labels[rows[:5]].tolist()} at row(s) "
            f"{rows[:5].tolist()}"
        )
    return labels


def check_finite(name: str, value: torch.Tensor) -> None:
    """Raises ``ValueError`` naming the first rows that hold NaN or infinite values."""
    # A finite sum proves every entry finite at the cost of one reduction; only a non-finite sum
    # (a bad entry, or an overflowing sum of huge values) needs the entry-wise check.
    if value.is_floating_point() and not torch.isfinite(value.sum()):
        bad = ~torch.isfinite(value)
        if bad.any():
            rows = bad.reshape(bad.shape[0], -1).any(-1).nonzero().flatten()
            kind = "NaN" if torch.isnan(value).any() else "infinite"
            raise ValueError(
                f"{name} contains {kind} values in {rows.numel()} row(s), first at row(s) "
                f"{rows[:5].tolist()}; drop or impute them before fitting"
            )


def check_features(x, in_features: int, dtype: torch.dtype, finite: bool = True) -> torch.Tensor:
    """Validates an input batch: 2-D ``(N, in_features)``, floating, finite, at least one row.

    :param bool finite: check finiteness (``False`` for a caller that proves it later, as a
        finite log-likelihood of the batch does, and calls this again to name a bad row).
    """
    x = as_tensor("x", x, dtype)
    if x.dim() == 1 and in_features == 1:
        x = x.unsqueeze(-1)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, {in_features}), got {tuple(x.shape)}")
    if x.shape[1] != in_features:
        raise ValueError(
            f"x has {x.shape[1]} columns but the model was built with in_features={in_features}"
        )
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (0 rows)")
    if finite:
        check_finite("x", x)
    return x


def positive_number(name: str, value) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``name`` unless it is a finite number
    > 0 (a Python or NumPy scalar)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not 0.0 < float(value) < float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def non_negative_number(name: str, value) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``name`` unless it is a finite number
    >= 0 (a Python or NumPy scalar)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not 0.0 <= float(value) < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def positive_integer(name: str, value) -> int:
    """``value`` as an int, or a ``ValueError`` naming ``name`` unless it is an integer >= 1
    (a Python or NumPy scalar: ``np.int64(3)`` from an array's ``shape`` or ``sum`` passes)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or int(value) != value
    ):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
