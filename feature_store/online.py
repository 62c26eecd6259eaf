"""The online store: one RocksDB database (through rocksdict) under the data folder.

:class:`OnlineStore` owns the database handle, its column families and the
lock that orders log writes; it opens, checks the format, backs up and
closes. Each concern it serves lives in a module of its own, as a part the
store is assembled from:

* :mod:`feature_store.keyspace`: the column families and key encodings;
* :mod:`feature_store.log`: the observation log (commit, group commit, read);
* :mod:`feature_store.checkpoints`: state checkpoints, biases, the install marker;
* :mod:`feature_store.rated`: the rated-pair index (what top-K excludes);
* :mod:`feature_store.receipts`: idempotency receipts;
* :mod:`feature_store.retention`: trimming the log, and what holds it back;
* :mod:`feature_store.forget`: deleting a user and the tombstone that keeps it final;
* :mod:`feature_store.log_reader`: :class:`LogReader`, another process's view of the log.

Item features are not copied here: they live once, in the model registry's
Parquet artifacts of their version, and the serving tier holds them in memory.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import time
from contextlib import suppress
from pathlib import Path

import rocksdict

from feature_store.checkpoints import Checkpoints
from feature_store.durable_mark import MARK_FILE, read_mark
from feature_store.forget import Forgetting
from feature_store.keyspace import COLUMN_FAMILIES, STORE_FORMAT, check_folder, family_options
from feature_store.log import ObservationLog
from feature_store.log_reader import LogReader
from feature_store.rated import RatedIndex
from feature_store.receipts import Receipt, Receipts
from feature_store.retention import Retention
from feature_store.storage_errors import describe_failure
from velox.errors import DataError

__all__ = ["LogReader", "OnlineStore", "Receipt"]

_FORMAT_KEY = b"format_version"
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux: type, whence, start, len, pid
_open_here: set[Path] = set()  # stores this process holds read-write (their LOCK is ours)
_open_here_lock = threading.Lock()


def open_options(*, accept_loss: bool = False, direct: bool = False) -> rocksdict.Options:
    """The database's options: those of a database of record.

    The write-ahead log is replayed with RocksDB's *TolerateCorruptedTailRecords*
    recovery: a record whose checksum does not match, anywhere in the log,
    refuses the open (the default, *PointInTime*, stops at the first damage
    and silently opens without everything after it), while a record cut
    short at the very end (what a crash leaves of a write it interrupted,
    never acknowledged: acknowledgements wait for the fsync after a whole
    write) is dropped. *AbsoluteConsistency* would refuse that too, so every
    power loss during a write would stop the server for nothing lost. A log
    truncated or deleted is not damage RocksDB can see at all: the durable
    sequence number kept beside it (:mod:`feature_store.durable_mark`)
    catches that. ``accept_loss`` (``velox store recover --accept-loss``)
    opens with *PointInTime*: whatever follows damage is given up.

    Paranoid checks make RocksDB check the files it opens and stop writing
    at the first background error, instead of carrying on past it.

    Every change of the file set (a flush, a compaction) starts a new
    MANIFEST with the current file list instead of appending to the old one:
    a MANIFEST records each table file's smallest and largest key, so an
    appended history would keep the ids of forgotten users that once bounded
    a file. The list is small (a few KB), and changes are rare (one per
    memtable flush or compaction).

    RocksDB's own diagnostic log (``LOG``) is kept to two files of at most
    1 MB, so the store's size on disk stays bounded once retention trims it.

    ``direct``: flushes and compactions write their table files with direct
    I/O, past the page cache. Buffered, a checkpoint's flush (and the
    compaction after it) left megabytes of dirty pages that the filesystem
    wrote out while a group commit's fsync waited behind them: SyncWAL's p99
    with checkpoints was 17.1-24.0 ms against 5.9-8.0 ms with direct I/O
    (``benchmarks/store.py --checkpoints`` on both trees, RESULTS.md). Only where the
    filesystem takes ``O_DIRECT`` (:func:`direct_io_works`).
    """
    options = rocksdict.Options(raw_mode=True)
    recovery = rocksdict.DBRecoveryMode
    options.set_wal_recovery_mode(
        recovery.point_in_time() if accept_loss else recovery.tolerate_corrupted_tail_records()
    )
    options.set_paranoid_checks(True)
    options.create_if_missing(True)
    options.create_missing_column_families(True)
    options.set_max_manifest_file_size(1)
    options.set_max_log_file_size(1 << 20)
    options.set_keep_log_file_num(2)
    options.set_use_direct_io_for_flush_and_compaction(direct)
    return options


def direct_io_works(folder: Path) -> bool:
    """Whether ``folder``'s filesystem takes an aligned ``O_DIRECT`` write (tmpfs before Linux
    6.6, and some network filesystems, refuse it, and RocksDB would then fail every flush)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = folder / ".velox-direct-io-probe"
    block = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    try:
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
        try:
            return os.write(descriptor, block) == len(block)
        finally:
            os.close(descriptor)
    except OSError:
        return False
    finally:
        block.close()
        with suppress(FileNotFoundError):
            probe.unlink()


class OnlineStore(ObservationLog, Checkpoints, Forgetting, RatedIndex, Receipts, Retention):
    """Durable observation log and user-state checkpoints in RocksDB."""

    def __init__(
        self, path: str | Path, *, read_only: bool = False, accept_loss: bool = False
    ) -> None:
        """Open (or create) the store; ``read_only`` opens an existing one without its lock.

        A read-only view sees what was committed when it opened and refuses
        writes; ``velox store inspect`` uses it next to a running server.
        A store whose log lost acknowledged observations refuses to open
        unless ``accept_loss`` (``velox store recover --accept-loss``), which
        opens past damage in its write-ahead log and records what was lost
        (:mod:`feature_store.log`). Every failure is one sentence that names
        the damaged file (:mod:`feature_store.storage_errors`).
        """
        self.path = Path(path)
        self.read_only = read_only
        existed = check_folder(self.path)
        if read_only and not existed:
            raise DataError(f"no Velox store at {self.path}; check the data folder")
        if existed:
            families = set(_column_families(self.path))
            if not set(COLUMN_FAMILIES) <= families:
                raise DataError(
                    f"{self.path} is a RocksDB database but not a Velox store "
                    f"(column families {sorted(families)}); pass another folder"
                )
        self._lock = threading.Lock()
        self._forgets = 0
        self._sync = rocksdict.WriteOptions()
        self._sync.sync = True
        self._check_lock(existed)
        with _open_here_lock:
            self._attach(existed, accept_loss, writable=not read_only)
            if not read_only:
                _open_here.add(self.path.resolve())
        try:
            self._check_format(existed)
        except DataError:
            self.close()
            raise

    def _attach(self, existed: bool, accept_loss: bool, *, writable: bool) -> None:
        """Open the database handle, its column families, the log's numbering and durable mark.

        The mark is read before the database: a server beside a read-only
        view only ever records numbers its log already holds, so the view
        sees them all.
        """
        recorded = read_mark(self.path) if existed else None
        self._db = self._open_database(accept_loss, writable)
        self._cf = {name: self._db.get_column_family(name) for name in COLUMN_FAMILIES}
        self._handles = {name: self._db.get_column_family_handle(name) for name in COLUMN_FAMILIES}
        self._mark = None
        try:
            self._open_log(self.checkpoint_seq)
            self._check_durable(recorded, accept_loss, writable=writable)
        except DataError:
            self._detach(f"store {self.path} could not be opened")
            raise

    def _detach(self, why: str) -> None:
        """Drop the database handle and every view of it; RocksDB closes the database (and
        frees its LOCK) once the last reference is gone. Later use raises ``why``."""
        if self._mark is not None:
            self._mark.close()
            self._mark = None
        self._cf, self._handles = _Detached(why), _Detached(why)
        self._db = None  # type: ignore[assignment]

    def reopen(self) -> None:
        """Close the database handle and open it again in this object: same path, same options.

        For a store whose log write or fsync failed (a full disk): RocksDB
        then refuses every later write (it has no way to resume in rocksdict),
        and a new handle recovers its write-ahead log as a restart would (the
        next sequence number and the durable mark are read again from what is
        on disk). Every holder of this object keeps a valid reference: the
        handle is replaced inside it, under the commit lock. A store that
        cannot be opened read-write (the disk is still full, or another
        thread's iterator still holds the old handle) raises one sentence and
        is left open read-only, so reads go on from what is on disk; call
        again later.
        """
        with self._lock:
            old = self._db
            self._detach(f"store {self.path} is being reopened; retry")
            with suppress(Exception):  # what it could not write, the write-ahead log holds
                old.close()
            del old
            try:
                self._attach(True, False, writable=True)
            except Exception:
                with suppress(Exception):
                    self._attach(True, False, writable=False)
                raise

    def _check_lock(self, existed: bool) -> None:
        """Refuse a store another holder has locked, by who holds it.

        rocksdict raises a bare ``Exception`` whatever went wrong, so the lock
        is checked first, by its state: held in this process (RocksDB's lock
        is a POSIX lock, which closing any descriptor of the file would drop,
        so the file is not even opened then), or held by another process.
        """
        if not self.read_only and existed:
            here = self.path.resolve() in _open_here
            holder = "this process" if here else _lock_holder(self.path)
            if holder is not None:
                raise DataError(
                    f"store {self.path} is in use by {holder} (its LOCK is held); stop that "
                    "process or close the store, or open a read-only view (velox store inspect)"
                )

    def _open_database(self, accept_loss: bool, writable: bool) -> rocksdict.Rdict:
        """The RocksDB handle; a failure is one sentence that names the damaged file."""
        access = rocksdict.AccessType
        # (a new store's folder may not exist yet: its filesystem is its nearest ancestor's)
        here = next(folder for folder in (self.path, *self.path.parents) if folder.is_dir())
        try:
            return rocksdict.Rdict(
                str(self.path),
                open_options(accept_loss=accept_loss, direct=writable and direct_io_works(here)),
                column_families=family_options(),
                access_type=access.read_write() if writable else access.read_only(),
            )
        except Exception as exc:  # rocksdict raises a bare Exception for every failed open
            raise DataError(describe_failure(self.path, exc)) from None

    def _check_format(self, existed: bool) -> None:
        """Refuse a store of a newer format, upgrade an older one, mark a new one.

        A marker missing beside a durable mark was lost with the write-ahead
        log that held it (a loss accepted already); it is written again.
        No column-family view is kept in a local: an error's traceback would
        keep it, and with it the store's lock, alive.
        """
        stored = self._cf["meta"].get(_FORMAT_KEY)
        if stored is None:
            if existed and not (self.path / MARK_FILE).exists():
                raise DataError(f"{self.path} has no Velox format marker; it is not a Velox store")
            if not self.read_only:
                self._cf["meta"][_FORMAT_KEY] = bytes([STORE_FORMAT])
            return
        if stored[0] > STORE_FORMAT:
            raise DataError(
                f"store {self.path} was written by a newer Velox (format {stored[0]}, this one "
                f"reads up to {STORE_FORMAT}); upgrade Velox"
            )
        if stored[0] < STORE_FORMAT and not self.read_only:
            self._upgrade(stored[0])

    def _upgrade(self, found: int) -> None:
        """Bring a store of an earlier format to this one, in one synced write (once).

        The first format's rated index had no sequence numbers (it is rebuilt
        from the log) and its tombstones held the ids (they are re-keyed by
        their hash). Receipts before the third had no time: they count as
        written now, so they expire one ``serve.idempotency_ttl`` from now.
        """
        batch = rocksdict.WriteBatch(raw_mode=True)
        if found < 2:
            self._rebuild_rated(batch)
            self._hash_tombstones(batch)
        self._time_receipts(batch, time.time())
        batch.put(_FORMAT_KEY, bytes([STORE_FORMAT]), self._handles["meta"])
        self._db.write(batch, self._sync)

    def counts(self) -> dict[str, int]:
        """Approximate number of entries per column family (RocksDB's estimate)."""
        return {
            name: self._cf[name].property_int_value("rocksdb.estimate-num-keys") or 0
            for name in COLUMN_FAMILIES
        }

    def scan(self, family: str) -> int:
        """Read every entry of ``family`` with every block's checksum verified; how many.

        An iterator over the whole key range visits every data block of every
        table file the family has, so a damaged block raises here, as a
        :class:`DataError` naming its file. Blocks bypass the cache, so a
        scan beside a server does not evict what it serves from.
        """
        options = rocksdict.ReadOptions()
        options.set_verify_checksums(True)
        options.fill_cache(False)
        count = 0
        try:
            cursor = self._cf[family].iter(options)
            cursor.seek_to_first()
            while cursor.valid():
                count += 1
                cursor.next()
            cursor.status()
        except Exception as exc:  # rocksdict raises a bare Exception for every failed read
            raise DataError(describe_failure(self.path, exc, f"read ({family})")) from None
        return count

    def table_files(self) -> list[Path]:
        """The table files (``.sst``) the database currently uses."""
        return [self.path / entry["name"].lstrip("/") for entry in self._db.live_files()]

    def backup(self, target: str | Path) -> None:
        """A consistent copy of the open store in ``target`` (a RocksDB checkpoint: hard links)."""
        target = Path(target)
        if target.exists():
            raise DataError(f"backup folder {target} already exists; pass a new folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        rocksdict.Checkpoint(self._db).create_checkpoint(str(target))

    def close(self) -> None:
        """Flush and release the database and its lock; a failure is one sentence (DataError).

        The column-family views share the database, so the lock is only
        released once they are dropped too. A store whose disk fails cannot
        flush its memtables: what they hold is in the write-ahead log, which
        the next open replays, so the lock is released all the same.
        """
        if isinstance(self._cf, _Detached):  # already closed
            return
        db = self._db
        self._detach(f"store {self.path} is closed")
        try:
            db.close()  # raises what RocksDB could not write (a failed disk)
        except Exception as exc:  # rocksdict raises a bare Exception for every failure
            raise DataError(describe_failure(self.path, exc, "closed")) from None
        finally:
            del db
            if not self.read_only:
                with _open_here_lock:
                    _open_here.discard(self.path.resolve())

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Detached(dict):
    """The column families of a store without a database handle: every lookup says why."""

    def __init__(self, why: str) -> None:
        super().__init__()
        self.why = why

    def __missing__(self, name: str) -> None:
        raise DataError(self.why)


def _column_families(path: Path) -> list[str]:
    """The column families of the database at ``path`` (read from its MANIFEST)."""
    try:
        return rocksdict.Rdict.list_cf(str(path))
    except Exception as exc:  # rocksdict raises a bare Exception for every failure
        raise DataError(describe_failure(path, exc)) from None


def _lock_holder(path: Path) -> str | None:
    """Which other process holds the store's LOCK (RocksDB's POSIX lock), if any."""
    try:
        descriptor = os.open(path / "LOCK", os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        kind, *_, pid = _FLOCK.unpack(fcntl.fcntl(descriptor, fcntl.F_GETLK, query))
    finally:
        os.close(descriptor)
    return None if kind == fcntl.F_UNLCK else f"another process (pid {pid})"
