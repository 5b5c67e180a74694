"""The least-squares fallback of the closed-form solves, safe on overflowing statistics."""

import math

import torch

__all__ = ["least_squares"]


def least_squares(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``argmin_w ||system w - rhs||`` (batched), for systems a Cholesky factorisation refused.

    A system with an infinite or NaN entry (statistics that overflowed the dtype) has no
    meaningful solution: it returns NaN, which the fitters' finiteness checks report with a
    message about the data. LAPACK's least squares refuses such input, and on some machines
    (MKL, AVX-512) with an internal-assert ``RuntimeError`` that names nothing.
    """
    if not bool(torch.isfinite(system).all()):
        batch = torch.broadcast_shapes(system.shape[:-2], rhs.shape[:-2])
        shape = batch + (system.shape[-1], rhs.shape[-1])
        return torch.full(shape, math.nan, dtype=rhs.dtype, device=rhs.device)
    return torch.linalg.lstsq(system, rhs).solution
