"""The aiohttp application: the routes of DESIGN.md section 5 and the lifecycles behind them.

``create_app(config)`` builds the app. Cleanup contexts, in order: the model
over its store (opened under the registry's active version, closed last),
the observe path (:mod:`serving.observe`; drained first on shutdown), and
the follower of the registry's pointer (:mod:`serving.versions`). What
every route shares (tokens, errors as JSON, request metrics) is in
:mod:`serving.http`, the deadline policy of reads in :mod:`serving.deadline`.

Reads (``/predict``, ``/topk``, ``GET /users``) run on the event loop: they
take the model lock for one small computation, and predicts of one loop turn
share one model call (:class:`~serving.batcher.ReadBatcher`). Observations
go through the micro-batcher, which applies and commits them a batch at a time.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time

import numpy as np
from aiohttp import web

from feature_store.layout import DataLayout
from feature_store.registry import ModelRegistry
from feature_store.versions import open_active
from serving.batcher import ReadBatcher
from serving.deadline import Deadline, ScoreColumns, as_scores, prior_scores
from serving.http import (
    ADMIN,
    LIMITS,
    METRICS,
    READ,
    STARTED,
    WRITE,
    Route,
    add_routes,
    error_response,
    json_response,
)
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serving.metrics import Metrics, ModelFigures
from serving.monitor import monitor_report
from serving.observe import Observations
from serving.openapi import openapi_document
from serving.retrain import Retrainer
from serving.schemas import (
    OBSERVE,
    PREDICT,
    RETRAIN,
    TOPK,
    Activated,
    Forgotten,
    Models,
    ObservationBody,
    RequestError,
    RetrainAccepted,
    RetrainRequest,
    ScoredItem,
    Scores,
    Status,
    UserSummary,
    VersionSummary,
    check_id,
    check_ids,
    check_observations,
    check_topk,
    decode,
)
from serving.state import STATE, Serving
from serving.versions import VersionSwitch
from velox import kernels
from velox.backend import get_backend
from velox.config import VeloxConfig
from velox.errors import DataError

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", VeloxConfig)
READS = web.AppKey("reads", ReadBatcher)


# ----------------------------------------------------------------------- reads


async def predict(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = decode(await request.read(), PREDICT)
    user = check_id(body.user, "user", state.limits)
    items = check_ids(body.items, "items", state.limits)
    prediction = await request.app[READS].submit(user, items, request[STARTED])
    if prediction is None:
        fallback = state.deadline.degraded("/predict", lambda: prior_scores(state.durable, items))
        return _scores_response(state, user, fallback, degraded=True)
    return _scores_response(state, user, as_scores(prediction), degraded=False)


def _predict_batch(state: Serving, users: list, item_lists: list, oldest: float) -> list:
    """One model call for the predicts of a loop turn; None for each when it would be late."""
    predictions = state.deadline.attempt(
        oldest,
        state.gate.open,
        lambda timeout: state.durable.predict_many(users, item_lists, timeout=timeout),
    )
    return [None] * len(users) if predictions is None else predictions


async def topk(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = decode(await request.read(), TOPK)
    check_topk(body, state.limits)
    user = check_id(body.user, "user", state.limits)
    candidates = None
    if body.candidates is not None:
        # De-duplicated, the first occurrence kept: one item is one result.
        candidates = list(
            dict.fromkeys(check_ids(body.candidates, "candidates", state.limits, empty=True))
        )
    exclude = set() if body.include_rated else state.durable.rated(user)

    def compute(timeout: float | None):
        return state.durable.topk(
            user,
            body.k,
            candidates=candidates,
            exclude=exclude,
            explore=body.explore,
            alpha=body.alpha,
            timeout=timeout,
        )

    def fallback() -> ScoreColumns:
        every = candidates if candidates is not None else state.durable.model.every_item()
        keys = [k for k in every if k not in exclude]
        _, scores, cold = prior_scores(state.durable, keys)
        top = np.argsort(-scores, kind="stable")[: body.k]
        return [keys[i] for i in top], scores[top], cold[top]

    result, degraded = state.deadline.answer(
        "/topk", request[STARTED], state.gate.open, compute, fallback
    )
    return _scores_response(state, user, result, degraded)


def _scores_response(
    state: Serving, user: str, result: ScoreColumns, degraded: bool
) -> web.Response:
    items, scores, cold = result
    scored = [
        ScoredItem(i, float(s), bool(c))
        for i, s, c in zip(items, scores.tolist(), cold.tolist(), strict=True)
    ]
    return json_response(Scores(user, state.durable.model.version, scored, degraded))


async def get_user(request: web.Request) -> web.Response:
    state = request.app[STATE]
    user = check_id(request.match_info["user"], "user", state.limits)
    if not state.gate.open:
        raise RequestError(503, "unavailable", "a model switch or deletion is in progress; retry")
    info = state.durable.user_state(user)
    return json_response(
        UserSummary(
            info.user,
            info.known,
            info.observations,
            info.version,
            info.last_update,
            info.weights.tolist(),
        )
    )


# ---------------------------------------------------------------------- writes


async def observe(request: web.Request) -> web.Response:
    state = request.app[STATE]
    raw = await request.read()
    body = decode(raw, OBSERVE)
    observations = [body] if isinstance(body, ObservationBody) else body
    columns = check_observations(observations, state.limits, time.time())
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return json_response(await state.observations.submit(columns))
    key = check_id(key, "Idempotency-Key", state.limits)
    answer, replayed = await state.observations.once(key, raw, columns)
    response = json_response(answer)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def delete_user(request: web.Request) -> web.Response:
    """Forget a user everywhere (the path ``velox store forget`` takes too)."""
    state = request.app[STATE]
    user = check_id(request.match_info["user"], "user", state.limits)
    forgotten = await state.gate.exclusive(state.durable.delete_user, user)
    state.versions.forget(user)  # a candidate being built drops them too
    return json_response(
        Forgotten(
            user, True, forgotten.log_records, forgotten.offline_rows, forgotten.registry_rows
        )
    )


# ---------------------------------------------------------------------- models


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    versions = await asyncio.get_running_loop().run_in_executor(None, state.registry.versions)
    active = next((v.name for v in versions if v.state == "active"), None)
    serving = state.durable.model.version
    summaries = [
        VersionSummary(v.name, v.state, v.created, v.engine, v.mode, v.watermark, v.metrics)
        for v in versions
    ]
    lagging = active is not None and active != serving
    retrainer = state.retrainer
    return json_response(
        Models(
            active,
            serving,
            lagging,
            state.versions.problem,
            summaries,
            monitor_report(retrainer.monitor.snapshot()),
            retrainer.report(),
        )
    )


async def activate(request: web.Request) -> web.Response:
    """Serve a ready version, then make it the registry's active one."""
    state = request.app[STATE]
    name = request.match_info["version"]
    if not re.fullmatch(r"v[0-9]{1,9}", name):
        raise RequestError(404, "not_found", f"no model version {name!r}; versions look like v3")
    try:
        version = state.registry.get(int(name[1:]))
    except DataError as exc:
        raise RequestError(404, "not_found", str(exc)) from None
    if version.state not in ("ready", "active"):
        raise RequestError(
            409, "conflict", f"{version.name} is {version.state}; only a ready version can serve"
        )
    await state.versions.activate(version)
    return json_response(Activated(version.name))


async def retrain(request: web.Request) -> web.Response:
    """Start a retrain now (202), or say which one already runs (200): :mod:`serving.retrain`."""
    state = request.app[STATE]
    raw = await request.read()
    body = decode(raw, RETRAIN) if raw.strip() else RetrainRequest()
    run, decision = state.retrainer.request(body.reason, force=body.force)
    if not decision.run:
        return json_response(RetrainAccepted(run.id, "running", decision.reason))
    return json_response(RetrainAccepted(run.id, "started", decision.reason), status=202)


# --------------------------------------------------------------------- service


async def healthz(request: web.Request) -> web.Response:
    return json_response(Status("ok"))


async def readyz(request: web.Request) -> web.Response:
    """Ready once the model is loaded, and while its store takes writes (else 503, the reason)."""
    state = request.app.get(STATE)
    if state is None or state.observations is None:
        return error_response(503, "unavailable", "the model is not loaded yet")
    problem = state.durable.problem
    if problem is not None:
        return error_response(503, "unavailable", problem)
    details = state.retrainer.failure() if state.retrainer is not None else None
    return json_response(Status("ready", state.durable.model.version, details))


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())


ROUTES: list[Route] = [
    ("/predict", "POST", predict, READ),
    ("/topk", "POST", topk, READ),
    ("/observe", "POST", observe, WRITE),
    ("/users/{user}", "GET", get_user, READ),
    ("/users/{user}", "DELETE", delete_user, WRITE),
    ("/models", "GET", models, READ),
    ("/models/{version}/activate", "POST", activate, ADMIN),
    ("/retrain", "POST", retrain, ADMIN),
    ("/healthz", "GET", healthz, None),
    ("/readyz", "GET", readyz, None),
    ("/metrics", "GET", metrics, None),
    ("/openapi.json", "GET", openapi, None),
]


# ------------------------------------------------------------------- lifecycle


async def _model_ctx(app: web.Application):
    config = app[CONFIG]
    backend = get_backend(config.compute.device)
    durable, version = await asyncio.get_running_loop().run_in_executor(
        None, open_active, config, backend
    )
    kernels.warm_up(config.model.dtype)
    registry = ModelRegistry(DataLayout.from_config(config).registry)
    metrics = app[METRICS]
    app[STATE] = state = Serving(
        config, durable, registry, metrics, Deadline(config.serve.deadline_ms, metrics)
    )
    state.versions = VersionSwitch(state, version.name, backend)
    state.retrainer = Retrainer(state, state.versions)
    state.retrainer.start_monitoring(version)
    metrics.read_model(lambda: _figures(state))
    app[READS] = ReadBatcher(
        lambda users, lists, oldest: _predict_batch(state, users, lists, oldest)
    )
    log.info("serving model %s", version.name)
    yield
    await asyncio.get_running_loop().run_in_executor(None, state.durable.close)


def _figures(state: Serving) -> ModelFigures:
    durable = state.durable
    return ModelFigures(
        durable.cache_hits,
        durable.cache_misses,
        durable.failures,
        durable.problem is not None,
        state.observations.batcher.waiting if state.observations else 0,
        durable.latest_export(),
    )


async def _observe_ctx(app: web.Application):
    state = app[STATE]
    state.observations = Observations(state)
    state.observations.start()
    yield
    await state.observations.close()


def _follow_ctx(every: float):
    """Follow the registry's pointer every ``every`` seconds (0: only when asked)."""

    async def follow(app: web.Application):
        if not every:
            yield
            return
        versions = app[STATE].versions
        follower = asyncio.get_running_loop().create_task(
            versions.follow(every), name="velox-follow-pointer"
        )
        yield
        await versions.stop(follower)

    return follow


async def _retrain_ctx(app: web.Application):
    """The retrain loop: a policy check every ``retrain.check_interval``, runs resumed."""
    retrainer = app[STATE].retrainer
    retrainer.resume()
    watcher = asyncio.get_running_loop().create_task(retrainer.watch(), name="velox-retrain")
    yield
    await retrainer.stop(watcher)


async def _settled_ctx(app: web.Application):
    """Once everything is loaded, hide the objects that live as long as the server from the GC.

    Modules, compiled kernels and the model's tables are a few hundred
    thousand objects that CPython's cyclic collector walks at every full
    collection, on the event loop: measured at 86-110 ms per collection, once
    every 20-30 s under observe load, each a stall of every request in flight.
    Frozen (``gc.freeze``), they are no longer walked; what requests create
    is collected as before.
    """
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def create_app(config: VeloxConfig) -> web.Application:
    """The serving application for ``config`` (the model loads when the app starts).

    The server reads the registry's pointer every ``serve.follow_interval``
    seconds and switches when it moved; with 0 it switches only through its
    own route (tests that move the pointer themselves call
    :meth:`VersionSwitch.check`).
    """
    app = web.Application(client_max_size=config.serve.max_body_bytes)
    app[CONFIG] = config
    app[LIMITS] = config.serve
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_model_ctx)
    app.cleanup_ctx.append(_observe_ctx)
    app.cleanup_ctx.append(_follow_ctx(config.serve.follow_interval))
    app.cleanup_ctx.append(_retrain_ctx)
    app.cleanup_ctx.append(_settled_ctx)
    add_routes(app.router, ROUTES)
    return app
