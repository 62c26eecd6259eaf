"""Idempotency receipts: what an observe request sent with a key became in the log.

A receipt is stored in the ``meta`` family in the same write as the request's
log records (:meth:`feature_store.log.ObservationLog.commit`), so a retry
after a crash still finds it and gets the first answer instead of a second
application.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import rocksdict

from feature_store.keyspace import StoreParts

_RECEIPT_PREFIX = b"request\0"  # + an idempotency key: which log records that request became
_RECEIPT = struct.Struct(">QI")  # first sequence number, how many; then the body's digest


@dataclass(frozen=True)
class Receipt:
    """An observe request sent with an idempotency key: its body's digest and log records."""

    key: str
    digest: bytes
    first: int
    """Its first log record: a position in the batch when given to ``OnlineStore.commit``,
    a sequence number when read back by ``OnlineStore.receipt``."""
    count: int


def add_receipts(
    batch: rocksdict.WriteBatch,
    meta: rocksdict.ColumnFamily,
    receipts: Sequence[Receipt],
    first: int,
) -> None:
    """Put ``receipts`` (positions relative to a batch logged from ``first``) into ``batch``."""
    for receipt in receipts:
        batch.put(
            _RECEIPT_PREFIX + receipt.key.encode(),
            _RECEIPT.pack(first + receipt.first, receipt.count) + receipt.digest,
            meta,
        )


class Receipts(StoreParts):
    """Reading receipts back."""

    def receipt(self, key: str) -> Receipt | None:
        """What the request sent with idempotency ``key`` became, if it was committed."""
        stored = self._cf["meta"].get(_RECEIPT_PREFIX + key.encode())
        if stored is None:
            return None
        first, count = _RECEIPT.unpack_from(stored)
        return Receipt(key, stored[_RECEIPT.size :], first, count)
