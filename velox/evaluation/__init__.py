"""Evaluation: prequential replay of streams, protocols, policies, metrics, results.

* :mod:`~velox.evaluation.replay`: the one predict-then-learn replay
  (:func:`replay`, :func:`prequential`) that tests, the demo, benchmarks and
  ``velox evaluate`` use;
* :mod:`~velox.evaluation.protocols`: temporal, random and per-user splits;
* :mod:`~velox.evaluation.policies`: what is compared on one stream;
* :mod:`~velox.evaluation.metrics`: one definition of each error measure;
* :mod:`~velox.evaluation.harness`, :mod:`~velox.evaluation.results`:
  ``velox evaluate`` and its results folder.
"""

from velox.evaluation.metrics import mae, rmse
from velox.evaluation.replay import PrequentialReport, Trace, prequential, replay

__all__ = ["PrequentialReport", "Trace", "mae", "prequential", "replay", "rmse"]
