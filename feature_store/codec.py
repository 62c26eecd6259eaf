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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from velox.biases import BiasState
from velox.errors import DataError
from velox.model import Applied
from velox.symmetric import pack_upper, packed_size, unpack_upper

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

    def take(self, rows: slice | np.ndarray) -> StateBatch:
        """The states of ``rows`` only."""
        return StateBatch(
            self.A[rows], self.b[rows], self.count[rows], self.seq[rows], self.updated[rows]
        )


def state_size(d: int, dtype: str = "float64") -> int:
    """Bytes of one encoded state of dimension ``d``."""
    return _HEADER.size + (d * (d + 1) // 2 + d) * np.dtype(dtype).itemsize


def encode_states(states: StateBatch, dtype: str = "float64") -> list[bytes]:
    """One record per user; ``dtype`` is the on-disk precision."""
    disk = np.dtype(dtype)
    if disk not in _CODES:
        raise DataError(f"state dtype {dtype!r} is not one of 'float64', 'float32'")
    n, d, _ = states.A.shape
    values = np.concatenate([pack_upper(states.A), states.b], axis=1).astype(
        disk.newbyteorder("<"), copy=False
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
    packed = packed_size(d)
    upper = np.empty((len(records), packed))
    b = np.empty((len(records), d))
    for j, (record, header) in enumerate(zip(records, headers, strict=True)):
        values = np.frombuffer(record, dtype=_DTYPES[header[1]], offset=_HEADER.size)
        if values.size != packed + d:
            raise DataError(f"state record {j} is truncated ({len(record)} bytes for d = {d})")
        upper[j] = values[:packed]
        b[j] = values[packed:]
    return StateBatch(
        A=unpack_upper(upper, d),
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
#   u8 format version (1) | u8 flags (bit 0: cold item) | f64 ts (epoch s) | f64 rating
#   | f64 prediction | f64 target | f64 residual | u16 len(user) | u16 len(item) | u8 len(version)
#   | user | item | version (UTF-8)
#   | cold only: u16 d | u16 k | d f64 features used | k f64 fold-in inputs | f64 fold-in target
# 47 bytes plus the ids for an item the version knows; 8 (d + k + 1) + 4 more for a cold one.
_LOG = struct.Struct("<BBdddddHHB")
_COLD = struct.Struct("<HH")
_COLD_FLAG = 1


@dataclass(frozen=True)
class Observation:
    """One logged observation, as the export pipeline and ``delete_user`` see it."""

    user: str
    item: str
    rating: float
    ts: float


def encode_log(applied: Applied) -> list[bytes]:
    """One record per observation of an applied batch; ids over 65,535 bytes are refused."""
    version = applied.version.encode()
    if len(version) > 0xFF:
        raise DataError("model version names must be at most 255 bytes of UTF-8")
    cold_row = np.cumsum(applied.cold) - 1
    records = []
    for p in range(len(applied)):
        user, item = applied.users[p].encode(), applied.items[p].encode()
        if max(len(user), len(item)) > 0xFFFF:
            raise DataError("user and item ids must be at most 65,535 bytes of UTF-8")
        cold = bool(applied.cold[p])
        head = _LOG.pack(
            FORMAT_VERSION,
            _COLD_FLAG if cold else 0,
            applied.timestamps[p],
            applied.ratings[p],
            applied.predictions[p],
            applied.targets[p],
            applied.residuals[p],
            len(user),
            len(item),
            len(version),
        )
        record = head + user + item + version
        if cold:
            c = cold_row[p]
            f, x = applied.cold_features[c], applied.foldin_inputs[c]
            record += (
                _COLD.pack(f.size, x.size)
                + np.concatenate([f, x, [applied.foldin_targets[c]]]).astype("<f8").tobytes()
            )
        records.append(record)
    return records


def _unpack_log(record: bytes) -> tuple[tuple, str, str, str, int]:
    if len(record) < _LOG.size:
        raise DataError(f"log record of {len(record)} bytes is shorter than its header")
    fields = _LOG.unpack_from(record)
    if fields[0] > FORMAT_VERSION:
        raise DataError(
            f"log record has format version {fields[0]}, newer than this Velox's "
            f"{FORMAT_VERSION}; upgrade Velox to read this store"
        )
    user_len, item_len, version_len = fields[7:]
    end = _LOG.size + user_len + item_len + version_len
    if len(record) < end:
        raise DataError(f"log record of {len(record)} bytes is truncated or damaged")
    item_at = _LOG.size + user_len
    user = record[_LOG.size : item_at].decode()
    item = record[item_at : item_at + item_len].decode()
    version = record[item_at + item_len : end].decode()
    return fields, user, item, version, end


def decode_observation(record: bytes) -> Observation:
    """The observation in a log record; a newer or damaged record is a clear :class:`DataError`."""
    fields, user, item, _, _ = _unpack_log(record)
    return Observation(user, item, fields[3], fields[2])


def decode_log(records: Sequence[bytes]) -> list[Applied]:
    """Log records back to :class:`Applied` batches: one per run of the same model version."""
    runs: list[Applied] = []
    rows: list[tuple] = []
    for record in records:
        fields, user, item, version, end = _unpack_log(record)
        if rows and version != rows[-1][2]:
            runs.append(_applied(rows))
            rows = []
        cold = None
        if fields[1] & _COLD_FLAG:
            d, k = _COLD.unpack_from(record, end) if len(record) >= end + _COLD.size else (0, 0)
            if len(record) != end + _COLD.size + 8 * (d + k + 1):
                raise DataError(f"log record of {len(record)} bytes is truncated or damaged")
            cold = np.frombuffer(record, dtype="<f8", offset=end + _COLD.size)
            cold = (cold[:d], cold[d : d + k], cold[-1])
        rows.append((user, item, version, fields, cold))
    if rows:
        runs.append(_applied(rows))
    return runs


def _applied(rows: list[tuple]) -> Applied:
    fields = np.array([row[3][2:7] for row in rows], dtype=np.float64).reshape(-1, 5)
    cold = [row[4] for row in rows if row[4] is not None]
    d, k = (cold[0][0].size, cold[0][1].size) if cold else (0, 0)
    return Applied(
        version=rows[0][2],
        users=[row[0] for row in rows],
        items=[row[1] for row in rows],
        ratings=fields[:, 1],
        timestamps=fields[:, 0],
        predictions=fields[:, 2],
        targets=fields[:, 3],
        residuals=fields[:, 4],
        cold=np.array([row[4] is not None for row in rows], dtype=bool),
        cold_features=np.array([c[0] for c in cold]).reshape(len(cold), d),
        foldin_inputs=np.array([c[1] for c in cold]).reshape(len(cold), k),
        foldin_targets=np.array([c[2] for c in cold], dtype=np.float64),
    )


_BIAS_SCHEMA = pa.schema([("item", pa.string()), ("sum", pa.float64()), ("count", pa.float64())])


def encode_biases(state: BiasState, seq: int, version: str) -> bytes:
    """The online biases as one Arrow IPC record, tagged with the log position and version."""
    table = pa.table(
        [pa.array(state.items, pa.string()), state.sums, state.counts], schema=_BIAS_SCHEMA
    ).replace_schema_metadata(
        {
            "format": str(FORMAT_VERSION),
            "mean_sum": repr(state.mean_sum),
            "mean_count": repr(state.mean_count),
            "seq": str(seq),
            "version": version,
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode_biases(record: bytes) -> tuple[BiasState, int, str]:
    """Read back :func:`encode_biases`: the state, its log position and its model version."""
    try:
        table = pa.ipc.open_stream(record).read_all()
    except pa.ArrowInvalid as exc:
        raise DataError(f"the stored bias checkpoint is damaged ({exc})") from None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if int(meta.get("format", 0)) > FORMAT_VERSION:
        raise DataError("the bias checkpoint was written by a newer Velox; upgrade Velox")
    state = BiasState(
        float(meta["mean_sum"]),
        float(meta["mean_count"]),
        table.column("item").to_pylist(),
        table.column("sum").to_numpy(),
        table.column("count").to_numpy(),
    )
    return state, int(meta["seq"]), meta["version"]
