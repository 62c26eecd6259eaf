"""The durable model: recovery from the log after a crash, the bounded cache, forgetting."""

from __future__ import annotations

import numpy as np
import pytest

from feature_store.codec import StateBatch, decode_log
from feature_store.durable import DurableModel
from feature_store.online import OnlineStore
from tests.factories import small_model
from velox.config import StoreConfig
from velox.errors import DataError
from velox.model import OnlineModel

ITEMS = [f"i{j}" for j in range(8)] + ["new1", "new2"]


def _batches(n_batches: int, seed: int = 0, users: int = 30, size: int = 17):
    """Micro-batches with repeated users and items the model does not know."""
    rng = np.random.default_rng(seed)
    for b in range(n_batches):
        yield (
            rng.choice([f"u{j}" for j in range(users)], size=size).tolist(),
            rng.choice(ITEMS, size=size).tolist(),
            rng.integers(1, 6, size=size).astype(float),
            np.full(size, float(b)),
        )


def _open(path, **config) -> DurableModel:
    settings = {"checkpoint_interval": 0.0, **config}
    return DurableModel(small_model(), OnlineStore(path), StoreConfig(**settings))


def _crash(durable: DurableModel) -> None:
    """Drop the model without writing its checkpoint: what SIGKILL leaves on disk."""
    durable.store.close()


def _everything(durable: DurableModel, users: list[str]) -> dict[str, np.ndarray]:
    A, b, count, seq, _ = durable.statistics(users)
    model = durable.model
    rows = model.items.find(["new1", "new2"])
    return {
        "A": A,
        "b": b,
        "count": count,
        "seq": seq,
        "item A": model.items.A[rows],
        "bias": model.biases.bias(model.biases.find(ITEMS)),
        "mean": np.array(model.biases.mean),
    }


def _full_replay(path) -> tuple[OnlineModel, int]:
    """A fresh model fed the whole log: the reference every recovery must match."""
    model = small_model()
    with OnlineStore(path) as store:
        records = list(store.records_after(0))
    for applied in decode_log([r for _, r in records]):
        model.replay(applied)
    return model, len(records)


def _assert_states_equal(got: dict, want: dict) -> None:
    for name in ("A", "b", "count", "seq"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for name in ("item A", "bias", "mean"):  # sums added in another order: rounding only
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, err_msg=name)


def test_a_crash_after_a_checkpoint_recovers_every_state_from_the_log(tmp_path):
    path = tmp_path / "db"
    durable = _open(path)
    batches = list(_batches(12))
    for number, batch in enumerate(batches):
        durable.observe(*batch)
        if number == 5:
            assert durable.flush() > 0
    users = list(durable.model.users.keys)
    before = _everything(durable, users)
    checkpoint = durable.store.checkpoint_seq
    assert 0 < checkpoint < durable.store.last_seq
    _crash(durable)

    recovered = _open(path)
    assert recovered.recovered == 6 * 17  # the batches after the checkpoint
    _assert_states_equal(_everything(recovered, users), before)
    assert recovered.predict("u3", ITEMS).scores == pytest.approx(
        durable.model.predict("u3", ITEMS).scores, rel=1e-10
    )
    recovered.close()
    assert _open(path).recovered == 0  # a clean close leaves nothing to replay


@pytest.mark.parametrize("sync", [True, False], ids=["synced", "group-synced"])
def test_recovered_states_equal_a_replay_of_the_whole_log(tmp_path, sync):
    path = tmp_path / "db"
    durable = _open(path, cache_users=8)  # eviction forces checkpoints between batches
    for batch in _batches(10, seed=1):
        durable.observe(*batch, sync=sync)
    if not sync:  # unsynced batches, checkpoints among them, then one sync for all
        durable.sync_log()
    _crash(durable)
    reference, logged = _full_replay(path)
    assert logged == 170
    recovered = _open(path, cache_users=8)
    users = sorted(reference.users.keys)
    got = _everything(recovered, users)
    rows = reference.users.find(users)
    np.testing.assert_array_equal(got["A"], reference.users.A[rows])
    np.testing.assert_array_equal(got["b"], reference.users.b[rows])
    np.testing.assert_array_equal(got["count"], reference.users.count[rows])
    np.testing.assert_allclose(
        got["item A"], reference.items.A[reference.items.find(["new1", "new2"])], rtol=1e-12
    )
    recovered.close()


def test_user_states_stored_ahead_of_the_watermark_are_not_replayed_twice(tmp_path, monkeypatch):
    """What a crash inside a checkpoint leaves: some user chunks written, not the watermark."""
    monkeypatch.setattr("feature_store.checkpoints.CHECKPOINT_CHUNK", 4)  # several chunks
    path = tmp_path / "db"
    durable = _open(path)
    for number, batch in enumerate(_batches(10, seed=5)):
        durable.observe(*batch)
        if number == 2:
            durable.flush()  # the watermark: 51
    ahead = sorted(durable.model.users.keys)[:9]  # three chunks' worth, then the "crash"
    A, b, count, seq, updated = durable.statistics(ahead)
    assert durable.store.checkpoint_seq == 51 and (seq > 51).any()
    durable.store.put_states("users", ahead, StateBatch(A, b, count, seq, updated), "float64")
    _crash(durable)
    reference, _ = _full_replay(path)
    recovered = _open(path)
    users = sorted(reference.users.keys)
    got = _everything(recovered, users)
    rows = reference.users.find(users)
    np.testing.assert_array_equal(got["A"], reference.users.A[rows])
    np.testing.assert_array_equal(got["count"], reference.users.count[rows])
    np.testing.assert_allclose(
        got["bias"], reference.biases.bias(reference.biases.find(ITEMS)), rtol=1e-12
    )
    recovered.close()


def test_the_cache_stays_bounded_and_evicted_users_read_back_unchanged(tmp_path):
    durable = _open(tmp_path / "db", cache_users=10)
    batches = list(_batches(6, users=40))
    for batch in batches:
        durable.observe(*batch)
        assert len(durable.model.users) <= 10
    expected = small_model()
    for batch in batches:
        expected.observe_many(*batch)
    for user in sorted(set(u for batch in batches for u in batch[0])):
        np.testing.assert_allclose(
            durable.predict(user, ITEMS).scores, expected.predict(user, ITEMS).scores, rtol=1e-9
        )
        assert len(durable.model.users) <= 10  # reads page users in and evict too
    assert durable.store.checkpoint_seq > 0  # eviction had to write states back
    durable.close()


def test_forgetting_a_user_removes_state_and_log_records_for_good(tmp_path):
    path = tmp_path / "db"
    durable = _open(path)
    for batch in _batches(5):
        durable.observe(*batch)
    logged = durable.store.last_seq
    mine = sum(1 for _, o in durable.store.log_after(0) if o.user == "u4")
    prior = durable.predict("never-seen", ["i1"]).scores
    assert mine > 0
    assert durable.delete_user("u4").log_records == mine
    assert "u4" not in durable.model.users
    assert durable.user_state("u4").known is False
    np.testing.assert_array_equal(durable.predict("u4", ["i1"]).scores, prior)
    _crash(durable)
    reopened = _open(path)
    assert reopened.user_state("u4").known is False
    assert all(o.user != "u4" for _, o in reopened.store.log_after(0))
    assert sum(1 for _ in reopened.store.log_after(0)) == logged - mine
    reopened.close()


def test_a_store_of_another_model_version_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "db"
    with _open(path) as durable:
        durable.observe(*next(_batches(1)))
    store = OnlineStore(path)
    with pytest.raises(DataError, match="holds the online state of model version 'v7', not 'v8'"):
        DurableModel(small_model(version="v8"), store, StoreConfig(checkpoint_interval=0))
    assert store.last_seq == 17 and store.checkpoint_seq == 17
    store.close()


def test_a_failed_commit_refuses_further_writes_until_reopened(tmp_path, monkeypatch):
    path = tmp_path / "db"
    durable = _open(path)
    durable.observe(*next(_batches(1)))

    def disk_full(applied, **options):  # a fault a test cannot cause on a real disk
        raise OSError("No space left on device")

    monkeypatch.setattr(durable.store, "commit", disk_full)
    batch = next(_batches(1, seed=9))
    with pytest.raises(DataError, match=r"were not stored.*No space left"):
        durable.observe(*batch)
    monkeypatch.undo()
    with pytest.raises(DataError, match="refuses writes"):
        durable.observe(*batch)
    _crash(durable)
    reopened = _open(path)
    assert reopened.store.last_seq == 17  # the failed batch never reached the log
    assert reopened.user_state(batch[0][0]).observations == sum(
        1 for u in next(_batches(1))[0] if u == batch[0][0]
    )
    reopened.close()


def test_a_failed_log_sync_refuses_further_writes_until_reopened(tmp_path, monkeypatch):
    path = tmp_path / "db"
    durable = _open(path)
    durable.observe(*next(_batches(1)), sync=False)

    def io_error():  # a fault a test cannot cause on a real disk
        raise OSError("Input/output error")

    monkeypatch.setattr(durable.store, "sync_log", io_error)
    with pytest.raises(DataError, match=r"log sync failed.*Input/output"):
        durable.sync_log()
    monkeypatch.undo()
    with pytest.raises(DataError, match="refuses writes"):
        durable.observe(*next(_batches(1, seed=4)), sync=False)
    with pytest.raises(DataError, match="refuses writes"):
        durable.sync_log()
    with pytest.raises(DataError, match="refuses writes"), durable.writes_held():
        pass  # no version swap around a broken log: only a reopen
    _crash(durable)
    assert _open(path).store.last_seq == 17  # reopening recovers what the log holds


def test_background_write_back_moves_the_checkpoint_without_a_call(tmp_path):
    import time

    durable = _open(tmp_path / "db", checkpoint_interval=0.05)
    durable.observe(*next(_batches(1)))
    deadline = time.monotonic() + 10
    while durable.store.checkpoint_seq < 17 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert durable.store.checkpoint_seq == 17
    assert len(durable.model.users.dirty()) == 0
    durable.close()


def test_sequence_numbers_are_never_reused_after_the_newest_records_are_deleted(tmp_path):
    path = tmp_path / "db"
    durable = _open(path)
    durable.observe(["keep"], ["i1"], [4.0], [1.0])
    durable.observe(["gone", "gone"], ["i2", "i3"], [2.0, 3.0], [2.0, 3.0])  # seqs 2, 3
    assert durable.delete_user("gone").log_records == 2
    durable.close()
    reopened = _open(path)
    _, seqs = reopened.observe(["keep"], ["i4"], [5.0], [4.0])
    assert seqs.tolist() == [4]  # not 2: the checkpoint already covers 3
    _crash(reopened)
    again = _open(path)
    assert again.user_state("keep").observations == 2  # the acknowledged one is recovered
    again.close()


def test_a_checkpoint_never_holds_effects_of_a_failed_commit(tmp_path, monkeypatch):
    path = tmp_path / "db"
    durable = _open(path)
    batch = next(_batches(1))
    durable.observe(*batch)

    def disk_full(applied):
        raise OSError("No space left on device")

    monkeypatch.setattr(durable.store, "commit", disk_full)
    with pytest.raises(DataError):
        durable.observe(*next(_batches(1, seed=4)))
    monkeypatch.undo()
    assert durable.flush(force=True) == 0  # refused: memory is ahead of the log
    _crash(durable)
    reopened = _open(path)
    counts = reopened.statistics(sorted(set(batch[0])))[2]
    assert counts.sum() == 17  # only what the log holds
    reopened.close()


def _wal_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.log"))


def test_a_checkpoint_writes_its_user_states_past_the_write_ahead_log(tmp_path):
    """What the next commit's fsync must write: the WAL grows by the watermark's write only,
    not by the states (over 1,500 users of rank 3, about 200 KB), and they are in table files."""
    path = tmp_path / "db"
    durable = _open(path)
    for batch in _batches(100, users=2000, size=40):
        durable.observe(*batch)
    wal = _wal_bytes(path)
    users = durable.flush()
    assert users > 1500 and durable.store.checkpoint_seq == 4000
    assert _wal_bytes(path) - wal < 2_000  # item states, biases and the watermark
    assert durable.store._cf["users"].property_int_value("rocksdb.total-sst-files-size") > 100_000
    durable.close()
