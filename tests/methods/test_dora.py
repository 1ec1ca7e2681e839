"""DoRA (peftmath.methods.dora): magnitude shapes, norms, merge/unmerge with the record, forward.

References are built by hand in float64 in the *stored* layout (norm axes written out per kind), so
they do not go through peftmath.layers. Error units (u = dtype epsilon, K = fan-in, n = the weight norm,
nₐ = the norm of |W| + s|B||A| per output):

    |W' − W'₆₄| ≤ (K + r + 6)·u·( |g|·(|W| + |ΔW|ₐ) + |W'₆₄|·nₐ/n )
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import XP, assert_same_namespace, f64, floor, np_dtype, ratio, skip_if_immutable, to_np, to_xp
from peftmath._array import eps
from peftmath.errors import NotInvertibleError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import dora, lora
from peftmath.methods.lora import LoraConfig, LoraModule
from tests.test_array import ref_conv
from tests.methods.test_lora import Case, cases, ref_delta

DORA_KINDS = ("Linear", "Conv1D", "Embedding", "Conv1d", "Conv2d", "Conv3d")


def out_axis_shape(case, v):
    """v (out,) reshaped to broadcast against the stored weight."""
    if case.kind == "Linear":
        return v[:, None]
    if case.kind in ("Conv1D", "Embedding"):
        return v[None, :]
    return v.reshape((-1,) + (1,) * (len(case.weight_shape) - 1))


def hand_norm(case, V):
    """Per-output norm of a stored-layout weight V, axes written out per kind."""
    if case.kind == "Linear":
        return np.sqrt((V**2).sum(axis=1))
    if case.kind in ("Conv1D", "Embedding"):
        return np.sqrt((V**2).sum(axis=0))
    return np.sqrt((V**2).sum(axis=tuple(range(1, V.ndim))))


def dora_arrays(case, dtype, seed_shift=0):
    W, A, B, b = case.arrays(dtype)
    n0 = hand_norm(case, f64(W) + ref_delta(case, A, B))
    rng = np.random.default_rng(case.seed + 17 + seed_shift)
    m = (n0 * rng.uniform(0.5, 1.5, n0.shape)).astype(np_dtype(dtype))  # perturbed: g != 1
    mag_shape = (1, case.out) + (1,) * len(case.kernel) if case.kernel else (case.out,)
    return W, A, B, b, m.reshape(mag_shape)


def references(case, W, A, B, m):
    V = f64(W) + ref_delta(case, A, B)
    n = hand_norm(case, V)
    g = f64(m).reshape(-1) / n
    Wm = out_axis_shape(case, g) * V
    Vabs = np.abs(f64(W)) + ref_delta(case, A, B, absolute=True)
    n_abs = hand_norm(case, Vabs)
    unit = (case.fan_in + case.r + 6) * (np.abs(out_axis_shape(case, g)) * Vabs + np.abs(Wm) * out_axis_shape(case, n_abs / n))
    return V, n, g, Wm, unit


@pytest.mark.parametrize("kind,shape,mag", [
    ("Linear", (5, 3), (5,)), ("Conv1D", (3, 5), (5,)), ("Embedding", (11, 4), (4,)),
    ("Conv1d", (6, 2, 3), (1, 6, 1)), ("Conv2d", (6, 2, 3, 3), (1, 6, 1, 1)), ("Conv3d", (4, 2, 1, 1, 2), (1, 4, 1, 1, 1)),
])
def test_magnitude_shape(kind, shape, mag):
    assert dora.magnitude_shape(Layer.of(shape, kind)) == mag


@XP
@given(case=cases(kinds=DORA_KINDS), dtype=st.sampled_from(["float32", "float64"]))
def test_init_magnitude_is_the_norm(xp, case, dtype):
    W, A, B, _ = case.arrays(dtype)
    m = dora.init_magnitude(*(to_xp(xp, a) for a in (W, A, B)), scaling=case.s, layer=case.kind)
    assert_same_namespace(xp, m)
    assert tuple(m.shape) == dora.magnitude_shape(Layer.of(case.weight_shape, case.kind))
    n = hand_norm(case, f64(W) + ref_delta(case, A, B))
    n_abs = hand_norm(case, np.abs(f64(W)) + ref_delta(case, A, B, absolute=True))
    assert ratio(np.abs(to_np(m).reshape(-1) - n), (case.fan_in + case.r + 4) * eps(dtype) * n_abs) <= 1


def test_init_magnitude_with_default_lora_init_is_row_norm():
    W = np.random.default_rng(0).standard_normal((6, 4))
    mod_params, _ = LoraModule.initialize("q", LoraConfig(r=2, lora_alpha=4, use_dora=True), Layer.of(W.shape),
                                          weight=W)
    np.testing.assert_allclose(mod_params["lora_magnitude_vector"], np.linalg.norm(W, axis=1), rtol=1e-6)


@XP
@given(case=cases(kinds=DORA_KINDS), dtype=st.sampled_from(["float32", "float64"]))
def test_merge_unmerge_with_record(xp, case, dtype):
    W, A, B, _, m = dora_arrays(case, dtype)
    Wx, Ax, Bx, mx = (to_xp(xp, a) for a in (W, A, B, m))
    u = eps(dtype)
    V, n, g, Wm, unit = references(case, W, A, B, m)
    res = dora.merge(Wx, Ax, Bx, mx, scaling=case.s, layer=case.kind)
    assert_same_namespace(xp, res.weight, res.record)
    assert res.bias is None and res.weight.dtype == Wx.dtype
    assert ratio(np.abs(to_np(res.weight) - Wm), u * unit) <= 1
    n_abs = hand_norm(case, np.abs(f64(W)) + ref_delta(case, A, B, absolute=True))
    assert ratio(np.abs(to_np(res.record) - n), (case.fan_in + case.r + 4) * u * n_abs) <= 1
    back = dora.unmerge(res.weight, Ax, Bx, mx, scaling=case.s, weight_norm=res.record, layer=case.kind)
    assert_same_namespace(xp, back.weight)
    Vabs = np.abs(f64(W)) + ref_delta(case, A, B, absolute=True)
    # W' / g − ΔW: the merge error divided by g, plus the subtraction
    bound = 2 * u * unit / np.abs(out_axis_shape(case, g)) + (case.r + 4) * u * Vabs
    assert ratio(np.abs(to_np(back.weight) - f64(W)), bound) <= 1
    with pytest.raises(NotInvertibleError, match="record"):
        dora.unmerge(res.weight, Ax, Bx, mx, scaling=case.s, weight_norm=None, layer=case.kind)


@XP
@given(case=cases(kinds=("Linear", "Conv1D", "Conv2d", "Conv1d")), dtype=st.sampled_from(["float32", "float64"]))
def test_copy_false_fast_path_equals_copy(xp, case, dtype):
    skip_if_immutable(xp)
    W, A, B, _, m = dora_arrays(case, dtype)
    Ax, Bx, mx = (to_xp(xp, a) for a in (A, B, m))
    u = eps(dtype)
    _, n, g, Wm, unit = references(case, W, A, B, m)
    ref = dora.merge(to_xp(xp, W), Ax, Bx, mx, scaling=case.s, layer=case.kind)
    target = to_xp(xp, W.copy())
    res = dora.merge(target, Ax, Bx, mx, scaling=case.s, layer=case.kind, copy=False)
    assert res.weight is target
    assert ratio(np.abs(to_np(target) - Wm), u * unit) <= 1
    assert ratio(np.abs(to_np(target) - to_np(ref.weight)), 2 * u * unit) <= 1
    back = dora.unmerge(target, Ax, Bx, mx, scaling=case.s, weight_norm=res.record, layer=case.kind, copy=False)
    assert back.weight is target
    Vabs = np.abs(f64(W)) + ref_delta(case, A, B, absolute=True)
    bound = 2 * u * unit / np.abs(out_axis_shape(case, g)) + 2 * (case.r + 4) * u * Vabs
    assert ratio(np.abs(to_np(target) - f64(W)), bound) <= 1


def test_copy_false_numpy_keeps_memory_and_read_only_refused():
    case = Case("Conv1D", 7, 5, (), 3, 1.5, 4)  # non-square transformers Conv1D
    W, A, B, _, m = dora_arrays(case, "float32")
    alias = W[...]
    res = dora.merge(W, A, B, m, scaling=case.s, layer="Conv1D", copy=False)
    assert res.weight is W and np.shares_memory(alias, W)
    W2 = case.arrays("float32")[0]
    W2.flags.writeable = False
    with pytest.raises(UnsupportedError, match="writeable"):
        dora.merge(W2, A, B, m, scaling=case.s, layer="Conv1D", copy=False)


@st.composite
def forward_cases(draw):
    case = draw(cases(kinds=("Linear", "Conv1D", "Embedding", "Conv2d")))
    return case, draw(st.integers(1, 3)), draw(st.booleans())


def _x(case, n, rng, dtype):
    if case.kind == "Embedding":
        return rng.integers(0, case.inn, size=(n, 4))
    if case.kind == "Conv2d":
        return rng.standard_normal((n, case.inn, case.kernel[0] + 2, case.kernel[1] + 1)).astype(np_dtype(dtype))
    return rng.standard_normal((n, case.inn)).astype(np_dtype(dtype))


def _lin(case, x, Wstored, b=None):
    """float64 base layer by hand, from the stored layout."""
    if case.kind == "Linear":
        y = x @ Wstored.T
    elif case.kind == "Conv1D":
        y = x @ Wstored
    elif case.kind == "Embedding":
        return Wstored[x]
    else:
        return ref_conv(x, Wstored, b, padding=1)
    return y if b is None else y + b


@XP
@given(fc=forward_cases(), dtype=st.sampled_from(["float32", "float64"]))
def test_merged_forward_equals_unmerged(xp, fc, dtype):
    case, n_batch, with_bias = fc
    W, A, B, b, m = dora_arrays(case, dtype)
    if case.kind == "Embedding" or not with_bias:
        b = None
    rng = np.random.default_rng(case.seed + 3)
    x = _x(case, n_batch, rng, dtype)
    Wx, Ax, Bx, mx, xx = (to_xp(xp, a) for a in (W, A, B, m, x))
    bx = None if b is None else to_xp(xp, b)
    conv = dict(padding=1) if case.kind == "Conv2d" else {}
    y = dora.forward(xx, Wx, Ax, Bx, mx, scaling=case.s, bias=bx, layer=case.kind, **conv)
    merged = dora.merge(Wx, Ax, Bx, mx, scaling=case.s, layer=case.kind).weight
    ym = Layer.of(case.weight_shape, case.kind).base_forward(xx, merged, bx, xp, **conv)
    assert_same_namespace(xp, y, ym)
    V, n, g, Wm, _ = references(case, W, A, B, m)
    xr = x if case.kind == "Embedding" else f64(x)
    want = _lin(case, xr, Wm, None if b is None else f64(b))
    Vabs = np.abs(f64(W)) + ref_delta(case, A, B, absolute=True)
    n_abs = hand_norm(case, Vabs)
    # |g|·(|x|·(|W| + |ΔW|ₐ))·(1 + nₐ/n): the branch and base products, and the error of n itself
    if case.kind == "Conv2d":
        gs = np.abs(g)[None, :, None, None]
        mag = gs * _lin(case, np.abs(xr), Vabs) * (1 + (n_abs / n)[None, :, None, None])
        if b is not None:
            mag = mag + np.abs(f64(b))[None, :, None, None]
    else:
        gv = np.abs(g)
        mag = gv * _lin(case, xr if case.kind == "Embedding" else np.abs(xr), Vabs) * (1 + n_abs / n)
        if b is not None:
            mag = mag + np.abs(f64(b))
    unit = (case.fan_in + case.r + 8) * eps(dtype) * mag
    assert tuple(y.shape) == want.shape
    assert ratio(np.abs(to_np(y) - want), unit) <= 1
    assert ratio(np.abs(to_np(ym) - want), unit) <= 1


@pytest.mark.parametrize("kind", ["Linear", "Conv1D", "Conv2d"])
def test_forward_with_dropout_is_peft_training_formula(kind):
    case = Case(kind, 7, 5, (3, 3) if kind == "Conv2d" else (), 3, 1.75, 21)  # non-square
    W, A, B, b, m = dora_arrays(case, "float64")
    rng = np.random.default_rng(0)
    x = _x(case, 2, rng, "float64")
    mask = (rng.random(x.shape) < 0.6) / 0.6
    y = dora.forward(x, W, A, B, m, scaling=case.s, bias=b, layer=kind, dropout=lambda t: t * mask,
                     **(dict(padding=1) if kind == "Conv2d" else {}))
    # PEFT (DoraLinearLayer / DoraConv2dLayer in training):
    #   result = base(x) + (g − 1)·(d(x) Wᵀ) + g·s·lora_B(lora_A(d(x)))
    _, n, g, _, _ = references(case, W, A, B, m)
    xd = x * mask
    gb = g[None, :, None, None] if kind == "Conv2d" else g
    lora_term = _lin(case, xd, ref_delta(case, A, B))  # s·B A applied to d(x)
    want = _lin(case, x, W, b) + (gb - 1) * _lin(case, xd, W) + gb * lora_term
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-10)
    # without dropout the unmerged form is g·(base without bias + lora) + b
    y0 = dora.forward(x, W, A, B, m, scaling=case.s, bias=b, layer=kind, **(dict(padding=1) if kind == "Conv2d" else {}))
    want0 = gb * (_lin(case, x, W) + _lin(case, x, ref_delta(case, A, B))) + (
        b[None, :, None, None] if kind == "Conv2d" else b)
    np.testing.assert_allclose(y0, want0, rtol=1e-10, atol=1e-10)


def test_module_records_and_errors():
    case = Case("Linear", 6, 4, (), 2, 2.0, 8)
    W, A, B, b, m = dora_arrays(case, "float64")
    config = LoraConfig(r=2, lora_alpha=4.0, use_dora=True)
    mod = LoraModule("q", config, {"lora_A.weight": A, "lora_B.weight": B, "lora_magnitude_vector": m},
                     Layer.of(W.shape))
    assert mod.is_dora
    res = mod.merge(W, b)
    assert res.bias is b and res.record is not None
    back = mod.unmerge(res.weight, res.bias, record=res.record)
    np.testing.assert_allclose(back.weight, W, rtol=0, atol=1e-12)
    with pytest.raises(NotInvertibleError, match="weight norm"):
        mod.unmerge(res.weight, res.bias)
    with pytest.raises(ShapeError, match="lora_magnitude_vector"):
        LoraModule("q", config, {"lora_A.weight": A, "lora_B.weight": B, "lora_magnitude_vector": m[:5]},
                   Layer.of(W.shape))


def test_unmerge_zero_magnitude_and_grouped_conv():
    case = Case("Linear", 3, 4, (), 2, 1.0, 1)
    W, A, B, _, m = dora_arrays(case, "float64")
    m[1] = 0.0
    res = dora.merge(W, A, B, m, scaling=1.0)
    with pytest.raises(NotInvertibleError, match="zeros"):
        dora.unmerge(res.weight, A, B, m, scaling=1.0, weight_norm=res.record)
    layer = Layer.of((4, 2, 3, 3), groups=2)
    with pytest.raises(UnsupportedError, match="groups=2"):
        dora.merge(np.zeros((4, 2, 3, 3)), np.ones((2, 4, 3, 3)), np.ones((4, 1, 1, 1)), np.ones((1, 4, 1, 1)),
                   scaling=1.0, layer=layer)


def test_grouped_conv_forward_is_pefts_and_merges_are_refused():
    """A conv with groups = 2: the forward scales by m / n with PEFT's norm (LoRA weight built by reshaping
    B.reshape(-1, r) @ A.reshape(r, -1) to W's shape, the norm of each output filter of W + s·L), computed here
    by loops in float64; merge and unmerge are refused (ΔW spans every input channel)."""
    rng = np.random.default_rng(3)
    out, cin, g, r, s = 4, 4, 2, 2, 0.7
    W = rng.standard_normal((out, cin // g, 3, 3))
    A = rng.standard_normal((r, cin, 3, 3))
    B = rng.standard_normal((out, r // g, 1, 1))
    m = rng.uniform(0.5, 2.0, (1, out, 1, 1))
    bias = rng.standard_normal(out)
    x = rng.standard_normal((2, cin, 5, 5))
    L = np.zeros(W.size)
    Bf, Af = B.reshape(-1), A.reshape(-1)
    rows, cols = Bf.size // r, Af.size // r
    for i in range(rows):  # (B.reshape(-1, r) @ A.reshape(r, -1)), row-major into W's shape
        for j in range(cols):
            L[i * cols + j] = sum(Bf[i * r + k] * Af[k * cols + j] for k in range(r))
    V = W + s * L.reshape(W.shape)
    n = np.array([math.sqrt(float(np.sum(V[o] ** 2))) for o in range(out)])
    gain = m.reshape(-1) / n
    with_lora = lora.forward(x, W, A, B, scaling=s)  # base + s·lora(x), grouped (LoRA's own parity)
    want = gain[None, :, None, None] * with_lora + bias[None, :, None, None]
    got = dora.forward(x, W, A, B, m, scaling=s, bias=bias)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dora.weight_norm(W, A, B, scaling=s, layer=Layer.of(W.shape, groups=g)), n,
                               rtol=1e-13)
    for fn in (lambda: dora.merge(W, A, B, m, scaling=s, layer=Layer.of(W.shape, groups=g)),
               lambda: dora.unmerge(W, A, B, m, scaling=s, weight_norm=n, layer=Layer.of(W.shape, groups=g))):
        with pytest.raises(UnsupportedError, match="groups=2.*cannot be merged"):
            fn()


def test_merge_with_base_weight_uses_w0_norm():
    case = Case("Linear", 5, 4, (), 2, 1.0, 2)
    W, A, B, _, m = dora_arrays(case, "float64")
    W0 = W * 0.5
    res = dora.merge(W, A, B, m, scaling=1.0, base_weight=W0)
    n0 = np.linalg.norm(W0 + B @ A, axis=1)
    np.testing.assert_allclose(res.record, n0, rtol=1e-13)
    np.testing.assert_allclose(res.weight, (m / n0)[:, None] * (W + B @ A), rtol=1e-12)
    assert math.isfinite(float(res.weight.sum()))


@given(case=cases(kinds=DORA_KINDS), dtype=st.sampled_from(["float16", "bfloat16"]), copy=st.booleans())
def test_half_merge_rounds_once_and_round_trips(case, dtype, copy):
    dt = np_dtype(dtype)
    W, A, B, _, m = dora_arrays(case, dtype)
    V, n, g, Wm, unit = references(case, W, A, B, m)
    target = W.copy()
    res = dora.merge(target, A, B, m, scaling=case.s, layer=case.kind, copy=copy)
    assert res.weight.dtype == dt and (res.weight is target) == (not copy)
    u32, uh, tiny = 2.0**-23, eps(dt), floor(dt)
    # (m/n)(W + ΔW) formed in float32, rounded once to the half dtype
    bound = 0.5 * uh * np.abs(Wm) * (1 + uh) + u32 * unit + tiny
    assert ratio(np.abs(f64(res.weight) - Wm), bound) <= 1
    back = dora.unmerge(res.weight, A, B, m, scaling=case.s, weight_norm=res.record, layer=case.kind, copy=copy)
    Vabs = np.abs(f64(W)) + ref_delta(case, A, B, absolute=True)
    gs = np.abs(out_axis_shape(case, g))
    bound = uh * (np.abs(f64(W)) + np.abs(V)) + (bound / gs) + 2 * (case.r + 4) * u32 * Vabs + tiny
    assert ratio(np.abs(f64(back.weight) - f64(W)), bound) <= 1


def test_square_conv1d_uses_columns_not_rows():
    """huggingface/peft#3531: a square fan_in_fan_out weight hides a missing transpose."""
    case = Case("Conv1D", 8, 8, (), 3, 1.25, 31)
    W, A, B, _, m = dora_arrays(case, "float64")
    V = W + (1.25 * B @ A).T  # stored (in, out)
    n = np.linalg.norm(V, axis=0)
    res = dora.merge(W, A, B, m, scaling=1.25, layer="Conv1D")
    np.testing.assert_allclose(res.weight, V * (m / n)[None, :], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(res.record, n, rtol=1e-13)
    as_linear = dora.merge(W, A, B, m, scaling=1.25, layer="Linear").weight
    assert np.abs(as_linear - res.weight).max() > 1e-3  # the two readings really differ
    back = dora.unmerge(res.weight, A, B, m, scaling=1.25, weight_norm=res.record, layer="Conv1D")
    np.testing.assert_allclose(back.weight, W, rtol=0, atol=1e-13)
    x = np.random.default_rng(0).standard_normal((3, 8))
    np.testing.assert_allclose(dora.forward(x, W, A, B, m, scaling=1.25, layer="Conv1D"), x @ res.weight,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NaN / inf is the point
@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("where", ["A", "B", "magnitude", "weight"])
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_safe_merge_is_atomic(copy, where, bad):
    from peftmath.errors import NonFiniteError

    case = Case("Linear", 5, 4, (), 2, 1.0, 6)
    W, A, B, b, m = dora_arrays(case, "float32")
    {"A": A, "B": B, "magnitude": m, "weight": W}[where].reshape(-1)[1] = bad
    before = W.copy()
    mod = LoraModule("q", LoraConfig(r=2, lora_alpha=2.0, use_dora=True),
                     {"lora_A.weight": A, "lora_B.weight": B, "lora_magnitude_vector": m}, Layer.of(W.shape))
    with pytest.raises(NonFiniteError, match="q"):
        mod.merge(W, b, safe=True, copy=copy)
    np.testing.assert_array_equal(W, before)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NaN / inf is the point
@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("where", ["A", "B", "lora_bias"])
def test_lora_safe_merge_is_atomic(copy, where):
    from peftmath.errors import NonFiniteError

    case = Case("Linear", 5, 4, (), 2, 1.0, 6)
    W, A, B, b = case.arrays("float32")
    lb = np.ones(5, np.float32)
    {"A": A, "B": B, "lora_bias": lb}[where][1] = np.nan
    Wb, bb = W.copy(), b.copy()
    mod = LoraModule("q", LoraConfig(r=2, lora_alpha=2.0, lora_bias=True),
                     {"lora_A.weight": A, "lora_B.weight": B, "lora_B.bias": lb}, Layer.of(W.shape))
    with pytest.raises(NonFiniteError, match="q"):
        mod.merge(W, b, safe=True, copy=copy)
    np.testing.assert_array_equal(W, Wb)
    np.testing.assert_array_equal(b, bb)
