"""The OpenAPI 3.1 document of the HTTP API, served at ``/openapi.json``.

Every body schema is generated from the msgspec types of
:mod:`serving.schemas` (``msgspec.json.schema_components``), the same types
that decode and check requests and encode answers, so the document cannot
drift from what the server enforces and sends. What is written here is what
types do not say: paths, parameters, statuses, and the bearer scheme. The
fuzz test drives the running server from this document.
"""

from __future__ import annotations

from typing import Any

import msgspec

from serving.schemas import (
    Activated,
    ErrorBody,
    Forgotten,
    Models,
    Observations,
    Observed,
    PredictBody,
    RetrainAccepted,
    RetrainRequest,
    Scores,
    Status,
    TopKBody,
    UserSummary,
)

_TYPES = (
    PredictBody,
    TopKBody,
    Observations,
    Scores,
    Observed,
    UserSummary,
    Forgotten,
    Models,
    Activated,
    Status,
    RetrainRequest,
    RetrainAccepted,
    ErrorBody,
)


def _content(schema: dict) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def openapi_document() -> dict[str, Any]:
    """The API description; every 4xx and 503 has the ``{"error", "message"}`` body."""
    schemas, components = msgspec.json.schema_components(
        _TYPES, ref_template="#/components/schemas/{name}"
    )
    (
        predict,
        topk,
        observe,
        scores,
        observed,
        user,
        forgotten,
        models,
        activated,
        status,
        retrain,
        accepted,
        error,
    ) = schemas

    def operation(summary: str, body: dict | None, answer: dict, *errors: int) -> dict[str, Any]:
        responses = {"200": {"description": "ok", "content": _content(answer)}}
        for code in errors:
            responses[str(code)] = {"description": "error", "content": _content(error)}
        described: dict[str, Any] = {"summary": summary, "responses": responses}
        if body is not None:
            described["requestBody"] = {"required": True, "content": _content(body)}
        return described

    def path_parameter(name: str) -> dict[str, Any]:
        return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}

    idempotency_key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Retries with the same key and body are applied once and get the "
        "first answer again (header Idempotent-Replayed); another body is a 422.",
        "schema": {"type": "string", "minLength": 1},
    }
    reads = (400, 401, 403, 413, 415, 422, 503)  # 415: a Content-Encoding not accepted
    # POST /retrain: 202 when it starts a run, 200 when one already runs; no body: defaults.
    start_retrain = operation("Start a retrain now (admin)", retrain, accepted, *reads)
    start_retrain["responses"]["202"] = {"description": "started", "content": _content(accepted)}
    start_retrain["responses"]["200"]["description"] = "a retrain already runs"
    start_retrain["requestBody"]["required"] = False
    return {
        "openapi": "3.1.0",
        "info": {"title": "Velox", "version": "1", "description": "Online personalisation."},
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
        "paths": {
            "/predict": {"post": operation("Scores of items for a user", predict, scores, *reads)},
            "/topk": {"post": operation("The k best items for a user", topk, scores, *reads)},
            "/observe": {
                "post": {
                    **operation("Learn from observations, durably", observe, observed, *reads, 410),
                    "parameters": [idempotency_key],
                }
            },
            "/users/{user}": {
                "parameters": [path_parameter("user")],
                "get": operation("A user's state summary", None, user, 401, 403, 422, 503),
                "delete": operation("Forget a user", None, forgotten, 401, 403, 422, 503),
            },
            "/models": {"get": operation("Model versions", None, models, 401, 403)},
            "/models/{version}/activate": {
                "parameters": [path_parameter("version")],
                "post": operation("Serve a ready version", None, activated, 401, 403, 404, 409),
            },
            "/retrain": {"post": start_retrain},
            "/healthz": {"get": operation("Liveness", None, status)},
            "/readyz": {"get": operation("Readiness", None, status, 503)},
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "text"}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {"description": "ok", "content": _content({"type": "object"})}
                    },
                }
            },
        },
    }
