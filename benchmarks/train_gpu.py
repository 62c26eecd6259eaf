"""ALS on the GPU (CuPy) against the same training on NumPy, in one call on a GPU machine.

Trains ``velox.als.train_als`` (the single-node solver of ``velox train``) on
a synthetic set with the CPU backend and with the GPU backend from the same
initial factors, reports the median seconds of each, the speed-up, and the
largest relative difference between the two models' item factors and user
weights (they must agree to 1e-6 in float64).

Usage, on a machine with a GPU and ``pip install -e '.[gpu]'``:
``python -m benchmarks.train_gpu [--ratings 2000000] [--rank 50] [--iterations 10]
[--repeats 3]``. Without a GPU it says why and exits 2.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from benchmarks.timing import median_seconds
from velox.als import ALSParams, Ratings, initial_factors, train_als
from velox.backend import CPU, CUPY_UNAVAILABLE_REASON, HAS_CUPY, get_backend
from velox.datasets import SyntheticSpec, synthesize


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=2_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--rank", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not HAS_CUPY:
        print(f"no GPU run: {CUPY_UNAVAILABLE_REASON}")
        return 2
    gpu = get_backend("gpu")
    spec = SyntheticSpec(users=args.users, items=args.items, ratings=args.ratings, seed=0)
    ratings = Ratings.from_table(synthesize(spec))
    params = ALSParams(rank=args.rank, iterations=args.iterations)
    init = initial_factors(ratings.shape[1], args.rank, seed=0)
    results = {}

    def run(backend):
        results[backend.name] = train_als(ratings, params, backend=backend, init=init)

    run(gpu)  # compile kernels and warm the device once
    seconds = {b.name: median_seconds(lambda b=b: run(b), args.repeats) for b in (CPU, gpu)}
    cpu_model, gpu_model = results["cpu"], results["gpu"]
    print(
        f"ALS rank {args.rank}, {args.iterations} iterations, {ratings.values.size:,} ratings "
        f"({ratings.shape[0]:,} users, {ratings.shape[1]:,} items), median of {args.repeats}"
    )
    print("| backend | seconds | speed-up |")
    print("|---|---|---|")
    for name in ("cpu", "gpu"):
        print(f"| {name} | {seconds[name]:.2f} | {seconds['cpu'] / seconds[name]:.1f} |")
    factors = _difference(gpu_model.item_factors, cpu_model.item_factors)
    weights = _difference(gpu_model.user_weights, cpu_model.user_weights)
    print(f"max relative difference: item factors {factors:.1e}, user weights {weights:.1e}")
    return 0 if max(factors, weights) < 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
