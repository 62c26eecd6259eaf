"""RocksDB's failures, told as one sentence: which file, what is wrong with it, what to do.

rocksdict raises a bare ``Exception`` carrying RocksDB's status text for
every failure, so the cause is read from that text: a damaged MANIFEST (the
list of the database's files), a damaged or missing table file (``.sst``), a
damaged write-ahead log (``.log``), a held lock, a missing file. Damage a
serving store meets in a read or a write is told by :func:`describe_damage`.
"""

from __future__ import annotations

import re
from pathlib import Path

RESTORE = "restore the store from a backup (velox store restore BACKUP --replace)"
ACCEPT_LOSS = "accept the loss explicitly (velox store recover --accept-loss)"
_FILE = re.compile(r"(/\S*?(?:MANIFEST-\d+|\d+\.sst|\d+\.log|CURRENT|OPTIONS-\d+))")


def describe_failure(path: Path, exc: BaseException, doing: str = "opened") -> str:
    """One sentence for RocksDB's ``exc`` on the store at ``path`` (``doing``: what failed)."""
    text = str(exc)
    named = _FILE.search(text)
    file = Path(named.group(1)) if named else None
    lead = f"store {path} could not be {doing}"
    if "lock" in text.lower() and "LOCK" in text:
        return (
            f"{lead}: its LOCK is held by another process or open handle; stop the server "
            "using it, or open a read-only view (velox store inspect)"
        )
    if "No such file" in text and file is not None:
        return f"{lead}: its file {file} is missing; {RESTORE}"
    if file is not None and file.name.startswith("MANIFEST") and "orrupt" in text:
        return (
            f"{lead}: its MANIFEST {file} (the list of the database's files) is damaged; {RESTORE}"
        )
    if file is not None and file.suffix == ".sst" and "orrupt" in text:
        return f"{lead}: its table file {file} is damaged ({_first_line(text)}); {RESTORE}"
    if "orrupt" in text:
        logs = ", ".join(str(log) for log in sorted(path.glob("*.log"))) or "its write-ahead log"
        return (
            f"{lead}: its write-ahead log {logs} is damaged ({_first_line(text)}), so records "
            f"acknowledged after the damage are unreadable; {RESTORE}, or {ACCEPT_LOSS}"
        )
    return f"{lead}: {_first_line(text)}; check the folder and its permissions, or {RESTORE}"


def is_corruption(exc: BaseException) -> bool:
    """Whether RocksDB's ``exc`` reports damaged data (status *Corruption*), not a failing call."""
    return "Corruption:" in str(exc)


def describe_damage(path: Path, exc: BaseException) -> str:
    """One sentence for damage a serving store met (``exc``: a :func:`is_corruption` error)."""
    named = _FILE.search(str(exc))
    where = f"its file {named.group(1)}" if named else "its data"
    return (
        f"store {path} is damaged: RocksDB found {where} corrupt ({_first_line(str(exc))}), "
        f"so it takes no more writes; run velox store verify to see what is damaged, then "
        f"{RESTORE}"
    )


def describe_loss(path: Path, missing: tuple[int, int]) -> str:
    """One sentence for a log that lost the acknowledged sequence numbers ``missing``."""
    first, last = missing
    return (
        f"store {path} has lost acknowledged observations: its log ends at seq {first - 1}, but "
        f"seq {first} to {last} were acknowledged as durable; {RESTORE}, or {ACCEPT_LOSS}"
    )


def _first_line(text: str) -> str:
    return " ".join(text.split())
