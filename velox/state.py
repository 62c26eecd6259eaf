"""A growing table of ridge states keyed by string id, on one array backend.

Users and folded-in items are both "a ridge regression per key, updated one
observation at a time", so they share this table: contiguous ``(N, d, d)``
arrays that the kernels update in place by row, plus counts and timestamps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from velox import kernels
from velox.backend import Backend


class RidgeTable:
    """Ridge states ``(P, w, A, b)`` per key, started from the prior ``N(w0, P = I / lambda)``.

    Every new row starts at ``A = lambda I``, ``b = lambda w0``; updates go
    through :func:`velox.kernels.rank_one_update`, and a row is re-factorised
    from its exact statistics every ``refactor_interval`` of its updates.
    """

    def __init__(
        self,
        dim: int,
        *,
        regularization: float,
        backend: Backend,
        dtype: str = "float64",
        forgetting: float = 1.0,
        refactor_interval: int = 1000,
        capacity: int = 64,
    ) -> None:
        self.dim = dim
        self.regularization = regularization
        self.backend = backend
        self.dtype = np.dtype(dtype)
        self.forgetting = forgetting
        self.refactor_interval = refactor_interval
        self.prior_mean = np.zeros(dim, dtype=self.dtype)
        self._rows: dict[str, int] = {}
        self._keys: list[str] = []
        xp = backend.xp
        self.P = xp.empty((capacity, dim, dim), dtype=self.dtype)
        self.A = xp.empty((capacity, dim, dim), dtype=self.dtype)
        self.w = xp.empty((capacity, dim), dtype=self.dtype)
        self.b = xp.empty((capacity, dim), dtype=self.dtype)
        self.count = np.zeros(capacity, dtype=np.int64)
        self.updated = np.zeros(capacity, dtype=np.float64)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    @property
    def keys(self) -> Sequence[str]:
        return self._keys

    def find(self, keys: Sequence[str]) -> np.ndarray:
        """Row of each key, or -1 for keys not in the table."""
        rows = self._rows
        return np.fromiter((rows.get(key, -1) for key in keys), np.int64, len(keys))

    def ensure(self, keys: Sequence[str]) -> np.ndarray:
        """Rows of ``keys``, adding the missing ones at the prior."""
        found = self.find(keys)
        for position in np.flatnonzero(found < 0):
            key = keys[position]
            row = self._rows.get(key)
            if row is None:
                row = self._add(key)
            found[position] = row
        return found

    def _add(self, key: str) -> int:
        row = len(self._keys)
        if row == self.P.shape[0]:
            self._grow()
        lam = self.regularization
        xp = self.backend.xp
        prior = self.backend.asarray(self.prior_mean)
        self.A[row] = lam * xp.eye(self.dim, dtype=self.dtype)
        self.P[row] = xp.eye(self.dim, dtype=self.dtype) / lam
        self.w[row] = prior
        self.b[row] = lam * prior
        self.count[row] = 0
        self.updated[row] = 0.0
        self._rows[key] = row
        self._keys.append(key)
        return row

    def _grow(self) -> None:
        xp = self.backend.xp
        size = self.P.shape[0]
        for name in ("P", "A", "w", "b"):
            old = getattr(self, name)
            new = xp.empty((2 * size, *old.shape[1:]), dtype=old.dtype)
            new[:size] = old
            setattr(self, name, new)
        self.count = np.concatenate([self.count, np.zeros(size, dtype=np.int64)])
        self.updated = np.concatenate([self.updated, np.zeros(size)])

    def update(self, rows: np.ndarray, f: Any, t: Any, when: float) -> Any:
        """Apply one observation to each of the distinct ``rows``; predictions before it."""
        pred = kernels.rank_one_update(
            self.P, self.w, self.A, self.b, f, t, self.forgetting, rows=rows
        )
        self.count[rows] += 1
        self.updated[rows] = when
        due = rows[self.count[rows] % self.refactor_interval == 0]
        if due.size:
            kernels.refit_rows(self.P, self.w, self.A, self.b, due)
        return pred

    def load(self, keys: Sequence[str], A: Any, b: Any, count: np.ndarray) -> None:
        """Set states from sufficient statistics (from training or a checkpoint), refit exactly."""
        rows = self.ensure(keys)
        self.A[rows] = self.backend.asarray(A, dtype=self.dtype)
        self.b[rows] = self.backend.asarray(b, dtype=self.dtype)
        self.count[rows] = count
        kernels.refit_rows(self.P, self.w, self.A, self.b, rows)
