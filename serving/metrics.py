"""The serving tier's Prometheus metrics, on ``prometheus_client``, one registry per application.

Each application keeps its own :class:`~prometheus_client.CollectorRegistry`
(several apps in one process, as in the tests, never share counts), with the
process metrics (CPU, resident memory, open files), the platform and the
garbage collector's beside the service's own. ``GET /metrics`` renders it in
the text exposition format.

What the durable model already counts (user-cache hits, store failures, the
queue) is read from it at scrape time by :class:`_ModelCollector` rather
than copied on every request; so is ``velox_requests_total``, from the
latency histogram's counts. The request path updates one cached histogram
child per route and status: no label lookup, one update per request.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # the monitor and the policy import nothing from here either
    from serving.monitor import MonitorSnapshot
    from serving.triggers import Decision

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
PAUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)
"""A swap holds the write lock for one micro-batch (target < 5 ms): fine buckets below that."""
CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class ModelFigures:
    """What the model and the batcher count themselves, read at scrape time."""

    cache_hits: int
    cache_misses: int
    failures: dict[str, int]
    problem: bool
    waiting: int
    export: dict | None = None
    """The newest ``velox export`` run's report of the offline store beside the store."""


class Metrics:
    """Every metric the serving tier exports, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=registry)
        self._latency = Histogram(
            "velox_request_seconds",
            "HTTP request latency by route and status.",
            ("route", "status"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._request_children: dict[tuple[str, int], Any] = {}
        self.batch_size = Histogram(
            "velox_batch_observations",
            "Observations per applied micro-batch.",
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.log_sync = Histogram(
            "velox_log_sync_seconds",
            "Time of each group commit's fsync of the log (the disk's share of observe latency).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.degraded = Counter(
            "velox_degraded",
            "Answers given by the prior (deadline, or a switch or deletion holding the model).",
            ("route",),
            registry=registry,
        )
        self.active = Gauge(
            "velox_active_model",
            "1 for the model version being served.",
            ("version",),
            registry=registry,
        )
        self.pointer = Gauge(
            "velox_registry_active_model",
            "1 for the version the registry's pointer names.",
            ("version",),
            registry=registry,
        )
        self.lagging = Gauge(
            "velox_model_lagging",
            "1 while the served version is not the registry's active one.",
            registry=registry,
        )
        self._sse = Counter(
            "velox_prequential_squared_error",
            "Sum of squared errors of predictions made just before each observation, by version.",
            ("version",),
            registry=registry,
        )
        self._scored = Counter(
            "velox_prequential_observations",
            "Observations scored before learning, by version.",
            ("version",),
            registry=registry,
        )
        self._model = _ModelCollector(registry, self._latency)
        self._retrain = _RetrainMetrics(registry)

    def request(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency (one dict lookup on the hot path)."""
        child = self._request_children.get((route, status))
        if child is None:
            child = self._request_children[route, status] = self._latency.labels(route, str(status))
        child.observe(seconds)

    def prequential(self, version: str, squared_error: float, observations: int) -> None:
        """Add a batch's prequential error (predictions made before learning from it)."""
        self._sse.labels(version).inc(squared_error)
        self._scored.labels(version).inc(observations)
        self._model.add_error(version, squared_error, observations)

    def monitor(self, snapshot: MonitorSnapshot) -> None:
        """Set the staleness gauges from the monitor's snapshot of the served version."""
        self._retrain.monitor(snapshot)

    def decision(self, decision: Decision) -> None:
        """Count one retrain decision, by trigger and whether it started a run."""
        self._retrain.decisions.labels(decision.trigger, str(decision.run).lower()).inc()

    def retrain_started(self) -> None:
        """A retrain runs (``velox_retrain_running`` is 1 until :meth:`retrain_run`)."""
        self._retrain.running.set(1)

    def retrain_run(
        self, outcome: str, phases: dict[str, float], gate: tuple[float, float] | None
    ) -> None:
        """A retrain ended: its outcome, its phases' seconds, and the gate's (active, candidate)
        RMSE when the gate judged it."""
        self._retrain.run(outcome, phases, gate)

    def swap_pause(self, seconds: float) -> None:
        """How long a swap held the write lock."""
        self._retrain.pause.observe(seconds)

    def read_model(self, figures: Callable[[], ModelFigures]) -> None:
        """Where scrapes read the model's own counts from (the app's current model)."""
        self._model.figures = figures

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RetrainMetrics:
    """The staleness monitor's gauges and the retrain loop's counts (``velox_monitor_*``,
    ``velox_retrain_*``, ``velox_swap_pause_seconds``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"velox_{name}", doc, labels, registry=registry)

        self.rolling = gauge(
            "monitor_rolling_rmse",
            "Prequential RMSE of the served version over the last retrain.window observations.",
            ("version",),
        )
        self.reference = gauge(
            "monitor_reference_rmse",
            "The RMSE degradation is measured against: the first window after activation, "
            "else the validation RMSE.",
            ("version",),
        )
        self.validation = gauge(
            "monitor_validation_rmse",
            "The served version's validation RMSE recorded at training.",
            ("version",),
        )
        self.observations = gauge(
            "monitor_observations_since_watermark",
            "Observations since the served version's training watermark.",
        )
        self.new_users = gauge(
            "monitor_new_users_since_watermark",
            "New users since the served version's training watermark.",
        )
        self.age = gauge("monitor_age_seconds", "Seconds since the served version was trained.")
        self.decisions = Counter(
            "velox_retrain_decisions",
            "Retrain policy decisions by trigger and whether a run started (run: true, false).",
            ("trigger", "run"),
            registry=registry,
        )
        self.runs = Counter(
            "velox_retrain_runs",
            "Finished retrains by outcome (succeeded, rejected, failed, timed_out, killed, "
            "abandoned).",
            ("outcome",),
            registry=registry,
        )
        self.running = gauge("retrain_running", "1 while a retrain runs, else 0.")
        self.phases = gauge(
            "retrain_phase_seconds",
            "Seconds each phase of the last retrain took (export, train, candidate, catch_up, "
            "swap).",
            ("phase",),
        )
        self.gate = gauge(
            "retrain_gate_rmse",
            "The last gate's prequential RMSE on the same observations, by model "
            "(active, candidate).",
            ("model",),
        )
        self.pause = Histogram(
            "velox_swap_pause_seconds",
            "How long a version swap held the write lock.",
            buckets=PAUSE_BUCKETS,
            registry=registry,
        )

    def monitor(self, snapshot: MonitorSnapshot) -> None:
        version = snapshot.version
        for gauge, value in (
            (self.rolling, snapshot.rolling_rmse),
            (self.reference, snapshot.reference_rmse),
            (self.validation, snapshot.validation_rmse),
        ):
            gauge.clear()  # only the served version has figures
            if version is not None and value is not None:
                gauge.labels(version).set(value)
        self.observations.set(snapshot.observations_since_watermark)
        self.new_users.set(snapshot.new_users_since_watermark)
        self.age.set(math.nan if snapshot.age_seconds is None else snapshot.age_seconds)

    def run(self, outcome: str, phases: dict[str, float], gate: tuple[float, float] | None) -> None:
        self.runs.labels(outcome).inc()
        self.running.set(0)
        self.phases.clear()  # the last run's phases only: one that failed early has fewer
        for phase, seconds in phases.items():
            self.phases.labels(phase).set(seconds)
        self.gate.clear()
        if gate is not None:
            self.gate.labels("active").set(gate[0])
            self.gate.labels("candidate").set(gate[1])


class _ModelCollector(Collector):
    """Metrics computed at scrape time: the model's own counts and the prequential RMSE."""

    def __init__(self, registry: CollectorRegistry, latency: Histogram) -> None:
        self.figures: Callable[[], ModelFigures] | None = None
        self._latency = latency
        self._errors: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        registry.register(self)

    def add_error(self, version: str, squared_error: float, observations: int) -> None:
        sums = self._errors[version]
        sums[0] += squared_error
        sums[1] += observations

    def collect(self) -> Iterator[Metric]:
        # The latency histogram counts the requests already: one update per request, not two.
        requests = CounterMetricFamily(
            "velox_requests", "HTTP requests by route and status.", labels=("route", "status")
        )
        for family in self._latency.collect():
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    labels = sample.labels
                    requests.add_metric((labels["route"], labels["status"]), sample.value)
        yield requests
        rmse = GaugeMetricFamily(
            "velox_prequential_rmse",
            "Root mean squared prequential error per model version.",
            labels=("version",),
        )
        for version, (sse, n) in list(self._errors.items()):
            if n:
                rmse.add_metric((version,), math.sqrt(sse / n))
        yield rmse
        if self.figures is None:
            return
        figures = self.figures()
        cache = CounterMetricFamily(
            "velox_user_cache", "User-state lookups by result (hit, miss).", labels=("result",)
        )
        cache.add_metric(("hit",), figures.cache_hits)
        cache.add_metric(("miss",), figures.cache_misses)
        yield cache
        failures = CounterMetricFamily(
            "velox_store_failures",
            "Failed checkpoint write-backs and evictions of the model being served, by kind.",
            labels=("kind",),
        )
        for kind, count in sorted(figures.failures.items()):
            failures.add_metric((kind,), count)
        yield failures
        yield GaugeMetricFamily(
            "velox_store_problem",
            "1 while the store fails (GET /readyz says why), else 0.",
            value=int(figures.problem),
        )
        yield GaugeMetricFamily(
            "velox_queue_observations", "Observations waiting for a batch.", value=figures.waiting
        )
        if figures.export is not None:
            yield from _export_metrics(figures.export)


def _export_metrics(report: dict) -> Iterator[Metric]:
    """The newest export run's counters, as ``velox export`` printed and kept them."""
    records = GaugeMetricFamily(
        "velox_export_records",
        "Log records of the newest velox export run, by outcome (read, written, rejected).",
        labels=("outcome",),
    )
    for outcome in ("read", "written", "rejected"):
        records.add_metric((outcome,), report[outcome])
    yield records
    rows = GaugeMetricFamily(
        "velox_export_partition_rows",
        "Rows the newest velox export run wrote, by day partition.",
        labels=("date",),
    )
    for day, count in sorted(report["partitions"].items()):
        rows.add_metric((day,), count)
    yield rows
    yield GaugeMetricFamily(
        "velox_export_upto", "Log position the newest export run reached.", value=report["upto"]
    )
    yield GaugeMetricFamily(
        "velox_export_seconds", "Duration of the newest export run.", value=report["seconds"]
    )
