"""velox evaluate: protocols, the replay, metrics, the results folder and the notebook."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.factories import small_model
from tests.test_cli import velox
from velox.als import ALSParams
from velox.config import ModelConfig
from velox.datasets import SyntheticSpec, load_movielens, synthesize
from velox.evaluation import replay, results
from velox.evaluation.harness import Spec, evaluate, per_user_protocol
from velox.evaluation.metrics import cold_start_curve, ndcg_at, precision_at
from velox.evaluation.protocols import per_user, random_split, seen_before, temporal

ROOT = Path(__file__).resolve().parent.parent
SMALL = SyntheticSpec(users=200, items=120, ratings=8000, drift=0.8, seed=5)


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return synthesize(SMALL)


@pytest.fixture(scope="module")
def evaluation(table):
    spec = Spec(policies=("baseline", "stale", "online", "retrain"), windows=4)
    return evaluate(table, ALSParams(rank=3, iterations=4), ModelConfig(), spec)


def test_the_temporal_split_streams_the_future_in_time_order(table):
    train, stream = temporal(table, 0.25)
    assert (train.num_rows, stream.num_rows) == (2000, 6000)
    past = train.column("ts").cast(pa.int64()).to_numpy()
    future = stream.column("ts").cast(pa.int64()).to_numpy()
    assert past.max() <= future.min() and np.all(np.diff(future) >= 0)
    shuffled, rest = random_split(table, 0.25, seed=1)
    assert (shuffled.num_rows, rest.num_rows) == (2000, 6000)


def test_the_per_user_protocol_cuts_each_users_history_in_time_order(table):
    split = per_user(table, offline=3, online=2)
    counts = {}
    for user in table.column("user").to_pylist():
        counts[user] = counts.get(user, 0) + 1
    for part, expected in (
        (split.train, {u: min(n, 3) for u, n in counts.items()}),
        (split.stream, {u: min(max(n - 3, 0), 2) for u, n in counts.items() if n > 3}),
        (split.held_out, {u: n - 5 for u, n in counts.items() if n > 5}),
    ):
        got = {}
        for user in part.column("user").to_pylist():
            got[user] = got.get(user, 0) + 1
        assert got == expected
    assert seen_before(np.array(["a", "b", "a", "a"])).tolist() == [0, 0, 1, 2]


def test_the_replay_predicts_before_it_learns():
    """Each prediction equals the model's prediction with only the earlier observations learned."""
    users = ["u", "v", "u", "u", "w"]
    items = ["i1", "i2", "i1", "i3", "i2"]
    stream = pa.table(
        {
            "user": users,
            "item": items,
            "rating": [5.0, 1.0, 4.0, 2.0, 3.0],
            "ts": pa.array(np.arange(5) * 1_000_000, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        }
    )
    trace = replay(small_model(), stream, batch_size=2)
    one_by_one = small_model()
    for j in range(5):
        expected = one_by_one.predict(users[j], [items[j]]).scores[0]
        assert trace.predictions[j] == pytest.approx(expected, rel=1e-12)
        one_by_one.observe_many([users[j]], [items[j]], [stream.column("rating")[j].as_py()])


def test_metrics_by_hand():
    errors = np.array([1.0, -0.5, 3.0, 0.5, 2.0])
    seen = np.array([0, 1, 0, 1, 4])
    curve = cold_start_curve(seen, errors, upto=4)
    np.testing.assert_allclose(curve[:2], [np.sqrt(5.0), 0.5])
    assert np.isnan(curve[2]) and curve[4] == 2.0
    assert precision_at(["a", "b", "c", "d"], {"b", "d", "z"}, k=4) == 0.5
    assert ndcg_at(["x", "y"], {"x", "y"}, k=2) == 1.0
    assert ndcg_at(["x", "y"], set(), k=2) == 0.0


def test_the_results_folder_recomputes_the_summary(evaluation, tmp_path):
    folder = results.write(evaluation, tmp_path / "out")
    summary = json.loads((folder / "summary.json").read_text())
    rows = pq.read_table(folder / "observations.parquet")
    assert rows.num_rows == 4 * 4000
    for policy, figures in summary["policies"].items():
        mine = rows.filter(pa.compute.equal(rows.column("policy"), policy))
        error = mine.column("prediction").to_numpy() - mine.column("rating").to_numpy()
        assert figures["rmse"] == pytest.approx(np.sqrt(np.mean(error**2)), rel=1e-12)
        new = mine.column("new_user").to_numpy(zero_copy_only=False)
        assert figures["rmse_new_users"] == pytest.approx(
            np.sqrt(np.mean(error[new] ** 2)), rel=1e-12
        )
        predictions = mine.column("prediction").to_numpy()
        assert predictions.min() >= 1.0 and predictions.max() <= 5.0  # clipped to the scale
    for name in results.PLOTS:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every 10% (400 observations) counted in whole batches of 64: after 448, 896, ... 4,000
    assert summary["policies"]["retrain"]["retrains"] == 9


def test_online_learning_beats_the_stale_model_and_the_baseline(evaluation):
    figures = {r.policy: r.figures for r in evaluation.results}
    assert figures["online"]["rmse"] < figures["stale"]["rmse"] - 0.02
    assert figures["online"]["rmse"] < figures["baseline"]["rmse"]
    assert figures["online"]["user_improvement"]["share_improved"] > 0.5
    assert figures["stale"]["user_improvement"]["p50"] == 0.0
    curve = figures["online"]["cold_start_rmse"]
    assert curve[10] < curve[0]  # a new user's error falls as they are observed


def test_velox_evaluate_runs_from_the_command_line(tmp_path):
    data = tmp_path / "ratings.parquet"
    pq.write_table(synthesize(SMALL), data)
    done = velox(
        "--set",
        "train.rank=3",
        "--set",
        "train.iterations=3",
        "evaluate",
        "--data",
        str(data),
        "--policies",
        "stale,online",
        "--out",
        str(tmp_path / "out"),
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    assert "| online |" in done.stdout and (tmp_path / "out" / "summary.json").is_file()
    bad = velox("evaluate", "--data", str(tmp_path / "absent"))
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    unknown = velox("evaluate", "--data", str(data), "--policies", "nope")
    assert unknown.returncode == 2 and "unknown policy 'nope'" in unknown.stderr


def test_the_notebook_runs_headless_on_a_results_folder(evaluation, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    folder = results.write(evaluation, tmp_path / "out")
    notebook = nbformat.read(ROOT / "notebooks" / "personalization_quality.ipynb", as_version=4)
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    parameters.source = f"results = {str(folder)!r}"
    NotebookClient(notebook, timeout=120, kernel_name="python3").execute(cwd=str(tmp_path))
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2
    text = " ".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "online" in text and "retrain" in text


def test_the_per_user_protocol_on_movielens(ml100k):
    figures = per_user_protocol(
        load_movielens(ml100k), ALSParams(rank=10, iterations=10), ModelConfig()
    )
    assert figures["held_out"] > 50_000
    assert figures["retrained_rmse"] < figures["offline_rmse"]
    assert figures["online_rmse"] < figures["offline_rmse"]
    # Not bounded by 1: the online model's bias walk follows a user's recent level, which a
    # retrain on the same ratings weighs like the oldest, so online may beat the retrain.
    assert figures["recovered"] > 0.3


def test_a_running_server_scores_the_stream_as_the_in_process_online_policy(tmp_path):
    """velox evaluate --server: the serving path (HTTP, micro-batches, durable store) gives the
    same prequential predictions as the in-process model, version trained alike."""
    from feature_store.layout import DataLayout
    from feature_store.registry import ModelRegistry
    from tests.test_serve_process import Server
    from velox.als import Ratings, train_als

    settings = ("train.rank=3", "train.iterations=3", f"data.dir={tmp_path / 'data'}")
    table = synthesize(SMALL)
    data = tmp_path / "ratings.parquet"
    pq.write_table(table, data)
    train, _ = temporal(table, 0.5)
    registry = ModelRegistry(DataLayout(tmp_path / "data").registry)
    with registry.building(engine="velox", watermark=0) as version:
        registry.write_artifacts(
            version.number,
            train_als(Ratings.from_table(train), ALSParams(rank=3, iterations=3)),
        )
    registry.activate(version.number)
    server = Server(tmp_path / "data", "serve.deadline_ms=0")
    try:
        flags = [arg for setting in settings for arg in ("--set", setting)]
        done = velox(
            *flags,
            "evaluate",
            "--data",
            str(data),
            "--policies",
            "online",
            "--server",
            server.url,
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        )
    finally:
        assert server.stop() == 0
    assert done.returncode == 0, done.stderr
    rows = pq.read_table(tmp_path / "out" / "observations.parquet").to_pandas()
    online = rows[rows.policy == "online"].prediction.to_numpy()
    served = rows[rows.policy == "server"].prediction.to_numpy()
    assert online.size == served.size == 4000
    np.testing.assert_allclose(served, online, rtol=1e-9, atol=1e-9)


def test_tune_picks_the_best_grid_point_on_the_training_part_alone(table):
    from velox.evaluation.tune import Grid, score_grid, tune

    grid = Grid(
        ranks=(2, 4),
        regularization=((0.0, 5.0), (0.5, 1.0)),
        bias_count_weights=(1.0,),
        forgetting=(1.0, 0.98),
        bias_drift=(0.0, 0.01),
        train_forgetting=(1.0,),
    )
    train, stream = temporal(table, 0.5)
    params, model = ALSParams(iterations=3), ModelConfig()
    ranked = tune(train, params, model, grid)
    assert len(ranked) == 2 * 2 * 3 * 2 * 2
    assert [c.rmse for c in ranked] == sorted(c.rmse for c in ranked)
    past, recent = temporal(train, 0.8)
    again = score_grid(past, recent, params, model, grid)
    assert ranked[0].settings() == again[0].settings() and ranked[0].rmse == again[0].rmse
    # Scoring one point by hand gives the same figure: train on the past, stream the recent.
    best = ranked[0]
    from velox.als import Ratings, train_als

    online = train_als(Ratings.from_table(past), best.params).online_model(
        version="v", config=best.model
    )
    trace = replay(online, recent)
    truth = recent.column("rating").to_numpy()
    scale = (min(past.column("rating").to_numpy().min(), truth.min()), truth.max())
    assert best.rmse == pytest.approx(
        np.sqrt(np.mean((np.clip(trace.predictions, *scale) - truth) ** 2)), rel=1e-12
    )
    on_stream = score_grid(train, stream, params, model, grid)
    assert {c.rmse for c in on_stream} != {c.rmse for c in ranked}  # another split, other scores


def test_velox_evaluate_tune_records_its_choice_and_the_check(tmp_path):
    data = tmp_path / "ratings.parquet"
    pq.write_table(synthesize(SMALL), data)
    done = velox(
        "--set",
        "train.iterations=2",
        "evaluate",
        "--data",
        str(data),
        "--policies",
        "online",
        "--tune",
        "--tune-check",
        "--tune-ranks",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    tuned = json.loads((tmp_path / "out" / "summary.json").read_text())["tuned"]
    assert "--set train.rank=" in done.stdout
    assert tuned["check"]["gap"] >= 0
    assert tuned["check"]["chosen_on_stream"] >= tuned["check"]["best_on_stream"]
    params = json.loads((tmp_path / "out" / "summary.json").read_text())["params"]
    assert params["rank"] == tuned["settings"]["train.rank"]


def test_a_durable_store_scores_the_stream_as_the_in_process_online_policy(tmp_path):
    """velox evaluate --store: the storage path (apply, log, sync, page in) predicts alike."""
    data = tmp_path / "ratings.parquet"
    pq.write_table(synthesize(SMALL), data)
    common = ["--set", "train.rank=3", "--set", "train.iterations=3", "evaluate", "--data"]
    done = velox(
        *common,
        str(data),
        "--policies",
        "online",
        "--store",
        str(tmp_path / "store"),
        "--out",
        str(tmp_path / "out"),
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    rows = pq.read_table(tmp_path / "out" / "observations.parquet").to_pandas()
    online = rows[rows.policy == "online"].prediction.to_numpy()
    stored = rows[rows.policy == "store"].prediction.to_numpy()
    assert online.size == stored.size == 4000
    np.testing.assert_allclose(stored, online, rtol=1e-12, atol=1e-12)
    assert (tmp_path / "store" / "CURRENT").is_file()  # a real RocksDB store
    again = velox(*common, str(data), "--store", str(tmp_path / "store"), "--quiet")
    assert again.returncode == 2 and "is not empty" in again.stderr
