"""peftmath._array: conv against a direct float64 loop and torch, embedding lookup, namespaces, eps."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import assert_same_namespace, to_np, to_xp
from peftmath._array import conv, dtype_name, embedding_lookup, eps, namespace
from peftmath.errors import NamespaceError, ShapeError

XP = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------
# An independent convolution: the definition, one output element at a time, in float64
# --------------------------------------------------------------------------------------------------
def _pads(padding, nd, kernel, dilation):
    if padding == "valid":
        return [(0, 0)] * nd
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return [(t // 2, t - t // 2) for t in total]  # PyTorch puts the odd extra on the right
    p = (padding,) * nd if isinstance(padding, int) else tuple(padding)
    return [(q, q) for q in p]


def ref_conv(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, absolute=False):
    """Cross-correlation by its definition (absolute=True sums |x|·|w|, for error bounds)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    if absolute:
        x, w = np.abs(x), np.abs(w)
    nd = w.ndim - 2
    kernel = w.shape[2:]
    stride = (stride,) * nd if isinstance(stride, int) else tuple(stride)
    dilation = (dilation,) * nd if isinstance(dilation, int) else tuple(dilation)
    xpad = np.pad(x, [(0, 0), (0, 0), *_pads(padding, nd, kernel, dilation)])
    out_sp = [(s - d * (k - 1) - 1) // st + 1 for s, d, k, st in zip(xpad.shape[2:], dilation, kernel, stride)]
    n, c_out = x.shape[0], w.shape[0]
    cin_g, cout_g = w.shape[1], c_out // groups
    out = np.zeros((n, c_out, *out_sp))
    for i in range(n):
        for co in range(c_out):
            g = co // cout_g
            for pos in np.ndindex(*out_sp):
                total = 0.0
                for ci in range(cin_g):
                    for koff in np.ndindex(*kernel):
                        idx = tuple(p * st + k * d for p, st, k, d in zip(pos, stride, koff, dilation))
                        total += xpad[(i, g * cin_g + ci) + idx] * w[(co, ci) + koff]
                if b is not None:
                    total += abs(b[co]) if absolute else b[co]
                out[(i, co) + pos] = total
    return out


@st.composite
def conv_cases(draw, max_nd=3):
    nd = draw(st.integers(1, max_nd))
    groups = draw(st.sampled_from([1, 1, 2]))
    cin_g = draw(st.integers(1, 2))
    cout_g = draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    mode = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if mode == "same":
        stride = 1
        padding = "same"
    else:
        stride = tuple(draw(st.integers(1, 2)) for _ in range(nd))
        padding = draw(st.integers(0, 2)) if mode == "int" else (
            "valid" if mode == "valid" else tuple(draw(st.integers(0, 2)) for _ in range(nd)))
    min_sp = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    spatial = tuple(m + draw(st.integers(0, 3 if nd < 3 else 1)) for m in min_sp)
    n = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cin_g * groups, *spatial))
    w = rng.standard_normal((cout_g * groups, cin_g, *kernel))
    b = rng.standard_normal(cout_g * groups) if draw(st.booleans()) else None
    return x, w, b, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _check_conv(got, x, w, b, kw, dtype_eps):
    want = ref_conv(x, w, b, **kw)
    bound = ref_conv(x, w, b, absolute=True, **kw)
    k = w.shape[1] * math.prod(w.shape[2:])
    assert got.shape == want.shape
    err = np.abs(got - want)
    assert np.all(err <= (k + 2) * dtype_eps * bound), float(np.max(err / ((k + 2) * dtype_eps * bound + 1e-300)))


@given(case=conv_cases())
def test_conv_matches_definition_numpy_float64(case):
    x, w, b, kw = case
    _check_conv(conv(x, w, b, **kw), x, w, b, kw, 2.0**-52)


@XP
@given(case=conv_cases(max_nd=2), dtype=st.sampled_from(["float32", "float64"]))
def test_conv_matches_definition_every_backend(xp, case, dtype):
    x, w, b, kw = case
    dt = getattr(xp, dtype)
    xs, ws = to_xp(xp, x, dt), to_xp(xp, w, dt)
    bs = None if b is None else to_xp(xp, b, dt)
    got = conv(xs, ws, bs, **kw)
    assert_same_namespace(xp, got)
    assert got.dtype == dt
    # inputs are rounded to dtype first: compare with the definition on the rounded inputs
    xr, wr = to_np(xs), to_np(ws)
    br = None if b is None else to_np(bs)
    _check_conv(to_np(got), xr, wr, br, kw, eps(dtype))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@given(case=conv_cases())
def test_conv_matches_torch(case):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, w, b, kw = case
    nd = w.ndim - 2
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    want = fn(torch.from_numpy(x), torch.from_numpy(w), None if b is None else torch.from_numpy(b), **kw).numpy()
    got = conv(x, w, b, **kw)
    bound = ref_conv(x, w, b, absolute=True, **kw)
    k = w.shape[1] * math.prod(w.shape[2:])
    assert got.shape == want.shape
    assert np.all(np.abs(got - want) <= 2 * (k + 2) * 2.0**-52 * bound)


def test_conv_padding_same_keeps_size_and_refuses_stride():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 7, 6))
    w = rng.standard_normal((3, 2, 2, 3))  # even kernel: asymmetric padding
    y = conv(x, w, padding="same", dilation=(1, 2))
    assert y.shape == (1, 3, 7, 6)
    np.testing.assert_allclose(y, ref_conv(x, w, padding="same", dilation=(1, 2)), rtol=0, atol=1e-12)
    with pytest.raises(ShapeError, match="stride 1"):
        conv(x, w, padding="same", stride=2)
    with pytest.raises(ShapeError, match="'full'"):
        conv(x, w, padding="full")


def test_conv_shape_errors():
    x = np.zeros((1, 4, 5, 5))
    with pytest.raises(ShapeError, match="groups=3"):
        conv(x, np.zeros((6, 1, 3, 3)), groups=3)
    with pytest.raises(ShapeError, match=r"\(1, 4, 5, 5\)"):
        conv(x, np.zeros((2, 4, 3)))
    with pytest.raises(ShapeError, match="smaller than"):
        conv(x, np.zeros((2, 4, 6, 6)))
    with pytest.raises(ShapeError, match="stride"):
        conv(x, np.zeros((2, 4, 3, 3)), stride=(1, 1, 1))


def test_embedding_lookup(xp):
    rng = np.random.default_rng(1)
    table = rng.standard_normal((11, 4))
    ids = rng.integers(0, 11, size=(2, 3, 5))
    got = embedding_lookup(to_xp(xp, ids), to_xp(xp, table))
    assert_same_namespace(xp, got)
    assert tuple(got.shape) == (2, 3, 5, 4)
    np.testing.assert_array_equal(to_np(got), table[ids])


def test_namespace_mixed_libraries():
    torch = pytest.importorskip("torch")
    with pytest.raises(NamespaceError, match="different array libraries"):
        namespace(np.ones(2), torch.ones(2), where="lora.merge")
    with pytest.raises(NamespaceError, match="lora.merge"):
        namespace(np.ones(2), torch.ones(2), where="lora.merge")


def test_namespace_cache_keeps_every_check():
    """The per-type namespace cache (one lookup per array type) still refuses mixed libraries and
    devices, and is the namespace array-api-compat gives."""
    import array_api_compat

    torch = pytest.importorskip("torch")
    for _ in range(2):  # the second round is served from the cache
        assert namespace(np.ones(2), np.ones(3)) is array_api_compat.array_namespace(np.ones(2))
        assert namespace(torch.ones(2)) is array_api_compat.array_namespace(torch.ones(2))
        with pytest.raises(NamespaceError, match="different array libraries"):
            namespace(np.ones(2), torch.ones(2))
    meta = torch.ones(2, device="meta")
    namespace(meta, meta)
    with pytest.raises(NamespaceError, match="different devices"):
        namespace(torch.ones(2), meta)


def test_namespace_different_devices_array_api_strict():
    xs = pytest.importorskip("array_api_strict")
    a = xs.asarray([1.0, 2.0])
    b = xs.asarray([1.0, 2.0], device=xs.Device("device1"))
    assert namespace(a, a) is not None
    with pytest.raises(NamespaceError, match="different devices") as info:
        namespace(a, b)
    assert "device1" in str(info.value) and "CPU_DEVICE" in str(info.value)


def test_namespace_skips_none_and_scalars():
    xp = namespace(np.ones(2), None, 3.0, 2)
    assert xp.__name__.endswith("numpy")


def test_eps():
    torch = pytest.importorskip("torch")
    assert eps(np.float64) == np.finfo(np.float64).eps
    assert eps(np.float32) == np.finfo(np.float32).eps
    assert eps(np.float16) == np.finfo(np.float16).eps
    assert eps(ml_dtypes.bfloat16) == float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps)
    assert eps(torch.bfloat16) == torch.finfo(torch.bfloat16).eps
    assert eps(torch.float16) == torch.finfo(torch.float16).eps
    assert eps(np.dtype(ml_dtypes.float8_e4m3fn)) == float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).eps)
    with pytest.raises(ShapeError, match="int32"):
        eps(np.int32)


def test_dtype_name():
    torch = pytest.importorskip("torch")
    xs = pytest.importorskip("array_api_strict")
    cases = [
        (np.float32, "float32"), (np.dtype("float16"), "float16"), (ml_dtypes.bfloat16, "bfloat16"),
        (np.dtype(ml_dtypes.bfloat16), "bfloat16"), (torch.bfloat16, "bfloat16"), (torch.float64, "float64"),
        (xs.float32, "float32"), (np.dtype(ml_dtypes.float8_e4m3fn), "float8_e4m3fn"), (np.int64, "int64"),
    ]
    for dtype, name in cases:
        assert dtype_name(dtype) == name, dtype


# --------------------------------------------------------------------------------------------------
# Views and writeability: what the in-place contract rests on
# --------------------------------------------------------------------------------------------------
def test_reshape_view_is_a_proven_view_or_none():
    from peftmath._array import contiguous_copy, is_view_of, reshape_view

    import array_api_compat.numpy as xnp

    W = np.arange(24.0).reshape(2, 3, 4)
    v = reshape_view(W, (2, 12), xp=xnp)
    assert v is not None and np.shares_memory(v, W) and is_view_of(v, W)
    assert reshape_view(np.asfortranarray(W), (2, 12), xp=xnp) is None
    assert reshape_view(np.transpose(W.copy().reshape(4, 3, 2), (2, 1, 0)), (2, 12), xp=xnp) is None
    assert reshape_view(W, W.shape, xp=xnp) is W
    assert not is_view_of(W.reshape(2, 12).copy(), W)  # a copy is never taken for a view
    c = contiguous_copy(np.asfortranarray(W), xp=xnp)
    assert c.flags.c_contiguous and not np.shares_memory(c, W) and np.array_equal(c, W)


def test_reshape_view_torch_and_array_api_strict():
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xt
    import array_api_strict as xs

    from peftmath._array import contiguous_copy, reshape_view, transpose_view

    t = torch.arange(24.0).reshape(2, 3, 2, 2)
    assert reshape_view(t, (2, 12), xp=xt).data_ptr() == t.data_ptr()
    assert reshape_view(t.to(memory_format=torch.channels_last), (2, 12), xp=xt) is None
    assert contiguous_copy(t.to(memory_format=torch.channels_last), xp=xt).is_contiguous()
    s = xs.asarray(np.arange(24.0).reshape(2, 3, 4))
    assert reshape_view(s, (2, 12), xp=xs) is not None
    assert reshape_view(xs.permute_dims(s, (0, 2, 1)), (2, 12), xp=xs) is None
    assert transpose_view(xs.asarray(np.zeros((2, 3))), xp=xs) is not None


def test_why_not_writeable_names_the_layout():
    from peftmath._array import is_writeable, why_not_writeable

    ro = np.zeros(3)
    ro.flags.writeable = False
    assert "read-only numpy.ndarray" in why_not_writeable(ro) and not is_writeable(ro)
    assert why_not_writeable(np.zeros(3)) is None
    assert "read-only" in why_not_writeable(np.broadcast_to(np.zeros(3), (2, 3)))
    torch = pytest.importorskip("torch")
    leaf = torch.zeros(3, requires_grad=True)
    assert "requires grad" in why_not_writeable(leaf)
    with torch.no_grad():
        assert why_not_writeable(leaf) is None
    assert why_not_writeable(leaf * 2) is None  # not a leaf: PyTorch records the in-place op
    assert "stride of 0" in why_not_writeable(torch.zeros(3, 1).expand(3, 4))
    shared = np.lib.stride_tricks.as_strided(np.zeros(4), (3, 4), (0, 8), writeable=True)
    assert "stride of 0" in why_not_writeable(shared)
    jnp = pytest.importorskip("jax.numpy")
    assert "JAX" in why_not_writeable(jnp.zeros(3))
