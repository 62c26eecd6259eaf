"""``velox serve`` as a process: SIGKILL under concurrent observes, SIGTERM's clean stop, and a
running server that follows ``velox models activate``."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import aiohttp
import numpy as np
import requests

from feature_store.codec import decode_log
from feature_store.layout import DataLayout
from feature_store.online import OnlineStore
from feature_store.versions import open_active, store_version
from tests.factories import RidgeReference
from tests.test_serving import _config, _publish
from velox.backend import CPU

ROOT = Path(__file__).resolve().parent.parent
VELOX = str(Path(sys.executable).parent / "velox")
_LISTENING = re.compile(r"Running on http://127\.0\.0\.1:([0-9]+)")


class Server:
    """A ``velox serve --port 0`` process; its port is the one it printed."""

    def __init__(self, root: Path, *settings: str) -> None:
        flags = [
            "store.checkpoint_interval=0.05",
            "store.cache_users=20",
            f"data.dir={root}",
            *settings,
        ]
        command = [VELOX, *(arg for flag in flags for arg in ("--set", flag)), "serve"]
        self.process = subprocess.Popen(
            [*command, "--port", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        for line in self.process.stdout:
            self.output.append(line)
            if match := _LISTENING.search(line):
                self.port = int(match[1])
                break
        else:
            raise AssertionError("the server did not start:\n" + "".join(self.output))
        # Keep reading, so that a chatty server never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        self.output.extend(self.process.stdout)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


async def _observe_until_killed(server: Server, seconds: float):
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
                async with session.post(f"{server.url}/observe", json=batch) as response:
                    body = await response.json()
                    assert response.status == 200, body
            except (TimeoutError, aiohttp.ClientError):
                return
            acked.extend(zip(body["seqs"], batch, strict=True))

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(client(n, session)) for n in range(8)]
        await asyncio.sleep(seconds)
        os.kill(server.pid, signal.SIGKILL)
        await asyncio.gather(*tasks)
    return acked


def test_sigkill_under_concurrent_observes_loses_no_acknowledged_observation(tmp_path):
    registry = _publish(tmp_path)
    acked = []
    for round_ in range(3):
        server = Server(tmp_path)
        acked += asyncio.run(_observe_until_killed(server, 1.0 + 0.5 * round_))
        assert server.process.wait() == -signal.SIGKILL
    assert len(acked) > 100
    with OnlineStore(DataLayout(tmp_path).online) as store:
        logged = dict(store.records_after(0))
        assert store_version(store) == "v1"
    assert list(logged) == list(range(1, len(logged) + 1))  # contiguous
    for seq, sent in acked:  # every acknowledged observation, at its sequence number
        (record,) = decode_log([logged[seq]])
        assert (record.users[0], record.items[0], record.ratings[0]) == (
            sent["user"],
            sent["item"],
            sent["rating"],
        )
    # Each user's recovered state is its trained one plus every logged observation, once,
    # in log order, with the target t the log recorded.
    config = _config(tmp_path)
    reference = RidgeReference.of(registry, 1, config)
    users = sorted({sent["user"] for _, sent in acked})
    want = {user: list(reference.state(user)) for user in users}
    for applied in decode_log([logged[s] for s in sorted(logged)]):
        for user, item, target in zip(applied.users, applied.items, applied.targets, strict=True):
            A, b, n = want[user]
            want[user] = [*reference.learn(A, b, reference.features(item), target), n + 1]
    durable, _ = open_active(config, CPU)
    try:
        A, b, count, _, _ = durable.statistics(users)
    finally:
        durable.close()
    np.testing.assert_allclose(A, [want[u][0] for u in users], rtol=1e-10)
    np.testing.assert_allclose(b, [want[u][1] for u in users], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(count, [want[u][2] for u in users])


def test_sigterm_answers_every_applied_observation_and_closes_cleanly(tmp_path):
    """Each request of the burst is either answered, or refused without being applied."""
    _publish(tmp_path)
    server = Server(tmp_path)

    async def burst():
        async with aiohttp.ClientSession() as session:

            async def one(n):
                body = {"user": f"burst{n}", "item": f"i{n % 30}", "rating": 3.0}
                try:
                    async with session.post(f"{server.url}/observe", json=body) as r:
                        return r.status, await r.json()
                except aiohttp.ClientError:
                    return None, None

            tasks = [asyncio.create_task(one(n)) for n in range(200)]
            while not any(task.done() for task in tasks):  # the burst is under way
                await asyncio.sleep(0.001)
            os.kill(server.pid, signal.SIGTERM)
            return await asyncio.gather(*tasks)

    answers = asyncio.run(burst())
    assert server.process.wait(timeout=60) == 0
    assert all(status in (200, 503, None) for status, _ in answers)
    assert all(body["error"] == "unavailable" for status, body in answers if status == 503)
    answered = {f"burst{n}" for n, (status, _) in enumerate(answers) if status == 200}
    assert answered  # the burst was under way when the signal came
    with OnlineStore(DataLayout(tmp_path).online) as store:
        applied = {
            user for _, record in store.records_after(0) for user in decode_log([record])[0].users
        }
        assert applied == answered  # no applied observation went unanswered
        assert store.checkpoint_seq == store.last_seq  # written back on the way out


def test_a_running_server_follows_velox_models_activate(tmp_path):
    _publish(tmp_path, seeds=(0, 1))
    server = Server(tmp_path)
    try:
        settings = ["--set", f"data.dir={tmp_path}", "--set", f"serve.port={server.port}"]
        activate = subprocess.run(
            [VELOX, *settings, "models", "activate", "2", "--wait", "120"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert activate.returncode == 0, activate.stderr
        assert activate.stdout.splitlines() == [
            "v2 is the registry's active version",
            f"the server at {server.url} serves v2",
        ]
        models = requests.get(f"{server.url}/models", timeout=10).json()
        assert (models["active"], models["serving"], models["lagging"]) == ("v2", "v2", False)
        scores = requests.post(
            f"{server.url}/predict", json={"user": "u1", "items": ["i1"]}, timeout=10
        ).json()
        assert scores["version"] == "v2"
    finally:
        assert server.stop() == 0


def test_a_port_in_use_is_one_sentence_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [VELOX, "--set", f"data.dir={tmp_path}", "serve", "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2
    assert done.stderr == (
        f"velox: error: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "set another --port (0: any free port) or --host\n"
    )
