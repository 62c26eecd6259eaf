"""``velox serve``: run the HTTP API on the registry's active model version, and follow it.

Registered as a ``velox.commands`` entry point (see :mod:`velox.cli`).
``--host`` and ``--port`` override ``serve.host`` and ``serve.port``; port 0
takes any free port, and the line ``Running on http://HOST:PORT`` says which.
``--bootstrap`` trains a first version from the synthetic generator when the
registry has no active one (on the driver, without Spark), so a new install
answers requests at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket

from feature_store.layout import DataLayout
from feature_store.registry import ModelRegistry
from velox.als import ALSParams, Ratings, train_als
from velox.config import VeloxConfig, load_config
from velox.datasets import SyntheticSpec, synthesize
from velox.errors import ConfigError

log = logging.getLogger(__name__)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``velox serve`` to the command line."""
    serve = commands.add_parser("serve", help="serve predictions and learn online over HTTP")
    serve.add_argument("--host", help="address to listen on (serve.host)")
    serve.add_argument(
        "--port", type=int, help="port to listen on (serve.port); 0: any free port, printed"
    )
    serve.add_argument(
        "--bootstrap",
        action="store_true",
        help="with no active model, train one on synthetic data first",
    )
    serve.set_defaults(handler=_serve)


def bootstrap(config: VeloxConfig) -> None:
    """Train and activate a first version from the synthetic generator."""
    registry = ModelRegistry(DataLayout.from_config(config).registry)
    if registry.active() is not None:
        return
    spec = SyntheticSpec(seed=config.train.seed)
    print(f"no active model: training one on {spec.ratings:,} synthetic ratings (--bootstrap)")
    params = ALSParams.from_config(config.train)
    trained = train_als(Ratings.from_table(synthesize(spec)), params)
    with registry.building(
        engine="velox", watermark=0, parameters={"bootstrap": True}, mode="single"
    ) as version:
        registry.write_artifacts(version.number, trained)
        registry.mark_ready(version.number, metrics={"train_rmse": trained.train_rmse})
    registry.activate(version.number)


def _serve(args: argparse.Namespace, config: VeloxConfig) -> None:
    from serving.app import create_app
    from serving.wire import run

    given = (("host", args.host), ("port", args.port))
    flags = [f"serve.{name}={value}" for name, value in given if value is not None]
    if flags:
        config = load_config(args.config, overrides=[*args.overrides, *flags])
    if args.bootstrap:
        bootstrap(config)
    # Bound here, so that port 0 (any free port) prints the port it got.
    host, port = config.serve.host, config.serve.port
    try:
        sock = socket.create_server((host, port))
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({os.strerror(exc.errno) if exc.errno else exc}); "
            "set another --port (0: any free port) or --host"
        ) from None
    run(
        create_app(config),
        sock,
        access_log=log if args.verbose else None,
        announce=lambda text: print(text, flush=True),
    )
