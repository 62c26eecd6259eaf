"""Hostile HTTP against a real server on 127.0.0.1, served as ``velox serve`` serves it.

Raw bytes over a socket (malformed request lines, headers, chunking and
encodings), undecodable tokens, clients that leave mid-body, and values
that used to come back non-finite or duplicated. Every refusal must be a
JSON ``{"error", "message"}`` 4xx, and none may log at ERROR or more than one
throttled line (issue 14).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import requests
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from serving.app import ROUTES, STATE, create_app
from serving.schemas import MAX_ALPHA
from serving.wire import MALFORMED, Runner
from tests.test_serving import _config, _publish
from velox.errors import InputError

TOKENS = {"read": "r", "write": "w", "admin": "a"}
OBSERVATION = b'{"user": "u1", "item": "i1", "rating": 3}'


@dataclass(frozen=True)
class Answer:
    """One HTTP response read off a raw socket."""

    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict:
        """The JSON error body, checked to be one."""
        assert self.headers["content-type"].startswith("application/json"), self
        body = json.loads(self.body)
        assert set(body) == {"error", "message"} and body["message"], body
        return body


def read_answer(sock: socket.socket) -> Answer | None:
    """The response on ``sock``; None when the server closed it without one."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            assert not data, data  # a partial head is never acceptable
            return None
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"the body ended after {len(body)} of {length} bytes"
        body += chunk
    return Answer(int(status_line.split()[1]), headers, body[:length])


def exchange(port: int, raw: bytes) -> Answer:
    """Send ``raw`` on a new connection and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(raw)
        answer = read_answer(sock)
    assert answer is not None, raw[:200]
    return answer


def request(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    """A raw HTTP/1.1 request; ``headers`` as ``Name: value`` lines."""
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Served:
    """The app behind :class:`serving.wire.Runner` on a loop of its own, on 127.0.0.1."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.runner = Runner(app, access_log=None, log_every=3600)  # one line per test run
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    def requests_counted(self, route: str) -> dict[str, float]:
        """``velox_requests`` of ``route`` by status, from /metrics."""
        text = requests.get(f"{self.url}/metrics", timeout=30).text
        return {
            sample.labels["status"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "velox_requests"
            for sample in family.samples
            if sample.labels["route"] == route
        }


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    _publish(root)
    tokens = [f"serve.{scope}_token={token}" for scope, token in TOKENS.items()]
    server = Served(create_app(_config(root, *tokens, "serve.ts_window_days=1")))
    yield server
    server.close()


@pytest.fixture
def log(caplog):
    """What the server logs during the test, at INFO and above."""
    caplog.set_level(logging.INFO)
    return caplog


def _calm(log) -> None:
    """No ERROR (nor a traceback), and at most one throttled line."""
    assert not [r for r in log.records if r.levelno >= logging.ERROR], log.text
    assert len(log.records) <= 1, log.text


def _bearer(scope: str) -> str:
    return f"Authorization: Bearer {TOKENS[scope]}"


def _observe_with(served: Served, header: str, body: bytes = OBSERVATION) -> tuple[int, dict]:
    """POST /observe with the write token and ``header``: the status and the JSON error."""
    answer = exchange(served.port, request("POST", "/observe", _bearer("write"), header, body=body))
    return answer.status, answer.error()


LONG = "k" * 10_000
MALFORMED_CASES = {
    "bad chunk size": (
        request("POST", "/observe", _bearer("write"), "Transfer-Encoding: chunked")
        + b"zz\r\n{}\r\n0\r\n\r\n",
        400,
    ),
    "Content-Length with Transfer-Encoding": (
        request("POST", "/observe", "Content-Length: 5", "Transfer-Encoding: chunked")
        + b"0\r\n\r\n",
        400,
    ),
    "Content-Length -1": (request("POST", "/observe", "Content-Length: -1"), 400),
    "10 KB Idempotency-Key": (
        request("POST", "/observe", _bearer("write"), f"Idempotency-Key: {LONG}", body=b"{}"),
        431,
    ),
    "10 KB user id in the path": (request("GET", f"/users/{LONG}", _bearer("read")), 414),
    "method FOO": (request("FOO", "/observe"), 400),
    "bad request line": (b"GARBAGE\r\n\r\n", 400),
    "Content-Encoding br": (
        request("POST", "/observe", _bearer("write"), "Content-Encoding: br", body=b"{}"),
        415,
    ),
}


@pytest.mark.parametrize("raw, status", MALFORMED_CASES.values(), ids=MALFORMED_CASES)
def test_malformed_http_is_a_json_4xx_without_an_error_log(served, log, raw, status):
    answer = exchange(served.port, raw)
    assert answer.status == status, answer
    answer.error()
    _calm(log)


def test_a_flood_of_malformed_requests_logs_one_line_and_counts_every_one(served, log):
    before = served.requests_counted(MALFORMED).get("400", 0)
    for _ in range(40):
        assert exchange(served.port, b"GARBAGE\r\n\r\n").status == 400
    assert served.requests_counted(MALFORMED)["400"] == before + 40
    _calm(log)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_that_does_not_decompress_is_a_400(served, log, encoding):
    valid = zlib.compress(OBSERVATION)
    broken = valid[:2] + bytes(b ^ 0xFF for b in valid[2:])  # gzip: no gzip header at all
    status, error = _observe_with(served, f"Content-Encoding: {encoding}", broken)
    assert (status, error["error"]) == (400, "bad_encoding")
    _calm(log)


def test_an_unknown_content_encoding_is_415_not_read_as_plain(served, log):
    status, error = _observe_with(served, "Content-Encoding: foo")
    assert (status, error["error"]) == (415, "unsupported_encoding")
    assert "foo" in error["message"]


def test_an_undecodable_authorization_header_is_401_on_every_authenticated_route(served, log):
    secured = [(path, method) for path, method, _, scope in ROUTES if scope is not None]
    assert len(secured) >= 5
    for path, method in secured:
        target = path.replace("{user}", "u1").replace("{version}", "v1")
        answer = exchange(
            served.port, request(method, target, "Authorization: Bearer \xff\xfe", body=b"{}")
        )
        assert (answer.status, answer.error()["error"]) == (401, "unauthorized"), (path, method)
    _calm(log)


def test_an_undecodable_idempotency_key_is_422(served, log):
    status, error = _observe_with(served, "Idempotency-Key: \xff")
    assert (status, error["error"]) == (422, "validation_error")
    assert "UTF-8" in error["message"]
    _calm(log)


def test_an_unknown_expectation_is_a_json_417_and_100_continue_still_works(served, log):
    body = b'{"user": "u1", "items": ["i1"]}'
    raw = request("POST", "/predict", _bearer("read"), "Expect: foo", body=body)
    answer = exchange(served.port, raw)
    assert (answer.status, answer.error()["error"]) == (417, "expectation_failed")
    raw = request("POST", "/predict", _bearer("read"), "Expect: 100-continue", body=body)
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(raw[: -len(body)])
        assert read_answer(sock).status == 100
        sock.sendall(body)
        assert read_answer(sock).status == 200
    _calm(log)


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_the_bearer_scheme_is_case_insensitive(served, scheme):
    response = requests.get(
        f"{served.url}/models", headers={"Authorization": f"{scheme} r"}, timeout=30
    )
    assert response.status_code == 200, response.text
    refused = requests.get(
        f"{served.url}/models", headers={"Authorization": f"{scheme}x r"}, timeout=30
    )
    assert refused.status_code == 401


def test_a_client_gone_mid_body_is_counted_apart_and_not_logged_as_an_error(served, log):
    before = served.requests_counted("/observe")
    head = request("POST", "/observe", _bearer("write"), "Content-Length: 100")
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(head + b'{"user": "u')
    deadline = time.monotonic() + 30  # the server notices the closed socket on its own time
    while served.requests_counted("/observe").get("499", 0) == before.get("499", 0):
        assert time.monotonic() < deadline, "the disconnect was never counted"
    after = served.requests_counted("/observe")
    assert after.get("500", 0) == before.get("500", 0)
    assert not [r for r in log.records if r.levelno >= logging.WARNING], log.text


def _post(served: Served, path: str, body: object, scope: str = "write") -> requests.Response:
    headers = {"Authorization": f"Bearer {TOKENS[scope]}"}
    return requests.post(f"{served.url}{path}", json=body, headers=headers, timeout=30)


def test_alpha_beyond_its_maximum_is_422_and_exploration_scores_stay_finite(served):
    for explore in ("thompson", "ucb"):
        too_large = {"user": "u1", "k": 5, "explore": explore, "alpha": 1.7e308}
        response = _post(served, "/topk", too_large, "read")
        assert (response.status_code, response.json()["error"]) == (422, "validation_error")
        largest = {**too_large, "alpha": MAX_ALPHA}
        response = _post(served, "/topk", largest, "read")
        assert response.status_code == 200, response.text
        scores = [item["score"] for item in response.json()["items"]]
        assert len(scores) == 5 and np.isfinite(scores).all(), scores


def test_the_model_answers_finite_scores_or_refuses_an_alpha_that_overflows_them(served):
    """Thompson draws at the largest float: some overflow (refused), the rest are finite."""
    model, alpha = served.app[STATE].durable.model, float(np.finfo(np.float64).max)
    refused = 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        try:
            ranked = model.topk("u1", 30, explore="thompson", alpha=alpha, rng=rng)
        except InputError as exc:
            assert "makes the exploration scores overflow" in str(exc)
            refused += 1
        else:
            assert np.isfinite(ranked.scores).all(), ranked.scores
    assert 0 < refused < 10


def test_duplicate_candidates_are_ranked_once_first_occurrence_wins(served):
    candidates = ["i1", "i2", "i1", "never-rated", "i2", "never-rated"]
    body = {"user": "u1", "k": 10, "candidates": candidates}
    response = _post(served, "/topk", body, "read")
    assert response.status_code == 200, response.text
    items = [item["item"] for item in response.json()["items"]]
    assert sorted(items) == ["i1", "i2", "never-rated"]
    ranked = served.app[STATE].durable.model.topk("u1", 10, candidates=candidates)
    assert ranked.items == items


@pytest.mark.parametrize(
    "ts, from_now",
    [(-1e18, False), (1e300, False), (-2 * 86_400, True), (2 * 86_400, True)],
    ids=["-1e18", "1e300", "two days ago", "in two days"],
)
def test_observation_times_outside_the_window_are_422_and_change_nothing(served, ts, from_now):
    ts += time.time() if from_now else 0.0
    response = _post(served, "/observe", {"user": "timely", "item": "i1", "rating": 3, "ts": ts})
    assert (response.status_code, response.json()["error"]) == (422, "validation_error")
    assert "within 1 days of the server's clock" in response.json()["message"]
    user = requests.get(f"{served.url}/users/timely", headers={"Authorization": "Bearer r"})
    assert user.json()["observations"] == 0


def test_an_observation_time_inside_the_window_is_kept(served):
    ts = time.time() - 3_600
    response = _post(served, "/observe", {"user": "recent", "item": "i1", "rating": 3, "ts": ts})
    assert response.status_code == 200, response.text
    user = requests.get(f"{served.url}/users/recent", headers={"Authorization": "Bearer r"})
    assert user.json()["observations"] == 1 and user.json()["last_update"] == pytest.approx(ts)
