"""What the request handlers share, and the gate that gives one job the model to itself.

:class:`Serving` is kept on the application under one typed key
(:data:`STATE`); the model over its store is replaced there by a version
switch, so handlers read ``state.durable`` on every request and never keep it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from feature_store.durable import DurableModel
from feature_store.registry import ModelRegistry
from serving.deadline import Deadline
from serving.metrics import Metrics
from velox.config import ServeConfig, VeloxConfig

if TYPE_CHECKING:
    from serving.observe import Observations
    from serving.retrain import Retrainer
    from serving.versions import VersionSwitch


class Gate:
    """Closed while a version switch or a deletion has the model (they run in threads).

    Batches are applied on the event loop, so none is half applied when the
    gate closes; batches wait in the queue (not on a lock in the loop) and
    reads answer from the prior. It opens again when the last of overlapping
    exclusive jobs ends.
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.event.set()
        self._holders = 0

    @property
    def open(self) -> bool:
        return self.event.is_set()

    async def exclusive(self, work: Callable[..., Any], *args: Any) -> Any:
        """``work(*args)`` in a thread with the gate closed; its result."""
        self._holders += 1
        self.event.clear()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, work, *args)
        finally:
            self._holders -= 1
            if not self._holders:
                self.event.set()


@dataclass
class Serving:
    """The model over its store, the registry, the metrics and the jobs around them."""

    config: VeloxConfig
    durable: DurableModel
    registry: ModelRegistry
    metrics: Metrics
    deadline: Deadline
    gate: Gate = field(default_factory=Gate)
    observations: Observations | None = None
    versions: VersionSwitch | None = None
    retrainer: Retrainer | None = None

    @property
    def limits(self) -> ServeConfig:
        return self.config.serve


STATE = web.AppKey("state", Serving)
