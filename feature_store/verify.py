"""``velox store verify``: read everything the data folder holds and check it against its checksums.

* the online store: opened read-only (so it runs beside a server), which
  replays its write-ahead log and so checks every record's checksum in it;
  every column family read in full with every block's checksum verified
  (:meth:`~feature_store.online.OnlineStore.scan`); its log compared with the
  durable sequence number kept beside it (:mod:`feature_store.durable_mark`);
* the model registry: every version's artifacts against their schemas and
  the SHA-256 recorded when they were written
  (:meth:`~feature_store.registry.ModelRegistry.verify`).

What was checked and every problem found are each one line; a problem is a
sentence that names the file and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from feature_store.keyspace import COLUMN_FAMILIES
from feature_store.layout import DataLayout
from feature_store.online import OnlineStore
from feature_store.registry import ModelRegistry
from feature_store.storage_errors import describe_loss
from velox.errors import DataError


@dataclass
class Verification:
    """What :func:`verify` checked, and the problems it found (one sentence each)."""

    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def verify(layout: DataLayout) -> Verification:
    """Check every block of the online store and every registry artifact of ``layout``."""
    found = Verification()
    if not any(path.is_dir() for path in layout.parts.values()):
        raise DataError(f"no Velox store in data folder {layout.root}; check data.dir")
    if layout.online.is_dir():
        _verify_online(layout, found)
    if layout.registry.is_dir():
        _verify_registry(layout, found)
    return found


def _verify_online(layout: DataLayout, found: Verification) -> None:
    try:
        store = OnlineStore(layout.online, read_only=True)
    except DataError as exc:
        found.problems.append(str(exc))
        return
    with store:
        entries = 0
        for family in COLUMN_FAMILIES:
            try:
                entries += store.scan(family)
            except DataError as exc:
                found.problems.append(str(exc))
        files = len(store.table_files())
        found.checked.append(
            f"online store {layout.online}: write-ahead log replayed, {len(COLUMN_FAMILIES)} "
            f"column families read in full ({entries} entries, {files} table files), "
            "every block's checksum verified"
        )
        found.checked.append(
            f"online log: newest seq {store.last_seq}, durable seq recorded {store.durable_seq}"
        )
        gone = store.missing
        if gone is not None:
            found.problems.append(describe_loss(layout.online, gone))


def _verify_registry(layout: DataLayout, found: Verification) -> None:
    registry = ModelRegistry(layout.registry)
    try:
        versions = registry.versions()
    except DataError as exc:
        found.problems.append(str(exc))
        return
    for version in versions:
        if version.state == "retired" or version.rank is None:
            continue  # no artifacts to check
        try:
            files = registry.verify(version.number)
        except DataError as exc:
            found.problems.append(str(exc))
            continue
        names = ", ".join(path.name for path in files)
        found.checked.append(f"registry {version.name}: {names} match their recorded SHA-256")
