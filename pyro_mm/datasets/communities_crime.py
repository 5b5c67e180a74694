"""The UCI Communities and Crime data set (normalised version), shipped with the package.

M. Redmond, "Communities and Crime", UCI Machine Learning Repository (2009),
DOI 10.24432/C53W3X, licensed CC BY 4.0 (see :func:`communities_crime_license`). It is the
second real data set of the incremental-MM paper (Section 5.4.2, Table 7). The file is read from
the installed package; nothing is ever downloaded.
"""

from importlib import resources
from typing import NamedTuple, Tuple

import torch

__all__ = [
    "CommunitiesCrime",
    "load_communities_crime",
    "communities_crime_license",
    "COMMUNITIES_CRIME_TARGET",
    "COMMUNITIES_CRIME_IDENTIFIERS",
]

#: the regression target, violent crimes per 100K population (scaled to [0, 1]).
COMMUNITIES_CRIME_TARGET = "ViolentCrimesPerPop"
#: columns that identify a community or hold the data set's own fold split: never predictors.
COMMUNITIES_CRIME_IDENTIFIERS = ("state", "county", "community", "communityname", "fold")

_DATA_FILE = "communities_crime.csv.gz"
_LICENSE_FILE = "communities_crime_LICENSE.txt"
_MISSING_POLICIES = ("drop-columns", "drop-rows", "keep")


class CommunitiesCrime(NamedTuple):
    """The data set as tensors; unpacks as ``x, y, feature_names = load_communities_crime()``.

    :ivar torch.Tensor x: ``(N, P)`` predictive attributes, each in ``[0, 1]``.
    :ivar torch.Tensor y: ``(N,)`` the target ``ViolentCrimesPerPop``, in ``[0, 1]``.
    :ivar tuple feature_names: the ``P`` column names of ``x``, in order.
    """

    x: torch.Tensor
    y: torch.Tensor
    feature_names: Tuple[str, ...]


def _data_path(name: str):
    return resources.files("pyro_mm.datasets").joinpath("data", name)


def communities_crime_license() -> str:
    """The source, citation and licence (CC BY 4.0) of the shipped data file, as text."""
    return _data_path(_LICENSE_FILE).read_text(encoding="utf-8")


def load_communities_crime(
    *, missing: str = "drop-columns", dtype: torch.dtype = torch.float64
) -> CommunitiesCrime:
    """Loads the 1,994 communities from the copy shipped inside the package.

    The identifier columns (``state, county, community, communityname, fold``) are never
    returned as predictors. Missing values are written ``?`` in the file; they occur only in
    ``OtherPerCap`` (one community) and in the 22 LEMAS police attributes (1,675 of the 1,994
    communities, 84 %), never in the target. How they are handled is chosen explicitly:

    * ``"drop-columns"`` (default): every attribute with at least one missing value is dropped,
      so all 1,994 rows are kept with the 99 fully observed attributes. The rule depends on the
      file only (not on any split), so it leaks nothing between training and test folds.
    * ``"drop-rows"``: all 122 attributes are kept and every community with a missing attribute
      is dropped (319 rows remain: the communities the LEMAS survey covered).
    * ``"keep"``: all 1,994 rows and 122 attributes, with ``NaN`` where the file has ``?``; the
      caller imputes (inside each training fold, to avoid leakage) before fitting.

    :param str missing: the missing-value policy: ``"drop-columns"``, ``"drop-rows"`` or
        ``"keep"``.
    :param torch.dtype dtype: floating dtype of ``x`` and ``y``.
    :returns: a :class:`CommunitiesCrime` ``(x, y, feature_names)``.
    """
    import pandas as pd

    if missing not in _MISSING_POLICIES:
        raise ValueError(f"missing must be one of {_MISSING_POLICIES}, got {missing!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
    with _data_path(_DATA_FILE).open("rb") as handle:
        # Only "?" marks a missing value in this file; pandas' other defaults ("NA", "") are off.
        frame = pd.read_csv(handle, compression="gzip", na_values=["?"], keep_default_na=False)
    attributes = frame.drop(columns=[*COMMUNITIES_CRIME_IDENTIFIERS, COMMUNITIES_CRIME_TARGET])
    target = frame[COMMUNITIES_CRIME_TARGET]
    if missing == "drop-columns":
        attributes = attributes.loc[:, attributes.notna().all()]
    elif missing == "drop-rows":
        complete = attributes.notna().all(axis=1)
        attributes, target = attributes[complete], target[complete]
    x = torch.tensor(attributes.to_numpy(dtype="float64"), dtype=dtype)
    y = torch.tensor(target.to_numpy(dtype="float64"), dtype=dtype)
    return CommunitiesCrime(x=x, y=y, feature_names=tuple(attributes.columns))
