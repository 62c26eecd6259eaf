"""The RocksDB online store: synced commits, the log, state checkpoints, clear refusals on open."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from feature_store.codec import StateBatch
from feature_store.keyspace import STORE_FORMAT
from feature_store.online import LogReader, OnlineStore, direct_io_works
from tests.factories import applied
from velox.errors import DataError


def test_commits_get_contiguous_sequence_numbers_across_reopen(tmp_path):
    with OnlineStore(tmp_path / "db") as store:
        assert store.last_seq == 0
        first = store.commit(applied(["u1", "u2"], ["i1", "i2"], [4.0, 2.5], [10.0, 11.0]))
        second = store.commit(applied(["u1"], ["i9"], [5.0], [12.0]))
    assert first.tolist() == [1, 2] and second.tolist() == [3]
    with OnlineStore(tmp_path / "db") as store:
        assert store.last_seq == 3
        assert store.commit(applied(["u3"], ["i1"], [1.0], [13.0])).tolist() == [4]
        logged = list(store.log_after(0))
        assert [seq for seq, _ in logged] == [1, 2, 3, 4]
        assert logged[2][1].user == "u1" and logged[2][1].item == "i9"
        assert logged[2][1].rating == 5.0 and logged[2][1].ts == 12.0
        assert [seq for seq, _ in store.log_after(2)] == [3, 4]


def test_user_states_round_trip_through_checkpoints(tmp_path):
    rng = np.random.default_rng(0)
    M = rng.normal(size=(2, 3, 3))
    states = StateBatch(
        M @ M.transpose(0, 2, 1) + np.eye(3),
        rng.normal(size=(2, 3)),
        np.array([4, 7]),
        np.array([10, 12]),
        np.array([1.5, 2.5]),
    )
    with OnlineStore(tmp_path / "db") as store:
        assert store.checkpoint_seq == 0 and store.get_biases() is None
        store.write_checkpoint({"users": (["a", "b"], states)}, b"biases", upto=12)
    with OnlineStore(tmp_path / "db") as store:
        found, back = store.get_states(["b", "zz", "a"])
        assert store.checkpoint_seq == 12 and store.get_biases() == b"biases"
        assert store.all_states("items") == ([], None)
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(back.A, states.A[[1, 0]])
    np.testing.assert_array_equal(back.seq, [12, 10])


def _options_say_direct_io(folder) -> bool:
    """What the newest OPTIONS file RocksDB wrote records for direct I/O of flushes."""
    newest = max(folder.glob("OPTIONS-*"), key=lambda path: int(path.name.split("-")[1]))
    return "use_direct_io_for_flush_and_compaction=true" in newest.read_text()


def _checkpoint_round_trips(folder) -> None:
    state = StateBatch(
        np.eye(3)[None] * 2, np.ones((1, 3)), np.array([1]), np.array([5]), np.zeros(1)
    )
    with OnlineStore(folder) as store:
        store.write_checkpoint({"users": (["a"], state)}, b"biases", upto=5)  # (flushes the family)
    with OnlineStore(folder) as store:
        found, back = store.get_states(["a"])
        assert found.tolist() == [True] and store.checkpoint_seq == 5
    np.testing.assert_array_equal(back.A, state.A)


def test_flushes_bypass_the_page_cache_where_the_filesystem_allows(tmp_path):
    assert direct_io_works(tmp_path) == hasattr(os, "O_DIRECT")  # ext4, xfs, tmpfs >= 6.6
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind
    _checkpoint_round_trips(tmp_path / "db")
    assert _options_say_direct_io(tmp_path / "db") == direct_io_works(tmp_path)


def test_a_filesystem_without_direct_io_gets_buffered_flushes(tmp_path, monkeypatch):
    # A filesystem refusing O_DIRECT (older tmpfs, some network mounts) cannot be mounted
    # here: its answer, EINVAL at open, is injected.
    def refuse(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    real_open = os.open
    monkeypatch.setattr(os, "open", refuse)
    assert not direct_io_works(tmp_path)
    assert list(tmp_path.iterdir()) == []
    _checkpoint_round_trips(tmp_path / "db")
    assert not _options_say_direct_io(tmp_path / "db")


def test_a_folder_of_other_files_is_not_a_store_and_is_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="is not a Velox store"):
        OnlineStore(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(DataError, match="is a file, not a folder"):
        OnlineStore(tmp_path / "notes.txt")


def test_a_store_from_a_newer_format_is_refused(tmp_path):
    with OnlineStore(tmp_path / "db") as store:
        store._cf["meta"][b"format_version"] = bytes([STORE_FORMAT + 1])
    with pytest.raises(DataError, match="newer Velox"):
        OnlineStore(tmp_path / "db")


def test_a_store_held_by_another_process_is_refused(tmp_path):
    path = tmp_path / "db"
    OnlineStore(path).close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from feature_store.online import LogReader, OnlineStore
            store = OnlineStore({str(path)!r})
            print("open", flush=True)
            sys.stdin.read()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(DataError, match="in use by another process"):
            OnlineStore(path)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    OnlineStore(path).close()  # free again once the holder has gone


def test_a_store_open_in_this_process_is_refused_and_keeps_its_lock(tmp_path):
    path = tmp_path / "db"
    with OnlineStore(path) as store:
        with pytest.raises(DataError, match="in use by this process"):
            OnlineStore(path)
        store.commit(applied(["u1"], ["i1"], [4.0], [1.0]))  # the first handle still writes
    OnlineStore(path).close()  # and the lock is free once it is closed


def test_a_second_process_reads_the_log_while_the_server_holds_the_store(tmp_path):
    path = tmp_path / "db"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys
            from feature_store.online import OnlineStore
            from tests.factories import applied
            store = OnlineStore({str(path)!r})
            for line in sys.stdin:
                user, *unsynced = line.split()
                if user == "!sync":
                    store.sync_log()
                    print("synced", flush=True)
                    continue
                seqs = store.commit(applied([user], ["i"], [3.0], [1.0]), sync=not unsynced)
                print(seqs[-1], flush=True)
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        writer.stdin.write("a\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "1"
        with LogReader(path, tmp_path / "scratch") as reader:
            assert [o.user for _, o in reader.log_after(0)] == ["a"]
            for user in ("b", "c"):
                writer.stdin.write(f"{user}\n")
                writer.stdin.flush()
                writer.stdout.readline()
            reader.catch_up()
            assert [(s, o.user) for s, o in reader.log_after(1)] == [(2, "b"), (3, "c")]
            for line in ("d unsynced", "e unsynced"):  # written, not yet fsynced: not exported
                writer.stdin.write(f"{line}\n")
                writer.stdin.flush()
                writer.stdout.readline()
            reader.catch_up()
            assert reader.synced_seq == 3 and list(reader.log_after(3)) == []
            writer.stdin.write("!sync\n")
            writer.stdin.flush()
            assert writer.stdout.readline().strip() == "synced"
            reader.catch_up()
            assert reader.synced_seq == 5
            assert [(s, o.user) for s, o in reader.log_after(3)] == [(4, "d"), (5, "e")]
    finally:
        writer.stdin.close()
        writer.wait(timeout=30)


def test_a_log_reader_without_a_store_says_so(tmp_path):
    with pytest.raises(DataError, match="no Velox store"):
        LogReader(tmp_path / "absent", tmp_path / "scratch")


def test_the_rated_index_finds_a_users_records_even_when_one_id_begins_another(tmp_path):
    with OnlineStore(tmp_path / "db") as store:
        store.commit(applied(["a", "a\0b", "a", "ab"], ["x", "y", "z", "x"], [1.0] * 4, [1.0] * 4))
        assert store.rated("a") == {"x", "z"} and store.rated("a\0b") == {"y"}
        assert store.user_records("a") == [1, 3] and store.user_records("ab") == [4]
        assert store.delete_user("a") == [1, 3]
        assert [seq for seq, _ in store.log_after(0)] == [2, 4]
        assert store.rated("a\0b") == {"y"} and store.forgotten(["a", "ab"]) == {"a"}


def test_a_store_of_the_first_format_is_upgraded_once_on_opening(tmp_path):
    path = tmp_path / "db"
    with OnlineStore(path) as store:
        store.commit(applied(["u1", "u2", "u1"], ["i1", "i2", "i3"], [1.0] * 3, [1.0] * 3))
        rated, forgotten, meta = (store._cf[name] for name in ("rated", "forgotten", "meta"))
        for key in list(rated.keys()):  # what the first format wrote
            del rated[key]
        for user, item in (("u1", "i1"), ("u2", "i2"), ("u1", "i3")):
            rated[f"{user}\0{item}".encode()] = b""
        forgotten[b"gone"] = (2).to_bytes(8, "big")
        meta[b"format_version"] = bytes([1])
        del rated, forgotten, meta  # views keep the database open
    with OnlineStore(path) as store:
        assert store.rated("u1") == {"i1", "i3"} and store.user_records("u1") == [1, 3]
        assert store.forgotten(["gone", "u1"]) == {"gone"}
        assert b"gone" not in list(store._cf["forgotten"].keys())  # keyed by its hash now


def test_receipts_of_the_second_format_get_the_upgrades_time_and_expire_from_it(tmp_path):
    path = tmp_path / "db"
    with OnlineStore(path) as store:
        meta = store._cf["meta"]
        meta[b"request\0k1"] = struct.pack(">QI", 7, 3) + b"d" * 16  # what format 2 wrote
        meta[b"format_version"] = bytes([2])
        del meta
    before = time.time()
    with OnlineStore(path) as store:
        receipt = store.receipt("k1")
        assert (receipt.first, receipt.count, receipt.digest) == (7, 3, b"d" * 16)
        assert before <= receipt.written <= time.time()
        assert store.expire_receipts(receipt.written) == 0
        assert store.expire_receipts(receipt.written + 1) == 1 and store.receipt("k1") is None
