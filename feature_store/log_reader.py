"""A second process's read-only view of the log, beside the server that holds the store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import rocksdict

from feature_store.codec import Observation
from feature_store.keyspace import check_folder, family_options, iterate_log, last_seq
from feature_store.log import SYNCED_KEY
from feature_store.storage_errors import describe_failure
from velox.errors import DataError


class LogReader:
    """A second process's view of the log while the server holds the store.

    Opens the database as a RocksDB *secondary* instance (it needs a scratch
    folder of its own and never takes the lock); :meth:`catch_up` replays what
    the primary has written since. This is what the log export pipeline reads.
    """

    def __init__(self, path: str | Path, scratch: str | Path) -> None:
        self.path = Path(path)
        if not check_folder(self.path):
            raise DataError(f"no Velox store at {self.path}; start the server or check the path")
        Path(scratch).mkdir(parents=True, exist_ok=True)
        try:
            self._db = rocksdict.Rdict(
                str(self.path),
                rocksdict.Options(raw_mode=True),
                column_families=family_options(),
                access_type=rocksdict.AccessType.secondary(str(scratch)),
            )
        except Exception as exc:  # rocksdict raises a bare Exception for every failed open
            raise DataError(describe_failure(self.path, exc, "opened for reading")) from None

    def catch_up(self) -> None:
        """See everything the primary has committed so far."""
        self._db.try_catch_up_with_primary()

    @property
    def synced_seq(self) -> int:
        """The newest sequence number known to be on disk, as of the last catch-up.

        A secondary also sees log records written but not yet fsynced; a
        power loss could drop those and let new observations reuse their
        numbers, so an export must not take them.
        """
        stored = self._db.get_column_family("meta").get(SYNCED_KEY)
        if stored is not None:
            return int.from_bytes(stored, "big")
        return last_seq(self._db.get_column_family("log"))  # a store only ever synced

    def log_after(self, seq: int = 0) -> Iterator[tuple[int, Observation]]:
        """Durable logged observations after ``seq`` (up to :attr:`synced_seq`), in order."""
        upto = self.synced_seq
        for number, observation in iterate_log(self._db.get_column_family("log"), seq):
            if number > upto:
                return
            yield number, observation

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
