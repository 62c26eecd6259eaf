"""The one trained-model type: what every training engine returns and the registry stores.

A training run (Velox ALS on the driver or on Spark tasks, or Spark MLlib
followed by a Velox user half-step) ends in a :class:`TrainedModel`: the item
features and biases, the global mean, and every trained user's sufficient
statistics. It is the only thing that builds an :class:`~velox.model.OnlineModel`,
and it scores through that model, so the formula ``mu + b_i + w_u . f(i)``,
the cold-item rule and the new-user prior exist once (in :mod:`velox.model`):
training's validation error, the quality benchmark, evaluation and serving
all go through :meth:`TrainedModel.online_model`.

>>> trained = TrainedModel(
...     item_ids=np.array(["a", "b"]), item_factors=np.array([[1.0], [-1.0]]),
...     item_bias=np.array([0.5, 0.0]), global_mean=3.0, user_ids=np.array(["u"]),
...     user_weights=np.array([[1.0, 0.0]]), user_gram=np.eye(2)[None],
...     user_rhs=np.array([[1.0, 0.0]]), user_count=np.array([1]))
>>> trained.predict(["u", "u", "new"], ["a", "zzz", "b"]).tolist()
[4.5, 3.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from velox.backend import CPU, Backend
from velox.config import ModelConfig
from velox.errors import DataError
from velox.features import MatrixFactorization
from velox.model import OnlineModel


@dataclass(frozen=True)
class TrainedModel:
    """Item features and biases, ``mu``, and each trained user's exact statistics.

    ``user_gram`` holds each user's full symmetric ``A`` (the trainers make it
    symmetric by construction, so storing its upper triangle loses nothing);
    ``user_weights`` solve ``A w = b``. ``train_count`` is the number of
    ratings the run saw (the global mean's pseudo-count online); it defaults
    to the users' rating total.
    """

    item_ids: np.ndarray
    item_factors: np.ndarray
    item_bias: np.ndarray
    global_mean: float
    user_ids: np.ndarray
    user_weights: np.ndarray
    user_gram: np.ndarray
    user_rhs: np.ndarray
    user_count: np.ndarray
    train_count: int | None = None
    train_rmse: float | None = None
    """Error on the training ratings at the end of the run (the registry keeps it in metrics)."""
    item_count: np.ndarray | None = None
    """Each item's (age-weighted) number of training ratings: how much its trained bias
    knows (``model.bias_count_weight``); None for artifacts that did not record it."""

    def __post_init__(self) -> None:
        if self.train_count is None:
            object.__setattr__(self, "train_count", int(np.sum(self.user_count)))

    @property
    def rank(self) -> int:
        """Latent factors per item; the features are ``[factors, 1]`` of length ``rank + 1``."""
        return int(np.shape(self.item_factors)[1])

    def check_shapes(self, where: str) -> None:
        """Raise :class:`DataError` naming ``where`` unless every array fits the id counts."""
        n, m = len(self.item_ids), len(self.user_ids)
        factors = np.shape(self.item_factors)
        if len(factors) != 2 or factors[0] != n or factors[1] < 1:
            raise DataError(f"{where}: item_factors has shape {factors}, not ({n}, rank >= 1)")
        d = factors[1] + 1
        expected = {
            "item_bias": (n,),
            "user_weights": (m, d),
            "user_gram": (m, d, d),
            "user_rhs": (m, d),
            "user_count": (m,),
        }
        for name, shape in expected.items():
            got = np.shape(getattr(self, name))
            if got != shape:
                raise DataError(
                    f"{where}: {name} has shape {got}, not {shape} ({n} items, {m} users)"
                )

    def online_model(
        self,
        *,
        version: str,
        config: ModelConfig | None = None,
        backend: Backend = CPU,
        users: bool = True,
    ) -> OnlineModel:
        """The online model that continues exactly from this run's statistics.

        ``users=False`` leaves the trained users out (the serving tier pages
        them in from the online store on demand); the new-user prior is the
        mean trained weight vector either way (``model.prior = "mean"``).
        """
        config = config or ModelConfig()
        features = MatrixFactorization(
            self.item_ids, self.item_factors, version=version, backend=backend, dtype=config.dtype
        )
        model = OnlineModel(
            features,
            global_mean=self.global_mean,
            item_bias=self.item_bias,
            train_count=self.train_count,
            item_count=self.item_count,
            config=config,
            backend=backend,
        )
        if config.prior == "mean" and len(self.user_ids):
            model.users.prior_mean = self.user_weights.mean(axis=0).astype(model.users.dtype)
        if users:
            model.load_users(self.user_ids, self.user_gram, self.user_rhs, self.user_count)
        return model

    def predict(
        self, users: Sequence[Any], items: Sequence[Any], *, config: ModelConfig | None = None
    ) -> np.ndarray:
        """Scores of ``(users[j], items[j])`` pairs, exactly as the freshly served version gives."""
        model = self.online_model(version="trained", config=config)
        return model.predict_pairs(list(users), list(items))
