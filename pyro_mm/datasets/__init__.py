"""Data: seeded synthetic generators and bundled real data sets."""

from .communities_crime import (
    COMMUNITIES_CRIME_IDENTIFIERS,
    COMMUNITIES_CRIME_TARGET,
    CommunitiesCrime,
    communities_crime_license,
    load_communities_crime,
)
from .csv_stream import CsvBatchStream
from .paper_synthetic import (
    PaperSyntheticData,
    algorithm4_truth,
    from_paper_layout,
    low_dimensional_truth,
    paper_synthetic,
)
from .synthetic import gaussian_moe_stream, gaussian_moe_truth, sample_gaussian_moe

__all__ = [
    "COMMUNITIES_CRIME_IDENTIFIERS",
    "COMMUNITIES_CRIME_TARGET",
    "CommunitiesCrime",
    "CsvBatchStream",
    "PaperSyntheticData",
    "algorithm4_truth",
    "communities_crime_license",
    "from_paper_layout",
    "gaussian_moe_stream",
    "gaussian_moe_truth",
    "load_communities_crime",
    "low_dimensional_truth",
    "paper_synthetic",
    "sample_gaussian_moe",
]
