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

Installing a model version drops every checkpoint of its slot behind an
install marker (:meth:`Checkpoints.begin_install`); until
:meth:`Checkpoints.end_install`, opening the store must redo the install.

Every method works on one state slot (:data:`~feature_store.keyspace.SLOTS`),
the active one unless told otherwise: a candidate version is built in the
other while the active one serves, and :meth:`Checkpoints.swap_in` makes it
active in one synced write.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import rocksdict

from feature_store.codec import StateBatch, decode_biases, decode_states, encode_states
from feature_store.keyspace import (
    ACTIVE_SLOT_KEY,
    STATE_FAMILIES,
    StoreParts,
    seq_key,
    slot_meta,
    slot_range,
    state_key,
)

CHECKPOINT_CHUNK = 256
"""User states per checkpoint write (about 1 MB at rank 32)."""
_CHECKPOINT_KEY = b"checkpoint"
_BIASES_KEY = b"biases"
_INSTALLING_KEY = b"installing"
_EXACT_KEY = b"exact"


class Checkpoints(StoreParts):
    """The checkpoint part of :class:`~feature_store.online.OnlineStore`."""

    def _slot(self, slot: int | None) -> int:
        return self.active_slot if slot is None else slot

    @property
    def checkpoint_seq(self) -> int:
        """Every state change of the active version up to this seq is in a stored checkpoint."""
        return self.checkpoint_seq_of(None)

    def checkpoint_seq_of(self, slot: int | None) -> int:
        """The checkpoint watermark of ``slot`` (None: the active slot)."""
        stored = self._cf["meta"].get(slot_meta(_CHECKPOINT_KEY, self._slot(slot)))
        return int.from_bytes(stored, "big") if stored is not None else 0

    def write_checkpoint(
        self,
        states: dict[str, tuple[Sequence[str], StateBatch]],
        biases: bytes,
        upto: int,
        dtype: str = "float64",
        *,
        slot: int | None = None,
        exact: bool = False,
    ) -> None:
        """Store states (``{"users": (ids, batch), "items": ...}``) and biases, covering ``upto``.

        ``exact``: no state of the slot includes a log record after ``upto``
        (nothing was applied while the states were copied), so the log after
        ``upto`` can be applied again from here by any version (see
        :meth:`holds`); a live model's checkpoints are not exact.

        Not synced: the log rebuilds whatever a lost checkpoint held. User
        states go first through :meth:`put_states`, a few hundred per write
        (one write of every dirty user held the GIL, and stalled an event loop
        in this process, for the whole write), without the WAL, and the
        ``users`` family is flushed (RocksDB releases the GIL meanwhile); the
        item states, the biases and the watermark follow in one last write,
        so they move together, after every state they cover is in a table file.
        """
        self._check_writable()
        slot = self._slot(slot)
        if "users" in states:
            self.put_states("users", *states["users"], dtype, slot=slot)
        self._cf["users"].flush(True)  # also what an install's put_states wrote
        batch = rocksdict.WriteBatch(raw_mode=True)
        self._add_checkpoint(
            batch, {k: v for k, v in states.items() if k != "users"}, biases, upto, dtype, slot
        )
        if not exact:
            batch.delete(slot_meta(_EXACT_KEY, slot), self._handles["meta"])
        self._db.write(batch)

    def swap_in(
        self,
        slot: int,
        states: dict[str, tuple[Sequence[str], StateBatch]],
        biases: bytes,
        upto: int,
        dtype: str = "float64",
    ) -> None:
        """Make ``slot`` active with its last states, biases and watermark, in one synced write.

        ``states`` are the few states that changed since the slot's last
        :meth:`write_checkpoint` (a micro-batch's users), written through the
        WAL here, so the write is small and the slot is whole at ``upto``
        whether or not a crash follows: this write is the swap's commit point.
        """
        self._check_writable()
        batch = rocksdict.WriteBatch(raw_mode=True)
        self._add_checkpoint(batch, states, biases, upto, dtype, slot)
        batch.put(ACTIVE_SLOT_KEY, bytes([slot]), self._handles["meta"])
        self._db.write(batch, self._sync)

    def _add_checkpoint(
        self,
        batch: rocksdict.WriteBatch,
        states: dict[str, tuple[Sequence[str], StateBatch]],
        biases: bytes,
        upto: int,
        dtype: str,
        slot: int,
    ) -> None:
        for family, (keys, batch_states) in states.items():
            self._add_states(batch, family, keys, batch_states, dtype, slot)
        meta = self._handles["meta"]
        batch.put(slot_meta(_BIASES_KEY, slot), biases, meta)
        batch.put(slot_meta(_CHECKPOINT_KEY, slot), seq_key(upto), meta)
        batch.put(slot_meta(_EXACT_KEY, slot), seq_key(upto), meta)  # (a caller may delete it)

    def put_states(
        self,
        family: str,
        keys: Sequence[str],
        states: StateBatch,
        dtype: str,
        *,
        slot: int | None = None,
    ) -> None:
        """Write state checkpoints without the WAL and without moving the checkpoint watermark.

        They survive a crash once their family is flushed: the next
        :meth:`write_checkpoint` does that before its watermark moves.
        ``CHECKPOINT_CHUNK`` states per write, other threads getting the GIL
        between writes (a write holds it throughout).
        """
        self._check_writable()
        slot = self._slot(slot)
        without_wal = rocksdict.WriteOptions()
        without_wal.disable_wal = True
        for start in range(0, len(keys), CHECKPOINT_CHUNK):
            part = slice(start, start + CHECKPOINT_CHUNK)
            batch = rocksdict.WriteBatch(raw_mode=True)
            self._add_states(batch, family, keys[part], states.take(part), dtype, slot)
            self._db.write(batch, without_wal)
            time.sleep(0)  # a GIL hand-off point between chunks

    def _add_states(
        self,
        batch: rocksdict.WriteBatch,
        family: str,
        keys: Sequence[str],
        states: StateBatch,
        dtype: str,
        slot: int,
    ) -> None:
        handle = self._handles[family]
        for key, record in zip(keys, encode_states(states, dtype), strict=True):
            batch.put(state_key(key, slot), record, handle)

    def delete_states(self, family: str, keys: Sequence[str], *, slot: int) -> None:
        """Delete states of ``slot`` (users deleted while a candidate was built there)."""
        self._check_writable()
        batch = rocksdict.WriteBatch(raw_mode=True)
        for key in keys:
            batch.delete(state_key(key, slot), self._handles[family])
        self._db.write(batch, self._sync)

    def get_biases(self, *, slot: int | None = None) -> bytes | None:
        """The last checkpoint of the online biases in ``slot`` (None: the active one), if any."""
        return self._cf["meta"].get(slot_meta(_BIASES_KEY, self._slot(slot)))

    def get_states(
        self, keys: Sequence[str], family: str = "users", *, slot: int | None = None
    ) -> tuple[np.ndarray, StateBatch | None]:
        """Which keys have a checkpoint, and the decoded states of those that do."""
        slot = self._slot(slot)
        table = self._cf[family]
        records = [table.get(state_key(key, slot)) for key in keys]
        found = np.array([r is not None for r in records], dtype=bool)
        present = [r for r in records if r is not None]
        return found, decode_states(present) if present else None

    def all_states(
        self, family: str, *, slot: int | None = None
    ) -> tuple[list[str], StateBatch | None]:
        """Every checkpointed state of a family in ``slot`` (the folded-in items are few)."""
        first, end = slot_range(self._slot(slot))
        keys, records = [], []
        cursor = self._cf[family].iter()
        cursor.seek(first)
        while cursor.valid() and cursor.key() < end:
            keys.append(cursor.key()[len(first) :].decode())
            records.append(cursor.value())
            cursor.next()
        return keys, decode_states(records) if records else None

    def holds(self, slot: int) -> tuple[str | None, bool]:
        """The version whose finished state ``slot`` holds (None: none), and whether exactly.

        Exactly: its last checkpoint was :meth:`write_checkpoint`'s ``exact``
        (or a :meth:`swap_in`), so applying the log after its watermark again
        rebuilds the version's state, whichever versions logged those records.
        """
        if self.installing(slot=slot) is not None:
            return None, False
        record = self.get_biases(slot=slot)
        if record is None:
            return None, False
        exact = self._cf["meta"].get(slot_meta(_EXACT_KEY, slot))
        return decode_biases(record)[2], exact is not None and exact == seq_key(
            self.checkpoint_seq_of(slot)
        )

    def installing(self, *, slot: int | None = None) -> str | None:
        """The model version an unfinished :meth:`begin_install` was installing, if any."""
        marker = self._cf["meta"].get(slot_meta(_INSTALLING_KEY, self._slot(slot)))
        return marker.decode() if marker is not None else None

    def begin_install(self, version: str, *, slot: int | None = None) -> None:
        """Mark an install of ``version`` and drop every state checkpoint of ``slot``, synced.

        The log stays. Until :meth:`end_install`, opening the store must
        redo the install (the marker says so).
        """
        self._check_writable()
        slot = self._slot(slot)
        meta = self._handles["meta"]
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.put(slot_meta(_INSTALLING_KEY, slot), version.encode(), meta)
        for family in STATE_FAMILIES:
            batch.delete_range(*slot_range(slot), self._handles[family])
        batch.delete(slot_meta(_BIASES_KEY, slot), meta)
        batch.delete(slot_meta(_CHECKPOINT_KEY, slot), meta)
        self._db.write(batch, self._sync)

    def end_install(self, *, slot: int | None = None) -> None:
        """Clear the install marker (synced): the states now belong to the installed version."""
        self._check_writable()
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.delete(slot_meta(_INSTALLING_KEY, self._slot(slot)), self._handles["meta"])
        self._db.write(batch, self._sync)
