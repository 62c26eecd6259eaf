"""``velox train``: the Spark job that trains a model version and writes it to the registry.

Runs unchanged under ``spark-submit`` (``spark-submit batch_jobs/train.py
--input ...`` takes the same options as ``velox train``) or from the command
line on ``train.master`` (``local[*]`` by default).

Order: check the device and Java, start Spark, read and clean the input
(:mod:`batch_jobs.inputs`), pick the mode, claim a "building" version in the
registry, train, measure the validation RMSE, write the artifacts and mark the
version ready (and active with ``--activate``). Any failure after the claim
marks the version failed, so a half-written version is never ready or active.

Modes of the ``velox`` engine (the same half-steps and kernels in both):

* ``single``: Spark reads and prepares, the ratings are collected to the
  driver as Arrow, and the driver solves on its device (CuPy or NumPy). Limit:
  the ratings and the user statistics must fit the driver's memory
  (``train.single_node_max_ratings`` is where ``auto`` stops choosing it).
* ``distributed``: every half-step is a Spark stage (:mod:`batch_jobs.distributed`).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from batch_jobs.distributed import SparkExecutor
from batch_jobs.inputs import Prepared, prepare, read_source
from batch_jobs.mllib import train_mllib
from batch_jobs.spark import read_spark_defaults, spark_session
from feature_store.layout import DataLayout
from feature_store.offline import OfflineStore
from feature_store.registry import ModelRegistry, ModelVersion
from velox.als import ALSParams, Ratings, check_rank, train_als
from velox.backend import get_backend
from velox.config import VeloxConfig
from velox.errors import DataError
from velox.evaluation import rmse
from velox.trained import TrainedModel

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainJob:
    """One training run; :meth:`run` returns the version it wrote.

    ``source`` defaults to the offline store (up to ``watermark``, default its
    watermark); ``spark`` reuses a running session instead of starting one.
    ``run_id`` is recorded in the version's parameters as ``run``, so the
    retrain runner that started this job in another process finds its version
    in the registry without guessing.
    """

    config: VeloxConfig
    source: str | Path | None = None
    watermark: int | None = None
    spark_conf: dict[str, str] = dataclasses.field(default_factory=dict)
    activate: bool = False
    spark: object = None
    init: np.ndarray | None = None
    emit: Callable[[str], None] = print
    run_id: str | None = None

    def run(self) -> ModelVersion:
        started = time.perf_counter()
        train = self.config.train
        backend = get_backend(self.config.compute.device)  # a missing GPU fails before Spark
        layout = DataLayout.from_config(self.config)
        source, watermark = self._source(layout)
        params = ALSParams.from_config(train)
        owns_session = self.spark is None
        spark = self.spark or spark_session(
            train.master, {**read_spark_defaults(), **self.spark_conf}
        )
        try:
            timings = {"start_s": time.perf_counter() - started}
            prepared = prepare(
                read_source(spark, source, watermark=watermark),
                rating_min=train.rating_min,
                rating_max=train.rating_max,
                validation=train.validation,
                seed=train.seed,
            )
            count = prepared.rows - prepared.rejected - prepared.duplicates
            if count == 0:
                raise DataError(
                    f"no valid ratings in {source} ({prepared.rows} rows, "
                    f"{prepared.rejected} rejected); check the input and train.rating_min/max"
                )
            mode = self._mode(count)
            timings["read_s"] = time.perf_counter() - started - timings["start_s"]
            self.emit(
                f"training {train.engine} ({mode}, {backend.name}) on {count:,} ratings from "
                f"{source} ({train.validation:.0%} held out): {prepared.rejected:,} rejected, "
                f"{prepared.duplicates:,} duplicates"
            )
            registry = ModelRegistry(layout.registry)
            parameters = {
                **dataclasses.asdict(params),
                "source": str(source),
                "validation": train.validation,
                **({"run": self.run_id} if self.run_id else {}),
            }
            with registry.building(
                engine=train.engine,
                watermark=watermark or 0,
                parameters=parameters,
                mode=mode,
                device=backend.name,
            ) as version:
                began = time.perf_counter()
                result = self._train(spark, prepared, mode, params, backend)
                timings["train_s"] = time.perf_counter() - began
                metrics = self._metrics(result, prepared, version.name)
                held_out = metrics.get("validation_rmse")
                self.emit(
                    f"{version.name}: train RMSE {metrics['train_rmse']:.4f}, validation RMSE "
                    + (f"{held_out:.4f}" if held_out is not None else "n/a (nothing held out)")
                )
                registry.write_artifacts(version.number, result)
                if prepared.rejected:
                    rejects = layout.root / "rejects" / version.name
                    prepared.rejects.write.mode("overwrite").parquet(str(rejects))
                timings["total_s"] = time.perf_counter() - started
                ready = registry.mark_ready(version.number, metrics=metrics, timings=timings)
            if self.activate:
                ready = registry.activate(version.number)
            self.emit(f"{ready.name} is {ready.state} in {layout.registry}")
            return ready
        finally:
            if owns_session:
                spark.stop()

    def _source(self, layout: DataLayout) -> tuple[Path, int | None]:
        if self.source is not None:
            path = Path(self.source)
            return path, self.watermark if path.resolve() == layout.offline.resolve() else None
        if not layout.offline.is_dir():
            raise DataError(
                f"no offline store at {layout.offline} to train on; pass --input with a "
                "MovieLens or Parquet path, or export the log first"
            )
        store = OfflineStore(layout.offline)
        return layout.offline, store.watermark if self.watermark is None else self.watermark

    def _mode(self, count: int) -> str:
        train = self.config.train
        if train.engine == "mllib" or train.mode != "auto":
            return "mllib" if train.engine == "mllib" else train.mode
        return "single" if count <= train.single_node_max_ratings else "distributed"

    def _train(
        self, spark, prepared: Prepared, mode: str, params: ALSParams, backend
    ) -> TrainedModel:
        progress = self._progress(params.iterations)
        if mode == "distributed":
            return self._train_distributed(spark, prepared, params, progress)
        table = prepared.train.select("user", "item", "rating", "ts").toArrow()
        ratings = Ratings.from_table(table)
        check_rank(params.rank, *ratings.shape)
        if mode == "mllib":
            indexed = spark.createDataFrame(
                pa.table({"uidx": ratings.users, "iidx": ratings.items, "rating": ratings.values})
            )
            return train_mllib(spark, indexed, ratings, params, backend)
        return train_als(ratings, params, backend=backend, init=self.init, progress=progress)

    def _train_distributed(self, spark, prepared: Prepared, params: ALSParams, progress):
        from pyspark.sql import functions as F

        frame = prepared.train
        user_ids = _ids(frame, "user")
        item_ids = _ids(frame, "item")
        check_rank(params.rank, user_ids.size, item_ids.size)
        for column, ids in (("user", user_ids), ("item", item_ids)):
            index = spark.createDataFrame(
                pa.table({column: ids, column[0] + "idx": np.arange(ids.size)})
            )
            frame = frame.join(F.broadcast(index), column)
        frame = frame.select("uidx", "iidx", "rating", F.unix_micros("ts").alias("ts"))
        executor = SparkExecutor(
            spark,
            frame,
            user_ids,
            item_ids,
            blocks=self.config.train.blocks or spark.sparkContext.defaultParallelism,
            device=self.config.compute.device,
        )
        try:
            return train_als(executor, params, init=self.init, progress=progress)
        finally:
            executor.close()

    def _progress(self, iterations: int):
        def report(iteration: int, rmse: float, loss: float, seconds: float) -> None:
            self.emit(
                f"iteration {iteration}/{iterations}: train RMSE {rmse:.4f}, "
                f"loss {loss:,.1f} ({seconds:.2f}s)"
            )

        return report

    def _metrics(self, trained: TrainedModel, prepared: Prepared, version: str) -> dict[str, float]:
        """Counts, and the validation RMSE of the model as it will serve (:mod:`velox.trained`)."""
        held = prepared.validation.select("user", "item", "rating").toArrow()
        metrics = {
            "train_rmse": trained.train_rmse,
            "ratings": float(trained.train_count),
            "users": float(trained.user_ids.size),
            "items": float(trained.item_ids.size),
            "rejected_rows": float(prepared.rejected),
            "duplicate_rows": float(prepared.duplicates),
            "validation_ratings": float(held.num_rows),
        }
        if held.num_rows:
            model = trained.online_model(version=version, config=self.config.model)
            predicted = model.predict_pairs(
                held.column("user").to_pylist(), held.column("item").to_pylist()
            )
            metrics["validation_rmse"] = rmse(predicted, held.column("rating").to_numpy())
        return metrics


def _ids(frame, column: str) -> np.ndarray:
    """The distinct ids of a column, sorted (the dense index order of every mode)."""
    table = frame.select(column).distinct().toArrow()
    return np.unique(table.column(column).to_numpy(zero_copy_only=False).astype(str))


def submit_argv(args: list[str]) -> list[str]:
    """``velox`` arguments for ``spark-submit batch_jobs/train.py ARGS``.

    The global options (``--config``, ``--set``, ``-v``) may come anywhere in
    ``ARGS``; they are moved in front of the ``train`` command.

    >>> submit_argv(["--input", "x", "--set", "data.dir=d", "-v"])
    ['--set', 'data.dir=d', '-v', 'train', '--input', 'x']
    """
    front, rest, pending = [], [], iter(args)
    for arg in pending:
        if arg in ("--config", "--set"):
            front += [arg, next(pending, "")]
        elif arg in ("-v", "--verbose") or arg.startswith(("--config=", "--set=")):
            front.append(arg)
        else:
            rest.append(arg)
    return [*front, "train", *rest]


if __name__ == "__main__":  # spark-submit batch_jobs/train.py [velox train options]
    from velox.cli import main

    sys.exit(main(submit_argv(sys.argv[1:])))
