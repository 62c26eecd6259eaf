"""The client against a real aiohttp server on 127.0.0.1 that stubs the API's shapes.

The stub counts hits per route, records the client's port and the headers and
bodies it was sent, and can answer 503 a given number of times, so retries,
connection reuse and quoting are checked on the wire, not on mocks.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiohttp import web

from velox.client import (
    AsyncClient,
    Client,
    Deleted,
    ModelInfo,
    Models,
    Observation,
    ObserveResult,
    ScoredItem,
    Scores,
    UserInfo,
    VeloxAPIError,
    VeloxConnectionError,
)
from velox.errors import InputError, VeloxError


class Stub:
    """A stand-in for the server: the response shapes, an optional token, injected 503s."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.ready = True
        self.hits: Counter[str] = Counter()
        self.ports: set[int] = set()
        self.unavailable: Counter[str] = Counter()
        """Route -> how many more times to answer 503."""
        self.seen: list[dict] = []
        """Per request: path, raw path, match info, Authorization header, JSON body."""

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_post("/predict", self._predict)
        app.router.add_post("/topk", self._topk)
        app.router.add_post("/observe", self._observe)
        app.router.add_get("/users/{user}", self._user)
        app.router.add_delete("/users/{user}", self._delete)
        app.router.add_get("/models", self._models)
        app.router.add_post("/models/{version}/activate", self._activate)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler):
        route = request.match_info.route.resource.canonical
        self.hits[route] += 1
        self.ports.add(request.transport.get_extra_info("peername")[1])
        header = request.headers.get("Authorization")
        body = json.loads(await request.read() or "null")
        self.seen.append(
            {
                "path": request.path,
                "raw_path": request.raw_path,
                "match": dict(request.match_info),
                "auth": header,
                "key": request.headers.get("Idempotency-Key"),
                "body": body,
                "at": time.monotonic(),
            }
        )
        if self.token and header != f"Bearer {self.token}":
            return _error(401, "unauthorized", "the bearer token is not valid")
        if self.unavailable[route] > 0:
            self.unavailable[route] -= 1
            return _error(503, "unavailable", "the model is being swapped")
        return await handler(request)

    async def _predict(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body["user"] == "plain":
            return web.Response(status=500, text="boom")
        if body["user"] == "slow":
            await asyncio.sleep(0.3)
        if not body["items"]:
            return _error(422, "validation_error", "items must not be empty")
        return web.json_response(_scores(body["user"], body["items"]))

    async def _topk(self, request: web.Request) -> web.Response:
        body = await request.json()
        pool = body.get("candidates") or ["i1", "i2", "i3", "new4"]
        answer = _scores(body["user"], pool[: body["k"]])
        return web.json_response({**answer, "explore": body["explore"]})

    async def _observe(self, request: web.Request) -> web.Response:
        body = await request.json()
        batch = body if isinstance(body, list) else [body]
        return web.json_response(
            {
                "accepted": len(batch),
                "seqs": list(range(10, 10 + len(batch))),
                "predictions": [o["rating"] - 0.5 for o in batch],
                "cold": [o["item"].startswith("new") for o in batch],
            }
        )

    async def _user(self, request: web.Request) -> web.Response:
        user = request.match_info["user"]
        if user == "ghost":
            return _error(404, "not_found", "no user 'ghost'")
        return web.json_response(
            {
                "user": user,
                "known": True,
                "observations": 3,
                "version": "v2",
                "last_update": 1700000000.5,
                "weights": [0.25, -1, 2],
            }
        )

    async def _delete(self, request: web.Request) -> web.Response:
        user = request.match_info["user"]
        return web.json_response(
            {"user": user, "deleted": True, "log_records": 4, "offline_rows": 7}
        )

    async def _models(self, request: web.Request) -> web.Response:
        version = {
            "version": "v2",
            "state": "active",
            "created": "2026-01-02T03:04:05Z",
            "engine": "velox",
            "mode": "full",
            "watermark": 41,
            "metrics": {"rmse": 0.9, "count": 12},
        }
        return web.json_response({"active": "v2", "serving": "v2", "versions": [version]})

    async def _activate(self, request: web.Request) -> web.Response:
        version = request.match_info["version"]
        if version == "v9":
            return _error(409, "conflict", "v9 is failed; only a ready version can serve")
        return web.json_response({"active": version})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        if not self.ready:
            return _error(503, "unavailable", "the model is not loaded yet")
        return web.json_response({"status": "ready", "version": "v2"})


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


def _scores(user: str, items: list[str]) -> dict:
    return {
        "user": user,
        "version": "v2",
        "items": [
            {"item": item, "score": 1.5 * n, "cold": item.startswith("new")}
            for n, item in enumerate(items)
        ],
        "degraded": False,
    }


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def stub(aiohttp_server):
    stub = Stub()
    server = await aiohttp_server(stub.app())
    stub.url = str(server.make_url(""))
    return stub


@pytest.fixture
def live_stub():
    """The stub served from its own loop in a background thread, for the blocking client."""
    stub = Stub()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(stub.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result()
    stub.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield stub
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


# ------------------------------------------------------------------ typed answers


async def test_predict_and_topk_parse_into_scores(stub):
    async with AsyncClient(stub.url) as velox:
        scores = await velox.predict(7, ["a", 8, "new9"])
        best = await velox.topk("u", 2, candidates=["x", "new"], explore="ucb", alpha=0.5)
        default = await velox.topk("u", 3)

    assert scores == Scores(
        user="7",
        version="v2",
        items=[
            ScoredItem("a", 0.0, False),
            ScoredItem("8", 1.5, False),
            ScoredItem("new9", 3.0, True),
        ],
        degraded=False,
        explore=None,
    )
    assert stub.seen[0]["body"] == {"user": "7", "items": ["a", "8", "new9"]}
    assert [s.item for s in best.items] == ["x", "new"] and best.explore == "ucb"
    assert stub.seen[1]["body"] == {
        "user": "u",
        "k": 2,
        "candidates": ["x", "new"],
        "explore": "ucb",
        "alpha": 0.5,
        "include_rated": False,
    }
    assert "candidates" not in stub.seen[2]["body"]
    assert [s.item for s in default.items] == ["i1", "i2", "i3"]


async def test_observe_sends_a_batch_of_typed_observations(stub):
    async with AsyncClient(stub.url) as velox:
        one = await velox.observe(Observation("u1", "new5", 4.0, ts=1.5))
        many = await velox.observe([Observation(1, 2, 3), {"user": "u", "item": "i", "rating": 5}])

    assert one == ObserveResult(accepted=1, seqs=[10], predictions=[3.5], cold=[True])
    assert stub.seen[0]["body"] == [{"user": "u1", "item": "new5", "rating": 4.0, "ts": 1.5}]
    assert many == ObserveResult(
        accepted=2, seqs=[10, 11], predictions=[2.5, 4.5], cold=[False, False]
    )
    assert stub.seen[1]["body"] == [
        {"user": "1", "item": "2", "rating": 3.0},
        {"user": "u", "item": "i", "rating": 5.0},
    ]


async def test_a_malformed_observation_is_refused_before_sending(stub):
    async with AsyncClient(stub.url) as velox:
        with pytest.raises(InputError, match="user, item, rating"):
            await velox.observe({"user": "u", "item": "i", "score": 5})
    assert stub.hits["/observe"] == 0


async def test_users_models_and_probes_parse(stub):
    async with AsyncClient(stub.url) as velox:
        info = await velox.user(42)
        gone = await velox.delete_user("u1")
        models = await velox.models()
        active = await velox.activate("v3")
        health, ready = await velox.health(), await velox.ready()
        stub.ready = False
        not_ready = await velox.ready()

    assert info == UserInfo("42", True, 3, "v2", 1700000000.5, [0.25, -1.0, 2.0])
    assert gone == Deleted("u1", True, 4, 7)
    assert models == Models(
        active="v2",
        versions=[
            ModelInfo(
                "v2", "active", "2026-01-02T03:04:05Z", "velox", 41, {"rmse": 0.9, "count": 12}
            )
        ],
    )
    assert active == "v3"
    assert (health, ready, not_ready) == (True, True, False)
    assert stub.hits["/readyz"] == 2  # "not ready" is an answer, not retried


async def test_ids_are_quoted_as_one_path_segment(stub):
    user = "a b/c?d%e"
    async with AsyncClient(stub.url) as velox:
        info = await velox.user(user)
        gone = await velox.delete_user(user)

    assert info.user == user and gone.user == user
    assert stub.seen[0]["match"] == {"user": user}
    assert stub.seen[0]["raw_path"] == "/users/a%20b%2Fc%3Fd%25e"
    assert stub.hits["/users/{user}"] == 2


# ------------------------------------------------------------------------- errors


async def test_error_bodies_raise_api_errors(stub):
    async with AsyncClient(stub.url) as velox:
        with pytest.raises(VeloxAPIError) as invalid:
            await velox.predict("u", [])
        with pytest.raises(VeloxAPIError) as missing:
            await velox.user("ghost")
        with pytest.raises(VeloxAPIError) as conflict:
            await velox.activate("v9")
        with pytest.raises(VeloxAPIError) as plain:
            await velox.predict("plain", ["i"])

    error = invalid.value
    assert isinstance(error, VeloxError)
    assert (error.status, error.code, error.message) == (
        422,
        "validation_error",
        "items must not be empty",
    )
    assert str(error) == "items must not be empty (HTTP 422 validation_error)"
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    assert (conflict.value.status, conflict.value.code) == (409, "conflict")
    assert (plain.value.status, plain.value.code, plain.value.message) == (
        500,
        "http_error",
        "boom",
    )
    assert stub.hits["/predict"] == 2  # 4xx and 500 are not retried


async def test_an_answer_of_another_shape_says_so(aiohttp_server):
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"active": "v1"})

    app = web.Application()
    app.router.add_get("/models", models)
    server = await aiohttp_server(app)
    async with AsyncClient(str(server.make_url(""))) as velox:
        with pytest.raises(VeloxAPIError, match=r"GET .*/models does not have the expected shape"):
            await velox.models()


async def test_the_bearer_token_is_sent(aiohttp_server):
    stub = Stub(token="s3cret")
    url = str((await aiohttp_server(stub.app())).make_url(""))
    async with AsyncClient(url) as anonymous:
        with pytest.raises(VeloxAPIError) as refused:
            await anonymous.models()
    async with AsyncClient(url, token="s3cret") as velox:
        await velox.models()
        await velox.observe(Observation("u", "i", 1.0))

    assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    assert [s["auth"] for s in stub.seen] == [None, "Bearer s3cret", "Bearer s3cret"]


# ------------------------------------------------------------------------ retries


async def test_an_idempotent_call_is_retried_through_503s_with_backoff(stub):
    stub.unavailable["/predict"] = 2
    stub.unavailable["/users/{user}"] = 3
    async with AsyncClient(stub.url, retries=2, backoff=0.02) as velox:
        scores = await velox.predict("u", ["i"])
        with pytest.raises(VeloxAPIError) as exhausted:
            await velox.user("u")

    assert scores.items == [ScoredItem("i", 0.0, False)]
    assert stub.hits["/predict"] == 3
    first, second, third = (s["at"] for s in stub.seen[:3])
    assert second - first >= 0.02 and third - second >= 0.04  # exponential
    assert (exhausted.value.status, exhausted.value.code) == (503, "unavailable")
    assert stub.hits["/users/{user}"] == 3


async def test_observe_is_retried_only_with_an_idempotency_key(stub):
    stub.unavailable["/observe"] = 2
    async with AsyncClient(stub.url, retries=3, backoff=0.001) as velox:
        with pytest.raises(VeloxAPIError) as unavailable:
            await velox.observe(Observation("u", "i", 1.0))
        assert unavailable.value.status == 503
        assert stub.hits["/observe"] == 1
        await velox.observe(Observation("u", "i", 1.0), idempotency_key="event-9")
    assert stub.hits["/observe"] == 3  # one 503 more, then the answer
    assert [s["key"] for s in stub.seen] == [None, "event-9", "event-9"]


async def test_a_refused_connection_is_retried_then_reported(monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}"
    sent = Counter()
    send = AsyncClient._send

    async def counting(self, method, target, body, headers=None):
        sent[target] += 1
        return await send(self, method, target, body, headers)

    monkeypatch.setattr(AsyncClient, "_send", counting)
    async with AsyncClient(url, retries=2, backoff=0.001) as velox:
        with pytest.raises(VeloxConnectionError) as refused:
            await velox.models()
        with pytest.raises(VeloxConnectionError) as once:
            await velox.observe(Observation("u", "i", 1.0))

    assert sent == {f"{url}/models": 3, f"{url}/observe": 1}
    assert refused.value.attempts == 3 and once.value.attempts == 1
    assert isinstance(refused.value, VeloxError)
    assert f"GET {url}/models after 3 attempts" in str(refused.value)


async def test_a_timeout_counts_as_a_connection_failure(stub):
    async with AsyncClient(stub.url, timeout=0.05, retries=1, backoff=0.001) as velox:
        with pytest.raises(VeloxConnectionError, match="after 2 attempts"):
            await velox.predict("slow", ["i"])
    assert stub.hits["/predict"] == 2


async def test_connections_are_pooled_and_reused(stub):
    async with AsyncClient(stub.url) as velox:
        for n in range(20):
            await velox.predict(n, ["i"])
    assert stub.hits["/predict"] == 20
    assert len(stub.ports) == 1


# -------------------------------------------------------------------- sync client


def test_the_blocking_client_from_two_threads(live_stub):
    def work(user: str) -> list[str]:
        return [velox.predict(user, [f"{user}{n}"]).items[0].item for n in range(15)]

    with Client(live_stub.url, retries=0) as velox, ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(work, ["a", "b"]))
        observed = velox.observe([Observation("a", "i", 2.0)])
        assert velox.ready() and velox.health()

    assert answers == [[f"a{n}" for n in range(15)], [f"b{n}" for n in range(15)]]
    assert observed.accepted == 1
    assert live_stub.hits["/predict"] == 30
    assert len(live_stub.ports) <= 2  # two threads share one pool


def test_the_blocking_client_reports_errors_and_refuses_calls_after_close(live_stub):
    velox = Client(live_stub.url)
    with pytest.raises(VeloxAPIError, match="HTTP 409 conflict"):
        velox.activate("v9")
    assert velox.models().active == "v2"
    velox.close()
    velox.close()
    with pytest.raises(VeloxError, match="closed"):
        velox.models()
    assert not velox._thread.is_alive()
