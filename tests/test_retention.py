"""Retention: the log keeps what export, recovery and every servable version need, no more."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from feature_store import receipts, retention
from feature_store.durable import DurableModel
from feature_store.layout import DataLayout
from feature_store.offline import OfflineStore, log_rows
from feature_store.online import OnlineStore, Receipt
from feature_store.registry import ModelRegistry
from feature_store.retention import trim
from feature_store.versions import serve_version
from tests.factories import small_model
from tests.test_store_cli import trained_artifacts
from velox.backend import CPU
from velox.config import StoreConfig, VeloxConfig
from velox.errors import DataError

USERS = [f"u{j}" for j in range(30)]
ITEMS = [f"i{j}" for j in range(20)] + ["new1", "new2"]
DAY = 1.7e9


def _observe(durable: DurableModel, count: int, seed: int, sync: bool = True) -> None:
    """``count`` observations in batches of 10, over two days."""
    rng = np.random.default_rng(seed)
    for _ in range(count // 10):
        durable.observe(
            rng.choice(USERS, 10).tolist(),
            rng.choice(ITEMS, 10).tolist(),
            rng.integers(1, 6, 10).astype(float),
            DAY + rng.integers(0, 2, 10) * 86_400.0,
            sync=sync,
        )


def _export(layout: DataLayout, store: OnlineStore, upto: int) -> None:
    rows = [(seq, o) for seq, o in store.log_after(0) if seq <= upto]
    OfflineStore(layout.offline).append(log_rows(rows))


def _versions(layout: DataLayout, *versions: tuple[int, str]) -> ModelRegistry:
    """Register versions of the given training watermarks and states, oldest first."""
    registry = ModelRegistry(layout.registry)
    for watermark, state in versions:
        with registry.building(engine="velox", watermark=watermark) as version:
            registry.write_artifacts(version.number, trained_artifacts(["a"]))
            registry.mark_ready(version.number)
        if state == "active":
            registry.activate(version.number)
    return registry


@pytest.fixture
def layout(tmp_path) -> DataLayout:
    return DataLayout(tmp_path / "data")


def _durable(layout: DataLayout) -> DurableModel:
    store = OnlineStore(layout.online)
    return DurableModel(small_model(), store, StoreConfig(checkpoint_interval=0.0))


@pytest.mark.parametrize(
    ("exported", "checkpoint", "version", "holder"),
    [(120, 250, 180, "exported"), (250, 120, 180, "checkpoint"), (250, 180, 120, "versions")],
)
def test_each_condition_holds_the_log_back(layout, exported, checkpoint, version, holder):
    durable = _durable(layout)
    _observe(durable, checkpoint, seed=1)
    durable.flush()
    _observe(durable, 300 - checkpoint, seed=2)  # logged, not checkpointed
    _export(layout, durable.store, exported)
    _versions(layout, (version, "active"))
    done = trim(durable.store, layout, keep=2, receipt_ttl=3600)
    assert (done.holds.holder, done.holds.floor) == (holder, 120)
    assert done.log_start == 121 == durable.store.log_start
    assert [seq for seq, _ in durable.store.records_after(0)] == list(range(121, 301))
    assert durable.store.log_extent().first == 121
    durable.close()


def test_versions_that_can_still_be_served_hold_the_log_and_others_do_not(layout):
    durable = _durable(layout)
    _observe(durable, 300, seed=3)
    durable.flush()
    _export(layout, durable.store, 300)
    registry = _versions(layout, (40, "ready"), (90, "ready"), (200, "active"), (250, "ready"))
    # keep=2: the newest two ready (v2 at 90, v4 at 250) and the active one (v3 at 200).
    assert trim(durable.store, layout, keep=2, receipt_ttl=3600).log_start == 91
    registry.activate(1)  # v1 was not kept: installing it would need what was trimmed
    config = VeloxConfig()
    with pytest.raises(DataError, match="needs the log from seq 41, but retention trimmed"):
        serve_version(registry.get(1), registry, durable.store, config, CPU)
    durable.close()


def test_a_recovery_after_a_trim_equals_the_states_before_the_crash(layout):
    durable = _durable(layout)
    _observe(durable, 200, seed=4)
    durable.flush()
    _observe(durable, 100, seed=5, sync=False)  # after the checkpoint: recovery replays these
    durable.sync_log()
    _export(layout, durable.store, 300)
    before = durable.statistics(USERS)
    biases = durable.model.biases.mean
    done = trim(durable.store, layout, keep=1, receipt_ttl=3600)
    assert done.log_start == 201 and done.holds.holder == "checkpoint"
    durable.store.close()  # a crash: the model's unsaved states are lost
    recovered = _durable(layout)
    assert recovered.recovered == 100
    for got, want in zip(recovered.statistics(USERS), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert recovered.model.biases.mean == pytest.approx(biases, rel=1e-12)
    recovered.close()


class _Recording:
    """The store's database, recording what each write left in the log's memtable."""

    def __init__(self, db) -> None:
        self._db, self.log_memtable = db, []

    def write(self, batch, *options) -> None:
        self._db.write(batch, *options)
        log = self._db.get_column_family("log")
        self.log_memtable.append(
            tuple(
                log.property_int_value(f"rocksdb.num-{kind}-active-mem-table")
                for kind in ("entries", "deletes")
            )
        )

    def __getattr__(self, name: str):
        return getattr(self._db, name)


def test_a_trim_deletes_log_ranges_not_record_by_record(layout, monkeypatch):
    monkeypatch.setattr(retention, "TRIM_STEP", 500)
    durable = _durable(layout)
    _observe(durable, 2000, seed=6)
    durable.flush()
    _export(layout, durable.store, 2000)
    entries = durable.store._cf["log"].property_int_value("rocksdb.num-entries-active-mem-table")
    size = durable.store.log_extent().bytes
    durable.store._db = recording = _Recording(durable.store._db)
    assert durable.store.trim_log(1990) == 1991
    durable.store._db = recording._db
    # Four writes (one per step of 500), a range deletion each, no point deletion at all.
    assert len(recording.log_memtable) == 4
    assert recording.log_memtable[0] == (entries + 1, 0)
    assert all(deletes == 0 for _, deletes in recording.log_memtable)
    assert durable.store.log_extent().bytes < size / 10  # the table files were compacted away
    assert [seq for seq, _ in durable.store.records_after(0)] == list(range(1991, 2001))
    durable.close()


def test_trimmed_records_still_exclude_their_items_and_forgetting_counts_what_is_left(layout):
    durable = _durable(layout)
    durable.observe(["ann", "ann", "bob"], ["i1", "i2", "i1"], [4.0, 5.0, 3.0], [DAY] * 3)
    durable.flush()
    _export(layout, durable.store, 3)
    trim(durable.store, layout, keep=1, receipt_ttl=3600)
    durable.observe(["ann"], ["i3"], [2.0], [DAY])
    assert durable.store.log_start == 4
    assert durable.rated("ann") == {"i1", "i2", "i3"}  # top-K still excludes them
    assert durable.store.delete_user("ann") == [4]  # the trimmed two are gone already
    assert durable.rated("ann") == set()
    durable.close()


def test_receipts_expire_after_their_time_to_live_and_only_those(layout, monkeypatch):
    now = [1000.0]
    clock = SimpleNamespace(time=lambda: now[0])  # when receipts are written, and trims run
    monkeypatch.setattr(receipts, "time", clock)
    monkeypatch.setattr(retention, "time", clock)
    durable = _durable(layout)
    for key, at in (("old", 1000.0), ("new", 2000.0)):
        now[0] = at
        durable.observe(["ann"], ["i1"], [4.0], [DAY], receipts=[Receipt(key, b"d" * 16, 0, 1)])
    assert durable.receipt("old") == Receipt("old", b"d" * 16, 1, 1, 1000.0)
    now[0] = 1000.0 + 3600
    assert trim(durable.store, layout, keep=1, receipt_ttl=3600).receipts_expired == 0
    now[0] = 1000.0 + 3601
    assert trim(durable.store, layout, keep=1, receipt_ttl=3600).receipts_expired == 1
    assert durable.receipt("old") is None and durable.receipt("new").written == 2000.0
    now[0] = 2000.0 + 3601
    assert trim(durable.store, layout, keep=1, receipt_ttl=3600).receipts_expired == 1
    assert durable.receipt("new") is None
    durable.close()


def _disk(path: Path) -> int:
    """The store's files, but RocksDB's diagnostic log (two files of 1 MB at most, asserted)."""
    diagnostics = list(path.glob("LOG*"))
    assert len(diagnostics) <= 2 and all(f.stat().st_size <= 1.1 * 2**20 for f in diagnostics)
    return sum(os.path.getsize(f) for f in path.iterdir() if f.is_file() and f not in diagnostics)


def test_disk_stays_bounded_with_an_export_and_a_trim_every_2000_observations(layout):
    """The small version of benchmarks/lifecycle.py (group commit, as the server logs).

    The size is taken at its peak, when a round's records are logged and
    exported, just before the trim; without retention it grows every round.
    """
    durable = _durable(layout)
    sizes = []
    for round_ in range(10):
        _observe(durable, 2000, seed=10 + round_, sync=False)
        durable.sync_log()
        _export(layout, durable.store, durable.store.last_seq)
        sizes.append(_disk(layout.online))
        durable.trim(keep=1, receipt_ttl=3600)
    assert durable.store.log_start == durable.store.last_seq + 1 == 20_001
    assert max(sizes) <= 1.5 * sizes[0], sizes
    durable.close()
