"""peftmath._array.conv's dispatch to the libraries' own convolutions (peftmath._conv).

Every path is compared with the convolution's definition (``ref_conv``: one output element at a time,
float64) on the inputs rounded to the tested dtype, within the bound of a k-term dot product
(``|y - exact| <= (k + 2)·eps·Σ|x||w|``, k the terms per output element), and with the portable reference
(:func:`peftmath._array.reference_conv`) within twice that. Half precision: both paths accumulate in
float32 and round once, so each is within half an ulp of the half dtype (``eps_h/2·|exact|``) plus the
float32 bound, and they differ by at most ``eps_h·|exact|`` plus twice the float32 bound.
"""

from __future__ import annotations

import math
import sys
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from peftmath import _array, _conv
from peftmath._array import conv, eps, reference_conv
from tests.test_array import ref_conv

torch = pytest.importorskip("torch")
F = torch.nn.functional

PLUGIN = Path(__file__).resolve().parents[1] / "backends" / "cupy"

# (nd, groups, stride, padding, dilation): every kind, groups, the three keywords, 'same' with an even kernel
CASES = [
    (1, 1, 1, 0, 1), (1, 2, 2, 1, 1), (1, 1, 1, "same", 2),
    (2, 1, 1, 1, 1), (2, 2, 1, 0, (1, 2)), (2, 4, 1, "same", 1), (2, 1, (2, 1), (1, 0), 1), (2, 2, 2, "valid", 2),
    (3, 1, 1, 1, 1), (3, 2, (1, 2, 1), 0, (2, 1, 1)), (3, 1, 1, "same", 1),
]
KERNELS = {1: (3,), 2: (3, 2), 3: (2, 3, 2)}
SPATIAL = {1: (11,), 2: (7, 8), 3: (5, 6, 4)}


def _case(nd, groups, dtype=np.float64, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 4, *SPATIAL[nd])).astype(dtype)
    w = rng.standard_normal((8, 4 // groups, *KERNELS[nd])).astype(dtype)
    b = rng.standard_normal(8).astype(dtype) if bias else None
    return x, w, b


def _kw(groups, stride, padding, dilation):
    return dict(groups=groups, stride=stride, padding=padding, dilation=dilation)


_EXACT: dict = {}


def _exact(x, w, b, kw):
    """The definition on the (rounded) inputs, and the bound Σ|x||w| + |b| (memoised: the loop is slow)."""
    f64 = [None if a is None else np.asarray(a, dtype=np.float64) for a in (x, w, b)]
    key = (tuple(None if a is None else (a.shape, a.tobytes()) for a in f64), repr(sorted(kw.items())))
    if key not in _EXACT:
        _EXACT[key] = ref_conv(*f64, **kw), ref_conv(*f64, absolute=True, **kw)
    return _EXACT[key]


def _terms(w):
    return w.shape[1] * math.prod(w.shape[2:]) + 1  # products per output element, plus the bias


def _normalised(kw, w):
    nd = w.ndim - 2
    x_dummy = np.zeros((1, w.shape[1] * kw["groups"]) + (64,) * nd)
    stride, pads, dilation = _array._conv_arguments(x_dummy, w, kw["groups"], kw["stride"], kw["padding"],
                                                    kw["dilation"])
    return dict(stride=stride, padding=pads, dilation=dilation, groups=kw["groups"])


@pytest.fixture
def no_reference(monkeypatch):
    """Fail if conv falls back to the portable reference (the native path must serve the call)."""
    def refuse(*args, **kwargs):
        raise AssertionError("conv used the portable reference where a native convolution was expected")

    monkeypatch.setattr(_array, "reference_conv", refuse)


@pytest.fixture
def no_native(monkeypatch):
    """Fail if conv calls any native convolution (the reference must serve the call)."""
    def refuse(*args, **kwargs):
        raise AssertionError("conv took a native convolution where only the reference applies")

    for name in ("torch_conv", "jax_conv", "numpy_conv", "shifted_gemm_conv"):
        monkeypatch.setattr(_conv, name, refuse)


def _check(got, x, w, b, kw, dtype_eps, xp=None, arrays=None):
    """``got`` within the k-term bound of the definition and, given the namespace and the arrays that
    produced it, within twice that of the portable reference on the same arrays."""
    want, bound = _exact(x, w, b, kw)
    got = _host(got)
    assert got.shape == want.shape
    tol = (_terms(w) + 2) * dtype_eps * bound
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= tol), float(np.max(err / bound))
    if xp is not None:
        ref = _host(reference_conv(*arrays, xp=xp, **_normalised(kw, w)))
        assert ref.dtype == got.dtype
        assert np.all(np.abs(got.astype(np.float64) - ref.astype(np.float64)) <= 2 * tol)


def _host(a):
    if isinstance(a, torch.Tensor):
        return a.detach().numpy()
    return np.asarray(a)


# --------------------------------------------------------------------------------------------------
# torch: F.conv{1,2,3}d
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("nd,groups,stride,padding,dilation", CASES)
def test_torch_native(no_reference, nd, groups, stride, padding, dilation, dtype):
    import array_api_compat.torch as xpt

    x, w, b = _case(nd, groups, getattr(np, dtype))
    kw = _kw(groups, stride, padding, dilation)
    arrays = tuple(torch.from_numpy(a) for a in (x, w, b))
    got = conv(*arrays, **kw)
    assert isinstance(got, torch.Tensor) and got.dtype == getattr(torch, dtype)
    _check(got, x, w, b, kw, eps(dtype), xpt, arrays)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("nd", [2, 3])
def test_torch_channels_last(no_reference, nd, dtype):
    """channels_last inputs and weights (torch's NHWC / NDHWC strides): the same values."""
    import array_api_compat.torch as xpt

    x, w, b = _case(nd, 2, getattr(np, dtype), seed=2)
    kw = _kw(2, 1, "same", 1)
    fmt = torch.channels_last if nd == 2 else torch.channels_last_3d
    xt, wt = (torch.from_numpy(a).contiguous(memory_format=fmt) for a in (x, w))
    assert not xt.is_contiguous()
    got = conv(xt, wt, torch.from_numpy(b), **kw)
    _check(got, x, w, b, kw, eps(dtype), xpt, (xt, wt, torch.from_numpy(b)))


def test_torch_autograd_flows(no_reference):
    """Gradients through the native convolution: finite differences (gradcheck) and the reference's
    autograd gradients (a different computation: per-offset matmuls)."""
    import array_api_compat.torch as xpt

    x, w, b = _case(2, 2, seed=3)
    kw = _kw(2, (2, 1), 1, (1, 2))
    leaves = [torch.from_numpy(a).requires_grad_() for a in (x, w, b)]
    assert torch.autograd.gradcheck(lambda *a: conv(*a, **kw), leaves)
    g = torch.from_numpy(np.random.default_rng(4).standard_normal(conv(*leaves, **kw).shape))
    got = torch.autograd.grad((conv(*leaves, **kw) * g).sum(), leaves)
    want = torch.autograd.grad((reference_conv(*leaves, xp=xpt, **_normalised(kw, w)) * g).sum(), leaves)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_half_precision(no_reference, dtype):
    """torch's CPU convolution of half inputs accumulates in float32 and rounds once, as the reference."""
    import array_api_compat.torch as xpt

    x, w, b = _case(2, 1, seed=5)
    kw = _kw(1, 1, 1, 1)
    arrays = tuple(torch.from_numpy(a).to(getattr(torch, dtype)) for a in (x, w, b))
    got = conv(*arrays, **kw)
    assert got.dtype == getattr(torch, dtype)
    ref = reference_conv(*arrays, xp=xpt, **_normalised(kw, w))
    _check_half([a.double().numpy() for a in arrays], kw, got.double().numpy(), ref.double().numpy(), eps(dtype))


def _check_half(rounded, kw, got, ref, half_eps):
    """Each within half an ulp of the half dtype plus the float32 sum's bound; within one ulp plus twice
    that of each other."""
    want, bound = _exact(*rounded, kw)
    f32 = (_terms(rounded[1]) + 2) * eps("float32") * bound
    for y in (got, ref):
        assert np.all(np.abs(y - want) <= half_eps / 2 * np.abs(want) + f32)
    assert np.all(np.abs(got - ref) <= half_eps * np.abs(want) + 2 * f32)


def test_torch_mixed_dtypes_promote_as_the_reference(no_reference):
    """float32 input with a float64 weight computes in float64; a float64 bias on float32 operands is
    added after the float32 convolution (the reference's promotion), giving float64."""
    import array_api_compat.torch as xpt

    x, w, b = _case(2, 1, seed=6)
    kw = _kw(1, 1, 1, 1)
    for arrays in [(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(w), torch.from_numpy(b)),
                   (torch.from_numpy(x.astype(np.float32)), torch.from_numpy(w.astype(np.float32)),
                    torch.from_numpy(b))]:
        got = conv(*arrays, **kw)
        assert got.dtype == torch.float64
        ref = reference_conv(*arrays, xp=xpt, **_normalised(kw, w))
        _, bound = _exact(x, w, b, kw)
        assert np.all(np.abs(got.numpy() - ref.numpy()) <= 2 * (_terms(w) + 2) * eps("float32") * bound)


def test_torch_integer_inputs_take_the_reference():
    """Dtypes the native path does not take (integers) run the portable reference."""
    x = torch.arange(2 * 4 * 6 * 5).reshape(2, 4, 6, 5) % 7
    w = torch.arange(3 * 4 * 3 * 3).reshape(3, 4, 3, 3) % 5 - 2
    assert _conv.torch_conv(x, w, None, **_normalised(_kw(1, 1, 1, 1), w.numpy())) is None
    got = conv(x, w, padding=1)
    want, _ = _exact(x.numpy(), w.numpy(), None, _kw(1, 1, 1, 1))
    assert got.dtype == torch.int64 and np.array_equal(got.numpy(), want)


def test_torch_tf32_guard_reads_the_flags():
    """On CUDA a float32 convolution is declined while cuDNN may use TF32 and float32 matmuls are IEEE
    (torch's defaults); either flag the other way allows it."""
    guard = _conv._torch_tf32_conv_possible
    conv_flags = torch.backends.cudnn.conv
    before = (torch.get_float32_matmul_precision(), conv_flags.fp32_precision)
    try:
        torch.set_float32_matmul_precision("highest")
        conv_flags.fp32_precision = "tf32"
        assert guard(torch)
        conv_flags.fp32_precision = "ieee"
        assert not guard(torch)
        conv_flags.fp32_precision = "tf32"
        torch.set_float32_matmul_precision("high")
        assert not guard(torch)
    finally:
        torch.set_float32_matmul_precision(before[0])
        conv_flags.fp32_precision = before[1]


# --------------------------------------------------------------------------------------------------
# JAX: lax.conv_general_dilated
# --------------------------------------------------------------------------------------------------
jax = pytest.importorskip("jax")
jnp = jax.numpy


@pytest.mark.parametrize("nd,groups,stride,padding,dilation", CASES)
def test_jax_native(no_reference, nd, groups, stride, padding, dilation):
    x, w, b = _case(nd, groups, np.float32, seed=7)
    kw = _kw(groups, stride, padding, dilation)
    arrays = tuple(jnp.asarray(a) for a in (x, w, b))
    got = conv(*arrays, **kw)
    assert isinstance(got, jax.Array) and got.dtype == jnp.float32
    _check(got, x, w, b, kw, eps("float32"), jnp, arrays)


def test_jax_grad_and_jit_flow(no_reference):
    x, w, b = _case(2, 2, np.float32, seed=8)
    kw = _kw(2, (2, 1), 1, (1, 2))
    args = tuple(jnp.asarray(a) for a in (x, w, b))
    g = jnp.asarray(np.random.default_rng(9).standard_normal(conv(*args, **kw).shape).astype(np.float32))
    got = jax.grad(lambda *a: jnp.sum(conv(*a, **kw) * g), argnums=(0, 1, 2))(*args)
    nkw = _normalised(kw, w)
    want = jax.grad(lambda *a: jnp.sum(reference_conv(*a, xp=jnp, **nkw) * g), argnums=(0, 1, 2))(*args)
    for a, c in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-4)
    jitted = jax.jit(lambda *a: conv(*a, **kw))(*args)
    _check(jitted, x, w, b, kw, eps("float32"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_jax_half_precision(no_reference, dtype):
    x, w, b = _case(2, 2, seed=10)
    kw = _kw(2, 1, "same", 1)
    arrays = tuple(jnp.asarray(a, dtype=getattr(jnp, dtype)) for a in (x, w, b))
    got = conv(*arrays, **kw)
    assert got.dtype == getattr(jnp, dtype)
    ref = reference_conv(*arrays, xp=jnp, **_normalised(kw, w))
    rounded = [np.asarray(a).astype(np.float64) for a in arrays]
    _check_half(rounded, kw, np.asarray(got).astype(np.float64), np.asarray(ref).astype(np.float64), eps(dtype))


# --------------------------------------------------------------------------------------------------
# NumPy: shifted-window gemms (stride 1), the reference otherwise
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("nd,groups,stride,padding,dilation", CASES)
def test_numpy(nd, groups, stride, padding, dilation, dtype):
    x, w, b = _case(nd, groups, getattr(np, dtype), seed=11)
    kw = _kw(groups, stride, padding, dilation)
    nkw = _normalised(kw, w)
    native = _conv.numpy_conv(x, w, b, **nkw)
    assert (native is None) == any(s != 1 for s in nkw["stride"])  # stride 1 only
    got = conv(x, w, b, **kw)
    assert isinstance(got, np.ndarray) and got.dtype == dtype and got.flags.c_contiguous
    _check(got, x, w, b, kw, eps(dtype), np, (x, w, b))


@pytest.mark.parametrize("layout", ["fortran", "permuted", "strided", "read-only"])
def test_numpy_any_layout_and_inputs_untouched(no_reference, layout):
    x, w, b = _case(2, 2, seed=12)
    xin = {"fortran": np.asfortranarray(x),
           "permuted": np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
           "strided": np.repeat(x, 2, axis=3)[..., ::2],
           "read-only": x.copy()}[layout]
    if layout == "read-only":
        xin.setflags(write=False)
    saved = xin.copy()
    kw = _kw(2, 1, (1, 2), (2, 1))
    _check(conv(xin, w, b, **kw), x, w, b, kw, eps("float64"))
    assert np.array_equal(xin, saved)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_numpy_half_precision(no_reference, dtype):
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float16)
    x, w, b = _case(2, 1, seed=13)
    arrays = tuple(a.astype(np_dtype) for a in (x, w, b))
    kw = _kw(1, 1, 1, (2, 1))
    got = conv(*arrays, **kw)
    assert got.dtype == np_dtype
    ref = reference_conv(*arrays, xp=np, **_normalised(kw, w))
    rounded = [a.astype(np.float64) for a in arrays]
    _check_half(rounded, kw, got.astype(np.float64), ref.astype(np.float64), eps(dtype))


def _peak(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    out = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - base, out


def test_numpy_memory_has_no_column_buffer():
    """The NumPy paths allocate a few input/output-sized arrays, never im2col's kernel-size-fold column
    buffer (9 × the input for a 3 × 3 kernel): the stride-1 path at most the padded input, the wide output,
    one product and the result; the reference at most the padded input, one window, one product and the
    accumulated output (C_out = C_in here, so output and input are the same size)."""
    rng = np.random.default_rng(14)
    x = rng.standard_normal((4, 16, 30, 30))
    w = rng.standard_normal((16, 16, 3, 3))
    nbytes = x.nbytes
    padded = nbytes * (32 * 32) / (30 * 30)
    peak, out = _peak(lambda: conv(x, w, padding=1))
    assert peak <= 3 * padded + nbytes + 4096
    _check_close_to_torch(out, x, w, dict(padding=1))
    peak, out = _peak(lambda: conv(x, w, padding=1, stride=2))
    assert peak <= padded + nbytes + 2 * out.nbytes + 4096
    _check_close_to_torch(out, x, w, dict(padding=1, stride=2))


def _check_close_to_torch(out, x, w, kw):
    """Larger shapes than the definition loop can afford: torch's float64 convolution as the reference."""
    want = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), **kw).numpy()
    bound = F.conv2d(torch.from_numpy(np.abs(x)), torch.from_numpy(np.abs(w)), **kw).numpy()
    assert np.all(np.abs(out - want) <= 2 * (_terms(w) + 2) * eps("float64") * bound)


# --------------------------------------------------------------------------------------------------
# Namespaces without a native convolution: array-api-strict (even wrapping NumPy), dask
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nd,groups,stride,padding,dilation", CASES[::2])
def test_array_api_strict_takes_the_reference(no_native, nd, groups, stride, padding, dilation):
    xps = pytest.importorskip("array_api_strict")
    x, w, b = _case(nd, groups, seed=15)
    kw = _kw(groups, stride, padding, dilation)
    arrays = tuple(xps.asarray(a) for a in (x, w, b))
    assert _conv.native_conv(xps, *arrays, **_normalised(kw, w)) is None
    got = conv(*arrays, **kw)
    assert type(got) is type(arrays[0])
    _check(np.asarray(got), x, w, b, kw, eps("float64"))


def test_dask_takes_the_reference_lazily(no_native):
    da = pytest.importorskip("dask.array")
    import array_api_compat

    x, w, b = _case(2, 2, seed=16)
    kw = _kw(2, 1, "same", (2, 1))
    arrays = (da.from_array(x, chunks=(1, 2, 4, 8)), da.from_array(w, chunks=(4, 1, 3, 2)), da.from_array(b, chunks=3))
    xpd = array_api_compat.array_namespace(*arrays)
    assert _conv.native_conv(xpd, *arrays, **_normalised(kw, w)) is None
    got = conv(*arrays, **kw)
    assert isinstance(got, da.Array)
    _check(got.compute(), x, w, b, kw, eps("float64"))


# --------------------------------------------------------------------------------------------------
# The registry's hook comes first; a declining hook falls back to the table
# --------------------------------------------------------------------------------------------------
def test_backend_hook_first_then_table(monkeypatch):
    from peftmath import backends

    calls = []

    class Hooked:
        def __init__(self, answer):
            self.answer = answer

        def conv(self, x, weight, bias, *, stride, padding, dilation, groups):
            calls.append((stride, padding, dilation, groups))
            return self.answer(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)

    x, w, b = _case(2, 2, seed=17)
    kw = _kw(2, 1, "same", (1, 2))
    sentinel = np.zeros(1)
    monkeypatch.setattr(backends, "backend_for", lambda xp: Hooked(lambda *a, **k: sentinel))
    assert conv(x, w, b, **kw) is sentinel
    assert calls == [((1, 1), ((1, 1), (1, 1)), (1, 2), 2)]  # normalised: 'same' resolved to (lo, hi) pairs
    monkeypatch.setattr(backends, "backend_for", lambda xp: Hooked(lambda *a, **k: None))
    _check(conv(x, w, b, **kw), x, w, b, kw, eps("float64"))
    assert len(calls) == 2


# --------------------------------------------------------------------------------------------------
# The CuPy plugin's hook: its code run on NumPy arrays (CuPy's API subset it uses), and on a GPU
# --------------------------------------------------------------------------------------------------
def _plugin_backend(module):
    sys.path.insert(0, str(PLUGIN))
    try:
        from peftmath_cupy import CupyBackend
    finally:
        sys.path.remove(str(PLUGIN))
    backend = object.__new__(CupyBackend)  # without CuPy: the constructor needs a device
    backend._cupy = module
    return backend


@pytest.mark.parametrize("nd,groups,stride,padding,dilation", CASES[::2])
def test_cupy_hook_logic_on_numpy(nd, groups, stride, padding, dilation):
    backend = _plugin_backend(np)
    x, w, b = _case(nd, groups, np.float32, seed=18)
    kw = _kw(groups, stride, padding, dilation)
    got = backend.conv(x, w, b, **_normalised(kw, w))
    if any(s != 1 for s in _normalised(kw, w)["stride"]):
        assert got is None
        return
    _check(got, x, w, b, kw, eps("float32"))
    assert backend.conv(*(a.astype(ml_dtypes.bfloat16) for a in (x, w, b)), **_normalised(kw, w)) is None


def _cupy_usable() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cupy_usable(), reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_cupy_conv_on_device(dtype):
    import cupy as cp

    backend = _plugin_backend(cp)
    x, w, b = _case(2, 2, getattr(np, dtype), seed=19)
    kw = _kw(2, 1, "same", (1, 2))
    got = backend.conv(*(cp.asarray(a) for a in (x, w, b)), **_normalised(kw, w))
    assert isinstance(got, cp.ndarray) and got.dtype == dtype
    if dtype == "float16":
        ref = reference_conv(x, w, b, xp=np, **_normalised(kw, w))
        _check_half([a.astype(np.float64) for a in (x, w, b)], kw, cp.asnumpy(got).astype(np.float64),
                    ref.astype(np.float64), eps(dtype))
    else:
        _check(cp.asnumpy(got), x, w, b, kw, eps(dtype))


@pytest.mark.parametrize("lib", ["numpy", "torch", "jax"])
def test_half_operands_with_a_float32_bias(lib):
    """bfloat16 input and weight with a float32 bias: a float32 result, the float32 sum of the exact
    products plus the bias on every path (nothing rounded to bfloat16 on the way)."""
    x, w, b = _case(2, 2, seed=20)
    kw = _kw(2, 1, 1, 1)
    xh, wh = x.astype(ml_dtypes.bfloat16), w.astype(ml_dtypes.bfloat16)
    b32 = b.astype(np.float32)
    if lib == "numpy":
        arrays, xp = (xh, wh, b32), np
    elif lib == "torch":
        import array_api_compat.torch as xp

        # through float32 (exact): torch's float64 -> bfloat16 cast can round differently from ml_dtypes'
        arrays = (torch.from_numpy(xh.astype(np.float32)).bfloat16(), torch.from_numpy(wh.astype(np.float32)).bfloat16(),
                  torch.from_numpy(b32))
    else:
        xp = jnp
        arrays = (jnp.asarray(xh), jnp.asarray(wh), jnp.asarray(b32))
    got = conv(*arrays, **kw)
    assert _host(got).dtype == np.float32
    _check(got, xh, wh, b32, kw, eps("float32"), xp, arrays)
