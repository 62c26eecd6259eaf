"""The deadline policy of reads: the model's answer in time, or the prior's, flagged and counted.

With ``serve.deadline_ms`` set, a read that would miss its deadline (it
waited too long already, or the model is held by a batch longer than the
time left) is answered by the prior ``mu + b_i``, as Clipper does, and
flagged ``degraded``. So is a read while a version switch or a deletion holds
the model. Every degraded answer is counted in ``velox_degraded_total`` by
route, here and nowhere else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from feature_store.durable import Busy, DurableModel, Replaced
from serving.metrics import Metrics

ScoreColumns = tuple[list[str], np.ndarray, np.ndarray]
"""Items, their scores and whether each is cold (unknown to the version's features)."""


class Deadline:
    """How long a read may still take, and the degraded answer when it may not."""

    def __init__(self, deadline_ms: float, metrics: Metrics) -> None:
        self.limit = deadline_ms / 1000
        self.compute_seconds = 0.0005
        """Running estimate of a read's compute time, kept back from the time left."""
        self._metrics = metrics

    def time_left(self, started: float) -> float | None:
        """Seconds the model may take for a read that arrived at ``started`` (monotonic clock).

        None without a deadline; zero or less when the read must be degraded.
        """
        if self.limit <= 0:
            return None
        return self.limit - (time.monotonic() - started) - self.compute_seconds

    def attempt(self, started: float, model_free: bool, compute: Callable[[float | None], Any]):
        """``compute(timeout)``'s result, or None when it would miss the deadline.

        ``model_free`` is False while a switch or a deletion holds the model.
        """
        left = self.time_left(started)
        if not model_free or (left is not None and left <= 0):
            return None
        began = time.perf_counter()
        try:
            result = compute(left)
        except (Busy, Replaced):  # held past the deadline, or switched meanwhile
            return None
        self.compute_seconds = 0.9 * self.compute_seconds + 0.1 * (time.perf_counter() - began)
        return result

    def answer(
        self,
        route: str,
        started: float,
        model_free: bool,
        compute: Callable[[float | None], Any],
        fallback: Callable[[], ScoreColumns],
    ) -> tuple[ScoreColumns, bool]:
        """:meth:`attempt`'s scores, else ``fallback()``'s; and whether degraded."""
        result = self.attempt(started, model_free, compute)
        if result is None:
            return self.degraded(route, fallback), True
        return as_scores(result), False

    def degraded(self, route: str, fallback: Callable[[], ScoreColumns]) -> ScoreColumns:
        """The prior's answer to a read of ``route``, counted."""
        self._metrics.degraded.labels(route).inc()
        return fallback()


def as_scores(prediction: Any) -> ScoreColumns:
    return prediction.items, prediction.scores, prediction.cold


def prior_scores(durable: DurableModel, items: list[str]) -> ScoreColumns:
    """``mu + b_i``: the answer for any user when there is no time to ask the model."""
    return as_scores(durable.model.prior_scores(items))
