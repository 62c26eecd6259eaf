"""The rated-pair index: which items each user has rated, written with the log.

Top-K excludes what a user already rated; the index answers that with one
prefix scan of the ``rated`` family instead of a scan of the log.
"""

from __future__ import annotations

from collections.abc import Sequence

import rocksdict

from feature_store.keyspace import StoreParts, pair_key


def add_pairs(
    batch: rocksdict.WriteBatch,
    rated: rocksdict.ColumnFamily,
    users: Sequence[str],
    items: Sequence[str],
) -> None:
    """Put the logged ``(user, item)`` pairs into ``batch``."""
    for user, item in zip(users, items, strict=True):
        batch.put(pair_key(user, item), b"", rated)


class RatedIndex(StoreParts):
    """Reading the index."""

    def rated(self, user: str) -> set[str]:
        """The items ``user`` has rated, as logged."""
        prefix = pair_key(user, "")
        cursor = self._cf["rated"].iter()
        cursor.seek(prefix)
        items = set()
        while cursor.valid() and cursor.key().startswith(prefix):
            items.add(cursor.key()[len(prefix) :].decode())
            cursor.next()
        return items
