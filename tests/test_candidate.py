"""A version built beside the live one in the other slot, gated on the same log, swapped in."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from feature_store.candidate import Candidate, GateTally
from feature_store.codec import decode_log
from feature_store.durable import Replaced
from feature_store.layout import DataLayout
from feature_store.online import OnlineStore
from feature_store.registry import ModelRegistry
from feature_store.versions import open_active, store_version
from velox.als import ALSParams, Ratings, train_als
from velox.backend import CPU
from velox.config import load_config
from velox.datasets import SyntheticSpec, synthesize
from velox.model import OnlineModel

W = 40  # v2's training watermark


@pytest.fixture
def setup(tmp_path):
    config = load_config(None, overrides=[f"data.dir={tmp_path}", "store.checkpoint_interval=0"])
    table = synthesize(SyntheticSpec(users=60, items=40, ratings=3000, seed=1))
    registry = ModelRegistry(DataLayout(tmp_path).registry)
    for seed, watermark in ((0, 0), (1, W)):
        result = train_als(Ratings.from_table(table), ALSParams(rank=3, iterations=3, seed=seed))
        with registry.building(engine="velox", watermark=watermark) as version:
            registry.write_artifacts(version.number, result)
    registry.activate(1)
    return config, registry, table


def _stream(table, n, seed):
    rng = np.random.default_rng(seed)
    users = table.column("user").to_pylist()
    items = [*table.column("item").to_pylist(), "new-a", "new-b"]  # two no version knows
    pick = rng.integers(0, len(users), n)
    return (
        [users[p] for p in pick],
        [items[p] for p in rng.integers(0, len(items), n)],
        rng.integers(1, 6, n).astype(float),
    )


def _reference(registry, number, config, store, after) -> OnlineModel:
    """Version ``number`` with every trained user, then the log after ``after``, in order."""
    model = registry.load(number).online_model(
        version=registry.get(number).name, config=config.model
    )
    records = [record for _, record in store.records_after(after)]
    for run in decode_log(records):
        model.observe_many(run.users, run.items, run.ratings, run.timestamps)
    return model


def _assert_same_users(durable, reference: OnlineModel, users) -> None:
    A, b, count, *_ = durable.statistics(users)
    rows = reference.users.find(users)
    np.testing.assert_array_equal(A, reference.users.A[rows])
    np.testing.assert_array_equal(b, reference.users.b[rows])
    np.testing.assert_array_equal(count, reference.users.count[rows])


def test_a_candidate_built_while_the_live_model_observes_equals_a_direct_computation(setup):
    config, registry, table = setup
    live, _ = open_active(config, CPU)
    live.observe(*_stream(table, 100, seed=2))  # seq 1..100: 60 after v2's watermark
    candidate = Candidate.build(registry.get(2), registry, live.store, config, CPU)
    assert candidate.durable.slot == 1 and not candidate.resumed
    writer_done = threading.Event()

    def keep_observing():  # the live model goes on while the candidate catches up
        for seed in range(10, 20):
            live.observe(*_stream(table, 20, seed=seed))
        writer_done.set()

    writer = threading.Thread(target=keep_observing)
    writer.start()
    candidate.catch_up(within=config.serve.batch_max)
    writer.join()
    candidate.catch_up(within=config.serve.batch_max)
    live.observe(*_stream(table, 7, seed=30))  # logged after the last catch-up: the swap applies
    pause = candidate.swap(live, config)
    assert writer_done.is_set() and pause >= 0
    new = candidate.durable
    store = new.store
    assert store.active_slot == 1 and store_version(store) == "v2"
    assert new.applied_seq == store.last_seq == 100 + 200 + 7
    reference = _reference(registry, 2, config, store, after=W)
    users = sorted(set(_stream(table, 100, seed=2)[0]))
    _assert_same_users(new, reference, users)
    ours, theirs = new.model.biases.online_state(), reference.biases.online_state()
    assert ours.items == theirs.items and ours.mean_sum == theirs.mean_sum
    np.testing.assert_array_equal(ours.sums, theirs.sums)
    # The old version refuses writes but still answers a read that began before the swap.
    with pytest.raises(Replaced):
        live.observe(["u1"], ["i1"], [3.0])
    assert live.predict(users[0], ["i1"]).scores.shape == (1,)
    # The new one logs what it applies, and everything survives a restart.
    new.observe(*_stream(table, 5, seed=40))
    live.seal()
    new.close()
    registry.activate(2)
    again, active = open_active(config, CPU)
    assert active.name == "v2" and again.slot == 1 and again.reapplied == 0
    reference = _reference(registry, 2, config, again.store, after=W)
    _assert_same_users(again, reference, users)
    again.close()


def test_the_gate_compares_both_versions_on_the_same_logged_observations(setup):
    config, registry, table = setup
    live, _ = open_active(config, CPU)
    live.observe(*_stream(table, 300, seed=5))
    candidate = Candidate.build(registry.get(2), registry, live.store, config, CPU)
    candidate.catch_up(within=0)
    runs = decode_log([record for _, record in live.store.records_after(W)])
    ratings = np.concatenate([run.ratings for run in runs])
    logged = np.clip(np.concatenate([run.predictions for run in runs]), 0.0, 5.0)
    tally = candidate.tally
    assert tally.count == 300 - W
    assert tally.active_rmse == pytest.approx(np.sqrt(np.mean((logged - ratings) ** 2)), rel=1e-12)
    # The candidate's predictions are its own, made before each observation was applied.
    reference = registry.load(2).online_model(version="v2", config=config.model)
    predicted = []
    for run in runs:
        applied = reference.observe_many(run.users, run.items, run.ratings, run.timestamps)
        predicted.append(np.clip(applied.predictions, 0.0, 5.0))
    expected = np.sqrt(np.mean((np.concatenate(predicted) - ratings) ** 2))
    assert tally.candidate_rmse == pytest.approx(expected, rel=1e-12)
    live.close()


def test_the_gate_rejects_a_worse_candidate_and_passes_an_unjudged_one():
    tally = GateTally(1.0, 5.0, count=2000, active_sse=2000 * 0.81, candidate_sse=2000 * 1.0)
    passed, reason = tally.verdict(tolerance=0.01, min_observations=1000)
    assert not passed and "rejected by the gate" in reason and "1.0000" in reason
    assert "0.9000" in reason
    passed, reason = tally.verdict(tolerance=0.2, min_observations=1000)
    assert passed and "passed the gate" in reason
    passed, reason = tally.verdict(tolerance=0.01, min_observations=5000)
    assert passed and "unjudged" in reason and "2000" in reason


def test_a_build_interrupted_by_a_restart_resumes_and_a_rollback_swaps_back(setup):
    config, registry, table = setup
    live, _ = open_active(config, CPU)
    live.observe(*_stream(table, 120, seed=6))
    candidate = Candidate.build(registry.get(2), registry, live.store, config, CPU)
    candidate.catch_up(within=0)
    live.observe(*_stream(table, 30, seed=7))
    candidate.release()  # the server stops mid-build: the live model closes, v1 stays active
    live.close()
    live, active = open_active(config, CPU)
    assert active.name == "v1" and live.slot == 0
    candidate = Candidate.build(registry.get(2), registry, live.store, config, CPU)
    assert candidate.resumed and candidate.durable.applied_seq == 120
    candidate.catch_up(within=0)
    candidate.swap(live, config)
    live.seal()
    registry.activate(2)
    new = candidate.durable
    new.observe(*_stream(table, 25, seed=8))
    # Rolling back is the same swap: v1's slot was sealed, so it resumes there.
    back = Candidate.build(registry.get(1), registry, new.store, config, CPU)
    assert back.resumed and back.durable.slot == 0 and back.durable.applied_seq == 150
    back.catch_up(within=0)
    back.swap(new, config)
    new.seal()
    users = sorted(set(_stream(table, 120, seed=6)[0]))
    _assert_same_users(back.durable, _reference(registry, 1, config, new.store, after=0), users)
    back.durable.close()


def test_a_swap_the_pointer_did_not_follow_is_undone_from_the_other_slot_at_start(setup):
    config, registry, table = setup
    live, _ = open_active(config, CPU)
    live.observe(*_stream(table, 80, seed=9))
    candidate = Candidate.build(registry.get(2), registry, live.store, config, CPU)
    candidate.catch_up(within=0)
    candidate.swap(live, config)  # the store flipped to v2; the registry still names v1
    live.seal()
    candidate.durable.observe(*_stream(table, 10, seed=11))
    candidate.durable.close()
    again, active = open_active(config, CPU)
    assert active.name == "v1" and again.slot == 0 and again.reapplied == 10
    assert again.store.active_slot == 0
    users = sorted(set(_stream(table, 80, seed=9)[0]))
    _assert_same_users(again, _reference(registry, 1, config, again.store, after=0), users)
    again.close()


def test_a_user_deleted_while_the_candidate_builds_is_in_neither_version(setup):
    config, registry, table = setup
    live, _ = open_active(config, CPU)
    batch = _stream(table, 120, seed=12)
    live.observe(*batch)
    candidate = Candidate.build(registry.get(2), registry, live.store, config, CPU)
    candidate.catch_up(within=0)
    gone = batch[0][-1]
    live.delete_user(gone)
    candidate.forget(gone)
    candidate.catch_up(within=0)
    candidate.swap(live, config)
    new = candidate.durable
    assert new.user_state(gone).observations == 0
    for slot in (0, 1):
        assert new.store.get_states([gone], slot=slot)[1] is None
    live.seal()
    new.close()
    with OnlineStore(DataLayout.from_config(config).online) as store:
        assert store.get_states([gone], slot=1)[1] is None
