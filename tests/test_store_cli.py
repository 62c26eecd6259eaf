"""``velox store``: inspect, backup, restore, forget and trim, run as a user runs them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from feature_store.durable import DurableModel
from feature_store.layout import DataLayout
from feature_store.offline import OfflineStore, log_rows
from feature_store.online import OnlineStore
from feature_store.registry import ModelRegistry
from feature_store.versions import open_active
from tests.test_cli import velox
from velox.backend import CPU
from velox.config import load_config
from velox.trained import TrainedModel

TRAINED = ["a", "bob", "c"]


def trained_artifacts(users: list[str], items: int = 2, d: int = 4) -> TrainedModel:
    """A small trained version of ``users`` (random statistics), to register."""
    rng = np.random.default_rng(0)
    M = rng.normal(size=(len(users), d, d))
    return TrainedModel(
        item_ids=np.array([f"i{j}" for j in range(items)]),
        item_factors=rng.normal(size=(items, d - 1)),
        item_bias=rng.normal(size=items),
        global_mean=3.5,
        train_count=40,
        user_ids=np.array(users),
        user_weights=rng.normal(size=(len(users), d)),
        user_gram=M @ M.transpose(0, 2, 1),
        user_rhs=rng.normal(size=(len(users), d)),
        user_count=rng.integers(5, 20, len(users)),
    )


def _with_model(layout: DataLayout, trained: TrainedModel) -> None:
    """Register ``trained`` as the data folder's version 1, active, trained on no log."""
    registry = ModelRegistry(layout.registry)
    with registry.building(engine="velox", watermark=0) as version:
        registry.write_artifacts(version.number, trained)
        registry.mark_ready(version.number, metrics={"validation_rmse": 0.9})
    registry.activate(version.number)


def _durable(layout: DataLayout) -> DurableModel:
    """The active version over the data folder's store, as ``velox serve`` opens it."""
    config = load_config(None, overrides=[f"data.dir={layout.root}", "store.checkpoint_interval=0"])
    return open_active(config, CPU)[0]


@pytest.fixture
def data(tmp_path) -> DataLayout:
    """A data folder with a model, logged observations, checkpoints and offline rows."""
    layout = DataLayout(tmp_path / "data")
    _with_model(layout, trained_artifacts(TRAINED))
    durable = _durable(layout)
    rng = np.random.default_rng(4)
    for day in range(3):
        users = rng.choice(["ann", "bob", "cy", "dee"], size=20).tolist()
        items = rng.choice([f"i{j}" for j in range(10)], size=20).tolist()
        durable.observe(users, items, rng.integers(1, 6, 20), np.full(20, 1.7e9 + day * 86400))
    OfflineStore(layout.offline).append(log_rows(durable.store.log_after(0)))
    durable.close()
    return layout


def _store(layout: DataLayout, *args: str):
    return velox("--set", f"data.dir={layout.root}", "store", *args)


def _everything(layout: DataLayout) -> dict:
    with OnlineStore(layout.online, read_only=True) as store:
        log = [(seq, o) for seq, o in store.log_after(0)]
        found, states = store.get_states(["ann", "bob", "cy", "dee"])
    return {
        "log": log,
        "states": (found.tolist(), states.A.tolist(), states.seq.tolist()),
        "offline": OfflineStore(layout.offline).read().to_pylist(),
        "model": ModelRegistry(layout.registry).load(1).user_gram.tolist(),
    }


def test_inspect_reports_positions_counts_and_versions_even_next_to_a_server(data):
    with OnlineStore(data.online):  # held, as a running server holds it
        done = _store(data, "inspect", "--json")
        text = _store(data, "inspect")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["last_seq"] == 60 and summary["checkpoint_seq"] == 60
    assert summary["offline_watermark"] == 60 and len(summary["offline_days"]) == 3
    assert [(v["version"], v["state"]) for v in summary["versions"]] == [("v1", "active")]
    assert summary["log_first"] == 1 and summary["log_bytes"] > 0
    # v1 was trained on no log (watermark 0): rolling back to it needs the whole log.
    assert (summary["held_by"], summary["held_at"]) == ("versions", 0)
    assert summary["holds"] == {"exported": 60, "checkpoint": 60, "versions": 0}
    assert "seq 1 .. 60" in text.stdout and "validation_rmse=0.9000" in text.stdout
    assert "held back by  versions at seq 0 (exported 60, checkpoint 60, versions 0)" in text.stdout


def test_trim_drops_what_no_version_export_or_recovery_needs(data):
    registry = ModelRegistry(data.registry)
    with registry.building(engine="velox", watermark=40) as version:
        registry.write_artifacts(version.number, trained_artifacts(TRAINED))
        registry.mark_ready(version.number)
    registry.activate(version.number)
    before = _everything(data)
    kept = velox("--set", f"data.dir={data.root}", "--set", "registry.keep=1", "store", "trim")
    assert kept.returncode == 0, kept.stderr
    assert "log trimmed before seq 1 (held by versions at 0)" in kept.stdout  # v1 is kept
    assert _everything(data) == before
    registry.retain(keep=1)  # v1 retired: no longer one to roll back to
    done = _store(data, "trim")
    assert done.returncode == 0, done.stderr
    assert "log trimmed before seq 41 (held by versions at 40)" in done.stdout
    with OnlineStore(data.online, read_only=True) as store:
        assert list(store.log_after(0)) == before["log"][40:]
        assert store.rated("ann") == {o.item for _, o in before["log"] if o.user == "ann"}
    summary = json.loads(_store(data, "inspect", "--json").stdout)
    assert summary["log_first"] == 41


def test_backup_then_restore_brings_every_store_back(data, tmp_path):
    before = _everything(data)
    done = _store(data, "backup", str(tmp_path / "b1"))
    assert done.returncode == 0, done.stderr
    assert "log up to 60" in done.stdout
    elsewhere = DataLayout(tmp_path / "fresh")
    done = _store(elsewhere, "restore", str(tmp_path / "b1"))
    assert done.returncode == 0, done.stderr
    assert _everything(elsewhere) == before
    # The copy is independent: writing to the restored store leaves the original alone.
    with _durable(elsewhere) as durable:
        durable.observe(["ann"], ["i1"], [5.0], [1.8e9])
    assert _everything(data) == before


def test_restore_over_a_store_needs_replace_and_moves_the_old_one_aside(data, tmp_path):
    assert _store(data, "backup", str(tmp_path / "b1")).returncode == 0
    before = _everything(data)
    with _durable(data) as durable:
        durable.observe(["ann"], ["i1"], [5.0], [1.8e9])
    changed = _everything(data)
    refused = _store(data, "restore", str(tmp_path / "b1"))
    assert refused.returncode == 2 and "pass --replace" in refused.stderr
    assert refused.stderr.count("\n") == 1
    assert _everything(data) == changed
    done = _store(data, "restore", "--replace", str(tmp_path / "b1"))
    assert done.returncode == 0, done.stderr
    assert _everything(data) == before
    (aside,) = data.root.glob("replaced-*")
    assert _everything(DataLayout(aside)) == changed


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("held", ("backup", "{tmp}/b2"), "in use by another process"),
        ("none", ("backup", "{tmp}/existing"), "already exists"),
        ("none", ("restore", "{tmp}/existing"), "is not a Velox backup"),
        ("held", ("forget", "ann"), "in use by another process"),
        ("held", ("trim",), "in use by another process"),
    ],
)
def test_store_commands_refuse_clearly_and_change_nothing(data, tmp_path, setup, args, message):
    (tmp_path / "existing").mkdir()
    before = _everything(data)
    if setup == "held":
        with OnlineStore(data.online):
            done = _store(data, *(a.format(tmp=tmp_path) for a in args))
    else:
        done = _store(data, *(a.format(tmp=tmp_path) for a in args))
    assert done.returncode == 2
    assert message in done.stderr and done.stderr.count("\n") == 1
    assert _everything(data) == before
    assert not (tmp_path / "b2").exists() and not list(tmp_path.glob(".b2*"))


def test_forget_removes_the_user_from_the_log_the_state_the_offline_store_and_the_model(data):
    before = _everything(data)
    mine = sum(1 for _, o in before["log"] if o.user == "bob")
    done = _store(data, "forget", "bob")
    assert done.returncode == 0, done.stderr
    assert f"{mine} log records, {mine} offline rows and 1 registry rows" in done.stdout
    after = _everything(data)
    assert [e for e in before["log"] if e[1].user != "bob"] == after["log"]
    assert after["states"][0] == [True, False, True, True]
    assert [r for r in before["offline"] if r["user"] != "bob"] == after["offline"]
    kept = [gram for user, gram in zip(TRAINED, before["model"], strict=True) if user != "bob"]
    assert after["model"] == kept
    with _durable(data) as durable:
        assert durable.user_state("bob").known is False
        assert durable.user_state("ann").observations > 0
