"""The record every fitting method keeps: one row per step."""

import dataclasses
from typing import List

__all__ = ["FitHistory"]


@dataclasses.dataclass
class FitHistory:
    """Per-step record of a fit, shared by every inference class.

    :ivar list loss: the loss each step returned (mean NLL of its batch at the parameters it
        was given).
    :ivar list samples_seen: samples consumed up to and including the step.
    :ivar list wall_time: seconds since the fit started, at the end of the step.
    """

    loss: List[float] = dataclasses.field(default_factory=list)
    samples_seen: List[int] = dataclasses.field(default_factory=list)
    wall_time: List[float] = dataclasses.field(default_factory=list)

    def append(self, loss: float, samples_seen: int, wall_time: float) -> None:
        self.loss.append(float(loss))
        self.samples_seen.append(int(samples_seen))
        self.wall_time.append(float(wall_time))

    def __len__(self) -> int:
        return len(self.loss)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
