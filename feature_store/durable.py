"""An online model whose every state survives a crash: log first, checkpoints behind.

:class:`DurableModel` puts an :class:`~velox.model.OnlineModel` over an
:class:`~feature_store.online.OnlineStore`:

* :meth:`DurableModel.observe` applies a micro-batch with the kernels and
  commits what applying it did (:class:`~velox.model.Applied`) in one synced
  write before it returns; the reply to a client may be sent then. Or, with
  ``sync=False``, it logs without the fsync and :meth:`DurableModel.sync_log`
  later makes every batch logged so far durable at once (group commit), off
  the caller's thread.
* User states are a bounded cache: a user's state is read from its checkpoint
  the first time it is needed, and the least recently used *clean* states are
  evicted when the cache is full. A state is dirty while it includes log
  records its checkpoint does not; a background thread writes dirty states
  back (a few hundred per write, each few hundred copied under the locks on
  their own, so writers wait for one such copy at most; then the fold-in
  items and the online biases in one write that also moves the checkpoint
  watermark), and so do eviction and :meth:`close`.
* Opening replays the log after the checkpoint watermark, exactly as it was
  applied (:meth:`~velox.model.OnlineModel.replay`; a user whose stored state
  is ahead of the watermark skips the records it has), so every state after
  a crash equals the state before it: on the CPU bit for bit (live and replay
  run the same in-order loop, :func:`velox.kernels.stream.apply_stream`); on
  the GPU a user's statistics bit for bit, the item biases and fold-ins up to
  the rounding of their sums (live, a batch adds to them user round by user
  round; replay adds in log order).
* Failures surface: failed write-backs and evictions are counted
  (:attr:`DurableModel.failures`) and described (:attr:`DurableModel.problem`),
  and :meth:`DurableModel.observe` refuses new batches with
  :class:`Unavailable` while write-back keeps failing or the cache holds more
  states than :data:`CACHE_LIMIT` times its capacity, so memory stays bounded
  on a failing disk. The first write-back that succeeds (the background
  writer's, or the one a refused observe tries first) lifts the refusal. A
  failed log write or fsync (a full disk fails the log first) leaves memory
  ahead of the log and RocksDB refusing writes: writes are refused, also with
  :class:`Unavailable`, until :meth:`DurableModel.heal` reopens the store and
  recovers as a restart would, which the background writer tries every
  checkpoint interval and a refused observe every :data:`HEAL_BACKOFF`
  seconds, so a disk that has space again heals without a restart.
* Damage RocksDB reports while serving (its status *Corruption*, in a read or
  a write) marks the store damaged for good: writes are refused with
  :class:`Damaged`, one sentence that names the file and says to run
  ``velox store verify`` and restore a backup; reads that need no damaged
  block go on.
* :meth:`DurableModel.delete_user` forgets a user in every store of the
  data folder; ``velox store forget`` and ``DELETE /users/{id}`` both call it.

Locks, always taken in this order: ``_flush_lock`` serialises checkpoints;
``_write_lock`` serialises writers, so the log's order is the order batches
were applied, and keeps a checkpoint from catching a batch between its apply
and its commit; ``_lock`` guards the model itself and is held only while the
model changes or is read (not during the commit), so readers wait at most
one kernel call. The store's own commit lock is taken inside all three.
``_health_lock`` guards only the failure counters and is never held while
another lock is taken. Forgetting holds the first three only to checkpoint
and delete; erasing from files and rewriting Parquet run without them.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from itertools import islice, takewhile
from typing import Any

import numpy as np

from feature_store.checkpoints import CHECKPOINT_CHUNK
from feature_store.codec import (
    StateBatch,
    decode_biases,
    decode_log,
    encode_biases,
)
from feature_store.layout import DataLayout
from feature_store.offline import OfflineStore
from feature_store.online import OnlineStore, Receipt
from feature_store.registry import ModelRegistry
from feature_store.retention import Trimmed, trim
from feature_store.storage_errors import describe_damage, is_corruption
from velox.config import StoreConfig
from velox.errors import DataError, InputError
from velox.model import Applied, OnlineModel, Prediction, UserState, normalize_ids

log = logging.getLogger(__name__)

_REPLAY_CHUNK = 8192
_EVICT_TO = 0.9  # evict down to this share of the capacity, so eviction is not every batch
CACHE_LIMIT = 2
"""Writes are refused while the cache holds more than this many times ``cache_users`` states
(it only can when dirty states cannot be written back, so none can be evicted)."""
REFUSE_AFTER = 3
"""Writes are refused after this many checkpoint write-backs in a row have failed."""
HEAL_BACKOFF = 1
"""Seconds between two attempts of a refused observe to reopen a broken store (and the
``Retry-After`` of a refusal): a reopen replays the log since the checkpoint, so a disk
still full is not asked again on every request."""


@dataclass(frozen=True)
class Forgotten:
    """What forgetting a user removed: log records, offline rows, registry rows."""

    log_records: int
    offline_rows: int
    """Rows of the offline store's data files and lines of its dead letters."""
    registry_rows: int


@dataclass
class _Streak:
    """Failures of one kind in a row: since when, how many, the last one."""

    since: float
    count: int
    error: str


class DurableModel:
    """Observe, predict and forget through a crash-safe store.

    ``model`` must be the model version whose state the store holds (a new
    store takes any): the checkpoints and the log record the version.
    """

    def __init__(
        self,
        model: OnlineModel,
        store: OnlineStore,
        config: StoreConfig | None = None,
        *,
        recover: bool = True,
        slot: int | None = None,
        building: bool = False,
    ) -> None:
        self.model = model
        self.store = store
        self.config = config or StoreConfig()
        self.slot = store.active_slot if slot is None else slot
        """The state slot this model checkpoints to (the active one, or a candidate's)."""
        self._lock = threading.RLock()
        self._write_lock = threading.RLock()
        self._flush_lock = threading.Lock()
        self._tick = 0
        self.cache_hits = self.cache_misses = 0
        self._applied_seq = self._persisted_seq = store.checkpoint_seq_of(self.slot)
        self._broken: str | None = None
        self._corrupt: str | None = None
        self._heal_failure: str | None = None
        self._next_heal = 0.0
        self._opened = _copy_model(model)
        """The model as given, before recovery: :meth:`heal` starts again from a copy of it."""
        self._retired = ""
        self._superseded = ""
        self._building = building
        self.new_users = 0
        """Users this version had no state for when they were first observed (since opening)."""
        self._health_lock = threading.Lock()
        self._failures = {"write_back": 0, "eviction": 0}
        self._streaks: dict[str, _Streak] = {}
        self.recovered = self._recover() if recover else 0
        if self.recovered:
            self.flush()
        self.reapplied = 0
        self._writer: threading.Thread | None = None
        self._start_writer()

    @classmethod
    def install(
        cls,
        model: OnlineModel,
        store: OnlineStore,
        users: tuple[Sequence[str], StateBatch],
        watermark: int,
        config: StoreConfig | None = None,
        *,
        slot: int | None = None,
        building: bool = False,
    ) -> DurableModel:
        """Make a trained version the store's state; the log is kept and re-applied.

        ``users`` are the version's trained user statistics (up to the log
        position ``watermark``). Every checkpoint of the previous version is
        dropped, the trained users are written, and every logged observation
        after ``watermark`` is applied again under the new version, in log
        order (not replayed: its recorded effects belong to the old version).
        A crash part-way leaves the install marker, and the next open must
        install again; the log is never touched.

        ``building``: a candidate version, built in ``slot`` beside the active
        one. The install ends once the trained users are stored, with an
        exact checkpoint at ``watermark``; the caller applies the log after it
        with :meth:`reapply` (resumable after a crash: every checkpoint of a
        model that is building is exact) and :meth:`take_over` makes it active.
        """
        config = config or StoreConfig()
        slot = store.active_slot if slot is None else slot
        store.begin_install(model.version, slot=slot)
        store.put_states("users", *users, config.state_dtype, slot=slot)
        durable = cls(model, store, config, recover=False, slot=slot, building=building)
        durable._applied_seq = watermark
        if not building:
            durable.reapplied = durable.reapply()
            durable._applied_seq = max(durable._applied_seq, store.last_seq)  # all logged is in
        durable.flush(force=True)
        store.end_install(slot=slot)
        return durable

    @classmethod
    def resume(
        cls, model: OnlineModel, store: OnlineStore, config: StoreConfig, slot: int
    ) -> DurableModel:
        """A model over ``slot``'s exact checkpoint, to bring up to the log with :meth:`reapply`
        (a candidate resumed after a restart, a rollback, a swap the pointer did not follow)."""
        durable = cls(model, store, config, recover=False, slot=slot, building=True)
        durable.restore()
        return durable

    def reapply(
        self,
        upto: int | None = None,
        *,
        limit: int | None = None,
        tally: Callable[[np.ndarray, Applied], None] | None = None,
        skip: Callable[[str], bool] | None = None,
    ) -> int:
        """Observe the logged observations after :attr:`applied_seq` again; how many.

        No new log record is written: the log already holds them, applied by
        another version (or none) whose recorded effects are not this one's.
        Stops after ``upto`` (default: the head) or after ``limit`` records.
        ``tally(logged_predictions, applied)`` sees each chunk's predictions
        as logged and the chunk as applied here (the validation gate compares
        the two predictions of each observation); records of
        users for whom ``skip`` is true (forgotten meanwhile) are passed over.
        """
        done = 0
        records = self.store.records_after(self._applied_seq)
        for seqs, chunk in _chunks(records, upto, limit):
            last = int(seqs[-1])
            logged = _Logged.of(decode_log(chunk))
            if skip is not None:
                keep = np.array([not skip(u) for u in logged.users], dtype=bool)
                if not keep.all():
                    logged, seqs = logged.take(keep), seqs[keep]
            if len(seqs):
                with self._lock:
                    self._page_in(logged.users, counting=True)
                    applied = self.model.observe_many(
                        logged.users, logged.items, logged.ratings, logged.timestamps
                    )
                    self._mark(applied, seqs)
                if tally is not None:
                    tally(logged.predictions, applied)
            done += len(seqs)
            self._applied_seq = max(self._applied_seq, last)
            self._shrink()
        return done

    @property
    def applied_seq(self) -> int:
        """The newest log record this model's state includes."""
        return self._applied_seq

    # ---------------------------------------------------------------- serving

    def observe(
        self,
        users: Sequence[Any],
        items: Sequence[Any],
        ratings: Sequence[float] | np.ndarray,
        timestamps: Sequence[float] | np.ndarray | None = None,
        *,
        sync: bool = True,
        receipts: Sequence[Receipt] = (),
    ) -> tuple[Applied, np.ndarray]:
        """Apply and log a micro-batch; the record and its sequence numbers.

        With ``sync`` the log write is durable when this returns; without, it
        is durable after the next :meth:`sync_log` (readers may see its effect
        before: it is applied, only not yet acknowledged). ``receipts`` of
        idempotent requests are stored with the log records. Bad input raises
        :class:`InputError` before anything changes. :class:`Unavailable`
        (nothing logged) if the log write fails, and from then on, for the
        memory is ahead of the log until :meth:`heal` reopens the store (it
        is tried here every :data:`HEAL_BACKOFF` seconds); and (nothing
        applied) while write-back keeps failing or the cache is over its
        limit, until a write-back succeeds. :class:`Damaged` once RocksDB
        reported damage.
        """
        self._admit()
        with self._write_lock:
            with self._lock:
                self._check_usable()
                self._page_in(normalize_ids(users, "user"), counting=True)
                applied = self.model.observe_many(users, items, ratings, timestamps)
            try:
                seqs = self.store.commit(applied, sync=sync, receipts=receipts)
            except Exception as exc:
                raise self._break("a log commit failed", exc) from exc
            with self._lock:
                self._mark(applied, seqs)
        self._shrink()  # the batch is logged: a failed eviction is counted, not raised
        return applied, seqs

    def _admit(self) -> None:
        """Raise :class:`Unavailable` if a new batch would grow memory that cannot be written back.

        While refused, each call first tries one write-back and eviction
        itself, so a disk that works again lifts the refusal at once, with
        or without the background writer; a broken store is reopened
        (:meth:`heal`) at most every :data:`HEAL_BACKOFF` seconds.
        """
        if self._broken is not None and time.monotonic() >= self._next_heal:
            self.heal()
        if self._refusal() is None:
            return
        with suppress(Exception):  # counted in _persist; the refusal below says why
            self.flush()
        self._shrink()
        refusal = self._refusal()
        if refusal is not None:
            raise Unavailable(f"observations are refused: {refusal}")

    def _refusal(self) -> str | None:
        """Why writes are refused now (a clause, with what to do), or None."""
        held, limit = len(self.model.users), CACHE_LIMIT * self.config.cache_users
        if held > limit:
            return (
                f"the cache holds {held} user states, over its limit of {limit}, because they "
                f"cannot be written back ({self._describe_streaks()}); "
                f"fix the disk under {self.store.path} (free space, check its errors)"
            )
        streak = self._streaks.get("write_back")
        if streak is not None and streak.count >= REFUSE_AFTER:
            return (
                f"checkpoint write-back keeps failing ({self._describe_streaks()}); "
                f"fix the disk under {self.store.path} (free space, check its errors)"
            )
        return None

    @property
    def problem(self) -> str | None:
        """None when healthy; else one sentence: what fails, since when, what to do."""
        if self._corrupt is not None:
            return self._corrupt
        if self._broken is not None:
            return self._refuses()
        refusal = self._refusal()
        if refusal is not None:
            return f"observations are refused: {refusal}"
        if self._streaks:
            return f"{self._describe_streaks()}; check the disk under {self.store.path}"
        return None

    @property
    def failures(self) -> dict[str, int]:
        """Failures since this model opened, by kind: ``write_back`` and ``eviction``."""
        with self._health_lock:
            return dict(self._failures)

    def _describe_streaks(self) -> str:
        with self._health_lock:
            streaks = sorted(self._streaks.items(), key=lambda pair: pair[1].since)
        return (
            "; ".join(
                f"{kind.replace('_', '-')} has failed {streak.count} times in a row since "
                f"{time.strftime('%H:%M:%S UTC', time.gmtime(streak.since))} (last: {streak.error})"
                for kind, streak in streaks
            )
            or "no failure recorded"
        )

    def _failed(self, kind: str, exc: Exception) -> None:
        with self._health_lock:
            self._failures[kind] += 1
            streak = self._streaks.setdefault(kind, _Streak(time.time(), 0, ""))
            streak.count += 1
            streak.error = f"{type(exc).__name__}: {exc}"
            count = streak.count
        log.warning("%s failed (%d in a row): %s", kind.replace("_", "-"), count, exc)

    def _succeeded(self, kind: str) -> None:
        with self._health_lock:
            streak = self._streaks.pop(kind, None)
        if streak is not None:
            log.info("%s works again after %d failures", kind.replace("_", "-"), streak.count)

    def sync_log(self) -> None:
        """Make every logged batch durable (see :meth:`OnlineStore.sync_log`); thread-safe.

        If the fsync fails, what the log holds is unknown: the model refuses
        further writes until :meth:`heal` reopens it, like after a failed commit.
        """
        self._check_intact()  # (not retirement: a replaced model's store lives on)
        try:
            self.store.sync_log()
        except Exception as exc:
            raise self._break("a log sync failed", exc) from exc

    def _break(self, what: str, exc: Exception) -> DataError:
        """Refuse writes after a failed log write or fsync (``what``); the error to raise."""
        if is_corruption(exc):
            return self._damaged(exc)
        self._broken = f"{what} ({exc})"
        self._next_heal = time.monotonic() + HEAL_BACKOFF
        return Unavailable(f"observations were not stored: {self._broken}; {self._recovery()}")

    def _refuses(self) -> str:
        """The sentence of a broken store: what failed, and how it recovers."""
        return f"the store refuses writes: {self._broken}; {self._recovery()}"

    def _recovery(self) -> str:
        tried = f" (the last reopen failed: {self._heal_failure})" if self._heal_failure else ""
        return (
            f"free space or fix the disk under {self.store.path}, and the store reopens itself "
            f"and recovers from its log{tried}"
        )

    def _damaged(self, exc: Exception) -> Damaged:
        """Mark the store damaged (for good: writes refused, :attr:`problem` says why)."""
        if self._corrupt is None:
            self._corrupt = describe_damage(self.store.path, exc)
            log.error("%s", self._corrupt)
        return Damaged(self._corrupt)

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Around a read of the store: damage RocksDB reports is raised as :class:`Damaged`."""
        try:
            yield
        except Exception as exc:
            if not is_corruption(exc):
                raise
            raise self._damaged(exc) from None

    def heal(self) -> bool:
        """Reopen a store whose log write or fsync failed, and recover as a restart would.

        Whether writes are taken again. RocksDB refuses every write after a
        failed one (rocksdict cannot resume it), and memory may hold a batch
        the log does not (applied, then its commit failed), so both are
        rebuilt: the store's handle is reopened inside the same
        :class:`OnlineStore` (:meth:`~feature_store.online.OnlineStore.reopen`,
        which keeps every model sharing it valid, a candidate's included),
        the model starts again from a copy of itself as it was given to this
        object, and this slot's checkpoint and the log after it are loaded and
        replayed, exactly as opening does. That is exact: nothing
        acknowledged is lost (an acknowledgement waits for the log's fsync,
        and recovery reads the log), and a batch logged whose fsync failed
        (its requests were refused) is kept if the disk kept it, as after a
        crash. Every lock of this model is held meanwhile, so no read or
        write sees it half done; if the reopen fails (the disk is still
        full), the store stays open read-only for reads and this is tried
        again: by the background writer every checkpoint interval, and by
        :meth:`observe` at most every :data:`HEAL_BACKOFF` seconds.
        """
        with self._flush_lock, self._write_lock, self._lock:
            if self._broken is None or self._corrupt is not None:
                return self._broken is None and self._corrupt is None
            self._next_heal = time.monotonic() + HEAL_BACKOFF
            try:
                self.store.reopen()
                self.model = _copy_model(self._opened)
                self._applied_seq = self._persisted_seq = self.store.checkpoint_seq_of(self.slot)
                replayed = self._recover()  # (no eviction: it waits while the store is broken)
            except Exception as exc:
                self._heal_failure = str(exc)
                log.warning("store %s could not be reopened yet: %s", self.store.path, exc)
                return False
            failed, self._broken, self._heal_failure = self._broken, None, None
        log.warning(
            "store %s reopened after %s: %d logged observations replayed; writes resume",
            self.store.path,
            failed,
            replayed,
        )
        with suppress(Exception):  # counted in _persist, as the background writer's
            self.flush()
        self._shrink()
        return True

    def predict(
        self, user: Any, items: Sequence[Any], *, timeout: float | None = None
    ) -> Prediction:
        """:meth:`OnlineModel.predict` through the cache; :class:`Busy` after ``timeout`` s."""
        return self._read(user, timeout, self.model.predict, items)

    def topk(
        self, user: Any, k: int, *, timeout: float | None = None, **options: Any
    ) -> Prediction:
        """:meth:`OnlineModel.topk` through the cache; :class:`Busy` after ``timeout`` s."""
        return self._read(user, timeout, self.model.topk, k, **options)

    def predict_many(
        self,
        users: Sequence[str],
        item_lists: Sequence[Sequence[str]],
        *,
        timeout: float | None = None,
    ) -> list[Prediction]:
        """:meth:`OnlineModel.predict_many` through the cache; :class:`Busy` after ``timeout`` s."""
        users = normalize_ids(users, "user")
        distinct = list(dict.fromkeys(users))
        return self._locked(distinct, timeout, lambda: self.model.predict_many(users, item_lists))

    def receipt(self, key: str) -> Receipt | None:
        """What the observe request sent with idempotency ``key`` became, if it was logged."""
        with self._reading():
            return self.store.receipt(key)

    @property
    def synced_seq(self) -> int:
        """Every log record up to this sequence number is durable (a retry may be answered)."""
        return self.store.synced_seq

    def latest_export(self) -> dict | None:
        """The newest ``velox export`` report of the offline store beside this store, if any."""
        layout = DataLayout.around(self.store.path)
        if layout is None or not layout.offline.is_dir():
            return None
        return OfflineStore(layout.offline).latest_export()

    @property
    def log_start(self) -> int:
        """Retention trimmed the log before this sequence number (1: nothing trimmed)."""
        return self.store.log_start

    def records(self, first: int, count: int) -> list[bytes] | None:
        """The raw log records ``first .. first + count - 1``; None if any was deleted.

        A retried request's first answer is rebuilt from them
        (:func:`feature_store.codec.decode_log`).
        """
        with self._reading():
            return self.store.records(first, count)

    def rated(self, user: str) -> set[str]:
        """Items the user has rated (from the log's index), for top-K exclusion."""
        with self._reading():
            return self.store.rated(user)

    def user_state(self, user: Any) -> UserState:
        """The user's state (the prior for a user never seen)."""
        return self._read(user, None, self.model.user_state)

    def _read(
        self,
        user: Any,
        timeout: float | None,
        method: Callable[..., Any],
        *args: Any,
        **options: Any,
    ) -> Any:
        keys = normalize_ids([user], "user")
        return self._locked(keys, timeout, lambda: method(user, *args, **options))

    def _locked(self, users: list[str], timeout: float | None, compute: Callable[[], Any]) -> Any:
        """``compute()`` with the model to itself and ``users`` paged in; Busy after ``timeout``."""
        if not self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            raise Busy("the model is busy applying a batch")
        try:
            if self._retired:
                raise Replaced(self._retired)
            self._page_in(users)
            result = compute()
        finally:
            self._lock.release()
        self._shrink()
        return result

    def statistics(self, users: Sequence[str]) -> tuple[np.ndarray, ...]:
        """``(A, b, count, seq, updated)`` of users that have a state, in the order given."""
        with self._lock:
            self._page_in(users)
            rows = self.model.users.find(users)
            if (rows < 0).any():
                missing = [u for u, r in zip(users, rows, strict=True) if r < 0]
                raise InputError(f"no state for users {missing[:5]}")
            return self.model.users.statistics(rows)

    def delete_user(self, user: Any) -> Forgotten:
        """Forget a user everywhere: state, log records, offline rows, registry artifacts.

        ``velox store forget`` and ``DELETE /users/{id}`` both come here. A
        checkpoint is written first, so what the user's observations added to
        the (anonymous) item biases and fold-ins stays consistent with the log
        that remains. Only that and the deletion itself (found through the
        rated index, not a scan of the log) hold the locks; erasing the
        deleted records from RocksDB's files and rewriting the offline
        store's and the registry's Parquet files (when the store is in a data
        folder) run after, while observations and reads go on. If one of those
        fails, the deletion stands and calling again finishes the rest.
        """
        (key,) = normalize_ids([user], "user")
        with self._flush_lock, self._write_lock, self._lock:
            self._check_usable()
            self._persist(self._snapshot())
            records = self.store.delete_user(key)
            if key in self.model.users:
                self.model.users.evict([key])
        self.store.erase(key, records)
        layout = DataLayout.around(self.store.path)
        offline = registry = 0
        if layout is not None and layout.offline.is_dir():
            store = OfflineStore(layout.offline)
            with store.writer(wait=True):  # after a running export has written the user's rows
                offline = store.delete_user(key) + store.forget_dead_letters(key)
        if layout is not None and layout.registry.is_dir():
            registry = ModelRegistry(layout.registry).forget_users({key})
        return Forgotten(len(records), offline, registry)

    def trim(self, keep: int, receipt_ttl: float) -> Trimmed:
        """One retention pass (:func:`feature_store.retention.trim`) while serving goes on.

        Checkpoints first, so the checkpoint watermark holds the log back as
        little as it can; ``keep`` is ``registry.keep``, ``receipt_ttl``
        ``serve.idempotency_ttl``.
        """
        self.flush()
        return trim(self.store, DataLayout.around(self.store.path), keep, receipt_ttl)

    # ------------------------------------------------------------ write-back

    def flush(self, *, force: bool = False) -> int:
        """Write every dirty state, the fold-ins and the biases; how many users were written."""
        with self._flush_lock:
            with self._write_lock, self._lock:
                if not self._writable:  # memory may hold effects the log does not
                    return 0
                if self._applied_seq == self._persisted_seq and not force:
                    return 0
                snapshot = self._snapshot()
            self._persist(snapshot)
        return len(snapshot[0])

    def close(self) -> None:
        """Stop the background writer, write everything back, close the store.

        On a failing disk the last checkpoint, or RocksDB's own flush, may
        fail: nothing acknowledged is lost (the log holds it, and the next open
        replays it), so that is one warning, and the store is released all
        the same; a server stopped on a full disk exits cleanly.
        """
        self._stop_writer()
        try:
            if self._writable and not self._retired:
                self.flush()
        except Exception as exc:
            log.warning(
                "store %s: the last checkpoint failed (%s); the next open replays the log",
                self.store.path,
                exc,
            )
        try:
            self.store.close()
        except DataError as exc:
            log.warning("%s; the next open replays the log, which holds every write", exc)

    # ------------------------------------------------------------------ swap

    @contextmanager
    def writes_held(self) -> Iterator[None]:
        """No batch is applied or committed meanwhile (a swap's critical section).

        A broken model refuses: after a failed write or fsync only a reopen may
        trust the log, so no version takes over from it.
        """
        with self._write_lock:
            self._check_intact()
            yield

    def take_over(self, config: StoreConfig) -> None:
        """Become the store's active version: one synced write, then serve with ``config``.

        Called by a swap with the active model's writes held (:meth:`writes_held`),
        after :meth:`reapply` reached the log's head. Only states changed since
        this model's last (exact) checkpoint go in the write (a micro-batch's
        users), with the biases, the watermark and the flip of the active slot
        (:meth:`~feature_store.checkpoints.Checkpoints.swap_in`): a crash on
        either side of it leaves one whole version active.
        """
        self._check_intact()
        with self._flush_lock, self._write_lock, self._lock:
            users, items = self.model.users, self.model.items
            user_rows, item_rows = users.dirty(), items.dirty()
            user_keys = [users.keys[r] for r in user_rows]
            item_keys = [items.keys[r] for r in item_rows]
            user_stats, item_stats = users.statistics(user_rows), items.statistics(item_rows)
            upto = self._applied_seq
            states = {
                "users": (user_keys, StateBatch(*user_stats)),
                "items": (item_keys, StateBatch(*item_stats)),
            }
            biases = encode_biases(self.model.biases.online_state(), upto, self.model.version)
            self.store.swap_in(self.slot, states, biases, upto, self.config.state_dtype)
            users.mark_saved(user_keys, user_stats[3])
            items.mark_saved(item_keys, item_stats[3])
            self._persisted_seq = upto
            self._building = False
            self.config = config
        self._start_writer()

    def drop_users(self, users: Sequence[str]) -> None:
        """Drop users from memory and from this model's slot, written back or not.

        For users deleted from the store while this model is a candidate
        (the deletion went through the active model): a checkpoint under way
        may have copied them, so they are deleted again after it.
        """
        with self._flush_lock, self._write_lock, self._lock:
            table = self.model.users
            table.evict([user for user in users if user in table])
            self.store.delete_states("users", users, slot=self.slot)

    def supersede(self, reason: str) -> None:
        """Refuse writes from now on (:class:`Replaced`: callers go to the new active model).

        Reads are still answered, from a state that no longer changes, so a
        request that began before a swap finishes on this version.
        """
        self._superseded = reason

    def seal(self) -> None:
        """After :meth:`supersede`: stop the writer and leave an exact checkpoint of this slot.

        Rolling back to this version applies the log after it again (the
        same swap, the other way), so the version's state is kept whole here.
        """
        self._stop_writer()
        self.flush(force=True)

    def release(self) -> None:
        """Stop without writing more (a candidate given up); the store stays open."""
        self._stop_writer()
        self._retired = self._retired or "this model was released"

    def _start_writer(self) -> None:
        self._stop = threading.Event()
        self._writer = None
        if self.config.checkpoint_interval > 0 and not self._building:
            self._writer = threading.Thread(
                target=self._write_back_loop, name="velox-write-back", daemon=True
            )
            self._writer.start()

    def _stop_writer(self) -> None:
        self._stop.set()
        if self._writer is not None:
            self._writer.join()

    def __enter__(self) -> DurableModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_back_loop(self) -> None:
        """Write dirty states back every interval; a failure is retried at the next one.

        Failures do not only go to the log: they are counted, described by
        :attr:`problem`, and refuse writes after :data:`REFUSE_AFTER` in a row.
        While the store is broken, each interval tries to :meth:`heal` it instead.
        """
        while not self._stop.wait(self.config.checkpoint_interval):
            if self._broken is not None:
                self.heal()
                continue
            try:
                self.flush()
            except Exception:  # counted in _persist, and surfaces as problem and refusals
                continue
            self._shrink()  # states written back can now be evicted

    def _snapshot(self) -> tuple[list[str], tuple[list[str], tuple], bytes, int, bool]:
        """What a checkpoint must hold now (called with ``_write_lock`` and ``_lock`` held).

        The dirty users' keys only (:meth:`_persist` copies their states in
        chunks), copies of the dirty fold-in items' states (few), the biases
        and the watermark.
        """
        users, items = self.model.users, self.model.items
        rows = items.dirty()
        upto = self._applied_seq
        biases = encode_biases(self.model.biases.online_state(), upto, self.model.version)
        dirty_items = ([items.keys[r] for r in rows], items.statistics(rows))
        exact = self._building or bool(self._superseded)  # nothing applies while it is copied
        return [users.keys[r] for r in users.dirty()], dirty_items, biases, upto, exact

    def _persist(self, snapshot: tuple) -> None:
        """Write a snapshot as a checkpoint; every outcome is counted (see :attr:`problem`).

        User states are copied :data:`CHECKPOINT_CHUNK` at a time, each chunk
        under the writer and model locks, and written before the next is
        copied: a commit waits for one chunk's copy at most, not for a copy of
        every dirty state (up to hundreds of MB at rank 32, which stalled
        observe). A state copied after ``upto`` may include later log
        records; it records their sequence number, and recovery skips them
        for that user, as after a checkpoint that crashed part-way. A store
        that broke meanwhile (memory ahead of the log) stops the checkpoint
        before its watermark moves.
        """
        user_keys, items, biases, upto, exact = snapshot
        saved: list[tuple[list[str], np.ndarray]] = []
        try:
            for start in range(0, len(user_keys), CHECKPOINT_CHUNK):
                with self._write_lock, self._lock:
                    if not self._writable:
                        return
                    table = self.model.users
                    keys = [k for k in user_keys[start : start + CHECKPOINT_CHUNK] if k in table]
                    stats = table.statistics(table.find(keys))
                self.store.put_states(
                    "users", keys, StateBatch(*stats), self.config.state_dtype, slot=self.slot
                )
                saved.append((keys, stats[3]))
            states = {"items": (items[0], StateBatch(*items[1]))} if items[0] else {}
            self.store.write_checkpoint(
                states, biases, upto, self.config.state_dtype, slot=self.slot, exact=exact
            )
        except Exception as exc:
            if is_corruption(exc):
                raise self._damaged(exc) from None
            self._failed("write_back", exc)
            raise
        self._succeeded("write_back")
        with self._lock:
            self._persisted_seq = upto
            for keys, seqs in saved:
                self.model.users.mark_saved(keys, seqs)
            self.model.items.mark_saved(items[0], items[1][3])

    def _shrink(self) -> None:
        """Evict least recently used clean users while the cache is over capacity.

        Dirty users are written back first if too few are clean. A failure
        is counted (:attr:`failures`) and never raised: the callers' batch or
        read has done its work, and :meth:`observe` refuses new batches
        before the cache outgrows :data:`CACHE_LIMIT`.
        """
        capacity = self.config.cache_users
        if len(self.model.users) <= capacity or self._broken is not None:
            return
        try:
            self._evict(capacity)
        except Exception as exc:
            self._failed("eviction", exc)
            return
        self._succeeded("eviction")

    def _evict(self, capacity: int) -> None:
        """Under the write lock: a batch between its apply and its commit has
        rows that look clean (not yet marked) and must not be evicted."""
        table = self.model.users
        with self._write_lock, self._lock:
            need = len(table) - int(capacity * _EVICT_TO)
            clean = np.flatnonzero(table.seq[: len(table)] == table.saved[: len(table)])
        if clean.size < need:
            self.flush()
        with self._write_lock, self._lock:
            n = len(table)
            clean = np.flatnonzero(table.seq[:n] == table.saved[:n])
            need = n - int(capacity * _EVICT_TO)
            oldest = clean[np.argsort(table.used[clean], kind="stable")[:need]]
            table.evict([table.keys[r] for r in oldest])

    # --------------------------------------------------------------- internals

    def _check_usable(self) -> None:
        if self._retired or self._superseded:
            raise Replaced(self._retired or self._superseded)
        self._check_intact()

    @property
    def _writable(self) -> bool:
        """Neither broken (memory may be ahead of the log) nor damaged."""
        return self._broken is None and self._corrupt is None

    def _check_intact(self) -> None:
        if self._corrupt is not None:
            raise Damaged(self._corrupt)
        if self._broken is not None:
            raise Unavailable(self._refuses())

    def _page_in(self, users: Sequence[str], *, counting: bool = False) -> None:
        """Load the checkpoints of users not in memory (a user never seen stays absent).

        ``counting``: users about to be observed; those with no state at all
        are new to this version (:attr:`new_users`).
        """
        table = self.model.users
        if len(users) == 1:  # the read path: one user, usually cached
            row = table.find(users)[0]
            if row >= 0:
                self.cache_hits += 1
                self._tick += 1
                table.used[row] = self._tick
                return
        wanted = list(dict.fromkeys(users))
        missing = [u for u, r in zip(wanted, table.find(wanted), strict=True) if r < 0]
        self.cache_misses += len(missing)
        self.cache_hits += len(wanted) - len(missing)
        if missing:
            with self._reading():
                found, states = self.store.get_states(missing, slot=self.slot)
            if counting:
                self.new_users += int(len(found) - found.sum())
            if states is not None:
                keys = [u for u, f in zip(missing, found, strict=True) if f]
                table.load(
                    keys, states.A, states.b, states.count, seq=states.seq, updated=states.updated
                )
        self._tick += 1
        rows = table.find(wanted)
        table.used[rows[rows >= 0]] = self._tick

    def _mark(self, applied: Applied, seqs: np.ndarray) -> None:
        self.model.users.mark(self.model.users.find(applied.users), seqs)
        if applied.cold.any():
            cold = np.flatnonzero(applied.cold)
            rows = self.model.items.find([applied.items[p] for p in cold])
            self.model.items.mark(rows, seqs[cold])
        self._applied_seq = int(seqs[-1])

    def restore(self) -> None:
        """Load the slot's checkpointed biases and fold-in items (users come on demand)."""
        stored = self.store.get_biases(slot=self.slot)
        if stored is not None:
            biases, _, version = decode_biases(stored)
            if version != self.model.version:
                raise DataError(
                    f"store {self.store.path} holds the online state of model version "
                    f"{version!r}, not {self.model.version!r}; serve that version, or start "
                    "a new store for this one"
                )
            self.model.biases.restore(biases)
        keys, items = self.store.all_states("items", slot=self.slot)
        if items is not None:
            self.model.items.load(
                keys, items.A, items.b, items.count, seq=items.seq, updated=items.updated
            )

    def _recover(self) -> int:
        """Restore the checkpoint, then replay the log after it; how many records were replayed.

        The replayed states are dirty; the caller writes them back (a flush).
        """
        self.restore()
        replayed = 0
        for seqs, records in _chunks(self.store.records_after(self._applied_seq)):
            first = 0
            for applied in decode_log(records):
                part = seqs[first : first + len(applied)]
                first += len(applied)
                self._page_in(applied.users)
                rows = self.model.users.find(applied.users)
                # A user's stored state may be ahead of the watermark (a checkpoint that
                # crashed after its user writes, before its last one): it has these already.
                have = rows >= 0
                have[have] = self.model.users.seq[rows[have]] >= part[have]
                try:
                    self.model.replay(applied, users_have=have)
                except InputError as exc:
                    raise DataError(f"store {self.store.path} cannot be recovered: {exc}") from None
                self._mark(applied, part)
            replayed += len(records)
            self._shrink()
        if replayed:
            log.info("recovered %d logged observations after checkpoint", replayed)
        return replayed


class Busy(DataError):
    """A read could not get the model within its deadline (a batch is being applied)."""


class Replaced(DataError):
    """This model has handed its store to another version; ask the new one."""


class Unavailable(DataError):
    """Writes are refused because the disk fails (the log, or checkpoints); nothing was applied.

    Retrying later may succeed: after a failed checkpoint write-back once one
    succeeds again, after a failed log write or fsync once the store is
    reopened (:meth:`DurableModel.heal`), which is tried by itself.
    """

    retry_after = HEAL_BACKOFF
    """Seconds a client should wait before it retries."""


class Damaged(DataError):
    """RocksDB reported damage: writes are refused until the store is restored from a backup."""


def _copy_model(model: OnlineModel) -> OnlineModel:
    """A copy of ``model`` to change apart from it; the item features never change, so shared."""
    return copy.deepcopy(
        model, {id(model.features): model.features, id(model.backend): model.backend}
    )


def _chunks(
    records: Iterator[tuple[int, bytes]], upto: int | None = None, limit: int | None = None
) -> Iterator[tuple[np.ndarray, list[bytes]]]:
    """Log records in chunks of :data:`_REPLAY_CHUNK`, up to seq ``upto`` or ``limit`` records."""
    if upto is not None:
        records = takewhile(lambda record: record[0] <= upto, records)
    if limit is not None:
        records = islice(records, limit)
    while chunk := list(islice(records, _REPLAY_CHUNK)):
        yield np.array([seq for seq, _ in chunk], dtype=np.int64), [r for _, r in chunk]


@dataclass(frozen=True)
class _Logged:
    """The columns of logged observations that applying them again needs, and their predictions."""

    users: list[str]
    items: list[str]
    ratings: np.ndarray
    timestamps: np.ndarray
    predictions: np.ndarray
    """What the version that logged each observation predicted for it."""

    @classmethod
    def of(cls, runs: Sequence[Applied]) -> _Logged:
        return cls(
            [u for run in runs for u in run.users],
            [i for run in runs for i in run.items],
            np.concatenate([run.ratings for run in runs]),
            np.concatenate([run.timestamps for run in runs]),
            np.concatenate([run.predictions for run in runs]),
        )

    def take(self, keep: np.ndarray) -> _Logged:
        rows = np.flatnonzero(keep)
        return _Logged(
            [self.users[r] for r in rows],
            [self.items[r] for r in rows],
            self.ratings[rows],
            self.timestamps[rows],
            self.predictions[rows],
        )
