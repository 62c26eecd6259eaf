"""Batched least-squares kernels: one API, the fastest implementation per device.

Every state array is batched over users (or items): ``P, A`` are ``(B, d, d)``,
``w, b, f`` are ``(B, d)``, targets ``t`` are ``(B,)``. Arrays that live on the
GPU (CuPy) run the generic code of :mod:`velox.kernels.array_api`; NumPy arrays
take the compiled single-pass update of :mod:`velox.kernels.cpu` when their
layout allows it. Both compute the same recursion and are tested against the
batch ridge solution. On the CPU the online model applies whole micro-batches
in arrival order through :func:`velox.kernels.stream.apply_stream`, which
runs the same per-state update inside one compiled loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from velox.backend import array_module
from velox.kernels import array_api, cpu, stream
from velox.kernels.array_api import (
    NotPositiveDefiniteError,
    check_update_inputs,
    cholesky,
    diffuse,
    refit_rows,
    ridge_refit,
    scores,
    thompson_sample,
    ucb_bonus,
)
from velox.kernels.cpu import single_threaded_blas

__all__ = [
    "NotPositiveDefiniteError",
    "cholesky",
    "diffuse",
    "normal_equations",
    "rank_one_update",
    "refit_rows",
    "ridge_refit",
    "ridge_solve",
    "scores",
    "single_threaded_blas",
    "thompson_sample",
    "ucb_bonus",
]


def rank_one_update(
    P: Any, w: Any, A: Any, b: Any, f: Any, t: Any, gamma: float = 1.0, rows: Any = None
) -> Any:
    """Apply observation ``(f[j], t[j])`` to state ``rows[j]`` (default ``j``), in place.

    ``rows`` lets a caller update a few states of a large table without
    gathering them first; the rows must be distinct. Validates first (shapes,
    finite values, a non-empty batch, distinct rows) and changes nothing when
    the input is bad. Returns the predictions ``f.w`` made before the update,
    which is what prequential evaluation needs. The recursion is documented in
    :func:`velox.kernels.array_api.rank_one_update`.
    """
    xp = array_module(P)
    f = xp.asarray(f, dtype=P.dtype)
    t = xp.asarray(t, dtype=P.dtype)
    fused = xp is np and cpu.fusable(P, w, A, b)
    check_update_inputs(P, w, A, b, f, t, rows, values=not fused)
    if fused:  # scans for non-finite values itself, before changing anything
        return cpu.rank_one_update(P, w, A, b, f, t, gamma, rows)
    if rows is None:
        return array_api.rank_one_update(P, w, A, b, f, t, gamma)
    sub = P[rows], w[rows], A[rows], b[rows]
    pred = array_api.rank_one_update(*sub, f, t, gamma)
    P[rows], w[rows], A[rows], b[rows] = sub
    return pred


def normal_equations(
    indptr: Any, cols: Any, targets: Any, weights: Any, F: Any, reg: Any
) -> tuple[Any, Any]:
    """Per row of a CSR rating matrix: ``A_r = sum c f f^T + reg_r I``, ``b_r = sum c t f``.

    Rows are users (columns items) in the user half-step of ALS and the other
    way round in the item half-step; ``c`` weighs each rating. NumPy inputs
    take the compiled parallel loop, others the sparse-product form.
    """
    if array_module(F) is np:
        return cpu.normal_equations(indptr, cols, targets, weights, F, reg)
    return array_api.normal_equations(indptr, cols, targets, weights, F, reg)


def ridge_solve(A: Any, b: Any) -> Any:
    """Solve the batch of ridge systems ``A x = b`` (the ALS half-step) through Cholesky.

    NumPy takes a compiled loop (one small Cholesky per row, in parallel);
    other arrays the generic batched form. A matrix that is not positive
    definite raises :class:`NotPositiveDefiniteError` on both.
    """
    if array_module(A) is not np:
        return array_api.ridge_solve(A, b)
    x, ok = cpu.cholesky_solve(A, b)
    if not ok.all():
        raise NotPositiveDefiniteError(
            "a Gram matrix is not positive definite; increase the regularization"
        )
    return x


def warm_up(dtype: str = "float64") -> None:
    """Load the compiled updates (about a second) now, not in the first request.

    >>> warm_up()
    """
    d = 2
    P, A = np.tile(np.eye(d, dtype=dtype), (1, 1, 1)), np.tile(np.eye(d, dtype=dtype), (1, 1, 1))
    w, b = np.zeros((1, d), dtype=dtype), np.zeros((1, d), dtype=dtype)
    rank_one_update(P, w, A, b, np.ones((1, d)), np.ones(1), 1.0, rows=np.zeros(1, dtype=np.int64))
    stream.warm_up(dtype)
