"""The CPU's in-order batch apply: sequential semantics, batch boundaries, replay, cost per batch.

Expected values come from :class:`Sequential`, a NumPy restatement of DESIGN.md
section 3 and :mod:`velox.biases` that solves every state from its sums
(``np.linalg.solve``), one observation at a time, and shares no code with the
compiled loop.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.factories import small_model, training_counts
from tests.kernel_checks import batch_solution, relative_error
from velox.backend import CUPY_UNAVAILABLE_REASON, HAS_CUPY, get_backend
from velox.errors import InputError
from velox.features import MatrixFactorization
from velox.kernels import cpu
from velox.model import Applied, OnlineModel

ITEMS = [*(f"i{j}" for j in range(8)), "new1", "new2"]  # i0..i7 known, new1/new2 folded in


class Sequential:
    """One observation at a time, every state solved from its sufficient statistics."""

    def __init__(self, model: OnlineModel) -> None:
        config, features = model.config, model.features
        self.F, self.base = features.matrix().copy(), features.cold_vector()
        self.index = {item: row for row, item in enumerate(features.item_ids)}
        self.free = np.asarray(features.foldin_coords)
        self.fixed = np.setdiff1d(np.arange(features.dim), self.free)
        self.gamma, self.drift = config.forgetting, config.bias_drift
        lam, lam_f = config.regularization, config.foldin_regularization
        self.user_prior = lam * np.eye(features.dim), lam * model.users.prior_mean
        self.item_prior = lam_f * np.eye(self.free.size), np.zeros(self.free.size)
        start = model.biases.online_state()
        self.mean_sum, self.mean_count = start.mean_sum, start.mean_count
        trained = model.biases.bias(np.arange(len(features.item_ids)))
        self.prior_bias = dict(zip(features.item_ids, trained, strict=True))
        counts = config.bias_count_weight * training_counts(len(features.item_ids))
        self.lam_b = config.bias_regularization
        self.bias_weight = dict(zip(features.item_ids, self.lam_b + counts, strict=True))
        self.users: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.folds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.bias_sums: dict[str, tuple[float, int]] = {}

    def bias(self, item: str) -> float:
        total, n = self.bias_sums.get(item, (0.0, 0))
        weight = self.bias_weight.get(item, self.lam_b)
        return (weight * self.prior_bias.get(item, 0.0) + total) / (weight + n)

    def features(self, item: str) -> np.ndarray:
        if item in self.index:
            return self.F[self.index[item]]
        f = self.base.copy()
        f[self.free] = np.linalg.solve(*self.folds.get(item, self.item_prior))
        return f

    def observe(self, user: str, item: str, y: float) -> float:
        """Apply one observation; the prediction made just before it."""
        A, b = self.users.get(user, self.user_prior)
        f, w = self.features(item), np.linalg.solve(A, b)
        mu, bias = self.mean_sum / self.mean_count, self.bias(item)
        t = y - mu - bias
        if self.drift:  # the bias coordinate's random walk, by explicit inverses
            A = np.linalg.inv(np.linalg.inv(A) + self.drift * np.diag(self.base))
            b = A @ w
        self.users[user] = self.gamma * A + np.outer(f, f), self.gamma * b + t * f
        self.mean_sum, self.mean_count = self.mean_sum + y, self.mean_count + 1
        total, n = self.bias_sums.get(item, (0.0, 0))
        self.bias_sums[item] = total + (y - mu - w @ f), n + 1
        if item not in self.index:
            x, fixed = w[self.free], w[self.fixed] @ self.base[self.fixed]
            Ai, bi = self.folds.get(item, self.item_prior)
            self.folds[item] = Ai + np.outer(x, x), bi + (t - fixed) * x
        return mu + bias + w @ f

    def weights(self, user: str) -> np.ndarray:
        return np.linalg.solve(*self.users[user])

    def fold_in(self, item: str) -> np.ndarray:
        return np.linalg.solve(*self.folds[item])


def bursty_stream(n: int = 300, seed: int = 5) -> tuple[list[str], list[str], np.ndarray]:
    """Users in bursts (runs of 1 to 12 ratings), as real feedback comes; some unknown items."""
    rng = np.random.default_rng(seed)
    users: list[str] = []
    while len(users) < n:
        users += [f"u{rng.integers(15)}"] * int(rng.integers(1, 13))
    items = rng.choice(ITEMS, size=n).tolist()
    return users[:n], items, rng.integers(1, 6, size=n).astype(float)


def observe_in_batches(model: OnlineModel, stream_: tuple, cuts: list[int]) -> list[Applied]:
    users, items, ratings = stream_
    bounds = [0, *cuts, len(users)]
    return [
        model.observe_many(users[a:b], items[a:b], ratings[a:b], np.arange(a, b, dtype=float))
        for a, b in itertools.pairwise(bounds)
        if b > a
    ]


def state(model: OnlineModel) -> dict[str, np.ndarray]:
    """Every array the online model learns, rows in key order."""
    users, items = sorted(model.users.keys), sorted(model.items.keys)
    u, i = model.users.find(users), model.items.find(items)
    known = model.biases.find([*model.features.item_ids, *items])
    out = {f"user {name}": getattr(model.users, name)[u] for name in ("P", "w", "A", "b")}
    out |= {f"item {name}": getattr(model.items, name)[i] for name in ("P", "w", "A", "b")}
    out |= {"user count": model.users.count[u], "item count": model.items.count[i]}
    out |= {"updated": model.users.updated[u], "mean": np.array(model.biases.mean)}
    return out | {"bias": model.biases.bias(known)}


def records(applied: list[Applied]) -> dict[str, np.ndarray]:
    fields = ("predictions", "targets", "residuals", "cold", "cold_features", "foldin_inputs")
    return {name: np.concatenate([getattr(a, name) for a in applied]) for name in fields}


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def snapshot(model: OnlineModel) -> dict[str, np.ndarray]:
    sizes = np.array([len(model.users), len(model.items), len(model.biases)])
    return state(model) | {"sizes": sizes}


@pytest.mark.parametrize(
    ("forgetting", "drift", "count_weight"),
    [(1.0, 0.0, 0.0), (0.95, 0.0, 1.0), (1.0, 0.02, 0.5), (0.95, 0.02, 1.0)],
)
def test_a_bursty_stream_follows_the_sequential_reference(forgetting, drift, count_weight):
    """Each observation sees the mu, b_i, user state and fold-in the previous one left.

    Tolerance: the model's states come from rank-one recursions (re-factorised
    every 7 updates here), the reference's from direct solves; both are exact
    up to rounding, so they agree to about 1e-12 relative (1e-9 is asserted).
    """
    model = small_model(
        forgetting=forgetting,
        bias_drift=drift,
        bias_count_weight=count_weight,
        refactor_interval=7,
    )
    reference = Sequential(model)
    data = bursty_stream()
    applied = observe_in_batches(model, data, [64, 128, 192, 256])
    want = [reference.observe(*observation) for observation in zip(*data, strict=True)]
    got = records(applied)
    assert got["cold"].sum() > 40
    np.testing.assert_allclose(got["predictions"], want, rtol=1e-9)
    for user in reference.users:
        got_w = model.user_state(user).weights
        np.testing.assert_allclose(got_w, reference.weights(user), rtol=1e-9, atol=1e-12)
    for item in ("new1", "new2"):
        got_v = model.items.w[model.items.find([item])[0]]
        np.testing.assert_allclose(got_v, reference.fold_in(item), rtol=1e-9, atol=1e-12)
    assert model.biases.mean == pytest.approx(reference.mean_sum / reference.mean_count, 1e-14)
    for item in ITEMS:
        got_b = model.biases.bias(model.biases.find([item]))[0]
        assert got_b == pytest.approx(reference.bias(item), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("cut", ["one by one", "uneven", "many"])
def test_the_result_does_not_depend_on_how_the_stream_is_cut_into_batches(cut):
    """Bit for bit: refits fall mid-batch (every 5 updates), forgetting is on."""
    data = bursty_stream()
    cuts = {
        "one by one": list(range(1, 300)),
        "uneven": [1, 2, 64, 65, 190, 299],
        "many": list(range(0, 300, 17)),
    }[cut]
    whole, cut_up = (small_model(forgetting=0.97, bias_drift=0.01) for _ in range(2))
    for model in (whole, cut_up):
        model.users.refactor_interval = model.items.refactor_interval = 5
    want = records(observe_in_batches(whole, data, []))
    assert_same(records(observe_in_batches(cut_up, data, cuts)), want)
    assert_same(state(cut_up), state(whole))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 119), max_size=12), st.integers(0, 2**16))
def test_any_cut_gives_the_same_bits(cuts, seed):
    data = bursty_stream(120, seed)
    whole, cut_up = small_model(refactor_interval=4), small_model(refactor_interval=4)
    want = records(observe_in_batches(whole, data, []))
    assert_same(records(observe_in_batches(cut_up, data, sorted(set(cuts)))), want)
    assert_same(state(cut_up), state(whole))


def test_a_batch_is_one_compiled_call_whatever_the_order_of_its_users(monkeypatch):
    """The cost of a batch must not grow with its bursts: one call, not one per round."""
    calls = []
    compiled = cpu.in_order

    def counted(*args):
        calls.append(args[-2])  # where the call starts in the batch
        return compiled(*args)

    monkeypatch.setattr(cpu, "in_order", counted)
    model = small_model()
    burst = ["u"] * 64
    spread = [f"u{j}" for j in range(64)]
    items, ratings = (ITEMS * 7)[:64], np.full(64, 4.0)
    for users in (burst, spread, burst[:32] + spread[:32]):
        model.observe_many(users, items, ratings)
    assert calls == [0, 0, 0]


@pytest.mark.parametrize("table", ["users", "items"])
def test_a_drifted_inverse_is_refit_from_the_exact_sums_before_its_update(table):
    model = small_model()
    reference = Sequential(model)
    head, tail = (
        tuple(column[s] for column in bursty_stream(200)) for s in (slice(100), slice(100, None))
    )
    for observation in zip(*head, strict=True):
        reference.observe(*observation)
    observe_in_batches(model, head, [])
    ridge = getattr(model, table)
    ridge.P[: len(ridge)] *= -1.0  # P no longer positive definite: f^T P f < 0
    rest = observe_in_batches(model, tail, [50])
    want = [reference.observe(*observation) for observation in zip(*tail, strict=True)]
    np.testing.assert_allclose(records(rest)["predictions"], want, rtol=1e-9)


def test_replay_of_states_that_already_hold_the_records_moves_only_biases_and_fold_ins():
    live, recovered = small_model(), small_model()
    applied = observe_in_batches(live, bursty_stream(), [100, 200])
    users = list(live.users.keys)
    A, b, count, _, _ = live.users.statistics(live.users.find(users))
    recovered.load_users(users, A, b, count)
    for record in applied:
        recovered.replay(record, users_have=np.ones(len(record), dtype=bool))
    got, want = state(recovered), state(live)
    for name in ("user A", "user b", "user count", "item A", "item b", "mean", "bias"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _known_only(record: Applied) -> Applied:
    width = record.cold_features.shape[1], record.foldin_inputs.shape[1]
    return replace(
        record,
        cold=np.zeros(len(record), dtype=bool),
        cold_features=np.empty((0, width[0])),
        foldin_inputs=np.empty((0, width[1])),
        foldin_targets=np.empty(0),
    )


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: replace(r, targets=r.targets[:-1]), "other lengths"),
        (lambda r: replace(r, users=r.users[:-1]), "other lengths"),
        (lambda r: replace(r, foldin_targets=r.foldin_targets[:-1]), "other lengths"),
        (lambda r: replace(r, foldin_inputs=r.foldin_inputs[:, :-1]), "widths"),
        (lambda r: replace(r, residuals=np.where(r.cold, np.nan, r.residuals)), "NaN"),
        (lambda r: replace(r, cold_features=r.cold_features + np.inf), "infinite"),
        (_known_only, "does not know"),
    ],
)
def test_a_record_that_does_not_fit_raises_and_changes_nothing(damage, message):
    record = observe_in_batches(small_model(), bursty_stream(64), [])[0]
    assert record.cold.any()
    model = small_model()
    model.replay(observe_in_batches(small_model(), bursty_stream(30, seed=9), [])[0])
    before = snapshot(model)
    with pytest.raises(InputError, match=message):
        model.replay(damage(record))
    assert_same(snapshot(model), before)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUPY, reason=f"no GPU: {CUPY_UNAVAILABLE_REASON}")
def test_the_gpu_applies_rounds_exact_per_user_and_replays_them():
    """CuPy keeps the rounds: per user exact ridge of the recorded targets; replay rebuilds it."""
    gpu = get_backend("gpu")

    def model() -> OnlineModel:
        cpu = small_model()
        features = MatrixFactorization(
            list(cpu.features.item_ids), cpu.features.matrix()[:, :-1], version="v7", backend=gpu
        )
        trained_bias = cpu.biases.bias(np.arange(len(cpu.features.item_ids)))
        return OnlineModel(
            features, global_mean=3.5, item_bias=trained_bias, train_count=1000, backend=gpu
        )

    live = model()
    data = bursty_stream()
    applied = observe_in_batches(live, data, [64, 128, 192, 256])
    got = records(applied)
    F = gpu.to_numpy(live.features.vectors(live.features.lookup(data[1])))
    F[got["cold"]] = got["cold_features"]  # the folded-in features each observation used
    users = np.array(data[0])
    for user in set(data[0]):
        mine = users == user
        want, _ = batch_solution(1.0, 1.0, F[mine], got["targets"][mine], np.zeros(F.shape[1]))
        assert relative_error(live.user_state(user).weights, want) < 1e-8
    again = model()
    for record in applied:
        again.replay(record)
    keys = sorted(set(data[0]))
    for name in ("A", "b"):
        np.testing.assert_array_equal(
            gpu.to_numpy(getattr(again.users, name))[again.users.find(keys)],
            gpu.to_numpy(getattr(live.users, name))[live.users.find(keys)],
        )
