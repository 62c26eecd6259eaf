"""The velox command line, run as a user runs it (a subprocess of the installed script)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from velox.backend import HAS_CUPY


def velox(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("velox") or sys.executable
    prefix = [] if exe.endswith("velox") else ["-m", "velox.cli"]
    return subprocess.run(
        [exe, *prefix, *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_bad_setting_is_one_sentence_and_exit_2():
    done = velox("--set", "train.rank=-3", "config")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "train.rank = '-3'" in done.stderr and "from 1 to 1024" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(HAS_CUPY, reason="a GPU is visible, so device = 'gpu' is valid here")
def test_gpu_without_one_is_a_clear_error():
    done = velox("--set", "compute.device=gpu", "demo", "--ratings", "1000")
    assert done.returncode == 2
    assert "device = 'gpu' was asked for but" in done.stderr


def test_datasets_synth_writes_parquet(tmp_path):
    out = tmp_path / "s.parquet"
    done = velox(
        "datasets",
        "synth",
        "--users",
        "30",
        "--items",
        "20",
        "--ratings",
        "500",
        "--drift",
        "0.3",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert pq.read_table(out).num_rows == 500


def test_demo_shows_online_beating_the_frozen_model():
    done = velox(
        "--set",
        "train.rank=8",
        "--set",
        "train.iterations=5",
        "demo",
        "--users",
        "400",
        "--items",
        "200",
        "--ratings",
        "20000",
    )
    assert done.returncode == 0, done.stderr
    rmse = {}
    for line in done.stdout.splitlines():
        if "RMSE=" in line:
            label = line.split(":")[0].strip()
            rmse[label] = float(line.split("RMSE=")[1].split()[0])
    assert rmse["online (Velox)"] < rmse["frozen model"]
    assert rmse["online, no bias walk"] < rmse["frozen model"]
