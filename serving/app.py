"""The aiohttp application: routes of DESIGN.md section 5, endpoints, lifecycles.

``create_app(config)`` builds the app; its state lives under typed
``web.AppKey``s. One cleanup context opens the online store under the active
model version (and closes it last), another runs the micro-batcher (and
drains it first on shutdown). Each route's endpoint wrapper turns every
error into ``{"error", "message"}`` with its status, checks bearer tokens,
and times the request into the metrics; other paths and methods get JSON
404 and 405 answers.

Reads (``/predict``, ``/topk``, ``GET /users``) run on the event loop: they
take the model lock for one small computation. Observations go through the
batcher, which applies and commits them a micro-batch at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import numpy as np
from aiohttp import web

from feature_store.codec import decode_log
from feature_store.durable import Busy, DurableModel, Replaced
from feature_store.layout import DataLayout
from feature_store.offline import OfflineStore
from feature_store.online import Receipt
from feature_store.registry import ModelRegistry
from feature_store.versions import open_active, serve_version
from serving.batcher import Closed, MicroBatcher, ReadBatcher
from serving.metrics import Metrics
from serving.openapi import openapi_document
from serving.schemas import (
    OBSERVE,
    PREDICT,
    TOPK,
    ObservationBody,
    RequestError,
    check_id,
    check_ids,
    check_observations,
    check_topk,
    decode,
)
from velox import kernels
from velox.backend import get_backend
from velox.config import ServeConfig, VeloxConfig
from velox.errors import DataError, InputError, VeloxError

log = logging.getLogger(__name__)


@dataclass
class Serving:
    """What the handlers share: the model over its store, the batcher, the metrics."""

    config: VeloxConfig
    durable: DurableModel
    registry: ModelRegistry
    metrics: Metrics
    batcher: MicroBatcher | None = None
    reads: ReadBatcher | None = None
    swap_lock: asyncio.Lock | None = None
    open_for_writes: asyncio.Event | None = None
    """Cleared while a version switch or a deletion holds the model (they run in threads)."""
    exclusive: int = 0
    """How many of those are running."""
    idempotent: dict = field(default_factory=dict)
    """Idempotency key -> (body digest, future answer) of keyed observes not yet answered."""
    compute_seconds: float = 0.0005
    """Running estimate of a read's compute time, for the deadline check."""

    @property
    def limits(self) -> ServeConfig:
        return self.config.serve


CONFIG = web.AppKey("config", VeloxConfig)
STATE = web.AppKey("state", Serving)
METRICS = web.AppKey("metrics", Metrics)
STARTED = web.RequestKey("started", float)

READ, WRITE, ADMIN = "read", "write", "admin"


def _json(payload: object, status: int = 200) -> web.Response:
    """A JSON response encoded by msgspec (several times faster than ``json.dumps``)."""
    return web.Response(
        body=msgspec.json.encode(payload), status=status, content_type="application/json"
    )


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": code, "message": message}, status=status)


# ------------------------------------------------------------------- endpoints

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _endpoint(route: str, handler: Handler, scope: str | None) -> Handler:
    """``handler`` with what every request needs: clock, bearer token, errors as JSON, metrics.

    A wrapper per route rather than an aiohttp middleware: the route and its
    scope are known here once, and aiohttp then calls the endpoint directly
    (a middleware chain adds two coroutine layers and a current-app switch to
    every request, which showed in the profile of a one-item predict).
    """

    async def endpoint(request: web.Request) -> web.StreamResponse:
        request[STARTED] = started = time.monotonic()
        app = request.app
        try:
            if scope is not None:
                _authorize(request, scope, app[CONFIG].serve)
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _http_error(request, exc)
        except Exception as exc:
            response = _error_response(request, exc)
        app[METRICS].request(route, response.status, time.monotonic() - started)
        return response

    return endpoint


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[CONFIG].serve.max_body_bytes
        return _error(413, "payload_too_large", f"the body is larger than {limit} bytes")
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "bad_request")
    return _error(exc.status, code, exc.reason)


def _error_response(request: web.Request, exc: Exception) -> web.Response:
    """Every failure as ``{"error", "message"}``; a server fault is logged, never leaked."""
    if isinstance(exc, RequestError):
        return _error(exc.status, exc.code, exc.message)
    if isinstance(exc, InputError):
        return _error(422, "validation_error", str(exc))
    if isinstance(exc, Closed | Busy):
        return _error(503, "unavailable", str(exc))
    if isinstance(exc, VeloxError):  # the detail (paths, storage errors) stays in the log
        log.error("request failed: %s", exc)
        return _error(503, "unavailable", "the service cannot answer now; see the server log")
    log.exception("unexpected error in %s %s", request.method, request.path, exc_info=exc)
    return _error(500, "internal", "an unexpected error occurred; see the server log")


def _authorize(request: web.Request, scope: str, limits: ServeConfig) -> None:
    tokens = {READ: limits.read_token, WRITE: limits.write_token, ADMIN: limits.admin_token}
    allowed = {READ: (READ, WRITE, ADMIN), WRITE: (WRITE, ADMIN), ADMIN: (ADMIN,)}[scope]
    if not tokens[scope]:
        return  # this access is open
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        raise RequestError(401, "unauthorized", "this route needs 'Authorization: Bearer <token>'")
    given = header.removeprefix("Bearer ").strip().encode()
    held = [
        name
        for name, token in tokens.items()
        if token and hmac.compare_digest(given, token.encode())
    ]
    if not held:
        raise RequestError(401, "unauthorized", "the bearer token is not valid")
    if not any(name in allowed for name in held):
        raise RequestError(403, "forbidden", f"this route needs a token with {scope} access")


# -------------------------------------------------------------------- handlers


async def predict(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = decode(await request.read(), PREDICT)
    user = check_id(body.user, "user", state.limits)
    items = check_ids(body.items, "items", state.limits)
    prediction = await state.reads.submit(user, items, request[STARTED])
    degraded = prediction is None
    if degraded:
        state.metrics.degraded.inc(route="/predict")
        result = _prior_scores(state.durable, items)
    else:
        result = _as_tuple(prediction)
    return _scores_response(state, user, result, degraded)


def _predict_batch(state: Serving, users: list, item_lists: list, oldest: float) -> list:
    """One model call for the predict requests of a loop turn; None where the deadline is missed."""
    if not state.open_for_writes.is_set():  # a switch or deletion holds the model
        return [None] * len(users)
    limit = state.limits.deadline_ms / 1000
    timeout = None
    if limit > 0:
        timeout = limit - (time.monotonic() - oldest) - state.compute_seconds
        if timeout <= 0:
            return [None] * len(users)
    try:
        return state.durable.predict_many(users, item_lists, timeout=timeout)
    except Busy:
        return [None] * len(users)


async def topk(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = decode(await request.read(), TOPK)
    check_topk(body, state.limits)
    user = check_id(body.user, "user", state.limits)
    candidates = None
    if body.candidates is not None:
        candidates = check_ids(body.candidates, "candidates", state.limits, empty=True)
    exclude = set() if body.include_rated else state.durable.rated(user)

    def compute(timeout):
        return state.durable.topk(
            user,
            body.k,
            candidates=candidates,
            exclude=exclude,
            explore=body.explore,
            alpha=body.alpha,
            timeout=timeout,
        )

    def fallback():
        every = candidates if candidates is not None else state.durable.model.every_item()
        keys = [k for k in every if k not in exclude]
        ranked = _prior_scores(state.durable, keys)
        top = np.argsort(-ranked[1], kind="stable")[: body.k]
        return [keys[i] for i in top], ranked[1][top], ranked[2][top]

    result, degraded = _within_deadline(request, state, compute, fallback)
    response = _scores_response(state, user, result, degraded)
    return response


def _within_deadline(request, state: Serving, compute, fallback):
    """The model's answer, or the prior's when the deadline would be missed (Clipper-style)."""
    limit = state.limits.deadline_ms / 1000
    if not state.open_for_writes.is_set():  # a switch or deletion holds the model
        return fallback(), True
    if limit <= 0:
        return _as_tuple(compute(None)), False
    left = limit - (time.monotonic() - request[STARTED]) - state.compute_seconds
    if left > 0:
        began = time.perf_counter()
        try:
            result = compute(left)
        except Busy:
            pass
        else:
            spent = time.perf_counter() - began
            state.compute_seconds = 0.9 * state.compute_seconds + 0.1 * spent
            return _as_tuple(result), False
    route = request.match_info.route.resource.canonical
    state.metrics.degraded.inc(route=route)
    return fallback(), True


def _as_tuple(prediction) -> tuple[list[str], np.ndarray, np.ndarray]:
    return prediction.items, prediction.scores, prediction.cold


def _prior_scores(durable: DurableModel, items: list[str]):
    """``mu + b_i``: the answer for any user when there is no time to ask the model."""
    model = durable.model
    scores = model.biases.mean + model.biases.bias(model.biases.find(items))
    return items, scores, model.features.lookup(items) < 0


def _scores_response(state: Serving, user: str, result, degraded: bool) -> web.Response:
    items, scores, cold = result
    return _json(
        {
            "user": user,
            "version": state.durable.model.version,
            "items": [
                {"item": i, "score": float(s), "cold": bool(c)}
                for i, s, c in zip(items, scores, cold, strict=True)
            ],
            "degraded": degraded,
        }
    )


async def observe(request: web.Request) -> web.Response:
    state = request.app[STATE]
    raw = await request.read()
    body = decode(raw, OBSERVE)
    observations = [body] if isinstance(body, ObservationBody) else body
    users, items, ratings, ts = check_observations(observations, state.limits)
    now = time.time()
    ts = [now if t is None else t for t in ts]
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        return await _observe_once(
            state, check_id(key, "Idempotency-Key", state.limits), raw, (users, items, ratings, ts)
        )
    (seqs, predictions, cold), part = await state.batcher.submit(users, items, ratings, ts)
    return _json(_observed(seqs[part], predictions[part], cold[part]))


def _observed(seqs: list, predictions: list, cold: list) -> dict:
    return {"accepted": len(seqs), "seqs": seqs, "predictions": predictions, "cold": cold}


async def _observe_once(state: Serving, key: str, raw: bytes, columns: tuple) -> web.Response:
    """An observe sent with an idempotency key: applied once, however often it is retried.

    The key's receipt (the body's digest and the log records it became) is
    written with those records, so a retry after an answer that got lost or
    a crash gets the first answer again, flagged by an ``Idempotent-Replayed``
    header, instead of applying the observations twice. A retry while the
    first is still in its batch waits for it; one whose records are logged
    but not yet fsynced (the first attempt failed mid-way) gets a 503 until
    they are on disk (after a failed fsync: until the store is reopened).
    """
    digest = hashlib.blake2b(raw, digest_size=16).digest()
    running = state.idempotent.get(key)
    if running is not None:
        if running[0] != digest:
            raise _key_reused(key)
        return _replayed(await asyncio.shield(running[1]))
    receipt = state.durable.store.receipt(key)
    if receipt is not None:
        if receipt.digest != digest:
            raise _key_reused(key)
        if receipt.first + receipt.count - 1 > state.durable.store.synced_seq:
            # Logged but not fsynced: the first attempt failed or was dropped mid-way.
            raise RequestError(
                503, "unavailable", "this request is logged but not yet known to be on disk; retry"
            )
        return _replayed(_from_log(state, receipt))
    answer = asyncio.get_running_loop().create_future()
    state.idempotent[key] = (digest, answer)
    try:
        (seqs, predictions, cold), part = await state.batcher.submit(*columns, tag=(key, digest))
        answer.set_result(_observed(seqs[part], predictions[part], cold[part]))
    except BaseException as exc:  # retries waiting on it fail too (and may retry again)
        failure = exc if isinstance(exc, Exception) else Closed("the first request was cancelled")
        answer.set_exception(failure)
        answer.exception()  # retrieved, whether or not a retry was waiting
        raise
    finally:
        del state.idempotent[key]
    return _json(answer.result())


def _key_reused(key: str) -> RequestError:
    return RequestError(
        422, "idempotency_key_reused", f"Idempotency-Key {key!r} came with another body"
    )


def _replayed(answer: dict) -> web.Response:
    response = _json(answer)
    response.headers["Idempotent-Replayed"] = "true"
    return response


def _from_log(state: Serving, receipt) -> dict:
    """The first answer to an idempotent request, rebuilt from its log records."""
    records = state.durable.store.records(receipt.first, receipt.count)
    if records is None:
        raise RequestError(
            410, "gone", "the observations of this request were deleted with their user"
        )
    runs = decode_log(records)
    return _observed(
        list(range(receipt.first, receipt.first + receipt.count)),
        [p for run in runs for p in run.predictions.tolist()],
        [c for run in runs for c in run.cold.tolist()],
    )


async def get_user(request: web.Request) -> web.Response:
    state = request.app[STATE]
    user = check_id(request.match_info["user"], "user", state.limits)
    if not state.open_for_writes.is_set():
        raise RequestError(503, "unavailable", "a model switch or deletion is in progress; retry")
    info = state.durable.user_state(user)
    return _json(
        {
            "user": info.user,
            "known": info.known,
            "observations": info.observations,
            "version": info.version,
            "last_update": info.last_update,
            "weights": info.weights.tolist(),
        }
    )


async def delete_user(request: web.Request) -> web.Response:
    state = request.app[STATE]
    user = check_id(request.match_info["user"], "user", state.limits)
    loop = asyncio.get_running_loop()
    logged = await _exclusive(state, state.durable.delete_user, user)
    layout = DataLayout.from_config(state.config)
    stored = 0
    if layout.offline.is_dir():
        stored = await loop.run_in_executor(None, OfflineStore(layout.offline).delete_user, user)
    return _json({"user": user, "deleted": True, "log_records": logged, "offline_rows": stored})


async def models(request: web.Request) -> web.Response:
    registry = request.app[STATE].registry
    versions = registry.versions()
    active = next((v.name for v in versions if v.state == "active"), None)
    return _json(
        {
            "active": active,
            "serving": request.app[STATE].durable.model.version,
            "versions": [
                {
                    "version": v.name,
                    "state": v.state,
                    "created": v.created,
                    "engine": v.engine,
                    "mode": v.mode,
                    "watermark": v.watermark,
                    "metrics": v.metrics,
                }
                for v in versions
            ],
        }
    )


async def activate(request: web.Request) -> web.Response:
    """Switch to a ready version: install it over the store, then swap, then point at it."""
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
    async with state.swap_lock:
        if version.name != state.durable.model.version:
            await _exclusive(state, _swap, state, version)
        state.registry.activate(version.number)
    return _json({"active": version.name})


async def _exclusive(state: Serving, work, *args):
    """Run ``work`` in a thread while batches wait in the queue (not on a lock in the loop).

    Batches are applied on the loop, so none is half applied when the gate
    closes; it opens again when the last of overlapping exclusive works ends.
    """
    state.exclusive += 1
    state.open_for_writes.clear()
    try:
        return await asyncio.get_running_loop().run_in_executor(None, work, *args)
    finally:
        state.exclusive -= 1
        if not state.exclusive:
            state.open_for_writes.set()


def _swap(state: Serving, version) -> None:
    """Install ``version`` over the store while reads and writes wait, then serve it.

    Reads in the meantime get the prior's answer (flagged degraded) when a
    deadline is set; writes wait and are then applied by the new version.
    """
    old = state.durable
    with old.handing_over(f"model {old.model.version} was replaced by {version.name}"):
        state.durable = serve_version(
            version, state.registry, old.store, state.config, old.model.backend
        )
    state.metrics.active.values.clear()
    state.metrics.active.set(1, version=version.name)


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app.get(STATE)
    if state is None or state.batcher is None:
        return _error(503, "unavailable", "the model is not loaded yet")
    return _json({"status": "ready", "version": state.durable.model.version})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.metrics.queue_depth.set(state.batcher.waiting if state.batcher else 0)
    state.metrics.cache.values.clear()
    state.metrics.cache.inc(state.durable.cache_hits, result="hit")
    state.metrics.cache.inc(state.durable.cache_misses, result="miss")
    return web.Response(text=state.metrics.render(), content_type="text/plain", charset="utf-8")


async def openapi(request: web.Request) -> web.Response:
    return _json(openapi_document())


# ------------------------------------------------------------------- lifecycle


async def _model_ctx(app: web.Application):
    config = app[CONFIG]
    backend = get_backend(config.compute.device)
    durable, version = await asyncio.get_running_loop().run_in_executor(
        None, open_active, config, backend
    )
    kernels.warm_up(config.model.dtype)
    metrics = app[METRICS]
    metrics.active.set(1, version=version.name)
    layout = DataLayout.from_config(config)
    app[STATE] = state = Serving(
        config,
        durable,
        ModelRegistry(layout.registry),
        metrics,
        swap_lock=asyncio.Lock(),
        open_for_writes=asyncio.Event(),
    )
    state.open_for_writes.set()
    state.reads = ReadBatcher(
        lambda users, lists, oldest: _predict_batch(state, users, lists, oldest)
    )
    log.info("serving model %s", version.name)
    yield
    await asyncio.get_running_loop().run_in_executor(None, app[STATE].durable.close)


async def _batcher_ctx(app: web.Application):
    state = app[STATE]
    metrics = state.metrics

    def apply(users, items, ratings, ts, tags):
        receipts = [Receipt(key, digest, first, n) for (key, digest), first, n in tags]
        try:
            applied, seqs = state.durable.observe(
                users, items, ratings, ts, sync=False, receipts=receipts
            )
        except Replaced:  # a version switch finished while this batch waited: use the new one
            applied, seqs = state.durable.observe(
                users, items, ratings, ts, sync=False, receipts=receipts
            )
        errors = applied.predictions - applied.ratings
        metrics.prequential_sse.inc(float(np.sum(errors**2)), version=applied.version)
        metrics.prequential_count.inc(len(errors), version=applied.version)
        # As lists once per batch: each request's answer is then a slice of each.
        return seqs.tolist(), applied.predictions.tolist(), applied.cold.tolist()

    serve = state.limits
    state.batcher = MicroBatcher(
        apply,
        gate=state.open_for_writes,
        wait=serve.batch_wait_ms / 1000,
        limit=serve.batch_max,
        on_batch=lambda n: metrics.batch_size.observe(n),
        sync=lambda: state.durable.sync_log(),
    )
    state.batcher.start()
    yield
    await state.batcher.close()


_ROUTES: list[tuple[str, str, Handler, str | None]] = [  # path, method, handler, scope
    ("/predict", "POST", predict, READ),
    ("/topk", "POST", topk, READ),
    ("/observe", "POST", observe, WRITE),
    ("/users/{user}", "GET", get_user, READ),
    ("/users/{user}", "DELETE", delete_user, WRITE),
    ("/models", "GET", models, READ),
    ("/models/{version}/activate", "POST", activate, ADMIN),
    ("/healthz", "GET", healthz, None),
    ("/readyz", "GET", readyz, None),
    ("/metrics", "GET", metrics, None),
    ("/openapi.json", "GET", openapi, None),
]


async def _not_found(request: web.Request) -> web.Response:
    return _error(404, "not_found", f"no route {request.path}; see /openapi.json")


def _wrong_method(allowed: list[str]) -> Handler:
    async def wrong_method(request: web.Request) -> web.Response:
        response = _error(
            405,
            "method_not_allowed",
            f"{request.path} takes {', '.join(allowed)}, not {request.method}",
        )
        response.headers["Allow"] = ",".join(allowed)
        return response

    return wrong_method


def _add_routes(router: web.UrlDispatcher) -> None:
    """Every route wrapped by :func:`_endpoint`; other methods get a JSON 405, other paths 404.

    The routes of one path are added one after the other so that aiohttp keeps
    them on one resource, whose last route catches every other method.
    """
    paths = dict.fromkeys(path for path, *_ in _ROUTES)
    for path in paths:
        allowed = []
        for route_path, method, handler, scope in _ROUTES:
            if route_path == path:
                methods = [method, "HEAD"] if method == "GET" else [method]
                wrapped = _endpoint(path, handler, scope)
                for each in methods:
                    router.add_route(each, path, wrapped)
                allowed += methods
        router.add_route("*", path, _endpoint(path, _wrong_method(allowed), None))
    router.add_route("*", "/{tail:.*}", _endpoint("unmatched", _not_found, None))


def create_app(config: VeloxConfig) -> web.Application:
    """The serving application for ``config`` (the model loads when the app starts)."""
    app = web.Application(client_max_size=config.serve.max_body_bytes)
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_model_ctx)
    app.cleanup_ctx.append(_batcher_ctx)
    _add_routes(app.router)
    return app
