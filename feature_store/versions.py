"""From a registry version to a serving model over the online store.

:func:`open_active` is what ``velox serve`` runs at start: the active version
of the registry, with the online store recovered if it already holds that
version's state; brought up to date from the store's other slot if that
holds the version exactly (a swap whose pointer move a crash prevented, or
a rollback while the server was stopped); or else installed (trained users,
then the log after its watermark applied again) if the store holds another
version's, an unfinished install, or nothing.
"""

from __future__ import annotations

import logging

import numpy as np

from feature_store.codec import StateBatch, decode_biases
from feature_store.durable import DurableModel
from feature_store.layout import DataLayout
from feature_store.online import OnlineStore
from feature_store.registry import ModelRegistry, ModelVersion
from velox.backend import Backend
from velox.config import VeloxConfig
from velox.errors import DataError
from velox.trained import TrainedModel

log = logging.getLogger(__name__)


def trained_users(
    artifacts: TrainedModel, watermark: int, forgotten: set[str] = frozenset()
) -> tuple[list[str], StateBatch]:
    """A version's user statistics as checkpoints that include the log up to ``watermark``.

    Users in ``forgotten`` (deleted after the version was trained) are left out.
    """
    keys = [str(u) for u in artifacts.user_ids]
    keep = np.array([key not in forgotten for key in keys], dtype=bool)
    states = StateBatch(
        artifacts.user_gram[keep],
        artifacts.user_rhs[keep],
        np.asarray(artifacts.user_count, dtype=np.int64)[keep],
        np.full(int(keep.sum()), watermark, dtype=np.int64),
        np.zeros(int(keep.sum())),
    )
    return [key for key, k in zip(keys, keep, strict=True) if k], states


def store_version(store: OnlineStore) -> str | None:
    """The version whose state the store holds (None: none, or an install did not finish)."""
    if store.installing() is not None:
        return None
    record = store.get_biases()
    return decode_biases(record)[2] if record is not None else None


def serve_version(
    version: ModelVersion,
    registry: ModelRegistry,
    store: OnlineStore,
    config: VeloxConfig,
    backend: Backend,
) -> DurableModel:
    """The durable model of ``version`` over ``store``: recovered, or installed first."""
    artifacts = registry.load(version.number)
    # Users come from the store on demand, not all into memory.
    model = artifacts.online_model(
        version=version.name, config=config.model, backend=backend, users=False
    )
    if store_version(store) == version.name:
        return DurableModel(model, store, config.store)
    other = 1 - store.active_slot
    if store.holds(other) == (version.name, True):  # a swap the pointer did not follow, or back
        log.info("%s is in the store's other slot: applying the log after it", version.name)
        durable = DurableModel.resume(model, store, config.store, other)
        durable.reapplied = durable.reapply()
        durable.take_over(config.store)
        return durable
    log.info("installing model %s into %s", version.name, store.path)
    covered, users = install_point(version, artifacts, store)
    return DurableModel.install(model, store, users, covered, config.store)


def install_point(
    version: ModelVersion, artifacts: TrainedModel, store: OnlineStore
) -> tuple[int, tuple[list[str], StateBatch]]:
    """Where installing ``version`` starts in ``store``'s log, and its trained users there.

    The trained states hold the log up to the version's watermark; a store
    whose log ends before it (recreated, or another store's training) has
    nothing more: states count from its end, else later records would look
    already included and never be checkpointed. Users deleted after the
    watermark are left out. A log that retention trimmed past the start
    cannot install the version (:class:`DataError`, saying what to do).
    """
    covered = min(version.watermark, store.last_seq)
    if covered < version.watermark:
        log.warning(
            "%s was trained up to log record %d but %s ends at %d",
            version.name,
            version.watermark,
            store.path,
            covered,
        )
    if store.log_start > covered + 1:
        raise DataError(
            f"installing {version.name} needs the log from seq {covered + 1}, but retention "
            f"trimmed it before seq {store.log_start}; activate a newer version (velox store "
            "trim keeps the active one and the registry.keep newest ready ones installable)"
        )
    forgotten = store.forgotten(artifacts.user_ids, before=covered)
    return covered, trained_users(artifacts, covered, forgotten)


def open_active(config: VeloxConfig, backend: Backend) -> tuple[DurableModel, ModelVersion]:
    """Open the online store under the registry's active version (for ``velox serve``)."""
    layout = DataLayout.from_config(config)
    registry = ModelRegistry(layout.registry)
    active = registry.active()
    if active is None:
        raise DataError(
            f"no active model in {layout.registry}; train one with `velox train --activate` "
            "(or start with `velox serve --bootstrap`)"
        )
    store = OnlineStore(layout.online)
    try:
        return serve_version(active, registry, store, config, backend), active
    except BaseException:
        store.close()
        raise
