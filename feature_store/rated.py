"""The rated index: every logged observation's user, item and sequence number.

Written with the log, in the same batch. Its keys are
:func:`~feature_store.keyspace.user_prefix` + item + sequence number, so one
prefix scan finds what a user rated (what top-K excludes) and exactly which
log records are theirs (what forgetting deletes), without reading the log.
Retention (:mod:`feature_store.retention`) folds the pairs of the records it
trims into one key per pair with sequence number 0: still excluded, and
forgetting still deletes them, but no log record is theirs any more.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import rocksdict

from feature_store.keyspace import ABOVE_UTF8, StoreParts, iterate_log, seq_key, user_prefix


def rated_key(user: str, item: str, seq: int) -> bytes:
    return user_prefix(user) + item.encode() + seq_key(seq)


def add_pairs(
    batch: rocksdict.WriteBatch,
    rated: rocksdict.ColumnFamily,
    users: Sequence[str],
    items: Sequence[str],
    first: int,
) -> None:
    """Put the observations logged from sequence number ``first`` on into ``batch``."""
    for offset, (user, item) in enumerate(zip(users, items, strict=True)):
        batch.put(rated_key(user, item, first + offset), b"", rated)


class RatedIndex(StoreParts):
    """Reading the index."""

    def rated(self, user: str) -> set[str]:
        """The items ``user`` has rated, as logged."""
        return {key[len(user_prefix(user)) : -8].decode() for key in self._rated_keys(user)}

    def user_records(self, user: str) -> list[int]:
        """The sequence numbers of ``user``'s log records, in order."""
        return sorted(int.from_bytes(key[-8:], "big") for key in self._rated_keys(user))

    def _rated_keys(self, user: str) -> Iterator[bytes]:
        prefix = user_prefix(user)
        cursor = self._cf["rated"].iter()
        cursor.seek(prefix)
        while cursor.valid() and cursor.key().startswith(prefix):
            yield cursor.key()
            cursor.next()

    def _rebuild_rated(self, batch: rocksdict.WriteBatch) -> None:
        """Rebuild the index from the log into ``batch`` (stores of the first format)."""
        rated = self._handles["rated"]
        batch.delete_range(b"", ABOVE_UTF8 * 3, rated)  # every key (a length comes first)
        for seq, observation in iterate_log(self._cf["log"], 0):
            batch.put(rated_key(observation.user, observation.item, seq), b"", rated)
