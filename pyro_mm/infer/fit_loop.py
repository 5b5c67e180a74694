"""The loop every streaming fitting method shares: one ``step`` per mini-batch, one history row
per step, an optional progress bar."""

import time
from typing import Iterable, Optional

from .batches import iterate_batches
from .history import FitHistory
from .separation import warn_if_classes_separated

__all__ = ["fit_batches", "fit_loop", "count_batches"]


def count_batches(x, y, batch_size: int, epochs: int) -> Optional[int]:
    """Number of steps ``fit`` will take on arrays (``None`` for a stream of batches);
    ``batch_size=None`` means one batch of all rows per epoch. The arguments are those that
    :func:`~pyro_mm.infer.batches.iterate_batches` accepted."""
    if y is None:
        return None
    if batch_size is None:
        return int(epochs)
    return int(epochs) * -(-len(x) // int(batch_size))


def fit_loop(
    fitter, batches: Iterable, *, total: int = None, progress: bool = True, desc: str = None
) -> FitHistory:
    """Calls ``fitter.step(x, y)`` on every batch.

    :param fitter: an object with ``step(x, y) -> float``, a ``samples_seen`` counter and a
        ``history`` (:class:`FitHistory`) that accumulates over calls.
    :param batches: iterable of ``(x, y)`` mini-batches.
    :param int total: number of batches, for the progress bar.
    :param bool progress: show a tqdm progress bar.
    :param str desc: label of the progress bar (default: the fitter's class name).
    :returns: the :class:`FitHistory` of this call (its rows are also appended to
        ``fitter.history``).
    """
    from tqdm.auto import tqdm

    history = FitHistory()
    start = time.perf_counter()
    desc = type(fitter).__name__ if desc is None else desc
    with tqdm(batches, total=total, disable=not progress, desc=desc) as bar:
        for x_batch, y_batch in bar:
            loss = fitter.step(x_batch, y_batch)
            history.append(loss, fitter.samples_seen, time.perf_counter() - start)
            fitter.history.append(loss, fitter.samples_seen, history.wall_time[-1])
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    return history


def fit_batches(
    fitter, x, y, batch_size, epochs: int, *, shuffle: bool, progress: bool, desc: str = None
) -> FitHistory:
    """:func:`fit_loop` over ``iterate_batches(x, y, batch_size, epochs)``: the ``fit`` of every
    streaming method on arrays or on a stream of batches (rows of arrays in a new random order
    at each epoch with ``shuffle``, seeded by ``fitter.seed``)."""
    batches = iterate_batches(x, y, batch_size, epochs, shuffle=shuffle, seed=fitter.seed)
    history = fit_loop(
        fitter,
        batches,  # made first: it checks batch_size and epochs, which count_batches trusts
        total=count_batches(x, y, batch_size, epochs),
        progress=progress,
        desc=desc,
    )
    if y is not None:  # arrays: the whole training set is at hand (a stream's is not)
        warn_if_classes_separated(fitter.model, x, y, stacklevel=4)
    return history
