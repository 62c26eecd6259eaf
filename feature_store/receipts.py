"""Idempotency receipts: what an observe request sent with a key became in the log.

A receipt is stored in the ``meta`` family in the same write as the request's
log records (:meth:`feature_store.log.ObservationLog.commit`), so a retry
after a crash still finds it and gets the first answer instead of a second
application. It records when it was written, and an index keyed by that
time (``receipt_at`` + time + key) lets :meth:`Receipts.expire_receipts`
find the expired ones (``serve.idempotency_ttl``) without reading the others.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

import rocksdict

from feature_store.keyspace import StoreParts

_RECEIPT_PREFIX = b"request\0"  # + an idempotency key: which log records that request became
_RECEIPT = struct.Struct(">QId")  # first sequence number, how many, written at; then the digest
_FIRST_FORMAT = struct.Struct(">QI")  # receipts of store formats 1 and 2 had no time
_AT_PREFIX = b"receipt_at\0"  # + written at (microseconds, 8 bytes) + key -> empty


@dataclass(frozen=True)
class Receipt:
    """An observe request sent with an idempotency key: its body's digest and log records."""

    key: str
    digest: bytes
    first: int
    """Its first log record: a position in the batch when given to ``OnlineStore.commit``,
    a sequence number when read back by ``OnlineStore.receipt``."""
    count: int
    written: float = 0.0
    """When it was committed (seconds since the epoch), as read back."""


def _at_key(written: float, key: bytes) -> bytes:
    return _AT_PREFIX + round(written * 1_000_000).to_bytes(8, "big") + key


def add_receipts(
    batch: rocksdict.WriteBatch,
    meta: rocksdict.ColumnFamily,
    receipts: Sequence[Receipt],
    first: int,
    written: float | None = None,
) -> None:
    """Put ``receipts`` (positions relative to a batch logged from ``first``) into ``batch``."""
    written = time.time() if written is None else written
    for receipt in receipts:
        key = receipt.key.encode()
        value = _RECEIPT.pack(first + receipt.first, receipt.count, written) + receipt.digest
        batch.put(_RECEIPT_PREFIX + key, value, meta)
        batch.put(_at_key(written, key), b"", meta)


class Receipts(StoreParts):
    """Reading receipts back, and expiring them."""

    def receipt(self, key: str) -> Receipt | None:
        """What the request sent with idempotency ``key`` became, if it was committed."""
        stored = self._cf["meta"].get(_RECEIPT_PREFIX + key.encode())
        if stored is None:
            return None
        first, count, written = _RECEIPT.unpack_from(stored)
        return Receipt(key, stored[_RECEIPT.size :], first, count, written)

    def expire_receipts(self, before: float) -> int:
        """Delete the receipts written before ``before`` (seconds since the epoch); how many.

        Reads only the time index up to ``before``: the receipts still alive
        are not touched, however many.
        """
        self._check_writable()
        end = _at_key(before, b"")
        meta, handle = self._cf["meta"], self._handles["meta"]
        batch = rocksdict.WriteBatch(raw_mode=True)
        expired = 0
        cursor = meta.iter()
        cursor.seek(_AT_PREFIX)
        while cursor.valid() and cursor.key() < end:
            batch.delete(_RECEIPT_PREFIX + cursor.key()[len(_AT_PREFIX) + 8 :], handle)
            expired += 1
            cursor.next()
        if expired:
            batch.delete_range(_AT_PREFIX, end, handle)
            self._db.write(batch)  # a lost expiry is done again by the next one
        return expired

    def _time_receipts(self, batch: rocksdict.WriteBatch, written: float) -> None:
        """Give receipts of an earlier store format a time (``written``: the upgrade's), into
        ``batch``, so they expire ``serve.idempotency_ttl`` after it."""
        meta, handle = self._cf["meta"], self._handles["meta"]
        cursor = meta.iter()
        cursor.seek(_RECEIPT_PREFIX)
        while cursor.valid() and cursor.key().startswith(_RECEIPT_PREFIX):
            stored = cursor.value()
            first, count = _FIRST_FORMAT.unpack_from(stored)
            digest = stored[_FIRST_FORMAT.size :]
            add_receipts(
                batch,
                handle,
                [Receipt(cursor.key()[len(_RECEIPT_PREFIX) :].decode(), digest, 0, count)],
                first,
                written,
            )
            cursor.next()
