"""The observation log: commit (synced, or group-committed with a later fsync) and read.

A :meth:`ObservationLog.commit` is one ``WriteBatch`` with the batch's log
records, their rated pairs (:mod:`feature_store.rated`) and the receipts of
idempotent requests (:mod:`feature_store.receipts`): a crash never leaves
part of a batch; synced, every observation of it is on disk with its
sequence number when it returns (or after :meth:`ObservationLog.sync_log`).
Sequence numbers are never reused: the next one is kept in ``meta`` when
records at the log's end are deleted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice

import numpy as np
import rocksdict

from feature_store.codec import Observation, encode_log
from feature_store.keyspace import StoreParts, iterate_log, iterate_records, last_seq, seq_key
from feature_store.rated import add_pairs
from feature_store.receipts import Receipt, add_receipts
from velox.model import Applied

NEXT_SEQ_KEY = b"next_seq"  # kept past deleted records, so sequence numbers are never reused
SYNCED_KEY = b"synced_seq"  # every log record up to it is on disk (readers stop there)


class ObservationLog(StoreParts):
    """The log part of :class:`~feature_store.online.OnlineStore`."""

    _synced: int
    _unsynced: rocksdict.WriteOptions

    def _open_log(self, checkpoint_seq: int) -> None:
        """Find the next sequence number; what opening found is on disk (recovery flushed it)."""
        stored = self._cf["meta"].get(NEXT_SEQ_KEY)
        self._next_seq = max(
            last_seq(self._cf["log"]) + 1,
            checkpoint_seq + 1,
            int.from_bytes(stored, "big") if stored is not None else 1,
        )
        self._unsynced = rocksdict.WriteOptions()
        self._synced = self.last_seq

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
                batch.put(seq_key(first + offset), record, self._handles["log"])
            add_pairs(batch, self._handles["rated"], applied.users, applied.items, first)
            last = first + len(records) - 1
            synced = last if sync else self._synced
            batch.put(SYNCED_KEY, seq_key(synced), self._handles["meta"])
            add_receipts(batch, self._handles["meta"], receipts, first)
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
                self._cf["meta"][SYNCED_KEY] = seq_key(upto)

    @property
    def synced_seq(self) -> int:
        """Every log record up to this sequence number is known to be on disk."""
        return self._synced

    def log_after(self, seq: int = 0) -> Iterator[tuple[int, Observation]]:
        """Logged observations with sequence number greater than ``seq``, in order."""
        return iterate_log(self._cf["log"], seq)

    def records(self, first: int, count: int) -> list[bytes] | None:
        """The log records ``first .. first + count - 1``; None if any is gone (deleted)."""
        found = list(islice(self.records_after(first - 1), count))
        if [seq for seq, _ in found] != list(range(first, first + count)):
            return None
        return [record for _, record in found]

    def records_after(self, seq: int = 0) -> Iterator[tuple[int, bytes]]:
        """Raw log records after ``seq`` (for replay: :func:`feature_store.codec.decode_log`)."""
        return iterate_records(self._cf["log"], seq)
