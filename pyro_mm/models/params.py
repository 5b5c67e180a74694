"""Parameters as plain data: small dataclasses of tensors that inference code can copy,
average, checkpoint and all-reduce without touching a ``PyroModule``."""

import dataclasses
from typing import Callable

import torch

__all__ = [
    "MoEParams",
    "GaussianExpertParams",
    "MultinomialExpertParams",
    "tree_map",
    "tree_leaves",
    "tree_to",
]


def tree_map(fn: Callable, tree, *rest):
    """Applies ``fn`` leaf-wise to one or more dataclass trees of tensors with the same shape."""
    # The class's field table instead of dataclasses.fields/replace: this runs several times in
    # every streaming step, and those helpers cost more than the small tensors' arithmetic.
    fields = getattr(type(tree), "__dataclass_fields__", None)
    if fields is not None:
        return type(tree)(
            **{
                name: tree_map(fn, getattr(tree, name), *(getattr(r, name) for r in rest))
                for name in fields
            }
        )
    if tree is None:
        return None
    return fn(tree, *rest)


def tree_to(tree, dtype: torch.dtype):
    """Casts the floating tensors of a tree to ``dtype`` (integer tensors are kept)."""
    return tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, tree)


def tree_leaves(tree) -> list:
    """The tensors of a dataclass tree, in field order."""
    fields = getattr(type(tree), "__dataclass_fields__", None)
    if fields is not None:
        leaves = []
        for name in fields:
            leaves.extend(tree_leaves(getattr(tree, name)))
        return leaves
    return [] if tree is None else [tree]


@dataclasses.dataclass
class GaussianExpertParams:
    """Parameters of ``K`` Gaussian regression experts with diagonal covariance.

    :ivar torch.Tensor weight: ``(K, Q, D_e)`` regression coefficients ``Upsilon_k``.
    :ivar torch.Tensor variance: ``(K, Q)`` diagonal variances ``sigma^2_{kq}``.
    """

    weight: torch.Tensor
    variance: torch.Tensor


@dataclasses.dataclass
class MultinomialExpertParams:
    """Parameters of ``K`` multinomial-logistic (softmax regression) classification experts.

    :ivar torch.Tensor weight: ``(K, M - 1, D_e)`` coefficients ``v_{m,k}`` of the first
        ``M - 1`` classes; class ``M`` is each expert's reference with zero weights.
    """

    weight: torch.Tensor


@dataclasses.dataclass
class MoEParams:
    """All parameters of a softmax-gated mixture of experts.

    :ivar torch.Tensor gate: ``(K - 1, D_g)`` gate weights; expert ``K`` is the reference with
        zero weights (the softmax is translation invariant).
    :ivar experts: the expert family's parameters (e.g. :class:`GaussianExpertParams`).
    """

    gate: torch.Tensor
    experts: object
