"""Diagnostics: ArviZ ``InferenceData`` from any fit, a Laplace posterior, label switching.

ArviZ is imported only when :func:`to_inference_data` is called, so ``import pyro_mm`` and
``import pyro_mm.diagnostics`` stay light.
"""

from .choose_k import KSelection, choose_num_experts, num_free_parameters
from .inference_data import SUPPORTED_ARVIZ, to_inference_data
from .label_switching import align_draws
from .laplace import LaplacePosterior, laplace_posterior

__all__ = [
    "SUPPORTED_ARVIZ",
    "KSelection",
    "LaplacePosterior",
    "align_draws",
    "choose_num_experts",
    "laplace_posterior",
    "num_free_parameters",
    "to_inference_data",
]
