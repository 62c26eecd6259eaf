"""The durable sequence number, kept in a small file of its own beside the write-ahead log.

RocksDB's write-ahead log holds the newest acknowledged observations until a
flush; if it is deleted, truncated or damaged, RocksDB can only open what is
left, and nothing inside the database says what was there. This file says it:
every synced commit and every group commit's fsync (:mod:`feature_store.log`)
writes the newest sequence number it made durable here, after the log's own
fsync, so the file never claims a record the log has not synced; the file is
fsynced in the background (:class:`DurableMark`).
:class:`~feature_store.online.OnlineStore` compares it with the log at open.

The file holds two fixed-size slots, written in turn with ``pwrite`` and
synced with ``fdatasync`` (no rename, no folder sync): a write torn by a
power loss spoils at most the slot being written, and the other still holds
an earlier value. Each slot is a magic, the sequence number and a CRC-32 of
both; the valid slot with the larger number wins.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from pathlib import Path

from feature_store.files import sync_folder
from velox.errors import DataError

log = logging.getLogger(__name__)

MARK_FILE = "VELOX-DURABLE"
_MAGIC = b"VXDS"
_SLOT = struct.Struct(">4sQI")  # magic, sequence number, CRC-32 of the two
_STRIDE = 512  # each slot in a sector of its own, so one write never spans both


def _encode(seq: int) -> bytes:
    head = _MAGIC + seq.to_bytes(8, "big")
    return _SLOT.pack(_MAGIC, seq, zlib.crc32(head))


def _decode(raw: bytes) -> int | None:
    if len(raw) < _SLOT.size:
        return None
    magic, seq, crc = _SLOT.unpack_from(raw)
    if magic != _MAGIC or crc != zlib.crc32(magic + seq.to_bytes(8, "big")):
        return None
    return seq


def _slots(path: Path) -> tuple[int, int]:
    """Both slots' sequence numbers (-1 for a damaged one); refuses a file with neither valid."""
    raw = path.read_bytes()
    slots = tuple(_decode(raw[turn * _STRIDE :]) for turn in (0, 1))
    if slots == (None, None):
        raise DataError(
            f"durable-sequence file {path} is damaged, so the store cannot tell what was "
            "acknowledged; restore the store from a backup (velox store restore), or delete the "
            "file to trust the log as it is"
        )
    return tuple(-1 if seq is None else seq for seq in slots)  # type: ignore[return-value]


def read_mark(folder: Path) -> int | None:
    """The durable sequence number recorded in ``folder``; None when the file is absent."""
    try:
        return max(_slots(folder / MARK_FILE))
    except FileNotFoundError:
        return None


class DurableMark:
    """The open mark file of a store this process writes; :meth:`record` moves it forward.

    Created at ``seq`` (the log's end) when absent, so stores made before the
    file existed get one at their first read-write open.

    :meth:`record` writes the number at once (a ``pwrite``: every later open
    sees it, whatever happens to this process) and a thread of the mark's own
    fsyncs it, overlapping the next commit's log fsync instead of adding a
    second fsync to every group commit (measured: the two in a row doubled a
    group commit's sync time). Only a power loss can then find the mark
    behind the log, by what the thread had not synced yet (the last group
    commits); it is never ahead, since a number is written only once the log
    holding it is synced.
    """

    def __init__(self, folder: Path, seq: int) -> None:
        self.path = folder / MARK_FILE
        existed = self.path.exists()
        slots = _slots(self.path) if existed else (-1, -1)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.seq = max(slots)
        self._turn = slots.index(min(slots))  # overwrite the older (or damaged) slot first
        self._changed = threading.Condition()
        self._unsynced = self._closing = False
        if not existed:
            self._write(seq)
            self._write(seq)  # both slots valid from the start
            os.fdatasync(self._fd)
            sync_folder(folder)
        self._syncer = threading.Thread(target=self._sync_loop, name="durable-mark", daemon=True)
        self._syncer.start()

    def record(self, seq: int) -> None:
        """Make ``seq`` the durable sequence number (a no-op unless it moved forward).

        Called only once the log holding ``seq`` is synced. Serialised, so a
        slower caller with an older number never overwrites a newer one.
        """
        if seq <= self.seq:
            return
        with self._changed:
            if seq > self.seq:
                self._write(seq)
                self._unsynced = True
                self._changed.notify()

    def _write(self, seq: int) -> None:
        os.pwrite(self._fd, _encode(seq), self._turn * _STRIDE)
        self._turn ^= 1
        self.seq = seq

    def _sync_loop(self) -> None:
        """Fsync the file whenever a number was written since the last fsync; until closed."""
        with self._changed:
            while True:
                self._changed.wait_for(lambda: self._unsynced or self._closing)
                if not self._unsynced:
                    return
                self._unsynced = False
                self._changed.release()
                try:
                    os.fdatasync(self._fd)
                except OSError as exc:  # the log is the truth; the mark only checks it
                    log.warning("durable mark %s could not be synced: %s", self.path, exc)
                finally:
                    self._changed.acquire()

    def close(self) -> None:
        """Sync the last number, stop the thread and close the file."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._syncer.join()
        os.close(self._fd)
