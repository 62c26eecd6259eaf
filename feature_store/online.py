"""The online store: one RocksDB database (through rocksdict) under the data folder.

Column families:

* ``log``: the observation log, key = sequence number (8 bytes, big-endian, so
  RocksDB's byte order is numeric order), value = an observation record;
* ``users``: user id (UTF-8) -> state record (sufficient statistics tagged
  with the last sequence number they include);
* ``meta``: the store's format version and other small settings.

A :meth:`OnlineStore.commit` is one synced ``WriteBatch``: when it returns,
every observation of the batch is on disk with its sequence number, and a
crash never leaves part of a batch. States are checkpoints: written without
sync, because the log can always rebuild them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import rocksdict

from feature_store.codec import (
    FORMAT_VERSION,
    Observation,
    StateBatch,
    decode_observation,
    decode_states,
    encode_observation,
    encode_states,
)
from velox.errors import DataError

log = logging.getLogger(__name__)

COLUMN_FAMILIES = ("log", "users", "meta")
_FORMAT_KEY = b"format_version"


def _seq_key(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def _iterate_log(log_family: rocksdict.Rdict, seq: int) -> Iterator[tuple[int, Observation]]:
    cursor = log_family.iter()
    cursor.seek(_seq_key(seq + 1))
    while cursor.valid():
        yield int.from_bytes(cursor.key(), "big"), decode_observation(cursor.value())
        cursor.next()


def _options() -> rocksdict.Options:
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    options.create_missing_column_families(True)
    return options


def _check_folder(path: Path) -> bool:
    """Whether ``path`` holds a database already; refuse folders that are something else."""
    if path.exists() and not path.is_dir():
        raise DataError(f"store path {path} is a file, not a folder; pass a folder")
    if not path.exists() or not any(path.iterdir()):
        return False
    if not (path / "CURRENT").is_file():
        raise DataError(
            f"{path} is not a Velox store (it holds other files and no database); "
            "pass an empty or new folder, or the folder of an existing store"
        )
    return True


class OnlineStore:
    """Durable observation log and user-state checkpoints in RocksDB."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        existed = _check_folder(self.path)
        if existed:
            families = set(rocksdict.Rdict.list_cf(str(self.path)))
            if not set(COLUMN_FAMILIES) <= families:
                raise DataError(
                    f"{self.path} is a RocksDB database but not a Velox store "
                    f"(column families {sorted(families)}); pass another folder"
                )
        try:
            self._db = rocksdict.Rdict(
                str(self.path),
                _options(),
                column_families={
                    name: rocksdict.Options(raw_mode=True) for name in COLUMN_FAMILIES
                },
            )
        except Exception as exc:
            if "lock" in str(exc).lower():
                raise DataError(
                    f"store {self.path} is in use by another process (its LOCK is held); "
                    "stop that process, or open a read-only view"
                ) from None
            raise DataError(f"store {self.path} could not be opened: {exc}") from None
        self._cf = {name: self._db.get_column_family(name) for name in COLUMN_FAMILIES}
        self._handles = {name: self._db.get_column_family_handle(name) for name in COLUMN_FAMILIES}
        try:
            self._check_format(existed)
        except DataError:
            self.close()
            raise
        self._lock = threading.Lock()
        self._next_seq = self._last_logged() + 1
        self._sync = rocksdict.WriteOptions()
        self._sync.sync = True

    def _check_format(self, existed: bool) -> None:
        meta = self._cf["meta"]
        stored = meta.get(_FORMAT_KEY)
        if stored is None:
            if existed:
                raise DataError(f"{self.path} has no Velox format marker; it is not a Velox store")
            meta[_FORMAT_KEY] = bytes([FORMAT_VERSION])
            return
        if stored[0] > FORMAT_VERSION:
            raise DataError(
                f"store {self.path} was written by a newer Velox (format {stored[0]}, this one "
                f"reads up to {FORMAT_VERSION}); upgrade Velox"
            )

    def _last_logged(self) -> int:
        cursor = self._cf["log"].iter()
        cursor.seek_to_last()
        return int.from_bytes(cursor.key(), "big") if cursor.valid() else 0

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest logged observation (0 when the log is empty)."""
        return self._next_seq - 1

    def commit(
        self,
        users: Sequence[str],
        items: Sequence[str],
        ratings: Sequence[float],
        timestamps: Sequence[float],
    ) -> np.ndarray:
        """Append a micro-batch to the log in one synced write; returns its sequence numbers."""
        records = [
            encode_observation(u, i, float(r), float(t))
            for u, i, r, t in zip(users, items, ratings, timestamps, strict=True)
        ]
        with self._lock:
            first = self._next_seq
            batch = rocksdict.WriteBatch(raw_mode=True)
            for offset, record in enumerate(records):
                batch.put(_seq_key(first + offset), record, self._handles["log"])
            self._db.write(batch, self._sync)
            self._next_seq = first + len(records)
        return np.arange(first, first + len(records), dtype=np.int64)

    def log_after(self, seq: int = 0) -> Iterator[tuple[int, Observation]]:
        """Logged observations with sequence number greater than ``seq``, in order."""
        return _iterate_log(self._cf["log"], seq)

    def put_states(self, users: Sequence[str], states: StateBatch, dtype: str = "float64") -> None:
        """Checkpoint users' states (not synced: the log can rebuild them)."""
        batch = rocksdict.WriteBatch(raw_mode=True)
        for user, record in zip(users, encode_states(states, dtype), strict=True):
            batch.put(user.encode(), record, self._handles["users"])
        self._db.write(batch)

    def get_states(self, users: Sequence[str]) -> tuple[np.ndarray, StateBatch | None]:
        """Which users have a checkpoint, and the decoded states of those that do."""
        table = self._cf["users"]
        records = [table.get(user.encode()) for user in users]
        found = np.array([r is not None for r in records], dtype=bool)
        present = [r for r in records if r is not None]
        return found, decode_states(present) if present else None

    def close(self) -> None:
        """Flush and release the database and its lock.

        The column-family views share the database, so the lock is only
        released once they are dropped too.
        """
        self._cf.clear()
        self._handles.clear()
        self._db.close()

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LogReader:
    """A second process's view of the log while the server holds the store.

    Opens the database as a RocksDB *secondary* instance (it needs a scratch
    folder of its own and never takes the lock); :meth:`catch_up` replays what
    the primary has written since. This is what the log export pipeline reads.
    """

    def __init__(self, path: str | Path, scratch: str | Path) -> None:
        self.path = Path(path)
        if not _check_folder(self.path):
            raise DataError(f"no Velox store at {self.path}; start the server or check the path")
        Path(scratch).mkdir(parents=True, exist_ok=True)
        try:
            self._db = rocksdict.Rdict(
                str(self.path),
                rocksdict.Options(raw_mode=True),
                column_families={
                    name: rocksdict.Options(raw_mode=True) for name in COLUMN_FAMILIES
                },
                access_type=rocksdict.AccessType.secondary(str(scratch)),
            )
        except Exception as exc:
            raise DataError(f"store {self.path} could not be opened for reading: {exc}") from None

    def catch_up(self) -> None:
        """See everything the primary has committed so far."""
        self._db.try_catch_up_with_primary()

    def log_after(self, seq: int = 0) -> Iterator[tuple[int, Observation]]:
        """Logged observations after ``seq``, as of the last catch-up."""
        return _iterate_log(self._db.get_column_family("log"), seq)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
