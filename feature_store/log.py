"""The observation log: commit (synced, or group-committed with a later fsync) and read.

A :meth:`ObservationLog.commit` is one ``WriteBatch`` with the batch's log
records, their rated pairs (:mod:`feature_store.rated`) and the receipts of
idempotent requests (:mod:`feature_store.receipts`): a crash never leaves
part of a batch; synced, every observation of it is on disk with its
sequence number when it returns (or after :meth:`ObservationLog.sync_log`).
Sequence numbers are never reused: the next one is kept in ``meta`` when
records at the log's end are deleted.

Every fsync of the log also records the newest durable sequence number in a
file beside the database (:mod:`feature_store.durable_mark`). Opening
compares the two: a log that ends before the recorded number lost
acknowledged observations (its write-ahead log was truncated, deleted or
damaged), and the store refuses to open until it is restored from a backup
or the loss is accepted (:meth:`ObservationLog._check_durable`), which is
recorded and moves the next sequence number past what was lost.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from itertools import islice

import numpy as np
import rocksdict

from feature_store.codec import Observation, encode_log
from feature_store.durable_mark import DurableMark
from feature_store.keyspace import StoreParts, iterate_log, iterate_records, last_seq, seq_key
from feature_store.rated import add_pairs
from feature_store.receipts import Receipt, add_receipts
from feature_store.storage_errors import describe_loss
from velox.errors import DataError
from velox.model import Applied

log = logging.getLogger(__name__)

NEXT_SEQ_KEY = b"next_seq"  # kept past deleted records, so sequence numbers are never reused
SYNCED_KEY = b"synced_seq"  # every log record up to it is on disk (readers stop there)
LOSSES_KEY = b"accepted_losses"  # JSON list of the acknowledged ranges given up on purpose


@dataclass(frozen=True)
class Loss:
    """Acknowledged log records ``first .. last`` that were lost, and when that was accepted."""

    first: int
    last: int
    accepted: str


class ObservationLog(StoreParts):
    """The log part of :class:`~feature_store.online.OnlineStore`."""

    _synced: int
    _unsynced: rocksdict.WriteOptions
    _mark: DurableMark | None
    _log_end: int
    """The newest sequence number the log itself reached when it opened."""
    durable_seq: int
    """The newest sequence number acknowledged as durable, as its mark file records it."""
    accepted_now: Loss | None
    """The loss this open accepted (``accept_loss``), if it found one."""

    def _open_log(self, checkpoint_seq: int) -> None:
        """Find the next sequence number; what opening found is on disk (recovery flushed it)."""
        stored = self._cf["meta"].get(NEXT_SEQ_KEY)
        self._log_end = max(
            last_seq(self._cf["log"]), int.from_bytes(stored, "big") - 1 if stored else 0
        )
        self._next_seq = max(self._log_end + 1, checkpoint_seq + 1)
        self._unsynced = rocksdict.WriteOptions()
        self._synced = self.last_seq

    def _check_durable(self, recorded: int | None, accept_loss: bool, *, writable: bool) -> None:
        """Compare the log with the durable mark ``recorded`` (None: no mark file yet).

        Refuses a log that ends before it, or records the loss if
        ``accept_loss``. A read-only handle only compares (:attr:`missing`
        tells what is gone); a ``writable`` one opens the mark, creating it
        at the log's end if the store has none yet.
        """
        self.durable_seq = self._log_end if recorded is None else recorded
        self.accepted_now = None
        self._mark = None
        if not writable:
            return
        gone = self.missing
        if gone is not None and not accept_loss:
            raise DataError(describe_loss(self.path, gone))
        if gone is not None:
            self._accept_loss(*gone)
        self._mark = DurableMark(self.path, self.last_seq)

    @property
    def missing(self) -> tuple[int, int] | None:
        """The acknowledged sequence numbers the log no longer reaches (first, last), if any."""
        if self.durable_seq <= self._log_end:
            return None
        return self._log_end + 1, self.durable_seq

    @property
    def accepted_losses(self) -> list[Loss]:
        """Every loss accepted with ``velox store recover --accept-loss``, oldest first."""
        stored = self._cf["meta"].get(LOSSES_KEY)
        return [Loss(**loss) for loss in json.loads(stored)] if stored else []

    def _accept_loss(self, first: int, last: int) -> None:
        """Record the loss of ``first .. last``; number on after it (one synced write)."""
        self.accepted_now = Loss(first, last, datetime.now(UTC).isoformat())
        losses = [*self.accepted_losses, self.accepted_now]
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.put(
            LOSSES_KEY,
            json.dumps([asdict(loss) for loss in losses]).encode(),
            self._handles["meta"],
        )
        batch.put(NEXT_SEQ_KEY, seq_key(last + 1), self._handles["meta"])
        self._db.write(batch, self._sync)
        self._log_end = last
        self._next_seq = max(self._next_seq, last + 1)
        log.warning(
            "store %s: accepted the loss of acknowledged observations seq %d to %d; "
            "numbering continues at %d",
            self.path,
            first,
            last,
            self._next_seq,
        )

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
        if sync:
            self._record_durable(last)
        return np.arange(first, first + len(records), dtype=np.int64)

    def sync_log(self) -> None:
        """Make every write so far durable: one fsync of the write-ahead log (RocksDB SyncWAL).

        Unlike a synced write, this call lets other Python threads run while
        the disk works, so an event loop can keep serving during it. The
        durable watermark that log readers stop at is then moved, unsynced
        (a lost update only holds readers back), and the durable mark beside
        the database is written and fsynced (only when it moved).
        """
        self._check_writable()
        with self._lock:
            upto = self.last_seq
        self._db.flush_wal(True)
        with self._lock:
            if upto > self._synced:
                self._synced = upto
                self._cf["meta"][SYNCED_KEY] = seq_key(upto)
        self._record_durable(upto)

    def _record_durable(self, seq: int) -> None:
        """Write ``seq`` (synced in the log already) to the durable mark."""
        if self._mark is not None:
            self._mark.record(seq)

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
