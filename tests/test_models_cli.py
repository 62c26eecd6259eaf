"""``velox models`` against a real registry (no server: a bound port that does not listen)."""

from __future__ import annotations

import socket

import msgspec
import numpy as np
import pytest

from serving.models_cli import served_lines
from serving.monitor import VersionMonitor, monitor_report
from serving.schemas import DecisionReport, GateReport, Models, RetrainReport, RunReport
from tests.test_serving import _publish
from velox.cli import main
from velox.config import RetrainConfig


@pytest.fixture
def velox(tmp_path, capsys):
    """Run ``velox models ...`` on a registry of three versions, v1 active; (exit code, output)."""
    registry = _publish(tmp_path, seeds=(0, 1, 2))
    with socket.socket() as closed:  # bound, not listening: no server answers there
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]

        def run(*args: str) -> tuple[int, str]:
            code = main(["--set", f"data.dir={tmp_path}", "--set", f"serve.port={port}", *args])
            out, err = capsys.readouterr()
            return code, out + err

        run.registry, run.port = registry, port
        yield run


def _states(registry) -> dict[str, str]:
    return {v.name: v.state for v in registry.versions()}


def test_list_and_show_say_each_versions_state_and_that_no_server_answers(velox):
    code, out = velox("models", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["version", "state", "created", "engine", "watermark", "metrics"]
    assert [line.split()[:2] for line in lines[1:4]] == [
        ["v1", "active"],
        ["v2", "ready"],
        ["v3", "ready"],
    ]
    assert lines[-1] == f"no server answers at http://127.0.0.1:{velox.port}"
    code, out = velox("models", "show", "v2")
    assert code == 0 and "version: v2\n" in out and "state: ready\n" in out and "rank: 3\n" in out


def test_activate_rollback_retain_and_delete_change_the_registry(velox):
    assert velox("models", "activate", "3")[0] == 0
    assert velox.registry.active().name == "v3"
    code, out = velox("models", "rollback")
    assert code == 0 and out.startswith("v2 is the registry's active version")
    assert _states(velox.registry) == {"v1": "ready", "v2": "active", "v3": "ready"}
    code, out = velox("models", "retain", "2")
    assert code == 0 and out == "retired: v1\n"
    assert _states(velox.registry) == {"v1": "retired", "v2": "active", "v3": "ready"}
    code, out = velox("models", "delete", "v3")
    assert code == 0 and out == "deleted v3\n"
    assert _states(velox.registry) == {"v1": "retired", "v2": "active"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("activate", "v9"), "has no version v9"),
        (("activate", "latest"), "a model version is a number like 3 or v3, not 'latest'"),
        (("delete", "1"), "v1 is active and cannot be deleted"),
        (("retain", "0"), "retain must keep at least one model version"),
        (("show", "v4"), "has no version v4"),
    ],
)
def test_mistakes_are_one_sentence_and_change_nothing(velox, args, message):
    code, out = velox("models", *args)
    assert code == 2 and out.startswith("velox: error: ") and message in out
    assert _states(velox.registry) == {"v1": "active", "v2": "ready", "v3": "ready"}


def test_a_servers_monitor_and_retrain_status_are_printed_for_people():
    monitor = VersionMonitor(
        RetrainConfig(window=4, degradation_min_observations=1), clock=lambda: 7200.0
    )
    monitor.activated("v2", trained_at=0.0, watermark=70, validation_rmse=0.5)
    monitor.observed("v2", np.ones(2), np.zeros(2), np.array([0.0, 3600.0]), new_users=1)
    run = RunReport(
        id="r7",
        outcome="rejected",
        reason="the candidate is worse",
        version="v3",
        started=60.0,
        finished=90.0,
        phases={"export": 1.25, "train": 20.0},
        gate=GateReport(active_rmse=0.9, candidate_rmse=0.95, observations=1200),
        log="data/retrain/r7.log",
    )
    retrain = RetrainReport(
        enabled=False,
        running=True,
        phase="train",
        last_decision=DecisionReport(trigger="manual", run=True, reason="asked for: x", at=120.0),
        last_run=run,
        next_retry=None,
    )
    models = Models("v2", "v2", False, None, [], monitor_report(monitor.snapshot()), retrain)
    served = msgspec.json.decode(msgspec.json.encode(models))
    assert served_lines("http://h:1", served) == [
        "the server at http://h:1 serves v2",
        "monitor of v2: rolling RMSE 1.0000 over 2 observations, 2.00x the reference 0.5000",
        "  first window: 1.0000 over 2 observations (of 4); validation RMSE at training: 0.5000",
        "  since watermark 70: 2 observations, 1 new users; age 2.0 h",
        "  RMSE by time window: 1970-01-01 00:00:00 UTC 1.0000 (1), "
        "1970-01-01 01:00:00 UTC 1.0000 (1)",
        "retrain: manual only (retrain.enabled is false); running, phase train",
        "  last decision, 1970-01-01 00:02:00 UTC: starts (manual): asked for: x",
        "  last run r7, started 1970-01-01 00:01:00 UTC: rejected, v3 (the candidate is worse); "
        "phases: export 1.2 s, train 20.0 s; gate: active RMSE 0.9000, candidate 0.9500 over "
        "1200 observations; log: data/retrain/r7.log",
    ]
