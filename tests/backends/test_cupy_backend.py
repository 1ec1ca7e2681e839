"""The CuPy backend plugin (backends/cupy): registration and errors without a GPU, kernels with one."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from peftmath import backends
from peftmath.errors import BackendError

PLUGIN = Path(__file__).resolve().parents[2] / "backends" / "cupy"


def test_plugin_declares_entry_point():
    meta = tomllib.loads((PLUGIN / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "peftmath-cupy"
    assert meta["project"]["entry-points"]["peftmath.backends"]["cupy"] == "peftmath_cupy:CupyBackend"
    extras = meta["project"]["optional-dependencies"]
    assert any("cupy-cuda12x" in d for d in extras["cuda12"]) and any("cupy-cuda13x" in d for d in extras["cuda13"])


def test_core_never_imports_cupy():
    import subprocess

    code = "import sys, peftmath, peftmath.backends as b; b.available_backends(); print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # the plugin may be installed (then the registry imports it); the core itself must not
    import importlib.metadata as md

    plugin_installed = any(ep.name == "cupy" for ep in md.entry_points(group="peftmath.backends"))
    if not plugin_installed:
        assert out.strip() == "False"


def _cupy_usable() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:
        return False


@pytest.mark.skipif(_cupy_usable(), reason="CuPy with a GPU is present")
def test_missing_cupy_gives_clear_error():
    sys.path.insert(0, str(PLUGIN))
    try:
        from peftmath_cupy import CupyBackend

        with pytest.raises(BackendError, match="pip install -e backends/cupy"):
            CupyBackend()
    finally:
        sys.path.remove(str(PLUGIN))
    try:
        b = backends.get_backend("cupy")
    except BackendError as exc:
        assert "cupy" in str(exc) and "pip install" in str(exc)
    else:  # pragma: no cover - only with a working GPU
        assert b.name == "cupy"


# ----------------------------------------------------------------------------------------------
# With a GPU
# ----------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def cp_backend():
    if not _cupy_usable():
        pytest.skip("needs CuPy and a CUDA device")
    try:
        return backends.get_backend("cupy")
    except BackendError:
        sys.path.insert(0, str(PLUGIN))
        from peftmath_cupy import CupyBackend

        b = CupyBackend()
        backends.register_backend(b)
        return b


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_cublas_addmm_in_place(cp_backend, dtype, order):
    import cupy as cp

    rng = np.random.default_rng(0)
    W = rng.standard_normal((96, 80)).astype(dtype, order=order)
    A = rng.standard_normal((4, 80)).astype(dtype)
    B = rng.standard_normal((96, 4)).astype(dtype)
    Wd = cp.asarray(W, order=order)
    ptr = Wd.data.ptr
    assert cp_backend.addmm_(Wd, cp.asarray(B), cp.asarray(A), 0.75)
    assert Wd.data.ptr == ptr
    ref = W.astype(np.float64) + 0.75 * B.astype(np.float64) @ A.astype(np.float64)
    bound = 8 * np.finfo(dtype).eps * (np.abs(W) + 0.75 * np.abs(B) @ np.abs(A))
    assert np.all(np.abs(cp.asnumpy(Wd) - ref) <= bound)


@gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("transposed", [False, True])
def test_half_kernel_rounds_once(cp_backend, dtype, transposed):
    import cupy as cp
    import ml_dtypes

    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float16)
    rng = np.random.default_rng(1)
    W = rng.standard_normal((64, 300)).astype(np_dtype)
    A = rng.standard_normal((8, 300)).astype(np.float32)
    B = rng.standard_normal((64, 8)).astype(np.float32)
    Wd = cp.asarray(W)
    M = Wd.T if transposed else Wd
    Ad, Bd = (cp.asarray(B.T), cp.asarray(A.T)) if transposed else (cp.asarray(A), cp.asarray(B))
    assert cp_backend.addmm_(M, Bd, Ad, -1.5)
    exact = W.astype(np.float64) + (-1.5) * (B.astype(np.float64) @ A.astype(np.float64))
    got = cp.asnumpy(Wd).astype(np.float64)
    # one rounding of a float32 accumulation: within one ulp of the half dtype (plus the float32
    # accumulation error, far below it)
    nmant = ml_dtypes.finfo(np_dtype).nmant
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - nmant)
    assert np.all(np.abs(got - exact) <= ulp)


@gpu
def test_methods_keep_cupy_arrays_on_device(cp_backend):
    import array_api_compat
    import cupy as cp

    from peftmath.methods import dora, lora

    rng = np.random.default_rng(2)
    W, A, B = (rng.standard_normal(s).astype(np.float32) for s in ((32, 24), (4, 24), (32, 4)))
    Wd, Ad, Bd = cp.asarray(W), cp.asarray(A), cp.asarray(B)
    x = cp.asarray(rng.standard_normal((5, 24)).astype(np.float32))
    for out in (lora.delta_weight(Ad, Bd, scaling=2.0), lora.merge(Wd, Ad, Bd, scaling=2.0),
                lora.forward(x, Wd, Ad, Bd, scaling=2.0)):
        assert array_api_compat.is_cupy_array(out)
    merged = lora.merge(Wd, Ad, Bd, scaling=2.0)
    np.testing.assert_allclose(cp.asnumpy(merged), W + 2.0 * B @ A, rtol=1e-5, atol=1e-5)
    m = dora.init_magnitude(Wd, Ad, Bd, scaling=2.0) * 1.1
    res = dora.merge(Wd.copy(), Ad, Bd, m, scaling=2.0, copy=False)
    back = dora.unmerge(res.weight, Ad, Bd, m, scaling=2.0, weight_norm=res.record)
    np.testing.assert_allclose(cp.asnumpy(back.weight), W, rtol=1e-5, atol=1e-5)


@gpu
def test_host_transfer_round_trip(cp_backend):
    import array_api_compat.cupy as xp
    import ml_dtypes

    for a in (np.arange(12, dtype=np.float32).reshape(3, 4),
              np.random.default_rng(3).standard_normal((600, 700)).astype(ml_dtypes.bfloat16)):
        d = cp_backend.from_host(a, xp)
        back = cp_backend.to_host(d)
        assert back.dtype == a.dtype and np.array_equal(back.view(np.uint8), a.view(np.uint8))


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_dora_and_ia3_match_the_generic_path(cp_backend, dtype):
    """The methods' in-place paths on CuPy (the fused kernels) against their copy=True generic paths."""
    import cupy as cp
    import ml_dtypes

    from peftmath.methods import dora, ia3

    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    ulp = float(ml_dtypes.finfo(np_dtype).eps)
    rng = np.random.default_rng(4)
    W = rng.standard_normal((96, 300)).astype(np_dtype)
    A = (rng.standard_normal((8, 300)) / 4).astype(np.float32)
    B = (rng.standard_normal((96, 8)) / 4).astype(np.float32)
    m = (rng.random(96) + 0.5).astype(np.float32)
    Wd, Ad, Bd, md = cp.asarray(W), cp.asarray(A), cp.asarray(B), cp.asarray(m)
    want = dora.merge(Wd, Ad, Bd, md, scaling=0.5)
    res = dora.merge(Wd, Ad, Bd, md, scaling=0.5, copy=False)
    assert res.weight is Wd
    np.testing.assert_allclose(cp.asnumpy(res.record), cp.asnumpy(want.record), rtol=40 * np.finfo(np.float32).eps)
    ref = cp.asnumpy(want.weight).astype(np.float64)
    assert np.all(np.abs(cp.asnumpy(Wd).astype(np.float64) - ref) <= ulp * np.abs(ref) + 1e-6)
    dora.unmerge(Wd, Ad, Bd, md, scaling=0.5, weight_norm=res.record, copy=False)
    np.testing.assert_allclose(cp.asnumpy(Wd).astype(np.float64), W.astype(np.float64), rtol=0, atol=16 * ulp)
    l = cp.asarray((rng.random((1, 300)) + 0.5).astype(np.float32))
    Wd = cp.asarray(W)
    want, _ = ia3.merge(Wd, l)
    got, _ = ia3.merge(Wd, l, copy=False)
    assert got is Wd and np.array_equal(cp.asnumpy(Wd).view(np.uint8), cp.asnumpy(want).view(np.uint8))


def test_gpu_benchmark_script_runs_dry(capsys):
    """benchmarks/bench_cupy.py on NumPy at small sizes (no GPU, nothing written): the script cannot rot
    between the sessions that have a GPU to run it."""
    sys.path.insert(0, str(PLUGIN.parents[1]))
    from benchmarks import bench_cupy

    before = (PLUGIN.parents[1] / "benchmarks" / "RESULTS.md").read_text()
    bench_cupy.main(["--dry-run"])
    assert "| float32 |" in capsys.readouterr().out
    assert (PLUGIN.parents[1] / "benchmarks" / "RESULTS.md").read_text() == before
