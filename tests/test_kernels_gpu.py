"""The same kernel assertions on CuPy; skipped, with the reason, where no GPU is visible."""

from __future__ import annotations

import pytest

from tests.kernel_checks import KernelChecks
from velox import kernels
from velox.backend import _CUPY, CUPY_UNAVAILABLE_REASON, HAS_CUPY

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUPY, reason=f"no GPU: {CUPY_UNAVAILABLE_REASON}"),
]


class TestUpdateOnCuPy(KernelChecks):
    xp = _CUPY
    update = staticmethod(kernels.rank_one_update)
