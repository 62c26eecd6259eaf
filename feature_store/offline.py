"""The offline store: logged observations as Parquet, partitioned by day.

Layout under the store's root::

    date=2024-01-31/seq-00000000000000000001-00000000000000000512.parquet
    _watermark            highest log sequence number the store holds
    _writer.lock          held by the one writer that may move the watermark
    _export/              what ``velox export`` keeps beside the data: the records
                          it rejected (DEAD_LETTERS), run reports (:mod:`batch_jobs.export`)

Every row carries the log sequence number it had online (``seq``), which is
what makes appends idempotent: rows at or below the watermark are skipped,
a file is named by the sequence range it holds (so rewriting a range replaces
the same file), and readers drop duplicate sequence numbers left by an append
that died between writing files and moving the watermark. Files and the
watermark are replaced atomically (write to a temporary name, then rename).
A writer that moves the watermark only after its files are complete
(:meth:`OfflineStore.write_days`, then :meth:`OfflineStore.advance_watermark`)
leaves nothing a reader up to the watermark can see when it dies, and
:meth:`OfflineStore.discard_uncommitted` clears what it left above it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from feature_store.codec import Observation
from feature_store.files import atomic_write, schema_mismatch
from velox.datasets import OBSERVATION_SCHEMA
from velox.errors import DataError

log = logging.getLogger(__name__)

OFFLINE_SCHEMA = OBSERVATION_SCHEMA.append(pa.field("seq", pa.int64(), nullable=False))
_WATERMARK = "_watermark"
_WRITER_LOCK = "_writer.lock"
DEAD_LETTERS = "_export/dead_letters"
EXPORT_RUNS = "_export/runs"
"""Where writers keep the records they rejected: JSON lines, one file per sequence range."""
_RANGE = re.compile(r"seq-(\d{20})-(\d{20})")


def range_name(first: int, last: int, suffix: str) -> str:
    """The name of a file that holds sequence numbers ``first`` to ``last``.

    >>> range_name(1, 512, ".parquet")
    'seq-00000000000000000001-00000000000000000512.parquet'
    """
    return f"seq-{first:020d}-{last:020d}{suffix}"


def range_of(name: str) -> tuple[int, int] | None:
    """The sequence range in a name made by :func:`range_name` (None for other names).

    >>> range_of(".seq-00000000000000000001-00000000000000000512.parquet.1f2e.tmp")
    (1, 512)
    """
    found = _RANGE.search(name)
    return (int(found.group(1)), int(found.group(2))) if found else None


def log_rows(entries: Iterable[tuple[int, Observation]]) -> pa.Table:
    """Logged ``(seq, observation)`` pairs as rows of :data:`OFFLINE_SCHEMA`."""
    pairs = list(entries)
    columns = {
        "user": [o.user for _, o in pairs],
        "item": [o.item for _, o in pairs],
        "rating": [o.rating for _, o in pairs],
        "ts": [round(o.ts * 1_000_000) for _, o in pairs],
        "seq": [seq for seq, _ in pairs],
    }
    return pa.table(
        [pa.array(columns[f.name], f.type) for f in OFFLINE_SCHEMA], schema=OFFLINE_SCHEMA
    )


class OfflineStore:
    """Observations with their log sequence numbers, as a day-partitioned Parquet data set."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ write

    @property
    def watermark(self) -> int:
        """The highest sequence number stored (0 when empty; sequence numbers start at 1)."""
        path = self.root / _WATERMARK
        if not path.is_file():
            return 0
        text = path.read_text().strip()
        if not text.isdigit():
            raise DataError(f"offline store watermark {path} holds {text!r}, not a number")
        return int(text)

    def _set_watermark(self, value: int) -> None:
        atomic_write(self.root / _WATERMARK, lambda p: p.write_text(f"{value}\n"))

    def append(self, rows: pa.Table) -> int:
        """Store the rows above the watermark; returns how many were new.

        ``rows`` must have exactly :data:`OFFLINE_SCHEMA`; anything else is a
        :class:`DataError` that names the difference, and nothing is written.
        """
        if rows.schema != OFFLINE_SCHEMA:
            mismatch = schema_mismatch(OFFLINE_SCHEMA, rows.schema)
            raise DataError(f"rows to append do not have the offline schema ({mismatch})")
        if rows.num_rows and pc.min(rows.column("seq")).as_py() < 1:
            raise DataError("sequence numbers of logged observations start at 1")
        fresh = rows.filter(pc.greater(rows.column("seq"), self.watermark))
        if fresh.num_rows == 0:
            return 0
        self.write_days(fresh)
        self._set_watermark(int(pc.max(fresh.column("seq")).as_py()))
        return fresh.num_rows

    def write_days(self, rows: pa.Table) -> dict[str, int]:
        """Write ``rows`` as one file per day, named by its sequence range; rows per day.

        The watermark does not move: a writer calls :meth:`advance_watermark`
        once every file of its range is written. Rewriting the same rows
        replaces the same files, so a retried write stores nothing twice.
        """
        days = pc.strftime(rows.column("ts"), format="%Y-%m-%d", locale="C")
        written = {}
        for day in pc.unique(days).to_pylist():
            part = rows.filter(pc.equal(days, day))
            part = part.sort_by("seq")
            first, last = part.column("seq")[0].as_py(), part.column("seq")[-1].as_py()
            folder = self.root / f"date={day}"
            folder.mkdir(exist_ok=True)
            target = folder / range_name(first, last, ".parquet")
            atomic_write(target, lambda p, t=part: pq.write_table(t, p))
            written[day] = part.num_rows
        return written

    def advance_watermark(self, value: int) -> None:
        """Declare every row up to ``value`` stored, once its files are all written.

        Moving it back would let a later append store rows twice, so that is
        a :class:`DataError`.
        """
        if value < self.watermark:
            raise DataError(
                f"the offline watermark cannot move back from {self.watermark} to {value}"
            )
        self._set_watermark(value)

    def discard_uncommitted(self) -> list[Path]:
        """Remove what a writer that died before moving the watermark left; the paths removed.

        That is every file under the store named by a sequence range that
        starts above the watermark (:func:`range_name`), and the temporary
        files of such writes. Call it only under :meth:`writer`.
        """
        mark = self.watermark
        removed = []
        for path in sorted(self.root.rglob("*seq-*")):
            found = range_of(path.name)
            if path.is_file() and found and found[0] > mark:
                path.unlink()
                removed.append(path)
        if removed:
            log.info("removed %d files of an unfinished write above seq %d", len(removed), mark)
        return removed

    @contextmanager
    def writer(self, *, wait: bool = False) -> Iterator[None]:
        """Hold the store's writer lock: one exporter at a time moves the watermark.

        The lock is an ``flock`` on ``_writer.lock``; the system drops it when
        its holder dies, so a killed writer never blocks the next one. Held,
        it is a :class:`DataError`, unless ``wait``: forgetting a user waits,
        so an export that read the user's records before they were deleted
        has written its files before the user's rows are removed from them.
        """
        handle = open(self.root / _WRITER_LOCK, "a")  # noqa: SIM115 (held across the yield)
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DataError(
                    f"another export is writing the offline store {self.root}; "
                    "wait for it to finish"
                ) from None
            yield
        finally:
            handle.close()

    # ------------------------------------------------------------------- read

    def files(self) -> list[Path]:
        """Every data file, in partition then sequence order."""
        return sorted(self.root.glob("date=*/seq-*.parquet"))

    def _checked(self, paths: list[Path]) -> list[Path]:
        for path in paths:
            try:
                schema = pq.read_schema(path)
            except (pa.ArrowInvalid, OSError) as exc:
                raise DataError(
                    f"offline store file {path} is not readable Parquet ({exc})"
                ) from None
            if schema.remove_metadata() != OFFLINE_SCHEMA:
                mismatch = schema_mismatch(OFFLINE_SCHEMA, schema)
                raise DataError(
                    f"offline store file {path} has the wrong schema ({mismatch}); "
                    "move it out of the store"
                )
        return paths

    def read(self, upto: int | None = None) -> pa.Table:
        """Every stored observation with ``seq <= upto`` (default: all), once each, by ``seq``."""
        paths = self._checked(self.files())
        if not paths:
            return OFFLINE_SCHEMA.empty_table()
        dataset = ds.dataset([str(p) for p in paths], schema=OFFLINE_SCHEMA, format="parquet")
        table = dataset.to_table(filter=None if upto is None else ds.field("seq") <= upto)
        table = table.sort_by("seq")
        seq = table.column("seq").to_numpy()
        if seq.size > 1 and (np.diff(seq) == 0).any():
            keep = np.concatenate([[True], np.diff(seq) != 0])
            table = table.filter(pa.array(keep))
        return table

    def latest_export(self) -> dict | None:
        """The newest ``velox export`` run's report (read, written, rejected, rows per day,
        the range through ``upto``, seconds), or None before the first export."""
        reports = sorted((self.root / EXPORT_RUNS).glob("seq-*.json"))
        return json.loads(reports[-1].read_text()) if reports else None

    def forget_dead_letters(self, user: str) -> int:
        """Rewrite the dead letters without the lines whose ``user`` is ``user``; lines removed.

        A rejected record keeps the user's data (its raw bytes), so a user's
        erasure removes it too. A record too damaged to name its user has no
        ``user`` field and stays.
        """
        removed = 0
        for path in sorted((self.root / DEAD_LETTERS).glob("seq-*.jsonl")):
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if json.loads(line).get("user") != user]
            if len(kept) == len(lines):
                continue
            removed += len(lines) - len(kept)
            text = "".join(kept)
            if text:
                atomic_write(path, lambda p, t=text: p.write_text(t))
            else:
                path.unlink()
        return removed

    def rows_in(self, first: int, last: int) -> int:
        """Rows of the data files named by ranges within ``first .. last``, from their footers."""
        named = [(path, range_of(path.name)) for path in self.files()]
        return sum(
            pq.read_metadata(path).num_rows
            for path, found in named
            if found and first <= found[0] and found[1] <= last
        )

    def partitions(self) -> list[str]:
        """The days present, as ``YYYY-MM-DD``."""
        return sorted(p.name.removeprefix("date=") for p in self.root.glob("date=*") if p.is_dir())

    # ------------------------------------------------------------------ forget

    def delete_user(self, user: str) -> int:
        """Rewrite every file that holds ``user`` without them; returns the rows removed."""
        removed = 0
        for path in self._checked(self.files()):
            table = pq.read_table(path)
            mine = pc.equal(table.column("user"), user)
            count = pc.sum(mine).as_py() or 0
            if not count:
                continue
            rest = table.filter(pc.invert(mine))
            if rest.num_rows:
                atomic_write(path, lambda p, t=rest: pq.write_table(t, p))
            else:
                path.unlink()
            removed += count
            log.info("removed %d rows of a forgotten user from %s", count, path)
        return removed
