"""The CPU rank-one update: one fused, compiled pass over each user's state.

NumPy has no way to say "subtract this outer product in place" without
materialising it, so the generic version makes four extra passes over memory
per matrix; this loop reads and writes ``P`` and ``A`` once each and is within
about 2x of a plain copy of the states (``benchmarks/kernels.py``). It
computes exactly the recursion of :func:`velox.kernels.array_api.rank_one_update`.
"""

from __future__ import annotations

import numba
import numpy as np

from velox.errors import InputError
from velox.kernels.array_api import NON_FINITE_FEATURES, NON_FINITE_TARGETS, refit_rows


@numba.njit(cache=True, boundscheck=False)
def _update_rows(P, w, A, b, f, t, gamma, rows, todo, pred, drifted):  # pragma: no cover
    d = f.shape[1]
    u = np.empty(d, dtype=P.dtype)
    inv_gamma = 1.0 / gamma
    for j in todo:
        r = rows[j]
        Pj, Aj, fj, tj, wj, bj = P[r], A[r], f[j], t[j], w[r], b[r]
        # P is symmetric, so P f is a sum of its rows: contiguous, vectorisable.
        u[:] = 0.0
        for m in range(d):
            fm = fj[m]
            for i in range(d):
                u[i] += Pj[m, i] * fm
        quad = 0.0
        p = 0.0
        for i in range(d):
            quad += u[i] * fj[i]
            p += wj[i] * fj[i]
        if not quad >= 0.0:
            drifted[j] = True
            continue
        pred[j] = p
        denom = gamma + quad
        step = (tj - p) / denom
        for i in range(d):
            ki = u[i] / denom
            fi = fj[i]
            if gamma == 1.0:
                for m in range(d):
                    Pj[i, m] -= ki * u[m]
                for m in range(d):
                    Aj[i, m] += fi * fj[m]
                bj[i] += tj * fi
            else:
                for m in range(d):
                    Pj[i, m] = (Pj[i, m] - ki * u[m]) * inv_gamma
                for m in range(d):
                    Aj[i, m] = gamma * Aj[i, m] + fi * fj[m]
                bj[i] = gamma * bj[i] + tj * fi
            wj[i] += u[i] * step


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def fusable(P: np.ndarray, w: np.ndarray, A: np.ndarray, b: np.ndarray) -> bool:
    """Whether the compiled path applies: C-contiguous states of one floating dtype.

    (Observations are cast to the states' dtype by the caller.)
    """
    dtype = P.dtype
    return (
        dtype in _FLOATS
        and w.dtype == dtype
        and A.dtype == dtype
        and b.dtype == dtype
        and P.flags.c_contiguous
        and w.flags.c_contiguous
        and A.flags.c_contiguous
        and b.flags.c_contiguous
    )


@numba.njit(cache=True)
def _update_batch(P, w, A, b, f, t, gamma, rows):  # pragma: no cover - compiled
    """Scan the inputs for non-finite values (status 1: features, 2: targets), then update."""
    batch = f.shape[0]
    pred = np.empty(batch, dtype=P.dtype)
    drifted = np.zeros(batch, dtype=np.bool_)
    if not np.isfinite(f).all():
        return pred, drifted, 1
    if not np.isfinite(t).all():
        return pred, drifted, 2
    _update_rows(P, w, A, b, f, t, gamma, rows, np.arange(batch), pred, drifted)
    return pred, drifted, 0


def rank_one_update(
    P: np.ndarray,
    w: np.ndarray,
    A: np.ndarray,
    b: np.ndarray,
    f: np.ndarray,
    t: np.ndarray,
    gamma: float,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Fused update of state ``rows[j]`` by observation ``j``; drifted states are refit first.

    One compiled call does the whole batch; the rare drifted rows go round again
    after their refit, so the common path costs one dispatch.
    """
    batch = f.shape[0]
    rows = np.arange(batch) if rows is None else np.asarray(rows, dtype=np.int64)
    pred, drifted, status = _update_batch(P, w, A, b, f, t, float(gamma), rows)
    if status:
        raise InputError(NON_FINITE_FEATURES if status == 1 else NON_FINITE_TARGETS)
    if drifted.any():
        again = np.flatnonzero(drifted)
        refit_rows(P, w, A, b, rows[again])
        drifted[:] = False
        _update_rows(P, w, A, b, f, t, float(gamma), rows, again, pred, drifted)
    return pred
