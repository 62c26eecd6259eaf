"""The export the kill test SIGKILLs: it freezes at a chosen file write and says so.

Run as ``python -m tests.export_crash ONLINE OFFLINE RANGE_SIZE NAME N``: the
export runs in process (DirectRunner) until the ``N``-th atomic write of a
file whose name starts with ``NAME``. A data file (``seq-``) is then left
half written under its temporary name, as a kill during the write leaves it;
any other file (``_watermark``) is not begun. The line ``frozen PATH`` says
the export is parked there, and the process waits to be killed. Patching the
write is the one way to stop a run at a known point without a sleep.
"""

from __future__ import annotations

import sys
import threading
import uuid
from pathlib import Path

import feature_store.offline
from batch_jobs.export import ExportJob


def freeze_at(name: str, nth: int) -> None:
    """Replace the offline store's atomic write by one that parks on its ``nth`` ``name`` file."""
    real = feature_store.offline.atomic_write
    seen = 0

    def write(path: Path, writer) -> None:
        nonlocal seen
        if path.name.startswith(name):
            seen += 1
            if seen == nth:
                if name.startswith("seq-"):
                    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
                    writer(temporary)
                    data = temporary.read_bytes()
                    temporary.write_bytes(data[: len(data) // 2])
                sys.stdout.write(f"frozen {path}\n")
                sys.stdout.flush()
                threading.Event().wait()
        real(path, writer)

    feature_store.offline.atomic_write = write


def main(online: str, offline: str, range_size: int, name: str, nth: int) -> None:
    freeze_at(name, nth)
    ExportJob(Path(online), Path(offline), range_size=range_size, emit=lambda _: None).run()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
