"""``velox export``: the Apache Beam pipeline that copies the observation log to the offline store.

What a run does, in order:

1. Take the offline store's writer lock and remove what a killed run left
   above the watermark (:meth:`OfflineStore.discard_uncommitted`).
2. Open the log as a RocksDB secondary (:class:`~feature_store.log_reader.LogReader`),
   so a running server keeps the store, and fix the range: after the offline
   watermark, up to the durable head (``synced_seq``) or ``--upto``. Records a
   power loss could still drop are never taken.
3. Run the pipeline. Its elements are sequence ranges (``RANGE_SIZE``
   numbers each, aligned to multiples of it), not records: each range is
   read, validated and written as Arrow inside one ``DoFn`` call, so Beam's
   per-element cost is paid once per range. A range writes one Parquet file
   per day (``date=YYYY-MM-DD/seq-FIRST-LAST.parquet``, :data:`OFFLINE_SCHEMA`),
   its dead letters (``_export/dead_letters/seq-A-B.jsonl``: one JSON object
   per rejected record, with its ``seq``, ``reason``, the raw ``record`` in
   base64 and, when it decodes, its ``user``, which forgetting the user
   looks for: :meth:`OfflineStore.forget_dead_letters`) and last its
   manifest (``_export/ranges/seq-A-B.json``: its counts). Every file is
   written under a temporary name, fsynced and renamed.
4. Once every range has its manifest, write the run's report
   (``_export/runs/seq-A-B.json``: read, written, rejected, rows per
   partition, dead-letter files, duration), print it, then move the watermark.

Exactly once: file names follow the sequence range, so a retried range
replaces its own files; the watermark moves only after all files are
complete; and a rerun after a crash first discards the files above the
watermark, so nothing is stored twice and nothing is skipped. While it runs,
a progress line with the records per second is printed every second.

A record is a dead letter when it cannot be decoded (damaged, truncated, or
written by a newer Velox), when a user or item id is empty or holds a NUL,
or when its rating or time is not a finite number (the time must also fall
in the years 1 to 9999, which Parquet timestamps hold). Rating bounds are
training's concern (``train.rating_min``/``rating_max``), not the export's.

Runners. The DirectRunner is the default, in process; ``-- --direct_running_mode=
multi_processing --direct_num_workers=N`` spreads the ranges over N worker
processes. Any other runner is chosen with ``--runner`` and configured with
Beam's own pipeline options after ``--``. Flink and Spark are Beam's portable
runners: Beam starts their job server itself (a Java jar it downloads
from Maven Central, or the one ``--flink_job_server_jar``/``--spark_job_server_jar``
names), which submits the job to the cluster. Flink (1.19 to 2.2)::

    velox export --runner FlinkRunner -- --flink_master=flink-host:8081 \\
        --parallelism=4 --environment_type=LOOPBACK

Spark (a Spark 3 cluster, whatever PySpark ``velox train`` uses)::

    velox export --runner SparkRunner -- --spark_master_url=spark://spark-host:7077 \\
        --environment_type=LOOPBACK

Where the Python work runs is Beam's ``--environment_type``. ``LOOPBACK``
runs it in the ``velox export`` process itself: the cluster schedules and
moves the ranges, and only this machine needs the data folder. To spread the
work over the cluster's machines, use ``DOCKER`` with ``--sdk_container_image``
naming an image with Velox installed (or ``PROCESS`` with
``--environment_config`` naming a worker boot command); then every worker
opens the log and writes the Parquet files itself, so the data folder must
be on a file system that all of them mount at the same path.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from batch_jobs.export_cli import without_message
from feature_store.codec import Observation, decode_observation
from feature_store.files import atomic_write
from feature_store.keyspace import iterate_records
from feature_store.layout import DataLayout
from feature_store.log_reader import LogReader
from feature_store.offline import DEAD_LETTERS, OfflineStore, log_rows, range_name
from velox.config import VeloxConfig
from velox.errors import ConfigError, DataError

log = logging.getLogger(__name__)

RANGE_SIZE = 100_000
"""Sequence numbers per pipeline element: big enough that Beam's cost per element vanishes."""
COUNTERS = "velox_export"
"""The Beam metrics namespace of the export's counters."""
_TS_MIN, _TS_MAX = -62_135_596_800.0, 253_402_300_799.0  # 0001-01-01 .. 9999-12-31 23:59:59 UTC


def plan_ranges(after: int, upto: int, size: int = RANGE_SIZE) -> list[tuple[int, int]]:
    """The inclusive ranges that cover ``after + 1 .. upto``, cut at multiples of ``size``.

    The cuts do not depend on where a run starts or stops, so a rerun over a
    longer range cuts the shared part the same way.

    >>> plan_ranges(0, 25, 10)
    [(1, 10), (11, 20), (21, 25)]
    >>> plan_ranges(12, 30, 10)
    [(13, 20), (21, 30)]
    >>> plan_ranges(30, 30, 10)
    []
    """
    cuts = range((after // size + 1) * size, upto, size)
    starts = [after + 1, *(cut + 1 for cut in cuts)]
    ends = [*cuts, upto]
    return [(a, b) for a, b in zip(starts, ends, strict=True) if a <= b]


def rejection(observation: Observation) -> str | None:
    """Why a decoded record cannot be stored offline; None when it can."""
    for what, value in (("user", observation.user), ("item", observation.item)):
        if not value:
            return f"the {what} id is empty"
        if "\0" in value:
            return f"the {what} id holds a NUL character"
    if not math.isfinite(observation.rating):
        return f"the rating {observation.rating} is not a finite number"
    if not _TS_MIN <= observation.ts <= _TS_MAX:
        return f"the time {observation.ts} is not a finite time in the years 1 to 9999"
    return None


@dataclasses.dataclass(frozen=True)
class ExportFolder:
    """Where an export keeps its bookkeeping: ``_export/`` beside the data it wrote."""

    offline: Path

    @property
    def base(self) -> Path:
        return self.offline / "_export"

    def manifest(self, first: int, last: int) -> Path:
        return self.base / "ranges" / range_name(first, last, ".json")

    def dead_letters(self, first: int, last: int) -> Path:
        return self.offline / DEAD_LETTERS / range_name(first, last, ".jsonl")

    def report(self, first: int, last: int) -> Path:
        return self.base / "runs" / range_name(first, last, ".json")

    def manifests(self) -> list[Path]:
        return sorted((self.base / "ranges").glob("seq-*.json"))

    def reports(self) -> list[Path]:
        """Every run's report, oldest first."""
        return sorted((self.base / "runs").glob("seq-*.json"))


def _write_json(path: Path, value: object, lines: bool = False) -> None:
    """``value`` as JSON (or each of its items as a JSON line), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(v) + "\n" for v in value) if lines else json.dumps(value, indent=1)
    atomic_write(path, lambda p: p.write_text(text))


@dataclasses.dataclass(frozen=True)
class RangeResult:
    """What exporting one range did: its manifest."""

    first: int
    last: int
    read: int
    written: int
    rejected: int
    partitions: dict[str, int]

    @classmethod
    def load(cls, path: Path) -> RangeResult:
        return cls(**json.loads(path.read_text()))


class RangeLog(LogReader):
    """The log reader, also giving raw records, so an undecodable one is a dead letter."""

    def records(self, first: int, last: int) -> Iterator[tuple[int, bytes]]:
        """Raw log records ``first .. last`` that exist (forgotten users' records do not)."""
        for seq, record in iterate_records(self._db.get_column_family("log"), first - 1):
            if seq > last:
                return
            yield seq, record


def export_range(reader: RangeLog, store: OfflineStore, first: int, last: int) -> RangeResult:
    """Validate and write records ``first .. last``: Parquet per day, dead letters, manifest."""
    good, dead = [], []
    for seq, record in reader.records(first, last):
        letter = {"seq": seq, "record": base64.b64encode(record).decode()}
        try:
            observation = decode_observation(record)
        except (DataError, UnicodeDecodeError) as exc:
            letter["reason"] = f"the record cannot be decoded ({exc})"
        else:
            letter["reason"] = rejection(observation)
            letter["user"] = observation.user  # so that forgetting the user finds the line
        if letter["reason"] is None:
            good.append((seq, observation))
        else:
            dead.append(letter)
    partitions = store.write_days(log_rows(good)) if good else {}
    folder = ExportFolder(store.root)
    if dead:
        _write_json(folder.dead_letters(first, last), dead, lines=True)
    result = RangeResult(first, last, len(good) + len(dead), len(good), len(dead), partitions)
    _write_json(folder.manifest(first, last), dataclasses.asdict(result))
    return result


class ExportRanges(beam.DoFn):
    """The pipeline's one step: export each ``(first, last)`` range it is given.

    Each worker opens its own secondary view of the log (with a scratch
    folder of its own) once, in :meth:`setup`, and catches up per range.
    """

    def __init__(self, online: str, offline: str) -> None:
        self.online, self.offline = online, offline
        self._read = Metrics.counter(COUNTERS, "read")
        self._written = Metrics.counter(COUNTERS, "written")
        self._rejected = Metrics.counter(COUNTERS, "rejected")

    def setup(self) -> None:
        self._scratch = tempfile.mkdtemp(prefix="velox-export-")
        self._reader = RangeLog(self.online, self._scratch)
        self._store = OfflineStore(self.offline)

    def process(self, bounds: tuple[int, int]) -> Iterator[RangeResult]:
        self._reader.catch_up()
        result = export_range(self._reader, self._store, *bounds)
        self._read.inc(result.read)
        self._written.inc(result.written)
        self._rejected.inc(result.rejected)
        for day, rows in result.partitions.items():
            Metrics.counter(COUNTERS, f"written {day}").inc(rows)
        yield result

    def teardown(self) -> None:
        self._reader.close()
        shutil.rmtree(self._scratch, ignore_errors=True)


def pipeline_options(args: Sequence[str]) -> PipelineOptions:
    """Beam's pipeline options from ``args``; a bad value or an unknown option is a ConfigError.

    Beam itself would exit on a bad value after printing its whole usage, and
    would drop an unknown (misspelt) option with only a warning.
    """
    options = PipelineOptions(list(args))
    messages = io.StringIO()
    try:
        with (
            contextlib.redirect_stderr(messages),
            without_message(logging.getLogger(PipelineOptions.__module__), "unparseable"),
        ):
            known = options.get_all_options(retain_unknown_options=False)
            given = options.get_all_options(retain_unknown_options=True)
    except SystemExit:
        reason = messages.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise ConfigError(f"a Beam pipeline option is not valid ({reason})") from None
    unknown = sorted(set(given) - set(known))
    if unknown:
        names = ", ".join(f"--{name}" for name in unknown)
        raise ConfigError(f"Beam has no pipeline option {names}; check the spelling")
    return options


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """One run's counters, as printed and as kept in ``_export/runs/``."""

    after: int
    upto: int
    read: int
    written: int
    rejected: int
    partitions: dict[str, int]
    dead_letters: list[str]
    seconds: float
    runner: str

    @classmethod
    def latest(cls, offline: str | Path) -> ExportReport | None:
        """The newest run's report in the offline store (None before the first export)."""
        report = OfflineStore(offline).latest_export()
        return cls(**report) if report is not None else None

    def describe(self) -> str:
        """The counters in a few lines of text."""
        rate = self.read / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"exported seq {self.after + 1}..{self.upto} with the {self.runner}: "
            f"read {self.read}, written {self.written}, rejected {self.rejected} "
            f"in {self.seconds:.1f} s ({rate:,.0f} records/s)"
        ]
        lines += [f"  date={day}: {rows} rows" for day, rows in sorted(self.partitions.items())]
        lines += [f"  dead letters: {path}" for path in self.dead_letters]
        return "\n".join(lines)


@dataclasses.dataclass
class ExportJob:
    """One export run; :meth:`run` returns its report.

    ``pipeline_args`` are Beam pipeline options (``--runner=...`` among
    them); ``range_size`` is how many sequence numbers one element covers.
    """

    online: Path
    offline: Path
    upto: int | None = None
    pipeline_args: Sequence[str] = ()
    range_size: int = RANGE_SIZE
    emit: Callable[[str], None] = print
    progress_every: float = 1.0

    @classmethod
    def from_config(cls, config: VeloxConfig, **options) -> ExportJob:
        layout = DataLayout.from_config(config)
        return cls(layout.online, layout.offline, **options)

    def run(self) -> ExportReport:
        if self.range_size < 1:
            raise ConfigError(f"the range size must be at least 1, got {self.range_size}")
        options = pipeline_options(self.pipeline_args)
        runner = options.view_as(StandardOptions).runner or "DirectRunner"
        try:
            pipeline = beam.Pipeline(options=options)
        except ValueError as exc:  # Beam's answer to an unknown runner; its first sentence
            reason = str(exc).split(". ")[0]
            raise ConfigError(f"Beam cannot build the pipeline ({reason}); check --runner") from exc
        head = self._durable_head()
        store = OfflineStore(self.offline)
        folder = ExportFolder(store.root)
        with store.writer():
            store.discard_uncommitted()
            for stale in folder.manifests():  # of a run that died after moving the watermark
                stale.unlink()
            after, upto = store.watermark, self._end(head)
            ranges = plan_ranges(after, upto, self.range_size)
            if not ranges:
                self.emit(
                    f"nothing to export: the offline store holds the log up to seq {after} "
                    f"(durable head {head})"
                )
                return ExportReport(after, after, 0, 0, 0, {}, [], 0.0, runner)
            started = time.perf_counter()
            self._run_pipeline(pipeline, ranges, folder, started)
            report = self._report(folder, ranges, runner, time.perf_counter() - started)
            stored = store.rows_in(after + 1, upto)
            if stored != report.written:  # the counts reconcile on every run, or nothing moves
                raise DataError(
                    f"the files of seq {after + 1}..{upto} hold {stored} rows where the pipeline "
                    f"wrote {report.written}; the watermark stays at {after}: "
                    "run velox export again"
                )
            _write_json(folder.report(after + 1, upto), dataclasses.asdict(report))
            store.advance_watermark(upto)
            for manifest in folder.manifests():
                manifest.unlink()
        self.emit(report.describe())
        return report

    def _durable_head(self) -> int:
        with (
            tempfile.TemporaryDirectory(prefix="velox-export-") as scratch,
            LogReader(self.online, scratch) as reader,
        ):
            reader.catch_up()
            return reader.synced_seq

    def _end(self, head: int) -> int:
        if self.upto is None:
            return head
        if self.upto > head:
            raise DataError(
                f"--upto {self.upto} is past the log's durable head {head}; "
                "pass a smaller --upto or leave it out"
            )
        return self.upto

    def _run_pipeline(
        self,
        pipeline: beam.Pipeline,
        ranges: list[tuple[int, int]],
        folder: ExportFolder,
        started: float,
    ) -> None:
        stop = threading.Event()
        watcher = threading.Thread(
            target=self._watch, args=(folder, len(ranges), started, stop), daemon=True
        )
        watcher.start()
        try:
            with pipeline:
                _ = (
                    pipeline
                    | "ranges" >> beam.Create(ranges)
                    | "spread" >> beam.Reshuffle()
                    | "export" >> beam.ParDo(ExportRanges(str(self.online), str(self.offline)))
                )
        finally:
            stop.set()
            watcher.join()

    def _watch(self, folder: ExportFolder, ranges: int, started: float, stop: threading.Event):
        """Print a progress line whenever another range is done; a last look after ``stop``."""
        done, stopped = 0, False
        while not stopped:
            stopped = stop.wait(self.progress_every)
            manifests = folder.manifests()
            if len(manifests) == done:
                continue
            done = len(manifests)
            count = sum(RangeResult.load(path).read for path in manifests)
            rate = count / max(time.perf_counter() - started, 1e-9)
            self.emit(
                f"export: {count:,} records in {done} of {ranges} ranges, {rate:,.0f} records/s"
            )

    def _report(
        self, folder: ExportFolder, ranges: list[tuple[int, int]], runner: str, seconds: float
    ) -> ExportReport:
        missing = [r for r in ranges if not folder.manifest(*r).is_file()]
        if missing:
            first, last = missing[0]
            raise DataError(
                f"the pipeline ended without writing seq {first}..{last} "
                f"({len(missing)} of {len(ranges)} ranges missing); run velox export again"
            )
        results = [RangeResult.load(folder.manifest(*r)) for r in ranges]
        partitions: dict[str, int] = {}
        for result in results:
            for day, rows in result.partitions.items():
                partitions[day] = partitions.get(day, 0) + rows
        return ExportReport(
            after=ranges[0][0] - 1,
            upto=ranges[-1][1],
            read=sum(r.read for r in results),
            written=sum(r.written for r in results),
            rejected=sum(r.rejected for r in results),
            partitions=partitions,
            dead_letters=[str(folder.dead_letters(r.first, r.last)) for r in results if r.rejected],
            seconds=round(seconds, 3),
            runner=runner,
        )
