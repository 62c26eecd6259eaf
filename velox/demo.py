"""The online-learning demo: a model trained on the past, then a drifting stream.

Trains biased ALS on the first half of a synthetic stream, then runs the
second half prequentially three ways: the trained model frozen (what a batch
trainer plus a key-value store gives), Velox's exact online updates with the
configured settings (forgetting ``model.forgetting``, the user-bias walk
``model.bias_drift``), and the same without the bias walk. The windows show
the frozen model decaying as tastes drift while the online one keeps up.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from velox.als import ALSParams, Ratings, train_als
from velox.backend import get_backend
from velox.config import VeloxConfig
from velox.datasets import SyntheticSpec, synthesize
from velox.evaluation import prequential


def run_demo(config: VeloxConfig, spec: SyntheticSpec, emit: Callable[[str], None] = print) -> dict:
    """Run the demo and return each variant's prequential report (also printed via ``emit``)."""
    backend = get_backend(config.compute.device)
    emit(
        f"velox demo on {backend.name}: {spec.users} users, {spec.items} items, "
        f"{spec.ratings} ratings, drift {spec.drift}"
    )
    table = synthesize(spec)
    half = table.num_rows // 2
    train, stream = table.slice(0, half), table.slice(half)
    started = time.perf_counter()
    params = ALSParams.from_config(config.train)
    trained = train_als(Ratings.from_table(train), params, backend=backend)
    emit(
        f"trained biased ALS (rank {params.rank}, {params.iterations} iterations) on {half} "
        f"ratings in {time.perf_counter() - started:.1f}s: train RMSE {trained.train_rmse:.4f}"
    )
    variants = {
        "frozen model": (config.model, False),
        "online (Velox)": (config.model, True),
        "online, no bias walk": (dataclasses.replace(config.model, bias_drift=0.0), True),
    }
    reports = {}
    for label, (model_config, learn) in variants.items():
        model = trained.online_model(version="demo", config=model_config, backend=backend)
        started = time.perf_counter()
        report = prequential(model, stream, learn=learn)
        rate = report.observations / (time.perf_counter() - started)
        emit(f"{label:>26}: {report.summary()} ({rate:,.0f} obs/s)")
        reports[label] = report
    return reports
