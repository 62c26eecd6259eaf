"""Compact binary records for the online store, each led by a format version byte.

Neither pickle (unsafe, Python-only) nor JSON (ten bytes a float) is used for
vectors. A user's state is stored as its exact sufficient statistics: the
symmetric ``A`` packed to its upper triangle, ``b``, the observation count,
the last log sequence number the state includes, and the time of its last
update. ``P`` and ``w`` are re-factorised from them on load (one batched
Cholesky), which also wipes any rounding the rank-one updates accumulated.

State record, little-endian::

    u8 format version (1) | u8 dtype (0: float64, 1: float32) | u16 d
    u64 observations | u64 last sequence number | f64 last update (epoch s)
    d(d+1)/2 values: A's upper triangle, row by row | d values: b

Size per user (header 28 bytes): d = 33 (rank 32): 4,780 B in float64,
2,404 B in float32; d = 65 (rank 64): 17,708 B / 8,868 B. Ten million users
at rank 32 are about 48 GB (float64) or 24 GB (float32) before RocksDB's
compression. float32 on disk halves that but rounds ``A`` to about 1e-7
relative, so a reloaded state is exact to about 1e-6 instead of 1e-12.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache

import numpy as np

from velox.errors import DataError

FORMAT_VERSION = 1
_HEADER = struct.Struct("<BBHQQd")
_DTYPES = {0: np.dtype("<f8"), 1: np.dtype("<f4")}
_CODES = {np.dtype("float64"): 0, np.dtype("float32"): 1}


@dataclass(frozen=True)
class StateBatch:
    """Decoded sufficient statistics of many users, as host arrays."""

    A: np.ndarray
    b: np.ndarray
    count: np.ndarray
    seq: np.ndarray
    updated: np.ndarray


@cache
def _upper(d: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(d)


def state_size(d: int, dtype: str = "float64") -> int:
    """Bytes of one encoded state of dimension ``d``."""
    return _HEADER.size + (d * (d + 1) // 2 + d) * np.dtype(dtype).itemsize


def encode_states(states: StateBatch, dtype: str = "float64") -> list[bytes]:
    """One record per user; ``dtype`` is the on-disk precision."""
    disk = np.dtype(dtype)
    if disk not in _CODES:
        raise DataError(f"state dtype {dtype!r} is not one of 'float64', 'float32'")
    n, d, _ = states.A.shape
    rows, cols = _upper(d)
    values = np.concatenate([states.A[:, rows, cols], states.b], axis=1).astype(
        disk.newbyteorder("<")
    )
    return [
        _HEADER.pack(
            FORMAT_VERSION,
            _CODES[disk],
            d,
            int(states.count[j]),
            int(states.seq[j]),
            float(states.updated[j]),
        )
        + values[j].tobytes()
        for j in range(n)
    ]


def decode_states(records: list[bytes]) -> StateBatch:
    """Decode records of one dimension back to float64 arrays; clear errors for foreign data."""
    if not records:
        raise DataError("no state records to decode")
    headers = [_check_header(record) for record in records]
    dims = {h[2] for h in headers}
    if len(dims) != 1:
        raise DataError(f"state records of different dimensions {sorted(dims)} cannot be mixed")
    d = dims.pop()
    rows, cols = _upper(d)
    packed = d * (d + 1) // 2
    A = np.empty((len(records), d, d))
    b = np.empty((len(records), d))
    for j, (record, header) in enumerate(zip(records, headers, strict=True)):
        values = np.frombuffer(record, dtype=_DTYPES[header[1]], offset=_HEADER.size)
        if values.size != packed + d:
            raise DataError(f"state record {j} is truncated ({len(record)} bytes for d = {d})")
        A[j, rows, cols] = values[:packed]
        b[j] = values[packed:]
    A[:, cols, rows] = A[:, rows, cols]
    return StateBatch(
        A=A,
        b=b,
        count=np.array([h[3] for h in headers], dtype=np.int64),
        seq=np.array([h[4] for h in headers], dtype=np.int64),
        updated=np.array([h[5] for h in headers]),
    )


def _check_header(record: bytes) -> tuple:
    if len(record) < _HEADER.size:
        raise DataError(f"state record of {len(record)} bytes is shorter than its header")
    header = _HEADER.unpack_from(record)
    if header[0] > FORMAT_VERSION:
        raise DataError(
            f"state record has format version {header[0]}, newer than this Velox's "
            f"{FORMAT_VERSION}; upgrade Velox to read this store"
        )
    if header[0] < 1 or header[1] not in _DTYPES:
        raise DataError(f"state record has an unknown format ({header[0]}, {header[1]})")
    return header


# Observation log record, little-endian:
#   u8 format version (1) | f64 ts (epoch s) | f64 rating | u16 len(user) | u16 len(item)
#   | user (UTF-8) | item (UTF-8)
_OBSERVATION = struct.Struct("<BddHH")


@dataclass(frozen=True)
class Observation:
    """One logged observation."""

    user: str
    item: str
    rating: float
    ts: float


def encode_observation(user: str, item: str, rating: float, ts: float) -> bytes:
    """One log record; ids longer than 65,535 UTF-8 bytes are refused."""
    user_bytes, item_bytes = user.encode(), item.encode()
    if max(len(user_bytes), len(item_bytes)) > 0xFFFF:
        raise DataError("user and item ids must be at most 65,535 bytes of UTF-8")
    head = _OBSERVATION.pack(FORMAT_VERSION, ts, rating, len(user_bytes), len(item_bytes))
    return head + user_bytes + item_bytes


def decode_observation(record: bytes) -> Observation:
    """Read back a log record; a newer or damaged record is a clear :class:`DataError`."""
    if len(record) < _OBSERVATION.size:
        raise DataError(f"log record of {len(record)} bytes is shorter than its header")
    version, ts, rating, user_len, item_len = _OBSERVATION.unpack_from(record)
    if version > FORMAT_VERSION:
        raise DataError(
            f"log record has format version {version}, newer than this Velox's "
            f"{FORMAT_VERSION}; upgrade Velox to read this store"
        )
    start = _OBSERVATION.size
    if len(record) != start + user_len + item_len:
        raise DataError(f"log record of {len(record)} bytes is truncated or damaged")
    user = record[start : start + user_len].decode()
    item = record[start + user_len :].decode()
    return Observation(user, item, rating, ts)
