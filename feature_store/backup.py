"""Backups of a data folder, their restore, and a summary of what a data folder holds.

A backup is a folder with the three stores and a ``BACKUP.json`` manifest:

* ``online/``: a RocksDB checkpoint of the online store (consistent at one
  point of the log; its table files are hard links when on the same disk);
* ``offline/`` and ``registry/``: hard links (copies across disks) of the
  Parquet files and metadata. The stores only ever replace files by rename,
  never rewrite them in place, so a linked file can never change later.

The backup is assembled under a hidden name and renamed at the end, so a
folder named as a backup is always complete. The online store is held open
(its lock taken) for the whole copy, so no server can start writing meanwhile.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from feature_store.layout import DataLayout
from feature_store.offline import OfflineStore
from feature_store.online import OnlineStore
from feature_store.registry import ModelRegistry
from feature_store.retention import holds
from velox.config import RegistryConfig
from velox.errors import DataError

MANIFEST = "BACKUP.json"
_FORMAT = 1


def backup(layout: DataLayout, target: str | Path) -> dict[str, Any]:
    """Copy the data folder's stores into the new folder ``target``; returns the manifest."""
    target = Path(target)
    if target.exists():
        raise DataError(f"backup folder {target} already exists; pass a new folder")
    if not layout.online.is_dir():
        raise DataError(f"no Velox store in data folder {layout.root}; check data.dir")
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with OnlineStore(layout.online) as store:
            store.backup(staging / "online")
            for name in ("offline", "registry"):
                if layout.parts[name].is_dir():
                    shutil.copytree(layout.parts[name], staging / name, copy_function=_link_or_copy)
            manifest = {
                "format": _FORMAT,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "source": str(layout.root.resolve()),
                **summarize(DataLayout(staging), store),
            }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def restore(source: str | Path, layout: DataLayout, *, replace: bool = False) -> Path | None:
    """Put a backup in place as the data folder's stores; where the replaced ones went, if any.

    An existing store is only replaced with ``replace``, and then moved aside
    (never deleted) into ``replaced-<time>`` inside the data folder.
    """
    source = Path(source)
    manifest = read_manifest(source)
    existing = [p for p in layout.parts.values() if p.exists() and any(p.iterdir())]
    if existing and not replace:
        names = ", ".join(p.name for p in existing)
        raise DataError(
            f"data folder {layout.root} already holds stores ({names}); pass --replace to move "
            "them aside, or restore into another data folder"
        )
    aside = None
    if existing:
        if layout.online.is_dir():
            OnlineStore(layout.online).close()  # refuses clearly if a server holds it
        aside = layout.root / f"replaced-{datetime.now(UTC):%Y%m%dT%H%M%S}"
        aside.mkdir(parents=True)
        for path in existing:
            os.replace(path, aside / path.name)
    layout.root.mkdir(parents=True, exist_ok=True)
    for name, path in layout.parts.items():
        shutil.rmtree(path, ignore_errors=True)  # an empty folder left in place
        if (source / name).is_dir():
            # RocksDB reopens its own files, so the online store is copied, never linked.
            copy = shutil.copy2 if name == "online" else _link_or_copy
            shutil.copytree(source / name, path, copy_function=copy)
    with OnlineStore(layout.online, read_only=True) as store:
        if store.last_seq != manifest["last_seq"]:
            raise DataError(
                f"restored store ends at sequence {store.last_seq}, but backup {source} "
                f"recorded {manifest['last_seq']}; the backup is damaged"
            )
    return aside


def read_manifest(source: Path) -> dict[str, Any]:
    """The manifest of a backup folder; a clear error for anything else."""
    path = source / MANIFEST
    if not path.is_file():
        raise DataError(f"{source} is not a Velox backup (it has no {MANIFEST}); check the path")
    try:
        manifest = json.loads(path.read_text())
        last_seq = int(manifest["last_seq"])
        version = int(manifest["format"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"backup manifest {path} is damaged ({exc})") from None
    if version > _FORMAT:
        raise DataError(f"backup {source} was made by a newer Velox; upgrade Velox to restore it")
    return {**manifest, "last_seq": last_seq}


def summarize(
    layout: DataLayout, store: OnlineStore | None = None, keep: int = RegistryConfig().keep
) -> dict[str, Any]:
    """What the data folder holds: log extent and what holds it back, counts, model versions.

    ``keep`` is ``registry.keep``: which versions hold the log back.
    """
    out: dict[str, Any] = {}
    if store is None and layout.online.is_dir():
        with OnlineStore(layout.online, read_only=True) as view:
            return summarize(layout, view, keep)
    if store is not None:
        counts = store.counts()
        extent = store.log_extent()
        found = holds(store, layout, keep)
        out.update(
            last_seq=store.last_seq,
            checkpoint_seq=store.checkpoint_seq,
            log_first=extent.first,
            log_bytes=extent.bytes,
            held_by=found.holder,
            held_at=found.floor,
            holds=asdict(found),
            users_estimate=counts["users"],
            folded_in_items_estimate=counts["items"],
            durable_seq=store.durable_seq,
            missing=store.missing,
            accepted_losses=[asdict(loss) for loss in store.accepted_losses],
        )
    if layout.offline.is_dir():
        offline = OfflineStore(layout.offline)
        out.update(offline_watermark=offline.watermark, offline_days=offline.partitions())
    if layout.registry.is_dir():
        registry = ModelRegistry(layout.registry)
        out["versions"] = [
            {
                "version": v.name,
                "state": v.state,
                "created": v.created,
                "engine": v.engine,
                "watermark": v.watermark,
                "metrics": v.metrics,
            }
            for v in registry.versions()
        ]
    return out


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
