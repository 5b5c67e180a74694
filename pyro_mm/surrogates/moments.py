"""Weighted second-moment matrices of a batch, formed a cache-sized chunk of rows at a time.

Every Gaussian statistic of the MM surrogate (and the multinomial experts' Gram matrices) is a
block of a weighted sum ``sum_n w_jn z_n z_n^T`` over the rows of a batch, one per weight vector
``w_j`` (an expert's responsibilities, the gate's per-sample curvature). The plain formula forms
the weighted copy ``w_j z_n`` of the whole batch, ``J W N`` entries, and multiplies it by the
design. Once that copy outgrows a core's cache -- large batches, many experts or features --
writing and re-reading it costs more than the products (at 65536 rows, P = 50, K = 8 it is
214 MB), so :func:`weighted_moments` takes the rows in chunks whose weighted copy fits in
:data:`CHUNK_BYTES` and sums the chunks' moments.
"""

import torch

__all__ = ["weighted_moments", "weighted_gram", "weighted_outer_products"]

#: Bytes of the weighted design formed at once by :func:`weighted_moments` (about half of a
#: core's L2 cache on current x86 servers) ...
CHUNK_BYTES = 2**20
#: ... and the fewest rows per chunk: shorter chunks cost more in per-product overhead than
#: the cache saves (measured at P = 50, K = 8: 1024-row chunks fastest).
MIN_CHUNK_ROWS = 1024


def weighted_moments(weights: torch.Tensor, design: torch.Tensor) -> torch.Tensor:
    """``sum_n w_jn z_n z_n^T`` for each row ``w_j`` of ``weights`` ``(J, N)`` and the columns
    ``z_n`` of ``design`` ``(W, N)``: ``(J, W, W)``.

    ``weights`` should be contiguous: weighting by a transposed ``(N, J)`` view was 7x slower
    (4096 rows). ``design`` may be either layout: a contiguous feature-major tensor (as the
    one-pass Gaussian statistics build it) or the transposed view of a contiguous row-major
    ``(N, W)`` tensor, which the product then reads row by row (the faster form for a batch
    that arrives row-major: no transposing copy). Rows are taken in chunks of at least
    :data:`MIN_CHUNK_ROWS` whose weighted copy fits in :data:`CHUNK_BYTES`, and the chunks'
    moments summed. For the moments alone at 65536 rows (one core) this was 1.2-1.3x faster
    than the whole-batch product at P = 10, K = 2 and 2-4x at P = 50 or K = 8; a batch of
    4096 rows at K = 2, P = 10 stays one chunk.
    """
    num_weights, (width, num_rows) = weights.shape[0], design.shape
    chunk_rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES // (num_weights * width * design.element_size()))
    if num_rows <= chunk_rows:
        return (weights.unsqueeze(1) * design) @ design.T
    return _sum_over_row_chunks(
        num_rows,
        chunk_rows,
        lambda rows: (weights[:, rows].unsqueeze(1) * design[:, rows]) @ design[:, rows].T,
    )


def weighted_gram(weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``avg_n w_nj r_n r_n^T`` for each column ``w_j`` of ``weights`` ``(N, J)`` and the rows
    ``r_n`` of ``features`` ``(N, D)``: ``(J, D, D)``, by :func:`weighted_moments` (the
    features read row-major, the weights made contiguous)."""
    return weighted_moments(weights.T.contiguous(), features.T) / features.shape[0]


def weighted_outer_products(weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``sum_n w_nj r_n r_n^T`` for each column ``w_j`` of ``weights`` ``(N, J)`` and the rows
    ``r_n`` of ``features`` ``(N, D)``: ``(J, D, D)``, the sums of :func:`weighted_moments` as
    one product of the weights with the rows' outer products ``r_n r_n^T``.

    The better form when there are many weight vectors against ``D`` (the Jebara-Choromanska
    bound's per-sample curvature blocks: ``J = K (M - 1)^2``): its copy has ``N D^2`` entries
    instead of ``J N D``. That copy is formed per chunk of rows (of at most
    :data:`CHUNK_BYTES` where that leaves at least :data:`MIN_CHUNK_ROWS` rows, else of that
    many rows), so memory does not grow with ``N`` (at 65536 rows and ``D = 65`` the
    whole-batch outer products were 2.1 GB); measured 1.1x faster than the whole-batch form at
    1797 rows and 1.8x at 65536 rows (``J = 162``, ``D = 65``, one core).
    """
    num_rows, num_features = features.shape
    chunk_rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES // (num_features**2 * features.element_size()))

    def part(rows: slice) -> torch.Tensor:
        chunk = features[rows]
        return weights[rows].T @ (chunk.unsqueeze(-1) * chunk.unsqueeze(-2)).flatten(1)

    sums = _sum_over_row_chunks(num_rows, chunk_rows, part)
    return sums.reshape(-1, num_features, num_features)


def _sum_over_row_chunks(num_rows: int, chunk_rows: int, part) -> torch.Tensor:
    """``sum part(rows)`` over consecutive slices ``rows`` of at most ``chunk_rows`` rows."""
    total = None
    for start in range(0, num_rows, chunk_rows):
        value = part(slice(start, start + chunk_rows))
        total = value if total is None else total.add_(value)
    return total
