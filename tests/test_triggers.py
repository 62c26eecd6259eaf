"""The retrain policy: each trigger at its threshold, the precedence, cron on an injected clock,
and a reason with the figures for every decision."""

from __future__ import annotations

import calendar
import dataclasses
import logging

import pytest

from serving.monitor import MonitorSnapshot
from serving.schemas import DecisionReport
from serving.triggers import RetrainPolicy, decision_report
from velox.config import RetrainConfig

HOUR = 3600.0
START = float(calendar.timegm((2026, 12, 3, 5, 10, 0)))  # 05:10 UTC


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _snapshot(**figures) -> MonitorSnapshot:
    base = MonitorSnapshot(
        version="v3",
        age_seconds=HOUR,
        watermark=1000,
        observations_since_watermark=0,
        new_users_since_watermark=0,
        rolling_rmse=None,
        rolling_count=0,
        first_rmse=None,
        first_count=0,
        validation_rmse=None,
        reference_rmse=None,
        degradation=None,
        windows=(),
        window=100,
    )
    return dataclasses.replace(base, **figures)


def _degraded(rmse: float, count: int, reference: float = 0.8) -> MonitorSnapshot:
    return _snapshot(
        rolling_rmse=rmse,
        rolling_count=count,
        reference_rmse=reference,
        validation_rmse=reference,
        degradation=rmse / reference,
    )


def _policy(clock: Clock | None = None, **settings) -> RetrainPolicy:
    settings.setdefault("enabled", True)
    settings.setdefault("window", 100)
    settings.setdefault("degradation_min_observations", 50)
    return RetrainPolicy(RetrainConfig(**settings), clock=clock or Clock())


def _decide(policy: RetrainPolicy, snapshot: MonitorSnapshot, **runs):
    runs.setdefault("running", False)
    runs.setdefault("last_started", None)
    return policy.decide(snapshot, **runs)


def test_degradation_fires_above_the_ratio_over_enough_observations():
    policy = _policy(degradation_ratio=1.25)
    at_limit = _decide(policy, _degraded(1.0, 100))  # exactly 1.25x: not above
    assert (at_limit.run, at_limit.trigger) == (False, "none")
    assert at_limit.reason == (
        "not yet: rolling RMSE 1.000 over 100 observations is 1.25x the reference 0.800 "
        "(limit 1.25x)"
    )
    too_few = _decide(policy, _degraded(1.2, 49))
    assert not too_few.run and "(limit 1.25x over at least 50 observations)" in too_few.reason
    fired = _decide(policy, _degraded(1.2, 50))
    assert (fired.run, fired.trigger) == (True, "degradation")
    assert fired.reason == (
        "rolling RMSE 1.200 over 50 observations is 1.50x the reference 0.800 (limit 1.25x)"
    )


def test_degradation_says_why_it_cannot_judge_yet():
    policy = _policy()
    assert _decide(policy, _snapshot()).reason == "not yet: no observation scored yet"
    unjudged = _decide(policy, _snapshot(rolling_rmse=0.9, rolling_count=60, first_count=60))
    assert unjudged.reason == (
        "not yet: rolling RMSE 0.900 over 60 observations has no reference yet "
        "(first window 60 of 100, no validation RMSE)"
    )


@pytest.mark.parametrize(
    ("setting", "figure", "trigger", "words"),
    [
        ("max_observations", "observations_since_watermark", "observations", "observations"),
        ("max_new_users", "new_users_since_watermark", "new_users", "new users"),
    ],
)
def test_counts_since_the_watermark_fire_at_their_limit(setting, figure, trigger, words):
    policy = _policy(**{setting: 500})
    before = _decide(policy, _snapshot(**{figure: 499}))
    assert (before.run, before.trigger) == (False, "none")
    assert f"499 of 500 {words} since the watermark" in before.reason
    fired = _decide(policy, _snapshot(**{figure: 500}))
    assert (fired.run, fired.trigger, fired.reason) == (
        True,
        trigger,
        f"500 of 500 {words} since the watermark",
    )


def test_a_version_older_than_max_age_is_retrained():
    policy = _policy(max_age=24 * HOUR)
    young = _decide(policy, _snapshot(age_seconds=24 * HOUR - 1))
    assert not young.run and "age 24.0 h of 24.0 h" in young.reason
    old = _decide(policy, _snapshot(age_seconds=24 * HOUR))
    assert (old.run, old.trigger) == (True, "age")


def test_a_not_yet_names_every_enabled_trigger_with_its_figures():
    policy = _policy(max_observations=50_000, max_age=24 * HOUR, cron="0 6 * * *")
    decision = _decide(policy, _snapshot(observations_since_watermark=1200, age_seconds=2.1 * HOUR))
    assert decision.reason == (
        "not yet: no observation scored yet; 1200 of 50000 observations since the watermark; "
        "age 2.1 h of 24.0 h; next scheduled retrain at 2026-12-03 06:00:00 UTC ('0 6 * * *')"
    )


def test_cron_fires_at_its_time_and_not_before():
    clock = Clock()
    policy = _policy(clock, cron="0 6 * * *")
    clock.now = START + 49 * 60 + 59  # 05:59:59
    assert _decide(policy, _snapshot()).trigger == "none"
    clock.now += 1.0  # 06:00:00
    fired = _decide(policy, _snapshot())
    assert (fired.run, fired.trigger, fired.at) == (True, "cron", clock.now)
    assert fired.reason == "the schedule '0 6 * * *' fell due at 2026-12-03 06:00:00 UTC"
    assert decision_report(fired) == DecisionReport("cron", True, fired.reason, clock.now)
    clock.now += 30.0
    assert _decide(policy, _snapshot()).trigger == "none"  # fired once
    clock.now += 24 * HOUR
    assert _decide(policy, _snapshot()).trigger == "cron"  # the next day


def test_cron_times_before_the_start_never_fire():
    clock = Clock(START - 20 * 60)  # 04:50: the policy is created before 05:00
    policy = _policy(clock, cron="0 5 * * *")
    clock.now = START + HOUR  # the first check, at 06:10, sees 05:00 in (04:50, 06:10]
    assert _decide(policy, _snapshot()).trigger == "cron"
    late = _policy(Clock(START), cron="0 5 * * *")  # created at 05:10
    assert _decide(late, _snapshot()).trigger == "none"


def test_a_cron_time_held_by_min_interval_stays_due_and_one_during_a_run_is_served():
    clock = Clock()
    policy = _policy(clock, cron="0 6 * * *", min_interval=HOUR)
    clock.now = START + HOUR  # 06:10; a retrain started at 05:40
    held = _decide(policy, _snapshot(), last_started=START + 30 * 60)
    assert (held.run, held.trigger) == (False, "min_interval")
    assert held.reason.startswith("cron holds (the schedule '0 6 * * *' fell due at")
    assert "the last retrain started 30.0 min ago; retrain.min_interval is 60.0 min" in held.reason
    clock.now = START + 90 * 60
    assert _decide(policy, _snapshot(), last_started=START + 30 * 60).trigger == "cron"
    running = _policy(clock, cron="*/10 * * * *")
    clock.now += 10 * 60
    assert _decide(running, _snapshot(), running=True).trigger == "running"
    assert _decide(running, _snapshot()).trigger == "none"


def test_running_comes_first_then_disabled_then_backoff_then_min_interval():
    clock = Clock()
    policy = _policy(clock, max_observations=10, min_interval=600.0, backoff=60.0, retries=3)
    due = _snapshot(observations_since_watermark=10)
    running = _decide(policy, due, running=True, last_started=START - 90, failures_in_row=1)
    assert (running.run, running.trigger) == (False, "running")
    assert running.reason == "a retrain is running, started 90 s ago"
    off = _policy(clock, max_observations=10, enabled=False)
    disabled = _decide(off, due, failures_in_row=1)
    assert (disabled.run, disabled.trigger) == (False, "disabled")
    assert disabled.reason == (
        "retrain.enabled is false; observations would retrain: 10 of 10 observations since the "
        "watermark"
    )
    assert _decide(off, _snapshot()).reason.startswith("retrain.enabled is false; not yet: ")
    waiting = _decide(
        policy, due, last_started=START - 200, failures_in_row=2, last_failed=START - 100
    )
    assert (waiting.run, waiting.trigger) == (False, "backoff")  # 60 * 2 s after the failure
    assert waiting.reason == "retry 2 of 3 waits 20 s more (backoff 2.0 min after the failure)"
    retry = _decide(
        policy, due, last_started=START - 200, failures_in_row=2, last_failed=START - 120
    )
    assert (retry.run, retry.trigger) == (True, "retry")  # min_interval does not hold a retry
    held = _decide(policy, due, last_started=START - 599)
    assert (held.run, held.trigger) == (False, "min_interval")
    assert _decide(policy, due, last_started=START - 600).trigger == "observations"


def test_after_the_last_retry_fails_only_a_manual_retrain_runs():
    policy = _policy(max_observations=10, retries=2)
    due = _snapshot(observations_since_watermark=10)
    exhausted = _decide(policy, due, failures_in_row=3, last_failed=START - 10**6)
    assert (exhausted.run, exhausted.trigger) == (False, "retries_exhausted")
    assert exhausted.reason == (
        "3 retrains failed in a row and retrain.retries is 2; no automatic retrain until one "
        "succeeds (POST /retrain or velox retrain)"
    )
    no_retries = _policy(max_observations=10, retries=0)
    assert _decide(no_retries, due, failures_in_row=1).trigger == "retries_exhausted"


def test_manual_ignores_enabled_and_min_interval_but_not_a_running_retrain():
    policy = _policy(enabled=False, min_interval=10**6)
    manual = policy.manual("new catalogue")
    assert (manual.run, manual.trigger, manual.reason) == (
        True,
        "manual",
        "asked for: new catalogue",
    )
    assert policy.manual("  ").reason == "asked for: no reason given"
    busy = policy.manual("again", running=True)
    assert (busy.run, busy.trigger) == (False, "running")
    assert busy.reason == "a retrain is already running; asked for: again"


def test_every_decision_is_logged_with_its_reason(caplog):
    policy = _policy(max_observations=10)
    with caplog.at_level(logging.INFO, logger="serving.triggers"):
        _decide(policy, _snapshot(observations_since_watermark=3))
        _decide(policy, _snapshot(observations_since_watermark=10))
    assert [r.getMessage() for r in caplog.records] == [
        "retrain waits (none): not yet: no observation scored yet; 3 of 10 observations since "
        "the watermark",
        "retrain starts (observations): 10 of 10 observations since the watermark",
    ]
