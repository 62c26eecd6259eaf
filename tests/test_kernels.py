"""Kernel properties on the CPU: the public (fused) update and the generic array-API one."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kernel_checks import (
    EXAMPLES,
    SUPPRESSED,
    KernelChecks,
    batch_solution,
    drifting_solution,
    relative_error,
    streams,
)
from velox import kernels
from velox.backend import CPU
from velox.kernels import array_api, cpu, stream
from velox.state import RidgeTable


def _generic(P, w, A, b, f, t, gamma=1.0):
    array_api.check_update_inputs(P, w, A, b, f, t)
    return array_api.rank_one_update(P, w, A, b, f, t, gamma)


class TestPublicUpdateOnNumPy(KernelChecks):
    xp = np
    update = staticmethod(kernels.rank_one_update)

    def test_contiguous_numpy_takes_the_fused_path(self):
        states = self.prior_states(2, 3, 1.0)
        assert cpu.fusable(*states)
        assert not cpu.fusable(states[0][:, :, ::-1], *states[1:])
        assert not cpu.fusable(states[0].astype(np.float32), *states[1:])


class TestGenericUpdateOnNumPy(KernelChecks):
    xp = np
    update = staticmethod(_generic)


def test_one_user_stays_exact_over_100k_updates():
    rng = np.random.default_rng(11)
    d, n, lam = 16, 100_000, 1.0
    table = RidgeTable(d, regularization=lam, backend=CPU, refactor_interval=1000)
    row = table.ensure(["u"])
    f = rng.normal(size=(n, d))
    t = f @ rng.normal(size=d) + rng.normal(size=n)
    for j in range(n):
        table.update(row, f[j : j + 1], t[j : j + 1], float(j))
    want, _ = batch_solution(lam, 1.0, f, t, np.zeros(d))
    assert relative_error(table.w[0], want) < 1e-6
    assert table.count[0] == n


def test_without_refactorisation_the_inverse_drifts_and_refit_repairs_it():
    """The refit is not decorative: in float32 the recursion alone drifts visibly."""
    rng = np.random.default_rng(12)
    d, n = 8, 20_000
    f = rng.normal(size=(n, d)).astype(np.float32)
    t = (f @ rng.normal(size=d)).astype(np.float32)
    drifting = RidgeTable(
        d, regularization=1.0, backend=CPU, dtype="float32", refactor_interval=10**9
    )
    refit = RidgeTable(d, regularization=1.0, backend=CPU, dtype="float32", refactor_interval=500)
    for table in (drifting, refit):
        row = table.ensure(["u"])
        for j in range(n):
            table.update(row, f[j : j + 1], t[j : j + 1], 0.0)
    want, _ = batch_solution(1.0, 1.0, f.astype(np.float64), t.astype(np.float64), np.zeros(d))
    assert relative_error(refit.w[0], want) < relative_error(drifting.w[0], want)


@pytest.mark.parametrize("implementation", ["compiled", "sparse"])
def test_normal_equations_equal_the_dense_weighted_sums(implementation):

    rng = np.random.default_rng(11)
    n_rows, n_cols, d, nnz = 7, 9, 4, 40
    rows = np.sort(rng.integers(0, n_rows - 1, nnz))  # the last row has no ratings
    cols = rng.integers(0, n_cols, nnz)
    t, c = rng.normal(size=nnz), rng.uniform(0.2, 1.0, nnz)
    F, reg = rng.normal(size=(n_cols, d)), rng.uniform(0.5, 2.0, n_rows)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_rows))])
    module = cpu if implementation == "compiled" else array_api
    A, b = module.normal_equations(indptr, cols, t, c, F, reg)
    for r in range(n_rows):
        mine = rows == r
        Fr = F[cols[mine]]
        want_A = (Fr * c[mine, None]).T @ Fr + reg[r] * np.eye(d)
        np.testing.assert_allclose(A[r], want_A, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(b[r], Fr.T @ (c[mine] * t[mine]), rtol=1e-12, atol=1e-12)


def test_the_compiled_ridge_solve_refuses_a_matrix_that_is_not_positive_definite():
    A = np.stack([np.eye(3), -np.eye(3)])
    with pytest.raises(kernels.NotPositiveDefiniteError, match="increase the regularization"):
        kernels.ridge_solve(A, np.ones((2, 3)))
    np.testing.assert_allclose(kernels.ridge_solve(2 * np.eye(3)[None], np.ones((1, 3))), 0.5)


def _one_state_through_the_loop(case, interval: int, walk: float = 0.0) -> stream.Ridge:
    """Replay a stream of recorded targets into one user state through the in-order loop."""
    d, lam, gamma, f, t, w0 = case
    n = t.size
    P, w, A, b = TestPublicUpdateOnNumPy().prior_states(1, d, lam, w0)
    users = stream.Ridge(P, w, A, b, np.zeros(1, np.int64), np.zeros(1), gamma, interval,
                         walk, d - 1)  # fmt: skip
    empty = np.zeros((1, 0, 0)), np.zeros((1, 0)), np.zeros((1, 0, 0)), np.zeros((1, 0))
    folds = stream.Ridge(*empty, np.zeros(1, np.int64), np.zeros(1), 1.0, 1000)
    biases = stream.Biases(np.array([0.0, 1.0]), *np.zeros((4, 1)))
    rows = stream.Rows(np.zeros(n, np.int64), np.arange(n), np.full(n, -1), np.zeros(n, np.int64))
    coordinates = np.zeros(0, np.int64), np.arange(d)
    recorded = stream.Effects(np.zeros(n), t, np.zeros(n), np.zeros((n, d)), np.zeros((n, 0)),
                              np.zeros(n))  # fmt: skip
    features = (np.ascontiguousarray(f), np.zeros(d), *coordinates)
    stream.apply_stream(users, folds, biases, rows, features, t, np.arange(n, dtype=float),
                        recorded, replay=True)  # fmt: skip
    return users


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=SUPPRESSED)
@given(streams(forgetting=True), st.integers(1, 7))
def test_the_in_order_loop_equals_the_weighted_batch_ridge_of_one_state(case, interval):
    """Every observation of a burst into one state, refits every ``interval`` updates included.

    On replay (recorded targets) the loop's user update is the recursion alone.
    """
    _, lam, gamma, f, t, w0 = case
    users = _one_state_through_the_loop(case, interval)
    want, A_want = batch_solution(lam, gamma, f, t, w0)
    assert relative_error(users.w[0], want) < 1e-8
    np.testing.assert_allclose(users.A[0], A_want, rtol=1e-12, atol=1e-12)
    assert users.count[0] == t.size


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=SUPPRESSED)
@given(streams(forgetting=True), st.floats(0.001, 0.5), st.integers(1, 7))
def test_the_in_order_loop_takes_the_drift_step_before_each_update(case, drift, interval):
    """The compiled loop's drift (and its refits from ``A``, ``b``) equals the explicit walk."""
    _, lam, gamma, f, t, w0 = case
    users = _one_state_through_the_loop(case, interval, drift)
    want, A_want = drifting_solution(lam, gamma, drift, f, t, w0)
    assert relative_error(users.w[0], want) < 1e-8
    np.testing.assert_allclose(users.A[0], A_want, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(users.A[0], users.A[0].T)  # checkpoints store the upper half


def test_a_table_with_drift_applies_it_on_the_rounds_path():
    """:meth:`RidgeTable.update` (the GPU's rounds) takes the same drift step as the loop."""
    rng = np.random.default_rng(4)
    d, n, lam, drift = 4, 40, 2.0, 0.05
    table = RidgeTable(d, regularization=lam, backend=CPU, walk=drift, walk_coordinate=d - 1)
    row = table.ensure(["u"])
    f, t = rng.normal(size=(n, d)), rng.normal(size=n)
    for j in range(n):
        table.update(row, f[j : j + 1], t[j : j + 1], float(j))
    want, _ = drifting_solution(lam, 1.0, drift, f, t, np.zeros(d))
    assert relative_error(table.w[0], want) < 1e-8


def test_the_walk_leaves_the_same_statistics_bits_whether_states_are_refit_or_not():
    """A state rebuilt from a checkpoint (a refit) must continue to the live state's ``A, b``."""
    rng = np.random.default_rng(6)
    d, n = 4, 60
    f, t = rng.normal(size=(n, d)), rng.normal(size=n)
    rules = {"walk": 0.05, "walk_coordinate": d - 1, "forgetting": 0.97}
    tables = [
        RidgeTable(d, regularization=2.0, backend=CPU, refactor_interval=interval, **rules)
        for interval in (3, 10**9)
    ]
    for table in tables:
        row = table.ensure(["u"])
        for j in range(n):
            table.update(row, f[j : j + 1], t[j : j + 1], float(j))
    refit, recursed = tables
    np.testing.assert_array_equal(refit.A[0], recursed.A[0])
    np.testing.assert_array_equal(refit.b[0], recursed.b[0])
