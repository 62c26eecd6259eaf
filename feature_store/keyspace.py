"""How the online store lays its data out in RocksDB: column families and key encodings.

Column families (each written by the part of :class:`~feature_store.online.OnlineStore`
named after it):

* ``log``: the observation log (:mod:`feature_store.log`), key = sequence
  number (8 bytes, big-endian, so RocksDB's byte order is numeric order),
  value = the observation and what applying it did
  (:func:`feature_store.codec.encode_log`);
* ``users``: user id (UTF-8) -> state record (sufficient statistics tagged
  with the last sequence number they include; :mod:`feature_store.checkpoints`),
  in one of two *slots*: slot 0 keys are the ids, slot 1 keys the ids after
  a 0xff byte (no UTF-8 text starts with one), so each slot is one key range
  (:func:`slot_range`). The active version's state is in the active slot; a
  candidate version is built in the other beside it, and a swap makes that one
  active (DESIGN.md section 4);
* ``items``: the same for items folded in online (unknown to the model version);
* ``rated``: :func:`user_prefix` + item + sequence number -> empty, for every
  logged observation, written with the log (:mod:`feature_store.rated`: what
  top-K excludes, and which log records are a user's when they are forgotten);
* ``forgotten``: a keyed hash of each deleted user's id -> the log position
  of the deletion (:mod:`feature_store.forget`);
* ``meta``: the store's format, the active slot, and per slot the online
  biases, the checkpoint watermark and the install marker
  (:mod:`feature_store.checkpoints`; :func:`slot_meta` names them), the next
  sequence number and the durable watermark (:mod:`feature_store.log`), where
  the trimmed log starts (:mod:`feature_store.retention`), the idempotency
  receipts (:mod:`feature_store.receipts`) and the secret of the tombstones'
  hash (:mod:`feature_store.forget`).

:class:`StoreParts` declares what every part shares: the one database
handle, its column families and the commit lock, all owned by
:class:`~feature_store.online.OnlineStore`.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import rocksdict

from feature_store.codec import Observation, decode_observation
from velox.errors import DataError

STORE_FORMAT = 3
"""The key layout's version (1: rated pairs without sequence numbers, tombstones by id;
2: receipts without the time they were written)."""
COLUMN_FAMILIES = ("log", "users", "items", "rated", "forgotten", "meta")
STATE_FAMILIES = ("users", "items")
LOG_START_KEY = b"log_start"  # in meta: retention trimmed the log before this sequence number
ABOVE_UTF8 = b"\xff"  # no UTF-8 key starts with 0xff, so [b"", this) spans a family
SLOTS = (0, 1)
"""The state slots: the active version's, and the one a candidate version is built in."""
ACTIVE_SLOT_KEY = b"active_slot"  # in meta: the slot of the active version's state (absent: 0)
_SLOT_PREFIX = (b"", ABOVE_UTF8)


def state_key(key: str, slot: int) -> bytes:
    """The key of user or item ``key``'s state in ``slot``."""
    return _SLOT_PREFIX[slot] + key.encode()


def slot_range(slot: int) -> tuple[bytes, bytes]:
    """The key range ``[first, end)`` of a state family that holds ``slot``'s states."""
    return (b"", ABOVE_UTF8) if slot == 0 else (ABOVE_UTF8, ABOVE_UTF8 * 2)


def slot_meta(name: bytes, slot: int) -> bytes:
    """The meta key of ``slot``'s ``name`` (slot 0 keeps the names stores always had)."""
    return name if slot == 0 else name + b"@1"


def seq_key(seq: int) -> bytes:
    """The key of log record ``seq`` (and the encoding of every stored sequence number)."""
    return seq.to_bytes(8, "big")


def user_prefix(user: str) -> bytes:
    """What every rated key of ``user`` starts with, and no other user's does.

    The id's length comes first, so one id that begins with another (ids may
    hold any character, NUL included) never shares its prefix.
    """
    encoded = user.encode()
    return struct.pack(">H", len(encoded)) + encoded


def last_seq(log_family: rocksdict.Rdict) -> int:
    """The newest sequence number in the log (0 when it is empty)."""
    cursor = log_family.iter()
    cursor.seek_to_last()
    return int.from_bytes(cursor.key(), "big") if cursor.valid() else 0


def iterate_records(log_family: rocksdict.Rdict, seq: int) -> Iterator[tuple[int, bytes]]:
    """Raw log records after ``seq``, in order."""
    cursor = log_family.iter()
    cursor.seek(seq_key(seq + 1))
    while cursor.valid():
        yield int.from_bytes(cursor.key(), "big"), cursor.value()
        cursor.next()


def iterate_log(log_family: rocksdict.Rdict, seq: int) -> Iterator[tuple[int, Observation]]:
    """Decoded log records after ``seq``, in order."""
    for number, record in iterate_records(log_family, seq):
        yield number, decode_observation(record)


def family_options() -> dict[str, rocksdict.Options]:
    """The options of every column family (raw bytes in, raw bytes out).

    The state families compact as soon as a flush adds a table file: every
    checkpoint flushes them (:mod:`feature_store.checkpoints`) with a fresh
    copy of each state it wrote, and RocksDB's default (compact at four
    files) would keep up to four copies of every user's state on disk.
    """
    options = {}
    for name in COLUMN_FAMILIES:
        options[name] = rocksdict.Options(raw_mode=True)
        if name in STATE_FAMILIES:
            options[name].set_level_zero_file_num_compaction_trigger(1)
    return options


def check_folder(path: Path) -> bool:
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


class StoreParts:
    """What each part of the online store uses of the one object that owns the database."""

    path: Path
    read_only: bool
    _db: rocksdict.Rdict
    _cf: dict[str, rocksdict.Rdict]
    _handles: dict[str, rocksdict.ColumnFamily]
    _lock: threading.Lock
    """Serialises log writes: sequence numbers are handed out under it."""
    _sync: rocksdict.WriteOptions
    _next_seq: int
    _forgets: int
    """How many users were forgotten since the store opened (a trim checks it did not move)."""

    @property
    def active_slot(self) -> int:
        """The slot whose states the active version serves from (:data:`SLOTS`)."""
        stored = self._cf["meta"].get(ACTIVE_SLOT_KEY)
        return stored[0] if stored is not None else 0

    @property
    def log_start(self) -> int:
        """The first sequence number the log may hold: retention trimmed every one before it."""
        stored = self._cf["meta"].get(LOG_START_KEY)
        return int.from_bytes(stored, "big") if stored is not None else 1

    def _flush_families(self) -> None:
        """Flush every memtable: RocksDB then deletes the write-ahead logs they kept alive
        (the ``meta`` family, written by every commit, keeps each one alive until then)."""
        for family in COLUMN_FAMILIES:
            self._cf[family].flush()

    def _check_writable(self) -> None:
        if self.read_only:
            raise DataError(f"store {self.path} is open read-only; open it without read_only")
