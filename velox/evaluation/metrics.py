"""Error measures of a replayed stream: one definition each, used by every report.

The inputs are per-observation arrays (a :class:`~velox.evaluation.replay.Trace`),
so any figure can be recomputed from the results folder later.

>>> rmse(np.array([3.0, 4.0]), np.array([4.0, 4.0]))
0.7071067811865476
>>> cold_start_curve(np.array([0, 1, 0, 1]), np.array([1.0, 0.5, 3.0, 0.5]), upto=2).tolist()
[2.23606797749979, 0.5, nan]
"""

from __future__ import annotations

import numpy as np


def rmse(predictions: np.ndarray, ratings: np.ndarray | float) -> float:
    """Root mean squared error: every figure of quality the project reports."""
    return float(np.sqrt(np.mean((np.asarray(predictions) - np.asarray(ratings)) ** 2)))


def mae(predictions: np.ndarray, ratings: np.ndarray) -> float:
    """Mean absolute error."""
    return float(np.mean(np.abs(np.asarray(predictions) - np.asarray(ratings))))


def window_rmse(errors: np.ndarray, windows: int) -> list[float]:
    """RMSE of ``windows`` consecutive, equal parts of the stream (time windows in time order)."""
    chunks = np.array_split(errors, max(1, min(windows, errors.size)))
    return [rmse(chunk, 0.0) for chunk in chunks]


def cold_start_curve(seen: np.ndarray, errors: np.ndarray, upto: int = 50) -> np.ndarray:
    """RMSE of a user's prediction by how many observations of that user came before it.

    Entry ``n`` (0 to ``upto``) is the RMSE over predictions made after
    exactly ``n`` earlier observations of the same user; NaN where none.
    """
    curve = np.full(upto + 1, np.nan)
    squared = np.bincount(seen[seen <= upto], errors[seen <= upto] ** 2, minlength=upto + 1)
    counts = np.bincount(seen[seen <= upto], minlength=upto + 1)
    np.divide(squared, counts, out=curve, where=counts > 0)
    return np.sqrt(curve)


def per_user_rmse(users: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each user's RMSE over their streamed observations; (user ids, RMSEs), ids sorted."""
    ids, rows = np.unique(users, return_inverse=True)
    squared = np.bincount(rows, errors**2, minlength=ids.size)
    return ids, np.sqrt(squared / np.bincount(rows, minlength=ids.size))


def precision_at(ranked: list[str], relevant: set[str], k: int = 10) -> float:
    """Share of the first ``k`` recommended items that the user later rated highly."""
    return sum(item in relevant for item in ranked[:k]) / k


def ndcg_at(ranked: list[str], relevant: set[str], k: int = 10) -> float:
    """Normalised discounted cumulative gain of the first ``k`` items (binary relevance).

    >>> round(ndcg_at(["a", "b", "c"], {"b"}, k=3), 4)
    0.6309
    """
    gains = [1.0 / np.log2(rank + 2) for rank, item in enumerate(ranked[:k]) if item in relevant]
    ideal = sum(1.0 / np.log2(rank + 2) for rank in range(min(k, len(relevant))))
    return float(sum(gains) / ideal) if ideal else 0.0
