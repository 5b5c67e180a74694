import gzip
from importlib import resources

import pandas as pd
import pytest
import torch

from pyro_mm.datasets import (
    COMMUNITIES_CRIME_IDENTIFIERS,
    COMMUNITIES_CRIME_TARGET,
    communities_crime_license,
    load_communities_crime,
)

DATA_DIR = resources.files("pyro_mm.datasets").joinpath("data")

# The 22 LEMAS police attributes, missing for 1,675 of the 1,994 communities.
LEMAS = (
    "LemasSwornFT LemasSwFTPerPop LemasSwFTFieldOps LemasSwFTFieldPerPop LemasTotalReq "
    "LemasTotReqPerPop PolicReqPerOffic PolicPerPop RacialMatchCommPol PctPolicWhite "
    "PctPolicBlack PctPolicHisp PctPolicAsian PctPolicMinor OfficAssgnDrugUnits "
    "NumKindsDrugsSeiz PolicAveOTWorked PolicCars PolicOperBudg LemasPctPolicOnPatr "
    "LemasGangUnitDeploy PolicBudgPerPop"
).split()


@pytest.fixture(scope="module")
def raw():
    """The shipped file read independently of the loader, ``?`` kept as text."""
    with DATA_DIR.joinpath("communities_crime.csv.gz").open("rb") as handle:
        return pd.read_csv(handle, compression="gzip", dtype=str, keep_default_na=False)


def test_shipped_file_is_the_full_data_set(raw):
    assert raw.shape == (1994, 128)
    assert raw.columns[-1] == COMMUNITIES_CRIME_TARGET
    assert tuple(raw.columns[:5]) == COMMUNITIES_CRIME_IDENTIFIERS


def test_default_policy_drops_the_columns_with_missing_values(raw):
    x, y, names = load_communities_crime()
    assert x.shape == (1994, 99) and y.shape == (1994,)
    assert x.dtype == torch.float64 and y.dtype == torch.float64
    assert len(names) == 99
    assert not set(names) & set(LEMAS) and "OtherPerCap" not in names
    assert not set(names) & set(COMMUNITIES_CRIME_IDENTIFIERS)
    assert COMMUNITIES_CRIME_TARGET not in names
    assert torch.isfinite(x).all() and torch.isfinite(y).all()
    assert x.min() >= 0 and x.max() <= 1 and y.min() >= 0 and y.max() <= 1
    # Values and order match the file, column by column.
    for column in (0, 50, 98):
        expected = torch.tensor(raw[names[column]].astype(float).to_numpy())
        assert torch.equal(x[:, column], expected)
    assert torch.equal(y, torch.tensor(raw[COMMUNITIES_CRIME_TARGET].astype(float).to_numpy()))


def test_drop_rows_policy_keeps_all_attributes_on_complete_rows(raw):
    x, y, names = load_communities_crime(missing="drop-rows")
    attributes = raw.drop(columns=[*COMMUNITIES_CRIME_IDENTIFIERS, COMMUNITIES_CRIME_TARGET])
    complete = (attributes != "?").all(axis=1).to_numpy()
    assert x.shape == (int(complete.sum()), 122) == (319, 122)
    assert set(LEMAS) <= set(names) and "OtherPerCap" in names
    assert torch.isfinite(x).all()
    expected_y = raw[COMMUNITIES_CRIME_TARGET][complete].astype(float).to_numpy()
    assert torch.equal(y, torch.tensor(expected_y))


def test_keep_policy_marks_exactly_the_question_marks_as_nan(raw):
    x, y, names = load_communities_crime(missing="keep", dtype=torch.float32)
    assert x.shape == (1994, 122) and x.dtype == torch.float32 and y.dtype == torch.float32
    question_marks = torch.tensor((raw[list(names)] == "?").to_numpy())
    assert torch.equal(torch.isnan(x), question_marks)
    assert question_marks.sum() == 22 * 1675 + 1
    assert torch.isfinite(y).all()


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="missing must be one of"):
        load_communities_crime(missing="impute")
    with pytest.raises(TypeError, match="floating torch dtype"):
        load_communities_crime(dtype=torch.int64)


def test_license_text_names_source_licence_and_doi():
    text = communities_crime_license()
    assert "CC BY 4.0" in text and "creativecommons.org/licenses/by/4.0" in text
    assert "Redmond" in text and "UCI Machine Learning Repository" in text
    assert "10.24432/C53W3X" in text
    assert text == DATA_DIR.joinpath("communities_crime_LICENSE.txt").read_text(encoding="utf-8")


def test_shipped_file_is_gzip_with_header():
    with DATA_DIR.joinpath("communities_crime.csv.gz").open("rb") as handle:
        first_line = gzip.GzipFile(fileobj=handle).readline().decode()
    assert first_line.startswith("state,county,community,communityname,fold,population")
