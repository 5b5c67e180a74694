import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_mm.datasets import CsvBatchStream, load_communities_crime


@pytest.fixture
def table(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "id": np.arange(23),
            "a": rng.normal(size=23),
            "b": rng.integers(-5, 5, size=23),
            "c": rng.uniform(size=23),
            "y1": rng.normal(size=23),
            "y2": rng.normal(size=23),
        }
    )
    path = tmp_path / "table.csv"
    frame.to_csv(path, index=False)
    return path, pd.read_csv(path)


def concatenated(stream):
    batches = list(stream)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]), batches


@settings(max_examples=25, deadline=None)
@given(batch_size=st.integers(1, 30), chunk_size=st.integers(1, 30))
def test_stream_yields_the_rows_of_the_whole_file(tmp_path_factory, batch_size, chunk_size):
    rng = np.random.default_rng(batch_size * 31 + chunk_size)
    frame = pd.DataFrame(rng.normal(size=(23, 4)), columns=["a", "b", "c", "y"])
    path = tmp_path_factory.mktemp("csv") / "t.csv"
    frame.to_csv(path, index=False)
    whole = pd.read_csv(path)
    stream = CsvBatchStream(path, "y", batch_size=batch_size, chunk_size=chunk_size)
    x, y, batches = concatenated(stream)
    assert torch.equal(x, torch.tensor(whole[["a", "b", "c"]].to_numpy()))
    assert torch.equal(y, torch.tensor(whole["y"].to_numpy()))
    sizes = [len(b[0]) for b in batches]
    assert all(size == batch_size for size in sizes[:-1]) and 0 < sizes[-1] <= batch_size
    assert sum(sizes) == 23


def test_column_selection_order_targets_and_dtype(table):
    path, whole = table
    stream = CsvBatchStream(
        path, ["y2", "y1"], features=["c", "a"], batch_size=5, chunk_size=7, dtype=torch.float32
    )
    x, y, batches = concatenated(stream)
    assert stream.features == ("c", "a") and stream.targets == ("y2", "y1")
    assert x.dtype == torch.float32 and y.dtype == torch.float32 and y.shape == (23, 2)
    assert torch.equal(x, torch.tensor(whole[["c", "a"]].to_numpy(), dtype=torch.float32))
    assert torch.equal(y, torch.tensor(whole[["y2", "y1"]].to_numpy(), dtype=torch.float32))


def test_default_features_are_all_non_target_columns(table):
    path, whole = table
    stream = CsvBatchStream(path, "y1")
    assert stream.features == ("id", "a", "b", "c", "y2")
    x, y, _ = concatenated(stream)
    assert torch.equal(x[:, 2], torch.tensor(whole["b"].to_numpy(), dtype=torch.float64))


def test_stream_is_reiterable(table):
    path, _ = table
    stream = CsvBatchStream(path, "y1", batch_size=4)
    first, second = concatenated(stream), concatenated(stream)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_shipped_data_streams_like_the_loader(tmp_path):
    x, y, names = load_communities_crime()
    frame = pd.DataFrame(x.numpy(), columns=names)
    frame["ViolentCrimesPerPop"] = y.numpy()
    path = tmp_path / "crime.csv.gz"
    frame.to_csv(path, index=False)
    streamed_x, streamed_y, _ = concatenated(
        CsvBatchStream(path, "ViolentCrimesPerPop", batch_size=100, chunk_size=333)
    )
    assert torch.equal(streamed_x, x) and torch.equal(streamed_y, y)


def test_missing_columns_are_named(table):
    path, _ = table
    with pytest.raises(ValueError, match=r"\['zz'\] not in .*its columns are"):
        CsvBatchStream(path, "y1", features=["a", "zz"])
    with pytest.raises(ValueError, match=r"\['target'\] not in"):
        CsvBatchStream(path, "target")
    with pytest.raises(ValueError, match="both features and targets"):
        CsvBatchStream(path, "y1", features=["a", "y1"])
    with pytest.raises(TypeError, match="sequence of column names"):
        CsvBatchStream(path, "y1", features="a")
    # The README once showed CsvBatchStream(path, target, batch_size): 64 went to features and
    # failed with "'int' object is not iterable".
    with pytest.raises(TypeError, match=r"keyword-only: CsvBatchStream\(path, target, batch_size"):
        CsvBatchStream(path, "y1", 64)
    with pytest.raises(ValueError, match="missing must be one of"):
        CsvBatchStream(path, "y1", missing="skip")
    x, _, _ = concatenated(CsvBatchStream(path, "y1", features=pd.Index(["c", "a"])))
    assert x.shape == (23, 2)
    with pytest.raises(FileNotFoundError):
        CsvBatchStream(path.parent / "absent.csv", "y1")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        CsvBatchStream(path, "y1", batch_size=0)


def test_non_numeric_value_is_reported_with_its_row(tmp_path):
    path = tmp_path / "bad.csv"
    rows = ["a,b,y"] + [f"{i},{i / 10},{i}" for i in range(10)]
    rows[8] = "7,?,7"
    path.write_text("\n".join(rows) + "\n")
    stream = CsvBatchStream(path, "y", batch_size=2, chunk_size=4)
    with pytest.raises(
        ValueError, match=r"column 'b' is not numeric: value '\?' at data row 7 \(line 9"
    ):
        list(stream)
    # The bad column is not read when it is not selected.
    x, _, _ = concatenated(CsvBatchStream(path, "y", features=["a"], chunk_size=4))
    assert x.shape == (10, 1)


def test_rows_with_missing_values_can_be_dropped_and_are_counted(tmp_path):
    # A large file with a few gaps: missing="drop" skips those rows (per pass count), keeps the
    # others in order and whole; a gap in a column that is not read does not matter, and a
    # non-numeric cell is still an error (a schema problem, not a missing value).
    path = tmp_path / "gaps.csv"
    rows = ["a,b,skip,y"] + [f"{i},{i / 10},,{i}" for i in range(12)]
    rows[3], rows[6], rows[7] = "2,,,2", ",0.5,,5", "6,0.6,,"
    path.write_text("\n".join(rows) + "\n")
    stream = CsvBatchStream(path, "y", ["a", "b"], batch_size=3, chunk_size=4, missing="drop")
    for _ in range(2):
        x, y, batches = concatenated(stream)
        assert stream.dropped_rows == 3
        kept = torch.tensor([0, 1, 3, 4, 7, 8, 9, 10, 11], dtype=torch.float64)
        assert torch.equal(y, kept) and torch.equal(x[:, 0], kept)
        assert torch.allclose(x[:, 1], kept / 10)
        assert [len(b[0]) for b in batches] == [3, 3, 3]
    shuffled = CsvBatchStream(path, "y", ["a", "b"], shuffle_buffer=5, missing="drop", seed=1)
    x, y, _ = concatenated(shuffled)
    assert shuffled.dropped_rows == 3 and torch.equal(y.sort().values, kept)
    with pytest.raises(ValueError, match="column 'a' has a missing value at data row 5"):
        list(CsvBatchStream(path, "y", ["a", "b"]))
    path.write_text("a,y\n1,2\nx,3\n,4\n")
    with pytest.raises(ValueError, match="column 'a' is not numeric: value 'x' at data row 1"):
        list(CsvBatchStream(path, "y", missing="drop"))


def test_missing_and_boolean_values_are_rejected(tmp_path):
    path = tmp_path / "gap.csv"
    path.write_text("a,y\n1,2\n,3\n")
    with pytest.raises(ValueError, match="column 'a' has a missing value at data row 1"):
        list(CsvBatchStream(path, "y"))
    path.write_text("a,y\nTrue,2\nFalse,3\n")
    with pytest.raises(ValueError, match="column 'a' holds booleans"):
        list(CsvBatchStream(path, "y"))


def test_shuffle_buffer_draws_batches_from_a_pool_in_a_new_order_each_pass(tmp_path):
    rows = 1000
    path = tmp_path / "sorted.csv"
    pd.DataFrame({"x": np.arange(rows) * 0.5, "y": np.arange(rows)}).to_csv(path, index=False)
    buffer, chunk = 200, 64
    stream = CsvBatchStream(
        path, "y", batch_size=32, chunk_size=chunk, shuffle_buffer=buffer, seed=4
    )
    passes = []
    for _ in range(2):
        x, y, batches = concatenated(stream)
        assert [len(b[1]) for b in batches] == [32] * 31 + [8]
        assert torch.equal(y.sort().values, torch.arange(rows, dtype=y.dtype))  # each row once
        assert torch.equal(x[:, 0], 0.5 * y)  # rows stay whole
        # When a row leaves, fewer than buffer + batch + chunk rows read are still to leave:
        # the pool holds < buffer + batch rows after each emission, then takes a chunk.
        assert bool((y < torch.arange(rows) + buffer + 32 + chunk).all())
        assert not torch.equal(y, y.sort().values)
        passes.append(y)
    assert not torch.equal(passes[0], passes[1])  # a new order at each pass ...
    again = CsvBatchStream(
        path, "y", batch_size=32, chunk_size=chunk, shuffle_buffer=buffer, seed=4
    )
    assert torch.equal(concatenated(again)[1], passes[0])  # ... seeded
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="shuffle_buffer"):
            CsvBatchStream(path, "y", shuffle_buffer=bad)


def test_a_shuffled_stream_of_a_sorted_file_fits_as_the_rows_in_random_order(tmp_path):
    from pyro_mm import GaussianMoE, IncrementalMM
    from pyro_mm.datasets import gaussian_moe_truth, sample_gaussian_moe

    truth = gaussian_moe_truth(2, 2, seed=3)
    x, y = sample_gaussian_moe(truth, 20000, seed=4)
    order = torch.argsort(y[:, 0])
    path = tmp_path / "sorted_by_y.csv"
    frame = pd.DataFrame(x[order].numpy(), columns=["x0", "x1"]).assign(y=y[order, 0].numpy())
    frame.to_csv(path, index=False)
    nll = {}
    for label, buffer in (("file order", None), ("shuffled", 20000)):
        model = GaussianMoE(2, 2).double()
        stream = CsvBatchStream(path, "y", batch_size=256, shuffle_buffer=buffer)
        IncrementalMM(model).fit(stream, progress=False)
        nll[label] = -model.log_prob(x, y).mean().item()
    in_memory = GaussianMoE(2, 2).double()
    IncrementalMM(in_memory).fit(x, y, progress=False)
    random_order = -in_memory.log_prob(x, y).mean().item()
    assert nll["file order"] > random_order + 0.5
    assert nll["shuffled"] == pytest.approx(random_order, abs=0.01)
