"""``velox evaluate``: compare policies on a stream and write a results folder.

The data is a MovieLens file or folder, or a Parquet file with user, item,
rating and ts (``--data``); without it, the synthetic generator's stream.
ALS trains with ``[train]``, the online model runs with ``[model]``, as
``velox serve`` would.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from velox.als import ALSParams
from velox.config import ModelConfig, VeloxConfig
from velox.datasets import SyntheticSpec, load_movielens, synthesize
from velox.errors import DataError
from velox.evaluation.harness import PROTOCOLS, Spec, evaluate, per_user_protocol, split
from velox.evaluation.policies import DEFAULT_POLICIES, POLICIES, ServerLearner
from velox.evaluation.tune import GRID, Grid, score_grid, tune

LEARNERS = "velox.learners"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``velox evaluate`` to the command line."""
    parser = commands.add_parser("evaluate", help="compare online policies on a stream")
    parser.add_argument("--data", help="MovieLens file/folder or Parquet (default: synthetic)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="temporal")
    parser.add_argument("--train-share", type=float, default=0.5, help="share that trains")
    parser.add_argument(
        "--policies",
        default=",".join(DEFAULT_POLICIES),
        help=f"comma-separated, from: {', '.join(POLICIES)}",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="observations per batch")
    parser.add_argument("--forgetting", type=float, default=0.99, help="of the forgetting policy")
    parser.add_argument(
        "--retrain-every", type=float, default=0.1, help="share of the stream between retrains"
    )
    parser.add_argument(
        "--server",
        metavar="URL",
        help="also replay the stream through this running velox serve (policy 'server')",
    )
    parser.add_argument("--token", help="bearer token for --server's observe route")
    parser.add_argument(
        "--store",
        metavar="DIR",
        help="also replay the stream through a durable store created in DIR (policy 'store')",
    )
    parser.add_argument("--out", default="results", help="results folder to write")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="choose rank, regularisation, ALS age weights, bias pseudo-counts, forgetting and "
        "the user-bias walk on the training part",
    )
    parser.add_argument(
        "--tune-check",
        action="store_true",
        help="with --tune: also score the whole grid on the stream and report the gap",
    )
    parser.add_argument(
        "--tune-ranks",
        default=",".join(str(rank) for rank in GRID.ranks),
        help="comma-separated ranks the --tune grid tries",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def read_table(data: str | None, seed: int) -> pa.Table:
    """The ratings to evaluate on: a MovieLens release, a Parquet file, or synthetic ones."""
    if data is None:
        return synthesize(SyntheticSpec(seed=seed))
    path = Path(data)
    if not path.exists():
        raise DataError(f"{path} does not exist; pass a MovieLens folder or a Parquet file")
    if path.suffix == ".parquet":
        return pq.read_table(path, columns=["user", "item", "rating", "ts"])
    return load_movielens(path)


def _bar(name: str):
    """A progress line on stderr, redrawn at each whole percent."""
    started = time.perf_counter()
    shown = [-1]

    def show(done: int, total: int) -> None:
        percent = done * 100 // total
        if percent == shown[0]:
            return
        shown[0] = percent
        rate = done / max(time.perf_counter() - started, 1e-9)
        end = "\n" if done == total else ""
        print(
            f"\r{name:>14}: {done:,}/{total:,} ({done / total:.0%}) {rate:,.0f} obs/s",
            end=end,
            file=sys.stderr,
            flush=True,
        )

    return show


def _tuned(
    table: pa.Table, spec: Spec, params: ALSParams, model: ModelConfig, grid: Grid, *, check: bool
):
    """The settings ``--tune`` picks on the training part, and what to record of it."""
    train, stream = split(table, spec)
    print(f"tuning on the training part ({train.num_rows:,} ratings)...", file=sys.stderr)
    best = tune(train, params, model, grid)[0]
    chosen = best.settings()
    print("tuned: " + " ".join(f"--set {key}={value}" for key, value in chosen.items()))
    extra = {"tuned": {"settings": chosen, "tuning_rmse": best.rmse}}
    if check:
        on_stream = score_grid(train, stream, params, model, grid)
        mine = next(c for c in on_stream if c.settings() == chosen)
        extra["tuned"]["check"] = {
            "chosen_on_stream": mine.rmse,
            "best_on_stream": on_stream[0].rmse,
            "best_settings": on_stream[0].settings(),
            "gap": mine.rmse - on_stream[0].rmse,
        }
        best_rmse = on_stream[0].rmse
        print(f"tune check: chosen {mine.rmse:.4f} on the stream, grid best {best_rmse:.4f}")
    return best.params, best.model, extra


def _plugin(name: str):
    """A learner maker of the ``velox.learners`` entry points (packages built on velox)."""
    found = {entry.name: entry for entry in entry_points(group=LEARNERS)}
    if name not in found:
        raise DataError(
            f"no {name!r} learner is installed (entry point group {LEARNERS}); "
            "install Velox with its feature store: pip install -e ."
        )
    return found[name].load()


def run(args: argparse.Namespace, config: VeloxConfig) -> None:
    """Run ``velox evaluate`` with the parsed ``args``."""
    from velox.evaluation import results

    table = read_table(args.data, config.train.seed)
    params = ALSParams.from_config(config.train)
    if args.protocol == "per-user":
        figures = per_user_protocol(table, params, config.model, batch_size=args.batch_size)
        for key, value in figures.items():
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
        return
    spec = Spec(
        protocol=args.protocol,
        train_share=args.train_share,
        policies=tuple(name.strip() for name in args.policies.split(",") if name.strip()),
        batch_size=args.batch_size,
        forgetting=args.forgetting,
        retrain_every=args.retrain_every,
        seed=config.train.seed,
    )
    progress = None if args.quiet else _bar
    model, extra = config.model, {}
    if args.tune:
        ranks = tuple(int(rank) for rank in args.tune_ranks.split(","))
        grid = dataclasses.replace(GRID, ranks=ranks)
        params, model, extra = _tuned(table, spec, params, model, grid, check=args.tune_check)
    learners = {}
    if args.store is not None:
        make = _plugin("durable")
        learners["store"] = lambda setup: make(setup, args.store)
    with contextlib.ExitStack() as stack:
        if args.server is not None:
            from velox.client import Client

            client = stack.enter_context(Client(args.server, token=args.token))
            learners["server"] = lambda setup: ServerLearner(client)
        spec = dataclasses.replace(spec, policies=(*spec.policies, *learners))
        evaluation = evaluate(table, params, model, spec, progress=progress, learners=learners)
    folder = results.write(evaluation, args.out, extra)
    print(results.table(evaluation.summary()))
    print(f"results in {folder}")
