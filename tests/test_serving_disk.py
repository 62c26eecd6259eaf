"""The HTTP side of a failing disk: ``/readyz`` red with the reason, writes refused with a clear
503, the failures in ``/metrics``, nothing acknowledged lost.

The fault is injected into the store's checkpoint write: a disk that fails only
there cannot be made for real (``tests/test_failing_disk.py`` fills a real small
filesystem for the log). Everything else is real: the server, RocksDB, eviction,
recovery.
"""

from __future__ import annotations

from collections import Counter

from feature_store.durable import REFUSE_AFTER
from feature_store.layout import DataLayout
from feature_store.online import OnlineStore
from feature_store.versions import open_active
from serving.app import STATE, create_app
from tests.test_failing_disk import _full_disk
from tests.test_serving import _config, _metrics, _publish, _sample
from velox.backend import CPU


async def test_a_failing_disk_turns_readyz_red_refuses_writes_and_loses_nothing(
    tmp_path, aiohttp_client, monkeypatch
):
    _publish(tmp_path)
    config = _config(tmp_path, "store.cache_users=8")
    client = await aiohttp_client(create_app(config))
    durable = client.app[STATE].durable
    acknowledged: dict[int, tuple] = {}  # sequence number -> (user, item, rating)

    async def observe(k: int) -> tuple[int, dict]:
        """Four users never seen before: every batch grows the cache."""
        body = [
            {"user": f"new{k}-{j}", "item": f"i{(k + j) % 30}", "rating": 1.0 + k % 5}
            for j in range(4)
        ]
        response = await client.post("/observe", json=body)
        answer = await response.json()
        if response.status == 200:
            sent = [(o["user"], o["item"], o["rating"]) for o in body]
            acknowledged.update(zip(answer["seqs"], sent, strict=True))
        return response.status, answer

    async def metric(name: str, **labels: str) -> float:
        return (await _metrics(client))[_sample(name, **labels)]

    assert (await observe(0))[0] == 200 and (await client.get("/readyz")).status == 200
    assert await metric("velox_store_problem") == 0

    monkeypatch.setattr(durable.store, "write_checkpoint", _full_disk)
    for k in range(1, 100):  # refused once write-backs keep failing or the cache is full
        status, answer = await observe(k)
        if status != 200:
            break
    assert status == 503 and answer["error"] == "unavailable"
    assert "No space left on device" in answer["message"] and "fix the disk" in answer["message"]
    ready = await client.get("/readyz")
    reason = await ready.json()
    assert ready.status == 503 and reason["error"] == "unavailable"
    assert reason["message"] == durable.problem and "No space left on device" in reason["message"]
    assert await metric("velox_store_problem") == 1
    assert await metric("velox_store_failures_total", kind="write_back") >= REFUSE_AFTER
    logged = durable.store.last_seq
    assert (await observe(k + 1))[0] == 503 and durable.store.last_seq == logged  # not applied
    assert len(acknowledged) == logged  # every logged observation was acknowledged

    monkeypatch.undo()  # the disk works again: the next write-back lifts the refusal
    assert (await observe(1000))[0] == 200
    assert (await client.get("/readyz")).status == 200
    assert await metric("velox_store_problem") == 0
    await client.close()

    with OnlineStore(DataLayout(tmp_path).online, read_only=True) as store:
        logged_now = {seq: (o.user, o.item, o.rating) for seq, o in store.log_after(0)}
    assert logged_now == acknowledged  # every acknowledged observation, at its sequence number
    users = sorted({user for user, *_ in acknowledged.values()})
    recovered, _ = open_active(config, CPU)
    try:
        count = recovered.statistics(users)[2]
    finally:
        recovered.close()
    per_user = Counter(user for user, *_ in acknowledged.values())
    assert count.tolist() == [per_user[user] for user in users]
