"""The CuPy backend's CUDA kernels (``peftmath_cupy._kernels``), on a GPU and on the CPU emulator.

Each test runs twice: on the CPU through the emulator (tests/backends/cuda_emulator.py: the same
kernel source and the same launch code, with NumPy arrays), and on a GPU through CuPy (marked ``gpu``,
skipped without one). Index arithmetic over partial tiles, the float32 accumulation, the single
rounding to bfloat16/float16, DoRA's norms and IA3's broadcasting are checked against float64
references and against the generic array-API path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from . import nvrtc
from .cuda_emulator import EmulatedModule, _kernel_names, compiler, emulated_cupy_backend

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "backends" / "cupy"))
from peftmath_cupy import _kernels  # noqa: E402

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
EPS32 = float(np.finfo(np.float32).eps)
# partial tiles in both directions, one element, a single full tile
SHAPES = [(1, 1), (33, 257), (70, 300), (32, 256)]


_EMULATED: list = []


def _emulated_kernels() -> _kernels.Kernels:
    """One emulated Kernels for the session (its compiled modules are reused)."""
    if not _EMULATED:
        _EMULATED.append(_kernels.Kernels(np, EmulatedModule))
    return _EMULATED[0]


class Device:
    """The kernels plus moves between the host (NumPy) and where the kernels run."""

    def __init__(self, name, kernels, to_dev, to_host):
        self.name, self.K, self.dev, self.host = name, kernels, to_dev, to_host


def _cupy_usable() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:
        return False


@pytest.fixture(scope="module", params=["emulated", pytest.param("cupy", marks=pytest.mark.gpu)])
def device(request) -> Device:
    if request.param == "emulated":
        if compiler() is None:
            pytest.skip("no C++ compiler to emulate the CUDA kernels")
        return Device("emulated", _emulated_kernels(), lambda a: a.copy(order="K"), lambda a: a)
    if not _cupy_usable():
        pytest.skip("needs CuPy and a CUDA device")
    import cupy as cp

    kernels = _kernels.Kernels(cp, lambda code, options: cp.RawModule(code=code, options=options))
    return Device("cupy", kernels, lambda a: cp.array(a, order="K"), cp.asnumpy)


def _ulp(dtype) -> float:
    return float(ml_dtypes.finfo(dtype).eps)


def _inputs(shape, r, dtype, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    A = (rng.standard_normal((r, shape[1])) / 3).astype(np.float32)
    B = (rng.standard_normal((shape[0], r)) / 3).astype(np.float32)
    return W, A, B


def _assert_one_rounding(got, exact, dtype, slack, min_clear=0.2):
    """``got`` (dtype) is ``exact`` (float64) rounded once, up to float32 accumulation error ``slack``.

    Everywhere: ``|got - exact| <= u·(|exact| + slack) + slack`` with ``u`` half of dtype's eps (the
    standard model of one rounding). Where ``exact`` is farther than ``slack`` from every rounding
    boundary of dtype, ``got`` is exactly the correctly rounded value (half precision only).
    """
    got64 = got.astype(np.float64)
    eps = _ulp(dtype)
    tiny = float(ml_dtypes.finfo(dtype).smallest_normal)
    assert np.all(np.abs(got64 - exact) <= 0.5 * eps * (np.abs(exact) + slack) + slack + tiny * eps)
    if dtype is np.float32:
        return  # float32 accumulation error is itself of the order of a float32 ulp: the bound is the test
    rounded = exact.astype(np.float32).astype(dtype).astype(np.float64)
    # the spacing of dtype at exact (smaller by half just below a power of two): boundaries lie at
    # least spacing / 4 from any representable value, so this margin keeps exact off every boundary
    spacing = eps * np.ldexp(1.0, np.frexp(np.maximum(np.abs(exact), tiny))[1] - 1)
    clear = np.abs(exact - rounded) + slack < 0.25 * spacing
    # exact -> float32 -> dtype double-rounds; skip the rare entries where that could matter
    clear &= np.abs(exact - exact.astype(np.float32)) < 1e-3 * spacing
    # the exact check must not be vacuous (with a large accumulation slack few entries are clear of
    # boundaries: the drawn cases pass min_clear=0)
    assert clear.size < 100 or clear.mean() >= min_clear
    assert np.array_equal(got64[clear], rounded[clear])


def test_emulator_sees_every_kernel():
    names = _kernel_names(_kernels._SOURCE)
    for stem in ("lora_addmm", "dora_sumsq", "dora_apply", "dora_unmerge", "ia3_scale"):
        for kind in _kernels.KINDS.values():
            assert f"{stem}_{kind}" in names
    for name in ("dora_finalize", "lora_shrink", "lora_expand"):
        assert name in names


@pytest.mark.skipif(not nvrtc.available(), reason="needs the gpu-build extra (NVRTC and the CUDA headers)")
@pytest.mark.parametrize(("rank", "arch"), [(1, "compute_80"), (16, "compute_90"), (_kernels.MAX_RANK, "compute_90")])
def test_nvrtc_compiles_the_kernels_with_A_in_registers(rank, arch):
    """The source compiles as CuPy's RawModule compiles it (same options), without warnings, and each
    thread's column of A stays in registers at every rank: the PTX has no local-memory array."""
    ptx, log = nvrtc.compile_ptx(_kernels._SOURCE, _kernels.compile_options(rank), arch)
    assert log == ""
    for name in _kernel_names(_kernels._SOURCE):
        assert f".entry {name}(" in ptx
    assert ".local" not in ptx
    # a thread issues a group's loads of W before its stores (memory-level parallelism)
    body = ptx[ptx.index(".entry lora_addmm_bf16("):]
    body = body[:body.find(".entry", 10)] if ".entry" in body[10:] else body
    ops = "".join("L" if op.startswith("ld.global.") else "S" for op in
                  (line.strip() for line in body.splitlines()) if op.startswith(("ld.global.", "st.global.")))
    assert "L" * _kernels.GROUP + "S" * _kernels.GROUP in ops


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", [1, 5, 64])
def test_lora_addmm_is_one_rounding_of_the_exact_update(device, dtype, shape, r):
    dt = DTYPES[dtype]
    W, A, B = _inputs(shape, r, dt, seed=r)
    alpha = -0.75
    exact = W.astype(np.float64) + alpha * (B.astype(np.float64) @ A.astype(np.float64))
    slack = 2 * r * EPS32 * abs(alpha) * (np.abs(B.astype(np.float64)) @ np.abs(A.astype(np.float64)))
    Wd = device.dev(W)
    assert device.K.lora_addmm_(Wd, device.dev(B), device.dev(A), alpha) is True
    _assert_one_rounding(device.host(Wd), exact, dt, slack)


def test_kernels_refuse_what_they_do_not_cover(device):
    K, dev = device.K, device.dev
    W, A, B = _inputs((8, 300), 65, np.float32)
    Wd = dev(W)
    assert K.lora_addmm_(Wd, dev(B), dev(A), 1.0) is False  # rank above 64
    assert K.dora_merge_(Wd, dev(B), dev(A), 1.0, dev(np.ones(8, np.float32))) is None
    assert np.array_equal(device.host(Wd), W)
    W, A, B = _inputs((8, 300), 5, np.float32)
    Wd, Ad, Bd = dev(W), dev(A), dev(B)
    assert K.lora_addmm_(dev(np.asfortranarray(W)), Bd, Ad, 1.0) is False  # not C-ordered
    assert K.lora_addmm_(Wd, Bd[:5], Ad, 1.0) is False  # shapes disagree
    assert K.lora_addmm_(dev(W.astype(np.float64)), Bd, Ad, 1.0) is False  # float64 goes to cuBLAS
    assert K.dora_merge_(Wd, Bd, Ad, 1.0, dev(np.ones(8, np.float64))) is None  # magnitude not float32
    assert K.dora_unmerge_(Wd, Bd, Ad, 1.0, dev(np.ones(7, np.float32))) is False
    assert K.ia3_scale_(Wd, dev(np.ones((8, 300), np.float32)), False) is False  # two varying axes
    assert K.ia3_scale_(Wd, dev(np.ones((1, 300), np.float64)), False) is False
    assert np.array_equal(device.host(Wd), W)


def test_tile_kernels_decline_more_rows_than_the_grid_holds(monkeypatch):
    """More row tiles than CUDA's grid y dimension (65535; 2 here): decline, touching nothing."""
    monkeypatch.setattr(_kernels, "MAX_ROW_BLOCKS", 2)
    W, A, B = _inputs((2 * _kernels.ROWS + 1, 20), 5, np.float32)
    before = W.copy()
    K = _kernels.Kernels(np, lambda code, options: pytest.fail("nothing should be compiled"))
    assert K.lora_addmm_(W, B, A, 1.0) is False
    assert K.dora_merge_(W, B, A, 1.0, np.ones(W.shape[0], np.float32)) is None
    assert np.array_equal(W, before)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(33, 257), (70, 300)])
def test_dora_merge_norms_and_weights(device, dtype, shape):
    dt = DTYPES[dtype]
    r, alpha = 5, 0.5
    W, A, B = _inputs(shape, r, dt, seed=3)
    W[4] = 0  # with B[4] = 0 this row of W + s·BA is zero: its norm is 0 and it stays 0
    B[4] = 0
    magnitude = (np.random.default_rng(1).random(shape[0]) + 0.5).astype(np.float32)
    V = W.astype(np.float64) + alpha * (B.astype(np.float64) @ A.astype(np.float64))
    n_exact = np.linalg.norm(V, axis=1)
    Wd = device.dev(W)
    n = device.host(device.K.dora_merge_(Wd, device.dev(B), device.dev(A), alpha, device.dev(magnitude)))
    W = device.host(Wd)
    assert n.dtype == np.float32 and n.shape == (shape[0],)
    assert n[4] == 0 and np.all(W[4].astype(np.float32) == 0)
    # float32 sums of squares: relative error a few eps (log2(cols) pairwise levels + sequential parts)
    assert np.allclose(n, n_exact, rtol=40 * EPS32, atol=0)
    g = np.divide(magnitude, n_exact, out=np.zeros_like(n_exact), where=n_exact != 0)
    exact = g[:, None] * V
    slack = (2 * r * EPS32 * alpha * (np.abs(B.astype(np.float64)) @ np.abs(A.astype(np.float64))) + 50 * EPS32 * np.abs(V))
    slack *= np.abs(g)[:, None]
    _assert_one_rounding(W, exact, dt, slack)


def test_dora_norms_do_not_depend_on_scheduling(device):
    """The row norms are per-block partial sums added in a fixed order (no atomics): two runs on the
    same input give the same bits (on a GPU the blocks run in any order and concurrently)."""
    if device.name == "emulated":
        pytest.skip("the emulator runs the blocks one after another: only a GPU can reorder them")
    W, A, B = _inputs((300, 1000), 16, ml_dtypes.bfloat16, seed=9)
    magnitude = (np.random.default_rng(3).random(300) + 0.5).astype(np.float32)
    runs = []
    for _ in range(2):
        Wd = device.dev(W)
        n = device.host(device.K.dora_merge_(Wd, device.dev(B), device.dev(A), 0.3, device.dev(magnitude)))
        runs.append((n.view(np.uint32), device.host(Wd).view(np.uint16)))
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_dora_unmerge_inverts_merge(device, dtype):
    dt = DTYPES[dtype]
    r, s = 5, 0.8
    W, A, B = _inputs((40, 260), r, dt, seed=5)
    W0 = W.astype(np.float64)
    magnitude = (np.random.default_rng(2).random(40) + 0.5).astype(np.float32)
    Wd, Ad, Bd = device.dev(W), device.dev(A), device.dev(B)
    n = device.host(device.K.dora_merge_(Wd, Bd, Ad, s, device.dev(magnitude)))
    merged = device.host(Wd).astype(np.float64)
    q = (n / magnitude).astype(np.float32)
    exact = q.astype(np.float64)[:, None] * merged - s * (B.astype(np.float64) @ A.astype(np.float64))
    slack = 2 * r * EPS32 * s * (np.abs(B.astype(np.float64)) @ np.abs(A.astype(np.float64))) + 2 * EPS32 * np.abs(merged) * q[:, None]
    assert device.K.dora_unmerge_(Wd, Bd, Ad, -s, device.dev(q)) is True
    W = device.host(Wd)
    _assert_one_rounding(W, exact, dt, slack)
    # and back to the start, to within the two roundings to dtype
    assert np.allclose(W.astype(np.float64), W0, rtol=0, atol=4 * _ulp(dt) * (np.abs(W0).max() + 1))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize(("wshape", "sshape"), [
    ((70, 300), (1, 300)),          # Linear, feedforward: per column
    ((70, 300), (70, 1)),           # Linear, output scaling: per row
    ((300, 70), (300, 1)),          # transformers Conv1D (in, out), feedforward: per row of storage
    ((12, 5, 3, 3), (1, 5, 1, 1)),  # Conv2d feedforward: per input channel, 9 elements each
    ((12, 5, 3, 3), (12, 1, 1, 1)), # Conv2d output scaling
    ((9, 4), (1, 1)),               # one scale for everything
])
def test_ia3_scale_is_bit_identical_to_numpy(device, dtype, inverse, wshape, sshape):
    dt = DTYPES[dtype]
    rng = np.random.default_rng(7)
    W = rng.standard_normal(wshape).astype(np.float32).astype(dt)
    W.reshape(-1)[:3] = [np.nan, np.inf, -0.0]
    s = (rng.random(sshape) * 2 + 0.25).astype(np.float32)
    f32 = W.astype(np.float32)
    want = (f32 / s if inverse else f32 * s).astype(dt)
    Wd = device.dev(W)
    assert device.K.ia3_scale_(Wd, device.dev(s), inverse) is True
    W = device.host(Wd)
    bits = np.uint16 if dt is not np.float32 else np.uint32
    nan = np.isnan(want.astype(np.float32))
    assert np.array_equal(np.isnan(W.astype(np.float32)), nan)
    assert np.array_equal(W.view(bits)[~nan], want.view(bits)[~nan])


@pytest.mark.parametrize("r", [1, 3, 64, 256])
def test_mixed_batch_kernels_match_per_row_float64(device, r):
    rng = np.random.default_rng(r)
    R, T, inn, out, N = 5, 3, 300, 270, 4
    x = rng.standard_normal((R, T, inn)).astype(np.float32)
    A = (rng.standard_normal((N, r, inn)) / 8).astype(np.float32)
    B = (rng.standard_normal((N, out, r)) / 8).astype(np.float32)
    idx = np.array([2, 0, 3, 2, 1], dtype=np.int64)
    y0 = rng.standard_normal((R, T, out)).astype(np.float32)
    want = y0.astype(np.float64).copy()
    bound = np.zeros_like(want)
    for b in range(R):
        a64, b64 = A[idx[b]].astype(np.float64), B[idx[b]].astype(np.float64)
        want[b] += (x[b].astype(np.float64) @ a64.T) @ b64.T
        bound[b] = (np.abs(x[b]).astype(np.float64) @ np.abs(a64).T) @ np.abs(b64).T
    y = device.dev(y0)
    dev = device.dev
    assert device.K.lora_gather_(y, dev(x), dev(A), dev(B), dev(idx)) is True
    got = device.host(y).astype(np.float64)
    # float32 dot products of length in, then r: (in + r + 2) eps per term, and the final add
    assert np.all(np.abs(got - want) <= (inn + r + 2) * EPS32 * bound + EPS32 * np.abs(want))


def test_mixed_batch_kernels_refuse(device):
    dev = device.dev
    y = dev(np.zeros((2, 1, 8), np.float32))
    x = dev(np.ones((2, 1, 6), np.float32))
    A, B = dev(np.ones((3, 300, 6), np.float32)), dev(np.ones((3, 8, 300), np.float32))
    assert device.K.lora_gather_(y, x, A, B, dev(np.zeros(2, np.int64))) is False  # r above a block's threads
    A, B = dev(np.ones((3, 4, 6), np.float64)), dev(np.ones((3, 8, 4), np.float64))
    assert device.K.lora_gather_(y, x, A, B, dev(np.zeros(2, np.int64))) is False  # float64
    assert np.all(device.host(y) == 0)


# --- the backend itself, on NumPy arrays through the emulator ------------------------------------------


@pytest.fixture
def emulated_backend(monkeypatch):
    """The CuPy backend on NumPy arrays with its kernels on the emulator, serving the methods (on a GPU,
    tests/backends/test_cupy_backend.py runs the methods on the real backend)."""
    if compiler() is None:
        pytest.skip("no C++ compiler to emulate the CUDA kernels")
    return emulated_cupy_backend(monkeypatch)


def _generic_references(monkeypatch) -> None:
    """The tests' copy=True references take the generic array-API path: the default copy=True merge would
    otherwise run the kernels too, on a private copy (methods/_base.write_weight)."""
    from peftmath.methods import _base

    monkeypatch.setattr(_base, "_copy_takes_kernel", lambda weight: False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dora_through_the_public_api(emulated_backend, dtype, monkeypatch):
    _generic_references(monkeypatch)
    from peftmath.methods import dora

    dt = DTYPES[dtype]
    W, A, B = _inputs((48, 280), 5, dt, seed=11)
    magnitude = (np.random.default_rng(4).random(48) + 0.5).astype(np.float32)
    reference = dora.merge(W, A, B, magnitude, scaling=0.25)  # copy=True: the generic array-API path
    work = W.copy()
    res = dora.merge(work, A, B, magnitude, scaling=0.25, copy=False)  # the fused kernels
    assert res.weight is work and emulated_backend.used == ["dora_merge_"]
    assert np.allclose(res.record, reference.record, rtol=40 * EPS32)
    diff = np.abs(work.astype(np.float64) - reference.weight.astype(np.float64))
    assert np.all(diff <= _ulp(dt) * np.abs(reference.weight.astype(np.float64)) + 1e-6)
    back = dora.unmerge(work, A, B, magnitude, scaling=0.25, weight_norm=res.record, copy=False).weight
    assert back is work and emulated_backend.used == ["dora_merge_", "dora_unmerge_"]
    assert np.allclose(work.astype(np.float64), W.astype(np.float64), rtol=0, atol=4 * _ulp(dt) * 4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("layer", ["Linear", "Conv1D"])
def test_ia3_through_the_public_api_is_bit_identical(emulated_backend, dtype, layer, monkeypatch):
    _generic_references(monkeypatch)
    from peftmath.methods import ia3

    dt = DTYPES[dtype]
    rng = np.random.default_rng(12)
    shape = (40, 24) if layer == "Linear" else (24, 40)  # Conv1D stores (in, out)
    W = rng.standard_normal(shape).astype(np.float32).astype(dt)
    for ff, lshape in ((True, (1, 24)), (False, (40, 1))):
        l = (rng.random(lshape) + 0.5).astype(np.float32)
        want, _ = ia3.merge(W, l, feedforward=ff, layer=layer)
        work = W.copy()
        got, _ = ia3.merge(work, l, feedforward=ff, layer=layer, copy=False)
        assert got is work and np.array_equal(work, want)
        back, _ = ia3.unmerge(work, l, feedforward=ff, layer=layer, copy=False)
        assert np.array_equal(back, ia3.unmerge(want, l, feedforward=ff, layer=layer)[0])
    assert emulated_backend.used == ["ia3_scale_"] * 4


@pytest.mark.parametrize("layer", ["Linear", "Conv1D"])
def test_lora_merge_through_the_public_api(emulated_backend, layer, monkeypatch):
    """Conv1D stores W as (in, out): the matrix view is W.T, Fortran-ordered, which the backend hands
    to the kernel as the C-ordered W with the factors swapped and transposed."""
    _generic_references(monkeypatch)
    from peftmath.methods import lora

    W, A, B = _inputs((50, 270), 5, ml_dtypes.bfloat16, seed=13)
    if layer == "Conv1D":
        W = np.ascontiguousarray(W.T)
    want = lora.merge(W, A, B, scaling=1.5, layer=layer)
    work = W.copy()
    assert lora.merge(work, A, B, scaling=1.5, layer=layer, copy=False) is work
    assert emulated_backend.used == ["lora_addmm_"]
    diff = np.abs(work.astype(np.float64) - want.astype(np.float64))
    assert np.all(diff <= _ulp(ml_dtypes.bfloat16) * np.abs(want.astype(np.float64)))


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 80), cols=st.integers(1, 600), r=st.sampled_from([1, 5, 64]),
       dtype=st.sampled_from(list(DTYPES)), alpha=st.floats(-4, 4, allow_nan=False, width=32),
       seed=st.integers(0, 2**16))
def test_lora_addmm_any_shape_on_the_emulator(rows, cols, r, dtype, alpha, seed):
    """Property: for any shape (partial tiles, partial row groups, one column), the emulated kernel is
    one rounding of the exact update."""
    if compiler() is None:
        pytest.skip("no C++ compiler to emulate the CUDA kernels")
    K = _emulated_kernels()
    dt = DTYPES[dtype]
    W, A, B = _inputs((rows, cols), r, dt, seed=seed)
    exact = W.astype(np.float64) + alpha * (B.astype(np.float64) @ A.astype(np.float64))
    slack = 2 * r * EPS32 * abs(alpha) * (np.abs(B.astype(np.float64)) @ np.abs(A.astype(np.float64)))
    assert K.lora_addmm_(W, B, A, alpha) is True
    _assert_one_rounding(W, exact, dt, slack, min_clear=0)


def test_ia3_scale_steps_over_rows_beyond_the_grid(monkeypatch):
    """More row tiles than the grid's y dimension (CUDA's 65535; 2 here): each block steps over the rows."""
    if compiler() is None:
        pytest.skip("no C++ compiler to emulate the CUDA kernels")
    monkeypatch.setattr(_kernels, "MAX_ROW_BLOCKS", 2)
    rng = np.random.default_rng(3)
    W = rng.standard_normal((200, 40)).astype(ml_dtypes.bfloat16)
    for s in ((rng.random((200, 1)) + 0.5).astype(np.float32), (rng.random((1, 40)) + 0.5).astype(np.float32)):
        want = (W.astype(np.float32) * s).astype(ml_dtypes.bfloat16)
        got = W.copy()
        assert _emulated_kernels().ia3_scale_(got, s, False) is True
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mixed_batch_forward_through_the_kernels(emulated_backend, dtype, monkeypatch):
    import peftmath as pm
    from peftmath import backends, multi
    from peftmath.adapter import Adapter

    dt = DTYPES[dtype]
    rng = np.random.default_rng(21)
    n_in, n_out = 40, 36
    W = (rng.standard_normal((n_out, n_in)) / 6).astype(dt)
    ads = {}
    for i, r in enumerate((2, 5, 3)):
        ads[f"a{i}"] = Adapter(pm.LoraConfig(r=r, lora_alpha=2 * r + i, target_modules=["lin"]),
                               {"lin": {"lora_A.weight": (rng.standard_normal((r, n_in)) / 4).astype(dt),
                                        "lora_B.weight": (rng.standard_normal((n_out, r)) / 4).astype(dt)}})
    names = ["a1", "__base__", "a0", "a2", "a1", "a0"]
    x = rng.standard_normal((len(names), 4, n_in)).astype(dt)
    state = {"lin.weight": W, "lin.bias": rng.standard_normal(n_out).astype(dt)}
    got = multi.mixed_batch_forward("lin", x, state, ads, names)
    assert emulated_backend.used == ["lora_gather_"]
    monkeypatch.setattr(multi, "backend_for", backends.backend_for)  # the generic gather-matmul path
    want = multi.mixed_batch_forward("lin", x, state, ads, names)
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    scale = np.abs(want.astype(np.float64)) + 1
    if dt is np.float32:
        assert np.all(diff <= 1e-5 * scale)
    else:  # both round a float32 value once to bfloat16: at most one ulp apart
        assert np.all(diff <= _ulp(dt) * scale)
