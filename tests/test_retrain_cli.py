"""``velox retrain`` against a running server and on the data folder of a stopped one."""

from __future__ import annotations

import asyncio

import pytest

from feature_store.layout import DataLayout
from feature_store.registry import ModelRegistry
from feature_store.versions import open_active
from serving.app import STATE, create_app
from tests.test_retrain import _observe, _pairs, _publish
from velox.backend import CPU
from velox.cli import main
from velox.config import load_config

_COMMON = ["train.master=local[2]", "train.iterations=3", "serve.follow_interval=0"]


def _flags(settings: list[str]) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


async def test_velox_retrain_asks_the_running_server_and_follows_its_run(
    tmp_path, aiohttp_client, unused_tcp_port
):
    _publish(tmp_path)
    settings = [f"data.dir={tmp_path}", f"serve.port={unused_tcp_port}", *_COMMON]
    config = load_config(None, env={}, overrides=settings)
    client = await aiohttp_client(create_app(config), server_kwargs={"port": unused_tcp_port})
    await _observe(client, _pairs(300, seed=1))
    argv = [*_flags(settings), "retrain", "--reason", "nightly", "--wait", "300"]
    code = await asyncio.get_running_loop().run_in_executor(None, main, argv)
    assert code == 0
    state = client.server.app[STATE]
    assert state.durable.model.version == "v2"
    decision = state.retrainer.last_decision
    assert decision.trigger == "manual" and "nightly" in decision.reason


def test_velox_retrain_on_a_stopped_server_activates_a_version_a_later_start_serves(
    tmp_path, capsys
):
    registry = _publish(tmp_path)
    settings = [f"data.dir={tmp_path}", *_COMMON]
    config = load_config(None, env={}, overrides=settings)
    durable, _ = open_active(config, CPU)
    batch = _pairs(300, seed=2)
    durable.observe(
        [o["user"] for o in batch],
        [o["item"] for o in batch],
        [o["rating"] for o in batch],
        [o["ts"] for o in batch],
    )
    durable.close()
    assert main([*_flags(settings), "retrain", "--reason", "cron"]) == 0
    out = capsys.readouterr().out
    assert "succeeded: v2" in out and "it is active" in out
    assert ModelRegistry(DataLayout.from_config(config).registry).active().name == "v2"
    again, active = open_active(config, CPU)  # the store holds v2's state: nothing to install
    assert active.name == "v2" and again.reapplied == 0 and again.slot == 1
    assert registry.get(2).watermark == 300
    again.close()


@pytest.fixture(autouse=True)
def _no_server_elsewhere(monkeypatch):
    """The stopped-server test must find no server at the default address."""
    monkeypatch.setenv("VELOX_SERVE__PORT", "1")
