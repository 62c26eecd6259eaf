"""How a rating table is cut into what trains offline, what streams, and what is held out.

* :func:`temporal`: the first part by time trains, the rest streams in time
  order. This is the protocol that matches production: real feedback comes
  in bursts from one user and is dominated by new users and items.
* :func:`random_split`: the same sizes, rows drawn at random (the optimistic
  figure shuffled benchmarks give).
* :func:`per_user`: the Velox paper's protocol: per user, in time order, the
  first ``offline`` ratings train, the next ``online`` are observed online,
  the rest are held out and only predicted.

>>> import pyarrow as pa
>>> table = pa.table({"user": ["a", "a", "b", "a"], "item": ["x", "y", "x", "z"],
...                   "rating": [1.0, 2.0, 3.0, 4.0], "ts": [4, 1, 2, 3]})
>>> train, stream = temporal(table, 0.5)
>>> train.column("ts").to_pylist(), stream.column("ts").to_pylist()
([1, 2], [3, 4])
>>> split = per_user(table, offline=1, online=1)
>>> [part.column("ts").to_pylist() for part in (split.train, split.stream, split.held_out)]
[[1, 2], [3], [4]]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from velox.errors import InputError


def by_time(table: pa.Table) -> pa.Table:
    """Rows in time order (stable: ties keep their order)."""
    return table.take(pc.sort_indices(table, [("ts", "ascending")]))


def _check_share(share: float) -> None:
    if not 0 < share < 1:
        raise InputError(f"the training share must be between 0 and 1, got {share!r}")


def temporal(table: pa.Table, share: float = 0.5) -> tuple[pa.Table, pa.Table]:
    """(train, stream): the first ``share`` of the rows by time, then the rest in time order."""
    _check_share(share)
    ordered = by_time(table)
    cut = round(ordered.num_rows * share)
    return ordered.slice(0, cut), ordered.slice(cut)


def random_split(table: pa.Table, share: float = 0.5, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """(train, stream) of the same sizes as :func:`temporal`, rows drawn at random."""
    _check_share(share)
    order = np.random.default_rng(seed).permutation(table.num_rows)
    cut = round(table.num_rows * share)
    return table.take(np.sort(order[:cut])), table.take(order[cut:])


@dataclass(frozen=True)
class PerUserSplit:
    """The Velox paper's three parts; each in time order."""

    train: pa.Table
    stream: pa.Table
    held_out: pa.Table


def per_user(table: pa.Table, offline: int = 10, online: int = 7) -> PerUserSplit:
    """Per user in time order: ``offline`` ratings train, ``online`` stream, the rest held out.

    Users with no more than ``offline + online`` ratings have nothing held out.
    """
    if offline < 1 or online < 1:
        raise InputError(f"offline and online counts must be >= 1, got {offline} and {online}")
    ordered = by_time(table)
    users = ordered.column("user").to_numpy(zero_copy_only=False)
    position = _position_within(users)
    parts = (position < offline, (position >= offline) & (position < offline + online))
    held = position >= offline + online
    return PerUserSplit(*(ordered.filter(pa.array(mask)) for mask in (*parts, held)))


def _position_within(keys: np.ndarray) -> np.ndarray:
    """How many earlier rows share each row's key (0 for a key's first row)."""
    _, rows = np.unique(keys, return_inverse=True)
    order = np.argsort(rows, kind="stable")
    counts = np.bincount(rows)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    position = np.empty(keys.size, dtype=np.int64)
    position[order] = np.arange(keys.size) - starts
    return position


def seen_before(users: np.ndarray) -> np.ndarray:
    """For each streamed row, how many earlier rows of the stream are the same user's."""
    return _position_within(users)
