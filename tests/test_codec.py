"""Binary state records: exact round trips, sizes, and refusal of foreign or newer data."""

from __future__ import annotations

import numpy as np
import pytest

from feature_store.codec import (
    FORMAT_VERSION,
    StateBatch,
    decode_biases,
    decode_log,
    decode_observation,
    decode_states,
    encode_biases,
    encode_log,
    encode_states,
    state_size,
)
from velox import kernels
from velox.biases import BiasState
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


def _applied_with_cold():
    from velox.features import MatrixFactorization
    from velox.model import OnlineModel

    rng = np.random.default_rng(3)
    features = MatrixFactorization(["a", "b"], rng.normal(size=(2, 3)), version="v12")
    model = OnlineModel(features, global_mean=3.0, item_bias=np.zeros(2))
    return model.observe_many(
        ["u1", "ü2", "u1", "u3"], ["a", "new", "new", "b"], [4.0, 2.0, 5.0, 1.0], [1, 2, 3, 4.5]
    )


def test_log_records_round_trip_every_recorded_value():
    applied = _applied_with_cold()
    records = encode_log(applied)
    assert len(records[0]) == 47 + 2 + 1 + 3  # header, ids, version
    assert len(records[1]) == 47 + 3 + 3 + 3 + 4 + 8 * (4 + 3 + 1)  # plus d, k and vectors
    (back,) = decode_log(records)
    assert back.version == "v12" and back.users == applied.users and back.items == applied.items
    for name in ("ratings", "timestamps", "predictions", "targets", "residuals", "cold"):
        np.testing.assert_array_equal(getattr(back, name), getattr(applied, name), err_msg=name)
    for name in ("cold_features", "foldin_inputs", "foldin_targets"):
        np.testing.assert_array_equal(getattr(back, name), getattr(applied, name), err_msg=name)
    observation = decode_observation(records[1])
    assert (observation.user, observation.item, observation.rating, observation.ts) == (
        "ü2",
        "new",
        2.0,
        2.0,
    )


def test_log_decoding_splits_runs_of_model_versions():
    applied = _applied_with_cold()
    other = encode_log(type(applied)(**{**applied.__dict__, "version": "v13"}))
    runs = decode_log(encode_log(applied)[:2] + other[2:])
    assert [(r.version, r.users) for r in runs] == [("v12", ["u1", "ü2"]), ("v13", ["u1", "u3"])]
    assert [r.cold.tolist() for r in runs] == [[False, True], [True, False]]


def test_damaged_or_newer_log_records_are_refused():
    record = encode_log(_applied_with_cold())[1]
    with pytest.raises(DataError, match="truncated or damaged"):
        decode_log([record[:-4]])
    with pytest.raises(DataError, match="shorter than its header"):
        decode_observation(record[:10])
    with pytest.raises(DataError, match="newer than this Velox"):
        decode_log([bytes([FORMAT_VERSION + 1]) + record[1:]])


def test_bias_checkpoints_round_trip_with_position_and_version():
    state = BiasState(1234.5, 400.0, ["a", "ñ"], np.array([0.25, -1.5]), np.array([3.0, 1.0]))
    back, seq, version = decode_biases(encode_biases(state, seq=99, version="v3"))
    assert (back.mean_sum, back.mean_count, back.items, seq, version) == (
        1234.5,
        400.0,
        ["a", "ñ"],
        99,
        "v3",
    )
    np.testing.assert_array_equal(back.sums, state.sums)
    with pytest.raises(DataError, match="bias checkpoint is damaged"):
        decode_biases(b"not arrow")
