"""How stale the active version is: its prequential error, and what arrived since it trained.

Every applied observation was scored by the active version just before it
was learned, so the squared errors of a batch are a free, honest measure of
what users got. :class:`VersionMonitor` keeps, for the version being served:

* the rolling RMSE over the last ``retrain.window`` observations (a ring
  buffer of squared errors; a batch costs one slice assignment, and the sum
  is taken when a snapshot is asked for, every ``check_interval`` or scrape,
  so no running sum drifts by floating-point cancellation);
* the RMSE of the first ``window`` observations after activation, and the
  validation RMSE recorded at training: the references degradation is
  measured against;
* per-time-window RMSE buckets by observation time (the last
  :data:`MAX_WINDOWS`), so a report shows when the error rose;
* observations and new users since the version's training watermark, and
  its age.

It lives on the event loop: :meth:`VersionMonitor.observed` is called after
every applied batch and never blocks. :mod:`serving.triggers` turns its
snapshots into decisions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import numpy as np

from serving.schemas import MonitorReport
from velox.config import RetrainConfig

MAX_WINDOWS = 24
"""Per-time-window buckets kept (a day of the default hour-long windows)."""


@dataclass(frozen=True)
class TimeWindow:
    """The prequential RMSE of the observations whose ts fell in ``[start, start + length)``."""

    start: float
    count: int
    rmse: float


@dataclass(frozen=True)
class MonitorSnapshot:
    """The monitor's figures at one moment; ``version`` is None before any activation."""

    version: str | None
    age_seconds: float | None
    watermark: int
    observations_since_watermark: int
    new_users_since_watermark: int
    rolling_rmse: float | None
    """RMSE of the last ``rolling_count`` (at most ``retrain.window``) observations."""
    rolling_count: int
    first_rmse: float | None
    """RMSE of the first ``first_count`` observations after activation (full at ``window``)."""
    first_count: int
    validation_rmse: float | None
    reference_rmse: float | None
    """The first window's RMSE once it is full, else the validation RMSE (None if unknown)."""
    degradation: float | None
    """``rolling_rmse / reference_rmse`` when both are known."""
    windows: tuple[TimeWindow, ...]
    """The newest per-time-window buckets, oldest first."""
    window: int
    """``retrain.window``: the size the rolling and first windows fill up to."""


def _rmse(squared_error_sum: float, count: int) -> float | None:
    return math.sqrt(squared_error_sum / count) if count else None


class VersionMonitor:
    """The staleness figures of the version being served; reset when another one activates.

    >>> import numpy as np
    >>> config = RetrainConfig(window=4, degradation_min_observations=2)
    >>> monitor = VersionMonitor(config, clock=lambda: 100.0)
    >>> monitor.activated("v2", trained_at=40.0, watermark=7, validation_rmse=0.5)
    >>> ones = np.ones(3)
    >>> monitor.observed("v2", ones * 3, ones * 4, np.array([0.0, 1.0, 5000.0]), new_users=1)
    >>> snapshot = monitor.snapshot()
    >>> snapshot.rolling_rmse, snapshot.reference_rmse, snapshot.degradation
    (1.0, 0.5, 2.0)
    >>> snapshot.age_seconds, snapshot.observations_since_watermark, len(snapshot.windows)
    (60.0, 3, 2)
    """

    def __init__(
        self,
        config: RetrainConfig,
        clock: Callable[[], float] = time.time,
        clip: tuple[float, float] | None = None,
    ) -> None:
        """``clip``: the rating range predictions are clipped to before they are scored."""
        self._config = config
        self._clock = clock
        self._clip = clip
        self._errors = np.zeros(config.window)
        self.activated(None, trained_at=0.0, watermark=0, validation_rmse=None)

    def activated(
        self,
        version: str | None,
        *,
        trained_at: float,
        watermark: int,
        validation_rmse: float | None,
        observations_since: int = 0,
        new_users_since: int = 0,
    ) -> None:
        """``version`` serves from now on: its figures start afresh (None: none serves yet).

        ``observations_since`` and ``new_users_since`` seed the counts since the
        watermark (after a restart, from the log); the error windows start empty.
        """
        self._version = version
        self._trained_at = trained_at
        self._watermark = watermark
        self._validation_rmse = validation_rmse
        self._observations = observations_since
        self._new_users = new_users_since
        self._filled = 0  # squared errors in the ring buffer
        self._next = 0  # where the next one goes
        self._first_sum = 0.0
        self._first_count = 0
        self._buckets: dict[float, list[float]] = {}  # start: [count, squared error sum]

    def observed(
        self,
        version: str,
        predictions: np.ndarray,
        ratings: np.ndarray,
        timestamps: np.ndarray,
        new_users: int,
    ) -> None:
        """Count one applied batch, scored by ``version`` before it learned; O(batch).

        A batch of another version than the one being monitored (applied just
        before a switch) is ignored: its errors say nothing about this one.
        """
        if version != self._version or len(ratings) == 0:
            return
        predicted = np.asarray(predictions, dtype=np.float64)
        if self._clip is not None:
            predicted = np.clip(predicted, *self._clip)
        squared = (predicted - np.asarray(ratings, dtype=np.float64)) ** 2
        self._observations += len(squared)
        self._new_users += new_users
        self._add_first(squared)
        self._add_rolling(squared)
        self._add_buckets(squared, np.asarray(timestamps, dtype=np.float64))

    def _add_first(self, squared: np.ndarray) -> None:
        room = self._config.window - self._first_count
        if room > 0:
            taken = squared[:room]
            self._first_sum += float(np.sum(taken))
            self._first_count += len(taken)

    def _add_rolling(self, squared: np.ndarray) -> None:
        size = self._errors.size
        squared = squared[-size:]  # only the newest ``window`` can stay
        n = len(squared)
        head = min(n, size - self._next)
        self._errors[self._next : self._next + head] = squared[:head]
        self._errors[: n - head] = squared[head:]
        self._next = (self._next + n) % size
        self._filled = min(size, self._filled + n)

    def _add_buckets(self, squared: np.ndarray, timestamps: np.ndarray) -> None:
        length = self._config.window_seconds
        keys = np.floor(timestamps / length)
        if keys.min() == keys.max():  # the usual batch: a few ms of traffic, one window
            groups = zip([keys[0]], [len(keys)], [float(np.sum(squared))], strict=True)
        else:
            keys, where = np.unique(keys, return_inverse=True)
            counts = np.bincount(where, minlength=len(keys))
            sums = np.bincount(where, weights=squared, minlength=len(keys))
            groups = zip(keys.tolist(), counts.tolist(), sums.tolist(), strict=True)
        buckets = self._buckets
        for key, count, total in groups:
            bucket = buckets.setdefault(key * length, [0, 0.0])
            bucket[0] += count
            bucket[1] += total
        if len(buckets) > MAX_WINDOWS:  # late observations of an evicted window are lost
            for start in sorted(buckets)[:-MAX_WINDOWS]:
                del buckets[start]

    def snapshot(self) -> MonitorSnapshot:
        """The figures now; O(window) for the rolling sum."""
        if self._filled < self._errors.size:
            rolling_sum = float(np.sum(self._errors[: self._filled]))
        else:
            rolling_sum = float(np.sum(self._errors))
        rolling = _rmse(rolling_sum, self._filled)
        first = _rmse(self._first_sum, self._first_count)
        reference = first if self._first_count == self._config.window else self._validation_rmse
        degradation = rolling / reference if rolling is not None and reference else None
        return MonitorSnapshot(
            version=self._version,
            age_seconds=None if self._version is None else self._clock() - self._trained_at,
            watermark=self._watermark,
            observations_since_watermark=self._observations,
            new_users_since_watermark=self._new_users,
            rolling_rmse=rolling,
            rolling_count=self._filled,
            first_rmse=first,
            first_count=self._first_count,
            validation_rmse=self._validation_rmse,
            reference_rmse=reference,
            degradation=degradation,
            windows=tuple(
                TimeWindow(float(start), int(count), math.sqrt(total / count))
                for start, (count, total) in sorted(self._buckets.items())
            ),
            window=self._config.window,
        )


def monitor_report(snapshot: MonitorSnapshot) -> MonitorReport:
    """The snapshot as ``GET /models`` sends it (the same fields, by name)."""
    return msgspec.convert(snapshot, MonitorReport, from_attributes=True)
