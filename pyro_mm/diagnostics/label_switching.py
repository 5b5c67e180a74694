"""Label switching: the likelihood of a mixture of experts is invariant under relabelling the
experts, so draws from a posterior may carry different labellings. Before draws are summarised
per expert they are relabelled to a common reference."""

import torch

from ..metrics import align_experts
from ..models.params import MoEParams, tree_leaves, tree_map

__all__ = ["align_draws"]


def _mean(draws: list) -> MoEParams:
    return tree_map(lambda *leaves: torch.stack(leaves).mean(0), *draws)


def _same(first: list, second: list) -> bool:
    return all(
        torch.equal(a, b)
        for one, other in zip(first, second, strict=True)
        for a, b in zip(tree_leaves(one), tree_leaves(other), strict=True)
    )


def align_draws(draws: list, reference: MoEParams = None, max_rounds: int = 10) -> list:
    """Relabels the experts of every draw to match a reference.

    With a given ``reference`` every draw is aligned to it once
    (:func:`~pyro_mm.metrics.align_experts`). Without one, the first draw is the initial
    reference; then, until no draw changes labelling (at most ``max_rounds`` rounds), the
    reference is replaced by the mean of the aligned draws and the draws are aligned again
    (the pivot-then-mean relabelling of Stephens, 2000).

    :param list draws: :class:`MoEParams`, one per draw.
    :param MoEParams reference: the labelling to align to (e.g. a point estimate).
    :param int max_rounds: largest number of re-alignments to the mean.
    :returns: the relabelled draws, in the same order.
    """
    if not draws:
        raise ValueError("align_draws needs at least one draw")
    if reference is not None:
        return [align_experts(draw, reference) for draw in draws]
    aligned = [align_experts(draw, draws[0]) for draw in draws]
    for _ in range(max_rounds):
        mean = _mean(aligned)
        realigned = [align_experts(draw, mean) for draw in draws]
        if _same(realigned, aligned):
            break
        aligned = realigned
    return aligned
