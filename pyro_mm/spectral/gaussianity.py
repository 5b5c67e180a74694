"""Is ``x`` plausibly a sample of ``N(0, I_d)``? The spectral method's constants and Stein's
identity both assume it, so inputs that fail these tests get a warning (not an error: the paper
reports usable fits on Gaussian-mixture inputs too)."""

import math
import warnings

import torch

__all__ = ["NonGaussianInputWarning", "standard_gaussian_pvalues", "warn_if_not_standard_gaussian"]

# Mardia's skewness needs an N x N Gram matrix; beyond this many rows an evenly spaced subsample
# keeps it at O(_SKEWNESS_ROWS^2 d) work.
_SKEWNESS_ROWS = 4000


class NonGaussianInputWarning(UserWarning):
    """The inputs do not look like a standard Gaussian sample."""


def _normal_two_sided(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def _chi2_sf(statistic: float, dof: float) -> float:
    """``P(chi2(dof) > statistic)``: the regularised upper incomplete gamma function."""
    return torch.special.gammaincc(
        torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2, dtype=torch.float64)
    ).item()


def _standardise(x: torch.Tensor):
    """Eigenvalues of the (MLE) covariance and the rows whitened by their own mean/covariance."""
    centred = x - x.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / x.shape[0])
    if eigenvalues.min() <= 1e-12 * eigenvalues.max().clamp_min(1e-300):
        raise ValueError("x has (nearly) linearly dependent columns: its covariance is singular")
    return eigenvalues, centred @ (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T


def standard_gaussian_pvalues(x: torch.Tensor) -> dict:
    """p-values of four tests of ``x ~ N(0, I_d)`` (rows i.i.d.):

    * ``mean``: ``N ||mean||^2 ~ chi2(d)``;
    * ``covariance``: likelihood ratio ``N (tr S - log det S - d) ~ chi2(d (d + 1) / 2)`` of
      ``Cov = I`` (``S`` the sample covariance);
    * ``skewness``, ``kurtosis``: Mardia's tests on the standardised rows (rotation invariant).

    :param torch.Tensor x: ``(N, d)`` inputs, ``N > d``.
    :returns: ``{"mean": p, "covariance": p, "skewness": p, "kurtosis": p}``.
    """
    x = x.to(torch.float64)
    num_rows, dim = x.shape
    mean = x.mean(0)
    eigenvalues, standardised = _standardise(x)
    p_mean = _chi2_sf(num_rows * mean.square().sum().item(), dim)
    likelihood_ratio = num_rows * (eigenvalues.sum() - eigenvalues.log().sum() - dim).item()
    p_cov = _chi2_sf(likelihood_ratio, dim * (dim + 1) / 2)
    kurtosis = standardised.square().sum(-1).square().mean().item()
    z_kurtosis = (kurtosis - dim * (dim + 2)) / math.sqrt(8 * dim * (dim + 2) / num_rows)
    # Mardia's chi2 limit holds for rows standardised by their own mean and covariance: a
    # subsample is re-standardised, not cut out of the full sample's standardisation.
    sub = x[:: max(1, num_rows // _SKEWNESS_ROWS)]
    sub = _standardise(sub)[1] if sub.shape[0] < num_rows else standardised
    skewness = (sub @ sub.T).pow(3).mean().item()
    p_skew = _chi2_sf(sub.shape[0] * skewness / 6, dim * (dim + 1) * (dim + 2) / 6)
    return {
        "mean": p_mean,
        "covariance": p_cov,
        "skewness": p_skew,
        "kurtosis": _normal_two_sided(z_kurtosis),
    }


def warn_if_not_standard_gaussian(x: torch.Tensor, level: float = 1e-3, stacklevel: int = 3):
    """Warns (:class:`NonGaussianInputWarning`) when a test of :func:`standard_gaussian_pvalues`
    rejects at ``level``; returns the p-values."""
    pvalues = standard_gaussian_pvalues(x)
    failed = {name: p for name, p in pvalues.items() if p < level}
    if failed:
        listed = ", ".join(f"{name} p={p:.2g}" for name, p in failed.items())
        warnings.warn(
            f"x does not look like a standard Gaussian sample ({listed}); the spectral method "
            f"assumes x ~ N(0, I_d): standardise x, or pass a GaussianMixtureScore fitted to x. "
            f"The expert estimates may be biased.",
            NonGaussianInputWarning,
            stacklevel=stacklevel,
        )
    return pvalues
