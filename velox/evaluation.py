"""Prequential (predict-then-learn) evaluation and the error measure every figure uses.

:func:`prequential` is the one replay of a stream that the tests, the demo
and the benchmarks use (a ``velox evaluate`` command and the notebook are
not built yet). Every observation is first predicted by the model as it stands, then (when
``learn``) applied, in micro-batches of ``batch_size`` as the serving tier
would. The error is therefore always measured on data the model has not seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from velox.datasets.schema import seconds
from velox.model import OnlineModel


def rmse(predictions: np.ndarray, ratings: np.ndarray) -> float:
    """Root mean squared error: every figure of quality the project reports.

    >>> rmse(np.array([3.0, 4.0]), np.array([4.0, 4.0]))
    0.7071067811865476
    """
    return float(np.sqrt(np.mean((np.asarray(predictions) - np.asarray(ratings)) ** 2)))


@dataclass(frozen=True)
class PrequentialReport:
    """Errors of a prequential run, overall and per consecutive window of the stream."""

    observations: int
    rmse: float
    mae: float
    window_rmse: list[float]
    cold_item_fraction: float

    def summary(self) -> str:
        windows = " ".join(f"{value:.4f}" for value in self.window_rmse)
        return (
            f"n={self.observations} RMSE={self.rmse:.4f} MAE={self.mae:.4f} "
            f"windows=[{windows}] cold items={self.cold_item_fraction:.1%}"
        )


def prequential(
    model: OnlineModel,
    stream: pa.Table,
    *,
    batch_size: int = 64,
    learn: bool = True,
    windows: int = 4,
) -> PrequentialReport:
    """Predict each observation of ``stream`` (in order), then learn from it when ``learn``."""
    users = stream.column("user").to_pylist()
    items = stream.column("item").to_pylist()
    ratings = stream.column("rating").to_numpy().astype(np.float64)
    when = seconds(stream)
    predictions = np.empty(len(users))
    cold = np.empty(len(users), dtype=bool)
    for start in range(0, len(users), batch_size):
        part = slice(start, start + batch_size)
        if learn:
            result = model.observe_many(users[part], items[part], ratings[part], when[part])
            predictions[part], cold[part] = result.predictions, result.cold
        else:
            predictions[part] = model.predict_pairs(users[part], items[part])
            cold[part] = model.features.lookup(items[part]) < 0
    errors = predictions - ratings
    chunks = np.array_split(errors, max(1, min(windows, errors.size)))
    return PrequentialReport(
        observations=int(errors.size),
        rmse=rmse(predictions, ratings),
        mae=float(np.mean(np.abs(errors))),
        window_rmse=[rmse(c, 0.0) for c in chunks],
        cold_item_fraction=float(cold.mean()),
    )
