"""Configuration: precedence, validation messages, and the documented defaults file."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from velox.config import VeloxConfig, describe, load_config
from velox.errors import ConfigError

ROOT = Path(__file__).parents[1]


def test_defaults_file_documents_every_setting_with_its_default():
    document = tomllib.loads((ROOT / "conf/velox.toml").read_text())
    listed = {f"{s}.{k}": v for s, table in document.items() for k, v in table.items()}
    defaults = {key: default for key, default, _ in describe()}
    assert listed == defaults
    text = (ROOT / "conf/velox.toml").read_text().splitlines()
    for key in defaults:
        name = key.split(".")[1]
        line = next(i for i, row in enumerate(text) if row.startswith(f"{name} ="))
        assert text[line - 1].startswith("#"), f"{key} has no comment above it"


def test_precedence_file_then_environment_then_command_line(tmp_path):
    path = tmp_path / "v.toml"
    path.write_text("[train]\nrank = 8\n[model]\nforgetting = 0.9\n[compute]\ndevice = 'cpu'\n")
    env = {"VELOX_TRAIN__RANK": "16", "VELOX_DATA__DIR": "/srv/velox"}
    config = load_config(path, env=env, overrides=["train.rank=64"])
    assert config.train.rank == 64
    assert config.model.forgetting == 0.9
    assert config.data.dir == "/srv/velox"
    assert config.compute.device == "cpu"
    assert load_config(path, env={}).train.rank == 8


def test_no_file_gives_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(env={}) == VeloxConfig()


@pytest.mark.parametrize(
    ("toml", "env", "overrides", "message"),
    [
        (
            "[train]\nrnk = 3\n",
            {},
            [],
            r"unknown setting train.rnk .*keys of \[train\] are: engine",
        ),
        ("[modle]\n", {}, [], r"unknown section \[modle\]"),
        ("[train]\nrank = 'big'\n", {}, [], r"train.rank = 'big' .* must be an integer from 1"),
        ("[train]\nrank = 2.5\n", {}, [], "must be an integer"),
        ("[model]\nforgetting = 0.0\n", {}, [], r"greater than 0 and at most 1"),
        ("[model]\nregularization = -1\n", {}, [], "greater than 0"),
        ("[model]\ndtype = 'float16'\n", {}, [], "one of 'float64', 'float32'"),
        ("", {"VELOX_TRAIN__RANK": "0"}, [], r"environment variable VELOX_TRAIN__RANK"),
        ("", {"VELOX_NOPE__X": "1"}, [], "names no config section"),
        ("", {}, ["train.rank"], "must look like section.key=value"),
        ("", {}, ["compute.device=tpu"], r"command line 'compute.device=tpu'"),
        ("", {}, ["model.regularization=nan"], "must be a number"),
        ("[model\n", {}, [], "is not valid TOML"),
        ("[retrain]\ncron = '61 * * * *'\n", {}, [], r"retrain.cron = '61 \* \* \* \*' .* is not"),
        ("", {"VELOX_RETRAIN__CRON": "every day"}, [], "is not a cron expression"),
        ("", {}, ["retrain.enabled=maybe"], "must be true or false"),
        ("", {}, ["retrain.degradation_min_observations=20000"], "could never trigger"),
    ],
)
def test_bad_settings_give_one_sentence(tmp_path, toml, env, overrides, message):
    path = tmp_path / "v.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path, env=env, overrides=overrides)
    assert "\n" not in str(caught.value)


def test_missing_config_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml", env={})


def test_retrain_settings_load_from_every_layer(tmp_path):
    path = tmp_path / "v.toml"
    path.write_text("[retrain]\nenabled = true\ncron = '0 3 * * *'\n")
    config = load_config(path, env={"VELOX_RETRAIN__MAX_AGE": "86400"}, overrides=["retrain.cron="])
    assert config.retrain.enabled is True
    assert config.retrain.max_age == 86400.0
    assert config.retrain.cron == ""
    assert load_config(path, env={}).retrain.cron == "0 3 * * *"
