"""The terms the model and its HTTP client share: what an id is, which exploration modes exist.

Both :mod:`velox.model` and :mod:`velox.client` take user and item ids from
callers and name an exploration mode for top-K. The rules live here once, in a
module that imports nothing but the standard library, so that the HTTP client
can apply them without loading NumPy, Numba or the model.

>>> normalize_ids(["alice", 42], "user")
['alice', '42']
>>> normalize_ids([True], "item")
Traceback (most recent call last):
    ...
velox.errors.InputError: item ids must be strings or integers, got True
>>> EXPLORE_MODES
('none', 'ucb', 'thompson')
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral
from typing import Any, Literal, get_args

from velox.errors import InputError

Id = str | int
"""A user or item id as callers give it: a string, or an integer that stands for its digits."""

Explore = Literal["none", "ucb", "thompson"]
"""How top-K explores: not at all, LinUCB's bonus, or Thompson sampling (DESIGN.md section 3)."""

EXPLORE_MODES: tuple[str, ...] = get_args(Explore)


def normalize_ids(ids: Iterable[Any], what: str) -> list[str]:
    """Ids as strings: integers (NumPy's included) become their digits; empty or other types fail.

    ``what`` ("user", "item") names the ids in the error. A bool is refused
    although Python counts it as an integer: ``True`` is a mistake, not id 1.
    """
    ids = list(ids)
    if all(type(value) is str and value for value in ids):  # the common case, checked fast
        return ids
    return [normalize_id(value, what) for value in ids]


def normalize_id(value: Any, what: str) -> str:
    """One id as :func:`normalize_ids` turns it into a string."""
    if isinstance(value, bool) or not isinstance(value, str | Integral):
        raise InputError(f"{what} ids must be strings or integers, got {value!r}")
    text = str(value)
    if not text:
        raise InputError(f"{what} ids must not be empty")
    return text
