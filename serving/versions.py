"""Which model version serves: the registry's ``ACTIVE`` pointer, followed live.

The pointer is the single truth (DESIGN.md, section 4). Whoever moves it
(``velox train --activate``, ``velox models activate | rollback``, or
``POST /models/{v}/activate``), the running server ends up serving that
version: :meth:`VersionSwitch.follow` reads the pointer every
``serve.follow_interval`` seconds and switches when it names another version. The
switch itself is today's: with the :class:`~serving.state.Gate` closed,
the old model writes everything back and hands its store over
(:meth:`~feature_store.durable.DurableModel.handing_over`), and the new
version is installed over it (:func:`~feature_store.versions.serve_version`);
batches wait meanwhile, reads get the prior's answer (counted as degraded).

The HTTP route switches first and moves the pointer after, so its answer
means the server serves the version; the follower then finds nothing to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from feature_store.registry import ModelVersion
from feature_store.versions import serve_version
from serving.state import Serving
from velox.errors import DataError

log = logging.getLogger(__name__)


class VersionSwitch:
    """Switches of the served version, one at a time, and what the pointer says."""

    def __init__(self, state: Serving, pointer: str) -> None:
        self._state = state
        self._lock = asyncio.Lock()
        self.pointer: str | None = pointer
        """The version the registry's pointer named when last read."""
        self.problem: str | None = None
        """Why the server does not serve the pointer's version, while it does not."""
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
        async with self._lock:
            if version.name != self.serving:
                await self._switch(version)
            registry = self._state.registry
            await asyncio.get_running_loop().run_in_executor(
                None, registry.activate, version.number
            )
            self.pointer = version.name
            self._report()

    async def follow(self, every: float) -> None:
        """Read the pointer every ``every`` seconds and switch to what it names."""
        while True:
            await asyncio.sleep(every)
            await self.check()

    async def stop(self, follower: asyncio.Task) -> None:
        """Stop ``follower`` (the task of :meth:`follow`) between switches, never in one.

        A switch runs in a thread that cannot be interrupted: cancelling its
        task mid-way would let the store close under it.
        """
        async with self._lock:
            follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower

    async def check(self) -> None:
        """Read the pointer once and switch when it names another version than the served one.

        A pointer that cannot be read, or a switch that fails, leaves the
        served version as it is; :attr:`problem` says why (logged once).
        """
        async with self._lock:
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

    async def _switch(self, version: ModelVersion) -> None:
        await self._state.gate.exclusive(self._install, version)

    def _install(self, version: ModelVersion) -> None:
        """Install ``version`` over the store while batches wait, then serve it (in a thread)."""
        state = self._state
        old = state.durable
        with old.handing_over(f"model {old.model.version} was replaced by {version.name}"):
            state.durable = serve_version(
                version, state.registry, old.store, state.config, old.model.backend
            )

    def _report(self) -> None:
        """The served version, the pointer's, and whether they differ, in the metrics."""
        metrics = self._state.metrics
        metrics.active.clear()
        metrics.active.labels(self.serving).set(1)
        metrics.pointer.clear()
        if self.pointer is not None:
            metrics.pointer.labels(self.pointer).set(1)
        metrics.lagging.set(int(self.lagging))
