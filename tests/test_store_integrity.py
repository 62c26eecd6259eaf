"""Damaged storage is refused in one sentence, never silently opened short (issue 14).

Every damaged file is made here, on a store a real :class:`OnlineStore` built:
a writer process acknowledges synced commits and dies without closing
(``tests/ack_writer.py``), so its records are only in the write-ahead log,
which is then truncated, garbled or deleted; a flushed store's MANIFEST or
table file is garbled. The commands run as a user runs them (a subprocess),
and their answer must be one sentence, never a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from feature_store.durable_mark import MARK_FILE, read_mark
from feature_store.layout import DataLayout
from feature_store.online import OnlineStore
from tests.factories import applied
from tests.test_cli import velox
from tests.test_store_cli import _with_model, trained_artifacts
from velox.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
ACKNOWLEDGED = 30
RESTORE = "velox store restore"
ACCEPT = "velox store recover --accept-loss"


def _store(layout: DataLayout, *args: str) -> subprocess.CompletedProcess:
    return velox("--set", f"data.dir={layout.root}", "store", *args)


def _one_sentence(done: subprocess.CompletedProcess, code: int = 2) -> str:
    """The command failed with ``code`` and said so in one line, without a traceback."""
    assert done.returncode == code, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.count("\n") == 1, done.stderr
    return done.stderr


@pytest.fixture
def acked(tmp_path) -> tuple[DataLayout, list[int]]:
    """A data folder whose writer acknowledged 30 synced commits and died without closing."""
    layout = DataLayout(tmp_path / "data")
    layout.root.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "tests.ack_writer", str(layout.online), str(ACKNOWLEDGED)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seqs = [int(line) for line in done.stdout.split()]
    assert seqs == list(range(1, ACKNOWLEDGED + 1))
    assert not list(layout.online.glob("*.sst"))  # every record is only in the WAL
    return layout, seqs


def _wal(folder: Path) -> Path:
    (wal,) = [path for path in folder.glob("*.log") if path.stat().st_size > 0]
    return wal


def _damage_wal(folder: Path, how: str) -> None:
    wal = _wal(folder)
    size = wal.stat().st_size
    rng = np.random.default_rng(14)
    if how == "truncated to half":
        os.truncate(wal, size // 2)
    elif how == "deleted":
        wal.unlink()
    else:
        at, count = (size // 2, 64) if how == "64 bytes garbled in the middle" else (size - 50, 50)
        with wal.open("r+b") as handle:
            handle.seek(at)
            handle.write(rng.bytes(count))


@pytest.mark.parametrize(
    "how",
    ["truncated to half", "64 bytes garbled in the middle", "deleted", "last 50 bytes garbled"],
)
def test_a_damaged_wal_never_opens_short_and_an_accepted_loss_never_reuses_a_seq(acked, how):
    layout, seqs = acked
    _damage_wal(layout.online, how)
    try:
        with OnlineStore(layout.online) as store:
            kept = [seq for seq, _ in store.records_after(0)]
    except DataError as exc:
        message = str(exc)
        assert "\n" not in message and str(layout.online) in message
        assert RESTORE in message and ACCEPT in message
    else:  # RocksDB could still read every acknowledged record
        assert kept == seqs
        return

    # inspect (a read-only view) shows what is missing, or the damage, in one answer
    shown = _store(layout, "inspect")
    assert "Traceback" not in shown.stdout + shown.stderr
    if shown.returncode == 0:
        assert "MISSING seq" in shown.stdout and f".. {seqs[-1]}" in shown.stdout

    done = _store(layout, "recover", "--accept-loss")
    assert done.returncode == 0, done.stderr
    assert f".. {seqs[-1]} in {layout.online}" in done.stdout
    assert f"the next observation gets seq {seqs[-1] + 1}" in done.stdout
    with OnlineStore(layout.online) as store:
        (loss,) = store.accepted_losses
        assert loss.last == seqs[-1] and 1 <= loss.first <= seqs[-1]
        kept = [seq for seq, _ in store.records_after(0)]
        assert kept == list(range(1, loss.first))  # what is left is what the loss does not name
        (seq,) = store.commit(applied(["u1"], ["i1"], [3.0], [99.0]))
    assert seq == seqs[-1] + 1  # never reused
    shown = _store(layout, "inspect")
    assert shown.returncode == 0, shown.stderr
    assert f"accepted loss     seq {loss.first} .. {loss.last}" in shown.stdout


def test_an_intact_wal_opens_with_every_acknowledged_record_and_recover_has_nothing_to_do(acked):
    layout, seqs = acked
    done = _store(layout, "recover")
    assert done.returncode == 0, done.stderr
    assert "nothing to recover" in done.stdout
    with OnlineStore(layout.online) as store:
        assert [seq for seq, _ in store.records_after(0)] == seqs
        assert store.accepted_losses == [] and store.durable_seq == seqs[-1]


def test_recover_without_accept_loss_says_what_is_missing_and_changes_nothing(acked):
    layout, seqs = acked
    _damage_wal(layout.online, "deleted")
    message = _one_sentence(_store(layout, "recover"))
    assert f"seq 1 to {seqs[-1]}" in message and "--accept-loss" in message
    with pytest.raises(DataError, match="lost acknowledged observations"):
        OnlineStore(layout.online).close()


def test_a_torn_durable_mark_falls_back_to_its_other_slot_and_a_ruined_one_is_named(acked):
    layout, _ = acked
    mark = layout.online / MARK_FILE
    raw = bytearray(mark.read_bytes())
    newest = read_mark(layout.online)
    raw[0:16] = bytes(16)  # one slot torn: the other holds the newest or the one before it
    mark.write_bytes(bytes(raw))
    assert read_mark(layout.online) in (newest, newest - 1)
    mark.write_bytes(bytes(len(raw)))
    with pytest.raises(DataError, match=f"durable-sequence file {mark} is damaged"):
        OnlineStore(layout.online)


@pytest.fixture
def flushed(tmp_path) -> DataLayout:
    """A data folder with an active model and a store whose log is in table files, closed."""
    layout = DataLayout(tmp_path / "data")
    _with_model(layout, trained_artifacts(["a", "b"]))
    rng = np.random.default_rng(7)
    with OnlineStore(layout.online) as store:
        for k in range(40):
            users = [f"u{j}" for j in rng.integers(0, 500, 500)]
            items = [f"i{j}" for j in rng.integers(0, 20, 500)]
            store.commit(applied(users, items, rng.integers(1, 6, 500), np.full(500, k)))
        store._flush_families()
    assert list(layout.online.glob("*.sst"))
    return layout


def test_a_garbled_manifest_is_one_sentence_from_inspect_serve_and_export(flushed):
    (manifest,) = flushed.online.glob("MANIFEST-*")
    size = manifest.stat().st_size
    with manifest.open("r+b") as handle:  # 200 bytes at offset 1000, or mid-file if shorter
        handle.seek(1000 if size > 1200 else size // 4)
        handle.write(np.random.default_rng(3).bytes(200))
    message = _one_sentence(_store(flushed, "inspect"))
    assert f"its MANIFEST {manifest}" in message and RESTORE in message
    for command in (["serve", "--port", "0"], ["export"]):  # export reads the log as a secondary
        done = velox("--set", f"data.dir={flushed.root}", *command)
        assert f"its MANIFEST {manifest}" in _one_sentence(done), command


def test_a_damaged_table_block_is_named_by_verify_with_exit_1(flushed):
    healthy = _store(flushed, "verify")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "every block's checksum verified" in healthy.stdout
    assert "registry v1: items.parquet, users.parquet match their recorded" in healthy.stdout
    assert healthy.stdout.endswith("0 problems found\n")

    table = max(flushed.online.glob("*.sst"), key=lambda path: path.stat().st_size)
    with table.open("r+b") as handle:
        handle.seek(table.stat().st_size // 2)
        handle.write(np.random.default_rng(5).bytes(4096))
    done = _store(flushed, "verify")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    problems = [line for line in done.stdout.splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == 1 and f"its table file {table} is damaged" in problems[0]
    assert RESTORE in problems[0]


def test_verify_names_a_damaged_registry_artifact(flushed):
    (artifact,) = flushed.registry.glob("v000001/items.parquet")
    with artifact.open("r+b") as handle:
        handle.seek(artifact.stat().st_size // 2)
        handle.write(b"\x7f" * 8)
    done = _store(flushed, "verify")
    assert done.returncode == 1, done.stdout + done.stderr
    problems = [line for line in done.stdout.splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == 1 and f"model artifact {artifact}" in problems[0]


def test_a_missing_table_file_is_named(flushed):
    table = max(flushed.online.glob("*.sst"), key=lambda path: path.stat().st_size)
    table.unlink()
    message = _one_sentence(_store(flushed, "inspect"))
    assert f"its file {table} is missing" in message and RESTORE in message
