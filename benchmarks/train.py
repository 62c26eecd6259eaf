"""Training speed: the Velox engine (single-node and distributed) against Spark MLlib ALS.

Every run is a whole ``velox train`` job in one shared SparkSession on
``local[2]`` (read, clean, index, train, validate, write the version), rank
50, 10 iterations, nothing held out; the table gives the median of
``--repeats`` runs of the job and of its training stage alone (the job's own
``train_s`` timing), and each Velox figure as a multiple of MLlib's speed in
the same run. Data: MovieLens 100K (``--ml100k``) and a synthetic set of
``--synthetic`` ratings (20,000 users, 5,000 items, written once as Parquet).

Usage: ``python -m benchmarks.train [--repeats 3] [--synthetic 2000000]
[--modes single,distributed,mllib] [--check]``. ``--check`` exits 1 when the
single-node Velox job is under 2x MLlib's speed on the synthetic set or
slower than MLlib on MovieLens (issue 4).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from batch_jobs.spark import read_spark_defaults, spark_session
from batch_jobs.train import TrainJob
from velox.config import load_config
from velox.datasets import SyntheticSpec, write_synthetic

ENGINES = {
    "single": ("velox", "single"),
    "distributed": ("velox", "distributed"),
    "mllib": ("mllib", "auto"),
}


def time_job(spark, data: Path, scratch: Path, engine: str, mode: str, repeats: int) -> dict:
    """Median seconds of the whole job and of its training stage over ``repeats`` runs."""
    config = load_config(
        None,
        overrides=[
            f"data.dir={scratch}",
            f"train.engine={engine}",
            f"train.mode={mode}",
            "train.rank=50",
            "train.iterations=10",
            "train.validation=0",
        ],
    )
    totals, stages = [], []
    for _ in range(repeats):
        version = TrainJob(config, source=data, spark=spark, emit=lambda _: None).run()
        totals.append(version.timings["total_s"] - version.timings["start_s"])
        stages.append(version.timings["train_s"])
    return {"job": statistics.median(totals), "train": statistics.median(stages)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic", type=int, default=2_000_000)
    parser.add_argument("--ml100k", default="../shared/data/ml-100k")
    parser.add_argument("--modes", default="single,distributed,mllib")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    spark = spark_session("local[2]", read_spark_defaults())
    results: dict[str, dict[str, dict]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="velox-train-bench-", dir=".") as scratch:
            synthetic = Path(scratch) / "synthetic.parquet"
            spec = SyntheticSpec(users=20_000, items=5_000, ratings=args.synthetic, seed=0)
            write_synthetic(spec, synthetic)
            sets = {"ml-100k": Path(args.ml100k), f"synthetic {args.synthetic:,}": synthetic}
            for name, data in sets.items():
                if not data.exists():
                    print(f"skipping {name}: {data} does not exist")
                    continue
                results[name] = {
                    mode: time_job(spark, data, Path(scratch) / mode, *ENGINES[mode], args.repeats)
                    for mode in modes
                }
    finally:
        spark.stop()
    print("| data | engine (mode) | job s | train stage s | job x MLlib speed | stage x MLlib |")
    print("|---|---|---|---|---|---|")
    failures = []
    for name, by_mode in results.items():
        base = by_mode.get("mllib")
        for mode, t in by_mode.items():
            job_ratio = base["job"] / t["job"] if base else float("nan")
            stage_ratio = base["train"] / t["train"] if base else float("nan")
            print(
                f"| {name} | {' '.join(ENGINES[mode])} | {t['job']:.1f} | {t['train']:.1f} | "
                f"{job_ratio:.2f} | {stage_ratio:.2f} |"
            )
            if mode == "single" and base:
                need = 1.0 if name == "ml-100k" else 2.0
                if job_ratio < need:
                    failures.append(
                        f"{name}: single-node job is {job_ratio:.2f}x MLlib, need {need}x"
                    )
    for failure in failures:
        print(failure)
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
