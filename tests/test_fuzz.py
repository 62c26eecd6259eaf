"""Fuzzing a running ``velox serve``: valid HTTP from its OpenAPI document, then raw bytes.

Schemathesis sends valid and invalid requests (positive and negative
generation) for every operation: no answer may be a 5xx, every 4xx must be
the JSON error body, and a rejected request must not change anything (the
count of applied observations in /metrics stays the same). Below HTTP, a
seeded set of malformed request lines, headers, chunked bodies and flipped
bytes goes over plain TCP sockets: every answer must be a JSON 4xx (or a
success), and the server must log no ERROR and exit cleanly.
"""

from __future__ import annotations

import random
import re
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import schemathesis
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode

from serving.openapi import openapi_document
from tests.test_hostile_http import OBSERVATION, Answer, read_answer, request
from tests.test_serve_process import Server
from tests.test_serving import _publish

schema = schemathesis.openapi.from_dict(openapi_document())
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    max_examples=25,
    deterministic=True,
)
_APPLIED = re.compile(r"^velox_prequential_observations_total\{[^}]*\} (\S+)$", re.M)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    _publish(root)
    server = Server(root, "retrain.timeout=0.5")  # a fuzzed POST /retrain starts no Spark job
    yield server.url
    assert server.stop() == 0


def _applied(base: str) -> float:
    text = requests.get(f"{base}/metrics", timeout=10).text
    return sum(float(v) for v in _APPLIED.findall(text))


@schema.parametrize()
def test_no_5xx_and_rejected_requests_change_nothing(case, live):
    if case.path == "/models/{version}/activate":
        case.path_parameters = {"version": "v1"} if case.path_parameters else case.path_parameters
    before = _applied(live)
    response = case.call(base_url=live, timeout=30)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error", "message"} and body["message"], body
        assert _applied(live) == before
    from schemathesis.checks import response_schema_conformance

    case.validate_response(response, checks=[response_schema_conformance])  # as documented


# ------------------------------------------------------------------ raw bytes

AUTH = "Authorization: Bearer w"
WAIT = 30.0
"""A bound, never reached by these cases, on the wait for an answer (a server waits for the
rest of a request left incomplete)."""
METHODS = ["GET", "POST", "FOO", "get", "G\x00T", "", "\x16\x03\x01\x02\x00", "DELETE"]
TARGETS = ["/observe", "/", "*", "//", "/%zz", "/users/\xff\xfe", "/users/%ff", "/users/u?\x7f"]
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", "HTTP/", "", "HTTP/1.1 extra"]
HEADERS = [
    "Content-Length: abc",
    "Content-Length: -1",
    "Content-Length: 1, 2",
    "Content-Length: 2\r\nContent-Length: 3",
    "Transfer-Encoding: chunked\r\nContent-Length: 2",
    "Transfer-Encoding: gzip, chunked",
    "Transfer-Encoding: chunked, chunked",
    "Bad Header: x",
    "NoColon",
    ": no name",
    " folded: onto the line before",
    "X-Nul: a\x00b",
    "Content-Encoding: br",
    "Content-Encoding: foo",
    "Content-Encoding: gzip",
    "Content-Encoding: deflate",
    "Authorization: Bearer \xff\xfe",
    "Authorization: bearer w",
    "Authorization: Basic w",
    "Idempotency-Key: " + "k" * 10_000,
    "Idempotency-Key: \xff",
    "X-Long: " + "v" * 9_000,
    "Host: a\r\nHost: b",
    "Connection: upgrade\r\nUpgrade: websocket",
    "Expect: foo",
    "Transfer-Encoding: foo",
]
CHUNKED = [
    b"zz\r\n{}\r\n0\r\n\r\n",
    b"-1\r\n{}\r\n0\r\n\r\n",
    b"ffffffffffffffffffff\r\n{}\r\n0\r\n\r\n",
    b"2;ext=1\r\n{}\r\n0\r\n\r\n",
    b"2\r\n{}0\r\n\r\n",
    b"0\r\nBad Trailer\r\n\r\n",
    b"2\r\n{}\r\n0\r\n\r\nGARBAGE\r\n\r\n",
    b"%x\r\n%s\r\n0\r\n\r\n" % (len(OBSERVATION), OBSERVATION),
]


def malformed_requests(seed: int) -> list[bytes]:
    """Every request line, header and chunked body above, then seeded flips of a valid request."""
    rng = random.Random(seed)
    raw = [
        f"{m} {t} {v}\r\nHost: x\r\n\r\n".encode("latin-1")
        for m in METHODS
        for t in TARGETS
        for v in VERSIONS
        if rng.random() < 0.25  # a quarter of the 448 combinations
    ]
    raw += [request("POST", "/observe", AUTH, header, body=OBSERVATION) for header in HEADERS]
    chunked = request("POST", "/observe", AUTH, "Transfer-Encoding: chunked")
    raw += [chunked + body for body in CHUNKED]
    lone = b'{"user": "\\udcff", "item": "i1", "rating": 3}'  # a lone surrogate, escaped
    raw += [request("POST", path, AUTH, body=lone) for path in ("/observe", "/topk", "/predict")]
    valid = bytearray(request("POST", "/observe", AUTH, body=OBSERVATION))
    for _ in range(60):
        flipped = valid.copy()
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        raw.append(bytes(flipped))
    return raw


def _send(port: int, raw: bytes) -> Answer | None:
    """The answer to ``raw``; None when the server closes without one or waits for more."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.sendall(raw)
            return read_answer(sock)
    except (TimeoutError, ConnectionError):
        return None  # (an incomplete request is not answered: that is no failure)


def _server_errors(url: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "velox_requests"
        for sample in family.samples
        if int(sample.labels["status"]) >= 500
    )


def test_raw_socket_fuzz_gets_no_5xx_no_plain_error_and_no_error_log(tmp_path):
    _publish(tmp_path)
    server = Server(tmp_path, "serve.write_token=w")
    cases = malformed_requests(seed=14)
    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            answers = list(pool.map(lambda raw: _send(server.port, raw), cases))
        assert _server_errors(server.url) == 0
    finally:
        assert server.stop() == 0
    answered = [(raw, a) for raw, a in zip(cases, answers, strict=True) if a is not None]
    assert len(answered) > 0.8 * len(cases)  # (a reset may beat an answer to a closed socket)
    for raw, answer in answered:
        assert answer.status < 500, (raw[:200], answer)
        if answer.status >= 400:
            answer.error()
    assert sum(400 <= a.status < 500 for _, a in answered) > len(cases) / 2
    log = "".join(server.output)
    assert " ERROR " not in log and "Traceback" not in log, log
