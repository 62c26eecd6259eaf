"""``velox evaluate --tune``: settings chosen on the training part only.

The training part is cut by the same temporal protocol (its first 80% trains,
its last 20% streams), and every point of a small grid is scored by the
online policy's stream RMSE there, so the chosen settings never see the
stream they are then scored on. ALS trains once per (rank, regularisation);
the online settings (bias pseudo-count, forgetting) replay over it.

The grid (:data:`GRID`): rank 3, 5, 10; regularisation ``lambda n^e`` with
e = 0 (lambda 2.5, 5, 10) or e = 0.5 (lambda 0.5, 1, 2), the same for users
and items, and a new user's prior at the same lambda; bias pseudo-count 3,
10, 25; a trained item bias worth 0 or 1 pseudo-observation per training
rating; forgetting 1, 0.99, 0.98; a user-bias drift of 0, 0.003 or 0.01; ALS age
weights (``train.forgetting``) 1, 0.995 or 0.99.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from velox.als import ALSParams, Ratings, train_als
from velox.config import ModelConfig
from velox.evaluation.metrics import rmse
from velox.evaluation.protocols import temporal
from velox.evaluation.replay import replay


@dataclass(frozen=True)
class Grid:
    """The values ``--tune`` tries."""

    ranks: tuple[int, ...] = (3, 5, 10)
    regularization: tuple[tuple[float, float], ...] = (
        (0.0, 2.5),
        (0.0, 5.0),
        (0.0, 10.0),
        (0.5, 0.5),
        (0.5, 1.0),
        (0.5, 2.0),
    )
    """(exponent e, lambda) pairs."""
    bias_pseudo_counts: tuple[float, ...] = (3.0, 10.0, 25.0)
    bias_count_weights: tuple[float, ...] = (0.0, 1.0)
    forgetting: tuple[float, ...] = (1.0, 0.99, 0.98)
    bias_drift: tuple[float, ...] = (0.0, 0.003, 0.01)
    train_forgetting: tuple[float, ...] = (1.0, 0.995, 0.99)


GRID = Grid()


@dataclass(frozen=True)
class Candidate:
    """One point of the grid: the ALS parameters and the online settings, and its score."""

    params: ALSParams
    model: ModelConfig
    rmse: float

    def settings(self) -> dict[str, float]:
        """The point as ``section.key`` settings (what to put in ``conf/velox.toml``)."""
        return {
            "train.rank": self.params.rank,
            "train.user_regularization": self.params.user_regularization,
            "train.item_regularization": self.params.item_regularization,
            "train.regularization_exponent": self.params.regularization_exponent,
            "train.forgetting": self.params.forgetting,
            "model.regularization": self.model.regularization,
            "model.bias_regularization": self.model.bias_regularization,
            "model.bias_count_weight": self.model.bias_count_weight,
            "model.forgetting": self.model.forgetting,
            "model.bias_drift": self.model.bias_drift,
        }


def score_grid(
    train: pa.Table,
    stream: pa.Table,
    params: ALSParams,
    model: ModelConfig,
    grid: Grid = GRID,
    *,
    batch_size: int = 64,
) -> list[Candidate]:
    """Every grid point's online stream RMSE (clipped to the data's scale), best first.

    ``params`` and ``model`` give the settings the grid does not vary.
    """
    ratings = np.concatenate([train.column("rating").to_numpy(), stream.column("rating")])
    scale = float(ratings.min()), float(ratings.max())
    truth = stream.column("rating").to_numpy()
    scored = []
    trainings = itertools.product(grid.ranks, grid.regularization, grid.train_forgetting)
    for rank, (exponent, strength), ageing in trainings:
        point = dataclasses.replace(
            params,
            rank=rank,
            user_regularization=strength,
            item_regularization=strength,
            regularization_exponent=exponent,
            forgetting=ageing,
        )
        trained = train_als(Ratings.from_table(train), point)
        settings = itertools.product(
            grid.bias_pseudo_counts, grid.bias_count_weights, grid.forgetting, grid.bias_drift
        )
        for bias, count_weight, forgetting, drift in settings:
            config = dataclasses.replace(
                model,
                regularization=strength,
                bias_regularization=bias,
                bias_count_weight=count_weight,
                forgetting=forgetting,
                bias_drift=drift,
            )
            online = trained.online_model(version="tune", config=config)
            trace = replay(online, stream, batch_size=batch_size)
            scored.append(Candidate(point, config, rmse(np.clip(trace.predictions, *scale), truth)))
    return sorted(scored, key=lambda candidate: candidate.rmse)


def tune(
    train: pa.Table, params: ALSParams, model: ModelConfig, grid: Grid = GRID, **options
) -> list[Candidate]:
    """:func:`score_grid` on the training part's own temporal split (80/20), best first."""
    past, recent = temporal(train, 0.8)
    return score_grid(past, recent, params, model, grid, **options)
