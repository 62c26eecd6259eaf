"""Biased alternating least squares over the batched ridge kernels.

The maths the offline trainer needs, written once and called by the Spark job
in both its modes, the demo and the tests: a half-step builds every row's
normal equations from the ratings (:func:`velox.kernels.normal_equations`)
and solves all rows in one batched Cholesky call.

Model: ``y = mu + b_i + x_u . v_i + c_u`` with item features ``f(i) = [v_i, 1]``
and user weights ``w_u = [x_u, c_u]``.

* **Regularisation** is scaled by the square root of a row's (weighted)
  rating count: ``lambda_u sqrt(n_u)`` for a user, ``lambda_i sqrt(n_i)`` for
  an item. On MovieLens 100K this beat both a fixed ``lambda`` and MLlib's
  linear scaling (``benchmarks/RESULTS.md``). The user half-step's ``A_u``
  includes its regulariser, and the serving tier continues online from
  exactly these statistics, so a trained user keeps the prior strength of
  its training count; a new user starts at ``model.regularization``
  (set it to ``lambda_u``).
* **Age weights**: with ``forgetting = gamma < 1``, a rating followed by ``k``
  later ratings of the same user weighs ``gamma^k`` (weighted least squares)
  in both half-steps, which is the weight the online update would give it.
* The run **ends with a user half-step**, so the stored user statistics are
  those of the final item features.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from velox import kernels
from velox.backend import CPU, Backend
from velox.config import ModelConfig
from velox.errors import InputError
from velox.features import MatrixFactorization
from velox.model import OnlineModel

log = logging.getLogger(__name__)

Progress = Callable[[int, float, float, float], None]
"""Called after each iteration with (iteration, train RMSE, loss, seconds)."""


@dataclass(frozen=True)
class ALSParams:
    """Parameters of biased ALS, validated once; every caller passes them the same way.

    >>> ALSParams(rank=0)
    Traceback (most recent call last):
    ...
    velox.errors.InputError: rank must be an integer >= 1, got 0
    """

    rank: int = 10
    user_regularization: float = 1.5
    item_regularization: float = 1.0
    regularization_exponent: float = 0.5
    iterations: int = 15
    forgetting: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "iterations"):
            value = getattr(self, name)
            low = 1 if name == "rank" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("user_regularization", "item_regularization"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.regularization_exponent <= 1:
            raise InputError(
                f"regularization_exponent must be in [0, 1], got {self.regularization_exponent!r}"
            )
        if not 0 < self.forgetting <= 1:
            raise InputError(f"forgetting must be in (0, 1], got {self.forgetting!r}")


@dataclass(frozen=True)
class Ratings:
    """Ratings as dense indices: the form every half-step works on."""

    users: np.ndarray
    items: np.ndarray
    values: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    timestamps: np.ndarray | None = None
    """Seconds; only needed for age weights."""

    @classmethod
    def from_table(cls, table: pa.Table) -> Ratings:
        """Index an observation table (string ids) densely, ids sorted."""
        user_ids, users = np.unique(
            table.column("user").to_numpy(zero_copy_only=False), return_inverse=True
        )
        item_ids, items = np.unique(
            table.column("item").to_numpy(zero_copy_only=False), return_inverse=True
        )
        values = table.column("rating").to_numpy().astype(np.float64)
        ts = None
        if "ts" in table.column_names:
            ts = table.column("ts").cast(pa.int64()).to_numpy().astype(np.float64) / 1e6
        return cls(users, items, values, user_ids.astype(str), item_ids.astype(str), ts)

    @property
    def shape(self) -> tuple[int, int]:
        return self.user_ids.size, self.item_ids.size

    def age_weights(self, forgetting: float) -> np.ndarray:
        """``forgetting^k`` for a rating followed by ``k`` later ratings of its user."""
        if forgetting == 1.0:
            return np.ones(self.values.size)
        if self.timestamps is None:
            raise InputError("age weights (forgetting < 1) need the ratings' timestamps")
        order = np.lexsort((self.items, self.timestamps, self.users))  # ties: by item
        counts = np.bincount(self.users, minlength=self.shape[0])
        later = np.empty(self.values.size, dtype=np.int64)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        later[order] = np.repeat(counts, counts) - 1 - (np.arange(order.size) - starts)
        return forgetting**later


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

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``mu + b_i + w_u . [v_i, 1]`` for id pairs, as a freshly served version would.

        A user the run did not see gets the mean user weights (the serving
        prior), an item it did not see the cold features ``[0, 1]`` and bias 0.
        """
        user_rows = _lookup(self.user_ids, users)
        item_rows = _lookup(self.item_ids, items)
        weights = np.where(
            (user_rows >= 0)[:, None], self.user_weights[user_rows], self.user_weights.mean(axis=0)
        )
        known = item_rows >= 0
        features = np.zeros((len(items), self.item_factors.shape[1] + 1))
        features[:, -1] = 1.0
        features[known, :-1] = self.item_factors[item_rows[known]]
        bias = np.where(known, self.item_bias[item_rows], 0.0)
        return self.global_mean + bias + np.einsum("ij,ij->i", weights, features)


def _lookup(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row of each wanted id in the sorted ``ids`` (as :meth:`Ratings.from_table` makes them)."""
    wanted = np.asarray(wanted).astype(str)
    rows = np.clip(np.searchsorted(ids, wanted), 0, max(ids.size - 1, 0))
    return np.where(ids[rows] == wanted, rows, -1) if ids.size else np.full(wanted.size, -1)


@dataclass(frozen=True)
class RowIndex:
    """The ratings of one side grouped by row (CSR), built once and reused every iteration."""

    indptr: np.ndarray
    cols: np.ndarray
    order: np.ndarray
    """Positions of the ratings, sorted by (row, column)."""

    @classmethod
    def build(cls, rows: np.ndarray, cols: np.ndarray, n_rows: int) -> RowIndex:
        order = np.lexsort((cols, rows))
        counts = np.bincount(rows, minlength=n_rows)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(indptr, cols[order].astype(np.int64), order)


def row_regularization(
    rows: np.ndarray, weights: np.ndarray, n_rows: int, strength: float, exponent: float
) -> np.ndarray:
    """``strength * max(n, 1)^exponent`` per row, ``n`` the row's weighted rating count."""
    counts = np.bincount(rows, weights=weights, minlength=n_rows)
    return strength * np.maximum(counts, 1.0) ** exponent


def half_step(
    index: RowIndex,
    targets: np.ndarray,
    weights: np.ndarray,
    features: np.ndarray,
    regularization: np.ndarray,
    backend: Backend = CPU,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solve ``min_x sum c (t - x.f_col)^2 + reg_row |x|^2`` for every row; (A, b, x) on the host.

    ``targets`` and ``weights`` are in rating order; ``features`` has one row
    per column of the index.
    """
    on = backend.asarray
    A, b = kernels.normal_equations(
        on(index.indptr),
        on(index.cols),
        on(targets[index.order]),
        on(weights[index.order]),
        on(features),
        on(regularization),
    )
    x = kernels.ridge_solve(A, b)
    return backend.to_numpy(A), backend.to_numpy(b), backend.to_numpy(x)


def check_rank(rank: int, n_users: int, n_items: int) -> None:
    """Refuse a rank the data cannot support (more factors than users or items)."""
    if n_users == 0:
        raise InputError("cannot train on an empty set of ratings")
    if rank >= min(n_users, n_items):
        raise InputError(
            f"rank {rank} is larger than the data supports ({n_users} users, {n_items} items); "
            f"use a rank below {min(n_users, n_items)}"
        )


def initial_factors(n_items: int, rank: int, seed: int) -> np.ndarray:
    """The starting item factors every mode uses: N(0, 0.1^2), seeded."""
    return np.random.default_rng(seed).normal(0.0, 0.1, (n_items, rank))


def train_als(
    ratings: Ratings,
    params: ALSParams,
    *,
    backend: Backend = CPU,
    init: np.ndarray | None = None,
    progress: Progress | None = None,
) -> ALSResult:
    """Biased ALS ending with a user half-step, so the user statistics match the final items.

    ``init`` replaces the seeded starting item factors (tests compare modes
    from the same start); ``progress`` is called after every iteration.
    """
    with kernels.single_threaded_blas():
        return _train(ratings, params, backend, init, progress)


def _train(
    ratings: Ratings,
    params: ALSParams,
    backend: Backend,
    init: np.ndarray | None,
    progress: Progress | None,
) -> ALSResult:
    n_users, n_items = ratings.shape
    check_rank(params.rank, n_users, n_items)
    rank = params.rank
    u, i, y = ratings.users, ratings.items, ratings.values
    c = ratings.age_weights(params.forgetting)
    mu = float(np.sum(c * y) / np.sum(c))
    factors = initial_factors(n_items, rank, params.seed) if init is None else np.asarray(init)
    item_bias = np.zeros(n_items)
    by_user, by_item = RowIndex.build(u, i, n_users), RowIndex.build(i, u, n_items)
    exponent = params.regularization_exponent
    reg_u = row_regularization(u, c, n_users, params.user_regularization, exponent)
    reg_i = row_regularization(i, c, n_items, params.item_regularization, exponent)
    for iteration in range(params.iterations + 1):
        started = time.perf_counter()
        item_features = np.hstack([factors, np.ones((n_items, 1))])
        A, b, w = half_step(by_user, y - mu - item_bias[i], c, item_features, reg_u, backend)
        residual = y - mu - item_bias[i] - np.einsum("ij,ij->i", w[u], item_features[i])
        rmse = float(np.sqrt(np.mean(residual**2)))
        if iteration == params.iterations:
            break
        fit = float(np.sum(c * residual**2))
        loss = objective(fit, w, reg_u, np.column_stack([factors, item_bias]), reg_i)
        user_features = np.hstack([w[:, :rank], np.ones((n_users, 1))])
        _, _, solved = half_step(by_item, y - mu - w[u, rank], c, user_features, reg_i, backend)
        factors, item_bias = solved[:, :rank], solved[:, rank]
        seconds = time.perf_counter() - started
        log.info(
            "ALS iteration %d: train RMSE %.4f, loss %.1f (%.2fs)",
            iteration + 1,
            rmse,
            loss,
            seconds,
        )
        if progress is not None:
            progress(iteration + 1, rmse, loss, seconds)
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


def objective(
    fit: float,
    user_weights: np.ndarray,
    user_reg: np.ndarray,
    item_parameters: np.ndarray,
    item_reg: np.ndarray,
) -> float:
    """The loss ALS decreases at every half-step: ``fit`` (weighted squared error) + penalties."""
    penalty = float(np.sum(user_reg * np.sum(user_weights**2, axis=1)))
    return fit + penalty + float(np.sum(item_reg * np.sum(item_parameters**2, axis=1)))


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
