"""A new model version built beside the active one, validated on the same log, swapped in.

DESIGN.md section 4, "candidate built beside the live model". A
:class:`Candidate` is a :class:`~feature_store.durable.DurableModel` of the
new version over the store's other state slot: the version's trained users
first, then every logged observation after its watermark ``W``, applied
again in log order (:meth:`~feature_store.durable.DurableModel.reapply`)
while the active version keeps serving and logging. Its memory is the same
bounded cache as the live model's; its checkpoints go to its own slot and
are exact, so a restart resumes it where it was.

**Eager, not lazy.** The candidate writes every trained user's state into
its slot. A lazy migration (each user's state built on first use from the
artifact plus their records after ``W``) would write only active users, but
it needs a keyed, random-access copy of the artifact's user statistics
anyway (the same bytes, in another store), and it puts a log scan of the
user's records on the read path of the first predict after a swap: a latency
spike on exactly the users who are active. The eager write streams the
artifact once, off the event loop, without the WAL (about 150 bytes a user
at rank 3, 4.6 KB at rank 32: 1.5 GB and 46 GB for 10 million users), and
the swap then touches nothing but a micro-batch. Where the slot's size
matters more than the build time, the artifact's user statistics are what
to shard: one store per user shard (``velox serve --shard i/N``) builds
only its users.

**Validation gate.** Each replayed record carries the active version's
prediction, made before the observation was applied; the candidate predicts
the same observation before applying it. :class:`GateTally` compares the
two on the same observations, clipped to the rating range, at no extra cost.

**Swap.** :meth:`Candidate.swap` holds the active model's writes for at most
one micro-batch: it applies the records logged since the last catch-up, and
:meth:`~feature_store.durable.DurableModel.take_over` makes the candidate
active in one synced write. The old version is superseded (it refuses
writes, still answers reads already under way) and sealed: its slot keeps an
exact checkpoint, so rolling back is the same swap, the other way.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from feature_store.durable import DurableModel
from feature_store.online import OnlineStore
from feature_store.registry import ModelRegistry, ModelVersion
from feature_store.versions import install_point
from velox.backend import Backend
from velox.config import VeloxConfig
from velox.model import Applied

log = logging.getLogger(__name__)


@dataclass
class GateTally:
    """Both versions' squared errors on the same observations, clipped to the rating range."""

    low: float
    high: float
    count: int = 0
    active_sse: float = 0.0
    candidate_sse: float = 0.0

    def __call__(self, logged: np.ndarray, applied: Applied) -> None:
        ratings = applied.ratings
        self.active_sse += float(np.sum((np.clip(logged, self.low, self.high) - ratings) ** 2))
        candidate = np.clip(applied.predictions, self.low, self.high)
        self.candidate_sse += float(np.sum((candidate - ratings) ** 2))
        self.count += len(ratings)

    @property
    def active_rmse(self) -> float | None:
        return float(np.sqrt(self.active_sse / self.count)) if self.count else None

    @property
    def candidate_rmse(self) -> float | None:
        return float(np.sqrt(self.candidate_sse / self.count)) if self.count else None

    def verdict(self, tolerance: float, min_observations: int) -> tuple[bool, str]:
        """Whether the candidate passes, and why, with both figures.

        It fails when its RMSE exceeds the active version's times
        ``1 + tolerance``, over at least ``min_observations``; with fewer
        there is nothing to judge by and it passes, saying so.
        """
        if self.count < min_observations:
            return True, (
                f"the gate passed the candidate unjudged: {self.count} observations after its "
                f"watermark, fewer than retrain.gate_min_observations = {min_observations}"
            )
        active, candidate = self.active_rmse, self.candidate_rmse
        limit = active * (1 + tolerance)
        figures = (
            f"candidate RMSE {candidate:.4f} vs active {active:.4f} over {self.count} "
            f"observations (limit {limit:.4f}, tolerance {tolerance:g})"
        )
        if candidate > limit:
            return False, f"rejected by the gate: {figures}"
        return True, f"passed the gate: {figures}"


@dataclass
class Candidate:
    """A version's state in the store's inactive slot, catching up with the log."""

    version: ModelVersion
    durable: DurableModel
    tally: GateTally
    resumed: bool
    """Whether the slot already held this version's state (a restart resumed the build)."""
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds of building (``candidate``: the trained users) and of catching up (``catch_up``)."""
    forgotten: set[str] = field(default_factory=set)
    _forgotten_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(
        cls,
        version: ModelVersion,
        registry: ModelRegistry,
        store: OnlineStore,
        config: VeloxConfig,
        backend: Backend,
    ) -> Candidate:
        """Start (or resume) ``version``'s state in the inactive slot; slow, run it in a thread.

        The trained users are written unless the slot holds this version's
        state already, exactly (a build a restart interrupted, or the version
        a swap replaced: a rollback). Nothing of the log is applied yet:
        :meth:`catch_up` does that.
        """
        began = time.perf_counter()
        slot = 1 - store.active_slot
        artifacts = registry.load(version.number)
        model = artifacts.online_model(
            version=version.name, config=config.model, backend=backend, users=False
        )
        held, exact = store.holds(slot)
        if held == version.name and exact:
            durable = DurableModel.resume(model, store, config.store, slot)
            log.info("resuming %s in slot %d from seq %d", version.name, slot, durable.applied_seq)
            resumed = True
        else:
            covered, users = install_point(version, artifacts, store)
            log.info("building %s in slot %d from seq %d", version.name, slot, covered)
            durable = DurableModel.install(
                model, store, users, covered, config.store, slot=slot, building=True
            )
            resumed = False
        serve = config.serve
        tally = GateTally(serve.rating_min, serve.rating_max)
        phases = {"candidate": time.perf_counter() - began, "catch_up": 0.0}
        return cls(version, durable, tally, resumed, phases)

    @property
    def lag(self) -> int:
        """Log records the candidate has yet to apply."""
        return self.durable.store.last_seq - self.durable.applied_seq

    def catch_up(self, within: int, stop: threading.Event | None = None) -> int:
        """Apply the log until at most ``within`` records are left, checkpointing; how many.

        Runs beside the live model (in a thread): records keep arriving, so
        it tails the log in rounds, and writes an exact checkpoint after each
        round (a restart resumes from it). ``stop`` ends it between chunks.
        """
        done = 0
        began = time.perf_counter()
        while True:
            if stop is not None and stop.is_set():
                break
            applied = self.durable.reapply(limit=65_536, tally=self.tally, skip=self._skip)
            done += applied
            if applied == 0 or self.lag <= within:
                break
        self.durable.flush(force=True)
        self.phases["catch_up"] = self.phases.get("catch_up", 0.0) + time.perf_counter() - began
        return done

    def swap(self, live: DurableModel, config: VeloxConfig) -> float:
        """Make the candidate the active version; the seconds the live model's writes waited.

        With the live model's writes held: apply what was logged since the
        last :meth:`catch_up` (a micro-batch, when that ran just before), then
        one synced write makes the candidate active. The live model is
        superseded; call :meth:`seal_old` on it afterwards, off the event loop.
        """
        began = time.perf_counter()
        with live.writes_held():
            held = time.perf_counter()
            last = self.durable.reapply(tally=self.tally, skip=self._skip)
            applied = time.perf_counter()
            self.durable.take_over(config.store)
            live.supersede(f"model {live.model.version} was replaced by {self.version.name}")
        ended = time.perf_counter()
        log.info(
            "swap to %s: %.2f ms waiting for writes, %.2f ms applying the last %d records, "
            "%.2f ms for the synced write that made it active",
            self.version.name,
            (held - began) * 1e3,
            (applied - held) * 1e3,
            last,
            (ended - applied) * 1e3,
        )
        return ended - began

    def forget(self, user: str) -> None:
        """A user was deleted while the candidate builds: drop them, and skip their records."""
        with self._forgotten_lock:
            self.forgotten.add(user)
        self.durable.drop_users([user])

    def _skip(self, user: str) -> bool:
        return user in self.forgotten

    def release(self) -> None:
        """Give the build up; its slot is left as it is (the next build clears or resumes it)."""
        self.durable.release()
