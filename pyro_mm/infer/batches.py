"""Turning the inputs of ``fit`` into a stream of mini-batches."""

from typing import Iterable, Iterator, Tuple

import torch

from ..validation import as_tensor, positive_integer

__all__ = ["check_batch", "check_model_dtype", "iterate_batches"]


def iterate_batches(
    x,
    y=None,
    batch_size: int = None,
    epochs: int = 1,
    *,
    shuffle: bool = False,
    seed: int = 0,
    same_order_each_epoch: bool = False,
) -> Iterator[Tuple]:
    """An iterator of ``(x_batch, y_batch)`` pairs.

    :param x: a tensor/array of inputs, or (when ``y`` is ``None``) any iterable of
        ``(x, y)`` batches; a re-iterable one (a list, a ``DataLoader``) is replayed each epoch.
    :param y: outputs matching ``x``, or ``None``.
    :param int batch_size: rows per batch when ``x`` and ``y`` are arrays (``None``: all rows).
    :param int epochs: passes over the data.
    :param bool shuffle: take the rows of arrays in a random order, a new one at each epoch
        (stochastic approximation assumes exchangeable batches: rows sorted in any way, e.g. by
        class or by time, bias a pass taken in their order). A stream is shuffled at its source
        (``DataLoader(..., shuffle=True)``).
    :param int seed: seed of the orders (a private generator: the global random state is left
        alone).
    :param bool same_order_each_epoch: draw one order and keep it (the fixed batches of
        :class:`~pyro_mm.infer.FiniteSumMM`).
    """
    # Arguments are checked here, at the call, not at the first batch (a generator's body runs
    # only then): ``fit`` counts the batches for its progress bar before it draws one.
    epochs = positive_integer("epochs", epochs)
    if not isinstance(shuffle, bool):
        raise TypeError(f"shuffle must be True or False, got {shuffle!r}")
    if y is None:
        if shuffle:
            raise ValueError(
                "shuffle applies to arrays fit(x, y); shuffle a stream at its source, e.g. "
                "DataLoader(dataset, batch_size=..., shuffle=True)"
            )
        if isinstance(x, (torch.Tensor,)) or hasattr(x, "shape"):
            raise ValueError(
                "y is missing: pass fit(x, y) or fit(stream) with an iterable of (x, y)"
            )
        if epochs > 1 and iter(x) is x:
            raise ValueError(
                "epochs > 1 needs a re-iterable stream (a list or DataLoader), not an iterator"
            )
        return _stream_batches(x, epochs)
    x_all = x if isinstance(x, torch.Tensor) else as_tensor("x", x)
    y_all = y if isinstance(y, torch.Tensor) else as_tensor("y", y, allow_integer=True)
    if len(x_all) != len(y_all):
        raise ValueError(f"x has {len(x_all)} rows but y has {len(y_all)}")
    batch_size = len(x_all) if batch_size is None else positive_integer("batch_size", batch_size)
    return _array_batches(x_all, y_all, batch_size, epochs, shuffle, seed, same_order_each_epoch)


def _stream_batches(stream: Iterable, epochs: int) -> Iterator[Tuple]:
    for _ in range(epochs):
        yield from _pairs(stream)


def _array_batches(
    x_all, y_all, batch_size: int, epochs: int, shuffle: bool, seed, same_order_each_epoch: bool
) -> Iterator[Tuple]:
    num_rows = len(x_all)
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    order = None
    for _ in range(epochs):
        if shuffle and (order is None or not same_order_each_epoch):
            order = torch.randperm(num_rows, generator=generator)
        for start in range(0, num_rows, batch_size):
            if order is None:
                yield x_all[start : start + batch_size], y_all[start : start + batch_size]
            else:
                rows = order[start : start + batch_size]
                yield x_all[rows], y_all[rows]


def check_model_dtype(model, dtype: torch.dtype) -> None:
    """Raises a ``TypeError`` when the model's parameters are no longer in ``dtype``, the dtype
    of the fit (the model was converted, e.g. with ``.float()``, after the fit began)."""
    if model.dtype != dtype:
        raise TypeError(
            f"the model's parameters are {model.dtype} but this fit works in {dtype}: the model "
            f"was converted after the fit began; convert it back (model.to({dtype})) or start "
            "a new fit"
        )


def check_batch(model, dtype: torch.dtype, x, y, finite: bool = True):
    """``(x, y)`` validated for ``model`` (cast to its dtype) by a fit that works in ``dtype``.

    :raises TypeError: when the model is no longer in ``dtype`` (:func:`check_model_dtype`),
        before any state changes.
    :raises ValueError: for a bad batch (see the model's ``check_x`` and ``check_y``).
    """
    check_model_dtype(model, dtype)
    x = _constant(model.check_x(x, finite))
    return x, _constant(model.check_y(y, x.shape[0], finite))


def _constant(tensor: torch.Tensor) -> torch.Tensor:
    # A fit treats its data as constants (x may come out of a network that tracks gradients; the
    # K-means start reads it through NumPy). Detached only when needed: on the streaming hot
    # path a no-op alias still costs a dispatched operation.
    return tensor.detach() if tensor.requires_grad else tensor


def _pairs(stream: Iterable) -> Iterator[Tuple]:
    for item in stream:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"a stream must yield (x, y) pairs, got {type(item).__name__}")
        yield item[0], item[1]
