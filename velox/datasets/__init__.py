"""Observation data sets: the Arrow schema, MovieLens loaders, the synthetic generator."""

from velox.datasets.movielens import load_movielens
from velox.datasets.schema import OBSERVATION_SCHEMA
from velox.datasets.synthetic import SyntheticSpec, iter_synthetic, synthesize, write_synthetic

__all__ = [
    "OBSERVATION_SCHEMA",
    "SyntheticSpec",
    "iter_synthetic",
    "load_movielens",
    "synthesize",
    "write_synthetic",
]
