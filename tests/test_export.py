"""``velox export``: the Beam pipeline on a real RocksDB log, with the real DirectRunner.

Expected rows come from what each test committed (or, beside a live writer,
from the writer's own batch generator), never from the export's code. The
Parquet files are read one by one with pyarrow, not through
``OfflineStore.read``, which would hide a duplicate.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from batch_jobs.export import ExportFolder, ExportJob, ExportReport
from feature_store.codec import encode_log
from feature_store.keyspace import seq_key
from feature_store.layout import DataLayout
from feature_store.offline import DEAD_LETTERS, OfflineStore
from feature_store.online import OnlineStore
from tests.crash_writer import batch
from tests.factories import applied
from velox.cli import main
from velox.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
DAY = 86_400.0
START = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def commit_rows(store: OnlineStore, n: int, offset: int = 0) -> dict[int, tuple]:
    """Commit ``n`` observations over about three days in batches; ``seq -> (user, item, ...)``."""
    rng = np.random.default_rng(offset)
    expected = {}
    for first in range(0, n, 250):
        size = min(250, n - first)
        users = [f"user-{j}" for j in rng.integers(0, 40, size)]
        items = [f"item-{j}" for j in rng.integers(0, 30, size)]
        ratings = rng.integers(1, 11, size) / 2.0
        times = START + (offset + first + np.arange(size)) * (3 * DAY / n) + 0.25
        seqs = store.commit(applied(users, items, ratings, times))
        rows = zip(users, items, ratings.tolist(), times.tolist(), strict=True)
        expected.update(zip(seqs.tolist(), rows, strict=True))
    return expected


def damage(store: OnlineStore, expected: dict[int, tuple]) -> dict[int, str]:
    """Make dead letters of four logged records; ``seq -> a word their reason must hold``.

    Two are damaged bytes (cut short; a newer format), which no public path
    writes, so they go straight into the log family; two decode but are not
    valid (a NaN rating, an empty item id).
    """
    cut, newer, nan, empty = sorted(expected)[5::400][:4]
    record = store._cf["log"][seq_key(cut)]
    replacements = {
        cut: record[:30],
        newer: bytes([9]) + record[1:],
        nan: encode_log(applied(["u"], ["i"], [float("nan")], [START]))[0],
        empty: encode_log(applied(["u"], [""], [3.0], [START]))[0],
    }
    for seq, replacement in replacements.items():
        store._cf["log"][seq_key(seq)] = replacement
        del expected[seq]
    return {cut: "shorter", newer: "newer", nan: "finite", empty: "empty"}


def file_rows(offline: Path) -> list[dict]:
    """Every row of every visible data file, read file by file (duplicates stay)."""
    rows = []
    for path in sorted(offline.glob("date=*/seq-*.parquet")):
        table = pq.read_table(path)
        day = path.parent.name.removeprefix("date=")
        for row in table.to_pylist():
            assert row["ts"].strftime("%Y-%m-%d") == day, path
            rows.append(row)
    return rows


def as_expected(rows: list[dict]) -> dict[int, tuple]:
    """Stored rows in the shape of :func:`commit_rows`; a duplicate sequence number fails."""
    seqs = Counter(row["seq"] for row in rows)
    assert [s for s, n in seqs.items() if n > 1] == []
    return {r["seq"]: (r["user"], r["item"], r["rating"], r["ts"].timestamp()) for r in rows}


def checksum(rows: dict[int, tuple]) -> str:
    """A digest of rows in sequence order, times to the microsecond Parquet keeps."""
    digest = hashlib.sha256()
    for seq in sorted(rows):
        user, item, rating, ts = rows[seq]
        digest.update(f"{seq}\0{user}\0{item}\0{rating!r}\0{round(ts * 1e6)}\n".encode())
    return digest.hexdigest()


def export(data: Path, **options) -> tuple[ExportReport, list[str]]:
    lines: list[str] = []
    layout = DataLayout(data)
    job = ExportJob(layout.online, layout.offline, emit=lines.append, **options)
    return job.run(), lines


@pytest.fixture
def logged(tmp_path) -> tuple[Path, dict[int, tuple], dict[int, str]]:
    """A closed store of 2,500 observations over three days, four of them damaged."""
    with OnlineStore(DataLayout(tmp_path).online) as store:
        expected = commit_rows(store, 2_500)
        bad = damage(store, expected)
    return tmp_path, expected, bad


def test_counts_reconcile_and_the_files_hold_exactly_the_log(logged):
    data, expected, bad = logged
    report, lines = export(data, range_size=1_000)
    offline = DataLayout(data).offline

    assert (report.after, report.upto) == (0, 2_500)
    assert report.read == 2_500 == report.written + report.rejected
    assert (report.written, report.rejected) == (len(expected), len(bad))
    stored = as_expected(file_rows(offline))
    assert len(stored) == len(expected) and checksum(stored) == checksum(expected)
    for seq in sorted(expected)[::97]:  # field by field on a sample
        user, item, rating, ts = stored[seq]
        assert (user, item, rating) == expected[seq][:3]
        assert ts == pytest.approx(expected[seq][3], abs=1e-6)
    days = Counter(
        datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d")
        for _, _, _, ts in expected.values()
    )
    assert report.partitions == dict(days) and len(days) == 4
    assert OfflineStore(offline).watermark == 2_500

    letters = [
        json.loads(line) for p in report.dead_letters for line in Path(p).read_text().splitlines()
    ]
    assert sorted(letter["seq"] for letter in letters) == sorted(bad)
    with OnlineStore(DataLayout(data).online, read_only=True) as store:
        for letter in letters:
            assert bad[letter["seq"]] in letter["reason"], letter
            assert base64.b64decode(letter["record"]) == store._cf["log"][seq_key(letter["seq"])]
    assert ExportReport.latest(offline) == report
    assert f"read 2500, written {len(expected)}, rejected 4" in lines[-1]
    assert any("3 of 3 ranges" in line and "records/s" in line for line in lines)


def test_forgetting_a_user_removes_their_dead_letters(logged):
    data, _, bad = logged
    export(data, range_size=1_000)
    offline = DataLayout(data).offline

    assert OfflineStore(offline).forget_dead_letters("u") == 2  # the NaN and the empty item
    assert OfflineStore(offline).forget_dead_letters("u") == 0
    files = sorted((offline / DEAD_LETTERS).iterdir())
    left = [json.loads(line) for path in files for line in path.read_text().splitlines()]
    assert sorted(letter["seq"] for letter in left) == sorted(bad)[:2]  # the undecodable ones
    assert all("user" not in letter for letter in left)


def test_a_second_run_stores_nothing_twice_and_a_later_one_leaves_no_gap(logged):
    data, expected, _ = logged
    export(data, range_size=700, upto=1_200)
    again, lines = export(data, range_size=700, upto=1_200)
    assert again.read == 0 and "up to seq 1200" in lines[-1]
    export(data, range_size=700)
    export(data, range_size=700)
    with OnlineStore(DataLayout(data).online) as store:
        expected.update(commit_rows(store, 300, offset=9_000))
    report, _ = export(data, range_size=700)

    assert (report.after, report.upto, report.read) == (2_500, 2_800, 300)
    stored = as_expected(file_rows(DataLayout(data).offline))
    assert checksum(stored) == checksum(expected)
    assert [Path(p).name for p in ExportFolder(DataLayout(data).offline).reports()] == [
        "seq-00000000000000000001-00000000000000001200.json",
        "seq-00000000000000001201-00000000000000002500.json",
        "seq-00000000000000002501-00000000000000002800.json",
    ]


def test_a_lost_file_keeps_the_watermark_and_a_rerun_restores_it(logged, monkeypatch):
    data, expected, _ = logged
    offline = DataLayout(data).offline
    write_days = OfflineStore.write_days

    def losing(store: OfflineStore, rows) -> dict[str, int]:  # a disk that drops a file
        written = write_days(store, rows)
        store.files()[-1].unlink()
        return written

    monkeypatch.setattr(OfflineStore, "write_days", losing)
    with pytest.raises(DataError, match=r"hold \d+ rows where the pipeline wrote 2496; the wa"):
        export(data, range_size=1_000)
    assert OfflineStore(offline).watermark == 0 and not ExportFolder(offline).reports()
    monkeypatch.setattr(OfflineStore, "write_days", write_days)
    report, _ = export(data, range_size=1_000)
    assert report.written == 2_496 and OfflineStore(offline).rows_in(1, 2_500) == 2_496
    assert checksum(as_expected(file_rows(offline))) == checksum(expected)


def _freeze(data: Path, name: str, nth: int) -> str:
    """Run an export in a process of its own until it parks at a write; SIGKILL it there."""
    layout = DataLayout(data)
    args = [str(layout.online), str(layout.offline), "500", name, str(nth)]
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.export_crash", *args],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )
    marker = process.stdout.readline()  # the marker line, or "" if it ended without one
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stdout.close()
    assert marker.startswith("frozen "), marker
    return marker.split(" ", 1)[1].strip()


@pytest.mark.parametrize(("name", "nth"), [("seq-", 4), ("_watermark", 1)])
def test_killed_mid_run_then_rerun_leaves_no_duplicate_and_no_gap(logged, name, nth):
    data, expected, _ = logged
    offline = DataLayout(data).offline
    frozen = _freeze(data, name, nth)

    assert OfflineStore(offline).watermark == 0
    if name == "seq-":
        assert not Path(frozen).exists()
        assert list(Path(frozen).parent.glob(f".{Path(frozen).name}.*.tmp"))  # the half file
    file_rows(offline)  # every visible file is whole Parquet
    report, _ = export(data, range_size=500)

    assert report.read == 2_500 and OfflineStore(offline).watermark == 2_500
    assert checksum(as_expected(file_rows(offline))) == checksum(expected)
    assert not list(offline.rglob(".*.tmp"))
    assert len(ExportFolder(offline).reports()) == 1


def test_multi_process_direct_runner_through_the_command_line(logged, capsys):
    data, expected, _ = logged
    code = main(
        [
            *("--set", f"data.dir={data}", "export", "--range-size", "400", "--"),
            *("--direct_running_mode=multi_processing", "--direct_num_workers=2"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "read 2500, written 2496, rejected 4" in capsys.readouterr().out
    stored = as_expected(file_rows(DataLayout(data).offline))
    assert checksum(stored) == checksum(expected)


class Acks:
    """The batches a live writer acknowledged, read from its output by a thread."""

    def __init__(self, writer: subprocess.Popen) -> None:
        self.batches: list[tuple[int, int, int]] = []  # (k, first seq, last seq)
        self.beyond = -1
        self.thirty, self.past = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._read, args=(writer,))
        self._thread.start()

    def _read(self, writer: subprocess.Popen) -> None:
        for line in writer.stdout:
            if not (line.startswith("ack ") and line.endswith("\n")):
                continue
            _, _, k, first, last = line.split()
            self.batches.append((int(k), int(first), int(last)))
            if len(self.batches) >= 30:
                self.thirty.set()
            if 0 <= self.beyond < int(first):
                self.past.set()

    def join(self) -> None:
        self._thread.join()


def test_an_export_beside_a_live_writer_takes_its_whole_durable_range(tmp_path):
    layout = DataLayout(tmp_path)
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.crash_writer", str(layout.online), "3", "group"],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )
    acks = Acks(writer)
    try:
        assert acks.thirty.wait(timeout=60), "the writer acknowledged fewer than 30 batches"
        before = acks.batches[-1][2]
        report, _ = export(tmp_path, range_size=100)
        acks.beyond = report.upto
        assert acks.past.wait(timeout=60), "the writer stopped acknowledging during the export"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        acks.join()
        writer.wait()
        writer.stdout.close()

    expected = {}
    for k, first, _ in acks.batches:
        users, items, ratings, times = batch(3, k)
        rows = zip(users, items, ratings.tolist(), times.tolist(), strict=True)
        expected.update((first + j, row) for j, row in enumerate(rows))
    assert report.upto >= before  # everything acknowledged before the export began
    upto = {seq: row for seq, row in expected.items() if seq <= report.upto}
    assert report.read == report.written == len(upto) == report.upto
    assert checksum(as_expected(file_rows(layout.offline))) == checksum(upto)

    rest, _ = export(tmp_path, range_size=100)  # the writer is gone: the rest, from there on
    assert rest.after == report.upto and rest.upto >= acks.batches[-1][2]
    assert sorted(as_expected(file_rows(layout.offline))) == list(range(1, rest.upto + 1))


def test_command_line_errors_are_one_sentence(tmp_path, capsys, logged):
    data, _, _ = logged

    def fails(*argv: str) -> str:
        assert main(["--set", f"data.dir={argv[0]}", "export", *argv[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("velox: error: ") and "\n" not in err
        return err

    assert "no Velox store at" in fails(str(tmp_path / "nowhere"))
    assert "past the log's durable head 2500" in fails(str(data), "--upto", "9999")
    assert "--upto must be" in fails(str(data), "--upto", "-1")
    assert "range size must be at least 1" in fails(str(data), "--range-size", "0")
    assert "runner: NoSuchRunner); check --runner" in fails(str(data), "--runner", "NoSuchRunner")
    assert "invalid int value: 'x'" in fails(str(data), "--", "--direct_num_workers=x")
    assert "no pipeline option --flink_masterr;" in fails(str(data), "--", "--flink_masterr=h")
    with OfflineStore(DataLayout(data).offline).writer():
        assert "another export is writing" in fails(str(data))
    assert OfflineStore(DataLayout(data).offline).watermark == 0
