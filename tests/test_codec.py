"""Binary state records: exact round trips, sizes, and refusal of foreign or newer data."""

from __future__ import annotations

import numpy as np
import pytest

from feature_store.codec import (
    FORMAT_VERSION,
    StateBatch,
    decode_states,
    encode_states,
    state_size,
)
from velox import kernels
from velox.errors import DataError


def states(n: int = 5, d: int = 6, seed: int = 0) -> StateBatch:
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(n, d, d))
    return StateBatch(
        A=M @ M.transpose(0, 2, 1) + np.eye(d),
        b=rng.normal(size=(n, d)),
        count=rng.integers(0, 10**9, n),
        seq=rng.integers(1, 10**12, n),
        updated=rng.random(n) * 1e9,
    )


def test_float64_round_trip_is_exact():
    original = states()
    back = decode_states(encode_states(original))
    for name in ("A", "b", "count", "seq", "updated"):
        np.testing.assert_array_equal(getattr(back, name), getattr(original, name))


def test_float32_round_trip_halves_the_size_and_keeps_weights_to_about_1e_6():
    original = states(d=33)
    wide, narrow = encode_states(original), encode_states(original, "float32")
    assert len(wide[0]) == state_size(33) == 4780
    assert len(narrow[0]) == state_size(33, "float32") == 2404
    assert state_size(65) == 17708 and state_size(65, "float32") == 8868
    back = decode_states(narrow)
    _, w_back = kernels.ridge_refit(back.A, back.b)
    _, w_true = kernels.ridge_refit(original.A, original.b)
    assert np.abs(w_back - w_true).max() / np.abs(w_true).max() < 5e-6


def test_newer_format_and_garbage_are_refused_clearly():
    record = bytearray(encode_states(states(1))[0])
    record[0] = FORMAT_VERSION + 1
    with pytest.raises(DataError, match="newer than this Velox's 1; upgrade Velox"):
        decode_states([bytes(record)])
    with pytest.raises(DataError, match="shorter than its header"):
        decode_states([b"\x01"])
    with pytest.raises(DataError, match="truncated"):
        decode_states([encode_states(states(1))[0][:-8]])
    with pytest.raises(DataError, match="different dimensions"):
        decode_states(encode_states(states(1, d=3)) + encode_states(states(1, d=4)))
