r"""The robust tensor power method (Anandkumar et al., 2014, Algorithm 1) for an orthogonally
decomposable symmetric tensor ``T = sum_i lambda_i v_i^{(x)3}`` (``v_i`` orthonormal).

Each component: ``restarts`` random unit starts, ``iterations`` power steps
``theta <- T(I, theta, theta) / ||T(I, theta, theta)||`` each, keep the start with the largest
``|T(theta, theta, theta)|``, polish it, then deflate ``T <- T - lambda theta^{(x)3}``. The
tensor is the small whitened ``k x k x k`` one, so every step costs ``O(k^3)``.
"""

import dataclasses

import torch

__all__ = ["TensorDecomposition", "tensor_power_method"]


@dataclasses.dataclass
class TensorDecomposition:
    """Outcome of :func:`tensor_power_method`.

    :ivar torch.Tensor eigenvalues: ``(r,)`` ``lambda_i >= 0`` (the sign is moved into ``v_i``:
        for an odd-order tensor ``(lambda, v)`` and ``(-lambda, -v)`` are the same term).
    :ivar torch.Tensor eigenvectors: ``(r, k)`` unit rows ``v_i``.
    :ivar float residual: Frobenius norm of the deflated tensor left over.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residual: float


def _power_iterations(tensor, theta, iterations, tol):
    for _ in range(iterations):
        image = torch.einsum("abc,...b,...c->...a", tensor, theta, theta)
        image = image / image.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        # An odd tensor may send theta to -theta (negative eigenvalue): compare up to sign.
        change = 1 - (image * theta).sum(-1).abs()
        theta = image
        if change.max() < tol:
            break
    return theta


def tensor_power_method(
    tensor: torch.Tensor,
    rank: int,
    *,
    restarts: int = 10,
    iterations: int = 100,
    tol: float = 1e-14,
    generator: torch.Generator = None,
) -> TensorDecomposition:
    """Decomposes a symmetric ``(k, k, k)`` tensor into ``rank`` orthogonal rank-one terms.

    :param torch.Tensor tensor: symmetric ``(k, k, k)`` tensor.
    :param int rank: number of components ``r <= k``.
    :param int restarts: random starts per component.
    :param int iterations: power steps per start (and for the final polish).
    :param float tol: stop a start when ``1 - |<theta_new, theta>| < tol``.
    :param torch.Generator generator: source of the random starts.
    """
    size = tensor.shape[0]
    if tensor.shape != (size, size, size):
        raise ValueError(f"tensor must be cubical (k, k, k), got {tuple(tensor.shape)}")
    if not 1 <= rank <= size:
        raise ValueError(f"rank must be in [1, {size}], got {rank}")
    if restarts < 1 or iterations < 1:
        raise ValueError(f"restarts and iterations must be >= 1, got {restarts}, {iterations}")
    residual = tensor.clone()
    eigenvalues, eigenvectors = [], []
    for _ in range(rank):
        starts = torch.randn(restarts, size, generator=generator, dtype=tensor.dtype)
        starts = starts / starts.norm(dim=-1, keepdim=True)
        candidates = _power_iterations(residual, starts, iterations, tol)
        values = torch.einsum("abc,na,nb,nc->n", residual, candidates, candidates, candidates)
        best = candidates[values.abs().argmax()]
        theta = _power_iterations(residual, best.unsqueeze(0), iterations, tol)[0]
        value = torch.einsum("abc,a,b,c->", residual, theta, theta, theta)
        if value < 0:
            value, theta = -value, -theta
        residual = residual - value * torch.einsum("a,b,c->abc", theta, theta, theta)
        eigenvalues.append(value)
        eigenvectors.append(theta)
    return TensorDecomposition(
        torch.stack(eigenvalues), torch.stack(eigenvectors), residual.norm().item()
    )
