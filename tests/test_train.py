"""The Spark training job: exact against a dense reference, its input rules, clear failures."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_jobs.inputs import prepare, read_source
from batch_jobs.train import TrainJob
from feature_store.layout import DataLayout
from feature_store.offline import OFFLINE_SCHEMA, OfflineStore
from feature_store.registry import ModelRegistry
from tests.test_cli import velox
from velox.backend import HAS_CUPY
from velox.config import load_config
from velox.datasets import OBSERVATION_SCHEMA


def _problem(n_users=40, n_items=30, n=400, seed=0):
    """Random ratings of distinct (user, item) pairs; ids sort like their indices."""
    rng = np.random.default_rng(seed)
    pairs = rng.choice(n_users * n_items, size=n, replace=False)
    users, items = pairs // n_items, pairs % n_items
    ratings = np.round(rng.uniform(1, 5, n) * 2) / 2
    return users, items, ratings


def _table(users, items, ratings, ts=None) -> pa.Table:
    ts = np.arange(len(users)) if ts is None else ts
    return pa.table(
        [
            pa.array([f"u{u:03d}" for u in users]),
            pa.array([f"i{i:03d}" for i in items]),
            pa.array(ratings, pa.float64()),
            pa.array(np.asarray(ts) * 1_000_000, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        ],
        schema=OBSERVATION_SCHEMA,
    )


def _config(tmp_path, *settings: str):
    return load_config(None, overrides=[f"data.dir={tmp_path / 'data'}", *settings])


def _reference_als(users, items, y, c, rank, lam_u, lam_i, iterations, init):
    """Dense biased ALS, one np.linalg.solve per row: what every mode must reproduce.

    The age weights ``c`` weigh the user half-steps (and the mean); items count every rating once.
    """
    n_users, n_items = users.max() + 1, items.max() + 1
    mu, V, bias = np.sum(c * y) / np.sum(c), init.copy(), np.zeros(n_items)
    n_u, n_i = np.bincount(users, c), np.bincount(items)
    for iteration in range(iterations + 1):
        F = np.hstack([V, np.ones((n_items, 1))])
        W = np.empty((n_users, rank + 1))
        for u in range(n_users):
            mine = users == u
            Fu, cu = F[items[mine]], c[mine]
            A = (Fu * cu[:, None]).T @ Fu + lam_u * np.sqrt(max(n_u[u], 1)) * np.eye(rank + 1)
            W[u] = np.linalg.solve(A, Fu.T @ (cu * (y[mine] - mu - bias[items[mine]])))
        if iteration == iterations:
            return W, V, bias
        G = np.hstack([W[:, :rank], np.ones((n_users, 1))])
        for i in range(n_items):
            mine = items == i
            Gi = G[users[mine]]
            A = Gi.T @ Gi + lam_i * np.sqrt(max(n_i[i], 1)) * np.eye(rank + 1)
            solution = np.linalg.solve(A, Gi.T @ (y[mine] - mu - W[users[mine], rank]))
            V[i], bias[i] = solution[:rank], solution[rank]


def _later_ratings(users, ts, items):
    """How many ratings of the same user come after each one (by time, then item)."""
    return np.array(
        [
            np.sum((users == u) & ((ts > t) | ((ts == t) & (items > i))))
            for u, t, i in zip(users, ts, items, strict=True)
        ]
    )


def _relative(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize(
    ("mode", "forgetting"),
    [("single", 1.0), ("distributed", 1.0), ("single", 0.9), ("distributed", 0.9)],
)
def test_both_modes_equal_a_dense_reference_als_from_the_same_start(
    spark, tmp_path, mode, forgetting
):
    users, items, ratings = _problem()
    ts = np.random.default_rng(7).integers(0, 50, users.size)  # ties in time, broken by item
    path = tmp_path / "ratings.parquet"
    pq.write_table(_table(users, items, ratings, ts=ts), path)
    init = np.random.default_rng(5).normal(0, 0.1, (30, 3))
    config = _config(
        tmp_path,
        "train.validation=0",
        f"train.mode={mode}",
        "train.rank=3",
        "train.iterations=6",
        "train.blocks=3",
        f"train.forgetting={forgetting}",
        "train.user_regularization=1.5",  # per-row lambda * sqrt(n), as the reference
        "train.item_regularization=1.0",
        "train.regularization_exponent=0.5",
    )
    version = TrainJob(config, source=path, spark=spark, init=init, emit=lambda _: None).run()
    assert (version.state, version.mode, version.engine) == ("ready", mode, "velox")
    got = ModelRegistry(DataLayout.from_config(config).registry).load(version.number)
    weights = forgetting ** _later_ratings(users, ts, items)
    W, V, bias = _reference_als(users, items, ratings, weights, 3, 1.5, 1.0, 6, init)
    assert _relative(got.item_factors, V) < 1e-6
    assert _relative(got.item_bias, bias) < 1e-6
    assert _relative(got.user_weights, W) < 1e-6
    # The stored statistics are those of the final items: A w = b for every user.
    solved = np.linalg.solve(got.user_gram, got.user_rhs[:, :, None])[:, :, 0]
    assert _relative(solved, got.user_weights) < 1e-9
    np.testing.assert_array_equal(got.user_count, np.bincount(users))


def test_training_twice_on_different_thread_counts_gives_bit_identical_artifacts(spark, tmp_path):
    """Same input (in another row order), settings and seed: the same model, bit for bit."""
    import dataclasses

    import numba

    users, items, ratings = _problem(n=600)
    ts = np.random.default_rng(3).integers(0, 100, users.size)
    table = _table(users, items, ratings, ts=ts)
    shuffled = table.take(np.random.default_rng(9).permutation(table.num_rows))
    config = _config(tmp_path, "train.mode=single", "train.rank=3", "train.iterations=4")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, forgetting=0.95))
    threads = numba.get_num_threads()
    versions = []
    try:
        for count, data in ((1, table), (max(2, threads), shuffled)):
            numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
            path = tmp_path / f"ratings-{count}.parquet"
            pq.write_table(data, path)
            job = TrainJob(config, source=path, spark=spark, emit=lambda _: None)
            versions.append(job.run().number)
    finally:
        numba.set_num_threads(threads)
    registry = ModelRegistry(DataLayout.from_config(config).registry)
    first, second = (registry.load(number) for number in versions)
    for name in first.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name), err_msg=name)
    assert registry.get(versions[0]).metrics == registry.get(versions[1]).metrics
    assert np.array_equal(first.user_gram, np.swapaxes(first.user_gram, 1, 2))


def test_the_recorded_validation_rmse_is_that_of_the_served_model(spark, tmp_path):
    """velox train's validation RMSE equals OnlineModel.predict_pairs' on the same pairs."""
    users, items, ratings = _problem(n=600)
    path = tmp_path / "ratings.parquet"
    pq.write_table(_table(users, items, ratings), path)
    config = _config(tmp_path, "train.validation=0.2", "train.rank=3", "train.iterations=3")
    version = TrainJob(config, source=path, spark=spark, emit=lambda _: None).run()
    held = prepare(read_source(spark, path), rating_min=0, rating_max=5, validation=0.2, seed=0)
    held = held.validation.toArrow()
    assert held.num_rows == version.metrics["validation_ratings"] > 0
    served = ModelRegistry(tmp_path / "data" / "registry").load(version.number)
    model = served.online_model(version=version.name, config=config.model)
    predicted = model.predict_pairs(
        held.column("user").to_pylist(), held.column("item").to_pylist()
    )
    error = predicted - held.column("rating").to_numpy()
    assert version.metrics["validation_rmse"] == float(np.sqrt(np.mean(error**2)))


def test_rejects_are_counted_and_written_and_the_latest_duplicate_wins(spark, tmp_path):
    users, items, ratings = _problem(n=300)
    table = _table(users, items, ratings)
    bad = pa.table(
        {
            "user": ["", "u001", "u002", "u003", "u004"],
            "item": ["i001", None, "i002", "i003", "i004"],
            "rating": [3.0, 3.0, float("nan"), 9.0, 2.0],
            "ts": pa.array([1, 1, 1, 1, None], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        }
    )
    again = _table(users[:10], items[:10], np.full(10, 5.0), ts=np.full(10, 10_000))
    path = tmp_path / "input"
    path.mkdir()
    for n, part in enumerate((table, bad, again)):
        pq.write_table(part, path / f"part{n}.parquet")
    config = _config(tmp_path, "train.validation=0", "train.rank=3", "train.iterations=2")
    version = TrainJob(config, source=path, spark=spark, emit=lambda _: None).run()
    assert version.metrics["rejected_rows"] == 5 and version.metrics["duplicate_rows"] == 10
    assert version.metrics["ratings"] == 300
    rejects = pq.read_table(tmp_path / "data" / "rejects" / version.name)
    assert sorted(rejects.column("reason").to_pylist()) == [
        "missing item",
        "missing timestamp",
        "missing user",
        "rating is not a number",
        "rating outside [0, 5]",
    ]
    prepared = prepare(read_source(spark, path), rating_min=0, rating_max=5, validation=0.0, seed=0)
    kept = prepared.train.toArrow().to_pylist()
    assert len(kept) == 300
    rated = {(r["user"], r["item"]): r["rating"] for r in kept}
    for u, i in zip(users[:10], items[:10], strict=True):  # the later 5.0 replaced each
        assert rated[f"u{u:03d}", f"i{i:03d}"] == 5.0


def test_the_offline_store_is_read_up_to_its_watermark(spark, tmp_path):
    users, items, ratings = _problem(n=300)
    rows = _table(users, items, ratings).append_column(
        OFFLINE_SCHEMA.field("seq"), pa.array(np.arange(1, 301), pa.int64())
    )
    config = _config(tmp_path, "train.validation=0", "train.rank=3", "train.iterations=2")
    OfflineStore(DataLayout.from_config(config).offline).append(rows)
    version = TrainJob(config, watermark=250, spark=spark, emit=lambda _: None).run()
    assert version.watermark == 250 and version.metrics["ratings"] == 250
    latest = TrainJob(config, spark=spark, activate=True, emit=lambda _: None).run()
    assert latest.watermark == 300 and latest.state == "active"


def test_the_mllib_engine_writes_the_same_kind_of_version(spark, tmp_path):
    users, items, ratings = _problem()
    path = tmp_path / "ratings.parquet"
    pq.write_table(_table(users, items, ratings), path)
    config = _config(tmp_path, "train.engine=mllib", "train.rank=3", "train.iterations=3")
    version = TrainJob(config, source=path, spark=spark, emit=lambda _: None).run()
    assert (version.engine, version.state) == ("mllib", "ready")
    assert version.metrics["validation_rmse"] < 2.0
    got = ModelRegistry(tmp_path / "data" / "registry").load(version.number)
    assert got.item_factors.shape == (30, 3) and not got.item_bias.any()
    solved = np.linalg.solve(got.user_gram, got.user_rhs[:, :, None])[:, :, 0]
    assert _relative(solved, got.user_weights) < 1e-9


def _train_cli(tmp_path, *args, env=None):
    return velox("--set", f"data.dir={tmp_path / 'data'}", "train", *args, env=env)


def _assert_one_sentence(done, message):
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("velox: error:") and message in last, done.stderr[-2000:]


def test_no_java_and_a_wrong_java_are_one_sentence_each(tmp_path):
    path = tmp_path / "ratings.parquet"
    pq.write_table(_table(*_problem()), path)
    env = {**os.environ, "JAVA_HOME": str(tmp_path / "nowhere")}
    _assert_one_sentence(_train_cli(tmp_path, "--input", str(path), env=env), "no Java found")
    fake = tmp_path / "jdk" / "bin" / "java"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho 'openjdk version \"11.0.2\" 2019-01-15' >&2\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env["JAVA_HOME"] = str(tmp_path / "jdk")
    done = _train_cli(tmp_path, "--input", str(path), env=env)
    _assert_one_sentence(done, "is Java 11, but Spark needs Java 17 or 21")
    assert not (tmp_path / "data" / "registry").exists()


def test_missing_and_empty_inputs_are_refused(tmp_path):
    _assert_one_sentence(
        _train_cli(tmp_path, "--input", str(tmp_path / "absent")), "does not exist"
    )
    _assert_one_sentence(_train_cli(tmp_path), "no offline store")


@pytest.mark.skipif(HAS_CUPY, reason="a GPU is present, so asking for one cannot fail")
def test_an_absent_gpu_is_refused(tmp_path):
    done = velox("--set", "compute.device=gpu", "--set", f"data.dir={tmp_path}", "train")
    _assert_one_sentence(done, "device = 'gpu' was asked for")


def test_all_rejected_input_and_too_large_a_rank_leave_nothing_ready(spark, tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(_table([1, 2], [1, 2], [9.0, -1.0]), path)
    config = _config(tmp_path, "train.rank=3")
    from velox.errors import DataError, InputError

    with pytest.raises(DataError, match=r"no valid ratings .* 2 rejected"):
        TrainJob(config, source=path, spark=spark, emit=lambda _: None).run()
    small = tmp_path / "small.parquet"
    pq.write_table(_table(*_problem(n_users=4, n_items=30, n=60)), small)
    big_rank = _config(tmp_path, "train.rank=8", "train.validation=0")
    with pytest.raises(InputError, match="rank 8 is larger than the data supports"):
        TrainJob(big_rank, source=small, spark=spark, emit=lambda _: None).run()
    registry = ModelRegistry(tmp_path / "data" / "registry")
    assert [v.state for v in registry.versions()] == ["failed"]
    assert registry.active() is None


def test_the_job_runs_unchanged_under_spark_submit(tmp_path):
    import shutil
    import subprocess
    import sys

    path = tmp_path / "ratings.parquet"
    pq.write_table(_table(*_problem()), path)
    submit = shutil.which("spark-submit") or str(Path(sys.executable).parent / "spark-submit")
    done = subprocess.run(
        [
            submit,
            "--master",
            "local[2]",
            "batch_jobs/train.py",
            "--input",
            str(path),
            "--set",
            f"data.dir={tmp_path / 'data'}",
            "--rank",
            "3",
            "--iterations",
            "2",
            "--half-life",
            "20",
            "--activate",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYSPARK_PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "iteration 2/2: train RMSE" in done.stdout
    active = ModelRegistry(tmp_path / "data" / "registry").active()
    assert active.name == "v1" and active.parameters["forgetting"] == pytest.approx(0.5**0.05)
