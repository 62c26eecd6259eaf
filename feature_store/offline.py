"""The offline store: logged observations as Parquet, partitioned by day.

Layout under the store's root::

    date=2024-01-31/seq-00000000000000000001-00000000000000000512.parquet
    _watermark            highest log sequence number the store holds

Every row carries the log sequence number it had online (``seq``), which is
what makes appends idempotent: rows at or below the watermark are skipped,
a file is named by the sequence range it holds (so rewriting a range replaces
the same file), and readers drop duplicate sequence numbers left by an append
that died between writing files and moving the watermark. Files and the
watermark are replaced atomically (write to a temporary name, then rename).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
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
        days = pc.strftime(fresh.column("ts"), format="%Y-%m-%d", locale="C")
        for day in pc.unique(days).to_pylist():
            part = fresh.filter(pc.equal(days, day))
            part = part.sort_by("seq")
            first, last = part.column("seq")[0].as_py(), part.column("seq")[-1].as_py()
            folder = self.root / f"date={day}"
            folder.mkdir(exist_ok=True)
            target = folder / f"seq-{first:020d}-{last:020d}.parquet"
            atomic_write(target, lambda p, t=part: pq.write_table(t, p))
        self._set_watermark(int(pc.max(fresh.column("seq")).as_py()))
        return fresh.num_rows

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
