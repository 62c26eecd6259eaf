"""Storage phase 2 (issue 14): a full disk heals without a restart; damage found while serving
stops writes cleanly.

The disk is a real small filesystem (a 16 MB tmpfs mounted on the test's folder) where
this machine lets the test mount one; elsewhere the fault is injected where a full disk
hits first, the log's write (and a reopen fails while it lasts). Everything else is real:
the server on 127.0.0.1, RocksDB, the log, recovery, the ``velox serve`` process.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
import requests

import feature_store.durable
from feature_store.layout import DataLayout
from feature_store.log import ObservationLog
from feature_store.online import OnlineStore
from feature_store.versions import open_active
from serving.app import STATE, create_app
from tests.test_serve_process import Server
from tests.test_serving import _config, _metrics, _publish, _sample
from velox.backend import CPU
from velox.errors import DataError


class Disk:
    """The data folder's disk: :meth:`fill` makes it full, :meth:`free` gives the space back."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root, self._monkeypatch = root, monkeypatch
        self.real = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(root)], capture_output=True
            ).returncode
            == 0
        )

    def fill(self) -> None:
        if not self.real:
            self._monkeypatch.setattr(ObservationLog, "commit", _no_space)
            opens = OnlineStore._open_database  # a read-only open writes nothing: it works

            def open_database(store: OnlineStore, accept_loss: bool, writable: bool):
                return _no_space() if writable else opens(store, accept_loss, writable)

            self._monkeypatch.setattr(OnlineStore, "_open_database", open_database)
            return
        with open(self.root / "filler", "wb", buffering=0) as handle, suppress(OSError):
            while True:
                handle.write(b"\0" * 65536)

    def free(self) -> None:
        if not self.real:
            self._monkeypatch.undo()
            return
        (self.root / "filler").unlink()

    def unmount(self) -> None:
        if self.real:
            subprocess.run(["umount", "--lazy", str(self.root)], check=True)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def disk(tmp_path, monkeypatch) -> Iterator[Disk]:
    root = tmp_path / "data"
    root.mkdir()
    disk = Disk(root, monkeypatch)
    try:
        yield disk
    finally:
        disk.unmount()


async def test_a_full_disk_refuses_writes_with_retry_after_and_heals_by_itself(
    disk, aiohttp_client, monkeypatch
):
    monkeypatch.setattr(feature_store.durable, "HEAL_BACKOFF", 0)  # every refused observe tries
    _publish(disk.root)
    config = _config(disk.root, "store.cache_users=8")
    client = await aiohttp_client(create_app(config))
    acknowledged: dict[int, tuple] = {}  # sequence number -> (user, item, rating)

    async def observe(k: int):
        body = [
            {"user": f"new{k % 12}", "item": f"i{(k + j) % 30}", "rating": 1.0 + k % 5}
            for j in range(3)
        ]
        response = await client.post("/observe", json=body)
        answer = await response.json()
        if response.status == 200:
            sent = [(o["user"], o["item"], o["rating"]) for o in body]
            acknowledged.update(zip(answer["seqs"], sent, strict=True))
        return response, answer

    for k in range(5):
        assert (await observe(k))[0].status == 200
    disk.fill()
    for k in range(5, 200):
        response, answer = await observe(k)
        if response.status != 200:
            break
    assert response.status == 503 and answer["error"] == "unavailable"
    assert response.headers["Retry-After"] == "1"
    assert "No space left on device" in answer["message"] and "free space" in answer["message"]
    response, answer = await observe(k + 1)  # its reopen fails too: the disk is still full
    assert response.status == 503 and "the last reopen failed" in answer["message"]
    ready = await client.get("/readyz")
    reason = await ready.json()
    durable = client.app[STATE].durable
    assert ready.status == 503 and reason["message"] == durable.problem
    assert "No space left on device" in reason["message"]
    assert (await _metrics(client))[_sample("velox_store_problem")] == 1
    assert (await client.post("/predict", json={"user": "u1", "items": ["i1"]})).status == 200

    disk.free()
    for k in range(300, 310):  # the first heals the store, by itself
        assert (await observe(k))[0].status == 200
    assert (await client.get("/readyz")).status == 200
    assert durable.problem is None
    users = sorted({user for user, *_ in acknowledged.values()})
    live = durable.statistics(users)
    await client.close()

    with OnlineStore(DataLayout(disk.root).online, read_only=True) as store:
        logged = {seq: (o.user, o.item, o.rating) for seq, o in store.log_after(0)}
    assert {seq: logged.get(seq) for seq in acknowledged} == acknowledged  # none lost, none moved
    restarted, _ = open_active(config, CPU)
    try:
        again = restarted.statistics(users)
    finally:
        restarted.close()
    for healed, clean in zip(live, again, strict=True):  # the healed model is the log's, exactly
        np.testing.assert_array_equal(healed, clean)
    per_user = {user: 0 for user in users}
    for user, *_ in logged.values():
        per_user[user] += 1
    assert again[2].tolist() == [per_user[user] for user in users]


def test_sigterm_on_a_full_disk_exits_cleanly_and_keeps_what_was_acknowledged(disk):
    if not disk.real:
        pytest.skip(
            "no tmpfs can be mounted here, and a fault cannot be injected into a server process"
        )
    _publish(disk.root)
    server = Server(disk.root)
    acknowledged = {}
    try:
        for k in range(200):
            if k == 3:
                disk.fill()
            body = {"user": f"u{k}", "item": "i1", "rating": 3.0}
            response = requests.post(f"{server.url}/observe", json=body, timeout=30)
            if response.status_code != 200:
                break
            acknowledged[response.json()["seqs"][0]] = f"u{k}"
        assert response.status_code == 503 and "Retry-After" in response.headers
        assert requests.get(f"{server.url}/readyz", timeout=30).status_code == 503
    finally:
        before = len(server.output)
        code = server.stop()
    output = "".join(server.output[before:])  # what the stop printed
    assert code == 0 and "Traceback" not in output, output
    disk.free()
    with OnlineStore(DataLayout(disk.root).online, read_only=True) as store:
        logged = {seq: o.user for seq, o in store.log_after(0)}
    assert len(acknowledged) >= 3 and {s: logged.get(s) for s in acknowledged} == acknowledged


async def test_damage_found_while_serving_stops_writes_and_keeps_other_reads(
    tmp_path, aiohttp_client
):
    _publish(tmp_path)
    config = _config(tmp_path, "store.cache_users=4")
    client = await aiohttp_client(create_app(config))
    body = [{"user": f"u{k}", "item": f"i{k % 30}", "rating": 4.0} for k in range(40)]
    assert (await client.post("/observe", json=body)).status == 200
    await client.close()  # a clean stop: every state is checkpointed and flushed to table files

    path = DataLayout(tmp_path).online
    table = max(path.glob("*.sst"), key=lambda file: file.stat().st_size)  # the users' states
    size = table.stat().st_size
    with table.open("r+b") as handle:  # the data blocks come first, the index at the end
        handle.write(np.random.default_rng(14).bytes(size // 2))

    client = await aiohttp_client(create_app(config))
    durable = client.app[STATE].durable
    logged = durable.store.last_seq
    cold = min(f"u{k}" for k in range(40))  # its state is in the table's first block
    response = await client.post("/predict", json={"user": cold, "items": ["i1"]})
    answer = await response.json()
    assert response.status == 503 and "Retry-After" not in response.headers
    message = answer["message"]
    assert f"store {path} is damaged" in message and str(table) in message
    assert "velox store verify" in message and "velox store restore" in message
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["message"] == message
    refused = await client.post("/observe", json={"user": "zz", "item": "i1", "rating": 3.0})
    assert refused.status == 503 and (await refused.json())["message"] == message
    assert durable.store.last_seq == logged
    other = await client.post("/predict", json={"user": "zz-new", "items": ["i1"]})
    assert other.status == 200  # a read that needs no damaged block
    await client.close()  # and the stop is clean
    with pytest.raises(DataError, match="damaged"), OnlineStore(path, read_only=True) as view:
        view.scan("users")
