r"""Keeping the running statistics of incremental MM in compact sets (stability by truncation).

The convergence theory of incremental MM assumes that the statistics ``s_n`` stay in a compact
set (the paper's Assumption 7); nothing in the recursion guarantees it, and a stream with a gross
outlier, or a step size that is too large, can throw them arbitrarily far. The standard fix in
stochastic approximation (Chen & Zhu, 1986; Andrieu, Moulines & Priouret, 2005: truncation on
randomly varying, expanding sets) is applied here: with compact sets ``K_0 ⊂ K_1 ⊂ ...``
covering the space, an update that leaves the current set ``K_m`` is replaced by the reference
point ``s_0 ∈ K_0`` and the set index grows, ``m <- m + 1``. Since the sets expand, only finitely
many truncations happen on a stable run, after which the iteration is the untruncated one.

``K_m`` bounds every entry of every statistic: ``|s| <= radius * growth^m * max(1, |s_0|_max)``
leaf by leaf, so the sets follow the scale of each statistic. ``growth = 1`` keeps one compact
set. A reset keeps every statistic valid (``s_0`` is a statistic of a real batch: its Gram
matrices are positive semi-definite), which a clamp of the entries would not.
"""

import dataclasses

import torch

from ..models.params import tree_leaves

__all__ = ["StatisticsTruncation", "TruncationState"]


@dataclasses.dataclass
class TruncationState:
    """What the truncation remembers.

    :ivar int count: truncations so far (the index ``m`` of the current set).
    :ivar reference: the statistics ``s_0`` (a tree like the running statistics).
    """

    count: int
    reference: object


class StatisticsTruncation:
    """Truncation of the running statistics on expanding compact sets.

    Pass one to :class:`~pyro_mm.infer.IncrementalMM` as ``stability=``.

    :param float radius: size of ``K_0`` relative to the reference statistics (``> 1``).
    :param float growth: factor by which the sets expand at each truncation (``>= 1``; ``1``: a
        fixed compact set).
    """

    def __init__(self, radius: float = 1e3, growth: float = 2.0):
        if not float(radius) > 1:
            raise ValueError(f"radius must be > 1 (K_0 must contain s_0), got {radius!r}")
        if not float(growth) >= 1:
            raise ValueError(f"growth must be >= 1 (the sets may not shrink), got {growth!r}")
        self.radius = float(radius)
        self.growth = float(growth)

    def bounds(self, state: TruncationState) -> list:
        """The bound of each statistic's entries in the current set ``K_m``."""
        scale = self.radius * self.growth**state.count
        return [scale * max(1.0, leaf.abs().max().item()) for leaf in tree_leaves(state.reference)]

    def contains(self, stats, state: TruncationState) -> bool:
        """Whether ``stats`` (finite) lies in ``K_m``."""
        return all(
            bool(torch.isfinite(leaf).all()) and leaf.abs().max().item() <= bound
            for leaf, bound in zip(tree_leaves(stats), self.bounds(state))
        )

    def project(self, stats, state: TruncationState = None):
        """``(stats, state)`` after truncation; a pure function (the caller keeps the state).

        :param stats: the updated running statistics ``s_{n+1}``.
        :param TruncationState state: ``None`` at the first step: ``stats`` becomes ``s_0``.
        :returns: ``(stats or s_0, new state)``.
        """
        if state is None:
            return stats, TruncationState(count=0, reference=stats)
        if self.contains(stats, state):
            return stats, state
        return state.reference, TruncationState(count=state.count + 1, reference=state.reference)

    def __repr__(self) -> str:
        return f"StatisticsTruncation(radius={self.radius}, growth={self.growth})"
