"""State checkpoints: user and fold-in item states, the online biases, the install marker.

Checkpoints are not synced, because the log can always rebuild them: user
states go in writes of a few hundred, then one write holds the item states,
the biases and the watermark. A crash between them leaves users whose stored
state is ahead of the watermark; every state records the last sequence number
it includes, and recovery skips those records for that user.

User states bypass the write-ahead log (``disable_wal``): the WAL is what a
commit's fsync writes, so states written through it made the next commit
after a checkpoint carry every byte of the checkpoint (observe's p99 was
21-45 ms). Without the WAL a state is only in the ``users`` memtable until
that family is flushed to a table file, and a crash loses what is not: so
:meth:`Checkpoints.write_checkpoint` flushes the family, and waits for it,
before the watermark moves. The watermark therefore never names a state a
crash can lose; a state flushed earlier (RocksDB flushes a full memtable on
its own) is only ahead of the watermark, which recovery already allows for.
The item states stay in the watermark's own write (through the WAL, they
are few): recovery has no per-item skip, so they must move with it.

Installing a model version drops every checkpoint behind an install marker
(:meth:`Checkpoints.begin_install`); until :meth:`Checkpoints.end_install`,
opening the store must redo the install.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import rocksdict

from feature_store.codec import StateBatch, decode_states, encode_states
from feature_store.keyspace import ABOVE_UTF8, STATE_FAMILIES, StoreParts, seq_key

CHECKPOINT_CHUNK = 256
"""User states per checkpoint write (about 1 MB at rank 32)."""
_CHECKPOINT_KEY = b"checkpoint"
_BIASES_KEY = b"biases"
_INSTALLING_KEY = b"installing"


class Checkpoints(StoreParts):
    """The checkpoint part of :class:`~feature_store.online.OnlineStore`."""

    @property
    def checkpoint_seq(self) -> int:
        """Every state change up to this sequence number is in a stored checkpoint."""
        stored = self._cf["meta"].get(_CHECKPOINT_KEY)
        return int.from_bytes(stored, "big") if stored is not None else 0

    def write_checkpoint(
        self,
        states: dict[str, tuple[Sequence[str], StateBatch]],
        biases: bytes,
        upto: int,
        dtype: str = "float64",
    ) -> None:
        """Store states (``{"users": (ids, batch), "items": ...}``) and biases, covering ``upto``.

        Not synced: the log rebuilds whatever a lost checkpoint held. User
        states go first through :meth:`put_states`, a few hundred per write
        (one write of every dirty user held the GIL, and stalled an event loop
        in this process, for the whole write), without the WAL, and the
        ``users`` family is flushed (RocksDB releases the GIL meanwhile); the
        item states, the biases and the watermark follow in one last write,
        so they move together, after every state they cover is in a table file.
        """
        self._check_writable()
        if "users" in states:
            self.put_states("users", *states["users"], dtype)
        self._cf["users"].flush(True)  # also what an install's put_states wrote
        batch = rocksdict.WriteBatch(raw_mode=True)
        if "items" in states:
            self._add_states(batch, "items", *states["items"], dtype)
        batch.put(_BIASES_KEY, biases, self._handles["meta"])
        batch.put(_CHECKPOINT_KEY, seq_key(upto), self._handles["meta"])
        self._db.write(batch)

    def put_states(self, family: str, keys: Sequence[str], states: StateBatch, dtype: str) -> None:
        """Write state checkpoints without the WAL and without moving the checkpoint watermark.

        They survive a crash once their family is flushed: the next
        :meth:`write_checkpoint` does that before its watermark moves.
        ``CHECKPOINT_CHUNK`` states per write, other threads getting the GIL
        between writes (a write holds it throughout).
        """
        self._check_writable()
        without_wal = rocksdict.WriteOptions()
        without_wal.disable_wal = True
        for start in range(0, len(keys), CHECKPOINT_CHUNK):
            part = slice(start, start + CHECKPOINT_CHUNK)
            batch = rocksdict.WriteBatch(raw_mode=True)
            self._add_states(batch, family, keys[part], states.take(part), dtype)
            self._db.write(batch, without_wal)
            time.sleep(0)  # a GIL hand-off point between chunks

    def _add_states(
        self,
        batch: rocksdict.WriteBatch,
        family: str,
        keys: Sequence[str],
        states: StateBatch,
        dtype: str,
    ) -> None:
        handle = self._handles[family]
        for key, record in zip(keys, encode_states(states, dtype), strict=True):
            batch.put(key.encode(), record, handle)

    def get_biases(self) -> bytes | None:
        """The last checkpoint of the online biases, if any."""
        return self._cf["meta"].get(_BIASES_KEY)

    def get_states(
        self, keys: Sequence[str], family: str = "users"
    ) -> tuple[np.ndarray, StateBatch | None]:
        """Which keys have a checkpoint, and the decoded states of those that do."""
        table = self._cf[family]
        records = [table.get(key.encode()) for key in keys]
        found = np.array([r is not None for r in records], dtype=bool)
        present = [r for r in records if r is not None]
        return found, decode_states(present) if present else None

    def all_states(self, family: str) -> tuple[list[str], StateBatch | None]:
        """Every checkpointed state of a family (the folded-in items are few)."""
        keys, records = [], []
        for key, record in self._cf[family].items():
            keys.append(key.decode())
            records.append(record)
        return keys, decode_states(records) if records else None

    def installing(self) -> str | None:
        """The model version an unfinished :meth:`begin_install` was installing, if any."""
        marker = self._cf["meta"].get(_INSTALLING_KEY)
        return marker.decode() if marker is not None else None

    def begin_install(self, version: str) -> None:
        """Mark an install of ``version`` and drop every state checkpoint, in one synced write.

        The log stays. Until :meth:`end_install`, opening the store must
        redo the install (the marker says so).
        """
        self._check_writable()
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.put(_INSTALLING_KEY, version.encode(), self._handles["meta"])
        for family in STATE_FAMILIES:
            batch.delete_range(b"", ABOVE_UTF8, self._handles[family])
        batch.delete(_BIASES_KEY, self._handles["meta"])
        batch.delete(_CHECKPOINT_KEY, self._handles["meta"])
        self._db.write(batch, self._sync)

    def end_install(self) -> None:
        """Clear the install marker (synced): the states now belong to the installed version."""
        self._check_writable()
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.delete(_INSTALLING_KEY, self._handles["meta"])
        self._db.write(batch, self._sync)
