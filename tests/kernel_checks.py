"""Kernel assertions written once and run against every backend (NumPy fused and generic, CuPy).

A test module subclasses :class:`KernelChecks` and sets ``xp`` (the array
namespace) and ``update`` (the rank-one update implementation to check).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from velox import kernels
from velox.errors import InputError
from velox.kernels import NotPositiveDefiniteError

targets = st.floats(-5, 5, allow_nan=False).map(lambda x: round(x, 3))
# One test body runs for several backend classes by design.
EXAMPLES = int(os.environ.get("VELOX_HYPOTHESIS_EXAMPLES", "60"))
SUPPRESSED = [HealthCheck.too_slow, HealthCheck.differing_executors]
coords = st.floats(-3, 3, allow_nan=False).map(lambda x: round(x, 3))


@st.composite
def streams(draw, forgetting: bool):
    """A state dimension, regularisation, forgetting factor and a sequence of (f, t)."""
    d = draw(st.integers(1, 8))
    n = draw(st.integers(1, 50))
    lam = draw(st.floats(0.5, 10.0))
    gamma = draw(st.floats(0.9, 0.999)) if forgetting else 1.0
    f = np.array(draw(st.lists(st.lists(coords, min_size=d, max_size=d), min_size=n, max_size=n)))
    t = np.array(draw(st.lists(targets, min_size=n, max_size=n)))
    w0 = np.array(draw(st.lists(coords, min_size=d, max_size=d)))
    return d, lam, gamma, f, t, w0


def batch_solution(lam: float, gamma: float, f: np.ndarray, t: np.ndarray, w0: np.ndarray):
    """The weighted ridge solution solved from scratch: the reference for every update."""
    n, d = f.shape
    weights = gamma ** (n - 1 - np.arange(n))
    A = gamma**n * lam * np.eye(d) + (f.T * weights) @ f
    b = gamma**n * lam * w0 + (f.T * weights) @ t
    return np.linalg.solve(A, b), A


def drifting_solution(
    lam: float, gamma: float, drift: float, f: np.ndarray, t: np.ndarray, w0: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A state whose last coordinate takes a random walk of variance ``drift`` before each
    observation, by explicit inverses: ``A <- (A^-1 + drift e e^T)^-1``, ``b <- A w``,
    then ``A <- gamma A + f f^T``, ``b <- gamma b + t f``. The reference for ``diffuse``."""
    d = f.shape[1]
    A, b = lam * np.eye(d), lam * w0
    step = np.zeros((d, d))
    step[-1, -1] = drift
    for row, target in zip(f, t, strict=True):
        w = np.linalg.solve(A, b)
        A = np.linalg.inv(np.linalg.inv(A) + step)
        A, b = gamma * A + np.outer(row, row), gamma * (A @ w) + target * row
    return np.linalg.solve(A, b), A


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-6))


class KernelChecks:
    xp: ClassVar[Any]
    update: ClassVar[Callable[..., Any]]

    def to_np(self, a: Any) -> np.ndarray:
        return a.get() if hasattr(a, "get") else np.asarray(a)

    def prior_states(self, batch: int, d: int, lam: float, w0: np.ndarray | None = None):
        xp = self.xp
        w0 = np.zeros(d) if w0 is None else w0
        P = xp.asarray(np.tile(np.eye(d) / lam, (batch, 1, 1)))
        A = xp.asarray(np.tile(np.eye(d) * lam, (batch, 1, 1)))
        w = xp.asarray(np.tile(w0, (batch, 1)))
        b = xp.asarray(np.tile(lam * w0, (batch, 1)))
        return P, w, A, b

    def run_stream(self, lam, gamma, f, t, w0):
        P, w, A, b = self.prior_states(1, f.shape[1], lam, w0)
        for row, target in zip(f, t, strict=True):
            type(self).update(
                P, w, A, b, self.xp.asarray(row[None]), self.xp.asarray([target]), gamma
            )
        return P, w, A, b

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=SUPPRESSED)
    @given(streams(forgetting=False))
    def test_online_equals_batch_ridge(self, case):
        _, lam, gamma, f, t, w0 = case
        _, w, A, _ = self.run_stream(lam, gamma, f, t, w0)
        want, A_want = batch_solution(lam, gamma, f, t, w0)
        assert relative_error(self.to_np(w)[0], want) < 1e-8
        np.testing.assert_allclose(self.to_np(A)[0], A_want, rtol=1e-12, atol=1e-12)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=SUPPRESSED)
    @given(streams(forgetting=True))
    def test_forgetting_equals_weighted_batch_ridge(self, case):
        _, lam, gamma, f, t, w0 = case
        _, w, _, _ = self.run_stream(lam, gamma, f, t, w0)
        want, _ = batch_solution(lam, gamma, f, t, w0)
        assert relative_error(self.to_np(w)[0], want) < 1e-8

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=SUPPRESSED)
    @given(streams(forgetting=True), st.floats(0.001, 0.5))
    def test_a_drifting_coordinate_equals_the_explicit_random_walk(self, case, drift):
        d, lam, gamma, f, t, w0 = case
        P, w, A, b = self.prior_states(1, d, lam, w0)
        for row, target in zip(f, t, strict=True):
            kernels.diffuse(P, A, b, d - 1, drift)
            type(self).update(
                P, w, A, b, self.xp.asarray(row[None]), self.xp.asarray([target]), gamma
            )
        want, A_want = drifting_solution(lam, gamma, drift, f, t, w0)
        assert relative_error(self.to_np(w)[0], want) < 1e-8
        np.testing.assert_allclose(self.to_np(A)[0], A_want, rtol=1e-9, atol=1e-9)
        np.testing.assert_array_equal(self.to_np(A)[0], self.to_np(A)[0].T)
        np.testing.assert_allclose(
            self.to_np(P)[0] @ self.to_np(A)[0], np.eye(d), rtol=1e-8, atol=1e-8
        )

    @pytest.mark.parametrize("gamma", [1.0, 0.97])
    def test_batch_of_users_equals_single_updates(self, gamma):
        rng = np.random.default_rng(7)
        batch, d = 33, 6
        states = self.prior_states(batch, d, 1.5)
        for _ in range(5):
            type(self).update(
                *states,
                self.xp.asarray(rng.normal(size=(batch, d))),
                self.xp.asarray(rng.normal(size=batch)),
                gamma,
            )
        single = [s.copy() for s in states]
        f, t = rng.normal(size=(batch, d)), rng.normal(size=batch)
        pred = type(self).update(*states, self.xp.asarray(f), self.xp.asarray(t), gamma)
        for j in range(batch):
            part = [s[j : j + 1] for s in single]
            one = type(self).update(
                *part, self.xp.asarray(f[j : j + 1]), self.xp.asarray(t[j : j + 1]), gamma
            )
            for s, p in zip(single, part, strict=True):
                s[j : j + 1] = p
            np.testing.assert_allclose(self.to_np(one), self.to_np(pred)[j : j + 1], rtol=1e-13)
        for got, want in zip(states, single, strict=True):
            np.testing.assert_allclose(self.to_np(got), self.to_np(want), rtol=1e-12, atol=1e-15)

    def test_update_of_selected_rows_matches_gathered_update(self):
        rng = np.random.default_rng(3)
        states = self.prior_states(10, 4, 1.0)
        gathered = [s[self.xp.asarray([7, 2, 5])].copy() for s in states]
        f, t = rng.normal(size=(3, 4)), rng.normal(size=3)
        kernels.rank_one_update(
            *states, self.xp.asarray(f), self.xp.asarray(t), rows=np.array([7, 2, 5])
        )
        kernels.rank_one_update(*gathered, self.xp.asarray(f), self.xp.asarray(t))
        for full, part in zip(states, gathered, strict=True):
            np.testing.assert_allclose(
                self.to_np(full[self.xp.asarray([7, 2, 5])]), self.to_np(part), rtol=1e-14
            )
        untouched = self.to_np(states[0][self.xp.asarray([0, 1, 3])])
        np.testing.assert_array_equal(untouched, np.tile(np.eye(4), (3, 1, 1)))

    @pytest.mark.parametrize(
        "mutate",
        [
            pytest.param(lambda f, t: (f, t.__setitem__(0, np.nan)), id="nan-target"),
            pytest.param(lambda f, t: (f.__setitem__((1, 2), np.inf), t), id="inf-feature"),
        ],
    )
    def test_non_finite_input_is_rejected_without_change(self, mutate):
        states = self.prior_states(3, 4, 1.0)
        before = [self.to_np(s).copy() for s in states]
        f, t = np.ones((3, 4)), np.ones(3)
        mutate(f, t)
        with pytest.raises(InputError, match="NaN or infinite"):
            kernels.rank_one_update(*states, self.xp.asarray(f), self.xp.asarray(t))
        for got, want in zip(states, before, strict=True):
            np.testing.assert_array_equal(self.to_np(got), want)

    @pytest.mark.parametrize(
        ("f_shape", "t_shape", "rows", "message"),
        [
            ((3, 5), (3,), None, "must have shape"),
            ((0, 4), (0,), None, "non-empty"),
            ((3, 4), (2,), None, "targets must have shape"),
            ((2, 4), (2,), [1, 1], "distinct"),
            ((2, 4), (2,), [0, 9], "must lie in"),
        ],
    )
    def test_bad_shapes_are_rejected_without_change(self, f_shape, t_shape, rows, message):
        states = self.prior_states(3, 4, 1.0)
        before = [self.to_np(s).copy() for s in states]
        with pytest.raises(InputError, match=message):
            kernels.rank_one_update(
                *states,
                self.xp.ones(f_shape),
                self.xp.ones(t_shape),
                rows=None if rows is None else np.array(rows),
            )
        for got, want in zip(states, before, strict=True):
            np.testing.assert_array_equal(self.to_np(got), want)

    def test_drifted_state_is_refactorised_before_update(self):
        rng = np.random.default_rng(5)
        f = rng.normal(size=(20, 3))
        t = rng.normal(size=20)
        P, w, A, b = self.run_stream(1.0, 1.0, f[:-1], t[:-1], np.zeros(3))
        P[...] = -P  # a corrupted inverse: f^T P f < 0 for every f
        type(self).update(P, w, A, b, self.xp.asarray(f[-1:]), self.xp.asarray(t[-1:]), 1.0)
        want, _ = batch_solution(1.0, 1.0, f, t, np.zeros(3))
        assert relative_error(self.to_np(w)[0], want) < 1e-10

    def test_refit_and_solve_match_numpy(self):
        rng = np.random.default_rng(1)
        M = rng.normal(size=(5, 6, 6))
        A = M @ M.transpose(0, 2, 1) + np.eye(6)
        b = rng.normal(size=(5, 6))
        P, w = kernels.ridge_refit(self.xp.asarray(A), self.xp.asarray(b))
        np.testing.assert_allclose(self.to_np(P), np.linalg.inv(A), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(
            self.to_np(w), np.linalg.solve(A, b[..., None])[..., 0], rtol=1e-10
        )
        with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
            kernels.ridge_solve(self.xp.asarray(-A), self.xp.asarray(b))

    def test_scores_and_ucb_bonus(self):
        rng = np.random.default_rng(2)
        W, F = rng.normal(size=(3, 4)), rng.normal(size=(7, 4))
        M = rng.normal(size=(3, 4, 4))
        P = M @ M.transpose(0, 2, 1)
        np.testing.assert_allclose(
            self.to_np(kernels.scores(self.xp.asarray(W), self.xp.asarray(F))), W @ F.T
        )
        bonus = self.to_np(kernels.ucb_bonus(self.xp.asarray(P), self.xp.asarray(F)))
        want = np.sqrt(np.einsum("nd,bde,ne->bn", F, P, F))
        np.testing.assert_allclose(bonus, want, rtol=1e-12)

    def test_thompson_samples_have_the_posterior_moments(self):
        rng = self.xp.random.default_rng(0)
        w = self.xp.asarray(np.array([[1.0, -2.0]]))
        P = self.xp.asarray(np.array([[[0.5, 0.2], [0.2, 0.3]]]))
        draws = np.stack(
            [self.to_np(kernels.thompson_sample(w, P, 2.0, rng))[0] for _ in range(4000)]
        )
        np.testing.assert_allclose(draws.mean(axis=0), [1.0, -2.0], atol=0.08)
        np.testing.assert_allclose(np.cov(draws.T), 4.0 * self.to_np(P)[0], atol=0.12)

    def test_float32_states_are_supported(self):
        P, w, A, b = (s.astype(self.xp.float32) for s in self.prior_states(4, 3, 1.0))
        rng = np.random.default_rng(4)
        f, t = rng.normal(size=(4, 3)), rng.normal(size=4)
        type(self).update(
            P,
            w,
            A,
            b,
            self.xp.asarray(f, dtype=self.xp.float32),
            self.xp.asarray(t, dtype=self.xp.float32),
            1.0,
        )
        assert w.dtype == self.xp.float32
        want = np.stack(
            [np.linalg.solve(np.eye(3) + np.outer(r, r), r * s) for r, s in zip(f, t, strict=True)]
        )
        np.testing.assert_allclose(self.to_np(w), want, rtol=1e-5, atol=1e-6)
