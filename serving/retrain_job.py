"""The retrain job: export the log up to a watermark, then train on it, each in its own process.

The server calls :func:`run_job` from a thread. Each phase is ``velox
export`` or ``velox train`` started as a child process in a session (so a
process group) of its own: a crash of Beam or of the JVM, or the kernel's
out-of-memory killer, ends that group and never the server; and stopping a
run reaches every process it started, the JVM that PySpark launches
included.

What a run leaves under ``<data>/retrain/runs/``:

* ``RUN.toml``: the effective settings, which both children read with
  ``--config``. ``VELOX_<SECTION>__<KEY>`` variables are taken out of their
  environment, so the file is the one source of their settings and they see
  exactly what the server sees, however its configuration was built. The
  ``*_token`` secrets are left out: neither child serves.
* ``RUN.log``: both children's stdout and stderr, each phase framed by
  ``== run RUN: PHASE: ...`` lines giving the command, the process id (which
  is also the process group's) and how the phase ended.

Training uses ``--validation 0``: a production version trains on every
rating up to the watermark; the server's gate replaying the log after it is
the validation. The child records the run id in the version's parameters
(``run``), which is how the version is found in the registry afterwards. The
version is left ready, not active.

How a run ends: a :class:`JobResult`, or :class:`JobFailed` with outcome
``failed`` (a non-zero exit; the reason quotes the child's error line),
``timed_out`` (the whole run took longer than ``timeout``: the group got
SIGTERM, then SIGKILL after ``grace`` seconds) or ``killed`` (a signal ended
the child, or ``cancel`` was set). :func:`run_job` returns or raises only
once no process of the group is left, and a version a stopped child left
"building" is marked failed with the same reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from feature_store.files import atomic_write
from feature_store.layout import DataLayout
from feature_store.registry import ModelRegistry, ModelVersion
from velox.config import ENV_PREFIX, VeloxConfig, sections
from velox.errors import DataError, InputError

log = logging.getLogger(__name__)

OUTCOMES = ("failed", "timed_out", "killed")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CHILD_NICENESS = 10
"""The children's CPU priority: below the server's, so a job on the server's own cores
(Spark ``local[*]``) does not push reads past their deadline (measured: 12 degraded
answers in six loaded runs at the default priority, benchmarks/retrain_load.py)."""
_POLL_S = 0.05
"""How often a waiting run looks at its child, the clock and ``cancel``."""
_TAIL_BYTES = 65_536
"""How much of a phase's output is searched for its error line."""
_NAMED = {int(named) for named in signal.Signals}
_EXCEPTION = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit)\b")


@dataclasses.dataclass(frozen=True)
class JobResult:
    """A run that registered a ready version."""

    version: ModelVersion
    """The registered version, ready and not active: the server's gate decides."""
    watermark: int
    """The version trains on every logged rating with ``seq <= watermark``."""
    phases: dict[str, float]
    """Seconds of each phase: ``export`` and ``train``."""
    log_path: Path


class JobFailed(DataError):
    """A run that registered nothing: how it ended, why in one sentence, and its log."""

    def __init__(self, outcome: str, reason: str, log_path: Path, phase: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        """One of :data:`OUTCOMES`."""
        self.reason = reason
        self.log_path = log_path
        self.phase = phase
        """``export`` or ``train``: the phase that did not finish."""


def run_folder(config: VeloxConfig) -> Path:
    """Where runs keep their settings and logs: ``<data>/retrain/runs``."""
    return Path(config.data.dir) / "retrain" / "runs"


def run_log(config: VeloxConfig, run_id: str) -> Path:
    """The log file of run ``run_id``."""
    return run_folder(config) / f"{run_id}.log"


def run_job(
    config: VeloxConfig,
    upto: int,
    *,
    run_id: str,
    timeout: float,
    cancel: threading.Event | None = None,
    grace: float = 10.0,
) -> JobResult:
    """Export the log up to ``upto``, train on every rating up to it, and return the version.

    ``timeout`` bounds the whole run in seconds; ``grace`` is how long a
    stopped group gets between SIGTERM and SIGKILL. Raises :class:`JobFailed`;
    a damaged registry raises its own :class:`DataError`.
    """
    if not _RUN_ID.fullmatch(run_id):
        raise InputError(
            f"run id {run_id!r} cannot name a file; use letters, digits, '.', '_' and '-'"
        )
    if upto < 0 or not timeout > 0:
        raise InputError(f"a run needs upto >= 0 and a timeout > 0, not {upto} and {timeout}")
    folder = run_folder(config)
    folder.mkdir(parents=True, exist_ok=True)
    settings = folder / f"{run_id}.toml"
    write_settings(config, settings)
    velox = [sys.executable, "-m", "velox.cli", "--config", str(settings)]
    run = _Run(run_id, run_log(config, run_id), time.monotonic() + timeout, timeout, grace, cancel)
    registry = ModelRegistry(DataLayout.from_config(config).registry)
    before = {version.number for version in registry.versions()}
    phases = {"export": run.phase("export", [*velox, "export", "--upto", str(upto)])}
    train = [*velox, "-v", "train", "--watermark", str(upto), "--validation", "0"]
    try:
        phases["train"] = run.phase("train", [*train, "--run-id", run_id])
    except JobFailed as failed:
        for version in _of_run(registry, before, run_id, states=("building",)):
            registry.mark_failed(version.number, failed.reason)
        raise
    found = _of_run(registry, before, run_id, states=("ready", "active"))
    if len(found) != 1 or found[0].watermark != upto:
        raise run.failed(
            "failed",
            "train",
            f"velox train exited 0 but the registry holds {len(found)} new ready versions of "
            f"run {run_id} where one with watermark {upto} was expected",
        )
    log.info("retrain run %s registered %s (watermark %d): %s", run_id, found[0].name, upto, phases)
    return JobResult(found[0], upto, phases, run.log_path)


def _of_run(
    registry: ModelRegistry, before: set[int], run_id: str, states: tuple[str, ...]
) -> list[ModelVersion]:
    """The versions this run's child created, in ``states``."""
    return [
        version
        for version in registry.versions()
        if version.number not in before
        and version.state in states
        and version.parameters.get("run") == run_id
    ]


@dataclasses.dataclass
class _Run:
    """One run's children: started one after another, each watched to its end."""

    run_id: str
    log_path: Path
    deadline: float
    timeout: float
    grace: float
    cancel: threading.Event | None

    def phase(self, name: str, argv: list[str]) -> float:
        """Run ``argv`` to its end; its seconds, or :class:`JobFailed`."""
        started = time.perf_counter()
        if self.cancel is not None and self.cancel.is_set():
            raise self.failed("killed", name, f"the run was cancelled before {name} started")
        with self.log_path.open("ab", buffering=0) as out:
            self._note(out, name, " ".join(argv))
            offset = out.tell()
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=_child_environment(),
            )
            with contextlib.suppress(OSError):  # before it starts the JVM, which inherits it
                os.setpriority(os.PRIO_PROCESS, child.pid, CHILD_NICENESS)
            self._note(out, name, f"pid {child.pid} (also its process group)")
            try:
                stopped = self._watch(child)
            finally:
                _end_group(child, self.grace)
            seconds = time.perf_counter() - started
            ending = f"exit code {child.returncode}" if stopped is None else stopped
            self._note(out, name, f"ended ({ending}) after {seconds:.1f} s")
        if stopped is None and child.returncode == 0:
            return seconds
        failure = self._failure(name, stopped, child.returncode, offset)
        with self.log_path.open("ab", buffering=0) as out:
            self._note(out, name, f"{failure.outcome}: {failure.reason}")
        raise failure

    def _watch(self, child: subprocess.Popen) -> str | None:
        """None once the child exits by itself; "timed out" or "cancelled" when it must stop."""
        while child.poll() is None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                return "timed out"
            if self.cancel is not None and self.cancel.is_set():
                return "cancelled"
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=min(left, _POLL_S))
        return None

    def _failure(self, name: str, stopped: str | None, code: int, offset: int) -> JobFailed:
        if stopped == "timed out":
            return self.failed(
                "timed_out",
                name,
                f"velox {name} was still running when the run's {self.timeout:g} s timeout "
                "ran out, so its processes were stopped; raise the timeout or see the log",
            )
        if stopped == "cancelled":
            return self.failed(
                "killed", name, f"the run was cancelled during velox {name}, which was stopped"
            )
        line = error_line(_tail(self.log_path, offset))
        if code < 0:
            kind = signal.Signals(-code).name if -code in _NAMED else f"signal {-code}"
            hint = " (as the out-of-memory killer does)" if kind == "SIGKILL" else ""
            return self.failed(
                "killed", name, f"velox {name} was killed by {kind}{hint}; its last line: {line}"
            )
        return self.failed("failed", name, f"velox {name} failed with exit code {code}: {line}")

    def failed(self, outcome: str, phase: str, reason: str) -> JobFailed:
        """The run's :class:`JobFailed`; the reason ends with where the log is."""
        log.warning("retrain run %s: %s", self.run_id, reason)
        return JobFailed(outcome, f"{reason} (log: {self.log_path})", self.log_path, phase)

    def _note(self, out, phase: str, text: str) -> None:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        out.write(f"== run {self.run_id}: {phase}: {stamp} {text}\n".encode())


def _child_environment() -> dict[str, str]:
    """This process's environment without the settings variables, and with unbuffered output.

    Without buffering a child's lines reach the log as they are printed,
    so the log shows how far a run got when it is stopped.
    """
    environment = {
        key: value
        for key, value in os.environ.items()
        if not (key.startswith(ENV_PREFIX) and "__" in key)
    }
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def _end_group(child: subprocess.Popen, grace: float) -> None:
    """Leave no process of ``child``'s group: SIGTERM, SIGKILL after ``grace`` s, then wait.

    Also after a clean exit, for anything the child left behind. Returns when
    the group is gone (its processes reaped), or after waiting ``grace`` once
    more for the reaping of orphans, with a warning.
    """
    group = child.pid
    for sent in (signal.SIGTERM, signal.SIGKILL):
        if _gone(child, group, 0.0):
            return
        try:
            os.killpg(group, sent)
        except ProcessLookupError:
            return
        if _gone(child, group, grace):
            return
    log.warning("process group %d still has processes %g s after SIGKILL", group, grace)


def _gone(child: subprocess.Popen, group: int, seconds: float) -> bool:
    """Whether the group is empty within ``seconds``; reaps the child meanwhile."""
    until = time.monotonic() + seconds
    while True:
        child.poll()
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= until:
            return False
        time.sleep(_POLL_S)


def _tail(path: Path, offset: int) -> str:
    """The end of ``path`` after ``offset``: what the phase that started there printed."""
    with path.open("rb") as handle:
        handle.seek(max(offset, handle.seek(0, os.SEEK_END) - _TAIL_BYTES))
        return handle.read().decode(errors="replace")


def error_line(output: str) -> str:
    """The line of a child's output that says what went wrong.

    Velox's own one-sentence error first, else the last exception line of a
    traceback, else the last line.

    >>> error_line("WARN x\\nvelox: error: no Java found; install it\\nINFO closing\\n")
    'no Java found; install it'
    >>> error_line("Traceback (most recent call last):\\n  ...\\nMemoryError\\nINFO bye\\n")
    'MemoryError'
    >>> error_line("")
    'it printed nothing'
    """
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("== run ")]
    errors = [line for line in lines if line.startswith("velox: error:")]
    if errors:
        return errors[-1].removeprefix("velox: error:").strip()[:500]
    exceptions = [line for line in lines if _EXCEPTION.match(line)]
    return (exceptions or lines or ["it printed nothing"])[-1][:500]


def write_settings(config: VeloxConfig, path: Path) -> None:
    """``config`` as a TOML file that ``load_config`` reads back equal, its ``*_token`` left out.

    ``data.dir`` is written absolute, so the file also serves a command run by
    hand from another folder.
    """
    lines = ["# Effective settings of a retrain run (batch_jobs.retrain_job)."]
    for name in sections():
        section = getattr(config, name)
        lines.append(f"\n[{name}]")
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            if field.name.endswith("_token"):
                continue
            if (name, field.name) == ("data", "dir"):
                value = str(Path(value).resolve())
            lines.append(f"{field.name} = {toml_value(value)}")
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda target: target.write_text(text, encoding="utf-8"))


def toml_value(value: bool | int | float | str) -> str:
    """A setting's value in TOML (settings are booleans, numbers and strings).

    >>> print(*(toml_value(v) for v in (True, 3, 1e-05, 'say "hi"\\n')))
    true 3 1e-05 "say \\"hi\\"\\u000a"
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = (
        "\\" + char if char in '"\\' else f"\\u{ord(char):04x}" if _control(char) else char
        for char in value
    )
    return '"' + "".join(escaped) + '"'


def _control(char: str) -> bool:
    """A character a TOML basic string must escape."""
    return ord(char) < 0x20 or ord(char) == 0x7F
