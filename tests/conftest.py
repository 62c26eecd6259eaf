"""Shared fixtures: backends, the MovieLens path, small models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from velox.als import ALSParams, Ratings, train_als
from velox.config import ModelConfig
from velox.datasets import SyntheticSpec, synthesize

# CI replays the same examples every run (no flaky discoveries in a submission);
# locally hypothesis explores new ones and remembers failures.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

ML100K = Path(os.environ.get("VELOX_ML100K", Path(__file__).parents[2] / "shared/data/ml-100k"))


@pytest.fixture
def ml100k() -> Path:
    """The MovieLens 100K folder; skips with the reason when it is not on this machine."""
    if not (ML100K / "u.data").is_file():
        pytest.skip(f"MovieLens 100K not found at {ML100K} (set VELOX_ML100K to its folder)")
    return ML100K


@pytest.fixture(scope="session")
def drifting_stream():
    """A small synthetic stream with drift, split into a training past and a future."""
    table = synthesize(SyntheticSpec(users=300, items=200, ratings=20_000, drift=0.8, seed=3))
    half = table.num_rows // 2
    return table.slice(0, half), table.slice(half)


@pytest.fixture(scope="session")
def trained(drifting_stream):
    train, _ = drifting_stream
    return train_als(Ratings.from_table(train), ALSParams(rank=4, iterations=5))


@pytest.fixture
def model(trained):
    return trained.online_model(version="v1", config=ModelConfig(regularization=2.0))


def random_features(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return rng.normal(size=(n, d))


@pytest.fixture(scope="session")
def spark():
    """One real SparkSession on local[2] for every test that needs Spark."""
    from batch_jobs.spark import read_spark_defaults, spark_session

    session = spark_session("local[2]", read_spark_defaults())
    yield session
    session.stop()
