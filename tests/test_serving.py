"""The HTTP API against a real aiohttp server on 127.0.0.1: maths, validation, auth, metrics."""

from __future__ import annotations

import asyncio
import gc
import json
import threading

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from feature_store.layout import DataLayout
from feature_store.online import OnlineStore
from feature_store.registry import ModelRegistry
from serving.app import STATE, create_app
from tests.factories import RidgeReference
from velox.als import ALSParams, Ratings, train_als
from velox.config import load_config
from velox.datasets import SyntheticSpec, synthesize


def _publish(root, seeds=(0,), watermark=0):
    """Versions trained on a small synthetic set, the first active."""
    table = synthesize(SyntheticSpec(users=50, items=30, ratings=2000, seed=2))
    registry = ModelRegistry(DataLayout(root).registry)
    for seed in seeds:
        result = train_als(Ratings.from_table(table), ALSParams(rank=3, iterations=3, seed=seed))
        with registry.building(engine="velox", watermark=watermark) as version:
            registry.write_artifacts(version.number, result)
    registry.activate(1)
    return registry


def _config(root, *settings):
    return load_config(
        None,
        overrides=[
            f"data.dir={root}",
            "store.checkpoint_interval=0",
            "serve.deadline_ms=0",
            "serve.follow_interval=0",  # the tests move the pointer themselves
            *settings,
        ],
    )


@pytest.fixture
async def server(tmp_path, aiohttp_client):
    registry = _publish(tmp_path, seeds=(0, 1))
    config = _config(tmp_path)
    client = await aiohttp_client(create_app(config))  # the tests move it
    client.registry, client.config = registry, config
    return client


async def _post(client, path, body, **headers):
    response = await client.post(path, data=json.dumps(body), headers=headers)
    return response.status, await response.json()


async def test_predictions_equal_a_direct_ridge_solve(server):
    reference = RidgeReference.of(server.registry, 1, server.config)
    items = ["i1", "i2", "i29", "never-rated"]
    for user in ("u3", "stranger"):
        status, body = await _post(server, "/predict", {"user": user, "items": items})
        assert status == 200 and body["version"] == "v1" and not body["degraded"]
        got = [i["score"] for i in body["items"]]
        np.testing.assert_allclose(got, reference.predict(user, items), rtol=1e-10)
        assert [i["cold"] for i in body["items"]] == [False, False, False, True]


async def test_an_observe_changes_the_next_prediction_as_the_ridge_update_says(server):
    reference = RidgeReference.of(server.registry, 1, server.config)
    status, body = await _post(
        server,
        "/observe",
        [
            {"user": "u3", "item": "i1", "rating": 5.0, "ts": 100.0},
            {"user": "u3", "item": "brand-new", "rating": 1.0, "ts": 101.0},
        ],
    )
    assert status == 200 and body["accepted"] == 2 and body["seqs"] == [1, 2]
    want = [reference.observe("u3", "i1", 5.0), reference.observe("u3", "brand-new", 1.0)]
    np.testing.assert_allclose(body["predictions"], want, rtol=1e-10)
    assert body["cold"] == [False, True]
    _, after = await _post(server, "/predict", {"user": "u3", "items": ["i1", "i2", "i29"]})
    np.testing.assert_allclose(
        [i["score"] for i in after["items"]],
        reference.predict("u3", ["i1", "i2", "i29"]),
        rtol=1e-10,
    )
    user = await (await server.get("/users/u3")).json()
    np.testing.assert_allclose(user["weights"], reference.weights("u3"), rtol=1e-9)
    assert user["known"] and user["observations"] == reference.state("u3")[2]


def _ranking(reference: RidgeReference, user: str, items: list[str], k: int, alpha: float = 0.0):
    """The ``k`` best of ``items`` by score plus ``alpha`` times the score's standard deviation."""
    A, _, _ = reference.state(user)
    P = np.linalg.inv(A)
    scores = reference.predict(user, items) + alpha * np.array(
        [np.sqrt(reference.features(i) @ P @ reference.features(i)) for i in items]
    )
    top = np.argsort(-scores, kind="stable")[:k]
    return [items[i] for i in top], scores[top]


async def _top(server, **body):
    _, answer = await _post(server, "/topk", body)
    assert not answer["degraded"]
    return [i["item"] for i in answer["items"]], [i["score"] for i in answer["items"]]


async def test_topk_ranks_like_a_direct_solve_with_candidates_exclusion_and_exploration(server):
    await _post(server, "/observe", {"user": "u4", "item": "i7", "rating": 5.0, "ts": 1.0})
    reference = RidgeReference.of(server.registry, 1, server.config)
    reference.observe("u4", "i7", 5.0)
    catalogue = [f"i{j}" for j in range(30)]
    unrated = [i for i in catalogue if i != "i7"]
    for body, items, alpha in (
        ({"k": 5}, unrated, 0.0),  # rated items are excluded
        ({"k": 30, "include_rated": True}, catalogue, 0.0),
        ({"k": 2, "candidates": ["i1", "i2", "i3"]}, ["i1", "i2", "i3"], 0.0),
        ({"k": 5, "explore": "ucb", "alpha": 2.0}, unrated, 2.0),
    ):
        ranked, scores = await _top(server, user="u4", **body)
        want_items, want_scores = _ranking(reference, "u4", items, body["k"], alpha)
        assert ranked == want_items, body
        np.testing.assert_allclose(scores, want_scores, rtol=1e-10)
    sampled, _ = await _top(server, user="u4", k=5, explore="thompson", alpha=0.5)
    assert len(set(sampled)) == 5 and set(sampled) <= set(unrated)


BAD = [
    ("/predict", b"", 400, "invalid_json"),
    ("/predict", b"{", 400, "invalid_json"),
    ("/predict", b'{"user": "u", "items": []}', 422, "validation_error"),
    ("/predict", b'{"user": true, "items": ["i"]}', 422, "validation_error"),
    ("/predict", b'{"user": "u", "items": ["i"], "extra": 1}', 422, "validation_error"),
    ("/predict", b'{"user": "' + b"x" * 300 + b'", "items": ["i"]}', 422, "validation_error"),
    ("/topk", b'{"user": "u", "k": 0}', 422, "validation_error"),
    ("/topk", b'{"user": "u", "k": 100000}', 422, "validation_error"),
    ("/topk", b'{"user": "u", "k": 3, "explore": "greedy"}', 422, "validation_error"),
    ("/topk", b'{"user": "u", "k": 3, "alpha": -1}', 422, "validation_error"),
    ("/observe", b'{"user": "u", "item": "i", "rating": 9}', 422, "validation_error"),
    ("/observe", b'{"user": "u", "item": "i", "rating": 1e999}', 422, "validation_error"),
    ("/observe", b'{"user": "u", "item": "i"}', 422, "validation_error"),
    ("/observe", b"[]", 422, "validation_error"),
    (
        "/observe",
        b'[{"user": "u", "item": "i", "rating": 3}, {"user": "", "item": "i", "rating": 3}]',
        422,
        "validation_error",
    ),
    ("/observe", b'[{"user": "u", "item": "i", "rating": 3}, 5]', 422, "validation_error"),
    ("/observe", b"x" * 2_000_000, 413, "payload_too_large"),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), BAD)
async def test_bad_input_is_a_4xx_with_a_json_error_and_changes_nothing(
    server, path, body, status, code
):
    before = await (await server.get("/users/u")).json()
    response = await server.post(path, data=body)
    assert response.status == status
    error = await response.json()
    assert error["error"] == code and error["message"]
    assert await (await server.get("/users/u")).json() == before
    assert server.app[STATE].durable.store.last_seq == 0  # nothing reached the log


async def _metrics(client) -> dict[tuple, float]:
    """Every sample of ``/metrics`` by :func:`_sample` key, parsed by prometheus_client."""
    text = await (await client.get("/metrics")).text()
    return {
        _sample(sample.name, **sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _sample(name: str, **labels: str) -> tuple:
    return name, tuple(sorted(labels.items()))


async def test_the_running_server_keeps_its_long_lived_objects_out_of_the_collectors_walk(
    server,
):
    # Modules, kernels and model tables, frozen once the app is up: a full collection
    # does not walk them on the event loop (86-110 ms each when it did).
    assert gc.get_freeze_count() > 10_000


async def test_metrics_openapi_and_health(server):
    await _post(server, "/observe", {"user": "u1", "item": "i1", "rating": 4.0})
    await _post(server, "/predict", {"user": "u1", "items": ["i1"]})
    samples = await _metrics(server)
    assert samples[_sample("velox_requests_total", route="/observe", status="200")] == 1
    assert samples[_sample("velox_request_seconds_count", route="/predict", status="200")] == 1
    assert samples[_sample("velox_batch_observations_count")] == 1
    assert samples[_sample("velox_log_sync_seconds_count")] >= 1  # the group commit's fsync
    assert samples[_sample("velox_active_model", version="v1")] == 1
    assert samples[_sample("velox_prequential_observations_total", version="v1")] == 1
    rmse = samples[_sample("velox_prequential_rmse", version="v1")]
    sse = samples[_sample("velox_prequential_squared_error_total", version="v1")]
    assert rmse == pytest.approx(sse**0.5, rel=1e-12) and rmse > 0
    assert samples[_sample("velox_user_cache_total", result="hit")] > 0
    assert samples[_sample("velox_store_failures_total", kind="write_back")] == 0
    assert samples[_sample("velox_store_problem")] == 0
    assert samples[_sample("process_resident_memory_bytes")] > 0  # prometheus_client's own
    document = await (await server.get("/openapi.json")).json()
    assert {"/predict", "/topk", "/observe", "/users/{user}", "/models"} <= set(document["paths"])
    assert (await server.get("/healthz")).status == 200
    assert (await (await server.get("/readyz")).json())["version"] == "v1"


async def test_unknown_paths_and_methods_get_json_404_and_405(server):
    missing = await server.post("/predictions", data=b"{}")
    assert missing.status == 404
    assert (await missing.json())["error"] == "not_found"
    wrong = await server.get("/observe")
    assert wrong.status == 405 and wrong.headers["Allow"] == "POST"
    assert (await wrong.json())["error"] == "method_not_allowed"
    users = await server.put("/users/u1", data=b"{}")
    assert users.status == 405 and set(users.headers["Allow"].split(",")) == {
        "GET",
        "HEAD",
        "DELETE",
    }
    assert (await server.head("/healthz")).status == 200
    samples = await _metrics(server)
    for name, route, status in (
        ("velox_requests_total", "unmatched", "404"),
        ("velox_requests_total", "/observe", "405"),
        ("velox_requests_total", "/users/{user}", "405"),
        ("velox_request_seconds_count", "/healthz", "200"),
    ):
        assert samples[_sample(name, route=route, status=status)] == 1, (name, route)


async def test_concurrent_observes_of_one_user_equal_applying_them_one_by_one(server):
    rng = np.random.default_rng(0)
    items = [f"i{j}" for j in rng.integers(0, 30, 60)]
    ratings = rng.integers(1, 6, 60).astype(float)
    answers = await asyncio.gather(
        *[
            _post(
                server, "/observe", {"user": "u9", "item": item, "rating": float(r), "ts": float(n)}
            )
            for n, (item, r) in enumerate(zip(items, ratings, strict=True))
        ]
    )
    seqs = [body["seqs"][0] for _, body in answers]
    assert sorted(seqs) == list(range(1, 61))
    reference = RidgeReference.of(server.registry, 1, server.config)
    for n in np.argsort(seqs):  # one at a time, in the order the log holds them
        predicted = reference.observe("u9", items[n], ratings[n])
        assert answers[n][1]["predictions"][0] == pytest.approx(predicted, rel=1e-9)
    got = await (await server.get("/users/u9")).json()
    np.testing.assert_allclose(got["weights"], reference.weights("u9"), rtol=1e-9)
    assert got["observations"] == reference.state("u9")[2]


async def test_activation_switches_versions_live_and_keeps_every_observation(server):
    await _post(server, "/observe", {"user": "u2", "item": "i3", "rating": 2.0, "ts": 5.0})
    status, body = await _post(server, "/models/v2/activate", {})
    assert status == 200 and body == {"active": "v2"}
    models = await (await server.get("/models")).json()
    assert models["active"] == "v2" and models["serving"] == "v2"
    reference = RidgeReference.of(server.registry, 2, server.config)
    reference.observe("u2", "i3", 2.0)  # the log after v2's watermark, again
    _, after = await _post(server, "/predict", {"user": "u2", "items": ["i1", "i3"]})
    assert after["version"] == "v2"
    np.testing.assert_allclose(
        [i["score"] for i in after["items"]], reference.predict("u2", ["i1", "i3"]), rtol=1e-10
    )
    assert (await _post(server, "/models/v9/activate", {}))[0] == 404
    assert (await _post(server, "/models/latest/activate", {}))[0] == 404


async def test_deleting_a_user_forgets_state_log_and_rated_items(server):
    await _post(server, "/observe", {"user": "gone", "item": "i3", "rating": 2.0})
    response = await server.delete("/users/gone")
    assert response.status == 200 and (await response.json())["log_records"] == 1
    assert (await (await server.get("/users/gone")).json())["known"] is False
    _, top = await _post(server, "/topk", {"user": "gone", "k": 30})
    assert "i3" in [i["item"] for i in top["items"]]  # no longer excluded: nothing is rated


async def test_an_idempotency_key_applies_a_request_once_across_retries_and_restarts(
    tmp_path, aiohttp_client
):
    _publish(tmp_path)
    config = _config(tmp_path)
    client = await aiohttp_client(create_app(config))
    body = [{"user": "u1", "item": "i1", "rating": 5.0}, {"user": "u1", "item": "new", "rating": 2}]
    key = {"Idempotency-Key": "order-17"}
    trained = (await (await client.get("/users/u1")).json())["observations"]
    first, *concurrent = await asyncio.gather(
        *(client.post("/observe", data=json.dumps(body), headers=key) for _ in range(4))
    )
    answer = await first.json()
    assert first.status == 200 and answer["accepted"] == 2 and answer["cold"] == [False, True]
    for retry in concurrent:  # sent while the first was in its batch: they waited for it
        assert retry.status == 200 and await retry.json() == answer
    assert client.app[STATE].durable.store.last_seq == 2  # applied once
    state = await (await client.get("/users/u1")).json()
    assert state["observations"] == trained + 2

    other = await client.post("/observe", data=json.dumps(body[:1]), headers=key)
    assert other.status == 422 and (await other.json())["error"] == "idempotency_key_reused"
    await client.close()  # the server goes; the receipt stays with the log

    client = await aiohttp_client(create_app(config))
    again = await client.post("/observe", data=json.dumps(body), headers=key)
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == answer
    assert (await (await client.get("/users/u1")).json())["observations"] == trained + 2
    fresh = await client.post("/observe", data=json.dumps(body), headers={"Idempotency-Key": "x"})
    assert (await fresh.json())["seqs"] == [3, 4]  # another key is another request
    await client.delete("/users/u1")
    gone = await client.post("/observe", data=json.dumps(body), headers=key)
    assert gone.status == 410 and (await gone.json())["error"] == "gone"


async def test_a_receipt_not_yet_on_disk_is_not_replayed_as_success(server):
    """A first attempt logged but never fsynced (its answer failed) must not be confirmed."""
    import hashlib

    from feature_store.online import Receipt

    raw = json.dumps({"user": "u2", "item": "i2", "rating": 4.0}).encode()
    durable = server.app[STATE].durable
    digest = hashlib.blake2b(raw, digest_size=16).digest()
    durable.observe(["u2"], ["i2"], [4.0], sync=False, receipts=[Receipt("k1", digest, 0, 1)])
    headers = {"Idempotency-Key": "k1"}
    pending = await server.post("/observe", data=raw, headers=headers)
    assert pending.status == 503 and (await pending.json())["error"] == "unavailable"
    durable.sync_log()
    replay = await server.post("/observe", data=raw, headers=headers)
    assert replay.status == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert (await replay.json())["seqs"] == [1]
    assert durable.store.last_seq == 1


async def test_a_request_that_would_miss_its_deadline_gets_the_prior_flagged(
    tmp_path, aiohttp_client
):
    _publish(tmp_path)
    client = await aiohttp_client(create_app(_config(tmp_path, "serve.deadline_ms=0.000001")))
    status, body = await _post(client, "/predict", {"user": "u3", "items": ["i1", "i2"]})
    assert status == 200 and body["degraded"] is True
    _, top = await _post(client, "/topk", {"user": "u3", "k": 3})
    assert top["degraded"] is True and len(top["items"]) == 3
    samples = await _metrics(client)
    assert samples[_sample("velox_degraded_total", route="/predict")] == 1
    assert samples[_sample("velox_degraded_total", route="/topk")] == 1


@pytest.mark.parametrize(
    ("path", "token", "status"),
    [
        ("/predict", None, 401),
        ("/predict", "wrong", 401),
        ("/predict", "r-token", 200),
        ("/observe", "r-token", 403),
        ("/observe", "w-token", 200),
        ("/models/v1/activate", "w-token", 403),
        ("/models/v1/activate", "a-token", 200),
        ("HEAD /users/u1", None, 401),
        ("HEAD /users/u1", "r-token", 200),
    ],
)
async def test_bearer_tokens_guard_each_scope(tmp_path, aiohttp_client, path, token, status):
    _publish(tmp_path)
    config = _config(
        tmp_path,
        "serve.read_token=r-token",
        "serve.write_token=w-token",
        "serve.admin_token=a-token",
    )
    client = await aiohttp_client(create_app(config))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if path.startswith("HEAD "):  # HEAD answers like GET, scope included
        assert (await client.head(path.removeprefix("HEAD "), headers=headers)).status == status
        return
    body = {
        "/predict": {"user": "u1", "items": ["i1"]},
        "/observe": {"user": "u1", "item": "i1", "rating": 3.0},
        "/models/v1/activate": {},
    }[path]
    got, answer = await _post(client, path, body, **headers)
    assert got == status, answer
    if status >= 400:
        assert answer["error"] in ("unauthorized", "forbidden")
        with OnlineStore(DataLayout(tmp_path).online, read_only=True) as store:
            assert store.last_seq == 0  # nothing was applied


async def test_the_python_client_against_the_real_server(server):
    from velox.client import AsyncClient, Observation, VeloxAPIError

    base = str(server.make_url("")).rstrip("/")
    async with AsyncClient(base) as client:
        scores = await client.predict("u3", ["i1", 2])
        assert scores.version == "v1" and [s.item for s in scores.items] == ["i1", "2"]
        observed = await client.observe(
            [Observation("u3", "i1", 4.0), Observation("u3", "i2", 2.0)]
        )
        assert observed.accepted == 2 and observed.seqs == [1, 2]
        assert (await client.user("u3")).observations > 0
        top = await client.topk("u3", 3, explore="thompson", alpha=0.5)
        assert len(top.items) == 3
        assert (await client.models()).active == "v1"
        with pytest.raises(VeloxAPIError, match="k must be 1 to 1000") as caught:
            await client.topk("u3", 0)
        assert caught.value.status == 422 and caught.value.code == "validation_error"


async def test_reads_while_a_switch_or_deletion_holds_the_model_are_degraded_and_counted(server):
    state = server.app[STATE]
    release = threading.Event()
    holding = asyncio.ensure_future(state.gate.exclusive(release.wait))  # as a switch does
    await asyncio.sleep(0)  # the gate closes when the job starts
    try:
        _, scores = await _post(server, "/predict", {"user": "u3", "items": ["i1", "i2"]})
        _, top = await _post(server, "/topk", {"user": "u3", "k": 3})
    finally:
        release.set()
        await holding
    assert scores["degraded"] and top["degraded"] and len(top["items"]) == 3
    reference = RidgeReference.of(server.registry, 1, server.config)
    prior = [reference.mean + reference.bias(i) for i in ("i1", "i2")]
    np.testing.assert_allclose([i["score"] for i in scores["items"]], prior, rtol=1e-12)
    samples = await _metrics(server)
    assert samples[_sample("velox_degraded_total", route="/predict")] == 1
    assert samples[_sample("velox_degraded_total", route="/topk")] == 1
    _, again = await _post(server, "/topk", {"user": "u3", "k": 3})
    assert not again["degraded"]


async def test_the_server_follows_the_registrys_pointer_and_says_when_it_lags(server):
    server.registry.activate(2)  # as `velox models activate 2` in another process does
    models = await (await server.get("/models")).json()
    assert (models["active"], models["serving"], models["lagging"]) == ("v2", "v1", True)
    await server.app[STATE].versions.check()  # what the follower does every second
    models = await (await server.get("/models")).json()
    assert (models["active"], models["serving"], models["lagging"]) == ("v2", "v2", False)
    samples = await _metrics(server)
    assert samples[_sample("velox_active_model", version="v2")] == 1
    assert samples[_sample("velox_registry_active_model", version="v2")] == 1
    assert samples[_sample("velox_model_lagging")] == 0
    assert _sample("velox_active_model", version="v1") not in samples
    _, scores = await _post(server, "/predict", {"user": "u2", "items": ["i1"]})
    assert scores["version"] == "v2"


async def test_a_shutdown_answers_the_observations_still_waiting_for_their_batch(
    tmp_path, aiohttp_client
):
    """Observes held at the gate when the server starts to stop are applied, logged, answered."""
    _publish(tmp_path)
    app = create_app(_config(tmp_path))
    release = threading.Event()

    async def stopping(app):  # the listening socket is closed; the requests still wait
        release.set()

    app.on_shutdown.append(stopping)
    client = await aiohttp_client(app)
    state = app[STATE]
    holding = asyncio.ensure_future(state.gate.exclusive(release.wait))  # as a switch does
    async with aiohttp.ClientSession() as session:

        async def one(n):
            body = {"user": f"u{n}", "item": "i1", "rating": 3.0}
            async with session.post(client.make_url("/observe"), json=body) as response:
                return response.status, await response.json()

        requests = [asyncio.ensure_future(one(n)) for n in range(20)]
        while state.observations.batcher.waiting < 20:  # every request is in the batcher
            await asyncio.sleep(0.001)
        await client.server.close()
        answers = await asyncio.gather(*requests)
    await holding
    assert [status for status, _ in answers] == [200] * 20
    assert sorted(seq for _, body in answers for seq in body["seqs"]) == list(range(1, 21))
    with OnlineStore(DataLayout(tmp_path).online, read_only=True) as store:
        assert store.last_seq == 20 and store.checkpoint_seq == 20


async def test_a_pointer_the_server_cannot_follow_is_reported_and_the_old_version_serves(server):
    server.registry.activate(2)
    (server.registry.root / "v000002" / "items.parquet").write_bytes(b"not parquet")  # damaged
    await server.app[STATE].versions.check()
    models = await (await server.get("/models")).json()
    assert (models["active"], models["serving"], models["lagging"]) == ("v2", "v1", True)
    assert models["problem"].startswith("cannot serve the registry's active version: ")
    assert "items.parquet" in models["problem"]
    assert (await _metrics(server))[_sample("velox_model_lagging")] == 1
    _, scores = await _post(server, "/predict", {"user": "u2", "items": ["i1"]})
    assert scores["version"] == "v1" and not scores["degraded"]
    _, observed = await _post(server, "/observe", {"user": "u2", "item": "i1", "rating": 3.0})
    assert observed["accepted"] == 1  # the old version keeps learning meanwhile


async def test_a_retry_whose_records_retention_trimmed_is_told_so(tmp_path, aiohttp_client):
    """The receipt outlives its log records (trimmed once exported and checkpointed): a 410
    that says the request was applied and must not be sent again, not 'deleted'."""
    from feature_store.offline import OfflineStore, log_rows

    _publish(tmp_path, watermark=10**6)  # a version trained past this log holds nothing back
    config = _config(tmp_path)
    client = await aiohttp_client(create_app(config))
    body = [{"user": "u1", "item": "i1", "rating": 5.0}]
    key = {"Idempotency-Key": "order-18"}
    first = await client.post("/observe", data=json.dumps(body), headers=key)
    assert first.status == 200
    durable = client.app[STATE].durable
    OfflineStore(DataLayout(tmp_path).offline).append(log_rows(durable.store.log_after(0)))
    trimmed = durable.trim(keep=3, receipt_ttl=86_400)
    assert durable.log_start > 1, trimmed
    again = await client.post("/observe", data=json.dumps(body), headers=key)
    answer = await again.json()
    assert again.status == 410 and "retention has trimmed" in answer["message"], answer
    assert durable.store.last_seq == 1  # not applied again


async def test_metrics_show_the_newest_export_run_of_the_store_beside(tmp_path, aiohttp_client):
    from batch_jobs.export import ExportJob

    _publish(tmp_path)
    client = await aiohttp_client(create_app(_config(tmp_path)))
    assert not any(name.startswith("velox_export") for name, _ in await _metrics(client))
    body = [{"user": f"u{j}", "item": "i1", "rating": 4.0} for j in range(5)]
    assert (await client.post("/observe", data=json.dumps(body))).status == 200
    layout = DataLayout(tmp_path)
    report = await asyncio.get_running_loop().run_in_executor(
        None, ExportJob(layout.online, layout.offline, emit=lambda _: None).run
    )
    assert (report.read, report.written, report.rejected) == (5, 5, 0)
    after = await _metrics(client)
    assert after[_sample("velox_export_records", outcome="written")] == 5
    assert after[_sample("velox_export_records", outcome="rejected")] == 0
    assert after[_sample("velox_export_upto")] == report.upto == 5
