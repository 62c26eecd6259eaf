"""Forgetting a user: their state, log records and rated keys, and a tombstone that stays.

:meth:`Forgetting.delete_user` finds the user's log records through the
rated index (:mod:`feature_store.rated`), never by reading the log, and
deletes them with the user's state in one synced write: the only step under
the commit lock. :meth:`Forgetting.erase` then removes what RocksDB still
keeps of them on disk (deleted values stay in table files and the
write-ahead log until compacted and rotated), without holding any lock.

The tombstone (the ``forgotten`` family) records the log position of the
deletion, so installing a version trained before it does not bring the user
back, while one trained later keeps what they did since. It is keyed by an
HMAC-SHA256 of the id under a random secret of this store (kept in ``meta``),
so a forgotten id is not written anywhere, not even there.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

import rocksdict

from feature_store.keyspace import ABOVE_UTF8, SLOTS, seq_key, state_key, user_prefix
from feature_store.log import NEXT_SEQ_KEY
from feature_store.rated import RatedIndex

_SECRET_KEY = b"forget_secret"
_ERASED_KEY = b"last_erased"  # how many records the last erase removed
_NEARBY = 65_536
"""Log records of a user closer than this are compacted as one range (fewer, larger rewrites)."""


class Forgetting(RatedIndex):
    """The forgetting part of :class:`~feature_store.online.OnlineStore` (over the rated index)."""

    def delete_user(self, user: str) -> list[int]:
        """Delete a user's state, log records and rated keys in one synced write.

        Returns the sequence numbers of the log records deleted; pass them to
        :meth:`erase` to remove their traces from the files. The rated index
        also names records retention trimmed (it keeps every pair): those
        are gone already and not counted.
        """
        self._check_writable()
        batch = rocksdict.WriteBatch(raw_mode=True)
        with self._lock:
            start = self.log_start
            records = [seq for seq in self.user_records(user) if seq >= start]
            for seq in records:
                batch.delete(seq_key(seq), self._handles["log"])
            for slot in SLOTS:  # the active version's state, and a candidate's
                batch.delete(state_key(user, slot), self._handles["users"])
            prefix = user_prefix(user)
            batch.delete_range(prefix, prefix + ABOVE_UTF8, self._handles["rated"])
            batch.put(self._tombstone(user), seq_key(self._next_seq), self._handles["forgotten"])
            batch.put(NEXT_SEQ_KEY, seq_key(self._next_seq), self._handles["meta"])
            self._db.write(batch, self._sync)
            self._forgets += 1
        return records

    def erase(self, user: str, records: Sequence[int]) -> None:
        """Remove the deleted ``user`` and their ``records`` from every file of the store.

        Compacts the key ranges they were in down to the last level (where
        deletions drop the values they hide; a compaction flushes what it
        needs of the memtables first), then flushes every memtable, which
        moves RocksDB to a new write-ahead log and deletes the old ones that
        held them, and starts a new MANIFEST (see
        :func:`feature_store.online.open_options`) listing only the files of
        now, not the key bounds of the files the compaction replaced. Slow, so
        it runs after :meth:`delete_user` without a lock; commits go on.
        """
        self._check_writable()
        options = rocksdict.CompactOptions()
        options.set_bottommost_level_compaction(rocksdict.BottommostLevelCompaction.force())
        for first, last in _runs(records):
            self._cf["log"].compact_range(seq_key(first), seq_key(last), options)
        prefix = user_prefix(user)
        self._cf["rated"].compact_range(prefix, prefix + ABOVE_UTF8, options)
        for slot in SLOTS:
            key = state_key(user, slot)
            self._cf["users"].compact_range(key, key, options)
        self._cf["meta"].put(_ERASED_KEY, seq_key(len(records)))  # so the flush has a file
        self._flush_families()

    def forgotten(self, users: Sequence[str], *, before: int | None = None) -> set[str]:
        """Which of ``users`` were deleted with :meth:`delete_user`.

        With ``before``: only those deleted after log position ``before`` (a
        version trained up to there still holds what they asked to forget; one
        trained later only holds what they did after the deletion).
        """
        secret = self._cf["meta"].get(_SECRET_KEY)
        if secret is None:  # nobody was ever forgotten here
            return set()
        table = self._cf["forgotten"]
        found = set()
        for user in users:
            stored = table.get(_hash(secret, user))
            if stored is None:
                continue
            deleted_at = int.from_bytes(stored, "big") if stored else None  # b"": unknown
            if before is None or deleted_at is None or deleted_at > before:
                found.add(user)
        return found

    def _tombstone(self, user: str) -> bytes:
        """The tombstone key of ``user``; the store's secret is made with its first tombstone."""
        secret = self._cf["meta"].get(_SECRET_KEY)
        if secret is None:
            secret = secrets.token_bytes(32)
            self._cf["meta"].put(_SECRET_KEY, secret, self._sync)
        return _hash(secret, user)

    def _hash_tombstones(self, batch: rocksdict.WriteBatch) -> None:
        """Re-key tombstones of the first store format (by id) by their hash, into ``batch``."""
        for key, value in self._cf["forgotten"].items():
            batch.delete(key, self._handles["forgotten"])
            batch.put(self._tombstone(key.decode()), value, self._handles["forgotten"])


def _hash(secret: bytes, user: str) -> bytes:
    return hmac.new(secret, user.encode(), hashlib.sha256).digest()


def _runs(records: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted sequence numbers as ``(first, last)`` ranges, split where they are far apart."""
    runs: list[tuple[int, int]] = []
    for seq in records:
        if runs and seq - runs[-1][1] < _NEARBY:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs
