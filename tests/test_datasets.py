"""Data sets: the schema, the three MovieLens formats, and the synthetic generator."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from velox.datasets import (
    OBSERVATION_SCHEMA,
    SyntheticSpec,
    load_movielens,
    synthesize,
    write_synthetic,
)
from velox.errors import DataError, InputError

ROWS = [("1", "10", 4.0, 881250949), ("2", "20", 3.5, 891717742)]


@pytest.mark.parametrize(
    ("name", "render"),
    [
        ("u.data", lambda r: "\n".join(f"{u}\t{i}\t{int(y)}\t{t}" for u, i, y, t in r)),
        (
            "ratings.csv",
            lambda r: (
                "userId,movieId,rating,timestamp\n"
                + "\n".join(f"{u},{i},{y},{t}" for u, i, y, t in r)
            ),
        ),
        ("ratings.dat", lambda r: "\n".join(f"{u}::{i}::{y}::{t}" for u, i, y, t in r)),
    ],
)
def test_movielens_formats_load_into_the_schema(tmp_path, name, render):
    (tmp_path / name).write_text(render(ROWS) + "\n")
    table = load_movielens(tmp_path)
    assert table.schema == OBSERVATION_SCHEMA
    assert table.column("user").to_pylist() == ["1", "2"]
    assert table.column("item").to_pylist() == ["10", "20"]
    expected = [4.0, 3.0] if name == "u.data" else [4.0, 3.5]
    assert table.column("rating").to_pylist() == expected
    seconds = table.column("ts").cast("int64").to_numpy() // 1_000_000
    assert seconds.tolist() == [881250949, 891717742]


def test_missing_and_malformed_files_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_movielens(tmp_path / "u.data")
    with pytest.raises(DataError, match="holds none of the MovieLens rating files"):
        load_movielens(tmp_path)
    (tmp_path / "u.data").write_text("1\t2\tfive\t3\n")
    with pytest.raises(DataError, match="wrong type"):
        load_movielens(tmp_path)


def test_movielens_100k(ml100k):
    table = load_movielens(ml100k)
    assert table.num_rows == 100_000
    assert pc.count_distinct(table.column("user")).as_py() == 943
    assert pc.count_distinct(table.column("item")).as_py() == 1682


def test_synthetic_is_seeded_time_ordered_and_shaped():
    spec = SyntheticSpec(users=500, items=300, ratings=30_000, seed=5, slice_rows=7_000)
    table = synthesize(spec)
    assert table.schema == OBSERVATION_SCHEMA
    assert table.num_rows == 30_000
    assert table.equals(synthesize(spec))
    assert not table.equals(
        synthesize(SyntheticSpec(users=500, items=300, ratings=30_000, seed=6, slice_rows=7_000))
    )
    ts = table.column("ts").cast("int64").to_numpy()
    assert (np.diff(ts) >= 0).all()
    ratings = table.column("rating").to_numpy()
    assert set(np.unique(ratings)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    counts = np.sort(
        np.unique(table.column("user").to_numpy(zero_copy_only=False), return_counts=True)[1]
    )[::-1]
    assert counts[: len(counts) // 10].sum() > 0.3 * counts.sum()  # power-law activity
    users = table.column("user").to_numpy(zero_copy_only=False)
    early = set(users[:3_000])
    late = set(users[-3_000:])
    assert len(late - early) > 0.2 * len(late)  # users keep arriving


def test_synthetic_spec_is_validated():
    with pytest.raises(InputError, match="drift"):
        SyntheticSpec(drift=2.0)
    with pytest.raises(InputError, match="users must be at least 1"):
        SyntheticSpec(users=0)


def test_write_synthetic_streams_to_parquet(tmp_path):
    path = tmp_path / "out/synth.parquet"
    spec = SyntheticSpec(users=50, items=40, ratings=2_500, slice_rows=1_000)
    assert write_synthetic(spec, path) == 2_500
    table = pq.read_table(path)
    assert table.schema == OBSERVATION_SCHEMA
    assert table.equals(synthesize(spec))
