"""Data: seeded synthetic generators and bundled real data sets."""

from .synthetic import gaussian_moe_stream, gaussian_moe_truth, sample_gaussian_moe

__all__ = ["gaussian_moe_stream", "gaussian_moe_truth", "sample_gaussian_moe"]
