"""The connection below the routes: malformed HTTP answered as JSON 4xx, and logged calmly.

aiohttp answers what its parser rejects (a bad chunk size, Content-Length
beside Transfer-Encoding, a line over its limit, an unknown method, an
encoding it cannot decode) in ``RequestHandler.handle_error``, before any
route or middleware runs: a text/plain 400 and an ERROR traceback per request,
so that any client can flood the log. aiohttp has no hook for that answer, so
:class:`Runner` serves the app through :class:`JsonErrorProtocol`, whose
``handle_error`` answers ``{"error", "message"}`` with the fitting 4xx and
logs through :class:`Throttled`: one INFO line at most every ``log_every``
seconds, carrying the count of those held back. Every rejection is counted in
/metrics under the route ``malformed``. A genuine server fault still logs its
traceback at ERROR. ``velox serve`` runs the app with :func:`run`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadStatusLine,
    ContentEncodingError,
    HttpProcessingError,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.web_protocol import RequestHandler

from serving.http import (
    ENCODINGS,
    METRICS,
    Problem,
    error_response,
    first_line,
    payload_problem,
)

log = logging.getLogger(__name__)

MAX_LINE = 8192
"""Longest request line, in bytes."""
MAX_FIELD = 8190
"""Longest header line, in bytes (aiohttp's default). It differs from :data:`MAX_LINE`
so that the limit a ``LineTooLong`` names tells a long URL (414) from a long header (431)."""
MALFORMED = "malformed"
"""The route label in /metrics of requests refused before routing."""


class Throttled:
    """At most one INFO line every ``every`` seconds; the next line counts those held back.

    Clients choose how often they send malformed requests, so a line per
    request would let them fill the disk; the count in /metrics stays exact.
    """

    def __init__(self, logger: logging.Logger, every: float) -> None:
        self.logger, self.every = logger, every
        self._next = 0.0
        self._held = 0

    def info(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        self._next = now + self.every
        held, self._held = self._held, 0
        more = f" ({held} more since the last line)" if held else ""
        self.logger.info(message + "%s", *args, more)


def rejection(exc: BaseException | None, status: int) -> Problem:
    """The answer to a request the HTTP parser refused (``status``: aiohttp's choice)."""
    if isinstance(exc, LineTooLong):
        if exc.args[1] == MAX_LINE:
            return 414, "uri_too_long", f"the request line is longer than {MAX_LINE} bytes"
        return 431, "header_too_large", f"a header line is longer than {MAX_FIELD} bytes"
    if isinstance(exc, ContentEncodingError):  # the parser refuses only encodings it lacks
        return (
            415,
            "unsupported_encoding",
            f"this Content-Encoding is not supported; send {', '.join(ENCODINGS)}",
        )
    if isinstance(exc, BadStatusLine):  # (an unknown method too)
        return 400, "bad_request", f"the request line is not HTTP ({first_line(exc)})"
    if isinstance(exc, PayloadEncodingError):
        return payload_problem(exc)
    if isinstance(exc, HttpProcessingError):  # (the C parser raises even bad chunks as these)
        return 400, "bad_request", f"the request is malformed ({first_line(exc)})"
    if status >= 500:
        return status, "internal", "an unexpected error occurred; see the server log"
    return status, "bad_request", "the request is not valid HTTP"


class JsonErrorProtocol(RequestHandler):
    """aiohttp's connection handler, with JSON answers and throttled logs for bad requests."""

    def __init__(
        self,
        manager: web.Server,
        *,
        throttled: Throttled,
        count: Callable[[int], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._throttled, self._count = throttled, count

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: the answer has begun, nothing to add
            raise ConnectionError("the response is partly sent; it cannot become an error")
        status, code, text = rejection(exc, status)
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            self._throttled.info(
                "refused a malformed request from %s with %d: %s", request.remote, status, text
            )
        self._count(status)
        response = error_response(status, code, text)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """A body that broke after its answer (aiohttp drains it) is the client's, not ours."""
        exc = kw.get("exc_info")
        if isinstance(exc, web.RequestPayloadError | HttpProcessingError | ConnectionError):
            self._throttled.info("dropped the rest of a malformed body (%s)", first_line(exc))
        else:
            super().log_exception(*args, **kw)


class _Server(web.Server):
    """aiohttp's server with :class:`JsonErrorProtocol` as its connections' protocol."""

    def __init__(self, plain: web.Server, throttled: Throttled, count: Callable[[int], None]):
        # aiohttp builds its Server in Application._make_handler; its settings are copied.
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )
        self._throttled, self._count_rejected = throttled, count

    def __call__(self) -> RequestHandler:
        return JsonErrorProtocol(
            self,
            throttled=self._throttled,
            count=self._count_rejected,
            loop=self._loop,
            **self._kwargs,
        )


class Runner(web.AppRunner):
    """``web.AppRunner`` whose connections answer malformed requests as the routes do."""

    def __init__(self, app: web.Application, *, log_every: float = 60.0, **kwargs: Any) -> None:
        super().__init__(app, max_line_size=MAX_LINE, max_field_size=MAX_FIELD, **kwargs)
        self._log_every = log_every

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        metrics = self.app[METRICS]
        return _Server(
            plain,
            Throttled(log, self._log_every),
            lambda status: metrics.request(MALFORMED, status, 0.0),
        )


def run(
    app: web.Application,
    sock: socket.socket,
    *,
    access_log: logging.Logger | None,
    announce: Callable[[str], None],
) -> None:
    """Serve ``app`` on ``sock`` through :class:`Runner` until SIGINT or SIGTERM.

    What ``web.run_app`` does (which always builds a plain ``AppRunner``):
    ``announce`` where it listens, give requests up to 30 s to finish at the
    signal, and run the app's cleanup.
    """

    async def serve() -> None:
        # The signal sets an event rather than raising GracefulExit as aiohttp's runner
        # does: that exit would cancel every task (requests, the batcher) before cleanup.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        runner = Runner(app, access_log=access_log, shutdown_timeout=30)
        await runner.setup()
        try:
            site = web.SockSite(runner, sock)
            await site.start()
            announce(f"======== Running on {site.name} ========\n(Press CTRL+C to quit)")
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(serve())
