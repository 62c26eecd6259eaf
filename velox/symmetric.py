"""Stacks of symmetric matrices packed to their upper triangle, row by row.

Every place that stores a user's Gram matrix ``A`` (the online store's
records, the registry's ``users.parquet``, the rows a Spark task returns)
keeps only its ``d(d+1)/2`` upper-triangle values. A stack that went in
exactly symmetric comes back bit for bit, which is why the trainers make
``A`` symmetric by construction (:func:`symmetrize`) before anything stores it.

>>> A = np.array([[[2.0, 1.0], [1.0, 3.0]]])
>>> pack_upper(A).tolist()
[[2.0, 1.0, 3.0]]
>>> bool((unpack_upper(pack_upper(A), 2) == A).all())
True
"""

from __future__ import annotations

from functools import cache

import numpy as np


@cache
def upper_indices(d: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of a ``d x d`` upper triangle, row by row."""
    return np.triu_indices(d)


def packed_size(d: int) -> int:
    """Values in the packed upper triangle of a ``d x d`` matrix."""
    return d * (d + 1) // 2


def pack_upper(A: np.ndarray) -> np.ndarray:
    """``(n, d, d)`` -> ``(n, d(d+1)/2)``: each matrix's upper triangle, row by row."""
    rows, cols = upper_indices(A.shape[-1])
    return A[:, rows, cols]


def unpack_upper(packed: np.ndarray, d: int, dtype: type = np.float64) -> np.ndarray:
    """``(n, d(d+1)/2)`` -> the full symmetric ``(n, d, d)`` stack."""
    rows, cols = upper_indices(d)
    A = np.empty((packed.shape[0], d, d), dtype=dtype)
    A[:, rows, cols] = packed
    A[:, cols, rows] = packed
    return A


def symmetrize(A: np.ndarray) -> np.ndarray:
    """Copy each matrix's upper triangle onto its lower one, in place; returns ``A``.

    Products like ``F^T diag(c) F`` computed by BLAS differ between the two
    triangles in the last bits; storing only one triangle would then change
    the state. After this the stored triangle is the whole matrix.
    """
    rows, cols = upper_indices(A.shape[-1])
    A[..., cols, rows] = A[..., rows, cols]
    return A
