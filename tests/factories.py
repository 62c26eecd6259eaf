"""Small models and log records that several test modules build the same way."""

from __future__ import annotations

import numpy as np

from velox.config import ModelConfig
from velox.features import MatrixFactorization
from velox.model import Applied, OnlineModel


def training_counts(items: int) -> np.ndarray:
    """The training rating counts :func:`small_model` gives its items (0 to 6)."""
    return np.arange(items) % 7.0


def small_model(rank: int = 3, items: int = 20, version: str = "v7", **config) -> OnlineModel:
    """A model over random features of ``items`` items ``i0``, ``i1``, ... (seeded).

    Without forgetting or drift unless ``config`` asks for them, so a user's
    state is the plain ridge solution the tests compare with.
    """
    rng = np.random.default_rng(0)
    ids = [f"i{j}" for j in range(items)]
    features = MatrixFactorization(ids, rng.normal(size=(items, rank)), version=version)
    return OnlineModel(
        features,
        global_mean=3.5,
        item_bias=rng.normal(0, 0.3, items),
        train_count=1000,
        item_count=training_counts(items),
        config=ModelConfig(**{"forgetting": 1.0, "bias_drift": 0.0, **config}),
    )


def applied(users, items, ratings, timestamps, version: str = "v1") -> Applied:
    """An :class:`Applied` batch of known items with made-up but distinct recorded values."""
    n = len(users)
    ratings = np.asarray(ratings, dtype=np.float64)
    return Applied(
        version=version,
        users=list(users),
        items=list(items),
        ratings=ratings,
        timestamps=np.asarray(timestamps, dtype=np.float64),
        predictions=ratings - 0.5,
        targets=ratings - 3.0,
        residuals=ratings - 3.25,
        cold=np.zeros(n, dtype=bool),
        cold_features=np.empty((0, 0)),
        foldin_inputs=np.empty((0, 0)),
        foldin_targets=np.empty(0),
    )


class RidgeReference:
    """A version's scores and user states by the formulas of DESIGN.md section 3, with NumPy.

    The expected values of the serving tests, computed independently of the
    serving code from the version's artifacts alone: ``w_u = solve(A_u, b_u)``,
    ``f(i) = [v_i, 1]`` (``[0, ..., 0, 1]`` for an item the version does not
    know), ``score = mu + b_i + w_u . f(i)``; a new user starts at
    ``A = lambda I``, ``b = lambda w0`` with ``w0`` the trained users' mean
    weights. :meth:`observe` applies one observation as section 3 and
    :mod:`velox.biases` state it: ``A <- gamma A + f f^T``,
    ``b <- gamma b + t f`` with the forgetting factor ``gamma``, after the
    bias coordinate's random walk (``model.bias_drift``); an item's trained
    bias weighs ``bias_regularization + bias_count_weight * count``.

    >>> from types import SimpleNamespace
    >>> trained = SimpleNamespace(
    ...     item_ids=["a"], item_factors=np.array([[1.0]]), item_bias=[0.5], global_mean=3.0,
    ...     train_count=10, user_ids=["u"], user_gram=[2 * np.eye(2)],
    ...     user_rhs=[np.array([2.0, 1.0])], user_count=[4])
    >>> RidgeReference(trained, ModelConfig()).predict("u", ["a", "new"]).tolist()
    [5.0, 3.5]
    """

    def __init__(self, trained, config: ModelConfig) -> None:
        self.lam, self.bias_lam = config.regularization, config.bias_regularization
        self.forgetting, self.walk = config.forgetting, config.bias_drift
        self.d = trained.item_factors.shape[1] + 1
        self.factors = {
            str(i): np.append(v, 1.0)
            for i, v in zip(trained.item_ids, trained.item_factors, strict=True)
        }
        self.trained_bias = {
            str(i): b for i, b in zip(trained.item_ids, trained.item_bias, strict=True)
        }
        counts = getattr(trained, "item_count", None)
        counts = np.zeros(len(trained.item_ids)) if counts is None else np.asarray(counts)
        self.bias_weight = {
            str(i): self.bias_lam + config.bias_count_weight * n
            for i, n in zip(trained.item_ids, counts, strict=True)
        }
        self.bias_sum: dict[str, float] = {}
        self.bias_count: dict[str, int] = {}
        self.mean_sum = trained.global_mean * trained.train_count
        self.mean_count = float(trained.train_count)
        self.A = {
            str(u): np.array(g) for u, g in zip(trained.user_ids, trained.user_gram, strict=True)
        }
        self.b = {
            str(u): np.array(r) for u, r in zip(trained.user_ids, trained.user_rhs, strict=True)
        }
        self.count = {
            str(u): int(n) for u, n in zip(trained.user_ids, trained.user_count, strict=True)
        }
        weights = [np.linalg.solve(self.A[u], self.b[u]) for u in self.A]
        self.w0 = np.mean(weights, axis=0) if config.prior == "mean" else np.zeros(self.d)

    @classmethod
    def of(cls, registry, number: int, config) -> RidgeReference:
        """The reference of a registry version under ``config`` (a :class:`VeloxConfig`)."""
        return cls(registry.load(number), config.model)

    @property
    def mean(self) -> float:
        return self.mean_sum / self.mean_count

    def features(self, item: str) -> np.ndarray:
        return self.factors.get(item, np.eye(self.d)[-1])

    def bias(self, item: str) -> float:
        prior = self.trained_bias.get(item, 0.0)
        total, n = self.bias_sum.get(item, 0.0), self.bias_count.get(item, 0)
        weight = self.bias_weight.get(item, self.bias_lam)
        return (weight * prior + total) / (weight + n) if n else prior

    def state(self, user: str) -> tuple[np.ndarray, np.ndarray, int]:
        """``(A_u, b_u, observations)``; the prior's for a user never seen."""
        if user in self.A:
            return self.A[user], self.b[user], self.count[user]
        return self.lam * np.eye(self.d), self.lam * self.w0, 0

    def weights(self, user: str) -> np.ndarray:
        A, b, _ = self.state(user)
        return np.linalg.solve(A, b)

    def predict(self, user: str, items: list[str]) -> np.ndarray:
        w = self.weights(user)
        return np.array([self.mean + self.bias(i) + w @ self.features(i) for i in items])

    def learn(
        self, A: np.ndarray, b: np.ndarray, f: np.ndarray, target: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """One observation's update of a user's ``(A, b)``: the bias coordinate's random
        walk (by explicit inverses), then the rank-one update."""
        if self.walk:
            w, step = np.linalg.solve(A, b), np.zeros((self.d, self.d))
            step[-1, -1] = self.walk
            A = np.linalg.inv(np.linalg.inv(A) + step)
            b = A @ w
        return self.forgetting * A + np.outer(f, f), self.forgetting * b + target * f

    def observe(self, user: str, item: str, rating: float) -> float:
        """Apply one observation; the prediction made just before it."""
        A, b, n = self.state(user)
        f, w = self.features(item), self.weights(user)
        before = self.mean + self.bias(item) + w @ f
        target = rating - self.mean - self.bias(item)
        residual = rating - self.mean - w @ f
        (self.A[user], self.b[user]), self.count[user] = self.learn(A, b, f, target), n + 1
        self.mean_sum += rating
        self.mean_count += 1
        self.bias_sum[item] = self.bias_sum.get(item, 0.0) + residual
        self.bias_count[item] = self.bias_count.get(item, 0) + 1
        return before
