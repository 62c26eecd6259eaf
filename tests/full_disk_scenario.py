"""A durable model on a real, full filesystem; run by ``tests/test_failing_disk.py``.

Run as ``unshare -rm python -m tests.full_disk_scenario DIR``: in a mount
namespace of its own it mounts a small tmpfs on ``DIR``; a writer process
opens a store there, fills the rest of the filesystem, observes until writes
are refused three times, reports, and dies without closing anything (as a
server on a failed disk is stopped). Then the space is freed, the store is
reopened, and one JSON line says what was acknowledged, what was refused and
why, the writer's ``problem``, and what the reopened store holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from feature_store.durable import DurableModel, Unavailable
from feature_store.online import OnlineStore
from tests.factories import small_model
from velox.config import StoreConfig

CONFIG = StoreConfig(cache_users=8, checkpoint_interval=0)


def _fill(path: Path) -> None:
    """Write ``path`` until the filesystem is full."""
    with open(path, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass


def write(root: Path) -> None:
    """Observe on a full disk until refused three times; report; die without closing."""
    durable = DurableModel(small_model(), OnlineStore(root / "db"), CONFIG)
    acknowledged, refusals = {}, []
    k = 0
    while len(refusals) < 3:
        if k == 3:  # a few batches on a healthy disk first, then it is full
            _fill(root / "filler")
        users = [f"user{k}-{j}" for j in range(4)]
        try:
            _, seqs = durable.observe(users, ["i1"] * 4, [3.0] * 4, [float(k)] * 4)
            acknowledged.update((int(seq), user) for seq, user in zip(seqs, users, strict=True))
        except Unavailable as exc:
            refusals.append(str(exc))
        k += 1
    report = {"acknowledged": acknowledged, "refusals": refusals, "problem": durable.problem}
    print(json.dumps(report), flush=True)
    os._exit(0)


def main(mount: str) -> None:
    root = Path(mount)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mount], check=True)
    writer = [sys.executable, "-m", "tests.full_disk_scenario", "--write", mount]
    report = json.loads(subprocess.run(writer, capture_output=True, text=True).stdout)
    (root / "filler").unlink()  # the disk is fixed; the server restarts
    reopened = DurableModel(small_model(), OnlineStore(root / "db"), CONFIG)
    users = sorted(set(report["acknowledged"].values()))
    counts = reopened.statistics(users)[2].tolist()
    report["logged"] = {str(seq): o.user for seq, o in reopened.store.log_after(0)}
    report["counts"] = dict(zip(users, counts, strict=True))
    reopened.close()
    print(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1] == "--write":
        write(Path(sys.argv[2]))
    else:
        main(sys.argv[1])
