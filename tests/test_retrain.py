"""The retrain loop in a real server on 127.0.0.1: job (Beam export, Spark train), gate, swap.

Every run here is real: ``velox export`` and ``velox train`` children on
``local[2]``, a RocksDB store, the aiohttp server. Waiting is on the
retrainer's ``finished`` event, bounded; never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import json

import msgspec
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from feature_store.codec import decode_log
from feature_store.layout import DataLayout
from feature_store.offline import OfflineStore
from feature_store.registry import ModelRegistry
from serving.app import STATE, create_app
from serving.retrain_job import run_folder
from velox.als import ALSParams, Ratings, train_als
from velox.client import AsyncClient
from velox.config import load_config
from velox.datasets import SyntheticSpec, synthesize

_RUN_S = 300  # the longest a run may take on a loaded 2-core machine


def _table():
    return synthesize(SyntheticSpec(users=50, items=30, ratings=2000, seed=2))


def _publish(root, *, shuffled_second: bool = False):
    """v1 trained on a synthetic set and active; with ``shuffled_second``, a v2 (watermark 0)
    trained on the same ratings shuffled across rows: a worse model."""
    table = _table()
    registry = ModelRegistry(DataLayout(root).registry)
    tables = [table]
    if shuffled_second:
        order = np.random.default_rng(0).permutation(table.num_rows)
        tables.append(table.set_column(2, "rating", table.column("rating").take(order)))
    for data in tables:
        result = train_als(Ratings.from_table(data), ALSParams(rank=3, iterations=3, seed=0))
        with registry.building(engine="velox", watermark=0) as version:
            registry.write_artifacts(version.number, result)
    registry.activate(1)
    return registry


def _config(root, *settings):
    return load_config(
        None,
        env={},
        overrides=[
            f"data.dir={root}",
            "store.checkpoint_interval=0",
            "serve.follow_interval=0",
            "train.master=local[2]",
            "train.iterations=3",
            "retrain.check_interval=0.05",
            *settings,
        ],
    )


def _pairs(n: int, seed: int) -> list[dict]:
    """``n`` observations of distinct (user, item) pairs with the synthetic set's ratings."""
    table = _table().to_pylist()
    rows = np.random.default_rng(seed).permutation(len(table))
    seen, out = set(), []
    for r in rows:
        row = table[r]
        if (row["user"], row["item"]) not in seen:
            seen.add((row["user"], row["item"]))
            out.append({"user": row["user"], "item": row["item"], "rating": row["rating"]})
        if len(out) == n:
            break
    assert len(out) == n, f"the synthetic set has only {len(out)} distinct pairs"
    return [{**o, "ts": 1_700_000_000.0 + i} for i, o in enumerate(out)]


async def _observe(client, observations, size=50):
    for start in range(0, len(observations), size):
        response = await client.post("/observe", json=observations[start : start + size])
        assert response.status == 200, await response.text()


async def _finished(state):
    await asyncio.wait_for(state.retrainer.finished.wait(), _RUN_S)
    return state.retrainer.last_run


def _metric(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


async def test_a_retrain_under_load_swaps_in_exact_weights_with_no_failed_or_degraded_answer(
    tmp_path, aiohttp_client
):
    registry = _publish(tmp_path)
    # No read deadline: on a loaded machine a read may miss one whatever the swap does; a
    # degraded answer here can only come from the swap (benchmarks/retrain_load.py measures
    # the deadline's share).
    config = _config(tmp_path, "serve.deadline_ms=0")
    client = await aiohttp_client(create_app(config))
    state = client.server.app[STATE]
    stream = _pairs(690, seed=1)
    await _observe(client, stream[:390])
    response = await client.post("/retrain", json={"reason": "a test"})
    assert response.status == 202
    started = await response.json()
    assert started["status"] == "started" and "a test" in started["reason"]
    again = await client.post("/retrain", json={})
    assert again.status == 200 and (await again.json())["status"] == "running"

    answers: list[tuple[int, bool]] = []  # (status, degraded) of every read

    async def load(part: list[dict]) -> None:  # observes, predicts and top-K while it runs
        for i, observation in enumerate(part):
            await _observe(client, [observation])
            for path, body in (
                ("/predict", {"user": observation["user"], "items": ["i1", "i2"]}),
                ("/topk", {"user": observation["user"], "k": 3}),
            ):
                reply = await client.post(path, json=body)
                answers.append((reply.status, (await reply.json()).get("degraded", True)))
            if i % 20 == 19:
                await asyncio.sleep(0.1)  # spread over the run, not all before it

    loaders = [asyncio.create_task(load(stream[390 + 100 * k : 490 + 100 * k])) for k in range(3)]
    run = await _finished(state)
    await asyncio.gather(*loaders)
    assert run.outcome == "succeeded", run.reason
    assert run.version == "v2" and "gate" in run.reason
    assert set(run.phases) >= {"export", "train", "candidate", "catch_up", "swap"}
    assert answers and all(status == 200 and not degraded for status, degraded in answers)

    models = await (await client.get("/models")).json()
    assert models["serving"] == "v2" and models["active"] == "v2"
    assert models["monitor"]["version"] == "v2"
    assert models["retrain"]["last_run"]["outcome"] == "succeeded"
    metrics = await (await client.get("/metrics")).text()
    assert _metric(metrics, "velox_retrain_runs_total", outcome="succeeded") == 1
    assert _metric(metrics, "velox_swap_pause_seconds_count") == 1

    # Exactness: v2 is ALS on every logged rating up to W, then online updates of the rest.
    version = registry.get(2)
    durable = state.durable
    store = durable.store
    w = version.watermark
    assert 390 <= w < store.last_seq == 690
    offline = OfflineStore(DataLayout.from_config(config).offline).read(upto=w)
    assert offline.num_rows == w
    direct = train_als(Ratings.from_table(offline), ALSParams.from_config(config.train))
    artifact = registry.load(2)
    np.testing.assert_array_equal(artifact.user_ids, direct.user_ids)
    np.testing.assert_allclose(artifact.user_gram, direct.user_gram, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(artifact.item_factors, direct.item_factors, rtol=1e-7, atol=1e-9)
    model = artifact.online_model(version="v2", config=config.model)
    for part in decode_log([record for _, record in store.records_after(w)]):
        model.observe_many(part.users, part.items, part.ratings, part.timestamps)
    users = sorted({o["user"] for o in stream})
    A, b, count, *_ = durable.statistics(users)
    rows = model.users.find(users)
    np.testing.assert_allclose(A, model.users.A[rows], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b, model.users.b[rows], rtol=1e-9, atol=1e-12)
    # Every acknowledged observation is in exactly one user state (the pairs are distinct).
    assert int(count.sum()) == store.last_seq


async def test_a_job_past_its_timeout_leaves_the_active_version_serving_and_is_reported(
    tmp_path, aiohttp_client
):
    _publish(tmp_path)
    client = await aiohttp_client(create_app(_config(tmp_path, "retrain.timeout=1")))
    state = client.server.app[STATE]
    await _observe(client, _pairs(100, seed=2))
    async with AsyncClient(str(client.make_url(""))) as velox:  # the Python client's call
        started = await velox.retrain("a test")
    run = await _finished(state)
    assert run.id == started
    assert run.outcome == "timed_out" and run.version is None and "1" in run.reason
    await _observe(client, _pairs(5, seed=3))  # serving and learning go on, on v1
    models = await (await client.get("/models")).json()
    assert models["serving"] == "v1" and models["retrain"]["last_run"]["outcome"] == "timed_out"
    assert models["retrain"]["next_retry"] > models["retrain"]["last_run"]["finished"]
    ready = await client.get("/readyz")
    assert ready.status == 200 and "timed_out" in (await ready.json())["details"]
    metrics = await (await client.get("/metrics")).text()
    assert _metric(metrics, "velox_retrain_runs_total", outcome="timed_out") == 1


def _interrupted_run(config, version: str) -> None:
    """A run record as a server killed while it built ``version``'s candidate leaves it."""
    folder = run_folder(config)
    folder.mkdir(parents=True)
    record = {
        "id": "20261203T000000-000",
        "trigger": "manual",
        "reason": "asked for: a test",
        "force": False,
        "started": 1.0,
        "phase": "catch_up",
        "outcome": None,
        "finished": None,
        "version": version,
        "phases": {"export": 1.0, "train": 2.0},
        "gate": None,
        "log": None,
    }
    (folder / f"{record['id']}.json").write_text(json.dumps(record))


async def test_a_run_interrupted_while_building_its_candidate_resumes_at_the_next_start(
    tmp_path, aiohttp_client
):
    registry = _publish(tmp_path)
    table = _table()
    with registry.building(engine="velox", watermark=0) as version:  # v2, a second seed
        registry.write_artifacts(
            version.number,
            train_als(Ratings.from_table(table), ALSParams(rank=3, iterations=3, seed=1)),
        )
    config = _config(tmp_path, "retrain.gate_tolerance=0.5")
    _interrupted_run(config, "v2")
    client = await aiohttp_client(create_app(config))
    state = client.server.app[STATE]
    run = await _finished(state)
    assert run.outcome == "succeeded" and run.version == "v2"
    assert state.durable.model.version == "v2" and registry.active().name == "v2"
    stored = json.loads((run_folder(config) / f"{run.id}.json").read_text())
    assert stored["outcome"] == "succeeded" and stored["phases"]["train"] == 2.0


async def test_the_gate_rejects_a_candidate_trained_on_shuffled_ratings(tmp_path, aiohttp_client):
    registry = _publish(tmp_path, shuffled_second=True)
    config = _config(tmp_path, "retrain.gate_min_observations=200", "retrain.gate_tolerance=0.01")
    client = await aiohttp_client(create_app(config))
    state = client.server.app[STATE]
    await _observe(client, _pairs(400, seed=4))
    _interrupted_run(config, "v2")
    state.retrainer.resume()
    run = await _finished(state)
    assert run.outcome == "rejected", run.reason
    assert "rejected by the gate" in run.reason and run.gate.observations == 400
    assert run.gate.candidate_rmse > run.gate.active_rmse * 1.01
    assert state.durable.model.version == "v1" and registry.get(2).state == "ready"
    models = await (await client.get("/models")).json()
    assert models["retrain"]["last_run"]["gate"]["observations"] == 400
    await _observe(client, _pairs(10, seed=5))  # v1 still learns


async def test_enough_observations_trigger_a_retrain_by_themselves(tmp_path, aiohttp_client):
    _publish(tmp_path)
    config = _config(tmp_path, "retrain.enabled=true", "retrain.max_observations=300")
    client = await aiohttp_client(create_app(config))
    state = client.server.app[STATE]
    decision = state.retrainer.check()
    assert not decision.run and decision.trigger == "none" and "300" in decision.reason
    await _observe(client, _pairs(350, seed=6))
    run = await _finished(state)
    assert run.outcome == "succeeded" and state.durable.model.version == "v2"
    metrics = await (await client.get("/metrics")).text()
    decided = _metric(metrics, "velox_retrain_decisions_total", trigger="observations", run="true")
    assert decided == 1
    stored = msgspec.json.decode((run_folder(config) / f"{run.id}.json").read_bytes())
    assert stored["trigger"] == "observations"


@pytest.fixture(autouse=True)
def _no_token_environment(monkeypatch):
    for name in ("VELOX_SERVE__READ_TOKEN", "VELOX_SERVE__WRITE_TOKEN", "VELOX_SERVE__ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
