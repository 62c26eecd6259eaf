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

from velox.kernels.array_api import refit_rows


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


def fusable(*arrays: np.ndarray) -> bool:
    """Whether the compiled path applies: C-contiguous arrays of one floating dtype."""
    dtype = arrays[0].dtype
    return dtype in (np.float32, np.float64) and all(
        a.dtype == dtype and a.flags.c_contiguous for a in arrays
    )


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
    """Fused update of state ``rows[j]`` by observation ``j``; drifted states are refit first."""
    batch = f.shape[0]
    rows = np.arange(batch) if rows is None else np.asarray(rows, dtype=np.int64)
    pred = np.empty(batch, dtype=P.dtype)
    drifted = np.zeros(batch, dtype=np.bool_)
    _update_rows(P, w, A, b, f, t, gamma, rows, np.arange(batch), pred, drifted)
    if drifted.any():
        again = np.flatnonzero(drifted)
        refit_rows(P, w, A, b, rows[again])
        drifted[:] = False
        _update_rows(P, w, A, b, f, t, gamma, rows, again, pred, drifted)
    return pred
