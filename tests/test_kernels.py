"""Kernel properties on the CPU: the public (fused) update and the generic array-API one."""

from __future__ import annotations

import numpy as np

from tests.kernel_checks import KernelChecks, batch_solution, relative_error
from velox import kernels
from velox.backend import CPU
from velox.kernels import array_api, cpu
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
