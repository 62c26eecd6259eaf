"""The retrain loop of DESIGN.md section 4: staleness triggers a retrain, and nothing pauses.

:class:`Retrainer` closes the loop in the server:

1. **monitor** (:class:`~serving.monitor.VersionMonitor`): every applied
   batch's prequential errors and new users, for the served version;
2. **policy** (:class:`~serving.triggers.RetrainPolicy`): every
   ``retrain.check_interval`` seconds a decision, run or "not yet", each
   with its reason, in the log, the metrics and ``GET /models``;
3. **job** (:func:`serving.retrain_job.run_job`, in a thread): ``velox
   export`` up to the durable head ``W``, then ``velox train`` on every rating
   up to ``W``, each in a process of its own with a timeout and a log file;
4. **candidate** (:meth:`~serving.versions.VersionSwitch.build`): the new
   version built in the store's other slot and caught up with the log while
   the active one serves and learns;
5. **gate** (:class:`~feature_store.candidate.GateTally`): both versions'
   prequential RMSE on the records after ``W``; a worse candidate stays
   ready, its run "rejected" with both figures, unless the run was forced;
6. **swap** (:meth:`~serving.versions.VersionSwitch.complete`), then the
   registry's pointer moves.

At most one retrain runs at a time, and the policy keeps the minimum
interval and the backoff after failures. Each run is a JSON record under
``<data>/retrain/runs/`` beside its job's settings and log, rewritten at every
phase, so a restart knows what it interrupted: a run stopped while its
candidate was being built resumes it (the candidate's slot holds its exact
checkpoint); one stopped in its job is marked abandoned, and the policy
decides again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from feature_store.files import atomic_write
from feature_store.registry import ModelVersion
from serving.monitor import VersionMonitor
from serving.retrain_job import JobFailed, run_folder, run_job
from serving.schemas import GateReport, RetrainReport, RunReport
from serving.state import Serving
from serving.triggers import Decision, RetrainPolicy, decision_report
from serving.versions import Stopping, VersionSwitch
from velox.errors import DataError

log = logging.getLogger(__name__)

_CANDIDATE_PHASES = ("candidate", "catch_up", "gate", "swap")
"""Phases a restart resumes (the version is registered; its build continues from its slot)."""


@dataclass
class Run:
    """One retrain, as recorded: it is its own report."""

    id: str
    trigger: str
    reason: str
    force: bool
    started: float
    phase: str | None = "export"
    outcome: str | None = None
    finished: float | None = None
    version: str | None = None
    phases: dict[str, float] = field(default_factory=dict)
    gate: GateReport | None = None
    log: str | None = None

    def report(self) -> RunReport:
        return RunReport(
            self.id,
            self.outcome,  # type: ignore[arg-type]
            self.reason,
            self.version,
            self.started,
            self.finished,
            dict(self.phases),
            self.gate,
            self.log,
        )


class Retrainer:
    """The monitor, the policy and the runs of one server; see the module docstring."""

    def __init__(self, state: Serving, switch: VersionSwitch, clock=time.time) -> None:
        config = state.config
        self._state = state
        self._switch = switch
        self._clock = clock
        self._config = config.retrain
        clip = (config.serve.rating_min, config.serve.rating_max)
        self.monitor = VersionMonitor(config.retrain, clock, clip=clip)
        self.policy = RetrainPolicy(config.retrain, clock)
        self.folder = run_folder(config)
        self.current: Run | None = None
        self.last_run: Run | None = None
        self.last_decision: Decision | None = None
        self.failures_in_row = 0
        self.last_started: float | None = None
        self.last_failed: float | None = None
        self._cancel = threading.Event()
        self._task: asyncio.Task | None = None
        self.finished = asyncio.Event()
        """Set whenever a run ends (tests and ``velox retrain --wait`` wait on runs)."""
        switch.on_activated.append(self.start_monitoring)

    # ------------------------------------------------------------- figures

    def observed(self, version: str, predictions, ratings, timestamps, new_users: int) -> None:
        """One applied batch (on the event loop, after it is logged)."""
        self.monitor.observed(version, predictions, ratings, timestamps, new_users)

    def start_monitoring(self, version: ModelVersion) -> None:
        """``version`` serves (at start, or after a swap): its figures start afresh, with its
        counts since the watermark taken from the model now serving it."""
        durable = self._state.durable
        self.monitor.activated(
            version.name,
            trained_at=_epoch(version.created),
            watermark=version.watermark,
            validation_rmse=version.metrics.get("validation_rmse"),
            observations_since=max(durable.applied_seq - version.watermark, 0),
            new_users_since=durable.new_users,
        )

    def failure(self) -> str | None:
        """The last run's failure, while no run has succeeded since (for ``/readyz``)."""
        run = self.last_run
        if run is None or run.outcome not in ("failed", "timed_out", "killed"):
            return None
        return (
            f"retrain {run.id} {run.outcome}: {run.reason}; the active version serves on "
            f"({self.failures_in_row} failed in a row)"
        )

    def report(self) -> RetrainReport:
        """What ``GET /models`` shows of the loop."""
        decision = self.last_decision
        run = self.current or self.last_run
        next_retry = None
        if self.failures_in_row and self.last_failed is not None and self.current is None:
            next_retry = self.last_failed + self._config.backoff * 2 ** (self.failures_in_row - 1)
        return RetrainReport(
            self._config.enabled,
            self.current is not None,
            self.current.phase if self.current is not None else None,
            None if decision is None else decision_report(decision),
            run.report() if run is not None else None,
            next_retry,
        )

    # ------------------------------------------------------------ decisions

    async def watch(self) -> None:
        """Ask the policy every ``retrain.check_interval`` seconds; start a run when it says so."""
        while True:
            await asyncio.sleep(self._config.check_interval)
            self.check()

    def check(self) -> Decision:
        """One policy decision now, recorded; a run starts if it says so."""
        snapshot = self.monitor.snapshot()
        self._state.metrics.monitor(snapshot)
        decision = self.policy.decide(
            snapshot,
            running=self.current is not None,
            last_started=self.last_started,
            failures_in_row=self.failures_in_row,
            last_failed=self.last_failed,
        )
        self._record(decision)
        if decision.run:
            self._start(decision, force=False)
        return decision

    def request(self, reason: str, *, force: bool) -> tuple[Run, Decision]:
        """``POST /retrain`` or ``velox retrain``: the run started, or the one running."""
        decision = self.policy.manual(reason, running=self.current is not None)
        self._record(decision)
        if not decision.run:
            assert self.current is not None
            return self.current, decision
        return self._start(decision, force=force), decision

    def _record(self, decision: Decision) -> None:
        self.last_decision = decision
        self._state.metrics.decision(decision)

    # ----------------------------------------------------------------- runs

    def _start(self, decision: Decision, *, force: bool, resume: Run | None = None) -> Run:
        now = self._clock()
        run = resume or Run(run_id(now), decision.trigger, decision.reason, force, now)
        self.current = run
        self.last_started = now
        self.finished.clear()
        self._state.metrics.retrain_started()
        self._task = asyncio.get_running_loop().create_task(
            self._run(run), name=f"velox-retrain-{run.id}"
        )
        return run

    async def _run(self, run: Run) -> None:
        """A run from its job (or, resumed, from its candidate) to its outcome."""
        loop = asyncio.get_running_loop()
        try:
            if run.version is None:
                self._save(run)
                upto = self._state.durable.synced_seq
                log.info("retrain %s (%s): job up to seq %d", run.id, run.trigger, upto)
                result = await loop.run_in_executor(None, self._job, run, upto)
                run.phases.update(result.phases)
                run.version, run.log = result.version.name, str(result.log_path)
            await self._candidate(run)
        except JobFailed as failed:
            run.log = str(failed.log_path)
            if self._cancel.is_set():
                self._ended(run, "abandoned", "the server stopped during the job")
            else:
                self._ended(run, failed.outcome, failed.reason)
        except Stopping:  # the record keeps its candidate phase: the next start resumes it
            log.info("retrain %s stops with the server; it resumes at the next start", run.id)
            self.current = None
            self.finished.set()
        except Exception as exc:  # a run's failure never takes the server down
            log.exception("retrain %s failed", run.id)
            self._ended(run, "failed", f"{type(exc).__name__}: {exc}")

    def _job(self, run: Run, upto: int):
        return run_job(
            self._state.config,
            upto,
            run_id=run.id,
            timeout=self._config.timeout,
            cancel=self._cancel,
        )

    async def _candidate(self, run: Run) -> None:
        """Build, gate and swap the run's version, holding the switch for the whole of it."""
        assert run.version is not None
        version = self._state.registry.get(int(run.version[1:]))
        switch = self._switch
        async with switch.lock:
            self._phase(run, "candidate")
            candidate = await switch.build(version)
            run.phases.update(candidate.phases)
            tally = candidate.tally
            self._phase(run, "gate")
            passed, why = tally.verdict(
                self._config.gate_tolerance, self._config.gate_min_observations
            )
            if tally.count:
                run.gate = GateReport(tally.active_rmse, tally.candidate_rmse, tally.count)
            if not passed and not run.force:
                switch.abandon(candidate)
                self._ended(run, "rejected", f"{version.name} {why}; the active version serves on")
                return
            self._phase(run, "swap")
            run.phases["swap"] = await switch.complete(candidate)
            await switch.point(version)
        forced = " (forced past the gate)" if not passed else ""
        self._ended(run, "succeeded", f"{version.name} {why}{forced}; it serves now")
        await self._trim()

    async def _trim(self) -> None:
        """Retention after a swap: the export just ran and the watermarks moved, so the log
        shrinks to what the active version and ``registry.keep`` ready ones still need."""
        config = self._state.config
        durable = self._state.durable
        try:
            trimmed = await asyncio.get_running_loop().run_in_executor(
                None, durable.trim, config.registry.keep, config.serve.idempotency_ttl
            )
        except (DataError, OSError) as exc:  # the next retrain tries again
            log.warning("retention after the retrain did not run: %s", exc)
            return
        log.info("retention after the retrain: the log now starts at seq %d", trimmed.log_start)

    def _phase(self, run: Run, phase: str) -> None:
        run.phase = phase
        self._save(run)

    def _ended(self, run: Run, outcome: str, reason: str) -> None:
        run.outcome, run.reason, run.phase = outcome, reason, None
        run.finished = self._clock()
        if outcome in ("succeeded", "rejected"):
            self.failures_in_row = 0
        elif outcome != "abandoned":
            self.failures_in_row += 1
            self.last_failed = run.finished
        log.log(
            logging.INFO if outcome in ("succeeded", "rejected") else logging.ERROR,
            "retrain %s %s: %s",
            run.id,
            outcome,
            reason,
        )
        gate = (run.gate.active_rmse, run.gate.candidate_rmse) if run.gate else None
        self._state.metrics.retrain_run(outcome, run.phases, gate)
        with contextlib.suppress(OSError):
            self._save(run)
        self.current, self.last_run = None, run
        self.finished.set()

    def _save(self, run: Run) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = msgspec.json.encode(_Stored.of(run))
        atomic_write(self.folder / f"{run.id}.json", lambda path: path.write_bytes(record))

    # -------------------------------------------------------------- restart

    def resume(self) -> Run | None:
        """At start: pick up the run a stop interrupted (see the module docstring)."""
        records = sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []
        if not records:
            return None
        try:
            stored = msgspec.json.decode(records[-1].read_bytes(), type=_Stored)
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("cannot read the last retrain record %s: %s", records[-1], exc)
            return None
        run = stored.run()
        if run.outcome is not None:
            self.last_run = run
            return None
        if run.phase in _CANDIDATE_PHASES and run.version is not None and self._ready(run.version):
            log.info("resuming retrain %s: building %s", run.id, run.version)
            return self._start(Decision(True, run.trigger, run.reason), force=run.force, resume=run)
        self._ended(run, "abandoned", f"the server stopped during its {run.phase} phase")
        return None

    def _ready(self, name: str) -> bool:
        try:
            return self._state.registry.get(int(name[1:])).state == "ready"
        except DataError:
            return False

    async def stop(self, watcher: asyncio.Task | None) -> None:
        """Stop watching; a running job is killed, a build stops between chunks (resumable).

        The run is waited for, not cancelled: its threads cannot be
        interrupted, and the store must not close under them.
        """
        self._cancel.set()
        self._switch.halt()
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task


class _Stored(msgspec.Struct):
    """A run as its JSON record holds it."""

    id: str
    trigger: str
    reason: str
    force: bool
    started: float
    phase: str | None
    outcome: str | None
    finished: float | None
    version: str | None
    phases: dict[str, float]
    gate: GateReport | None
    log: str | None

    @classmethod
    def of(cls, run: Run) -> _Stored:
        return cls(**{name: getattr(run, name) for name in cls.__struct_fields__})

    def run(self) -> Run:
        return Run(**{name: getattr(self, name) for name in self.__struct_fields__})


def run_id(now: float) -> str:
    """Run ids sort by start time: ``20261203T051500-123``."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}-{int(now * 1000) % 1000:03d}"


def _epoch(created: str) -> float:
    try:
        return datetime.fromisoformat(created).timestamp()
    except ValueError:
        return time.time()
