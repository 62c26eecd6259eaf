"""A micro-batch of observations applied in arrival order, in one compiled call (CPU).

Real feedback comes in bursts from one user, so a batch applied in "rounds"
(each user at most once per kernel call) pays Python overhead once per
round: about 45 rounds for a batch of 64 from a time-ordered MovieLens
stream. This loop applies the whole batch observation by observation
instead, so it costs the same whatever the order of the users, and every
observation sees the state the previous one left:

1. ``f(i)``: the item's features, or for an item the feature model does not
   know, the cold base vector with its fold-in coordinates as they stand;
2. the prediction ``mu + b_i + w_u . f(i)`` and the user's target
   ``t = y - mu - b_i``;
3. the user's rank-one update (:func:`velox.kernels.cpu.apply_gain`, the
   recursion of :func:`velox.kernels.array_api.rank_one_update`), after the
   user's bias coordinate has taken its random-walk step when the table has
   one (:func:`velox.kernels.cpu.diffuse`, the step of
   :func:`velox.kernels.array_api.diffuse`);
4. ``mu`` takes ``y`` in and ``b_i`` the residual ``y - mu - w_u . f(i)``
   (the formulas of :mod:`velox.biases`);
5. an unknown item's fold-in state takes the user's pre-update weights in.

Replay (``replay = True``) runs the same loop on recorded targets,
residuals and fold-in inputs instead of computing them, so a log rebuilds
the states with the same arithmetic. The loop stops, with the state
consistent, whenever a state needs re-factorising (its ``P`` drifted, or its
update count reached the table's interval); :func:`apply_stream` refits it
with :func:`velox.kernels.array_api.refit_rows` and calls again from there.

The compiled loop itself is :func:`velox.kernels.cpu.in_order`, in the file
of the per-state update it calls: Numba's cache notices only changes to the
file of the function it caches, so a loop kept here would run a stale update
after an edit there.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from velox.kernels import cpu
from velox.kernels.array_api import refit_rows


class Ridge(NamedTuple):
    """The arrays of a table of ridge states that the loop updates in place, and its rules."""

    P: np.ndarray
    w: np.ndarray
    A: np.ndarray
    b: np.ndarray
    count: np.ndarray
    updated: np.ndarray
    forgetting: float
    refactor_interval: int
    walk: float = 0.0
    """Variance of the random walk ``walk_coordinate`` takes before each update (0: none)."""
    walk_coordinate: int = 0


class Biases(NamedTuple):
    """The online biases' arrays (see :class:`velox.biases.OnlineBiases`), updated in place."""

    totals: np.ndarray
    """``[sum of ratings, count]`` of the global mean, its prior included."""
    prior: np.ndarray
    weight: np.ndarray
    """Per item, the pseudo-count of its prior bias."""
    sums: np.ndarray
    counts: np.ndarray


class Rows(NamedTuple):
    """Per observation: where its user, item features, fold-in and bias live."""

    user: np.ndarray
    feature: np.ndarray
    """Row in the feature matrix; unused where ``fold`` is set."""
    fold: np.ndarray
    """Row in the fold-in table for an item the feature model does not know, else -1."""
    bias: np.ndarray


class Effects(NamedTuple):
    """Per observation, what applying it used: outputs live, inputs on replay.

    ``cold_features``, ``foldin_inputs`` and ``foldin_targets`` are meaningful
    only at the positions of unknown items.
    """

    predictions: np.ndarray
    targets: np.ndarray
    residuals: np.ndarray
    cold_features: np.ndarray
    foldin_inputs: np.ndarray
    foldin_targets: np.ndarray

    @classmethod
    def empty(cls, n: int, dim: int, free: int) -> Effects:
        """Zeroed outputs for ``n`` observations of ``dim`` features, ``free`` of them folded in."""
        per_observation = np.zeros((3, n))
        return cls(*per_observation, np.zeros((n, dim)), np.zeros((n, free)), np.zeros(n))


def apply_stream(
    users: Ridge,
    items: Ridge,
    biases: Biases,
    rows: Rows,
    features: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    ratings: np.ndarray,
    when: np.ndarray,
    effects: Effects,
    *,
    replay: bool = False,
    skip_user: np.ndarray | None = None,
) -> None:
    """Apply ``ratings`` in order (see the module docstring); fills ``effects`` unless ``replay``.

    ``features`` is ``(F, cold base vector, fold-in coordinates, the other
    coordinates)``. ``skip_user`` marks positions whose user state already
    includes them (replay after a checkpoint): they change only the biases
    and fold-ins. Inputs are the caller's to validate; nothing here raises on
    values.
    """
    skip = np.zeros(ratings.size, dtype=np.bool_) if skip_user is None else skip_user
    start, trusted = 0, -1
    while start < ratings.size:
        after, user_row, item_row = cpu.in_order(
            *users, *items, *biases, *rows, *features, ratings, when, skip, replay,
            *effects, start, trusted,
        )  # fmt: skip
        for table, row in ((users, user_row), (items, item_row)):
            if row >= 0:
                refit_rows(table.P, table.w, table.A, table.b, np.array([row]))
        trusted = after if after == start else -1  # a refit state is not checked twice
        start = after


def warm_up(dtype: Any = "float64") -> None:
    """Compile (or load from the cache) the loop for ``dtype`` states now, not in a request."""

    def table(d: int) -> Ridge:
        eye = np.eye(d, dtype=dtype)[None]
        zeros = np.zeros((1, d), dtype=dtype)
        return Ridge(eye.copy(), zeros, eye.copy(), zeros.copy(), np.zeros(1, np.int64),
                     np.zeros(1), 1.0, 1000)  # fmt: skip

    row = np.zeros(1, dtype=np.int64)
    apply_stream(
        table(2),
        table(1),
        Biases(np.array([3.0, 1.0]), np.zeros(1), np.ones(1), np.zeros(1), np.zeros(1)),
        Rows(row, row, row - 1, row),
        (np.ones((1, 2), dtype=dtype), np.ones(2, dtype=dtype), row.copy(), row + 1),
        np.ones(1),
        np.zeros(1),
        Effects.empty(1, 2, 1),
    )
