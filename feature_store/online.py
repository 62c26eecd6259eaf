"""The online store: one RocksDB database (through rocksdict) under the data folder.

Column families:

* ``log``: the observation log, key = sequence number (8 bytes, big-endian, so
  RocksDB's byte order is numeric order), value = the observation and what
  applying it did (:func:`feature_store.codec.encode_log`);
* ``users``: user id (UTF-8) -> state record (sufficient statistics tagged
  with the last sequence number they include);
* ``items``: the same for items folded in online (unknown to the model version);
* ``rated``: ``user \0 item`` -> empty, for every logged pair, written with the
  log (what top-K excludes: the items a user already rated);
* ``forgotten``: ids of deleted users -> the log position of the deletion,
  so installing a version trained before it does not bring them back;
* ``meta``: the format version, the online biases, the checkpoint
  watermark (every state change up to it is in a checkpoint), the next
  sequence number when records were deleted from the log's end, the durable
  watermark for log readers, and a receipt per observe request sent with an
  idempotency key (written with its log records, so a retry after a crash
  still finds it).

A :meth:`OnlineStore.commit` is one ``WriteBatch``: a crash never leaves part
of a batch; synced, every observation of it is on disk with its sequence
number when it returns (or after :meth:`OnlineStore.sync_log`). Checkpoints
are not synced, because the log can always rebuild them: user states go in
writes of a few hundred, then one write holds the item states, the biases
and the watermark. A crash between them leaves users whose stored state is
ahead of the watermark; every state records the last sequence number it
includes, and recovery skips those records for that user.

Item features are not copied here: they live once, in the model registry's
Parquet artifacts of their version, and the serving tier holds them in memory.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import rocksdict

from feature_store.codec import (
    FORMAT_VERSION,
    Observation,
    StateBatch,
    decode_observation,
    decode_states,
    encode_log,
    encode_states,
)
from velox.errors import DataError
from velox.model import Applied

log = logging.getLogger(__name__)

COLUMN_FAMILIES = ("log", "users", "items", "rated", "forgotten", "meta")
STATE_FAMILIES = ("users", "items")
CHECKPOINT_CHUNK = 256
"""User states per checkpoint write (about 1 MB at rank 32)."""
_FORMAT_KEY = b"format_version"
_CHECKPOINT_KEY = b"checkpoint"
_BIASES_KEY = b"biases"
_INSTALLING_KEY = b"installing"
_NEXT_SEQ_KEY = b"next_seq"  # kept past deleted records, so sequence numbers are never reused
_SYNCED_KEY = b"synced_seq"  # every log record up to it is on disk (readers stop there)
_RECEIPT_PREFIX = b"request\0"  # + an idempotency key: which log records that request became
_RECEIPT = struct.Struct(">QI")  # first sequence number, how many; then the body's digest
_ABOVE_UTF8 = b"\xff"  # no UTF-8 key starts with 0xff, so [b"", this) spans a family


def _seq_key(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def _pair_key(user: str, item: str) -> bytes:
    return user.encode() + b"\0" + item.encode()


def _last_seq(log_family: rocksdict.Rdict) -> int:
    """The newest sequence number in the log (0 when it is empty)."""
    cursor = log_family.iter()
    cursor.seek_to_last()
    return int.from_bytes(cursor.key(), "big") if cursor.valid() else 0


def _iterate_records(log_family: rocksdict.Rdict, seq: int) -> Iterator[tuple[int, bytes]]:
    cursor = log_family.iter()
    cursor.seek(_seq_key(seq + 1))
    while cursor.valid():
        yield int.from_bytes(cursor.key(), "big"), cursor.value()
        cursor.next()


def _iterate_log(log_family: rocksdict.Rdict, seq: int) -> Iterator[tuple[int, Observation]]:
    for number, record in _iterate_records(log_family, seq):
        yield number, decode_observation(record)


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


@dataclass(frozen=True)
class Receipt:
    """An observe request sent with an idempotency key: its body's digest and log records."""

    key: str
    digest: bytes
    first: int
    """Its first log record: a position in the batch when given to :meth:`OnlineStore.commit`,
    a sequence number when read back by :meth:`OnlineStore.receipt`."""
    count: int


class OnlineStore:
    """Durable observation log and user-state checkpoints in RocksDB."""

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        """Open (or create) the store; ``read_only`` opens an existing one without its lock.

        A read-only view sees what was committed when it opened and refuses
        writes; ``velox store inspect`` uses it next to a running server.
        """
        self.path = Path(path)
        self.read_only = read_only
        existed = _check_folder(self.path)
        if read_only and not existed:
            raise DataError(f"no Velox store at {self.path}; check the data folder")
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
                access_type=(
                    rocksdict.AccessType.read_only()
                    if read_only
                    else rocksdict.AccessType.read_write()
                ),
            )
        except Exception as exc:
            if "lock" in str(exc).lower():
                raise DataError(
                    f"store {self.path} is in use by another process (its LOCK is held); "
                    "stop that process, or open a read-only view (velox store inspect)"
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
        stored = self._cf["meta"].get(_NEXT_SEQ_KEY)
        self._next_seq = max(
            _last_seq(self._cf["log"]) + 1,
            self.checkpoint_seq + 1,
            int.from_bytes(stored, "big") if stored is not None else 1,
        )
        self._sync = rocksdict.WriteOptions()
        self._sync.sync = True
        self._unsynced = rocksdict.WriteOptions()
        self._synced = self.last_seq  # what opening found, recovery flushed to disk

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

    def _check_writable(self) -> None:
        if self.read_only:
            raise DataError(f"store {self.path} is open read-only; open it without read_only")

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest logged observation (0 when the log is empty)."""
        return self._next_seq - 1

    def commit(
        self, applied: Applied, *, sync: bool = True, receipts: Sequence[Receipt] = ()
    ) -> np.ndarray:
        """Append an applied micro-batch to the log in one write; its sequence numbers.

        With ``sync`` (the default) the write is durable when this returns.
        Without, it is in the operating system's hands (it survives a crash of
        this process, not of the machine) until :meth:`sync_log`, which makes
        every earlier write durable with one fsync: callers that can wait for
        that off their thread get group commit across batches. ``receipts``
        (positions relative to this batch) are stored in the same write.
        """
        self._check_writable()
        records = encode_log(applied)
        with self._lock:
            first = self._next_seq
            batch = rocksdict.WriteBatch(raw_mode=True)
            for offset, record in enumerate(records):
                batch.put(_seq_key(first + offset), record, self._handles["log"])
            for user, item in zip(applied.users, applied.items, strict=True):
                batch.put(_pair_key(user, item), b"", self._handles["rated"])
            last = first + len(records) - 1
            synced = last if sync else self._synced
            batch.put(_SYNCED_KEY, _seq_key(synced), self._handles["meta"])
            for receipt in receipts:
                batch.put(
                    _RECEIPT_PREFIX + receipt.key.encode(),
                    _RECEIPT.pack(first + receipt.first, receipt.count) + receipt.digest,
                    self._handles["meta"],
                )
            self._db.write(batch, self._sync if sync else self._unsynced)
            self._next_seq, self._synced = last + 1, synced
        return np.arange(first, first + len(records), dtype=np.int64)

    def sync_log(self) -> None:
        """Make every write so far durable: one fsync of the write-ahead log (RocksDB SyncWAL).

        Unlike a synced write, this call lets other Python threads run while
        the disk works, so an event loop can keep serving during it. The
        durable watermark that log readers stop at is then moved, unsynced
        (a lost update only holds readers back).
        """
        self._check_writable()
        with self._lock:
            upto = self.last_seq
        self._db.flush_wal(True)
        with self._lock:
            if upto > self._synced:
                self._synced = upto
                self._cf["meta"][_SYNCED_KEY] = _seq_key(upto)

    def log_after(self, seq: int = 0) -> Iterator[tuple[int, Observation]]:
        """Logged observations with sequence number greater than ``seq``, in order."""
        return _iterate_log(self._cf["log"], seq)

    @property
    def synced_seq(self) -> int:
        """Every log record up to this sequence number is known to be on disk."""
        return self._synced

    def receipt(self, key: str) -> Receipt | None:
        """What the request sent with idempotency ``key`` became, if it was committed."""
        stored = self._cf["meta"].get(_RECEIPT_PREFIX + key.encode())
        if stored is None:
            return None
        first, count = _RECEIPT.unpack_from(stored)
        return Receipt(key, stored[_RECEIPT.size :], first, count)

    def records(self, first: int, count: int) -> list[bytes] | None:
        """The log records ``first .. first + count - 1``; None if any is gone (deleted)."""
        found = list(islice(self.records_after(first - 1), count))
        if [seq for seq, _ in found] != list(range(first, first + count)):
            return None
        return [record for _, record in found]

    def records_after(self, seq: int = 0) -> Iterator[tuple[int, bytes]]:
        """Raw log records after ``seq`` (for replay: :func:`feature_store.codec.decode_log`)."""
        return _iterate_records(self._cf["log"], seq)

    @property
    def checkpoint_seq(self) -> int:
        """Every state change up to this sequence number is in a stored checkpoint."""
        stored = self._cf["meta"].get(_CHECKPOINT_KEY)
        return int.from_bytes(stored, "big") if stored is not None else 0

    def write_checkpoint(
        self,
        states: dict[str, tuple[Sequence[str], StateBatch]],
        biases: bytes,
        upto: int,
        dtype: str = "float64",
    ) -> None:
        """Store states (``{"users": (ids, batch), "items": ...}``) and biases, covering ``upto``.

        Not synced: the log rebuilds whatever a lost checkpoint held. User
        states go first through :meth:`put_states`, a few hundred per write
        (one write of every dirty user held the GIL, and stalled an event loop
        in this process, for the whole write); the item states, the biases
        and the watermark follow in one last write, so they move together.
        """
        self._check_writable()
        if "users" in states:
            self.put_states("users", *states["users"], dtype)
        batch = rocksdict.WriteBatch(raw_mode=True)
        if "items" in states:
            self._add_states(batch, "items", *states["items"], dtype)
        batch.put(_BIASES_KEY, biases, self._handles["meta"])
        batch.put(_CHECKPOINT_KEY, _seq_key(upto), self._handles["meta"])
        self._db.write(batch)

    def installing(self) -> str | None:
        """The model version an unfinished :meth:`begin_install` was installing, if any."""
        marker = self._cf["meta"].get(_INSTALLING_KEY)
        return marker.decode() if marker is not None else None

    def begin_install(self, version: str) -> None:
        """Mark an install of ``version`` and drop every state checkpoint, in one synced write.

        The log stays. Until :meth:`end_install`, opening the store must
        redo the install (the marker says so).
        """
        self._check_writable()
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.put(_INSTALLING_KEY, version.encode(), self._handles["meta"])
        for family in STATE_FAMILIES:
            batch.delete_range(b"", _ABOVE_UTF8, self._handles[family])
        batch.delete(_BIASES_KEY, self._handles["meta"])
        batch.delete(_CHECKPOINT_KEY, self._handles["meta"])
        self._db.write(batch, self._sync)

    def end_install(self) -> None:
        """Clear the install marker (synced): the states now belong to the installed version."""
        self._check_writable()
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.delete(_INSTALLING_KEY, self._handles["meta"])
        self._db.write(batch, self._sync)

    def put_states(self, family: str, keys: Sequence[str], states: StateBatch, dtype: str) -> None:
        """Write state checkpoints without moving the checkpoint watermark, not synced.

        ``CHECKPOINT_CHUNK`` states per write, other threads getting the GIL
        between writes (a write holds it throughout).
        """
        self._check_writable()
        for start in range(0, len(keys), CHECKPOINT_CHUNK):
            part = slice(start, start + CHECKPOINT_CHUNK)
            batch = rocksdict.WriteBatch(raw_mode=True)
            self._add_states(batch, family, keys[part], states.take(part), dtype)
            self._db.write(batch)
            time.sleep(0)  # a GIL hand-off point between chunks

    def _add_states(
        self,
        batch: rocksdict.WriteBatch,
        family: str,
        keys: Sequence[str],
        states: StateBatch,
        dtype: str,
    ) -> None:
        handle = self._handles[family]
        for key, record in zip(keys, encode_states(states, dtype), strict=True):
            batch.put(key.encode(), record, handle)

    def rated(self, user: str) -> set[str]:
        """The items ``user`` has rated, as logged."""
        prefix = _pair_key(user, "")
        cursor = self._cf["rated"].iter()
        cursor.seek(prefix)
        items = set()
        while cursor.valid() and cursor.key().startswith(prefix):
            items.add(cursor.key()[len(prefix) :].decode())
            cursor.next()
        return items

    def get_biases(self) -> bytes | None:
        """The last checkpoint of the online biases, if any."""
        return self._cf["meta"].get(_BIASES_KEY)

    def get_states(
        self, keys: Sequence[str], family: str = "users"
    ) -> tuple[np.ndarray, StateBatch | None]:
        """Which keys have a checkpoint, and the decoded states of those that do."""
        table = self._cf[family]
        records = [table.get(key.encode()) for key in keys]
        found = np.array([r is not None for r in records], dtype=bool)
        present = [r for r in records if r is not None]
        return found, decode_states(present) if present else None

    def all_states(self, family: str) -> tuple[list[str], StateBatch | None]:
        """Every checkpointed state of a family (the folded-in items are few)."""
        keys, records = [], []
        for key, record in self._cf[family].items():
            keys.append(key.decode())
            records.append(record)
        return keys, decode_states(records) if records else None

    def delete_user(self, user: str) -> int:
        """Remove a user's state and log records in one synced write; how many records went.

        The log is scanned: forgetting is rare, and an index by user would
        double the write volume of every commit.
        """
        self._check_writable()
        batch = rocksdict.WriteBatch(raw_mode=True)
        removed = 0
        with self._lock:
            for seq, observation in self.log_after(0):
                if observation.user == user:
                    batch.delete(_seq_key(seq), self._handles["log"])
                    removed += 1
            batch.delete(user.encode(), self._handles["users"])
            batch.delete_range(_pair_key(user, ""), user.encode() + b"\1", self._handles["rated"])
            batch.put(user.encode(), _seq_key(self._next_seq), self._handles["forgotten"])
            batch.put(_NEXT_SEQ_KEY, _seq_key(self._next_seq), self._handles["meta"])
            self._db.write(batch, self._sync)
        return removed

    def forgotten(self, users: Sequence[str], *, before: int | None = None) -> set[str]:
        """Which of ``users`` were deleted with :meth:`delete_user`.

        With ``before``: only those deleted after log position ``before`` (a
        version trained up to there still holds what they asked to forget; one
        trained later only holds what they did after the deletion).
        """
        table = self._cf["forgotten"]
        found = set()
        for user in users:
            stored = table.get(user.encode())
            if stored is None:
                continue
            deleted_at = int.from_bytes(stored, "big") if stored else None  # b"": unknown
            if before is None or deleted_at is None or deleted_at > before:
                found.add(user)
        return found

    def counts(self) -> dict[str, int]:
        """Approximate number of entries per column family (RocksDB's estimate)."""
        return {
            name: self._cf[name].property_int_value("rocksdb.estimate-num-keys") or 0
            for name in COLUMN_FAMILIES
        }

    def backup(self, target: str | Path) -> None:
        """A consistent copy of the open store in ``target`` (a RocksDB checkpoint: hard links)."""
        target = Path(target)
        if target.exists():
            raise DataError(f"backup folder {target} already exists; pass a new folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        rocksdict.Checkpoint(self._db).create_checkpoint(str(target))

    def close(self) -> None:
        """Flush and release the database and its lock.

        The column-family views share the database, so the lock is only
        released once they are dropped too.
        """
        if not self._cf:  # already closed
            return
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

    @property
    def synced_seq(self) -> int:
        """The newest sequence number known to be on disk, as of the last catch-up.

        A secondary also sees log records written but not yet fsynced; a
        power loss could drop those and let new observations reuse their
        numbers, so an export must not take them.
        """
        stored = self._db.get_column_family("meta").get(_SYNCED_KEY)
        if stored is not None:
            return int.from_bytes(stored, "big")
        return _last_seq(self._db.get_column_family("log"))  # a store only ever synced

    def log_after(self, seq: int = 0) -> Iterator[tuple[int, Observation]]:
        """Durable logged observations after ``seq`` (up to :attr:`synced_seq`), in order."""
        upto = self.synced_seq
        for number, observation in _iterate_log(self._db.get_column_family("log"), seq):
            if number > upto:
                return
            yield number, observation

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
