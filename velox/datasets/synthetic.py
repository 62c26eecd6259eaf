"""A seeded synthetic rating stream with the structure that makes online learning matter.

* planted low-rank tastes: ``y = mu + b_u + b_i + u(t) . v_i + noise``, clipped
  and rounded to 1..5 stars like MovieLens;
* power-law activity: a few users and items get most of the ratings;
* users (and a fraction of items) arrive over time, so there are always cold
  users and items the last retrain did not see;
* drifting tastes: ``u(t) = cos(theta t) u0 + sin(theta t) u1`` with
  ``theta = drift * pi / 2``, so by the end a user with ``drift = 1`` has a
  new taste and a stale model measurably degrades.

Rows are generated in time slices, each sorted by time, so any size streams to
Parquet in bounded memory and the output is ordered by ``ts``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from velox.datasets.schema import OBSERVATION_SCHEMA
from velox.errors import InputError

START_US = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and shape of a synthetic data set; the same spec and seed give the same rows."""

    users: int = 2_000
    items: int = 1_000
    ratings: int = 100_000
    rank: int = 8
    drift: float = 0.5
    noise: float = 0.5
    seed: int = 0
    days: float = 365.0
    late_items: float = 0.2
    slice_rows: int = 500_000

    def __post_init__(self) -> None:
        for name in ("users", "items", "ratings", "rank", "slice_rows"):
            if getattr(self, name) < 1:
                raise InputError(f"synthetic {name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.drift <= 1.0:
            raise InputError(f"synthetic drift must be in [0, 1], got {self.drift}")
        if self.noise < 0 or self.days <= 0 or not 0.0 <= self.late_items <= 1.0:
            raise InputError("synthetic noise >= 0, days > 0 and late_items in [0, 1] are required")


@dataclass(frozen=True)
class _Truth:
    user_bias: np.ndarray
    item_bias: np.ndarray
    taste0: np.ndarray
    taste1: np.ndarray
    items: np.ndarray
    user_weight: np.ndarray
    item_weight: np.ndarray
    user_arrival: np.ndarray
    item_arrival: np.ndarray


MEAN = 3.5


def _power_law(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return rng.permutation(weights)


def _truth(spec: SyntheticSpec, rng: np.random.Generator) -> _Truth:
    scale = 0.9 / np.sqrt(spec.rank)
    item_arrival = np.where(
        rng.random(spec.items) < spec.late_items, rng.random(spec.items) * 0.9, 0.0
    )
    return _Truth(
        user_bias=rng.normal(0.0, 0.35, spec.users),
        item_bias=rng.normal(0.0, 0.45, spec.items),
        taste0=rng.normal(0.0, scale, (spec.users, spec.rank)),
        taste1=rng.normal(0.0, scale, (spec.users, spec.rank)),
        items=rng.normal(0.0, 1.0, (spec.items, spec.rank)),
        user_weight=_power_law(rng, spec.users, 0.8),
        item_weight=_power_law(rng, spec.items, 0.9),
        user_arrival=rng.random(spec.users) * 0.9,
        item_arrival=item_arrival,
    )


def _slice(
    spec: SyntheticSpec, truth: _Truth, rng: np.random.Generator, lo: float, hi: float, rows: int
) -> pa.Table:
    users_open = np.flatnonzero(truth.user_arrival < hi)
    items_open = np.flatnonzero(truth.item_arrival < hi)
    p_user = truth.user_weight[users_open] / truth.user_weight[users_open].sum()
    p_item = truth.item_weight[items_open] / truth.item_weight[items_open].sum()
    user = rng.choice(users_open, size=rows, p=p_user)
    item = rng.choice(items_open, size=rows, p=p_item)
    start = np.maximum(np.maximum(truth.user_arrival[user], truth.item_arrival[item]), lo)
    t = start + (hi - start) * rng.random(rows)
    order = np.argsort(t, kind="stable")
    user, item, t = user[order], item[order], t[order]
    angle = spec.drift * np.pi / 2 * t[:, None]
    taste = np.cos(angle) * truth.taste0[user] + np.sin(angle) * truth.taste1[user]
    value = (
        MEAN
        + truth.user_bias[user]
        + truth.item_bias[item]
        + np.einsum("ij,ij->i", taste, truth.items[item])
        + rng.normal(0.0, spec.noise, rows)
    )
    rating = np.clip(np.rint(value), 1.0, 5.0)
    micros = START_US + (t * spec.days * 86_400e6).astype(np.int64)
    return pa.Table.from_arrays(
        [
            pa.array(np.char.add("u", user.astype(str))),
            pa.array(np.char.add("i", item.astype(str))),
            pa.array(rating),
            pa.array(micros, type=pa.int64()).cast(OBSERVATION_SCHEMA.field("ts").type),
        ],
        schema=OBSERVATION_SCHEMA,
    )


def iter_synthetic(spec: SyntheticSpec) -> Iterator[pa.Table]:
    """The data set as time-ordered tables of at most ``spec.slice_rows`` rows."""
    rng = np.random.default_rng(spec.seed)
    truth = _truth(spec, rng)
    slices = -(-spec.ratings // spec.slice_rows)
    bounds = np.linspace(0.0, 1.0, slices + 1)
    sizes = np.diff(np.linspace(0, spec.ratings, slices + 1).astype(np.int64))
    for lo, hi, rows in zip(bounds[:-1], bounds[1:], sizes, strict=True):
        yield _slice(spec, truth, rng, float(lo), float(hi), int(rows))


def synthesize(spec: SyntheticSpec) -> pa.Table:
    """The whole data set in memory (for tests, the demo and small benchmarks)."""
    return pa.concat_tables(list(iter_synthetic(spec)))


def write_synthetic(spec: SyntheticSpec, path: str | Path) -> int:
    """Stream the data set into one Parquet file; returns the number of rows written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with pq.ParquetWriter(path, OBSERVATION_SCHEMA) as writer:
        for table in iter_synthetic(spec):
            writer.write_table(table)
            written += table.num_rows
    return written
