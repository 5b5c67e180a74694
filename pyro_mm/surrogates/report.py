"""What a closed-form solve had to regularise, so that callers can report it."""

import dataclasses

import torch

__all__ = ["SolveReport"]


@dataclasses.dataclass
class SolveReport:
    """Regularisation applied by an expert solve.

    :ivar torch.Tensor empty_experts: ``(K,)`` bool, experts whose responsibility mass was below
        the threshold; their previous parameters are kept.
    :ivar int floored_variances: number of variances raised to the variance floor.
    """

    empty_experts: torch.Tensor
    floored_variances: int = 0
