"""Retention: which log records may leave the online store, and removing them.

A log record is needed until all of these hold (:class:`Holds`):

* it is exported: at or below the offline store's watermark, so the next
  ``velox export`` (which reads from there) and every training run have it;
* it is covered by the checkpoint watermark, so recovery (which replays the
  log after it) never needs it;
* it is at or below the training watermark of every model version that can
  still be served: the active one, those being built, and the
  ``registry.keep`` newest ready ones (installing a version applies the log
  after its watermark again).

:func:`trim` removes every record up to the lowest of the three with one
range deletion (:meth:`Retention.trim_log`): a single ``delete_range`` in a
few writes under the commit lock, then a ``compact_range`` of that range
without any lock, which drops the table files the range covered. Commits never
wait for records to be read or deleted one by one. It expires idempotency
receipts older than ``serve.idempotency_ttl`` too.

What stays: the rated index (:mod:`feature_store.rated`) keeps every pair,
trimmed records' too, so top-K goes on excluding what a user rated however
old; a trimmed record's pair loses its sequence number, so the index keeps
one key per (user, item) of the trimmed past, however often it was rated.
Forgetting a user still finds all their pairs there and deletes them. Tombstones
(:mod:`feature_store.forget`) stay: they are what keeps a version trained
before a deletion from bringing the user back, whatever the log still holds.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import rocksdict

from feature_store.keyspace import LOG_START_KEY, StoreParts, iterate_log, seq_key
from feature_store.layout import DataLayout
from feature_store.log import NEXT_SEQ_KEY
from feature_store.offline import OfflineStore
from feature_store.rated import rated_key
from feature_store.registry import ModelRegistry, ModelVersion

if TYPE_CHECKING:
    from feature_store.online import OnlineStore

TRIM_STEP = 8192
"""Log records per trim write: what a commit may have to wait for."""


@dataclass(frozen=True)
class Holds:
    """The three positions that hold the log back; records up to :attr:`floor` may go."""

    exported: int
    """The offline store's watermark (0 without an offline store)."""
    checkpoint: int
    """The checkpoint watermark: recovery replays the log after it."""
    versions: int | None
    """The lowest training watermark of a version that can still be served (None: none)."""

    @property
    def floor(self) -> int:
        """The newest sequence number no condition needs any more."""
        return min(value for _, value in self._present())

    @property
    def holder(self) -> str:
        """Which condition holds the log back most (the lowest of the three)."""
        return min(self._present(), key=lambda pair: pair[1])[0]

    def _present(self) -> list[tuple[str, int]]:
        return [(name, value) for name, value in asdict(self).items() if value is not None]


@dataclass(frozen=True)
class LogExtent:
    """What the log holds now: its first and last sequence numbers and its bytes."""

    first: int | None
    """The oldest record still there (None: the log is empty)."""
    last: int
    bytes: int
    """Table files and memtables of the log family (RocksDB's figures)."""


@dataclass(frozen=True)
class Trimmed:
    """What one retention pass did."""

    holds: Holds
    log_start: int
    """The log starts here now: every record before it is gone."""
    receipts_expired: int


class Retention(StoreParts):
    """The retention part of :class:`~feature_store.online.OnlineStore`."""

    def log_extent(self) -> LogExtent:
        """The log's first and last records and its size on disk and in memory."""
        cursor = self._cf["log"].iter()
        cursor.seek_to_first()
        first = int.from_bytes(cursor.key(), "big") if cursor.valid() else None
        log = self._cf["log"]
        size = sum(
            log.property_int_value(name) or 0
            for name in ("rocksdb.total-sst-files-size", "rocksdb.size-all-mem-tables")
        )
        return LogExtent(first, self._next_seq - 1, size)

    def trim_log(self, upto: int) -> int:
        """Delete every log record up to ``upto``; the new start of the log.

        In steps of :data:`TRIM_STEP` records, each one write under the commit
        lock: a single ``delete_range`` of the step's records, their rated
        pairs folded into pairs without a sequence number (see
        :meth:`_fold_rated`), and the log's new start. A commit waits for one
        such write at most. Not synced: a step a crash loses is done again by
        the next trim. Then the range is compacted without a lock, so the
        table files it covered are dropped and the disk space comes back, and
        every memtable is flushed, so the write-ahead logs that held the
        records go too.
        """
        self._check_writable()
        start = self.log_start
        upto = min(upto, self._next_seq - 1)
        if upto < start:
            return start
        for first in range(start, upto + 1, TRIM_STEP):
            last = min(first + TRIM_STEP - 1, upto)
            while True:  # a user forgotten meanwhile: read the step again, so no pair returns
                forgets = self._forgets
                batch = self._fold_rated(first, last)
                with self._lock:
                    if forgets != self._forgets:
                        continue
                    batch.delete_range(seq_key(0), seq_key(last + 1), self._handles["log"])
                    batch.put(LOG_START_KEY, seq_key(last + 1), self._handles["meta"])
                    batch.put(NEXT_SEQ_KEY, seq_key(self._next_seq), self._handles["meta"])
                    self._db.write(batch)
                    break
        options = rocksdict.CompactOptions()
        options.set_bottommost_level_compaction(rocksdict.BottommostLevelCompaction.force())
        self._cf["log"].compact_range(seq_key(0), seq_key(upto + 1), options)
        self._cf["rated"].compact_range(None, None, options)
        self._flush_families()
        return upto + 1

    def _fold_rated(self, first: int, last: int) -> rocksdict.WriteBatch:
        """A batch that replaces the rated pairs of log records ``first .. last`` by pairs
        without a sequence number (``rated_key(user, item, 0)``).

        Top-K keeps excluding what a user rated however long ago, and the
        index holds one key per (user, item) for the trimmed past instead of
        one per observation, so it grows with the pairs rated, not with
        traffic. It reads the records being trimmed (the only reading a
        trim does, off the commit lock); the log itself is deleted by range.
        """
        rated = self._handles["rated"]
        batch = rocksdict.WriteBatch(raw_mode=True)
        for seq, observation in iterate_log(self._cf["log"], first - 1):
            if seq > last:
                break
            batch.delete(rated_key(observation.user, observation.item, seq), rated)
            batch.put(rated_key(observation.user, observation.item, 0), b"", rated)
        return batch


def holds(store: OnlineStore, layout: DataLayout | None, keep: int) -> Holds:
    """What holds ``store``'s log back; ``layout`` is its data folder (None: a store alone).

    A store outside a data folder has nothing exported, so it keeps its
    whole log. ``keep`` is ``registry.keep``.
    """
    exported = 0
    versions = None
    if layout is not None and layout.offline.is_dir():
        exported = OfflineStore(layout.offline).watermark
    if layout is not None and layout.registry.is_dir():
        servable = _servable(ModelRegistry(layout.registry), keep)
        versions = min((v.watermark for v in servable), default=None)
    return Holds(exported, store.checkpoint_seq, versions)


def _servable(registry: ModelRegistry, keep: int) -> list[ModelVersion]:
    """The versions that may still be installed: active, building, ``keep`` newest ready."""
    every = registry.versions()
    ready = [v for v in every if v.state == "ready"][-keep:]
    return [v for v in every if v.state in ("active", "building")] + ready


def trim(store: OnlineStore, layout: DataLayout | None, keep: int, receipt_ttl: float) -> Trimmed:
    """One retention pass over ``store``: the log up to what :func:`holds` allows, old receipts."""
    found = holds(store, layout, keep)
    start = store.trim_log(found.floor)
    expired = store.expire_receipts(time.time() - receipt_ttl)
    return Trimmed(found, start, expired)
