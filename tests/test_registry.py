"""The model registry on a real filesystem: artifacts, lifecycle, activation, damage."""

from __future__ import annotations

import dataclasses
import json
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_store.registry import ModelRegistry
from velox.errors import DataError, InputError
from velox.symmetric import symmetrize
from velox.trained import TrainedModel


def artifacts(seed: int = 0, items: int = 6, users: int = 5, rank: int = 3) -> TrainedModel:
    """Random artifacts with symmetric positive definite Gram matrices, like a training run's."""
    rng = np.random.default_rng(seed)
    d = rank + 1
    half = rng.normal(size=(users, d, d))
    return TrainedModel(
        item_ids=np.array([f"item-{j}" for j in range(items)]),
        item_factors=rng.normal(size=(items, rank)),
        item_bias=rng.normal(size=items),
        global_mean=3.52,
        train_count=41,
        user_ids=np.array([f"user-{j}" for j in range(users)]),
        user_weights=rng.normal(size=(users, d)),
        user_gram=symmetrize(half @ np.swapaxes(half, 1, 2) + np.eye(d)),
        user_rhs=rng.normal(size=(users, d)),
        user_count=rng.integers(1, 20, size=users),
        item_count=rng.uniform(0, 30, size=items),
    )


def ready(registry: ModelRegistry, seed: int = 0, **metrics: float) -> int:
    """Build a version through the normal path; returns its number."""
    with registry.building(engine="velox", watermark=100 + seed) as version:
        registry.write_artifacts(version.number, artifacts(seed))
        registry.mark_ready(version.number, metrics=metrics)
    return version.number


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under the registry with its bytes and modification time."""
    return {
        str(path.relative_to(root)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def assert_equal_artifacts(got: TrainedModel, want: TrainedModel) -> None:
    for name in TrainedModel.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


# ------------------------------------------------------------------ artifacts


def test_artifacts_round_trip_exactly(tmp_path):
    registry = ModelRegistry(tmp_path)
    written = artifacts(seed=4)
    number = ready(registry, seed=4)
    loaded = registry.load(number)
    assert_equal_artifacts(loaded, written)
    assert loaded.user_gram.shape == (5, 4, 4)
    assert np.array_equal(loaded.user_gram, np.swapaxes(loaded.user_gram, 1, 2))
    assert loaded.user_count.dtype == np.int64
    assert loaded.item_ids.tolist() == written.item_ids.tolist()
    users = pq.read_schema(tmp_path / "v000001" / "users.parquet")
    assert users.field("gram").type == pa.list_(pa.float64(), 10)


def test_a_training_run_round_trips(tmp_path, trained):
    registry = ModelRegistry(tmp_path)
    with registry.building(engine="velox", watermark=10_000) as version:
        registry.write_artifacts(version.number, trained)
        registry.mark_ready(version.number, metrics={"train_rmse": trained.train_rmse})
    loaded = registry.load(version.number)
    assert_equal_artifacts(loaded, trained)
    assert registry.get(version.number).train_count == 10_000
    assert registry.get(version.number).rank == 4


def test_artifacts_of_the_wrong_shape_are_refused_and_nothing_is_written(tmp_path):
    registry = ModelRegistry(tmp_path)
    version = registry.create(engine="velox", watermark=0)
    good = artifacts()
    bad = dataclasses.replace(good, user_gram=good.user_gram[:, :3, :3])
    with pytest.raises(DataError, match="user_gram has shape"):
        registry.write_artifacts(version.number, bad)
    assert sorted(p.name for p in (tmp_path / "v000001").iterdir()) == ["metadata.json"]
    assert registry.get(version.number).rank is None


def test_forgetting_users_removes_their_rows_from_every_version(tmp_path):
    registry = ModelRegistry(tmp_path)
    first, second = ready(registry, seed=1), ready(registry, seed=2)
    registry.activate(second)
    assert registry.forget_users({"user-1", "user-3", "nobody"}) == 4
    for number in (first, second):
        loaded, written = registry.load(number), artifacts(seed=number)
        assert loaded.user_ids.tolist() == ["user-0", "user-2", "user-4"]
        np.testing.assert_array_equal(loaded.user_gram, written.user_gram[[0, 2, 4]])
        np.testing.assert_array_equal(loaded.user_rhs, written.user_rhs[[0, 2, 4]])
        raw = (tmp_path / f"v{number:06d}" / "users.parquet").read_bytes()
        assert b"user-1" not in raw and b"user-3" not in raw
    assert registry.forget_users({"user-1"}) == 0
    assert registry.active().number == second


# ------------------------------------------------------------------ lifecycle


def test_a_version_goes_from_building_to_ready_to_active(tmp_path):
    registry = ModelRegistry(tmp_path)
    version = registry.create(
        engine="mllib", watermark=512, parameters={"rank": 3}, mode="local[2]", device="cpu"
    )
    assert (version.number, version.name, version.state) == (1, "v1", "building")
    assert datetime.fromisoformat(version.created).utcoffset() == UTC.utcoffset(None)
    with pytest.raises(DataError, match="no artifacts"):
        registry.mark_ready(1)
    assert registry.get(1).state == "building"
    registry.write_artifacts(1, artifacts())
    registry.mark_ready(1, metrics={"train_rmse": 0.81}, timings={"train_s": 2.5})
    with pytest.raises(DataError, match="v1 is ready"):
        registry.mark_ready(1)
    assert registry.active() is None
    assert registry.activate(1).state == "active"
    got = registry.get(1)
    assert got.state == "active" and registry.active() == got
    assert (got.watermark, got.engine, got.mode, got.parameters) == (
        512,
        "mllib",
        "local[2]",
        {"rank": 3},
    )
    assert (got.metrics, got.timings) == ({"train_rmse": 0.81}, {"train_s": 2.5})
    assert (got.global_mean, got.train_count, got.rank, got.error) == (3.52, 41, 3, None)
    stored = json.loads((tmp_path / "v000001" / "metadata.json").read_text())
    assert stored["state"] == "ready"


def test_only_ready_versions_can_be_activated(tmp_path):
    registry = ModelRegistry(tmp_path)
    building = registry.create(engine="velox", watermark=0).number
    failed = registry.create(engine="velox", watermark=0).number
    registry.mark_failed(failed, "Spark executor lost")
    before = snapshot(tmp_path)
    for number, state in ((building, "building"), (failed, "failed")):
        with pytest.raises(DataError, match=f"v{number} is {state}"):
            registry.activate(number)
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "ACTIVE").exists()
    assert registry.get(failed).error == "Spark executor lost"


def test_activation_writes_only_the_pointer(tmp_path):
    registry = ModelRegistry(tmp_path)
    first, second = ready(registry, 1), ready(registry, 2)
    registry.activate(first)
    before = snapshot(tmp_path)
    registry.activate(second)
    after = snapshot(tmp_path)
    assert set(after) == set(before)
    changed = [name for name in after if after[name] != before[name]]
    assert changed == ["ACTIVE"]
    assert after["ACTIVE"][0] == b"2\n"
    assert [v.state for v in registry.versions()] == ["ready", "active"]


def test_a_failed_pointer_write_leaves_the_previous_version_active(tmp_path, monkeypatch):
    registry = ModelRegistry(tmp_path)
    first, second = ready(registry, 1), ready(registry, 2)
    registry.activate(first)
    before = snapshot(tmp_path)

    def disk_full(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("feature_store.files.os.replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        registry.activate(second)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    assert registry.active().number == first


def test_rollback_activates_the_newest_older_ready_version(tmp_path):
    registry = ModelRegistry(tmp_path)
    with pytest.raises(DataError, match="no model version is active"):
        registry.rollback()
    one, two = ready(registry, 1), ready(registry, 2)
    three = registry.create(engine="velox", watermark=0).number
    registry.mark_failed(three, "diverged")
    four = ready(registry, 4)
    registry.activate(four)
    assert registry.rollback().number == two
    assert registry.active().number == two
    assert registry.get(four).state == "ready"
    assert registry.rollback().number == one
    with pytest.raises(DataError, match="no ready version is older than the active v1"):
        registry.rollback()
    assert registry.active().number == one


def test_retention_keeps_the_newest_and_the_active_version(tmp_path):
    registry = ModelRegistry(tmp_path)
    numbers = [ready(registry, seed) for seed in range(5)]
    registry.activate(numbers[0])
    assert registry.retain(keep=2) == [2, 3]
    states = [v.state for v in registry.versions()]
    assert states == ["active", "retired", "retired", "ready", "ready"]
    assert sorted(p.name for p in (tmp_path / "v000002").iterdir()) == ["metadata.json"]
    assert registry.get(2).metrics == {} and registry.get(2).rank == 3
    assert_equal_artifacts(registry.load(1), artifacts(0))
    with pytest.raises(DataError, match="v2 is retired"):
        registry.load(2)
    with pytest.raises(DataError, match="v3 is retired"):
        registry.activate(3)
    assert registry.retain(keep=2) == []
    with pytest.raises(InputError, match="at least one"):
        registry.retain(keep=0)


def test_delete_removes_a_version_but_never_the_active_one(tmp_path):
    registry = ModelRegistry(tmp_path)
    one, two = ready(registry, 1), ready(registry, 2)
    registry.activate(two)
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match="v2 is active and cannot be deleted"):
        registry.delete(two)
    assert snapshot(tmp_path) == before
    registry.delete(one)
    assert [v.number for v in registry.versions()] == [two]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ACTIVE", "v000002"]
    with pytest.raises(DataError, match="no version v1"):
        registry.get(one)
    with pytest.raises(DataError, match="no version v1"):
        registry.delete(one)


def test_a_failing_build_is_failed_and_never_active(tmp_path):
    registry = ModelRegistry(tmp_path)
    with pytest.raises(MemoryError), registry.building(engine="velox", watermark=7) as version:
        registry.write_artifacts(version.number, artifacts())
        raise MemoryError("executor out of memory")
    got = registry.get(version.number)
    assert (got.state, got.error) == ("failed", "MemoryError: executor out of memory")
    with pytest.raises(DataError, match="v1 is failed"):
        registry.activate(version.number)
    assert registry.active() is None


def test_a_build_that_writes_nothing_fails_instead_of_becoming_ready(tmp_path):
    registry = ModelRegistry(tmp_path)
    with (
        pytest.raises(DataError, match="no artifacts"),
        registry.building(engine="velox", watermark=7),
    ):
        pass
    assert registry.get(1).state == "failed"
    assert "no artifacts" in registry.get(1).error


def test_a_clean_build_is_ready(tmp_path):
    registry = ModelRegistry(tmp_path)
    with registry.building(engine="velox", watermark=7) as version:
        registry.write_artifacts(version.number, artifacts())
        assert registry.get(version.number).state == "building"
    assert registry.get(version.number).state == "ready"


def test_stale_builds_are_abandoned(tmp_path):
    registry = ModelRegistry(tmp_path)
    stuck = registry.create(engine="mllib", watermark=0).number
    ready(registry, 2)
    assert registry.abandon_stale(older_than_seconds=3600) == []
    assert registry.abandon_stale(older_than_seconds=0) == [stuck]
    assert [v.state for v in registry.versions()] == ["failed", "ready"]
    assert registry.get(stuck).error.startswith("abandoned")


# ---------------------------------------------------------------- concurrency


def test_concurrent_allocations_get_distinct_numbers(tmp_path):
    registries = [ModelRegistry(tmp_path) for _ in range(8)]
    start = threading.Barrier(len(registries))
    numbers: list[int] = []

    def allocate(registry: ModelRegistry) -> None:
        start.wait()
        for _ in range(10):
            numbers.append(registry.create(engine="velox", watermark=0).number)

    threads = [threading.Thread(target=allocate, args=(r,)) for r in registries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(numbers) == list(range(1, 81))
    assert [v.number for v in registries[0].versions()] == list(range(1, 81))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_taken_number_is_skipped_and_never_overwritten(tmp_path, monkeypatch):
    registry = ModelRegistry(tmp_path)
    ready(registry, 1)
    before = snapshot(tmp_path)
    monkeypatch.setattr(registry, "_numbers", list)  # as if another process took v1 unseen
    assert registry.create(engine="velox", watermark=0).number == 2
    monkeypatch.undo()
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k.startswith("v000001")} == before


# --------------------------------------------------------------------- damage


def damage_metadata(text: str):
    def damage(root: Path) -> Path:
        path = root / "v000001" / "metadata.json"
        path.write_text(text)
        return path

    return damage


def edit_metadata(**changes):
    def damage(root: Path) -> Path:
        path = root / "v000001" / "metadata.json"
        data = {**json.loads(path.read_text()), **changes}
        path.write_text(json.dumps({k: v for k, v in data.items() if v is not ...}))
        return path

    return damage


def foreign_items(root: Path) -> Path:
    path = root / "v000001" / "items.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(1, "bias", table.column("bias").cast(pa.float32())), path)
    return path


def flipped_items(root: Path) -> Path:
    """Eight bytes changed inside the data, the Parquet footer intact: only a checksum sees it."""
    path = root / "v000001" / "items.parquet"
    data = bytearray(path.read_bytes())
    data[8:16] = bytes(b ^ 0xFF for b in data[8:16])
    path.write_bytes(bytes(data))
    assert pq.read_schema(path).remove_metadata().names == ["item", "bias", "count", "factors"]
    return path


def garbage_users(root: Path) -> Path:
    path = root / "v000001" / "users.parquet"
    path.write_bytes(b"not parquet at all")
    return path


def missing_users(root: Path) -> Path:
    path = root / "v000001" / "users.parquet"
    path.unlink()
    return path


def pointer(text: str):
    def damage(root: Path) -> Path:
        path = root / "ACTIVE"
        path.write_text(text)
        return path

    return damage


OPERATIONS = {
    "versions": lambda registry: registry.versions(),
    "get": lambda registry: registry.get(1),
    "active": lambda registry: registry.active(),
    "load": lambda registry: registry.load(1),
    "activate": lambda registry: registry.activate(1),
    "rollback": lambda registry: registry.rollback(),
    "retain": lambda registry: registry.retain(keep=1),
    "mark_failed": lambda registry: registry.mark_failed(1, "bad"),
}
# What each kind of damage stops. Activating a ready version is how a damaged pointer is
# repaired, and retiring a version deletes its artifacts whatever state they are in.
METADATA = set(OPERATIONS) - {"active"}
ARTIFACT = {"load", "activate", "rollback"}
POINTER = set(OPERATIONS) - {"load", "activate"}
DAMAGE = {
    "metadata not JSON": (damage_metadata("{not json"), "not valid JSON", METADATA),
    "metadata a list": (damage_metadata("[1, 2]"), "not an object", METADATA),
    "metadata missing a field": (edit_metadata(watermark=...), "missing watermark", METADATA),
    "metadata field of a wrong type": (edit_metadata(watermark="9"), "watermark is str", METADATA),
    "unknown state": (edit_metadata(state="done"), "unknown state 'done'", METADATA),
    "creation time not a time": (edit_metadata(created="yesterday"), "ISO-8601", METADATA),
    "newer format": (edit_metadata(format=99), "upgrade Velox", METADATA),
    "items of a foreign schema": (foreign_items, "bias is float", ARTIFACT),
    "items with flipped bytes": (flipped_items, "of v1 is damaged: its SHA-256", ARTIFACT),
    "checksums of a wrong type": (edit_metadata(checksums="x"), "checksums is str", METADATA),
    "users not Parquet": (garbage_users, "not readable Parquet", ARTIFACT),
    "users missing": (missing_users, "is missing", ARTIFACT),
    "pointer not a number": (pointer("v2\n"), "not a version number", POINTER),
    "pointer to a missing version": (pointer("9\n"), "names v9, which does not exist", POINTER),
    "pointer to a failed version": (pointer("3\n"), "names v3, which is failed", POINTER),
}
CASES = [(case, operation) for case, (*_, stops) in DAMAGE.items() for operation in sorted(stops)]


def damaged_registry(root: Path, case: str) -> tuple[ModelRegistry, Path]:
    """v1 ready, v2 active, v3 failed, then one kind of damage; returns the damaged file."""
    registry = ModelRegistry(root)
    ready(registry, 1)
    ready(registry, 2)
    registry.mark_failed(registry.create(engine="velox", watermark=0).number, "diverged")
    registry.activate(2)
    return registry, DAMAGE[case][0](root)


@pytest.mark.parametrize(("case", "operation"), CASES, ids=[f"{c}-{o}" for c, o in CASES])
def test_damage_is_one_clear_error_that_changes_nothing(tmp_path, case, operation):
    registry, path = damaged_registry(tmp_path, case)
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as caught:
        OPERATIONS[operation](registry)
    message = str(caught.value)
    assert str(path) in message
    assert DAMAGE[case][1] in message
    assert "\n" not in message and message.count("; ") == 1
    assert snapshot(tmp_path) == before


def test_a_damaged_version_can_be_deleted_and_a_damaged_pointer_reactivated(tmp_path):
    registry, _ = damaged_registry(tmp_path, "metadata not JSON")
    registry.delete(1)
    assert [(v.number, v.state) for v in registry.versions()] == [(2, "active"), (3, "failed")]
    pointer("v2")(tmp_path)
    assert registry.activate(2).state == "active"
    assert registry.active().number == 2


def test_a_version_written_before_checksums_still_loads(tmp_path):
    registry = ModelRegistry(tmp_path)
    number = ready(registry, seed=2)
    assert set(registry.get(number).checksums) == {"items.parquet", "users.parquet"}
    edit_metadata(checksums=...)(tmp_path)  # as an older Velox wrote it
    assert registry.get(number).checksums == {}
    assert_equal_artifacts(registry.load(number), artifacts(seed=2))


def test_a_version_written_before_item_counts_were_kept_still_loads(tmp_path):
    import hashlib

    registry = ModelRegistry(tmp_path)
    number = ready(registry)
    folder = tmp_path / f"v{number:06d}"
    items = folder / "items.parquet"
    pq.write_table(pq.read_table(items).drop_columns(["count"]), items)  # the older layout
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["checksums"]["items.parquet"] = hashlib.sha256(items.read_bytes()).hexdigest()
    (folder / "metadata.json").write_text(json.dumps(metadata))
    loaded = registry.load(number)
    assert loaded.item_count is None
    assert_equal_artifacts(
        dataclasses.replace(loaded, item_count=artifacts().item_count), artifacts()
    )
