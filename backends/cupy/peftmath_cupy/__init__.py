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
    ranks up to 64; cuBLAS gemm with beta=1 for float64 and larger ranks), DoRA's merge and unmerge and
    IA3's scaling and the mixed-batch forward's adapter terms as kernels (see
    :mod:`peftmath_cupy._kernels`), pinned host transfer. OFT/BOFT's block rotations use the namespace's
    batched ``matmul`` (cuBLAS strided-batched gemm).

    The in-place contract (:mod:`peftmath.backends`): every hook receives arrays that alias the
    caller's weight (never a reshape copy) and writes through them or declines touching nothing. The
    CUDA kernels take C-contiguous matrices (an F-contiguous ``m`` is its C-contiguous transpose);
    any other strides are declined here and the caller computes out of place and stores the result."""

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
        self._kernels: Any = None

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
    @property
    def kernels(self) -> Any:
        """The CUDA kernels (:class:`peftmath_cupy._kernels.Kernels`), compiled per rank on first use."""
        if self._kernels is None:
            from ._kernels import Kernels

            cp = self._cupy
            self._kernels = Kernels(cp, lambda code, options: cp.RawModule(code=code, options=options))
        return self._kernels

    def _all_cupy(self, *arrays: Any) -> bool:
        return all(isinstance(t, self._cupy.ndarray) for t in arrays)

    def addmm_(self, m: Any, b: Any, a: Any, alpha: float) -> bool:
        if not self._all_cupy(m, a, b) or m.ndim != 2 or b.ndim != 2 or a.ndim != 2:
            return False
        if m.shape != (b.shape[0], a.shape[1]) or not (m.flags.c_contiguous or m.flags.f_contiguous):
            return False
        # one pass over W: float32 accumulation of the rank-r product, one rounding
        c_order = (m, b, a) if m.flags.c_contiguous else (m.T, a.T, b.T)  # M = W.T of a C-ordered W
        if self.kernels.lora_addmm_(*c_order, alpha):
            return True
        if dtype_name(m.dtype) in ("float32", "float64"):
            from cupy import cublas

            cublas.gemm("N", "N", b.astype(m.dtype, copy=False), a.astype(m.dtype, copy=False),
                        out=m, alpha=alpha, beta=1.0)
            return True
        return False

    def dora_merge_(self, m: Any, b: Any, a: Any, alpha: float, magnitude: Any) -> Any:
        if self._all_cupy(m, b, a, magnitude) and m.ndim == 2:
            n = self.kernels.dora_merge_(m, b, a, alpha, magnitude)
            if n is not None:
                return n
        return super().dora_merge_(m, b, a, alpha, magnitude)

    def dora_unmerge_(self, m: Any, b: Any, a: Any, alpha: float, q: Any) -> bool:
        return self._all_cupy(m, b, a, q) and m.ndim == 2 and self.kernels.dora_unmerge_(m, b, a, alpha, q)

    def lora_gather_(self, y: Any, x: Any, a_stack: Any, b_stack: Any, idx: Any) -> bool:
        return self._all_cupy(y, x, a_stack, b_stack, idx) and self.kernels.lora_gather_(y, x, a_stack, b_stack, idx)

    def scale_(self, w: Any, s: Any, inverse: bool) -> bool:
        return self._all_cupy(w, s) and self.kernels.ia3_scale_(w, s, inverse)

    # --- convolution ------------------------------------------------------------------------------
    def conv(self, x: Any, weight: Any, bias: Any, *, stride: tuple[int, ...], padding: tuple[tuple[int, int], ...],
             dilation: tuple[int, ...], groups: int) -> Any:
        """The convolution hook of :func:`peftmath._array.conv` (normalised arguments, see
        :mod:`peftmath._conv`): stride 1 in float32/float64 (float16 computed in float32) as one cuBLAS
        gemm per kernel offset on shifted windows of the padded input
        (:func:`peftmath._conv.shifted_gemm_conv`: no im2col buffer). Other strides, bfloat16 and other
        dtypes return None: the portable reference runs. CuPy 14 has no cuDNN, so there is no library
        convolution to call."""
        from peftmath._conv import shifted_gemm_conv

        arrays = (x, weight) if bias is None else (x, weight, bias)
        if not self._all_cupy(*arrays) or any(dtype_name(a.dtype) == "bfloat16" for a in arrays):
            return None  # CuPy's bfloat16 support is partial: the reference computes it in float32
        return shifted_gemm_conv(self._cupy, x, weight, bias, stride=stride, padding=padding,
                                 dilation=dilation, groups=groups)


def _pinned_like(cp: Any, a: np.ndarray) -> np.ndarray:
    import cupyx

    pinned = cupyx.empty_pinned(a.shape, dtype=a.dtype)
    pinned[...] = a
    return pinned
