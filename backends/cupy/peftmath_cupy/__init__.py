"""peftmath's CUDA backend through CuPy.

Registered under the entry-point group ``peftmath.backends`` as ``cupy``. Importing this module does
not import CuPy; constructing :class:`CupyBackend` does, and raises
:class:`peftmath.errors.BackendError` naming what to install when CuPy or a CUDA device is missing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from peftmath._array import dtype_name
from peftmath.backends import ArrayAPIBackend
from peftmath.errors import BackendError

__all__ = ["CupyBackend"]

_INSTALL = "pip install -e backends/cupy[cuda12] (or [cuda13]) on a machine with an NVIDIA GPU and driver"


class CupyBackend(ArrayAPIBackend):
    """CuPy arrays: in-place merges in one pass over W (a CUDA kernel for float32/bfloat16/float16 and
    ranks up to 64; cuBLAS gemm with beta=1 for float64 and larger ranks), pinned host transfer."""

    name = "cupy"
    def __init__(self) -> None:
        try:
            import cupy
        except ImportError as exc:
            raise BackendError(f"the cupy backend needs CuPy: {_INSTALL}") from exc
        try:
            available = cupy.cuda.is_available()
        except Exception:  # pragma: no cover - driver trouble
            available = False
        if not available:
            raise BackendError(f"the cupy backend needs a CUDA device, and CuPy sees none ({_INSTALL})")
        self._cupy = cupy

    # --- namespace and random numbers -----------------------------------------------------------
    def namespace(self) -> Any:
        import array_api_compat.cupy as xp

        return xp

    def handles(self, xp: Any) -> bool:
        import array_api_compat

        return array_api_compat.is_cupy_namespace(xp)

    def device_rng(self, seed: int | None = None) -> Any:
        """CuPy's own generator (XORWOW): fast, but its numbers differ from NumPy's for one seed."""
        return self._cupy.random.default_rng(seed)

    # --- host transfer ----------------------------------------------------------------------------
    def from_host(self, a: np.ndarray, xp: Any, device: Any = None) -> Any:
        cp = self._cupy
        a = np.ascontiguousarray(a)
        with (device if device is not None else cp.cuda.Device()):
            if a.nbytes < (1 << 20):
                return cp.asarray(a)
            pinned = _pinned_like(cp, a)
            out = cp.empty(a.shape, dtype=a.dtype)
            out.set(pinned)
            return out

    def to_host(self, x: Any) -> np.ndarray:
        cp = self._cupy
        if x.nbytes < (1 << 20):
            return cp.asnumpy(x)
        import cupyx

        out = cupyx.empty_pinned(x.shape, dtype=x.dtype)
        cp.ascontiguousarray(x).get(out=out)
        return np.array(out)  # leave the pinned pool's buffer to CuPy

    # --- in-place kernels -------------------------------------------------------------------------
    def addmm_(self, m: Any, b: Any, a: Any, alpha: float) -> bool:
        cp = self._cupy
        if not all(isinstance(t, cp.ndarray) for t in (m, a, b)) or m.ndim != 2:
            return False
        if m.shape != (b.shape[0], a.shape[1]) or not (m.flags.c_contiguous or m.flags.f_contiguous):
            return False
        from cupy import cublas

        from ._kernels import lora_addmm_

        name = dtype_name(m.dtype)
        kind = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(name)
        if kind is not None:
            # one pass over W: float32 accumulation of the rank-r product, one rounding
            c_order = (m, b, a) if m.flags.c_contiguous else (m.T, a.T, b.T)  # M = W.T of a C-ordered W
            if lora_addmm_(*c_order, alpha, kind):
                return True
        if name in ("float32", "float64"):
            cublas.gemm("N", "N", b.astype(m.dtype, copy=False), a.astype(m.dtype, copy=False),
                        out=m, alpha=alpha, beta=1.0)
            return True
        return False


def _pinned_like(cp: Any, a: np.ndarray) -> np.ndarray:
    import cupyx

    pinned = cupyx.empty_pinned(a.shape, dtype=a.dtype)
    pinned[...] = a
    return pinned
