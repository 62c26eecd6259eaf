"""Prometheus metrics in the text exposition format, kept in one registry per app.

Small on purpose: counters, gauges and histograms with labels, rendered on
``GET /metrics``. Values are updated from the event loop and the batch
thread; each update is a single dict operation under the GIL, and a scrape
reads a copy.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Sequence

Labels = tuple[tuple[str, str], ...]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    """A monotonically increasing count per label set; or, with ``compute``, read at scrape time."""

    kind = "counter"

    def __init__(
        self, name: str, help_text: str, compute: Callable[[], dict] | None = None
    ) -> None:
        self.name, self.help = name, help_text
        self.values: dict[Labels, float] = defaultdict(float)
        self.compute = compute

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] += amount

    def samples(self) -> list[str]:
        if self.compute is not None:
            self.values = defaultdict(float, self.compute())
        return [f"{self.name}{_labels(k)} {_number(v)}" for k, v in list(self.values.items())]


class Gauge(Counter):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] = value


class Histogram:
    """Cumulative buckets, sum and count per label set."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.name, self.help, self.buckets = name, help_text, tuple(buckets)
        self.values: dict[Labels, list[float]] = {}

    def observe(self, value: float, **labels: str) -> None:
        self.add(self.row(**labels), value)

    def row(self, **labels: str) -> list[float]:
        """The bucket counts, sum and count of a label set (hold it to skip the label lookup)."""
        key = tuple(sorted(labels.items()))
        row = self.values.get(key)
        if row is None:
            row = self.values[key] = [0.0] * (len(self.buckets) + 3)
        return row

    def add(self, row: list[float], value: float) -> None:
        row[bisect_left(self.buckets, value)] += 1
        row[-2] += value
        row[-1] += 1

    def samples(self) -> list[str]:
        out = []
        for key, row in list(self.values.items()):
            running = 0.0
            for bound, count in zip((*self.buckets, math.inf), row, strict=False):
                running += count
                le = 'le="' + _number(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(key, le)} {_number(running)}")
            out.append(f"{self.name}_sum{_labels(key)} {_number(row[-2])}")
            out.append(f"{self.name}_count{_labels(key)} {_number(row[-1])}")
        return out


class Metrics:
    """Every metric the serving tier exports."""

    def __init__(self) -> None:
        self.requests = Counter(
            "velox_requests_total",
            "HTTP requests by route and status.",
            compute=lambda: {key: row[-1] for key, row in list(self.latency.values.items())},
        )
        self.latency = Histogram(
            "velox_request_seconds", "HTTP request latency by route and status.", LATENCY_BUCKETS
        )
        self._request_rows: dict[tuple[str, int], list[float]] = {}
        self.batch_size = Histogram(
            "velox_batch_observations", "Observations per applied micro-batch.", SIZE_BUCKETS
        )
        self.queue_depth = Gauge("velox_queue_observations", "Observations waiting for a batch.")
        self.cache = Counter("velox_user_cache_total", "User-state lookups by result (hit, miss).")
        self.degraded = Counter(
            "velox_degraded_total", "Answers given by the prior because of the deadline, by route."
        )
        self.active = Gauge("velox_active_model", "1 for the model version being served.")
        self.pointer = Gauge(
            "velox_registry_active_model", "1 for the version the registry's pointer names."
        )
        self.lagging = Gauge(
            "velox_model_lagging", "1 while the served version is not the registry's active one."
        )
        self.store_failures = Gauge(
            "velox_store_failures_total",
            "Failed checkpoint write-backs and evictions since the model opened, by kind.",
        )
        self.store_problem = Gauge(
            "velox_store_problem", "1 while the store fails (GET /readyz says why), else 0."
        )
        self.prequential_sse = Counter(
            "velox_prequential_squared_error_total",
            "Sum of squared errors of predictions made just before each observation, by version.",
        )
        self.prequential_count = Counter(
            "velox_prequential_observations_total",
            "Observations scored before learning, by version.",
        )
        self.prequential_rmse = Gauge(
            "velox_prequential_rmse",
            "Root mean squared prequential error per model version.",
            compute=self._rmse,
        )

    def request(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency (one dict lookup on the hot path)."""
        row = self._request_rows.get((route, status))
        if row is None:
            row = self._request_rows[route, status] = self.latency.row(
                route=route, status=str(status)
            )
        self.latency.add(row, seconds)

    def _rmse(self) -> dict[Labels, float]:
        return {
            key: math.sqrt(sse / self.prequential_count.values[key])
            for key, sse in list(self.prequential_sse.values.items())
            if self.prequential_count.values.get(key)
        }

    def render(self) -> str:
        lines = []
        for metric in vars(self).values():
            if isinstance(metric, Counter | Histogram):
                lines.append(f"# HELP {metric.name} {metric.help}")
                lines.append(f"# TYPE {metric.name} {metric.kind}")
                lines.extend(metric.samples())
        return "\n".join(lines) + "\n"
