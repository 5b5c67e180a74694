"""Data: seeded synthetic generators and bundled real data sets."""

from .communities_crime import (
    COMMUNITIES_CRIME_IDENTIFIERS,
    COMMUNITIES_CRIME_TARGET,
    CommunitiesCrime,
    communities_crime_license,
    load_communities_crime,
)
from .csv_stream import CsvBatchStream
from .synthetic import gaussian_moe_stream, gaussian_moe_truth, sample_gaussian_moe

__all__ = [
    "COMMUNITIES_CRIME_IDENTIFIERS",
    "COMMUNITIES_CRIME_TARGET",
    "CommunitiesCrime",
    "CsvBatchStream",
    "communities_crime_license",
    "gaussian_moe_stream",
    "gaussian_moe_truth",
    "load_communities_crime",
    "sample_gaussian_moe",
]
