"""``velox models``: list, show, activate, roll back, retain and delete model versions.

Registered as a ``velox.commands`` entry point (see :mod:`velox.cli`). The
registry's ``ACTIVE`` pointer is the single truth of which version serves: a
running server follows it (:mod:`serving.versions`), so ``activate`` and
``rollback`` end in the server switching, and they wait for the server at
``serve.host:serve.port`` to say it serves the new version (``--wait 0``
does not wait). ``list`` and ``show`` say which version that server serves,
whether it lags the pointer, how stale that version is (the monitor) and what
the retrain loop decided and ran last, when one answers.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import urllib.error
import urllib.request
from typing import Any

from feature_store.layout import DataLayout
from feature_store.registry import ModelRegistry, ModelVersion
from serving.triggers import readable_duration, utc_text
from velox.config import VeloxConfig
from velox.errors import DataError, InputError

_WAIT = 60.0
"""Default seconds to wait for a running server to serve a newly active version."""


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``velox models`` and its sub-commands to the command line."""
    models = commands.add_parser("models", help="model versions in the registry")
    actions = models.add_subparsers(dest="models_command", required=True)
    actions.add_parser("list", help="every version, its state, and what the server serves")
    show = actions.add_parser("show", help="one version's metadata")
    show.add_argument("version", help="version number: 3 or v3")
    activate = actions.add_parser("activate", help="make a ready version the active one")
    activate.add_argument("version", help="version number: 3 or v3")
    rollback = actions.add_parser("rollback", help="activate the newest older ready version")
    for command in (activate, rollback):
        command.add_argument(
            "--wait",
            type=float,
            default=_WAIT,
            metavar="SECONDS",
            help=f"wait this long for a running server to serve it (default {_WAIT:g}; 0: no)",
        )
    retain = actions.add_parser("retain", help="retire ready versions beyond the newest KEEP")
    retain.add_argument("keep", type=int, help="how many ready or active versions to keep")
    delete = actions.add_parser("delete", help="remove a version that is not active")
    delete.add_argument("version", help="version number: 3 or v3")
    models.set_defaults(handler=_run)


def _run(args: argparse.Namespace, config: VeloxConfig) -> None:
    registry = ModelRegistry(DataLayout.from_config(config).registry)
    command = args.models_command
    if command == "list":
        _list(registry, config)
    elif command == "show":
        _show(registry.get(_number(args.version)), config)
    elif command in ("activate", "rollback"):
        if command == "activate":
            version = registry.activate(_number(args.version))
        else:
            version = registry.rollback()
        print(f"{version.name} is the registry's active version")
        _await_server(config, version.name, args.wait)
    elif command == "retain":
        retired = registry.retain(args.keep)
        names = ", ".join(f"v{n}" for n in retired) or "none"
        print(f"retired: {names}")
    elif command == "delete":
        number = _number(args.version)
        registry.delete(number)
        print(f"deleted v{number}")


def _number(text: str) -> int:
    match = re.fullmatch(r"v?([0-9]{1,9})", text.strip())
    if match is None:
        raise InputError(f"a model version is a number like 3 or v3, not {text!r}")
    return int(match[1])


def _list(registry: ModelRegistry, config: VeloxConfig) -> None:
    rows = [("version", "state", "created", "engine", "watermark", "metrics")]
    for v in registry.versions():
        metrics = " ".join(f"{k}={value:.4g}" for k, value in sorted(v.metrics.items()))
        rows.append((v.name, v.state, v.created, v.engine, str(v.watermark), metrics))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1])
    _print_server(config)


def _show(version: ModelVersion, config: VeloxConfig) -> None:
    fields = {
        "version": version.name,
        "state": version.state,
        "created": version.created,
        "engine": version.engine,
        "mode": version.mode,
        "device": version.device,
        "rank": version.rank,
        "watermark": version.watermark,
        "train_count": version.train_count,
        "global_mean": version.global_mean,
        "parameters": json.dumps(version.parameters, sort_keys=True),
        "metrics": json.dumps(version.metrics, sort_keys=True),
        "timings": json.dumps(version.timings, sort_keys=True),
        "error": version.error,
    }
    for name, value in fields.items():
        if value not in (None, ""):
            print(f"{name}: {value}")
    _print_server(config)


def server_url(config: VeloxConfig) -> str:
    host = config.serve.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{host}:{config.serve.port}"


def served_models(config: VeloxConfig) -> dict[str, Any] | None:
    """``GET /models`` of the server at the configured address; None when none answers."""
    request = urllib.request.Request(f"{server_url(config)}/models")
    token = config.serve.read_token or config.serve.admin_token
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise DataError(
            f"the server at {server_url(config)} answered GET /models with {exc.code}; "
            "check serve.read_token"
        ) from None
    except (OSError, ValueError):  # nothing listens there, or it is not a Velox server
        return None


def _print_server(config: VeloxConfig) -> None:
    served = served_models(config)
    if served is None:
        print(f"no server answers at {server_url(config)}")
        return
    for line in served_lines(server_url(config), served):
        print(line)


def served_lines(url: str, served: dict[str, Any]) -> list[str]:
    """What the server at ``url`` says in its ``GET /models`` answer, for people."""
    line = f"the server at {url} serves {served['serving']}"
    if served["lagging"]:
        line += f", not yet the registry's active {served['active']}"
    if served.get("problem"):
        line += f" ({served['problem']})"
    lines = [line]
    if served.get("monitor"):
        lines += _monitor_lines(served["monitor"])
    if served.get("retrain"):
        lines += _retrain_lines(served["retrain"])
    return lines


_SHOWN_WINDOWS = 6
"""Newest per-time-window RMSE buckets ``velox models`` prints (the server keeps up to 24)."""


def _rmse(value: float | None, count: int) -> str:
    return "none yet" if value is None else f"{value:.4f} over {count} observations"


def _monitor_lines(monitor: dict[str, Any]) -> list[str]:
    age = monitor["age_seconds"]
    line = f"monitor of {monitor['version']}: rolling RMSE "
    line += _rmse(monitor["rolling_rmse"], monitor["rolling_count"])
    if monitor["degradation"] is not None:
        line += f", {monitor['degradation']:.2f}x the reference {monitor['reference_rmse']:.4f}"
    validation = monitor["validation_rmse"]
    lines = [
        line,
        f"  first window: {_rmse(monitor['first_rmse'], monitor['first_count'])} "
        f"(of {monitor['window']}); validation RMSE at training: "
        + ("unknown" if validation is None else f"{validation:.4f}"),
        f"  since watermark {monitor['watermark']}: {monitor['observations_since_watermark']} "
        f"observations, {monitor['new_users_since_watermark']} new users; age "
        + ("unknown" if age is None else readable_duration(age)),
    ]
    windows = monitor["windows"][-_SHOWN_WINDOWS:]
    if windows:
        lines.append(
            "  RMSE by time window: "
            + ", ".join(f"{utc_text(w['start'])} {w['rmse']:.4f} ({w['count']})" for w in windows)
        )
    return lines


def _retrain_lines(retrain: dict[str, Any]) -> list[str]:
    mode = "automatic" if retrain["enabled"] else "manual only (retrain.enabled is false)"
    now = "running" + (f", phase {retrain['phase']}" if retrain["phase"] else "")
    lines = [f"retrain: {mode}; {now if retrain['running'] else 'idle'}"]
    decision = retrain["last_decision"]
    if decision:
        verb = "starts" if decision["run"] else "waits"
        lines.append(
            f"  last decision, {utc_text(decision['at'])}: {verb} ({decision['trigger']}): "
            f"{decision['reason']}"
        )
    run = retrain["last_run"]
    if run:
        lines.append("  " + _run_line(run))
    if retrain["next_retry"] is not None:
        lines.append(f"  next retry at {utc_text(retrain['next_retry'])}")
    return lines


def _run_line(run: dict[str, Any]) -> str:
    line = f"last run {run['id']}, started {utc_text(run['started'])}: "
    line += run["outcome"] or "running"
    if run["version"]:
        line += f", {run['version']}"
    if run["reason"]:
        line += f" ({run['reason']})"
    if run["phases"]:
        phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in run["phases"].items())
        line += f"; phases: {phases}"
    gate = run["gate"]
    if gate:
        line += (
            f"; gate: active RMSE {gate['active_rmse']:.4f}, candidate "
            f"{gate['candidate_rmse']:.4f} over {gate['observations']} observations"
        )
    if run["log"]:
        line += f"; log: {run['log']}"
    return line


def _await_server(config: VeloxConfig, name: str, wait: float) -> None:
    """Wait until the running server serves ``name``; say what it does."""
    if wait <= 0:
        return
    deadline = time.monotonic() + wait
    while True:
        served = served_models(config)
        if served is None:
            print(f"no server answers at {server_url(config)}; one started later serves {name}")
            return
        if served["serving"] == name:
            print(f"the server at {server_url(config)} serves {name}")
            return
        if served.get("problem") and served["active"] == name:
            raise DataError(
                f"the server at {server_url(config)} cannot switch: {served['problem']}"
            )
        if time.monotonic() > deadline:
            raise DataError(
                f"the server at {server_url(config)} still serves {served['serving']} after "
                f"{wait:g} s; see its log, or wait longer with --wait"
            )
        time.sleep(0.2)
