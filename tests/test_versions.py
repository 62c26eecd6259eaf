"""Serving a registry version over the online store: install, recover, switch versions."""

from __future__ import annotations

import numpy as np
import pytest

from feature_store.layout import DataLayout
from feature_store.online import OnlineStore
from feature_store.registry import ModelRegistry
from feature_store.versions import open_active, serve_version, store_version
from velox.als import ALSParams, Ratings, train_als
from velox.backend import CPU
from velox.config import load_config
from velox.datasets import SyntheticSpec, synthesize
from velox.errors import DataError
from velox.model import OnlineModel


@pytest.fixture
def setup(tmp_path):
    config = load_config(None, overrides=[f"data.dir={tmp_path}", "store.checkpoint_interval=0"])
    table = synthesize(SyntheticSpec(users=60, items=40, ratings=3000, seed=1))
    registry = ModelRegistry(DataLayout(tmp_path).registry)
    versions = []
    for seed, watermark in ((0, 0), (1, 40)):
        result = train_als(Ratings.from_table(table), ALSParams(rank=3, iterations=3, seed=seed))
        with registry.building(engine="velox", watermark=watermark) as version:
            registry.write_artifacts(version.number, result)
        versions.append(registry.get(version.number))
    registry.activate(versions[0].number)
    return config, registry, table


def _stream(table, n=100, seed=3):
    rng = np.random.default_rng(seed)
    users = table.column("user").to_pylist()
    items = table.column("item").to_pylist()
    pick = rng.integers(0, len(users), n)
    return [users[p] for p in pick], [items[p] for p in pick], rng.integers(1, 6, n).astype(float)


def _reference(registry, number, config, observations) -> OnlineModel:
    """The version's in-memory model with every trained user loaded, then the observations."""
    model = registry.load(number).online_model(
        version=registry.get(number).name, config=config.model
    )
    for users, items, ratings in observations:
        model.observe_many(users, items, ratings)
    return model


def test_a_fresh_store_installs_the_active_version_then_recovers_it(setup):
    config, registry, table = setup
    durable, active = open_active(config, CPU)
    assert active.name == "v1" and store_version(durable.store) == "v1"
    batch = _stream(table)
    durable.observe(*batch)
    users = sorted(set(batch[0]))
    before = durable.statistics(users)
    durable.close()
    again, _ = open_active(config, CPU)
    assert again.reapplied == 0 and again.recovered == 0
    np.testing.assert_array_equal(again.statistics(users)[0], before[0])
    reference = _reference(registry, 1, config, [batch])
    rows = reference.users.find(users)
    np.testing.assert_allclose(before[0], reference.users.A[rows], rtol=1e-12)
    again.close()


def test_switching_versions_reapplies_the_log_after_the_new_watermark(setup):
    config, registry, table = setup
    durable, _ = open_active(config, CPU)
    first, second = _stream(table, n=40, seed=4), _stream(table, n=60, seed=5)
    durable.observe(*first)  # sequence numbers 1..40, inside v2's watermark
    durable.observe(*second)  # 41..100, after it
    durable.close()
    registry.activate(2)
    switched, active = open_active(config, CPU)
    assert active.name == "v2" and switched.reapplied == 60
    users = sorted(set(first[0]) | set(second[0]))
    reference = _reference(registry, 2, config, [second])
    rows = reference.users.find(users)
    np.testing.assert_allclose(switched.statistics(users)[0], reference.users.A[rows], rtol=1e-12)
    assert switched.store.last_seq == 100  # the log is kept as it was
    switched.close()
    reopened, _ = open_active(config, CPU)  # and the next start recovers, not reinstalls
    assert reopened.reapplied == 0
    reopened.close()


def test_a_version_trained_past_the_logs_end_keeps_every_later_observation(setup):
    """v2's watermark (40) is beyond this fresh store's log: nothing to skip, nothing lost."""
    config, registry, table = setup
    registry.activate(2)
    durable, active = open_active(config, CPU)
    assert active.name == "v2" and durable.store.last_seq == 0
    batch = _stream(table, n=30)
    durable.observe(*batch)
    users = sorted(set(batch[0]))
    before = durable.statistics(users)
    durable.close()  # writes back: the observed users must look changed to the checkpoint
    reopened, _ = open_active(config, CPU)
    after = reopened.statistics(users)
    for got, want in zip(after[:3], before[:3], strict=True):
        np.testing.assert_array_equal(got, want)
    reopened.close()


def test_an_unfinished_install_is_redone(setup):
    config, registry, table = setup
    durable, _ = open_active(config, CPU)
    durable.observe(*_stream(table))
    durable.close()
    with OnlineStore(DataLayout.from_config(config).online) as store:
        store.begin_install("v2")  # as if a switch to v2 died after its first step
        assert store_version(store) is None
        redone = serve_version(registry.get(1), registry, store, config, CPU)
        assert redone.reapplied == 100 and store_version(store) == "v1"
        redone.close()


def test_serving_without_an_active_version_says_how_to_get_one(tmp_path):
    config = load_config(None, overrides=[f"data.dir={tmp_path}"])
    with pytest.raises(DataError, match="velox train --activate"):
        open_active(config, CPU)


def test_a_forgotten_user_stays_forgotten_when_a_version_is_installed_again(setup):
    config, registry, _ = setup
    durable, _ = open_active(config, CPU)
    trained = str(registry.load(1).user_ids[0])
    assert durable.user_state(trained).known
    durable.delete_user(trained)
    durable.close()
    registry.activate(2)
    switched, _ = open_active(config, CPU)  # installs v2, trained before the deletion
    assert not switched.user_state(trained).known
    switched.close()


def test_a_version_trained_after_a_deletion_keeps_the_users_later_state(setup):
    config, registry, table = setup
    durable, _ = open_active(config, CPU)
    durable.observe(*_stream(table, n=10))  # log records 1-10
    trained = str(registry.load(2).user_ids[0])
    durable.delete_user(trained)  # at log position 11: gone from every version so far
    assert trained not in registry.load(2).user_ids.tolist()
    durable.observe(*_stream(table, n=40, seed=4))  # up to 50
    durable.close()
    # A version trained later, up to record 40, saw what the user did after the deletion.
    result = train_als(Ratings.from_table(table), ALSParams(rank=3, iterations=3, seed=2))
    with registry.building(engine="velox", watermark=40) as later:
        registry.write_artifacts(later.number, result)
    registry.activate(later.number)
    switched, _ = open_active(config, CPU)
    assert switched.user_state(trained).known  # trained on what they did after the deletion
    switched.close()
