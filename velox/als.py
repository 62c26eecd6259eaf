"""Biased alternating least squares: one driver loop over a half-step executor.

Model: ``y = mu + b_i + x_u . v_i + c_u`` with item features ``f(i) = [v_i, 1]``
and user weights ``w_u = [x_u, c_u]``. The loop (:func:`train_als`) owns the
maths that is the same wherever the work runs: the weighted global mean, the
per-row regularisation, the starting factors, the objective and the order of
half-steps. Where each half-step is solved is an :class:`Executor`:
:class:`LocalExecutor` builds the normal equations on the driver
(:func:`velox.kernels.normal_equations`, NumPy or CuPy) and the Spark job's
executor (``batch_jobs.distributed``) runs the same :func:`half_step` in
Spark tasks over blocks of rows. Every engine ends in a
:class:`~velox.trained.TrainedModel`.

* **Regularisation** is scaled by the square root of a row's (weighted)
  rating count: ``lambda_u sqrt(n_u)`` for a user, ``lambda_i sqrt(n_i)`` for
  an item (``regularization_exponent`` 0.5; 0 gives a fixed ``lambda``, 1
  MLlib's linear scaling). The user half-step's ``A_u`` includes its
  regulariser, and the serving tier continues online from exactly these
  statistics, so a trained user keeps the prior strength of its training
  count; a new user starts at ``model.regularization``.
* **Age weights**: with ``forgetting = gamma < 1``, a rating followed by ``k``
  later ratings of the same user weighs ``gamma^k`` (weighted least squares)
  in the user half-step, which is the weight the online update would give
  it. They model a user's drifting tastes, so the item half-step counts
  every rating once: weighing an item's ratings by how much their raters
  rated afterwards starved the items rated early in long sessions (on
  MovieLens in time order a retrain at ``gamma`` 0.99 then lost to none).
* The run **ends with a user half-step**, so the stored user statistics are
  those of the final item features; every stored ``A`` is symmetric by
  construction (:func:`velox.symmetric.symmetrize`).
* **Deterministic**: the ratings are put in one canonical order and every row
  is solved independently, so the same input, parameters and seed give
  bit-identical models whatever the thread count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa

from velox import kernels
from velox.backend import CPU, Backend
from velox.config import TrainConfig
from velox.errors import InputError
from velox.symmetric import symmetrize
from velox.trained import TrainedModel

log = logging.getLogger(__name__)

Progress = Callable[[int, float, float, float], None]
"""Called after each iteration with (iteration, train RMSE, loss, seconds)."""


@dataclass(frozen=True)
class ALSParams:
    """Parameters of biased ALS, validated once; every caller builds them the same way.

    The defaults are ``[train]``'s (:class:`velox.config.TrainConfig`), declared once there.

    >>> ALSParams(rank=0)
    Traceback (most recent call last):
    ...
    velox.errors.InputError: rank must be an integer >= 1, got 0
    """

    rank: int = TrainConfig.rank
    user_regularization: float = TrainConfig.user_regularization
    item_regularization: float = TrainConfig.item_regularization
    regularization_exponent: float = TrainConfig.regularization_exponent
    iterations: int = TrainConfig.iterations
    forgetting: float = TrainConfig.forgetting
    seed: int = TrainConfig.seed

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

    @classmethod
    def from_config(cls, train: TrainConfig) -> ALSParams:
        """The parameters ``[train]`` asks for: what ``velox train``, the demo and
        ``velox serve --bootstrap`` all train with."""
        return cls(
            rank=train.rank,
            user_regularization=train.user_regularization,
            item_regularization=train.item_regularization,
            regularization_exponent=train.regularization_exponent,
            iterations=train.iterations,
            forgetting=train.forgetting,
            seed=train.seed,
        )


def age_weights(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray | None, forgetting: float
) -> np.ndarray:
    """``forgetting^k`` for a rating followed by ``k`` later ratings of its user (ties: by item).

    >>> age_weights(np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([2.0, 1.0, 5.0]), 0.5)
    array([1. , 0.5, 1. ])
    """
    if forgetting == 1.0:
        return np.ones(users.size)
    if timestamps is None:
        raise InputError("age weights (forgetting < 1) need the ratings' timestamps")
    order = np.lexsort((items, timestamps, users))
    counts = np.bincount(users)
    later = np.empty(users.size, dtype=np.int64)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    later[order] = np.repeat(counts, counts) - 1 - (np.arange(order.size) - starts)
    return forgetting**later


@dataclass(frozen=True)
class Ratings:
    """Ratings as dense indices, in canonical (user, item) order: what every half-step reads."""

    users: np.ndarray
    items: np.ndarray
    values: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    timestamps: np.ndarray | None = None
    """Seconds; only needed for age weights."""

    @classmethod
    def from_table(cls, table: pa.Table) -> Ratings:
        """Index an observation table (string ids) densely, ids sorted, rows sorted by ids.

        The row order of ``table`` does not matter: sums over ratings run in
        the canonical order, so a shuffled table trains the same model bit for bit.
        """
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
        keys = (items, users) if ts is None else (ts, items, users)
        order = np.lexsort(keys)
        return cls(
            users[order],
            items[order],
            values[order],
            user_ids.astype(str),
            item_ids.astype(str),
            None if ts is None else ts[order],
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.user_ids.size, self.item_ids.size

    def age_weights(self, forgetting: float) -> np.ndarray:
        """Each rating's age weight (see :func:`age_weights`)."""
        return age_weights(self.users, self.items, self.timestamps, forgetting)


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


def row_regularization(weight: np.ndarray, strength: float, exponent: float) -> np.ndarray:
    """``strength * max(n, 1)^exponent`` per row, ``n`` the row's weighted rating count."""
    return strength * np.maximum(weight, 1.0) ** exponent


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
    per column of the index. ``A`` comes back exactly symmetric.
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
    A = symmetrize(A)
    x = kernels.ridge_solve(A, b)
    return backend.to_numpy(A), backend.to_numpy(b), backend.to_numpy(x)


@dataclass(frozen=True)
class Totals:
    """What the loop needs to know of the ratings before the first half-step."""

    user_weight: np.ndarray
    """Sum of the age weights of each user's ratings."""
    item_weight: np.ndarray
    """Ratings per item (the item half-step does not age them)."""
    user_count: np.ndarray
    """Ratings per user."""
    weighted_sum: float
    """``sum c y`` over all ratings."""

    @property
    def ratings(self) -> int:
        return int(self.user_count.sum())

    @property
    def global_mean(self) -> float:
        """The age-weighted mean rating ``mu``: the one definition every engine uses."""
        return float(self.weighted_sum / self.user_weight.sum())


@dataclass(frozen=True)
class Solved:
    """One half-step's solution: a row's ``x`` (and, when asked, its ``A``, ``b``) and errors."""

    x: np.ndarray
    weighted_error: float
    """``sum c r^2`` over the ratings, ``r`` the residual after the solve."""
    squared_error: float
    """``sum r^2``."""
    gram: np.ndarray | None = None
    rhs: np.ndarray | None = None


class Executor(Protocol):
    """Where the half-steps of one training run are solved.

    ``solve("users", F, offsets, reg, statistics)`` solves each user's ridge
    regression of ``y - offsets[item]`` on the items' features ``F`` (and
    ``"items"`` the other way round), with the per-row regularisation ``reg``.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray

    def totals(self, forgetting: float) -> Totals: ...

    def solve(
        self,
        side: str,
        features: np.ndarray,
        offsets: np.ndarray,
        regularization: np.ndarray,
        statistics: bool,
    ) -> Solved: ...


class LocalExecutor:
    """Half-steps on the driver (NumPy, or CuPy through ``backend``)."""

    def __init__(self, ratings: Ratings, backend: Backend = CPU) -> None:
        self.ratings = ratings
        self.backend = backend
        self.user_ids, self.item_ids = ratings.user_ids, ratings.item_ids
        n_users, n_items = ratings.shape
        self._index = {
            "users": RowIndex.build(ratings.users, ratings.items, n_users),
            "items": RowIndex.build(ratings.items, ratings.users, n_items),
        }
        self._weights = np.ones(ratings.values.size)

    def totals(self, forgetting: float) -> Totals:
        r = self.ratings
        c = self._weights = r.age_weights(forgetting)
        n_users, n_items = r.shape
        return Totals(
            user_weight=np.bincount(r.users, weights=c, minlength=n_users),
            item_weight=np.bincount(r.items, minlength=n_items).astype(np.float64),
            user_count=np.bincount(r.users, minlength=n_users),
            weighted_sum=float(np.sum(c * r.values)),
        )

    def solve(
        self,
        side: str,
        features: np.ndarray,
        offsets: np.ndarray,
        regularization: np.ndarray,
        statistics: bool,
    ) -> Solved:
        r = self.ratings
        if side == "users":
            rows, cols, c = r.users, r.items, self._weights
        else:
            rows, cols, c = r.items, r.users, np.ones(r.values.size)
        targets = r.values - offsets[cols]
        A, b, x = half_step(self._index[side], targets, c, features, regularization, self.backend)
        residual = targets - np.einsum("ij,ij->i", x[rows], features[cols])
        return Solved(
            x,
            float(np.sum(c * residual**2)),
            float(np.sum(residual**2)),
            A if statistics else None,
            b if statistics else None,
        )


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


def with_constant(factors: np.ndarray) -> np.ndarray:
    """Features ``[factors, 1]``: the constant coordinate carries the other side's bias."""
    return np.hstack([factors, np.ones((factors.shape[0], 1))])


def train_als(
    executor: Executor | Ratings,
    params: ALSParams,
    *,
    backend: Backend = CPU,
    init: np.ndarray | None = None,
    progress: Progress | None = None,
) -> TrainedModel:
    """Biased ALS ending with a user half-step, so the user statistics match the final items.

    ``executor`` is where the half-steps run; plain :class:`Ratings` train on
    the driver with ``backend``. ``init`` replaces the seeded starting item
    factors (tests compare modes from the same start); ``progress`` is called
    after every iteration.
    """
    if isinstance(executor, Ratings):
        executor = LocalExecutor(executor, backend)
    check_rank(params.rank, executor.user_ids.size, executor.item_ids.size)
    with kernels.single_threaded_blas():
        return _train(executor, params, init, progress)


def _train(
    executor: Executor,
    params: ALSParams,
    init: np.ndarray | None,
    progress: Progress | None,
) -> TrainedModel:
    rank, n_items = params.rank, executor.item_ids.size
    totals = executor.totals(params.forgetting)
    mu = totals.global_mean
    exponent = params.regularization_exponent
    reg_u = row_regularization(totals.user_weight, params.user_regularization, exponent)
    reg_i = row_regularization(totals.item_weight, params.item_regularization, exponent)
    factors = initial_factors(n_items, rank, params.seed) if init is None else np.asarray(init)
    item_bias = np.zeros(n_items)
    for iteration in range(params.iterations):
        started = time.perf_counter()
        users = executor.solve("users", with_constant(factors), mu + item_bias, reg_u, False)
        w = users.x
        loss = objective(
            users.weighted_error, w, reg_u, np.column_stack([factors, item_bias]), reg_i
        )
        items = executor.solve("items", with_constant(w[:, :rank]), mu + w[:, rank], reg_i, False)
        factors, item_bias = items.x[:, :rank], items.x[:, rank]
        rmse = float(np.sqrt(users.squared_error / totals.ratings))
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
    return finish(executor, totals, factors, item_bias, reg_u)


def finish(
    executor: Executor,
    totals: Totals,
    factors: np.ndarray,
    item_bias: np.ndarray,
    user_regularization: np.ndarray,
) -> TrainedModel:
    """The final user half-step over fixed item features: every user's exact statistics.

    Every engine ends here (MLlib's included), so a trained user continues
    online from the statistics of the features that serve.
    """
    mu = totals.global_mean
    users = executor.solve(
        "users", with_constant(factors), mu + item_bias, user_regularization, True
    )
    return TrainedModel(
        item_ids=executor.item_ids,
        item_factors=factors,
        item_bias=item_bias,
        global_mean=mu,
        user_ids=executor.user_ids,
        user_weights=users.x,
        user_gram=users.gram,
        user_rhs=users.rhs,
        user_count=totals.user_count,
        item_count=totals.item_weight,
        train_rmse=float(np.sqrt(users.squared_error / totals.ratings)),
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
