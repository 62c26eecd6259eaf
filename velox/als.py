"""Biased alternating least squares over the batched ridge kernels.

The maths the offline trainer needs, written once: a half-step builds every
row's Gram matrix and right-hand side from the ratings and solves all rows in
one batched Cholesky call. The user half-step uses exactly the online prior
(``A_u = lambda I + sum f f^T``, ``b_u = sum t f`` with zero prior mean), so a
served model continues online from the trained statistics bit for bit.

Model: ``y = mu + b_i + x_u . v_i + c_u`` with item features ``f(i) = [v_i, 1]``
and user weights ``w_u = [x_u, c_u]``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from velox import kernels
from velox.backend import CPU, Backend
from velox.config import ModelConfig
from velox.errors import InputError
from velox.features import MatrixFactorization
from velox.model import OnlineModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ratings:
    """Ratings as dense indices: the form every half-step works on."""

    users: np.ndarray
    items: np.ndarray
    values: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray

    @classmethod
    def from_table(cls, table: pa.Table) -> Ratings:
        """Index an observation table (string ids) densely."""
        user_ids, users = np.unique(
            table.column("user").to_numpy(zero_copy_only=False), return_inverse=True
        )
        item_ids, items = np.unique(
            table.column("item").to_numpy(zero_copy_only=False), return_inverse=True
        )
        values = table.column("rating").to_numpy().astype(np.float64)
        return cls(users, items, values, user_ids.astype(str), item_ids.astype(str))


@dataclass(frozen=True)
class ALSResult:
    """A trained model: item features and biases, and each user's sufficient statistics."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    global_mean: float
    item_factors: np.ndarray
    item_bias: np.ndarray
    user_weights: np.ndarray
    user_gram: np.ndarray
    user_rhs: np.ndarray
    user_count: np.ndarray
    train_rmse: float


def half_step(
    rows: np.ndarray,
    cols: np.ndarray,
    targets: np.ndarray,
    n_rows: int,
    features: np.ndarray,
    regularization: float,
    backend: Backend = CPU,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solve ``min_x sum (t - x.f_col)^2 + lambda |x|^2`` for every row; returns (A, b, x).

    Gram matrices come from one sparse-times-dense product with the items'
    flattened outer products, so no per-rating ``d x d`` array is materialised.
    """
    n_cols, d = features.shape
    incidence = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n_rows, n_cols))
    outer = (features[:, :, None] * features[:, None, :]).reshape(n_cols, d * d)
    A = np.asarray(incidence @ outer).reshape(n_rows, d, d)
    A += regularization * np.eye(d)
    weighted = sp.csr_matrix((targets, (rows, cols)), shape=(n_rows, n_cols))
    b = np.asarray(weighted @ features)
    x = backend.to_numpy(kernels.ridge_solve(backend.asarray(A), backend.asarray(b)))
    return A, b, x


def train_als(
    ratings: Ratings,
    *,
    rank: int,
    user_regularization: float,
    item_regularization: float,
    iterations: int = 10,
    seed: int = 0,
    backend: Backend = CPU,
) -> ALSResult:
    """Biased ALS ending with a user half-step, so the user statistics match the final items."""
    if ratings.values.size == 0:
        raise InputError("cannot train on an empty set of ratings")
    rng = np.random.default_rng(seed)
    n_users, n_items = ratings.user_ids.size, ratings.item_ids.size
    mu = float(ratings.values.mean())
    factors = rng.normal(0.0, 0.1, (n_items, rank))
    item_bias = np.zeros(n_items)
    u, i, y = ratings.users, ratings.items, ratings.values
    for iteration in range(iterations + 1):
        started = time.perf_counter()
        item_features = np.hstack([factors, np.ones((n_items, 1))])
        A, b, w = half_step(
            u, i, y - mu - item_bias[i], n_users, item_features, user_regularization, backend
        )
        residual = y - mu - item_bias[i] - np.einsum("ij,ij->i", w[u], item_features[i])
        rmse = float(np.sqrt(np.mean(residual**2)))
        if iteration == iterations:
            break
        user_features = np.hstack([w[:, :rank], np.ones((n_users, 1))])
        _, _, solved = half_step(
            i, u, y - mu - w[u, rank], n_items, user_features, item_regularization, backend
        )
        factors, item_bias = solved[:, :rank], solved[:, rank]
        log.info(
            "ALS iteration %d: train RMSE %.4f (%.2fs)",
            iteration + 1,
            rmse,
            time.perf_counter() - started,
        )
    return ALSResult(
        user_ids=ratings.user_ids,
        item_ids=ratings.item_ids,
        global_mean=mu,
        item_factors=factors,
        item_bias=item_bias,
        user_weights=w,
        user_gram=A,
        user_rhs=b,
        user_count=np.bincount(u, minlength=n_users),
        train_rmse=rmse,
    )


def online_model(
    result: ALSResult, *, version: str, config: ModelConfig | None = None, backend: Backend = CPU
) -> OnlineModel:
    """The online model that continues exactly from a training run's final statistics."""
    config = config or ModelConfig(rank=result.item_factors.shape[1])
    features = MatrixFactorization(
        result.item_ids, result.item_factors, version=version, backend=backend, dtype=config.dtype
    )
    model = OnlineModel(
        features,
        global_mean=result.global_mean,
        item_bias=result.item_bias,
        train_count=int(result.user_count.sum()),
        config=config,
        backend=backend,
    )
    model.load_users(result.user_ids, result.user_gram, result.user_rhs, result.user_count)
    return model
