"""What every route shares: JSON answers, bearer tokens, errors as JSON, request metrics.

Each route's handler is wrapped by :func:`endpoint` rather than an aiohttp
middleware: the route and its scope are known once, at start, and aiohttp
then calls the endpoint directly (a middleware chain adds two coroutine
layers and a current-app switch to every request, which showed in the
profile of a one-item predict). :func:`add_routes` also answers other
methods with a JSON 405 and other paths with a JSON 404.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import ContentEncodingError, DecompressSizeError, HttpProcessingError

from feature_store.durable import Busy, Damaged, Replaced, Unavailable
from serving.batcher import Closed
from serving.metrics import Metrics
from serving.schemas import RequestError
from velox.config import ServeConfig
from velox.errors import InputError, VeloxError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Route = tuple[str, str, Handler, str | None]
"""Path, method, handler, and the token scope it needs (None: open to all)."""

READ, WRITE, ADMIN = "read", "write", "admin"
ENCODINGS = ("identity", "gzip", "deflate")
"""The body encodings accepted (aiohttp decodes them); any other is refused with 415,
never read as plain bytes."""
CLIENT_GONE = 499
"""The status a request is counted under when its client left before the answer
(nginx's "client closed request"): not a server error."""
LIMITS = web.AppKey("limits", ServeConfig)
METRICS = web.AppKey("metrics", Metrics)
STARTED = web.RequestKey("started", float)
Problem = tuple[int, str, str]
"""An error answer: the status, the stable code and the sentence."""


def json_response(payload: object, status: int = 200) -> web.Response:
    """A JSON response encoded by msgspec (several times faster than ``json.dumps``)."""
    return web.Response(
        body=msgspec.json.encode(payload), status=status, content_type="application/json"
    )


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": code, "message": message}, status=status)


def endpoint(route: str, handler: Handler, scope: str | None) -> Handler:
    """``handler`` with what every request needs: clock, bearer token, errors as JSON, metrics."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        request[STARTED] = started = time.monotonic()
        app = request.app
        try:
            if scope is not None:
                _authorize(request, scope, app[LIMITS])
            _check_encoding(request)
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _http_error(request, exc)
        except Exception as exc:
            response = _failure(request, exc)
        app[METRICS].request(route, response.status, time.monotonic() - started)
        return response

    return wrapped


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[LIMITS].max_body_bytes
        return error_response(413, "payload_too_large", f"the body is larger than {limit} bytes")
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "bad_request")
    return error_response(exc.status, code, exc.reason)


def _failure(request: web.Request, exc: Exception) -> web.Response:
    """Every failure as ``{"error", "message"}``; a server fault is logged, never leaked."""
    if isinstance(exc, RequestError):
        return error_response(exc.status, exc.code, exc.message)
    if isinstance(exc, web.RequestPayloadError):  # a body that does not parse or decompress
        return error_response(*payload_problem(exc.__cause__ or exc))
    if isinstance(exc, ConnectionResetError):  # the client left mid-body: nobody to answer
        log.debug("client left during %s %s", request.method, request.path)
        return web.Response(status=CLIENT_GONE)
    if isinstance(exc, InputError):
        return error_response(422, "validation_error", str(exc))
    if isinstance(exc, Unavailable):  # a failing disk: the sentence, and when to try again
        response = error_response(503, "unavailable", str(exc))
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    if isinstance(exc, Closed | Busy | Replaced | Damaged):  # (a damaged store: the sentence)
        return error_response(503, "unavailable", str(exc))
    if isinstance(exc, VeloxError):  # the detail (paths, storage errors) stays in the log
        log.error("request failed: %s", exc)
        return error_response(
            503, "unavailable", "the service cannot answer now; see the server log"
        )
    log.exception("unexpected error in %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal", "an unexpected error occurred; see the server log")


def payload_problem(exc: BaseException) -> Problem:
    """The 4xx for a body the HTTP layer could not read: too large once decoded, or malformed."""
    if isinstance(exc, DecompressSizeError):
        return 413, "payload_too_large", "the body is too large once decompressed"
    if isinstance(exc, ContentEncodingError):
        return 400, "bad_encoding", "the body does not decode as its Content-Encoding says"
    return 400, "bad_request", f"the body is malformed: {first_line(exc)}"


def first_line(exc: BaseException) -> str:
    """aiohttp's parser message without the lines that point into the request."""
    text = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
    return text.strip().split("\n", 1)[0].rstrip(":")


def _check_encoding(request: web.Request) -> None:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ENCODINGS:
        raise RequestError(
            415,
            "unsupported_encoding",
            f"Content-Encoding {encoding!r} is not supported; send {', '.join(ENCODINGS)}",
        )


def _authorize(request: web.Request, scope: str, limits: ServeConfig) -> None:
    """The bearer token's scope covers ``scope``; the scheme's case does not matter (RFC 7235)."""
    tokens = {READ: limits.read_token, WRITE: limits.write_token, ADMIN: limits.admin_token}
    allowed = {READ: (READ, WRITE, ADMIN), WRITE: (WRITE, ADMIN), ADMIN: (ADMIN,)}[scope]
    if not tokens[scope]:
        return  # this access is open
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        raise RequestError(401, "unauthorized", "this route needs 'Authorization: Bearer <token>'")
    # aiohttp keeps undecodable header bytes as surrogates; such a token matches none.
    given = credentials.strip().encode(errors="surrogateescape")
    held = [
        name
        for name, token in tokens.items()
        if token and hmac.compare_digest(given, token.encode())
    ]
    if not held:
        raise RequestError(401, "unauthorized", "the bearer token is not valid")
    if not any(name in allowed for name in held):
        raise RequestError(403, "forbidden", f"this route needs a token with {scope} access")


async def expect_continue(request: web.Request) -> web.Response | None:
    """``Expect: 100-continue`` answered as aiohttp does; another expectation is a JSON 417.

    (aiohttp's own handler raises a text/plain 417 that no endpoint sees.)
    """
    if request.headers.get("Expect", "").lower() != "100-continue":
        return error_response(
            417, "expectation_failed", "the only Expect this server meets is 100-continue"
        )
    if request.version == HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not begun
    return None


async def _not_found(request: web.Request) -> web.Response:
    return error_response(404, "not_found", f"no route {request.path}; see /openapi.json")


def _wrong_method(allowed: list[str]) -> Handler:
    async def wrong_method(request: web.Request) -> web.Response:
        response = error_response(
            405,
            "method_not_allowed",
            f"{request.path} takes {', '.join(allowed)}, not {request.method}",
        )
        response.headers["Allow"] = ",".join(allowed)
        return response

    return wrong_method


def add_routes(router: web.UrlDispatcher, routes: list[Route]) -> None:
    """Every route wrapped by :func:`endpoint`; other methods get a JSON 405, other paths 404.

    The routes of one path are added one after the other so that aiohttp keeps
    them on one resource, whose last route catches every other method.
    """
    for path in dict.fromkeys(path for path, *_ in routes):
        allowed = []
        for route_path, method, handler, scope in routes:
            if route_path == path:
                methods = [method, "HEAD"] if method == "GET" else [method]
                wrapped = endpoint(path, handler, scope)
                for each in methods:
                    router.add_route(each, path, wrapped, expect_handler=expect_continue)
                allowed += methods
        wrong = endpoint(path, _wrong_method(allowed), None)
        router.add_route("*", path, wrong, expect_handler=expect_continue)
    unmatched = endpoint("unmatched", _not_found, None)
    router.add_route("*", "/{tail:.*}", unmatched, expect_handler=expect_continue)
