"""``velox evaluate``: policies compared on one stream by one protocol, in process.

:func:`evaluate` trains ALS once on the protocol's training part, replays the
stream through every policy (:mod:`velox.evaluation.policies`), and measures
what :mod:`velox.evaluation.metrics` defines: errors overall, per window and
per segment (warm users, new users, new items), the cold-start curve of new
users, the per-user improvement over the stale model, top-K precision and
NDCG against each user's later high ratings, and the cost. Predictions are
clipped to the data's rating scale wherever they are scored.
:func:`per_user_protocol` is the Velox paper's protocol.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from velox.als import ALSParams, Ratings, train_als
from velox.config import ModelConfig
from velox.errors import InputError
from velox.evaluation.metrics import (
    cold_start_curve,
    mae,
    ndcg_at,
    per_user_rmse,
    precision_at,
    rmse,
    window_rmse,
)
from velox.evaluation.policies import DEFAULT_POLICIES, RetrainLearner, Setup, learner
from velox.evaluation.protocols import per_user, random_split, seen_before, temporal
from velox.evaluation.replay import Learner, ProgressBar, Trace, replay
from velox.trained import TrainedModel

PROTOCOLS = ("temporal", "random", "per-user")


@dataclass(frozen=True)
class Spec:
    """What one evaluation run does; the defaults are those of ``velox evaluate``."""

    protocol: str = "temporal"
    train_share: float = 0.5
    policies: tuple[str, ...] = DEFAULT_POLICIES
    batch_size: int = 64
    windows: int = 10
    forgetting: float = 0.99
    retrain_every: float = 0.1
    cold_start_upto: int = 50
    k: int = 10
    relevant: float = 4.0
    """A later rating at least this high makes an item relevant for top-K."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise InputError(
                f"unknown protocol {self.protocol!r}; the protocols are: {', '.join(PROTOCOLS)}"
            )


@dataclass
class Segments:
    """Which streamed observations are of new users, of new items, and how many came before."""

    new_user: np.ndarray
    new_item: np.ndarray
    seen: np.ndarray

    @classmethod
    def of(cls, train: pa.Table, stream: pa.Table) -> Segments:
        users = np.asarray(stream.column("user").to_pylist())
        items = np.asarray(stream.column("item").to_pylist())
        known_users = set(train.column("user").to_pylist())
        known_items = set(train.column("item").to_pylist())
        return cls(
            new_user=np.array([u not in known_users for u in users], dtype=bool),
            new_item=np.array([i not in known_items for i in items], dtype=bool),
            seen=seen_before(users),
        )


@dataclass
class Result:
    """One policy's trace (predictions clipped) and its figures."""

    policy: str
    trace: Trace
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Evaluation:
    """Everything one run measured; :mod:`velox.evaluation.results` writes it out."""

    spec: Spec
    params: ALSParams
    model: ModelConfig
    segments: Segments
    results: list[Result]
    train_seconds: float
    scale: tuple[float, float]
    ranking: dict[str, float]
    """Top-K of the trained model at the start of the stream (:func:`ranking_figures`)."""

    def summary(self) -> dict[str, Any]:
        return {
            "protocol": self.spec.protocol,
            "spec": dataclasses.asdict(self.spec),
            "params": dataclasses.asdict(self.params),
            "model": dataclasses.asdict(self.model),
            "train_seconds": self.train_seconds,
            "rating_scale": list(self.scale),
            "observations": int(self.segments.seen.size),
            "ranking_at_stream_start": self.ranking,
            "policies": {result.policy: result.figures for result in self.results},
        }


def _scale(table: pa.Table) -> tuple[float, float]:
    ratings = table.column("rating").to_numpy()
    return float(ratings.min()), float(ratings.max())


def split(table: pa.Table, spec: Spec) -> tuple[pa.Table, pa.Table]:
    """(train, stream) of the run's protocol."""
    if spec.protocol == "random":
        return random_split(table, spec.train_share, spec.seed)
    return temporal(table, spec.train_share)


def evaluate(
    table: pa.Table,
    params: ALSParams,
    model: ModelConfig,
    spec: Spec = Spec(),
    *,
    progress: Callable[[str], ProgressBar] | None = None,
    learners: Mapping[str, Callable[[Setup], Learner]] | None = None,
) -> Evaluation:
    """Train on the protocol's first part, then replay the rest through every policy.

    ``learners`` names makers of learners from outside (a running server, a
    durable store) that take part beside :mod:`velox.evaluation.policies`;
    a learner with a ``close`` method is closed after its replay.
    """
    if spec.protocol == "per-user":
        raise InputError("the per-user protocol has its own entry point, per_user_protocol")
    train, stream = split(table, spec)
    trained, seconds = _timed_training(train, params)
    setup = Setup(
        trained, params, model, train, stream.num_rows, spec.forgetting, spec.retrain_every
    )
    segments = Segments.of(train, stream)
    scale = _scale(table)
    results = []
    for name in spec.policies:
        bar = progress(name) if progress is not None else None
        policy = learners[name](setup) if learners and name in learners else learner(name, setup)
        try:
            trace = replay(policy, stream, batch_size=spec.batch_size, progress=bar)
        finally:
            if hasattr(policy, "close"):
                policy.close()
        trace = trace.clipped(*scale)
        figures = stream_figures(trace, segments, spec)
        if isinstance(policy, RetrainLearner):
            figures["retrains"] = policy.retrains
            figures["retrain_seconds"] = policy.retrain_seconds
        results.append(Result(name, trace, figures))
    _add_improvement(results)
    ranking = ranking_figures(trained, model, train, stream, spec)
    return Evaluation(spec, params, model, segments, results, seconds, scale, ranking)


def _timed_training(train: pa.Table, params: ALSParams) -> tuple[TrainedModel, float]:
    started = time.perf_counter()
    trained = train_als(Ratings.from_table(train), params)
    return trained, time.perf_counter() - started


def stream_figures(trace: Trace, segments: Segments, spec: Spec) -> dict[str, Any]:
    """Errors overall, per window and per segment, the cold-start curve, and the cost."""
    errors = trace.errors
    warm = ~segments.new_user & ~segments.new_item
    figures: dict[str, Any] = {
        "rmse": rmse(trace.predictions, trace.ratings),
        "mae": mae(trace.predictions, trace.ratings),
        "window_rmse": window_rmse(errors, spec.windows),
        "observations_per_second": trace.rate,
    }
    for name, mask in (
        ("warm", warm),
        ("new_users", segments.new_user),
        ("new_items", segments.new_item),
    ):
        figures[f"rmse_{name}"] = rmse(errors[mask], 0.0) if mask.any() else None
        figures[f"count_{name}"] = int(mask.sum())
    curve = cold_start_curve(
        segments.seen[segments.new_user], errors[segments.new_user], spec.cold_start_upto
    )
    figures["cold_start_rmse"] = [None if np.isnan(v) else float(v) for v in curve]
    return figures


def _add_improvement(results: list[Result]) -> None:
    """Per-user RMSE improvement over the stale model: its quantiles and the share improved."""
    stale = next((r for r in results if r.policy == "stale"), None)
    if stale is None:
        return
    _, before = per_user_rmse(stale.trace.users, stale.trace.errors)
    for result in results:
        _, after = per_user_rmse(result.trace.users, result.trace.errors)
        gain = before - after
        result.figures["user_improvement"] = {
            "p10": float(np.quantile(gain, 0.1)),
            "p50": float(np.quantile(gain, 0.5)),
            "p90": float(np.quantile(gain, 0.9)),
            "share_improved": float(np.mean(gain > 0)),
        }


def ranking_figures(
    trained: TrainedModel, model: ModelConfig, train: pa.Table, stream: pa.Table, spec: Spec
) -> dict[str, float]:
    """Top-``k`` at the start of the stream against each user's later high ratings.

    Users with at least one streamed rating of ``spec.relevant`` or more are
    ranked over every item, excluding what they rated in training; plain and
    with LinUCB exploration (alpha 1).
    """
    online = trained.online_model(version="eval", config=model)
    rated: dict[str, set[str]] = {}
    train_pairs = zip(
        train.column("user").to_pylist(), train.column("item").to_pylist(), strict=True
    )
    for user, item in train_pairs:
        rated.setdefault(user, set()).add(item)
    relevant: dict[str, set[str]] = {}
    for user, item, rating in zip(
        stream.column("user").to_pylist(),
        stream.column("item").to_pylist(),
        stream.column("rating").to_numpy(),
        strict=True,
    ):
        if rating >= spec.relevant:
            relevant.setdefault(user, set()).add(item)
    figures: dict[str, float] = {}
    for explore in ("none", "ucb"):
        precision, ndcg = [], []
        for user, liked in relevant.items():
            ranked = online.topk(user, spec.k, exclude=rated.get(user, ()), explore=explore).items
            precision.append(precision_at(ranked, liked, spec.k))
            ndcg.append(ndcg_at(ranked, liked, spec.k))
        suffix = "" if explore == "none" else "_ucb"
        figures[f"precision@{spec.k}{suffix}"] = float(np.mean(precision)) if precision else 0.0
        figures[f"ndcg@{spec.k}{suffix}"] = float(np.mean(ndcg)) if ndcg else 0.0
    return figures


def per_user_protocol(
    table: pa.Table,
    params: ALSParams,
    model: ModelConfig,
    *,
    offline: int = 10,
    online: int = 7,
    batch_size: int = 64,
) -> dict[str, float]:
    """The Velox paper's protocol: how much of a full retrain's gain online updates recover.

    Scored on held-out ratings of items the offline model knows: the
    offline model alone, the same after observing each user's next
    ``online`` ratings online, and a full retrain on all ``offline +
    online`` ratings.
    """
    split = per_user(table, offline, online)
    trained = train_als(Ratings.from_table(split.train), params)
    known = set(trained.item_ids.tolist())
    held = split.held_out.filter(
        pa.array([item in known for item in split.held_out.column("item").to_pylist()])
    )
    users, items = held.column("user").to_pylist(), held.column("item").to_pylist()
    truth, scale = held.column("rating").to_numpy(), _scale(table)

    def score(trained_model: TrainedModel, learn: pa.Table | None) -> float:
        served = trained_model.online_model(version="eval", config=model)
        if learn is not None:
            replay(served, learn, batch_size=batch_size)
        return rmse(np.clip(served.predict_pairs(users, items), *scale), truth)

    offline_rmse = score(trained, None)
    online_rmse = score(trained, split.stream)
    everything = pa.concat_tables([split.train, split.stream])
    retrained_rmse = score(train_als(Ratings.from_table(everything), params), None)
    gain = offline_rmse - retrained_rmse
    return {
        "held_out": int(held.num_rows),
        "offline_rmse": offline_rmse,
        "online_rmse": online_rmse,
        "retrained_rmse": retrained_rmse,
        "recovered": (offline_rmse - online_rmse) / gain if gain > 0 else float("nan"),
    }
