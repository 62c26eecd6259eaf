"""``velox evaluate --store DIR``: the stream through a durable online store, in process.

The serving tier's storage path without HTTP: every micro-batch is applied
by a :class:`~feature_store.durable.DurableModel` over a fresh RocksDB store
(the trained version installed first, as ``velox serve`` installs one),
logged and synced before the next. Registered in the ``velox.learners``
entry-point group, so :mod:`velox.evaluation` finds it without importing
this package (imports point ``feature_store -> velox`` only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from feature_store.durable import DurableModel
from feature_store.online import OnlineStore
from feature_store.versions import trained_users
from velox.config import StoreConfig
from velox.errors import InputError


class DurableLearner:
    """A :class:`DurableModel` as a learner; :meth:`close` writes states back and closes."""

    def __init__(self, durable: DurableModel) -> None:
        self.durable = durable

    def step(self, users, items, ratings, when, learn: bool) -> np.ndarray:
        if not learn:
            raise InputError("a durable store learns what it is sent; evaluate it with learning on")
        applied, _ = self.durable.observe(users, items, ratings, when)
        return applied.predictions

    def close(self) -> None:
        self.durable.close()


def durable_learner(setup, folder: str | Path) -> DurableLearner:
    """A durable model of ``setup``'s trained version over a new store in ``folder``."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise InputError(
            f"{folder} is not empty; --store needs a new folder for the evaluation's store"
        )
    model = setup.trained.online_model(version="v1", config=setup.model, users=False)
    store = OnlineStore(folder)
    try:
        users = trained_users(setup.trained, 0)
        return DurableLearner(DurableModel.install(model, store, users, 0, StoreConfig()))
    except BaseException:
        store.close()
        raise
