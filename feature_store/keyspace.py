"""How the online store lays its data out in RocksDB: column families and key encodings.

Column families (each written by the part of :class:`~feature_store.online.OnlineStore`
named after it):

* ``log``: the observation log (:mod:`feature_store.log`), key = sequence
  number (8 bytes, big-endian, so RocksDB's byte order is numeric order),
  value = the observation and what applying it did
  (:func:`feature_store.codec.encode_log`);
* ``users``: user id (UTF-8) -> state record (sufficient statistics tagged
  with the last sequence number they include; :mod:`feature_store.checkpoints`);
* ``items``: the same for items folded in online (unknown to the model version);
* ``rated``: ``user \\0 item`` -> empty, for every logged pair, written with the
  log (:mod:`feature_store.rated`: what top-K excludes);
* ``forgotten``: ids of deleted users -> the log position of the deletion
  (:mod:`feature_store.forget`);
* ``meta``: the format version, the online biases, the checkpoint watermark
  and the install marker (:mod:`feature_store.checkpoints`), the next
  sequence number and the durable watermark (:mod:`feature_store.log`), and
  the idempotency receipts (:mod:`feature_store.receipts`).

:class:`StoreParts` declares what every part shares: the one database
handle, its column families and the commit lock, all owned by
:class:`~feature_store.online.OnlineStore`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import rocksdict

from feature_store.codec import Observation, decode_observation
from velox.errors import DataError

COLUMN_FAMILIES = ("log", "users", "items", "rated", "forgotten", "meta")
STATE_FAMILIES = ("users", "items")
ABOVE_UTF8 = b"\xff"  # no UTF-8 key starts with 0xff, so [b"", this) spans a family


def seq_key(seq: int) -> bytes:
    """The key of log record ``seq`` (and the encoding of every stored sequence number)."""
    return seq.to_bytes(8, "big")


def pair_key(user: str, item: str) -> bytes:
    return user.encode() + b"\0" + item.encode()


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
    """The options of every column family (raw bytes in, raw bytes out)."""
    return {name: rocksdict.Options(raw_mode=True) for name in COLUMN_FAMILIES}


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

    def _check_writable(self) -> None:
        if self.read_only:
            raise DataError(f"store {self.path} is open read-only; open it without read_only")
