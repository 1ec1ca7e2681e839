"""peftmath.backends: the entry-point registry, in-place addmm_ kernels, host transfer."""

from __future__ import annotations

import tracemalloc
from importlib import metadata

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from peftmath import backends
from peftmath._array import eps
from peftmath.backends import (ArrayAPIBackend, NumpyBackend, TorchBackend, available_backends, backend_for,
                               get_backend, host_rng, kaiming_uniform_bound)
from peftmath.errors import BackendError

BF16 = np.dtype(ml_dtypes.bfloat16)


def test_entry_points_register_the_builtin_backends():
    names = {ep.name for ep in metadata.entry_points(group=backends.ENTRY_POINT_GROUP)}
    assert {"numpy", "torch", "jax", "dask", "array_api"} <= names
    assert {"numpy", "torch", "jax", "dask", "array_api"} <= set(available_backends())
    assert isinstance(get_backend("dask"), backends.DaskBackend)
    assert isinstance(get_backend("numpy"), NumpyBackend)
    assert isinstance(get_backend("torch"), TorchBackend)
    assert get_backend("array_api").name == "array_api"
    for name in available_backends():
        assert isinstance(get_backend(name), backends.Backend)


def test_missing_cupy_backend_says_how_to_install():
    if "cupy" in available_backends():
        pytest.skip("the CuPy backend is installed here")
    with pytest.raises(BackendError, match=r"pip install -e backends/cupy") as info:
        get_backend("cupy")
    assert "'cupy'" in str(info.value) and "numpy" in str(info.value)


def test_backend_for_picks_by_namespace():
    import array_api_compat
    import array_api_compat.numpy as xnp

    assert backend_for(xnp).name == "numpy"
    assert backend_for(array_api_compat.array_namespace(np.ones(2))).name == "numpy"
    xs = pytest.importorskip("array_api_strict")
    assert backend_for(xs).name == "array_api"
    torch = pytest.importorskip("torch")
    assert backend_for(array_api_compat.array_namespace(torch.ones(2))).name == "torch"


def test_host_rng_and_bound():
    g = np.random.default_rng(3)
    assert host_rng(g) is g
    np.testing.assert_array_equal(host_rng(5).standard_normal(4), np.random.default_rng(5).standard_normal(4))
    assert kaiming_uniform_bound(16) == 0.25


# --------------------------------------------------------------------------------------------------
# NumpyBackend.addmm_
# --------------------------------------------------------------------------------------------------
def _factors(seed, m, n, r, dtype, order="C"):
    rng = np.random.default_rng(seed)
    W = np.array(rng.standard_normal((m, n)), dtype=dtype, order=order)
    B = rng.standard_normal((m, r)).astype(dtype)
    A = rng.standard_normal((r, n)).astype(dtype)
    return W, B, A


@given(m=st.integers(1, 40), n=st.integers(1, 40), r=st.integers(1, 8), alpha=st.floats(-8, 8),
       dtype=st.sampled_from(["float32", "float64"]), order=st.sampled_from(["C", "F"]),
       seed=st.integers(0, 2**32 - 1))
def test_numpy_addmm_updates_in_place(m, n, r, alpha, dtype, order, seed):
    W, B, A = _factors(seed, m, n, r, dtype, order)
    W0 = W.astype(np.float64)
    ptr = W.ctypes.data
    alias = W[...]  # a view on the same memory
    assert NumpyBackend().addmm_(W, B, A, alpha) is True
    assert W.ctypes.data == ptr and np.shares_memory(W, alias)
    np.testing.assert_array_equal(alias, W)  # the memory itself changed
    B64, A64 = B.astype(np.float64), A.astype(np.float64)
    want = W0 + alpha * B64 @ A64
    bound = (r + 2) * eps(dtype) * (np.abs(W0) + abs(alpha) * np.abs(B64) @ np.abs(A64))
    assert np.all(np.abs(W - want) <= bound)


@given(m=st.integers(1, 24), n=st.integers(1, 24), r=st.integers(1, 6), alpha=st.floats(-4, 4),
       dtype=st.sampled_from(["float16", "bfloat16"]), tile_rows=st.integers(1, 7), seed=st.integers(0, 2**32 - 1))
def test_numpy_addmm_half_is_one_rounding(m, n, r, alpha, dtype, tile_rows, seed):
    dt = BF16 if dtype == "bfloat16" else np.dtype(np.float16)
    W, B, A = _factors(seed, m, n, r, dt)
    W32 = W.astype(np.float32)
    backend = NumpyBackend()
    backend.tile_bytes = 4 * n * tile_rows  # several tiles
    ptr = W.ctypes.data
    assert backend.addmm_(W, B, A, alpha) is True
    assert W.ctypes.data == ptr and W.dtype == dt
    # the float32 sum rounded once to the half dtype
    exact = W32.astype(np.float64) + alpha * B.astype(np.float64) @ A.astype(np.float64)
    f32_err = (r + 2) * 2.0**-23 * (np.abs(W32) + abs(alpha) * np.abs(B.astype(np.float64)) @ np.abs(A.astype(np.float64)))
    got = W.astype(np.float64)
    # |got - exact| <= half an ulp of the half dtype at got (one rounding) + the float32 error
    half_ulp = 0.5 * eps(dt) * np.maximum(np.abs(got), float(ml_dtypes.finfo(dt).smallest_normal))
    assert np.all(np.abs(got - exact) <= half_ulp + f32_err)
    ref = (W32 + np.float32(alpha) * (B.astype(np.float32) @ A.astype(np.float32))).astype(dt)
    # equal to the hand-built float32 reference except where the float32 sums differ by rounding
    assert np.count_nonzero(ref.view(np.uint16) != W.view(np.uint16)) <= max(1, W.size // 10)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_addmm_refuses_non_contiguous(dtype):
    W, B, A = _factors(0, 6, 10, 2, dtype)
    view = W[:, ::2]
    before = W.copy()
    assert NumpyBackend().addmm_(view, B, A[:, ::2].copy(), 1.5) is False
    np.testing.assert_array_equal(W, before)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_numpy_addmm_refuses_read_only(dtype):
    dt = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    W, B, A = _factors(1, 5, 4, 2, dt)
    W.flags.writeable = False
    before = W.copy()
    assert NumpyBackend().addmm_(W, B, A, 2.0) is False
    np.testing.assert_array_equal(W.view(np.uint8), before.view(np.uint8))


def test_numpy_addmm_refuses_shape_mismatch_and_non_numpy():
    W, B, A = _factors(2, 5, 4, 2, np.float32)
    before = W.copy()
    assert NumpyBackend().addmm_(W, B, A[:, :3], 1.0) is False
    assert NumpyBackend().addmm_(W, B.tolist(), A, 1.0) is False
    np.testing.assert_array_equal(W, before)


def test_numpy_addmm_float32_allocates_nothing_of_w_size():
    W, B, A = _factors(3, 512, 512, 8, np.float32)
    backend = NumpyBackend()
    backend.addmm_(W, B, A, 0.5)  # warm up (imports, BLAS init)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        assert backend.addmm_(W, B, A, 0.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.05 * W.nbytes, f"peak {peak} bytes for a {W.nbytes}-byte weight"


def test_array_api_backend_is_a_no_op_fallback():
    xs = pytest.importorskip("array_api_strict")
    W = xs.asarray(np.ones((2, 2)))
    b = ArrayAPIBackend()
    assert b.addmm_(W, W, W, 1.0) is False
    np.testing.assert_array_equal(b.to_host(W), np.ones((2, 2)))
    assert b.stop_gradient(W) is W
    out = b.from_host(np.arange(3.0), xs)
    assert isinstance(out, type(W))


# --------------------------------------------------------------------------------------------------
# Torch
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_addmm_in_place(dtype):
    torch = pytest.importorskip("torch")
    W, B, A = _factors(4, 7, 9, 3, dtype)
    tw, tb, ta = map(torch.from_numpy, (W.copy(), B, A))
    ptr = tw.data_ptr()
    assert TorchBackend().addmm_(tw, tb, ta, -1.25) is True
    assert tw.data_ptr() == ptr
    want = W.astype(np.float64) - 1.25 * B.astype(np.float64) @ A.astype(np.float64)
    bound = 5 * eps(dtype) * (np.abs(W) + 1.25 * np.abs(B.astype(np.float64)) @ np.abs(A.astype(np.float64)))
    assert np.all(np.abs(tw.numpy() - want) <= bound)


def test_torch_addmm_refuses_half_and_grad():
    torch = pytest.importorskip("torch")
    tw = torch.ones(3, 3, dtype=torch.bfloat16)
    assert TorchBackend().addmm_(tw, tw, tw, 1.0) is False
    assert torch.equal(tw, torch.ones(3, 3, dtype=torch.bfloat16))
    g = torch.ones(3, 3, requires_grad=True)
    assert TorchBackend().addmm_(g, torch.ones(3, 3), torch.ones(3, 3), 1.0) is False
    mixed = torch.ones(3, 3)
    assert TorchBackend().addmm_(mixed, torch.ones(3, 3, dtype=torch.float64), torch.ones(3, 3), 1.0) is False
    assert torch.equal(mixed, torch.ones(3, 3))


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16", "int64"])
def test_torch_host_round_trip(dtype):
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xt

    dt = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    a = (np.random.default_rng(5).standard_normal((3, 4)) * 100).astype(dt)
    b = TorchBackend()
    t = b.from_host(a, xt)
    assert isinstance(t, torch.Tensor) and str(t.dtype) == f"torch.{dtype}"
    back = b.to_host(t)
    assert back.dtype == dt
    np.testing.assert_array_equal(back.view(np.uint8), a.view(np.uint8))
    if dtype == "bfloat16":  # the bits mean the same numbers on both sides
        np.testing.assert_array_equal(t.float().numpy(), a.astype(np.float32))
    # non-contiguous input
    t2 = b.from_host(a.T, xt)
    np.testing.assert_array_equal(b.to_host(t2).view(np.uint8), np.ascontiguousarray(a.T).view(np.uint8))


@pytest.mark.filterwarnings("error::UserWarning")
def test_torch_from_host_read_only_is_copied(tmp_path):
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xt

    np.arange(4, dtype=np.float32).tofile(tmp_path / "m.bin")
    m = np.memmap(tmp_path / "m.bin", dtype=np.float32, mode="r")  # as load_adapter / SafeTensorsFile give
    t = TorchBackend().from_host(m, xt)
    t.add_(1)  # writing into a tensor over read-only memory would crash the process
    np.testing.assert_array_equal(t.numpy(), [1, 2, 3, 4])
    np.testing.assert_array_equal(m, [0, 1, 2, 3])
    w = np.arange(3.0)
    assert np.shares_memory(TorchBackend().from_host(w, xt).numpy(), w)  # writeable: no copy


def test_torch_stop_gradient():
    torch = pytest.importorskip("torch")
    x = torch.ones(2, requires_grad=True)
    y = TorchBackend().stop_gradient(x * 2)
    assert not y.requires_grad


def test_numpy_host_round_trip_is_identity():
    import array_api_compat.numpy as xnp

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = NumpyBackend()
    assert b.from_host(a, xnp) is a
    assert b.to_host(a) is a


@pytest.mark.parametrize("name,module", [("numpy", "numpy"), ("torch", "torch"), ("jax", "jax")])
def test_builtin_backends_name_their_namespace(name, module):
    pytest.importorskip(module)
    b = get_backend(name)
    xp = b.namespace()
    assert b.handles(xp) and backend_for(xp) is b


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("threads", [1, 3])
def test_numpy_rescale_rows_matches_the_generic_path(order, threads, monkeypatch):
    """DoRA's fused norm-and-rescale (tiles over threads) equals the two-pass array-API version."""
    from peftmath.backends import ArrayAPIBackend, NumpyBackend

    rng = np.random.default_rng(0)
    m = np.asfortranarray(rng.standard_normal((300, 200))) if order == "F" else rng.standard_normal((300, 200))
    m[7] = 0.0                                           # a zero row keeps its zeros (g = 0, not NaN)
    mag = rng.uniform(0.5, 2.0, 300)
    backend = NumpyBackend()
    monkeypatch.setattr(backend, "threads", threads)
    a, b = m.copy(order="K"), m.copy(order="K")
    n_fast = backend.rescale_rows_(a, mag)
    n_ref = ArrayAPIBackend().rescale_rows_(b, mag)
    np.testing.assert_allclose(n_fast, n_ref, rtol=1e-14)
    np.testing.assert_allclose(a, b, rtol=1e-14, atol=0)
    assert n_fast[7] == 0 and not a[7].any()
    rows = np.arange(300) != 7
    np.testing.assert_allclose(np.linalg.norm(a, axis=1)[rows], mag[rows], rtol=1e-12)  # every row now has norm m


def test_every_backend_names_its_namespace_and_a_missing_library_is_a_backend_error():
    from peftmath.backends import _import_namespace, available_backends, get_backend
    from peftmath.errors import BackendError

    for name in available_backends():
        try:
            xp = get_backend(name).namespace()
        except BackendError:
            continue  # its library is not installed here: the error says what to install
        assert get_backend(name).handles(xp) or name == "array_api"
    with pytest.raises(BackendError, match="pip install no-such-pkg"):
        _import_namespace("no_such_module_for_peftmath", "fake", "no-such-pkg")
