"""The small grid behind the River peers' settings in ``velox evaluate``.

River's ``BiasedMF`` is pre-trained on the first 80% (by time) of MovieLens
100K's training half and scored prequentially on the last 20%, the split
``velox evaluate --tune`` uses, so the settings never see the stream the
peers are compared on. Grid: factors 3 or 10; SGD rate of the biases 0.01,
0.025, 0.05; of the factors 0.01, 0.05; L2 on the factors 0, 0.01, 0.05.
Prints every point, best last.

Usage: ``python -m benchmarks.river_grid [--data ../shared/data/ml-100k]``
(needs the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

from velox.datasets import load_movielens
from velox.evaluation import replay, rmse
from velox.evaluation.protocols import temporal
from velox.evaluation.river_peers import RiverLearner

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ML100K))
    args = parser.parse_args()
    from river import optim, reco

    train, _ = temporal(load_movielens(args.data), 0.5)
    past, recent = temporal(train, 0.8)
    rows = list(
        zip(
            past.column("user").to_pylist(),
            past.column("item").to_pylist(),
            past.column("rating").to_pylist(),
            strict=True,
        )
    )
    scored = []
    grid = itertools.product((3, 10), (0.01, 0.025, 0.05), (0.01, 0.05), (0.0, 0.01, 0.05))
    for rank, bias_rate, factor_rate, l2 in grid:
        model = reco.BiasedMF(
            n_factors=rank,
            bias_optimizer=optim.SGD(bias_rate),
            latent_optimizer=optim.SGD(factor_rate),
            l2_latent=l2,
            latent_initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=0),
        )
        for user, item, rating in rows:
            model.learn_one(user=user, item=item, y=rating)
        trace = replay(RiverLearner(model), recent)
        score = rmse(np.clip(trace.predictions, 1, 5), trace.ratings)
        scored.append((score, rank, bias_rate, factor_rate, l2))
    for score, rank, bias_rate, factor_rate, l2 in sorted(scored, reverse=True):
        print(f"{score:.4f} factors={rank} bias SGD {bias_rate} factor SGD {factor_rate} l2={l2}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
