"""The results folder of ``velox evaluate``: everything needed to recompute any figure.

Layout::

    observations.parquet   one row per streamed observation and policy
    summary.json           the run's settings and every figure per policy
    error_over_time.png    RMSE per window of the stream, one line per policy
    cold_start.png         new users' RMSE by how many of their observations came before

The notebook ``notebooks/personalization_quality.ipynb`` reads this folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from velox.evaluation.harness import Evaluation

OBSERVATIONS, SUMMARY = "observations.parquet", "summary.json"
PLOTS = ("error_over_time.png", "cold_start.png")


def observations(evaluation: Evaluation) -> pa.Table:
    """One row per streamed observation and policy, with its segment columns."""
    segments = evaluation.segments
    parts = []
    for result in evaluation.results:
        trace = result.trace
        n = trace.ratings.size
        parts.append(
            pa.table(
                {
                    "policy": pa.array([result.policy] * n),
                    "position": pa.array(np.arange(n)),
                    "user": pa.array(trace.users.tolist()),
                    "item": pa.array(trace.items.tolist()),
                    "rating": pa.array(trace.ratings),
                    "prediction": pa.array(trace.predictions),
                    "new_user": pa.array(segments.new_user),
                    "new_item": pa.array(segments.new_item),
                    "seen": pa.array(segments.seen),
                }
            )
        )
    return pa.concat_tables(parts)


def write(evaluation: Evaluation, folder: str | Path, extra: dict | None = None) -> Path:
    """Write the results folder (created if needed; files of an earlier run are replaced).

    ``extra`` adds top-level entries to the summary (the tuning, for one).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(observations(evaluation), folder / OBSERVATIONS)
    summary = {**evaluation.summary(), **(extra or {})}
    (folder / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, folder)
    return folder


def plot(summary: dict, folder: Path) -> None:
    """Draw the two figures of a summary into ``folder`` (headless)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    policies = summary["policies"]
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, figures in policies.items():
        windows = figures["window_rmse"]
        axes.plot(np.arange(1, len(windows) + 1), windows, marker="o", label=name)
    axes.set(xlabel="window of the stream", ylabel="RMSE", title="Error over time")
    axes.legend()
    figure.tight_layout()
    figure.savefig(folder / PLOTS[0], dpi=100)
    plt.close(figure)
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, figures in policies.items():
        curve = np.array([np.nan if v is None else v for v in figures["cold_start_rmse"]])
        axes.plot(np.arange(curve.size), curve, label=name)
    axes.set(
        xlabel="earlier observations of the new user",
        ylabel="RMSE",
        title="Cold start: new users",
    )
    axes.legend()
    figure.tight_layout()
    figure.savefig(folder / PLOTS[1], dpi=100)
    plt.close(figure)


def table(summary: dict) -> str:
    """The terminal table: one line per policy."""
    header = "| policy | RMSE | MAE | warm | new users | new items | obs/s |"
    lines = [header, "|" + "---|" * 7]

    def cell(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    for name, f in summary["policies"].items():
        lines.append(
            f"| {name} | {cell(f['rmse'])} | {cell(f['mae'])} | {cell(f['rmse_warm'])} | "
            f"{cell(f['rmse_new_users'])} | {cell(f['rmse_new_items'])} | "
            f"{f['observations_per_second']:,.0f} |"
        )
    return "\n".join(lines)
