"""The offline Parquet store: partitions, schemas, watermarks, idempotence, forgetting."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_store.offline import OFFLINE_SCHEMA, OfflineStore
from velox.datasets import SyntheticSpec, synthesize
from velox.errors import DataError


def logged(first_seq: int, count: int, seed: int = 0) -> pa.Table:
    """Synthetic observations spanning several days, numbered like log records."""
    table = synthesize(SyntheticSpec(users=20, items=15, ratings=count, days=5, seed=seed))
    seq = pa.array(range(first_seq, first_seq + count), type=pa.int64())
    return table.append_column(OFFLINE_SCHEMA.field("seq"), seq)


def test_append_partitions_by_day_and_reads_back_in_order(tmp_path):
    store = OfflineStore(tmp_path)
    rows = logged(1, 400)
    assert store.append(rows) == 400
    assert len(store.partitions()) >= 4
    assert store.watermark == 400
    assert store.read().equals(rows)


def test_reading_up_to_a_watermark(tmp_path):
    store = OfflineStore(tmp_path)
    store.append(logged(1, 300))
    assert store.read(upto=120).column("seq").to_pylist() == list(range(1, 121))


def test_appending_the_same_range_twice_leaves_no_duplicates(tmp_path):
    store = OfflineStore(tmp_path)
    rows = logged(1, 200)
    store.append(rows.slice(0, 150))
    files = store.files()
    assert store.append(rows.slice(0, 150)) == 0
    assert store.append(rows) == 50  # overlapping range: only the new rows
    assert store.read().equals(rows)
    assert set(files) <= set(store.files())


def test_a_crash_between_files_and_watermark_is_harmless(tmp_path):
    store = OfflineStore(tmp_path)
    rows = logged(1, 200)
    store.append(rows.slice(0, 100))
    (tmp_path / "_watermark").write_text("0\n")  # as if the watermark never moved
    store.append(rows.slice(0, 180))  # the retry covers a wider range
    assert store.read().equals(rows.slice(0, 180))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.drop_columns(["seq"]), "missing seq"),
        (lambda t: t.set_column(2, "rating", t.column("rating").cast(pa.float32())), "rating is"),
        (lambda t: t.append_column("extra", pa.array([1] * t.num_rows)), "unexpected extra"),
    ],
)
def test_wrong_schema_on_write_is_refused_and_writes_nothing(tmp_path, change, message):
    store = OfflineStore(tmp_path)
    with pytest.raises(DataError, match=message):
        store.append(change(logged(1, 50)))
    assert store.files() == [] and store.watermark == 0


def test_a_foreign_file_in_the_store_is_named_on_read(tmp_path):
    store = OfflineStore(tmp_path)
    store.append(logged(1, 50))
    bad = tmp_path / "date=2024-01-01" / "seq-00000000000000000999-00000000000000000999.parquet"
    pq.write_table(pa.table({"user": ["u"], "score": [1.0]}), bad)
    with pytest.raises(DataError, match=rf"{bad.name} has the wrong schema .*missing item"):
        store.read()
    bad.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="is not readable Parquet"):
        store.read()


def test_delete_user_rewrites_partitions_and_nothing_remains(tmp_path):
    store = OfflineStore(tmp_path)
    rows = logged(1, 400)
    store.append(rows)
    user = rows.column("user")[0].as_py()
    expected = sum(1 for u in rows.column("user").to_pylist() if u == user)
    assert store.delete_user(user) == expected
    remaining = store.read()
    assert user not in remaining.column("user").to_pylist()
    assert remaining.num_rows == 400 - expected
    assert store.delete_user(user) == 0
