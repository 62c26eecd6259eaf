"""Online global mean and item biases: regularised running estimates.

Between retrains the popularity of items moves faster than anything else in a
rating stream; keeping ``mu`` and ``b_i`` current on every observation was the
largest single gain a prototype measured on MovieLens streams.

* ``mu = (c0 * mu0 + sum y) / (c0 + n)``: the trained mean with the training
  count ``c0`` as its pseudo-count.
* ``b_i = (lambda_i * b0_i + sum r) / (lambda_i + n_i)`` with
  ``r = y - mu - w_u . f(i)``, the part of the rating that neither the global
  mean nor the user's model explains, measured before the user's update.
  ``b0_i`` is the trained bias (0 for items the model does not know).
* ``lambda_i = lambda_b + c * m_i``: the pseudo-count ``lambda_b`` plus ``c``
  per training rating of the item (``m_i``, ``model.bias_count_weight`` is
  ``c``). A trained bias estimated from 300 ratings is worth more than one
  from 3: with a flat pseudo-count, a small one let a few online ratings
  overrule a well-measured bias (after every retrain, too), and a large one
  kept the biases of rarely trained items from moving.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from velox.kernels.stream import Biases


class OnlineBiases:
    """The global mean and one bias per item, updated on every observation.

    ``item_count`` holds the known items' training rating counts; each weighs
    ``count_weight`` pseudo-observations behind its trained bias.

    >>> biases = OnlineBiases(3.0, 10, ["a"], np.array([0.5]), regularization=1.0)
    >>> biases.update(biases.ensure(["a", "new"]), np.array([4.0, 2.0]), np.array([0.0, -1.0]))
    >>> round(biases.mean, 4), biases.bias(biases.ensure(["a", "new"])).round(4).tolist()
    (3.0, [0.25, -0.5])
    """

    def __init__(
        self,
        global_mean: float,
        mean_count: float,
        item_ids: Sequence[str],
        item_bias: np.ndarray,
        *,
        regularization: float,
        item_count: np.ndarray | None = None,
        count_weight: float = 0.0,
    ) -> None:
        # [sum of ratings, count], an array so the compiled batch loop can update it in place
        self._totals = np.array([float(global_mean) * float(mean_count), float(mean_count)])
        self.regularization = regularization
        self._rows = {str(item): row for row, item in enumerate(item_ids)}
        size = max(len(item_ids), 16)
        self._prior = np.zeros(size)
        self._prior[: len(item_ids)] = item_bias
        self._weight = np.full(size, float(regularization))
        if item_count is not None:
            self._weight[: len(item_ids)] += count_weight * np.asarray(item_count, dtype=float)
        self._sum = np.zeros(size)
        self._count = np.zeros(size)

    def __len__(self) -> int:
        """Items with a row (rows are never taken back)."""
        return len(self._rows)

    @property
    def mean(self) -> float:
        return float(self._totals[0] / self._totals[1])

    def arrays(self) -> Biases:
        """The arrays that :func:`velox.kernels.stream.apply_stream` updates in place.

        Valid until the next :meth:`ensure` that adds an item (the arrays may grow).
        """
        return Biases(self._totals, self._prior, self._weight, self._sum, self._count)

    def ensure(self, items: Sequence[str]) -> np.ndarray:
        """Rows of ``items``, adding unseen ones with a zero prior bias."""
        rows = self.find(items)
        for position in np.flatnonzero(rows < 0):  # new items are rare: look them up again
            item = items[position]
            row = self._rows.get(item)
            if row is None:
                row = self._rows[item] = len(self._rows)
                if row == self._prior.size:
                    self._prior, self._sum, self._count = (
                        np.concatenate([a, np.zeros(a.size)])
                        for a in (self._prior, self._sum, self._count)
                    )
                    fill = np.full(self._weight.size, float(self.regularization))
                    self._weight = np.concatenate([self._weight, fill])
            rows[position] = row
        return rows

    def find(self, items: Sequence[str]) -> np.ndarray:
        """Rows of ``items``, -1 for items never seen."""
        rows = self._rows
        return np.fromiter((rows.get(item, -1) for item in items), np.int64, len(items))

    def bias(self, rows: np.ndarray) -> np.ndarray:
        """Current bias of each row; a row of -1 (never seen) has bias 0."""
        rows = np.asarray(rows)
        seen = rows >= 0
        out = np.zeros(rows.shape)
        r = rows[seen]
        lam = self._weight[r]
        out[seen] = (lam * self._prior[r] + self._sum[r]) / np.maximum(lam + self._count[r], 1e-12)
        return out

    def update(self, rows: np.ndarray, ratings: np.ndarray, residuals: np.ndarray) -> None:
        """Fold a batch of observations in: ratings into the mean, residuals into item biases.

        Sums are accumulated one observation after another, so replaying a
        log gives the same bits whatever the batch boundaries were.
        """
        self._totals[0] = np.cumsum(np.concatenate([self._totals[:1], ratings]))[-1]
        self._totals[1] += len(ratings)
        np.add.at(self._sum, rows, residuals)
        np.add.at(self._count, rows, 1.0)

    def online_state(self) -> BiasState:
        """What observations added since training: the part a checkpoint must keep."""
        seen = np.flatnonzero(self._count[: len(self._rows)] > 0)
        ids = np.empty(len(self._rows), dtype=object)
        for item, row in self._rows.items():
            ids[row] = item
        total, count = self._totals.tolist()
        return BiasState(total, count, ids[seen].tolist(), self._sum[seen], self._count[seen])

    def restore(self, state: BiasState) -> None:
        """Continue from a checkpoint taken by :meth:`online_state` on the same trained biases."""
        self._totals[:] = state.mean_sum, state.mean_count
        rows = self.ensure(state.items)
        self._sum[rows] = state.sums
        self._count[rows] = state.counts


@dataclass(frozen=True)
class BiasState:
    """The online part of :class:`OnlineBiases`: mean accumulators and per-item sums."""

    mean_sum: float
    mean_count: float
    items: list[str]
    sums: np.ndarray
    counts: np.ndarray
