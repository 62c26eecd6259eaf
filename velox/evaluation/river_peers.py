"""River's online recommenders as peers in ``velox evaluate`` (optional ``bench`` extra).

River (``pip install 'velox[bench]'``) learns one observation at a time by
SGD. Its peers here are pre-trained by one pass over the training part in
time order, then predict-then-learn the stream like every other policy:

* ``mf``: ``river.reco.BiasedMF`` (global mean, user and item biases, 10
  latent factors), SGD 0.025 on the biases and 0.05 on the factors, no L2,
  factors drawn from N(0, 0.1^2), seed 0;
* ``biases``: ``river.reco.Baseline`` (global mean and biases), SGD 0.025.

The ``mf`` settings are the best of a small grid (factors 3 or 10; SGD 0.01,
0.025, 0.05 on the biases and 0.01, 0.05 on the factors; L2 0, 0.01, 0.05)
scored on MovieLens 100K's training part alone, as ``--tune`` scores Velox
(``python -m benchmarks.river_grid``; ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from velox.errors import InputError


class RiverLearner:
    """A River recommender behind the :class:`~velox.evaluation.replay.Learner` interface."""

    def __init__(self, model) -> None:
        self.model = model

    def step(self, users, items, ratings, when, learn: bool) -> np.ndarray:
        predictions = np.empty(len(users))
        for j, (user, item) in enumerate(zip(users, items, strict=True)):
            predictions[j] = self.model.predict_one(user=user, item=item)
            if learn:
                self.model.learn_one(user=user, item=item, y=float(ratings[j]))
        return predictions


def river_learner(kind: str, train: pa.Table) -> RiverLearner:
    """A River peer of ``kind`` ("mf" or "biases"), pre-trained on ``train`` in time order."""
    try:
        from river import optim, reco
    except ImportError:
        raise InputError(
            "the River peers need River; install the bench extra: pip install 'velox[bench]'"
        ) from None
    if kind == "mf":
        model = reco.BiasedMF(
            n_factors=10,
            bias_optimizer=optim.SGD(0.025),
            latent_optimizer=optim.SGD(0.05),
            latent_initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=0),
        )
    elif kind == "biases":
        model = reco.Baseline(optimizer=optim.SGD(0.025))
    else:
        raise InputError(f"unknown River peer {kind!r}; use 'mf' or 'biases'")
    learner = RiverLearner(model)
    users, items = train.column("user").to_pylist(), train.column("item").to_pylist()
    ratings = train.column("rating").to_numpy()
    for user, item, rating in zip(users, items, ratings, strict=True):
        model.learn_one(user=user, item=item, y=float(rating))
    return learner
