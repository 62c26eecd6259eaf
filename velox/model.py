"""The per-user online model: ``score(u, i) = mu + b_i + w_u . f(i)``.

This is the pure-Python API the serving tier calls with micro-batches:
:meth:`OnlineModel.observe_many` (predict-then-learn, exact per-user ridge),
:meth:`OnlineModel.predict` and :meth:`OnlineModel.topk`.

Order of one observation ``(u, i, y)``:

1. the prediction ``mu + b_i + w_u . f(i)`` is recorded (prequential error);
2. the user's ridge state is updated with target ``t = y - mu - b_i`` (the
   values as they stand), after the user's bias coordinate has taken its
   random-walk step (``model.bias_drift``: a user's rating level wanders
   within a session while tastes stay; see :func:`velox.kernels.diffuse`);
3. ``mu`` and ``b_i`` take the observation in (see :mod:`velox.biases`);
4. if the feature model does not know ``i``, the item's fold-in state takes
   the user's pre-update weights in, so its features improve.

On the CPU a batch is applied in arrival order, observation by observation,
in one compiled call (:func:`velox.kernels.stream.apply_stream`): each
observation sees the ``mu``, ``b_i``, user state and fold-in features that
the previous one left. The result is therefore the same however a stream is
cut into batches, and a batch costs the same whatever the order of its
users. (Before, observations of one round shared the round's ``mu`` and
``b_i``; real streams come in bursts from one user, which made a batch of 64
cost some 45 rounds of Python.)

On the GPU (CuPy) a batch is applied in "rounds", each user at most once per
kernel call, where one call over many users pays: a user's observations are
still applied in arrival order, but the biases and fold-in features are read
at the start of each round, so observations in the same round share ``mu``
and ``b_i``.

Everything these steps used that depended on the model's state is returned in
an :class:`Applied` record, which the log stores and :meth:`OnlineModel.replay`
applies again after a crash or when a version is installed: on the CPU through
the same compiled loop, so a log rebuilds every state bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from velox import kernels
from velox.api import EXPLORE_MODES, Explore, normalize_ids
from velox.backend import CPU, Backend
from velox.biases import OnlineBiases
from velox.config import ModelConfig
from velox.errors import InputError
from velox.features import FeatureModel
from velox.kernels.stream import Effects, Rows, apply_stream
from velox.state import RidgeTable


@dataclass(frozen=True)
class Applied:
    """A batch of observations and exactly what applying them did, in input order.

    It is both what :meth:`OnlineModel.observe_many` returns and what
    :meth:`OnlineModel.replay` takes: the log records it, so a state can be
    rebuilt from a checkpoint without recomputing anything that depended on
    the model's state at the time (``mu``, ``b_i``, folded-in features).
    """

    version: str
    users: list[str]
    items: list[str]
    ratings: np.ndarray
    timestamps: np.ndarray
    predictions: np.ndarray
    """The model's prediction just before the observation was applied."""
    targets: np.ndarray
    """``y - mu - b_i`` as applied to the user's state."""
    residuals: np.ndarray
    """``y - mu - w_u . f(i)`` before the update, as applied to the item bias."""
    cold: np.ndarray
    """Whether the item is unknown to the feature model (folded in online)."""
    cold_features: np.ndarray
    """``f(i)`` used for each cold observation (rows follow ``flatnonzero(cold)``)."""
    foldin_inputs: np.ndarray
    """The rater's pre-update weights on the fold-in coordinates, per cold observation."""
    foldin_targets: np.ndarray
    """The fold-in regression target, per cold observation."""

    def __len__(self) -> int:
        return len(self.users)

    def recorded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predictions, targets and residuals: what every observation records."""
        return self.predictions, self.targets, self.residuals


@dataclass(frozen=True)
class Prediction:
    """Scores of a user for a list of items."""

    items: list[str]
    scores: np.ndarray
    cold: np.ndarray


@dataclass(frozen=True)
class UserState:
    """A user's online state, on the host."""

    user: str
    weights: np.ndarray
    covariance: np.ndarray
    observations: int
    version: str
    last_update: float
    known: bool


def _rounds(keys: Sequence[str]) -> list[np.ndarray]:
    """Positions grouped so that each key appears at most once per group, in arrival order.

    The GPU path's unit of work: one kernel call updates many states at once.
    """
    if len(set(keys)) == len(keys):
        return [np.arange(len(keys))]
    seen: dict[str, int] = {}
    occurrence = np.empty(len(keys), dtype=np.int64)
    for position, key in enumerate(keys):
        occurrence[position] = seen.get(key, 0)
        seen[key] = occurrence[position] + 1
    return [np.flatnonzero(occurrence == r) for r in range(int(occurrence.max()) + 1)]


@dataclass
class _Catalogue:
    """Every item with its feature rows (-1: folded in online) and bias rows."""

    stamp: tuple[int, int]
    keys: list[str]
    rows: np.ndarray
    bias_rows: np.ndarray
    _positions: dict[str, int] | None = None
    _features: Any = None
    _folded: np.ndarray | None = None

    def vectors(self, model: OnlineModel) -> Any:
        """Features of every item: the version's rows gathered once, fold-ins refreshed per call.

        The fold-in rows are overwritten in place (callers hold the model lock and only
        read the block), so no call copies the whole catalogue.
        """
        if self._features is None:
            self._features = model.features.vectors(self.rows)
            self._folded = np.flatnonzero(self.rows < 0)
        if self._folded.size:
            fold = model._item_vectors(
                [self.keys[p] for p in self._folded], self.rows[self._folded]
            )
            self._features[model.backend.xp.asarray(self._folded)] = fold
        return self._features

    def positions(self, keys: set[str]) -> np.ndarray:
        """Positions of those of ``keys`` that are in the catalogue."""
        if self._positions is None:
            self._positions = {key: p for p, key in enumerate(self.keys)}
        found = [self._positions[key] for key in keys if key in self._positions]
        return np.asarray(found, dtype=np.int64)


class _Effects:
    """Per-observation outputs of ``observe_many`` on the GPU, filled round by round."""

    def __init__(self, n: int, dim: int, free: int) -> None:
        self.predictions, self.targets, self.residuals = np.empty(n), np.empty(n), np.empty(n)
        self.cold = np.zeros(n, dtype=bool)
        self._dims = dim, free
        self._cold: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add_cold(self, positions: np.ndarray, f: np.ndarray, x: np.ndarray, t: np.ndarray) -> None:
        self._cold.append((positions, f, x, t))

    def finish(self) -> tuple[np.ndarray, ...]:
        dim, free = self._dims
        parts = self._cold or [(np.empty(0, int), np.empty((0, dim)), np.empty((0, free)), [])]
        positions, f, x, t = (np.concatenate(column) for column in zip(*parts, strict=True))
        order = np.argsort(positions)
        return (
            self.predictions,
            self.targets,
            self.residuals,
            self.cold,
            f[order],
            x[order],
            np.asarray(t, dtype=np.float64)[order],
        )


class OnlineModel:
    """Exact online per-user ridge over a fixed :class:`FeatureModel`, with online biases.

    >>> from velox.features import MatrixFactorization
    >>> mf = MatrixFactorization(["a", "b"], np.array([[1.0], [-1.0]]), version="v1")
    >>> plain = ModelConfig(
    ...     regularization=1.0, forgetting=1.0, bias_drift=0.0, bias_regularization=25.0
    ... )
    >>> model = OnlineModel(mf, global_mean=3.0, item_bias=np.zeros(2), config=plain)
    >>> model.observe_many(["u1"], ["a"], [5.0]).predictions.tolist()
    [3.0]
    >>> model.predict("u1", ["a", "b"]).scores.round(3).tolist()
    [4.43, 3.02]
    """

    def __init__(
        self,
        features: FeatureModel,
        *,
        global_mean: float,
        item_bias: np.ndarray,
        train_count: int = 0,
        item_count: np.ndarray | None = None,
        config: ModelConfig | None = None,
        backend: Backend = CPU,
    ) -> None:
        config = config or ModelConfig()
        item_bias = np.asarray(item_bias, dtype=np.float64)
        if item_bias.shape != (len(features.item_ids),):
            raise InputError(
                f"item_bias must have one value per known item ({len(features.item_ids)}), "
                f"got shape {item_bias.shape}"
            )
        self.config = config
        self.features = features
        self.backend = backend
        self.biases = OnlineBiases(
            global_mean,
            train_count or config.mean_regularization,
            features.item_ids,
            item_bias,
            regularization=config.bias_regularization,
            item_count=item_count,
            count_weight=config.bias_count_weight,
        )
        common = {"backend": backend, "dtype": config.dtype}
        self.users = RidgeTable(
            features.dim,
            regularization=config.regularization,
            forgetting=config.forgetting,
            refactor_interval=config.refactor_interval,
            walk=config.bias_drift,
            walk_coordinate=features.bias_coordinate,
            **common,
        )
        self._free = np.asarray(features.foldin_coords, dtype=np.int64)
        self._fixed = np.setdiff1d(np.arange(features.dim), self._free)
        self.items = RidgeTable(
            len(self._free), regularization=config.foldin_regularization, **common
        )
        self._catalogue_cache: _Catalogue | None = None

    @property
    def version(self) -> str:
        return self.features.version

    # ----------------------------------------------------------------- state

    def load_users(self, users: Sequence[Any], A: Any, b: Any, count: np.ndarray) -> None:
        """Continue from training: set users' sufficient statistics (``(n, d, d)``, ``(n, d)``).

        The new-user prior is the trained model's to set
        (:meth:`velox.trained.TrainedModel.online_model`).
        """
        self.users.load(normalize_ids(users, "user"), A, b, np.asarray(count))

    def user_state(self, user: Any) -> UserState:
        """The user's state; an unknown user gets the prior (``known`` is False)."""
        (key,) = normalize_ids([user], "user")
        w, P, row = self._user_arrays(key)
        to_np = self.backend.to_numpy
        return UserState(
            user=key,
            weights=to_np(w),
            covariance=to_np(P),
            observations=int(self.users.count[row]) if row >= 0 else 0,
            version=self.version,
            last_update=float(self.users.updated[row]) if row >= 0 else 0.0,
            known=row >= 0,
        )

    def _user_arrays(self, key: str) -> tuple[Any, Any, int]:
        row = int(self.users.find([key])[0])
        if row >= 0:
            return self.users.w[row], self.users.P[row], row
        xp, dim = self.backend.xp, self.features.dim
        prior = self.backend.asarray(self.users.prior_mean)
        return prior, xp.eye(dim, dtype=self.users.dtype) / self.config.regularization, row

    def _item_vectors(self, keys: Sequence[str], rows: np.ndarray) -> Any:
        """Feature vectors of items: trained ones, folded-in ones, or the cold base vector."""
        out = self.features.vectors(rows)
        unknown = np.flatnonzero(rows < 0)
        if unknown.size:
            folded = self.items.find([keys[p] for p in unknown])
            have = folded >= 0
            if have.any():
                xp = self.backend.xp
                positions = xp.asarray(unknown[have])[:, None]
                out[positions, xp.asarray(self._free)[None, :]] = self.items.w[folded[have]]
        return out

    def every_item(self) -> list[str]:
        """Every item the model can score: the version's, then those folded in online."""
        return self._catalogue().keys

    def _catalogue(self) -> _Catalogue:
        """Every item, the version's then those folded in online, with its rows (cached).

        Both tables only ever grow, so their sizes tell when the cache is stale.
        """
        stamp = (len(self.items), len(self.biases))
        if self._catalogue_cache is None or self._catalogue_cache.stamp != stamp:
            # The fold-in table holds exactly the items the features do not know.
            keys = [*self.features.item_ids, *self.items.keys]
            self._catalogue_cache = _Catalogue(
                stamp, keys, self.features.lookup(keys), self.biases.find(keys)
            )
        return self._catalogue_cache

    def _item_terms(self, keys: Sequence[str], rows: np.ndarray) -> tuple[Any, np.ndarray]:
        """What every read path needs of its items: features, and ``mu + b_i`` on the host."""
        return self._item_vectors(keys, rows), self._base(keys)

    def _base(self, keys: Sequence[str]) -> np.ndarray:
        """``mu + b_i``: the part of every score that does not depend on the user."""
        return self.biases.mean + self.biases.bias(self.biases.find(keys))

    def prior_scores(self, items: Sequence[Any]) -> Prediction:
        """``mu + b_i`` for each item, for any user: the answer when the user model cannot
        be asked in time (the serving tier's deadline), without touching user state."""
        keys = normalize_ids(items, "item")
        return Prediction(keys, self._base(keys), self.features.lookup(keys) < 0)

    # --------------------------------------------------------------- observe

    def observe_many(
        self,
        users: Sequence[Any],
        items: Sequence[Any],
        ratings: Sequence[float] | np.ndarray,
        timestamps: Sequence[float] | np.ndarray | None = None,
    ) -> Applied:
        """Predict, then learn, a batch of observations in order; exact per user.

        On the CPU each observation sees the state the previous one left (one
        compiled call for the batch); on the GPU, in rounds (module docstring).
        Everything is validated before anything changes: mismatched lengths,
        an empty batch, bad ids or non-finite ratings raise :class:`InputError`
        and leave the model as it was.
        """
        user_keys = normalize_ids(users, "user")
        item_keys = normalize_ids(items, "item")
        y = np.asarray(ratings, dtype=np.float64)
        n = len(user_keys)
        if n == 0:
            raise InputError("an observation batch must not be empty")
        if len(item_keys) != n or y.shape != (n,):
            raise InputError(
                f"users, items and ratings must have the same length, got "
                f"{n}, {len(item_keys)} and {y.shape}"
            )
        if not np.isfinite(y).all():
            raise InputError("ratings must be finite numbers (no NaN or infinity)")
        when = np.zeros(n) if timestamps is None else np.asarray(timestamps, dtype=np.float64)
        if when.shape != (n,) or not np.isfinite(when).all():
            raise InputError(f"timestamps must be {n} finite numbers")
        if self.backend.xp is np:
            return self._observe_in_order(user_keys, item_keys, y, when)
        out = _Effects(n, self.features.dim, len(self._free))
        for positions in _rounds(user_keys):
            self._apply_round(positions, user_keys, item_keys, y, when, out)
        return Applied(self.version, user_keys, item_keys, y, when, *out.finish())

    def _observe_in_order(
        self, users: list[str], items: list[str], y: np.ndarray, when: np.ndarray
    ) -> Applied:
        """The CPU path: the whole batch in arrival order in one compiled call."""
        rows, cold = self._stream_rows(users, items)
        effects = Effects.empty(len(users), self.features.dim, len(self._free))
        self._apply_stream(rows, y, when, effects)
        return Applied(
            self.version,
            users,
            items,
            y,
            when,
            effects.predictions,
            effects.targets,
            effects.residuals,
            cold,
            effects.cold_features[cold],
            effects.foldin_inputs[cold],
            effects.foldin_targets[cold],
        )

    def _stream_rows(
        self, users: Sequence[str], items: Sequence[str], cold: np.ndarray | None = None
    ) -> tuple[Rows, np.ndarray]:
        """Rows of a batch's users, item features, fold-ins and biases, adding the new ones.

        ``cold`` (from a record) says which items were folded in; by default
        those the feature model does not know. Also returns ``cold``.
        """
        feature = self.features.lookup(items)
        cold = feature < 0 if cold is None else cold
        fold = np.full(len(items), -1, dtype=np.int64)
        if cold.any():
            fold[cold] = self.items.ensure([items[p] for p in np.flatnonzero(cold)])
        return Rows(self.users.ensure(users), feature, fold, self.biases.ensure(items)), cold

    def _apply_stream(
        self,
        rows: Rows,
        y: np.ndarray,
        when: np.ndarray,
        effects: Effects,
        *,
        replay: bool = False,
        skip_user: np.ndarray | None = None,
    ) -> None:
        features = self.features
        apply_stream(
            self.users.arrays(),
            self.items.arrays(),
            self.biases.arrays(),
            rows,
            (features.matrix(), features.cold_vector(), self._free, self._fixed),
            y,
            when,
            effects,
            replay=replay,
            skip_user=skip_user,
        )

    def _apply_round(
        self,
        positions: np.ndarray,
        user_keys: Sequence[str],
        item_keys: Sequence[str],
        y: np.ndarray,
        when: np.ndarray,
        out: _Effects,
    ) -> None:
        users = [user_keys[p] for p in positions]
        items = [item_keys[p] for p in positions]
        ratings = y[positions]
        feature_rows = self.features.lookup(items)
        is_cold = feature_rows < 0
        f = self._item_vectors(items, feature_rows)
        bias_rows = self.biases.ensure(items)
        mu, bias = self.biases.mean, self.biases.bias(bias_rows)
        t = ratings - mu - bias
        user_rows = self.users.ensure(users)
        to_np = self.backend.to_numpy
        if is_cold.any():
            xp = self.backend.xp
            w_before = self.users.w[user_rows[is_cold]]
            fixed_part = w_before[:, self._fixed] @ xp.asarray(
                self.features.cold_vector()[self._fixed]
            )
            x = to_np(w_before[:, self._free])
            foldin_t = t[is_cold] - to_np(fixed_part)
            out.add_cold(positions[is_cold], to_np(f[xp.asarray(is_cold)]), x, foldin_t)
        linear = to_np(self.users.update(user_rows, f, self.backend.asarray(t), when[positions]))
        residuals = ratings - mu - linear
        self.biases.update(bias_rows, ratings, residuals)
        if is_cold.any():
            cold_items = [items[p] for p in np.flatnonzero(is_cold)]
            self._fold_in(cold_items, x, foldin_t, when[positions][is_cold])
        out.predictions[positions] = mu + bias + linear
        out.targets[positions] = t
        out.residuals[positions] = residuals
        out.cold[positions] = is_cold

    def _fold_in(self, items: list[str], x: np.ndarray, t: np.ndarray, when: np.ndarray) -> None:
        """Ridge-update unknown items' free coordinates over the raters' weights ``x``."""
        backend = self.backend
        for positions in _rounds(items):
            rows = self.items.ensure([items[p] for p in positions])
            self.items.update(
                rows, backend.asarray(x[positions]), backend.asarray(t[positions]), when[positions]
            )

    def replay(self, applied: Applied, *, users_have: np.ndarray | None = None) -> np.ndarray:
        """Apply recorded observations again, exactly as they were applied; returns user rows.

        Nothing is recomputed from the current ``mu``, ``b_i`` or fold-in
        state: targets, residuals and cold features come from the record, so
        replaying a log from a checkpoint rebuilds the statistics bit for bit
        whatever the batch boundaries were (on the CPU through the same
        compiled loop as :meth:`observe_many`). ``users_have`` marks positions
        whose user state already includes them (a state stored after the
        checkpoint the biases come from): those update the biases and
        fold-ins only. A record that does not fit this model raises
        :class:`InputError` and changes nothing.
        """
        if applied.version != self.version:
            raise InputError(
                f"records applied under model version {applied.version!r} cannot be replayed "
                f"onto version {self.version!r}"
            )
        cold = self._check_record(applied)
        if self.backend.xp is not np:
            return self._replay_rounds(applied, cold, users_have)
        n = len(applied)
        rows, _ = self._stream_rows(applied.users, applied.items, cold)
        cold_features = np.zeros((n, self.features.dim))
        inputs = np.zeros((n, len(self._free)))
        targets = np.zeros(n)
        if cold.any():  # a record without cold rows may carry them in any empty shape
            cold_features[cold] = applied.cold_features
            inputs[cold] = applied.foldin_inputs
            targets[cold] = applied.foldin_targets
        effects = Effects(
            *(np.ascontiguousarray(a, dtype=np.float64) for a in applied.recorded()),
            cold_features,
            inputs,
            targets,
        )
        skip = None if users_have is None else np.ascontiguousarray(users_have, dtype=bool)
        self._apply_stream(
            rows,
            np.ascontiguousarray(applied.ratings, dtype=np.float64),
            np.ascontiguousarray(applied.timestamps, dtype=np.float64),
            effects,
            replay=True,
            skip_user=skip,
        )
        return rows.user

    def _check_record(self, applied: Applied) -> np.ndarray:
        """Which observations of a record were folded in; :class:`InputError` unless it fits."""
        n, cold = len(applied), np.asarray(applied.cold, dtype=bool)
        per_observation = (applied.users, applied.items, applied.ratings, applied.timestamps, cold)
        per_cold = (applied.cold_features, applied.foldin_inputs, applied.foldin_targets)
        shapes = [np.shape(a)[:1] for a in (*per_observation, *applied.recorded())]
        widths = (self.features.dim, len(self._free))
        if (
            any(shape != (n,) for shape in shapes)
            or any(np.shape(a)[:1] != (int(cold.sum()),) for a in per_cold)
            or (cold.any() and tuple(np.shape(a)[1] for a in per_cold[:2]) != widths)
        ):
            raise InputError(
                f"a record of {n} observations has fields of other lengths or widths; "
                "it was not written by this model version"
            )
        values = (applied.ratings, applied.timestamps, *applied.recorded(), *per_cold)
        if not all(np.isfinite(a).all() for a in values):
            raise InputError("a record holds NaN or infinite values; it is damaged")
        known = self.features.lookup([applied.items[p] for p in np.flatnonzero(~cold)])
        if (known < 0).any():
            raise InputError(
                "a record marks an item as known that this model version does not know; "
                "it was not written by this model version"
            )
        return cold

    def _replay_rounds(
        self, applied: Applied, cold: np.ndarray, users_have: np.ndarray | None
    ) -> np.ndarray:
        """The GPU path of :meth:`replay`: users' updates in rounds, then biases, then fold-ins."""
        item_rows = self.features.lookup(applied.items)
        f_host = np.empty((len(applied), self.features.dim))
        f_host[~cold] = self.backend.to_numpy(self.features.vectors(item_rows[~cold]))
        if cold.any():
            f_host[cold] = applied.cold_features
        f, t = self.backend.asarray(f_host), self.backend.asarray(applied.targets)
        user_rows = self.users.ensure(applied.users)
        for positions in _rounds(applied.users):
            if users_have is not None:
                positions = positions[~users_have[positions]]
                if not positions.size:
                    continue
            index = self.backend.xp.asarray(positions)
            self.users.update(
                user_rows[positions], f[index], t[index], applied.timestamps[positions]
            )
        self.biases.update(self.biases.ensure(applied.items), applied.ratings, applied.residuals)
        if cold.any():
            cold_items = [applied.items[p] for p in np.flatnonzero(cold)]
            self._fold_in(
                cold_items,
                applied.foldin_inputs,
                applied.foldin_targets,
                applied.timestamps[cold],
            )
        return user_rows

    # ---------------------------------------------------------------- predict

    def predict(self, user: Any, items: Sequence[Any]) -> Prediction:
        """``mu + b_i + w_u . f(i)`` for each item; unknown users get the prior."""
        keys = normalize_ids(items, "item")
        if not keys:
            raise InputError("predict needs at least one item")
        (user_key,) = normalize_ids([user], "user")
        w, _, _ = self._user_arrays(user_key)
        rows = self.features.lookup(keys)
        f, base = self._item_terms(keys, rows)
        linear = self.backend.to_numpy(kernels.scores(w[None], f)[0])
        return Prediction(keys, base + linear, rows < 0)

    def predict_pairs(self, users: Sequence[Any], items: Sequence[Any]) -> np.ndarray:
        """Scores for ``(users[j], items[j])`` pairs in one pass, without learning."""
        user_keys = normalize_ids(users, "user")
        item_keys = normalize_ids(items, "item")
        if len(user_keys) != len(item_keys) or not user_keys:
            raise InputError("predict_pairs needs equally many users and items, at least one")
        scores, _ = self._pair_scores(user_keys, np.arange(len(user_keys)), item_keys)
        return scores

    def predict_many(
        self, users: Sequence[Any], item_lists: Sequence[Sequence[Any]]
    ) -> list[Prediction]:
        """:meth:`predict` for several users at once: one vectorised pass for all of them.

        >>> from velox.features import MatrixFactorization
        >>> mf = MatrixFactorization(["a", "b"], np.array([[1.0], [-1.0]]), version="v1")
        >>> model = OnlineModel(mf, global_mean=3.0, item_bias=np.zeros(2))
        >>> [p.scores.tolist() for p in model.predict_many(["u", "w"], [["a"], ["a", "b"]])]
        [[3.0], [3.0, 3.0]]
        """
        user_keys = normalize_ids(users, "user")
        lists = [normalize_ids(items, "item") for items in item_lists]
        if len(lists) != len(user_keys) or not all(lists):
            raise InputError("predict_many needs one non-empty item list per user")
        owners = np.repeat(np.arange(len(user_keys)), [len(items) for items in lists])
        keys = [key for items in lists for key in items]
        scores, rows = self._pair_scores(user_keys, owners, keys)
        bounds = np.cumsum([len(items) for items in lists])[:-1]
        return [
            Prediction(items, s, r < 0)
            for items, s, r in zip(
                lists, np.split(scores, bounds), np.split(rows, bounds), strict=True
            )
        ]

    def _pair_scores(
        self, user_keys: Sequence[str], owners: np.ndarray, item_keys: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores of ``item_keys[j]`` for ``user_keys[owners[j]]``, and the items' feature rows."""
        rows = self.users.find(user_keys)
        known = rows >= 0
        w = self.backend.xp.empty((len(user_keys), self.features.dim), dtype=self.users.dtype)
        w[...] = self.backend.asarray(self.users.prior_mean)
        if known.any():
            w[self.backend.xp.asarray(np.flatnonzero(known))] = self.users.w[rows[known]]
        feature_rows = self.features.lookup(item_keys)
        f, base = self._item_terms(item_keys, feature_rows)
        linear = (w[self.backend.xp.asarray(owners)] * f).sum(axis=1)
        return base + self.backend.to_numpy(linear), feature_rows

    def topk(
        self,
        user: Any,
        k: int,
        *,
        candidates: Sequence[Any] | None = None,
        exclude: Iterable[Any] = (),
        explore: Explore = "none",
        alpha: float = 1.0,
        rng: Any = None,
    ) -> Prediction:
        """The ``k`` best items for ``user`` among ``candidates`` (default: every item).

        ``explore = "ucb"`` adds ``alpha * sqrt(f^T P_u f)``; ``"thompson"``
        scores with weights drawn from ``N(w_u, alpha^2 P_u)``. The returned
        scores are the ranking scores, exploration included, and always finite:
        an ``alpha`` so large that they overflow is refused. A candidate listed
        twice is ranked once, where it first appears.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        if explore not in EXPLORE_MODES:
            raise InputError(f"explore must be one of {', '.join(EXPLORE_MODES)}, got {explore!r}")
        if not np.isfinite(alpha) or alpha < 0:
            raise InputError(f"alpha must be a finite number >= 0, got {alpha!r}")
        banned = set(normalize_ids(exclude, "item"))
        if candidates is None:  # every item: rows and features looked up once, not per request
            catalogue = self._catalogue()
            keys, rows = catalogue.keys, catalogue.rows
            f = catalogue.vectors(self)
            scores = self.biases.mean + self.biases.bias(catalogue.bias_rows)
            dropped = catalogue.positions(banned)  # scored, then ranked last and cut
        else:
            keys = list(dict.fromkeys(normalize_ids(candidates, "item")))
            if banned:
                keys = [key for key in keys if key not in banned]
            rows = self.features.lookup(keys)
            f, scores = self._item_terms(keys, rows)
            dropped = np.empty(0, dtype=np.int64)
        available = len(keys) - dropped.size
        if not available:
            return Prediction([], np.empty(0), np.empty(0, dtype=bool))
        (user_key,) = normalize_ids([user], "user")
        w, P, _ = self._user_arrays(user_key)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below
            if explore == "thompson":
                rng = rng if rng is not None else self.backend.default_rng()
                w = kernels.thompson_sample(w[None], P[None], alpha, rng)[0]
            ranking = kernels.scores(w[None], f)[0]
            if explore == "ucb":
                ranking = ranking + alpha * kernels.ucb_bonus(P[None], f)[0]
            scores = scores + self.backend.to_numpy(ranking)
        if not np.isfinite(scores).all():
            raise InputError(
                f"alpha {alpha:g} makes the exploration scores overflow; use a smaller alpha"
            )
        scores[dropped] = -np.inf
        top = min(k, available)
        best = np.argpartition(-scores, top - 1)[:top]
        best = best[np.argsort(-scores[best], kind="stable")]
        return Prediction([keys[i] for i in best], scores[best], rows[best] < 0)
