"""Half-steps as Spark stages: the executor of :func:`velox.als.train_als` for large data.

The ratings (dense indices) are hashed into blocks by user and by item and
cached with their age weights. A half-step broadcasts the other side's
features, offsets and the rows' regularisation, and each task solves its
block with :func:`velox.als.half_step` (CuPy where the executor sees a GPU and
``compute.device`` allows it, NumPy otherwise) through
``groupBy(block).applyInArrow``; the driver collects the solutions. The loop,
the global mean, the regularisation and the age weights are those of
:mod:`velox.als`: this module only moves data.

Limits: the driver holds both sides' factors (``(users + items) x d``
doubles) and broadcasts one side per half-step; each task holds its block's
ratings and the broadcast side. The final user half-step returns every
user's sufficient statistics (``d(d+1)/2 + d`` doubles per user) to the
driver, which writes them to the registry.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from velox.als import RowIndex, Solved, Totals, age_weights, half_step
from velox.backend import get_backend
from velox.symmetric import pack_upper, packed_size, unpack_upper

_SIDES = {"users": ("uidx", "iidx", "ublock"), "items": ("iidx", "uidx", "iblock")}


def _vectors(values: np.ndarray) -> pa.ListArray:
    """Rows of a matrix as Spark's ``array<double>`` (a variable-size Arrow list)."""
    n, width = values.shape
    offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))


def _matrix(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def _weigher(forgetting: float) -> Callable[[pa.Table], pa.Table]:
    """The task that adds each rating's age weight; a block holds its users' every rating."""

    def weigh(table: pa.Table) -> pa.Table:
        users = table.column("uidx").to_numpy()
        _, local = np.unique(users, return_inverse=True)
        ts = table.column("ts").to_numpy().astype(np.float64)
        weight = age_weights(local, table.column("iidx").to_numpy(), ts, forgetting)
        return table.drop_columns(["ts"]).append_column("weight", pa.array(weight))

    return weigh


def _solver(side: str, shared, device: str, statistics: bool) -> Callable[[pa.Table], pa.Table]:
    """The task of one half-step: solve every row of a block against broadcast features."""
    row, col, _ = _SIDES[side]

    def solve(table: pa.Table) -> pa.Table:
        features, offsets, regularization = shared.value
        rows = table.column(row).to_numpy()
        cols = table.column(col).to_numpy()
        ids, local = np.unique(rows, return_inverse=True)
        # age weights are the user half-step's alone (velox.als)
        weights = table.column("weight").to_numpy() if side == "users" else np.ones(rows.size)
        targets = table.column("rating").to_numpy() - offsets[cols]
        index = RowIndex.build(local, cols, ids.size)
        backend = get_backend(device)
        A, b, x = half_step(index, targets, weights, features, regularization[ids], backend)
        residual = targets - np.einsum("ij,ij->i", x[local], features[cols])
        columns = {
            "id": pa.array(ids),
            "x": _vectors(x),
            "sse": pa.array(np.bincount(local, weights * residual**2, minlength=ids.size)),
            "sq": pa.array(np.bincount(local, residual**2, minlength=ids.size)),
        }
        if statistics:
            columns["gram"] = _vectors(pack_upper(A))
            columns["rhs"] = _vectors(b)
        return pa.table(columns)

    return solve


class SparkExecutor:
    """Half-steps of :func:`velox.als.train_als` as Spark stages over blocks of rows.

    ``ratings`` is a DataFrame of (uidx, iidx, rating, ts) with dense indices
    into ``user_ids`` and ``item_ids``.
    """

    def __init__(
        self,
        spark,
        ratings,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        *,
        blocks: int,
        device: str,
    ) -> None:
        from pyspark.sql import functions as F

        self.spark, self.user_ids, self.item_ids = spark, user_ids, item_ids
        self.device, self.blocks = device, blocks
        self._ratings = ratings.withColumn("ublock", F.col("uidx") % blocks).withColumn(
            "iblock", F.col("iidx") % blocks
        )
        self._frame = None

    def totals(self, forgetting: float) -> Totals:
        from pyspark.sql import functions as F

        schema = "uidx long, iidx long, rating double, ublock long, iblock long, weight double"
        frame = self._ratings.repartition(self.blocks, "ublock")
        frame = frame.groupBy("ublock").applyInArrow(_weigher(forgetting), schema)
        self._frame = frame.cache()
        users = self._per_row("uidx", self.user_ids.size, F.count("*"), F.sum("weighted"))
        items = self._per_row("iidx", self.item_ids.size, F.count("*"))
        return Totals(
            user_weight=users[0],
            item_weight=items[1],
            user_count=users[1].astype(np.int64),
            weighted_sum=float(np.sum(users[2])),
        )

    def _per_row(self, column: str, n: int, *extra) -> list[np.ndarray]:
        """Per dense index of ``column``: the weight sum, then each extra aggregate."""
        from pyspark.sql import functions as F

        frame = self._frame.withColumn("weighted", F.col("weight") * F.col("rating"))
        aggregates = [F.sum("weight"), *extra]
        table = frame.groupBy(column).agg(*aggregates).toArrow()
        index = table.column(0).to_numpy()
        out = []
        for position in range(1, table.num_columns):
            values = np.zeros(n)
            values[index] = table.column(position).to_numpy()
            out.append(values)
        return out

    def solve(
        self,
        side: str,
        features: np.ndarray,
        offsets: np.ndarray,
        regularization: np.ndarray,
        statistics: bool,
    ) -> Solved:
        block = _SIDES[side][2]
        d = features.shape[1]
        schema = "id long, x array<double>, sse double, sq double"
        if statistics:
            schema += ", gram array<double>, rhs array<double>"
        shared = self.spark.sparkContext.broadcast((features, offsets, regularization))
        try:
            solve = _solver(side, shared, self.device, statistics)
            out = self._frame.groupBy(block).applyInArrow(solve, schema).toArrow()
        finally:
            shared.unpersist()
        out = out.take(pa.array(np.argsort(out.column("id").to_numpy())))
        return Solved(
            _matrix(out.column("x"), d),
            float(out.column("sse").to_numpy().sum()),
            float(out.column("sq").to_numpy().sum()),
            unpack_upper(_matrix(out.column("gram"), packed_size(d)), d) if statistics else None,
            _matrix(out.column("rhs"), d) if statistics else None,
        )

    def close(self) -> None:
        """Drop the cached ratings."""
        if self._frame is not None:
            self._frame.unpersist()
