"""Forgetting a user: their state, log records and rated pairs, and a tombstone that stays.

The tombstone (the ``forgotten`` family) records the log position of the
deletion, so installing a version trained before it does not bring the user
back, while one trained later keeps what they did since.
"""

from __future__ import annotations

from collections.abc import Sequence

import rocksdict

from feature_store.keyspace import StoreParts, iterate_log, pair_key, seq_key
from feature_store.log import NEXT_SEQ_KEY


class Forgetting(StoreParts):
    """The forgetting part of :class:`~feature_store.online.OnlineStore`."""

    def delete_user(self, user: str) -> int:
        """Remove a user's state and log records in one synced write; how many records went.

        The log is scanned: forgetting is rare, and an index by user would
        double the write volume of every commit.
        """
        self._check_writable()
        batch = rocksdict.WriteBatch(raw_mode=True)
        removed = 0
        with self._lock:
            for seq, observation in iterate_log(self._cf["log"], 0):
                if observation.user == user:
                    batch.delete(seq_key(seq), self._handles["log"])
                    removed += 1
            batch.delete(user.encode(), self._handles["users"])
            batch.delete_range(pair_key(user, ""), user.encode() + b"\1", self._handles["rated"])
            batch.put(user.encode(), seq_key(self._next_seq), self._handles["forgotten"])
            batch.put(NEXT_SEQ_KEY, seq_key(self._next_seq), self._handles["meta"])
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
