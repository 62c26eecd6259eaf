"""The one Arrow schema every observation in Velox has, online or offline."""

from __future__ import annotations

import pyarrow as pa

OBSERVATION_SCHEMA = pa.schema(
    [
        pa.field("user", pa.string(), nullable=False),
        pa.field("item", pa.string(), nullable=False),
        pa.field("rating", pa.float64(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


def seconds(table: pa.Table):
    """The ``ts`` column as float seconds since the epoch (NumPy), for the online model."""
    micros = table.column("ts").cast(pa.int64()).to_numpy()
    return micros / 1e6
