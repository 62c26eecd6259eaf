"""A growing table of ridge states keyed by string id, on one array backend.

Users and folded-in items are both "a ridge regression per key, updated one
observation at a time", so they share this table: contiguous ``(N, d, d)``
arrays that the kernels update in place by row, plus counts and timestamps.

For durability the table also tracks, per row, the last log sequence number
the state includes (``seq``) and the one its stored checkpoint includes
(``saved``): a row is dirty while ``seq > saved``, and only clean rows may be
evicted, so a state is never dropped before it can be read back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from velox import kernels
from velox.backend import Backend
from velox.kernels.stream import Ridge


class RidgeTable:
    """Ridge states ``(P, w, A, b)`` per key, started from the prior ``N(w0, P = I / lambda)``.

    Every new row starts at ``A = lambda I``, ``b = lambda w0``; updates go
    through :func:`velox.kernels.rank_one_update`, and a row is re-factorised
    from its exact statistics every ``refactor_interval`` of its updates. With
    a ``walk`` variance, coordinate ``walk_coordinate`` takes a random-walk
    step before each update (:func:`velox.kernels.diffuse`).
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
        walk: float = 0.0,
        walk_coordinate: int = 0,
        capacity: int = 64,
    ) -> None:
        self.dim = dim
        self.regularization = regularization
        self.backend = backend
        self.dtype = np.dtype(dtype)
        self.forgetting = forgetting
        self.refactor_interval = refactor_interval
        self.walk = walk
        self.walk_coordinate = walk_coordinate
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
        self.seq = np.zeros(capacity, dtype=np.int64)
        self.saved = np.zeros(capacity, dtype=np.int64)
        self.used = np.zeros(capacity, dtype=np.int64)

    _DEVICE = ("P", "A", "w", "b")
    _HOST = ("count", "updated", "seq", "saved", "used")

    def _device_arrays(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._DEVICE)

    def _host_arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(getattr(self, name) for name in self._HOST)

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
        """Rows of ``keys``, adding the missing ones at the prior (all in one step)."""
        found = self.find(keys)
        missing = np.flatnonzero(found < 0)
        if missing.size:
            new = list(dict.fromkeys(keys[p] for p in missing))
            first = len(self._keys)
            self._add(new)
            rows = {key: first + offset for offset, key in enumerate(new)}
            found[missing] = [rows[keys[p]] for p in missing]
        return found

    def _add(self, keys: list[str]) -> None:
        first, n = len(self._keys), len(keys)
        while first + n > self.P.shape[0]:
            self._grow()
        rows = slice(first, first + n)
        lam = self.regularization
        xp = self.backend.xp
        prior = self.backend.asarray(self.prior_mean)
        eye = xp.eye(self.dim, dtype=self.dtype)
        self.A[rows] = lam * eye
        self.P[rows] = eye / lam
        self.w[rows] = prior
        self.b[rows] = lam * prior
        for array in self._host_arrays():
            array[rows] = 0
        self._rows.update(zip(keys, range(first, first + n), strict=True))
        self._keys.extend(keys)

    def _grow(self) -> None:
        xp = self.backend.xp
        size = self.P.shape[0]
        for name in self._DEVICE:
            old = getattr(self, name)
            new = xp.empty((2 * size, *old.shape[1:]), dtype=old.dtype)
            new[:size] = old
            setattr(self, name, new)
        for name in self._HOST:
            old = getattr(self, name)
            setattr(self, name, np.concatenate([old, np.zeros_like(old)]))

    def arrays(self) -> Ridge:
        """The arrays :func:`velox.kernels.stream.apply_stream` updates in place, and the rules.

        Valid until the next :meth:`ensure` that adds a key (the arrays may grow).
        """
        return Ridge(
            self.P,
            self.w,
            self.A,
            self.b,
            self.count,
            self.updated,
            self.forgetting,
            self.refactor_interval,
            self.walk,
            self.walk_coordinate,
        )

    def update(self, rows: np.ndarray, f: Any, t: Any, when: float) -> Any:
        """Apply one observation to each of the distinct ``rows``; predictions before it."""
        if self.walk > 0.0:
            P, A, b = self.P[rows], self.A[rows], self.b[rows]
            kernels.diffuse(P, A, b, self.walk_coordinate, self.walk)
            self.P[rows], self.A[rows], self.b[rows] = P, A, b
        pred = kernels.rank_one_update(
            self.P, self.w, self.A, self.b, f, t, self.forgetting, rows=rows
        )
        self.count[rows] += 1
        self.updated[rows] = when
        due = rows[self.count[rows] % self.refactor_interval == 0]
        if due.size:
            kernels.refit_rows(self.P, self.w, self.A, self.b, due)
        return pred

    def load(
        self,
        keys: Sequence[str],
        A: Any,
        b: Any,
        count: np.ndarray,
        *,
        seq: np.ndarray | int = 0,
        updated: np.ndarray | float = 0.0,
    ) -> np.ndarray:
        """Set states from sufficient statistics (training or a checkpoint), refit exactly.

        ``seq`` is the log sequence number the statistics include; a loaded
        row counts as saved up to it. Returns the rows.
        """
        rows = self.ensure(keys)
        self.A[rows] = self.backend.asarray(A, dtype=self.dtype)
        self.b[rows] = self.backend.asarray(b, dtype=self.dtype)
        self.count[rows] = count
        self.updated[rows] = updated
        self.seq[rows] = self.saved[rows] = seq
        kernels.refit_rows(self.P, self.w, self.A, self.b, rows)
        return rows

    def mark(self, rows: np.ndarray, seqs: np.ndarray) -> None:
        """Record that ``rows`` now include the log records ``seqs`` (rows may repeat)."""
        if (rows < 0).any():  # a row evicted between its update and this mark: a bug upstream
            raise RuntimeError("marking a row that is not in the table")
        np.maximum.at(self.seq, rows, seqs)

    def mark_saved(self, keys: Sequence[str], seqs: np.ndarray) -> None:
        """Record that checkpoints of ``keys`` up to ``seqs`` are stored (keys may be gone)."""
        rows = self.find(keys)
        present = rows >= 0
        np.maximum.at(self.saved, rows[present], np.asarray(seqs)[present])

    def dirty(self) -> np.ndarray:
        """Rows whose state includes log records their checkpoint does not."""
        return np.flatnonzero(self.seq[: len(self)] > self.saved[: len(self)])

    def statistics(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """Host copies of ``(A, b, count, seq, updated)`` of ``rows``: what a checkpoint holds."""
        to_np = self.backend.to_numpy
        return (
            to_np(self.A[rows]).astype(np.float64, copy=False),
            to_np(self.b[rows]).astype(np.float64, copy=False),
            self.count[rows].copy(),
            self.seq[rows].copy(),
            self.updated[rows].copy(),
        )

    def evict(self, keys: Sequence[str]) -> None:
        """Drop rows (their state must be stored elsewhere first); the last row fills each hole."""
        for key in keys:
            row = self._rows.pop(key)
            last = len(self._keys) - 1
            moved = self._keys.pop()
            if row != last:
                for array in (*self._device_arrays(), *self._host_arrays()):
                    array[row] = array[last]
                self._keys[row] = moved
                self._rows[moved] = row
