r"""Quadratic upper bounds on the curvature of the softmax log-partition.

For ``K`` classes with a reference class, ``lse(eta) = log(1 + sum_{k<K} exp(eta_k))`` has
Hessian ``diag(p) - p p^T`` in the ``K - 1`` free logits. A constant matrix ``C`` with
``C >= diag(p) - p p^T`` for every ``p`` on the simplex turns ``lse`` into a quadratic majoriser,
and with linear logits ``eta = W u`` the Hessian in ``vec(W)`` is bounded by ``C (x) u u^T``.
"""

import math

import torch

__all__ = [
    "SOFTMAX_BOUNDS",
    "GATE_BOUNDS",
    "JaakkolaJordanBound",
    "JebaraChoromanskaBound",
    "kronecker_left",
    "softmax_curvature",
    "solve_kronecker",
    "kronecker_quadratic_value",
]

#: Names of the available curvature bounds.
SOFTMAX_BOUNDS = ("bohning", "paper")
#: Names of the bounds a two-expert gate also accepts: the per-sample Jaakkola-Jordan bound.
GATE_BOUNDS = SOFTMAX_BOUNDS + ("jaakkola-jordan",)


class JaakkolaJordanBound:
    r"""The Jaakkola-Jordan (2000) bound of the logistic log-partition, touching at each sample.

    For one free logit ``eta`` (two classes), with ``f(eta) = log(1 + e^eta)``,

    .. math:: f(\eta) \le f(\xi) + f'(\xi)(\eta - \xi) + \lambda(\xi)(\eta - \xi)^2,
        \qquad \lambda(\xi) = \frac{\tanh(\xi / 2)}{4 \xi}, \quad \lambda(0) = 1/8,

    equal at ``eta = xi`` (and ``eta = -xi``). With ``xi`` the sample's current logit
    ``omega_n^T u``, the curvature ``2 lambda(xi) <= 1/4`` replaces Böhning's constant ``1/4``
    per sample: the gate's quadratic term becomes the weighted Gram matrix
    ``avg(2 lambda(xi_n) u u^T)`` (still closed form, still an exponential-family surrogate),
    tighter wherever the gate is confident.

    :param torch.dtype dtype: dtype of :attr:`left`.
    """

    def __init__(self, dtype=torch.float64):
        #: The Kronecker left factor: the curvature lives in the (weighted) Gram matrix.
        self.left = torch.ones(1, 1, dtype=dtype)

    @staticmethod
    def sample_curvature(logits: torch.Tensor) -> torch.Tensor:
        """``2 lambda(xi) = tanh(xi / 2) / (2 xi)`` element-wise (``1/4`` at ``xi = 0``)."""
        small = logits.abs() < 1e-4
        safe = torch.where(small, torch.ones_like(logits), logits)
        # Series tanh(z)/z = 1 - z^2/3 + O(z^4) with z = xi/2 below 1e-4 (error < 1e-17).
        return torch.where(small, 0.25 - logits.square() / 48, torch.tanh(safe / 2) / (2 * safe))

    def __repr__(self) -> str:
        return "JaakkolaJordanBound()"


class JebaraChoromanskaBound:
    r"""The per-sample quadratic bound of the softmax log-partition of Jebara and Choromanska
    (2012, "Majorization for CRFs and latent likelihoods", Algorithm 1), touching at each sample.

    For ``M`` classes with free logits ``eta`` (reference class at zero) and
    ``lse(eta) = log(1 + sum_{m<M} exp(eta_m))``,

    .. math:: \mathrm{lse}(\eta) \le \mathrm{lse}(\xi) + p(\xi)^\top (\eta - \xi)
        + \tfrac12 (\eta - \xi)^\top \Sigma(\xi) (\eta - \xi)

    for every ``eta``, with equality (and equal gradients) at the expansion point ``xi``.
    ``Sigma(xi)`` is built by adding the classes one at a time: with the running partial sum
    ``z``, the running mean ``mu`` of the class indicators ``f_j`` (``e_j``, the reference ``0``)
    and ``alpha_j = exp(xi_j)``, each class adds ``2 lambda(log(alpha_j / z)) l l^T`` with
    ``l = f_j - mu`` and ``lambda`` the Jaakkola-Jordan coefficient (each addition is that
    logistic bound of ``log(1 + alpha_j e^{...} / z)``). For two classes it is the Jaakkola-Jordan
    bound. The classes are added in decreasing order of ``xi`` (any order gives a valid bound;
    this one is tightest for a confident softmax, where the later classes' ``|log(alpha_j /
    z)|`` is large). Unlike Böhning's constant ``C`` it shrinks where the softmax is confident
    (it decays like ``1 / margin``; Böhning's largest eigenvalue stays ``1/2``), so an MM step
    moves confident experts much further; it is not uniformly below ``C``
    (``tests/test_multinomial_moe.py`` checks the majorisation and touching).

    :param torch.dtype dtype: dtype of the curvatures.
    """

    def __init__(self, dtype=torch.float64):
        self.dtype = dtype

    def sample_curvature(self, logits: torch.Tensor) -> torch.Tensor:
        """``Sigma(xi)`` of shape ``(..., M - 1, M - 1)`` for free logits ``(..., M - 1)``."""
        full = torch.nn.functional.pad(logits, (0, 1))
        num_classes = full.shape[-1]
        order = full.argsort(-1, descending=True)
        indicators = torch.eye(num_classes, num_classes - 1, dtype=logits.dtype)[order]
        log_alpha = full.gather(-1, order)
        mean, log_total = indicators[..., 0, :], log_alpha[..., 0]
        curvature = logits.new_zeros(logits.shape + logits.shape[-1:])
        for j in range(1, num_classes):
            centred = indicators[..., j, :] - mean
            log_ratio = log_alpha[..., j] - log_total
            coefficient = JaakkolaJordanBound.sample_curvature(log_ratio)
            curvature = curvature + coefficient[..., None, None] * (
                centred.unsqueeze(-1) * centred.unsqueeze(-2)
            )
            mean = mean + torch.sigmoid(log_ratio).unsqueeze(-1) * centred
            log_total = torch.logaddexp(log_total, log_alpha[..., j])
        return curvature

    def __repr__(self) -> str:
        return "JebaraChoromanskaBound()"


def kronecker_left(curvature) -> torch.Tensor:
    """The left Kronecker factor of the gate's curvature: ``C`` for a constant bound, ``[[1]]``
    for a :class:`JaakkolaJordanBound` (whose curvature is inside the Gram matrix)."""
    if isinstance(curvature, JaakkolaJordanBound):
        return curvature.left
    return curvature


def softmax_curvature(num_free: int, bound: str = "bohning", dtype=torch.float64) -> torch.Tensor:
    r"""The constant curvature bound ``C`` of shape ``(num_free, num_free)``.

    * ``"bohning"``: ``C = 1/2 (I - 1 1^T / K)`` (Böhning, 1992), the tightest of the classical
      bounds; for ``K = 2`` it is ``1/4``.
    * ``"paper"``: ``C = 3/4 I - 1 1^T / (2 (K - 1))``, the incremental-MM paper's eq. (16); it
      dominates Böhning's bound (their difference ``1/4 I - 1 1^T / (2K(K-1))`` is PSD), equals
      it for ``K = 2``, and gives shorter steps for ``K >= 3``.

    * ``"jaakkola-jordan"`` (two classes only): not a constant, a :class:`JaakkolaJordanBound`
      whose per-sample curvature the gate block evaluates at the current logits.

    :param int num_free: number of free logits ``K - 1``.
    :param str bound: ``"bohning"``, ``"paper"`` or ``"jaakkola-jordan"``.
    """
    if bound == "jaakkola-jordan":
        if num_free != 1:
            raise ValueError(
                f"the Jaakkola-Jordan bound is for two classes (one free logit), got "
                f"{num_free + 1}; use 'bohning' or 'paper'"
            )
        return JaakkolaJordanBound(dtype)
    if bound not in SOFTMAX_BOUNDS:
        raise ValueError(f"unknown softmax bound {bound!r}; choose one of {SOFTMAX_BOUNDS}")
    eye = torch.eye(num_free, dtype=dtype)
    ones = torch.ones(num_free, num_free, dtype=dtype)
    if bound == "bohning":
        return 0.5 * (eye - ones / (num_free + 1))
    return 0.75 * eye - ones / (2 * num_free)


def solve_kronecker(
    left: torch.Tensor, right: torch.Tensor, shift: float, rhs: torch.Tensor
) -> torch.Tensor:
    r"""Solves ``(left (x) right + shift I) vec(W) = vec(rhs)`` for ``W`` without forming the
    Kronecker product.

    With row-major ``vec``, ``(A (x) B) vec(W) = vec(A W B^T)``; eigendecompositions
    ``A = U a U^T`` and ``B = V b V^T`` diagonalise the system:
    ``W = U [(U^T rhs V) / (a_i b_j + shift)] V^T``. Cost ``O(m^3 + d^3)`` instead of
    ``O(m^3 d^3)``.

    Batched over leading dimensions of ``right``, ``rhs`` and ``shift`` (one system per
    expert, sharing ``left``).

    :param torch.Tensor left: symmetric ``(m, m)`` matrix.
    :param torch.Tensor right: symmetric PSD ``(..., d, d)`` matrix.
    :param shift: non-negative diagonal shift (keeps the system definite), a float or a tensor
        of the batch shape ``(...)``.
    :param torch.Tensor rhs: ``(..., m, d)`` right-hand side.
    """
    try:
        left_values, left_vectors = torch.linalg.eigh(left)
        right_values, right_vectors = torch.linalg.eigh(right)
    except torch.linalg.LinAlgError:
        if all(bool(torch.isfinite(t).all()) for t in (left, right, rhs)):
            raise
        # Overflowing statistics: the solution is undefined. NaN lets the callers' finiteness
        # checks name the problem, where eigh's error would not.
        batch = torch.broadcast_shapes(right.shape[:-2], rhs.shape[:-2])
        return torch.full(batch + rhs.shape[-2:], math.nan, dtype=rhs.dtype, device=rhs.device)
    # A Gram matrix can come out of eigh with tiny negative eigenvalues: clamp them to zero.
    right_values = right_values.clamp_min(0.0)
    shift = torch.as_tensor(shift, dtype=rhs.dtype, device=rhs.device)[..., None, None]
    denominator = left_values.unsqueeze(-1) * right_values.unsqueeze(-2) + shift
    rotated = left_vectors.T @ rhs @ right_vectors
    return left_vectors @ (rotated / denominator) @ right_vectors.transpose(-1, -2)


def kronecker_quadratic_value(
    left: torch.Tensor, right: torch.Tensor, shift, rhs: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    r"""The quadratic ``1/2 vec(W)^T (left (x) right + shift I) vec(W) - <rhs, W>`` whose
    minimiser is :func:`solve_kronecker` ``(left, right, shift, rhs)``, summed over the batch.

    :param torch.Tensor weight: ``(..., m, d)`` the point ``W`` to evaluate at; the other
        arguments as in :func:`solve_kronecker`.
    """
    shift = torch.as_tensor(shift, dtype=weight.dtype, device=weight.device)
    quadratic = (weight * (left @ weight @ right)).sum((-2, -1))
    quadratic = quadratic + shift * weight.square().sum((-2, -1))
    return (0.5 * quadratic - (rhs * weight).sum((-2, -1))).sum()
