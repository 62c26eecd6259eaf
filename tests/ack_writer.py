"""A writer that acknowledges synced commits, then dies without closing the store.

Run as ``python -m tests.ack_writer STORE COUNT``: commits ``COUNT``
observations of user ``u1`` one synced commit at a time, prints each
acknowledged sequence number on its own line, and ends with ``os._exit(0)``,
so nothing is flushed and every acknowledged record is only in the
write-ahead log (as after a kill -9), which the integrity tests then damage.
"""

from __future__ import annotations

import os
import sys

from feature_store.online import OnlineStore
from tests.factories import applied


def main(path: str, count: int) -> None:
    store = OnlineStore(path)
    for k in range(count):
        (seq,) = store.commit(applied(["u1"], [f"i{k % 20}"], [4.0], [float(k)]), sync=True)
        sys.stdout.write(f"{seq}\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
