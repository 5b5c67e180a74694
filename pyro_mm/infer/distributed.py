r"""Data-parallel incremental MM over ``torch.distributed``.

Every statistic of the MM surrogate is a batch *average*. With rank ``r`` holding ``n_r`` rows
and averages ``s_r``, the average over the union of the ranks' batches is

.. math:: \bar s = \frac{\sum_r n_r s_r}{\sum_r n_r},

so each rank multiplies its averages by its row count, one ``all_reduce(SUM)`` adds them (with the
row counts, the log-likelihood sums and an error flag in the same buffer), and each rank divides by
the total. Unequal shard sizes are weighted exactly. Every rank then holds the same statistics and
computes the same closed-form solve, so all ranks hold the same parameters: that of one process fed
the concatenation of the ranks' batches.

Launch (one process per shard, any number of nodes, gloo on CPUs) with ``torchrun``; on each of
the two nodes below::

    torchrun --nnodes=2 --nproc-per-node=4 --rdzv-id=moe-fit --rdzv-backend=c10d \
        --rdzv-endpoint=$HEAD_NODE:29500 fit.py

(or the static form ``--nnodes=2 --node-rank=0|1 --master-addr=$HEAD_NODE --master-port=29500``;
on hosts with several network interfaces set ``GLOO_SOCKET_IFNAME`` to the one the nodes share),
with, in ``fit.py``::

    import torch.distributed as dist
    from pyro_mm import GaussianMoE, IncrementalMM
    from pyro_mm.datasets.csv_stream import CsvBatchStream

    dist.init_process_group("gloo")          # reads RANK, WORLD_SIZE, MASTER_ADDR from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    infer = IncrementalMM(GaussianMoE(2, 10))   # reduces over the default process group
    for x, y in CsvBatchStream(f"shard-{rank:03d}-of-{world:03d}.csv", target="y"):
        loss = infer.step(x, y)              # every rank takes the same number of steps
    if rank == 0:
        torch.save(infer.state_dict(), "checkpoint.pt")
    dist.destroy_process_group()

Every rank builds the same model and options; the initial parameters are the first rank's (for
``init="auto"``: K-means on its first batch), broadcast to the others. The shards may differ in
size and so may the ranks' batches at a step, but every rank must take the same number of steps,
each with at least one row (e.g. stop all ranks at the shortest shard's last full batch). To
resume, every rank loads the same checkpoint with ``infer.load_state_dict(torch.load(path))``.
"""

import dataclasses

import torch

from ..models.params import tree_leaves
from .state import tree_unflatten

__all__ = [
    "ReducedBatch",
    "resolve_process_group",
    "all_reduce_batch",
    "agree_on_failure",
    "broadcast_tree",
]


def resolve_process_group(process_group):
    """The process group an inference class reduces over, or ``None`` for a single process.

    :param process_group: ``None`` (the default group when ``torch.distributed`` is initialised
        with more than one rank, else single process), ``False`` (single process even when
        ``torch.distributed`` is initialised) or a process group.
    """
    if process_group is False:
        return None
    import torch.distributed as dist

    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    if dist.get_world_size(process_group) < 2:
        return None
    return process_group


@dataclasses.dataclass
class ReducedBatch:
    """A mini-batch's statistics averaged over the ranks.

    :ivar statistics: the statistics averaged over all ranks' rows (``None`` when a rank failed).
    :ivar float log_lik_sum: the log-likelihood summed over all ranks' rows.
    :ivar int num_rows: rows over all ranks.
    :ivar int failed_ranks: number of ranks that could not compute their statistics.
    """

    statistics: object
    log_lik_sum: float
    num_rows: int
    failed_ranks: int


def all_reduce_batch(group, statistics, template, log_lik_sum, num_rows: int) -> ReducedBatch:
    """Row-count-weighted average of per-rank batch averages, in one ``all_reduce``.

    :param group: the process group (``None``: this process alone, no communication).
    :param statistics: this rank's batch averages (a dataclass tree of tensors), or ``None``
        when this rank failed (it then contributes zeros and raises the failure flag).
    :param template: a tree shaped like the statistics (used when ``statistics`` is ``None``).
    :param log_lik_sum: this rank's summed log-likelihood (a 0-d tensor or a float).
    :param int num_rows: this rank's number of rows.
    """
    failed = statistics is None
    if group is None:
        return ReducedBatch(statistics, float(log_lik_sum), num_rows, int(failed))
    import torch.distributed as dist

    source = template if failed else statistics
    leaves = tree_leaves(source)
    # float64 whatever the statistics' dtype: row counts and log-likelihood sums stay exact.
    weight = 0.0 if failed else float(num_rows)
    parts = [leaf.reshape(-1).double() * weight for leaf in leaves]
    counters = torch.tensor(
        [0.0 if failed else float(log_lik_sum), weight, float(failed)], dtype=torch.float64
    )
    buffer = torch.cat(parts + [counters])
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    log_lik_total, rows, failures = buffer[-3:].tolist()
    if failures:
        return ReducedBatch(None, log_lik_total, int(rows), int(failures))
    averaged = tree_unflatten(source, _split(buffer[:-3] / rows, leaves))
    return ReducedBatch(averaged, log_lik_total, int(rows), 0)


def agree_on_failure(group, failed: bool) -> int:
    """Number of ranks reporting a failure (a flag-only ``all_reduce``; ``int(failed)`` alone)."""
    if group is None:
        return int(failed)
    import torch.distributed as dist

    flag = torch.tensor([float(failed)], dtype=torch.float64)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=group)
    return int(flag.item())


def broadcast_tree(group, tree):
    """The tree of the group's first rank, on every rank (one ``broadcast``; ``tree`` alone)."""
    if group is None:
        return tree
    import torch.distributed as dist

    leaves = tree_leaves(tree)
    buffer = torch.cat([leaf.reshape(-1).double() for leaf in leaves])
    dist.broadcast(buffer, src=dist.get_global_rank(group, 0), group=group)
    return tree_unflatten(tree, _split(buffer, leaves))


def _split(buffer: torch.Tensor, leaves) -> list:
    """The consecutive pieces of a flat float64 ``buffer`` shaped and typed like ``leaves``."""
    pieces = buffer.split([leaf.numel() for leaf in leaves])
    return [piece.reshape(leaf.shape).to(leaf.dtype) for piece, leaf in zip(pieces, leaves)]
