"""Batched least-squares kernels written once against the array namespace (NumPy or CuPy).

A ridge state is ``(P, w, A, b)`` with ``A`` the (forgetting-weighted) Gram
matrix plus the prior, ``b`` the matching right-hand side, ``P = A^-1`` and
``w = P b``. Every function takes a batch: ``P, A`` are ``(B, d, d)``,
``w, b, f`` are ``(B, d)``, ``t`` is ``(B,)``. The namespace (NumPy or CuPy)
is the one that owns the arrays, so the same code serves both devices.

Why both ``P`` and ``A``: the Sherman–Morrison update of ``P`` is O(d^2) but
accumulates rounding; ``A`` and ``b`` are plain sums, exact to the last bit
that matters, so ``P`` and ``w`` can be re-factorised from them (Cholesky)
whenever drift is suspected, and they are what a checkpoint stores.

On the GPU every kernel runs from here. On the CPU the rank-one update runs
from :mod:`velox.kernels.cpu` instead (one fused pass over each state, which
NumPy cannot express without temporaries); this generic version stays its
reference and is tested on both namespaces.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from velox.backend import array_module
from velox.errors import InputError


class NotPositiveDefiniteError(InputError):
    """A Gram matrix is not positive definite, so the ridge system has no unique solution."""


NON_FINITE_FEATURES = "feature vectors contain NaN or infinite values"
NON_FINITE_TARGETS = "targets contain NaN or infinite values"


def all_finite(array: Any) -> bool:
    """Whether every value is finite; one reduction in the common case.

    A NaN or infinity makes the sum non-finite; only when the sum is not
    finite (which huge finite values can also cause) is every element checked.
    """
    if math.isfinite(float(array.sum())):
        return True
    return bool(array_module(array).isfinite(array).all())


def check_update_inputs(
    P: Any, w: Any, A: Any, b: Any, f: Any, t: Any, rows: Any = None, *, values: bool = True
) -> None:
    """Raise :class:`InputError` unless the arrays form one valid batch of updates.

    With ``rows`` the state arrays are a table of ``N`` states and ``rows``
    picks the distinct states that the ``B`` observations update. ``values =
    False`` skips the finiteness scan for a caller that does it itself.
    """
    if f.ndim != 2 or f.shape[0] == 0:
        raise InputError(f"feature batch must be a non-empty (B, d) array, got shape {f.shape}")
    batch, d = f.shape
    states = batch if rows is None else P.shape[0]
    expected = {"P": (states, d, d), "A": (states, d, d), "w": (states, d), "b": (states, d)}
    for name, array in (("P", P), ("A", A), ("w", w), ("b", b)):
        if array.shape != expected[name]:
            raise InputError(
                f"{name} must have shape {expected[name]} for states of dimension {d}, "
                f"got {array.shape}"
            )
    if t.shape != (batch,):
        raise InputError(f"targets must have shape ({batch},), got {t.shape}")
    if values and not all_finite(f):
        raise InputError(NON_FINITE_FEATURES)
    if values and not all_finite(t):
        raise InputError(NON_FINITE_TARGETS)
    if rows is not None:
        rows = np.asarray(rows)
        if rows.shape != (batch,) or rows.dtype.kind not in "iu":
            raise InputError(f"rows must be {batch} integer indices, got {rows.shape} {rows.dtype}")
        if batch and (rows.min() < 0 or rows.max() >= states):
            raise InputError(f"rows must lie in [0, {states}), got {rows.min()}..{rows.max()}")
        if np.unique(rows).size != batch:
            raise InputError("rows must be distinct: apply repeated updates of a state in turn")


def rank_one_update(P: Any, w: Any, A: Any, b: Any, f: Any, t: Any, gamma: float = 1.0) -> Any:
    """Apply one observation ``(f_j, t_j)`` to each state ``j`` of the batch, in place.

    Exponentially weighted recursive least squares::

        A <- gamma A + f f^T          b <- gamma b + t f
        k  = P f / (gamma + f^T P f)  w <- w + k (t - f.w)
        P <- (P - k (P f)^T) / gamma

    Each row must be a different state (apply repeated observations of one
    state in successive calls). A row whose ``P`` has lost positive
    definiteness (``f^T P f < 0``) is re-factorised from ``(A, b)`` before its
    update. Returns the predictions ``f.w`` made *before* the update.
    """
    xp = array_module(P)
    u = xp.matmul(P, f[:, :, None])[:, :, 0]
    quad = xp.einsum("ij,ij->i", f, u)
    drifted = ~(quad >= 0.0)
    if bool(drifted.any()):
        refit_rows(P, w, A, b, xp.nonzero(drifted)[0])
        u = xp.matmul(P, f[:, :, None])[:, :, 0]
        quad = xp.einsum("ij,ij->i", f, u)
    pred = xp.einsum("ij,ij->i", w, f)
    k = u / (quad + gamma)[:, None]
    P -= k[:, :, None] * u[:, None, :]
    w += k * (t - pred)[:, None]
    if gamma != 1.0:
        P /= gamma
        A *= gamma
        b *= gamma
    A += f[:, :, None] * f[:, None, :]
    b += t[:, None] * f
    return pred


def diffuse(P: Any, A: Any, b: Any, coordinate: int, variance: float) -> None:
    """Coordinate ``c`` of each state takes a random-walk step of variance ``q``, in place.

    A Kalman prediction step: the weight does not move, its uncertainty grows::

        P <- P + q e_c e_c^T
        A <- A - s a a^T                  (a = A e_c, s = q / (1 + q a_c): Sherman–Morrison)
        b <- b - s a b_c                  (= A w with the new A, as a.w = b_c)

    ``A`` and ``b`` follow from ``A`` and ``b`` alone, so a state rebuilt from
    a checkpoint takes the same bits as the live one. The online model
    applies it to a user's bias coordinate before each of the user's
    observations: tastes stay, the user's rating level wanders.
    """
    a = A[:, :, coordinate].copy()
    scale = variance / (1.0 + variance * a[:, coordinate])
    bc = b[:, coordinate].copy()
    A -= scale[:, None, None] * (a[:, :, None] * a[:, None, :])  # exactly symmetric
    b -= (scale * bc)[:, None] * a
    P[:, coordinate, coordinate] += variance


def refit_rows(P: Any, w: Any, A: Any, b: Any, rows: Any) -> None:
    """Re-factorise the states at ``rows`` in place from their sufficient statistics."""
    P[rows], w[rows] = ridge_refit(A[rows], b[rows])


def cholesky(A: Any) -> Any:
    """Batched lower Cholesky factor; :class:`NotPositiveDefiniteError` when one does not exist.

    NumPy raises on a non-positive-definite matrix while CuPy returns NaNs, so
    both cases are checked to give the same error on both devices.
    """
    xp = array_module(A)
    try:
        L = xp.linalg.cholesky(A)
    except np.linalg.LinAlgError:
        L = None
    if L is None or not bool(xp.isfinite(L).all()):
        raise NotPositiveDefiniteError(
            "a Gram matrix is not positive definite; increase the regularization"
        )
    return L


def _inverse_cholesky(A: Any) -> Any:
    """``L^-1`` for ``A = L L^T``, so ``A^-1 = L^-T L^-1``."""
    return array_module(A).linalg.inv(cholesky(A))


def ridge_refit(A: Any, b: Any) -> tuple[Any, Any]:
    """Re-factorise ``P = A^-1`` and ``w = A^-1 b`` exactly from the sufficient statistics.

    Through the Cholesky factor ``A = L L^T``: ``P = L^-T L^-1`` is symmetric
    positive definite by construction, which is what later rank-one updates need.
    """
    L_inv = _inverse_cholesky(A)
    L_inv_t = L_inv.transpose(0, 2, 1)
    P = L_inv_t @ L_inv
    return P, _apply(L_inv, L_inv_t, b)


def ridge_solve(A: Any, b: Any) -> Any:
    """Solve the batch of ridge systems ``A x = b`` (the ALS half-step) through Cholesky.

    Only the solution: unlike :func:`ridge_refit` it never forms ``A^-1``.
    """
    L_inv = _inverse_cholesky(A)
    return _apply(L_inv, L_inv.transpose(0, 2, 1), b)


def _apply(L_inv: Any, L_inv_t: Any, b: Any) -> Any:
    return (L_inv_t @ (L_inv @ b[:, :, None]))[:, :, 0]


def scores(W: Any, F: Any) -> Any:
    """``W F^T``: the linear part of the prediction for B users over n items, ``(B, n)``."""
    return W @ F.T


def ucb_bonus(P: Any, F: Any) -> Any:
    """LinUCB width ``sqrt(f^T P f)`` of each of n items for each of B users, ``(B, n)``."""
    xp = array_module(P)
    quad = xp.einsum("bnd,nd->bn", xp.matmul(F[None, :, :], P), F)
    return xp.sqrt(xp.maximum(quad, 0.0))


def thompson_sample(w: Any, P: Any, scale: float, rng: Any) -> Any:
    """Draw one weight vector per user from ``N(w, scale^2 P)``.

    ``P`` is symmetrised first: rounding in the rank-one updates can leave it a
    few ulps from symmetric, which Cholesky would otherwise misread.
    """
    xp = array_module(P)
    L = cholesky(0.5 * (P + P.transpose(0, 2, 1)))
    z = rng.standard_normal(w.shape, dtype=w.dtype)
    return w + scale * xp.matmul(L, z[:, :, None])[:, :, 0]


def normal_equations(
    indptr: Any, cols: Any, targets: Any, weights: Any, F: Any, reg: Any, chunk: int = 4096
) -> tuple[Any, Any]:
    """The ALS normal equations per row of a CSR rating matrix, on any device.

    ``A_r = sum c f f^T + reg_r I`` and ``b_r = sum c t f``, as sparse-times-
    dense products (SciPy on NumPy, cuSPARSE through CuPy) against the columns'
    flattened outer products, ``chunk`` columns at a time to bound memory.
    """
    xp = array_module(F)
    sparse = _sparse_module(xp)
    n_rows, (n_cols, d) = indptr.shape[0] - 1, F.shape
    S = sparse.csr_matrix((weights, cols, indptr), shape=(n_rows, n_cols))
    A = xp.zeros((n_rows, d * d), dtype=F.dtype)
    for start in range(0, n_cols, chunk):
        part = F[start : start + chunk]
        outer = (part[:, :, None] * part[:, None, :]).reshape(part.shape[0], d * d)
        A += S[:, start : start + chunk] @ outer
    A = A.reshape(n_rows, d, d) + reg[:, None, None] * xp.eye(d, dtype=F.dtype)
    b = sparse.csr_matrix((weights * targets, cols, indptr), shape=(n_rows, n_cols)) @ F
    return A, xp.asarray(b)


def _sparse_module(xp: Any) -> Any:
    if xp is np:
        import scipy.sparse

        return scipy.sparse
    import cupyx.scipy.sparse

    return cupyx.scipy.sparse
