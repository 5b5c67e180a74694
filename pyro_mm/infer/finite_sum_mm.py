r"""Incremental MM over a finite data set (MISO, Mairal 2015; incremental EM, Neal & Hinton 1998).

The data set is split into fixed mini-batches ``z_1, ..., z_B`` of ``n_1, ..., n_B`` rows. The
statistics of each batch's majoriser are kept, anchored where the batch was last seen, and the
running statistics are their row-weighted average over the batches seen so far,

.. math:: s = \frac{\sum_b n_b\, \bar S(\theta_{(b)}; z_b)}{\sum_b n_b},

so after one pass the surrogate majorises the *full-data* objective (each batch's term
majorises that batch's mean NLL, tight at its own anchor ``theta_(b)``). A step on batch ``b``
replaces its term by the one anchored at the current iterate and minimises the surrogate. The
surrogate's value at the iterate then never increases, and its fixed points are the stationary
points of the full-data objective, with no step size and no noise floor: unlike the
stochastic-approximation update of :class:`~pyro_mm.infer.IncrementalMM`, which averages the
batches' statistics with weights ``gamma_n``, a batch seen again here *replaces* its old
statistics. With one batch of all the rows each step is a batch MM step
(:func:`~pyro_mm.infer.em.batch_mm`).

The price is memory: one set of statistics per batch (``B`` times the size of ``s``).

**Inner steps.** One step re-anchors only the batch at hand, so a pass over the data moves the
iterate roughly as far as one batch MM step does. With ``inner_steps = J > 1`` the step repeats
"replace the batch's term by the one anchored at the current iterate, minimise the surrogate"
``J`` times on the same batch (its data is at hand). Each repetition is itself a MISO step on
that batch: the new term majorises the batch's NLL and touches it at the iterate, so the
full-data surrogate stays a majoriser and its value at the iterate still never increases. (Re-
expanding the bound of the *other* batches at the new iterate would not be valid: their data is
not at hand, only their statistics.) The batch's samples are counted once; the extra
repetitions cost compute, not samples.
"""

import torch

from ..models.params import tree_map
from .batches import iterate_batches
from .fit_loop import count_batches, fit_loop
from .incremental_mm import IncrementalMM
from .state import load_tree_state, tree_state

__all__ = ["FiniteSumMM"]


class FiniteSumMM(IncrementalMM):
    """Incremental MM on a finite data set whose batches' statistics are kept and replaced.

    Used like :class:`~pyro_mm.infer.IncrementalMM`: ``fit(x, y, batch_size=..., epochs=...)``
    splits the rows into consecutive batches (the same at every pass) and steps through them;
    ``step(x, y, key)`` takes one batch and the key that identifies it (the same batch must
    come with the same key: its statistics replace those stored under the key). The table of
    batch statistics persists across calls, so a second ``fit`` on the same data continues the
    iteration; call :meth:`forget_batches` before fitting other data.

    :param MixtureOfExperts model: the model to fit.
    :param int inner_steps: MM iterations per batch, each re-anchoring the batch's own term at
        the current iterate (see the module docstring); 1 (the default) is plain MISO.
    :param options: any other :class:`~pyro_mm.infer.IncrementalMM` option, except
        ``schedule`` and ``polyak_start`` (there is no step size and nothing to average) and
        distributed fitting (one process holds the table).
    """

    def __init__(self, model, *, inner_steps: int = 1, **options):
        if isinstance(inner_steps, bool) or int(inner_steps) != inner_steps or inner_steps < 1:
            raise ValueError(f"inner_steps must be a positive integer, got {inner_steps!r}")
        for name in ("schedule", "polyak_start"):
            if name in options:
                raise TypeError(
                    f"FiniteSumMM takes no {name}: a batch seen again replaces its "
                    "statistics, there is no step size"
                )
        if options.get("process_group") is None:
            options["process_group"] = False
        elif options["process_group"] is not False:
            raise ValueError("FiniteSumMM runs in one process (it keeps every batch's statistics)")
        super().__init__(model, **options)
        self.inner_steps = int(inner_steps)
        #: ``{key: (statistics, rows)}`` of the batches seen, each at its last anchor.
        self.batch_statistics = {}
        self._total, self._total_rows, self._pending, self._key = None, 0, None, None

    def forget_batches(self) -> None:
        """Drops the stored batch statistics (before fitting another data set); the iterate is
        kept, and the next batch's statistics restart the average."""
        self.batch_statistics, self._total, self._total_rows = {}, None, 0
        self.statistics = None

    def step(self, x, y, key=None) -> float:
        """One step on the batch ``key`` of the data set.

        :param x: inputs of the batch.
        :param y: outputs of the batch.
        :param key: a hashable plain value (``int`` or ``str``) naming the batch; its statistics
            replace those stored under the same key.
        :returns: the batch's mean NLL at the parameters the step was given.

        With ``inner_steps > 1`` each iteration on the batch commits its own change: the
        batch's checks run in the first, so a later one can fail only on an overflowing update,
        and the earlier ones then stay in place.
        """
        if key is None or not isinstance(key, (int, str)) or isinstance(key, bool):
            raise TypeError(f"FiniteSumMM.step needs the batch's key (an int or str), got {key!r}")
        self._key = key
        try:
            return super().step(x, y)
        finally:
            self._key = self._pending = None

    def fit(
        self,
        x,
        y=None,
        *,
        batch_size: int = None,
        epochs: int = 1,
        shuffle: bool = False,
        progress: bool = True,
    ):
        """Steps through the consecutive batches of ``batch_size`` rows of ``(x, y)``, ``epochs``
        times, batch ``i`` under key ``i``.

        :param x: inputs ``(N, P)`` (a finite data set: arrays, not a stream).
        :param y: outputs.
        :param int batch_size: rows per batch (default 256).
        :param int epochs: passes over the data.
        :param bool shuffle: split the rows, in one random order (seeded by ``seed``), into
            batches; the batches stay the same at every pass, as the stored statistics need.
        :param bool progress: show a tqdm progress bar.
        :returns: the :class:`~pyro_mm.infer.FitHistory` of this call.
        """
        if y is None:
            raise ValueError("FiniteSumMM.fit needs the data set as arrays fit(x, y)")
        batch_size = 256 if batch_size is None else batch_size
        batches = iterate_batches(
            x, y, batch_size, epochs, shuffle=shuffle, seed=self.seed, same_order_each_epoch=True
        )
        num_batches = count_batches(x, y, batch_size, 1)
        return fit_loop(
            _KeyedSteps(self, num_batches),
            batches,
            total=num_batches * int(epochs),
            progress=progress,
            desc=type(self).__name__,
        )

    # --------------------------------------------------------------------------- internals
    def _updated_statistics(self, batch_stats, num_rows: int):
        total = tree_map(lambda b: num_rows * b, batch_stats)
        if self._total is not None:
            total = tree_map(torch.add, self._total, total)
        rows = self._total_rows + num_rows
        previous = self.batch_statistics.get(self._key)
        if previous is not None:
            old_stats, old_rows = previous
            total = tree_map(lambda t, o: t - old_rows * o, total, old_stats)
            rows -= old_rows
        self._pending = (batch_stats, num_rows, total, rows)
        return tree_map(lambda t: t / rows, total)

    def _step(self, x, y) -> float:
        loss = self._replace_batch(x, y)
        for _ in range(self.inner_steps - 1):
            self._replace_batch(x, y)
        # The repetitions reuse the batch: it counts once as a step and in the samples seen.
        self.num_steps -= self.inner_steps - 1
        self.samples_seen -= (self.inner_steps - 1) * self.batch_statistics[self._key][1]
        return loss

    def _replace_batch(self, x, y) -> float:
        """One MISO step: the batch's term re-anchored at the iterate, the surrogate minimised."""
        self._pending = None
        loss = super()._step(x, y)
        batch_stats, num_rows, total, rows = self._pending
        self.batch_statistics[self._key] = (batch_stats, num_rows)
        self._total, self._total_rows = total, rows
        return loss

    def _options(self) -> dict:
        # Stored only when not the default, so states saved before the option existed load.
        inner = {} if self.inner_steps == 1 else {"inner_steps": self.inner_steps}
        return {**super()._options(), "algorithm": "finite-sum", **inner}

    def state_dict(self) -> dict:
        """:meth:`IncrementalMM.state_dict` plus the stored batch statistics (with their keys
        and row counts) and their row-weighted sum."""
        return {
            **super().state_dict(),
            "batch_keys": list(self.batch_statistics),
            "batch_statistics": [tree_state(s) for s, _ in self.batch_statistics.values()],
            "batch_rows": [n for _, n in self.batch_statistics.values()],
            "total": tree_state(self._total),
            "total_rows": self._total_rows,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict` (see :meth:`IncrementalMM.load_state_dict`)."""
        for name in ("batch_keys", "batch_statistics", "batch_rows", "total", "total_rows"):
            if name not in state:
                raise ValueError(f"the state has no {name!r}: it was not made by FiniteSumMM")
        super().load_state_dict(state)
        self.batch_statistics = {
            key: (load_tree_state(stats), int(rows))
            for key, stats, rows in zip(
                state["batch_keys"], state["batch_statistics"], state["batch_rows"], strict=True
            )
        }
        self._total = load_tree_state(state["total"])
        self._total_rows = int(state["total_rows"])


class _KeyedSteps:
    """What :func:`~pyro_mm.infer.fit_loop.fit_loop` steps: the ``i``-th batch of a pass goes
    to ``fitter.step`` under key ``i``."""

    def __init__(self, fitter: FiniteSumMM, num_batches: int):
        self.fitter, self.num_batches, self.position = fitter, num_batches, 0

    def step(self, x, y) -> float:
        key = self.position % self.num_batches
        self.position += 1
        return self.fitter.step(x, y, key)

    @property
    def samples_seen(self) -> int:
        return self.fitter.samples_seen

    @property
    def history(self):
        return self.fitter.history
