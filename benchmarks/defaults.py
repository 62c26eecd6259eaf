"""Where the shipped defaults come from: ``--tune``'s grid on the training parts of two streams.

Both data sets are cut by the temporal protocol (first half trains, second
half streams); the grid of :mod:`velox.evaluation.tune` is scored on each
training part's own 80/20 temporal split, never on a stream. The shipped
settings are the winner on MovieLens 100K's training part: real feedback
in time order is what the service is for. The synthetic generator's own
winner, and the best compromise between the two (mean RMSE relative to
each data set's winner), are printed beside it, with the stream RMSE of
each choice on both data sets, so the cost of the choice is on record.

Usage: ``python -m benchmarks.defaults [--data ../shared/data/ml-100k]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from velox.als import ALSParams
from velox.config import ModelConfig
from velox.datasets import SyntheticSpec, load_movielens, synthesize
from velox.evaluation.protocols import temporal
from velox.evaluation.tune import score_grid, tune

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ML100K), help="MovieLens 100K folder")
    args = parser.parse_args()
    if not (Path(args.data) / "u.data").is_file():
        print(f"MovieLens 100K not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    tables = {"ml-100k": load_movielens(args.data), "synthetic": synthesize(SyntheticSpec())}
    params, model = ALSParams(), ModelConfig()
    relative: dict[tuple, list[float]] = {}
    points, winners = {}, {}
    for name, table in tables.items():
        train, _ = temporal(table, 0.5)
        ranked = tune(train, params, model)
        best = ranked[0].rmse
        winners[name] = tuple(ranked[0].settings().items())
        print(f"{name}: tuning winner {ranked[0].settings()} (RMSE {best:.4f} on its split)")
        for candidate in ranked:
            key = tuple(candidate.settings().items())
            points[key] = candidate
            relative.setdefault(key, []).append(candidate.rmse / best)
    choices = {
        "shipped (ml-100k's winner)": winners["ml-100k"],
        "synthetic's winner": winners["synthetic"],
        "compromise": min(relative, key=lambda k: np.mean(relative[k])),
    }
    for label, key in choices.items():
        print(f"{label}: {dict(key)}")
        for name, table in tables.items():
            train, stream = temporal(table, 0.5)
            chosen = points[key]
            (scored,) = score_grid(train, stream, chosen.params, chosen.model, _single(chosen))
            print(f"  {name}: online stream RMSE {scored.rmse:.4f}")
    return 0


def _single(candidate):
    """A grid of the one candidate (to score it with the same code)."""
    from velox.evaluation.tune import Grid

    p, m = candidate.params, candidate.model
    return Grid(
        ranks=(p.rank,),
        regularization=((p.regularization_exponent, p.user_regularization),),
        bias_pseudo_counts=(m.bias_regularization,),
        bias_count_weights=(m.bias_count_weight,),
        forgetting=(m.forgetting,),
        bias_drift=(m.bias_drift,),
        train_forgetting=(p.forgetting,),
    )


if __name__ == "__main__":
    sys.exit(main())
