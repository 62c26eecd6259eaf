"""Rank-one update throughput against two references measured in the same run.

* naive: per observation, ``A += f f^T; b += t f; w = np.linalg.solve(A, b)``;
* memory limit: reading and writing the batch's ``P`` matrices once
  (``np.copyto``), which no in-place update of ``P`` can beat.

Usage: ``python -m benchmarks.kernels [--repeats 9] [--gamma G] [--generic] [--check]``.
Prints a Markdown table of the public update (the fused CPU path);
``--generic`` times the array-API version instead (what CuPy runs, here on
NumPy, without input validation). ``--check`` exits 1 when a target of the
foundation issue is missed (>= 3x naive for d >= 32; <= 4x the memory limit at
d = 64 and 128 for batches of 64 and 1024).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from benchmarks.timing import median_seconds
from velox import kernels
from velox.kernels import array_api

DIMS = (16, 32, 64, 128)
BATCHES = (1, 64, 1024)


def _states(batch: int, d: int, rng: np.random.Generator):
    P = np.tile(np.eye(d), (batch, 1, 1))
    A = P.copy()
    w, b = np.zeros((batch, d)), np.zeros((batch, d))
    f = rng.normal(size=(batch, d)) / np.sqrt(d)
    t = rng.normal(size=batch)
    return P, w, A, b, f, t


def _naive(A: np.ndarray, b: np.ndarray, w: np.ndarray, f: np.ndarray, t: np.ndarray) -> None:
    for j in range(f.shape[0]):
        A[j] += np.outer(f[j], f[j])
        b[j] += t[j] * f[j]
        w[j] = np.linalg.solve(A[j], b[j])


def measure(d: int, batch: int, repeats: int, gamma: float, generic: bool) -> dict[str, float]:
    rng = np.random.default_rng(d * 10_000 + batch)
    P, w, A, b, f, t = _states(batch, d, rng)
    update_fn = array_api.rank_one_update if generic else kernels.rank_one_update
    update_fn(P, w, A, b, f, t, gamma)  # compile and warm
    update = median_seconds(lambda: update_fn(P, w, A, b, f, t, gamma), repeats)
    _, w2, A2, b2, _, _ = _states(batch, d, rng)
    naive = median_seconds(lambda: _naive(A2, b2, w2, f, t), max(3, repeats // 2))
    target = np.empty_like(P)
    copy = median_seconds(lambda: np.copyto(target, P), repeats)
    return {
        "updates_per_s": batch / update,
        "naive_per_s": batch / naive,
        "speedup": naive / update,
        "vs_memory": update / copy,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--generic", action="store_true", help="time the array-API version")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    which = "generic array-API" if args.generic else "public (fused CPU)"
    print(f"{which} rank-one update, float64, gamma={args.gamma}, median of {args.repeats}")
    print("| d | batch | updates/s | naive updates/s | x naive | x memory limit |")
    print("|---|---|---|---|---|---|")
    missed = []
    for d in DIMS:
        for batch in BATCHES:
            r = measure(d, batch, args.repeats, args.gamma, args.generic)
            print(
                f"| {d} | {batch} | {r['updates_per_s']:,.0f} | {r['naive_per_s']:,.0f} | "
                f"{r['speedup']:.1f} | {r['vs_memory']:.2f} |"
            )
            if d >= 32 and r["speedup"] < 3:
                missed.append(f"d={d} batch={batch}: {r['speedup']:.1f}x naive < 3x")
            if d >= 64 and batch >= 64 and r["vs_memory"] > 4:
                missed.append(f"d={d} batch={batch}: {r['vs_memory']:.2f}x memory limit > 4x")
    for line in missed:
        print("MISSED", line)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
