"""The client against the real server: ``create_app`` on 127.0.0.1 over a bootstrapped version.

Every answer the client parses comes from the real application, serving a
version trained the way ``velox serve --bootstrap`` trains one. A middleware
added to that application (:class:`Wire`) keeps what went over the wire (the
path as sent, headers, request body, the client's port, the JSON answered),
so the typed results are compared field by field and type for type with what
the server sent, and retries, quoting and connection reuse are seen on the wire.

The same middleware injects the faults the real server cannot be made to
produce on demand; only those answers are not the server's own: a 503 (of
the server's error shape) on a chosen request, a 500 with a plain-text body
(a proxy's), a connection reset, an answer that never comes. An answer of
another shape (another server version) comes from a separate one-route app.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import pytest
from aiohttp import web

from serving.app import create_app
from serving.cli import bootstrap
from velox.client import (
    AsyncClient,
    Client,
    Observation,
    VeloxAPIError,
    VeloxConnectionError,
)
from velox.config import VeloxConfig, load_config
from velox.errors import InputError, VeloxError

RANK = 3


@dataclass
class Exchange:
    """One request as the server received it, and its answer."""

    route: str
    raw_path: str
    match: dict[str, str]
    auth: str | None
    key: str | None
    body: object
    port: int
    at: float
    status: int = 0
    answer: object = None


class Wire:
    """A middleware for the real app: records every exchange, injects the faults asked for.

    ``fail(route, fault, ...)`` makes the route's next requests meet those
    faults in order; later requests reach the real handler.
    """

    def __init__(self) -> None:
        self.seen: list[Exchange] = []
        self.faults: defaultdict[str, deque[str]] = defaultdict(deque)
        self.release = asyncio.Event()
        """Set when the test ends, so that a request held by a "hang" fault finishes."""

    def fail(self, route: str, *faults: str) -> None:
        self.faults[route].extend(faults)

    @property
    def hits(self) -> Counter[str]:
        return Counter(exchange.route for exchange in self.seen)

    @property
    def ports(self) -> set[int]:
        return {exchange.port for exchange in self.seen}

    @web.middleware
    async def record(self, request: web.Request, handler) -> web.StreamResponse:
        raw = await request.read()
        exchange = Exchange(
            route=request.match_info.route.resource.canonical,
            raw_path=request.raw_path,
            match=dict(request.match_info),
            auth=request.headers.get("Authorization"),
            key=request.headers.get("Idempotency-Key"),
            body=json.loads(raw) if raw else None,
            port=request.transport.get_extra_info("peername")[1],
            at=time.monotonic(),
        )
        self.seen.append(exchange)
        faults = self.faults[exchange.route]
        response = await self._fault(request, faults.popleft()) if faults else None
        if response is None:
            response = await handler(request)
        exchange.status = response.status
        if response.content_type == "application/json":
            exchange.answer = json.loads(response.body)
        return response

    async def _fault(self, request: web.Request, fault: str) -> web.Response | None:
        if fault == "unavailable":  # the server's own 503 shape
            body = {"error": "unavailable", "message": "the model is not loaded yet"}
            return web.json_response(body, status=503)
        if fault == "plain":  # a proxy's error page
            return web.Response(status=500, text="boom")
        if fault == "reset":
            request.transport.abort()
            return web.Response(status=500)
        if fault == "hang":
            await self.release.wait()
            return web.Response(status=503)
        raise ValueError(f"unknown fault {fault!r}")


def _config(root, *settings: str) -> VeloxConfig:
    return load_config(
        None,
        overrides=[
            f"data.dir={root}",
            f"train.rank={RANK}",
            "train.iterations=2",
            "store.checkpoint_interval=0",
            "serve.deadline_ms=0",  # never degraded: answers do not depend on the machine's speed
            *settings,
        ],
    )


@pytest.fixture(scope="session")
def bootstrapped(tmp_path_factory):
    """A data folder whose registry holds v1, trained and activated as ``--bootstrap`` does."""
    root = tmp_path_factory.mktemp("bootstrapped")
    bootstrap(_config(root))
    return root


def _real_app(bootstrapped, root, wire: Wire, *settings: str) -> web.Application:
    """The serving app over a copy of the bootstrapped data folder, with ``wire`` around it."""
    shutil.copytree(bootstrapped, root, dirs_exist_ok=True)
    app = create_app(_config(root, *settings))
    app.middlewares.append(wire.record)
    return app


@pytest.fixture
async def real(bootstrapped, tmp_path, aiohttp_server):
    """A real server on 127.0.0.1: its ``wire`` and its ``url``."""
    wire = Wire()
    server = await aiohttp_server(_real_app(bootstrapped, tmp_path, wire))
    wire.url = str(server.make_url(""))
    yield wire
    wire.release.set()


@pytest.fixture
def live(bootstrapped, tmp_path):
    """The real server run by its own loop in a background thread, for the blocking client."""
    wire = Wire()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(_real_app(bootstrapped, tmp_path, wire))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result()
    wire.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield wire
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def _same(result: object, answer: object) -> None:
    """``result``'s fields are the JSON answer's: the same names, values and JSON types."""
    assert json.dumps(asdict(result), sort_keys=True) == json.dumps(answer, sort_keys=True)


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------ imports


def test_the_client_loads_no_model_code():
    """A process that only calls the service does not pay for NumPy, Numba or the model."""
    script = (
        "import json, sys, velox.client; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('velox', 'numpy', 'numba', 'feature_store', 'serving'))))"
    )
    loaded = json.loads(subprocess.check_output([sys.executable, "-c", script], text=True))
    assert loaded == ["velox", "velox.api", "velox.client", "velox.errors"]


# ------------------------------------------------------------------ typed answers


async def test_predict_and_topk_return_the_servers_scores(real):
    async with AsyncClient(real.url) as velox:
        scores = await velox.predict("u1", ["i1", 2, "new9"])
        best = await velox.topk("u1", 2, candidates=["i1", "i2", 9], explore="ucb", alpha=0.5)
        default = await velox.topk(7, 3)

    predict, ranked, every = real.seen
    _same(scores, predict.answer)
    assert predict.body == {"user": "u1", "items": ["i1", "2", "new9"]}
    assert [(s.item, s.cold) for s in scores.items] == [("i1", False), ("2", True), ("new9", True)]
    assert (scores.user, scores.version, scores.degraded) == ("u1", "v1", False)

    _same(best, ranked.answer)
    assert ranked.body == {
        "user": "u1",
        "k": 2,
        "candidates": ["i1", "i2", "9"],
        "explore": "ucb",
        "alpha": 0.5,
        "include_rated": False,
    }
    assert len(best.items) == 2 and {s.item for s in best.items} <= {"i1", "i2", "9"}

    _same(default, every.answer)
    assert "candidates" not in every.body and default.user == "7"
    assert [s.score for s in default.items] == sorted(
        (s.score for s in default.items), reverse=True
    )
    assert len(default.items) == 3


async def test_observe_sends_typed_observations_and_returns_what_was_applied(real):
    async with AsyncClient(real.url) as velox:
        one = await velox.observe(Observation("u1", "new5", 4.0, ts=1.5))
        many = await velox.observe(
            [Observation(1, "i2", 3), {"user": "u", "item": "i3", "rating": 5}]
        )
        user = await velox.user(1)

    first, second, _ = real.seen
    _same(one, first.answer)
    assert first.body == [{"user": "u1", "item": "new5", "rating": 4.0, "ts": 1.5}]
    assert (one.accepted, one.seqs, one.cold) == (1, [1], [True])
    _same(many, second.answer)
    assert second.body == [
        {"user": "1", "item": "i2", "rating": 3.0},
        {"user": "u", "item": "i3", "rating": 5.0},
    ]
    assert (many.accepted, many.seqs, many.cold) == (2, [2, 3], [False, False])
    assert (user.user, user.known, user.observations) == ("1", True, 1)


async def test_an_idempotency_key_gets_the_first_answer_again(real):
    async with AsyncClient(real.url) as velox:
        first = await velox.observe(Observation("u1", "i1", 4.0, ts=9.0), idempotency_key="ev-1")
        again = await velox.observe(Observation("u1", "i1", 4.0, ts=9.0), idempotency_key="ev-1")
        later = await velox.observe(Observation("u1", "i2", 2.0))
        with pytest.raises(VeloxAPIError) as reused:
            await velox.observe(Observation("u1", "i3", 1.0), idempotency_key="ev-1")

    assert again == first and first.seqs == [1] and later.seqs == [2]  # applied once
    assert [e.key for e in real.seen] == ["ev-1", "ev-1", None, "ev-1"]
    assert (reused.value.status, reused.value.code) == (422, "idempotency_key_reused")


async def test_bad_arguments_are_refused_before_anything_is_sent(real):
    async with AsyncClient(real.url) as velox:
        with pytest.raises(InputError, match="user, item, rating"):
            await velox.observe({"user": "u", "item": "i", "score": 5})
        with pytest.raises(InputError, match="user ids must be strings or integers, got True"):
            await velox.observe(Observation(True, "i", 1.0))
        with pytest.raises(InputError, match=r"item ids must be strings or integers, got 1\.5"):
            await velox.predict("u", [1.5])
        with pytest.raises(InputError, match="user ids must not be empty"):
            await velox.user("")
    assert real.seen == []


async def test_users_models_and_probes(real):
    async with AsyncClient(real.url) as velox:
        stranger = await velox.user(42)
        trained = await velox.user("u1")
        gone = await velox.delete_user("u1")
        forgotten = await velox.user("u1")
        models = await velox.models()
        active = await velox.activate("v1")
        health, ready = await velox.health(), await velox.ready()

    answers = [e.answer for e in real.seen]
    for result, answer in zip((stranger, trained, gone, forgotten, models), answers, strict=False):
        _same(result, answer)
    assert (stranger.user, stranger.known, stranger.observations) == ("42", False, 0)
    assert (stranger.last_update, stranger.version, len(stranger.weights)) == (0.0, "v1", RANK + 1)
    assert trained.known and trained.observations > 0
    assert (gone.user, gone.deleted) == ("u1", True)
    assert not forgotten.known
    assert (models.active, models.serving) == ("v1", "v1")
    assert (models.lagging, models.problem) == (False, None)
    assert [(v.version, v.state, v.mode) for v in models.versions] == [("v1", "active", "single")]
    assert active == "v1" and answers[-3] == {"active": "v1"}
    assert (health, ready) == (True, True)


async def test_not_ready_is_an_answer_and_not_retried(real):
    """The 503 is injected: the real server says "not ready" only while its model loads."""
    real.fail("/readyz", "unavailable")
    async with AsyncClient(real.url, retries=2, backoff=0.001) as velox:
        assert not await velox.ready()
        assert await velox.ready()
    assert real.hits["/readyz"] == 2


async def test_ids_are_quoted_as_one_path_segment(real):
    user = "a b/c?d%e"
    async with AsyncClient(real.url) as velox:
        info = await velox.user(user)
        gone = await velox.delete_user(user)

    assert info.user == user and gone.user == user
    for exchange in real.seen:
        assert exchange.match == {"user": user}
        assert exchange.raw_path == "/users/a%20b%2Fc%3Fd%25e"
    assert real.hits["/users/{user}"] == 2


# ------------------------------------------------------------------------- errors


async def test_error_answers_raise_api_errors_and_are_not_retried(real):
    """The 422 and 404 are the server's; the plain-text 500 is injected (a proxy's page)."""
    real.fail("/predict", "plain")
    async with AsyncClient(real.url, retries=2, backoff=0.001) as velox:
        with pytest.raises(VeloxAPIError) as plain:
            await velox.predict("u1", ["i1"])
        with pytest.raises(VeloxAPIError) as invalid:
            await velox.predict("u1", [])
        with pytest.raises(VeloxAPIError) as missing:
            await velox.activate("v9")

    error = invalid.value
    assert isinstance(error, VeloxError)
    assert (error.status, error.code, error.message) == (
        422,
        "validation_error",
        "Expected `array` of length >= 1 - at `$.items`",
    )
    assert str(error) == (
        "Expected `array` of length >= 1 - at `$.items` (HTTP 422 validation_error)"
    )
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    assert (plain.value.status, plain.value.code, plain.value.message) == (
        500,
        "http_error",
        "boom",
    )
    assert real.hits["/predict"] == 2  # 4xx and 500 are not retried


async def test_an_answer_of_another_shape_says_so(aiohttp_server):
    """A one-route app stands for a server of another version (this one cannot answer so)."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"active": "v1"})

    app = web.Application()
    app.router.add_get("/models", models)
    server = await aiohttp_server(app)
    async with AsyncClient(str(server.make_url(""))) as velox:
        with pytest.raises(VeloxAPIError, match=r"GET .*/models does not have the expected shape"):
            await velox.models()


async def test_bearer_tokens_are_sent(bootstrapped, tmp_path, aiohttp_server):
    wire = Wire()
    tokens = ("serve.read_token=r", "serve.write_token=w", "serve.admin_token=a")
    server = await aiohttp_server(_real_app(bootstrapped, tmp_path, wire, *tokens))
    url = str(server.make_url(""))
    async with AsyncClient(url) as anonymous:
        with pytest.raises(VeloxAPIError) as refused:
            await anonymous.models()
    async with AsyncClient(url, token="r") as reader:
        await reader.models()
        with pytest.raises(VeloxAPIError) as forbidden:
            await reader.observe(Observation("u", "i", 1.0))
    async with AsyncClient(url, token="w") as writer:
        observed = await writer.observe(Observation("u", "i", 1.0))

    assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    assert (forbidden.value.status, forbidden.value.code) == (403, "forbidden")
    assert observed.seqs == [1]
    assert [e.auth for e in wire.seen] == [None, "Bearer r", "Bearer r", "Bearer w"]


# ------------------------------------------------------------------------ retries


async def test_a_safe_call_is_retried_through_503s_with_backoff(real):
    """The 503s are injected; the answer after them is the real server's."""
    real.fail("/predict", "unavailable", "unavailable")
    real.fail("/users/{user}", "unavailable", "unavailable", "unavailable")
    async with AsyncClient(real.url, retries=2, backoff=0.02) as velox:
        scores = await velox.predict("u1", ["i1"])
        with pytest.raises(VeloxAPIError) as exhausted:
            await velox.user("u1")

    _same(scores, real.seen[2].answer)
    assert real.hits["/predict"] == 3
    first, second, third = (e.at for e in real.seen[:3])
    assert second - first >= 0.02 and third - second >= 0.04  # lower bounds: hold under any load
    assert (exhausted.value.status, exhausted.value.code) == (503, "unavailable")
    assert real.hits["/users/{user}"] == 3


async def test_observe_is_retried_only_with_an_idempotency_key(real):
    """The 503s are injected; the answer after them is the real server's."""
    real.fail("/observe", "unavailable", "unavailable")
    async with AsyncClient(real.url, retries=3, backoff=0.001) as velox:
        with pytest.raises(VeloxAPIError) as unavailable:
            await velox.observe(Observation("u", "i", 1.0))
        assert unavailable.value.status == 503
        assert real.hits["/observe"] == 1
        observed = await velox.observe(Observation("u", "i", 1.0), idempotency_key="event-9")
    assert real.hits["/observe"] == 3  # one 503 more, then the answer
    assert observed.seqs == [1]
    assert [e.key for e in real.seen] == [None, "event-9", "event-9"]


async def test_a_reset_connection_is_retried_only_when_safe(real):
    """The resets are injected (the server aborts the connection before answering)."""
    real.fail("/predict", "reset", "reset")
    real.fail("/observe", "reset")
    async with AsyncClient(real.url, retries=2, backoff=0.001) as velox:
        scores = await velox.predict("u1", ["i1"])
        with pytest.raises(VeloxConnectionError, match="after 1 attempt:") as once:
            await velox.observe(Observation("u", "i", 1.0))

    assert scores.items[0].item == "i1" and real.hits["/predict"] == 3
    assert once.value.attempts == 1 and real.hits["/observe"] == 1


async def test_a_refused_connection_is_retried_then_reported():
    url = f"http://127.0.0.1:{_closed_port()}"
    async with AsyncClient(url, retries=2, backoff=0.001) as velox:
        with pytest.raises(VeloxConnectionError) as refused:
            await velox.models()
        with pytest.raises(VeloxConnectionError) as once:
            await velox.observe(Observation("u", "i", 1.0))

    assert refused.value.attempts == 3 and once.value.attempts == 1
    assert isinstance(refused.value, VeloxError)
    assert f"GET {url}/models after 3 attempts" in str(refused.value)


async def test_an_answer_that_never_comes_is_a_timeout(real):
    """The hang is injected: the request is held until the test ends."""
    real.fail("/predict", "hang", "hang")
    async with AsyncClient(real.url, timeout=0.05, retries=1, backoff=0.001) as velox:
        with pytest.raises(VeloxConnectionError, match="after 2 attempts"):
            await velox.predict("u1", ["i1"])
    assert real.hits["/predict"] == 2


async def test_connections_are_pooled_and_reused(real):
    async with AsyncClient(real.url) as velox:
        for n in range(20):
            await velox.predict(n, ["i1"])
    assert real.hits["/predict"] == 20
    assert len(real.ports) == 1


# -------------------------------------------------------------------- sync client


def test_the_blocking_client_from_two_threads(live):
    def work(user: str) -> list[str]:
        return [velox.predict(user, [f"i{n}"]).items[0].item for n in range(15)]

    with Client(live.url, retries=0) as velox, ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(work, ["u1", "u2"]))
        observed = velox.observe([Observation("u1", "i1", 2.0)])
        assert velox.ready() and velox.health()

    assert answers == [[f"i{n}" for n in range(15)]] * 2
    _same(observed, live.seen[30].answer)
    assert live.hits["/predict"] == 30
    assert len(live.ports) <= 2  # two threads share one pool


def test_the_blocking_client_reports_errors_and_refuses_calls_after_close(live):
    velox = Client(live.url)
    with pytest.raises(VeloxAPIError, match="HTTP 404 not_found"):
        velox.activate("v9")
    assert velox.models().active == "v1"
    velox.close()
    velox.close()
    with pytest.raises(VeloxError, match="closed"):
        velox.models()
    assert not velox._thread.is_alive()
