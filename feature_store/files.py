"""File helpers the Parquet stores share: crash-safe replacement and schema comparison."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write under a unique temporary name in the same folder, sync, rename, sync the folder.

    A reader sees the old file or the new one, never a part; a crash leaves
    at most a hidden temporary file; two writers never share a temporary name.
    """
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """Make a rename or creation inside ``folder`` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def schema_mismatch(want: pa.Schema, got: pa.Schema) -> str:
    """How ``got`` differs from ``want``, in words, for an error message."""
    wanted, found = {f.name: f for f in want}, {f.name: f for f in got}
    problems = [f"missing {name}" for name in wanted if name not in found]
    problems += [f"unexpected {name}" for name in found if name not in wanted]
    problems += [
        f"{name} is {found[name].type}{' with nulls' if found[name].nullable else ''}"
        for name, f in wanted.items()
        if name in found and not found[name].equals(f)
    ]
    return ", ".join(problems) or "column order differs"
