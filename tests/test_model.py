"""The per-user online model: exactness for recorded targets, order, bad input, fold-in, top-K."""

from __future__ import annotations

import numpy as np
import pytest

from tests.factories import small_model
from tests.kernel_checks import batch_solution, relative_error
from velox.config import ModelConfig
from velox.errors import InputError
from velox.features import MatrixFactorization
from velox.model import OnlineModel


def _snapshot(model: OnlineModel):
    n = len(model.users)
    return (
        model.users.w[:n].copy(),
        model.users.A[:n].copy(),
        model.biases.mean,
        model.biases.bias(np.arange(len(model.features.item_ids))).copy(),
        len(model.items),
    )


def test_user_weights_equal_batch_ridge_of_recorded_targets():
    model = small_model(regularization=0.7)
    rng = np.random.default_rng(1)
    users = rng.choice(["a", "b", "c"], size=300).tolist()
    items = rng.choice(model.features.item_ids, size=300).tolist()
    ratings = rng.integers(1, 6, size=300).astype(float)
    targets = []
    for start in range(0, 300, 17):  # uneven micro-batches, repeated users inside them
        part = slice(start, start + 17)
        targets.append(model.observe_many(users[part], items[part], ratings[part]).targets)
    targets = np.concatenate(targets)
    F = model.features.matrix()
    for user in ("a", "b", "c"):
        mine = np.array([u == user for u in users])
        f = F[model.features.lookup(np.array(items)[mine].tolist())]
        want, _ = batch_solution(0.7, 1.0, f, targets[mine], np.zeros(model.features.dim))
        assert relative_error(model.user_state(user).weights, want) < 1e-8
        assert model.user_state(user).observations == mine.sum()


def test_a_batch_equals_the_same_observations_one_call_at_a_time_for_one_user():
    batched, single = small_model(), small_model()
    items, ratings = ["i1", "i2", "i1", "i5"], [5.0, 1.0, 4.0, 2.0]
    got = batched.observe_many(["u"] * 4, items, ratings)
    want = [single.observe_many(["u"], [i], [r]) for i, r in zip(items, ratings, strict=True)]
    np.testing.assert_array_equal(got.predictions, [w.predictions[0] for w in want])
    np.testing.assert_array_equal(batched.user_state("u").weights, single.user_state("u").weights)


def test_prediction_is_the_model_formula_and_observe_moves_it():
    model = small_model()
    before = model.predict("u", ["i3"]).scores[0]
    prior = model.user_state("u")
    assert not prior.known
    f = model.features.matrix()[3]
    bias = model.biases.bias(model.biases.find(["i3"]))[0]
    assert before == pytest.approx(model.biases.mean + bias + prior.weights @ f)
    result = model.observe_many(["u"], ["i3"], [5.0])
    assert result.predictions[0] == pytest.approx(before)
    assert model.predict("u", ["i3"]).scores[0] > before
    assert model.user_state("u").observations == 1


@pytest.mark.parametrize(
    ("users", "items", "ratings", "message"),
    [
        ([], [], [], "must not be empty"),
        (["u", "v"], ["i1"], [3.0, 4.0], "same length"),
        (["u"], ["i1"], [float("nan")], "finite"),
        (["u"], ["i1"], [float("inf")], "finite"),
        (["u", None], ["i1", "i2"], [3.0, 4.0], "strings or integers"),
        (["u"], [""], [3.0], "must not be empty"),
    ],
)
def test_bad_observations_raise_and_change_nothing(users, items, ratings, message):
    model = small_model()
    model.observe_many(["x", "y"], ["i1", "new"], [4.0, 2.0])
    before = _snapshot(model)
    with pytest.raises(InputError, match=message):
        model.observe_many(users, items, ratings)
    after = _snapshot(model)
    for got, want in zip(after, before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_integer_ids_are_strings():
    model = small_model()
    model.observe_many([42], ["i1"], [4.0])
    assert model.user_state("42").known


def test_fold_in_learns_an_unknown_item_from_its_raters():
    model = small_model(rank=3, items=30)
    rng = np.random.default_rng(3)
    F = model.features.matrix()
    users = [f"u{j}" for j in range(40)]
    taste = np.where(np.arange(40) < 20, 1.5, -1.5)  # half like factor 0, half dislike it
    for _ in range(15):  # users learn their tastes on known items
        items = rng.choice(model.features.item_ids, size=len(users)).tolist()
        liking = taste * F[model.features.lookup(items), 0]
        model.observe_many(users, items, np.clip(3.5 + liking, 1, 5))
    lovers, haters = users[:20], users[20:]
    cold_before = model.predict(lovers[0], ["newcomer"])
    assert cold_before.cold.tolist() == [True]
    model.observe_many(
        lovers + haters, ["newcomer"] * len(users), [5.0] * len(lovers) + [1.0] * len(haters)
    )
    assert "newcomer" in model.items
    assert (
        model.predict(lovers[0], ["newcomer"]).scores[0]
        > model.predict(haters[0], ["newcomer"]).scores[0] + 0.5
    )
    assert "newcomer" in model.topk(lovers[0], 100).items


@pytest.mark.parametrize("explore", ["none", "ucb"])
def test_topk_over_every_item_equals_topk_over_them_as_candidates(explore):
    """The all-items path caches rows and features; it must stay equal as fold-ins arrive."""
    model = small_model(items=30)
    model.observe_many(["u", "v", "u"], ["i1", "new1", "i2"], [5.0, 4.0, 1.0])
    for step in range(3):
        everything = [*model.features.item_ids, *model.items.keys]
        for exclude in ([], ["i1", "new1", "absent"]):
            cached = model.topk("u", 40, exclude=exclude, explore=explore)
            direct = model.topk("u", 40, candidates=everything, exclude=exclude, explore=explore)
            assert cached.items == direct.items
            np.testing.assert_array_equal(cached.scores, direct.scores)
            np.testing.assert_array_equal(cached.cold, direct.cold)
        model.observe_many(["v", "u"], [f"new{step + 2}", "new1"], [2.0, 5.0])  # cache stale
    assert {"new1", "new4"} <= set(model.topk("u", 40).items)


def test_topk_is_sorted_respects_candidates_and_exclusion():
    model = small_model()
    model.observe_many(["u"] * 3, ["i1", "i2", "i3"], [5.0, 1.0, 4.0])
    full = model.predict("u", model.features.item_ids)
    top = model.topk("u", 5)
    assert list(top.scores) == sorted(top.scores, reverse=True)
    assert top.items == [full.items[j] for j in np.argsort(-full.scores, kind="stable")[:5]]
    assert set(model.topk("u", 10, candidates=["i4", "i5", "i6"]).items) == {"i4", "i5", "i6"}
    assert "i1" not in model.topk("u", 20, exclude=["i1"]).items
    assert len(model.topk("u", 20, exclude=["i1"]).items) == 19


def test_exploration_only_when_asked():
    model = small_model()
    plain = model.topk("u", 20)
    np.testing.assert_allclose(plain.scores, model.topk("u", 20, explore="none").scores)
    draws = {
        tuple(model.topk("u", 3, explore="thompson", alpha=2.0, rng=np.random.default_rng(s)).items)
        for s in range(10)
    }
    assert len(draws) > 1
    with pytest.raises(InputError, match="explore"):
        model.topk("u", 3, explore="greedy")
    with pytest.raises(InputError, match="k must"):
        model.topk("u", 0)


def test_ucb_adds_alpha_times_the_posterior_width_of_a_direct_ridge_solve():
    """Expected values from an independent computation: A = lambda I + sum f f^T, P = A^-1."""
    model = small_model(rank=3, items=12, regularization=2.0, prior="zero")
    seen = ["i1", "i4", "i4", "i7"]
    model.observe_many(["u"] * 4, seen, [5.0, 1.0, 2.0, 4.0])
    F = model.features.matrix()
    rows = model.features.lookup(seen)
    A = 2.0 * np.eye(4) + F[rows].T @ F[rows]
    width = np.sqrt(np.einsum("ij,jk,ik->i", F, np.linalg.inv(A), F))
    plain = model.predict("u", model.features.item_ids).scores
    ucb = model.topk("u", 12, explore="ucb", alpha=0.7)
    expected = plain + 0.7 * width
    order = np.argsort(-expected, kind="stable")
    assert ucb.items == [model.features.item_ids[j] for j in order]
    np.testing.assert_allclose(ucb.scores, expected[order], rtol=1e-10)


def test_prior_for_new_users_is_the_mean_of_trained_users():
    from velox.trained import TrainedModel

    trained = TrainedModel(
        item_ids=np.array(["a", "b"]),
        item_factors=np.array([[1.0, 0.0], [0.0, 1.0]]),
        item_bias=np.zeros(2),
        global_mean=3.0,
        user_ids=np.array(["p", "q"]),
        user_weights=np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]),
        user_gram=np.tile(np.eye(3) * 2.0, (2, 1, 1)),
        user_rhs=np.array([[2.0, 0.0, 4.0], [0.0, 2.0, 0.0]]),
        user_count=np.array([3, 4]),
    )
    model = trained.online_model(version="v", config=ModelConfig(prior="mean"))
    np.testing.assert_allclose(model.user_state("p").weights, [1.0, 0.0, 2.0])
    np.testing.assert_allclose(model.user_state("nobody").weights, [0.5, 0.5, 1.0])
    zero = trained.online_model(version="v", config=ModelConfig(prior="zero"))
    np.testing.assert_allclose(zero.user_state("nobody").weights, 0.0)


def test_online_biases_follow_the_stream():
    model = small_model()
    before = model.predict("someone", ["i4"]).scores[0]
    model.observe_many([f"u{j}" for j in range(200)], ["i4"] * 200, [5.0] * 200)
    assert model.predict("someone", ["i4"]).scores[0] > before + 0.5


def test_online_learning_beats_the_frozen_model_on_a_drifting_stream(trained, drifting_stream):
    from velox.evaluation import prequential

    _, future = drifting_stream
    config = ModelConfig(regularization=2.0)
    frozen = prequential(trained.online_model(version="v", config=config), future, learn=False)
    online = prequential(trained.online_model(version="v", config=config), future)
    assert online.rmse < frozen.rmse - 0.03
    assert frozen.window_rmse[-1] > frozen.window_rmse[0]  # the stale model degrades


def test_float32_model_runs_and_stays_close_to_float64():
    a, b = small_model(dtype="float32"), small_model(dtype="float64")
    for m in (a, b):
        m.observe_many(["u", "v", "u"], ["i1", "i2", "i3"], [5.0, 2.0, 4.0])
    assert a.users.w.dtype == np.float32
    np.testing.assert_allclose(
        a.predict("u", ["i4"]).scores, b.predict("u", ["i4"]).scores, rtol=1e-5
    )


def _observe_stream(model: OnlineModel, n: int = 400, seed: int = 5):
    """Observe a stream with repeated users inside batches and items the features lack."""
    rng = np.random.default_rng(seed)
    users = rng.choice([f"u{j}" for j in range(12)], size=n).tolist()
    items = rng.choice([*model.features.item_ids[:8], "new1", "new2"], size=n).tolist()
    ratings = rng.integers(1, 6, size=n).astype(float)
    times = np.arange(n, dtype=float)
    return [
        model.observe_many(
            users[s : s + 23], items[s : s + 23], ratings[s : s + 23], times[s : s + 23]
        )
        for s in range(0, n, 23)
    ]


def _tables(model: OnlineModel, users: list[str], items: list[str]):
    rows, item_rows = model.users.find(users), model.items.find(items)
    bias_rows = model.biases.find([*items, *model.features.item_ids])
    return {
        "A": model.users.A[rows],
        "b": model.users.b[rows],
        "count": model.users.count[rows],
        "w": model.users.w[rows],
        "item A": model.items.A[item_rows],
        "item b": model.items.b[item_rows],
        "mean": model.biases.mean,
        "bias": model.biases.bias(bias_rows),
    }


@pytest.mark.parametrize("forgetting", [1.0, 0.97])
def test_replaying_the_records_rebuilds_every_state_whatever_the_batches(forgetting):
    live = small_model(forgetting=forgetting)
    records = _observe_stream(live)
    assert sum(r.cold.sum() for r in records) > 20
    by_batch, by_one = small_model(forgetting=forgetting), small_model(forgetting=forgetting)
    for record in records:
        by_batch.replay(record)
        for one in _split(record):
            by_one.replay(one)
    users, items = list(live.users.keys), ["new1", "new2"]
    want, batched, single = (_tables(m, users, items) for m in (live, by_batch, by_one))
    # Live and replay run the same in-order loop (the replay on the recorded values), so
    # every state is rebuilt bit for bit, however the log is cut into batches.
    for name in want:
        np.testing.assert_array_equal(single[name], batched[name], err_msg=name)
        np.testing.assert_array_equal(batched[name], want[name], err_msg=name)


def _split(applied):
    """An :class:`Applied` batch as one record per observation, cold rows carried along."""
    cold_index = np.cumsum(applied.cold) - 1
    for p in range(len(applied)):
        c = slice(cold_index[p], cold_index[p] + 1) if applied.cold[p] else slice(0, 0)
        yield type(applied)(
            applied.version,
            applied.users[p : p + 1],
            applied.items[p : p + 1],
            applied.ratings[p : p + 1],
            applied.timestamps[p : p + 1],
            applied.predictions[p : p + 1],
            applied.targets[p : p + 1],
            applied.residuals[p : p + 1],
            applied.cold[p : p + 1],
            applied.cold_features[c],
            applied.foldin_inputs[c],
            applied.foldin_targets[c],
        )


def test_replay_refuses_records_of_another_version():
    record = _observe_stream(small_model(), n=23)[0]
    other = small_model()
    other.features = MatrixFactorization(
        list(other.features.item_ids), other.features.matrix()[:, :-1], version="v8"
    )
    with pytest.raises(InputError, match="version 'v7' cannot be replayed onto version 'v8'"):
        other.replay(record)


def test_prior_scores_are_the_mean_and_item_bias_alone():
    model = small_model(items=4)
    draws = np.random.default_rng(0)  # small_model's draws, in order: factors, then biases
    draws.normal(size=(4, 3))
    trained_bias = draws.normal(0, 0.3, 4)
    prior = model.prior_scores(["i2", "new", "i0"])
    np.testing.assert_allclose(prior.scores, [3.5 + trained_bias[2], 3.5, 3.5 + trained_bias[0]])
    assert prior.cold.tolist() == [False, True, False]
    model.observe_many(["u"] * 3, ["i2"] * 3, [5.0] * 3)
    assert model.prior_scores(["i2"]).scores[0] > 3.5 + trained_bias[2]  # the bias learned
