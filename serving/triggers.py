"""When to retrain: the ``[retrain]`` policies applied to a monitor snapshot.

:class:`RetrainPolicy` is pure logic over a :class:`~serving.monitor.MonitorSnapshot`
and what the caller says about the runs (one running? when did the last
start, how many failed in a row?); it starts nothing. Every call returns a
:class:`Decision` whose reason is a sentence with the figures, the "not yet"
ones included, and logs it, so an operator can always tell why the server
did or did not retrain.

Precedence, first match wins:

1. a retrain is running: nothing else starts (``running``);
2. ``retrain.enabled`` is false: the server only reports (``disabled``, with
   what would have triggered);
3. after a failure: no automatic retrain until ``backoff * 2**(failures - 1)``
   seconds after it (``backoff``), then a retry (``retry``), up to
   ``retrain.retries`` in a row (``retries_exhausted`` after that, until a
   manual retrain succeeds). A retry is the failed run again, so
   ``min_interval`` does not delay it further;
4. a trigger holds (degradation, observations, new users, age, cron) but the
   last retrain started less than ``min_interval`` ago (``min_interval``);
5. the first trigger that holds, else ``none`` with every trigger's figures.

Cron: a schedule fires when one of its times fell in (the previous check,
now]; the first check counts from the policy's creation, so times before the
server started never fire. A due time that backoff or ``min_interval`` holds
back stays due until a check lets it through; one that falls while a
retrain runs is served by that retrain.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from croniter import croniter

from serving.monitor import MonitorSnapshot
from serving.schemas import DecisionReport, Trigger
from velox.config import RetrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """Whether a retrain starts now, the trigger that decided it, and why, in one sentence."""

    run: bool
    trigger: Trigger
    """Why it runs (degradation, observations, new_users, age, cron, manual, retry) or why
    not (none, running, disabled, backoff, retries_exhausted, min_interval)."""
    reason: str
    at: float = field(default_factory=time.time)
    """When it was decided (epoch seconds, by the policy's clock)."""


def decision_report(decision: Decision) -> DecisionReport:
    """The decision as ``GET /models`` sends it."""
    return DecisionReport(decision.trigger, decision.run, decision.reason, decision.at)


@dataclass(frozen=True)
class _Check:
    trigger: Trigger
    holds: bool
    figures: str


def readable_duration(seconds: float) -> str:
    """``seconds`` in the unit a person reads best: s, min, h or d."""
    for unit, size in (("d", 86_400.0), ("h", 3600.0), ("min", 60.0)):
        if abs(seconds) >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def utc_text(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


class RetrainPolicy:
    """Decides, at each check, whether a retrain starts, by the ``[retrain]`` settings.

    It keeps one piece of state, the time of its previous check, which the
    cron schedule counts from; everything else comes in with each call.
    """

    def __init__(self, config: RetrainConfig, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._clock = clock
        self._cron = config.cron.strip()
        self._checked = clock()

    def decide(
        self,
        snapshot: MonitorSnapshot,
        *,
        running: bool,
        last_started: float | None,
        failures_in_row: int = 0,
        last_failed: float | None = None,
    ) -> Decision:
        """The decision at this check (see the module docstring for the precedence)."""
        now = self._clock()
        checks = self._checks(snapshot, now)
        decision = self._decide(checks, now, running, last_started, failures_in_row, last_failed)
        cron_waits = decision.trigger in ("backoff", "min_interval")
        if not (cron_waits and any(c.holds and c.trigger == "cron" for c in checks)):
            self._checked = now
        log.info(
            "retrain %s (%s): %s",
            "starts" if decision.run else "waits",
            decision.trigger,
            decision.reason,
        )
        return decision

    def manual(self, reason: str, *, running: bool = False) -> Decision:
        """A retrain asked for by an admin: it ignores ``enabled``, backoff and ``min_interval``.

        Only a running retrain stops it (at most one runs at a time).
        """
        now = self._clock()
        asked = reason.strip() or "no reason given"
        if running:
            decision = Decision(
                False, "running", f"a retrain is already running; asked for: {asked}", now
            )
        else:
            decision = Decision(True, "manual", f"asked for: {asked}", now)
        log.info("manual retrain %s: %s", "starts" if decision.run else "waits", decision.reason)
        return decision

    def _decide(
        self,
        checks: list[_Check],
        now: float,
        running: bool,
        last_started: float | None,
        failures: int,
        last_failed: float | None,
    ) -> Decision:
        config = self._config
        held = next((c for c in checks if c.holds), None)
        if running:
            since = (
                ""
                if last_started is None
                else f", started {readable_duration(now - last_started)} ago"
            )
            return Decision(False, "running", f"a retrain is running{since}", now)
        if not config.enabled:
            would = f"{held.trigger} would retrain: {held.figures}" if held else _not_yet(checks)
            return Decision(False, "disabled", f"retrain.enabled is false; {would}", now)
        if failures > config.retries:
            return Decision(
                False,
                "retries_exhausted",
                f"{failures} retrains failed in a row and retrain.retries is {config.retries}; "
                "no automatic retrain until one succeeds (POST /retrain or velox retrain)",
                now,
            )
        if failures:
            wait = config.backoff * 2 ** (failures - 1)
            due = now if last_failed is None else last_failed + wait
            attempt = f"retry {failures} of {config.retries}"
            if now < due:
                return Decision(
                    False,
                    "backoff",
                    f"{attempt} waits {readable_duration(due - now)} more "
                    f"(backoff {readable_duration(wait)} after the failure)",
                    now,
                )
            return Decision(
                True, "retry", f"{attempt}: the backoff of {readable_duration(wait)} ended", now
            )
        if held is None:
            return Decision(False, "none", _not_yet(checks), now)
        if last_started is not None and now - last_started < config.min_interval:
            return Decision(
                False,
                "min_interval",
                f"{held.trigger} holds ({held.figures}) but the last retrain started "
                f"{readable_duration(now - last_started)} ago; retrain.min_interval is "
                f"{readable_duration(config.min_interval)}",
                now,
            )
        return Decision(True, held.trigger, held.figures, now)

    def _checks(self, snapshot: MonitorSnapshot, now: float) -> list[_Check]:
        """Each enabled trigger: whether it holds and its figures, in order of precedence."""
        config = self._config
        checks = [_degradation(snapshot, config)]
        for trigger, count, limit, what in (
            (
                "observations",
                snapshot.observations_since_watermark,
                config.max_observations,
                "observations",
            ),
            ("new_users", snapshot.new_users_since_watermark, config.max_new_users, "new users"),
        ):
            if limit:
                checks.append(
                    _Check(
                        trigger, count >= limit, f"{count} of {limit} {what} since the watermark"
                    )
                )
        if config.max_age:
            age = snapshot.age_seconds
            if age is None:
                checks.append(_Check("age", False, "no version serves yet"))
            else:
                checks.append(
                    _Check(
                        "age",
                        age >= config.max_age,
                        f"age {readable_duration(age)} of {readable_duration(config.max_age)}",
                    )
                )
        if self._cron:
            checks.append(self._cron_check(now))
        return checks

    def _cron_check(self, now: float) -> _Check:
        due = croniter(self._cron, self._checked).get_next(float)
        if due <= now:
            return _Check("cron", True, f"the schedule {self._cron!r} fell due at {utc_text(due)}")
        return _Check("cron", False, f"next scheduled retrain at {utc_text(due)} ({self._cron!r})")


def _degradation(snapshot: MonitorSnapshot, config: RetrainConfig) -> _Check:
    rolling, count, reference = (
        snapshot.rolling_rmse,
        snapshot.rolling_count,
        snapshot.reference_rmse,
    )
    need = config.degradation_min_observations
    if rolling is None:
        return _Check("degradation", False, "no observation scored yet")
    if reference is None or snapshot.degradation is None:
        return _Check(
            "degradation",
            False,
            f"rolling RMSE {rolling:.3f} over {count} observations has no reference yet "
            f"(first window {snapshot.first_count} of {snapshot.window}, no validation RMSE)",
        )
    ratio = snapshot.degradation
    short = f" over at least {need} observations" if count < need else ""
    return _Check(
        "degradation",
        count >= need and ratio > config.degradation_ratio,
        f"rolling RMSE {rolling:.3f} over {count} observations is {ratio:.2f}x the reference "
        f"{reference:.3f} (limit {config.degradation_ratio:g}x{short})",
    )


def _not_yet(checks: list[_Check]) -> str:
    return "not yet: " + "; ".join(c.figures for c in checks)
