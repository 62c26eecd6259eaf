"""``velox train``: flags map onto the ``[train]`` settings; files and environment agree.

Registered as a ``velox.commands`` entry point (see :mod:`velox.cli`).
"""

from __future__ import annotations

import argparse

from batch_jobs.spark import parse_overrides
from velox.config import VeloxConfig, load_config
from velox.errors import ConfigError

# flag -> setting; each flag is the same as --set train.<setting>=VALUE
_FLAGS = {
    "engine": ("engine", str, "velox or mllib"),
    "mode": ("mode", str, "auto, single or distributed"),
    "master": ("master", str, "Spark master, e.g. local[2] (ignored under spark-submit)"),
    "rank": ("rank", int, "latent factors per item"),
    "iterations": ("iterations", int, "ALS iterations"),
    "user-regularization": ("user_regularization", float, "user ridge strength"),
    "item-regularization": ("item_regularization", float, "item ridge strength / regParam"),
    "regularization-exponent": (
        "regularization_exponent",
        float,
        "exponent e of the per-row ridge strength lambda * n^e",
    ),
    "forgetting": ("forgetting", float, "age weight per later rating of the user"),
    "validation": ("validation", float, "held-out share for the validation RMSE"),
    "blocks": ("blocks", int, "blocks per half-step in distributed mode"),
    "seed": ("seed", int, "seed of the initial factors and the split"),
}


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``velox train`` to the command line."""
    train = commands.add_parser("train", help="train a model version with Spark")
    train.add_argument(
        "--input", help="MovieLens file/folder or Parquet path (default: the offline store)"
    )
    train.add_argument("--watermark", type=int, help="train on the offline store up to this seq")
    train.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="spark.KEY=VALUE",
        help="a Spark setting; repeatable; wins over conf/spark-defaults.conf",
    )
    train.add_argument("--activate", action="store_true", help="activate the version when ready")
    train.add_argument(
        "--run-id", help="a label recorded in the version's parameters as run (the retrain run)"
    )
    train.add_argument(
        "--half-life",
        type=float,
        metavar="N",
        help="age weighting: a rating followed by N later ratings of its user weighs 1/2 "
        "(sets train.forgetting = 0.5 ** (1 / N))",
    )
    for flag, (_, kind, text) in _FLAGS.items():
        train.add_argument(f"--{flag}", type=kind, help=text)
    train.set_defaults(handler=_train)


def _train(args: argparse.Namespace, config: VeloxConfig) -> None:
    from batch_jobs.train import TrainJob

    flags = [
        f"train.{setting}={getattr(args, flag.replace('-', '_'))}"
        for flag, (setting, _, _) in _FLAGS.items()
        if getattr(args, flag.replace("-", "_")) is not None
    ]
    if args.half_life is not None:
        if not args.half_life > 0:
            raise ConfigError(f"--half-life must be a number of ratings > 0, got {args.half_life}")
        flags.append(f"train.forgetting={0.5 ** (1 / args.half_life)!r}")
    if flags:
        config = load_config(args.config, overrides=[*args.overrides, *flags])
    TrainJob(
        config,
        source=args.input,
        watermark=args.watermark,
        spark_conf=parse_overrides(args.conf),
        activate=args.activate,
        run_id=args.run_id,
    ).run()
