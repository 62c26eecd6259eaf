"""Which model version serves: the registry's ``ACTIVE`` pointer, followed live.

The pointer is the single truth (DESIGN.md, section 4). Whoever moves it
(``velox train --activate``, ``velox models activate | rollback``,
``POST /models/{v}/activate``, or a retrain), the running server ends up
serving that version: :meth:`VersionSwitch.follow` reads the pointer every
``serve.follow_interval`` seconds and switches when it names another version.

Every switch is the same swap (:mod:`feature_store.candidate`): the version
is built as a candidate in the store's other slot, off the event loop, while
the active one serves and learns; then, on the event loop (where batches are
applied, so none is half applied), the candidate applies the last records
and becomes active in one synced write. Reads are never degraded by it, and
observations wait at most for that one micro-batch. The replaced version is
sealed in its slot, so a rollback is the same swap back.

The HTTP route switches first and moves the pointer after, so its answer
means the server serves the version; the follower then finds nothing to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

from feature_store.candidate import Candidate
from feature_store.registry import ModelVersion
from serving.state import Serving
from velox.backend import Backend
from velox.errors import DataError

log = logging.getLogger(__name__)


class Stopping(DataError):
    """A build was stopped because the server stops; its slot keeps an exact checkpoint."""


class VersionSwitch:
    """Switches of the served version, one at a time, and what the pointer says."""

    def __init__(self, state: Serving, pointer: str, backend: Backend) -> None:
        self._state = state
        self._backend = backend
        self.lock = asyncio.Lock()
        """Held over a whole switch; a retrain holds it from its candidate to its swap."""
        self.pointer: str | None = pointer
        """The version the registry's pointer named when last read."""
        self.problem: str | None = None
        """Why the server does not serve the pointer's version, while it does not."""
        self.candidate: Candidate | None = None
        """The version being built in the store's other slot, if any."""
        self.on_activated: list[Callable[[ModelVersion], None]] = []
        """Called on the event loop after each swap, with the version now served."""
        self._stopping = threading.Event()
        self._report()

    @property
    def serving(self) -> str:
        return self._state.durable.model.version

    @property
    def lagging(self) -> bool:
        """Whether the served version is not the one the pointer names."""
        return self.pointer is not None and self.pointer != self.serving

    async def activate(self, version: ModelVersion) -> None:
        """Serve ``version`` (a ready or active one), then make it the registry's active one."""
        async with self.lock:
            if version.name != self.serving:
                await self._switch(version)
            await self.point(version)

    async def point(self, version: ModelVersion) -> None:
        """Move the registry's pointer to ``version`` (served already)."""
        registry = self._state.registry
        await asyncio.get_running_loop().run_in_executor(None, registry.activate, version.number)
        self.pointer = version.name
        self._report()

    async def follow(self, every: float) -> None:
        """Read the pointer every ``every`` seconds and switch to what it names."""
        while True:
            await asyncio.sleep(every)
            await self.check()

    def halt(self) -> None:
        """The server stops: a build under way ends between chunks (:class:`Stopping`)."""
        self._stopping.set()

    async def stop(self, follower: asyncio.Task) -> None:
        """Stop ``follower`` (the task of :meth:`follow`); a build under way stops between chunks.

        A build or a swap runs in a thread that cannot be interrupted at any
        point: cancelling its task mid-way would let the store close under it.
        """
        self._stopping.set()
        async with self.lock:
            follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower

    async def check(self) -> None:
        """Read the pointer once and switch when it names another version than the served one.

        A pointer that cannot be read, or a switch that fails, leaves the
        served version as it is; :attr:`problem` says why (logged once).
        """
        async with self.lock:
            loop = asyncio.get_running_loop()
            try:
                active = await loop.run_in_executor(None, self._state.registry.active)
                self.pointer = None if active is None else active.name
                if active is not None and active.name != self.serving:
                    log.info("the registry's pointer moved to %s: switching", active.name)
                    await self._switch(active)
                problem = None
            except (DataError, OSError) as exc:
                problem = f"cannot serve the registry's active version: {exc}"
            if problem != self.problem and problem is not None:
                log.error("%s", problem)
            self.problem = problem
            self._report()

    async def build(self, version: ModelVersion) -> Candidate:
        """``version`` built beside the served one and caught up with the log (hold :attr:`lock`).

        Resumes the build a restart interrupted, or the version the last swap
        replaced (a rollback), from the other slot when it holds it exactly.
        """
        state = self._state
        loop = asyncio.get_running_loop()
        candidate = await loop.run_in_executor(
            None,
            Candidate.build,
            version,
            state.registry,
            state.durable.store,
            state.config,
            self._backend,
        )
        self.candidate = candidate
        try:
            await self._catch_up(candidate)
        except BaseException:
            self.abandon(candidate)
            raise
        return candidate

    async def complete(self, candidate: Candidate) -> float:
        """Swap ``candidate`` in (hold :attr:`lock`); the seconds writes waited for the swap."""
        state = self._state
        await self._catch_up(candidate)  # returns on the loop with at most a micro-batch left
        old = state.durable
        try:
            pause = candidate.swap(old, state.config)
        except BaseException:
            self.abandon(candidate)
            raise
        state.durable = candidate.durable
        self.candidate = None
        state.metrics.swap_pause(pause)
        log.info(
            "swapped %s in for %s; writes waited %.2f ms",
            candidate.version.name,
            old.model.version,
            pause * 1e3,
        )
        for hook in self.on_activated:
            hook(candidate.version)
        self._report()
        await asyncio.get_running_loop().run_in_executor(None, old.seal)
        return pause

    def abandon(self, candidate: Candidate) -> None:
        """Give a candidate up (rejected, failed, or the server stops); the served one stays."""
        candidate.release()
        if self.candidate is candidate:
            self.candidate = None

    def forget(self, user: str) -> None:
        """A user was deleted: a candidate being built drops them too."""
        if self.candidate is not None:
            self.candidate.forget(user)

    async def _catch_up(self, candidate: Candidate) -> None:
        """Tail the log in a thread until at most one micro-batch is left, seen from the loop."""
        within = self._state.config.serve.batch_max
        loop = asyncio.get_running_loop()
        while candidate.lag > within:
            if self._stopping.is_set():
                raise Stopping("the server is stopping; the candidate resumes at the next start")
            await loop.run_in_executor(None, candidate.catch_up, within, self._stopping)

    async def _switch(self, version: ModelVersion) -> None:
        candidate = await self.build(version)
        await self.complete(candidate)

    def _report(self) -> None:
        """The served version, the pointer's, and whether they differ, in the metrics."""
        metrics = self._state.metrics
        metrics.active.clear()
        metrics.active.labels(self.serving).set(1)
        metrics.pointer.clear()
        if self.pointer is not None:
            metrics.pointer.labels(self.pointer).set(1)
        metrics.lagging.set(int(self.lagging))
