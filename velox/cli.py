"""The ``velox`` command line. Errors a user can cause print one sentence and exit 2.

Commands of the other packages (``velox store``, ``velox train``, ``velox serve``,
``velox models``) plug in through the ``velox.commands`` entry-point group:
each entry is a function that adds its sub-parsers and sets a ``handler``
default taking ``(args, config)``. So the core never imports the packages
built on it (DESIGN.md, section 2), yet one ``velox`` command serves them all.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from velox.config import VeloxConfig, describe, load_config
from velox.datasets import SyntheticSpec, write_synthetic
from velox.errors import VeloxError
from velox.evaluation import cli as evaluation_cli

COMMAND_GROUP = "velox.commands"


def _add_synthetic_args(parser: argparse.ArgumentParser, ratings: int) -> None:
    parser.add_argument("--users", type=int, default=2_000, help="number of users")
    parser.add_argument("--items", type=int, default=1_000, help="number of items")
    parser.add_argument("--ratings", type=int, default=ratings, help="number of ratings")
    parser.add_argument("--drift", type=float, default=0.6, help="taste drift in [0, 1]")
    parser.add_argument("--latent-rank", type=int, default=8, help="rank of the planted tastes")
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def _spec(args: argparse.Namespace) -> SyntheticSpec:
    return SyntheticSpec(
        users=args.users,
        items=args.items,
        ratings=args.ratings,
        drift=args.drift,
        rank=args.latent_rank,
        seed=args.seed,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="velox", description=__doc__)
    parser.add_argument("--config", help="TOML settings file (default: conf/velox.toml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting; repeatable; wins over the file and the environment",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train on a synthetic past, then learn online")
    _add_synthetic_args(demo, ratings=120_000)

    datasets = commands.add_parser("datasets", help="data set tools")
    datasets_commands = datasets.add_subparsers(dest="datasets_command", required=True)
    synth = datasets_commands.add_parser("synth", help="write a synthetic data set as Parquet")
    _add_synthetic_args(synth, ratings=100_000)
    synth.add_argument("--out", required=True, help="Parquet file to write")

    commands.add_parser("config", help="print the effective settings")
    evaluation_cli.add_parser(commands)
    for plugin in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        plugin.load()(commands)
    return parser


def _run(args: argparse.Namespace, config: VeloxConfig) -> None:
    if hasattr(args, "handler"):
        args.handler(args, config)
    elif args.command == "demo":
        from velox.demo import run_demo

        run_demo(config, _spec(args))
    elif args.command == "datasets":
        rows = write_synthetic(_spec(args), args.out)
        print(f"wrote {rows} ratings to {args.out}")
    elif args.command == "evaluate":
        evaluation_cli.run(args, config)
    elif args.command == "config":
        for key, _, doc in describe():
            section, name = key.split(".")
            value = getattr(getattr(config, section), name)
            if name.endswith("_token") and value:
                value = "<set>"  # secrets are never printed
            print(f"{key} = {value!r}    # {doc}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        config = load_config(args.config, overrides=args.overrides)
        _run(args, config)
    except VeloxError as exc:
        print(f"velox: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
