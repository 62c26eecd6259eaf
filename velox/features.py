"""Item feature models: the shared ``f(i)`` that every user's weights are fitted over.

Everything above this interface (the per-user model, serving, evaluation) asks
a :class:`FeatureModel` for vectors and never assumes how they were made, so a
content-based model can stand beside matrix factorisation later.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from velox.backend import CPU, Backend, array_module
from velox.errors import InputError


class FeatureModel(ABC):
    """Feature vectors of a fixed set of known items, for one model version.

    Items outside the set get :meth:`cold_vector` as their base; the online
    fold-in learns the coordinates in :attr:`foldin_coords` for them.
    """

    version: str

    @property
    @abstractmethod
    def dim(self) -> int:
        """Length ``d`` of every feature vector."""

    @property
    @abstractmethod
    def item_ids(self) -> Sequence[str]:
        """The known items, in row order of :meth:`matrix`."""

    @abstractmethod
    def matrix(self) -> Any:
        """All known items' features, ``(n_items, d)``, on the model's backend."""

    @abstractmethod
    def cold_vector(self) -> np.ndarray:
        """Base features of an item the model does not know (host array of length ``d``)."""

    @property
    @abstractmethod
    def foldin_coords(self) -> np.ndarray:
        """Indices of the coordinates the online fold-in may learn for unknown items."""

    @property
    @abstractmethod
    def bias_coordinate(self) -> int:
        """Index of the constant coordinate, whose user weight is the user's bias."""

    def lookup(self, items: Sequence[str]) -> np.ndarray:
        """Row of each item in :meth:`matrix`, or -1 for items the model does not know."""
        index = self._index
        return np.fromiter((index.get(item, -1) for item in items), np.int64, len(items))

    def vectors(self, rows: np.ndarray) -> Any:
        """Features by row (see :meth:`lookup`), ``(len(rows), d)``; a row of -1 gets
        :meth:`cold_vector`, so the caller decides what to do with unknown items."""
        matrix = self.matrix()
        xp = array_module(matrix)
        rows = np.asarray(rows)
        out = matrix[xp.asarray(np.maximum(rows, 0))]
        unknown = np.flatnonzero(rows < 0)
        if unknown.size:
            out[xp.asarray(unknown)] = xp.asarray(self.cold_vector())
        return out

    def features_of(self, items: Sequence[str]) -> tuple[Any, np.ndarray]:
        """Feature vectors of a batch of item ids and which of them the model knows."""
        rows = self.lookup(items)
        return self.vectors(rows), rows >= 0

    @property
    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = self.__dict__["_index_cache"] = {
                item: row for row, item in enumerate(self.item_ids)
            }
        return cached


class MatrixFactorization(FeatureModel):
    """Matrix-factorisation features ``f(i) = [v_i, 1]``.

    The constant last coordinate lets each user's weight vector carry the
    user's bias. Unknown items start from ``[0, ..., 0, 1]`` (user bias only)
    and the fold-in learns their factors ``v_i``.

    >>> mf = MatrixFactorization(["a", "b"], np.array([[1.0, 2.0], [3.0, 4.0]]), version="v1")
    >>> mf.dim, mf.lookup(["b", "zzz"]).tolist()
    (3, [1, -1])
    >>> mf.vectors(mf.lookup(["a"])).tolist()
    [[1.0, 2.0, 1.0]]
    >>> vectors, known = mf.features_of(["b", "new"])
    >>> vectors.tolist(), known.tolist()
    ([[3.0, 4.0, 1.0], [0.0, 0.0, 1.0]], [True, False])
    """

    def __init__(
        self,
        item_ids: Sequence[str],
        factors: np.ndarray,
        *,
        version: str,
        backend: Backend = CPU,
        dtype: str = "float64",
    ) -> None:
        factors = np.asarray(factors, dtype=dtype)
        if factors.ndim != 2 or factors.shape[0] != len(item_ids):
            raise InputError(
                f"factors must be ({len(item_ids)}, rank) for {len(item_ids)} items, "
                f"got shape {factors.shape}"
            )
        if len(set(item_ids)) != len(item_ids):
            raise InputError("item ids of a feature model must be distinct")
        if not np.isfinite(factors).all():
            raise InputError("item factors contain NaN or infinite values")
        self.version = version
        self.rank = factors.shape[1]
        self._item_ids = [str(item) for item in item_ids]
        host = np.hstack([factors, np.ones((len(item_ids), 1), dtype=dtype)])
        self._matrix = backend.asarray(host)
        self._dtype = np.dtype(dtype)

    @property
    def dim(self) -> int:
        return self.rank + 1

    @property
    def item_ids(self) -> Sequence[str]:
        return self._item_ids

    def matrix(self) -> Any:
        return self._matrix

    def cold_vector(self) -> np.ndarray:
        vector = np.zeros(self.dim, dtype=self._dtype)
        vector[-1] = 1.0
        return vector

    @property
    def foldin_coords(self) -> np.ndarray:
        return np.arange(self.rank)

    @property
    def bias_coordinate(self) -> int:
        return self.rank
