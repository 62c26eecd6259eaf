"""``velox retrain``: the retrain loop's steps from the command line, for cron or a scheduler.

Registered as a ``velox.commands`` entry point (see :mod:`velox.cli`).

* **A server runs** (it answers at ``serve.host``:``serve.port``): the command
  asks it, ``POST /retrain`` with the admin token, and with ``--wait``
  follows the run in ``GET /models`` until it ends. The server does the work
  (:mod:`serving.retrain`), so serving never pauses.
* **No server runs**: the command does the same steps itself on the data
  folder: the job (export up to the log's head ``W``, then Spark, each a child
  process: :func:`serving.retrain_job.run_job`), the candidate in the store's
  other slot caught up with the log after ``W``, the gate, the swap, and the
  registry's pointer. A server started later serves the new version.

Exit code 0 when a new version is active, 1 otherwise (a rejected candidate,
a failed job, or a run that did not end within ``--wait``).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from typing import Any

from feature_store.candidate import Candidate
from feature_store.layout import DataLayout
from feature_store.registry import ModelRegistry
from feature_store.versions import open_active
from serving.models_cli import served_models, server_url
from serving.retrain import run_id
from serving.retrain_job import run_job
from velox.backend import get_backend
from velox.config import VeloxConfig
from velox.errors import DataError


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``velox retrain`` to the command line."""
    retrain = commands.add_parser(
        "retrain", help="export, train, gate and activate a new version (a server's or here)"
    )
    retrain.add_argument("--reason", default="", help="recorded with the run")
    retrain.add_argument(
        "--force", action="store_true", help="activate the new version even if the gate rejects it"
    )
    retrain.add_argument(
        "--wait",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="how long to follow a server's run (0: start it and return)",
    )
    retrain.set_defaults(handler=_retrain)


def _retrain(args: argparse.Namespace, config: VeloxConfig) -> None:
    if served_models(config) is not None:
        succeeded = _ask_server(config, args.reason, args.force, args.wait)
    else:
        succeeded = _retrain_here(config, args.reason, args.force)
    if not succeeded:
        raise SystemExit(1)


def _ask_server(config: VeloxConfig, reason: str, force: bool, wait: float) -> bool:
    """``POST /retrain`` to the running server, then follow the run for up to ``wait`` s."""
    url = server_url(config)
    answer = _post(config, f"{url}/retrain", {"reason": reason, "force": force})
    started = answer["status"] == "started"
    print(f"the server at {url} {'started' if started else 'already runs'} retrain {answer['id']}")
    if wait <= 0:
        return True
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        run = ((served_models(config) or {}).get("retrain") or {}).get("last_run") or {}
        if run.get("id") == answer["id"] and run.get("outcome") is not None:
            print(f"retrain {run['id']} {run['outcome']}: {run['reason']}")
            return run["outcome"] == "succeeded"
        time.sleep(1.0)
    print(f"retrain {answer['id']} has not ended after {wait:g} s; see GET {url}/models")
    return False


def _post(config: VeloxConfig, url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    if config.serve.admin_token:
        request.add_header("Authorization", f"Bearer {config.serve.admin_token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        message = json.loads(exc.read() or b"{}").get("message", exc.reason)
        raise DataError(
            f"the server at {url} refused the retrain ({exc.code}: {message}); "
            "check serve.admin_token"
        ) from None


def _retrain_here(config: VeloxConfig, reason: str, force: bool) -> bool:
    """Every step of a server's run, on the data folder of a stopped server."""
    backend = get_backend(config.compute.device)
    registry = ModelRegistry(DataLayout.from_config(config).registry)
    durable, active = open_active(config, backend)
    try:
        run = run_id(time.time())
        upto = durable.store.last_seq
        print(f"retrain {run} ({reason or 'no reason given'}): job up to seq {upto}")
        result = run_job(config, upto, run_id=run, timeout=config.retrain.timeout)
        version = result.version
        candidate = Candidate.build(version, registry, durable.store, config, backend)
        candidate.catch_up(within=0)
        passed, why = candidate.tally.verdict(
            config.retrain.gate_tolerance, config.retrain.gate_min_observations
        )
        if not passed and not force:
            candidate.release()
            print(f"retrain {run} rejected: {version.name} {why}; {active.name} stays active")
            return False
        candidate.swap(durable, config)
        durable.seal()
        durable = candidate.durable
        registry.activate(version.number)
        forced = " (forced past the gate)" if not passed else ""
        print(f"retrain {run} succeeded: {version.name} {why}{forced}; it is active")
        return True
    finally:
        durable.close()
