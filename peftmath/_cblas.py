"""``C ← α·A·B + β·C`` in place through OpenBLAS's CBLAS, without importing SciPy.

NumPy has no gemm with ``beta``: ``np.matmul(B, A, out=...)`` overwrites its output, so ``W += s·B@A``
costs a temporary of ``W``'s size (or row tiles and a second pass: 1.4x the time of one gemm with
``beta=1``, measured on Linear(4096, 4096)). SciPy's ``scipy.linalg.blas.sgemm`` has ``beta``, but
importing ``scipy.linalg`` takes 0.1-0.15 s, a tenth of a ``peftmath merge`` of a 700 MB model.

The same routine is reached here through ctypes, from the OpenBLAS that SciPy's wheel ships
(``scipy.libs/libscipy_openblas*.so``, found with ``importlib.util.find_spec`` and opened by path: no
SciPy module is imported, and a later ``import scipy.linalg`` maps the same library, not a second copy)
or, without it, from an OpenBLAS already mapped into the process (NumPy's wheel links one; Linux:
``/proc/self/maps``). SciPy's comes first: it is the library ``scipy.linalg.blas`` calls, so the bits are
the ones peftmath computed before this module, and on the 2-core machine NumPy's OpenBLAS 0.3.31 took
1.15-1.2x the time of SciPy's 0.3.30 for the rank-16 update of a 4096 x 4096 weight.

Only symbols whose integer width their name states are bound: ``scipy_cblas_sgemm`` (32-bit, SciPy's
wheels), ``scipy_cblas_sgemm64_`` and ``cblas_sgemm64_`` (64-bit); a plain ``cblas_sgemm`` is never used.
Each binding is checked once, on a small product with padded rows and a transposed operand, against
float64 before it is used. Anything else (another platform, MKL, Accelerate, a failed check) makes
:func:`gemm_` return ``False`` and the caller takes its other path (``scipy.linalg.blas``).

ctypes releases the GIL for the call, as a BLAS call should: the streamed merge's read-ahead and
write-behind threads keep running during the gemm.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["gemm_", "loaded_openblas", "scipy_openblas"]

# CBLAS enums
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112

#: (symbol, 64-bit integers) by dtype character, in order of preference: SciPy's wheel first (32-bit integers)
_SYMBOLS = {
    "f": [("scipy_cblas_sgemm", False), ("scipy_cblas_sgemm64_", True), ("cblas_sgemm64_", True)],
    "d": [("scipy_cblas_dgemm", False), ("scipy_cblas_dgemm64_", True), ("cblas_dgemm64_", True)],
}

_UNSET = object()
#: dtype character -> (checked CBLAS gemm, the largest dimension its integers hold), or None
_GEMM: dict[str, Any] = {}


def loaded_openblas() -> list[tuple[str, Any]]:
    """``(path, ctypes.CDLL)`` of every OpenBLAS shared library mapped into this process, sorted by path
    (read from ``/proc/self/maps``; empty on other platforms or when none is loaded). Opening a library
    that is mapped already returns its handle: nothing new is loaded."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            paths = {parts[5].strip() for parts in (line.split(None, 5) for line in fh)
                     if len(parts) == 6 and "openblas" in parts[5].lower()}
    except OSError:
        return []
    import ctypes

    found = []
    for path in sorted(p for p in paths if ".so" in os.path.basename(p) and os.path.isfile(p)):
        try:
            found.append((path, ctypes.CDLL(path)))
        except OSError:
            continue
    return found


def scipy_openblas() -> list[tuple[str, Any]]:
    """``(path, ctypes.CDLL)`` of the OpenBLAS bundled with SciPy's wheel (``scipy.libs/``, beside the
    ``scipy`` package), opened without importing SciPy; empty when there is none (another SciPy build,
    another platform)."""
    import glob
    import importlib.util

    try:
        spec = importlib.util.find_spec("scipy")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    import ctypes

    found = []
    for root in spec.submodule_search_locations:
        for path in sorted(glob.glob(os.path.join(os.path.dirname(root), "scipy.libs", "libscipy_openblas*.so*"))):
            try:
                found.append((path, ctypes.CDLL(path)))
            except OSError:
                continue
    return found


def _bind(char: str) -> Any:
    """``(gemm, largest dimension)`` for dtype character ``char`` ("f" or "d"): the first checked CBLAS gemm
    found, or None."""
    import ctypes

    real = ctypes.c_float if char == "f" else ctypes.c_double
    for find in (scipy_openblas, loaded_openblas):
        fn = _first_checked(find(), char, real)
        if fn is not None:
            return fn
    return None


def _first_checked(libs: list[tuple[str, Any]], char: str, real: Any) -> Any:
    import ctypes

    for _, lib in libs:
        for name, wide in _SYMBOLS[char]:
            fn = getattr(lib, name, None)
            if fn is None:
                continue
            idx = ctypes.c_int64 if wide else ctypes.c_int32
            fn.restype = None
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, idx, idx, idx, real, ctypes.c_void_p, idx,
                           ctypes.c_void_p, idx, real, ctypes.c_void_p, idx]
            bound = (fn, 2**63 - 1 if wide else 2**31 - 1)
            if _self_check(bound, np.dtype(char)):
                return bound
    return None


def _self_check(bound: tuple[Any, int], dtype: np.dtype) -> bool:
    """The binding computes ``α·A·B + β·C`` on views with padded rows and a transposed operand."""
    def values(rows: int, cols: int) -> np.ndarray:  # small integers and halves: every result exact
        return (np.arange(rows * cols).reshape(rows, cols) % 7 - 3).astype(dtype) / 2

    big_c = values(5, 9)
    a = values(5, 7)[:, :3]  # (5, 3), ld 7
    b = values(6, 4).T[:3]  # (3, 6) column-major: ld 4, transposed
    c = big_c[:, :6]  # (5, 6), ld 9
    expected = 0.5 * (a.astype(np.float64) @ b.astype(np.float64)) + 2.0 * c.astype(np.float64)
    untouched = big_c[:, 6:].copy()
    try:
        _call(bound, c, a, b, 0.5, 2.0)
    except Exception:  # noqa: BLE001 - a binding that fails its check is not used
        return False
    return bool(np.array_equal(c, expected) and np.array_equal(big_c[:, 6:], untouched))


def _operand(x: np.ndarray) -> tuple[np.ndarray, int, int]:
    """``x`` as a row-major CBLAS operand: (array, transpose flag, leading dimension), copied only when
    neither axis has unit stride."""
    isz = x.itemsize
    rows, cols = x.shape
    s0, s1 = x.strides
    if (cols == 1 or s1 == isz) and (rows == 1 or (s0 % isz == 0 and s0 // isz >= cols)):
        return x, _NO_TRANS, (s0 // isz if rows > 1 else max(1, cols))
    if (rows == 1 or s0 == isz) and (cols == 1 or (s1 % isz == 0 and s1 // isz >= rows)):
        return x, _TRANS, (s1 // isz if cols > 1 else max(1, rows))
    x = np.ascontiguousarray(x)
    return x, _NO_TRANS, max(1, cols)


def _call(bound: tuple[Any, int], c: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float, beta: float) -> bool:
    """One gemm call; False, calling nothing, when a dimension does not fit the binding's integers (ctypes
    would truncate it silently)."""
    fn, largest = bound
    (m, n), k = c.shape, a.shape[1]
    a, ta, lda = _operand(a)
    b, tb, ldb = _operand(b)
    ldc = c.strides[0] // c.itemsize if m > 1 else max(1, n)
    if max(m, n, k, lda, ldb, ldc) > largest:
        return False
    fn(_ROW_MAJOR, ta, tb, m, n, k, alpha, a.ctypes.data, lda, b.ctypes.data, ldb, beta, c.ctypes.data, ldc)
    return True


def _row_major(c: np.ndarray) -> bool:
    isz = c.itemsize
    m, n = c.shape
    s0, s1 = c.strides
    return (n == 1 or s1 == isz) and (m == 1 or (s0 > 0 and s0 % isz == 0 and s0 // isz >= n))


def gemm_(c: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float, beta: float = 1.0) -> bool:
    """``c ← alpha·(a @ b) + beta·c`` in place, for a writeable float32 / float64 matrix ``c`` with unit
    stride along one axis (C or F order, or a view of rows or columns of one); ``a`` and ``b`` are cast to
    ``c``'s dtype. ``False``, with ``c`` untouched, when no checked BLAS is found or ``c``'s layout does
    not fit (the caller computes another way)."""
    if (c.dtype.char not in _SYMBOLS or c.ndim != 2 or a.ndim != 2 or b.ndim != 2 or not c.flags.writeable
            or a.shape[1] != b.shape[0] or c.shape != (a.shape[0], b.shape[1]) or 0 in c.shape + a.shape[1:]):
        return False
    bound = _GEMM.get(c.dtype.char, _UNSET)
    if bound is _UNSET:
        bound = _GEMM[c.dtype.char] = _bind(c.dtype.char)
    if bound is None:
        return False
    a = np.asarray(a, dtype=c.dtype)
    b = np.asarray(b, dtype=c.dtype)
    if np.may_share_memory(a, c):
        a = a.copy()
    if np.may_share_memory(b, c):
        b = b.copy()
    if _row_major(c):
        return _call(bound, c, a, b, alpha, beta)
    if _row_major(c.T):  # column-major: cᵀ ← alpha·bᵀaᵀ + beta·cᵀ, the same memory
        return _call(bound, c.T, b.T, a.T, alpha, beta)
    return False
