"""The OpenAPI 3.1 document of the HTTP API, served at ``/openapi.json``.

Written out once here (rather than generated) so it states the limits and
error contract the handlers enforce; the fuzz test drives the running server
from it.
"""

from __future__ import annotations

from typing import Any

_ID = {"oneOf": [{"type": "string", "minLength": 1}, {"type": "integer"}]}
_ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
}
_SCORES = {
    "type": "object",
    "required": ["user", "version", "items", "degraded"],
    "properties": {
        "user": {"type": "string"},
        "version": {"type": "string"},
        "degraded": {"type": "boolean"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["item", "score", "cold"],
                "properties": {
                    "item": {"type": "string"},
                    "score": {"type": "number"},
                    "cold": {"type": "boolean"},
                },
            },
        },
    },
}
_OBSERVATION = {
    "type": "object",
    "required": ["user", "item", "rating"],
    "additionalProperties": False,
    "properties": {
        "user": _ID,
        "item": _ID,
        "rating": {"type": "number"},
        "ts": {"type": "number"},
    },
}


def _errors(*codes: int) -> dict[str, Any]:
    content = {"application/json": {"schema": _ERROR}}
    return {str(code): {"description": "client error", "content": content} for code in codes}


def _json(schema: dict) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _ok(schema: dict) -> dict[str, Any]:
    return {"200": {"description": "ok", "content": {"application/json": {"schema": schema}}}}


def _operation(summary: str, body: dict | None, result: dict, *errors: int) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {**_ok(result), **_errors(*errors)},
    }
    if body is not None:
        operation["requestBody"] = _json(body)
    return operation


def openapi_document() -> dict[str, Any]:
    """The API description; every 4xx has the ``{"error", "message"}`` body."""
    user_path = {"name": "user", "in": "path", "required": True, "schema": {"type": "string"}}
    idempotency_key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Retries with the same key and body are applied once and get the "
        "first answer again (header Idempotent-Replayed); another body is a 422.",
        "schema": {"type": "string", "minLength": 1},
    }
    predict = {
        "type": "object",
        "required": ["user", "items"],
        "additionalProperties": False,
        "properties": {"user": _ID, "items": {"type": "array", "items": _ID, "minItems": 1}},
    }
    topk = {
        "type": "object",
        "required": ["user", "k"],
        "additionalProperties": False,
        "properties": {
            "user": _ID,
            "k": {"type": "integer", "minimum": 1},
            "candidates": {"type": "array", "items": _ID},
            "explore": {"enum": ["none", "ucb", "thompson"]},
            "alpha": {"type": "number", "minimum": 0},
            "include_rated": {"type": "boolean"},
        },
    }
    observe = {"oneOf": [_OBSERVATION, {"type": "array", "items": _OBSERVATION, "minItems": 1}]}
    observed = {
        "type": "object",
        "properties": {
            "accepted": {"type": "integer"},
            "seqs": {"type": "array", "items": {"type": "integer"}},
            "predictions": {"type": "array", "items": {"type": "number"}},
            "cold": {"type": "array", "items": {"type": "boolean"}},
        },
    }
    anything = {"type": "object"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Velox", "version": "1", "description": "Online personalisation."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
        "paths": {
            "/predict": {
                "post": _operation(
                    "Scores of items for a user", predict, _SCORES, 400, 401, 403, 413, 422
                )
            },
            "/topk": {
                "post": _operation(
                    "The k best items for a user", topk, _SCORES, 400, 401, 403, 413, 422
                )
            },
            "/observe": {
                "post": {
                    **_operation(
                        "Learn from observations, durably",
                        observe,
                        observed,
                        400,
                        401,
                        403,
                        410,
                        413,
                        422,
                    ),
                    "parameters": [idempotency_key],
                }
            },
            "/users/{user}": {
                "parameters": [user_path],
                "get": _operation("A user's state summary", None, anything, 401, 403, 422),
                "delete": _operation("Forget a user", None, anything, 401, 403, 422),
            },
            "/models": {"get": _operation("Model versions", None, anything, 401, 403)},
            "/models/{version}/activate": {
                "parameters": [
                    {
                        "name": "version",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "post": _operation("Serve a ready version", None, anything, 401, 403, 404, 409),
            },
            "/healthz": {"get": _operation("Liveness", None, anything)},
            "/readyz": {"get": _operation("Readiness", None, anything, 503)},
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "text"}},
                }
            },
            "/openapi.json": {"get": _operation("This document", None, anything)},
        },
    }
