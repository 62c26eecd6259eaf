"""The API's bodies as msgspec types: requests decoded and checked, answers encoded.

msgspec decodes straight into typed structs (several times faster than
``json`` plus hand checks) and says where a type is wrong (``at $.items[3]``);
the rules the types carry (``msgspec.Meta``: non-empty ids and lists,
an ``alpha`` from 0 to :data:`MAX_ALPHA`) are enforced there and appear in the OpenAPI
document, which :mod:`serving.openapi` generates from these same types. The
limits that come from the settings and the value rules the types cannot
express follow in :func:`check_ids`, :func:`check_observations` and friends.
Every failure is a :class:`RequestError` with the HTTP status and error code
to answer with; nothing is applied before the whole body has passed.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from velox.api import Explore
from velox.config import ServeConfig

Id = Annotated[str, Meta(min_length=1)] | int
"""Ids are strings; integers are accepted and turned into strings."""

MAX_ALPHA = 100.0
"""The largest exploration weight: alpha counts posterior standard deviations, and far
beyond this the bonus swamps every score (and near 1.8e308 it overflows to infinity)."""

SECONDS_PER_DAY = 86_400.0


class RequestError(Exception):
    """A client error: the status, a stable code and one sentence."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# ------------------------------------------------------------------- requests


class PredictBody(Struct, forbid_unknown_fields=True):
    """Scores of ``items`` for ``user``."""

    user: Id
    items: Annotated[list[Id], Meta(min_length=1)]


class TopKBody(Struct, forbid_unknown_fields=True):
    """The ``k`` best items for ``user``: of ``candidates``, or of every item."""

    user: Id
    k: int
    candidates: list[Id] | None = None
    explore: Explore = "none"
    alpha: Annotated[float, Meta(ge=0, le=MAX_ALPHA)] = 1.0
    include_rated: bool = False


class ObservationBody(Struct, forbid_unknown_fields=True):
    """One rating; ``ts`` (seconds since the epoch) defaults to its arrival.

    ``ts`` must lie within ``serve.ts_window_days`` of the server's clock.
    """

    user: Id
    item: Id
    rating: float
    ts: float | None = None


class RetrainRequest(Struct, forbid_unknown_fields=True):
    """``POST /retrain``: start a retrain now, whatever the policies say.

    ``force`` activates the candidate even when the gate rejects it; ``reason``
    is recorded with the run.
    """

    force: bool = False
    reason: str = ""


Observations = ObservationBody | Annotated[list[ObservationBody], Meta(min_length=1)]
"""What ``POST /observe`` takes: one observation or a non-empty list."""

PREDICT = msgspec.json.Decoder(PredictBody)
TOPK = msgspec.json.Decoder(TopKBody)
OBSERVE = msgspec.json.Decoder(Observations)
RETRAIN = msgspec.json.Decoder(RetrainRequest)
"""Decoders built once: msgspec caches a plain type's plan, but a union written in
the call (``A | list[A]``) is a new object every time, planned again per request."""


# -------------------------------------------------------------------- answers


class ScoredItem(Struct):
    item: str
    score: float
    cold: bool
    """Whether the version's features do not know the item (it is folded in online)."""


class Scores(Struct):
    """The answer of ``/predict`` and ``/topk``; ``degraded``: the prior's, for lack of time."""

    user: str
    version: str
    items: list[ScoredItem]
    degraded: bool


class Observed(Struct):
    """Durably applied observations: their log positions and the predictions made before."""

    accepted: int
    seqs: list[int]
    predictions: list[float]
    cold: list[bool]


class UserSummary(Struct):
    user: str
    known: bool
    observations: int
    version: str
    last_update: float
    weights: list[float]


class Forgotten(Struct):
    """What forgetting a user removed."""

    user: str
    deleted: bool
    log_records: int
    offline_rows: int
    registry_rows: int


class VersionSummary(Struct):
    version: str
    state: str
    created: str
    engine: str
    mode: str
    watermark: int
    metrics: dict[str, float]


class TimeWindowReport(Struct):
    """The prequential RMSE of the observations whose ts fell in one time window."""

    start: float
    count: int
    rmse: float


class MonitorReport(Struct):
    """How stale the served version is (``serving.monitor.MonitorSnapshot``, field by field)."""

    version: str | None
    age_seconds: float | None
    watermark: int
    observations_since_watermark: int
    new_users_since_watermark: int
    rolling_rmse: float | None
    rolling_count: int
    first_rmse: float | None
    first_count: int
    validation_rmse: float | None
    reference_rmse: float | None
    degradation: float | None
    windows: list[TimeWindowReport]
    window: int


Trigger = Literal[
    "degradation",
    "observations",
    "new_users",
    "age",
    "cron",
    "manual",
    "retry",
    "none",
    "running",
    "min_interval",
    "backoff",
    "retries_exhausted",
    "disabled",
]
"""Why a retrain runs (the first five, manual, retry) or why it does not (the others)."""

Outcome = Literal["succeeded", "rejected", "failed", "timed_out", "killed", "abandoned"]
"""How a retrain ended; "rejected": the gate kept the active version."""


class DecisionReport(Struct):
    """A policy decision: whether a retrain runs, which trigger, why, and when (epoch s)."""

    trigger: Trigger
    run: bool
    reason: str
    at: float


class GateReport(Struct):
    """Both versions' prequential RMSE over the same replayed observations."""

    active_rmse: float
    candidate_rmse: float
    observations: int


class RunReport(Struct):
    """One retrain: how it ended, the version it built, its phases' seconds and its job log."""

    id: str
    outcome: Outcome | None
    """None while it runs."""
    reason: str
    version: str | None
    started: float
    finished: float | None
    phases: dict[str, float]
    gate: GateReport | None
    log: str | None
    """Path of the training job's output."""


class RetrainReport(Struct):
    """The retrain loop: whether it acts alone, what runs now, and what was last decided and run."""

    enabled: bool
    running: bool
    phase: str | None
    last_decision: DecisionReport | None
    last_run: RunReport | None
    next_retry: float | None
    """When a failed retrain is tried again (epoch s), or None."""


class RetrainAccepted(Struct):
    """``POST /retrain``'s answer: the run it started, or the one already running."""

    id: str
    status: Literal["started", "running"]
    reason: str


class Models(Struct):
    """The registry's versions, the one its pointer names, and the one this server serves."""

    active: str | None
    serving: str
    lagging: bool
    problem: str | None
    versions: list[VersionSummary]
    monitor: MonitorReport | None = None
    retrain: RetrainReport | None = None


class Activated(Struct):
    active: str


class Status(Struct, omit_defaults=True):
    status: str
    version: str | None = None
    details: str | None = None
    """What a ready server still reports: the last retrain's failure, while it is the last."""


class ErrorBody(Struct):
    """Every 4xx and 5xx answer: a stable code and one sentence."""

    error: str
    message: str


def decode(body: bytes, decoder: msgspec.json.Decoder) -> object:
    """Decode JSON with ``decoder``; a 400 that says what and where when it does not fit."""
    if not body:
        raise RequestError(400, "invalid_json", "the request body is empty; send a JSON object")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise RequestError(422, "validation_error", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise RequestError(400, "invalid_json", f"the body is not valid JSON ({exc})") from None


def check_ids(
    values: list[Id], what: str, limits: ServeConfig, *, empty: bool = False
) -> list[str]:
    """Ids as strings, within the list and length limits."""
    if not values and not empty:
        raise RequestError(422, "validation_error", f"{what} must not be empty")
    if len(values) > limits.max_list:
        raise RequestError(
            422, "validation_error", f"{what} has {len(values)} entries; at most {limits.max_list}"
        )
    return [check_id(value, what, limits) for value in values]


def check_id(value: Id, what: str, limits: ServeConfig) -> str:
    text = str(value)
    if "\0" in text:
        raise RequestError(422, "validation_error", f"{what} ids must not contain NUL characters")
    if not text.isascii():  # (an undecodable header or path keeps its bytes as lone surrogates)
        try:
            text.encode()
        except UnicodeEncodeError:
            raise RequestError(
                422, "validation_error", f"{what} ids must be valid UTF-8 text"
            ) from None
    if not text or len(text) > limits.max_id_length:
        raise RequestError(
            422,
            "validation_error",
            f"{what} ids must have 1 to {limits.max_id_length} characters, got {len(text)}",
        )
    return text


def check_topk(body: TopKBody, limits: ServeConfig) -> None:
    if not 1 <= body.k <= limits.max_k:
        raise RequestError(422, "validation_error", f"k must be 1 to {limits.max_k}, got {body.k}")


def check_observations(
    observations: list[ObservationBody], limits: ServeConfig, now: float
) -> tuple[list[str], list[str], list[float], list[float]]:
    """Columns of a valid observe body, a missing ``ts`` set to ``now``.

    The first bad observation is named by its index. A ``ts`` is kept within
    ``serve.ts_window_days`` of ``now``: times far from the clock are mistakes
    (milliseconds sent as seconds) or attacks (``1e300`` overflows the offline
    store's timestamps), never real observations.
    """
    if len(observations) > limits.max_list:
        raise RequestError(
            422,
            "validation_error",
            f"{len(observations)} observations in one request; at most {limits.max_list}",
        )
    low, high = limits.rating_min, limits.rating_max
    window = limits.ts_window_days * SECONDS_PER_DAY
    for n, o in enumerate(observations):
        if not (math.isfinite(o.rating) and low <= o.rating <= high):
            raise RequestError(
                422,
                "validation_error",
                f"observation {n}: rating must be a finite number in [{low:g}, {high:g}], "
                f"got {o.rating}",
            )
        if o.ts is not None and not abs(o.ts - now) <= window:  # (False for NaN)
            raise RequestError(
                422,
                "validation_error",
                f"observation {n}: ts must be seconds since the epoch within "
                f"{limits.ts_window_days:g} days of the server's clock ({now:.0f}), got {o.ts}",
            )
    return (
        [check_id(o.user, "user", limits) for o in observations],
        [check_id(o.item, "item", limits) for o in observations],
        [o.rating for o in observations],
        [now if o.ts is None else o.ts for o in observations],
    )
