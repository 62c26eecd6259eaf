"""The model registry: trained model versions, their artifacts, and which one serves.

The training job and the serving tier meet only here (DESIGN.md, section 4):
the job writes version ``N+1`` (item features and biases, every user's
sufficient statistics, the log watermark it trained up to); the server loads
it, replays the log after the watermark and activates it. The two run in
different processes at the same time, so every change is one atomic
filesystem operation and nothing is ever half visible.

Layout under the root::

    v000001/metadata.json   state, watermark, engine, parameters, metrics, scalars
    v000001/items.parquet   item, bias, factors (rank floats)
    v000001/users.parquet   user, weights, gram (A's upper triangle, row by row), rhs, count
    ACTIVE                  the number of the active version

* A number is taken by renaming a staging folder, which already holds the
  metadata, onto ``vNNNNNN``. The rename fails when another process took the
  number first, so no two jobs share a number and a listed version always
  has its metadata.
* The stored states are building, ready, failed and retired. "active" is not
  stored: it is the ready version that ``ACTIVE`` names. Activation (and
  rollback) is therefore the one atomic replacement of that file, and the
  version it replaces is simply ready again.
* Every file is written under a temporary name in its folder, synced, renamed
  over the old one, and the folder is synced.
* Reading never writes. A damaged entry (metadata, artifact, pointer) is a
  :class:`DataError` that names the file, and the operation that meets it
  changes nothing. :meth:`ModelRegistry.versions` raises on a damaged entry
  rather than hide a version.
* A job that dies leaves its version "building": :meth:`ModelRegistry.abandon_stale`
  marks such versions failed and :meth:`ModelRegistry.delete` removes them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feature_store.files import atomic_write, schema_mismatch, sync_folder
from velox.errors import DataError, InputError
from velox.symmetric import pack_upper, packed_size, unpack_upper
from velox.trained import TrainedModel

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATES = ("building", "ready", "active", "failed", "retired")
_STORED = ("building", "ready", "failed", "retired")
_METADATA, _ITEMS, _USERS, _ACTIVE = "metadata.json", "items.parquet", "users.parquet", "ACTIVE"
_FOLDER = re.compile(r"v(\d{6,})")
_OPTIONAL = type(None)
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": int,
    "state": str,
    "created": str,
    "watermark": int,
    "engine": str,
    "mode": str,
    "device": str,
    "parameters": dict,
    "metrics": dict,
    "timings": dict,
    "global_mean": (float, int, _OPTIONAL),
    "train_count": (int, _OPTIONAL),
    "rank": (int, _OPTIONAL),
    "error": (str, _OPTIONAL),
}
_OPTIONAL_FIELDS: dict[str, type] = {"checksums": dict}
"""Fields a version written by an older Velox lacks (its artifacts then go unchecked)."""
_FIX = "delete the version's folder or restore it from a backup"
_ARTIFACT_FIX = "restore it from a backup or delete the version"


@dataclass(frozen=True)
class ModelVersion:
    """One version's metadata, with the state the registry reports for it."""

    number: int
    state: str
    created: str
    watermark: int
    engine: str
    mode: str = ""
    device: str = "cpu"
    parameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    global_mean: float | None = None
    train_count: int | None = None
    rank: int | None = None
    error: str | None = None
    checksums: dict[str, str] = field(default_factory=dict)
    """SHA-256 of each artifact file as written, verified whenever the file is read."""

    @property
    def name(self) -> str:
        """The name feature models, user states and the API use: ``v1``, ``v2``…"""
        return f"v{self.number}"


class ModelRegistry:
    """Model versions under ``root``, one folder each, and the ``ACTIVE`` pointer.

    Examples:

    >>> import tempfile
    >>> registry = ModelRegistry(tempfile.mkdtemp())
    >>> with registry.building(engine="velox", watermark=0):
    ...     raise RuntimeError("the training job ran out of memory")
    Traceback (most recent call last):
    RuntimeError: the training job ran out of memory
    >>> tiny = TrainedModel(
    ...     item_ids=np.array(["i"]), item_factors=np.ones((1, 1)), item_bias=np.zeros(1),
    ...     global_mean=3.5, user_ids=np.array(["u"]), user_weights=np.ones((1, 2)),
    ...     user_gram=np.eye(2)[None], user_rhs=np.ones((1, 2)), user_count=np.ones(1, np.int64))
    >>> with registry.building(engine="velox", watermark=42) as version:
    ...     _ = registry.write_artifacts(version.number, tiny)
    >>> registry.activate(2).name
    'v2'
    >>> [(v.name, v.state, v.error) for v in registry.versions()]
    [('v1', 'failed', 'RuntimeError: the training job ran out of memory'), ('v2', 'active', None)]
    >>> registry.load(2).user_gram.tolist()
    [[[1.0, 0.0], [0.0, 1.0]]]
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ read

    def versions(self) -> list[ModelVersion]:
        """Every version, by number; a damaged entry raises (naming its file) instead of hiding."""
        active = self._active_number()
        return [self._reported(self._stored(number), active) for number in self._numbers()]

    def get(self, number: int) -> ModelVersion:
        """One version, with state "active" when ``ACTIVE`` names it."""
        return self._reported(self._stored(number), self._active_number())

    def active(self) -> ModelVersion | None:
        """The active version, or None before the first activation."""
        number = self._active_number()
        return None if number is None else replace(self._stored(number), state="active")

    def load(self, number: int) -> TrainedModel:
        """A version's trained model as NumPy arrays, schemas checked, ``A`` rebuilt in full."""
        version = self._stored(number)
        items, users = (_read(path, schema, version) for path, schema in self._artifacts(version))
        d = version.rank + 1
        return TrainedModel(
            item_ids=items.column("item").to_numpy().astype(str),
            item_factors=_matrix(items.column("factors"), version.rank),
            item_bias=items.column("bias").to_numpy(),
            item_count=items.column("count").to_numpy() if "count" in items.column_names else None,
            global_mean=version.global_mean,
            train_count=version.train_count,
            train_rmse=version.metrics.get("train_rmse"),
            user_ids=users.column("user").to_numpy().astype(str),
            user_weights=_matrix(users.column("weights"), d),
            user_gram=unpack_upper(_matrix(users.column("gram"), packed_size(d)), d),
            user_rhs=_matrix(users.column("rhs"), d),
            user_count=users.column("count").to_numpy(),
        )

    def verify(self, number: int) -> list[Path]:
        """Check a version's artifacts against their schemas and recorded SHA-256; the files.

        Raises :class:`DataError` naming the first damaged or missing file.
        """
        version = self._stored(number)
        artifacts = self._artifacts(version)
        for path, schema in artifacts:
            _check_schema(path, schema, version)
        return [path for path, _ in artifacts]

    # ----------------------------------------------------------------- build

    def create(
        self,
        *,
        engine: str,
        watermark: int,
        parameters: Mapping[str, Any] | None = None,
        mode: str = "",
        device: str = "cpu",
    ) -> ModelVersion:
        """Allocate the next number to a new "building" version; safe across processes."""
        if watermark < 0:
            raise InputError(
                f"the training watermark is a log sequence number >= 0, not {watermark}"
            )
        version = ModelVersion(
            number=0,
            state="building",
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            watermark=int(watermark),
            engine=engine,
            mode=mode,
            device=device,
            parameters=dict(parameters or {}),
        )
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            _write_metadata(staging, version)
            version = replace(version, number=self._claim(staging))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("model %s is building (engine %s, watermark %d)", version.name, engine, watermark)
        return version

    def write_artifacts(self, number: int, trained: TrainedModel) -> ModelVersion:
        """Store a building version's trained model, and its scalars in its metadata."""
        version = self._stored(number)
        if version.state != "building":
            raise DataError(
                f"{version.name} is {version.state} and artifacts are written only while a "
                "version is building; create a new version"
            )
        trained.check_shapes(f"artifacts for {version.name}")
        folder = self._folder(number)
        items = pa.table(
            [
                pa.array(np.asarray(trained.item_ids, dtype=str)),
                pa.array(np.asarray(trained.item_bias, dtype=np.float64)),
                pa.array(_item_counts(trained)),
                _vectors(trained.item_factors, trained.rank),
            ],
            schema=_items_schema(trained.rank),
        )
        atomic_write(folder / _ITEMS, lambda path: pq.write_table(items, path))
        _write_users(folder / _USERS, trained)
        version = replace(
            version,
            train_count=int(trained.train_count),
            global_mean=float(trained.global_mean),
            rank=trained.rank,
            checksums={name: _sha256(folder / name) for name in (_ITEMS, _USERS)},
        )
        _write_metadata(folder, version)
        return version

    def mark_ready(
        self,
        number: int,
        *,
        metrics: Mapping[str, float] | None = None,
        timings: Mapping[str, float] | None = None,
    ) -> ModelVersion:
        """Finish a building version whose artifacts are written; metrics merge into its own."""
        version = self._stored(number)
        if version.state != "building":
            raise DataError(
                f"{version.name} is {version.state}; only a building version can be ready"
            )
        for path, schema in self._artifacts(version):
            _check_schema(path, schema, version)
        version = replace(
            version,
            state="ready",
            metrics={**version.metrics, **_floats(metrics)},
            timings={**version.timings, **_floats(timings)},
        )
        _write_metadata(self._folder(number), version)
        log.info("model %s is ready (metrics %s)", version.name, version.metrics)
        return version

    def mark_failed(self, number: int, reason: str) -> ModelVersion:
        """Record why a building (or ready, inactive) version must never serve."""
        version = self.get(number)
        if version.state not in ("building", "ready"):
            raise DataError(
                f"{version.name} is {version.state}; only a building or an inactive ready "
                "version can be marked failed"
            )
        version = replace(version, state="failed", error=str(reason))
        _write_metadata(self._folder(number), version)
        log.warning("model %s failed: %s", version.name, reason)
        return version

    @contextmanager
    def building(
        self,
        *,
        engine: str,
        watermark: int,
        parameters: Mapping[str, Any] | None = None,
        mode: str = "",
        device: str = "cpu",
    ) -> Iterator[ModelVersion]:
        """A new version that is ready when the block ends, and failed if the block raises.

        The block writes the artifacts and may call :meth:`mark_ready` itself to
        record metrics; otherwise the normal end marks it ready (which fails, and
        so marks it failed, when no artifacts were written).
        """
        version = self.create(
            engine=engine, watermark=watermark, parameters=parameters, mode=mode, device=device
        )
        try:
            yield version
            if self._stored(version.number).state == "building":
                self.mark_ready(version.number)
        except BaseException as exc:
            if self.get(version.number).state in ("building", "ready"):
                self.mark_failed(version.number, f"{type(exc).__name__}: {exc}")
            raise

    def abandon_stale(self, older_than_seconds: float) -> list[int]:
        """Mark failed every version still building this long after creation (its job died)."""
        now = datetime.now(UTC)
        stale = [
            version.number
            for version in self.versions()
            if version.state == "building"
            and (now - datetime.fromisoformat(version.created)).total_seconds()
            >= older_than_seconds
        ]
        for number in stale:
            self.mark_failed(number, f"abandoned: still building after {older_than_seconds:g} s")
        return stale

    # ------------------------------------------------------------- lifecycle

    def activate(self, number: int) -> ModelVersion:
        """Make a ready version the active one: one atomic write of ``ACTIVE``.

        This is also how a damaged ``ACTIVE`` file is repaired.
        """
        version = self._stored(number)
        if version.state != "ready":
            raise DataError(
                f"{version.name} is {version.state}; only a ready version can be active"
            )
        for path, schema in self._artifacts(version):
            _check_schema(path, schema, version)
        atomic_write(self.root / _ACTIVE, lambda path: path.write_text(f"{number}\n"))
        log.info("model %s is active", version.name)
        return replace(version, state="active")

    def rollback(self) -> ModelVersion:
        """Activate the newest ready version older than the active one."""
        current = self.active()
        if current is None:
            raise DataError("no model version is active, so there is none to roll back from")
        earlier = [v for v in self.versions() if v.state == "ready" and v.number < current.number]
        if not earlier:
            raise DataError(
                f"no ready version is older than the active {current.name}; "
                "activate another version by number instead"
            )
        return self.activate(earlier[-1].number)

    def retain(self, keep: int) -> list[int]:
        """Retire ready versions older than the newest ``keep`` ready or active ones.

        A retired version keeps its metadata (history) and loses its Parquet
        files. The active version is never retired. Returns the retired numbers.
        """
        if keep < 1:
            raise InputError(f"retain must keep at least one model version, not {keep}")
        live = [v for v in self.versions() if v.state in ("ready", "active")]
        retired = [v for v in live[:-keep] if v.state == "ready"]
        for version in retired:
            folder = self._folder(version.number)
            _write_metadata(folder, replace(version, state="retired"))
            for name in (_ITEMS, _USERS):
                (folder / name).unlink(missing_ok=True)
            log.info("model %s is retired", version.name)
        return [version.number for version in retired]

    def delete(self, number: int) -> None:
        """Remove a version's folder (even a damaged one); never the active version."""
        folder = self._folder(number)
        if not folder.is_dir():
            raise DataError(f"registry {self.root} has no version v{number}")
        if self._pointer() == number:
            raise DataError(f"v{number} is active and cannot be deleted; activate another first")
        trash = self.root / f".deleting-{uuid.uuid4().hex}"
        folder.rename(trash)
        shutil.rmtree(trash)
        log.info("model v%d is deleted", number)

    def forget_users(self, users: set[str]) -> int:
        """Rewrite every version's ``users.parquet`` without ``users``; returns the rows removed.

        A forgotten user's trained statistics must leave every artifact, not
        only the active one (a rollback would bring them back). Each file is
        replaced atomically; versions without artifacts are skipped.
        """
        removed = 0
        for number in self._numbers():
            version = self._stored(number)
            if version.state == "retired" or version.rank is None:
                continue
            path, schema = self._artifacts(version)[1]
            table = _read(path, schema, version)
            gone = pc.is_in(table.column("user"), pa.array(sorted(users), pa.string()))
            kept = table.filter(pc.invert(gone))
            if kept.num_rows < table.num_rows:
                atomic_write(path, lambda target, kept=kept: pq.write_table(kept, target))
                checksums = {**version.checksums, _USERS: _sha256(path)}
                _write_metadata(path.parent, replace(version, checksums=checksums))
                removed += table.num_rows - kept.num_rows
                log.info("forgot %d user(s) in %s", table.num_rows - kept.num_rows, version.name)
        return removed

    # ------------------------------------------------------------- internals

    def _folder(self, number: int) -> Path:
        return self.root / f"v{number:06d}"

    def _numbers(self) -> list[int]:
        matches = (_FOLDER.fullmatch(path.name) for path in self.root.iterdir() if path.is_dir())
        return sorted(int(match[1]) for match in matches if match)

    def _claim(self, staging: Path) -> int:
        number = max(self._numbers(), default=0) + 1
        while True:
            try:
                staging.rename(self._folder(number))
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                number += 1
            else:
                sync_folder(self.root)
                return number

    def _stored(self, number: int) -> ModelVersion:
        path = self._folder(number) / _METADATA
        if not path.parent.is_dir():
            raise DataError(f"registry {self.root} has no version v{number}")
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise DataError(f"registry entry {path} is missing; {_FIX}") from None
        except ValueError as exc:
            raise DataError(f"registry entry {path} is not valid JSON ({exc}); {_FIX}") from None
        return _parse(data, number, path)

    def _pointer(self) -> int | None:
        path = self.root / _ACTIVE
        if not path.is_file():
            return None
        text = path.read_bytes().decode(errors="replace").strip()
        if not (text.isascii() and text.isdigit()):
            raise DataError(
                f"active-version pointer {path} holds {text!r}, not a version number; "
                "activate a ready version to rewrite it"
            )
        return int(text)

    def _active_number(self) -> int | None:
        number = self._pointer()
        if number is None:
            return None
        path = self.root / _ACTIVE
        if not self._folder(number).is_dir():
            raise DataError(
                f"active-version pointer {path} names v{number}, which does not exist; "
                "activate a ready version to rewrite it"
            )
        state = self._stored(number).state
        if state != "ready":
            raise DataError(
                f"active-version pointer {path} names v{number}, which is {state}; "
                "activate a ready version to rewrite it"
            )
        return number

    @staticmethod
    def _reported(version: ModelVersion, active: int | None) -> ModelVersion:
        return replace(version, state="active") if version.number == active else version

    def _artifacts(self, version: ModelVersion) -> list[tuple[Path, pa.Schema]]:
        if version.state == "retired":
            raise DataError(f"{version.name} is retired and its artifacts were deleted")
        if version.rank is None:
            raise DataError(f"{version.name} has no artifacts; write them before using it")
        folder = self._folder(version.number)
        return [
            (folder / _ITEMS, _items_schema(version.rank, counted=_counted(folder / _ITEMS))),
            (folder / _USERS, _users_schema(version.rank + 1)),
        ]


# ---------------------------------------------------------------- metadata


def _parse(data: Any, number: int, path: Path) -> ModelVersion:
    if not isinstance(data, dict):
        raise DataError(
            f"registry entry {path} holds a {type(data).__name__}, not an object; {_FIX}"
        )
    if isinstance(data.get("format"), int) and data["format"] > FORMAT_VERSION:
        raise DataError(
            f"registry entry {path} has format {data['format']}, newer than this Velox's "
            f"{FORMAT_VERSION}; upgrade Velox to read this registry"
        )
    problems = [f"missing {key}" for key in _FIELDS if key not in data]
    problems += [
        f"{key} is {type(data[key]).__name__}"
        for key, kind in _OPTIONAL_FIELDS.items()
        if key in data and not isinstance(data[key], kind)
    ]
    problems += [
        f"{key} is {type(data[key]).__name__}"
        for key, kind in _FIELDS.items()
        if key in data and not isinstance(data[key], kind)
    ]
    if not problems and data["state"] not in _STORED:
        problems.append(f"unknown state {data['state']!r}")
    if not problems and not _is_time(data["created"]):
        problems.append(f"created {data['created']!r} is not an ISO-8601 time")
    if problems:
        raise DataError(f"registry entry {path} is damaged ({', '.join(problems)}); {_FIX}")
    optional = {key: data[key] for key in _OPTIONAL_FIELDS if key in data}
    return ModelVersion(
        number, **{key: data[key] for key in _FIELDS if key != "format"}, **optional
    )


def _is_time(text: str) -> bool:
    try:
        return datetime.fromisoformat(text).tzinfo is not None
    except ValueError:
        return False


def _write_metadata(folder: Path, version: ModelVersion) -> None:
    data = {"format": FORMAT_VERSION, **asdict(version)}
    del data["number"]
    try:
        text = json.dumps(data, indent=2) + "\n"
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"metadata of {version.name} is not JSON ({exc}); pass numbers, strings, lists, dicts"
        ) from None
    atomic_write(folder / _METADATA, lambda path: path.write_text(text))


def _floats(values: Mapping[str, float] | None) -> dict[str, float]:
    return {str(key): float(value) for key, value in (values or {}).items()}


# --------------------------------------------------------------- artifacts


@cache
def _items_schema(rank: int, *, counted: bool = True) -> pa.Schema:
    """The items artifact; ``counted=False`` is the layout before training counts were kept
    (such a version still loads: its item biases weigh their pseudo-count alone)."""
    counts = [pa.field("count", pa.float64(), nullable=False)] if counted else []
    return pa.schema(
        [
            pa.field("item", pa.string(), nullable=False),
            pa.field("bias", pa.float64(), nullable=False),
            *counts,
            pa.field("factors", pa.list_(pa.float64(), rank), nullable=False),
        ]
    )


def _counted(path: Path) -> bool:
    """Whether an items artifact holds training counts (absent or unreadable: the checks say)."""
    try:
        return "count" in pq.read_schema(path).names
    except (FileNotFoundError, pa.ArrowException, OSError):
        return True


def _item_counts(trained: TrainedModel) -> np.ndarray:
    """The items' training rating counts; zeros for a model that did not record them
    (its trained biases then weigh only ``model.bias_regularization``)."""
    if trained.item_count is None:
        return np.zeros(len(trained.item_ids))
    return np.asarray(trained.item_count, dtype=np.float64)


@cache
def _users_schema(d: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("user", pa.string(), nullable=False),
            pa.field("weights", pa.list_(pa.float64(), d), nullable=False),
            pa.field("gram", pa.list_(pa.float64(), packed_size(d)), nullable=False),
            pa.field("rhs", pa.list_(pa.float64(), d), nullable=False),
            pa.field("count", pa.int64(), nullable=False),
        ]
    )


def _write_users(path: Path, trained: TrainedModel) -> None:
    d = trained.rank + 1
    users = pa.table(
        [
            pa.array(np.asarray(trained.user_ids, dtype=str)),
            _vectors(trained.user_weights, d),
            _vectors(pack_upper(np.asarray(trained.user_gram)), packed_size(d)),
            _vectors(trained.user_rhs, d),
            pa.array(np.asarray(trained.user_count, dtype=np.int64)),
        ],
        schema=_users_schema(d),
    )
    atomic_write(path, lambda target: pq.write_table(users, target))


def _vectors(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), width)


def _matrix(column: pa.ChunkedArray, width: int) -> np.ndarray:
    flat = column.combine_chunks().flatten()
    return flat.to_numpy(zero_copy_only=False, writable=True).reshape(-1, width)


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _check_schema(path: Path, schema: pa.Schema, version: ModelVersion) -> None:
    """The artifact exists, has ``schema``, and matches the checksum its version recorded."""
    expected = version.checksums.get(path.name)
    try:
        got = pq.read_schema(path).remove_metadata()
        found = _sha256(path) if expected is not None else None
    except FileNotFoundError:
        raise DataError(f"model artifact {path} is missing; {_ARTIFACT_FIX}") from None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"model artifact {path} is not readable Parquet ({exc}); {_ARTIFACT_FIX}"
        ) from None
    if got != schema:
        mismatch = schema_mismatch(schema, got)
        raise DataError(f"model artifact {path} has the wrong schema ({mismatch}); {_ARTIFACT_FIX}")
    if found != expected:
        raise DataError(
            f"model artifact {path} of {version.name} is damaged: its SHA-256 is {found}, "
            f"not the {expected} recorded when it was written; {_ARTIFACT_FIX}"
        )


def _read(path: Path, schema: pa.Schema, version: ModelVersion) -> pa.Table:
    _check_schema(path, schema, version)
    try:
        return pq.read_table(path, schema=schema)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"model artifact {path} is damaged ({exc}); {_ARTIFACT_FIX}") from None
