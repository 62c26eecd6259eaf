"""Small models and log records that several test modules build the same way."""

from __future__ import annotations

import numpy as np

from velox.config import ModelConfig
from velox.features import MatrixFactorization
from velox.model import Applied, OnlineModel


def small_model(rank: int = 3, items: int = 20, version: str = "v7", **config) -> OnlineModel:
    """A model over random features of ``items`` items ``i0``, ``i1``, ... (seeded)."""
    rng = np.random.default_rng(0)
    ids = [f"i{j}" for j in range(items)]
    features = MatrixFactorization(ids, rng.normal(size=(items, rank)), version=version)
    return OnlineModel(
        features,
        global_mean=3.5,
        item_bias=rng.normal(0, 0.3, items),
        train_count=1000,
        config=ModelConfig(rank=rank, **config),
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


def served_model(registry, number: int, config) -> OnlineModel:
    """A registry version's model with every trained user loaded: what serving must equal."""
    from feature_store.versions import model_of
    from velox.backend import CPU

    artifacts = registry.load(number)
    model = model_of(artifacts, registry.get(number).name, config, CPU)
    model.users.load(
        [str(u) for u in artifacts.user_ids],
        artifacts.user_gram,
        artifacts.user_rhs,
        artifacts.user_count,
    )
    return model
