"""The policies ``velox evaluate`` compares on one stream, each a :class:`Learner` factory.

Every Velox policy starts from one :class:`~velox.trained.TrainedModel` of
the training part and scores through :meth:`TrainedModel.online_model`, the
serving tier's own model; they differ only in what happens during the stream:

* ``baseline``: the global mean and item biases, kept current online, no
  user model (what a popularity recommender gives);
* ``stale``: the trained model, never updated (a batch trainer plus a
  key-value store);
* ``online``: Velox's exact per-user updates with the configured settings;
* ``forgetting``: the same with a forgetting factor, for drifting tastes;
* ``retrain``: online, plus a warm ALS retrain on everything seen every
  ``retrain_every`` of the stream (time-decayed by ``train.forgetting``);
* ``river-mf`` and ``river-biases``: River's online SGD peers
  (:mod:`velox.evaluation.river_peers`, from the optional ``bench`` extra).

:class:`ServerLearner` replays the stream through a running ``velox serve``
instead (``velox evaluate --server URL``): the serving tier's whole path,
durable store included, measured by the same figures.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from velox.als import ALSParams, Ratings, initial_factors, train_als
from velox.biases import OnlineBiases
from velox.config import ModelConfig
from velox.datasets.schema import OBSERVATION_SCHEMA
from velox.errors import InputError
from velox.evaluation.replay import Learner, ModelLearner
from velox.trained import TrainedModel


@dataclass(frozen=True)
class Setup:
    """What every policy of one run shares: the trained model, the settings, the data."""

    trained: TrainedModel
    params: ALSParams
    model: ModelConfig
    train: pa.Table
    stream_size: int
    forgetting: float = 0.99
    """The forgetting factor of the ``forgetting`` policy."""
    retrain_every: float = 0.1
    """Share of the stream between two retrains of the ``retrain`` policy."""


class BiasLearner:
    """``mu + b_i``, both updated online by :class:`~velox.biases.OnlineBiases`."""

    def __init__(self, setup: Setup) -> None:
        trained = setup.trained
        self.biases = OnlineBiases(
            trained.global_mean,
            trained.train_count,
            [str(item) for item in trained.item_ids],
            trained.item_bias,
            regularization=setup.model.bias_regularization,
        )

    def step(self, users, items, ratings, when, learn: bool) -> np.ndarray:
        rows = self.biases.ensure(list(items))
        predictions = self.biases.mean + self.biases.bias(rows)
        if learn:
            self.biases.update(rows, ratings, ratings - self.biases.mean)
        return predictions


class StaleLearner(ModelLearner):
    """The trained model as it was: predicts, never learns."""

    def step(self, users, items, ratings, when, learn: bool) -> np.ndarray:
        return super().step(users, items, ratings, when, learn=False)


class RetrainLearner:
    """Online updates, and every ``every`` observations a warm ALS retrain on all seen.

    The retrain starts from the current item factors (new items from the
    seeded start) and replaces the online model by the new version's, as a
    production retrain would; the time it takes is recorded.
    """

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.every = max(1, round(setup.retrain_every * setup.stream_size))
        self.model = setup.trained.online_model(version="v0", config=setup.model)
        self.seen: list[pa.Table] = [setup.train]
        self.pending = 0
        self.retrains = 0
        self.retrain_seconds = 0.0

    def step(self, users, items, ratings, when, learn: bool) -> np.ndarray:
        predictions = ModelLearner(self.model).step(users, items, ratings, when, learn)
        if learn:
            self.seen.append(_table(users, items, ratings, when))
            self.pending += len(users)
            if self.pending >= self.every:
                self._retrain()
        return predictions

    def _retrain(self) -> None:
        started = time.perf_counter()
        ratings = Ratings.from_table(pa.concat_tables(self.seen))
        previous = self.model.features
        init = initial_factors(ratings.shape[1], self.setup.params.rank, self.setup.params.seed)
        rows = previous.lookup(list(ratings.item_ids))
        known = rows >= 0
        init[known] = np.asarray(previous.matrix())[rows[known], :-1]
        trained = train_als(ratings, self.setup.params, init=init)
        self.retrains += 1
        self.model = trained.online_model(version=f"v{self.retrains}", config=self.setup.model)
        self.pending = 0
        self.retrain_seconds += time.perf_counter() - started


class ServerLearner:
    """A running Velox server as a learner: ``/observe`` answers with its predictions.

    Each batch is one request with an idempotency key, so a retried request
    is applied once. The server must serve a version trained on the same
    training part for the figures to compare.
    """

    def __init__(self, client) -> None:
        from velox.client import Observation

        self.client = client
        self._observation = Observation

    def step(self, users, items, ratings, when, learn: bool) -> np.ndarray:
        if not learn:
            raise InputError("a server learns what it is sent; evaluate it with learning on")
        batch = [
            self._observation(user, item, float(rating), float(ts))
            for user, item, rating, ts in zip(users, items, ratings, when, strict=True)
        ]
        answer = self.client.observe(batch, idempotency_key=uuid.uuid4().hex)
        return np.asarray(answer.predictions)


def _table(users: Sequence[str], items: Sequence[str], ratings, when) -> pa.Table:
    micros = pa.array(np.round(np.asarray(when) * 1e6).astype(np.int64))
    return pa.table(
        [
            pa.array(list(users)),
            pa.array(list(items)),
            pa.array(np.asarray(ratings, dtype=np.float64)),
            micros.cast(pa.timestamp("us", tz="UTC")),
        ],
        schema=OBSERVATION_SCHEMA,
    )


def _online(setup: Setup) -> Learner:
    return ModelLearner(setup.trained.online_model(version="v0", config=setup.model))


def _forgetting(setup: Setup) -> Learner:
    config = dataclasses.replace(setup.model, forgetting=setup.forgetting)
    return ModelLearner(setup.trained.online_model(version="v0", config=config))


def _stale(setup: Setup) -> Learner:
    return StaleLearner(setup.trained.online_model(version="v0", config=setup.model))


def _river(kind: str) -> Callable[[Setup], Learner]:
    def make(setup: Setup) -> Learner:
        from velox.evaluation.river_peers import river_learner

        return river_learner(kind, setup.train)

    return make


POLICIES: dict[str, Callable[[Setup], Learner]] = {
    "baseline": BiasLearner,
    "stale": _stale,
    "online": _online,
    "forgetting": _forgetting,
    "retrain": RetrainLearner,
    "river-mf": _river("mf"),
    "river-biases": _river("biases"),
}
DEFAULT_POLICIES = ("baseline", "stale", "online", "forgetting", "retrain")


def learner(name: str, setup: Setup) -> Learner:
    """The named policy's learner for this run."""
    if name not in POLICIES:
        raise InputError(f"unknown policy {name!r}; the policies are: {', '.join(POLICIES)}")
    return POLICIES[name](setup)
