"""Schemathesis drives a running ``velox serve`` from its own OpenAPI document.

Valid and invalid requests (positive and negative generation) for every
operation: no answer may be a 5xx, every 4xx must be the JSON error body, and
a rejected request must not change anything (the count of applied
observations in /metrics stays the same).
"""

from __future__ import annotations

import re

import pytest
import requests
import schemathesis
from schemathesis import GenerationMode

from serving.openapi import openapi_document
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
    server = Server(root)
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
