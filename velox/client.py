"""A typed Python client for the Velox HTTP API, so callers need not hand-write JSON and retries.

:class:`AsyncClient` is for asyncio code (one pooled ``aiohttp`` session);
:class:`Client` offers the same methods synchronously for scripts and notebooks.
Answers come back as frozen dataclasses whose fields are the server's JSON
fields, with the same names and types. An error status becomes a
:class:`VeloxAPIError` (the server's error code and message, or ``http_error``
when the body is not the server's JSON error, ``invalid_response`` when a
success has another shape); an unreachable server becomes a
:class:`VeloxConnectionError`. Both are :class:`~velox.errors.VeloxError`,
whose message is one sentence meant for the user.

Ids follow the model's rule (:mod:`velox.api`): strings, integers accepted and
sent as strings; anything else is refused before a request is sent. Besides
the standard library the module imports aiohttp, :mod:`velox.api` and
:mod:`velox.errors`, never the model, NumPy or Numba, so a process that only
calls the service stays small and starts fast.

Calls that are safe to repeat are retried on connection failures (refused,
reset, timed out) and on 502/503/504, with exponential backoff; ``/readyz``'s
503 is the answer "not ready" and is returned at once. ``observe`` is
retried only when given an ``idempotency_key``, which the server uses to
apply it once whatever the number of attempts; without one it is sent once: a
request that timed out or lost its connection may still have been applied,
and sending it again would learn the same ratings twice.

::

    with Client("http://localhost:8080", token="secret") as velox:
        velox.observe(Observation("alice", "matrix", 4.5))
        best = velox.topk("alice", 10, explore="ucb")
        print([(s.item, s.score) for s in best.items])
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp

from velox.api import Explore, Id, normalize_id, normalize_ids
from velox.errors import ConfigError, InputError, VeloxError

log = logging.getLogger(__name__)

RETRY_STATUSES: frozenset[int] = frozenset({502, 503, 504})
"""Answers that say "try again shortly" (a proxy or server that is restarting, overloaded)."""

T = TypeVar("T")


class VeloxAPIError(VeloxError):
    """The server answered with an error status; ``code`` is its stable error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} (HTTP {status} {code})")
        self.status, self.code, self.message = status, code, message


class VeloxConnectionError(VeloxError):
    """The server could not be reached (refused, reset, timed out) after every attempt."""

    def __init__(self, method: str, url: str, reason: BaseException, attempts: int) -> None:
        why = str(reason) or type(reason).__name__
        tries = "attempt" if attempts == 1 else "attempts"
        super().__init__(
            f"could not reach {method} {url} after {attempts} {tries}: {why}; "
            "check that the server is running and the base URL is right"
        )
        self.url, self.reason, self.attempts = url, reason, attempts


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class Observation:
    """One rating to learn from; ``ts`` is seconds since the epoch (the server's clock if None)."""

    user: Id
    item: Id
    rating: float
    ts: float | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "user": normalize_id(self.user, "user"),
            "item": normalize_id(self.item, "item"),
            "rating": float(self.rating),
        }
        if self.ts is not None:
            body["ts"] = float(self.ts)
        return body


@dataclass(frozen=True)
class ScoredItem:
    """One item's score; for ``/topk`` the ranking score, exploration bonus included."""

    item: str
    score: float
    cold: bool
    """The version's trained features do not know the item: it is scored from its
    online fold-in, or from the cold-item vector before it has one."""


@dataclass(frozen=True)
class Scores:
    """Scores of ``/predict`` (in the order asked) or ``/topk`` (best first)."""

    user: str
    version: str
    items: list[ScoredItem]
    degraded: bool
    """Scored by the prior ``mu + b_i`` alone: the latency deadline would have been
    missed, or a model switch or user deletion held the model."""

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Scores:
        items = [
            ScoredItem(str(s["item"]), float(s["score"]), bool(s["cold"])) for s in body["items"]
        ]
        return cls(
            user=str(body["user"]),
            version=str(body["version"]),
            items=items,
            degraded=bool(body["degraded"]),
        )


@dataclass(frozen=True)
class ObserveResult:
    """What ``/observe`` applied and made durable, one entry per observation in input order."""

    accepted: int
    seqs: list[int]
    """Log sequence numbers."""
    predictions: list[float]
    """The model's prediction just before each observation was learnt (prequential)."""
    cold: list[bool]

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ObserveResult:
        return cls(
            accepted=int(body["accepted"]),
            seqs=[int(s) for s in body["seqs"]],
            predictions=[float(p) for p in body["predictions"]],
            cold=[bool(c) for c in body["cold"]],
        )


@dataclass(frozen=True)
class UserInfo:
    """A user's state on the server; a user it never saw is ``known=False`` with the prior."""

    user: str
    known: bool
    observations: int
    version: str
    """The model version serving this user."""
    last_update: float
    """Seconds since the epoch of the user's last observation (0.0 when none)."""
    weights: list[float]
    """The user's weights ``w_u`` (the prior mean for an unknown user)."""

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> UserInfo:
        return cls(
            user=str(body["user"]),
            known=bool(body["known"]),
            observations=int(body["observations"]),
            version=str(body["version"]),
            last_update=float(body["last_update"]),
            weights=[float(w) for w in body["weights"]],
        )


@dataclass(frozen=True)
class Deleted:
    """A user's erasure: the log records, offline rows and registry rows that were removed."""

    user: str
    deleted: bool
    log_records: int
    offline_rows: int
    """Rows of the offline store's data files and lines of its dead letters."""
    registry_rows: int
    """Trained-user rows removed from the registry's versions."""

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Deleted:
        return cls(
            user=str(body["user"]),
            deleted=bool(body["deleted"]),
            log_records=int(body["log_records"]),
            offline_rows=int(body["offline_rows"]),
            registry_rows=int(body["registry_rows"]),
        )


@dataclass(frozen=True)
class ModelInfo:
    """One registered model version, as the registry describes it."""

    version: str
    """Its name, e.g. ``v3``."""
    state: str
    """``building``, ``ready``, ``active``, ``failed`` or ``retired``."""
    created: str
    """When the version was started, ISO 8601."""
    engine: str
    mode: str
    """How the engine ran: ``single`` (on the driver) or ``distributed``; may be empty."""
    watermark: int
    """The last log sequence number the training data included."""
    metrics: dict[str, float]

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ModelInfo:
        return cls(
            version=str(body["version"]),
            state=str(body["state"]),
            created=str(body["created"]),
            engine=str(body["engine"]),
            mode=str(body["mode"]),
            watermark=int(body["watermark"]),
            metrics={str(k): float(v) for k, v in body["metrics"].items()},
        )


@dataclass(frozen=True)
class Models:
    """The registry's versions, the one its pointer names and the one this server answers with."""

    active: str | None
    """The version the registry marks active (None when none is)."""
    serving: str
    """The version the server that answered is serving."""
    lagging: bool
    """The server serves another version than ``active`` (it follows the pointer, or
    cannot: see ``problem``)."""
    problem: str | None
    """Why the server does not serve the active version, while it does not."""
    versions: list[ModelInfo]
    monitor: dict[str, Any] | None = None
    """The served version's staleness figures (rolling RMSE, counts since its watermark, age)."""
    retrain: dict[str, Any] | None = None
    """The retrain loop: whether it runs, its last decision and its last run."""

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Models:
        active, problem = body["active"], body["problem"]
        return cls(
            active=None if active is None else str(active),
            serving=str(body["serving"]),
            lagging=bool(body["lagging"]),
            problem=None if problem is None else str(problem),
            versions=[ModelInfo.from_json(v) for v in body["versions"]],
            monitor=body.get("monitor"),
            retrain=body.get("retrain"),
        )


# ------------------------------------------------------------------ async client


class AsyncClient:
    """The Velox API for asyncio code, over one pooled HTTP session.

    The session (at most ``connections`` open connections, kept alive between
    calls) is created on first use and closed by :meth:`close` or ``async with``.
    ``timeout`` bounds each attempt in seconds; idempotent calls make up to
    ``retries + 1`` attempts, waiting ``backoff``, ``2 * backoff``, ... between them.

    ::

        async with AsyncClient("http://localhost:8080") as velox:
            scores = await velox.predict("alice", ["matrix", "alien"])
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 0.05,
        connections: int = 100,
    ) -> None:
        if retries < 0:
            raise ConfigError(f"retries must be 0 or more, got {retries}")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.connections = connections
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the pooled connections; a later call opens a new session."""
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()

    async def predict(self, user: Id, items: Sequence[Id]) -> Scores:
        """Scores of ``items`` for ``user``, in the order given."""
        body = {"user": normalize_id(user, "user"), "items": normalize_ids(items, "item")}
        return await self._call("POST", "/predict", Scores.from_json, body)

    async def topk(
        self,
        user: Id,
        k: int,
        *,
        candidates: Sequence[Id] | None = None,
        explore: Explore = "none",
        alpha: float = 1.0,
        include_rated: bool = False,
    ) -> Scores:
        """The ``k`` best items for ``user`` (among ``candidates`` if given), best first."""
        body: dict[str, Any] = {
            "user": normalize_id(user, "user"),
            "k": k,
            "explore": explore,
            "alpha": alpha,
            "include_rated": include_rated,
        }
        if candidates is not None:
            body["candidates"] = normalize_ids(candidates, "candidate")
        return await self._call("POST", "/topk", Scores.from_json, body)

    async def observe(
        self,
        observations: Observation | Mapping[str, Any] | Sequence[Observation | Mapping],
        *,
        idempotency_key: str | None = None,
    ) -> ObserveResult:
        """Learn from one observation or a batch; durable once this returns.

        Retried only with an ``idempotency_key`` (unique per logical request,
        e.g. the event's id): the server then applies it once however many
        attempts reach it. Without one a failed attempt may or may not have
        been applied, so it is not retried.
        """
        if isinstance(observations, Observation | Mapping):
            observations = [observations]
        body = [_observation(o).to_json() for o in observations]
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        return await self._call(
            "POST",
            "/observe",
            ObserveResult.from_json,
            body,
            idempotent=idempotency_key is not None,
            headers=headers,
        )

    async def user(self, user_id: Id) -> UserInfo:
        """What the server holds about one user."""
        return await self._call("GET", f"/users/{_segment(user_id)}", UserInfo.from_json)

    async def delete_user(self, user_id: Id) -> Deleted:
        """Erase a user's online state, log records and offline rows."""
        return await self._call("DELETE", f"/users/{_segment(user_id)}", Deleted.from_json)

    async def models(self) -> Models:
        """Every registered model version and which one is active."""
        return await self._call("GET", "/models", Models.from_json)

    async def activate(self, version: str) -> str:
        """Serve ``version`` (e.g. ``"v3"``); returns the version now active."""
        return await self._call(
            "POST", f"/models/{quote(version, safe='')}/activate", lambda body: str(body["active"])
        )

    async def retrain(self, reason: str = "", *, force: bool = False) -> str:
        """Start a retrain (admin token); the id of the run started, or of the one running.

        Follow it in :meth:`models` (``retrain["last_run"]``). Not retried: a
        second try would find the first one running anyway.
        """
        return await self._call(
            "POST",
            "/retrain",
            lambda body: str(body["id"]),
            {"reason": reason, "force": force},
            idempotent=False,
        )

    async def health(self) -> bool:
        """Whether the server process answers ``/healthz`` with ok.

        An error status gives False; an unreachable server raises
        :class:`VeloxConnectionError`, so a wrong URL is not mistaken for a sick server.
        """
        try:
            return await self._call("GET", "/healthz", lambda body: body["status"] == "ok")
        except VeloxAPIError:
            return False

    async def ready(self) -> bool:
        """Whether a model is loaded and the server takes traffic (``/readyz``).

        A 503 here is the answer "not ready", returned at once rather than retried.
        """
        try:
            return await self._call(
                "GET", "/readyz", lambda body: body["status"] == "ready", retry_on=frozenset()
            )
        except VeloxAPIError:
            return False

    async def _call(
        self,
        method: str,
        path: str,
        parse: Callable[[Any], T],
        body: object = None,
        *,
        idempotent: bool = True,
        retry_on: frozenset[int] = RETRY_STATUSES,
        headers: Mapping[str, str] | None = None,
    ) -> T:
        """The parsed JSON answer; retries only an idempotent call, as the module says."""
        url = self.base_url + path
        attempts = self.retries + 1 if idempotent else 1
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                status, text = await self._send(method, url, body, headers)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                failure = VeloxConnectionError(method, url, exc, attempt + 1)
                log.debug("%s %s failed (attempt %d): %r", method, url, attempt + 1, exc)
                continue
            if status in retry_on and attempt + 1 < attempts:
                log.debug("%s %s answered %d; retrying", method, url, status)
                continue
            return _answer(status, text, parse, f"{method} {url}")
        raise failure

    async def _send(
        self, method: str, url: str, body: object, headers: Mapping[str, str] | None = None
    ) -> tuple[int, str]:
        async with self._session().request(method, url, json=body, headers=headers) as response:
            return response.status, await response.text()

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers=headers,
            )
        return self._http


def _segment(user: Id) -> str:
    """A user id as one path segment: spaces, slashes and the like percent-encoded."""
    return quote(normalize_id(user, "user"), safe="")


def _observation(value: Observation | Mapping[str, Any]) -> Observation:
    if isinstance(value, Observation):
        return value
    try:
        return Observation(**value)
    except TypeError:
        raise InputError(
            f"observation {dict(value)!r} is not valid; give the keys user, item, rating "
            "and optionally ts"
        ) from None


def _answer(status: int, text: str, parse: Callable[[Any], T], request: str) -> T:
    """A success parsed by ``parse``; an error body, or an answer of another shape, raised."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if status >= 400:
        if isinstance(body, dict) and "error" in body:
            raise VeloxAPIError(status, str(body["error"]), str(body.get("message", "")))
        raise VeloxAPIError(status, "http_error", text[:200] or "the server gave no reason")
    try:
        return parse(body)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise VeloxAPIError(
            status,
            "invalid_response",
            f"the answer to {request} does not have the expected shape ({exc!r}): {text[:200]!r}; "
            "is the server another Velox version?",
        ) from None


# ------------------------------------------------------------------- sync client


class Client:
    """The same calls as :class:`AsyncClient`, blocking, for scripts and notebooks.

    It runs a private event loop in a daemon thread and forwards each call to
    an :class:`AsyncClient` there, so it works inside a running loop (Jupyter)
    too. Several threads may share one instance; their calls run concurrently
    over the same connection pool. :meth:`close` waits for calls in flight.

    ::

        with Client("http://localhost:8080") as velox:
            if velox.ready():
                print(velox.predict(42, [1, 2, 3]).items)
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 0.05,
        connections: int = 100,
    ) -> None:
        self._client = AsyncClient(
            base_url,
            token=token,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            connections=connections,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="velox-client", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Finish the calls in flight, close the connections and stop the loop's thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def predict(self, user: Id, items: Sequence[Id]) -> Scores:
        return self._run(self._client.predict(user, items))

    def topk(
        self,
        user: Id,
        k: int,
        *,
        candidates: Sequence[Id] | None = None,
        explore: Explore = "none",
        alpha: float = 1.0,
        include_rated: bool = False,
    ) -> Scores:
        return self._run(
            self._client.topk(
                user,
                k,
                candidates=candidates,
                explore=explore,
                alpha=alpha,
                include_rated=include_rated,
            )
        )

    def observe(
        self,
        observations: Observation | Mapping[str, Any] | Sequence[Observation | Mapping],
        *,
        idempotency_key: str | None = None,
    ) -> ObserveResult:
        return self._run(self._client.observe(observations, idempotency_key=idempotency_key))

    def user(self, user_id: Id) -> UserInfo:
        return self._run(self._client.user(user_id))

    def delete_user(self, user_id: Id) -> Deleted:
        return self._run(self._client.delete_user(user_id))

    def models(self) -> Models:
        return self._run(self._client.models())

    def activate(self, version: str) -> str:
        return self._run(self._client.activate(version))

    def retrain(self, reason: str = "", *, force: bool = False) -> str:
        return self._run(self._client.retrain(reason, force=force))

    def health(self) -> bool:
        return self._run(self._client.health())

    def ready(self) -> bool:
        return self._run(self._client.ready())

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._closed:
                call.close()
                raise VeloxError("this Client is closed; create a new one")
            future = asyncio.run_coroutine_threadsafe(call, self._loop)
        return future.result()

    async def _shutdown(self) -> None:
        others = asyncio.all_tasks() - {asyncio.current_task()}
        await asyncio.gather(*others, return_exceptions=True)
        await self._client.close()
