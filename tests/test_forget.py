"""Forgetting a user leaves no byte of their id anywhere in the data folder, by either path.

``velox store forget`` and :meth:`DurableModel.delete_user` (what
``DELETE /users/{id}`` calls) are run on the same data folder, built as a
server builds it: a registry version that trained the user, the online store
with their observations in table files, the write-ahead log and checkpoints,
and the offline store's Parquet files. Then every file of the folder is read
for the id's UTF-8 bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from feature_store.durable import DurableModel
from feature_store.layout import DataLayout
from feature_store.offline import DEAD_LETTERS, OfflineStore, log_rows
from feature_store.online import OnlineStore
from feature_store.registry import ModelRegistry
from tests.test_cli import velox
from tests.test_store_cli import _durable, _with_model, trained_artifacts

USER = "forget-me-7f3a"
OTHERS = ["ann", "bob", "cy"]


def _holders(root: Path) -> list[str]:
    """Every file under ``root`` that holds the user's id."""
    needle = USER.encode()
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and needle in path.read_bytes()
    )


@pytest.fixture
def data(tmp_path) -> DataLayout:
    """A data folder where the user is in every store, on disk and in the write-ahead log."""
    layout = DataLayout(tmp_path / "data")
    _with_model(layout, trained_artifacts([*OTHERS, USER], items=6))
    rng = np.random.default_rng(1)
    for session in range(2):  # reopening moves the first session's log into table files
        with _durable(layout) as durable:
            for day in range(2 * session, 2 * session + 2):
                _observe(durable, rng, day)
    with OnlineStore(layout.online, read_only=True) as store:
        OfflineStore(layout.offline).append(log_rows(store.log_after(0)))
    _reject_one_of_the_users_records(layout)
    return layout


def _reject_one_of_the_users_records(layout: DataLayout) -> None:
    """A dead letter of the user as ``velox export`` writes it: its raw record in base64.

    The byte search cannot see base64, so the tests decode the dead letters too.
    """
    import base64
    import json

    folder = layout.offline / DEAD_LETTERS
    folder.mkdir(parents=True)
    raw = base64.b64encode(b"\x09" + USER.encode() + b"\x00i3 truncated").decode()
    letters = [
        {"seq": 7, "reason": "record is truncated", "record": raw, "user": USER},
        {"seq": 9, "reason": "rating is not a number", "record": "AAAA", "user": "ann"},
    ]
    (folder / "seq-1-100.jsonl").write_text("".join(json.dumps(x) + "\n" for x in letters))


def _dead_letter_users(layout: DataLayout) -> list[str]:
    import base64
    import json

    lines = [
        json.loads(line)
        for path in (layout.offline / DEAD_LETTERS).glob("*.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert all(USER.encode() not in base64.b64decode(x["record"]) for x in lines)
    return [x["user"] for x in lines]


def _observe(durable: DurableModel, rng: np.random.Generator, day: int) -> None:
    users = rng.choice([*OTHERS, USER], size=30).tolist()
    items = rng.choice([f"i{j}" for j in range(8)], size=30).tolist()
    durable.observe(users, items, rng.integers(1, 6, 30), np.full(30, 1.7e9 + day * 86400))


def _forget_through_the_cli(layout: DataLayout) -> None:
    done = velox("--set", f"data.dir={layout.root}", "store", "forget", USER)
    assert done.returncode == 0, done.stderr
    assert "1 registry rows" in done.stdout


def _forget_through_the_model(layout: DataLayout) -> None:
    with _durable(layout) as durable:
        _observe(durable, np.random.default_rng(2), 5)  # only in the write-ahead log yet
        gone = durable.delete_user(USER)
        assert gone.log_records > gone.offline_rows > 0
        assert gone.registry_rows == 1
        assert _holders(layout.root) == []  # already while the store stays open


@pytest.mark.parametrize("forget", [_forget_through_the_cli, _forget_through_the_model])
def test_no_byte_of_a_forgotten_user_is_left_in_the_data_folder(data, forget):
    assert len(_holders(data.root)) >= 3  # the registry, the offline store, the online store
    with OnlineStore(data.online, read_only=True) as store:
        others = [(seq, o) for seq, o in store.log_after(0) if o.user != USER]
        last = store.last_seq
    forget(data)
    assert _holders(data.root) == []
    assert _dead_letter_users(data) == ["ann"]
    with OnlineStore(data.online, read_only=True) as store:
        assert [(seq, o) for seq, o in store.log_after(0) if seq <= last] == others  # untouched
    with _durable(data) as durable:
        assert not durable.user_state(USER).known
        assert all(durable.user_state(user).known for user in OTHERS)
    assert USER not in ModelRegistry(data.registry).load(1).user_ids
