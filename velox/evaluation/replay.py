"""Prequential (predict-then-learn) replay: the one way a stream is played through a model.

Every observation is first predicted by the learner as it stands, then (when
``learn``) applied, in micro-batches of ``batch_size`` as the serving tier
would. The error is therefore always measured on data the model has not
seen. :func:`replay` returns a :class:`Trace` with one row per observation;
:func:`prequential` is the short form that returns only the totals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa

from velox.datasets.schema import seconds
from velox.evaluation.metrics import mae, rmse, window_rmse
from velox.model import OnlineModel

ProgressBar = Callable[[int, int], None]
"""Called after each batch with (observations done, observations in all)."""


class Learner(Protocol):
    """Anything that predicts a batch of observations and then, when asked, learns them."""

    def step(
        self,
        users: Sequence[str],
        items: Sequence[str],
        ratings: np.ndarray,
        when: np.ndarray,
        learn: bool,
    ) -> np.ndarray:
        """Predictions made before the batch; the batch is learned when ``learn``."""
        ...


class ModelLearner:
    """An :class:`OnlineModel` as a learner: the serving tier's own path."""

    def __init__(self, model: OnlineModel) -> None:
        self.model = model

    def step(self, users, items, ratings, when, learn: bool) -> np.ndarray:
        if learn:
            return self.model.observe_many(users, items, ratings, when).predictions
        return self.model.predict_pairs(users, items)


@dataclass(frozen=True)
class Trace:
    """One row per streamed observation, in stream order: what was predicted before it."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    predictions: np.ndarray
    seconds: float
    """Wall time of the replay (predicting and learning)."""

    @property
    def errors(self) -> np.ndarray:
        return self.predictions - self.ratings

    @property
    def rate(self) -> float:
        """Observations per second."""
        return self.ratings.size / self.seconds if self.seconds > 0 else float("inf")

    def clipped(self, low: float, high: float) -> Trace:
        """The trace with predictions clipped to the rating scale ``[low, high]``."""
        return Trace(
            self.users,
            self.items,
            self.ratings,
            np.clip(self.predictions, low, high),
            self.seconds,
        )


def replay(
    learner: Learner | OnlineModel,
    stream: pa.Table,
    *,
    batch_size: int = 64,
    learn: bool = True,
    progress: ProgressBar | None = None,
) -> Trace:
    """Predict each observation of ``stream`` (in order), then learn it when ``learn``."""
    if isinstance(learner, OnlineModel):
        learner = ModelLearner(learner)
    users = stream.column("user").to_pylist()
    items = stream.column("item").to_pylist()
    ratings = stream.column("rating").to_numpy().astype(np.float64)
    when = seconds(stream)
    predictions = np.empty(len(users))
    started = time.perf_counter()
    for start in range(0, len(users), batch_size):
        part = slice(start, start + batch_size)
        predictions[part] = learner.step(users[part], items[part], ratings[part], when[part], learn)
        if progress is not None:
            progress(min(start + batch_size, len(users)), len(users))
    elapsed = time.perf_counter() - started
    return Trace(np.asarray(users), np.asarray(items), ratings, predictions, elapsed)


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
    """:func:`replay` of ``model``, summarised; cold items are those the features lack."""
    trace = replay(model, stream, batch_size=batch_size, learn=learn)
    known = set(model.features.item_ids)
    return PrequentialReport(
        observations=int(trace.ratings.size),
        rmse=rmse(trace.predictions, trace.ratings),
        mae=mae(trace.predictions, trace.ratings),
        window_rmse=window_rmse(trace.errors, windows),
        cold_item_fraction=float(np.mean([item not in known for item in trace.items])),
    )
