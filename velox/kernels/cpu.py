"""The CPU rank-one update: one fused, compiled pass over each user's state.

NumPy has no way to say "subtract this outer product in place" without
materialising it, so the generic version makes four extra passes over memory
per matrix; this loop reads and writes ``P`` and ``A`` once each and is within
about 2x of a plain copy of the states (``benchmarks/kernels.py``). It
computes exactly the recursion of :func:`velox.kernels.array_api.rank_one_update`.

The per-state steps (:func:`project`, :func:`apply_gain`) serve two loops:
the batch of distinct states here, and :func:`in_order`, the online model's
micro-batch in arrival order (:mod:`velox.kernels.stream`).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from velox.errors import InputError
from velox.kernels.array_api import NON_FINITE_FEATURES, NON_FINITE_TARGETS, refit_rows


@numba.njit(cache=True, boundscheck=False)
def project(P, f, u):  # pragma: no cover - compiled
    """``u = P f`` into ``u``; returns ``f^T P f`` (negative only when ``P`` has drifted)."""
    d = f.shape[0]
    # P is symmetric, so P f is a sum of its rows: contiguous, vectorisable.
    u[:] = 0.0
    for m in range(d):
        fm = f[m]
        for i in range(d):
            u[i] += P[m, i] * fm
    quad = 0.0
    for i in range(d):
        quad += u[i] * f[i]
    return quad


@numba.njit(cache=True, boundscheck=False)
def apply_gain(P, w, A, b, f, t, gamma, u, quad):  # pragma: no cover - compiled
    """One observation ``(f, t)`` into one state, given ``u = P f`` and ``quad = f^T P f``.

    Returns the prediction ``f . w`` made before the update.
    """
    d = f.shape[0]
    p = 0.0
    for i in range(d):
        p += w[i] * f[i]
    inv_gamma = 1.0 / gamma
    denom = gamma + quad
    step = (t - p) / denom
    for i in range(d):
        ki = u[i] / denom
        fi = f[i]
        if gamma == 1.0:
            for m in range(d):
                P[i, m] -= ki * u[m]
            for m in range(d):
                A[i, m] += fi * f[m]
            b[i] += t * fi
        else:
            for m in range(d):
                P[i, m] = (P[i, m] - ki * u[m]) * inv_gamma
            for m in range(d):
                A[i, m] = gamma * A[i, m] + fi * f[m]
            b[i] = gamma * b[i] + t * fi
        w[i] += u[i] * step
    return p


@numba.njit(cache=True, boundscheck=False)
def _update_rows(P, w, A, b, f, t, gamma, rows, todo, pred, drifted):  # pragma: no cover
    u = np.empty(f.shape[1], dtype=P.dtype)
    for j in todo:
        r = rows[j]
        quad = project(P[r], f[j], u)
        if not quad >= 0.0:
            drifted[j] = True
            continue
        pred[j] = apply_gain(P[r], w[r], A[r], b[r], f[j], t[j], gamma, u, quad)


@numba.njit(cache=True, boundscheck=False)
def diffuse(P, A, b, c, q, f, u, quad, column):  # pragma: no cover - compiled
    """Coordinate ``c`` of one state takes a random-walk step of variance ``q``.

    The recursion of :func:`velox.kernels.array_api.diffuse`: ``P`` grows by
    ``q`` at ``(c, c)``; ``A`` and ``b`` follow from ``A`` and ``b`` alone, so
    they come out the same bits whether ``P, w`` were refit or not. ``u = P f``
    and ``quad = f^T P f``, computed before, are brought up to date; the new
    ``quad`` is returned. ``column`` is scratch space of length ``d``.
    """
    d = b.shape[0]
    scale = q / (1.0 + q * A[c, c])
    bc = b[c]
    for m in range(d):
        column[m] = A[c, m]
    for i in range(d):  # scale * (a_i a_m): the same bits at (i, m) and (m, i), A stays symmetric
        for m in range(d):
            A[i, m] -= scale * (column[i] * column[m])
        b[i] -= scale * column[i] * bc
    P[c, c] += q
    u[c] += q * f[c]
    return quad + q * f[c] * f[c]


@numba.njit(cache=True, boundscheck=False)
def _copy(source, target):  # pragma: no cover - compiled
    for m in range(source.size):
        target[m] = source[m]


@numba.njit(cache=True, boundscheck=False, nogil=True)
def in_order(  # the compiled loop takes its arrays flat  # pragma: no cover
    UP, Uw, UA, Ub, Ucount, Uupdated, Ugamma, Uinterval, Uwalk, Ucoordinate,
    IP, Iw, IA, Ib, Icount, Iupdated, Igamma, Iinterval, Iwalk, Icoordinate,
    totals, prior, weight, sums, counts,
    user_rows, feature_rows, fold_rows, bias_rows,
    F, base, free, fixed, y, when, skip_user, replay,
    predictions, targets, residuals, cold_features, foldin_inputs, foldin_targets,
    start, trusted,
):  # fmt: skip
    """A batch in arrival order (:mod:`velox.kernels.stream` says what and why).

    Returns ``(next position, user row to refit, fold-in row to refit)``, -1 for none.
    It runs without the GIL (callers hold their model's lock): a candidate version
    catching up with the log in a thread would otherwise stall the event loop's
    reads and commits for the length of each chunk it applies.
    """
    d, k = F.shape[1], free.size
    f = np.empty(d, dtype=UP.dtype)
    x = np.empty(k, dtype=UP.dtype)
    u = np.empty(d, dtype=UP.dtype)
    v = np.empty(k, dtype=UP.dtype)
    g = np.empty(d, dtype=UP.dtype)
    cast = np.empty(2, dtype=UP.dtype)  # targets in the states' dtype, as the kernels take them
    for j in range(start, y.size):
        r, c, q = user_rows[j], fold_rows[j], bias_rows[j]
        if c < 0:
            _copy(F[feature_rows[j]], f)
        elif replay:
            _copy(cold_features[j], f)
        else:
            _copy(base, f)
            for m in range(k):
                f[free[m]] = Iw[c, m]
        mu = totals[0] / totals[1]
        bias = (weight[q] * prior[q] + sums[q]) / max(weight[q] + counts[q], 1e-12)
        t = targets[j] if replay else y[j] - mu - bias
        user = not skip_user[j]
        quad_u = project(UP[r], f, u) if user else 0.0
        quad_i = 0.0
        if c >= 0:
            if replay:
                _copy(foldin_inputs[j], x)
            else:
                fixed_part = 0.0
                for m in range(fixed.size):
                    fixed_part += Uw[r, fixed[m]] * base[fixed[m]]
                for m in range(k):
                    x[m] = Uw[r, free[m]]
                _copy(f, cold_features[j])
                _copy(x, foldin_inputs[j])
                foldin_targets[j] = t - fixed_part
            cast[1] = foldin_targets[j]
            quad_i = project(IP[c], x, v)
        if j != trusted:  # a drifted state is refit before anything of this observation changes
            drift_u = user and not quad_u >= 0.0
            drift_i = c >= 0 and not quad_i >= 0.0
            if drift_u or drift_i:
                return j, r if drift_u else -1, c if drift_i else -1
        linear = 0.0
        if user:
            if Uwalk > 0.0:  # (fold-ins take no walk)
                quad_u = diffuse(UP[r], UA[r], Ub[r], Ucoordinate, Uwalk, f, u, quad_u, g)
            cast[0] = t
            linear = apply_gain(UP[r], Uw[r], UA[r], Ub[r], f, cast[0], Ugamma, u, quad_u)
            Ucount[r] += 1
            Uupdated[r] = when[j]
        if not replay:
            predictions[j] = mu + bias + linear
            targets[j] = t
            residuals[j] = y[j] - mu - linear
        totals[0] += y[j]
        totals[1] += 1.0
        sums[q] += residuals[j]
        counts[q] += 1.0
        due_i = False
        if c >= 0:
            apply_gain(IP[c], Iw[c], IA[c], Ib[c], x, cast[1], Igamma, v, quad_i)
            Icount[c] += 1
            Iupdated[c] = when[j]
            due_i = Icount[c] % Iinterval == 0
        due_u = user and Ucount[r] % Uinterval == 0
        if due_u or due_i:
            return j + 1, r if due_u else -1, c if due_i else -1
    return y.size, -1, -1


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


@numba.njit(cache=True, parallel=True, fastmath=True, boundscheck=False)
def _normal_equations(indptr, cols, targets, weights, F, reg, A, b):  # pragma: no cover
    d = F.shape[1]
    for r in numba.prange(indptr.size - 1):
        first, n = indptr[r], indptr[r + 1] - indptr[r]
        G = np.empty((n, d))  # the row's feature vectors, and the same weighted
        Gc = np.empty((n, d))
        for k in range(n):
            c = weights[first + k]
            for m in range(d):
                value = F[cols[first + k], m]
                G[k, m] = value
                Gc[k, m] = c * value
        if n:
            A[r] = G.T @ Gc  # one BLAS product per row
        else:
            A[r] = 0.0
        for m in range(d):
            total = 0.0
            for k in range(n):
                total += Gc[k, m] * targets[first + k]
            b[r, m] = total
            A[r, m, m] += reg[r]


def normal_equations(
    indptr: np.ndarray,
    cols: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    F: np.ndarray,
    reg: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """``A_r = sum c f f^T + reg_r I`` and ``b_r = sum c t f`` per row of a CSR rating matrix.

    Compiled and parallel over rows: each row gathers its ratings' feature
    vectors and forms ``G^T diag(c) G`` with one BLAS product (faster than a
    scalar loop over the upper triangle, which does not vectorise), where the
    sparse-product form needs an ``(n_cols, d^2)`` table of outer products.
    """
    n, d = indptr.size - 1, F.shape[1]
    A = np.empty((n, d, d))
    b = np.empty((n, d))
    _normal_equations(indptr, cols, targets, weights, np.ascontiguousarray(F), reg, A, b)
    return A, b


def single_threaded_blas() -> Any:
    """A context in which BLAS runs on one thread, for loops whose compiled threads call BLAS.

    A threaded BLAS under the threads of :func:`normal_equations` leaves its
    workers spinning on the same cores and competing with them. (Looked up at
    each call: the BLAS that
    compiled code calls is SciPy's, which may load after this module.)
    """
    return threadpool_limits(limits=1, user_api="blas")


@numba.njit(cache=True, parallel=True, fastmath=True, boundscheck=False)
def _cholesky_solve(A, b, x, ok):  # pragma: no cover - compiled
    n, d = b.shape
    for r in numba.prange(n):
        L = np.empty((d, d))
        y = np.empty(d)
        ok[r] = True
        for j in range(d):  # Cholesky-Banachiewicz, lower triangle
            for i in range(j, d):
                s = A[r, i, j]
                for k in range(j):
                    s -= L[i, k] * L[j, k]
                if i == j:
                    if not s > 0.0:
                        ok[r] = False
                        s = 1.0
                    L[j, j] = np.sqrt(s)
                else:
                    L[i, j] = s / L[j, j]
        for i in range(d):  # L y = b
            s = b[r, i]
            for k in range(i):
                s -= L[i, k] * y[k]
            y[i] = s / L[i, i]
        for i in range(d - 1, -1, -1):  # L^T x = y
            s = y[i]
            for k in range(i + 1, d):
                s -= L[k, i] * x[r, k]
            x[r, i] = s / L[i, i]


def cholesky_solve(A: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Solve ``A_r x_r = b_r`` for every row through its Cholesky factor; (x, positive definite).

    Compiled and parallel over rows: LAPACK per small matrix spends more time
    in dispatch than in arithmetic at ALS sizes (d around 10 to 100).
    """
    x = np.empty_like(b, dtype=np.float64)
    ok = np.empty(b.shape[0], dtype=np.bool_)
    _cholesky_solve(np.ascontiguousarray(A, np.float64), np.ascontiguousarray(b, np.float64), x, ok)
    return x, ok
