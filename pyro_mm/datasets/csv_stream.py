"""Streaming a CSV file that need not fit in memory as ``(x, y)`` tensor batches."""

import os
from typing import Iterator, Sequence, Tuple, Union

import torch

__all__ = ["CsvBatchStream"]

_MISSING_POLICIES = ("raise", "drop")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class CsvBatchStream:
    """A re-iterable stream of ``(x, y)`` batches read from a CSV file with pandas, chunk by
    chunk, so that only ``chunk_size`` rows are in memory at a time.

    Batches follow the file's row order and all hold ``batch_size`` rows except possibly the
    last one (rows are carried over between chunks). A file sorted in any way (by time, by class)
    makes a biased stream for stochastic updates: with ``shuffle_buffer`` the rows go through a
    pool of that many rows, and each batch is drawn at random from the pool (as
    ``tf.data.Dataset.shuffle``; a pool at least as large as the file shuffles it completely),
    in a new order at each pass. Each ``iter()`` re-opens the file, so the stream can be passed
    to ``fit(stream, epochs=...)`` for several passes::

        stream = CsvBatchStream("train.csv", target="y", batch_size=64)
        IncrementalMM(model).fit(stream, epochs=3)

    The header and the requested columns are checked when the stream is built; a cell that is
    not a number raises ``ValueError`` naming its column, data row and value when its chunk is
    read (batches before it have been yielded by then), and so does an empty or missing one
    unless ``missing="drop"``, which drops its row and counts it in :attr:`dropped_rows`.

    :param path: the CSV file (any compression pandas infers from the suffix, e.g. ``.csv.gz``).
    :param target: the output column (``y`` has shape ``(n,)``) or a sequence of output columns
        (``y`` has shape ``(n, Q)``).
    :param features: the input columns of ``x``, in this order (default: every column that is
        not a target, in file order).
    :param int batch_size: rows per yielded batch.
    :param int chunk_size: rows pandas reads at a time (memory bound of the stream, with the
        shuffle pool).
    :param torch.dtype dtype: floating dtype of ``x`` and ``y``.
    :param int shuffle_buffer: rows of the shuffle pool (``None``: the file's order).
    :param int seed: seed of the shuffle; pass ``k`` of the stream (counting from 0) draws its
        order from a private generator seeded ``seed + k``.
    :param str missing: ``"raise"`` (default) on a missing cell of a requested column, or
        ``"drop"`` its row (counted per pass in :attr:`dropped_rows`; other columns' missing
        cells never matter).
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        target: Union[str, Sequence[str]],
        features: Sequence[str] = None,
        *,
        batch_size: int = 256,
        chunk_size: int = 65536,
        dtype: torch.dtype = torch.float64,
        shuffle_buffer: int = None,
        seed: int = 0,
        missing: str = "raise",
    ):
        import pandas as pd

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"CSV file not found: {self.path!r}")
        self.batch_size = _positive_int("batch_size", batch_size)
        self.chunk_size = _positive_int("chunk_size", chunk_size)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
        self.dtype = dtype
        self.shuffle_buffer = (
            None if shuffle_buffer is None else _positive_int("shuffle_buffer", shuffle_buffer)
        )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        if missing not in _MISSING_POLICIES:
            raise ValueError(f"missing must be one of {_MISSING_POLICIES}, got {missing!r}")
        self.missing = missing
        #: rows of the latest pass dropped for a missing value (``missing="drop"``).
        self.dropped_rows = 0
        self._passes = 0
        self._single_target = isinstance(target, str)
        targets = [target] if self._single_target else list(target)
        header = list(pd.read_csv(self.path, nrows=0).columns)
        if features is None:
            features = [name for name in header if name not in targets]
        elif isinstance(features, str):
            raise TypeError(
                f"features must be a sequence of column names, got the string {features!r}"
            )
        elif not hasattr(features, "__iter__"):
            # CsvBatchStream(path, "y", 64) read 64 as the features: batch_size is keyword-only.
            raise TypeError(
                f"features must be a sequence of column names, got {features!r} (batch_size and "
                f"the other options are keyword-only: CsvBatchStream(path, target, batch_size=...))"
            )
        else:
            features = list(features)
        if not targets or not features:
            raise ValueError(
                f"need at least one target and one feature column, got targets={targets}, "
                f"features={features}"
            )
        absent = [name for name in [*features, *targets] if name not in header]
        if absent:
            raise ValueError(f"column(s) {absent} not in {self.path!r}; its columns are {header}")
        both = sorted(set(features) & set(targets))
        if both:
            raise ValueError(f"column(s) {both} are both features and targets")
        repeated = sorted(
            {name for name in [*features, *targets] if [*features, *targets].count(name) > 1}
        )
        if repeated:
            raise ValueError(f"column(s) {repeated} are requested more than once")
        #: the input columns, in the order of ``x``'s columns.
        self.features: Tuple[str, ...] = tuple(features)
        #: the output columns, in the order of ``y``'s columns.
        self.targets: Tuple[str, ...] = tuple(targets)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self.dropped_rows = 0
        generator = None
        if self.shuffle_buffer is not None:
            generator = torch.Generator().manual_seed(self.seed + self._passes)
            self._passes += 1
        return self._batches(generator)

    def _batches(self, generator: torch.Generator = None):
        """Full batches as the chunks arrive, the rows carried over between chunks. With a
        ``generator``, the carried rows are the shuffle pool: each chunk joins it, the pool is
        permuted, and every full batch beyond ``shuffle_buffer`` rows leaves it."""
        reserve = 0 if generator is None else self.shuffle_buffer
        pending_x = pending_y = None
        for x, y in self._chunks():
            if pending_x is not None:
                x, y = torch.cat([pending_x, x]), torch.cat([pending_y, y])
            if generator is not None:
                order = torch.randperm(x.shape[0], generator=generator)
                x, y = x[order], y[order]
            full = max(0, x.shape[0] - reserve) // self.batch_size * self.batch_size
            for start in range(0, full, self.batch_size):
                yield self._batch(
                    x[start : start + self.batch_size], y[start : start + self.batch_size]
                )
            pending_x, pending_y = x[full:], y[full:]
        if pending_x is not None:
            for start in range(0, pending_x.shape[0], self.batch_size):
                yield self._batch(
                    pending_x[start : start + self.batch_size],
                    pending_y[start : start + self.batch_size],
                )

    def _batch(self, x: torch.Tensor, y: torch.Tensor):
        return x, (y[:, 0] if self._single_target else y)

    def _chunks(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        import pandas as pd

        columns = [*self.features, *self.targets]
        reader = pd.read_csv(self.path, usecols=columns, chunksize=self.chunk_size)
        first_row = 0
        with reader:
            for chunk in reader:
                rows = len(chunk)
                chunk = self._as_numbers(chunk[columns].copy(), first_row)
                if self.missing == "drop":
                    complete = chunk.notna().all(axis=1).to_numpy()
                    self.dropped_rows += int((~complete).sum())
                    chunk = chunk[complete]
                values = torch.tensor(chunk.to_numpy(dtype="float64"), dtype=self.dtype)
                if len(values):
                    yield values[:, : len(self.features)], values[:, len(self.features) :]
                first_row += rows

    def _as_numbers(self, chunk, first_row: int):
        """The chunk with every column numeric; raises on the first non-numeric cell, and on the
        first missing one unless ``missing="drop"`` (then it stays NaN)."""
        import pandas as pd

        for name in chunk.columns:
            column = chunk[name]
            missing = column.isna().to_numpy()
            if missing.any() and self.missing == "raise":
                row = first_row + int(missing.argmax())
                raise ValueError(
                    f"column {name!r} has a missing value at data row {row} (line {row + 2} of "
                    f"{self.path!r}); drop or impute it before streaming"
                )
            if column.dtype.kind in "iuf":
                continue
            if column.dtype.kind == "b":
                raise ValueError(
                    f"column {name!r} holds booleans ({str(column.iloc[0])!r} at data row "
                    f"{first_row}); write them as 0/1 to use them as numbers"
                )
            numbers = pd.to_numeric(column, errors="coerce")
            bad = numbers.isna().to_numpy() & ~missing
            if bad.any():
                row = first_row + int(bad.argmax())
                raise ValueError(
                    f"column {name!r} is not numeric: value {column.iloc[int(bad.argmax())]!r} "
                    f"at data row {row} (line {row + 2} of {self.path!r})"
                )
            chunk[name] = numbers
        return chunk
