"""The array-namespace seam: the same kernels run on NumPy or on CuPy.

CuPy is probed once, when this module is imported. A missing CuPy is silent
(NumPy is always there); a CuPy that imports but cannot reach a GPU warns with
the reason, so ``device = "auto"`` never fails and ``device = "gpu"`` fails at
once with that reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from velox.errors import DeviceError

log = logging.getLogger(__name__)


def _probe_cupy() -> tuple[ModuleType | None, str]:
    try:
        import cupy
    except ImportError:
        return None, "CuPy is not installed (install the extra: pip install 'velox[gpu]')"
    except Exception as exc:  # a broken CUDA install can raise anything on import
        log.warning("CuPy failed to import, using NumPy: %s", exc)
        return None, f"CuPy failed to import ({exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        log.warning("CuPy is installed but sees no usable GPU, using NumPy: %s", exc)
        return None, f"CuPy is installed but the CUDA runtime failed ({exc})"
    if count < 1:
        return None, "CuPy is installed but no GPU is visible to this process"
    return cupy, ""


_CUPY, CUPY_UNAVAILABLE_REASON = _probe_cupy()
HAS_CUPY = _CUPY is not None


@dataclass(frozen=True)
class Backend:
    """An array namespace (``xp``) plus the few conversions the rest of Velox needs."""

    name: str
    xp: ModuleType

    @property
    def is_gpu(self) -> bool:
        return self.name == "gpu"

    def asarray(self, data: Any, dtype: Any = None) -> Any:
        """Copy host data onto this backend's device (no copy when already there)."""
        return self.xp.asarray(data, dtype=dtype)

    def to_numpy(self, array: Any) -> np.ndarray:
        """Bring an array back to host memory as NumPy."""
        if self.is_gpu:
            return self.xp.asnumpy(array)
        return np.asarray(array)

    def default_rng(self, seed: int | None = None) -> Any:
        """A random generator that draws directly on the device."""
        return self.xp.random.default_rng(seed)


CPU = Backend("cpu", np)


def get_backend(device: str = "auto") -> Backend:
    """Pick the array library for ``device`` in {"auto", "cpu", "gpu"}.

    >>> get_backend("cpu").name
    'cpu'
    """
    if device == "cpu":
        return CPU
    if device == "auto":
        return Backend("gpu", _CUPY) if HAS_CUPY else CPU
    if device == "gpu":
        if not HAS_CUPY:
            raise DeviceError(
                f"device = 'gpu' was asked for but {CUPY_UNAVAILABLE_REASON}; "
                "use device = 'auto' or 'cpu' to run on NumPy"
            )
        return Backend("gpu", _CUPY)
    raise DeviceError(f"device = {device!r} is not one of 'auto', 'cpu', 'gpu'")


def array_module(array: Any) -> ModuleType:
    """The namespace (numpy or cupy) that owns ``array``."""
    if HAS_CUPY and isinstance(array, _CUPY.ndarray):
        return _CUPY
    return np
