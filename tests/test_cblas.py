"""peftmath._cblas: ``c ← alpha·a@b + beta·c`` in place through OpenBLAS's CBLAS, without importing SciPy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from peftmath import _cblas


def _bound(dtype) -> None:
    if not _cblas.gemm_(np.zeros((1, 1), dtype), np.ones((1, 1), dtype), np.ones((1, 1), dtype), 1.0):
        pytest.skip("no checked CBLAS gemm in this process (not Linux, or no OpenBLAS with a known symbol)")


def _layouts(rng, m, n, dtype):
    """(name, backing array, its view that is c): C order, F order, padded rows, rows of F columns."""
    c = rng.standard_normal((m, n)).astype(dtype)
    padded = rng.standard_normal((m, n + 5)).astype(dtype)
    fpad = np.asfortranarray(rng.standard_normal((m + 3, n)).astype(dtype))
    return [("C", c, lambda x: x), ("F", np.asfortranarray(c), lambda x: x),
            ("padded rows", padded, lambda x: x[:, 2:n + 2]), ("F view", fpad, lambda x: x[1:m + 1])]


def _operands(rng, m, k, n, dtype):
    """(name, a (m, k), b (k, n)): contiguous, transposed, padded, one axis without unit stride (copied)."""
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    yield "contiguous", a, b
    yield "transposed", np.asfortranarray(a), np.asfortranarray(b)
    a_pad = np.zeros((m, k + 3), dtype)
    a_pad[:, 1:k + 1] = a
    yield "padded", a_pad[:, 1:k + 1], b
    b_step = np.zeros((k, 2 * n), dtype)
    b_step[:, ::2] = b
    yield "strided", a, b_step[:, ::2]
    yield "float64 operands", a.astype(np.float64), b.astype(np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(37, 4, 53), (64, 16, 1), (1, 3, 80), (129, 1, 65)])
def test_against_float64(dtype, shape):
    """Every layout of c and of the operands, against float64 with a rounding bound; elements of the
    backing array outside c's view are untouched."""
    _bound(dtype)
    m, k, n = shape
    rng = np.random.default_rng(m * 1000 + n)
    eps = np.finfo(dtype).eps
    for cname, backing0, view in _layouts(rng, m, n, dtype):
        for oname, a, b in _operands(rng, m, k, n, dtype):
            backing = backing0.copy(order="K")
            before = view(backing).astype(np.float64)
            a_c = a.astype(dtype).astype(np.float64)
            b_c = b.astype(dtype).astype(np.float64)
            assert _cblas.gemm_(view(backing), a, b, 0.75, beta=1.5), (cname, oname)
            expected = 1.5 * before + 0.75 * (a_c @ b_c)
            bound = 4 * (k + 2) * eps * (1.5 * np.abs(before) + 0.75 * (np.abs(a_c) @ np.abs(b_c)))
            assert np.all(np.abs(view(backing) - expected) <= bound), (cname, oname)
            outside = backing0.copy(order="K")
            view(outside)[...] = view(backing)  # the only elements allowed to differ
            np.testing.assert_array_equal(backing, outside, err_msg=f"{cname}, {oname}")


def test_same_bits_as_scipy_gemm():
    """The binding is SciPy's own OpenBLAS: the bits of ``scipy.linalg.blas.sgemm`` with beta=1."""
    from scipy.linalg import blas

    _bound(np.float32)
    rng = np.random.default_rng(5)
    for m, n, r in [(512, 384, 16), (333, 1000, 64), (2048, 64, 8)]:
        w = rng.standard_normal((m, n)).astype(np.float32)
        a = rng.standard_normal((r, n)).astype(np.float32)
        b = rng.standard_normal((m, r)).astype(np.float32)
        ours = w.copy()
        assert _cblas.gemm_(ours, b, a, 0.37)
        theirs = w.copy()
        blas.sgemm(0.37, a.T, b.T, beta=1.0, c=theirs.T, overwrite_c=True)
        np.testing.assert_array_equal(ours, theirs)


def test_declines_without_touching():
    _bound(np.float32)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 3)).astype(np.float32)
    b = rng.standard_normal((3, 8)).astype(np.float32)
    cases = {
        "float16": np.zeros((6, 8), np.float16),
        "no unit stride": np.zeros((6, 16), np.float32)[:, ::2],
        "read-only": np.zeros((6, 8), np.float32),
        "wrong shape": np.zeros((6, 7), np.float32),
        "3-d": np.zeros((1, 6, 8), np.float32),
    }
    cases["read-only"].flags.writeable = False
    for name, c in cases.items():
        before = c.copy()
        assert not _cblas.gemm_(c, a, b, 1.0), name
        np.testing.assert_array_equal(c, before, err_msg=name)
    empty = np.ones((6, 8), np.float32)
    assert not _cblas.gemm_(empty, a[:, :0], b[:0], 1.0)  # k = 0: left to the caller
    np.testing.assert_array_equal(empty, 1.0)


def test_operand_aliasing_the_output_is_read_before_writing():
    _bound(np.float64)
    rng = np.random.default_rng(2)
    c = rng.standard_normal((5, 5))
    expected = c + 0.5 * (c @ c)
    assert _cblas.gemm_(c, c, c, 0.5)
    np.testing.assert_allclose(c, expected, rtol=1e-13, atol=1e-13)


def test_no_scipy_import():
    """A merge through the NumPy backend imports no SciPy module (0.1-0.15 s of start-up)."""
    code = ("import sys, numpy as np\n"
            "from peftmath.methods import lora\n"
            "from peftmath import _cblas\n"
            "W = np.ones((64, 32), np.float32); A = np.ones((4, 32), np.float32); B = np.ones((64, 4), np.float32)\n"
            "lora.merge(W, A, B, scaling=0.5, copy=False)\n"
            "assert np.all(W == 3.0), W\n"
            "bound = _cblas._GEMM.get('f') is not None\n"
            "print(bound, sorted(m for m in sys.modules if m.split('.')[0] == 'scipy'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    if out[0] != "True":
        pytest.skip("no CBLAS binding here: the merge imports SciPy's gemm instead")
    assert out[1].strip() == "[]"


def test_scipy_import_afterwards_maps_the_same_library():
    """Opening SciPy's OpenBLAS by path, then importing scipy.linalg, leaves one copy of it in the process (one
    mapping at file offset 0), so its thread pool and its thread cap are shared."""
    code = ("import numpy as np\n"
            "from peftmath import _cblas\n"
            "assert _cblas.gemm_(np.zeros((2, 2), np.float32), np.ones((2, 1), np.float32), np.ones((1, 2), np.float32), 1.0)\n"
            "import scipy.linalg.blas\n"
            "starts = [l.split() for l in open('/proc/self/maps') if 'scipy.libs' in l and 'openblas' in l.lower()]\n"
            "print(sum(1 for f in starts if len(f) == 6 and int(f[2], 16) == 0))\n")
    if not _cblas.scipy_openblas():
        pytest.skip("no OpenBLAS bundled with SciPy here")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"


def test_dimensions_beyond_the_binding_integers_are_declined(monkeypatch):
    """A 32-bit binding gets no dimension above 2**31 - 1 (ctypes would truncate it): checked here with the limit
    lowered, on the dimensions and on a leading dimension alone."""
    _bound(np.float32)
    fn, _ = _cblas._GEMM["f"]
    monkeypatch.setitem(_cblas._GEMM, "f", (fn, 6))
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 2)).astype(np.float32)
    b = rng.standard_normal((2, 6)).astype(np.float32)
    fits = np.zeros((6, 6), np.float32)
    assert _cblas.gemm_(fits, a, b, 1.0)
    np.testing.assert_allclose(fits, a @ b, rtol=1e-6)
    for c in (np.zeros((7, 6), np.float32), np.zeros((6, 9), np.float32)[:, :6]):  # a row, then a leading dim
        before = c.copy()
        assert not _cblas.gemm_(c, rng.standard_normal((c.shape[0], 2)).astype(np.float32), b, 1.0)
        np.testing.assert_array_equal(c, before)


def test_a_tile_no_gemm_takes_is_an_error_and_the_weight_is_unchanged(monkeypatch):
    """The bfloat16 row-tile paths never skip a tile: with every gemm declining, the merge raises and the weight
    keeps its bits."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from peftmath import backends
    from peftmath.errors import BackendError

    monkeypatch.setattr(backends, "_gemm_", lambda *args: False)
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 48)).astype(ml_dtypes.bfloat16)
    before = w.copy()
    b = rng.standard_normal((64, 4)).astype(np.float32)
    a = rng.standard_normal((4, 48)).astype(np.float32)
    with pytest.raises(BackendError, match="row tile"):
        backends.get_backend("numpy").addmm_(w, b, a, 0.5)
    np.testing.assert_array_equal(w.view(np.uint16), before.view(np.uint16))
