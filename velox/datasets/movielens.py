"""Loaders for the MovieLens file formats, into the observation schema.

``u.data`` (100K: tab-separated, no header), ``ratings.csv`` (20M/25M/latest:
comma-separated with a header) and ``ratings.dat`` (1M/10M: ``::``-separated).
All have user, item, rating and a Unix timestamp in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from velox.datasets.schema import OBSERVATION_SCHEMA
from velox.errors import DataError

FORMATS = ("u.data", "ratings.csv", "ratings.dat")


def _to_schema(user: pa.Array, item: pa.Array, rating: pa.Array, seconds: pa.Array) -> pa.Table:
    ts = pc.multiply(seconds.cast(pa.int64()), 1_000_000).cast(pa.timestamp("us", tz="UTC"))
    columns = [user.cast(pa.string()), item.cast(pa.string()), rating.cast(pa.float64()), ts]
    return pa.Table.from_arrays(columns, schema=OBSERVATION_SCHEMA)


def _read(path: Path, delimiter: str, header: bool, columns: list[str], keep: list[int]):
    read = pacsv.ReadOptions(
        column_names=None if header else columns, autogenerate_column_names=False
    )
    parse = pacsv.ParseOptions(delimiter=delimiter)
    try:
        table = pacsv.read_csv(path, read_options=read, parse_options=parse)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path} is not a MovieLens ratings file ({exc})") from None
    if header:
        table = table.rename_columns([f"c{i}" for i in range(table.num_columns)])
    return [table.column(i) for i in keep]


def load_movielens(path: str | Path) -> pa.Table:
    """Read a MovieLens ratings file (or a folder holding one) into the observation schema."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in FORMATS if (path / name).is_file()]
        if not found:
            raise DataError(
                f"{path} holds none of the MovieLens rating files {', '.join(FORMATS)}; "
                "pass the folder of an unpacked MovieLens release"
            )
        path = found[0]
    if not path.is_file():
        raise DataError(f"ratings file {path} does not exist; check the path")
    names = ["user", "item", "rating", "ts"]
    if path.name.endswith(".csv"):
        cols = _read(path, ",", True, names, [0, 1, 2, 3])
    elif path.name.endswith(".dat"):
        # "::" is two single-character delimiters with an empty field between them.
        cols = _read(path, ":", False, [f"c{i}" for i in range(7)], [0, 2, 4, 6])
    else:
        cols = _read(path, "\t", False, names, [0, 1, 2, 3])
    try:
        table = _to_schema(*(c.combine_chunks() for c in cols))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"{path} has a column of the wrong type for MovieLens ({exc})") from None
    return table
