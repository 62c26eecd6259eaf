"""The retrain job runner: real ``velox export`` and ``velox train`` children on a real log.

Each test builds a data folder with a RocksDB log (rows from
:func:`tests.test_export.commit_rows`, so the expected training set comes
from what was committed, not from the job's code), runs :func:`run_job`
with Spark on ``local[2]``, and checks the registry, the run's log and that
no process of a run's groups is left. Waiting for a run to get somewhere is
a bounded poll of its log file, never a fixed sleep.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from feature_store.layout import DataLayout
from feature_store.offline import OfflineStore
from feature_store.online import OnlineStore
from feature_store.registry import ModelRegistry
from serving.retrain_job import JobFailed, run_job, run_log, write_settings
from tests.factories import applied
from tests.test_export import START, commit_rows
from velox.config import VeloxConfig, load_config

W = 1_500
"""The watermark of the tests' runs: 2,000 rows and a late user come after it."""
_PID = re.compile(rb"== run \S+: (\w+): \S+ pid (\d+)")


@pytest.fixture
def logged(tmp_path) -> tuple[VeloxConfig, dict[int, tuple]]:
    """Settings on a data folder whose log holds 2,005 rows; its rows up to seq ``W``."""
    config = load_config(
        env={},
        overrides=[
            f"data.dir={tmp_path / 'data'}",
            "train.master=local[2]",
            "train.rank=2",
            "train.iterations=3",
        ],
    )
    with OnlineStore(DataLayout.from_config(config).online) as store:
        rows = commit_rows(store, 2_000)
        store.commit(applied(["late-user"] * 5, ["late-item"] * 5, [4.0] * 5, [START] * 5))
    return config, {seq: row for seq, row in rows.items() if seq <= W}


def groups(log_path: Path) -> dict[str, int]:
    """Each phase's process group, as the run's log names it."""
    return {m[1].decode(): int(m[2]) for m in _PID.finditer(log_path.read_bytes())}


def assert_no_process_left(log_path: Path) -> None:
    for phase, group in groups(log_path).items():
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)
        assert phase in ("export", "train")


def members(group: int) -> list[int]:
    """The processes of a process group, from ``/proc``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == group:
            found.append(int(stat.parent.name))
    return found


def wait_for(log_path: Path, text: bytes, running: threading.Thread) -> None:
    """Until the log holds ``text``; fails when the run ends first or after 240 s."""
    until = time.monotonic() + 240
    while not (log_path.is_file() and text in log_path.read_bytes()):
        assert running.is_alive(), f"the run ended before its log showed {text!r}"
        assert time.monotonic() < until, f"no {text!r} in {log_path} after 240 s"
        time.sleep(0.02)


def run_in_thread(config: VeloxConfig, **options) -> tuple[threading.Thread, dict]:
    """``run_job`` on a thread of its own; the dict gets its result or its exception."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = run_job(config, W, **options)
        except JobFailed as failed:
            outcome["failed"] = failed

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def test_a_run_registers_a_ready_version_of_every_rating_up_to_the_watermark(logged):
    config, rows = logged
    result = run_job(config, W, run_id="r1", timeout=600)

    version = result.version
    assert (version.state, version.watermark, result.watermark) == ("ready", W, W)
    assert version.parameters["run"] == "r1" and version.parameters["validation"] == 0
    latest = {(user, item): rating for user, item, rating, _ in rows.values()}  # no ties in ts
    assert version.metrics["ratings"] == len(latest) and version.metrics["validation_ratings"] == 0
    trained = ModelRegistry(DataLayout.from_config(config).registry).load(version.number)
    counts = dict(zip(trained.user_ids.tolist(), trained.user_count.tolist(), strict=True))
    assert counts == Counter(user for user, _ in latest)  # so no "late-user"
    assert set(trained.item_ids) == {item for _, item in latest}  # so no "late-item"
    assert OfflineStore(DataLayout.from_config(config).offline).watermark == W
    assert ModelRegistry(DataLayout.from_config(config).registry).active() is None
    assert set(result.phases) == {"export", "train"} and all(s > 0 for s in result.phases.values())
    text = result.log_path.read_text()
    assert result.log_path == run_log(config, "r1")
    assert f"exported seq 1..{W}" in text and "v1 is ready" in text
    assert text.count("ended (exit code 0)") == 2
    assert_no_process_left(result.log_path)


@pytest.mark.parametrize(
    ("phase", "upto", "environment", "message"),
    [
        ("export", 9_999, {}, "is past the log's durable head 2005"),
        ("train", W, {"JAVA_HOME": "/nowhere"}, "no Java found (looked in JAVA_HOME=/nowhere)"),
    ],
)
def test_a_failing_child_is_a_failed_run_with_its_error_in_one_sentence(
    logged, monkeypatch, phase, upto, environment, message
):
    config, _ = logged
    for key, value in environment.items():
        monkeypatch.setenv(key, value)  # seen by the children only: the runner starts no JVM
    with pytest.raises(JobFailed) as caught:
        run_job(config, upto, run_id="bad", timeout=600)

    failed = caught.value
    assert (failed.outcome, failed.phase) == ("failed", phase)
    assert f"velox {phase} failed with exit code 2: " in failed.reason and message in failed.reason
    assert "\n" not in failed.reason and str(failed.log_path) in failed.reason
    assert failed.log_path.is_file() and message in failed.log_path.read_text()
    assert list(groups(failed.log_path)) == ["export", "train"][: 1 + (phase == "train")]
    assert_no_process_left(failed.log_path)
    assert ModelRegistry(DataLayout.from_config(config).registry).versions() == []


def test_a_run_past_its_timeout_is_stopped_with_every_process_of_its_group(logged):
    config, _ = logged
    began = time.monotonic()
    with pytest.raises(JobFailed) as caught:
        run_job(config, W, run_id="slow", timeout=0.5, grace=5)

    failed = caught.value
    assert failed.outcome == "timed_out" and "0.5 s timeout" in failed.reason
    # at worst: the timeout, SIGTERM's grace, SIGKILL's wait for the reaping, 5 s to spare
    assert time.monotonic() - began < 0.5 + 5 + 5 + 5
    assert groups(failed.log_path)  # a child started, and is gone
    assert_no_process_left(failed.log_path)


def test_a_child_killed_mid_training_is_a_killed_run_and_its_version_failed(logged):
    config, _ = logged
    registry = ModelRegistry(DataLayout.from_config(config).registry)
    thread, outcome = run_in_thread(config, run_id="doomed", timeout=600)
    log_path = run_log(config, "doomed")
    wait_for(log_path, b"batch_jobs.spark INFO Spark ", thread)  # the session is up
    group = groups(log_path)["train"]
    assert len(members(group)) >= 2  # velox train and the JVM PySpark started
    # stands in for the version the child claims later (waiting for it costs Spark's read)
    claimed = registry.create(engine="velox", watermark=W, parameters={"run": "doomed"})
    os.killpg(group, signal.SIGKILL)
    thread.join(timeout=120)

    failed = outcome["failed"]
    assert (failed.outcome, failed.phase) == ("killed", "train")
    assert "velox train was killed by SIGKILL" in failed.reason
    assert_no_process_left(log_path)
    version = registry.get(claimed.number)
    assert version.state == "failed" and version.error == failed.reason


def test_a_cancelled_run_stops_its_child_and_starts_no_other(logged):
    config, _ = logged
    cancel = threading.Event()
    thread, outcome = run_in_thread(config, run_id="stop", timeout=600, cancel=cancel)
    log_path = run_log(config, "stop")
    wait_for(log_path, b"(also its process group)", thread)
    cancel.set()
    thread.join(timeout=60)

    failed = outcome["failed"]
    assert (failed.outcome, failed.phase) == ("killed", "export")
    assert "cancelled during velox export" in failed.reason
    assert list(groups(log_path)) == ["export"]
    assert_no_process_left(log_path)


def test_the_settings_file_reads_back_as_the_same_settings_without_secrets(tmp_path):
    odd = 'a "quoted" \\ path\twith\x7f\u00e9 and \U0001f600'
    config = load_config(
        env={},
        overrides=[
            f"data.dir={tmp_path / odd}",
            "serve.host=::1",
            "serve.admin_token=s3cret",
            "train.item_regularization=1e-05",
            "model.forgetting=0.5",
        ],
    )
    path = tmp_path / "run.toml"
    write_settings(config, path)

    assert load_config(path, env={}) == load_config(
        env={},
        overrides=[
            f"data.dir={tmp_path / odd}",
            "serve.host=::1",
            "train.item_regularization=1e-05",
            "model.forgetting=0.5",
        ],
    )
    assert "s3cret" not in path.read_text()
    relative = load_config(env={}, overrides=["data.dir=here"])
    write_settings(relative, path)
    assert load_config(path, env={}).data.dir == str(Path("here").resolve())
