"""``velox serve`` as a process: SIGKILL under concurrent observes, and SIGTERM's clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np

from feature_store.codec import decode_log
from feature_store.durable import DurableModel
from feature_store.layout import DataLayout
from feature_store.online import OnlineStore
from feature_store.versions import model_of, store_version
from tests.factories import served_model
from tests.test_serving import _config, _publish
from velox.backend import CPU

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(root: Path, port: int) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "velox"
    process = subprocess.Popen(
        [
            str(exe),
            "--set",
            f"data.dir={root}",
            "--set",
            f"serve.port={port}",
            "--set",
            "store.checkpoint_interval=0.05",
            "--set",
            "store.cache_users=20",
            "serve",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process
        except OSError:
            if process.poll() is not None:
                raise AssertionError(process.stdout.read()) from None
            time.sleep(0.1)
    raise AssertionError("the server did not start")


async def _observe_until_killed(port: int, process: subprocess.Popen, seconds: float):
    """Eight clients observe in a loop; the server is killed mid-stream. Returns the acks."""
    acked = []

    async def client(n: int, session: aiohttp.ClientSession) -> None:
        rng = np.random.default_rng(n)
        while True:
            batch = [
                {
                    "user": f"u{rng.integers(0, 40)}" if k % 3 else "shared",
                    "item": f"i{rng.integers(0, 30)}",
                    "rating": float(rng.integers(1, 6)),
                }
                for k in range(int(rng.integers(1, 6)))
            ]
            try:
                async with session.post(f"http://127.0.0.1:{port}/observe", json=batch) as response:
                    body = await response.json()
                    assert response.status == 200, body
            except (TimeoutError, aiohttp.ClientError):
                return
            acked.extend(zip(body["seqs"], batch, strict=True))

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(client(n, session)) for n in range(8)]
        await asyncio.sleep(seconds)
        os.kill(process.pid, signal.SIGKILL)
        await asyncio.gather(*tasks)
    return acked


def test_sigkill_under_concurrent_observes_loses_no_acknowledged_observation(tmp_path):
    registry = _publish(tmp_path)
    port = _free_port()
    acked = []
    for round_ in range(3):
        server = _start(tmp_path, port)
        acked += asyncio.run(_observe_until_killed(port, server, 1.0 + 0.5 * round_))
        server.wait()
        assert server.returncode == -signal.SIGKILL
    assert len(acked) > 100
    config = _config(tmp_path)
    with OnlineStore(DataLayout(tmp_path).online) as store:
        logged = dict(store.records_after(0))
        assert list(logged) == list(range(1, len(logged) + 1))  # contiguous
        for seq, sent in acked:  # every acknowledged observation, at its sequence number
            (record,) = decode_log([logged[seq]])
            assert (record.users[0], record.items[0], record.ratings[0]) == (
                sent["user"],
                sent["item"],
                sent["rating"],
            )
        assert store_version(store) == "v1"
        artifacts = registry.load(1)
        durable = DurableModel(model_of(artifacts, "v1", config, CPU), store, config.store)
        reference = served_model(registry, 1, config)
        for applied in decode_log([logged[s] for s in sorted(logged)]):
            reference.replay(applied)
        users = sorted({sent["user"] for _, sent in acked})
        A, b, count, _, _ = durable.statistics(users)
        rows = reference.users.find(users)
        np.testing.assert_array_equal(A, reference.users.A[rows])
        np.testing.assert_array_equal(b, reference.users.b[rows])
        np.testing.assert_array_equal(count, reference.users.count[rows])


def test_sigterm_answers_the_pending_batch_and_closes_cleanly(tmp_path):
    _publish(tmp_path)
    port = _free_port()
    server = _start(tmp_path, port)

    async def burst():
        async with aiohttp.ClientSession() as session:

            async def one(n):
                body = {"user": f"u{n % 7}", "item": f"i{n % 30}", "rating": 3.0}
                try:
                    async with session.post(f"http://127.0.0.1:{port}/observe", json=body) as r:
                        return r.status, await r.json()
                except aiohttp.ClientError:
                    return None, None

            tasks = [asyncio.create_task(one(n)) for n in range(200)]
            while not any(task.done() for task in tasks):  # the burst is under way
                await asyncio.sleep(0.001)
            os.kill(server.pid, signal.SIGTERM)
            return await asyncio.gather(*tasks)

    answers = asyncio.run(burst())
    assert server.wait(timeout=60) == 0
    answered = [body for status, body in answers if status == 200]
    assert answered  # the burst was under way when the signal came
    assert all(status in (200, 503, None) for status, _ in answers)
    with OnlineStore(DataLayout(tmp_path).online) as store:
        assert store.last_seq >= len(answered)
        assert store.checkpoint_seq == store.last_seq  # written back on the way out
