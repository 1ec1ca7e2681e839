"""LoRA (peftmath.methods.lora): every layer kind, every backend, against float64 and hand-built references.

Tolerances are componentwise (see tests/README or array-api-notes §3): with ``u`` the dtype's epsilon,
``|W|`` the base weight and ``|ΔW|ₐ = s·|B||A|`` (the magnitude the float32 product is accurate to),

* merge:            ``|W' − (W + ΔW)| ≤ (r + 2)·u·(|W| + |ΔW|ₐ)``
* merge → unmerge:  ``|W'' − W| ≤ 4·u·(|W| + |ΔW|)``   (half dtypes: ``2·u_half·(|W| + |ΔW|)``)
* forward:          ``|y − y₆₄| ≤ (K + r + 4)·u·(|x|·(|W| + |ΔW|ₐ) + |b|)``, K = fan-in
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import XP, assert_same_namespace, f64, floor, np_dtype, ratio, skip_if_immutable, to_np, to_xp
from peftmath._array import eps
from peftmath.errors import ConfigError, NamespaceError, NonFiniteError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import lora
from peftmath.methods.lora import LoraConfig, LoraModule

KINDS = ("Linear", "Conv1D", "Embedding", "Conv1d", "Conv2d", "Conv3d")
KERNELS = {"Conv1d": [(1,), (3,), (2,)], "Conv2d": [(1, 1), (3, 3), (2, 3)], "Conv3d": [(1, 1, 1), (1, 1, 3), (2, 1, 2)]}


# --------------------------------------------------------------------------------------------------
# Cases and float64 references
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    kind: str
    out: int
    inn: int
    kernel: tuple
    r: int
    s: float
    seed: int

    @property
    def weight_shape(self):
        if self.kind in ("Conv1D", "Embedding"):
            return (self.inn, self.out)  # (in, out) / (V, D)
        return (self.out, self.inn, *self.kernel)

    @property
    def a_shape(self):
        return (self.r, self.inn, *self.kernel)

    @property
    def b_shape(self):
        return (self.out, self.r, *(1,) * len(self.kernel))

    @property
    def fan_in(self):
        return self.inn * math.prod(self.kernel)

    def arrays(self, dtype="float64"):
        """W, A, B (and a bias) as NumPy arrays of ``dtype``."""
        rng = np.random.default_rng(self.seed)
        dt = np_dtype(dtype)
        W = rng.standard_normal(self.weight_shape).astype(dt)
        A = rng.standard_normal(self.a_shape).astype(dt)
        B = rng.standard_normal(self.b_shape).astype(dt)
        b = rng.standard_normal(self.out).astype(dt)
        return W, A, B, b


@st.composite
def cases(draw, kinds=KINDS, max_dim=10, max_r=6):
    kind = draw(st.sampled_from(kinds))
    kernel = draw(st.sampled_from(KERNELS[kind])) if kind in KERNELS else ()
    return Case(kind, draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim)), kernel,
                draw(st.integers(1, max_r)), draw(st.floats(1e-2, 16.0)), draw(st.integers(0, 2**32 - 1)))


def ref_delta(case, A, B, absolute=False):
    """s·B A in float64, in the stored layout (absolute: s·|B||A|)."""
    A2 = np.asarray(A, dtype=np.float64).reshape(case.r, -1)
    B2 = np.asarray(B, dtype=np.float64).reshape(case.out, case.r)
    if absolute:
        A2, B2 = np.abs(A2), np.abs(B2)
    M = case.s * B2 @ A2
    return M.T if case.kind in ("Conv1D", "Embedding") else M.reshape(case.weight_shape)


# --------------------------------------------------------------------------------------------------
# delta, merge, unmerge: every kind, every backend, float32 / float64
# --------------------------------------------------------------------------------------------------
@XP
@given(case=cases(), dtype=st.sampled_from(["float32", "float64"]))
def test_delta_merge_unmerge(xp, case, dtype):
    W, A, B, _ = case.arrays(dtype)
    Wx, Ax, Bx = (to_xp(xp, a) for a in (W, A, B))
    u = eps(dtype)
    dW, dWa = ref_delta(case, A, B), ref_delta(case, A, B, absolute=True)

    d = lora.delta_weight(Ax, Bx, scaling=case.s, layer=case.kind)
    assert_same_namespace(xp, d)
    assert tuple(d.shape) == case.weight_shape and d.dtype == Ax.dtype
    assert ratio(np.abs(to_np(d) - dW), (case.r + 1) * u * dWa) <= 1

    merged = lora.merge(Wx, Ax, Bx, scaling=case.s, layer=case.kind)
    assert_same_namespace(xp, merged)
    assert merged.dtype == Wx.dtype and tuple(merged.shape) == case.weight_shape
    np.testing.assert_array_equal(to_np(Wx), f64(case.arrays(dtype)[0]))  # copy=True: input untouched
    assert ratio(np.abs(to_np(merged) - (f64(W) + dW)), (case.r + 2) * u * (np.abs(f64(W)) + dWa)) <= 1

    back = lora.unmerge(merged, Ax, Bx, scaling=case.s, layer=case.kind)
    assert_same_namespace(xp, back)
    assert ratio(np.abs(to_np(back) - f64(W)), 4 * u * (np.abs(f64(W)) + np.abs(dW))) <= 1


@XP
@given(case=cases(), dtype=st.sampled_from(["float32", "float64"]))
def test_copy_false_is_in_place_and_equals_copy(xp, case, dtype):
    skip_if_immutable(xp)
    W, A, B, _ = case.arrays(dtype)
    Ax, Bx = to_xp(xp, A), to_xp(xp, B)
    u = eps(dtype)
    ref = lora.merge(to_xp(xp, W), Ax, Bx, scaling=case.s, layer=case.kind)
    target = to_xp(xp, W.copy())
    out = lora.merge(target, Ax, Bx, scaling=case.s, layer=case.kind, copy=False)
    assert out is target
    dWa = ref_delta(case, A, B, absolute=True)
    unit = (case.r + 2) * u * (np.abs(f64(W)) + dWa)
    assert ratio(np.abs(to_np(target) - to_np(ref)), 2 * unit) <= 1
    assert ratio(np.abs(to_np(target) - (f64(W) + ref_delta(case, A, B))), unit) <= 1
    out = lora.unmerge(target, Ax, Bx, scaling=case.s, layer=case.kind, copy=False)
    assert out is target
    # an in-place kernel (BLAS / torch addmm_ with beta=1) may round into W after every rank-1 update,
    # so the round trip is bounded by twice the merge bound, not by 4·u·(|W| + |ΔW|)
    assert ratio(np.abs(to_np(target) - f64(W)), 2 * unit) <= 1


def test_copy_false_keeps_numpy_memory():
    case = Case("Conv2d", 6, 4, (3, 3), 2, 0.5, 7)
    W, A, B, _ = case.arrays("float32")
    alias = W.reshape(-1)
    out = lora.merge(W, A, B, scaling=case.s, copy=False)
    assert out is W and np.shares_memory(alias, W)
    np.testing.assert_array_equal(alias, W.reshape(-1))
    assert not np.array_equal(W, case.arrays("float32")[0])


# --------------------------------------------------------------------------------------------------
# half precision (NumPy + ml_dtypes)
# --------------------------------------------------------------------------------------------------
@given(case=cases(), dtype=st.sampled_from(["float16", "bfloat16"]), copy=st.booleans(),
       factors=st.sampled_from(["half", "float32"]))
def test_half_merge_unmerge(case, dtype, copy, factors):
    dt = np_dtype(dtype)
    W, A, B, _ = case.arrays(dtype)
    if factors == "float32":
        A, B = A.astype(np.float32), B.astype(np.float32)
    Win = W.copy()
    merged = lora.merge(Win, A, B, scaling=case.s, layer=case.kind, copy=copy)
    assert merged.dtype == dt
    assert (merged is Win) == (not copy)
    dW, dWa = ref_delta(case, A, B), ref_delta(case, A, B, absolute=True)
    exact = f64(W) + dW
    # one rounding of the float32 sum: half an ulp of the half dtype + the float32 error
    bound = 0.5 * eps(dt) * np.abs(exact) * (1 + eps(dt)) + (case.r + 2) * 2.0**-23 * (np.abs(f64(W)) + dWa) + floor(dt)
    assert ratio(np.abs(f64(merged) - exact), bound) <= 1
    back = lora.unmerge(merged if copy else Win, A, B, scaling=case.s, layer=case.kind, copy=copy)
    assert ratio(np.abs(f64(back) - f64(W)), 2 * eps(dt) * (np.abs(f64(W)) + np.abs(dW)) + floor(dt)) <= 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["Linear", "Conv1D", "Embedding", "Conv2d"])
def test_peft_compat_rounding_hand_built(dtype, kind):
    dt = np_dtype(dtype)
    case = Case(kind, 24, 20, (1, 3) if kind == "Conv2d" else (), 4, 2.5, 11)
    W, A, B, _ = case.arrays(dtype)
    W32 = W.astype(np.float32)

    def d32(A, B):  # the float32 delta, built by hand in the stored layout
        M = (B.astype(np.float32).reshape(case.out, case.r) @ A.astype(np.float32).reshape(case.r, -1)) * np.float32(case.s)
        return M.T if kind in ("Conv1D", "Embedding") else M.reshape(case.weight_shape)

    def bits(a):
        return np.asarray(a).view(np.uint16)

    for factors in ("float32", "half"):
        Af, Bf = (A.astype(np.float32), B.astype(np.float32)) if factors == "float32" else (A, B)
        d = d32(Af, Bf)
        default = (W32 + d).astype(dt)  # one rounding
        d_fact = d.astype(dt).astype(np.float32) if factors == "half" else d  # PEFT: delta in the factors' dtype
        compat = (W32 + (d_fact.astype(dt).astype(np.float32) if kind == "Embedding" else d_fact)).astype(dt)
        compat_safe = (W32 + d_fact.astype(dt).astype(np.float32)).astype(dt)  # W + round(delta)
        compat_unmerge = (W32 - d_fact.astype(dt).astype(np.float32)).astype(dt)
        kw = dict(scaling=case.s, layer=kind)
        np.testing.assert_array_equal(bits(lora.merge(W, Af, Bf, **kw)), bits(default))
        np.testing.assert_array_equal(bits(lora.merge(W.copy(), Af, Bf, copy=False, **kw)), bits(default))
        np.testing.assert_array_equal(bits(lora.merge(W, Af, Bf, peft_compat=True, **kw)), bits(compat))
        np.testing.assert_array_equal(bits(lora.merge(W, Af, Bf, peft_compat=True, safe=True, **kw)), bits(compat_safe))
        np.testing.assert_array_equal(bits(lora.unmerge(W, Af, Bf, peft_compat=True, **kw)), bits(compat_unmerge))
        np.testing.assert_array_equal(bits(lora.unmerge(W, Af, Bf, **kw)), bits((W32 - d).astype(dt)))
    # the two policies really differ here, and the default is the closer one
    exact = f64(W) + ref_delta(case, A, B)
    default = f64(lora.merge(W, A, B, scaling=case.s, layer=kind))
    compat = f64(lora.merge(W, A, B, scaling=case.s, layer=kind, peft_compat=True, safe=True))
    assert np.any(default != compat)
    assert np.abs(default - exact).sum() < np.abs(compat - exact).sum()


# --------------------------------------------------------------------------------------------------
# forward: merged == unmerged, both against float64
# --------------------------------------------------------------------------------------------------
@st.composite
def forward_cases(draw):
    case = draw(cases())
    conv = {}
    if case.kind in KERNELS:
        stride = draw(st.integers(1, 2))
        padding = draw(st.sampled_from([0, 1, "same"] if stride == 1 else [0, 1]))
        dilation = draw(st.integers(1, 2))
        conv = dict(stride=stride, padding=padding, dilation=dilation)
    return case, conv, draw(st.integers(1, 3)), draw(st.booleans())


def _inputs(case, conv, n, rng):
    if case.kind == "Embedding":
        return rng.integers(0, case.inn, size=(n, 3))
    if case.kind in KERNELS:
        spatial = [conv["dilation"] * (k - 1) + 1 + int(rng.integers(0, 3)) for k in case.kernel]
        return rng.standard_normal((n, case.inn, *spatial))
    return rng.standard_normal((n, 2, case.inn))


@XP
@given(fc=forward_cases(), dtype=st.sampled_from(["float32", "float64"]))
def test_merged_forward_equals_unmerged(xp, fc, dtype):
    case, conv, n, with_bias = fc
    W, A, B, b = case.arrays(dtype)
    if case.kind == "Embedding" or not with_bias:
        b = None
    rng = np.random.default_rng(case.seed + 1)
    x = _inputs(case, conv, n, rng)
    if case.kind != "Embedding":
        x = x.astype(np_dtype(dtype))
    Wx, Ax, Bx, xx = (to_xp(xp, a) for a in (W, A, B, x))
    bx = None if b is None else to_xp(xp, b)
    layer = Layer.of(case.weight_shape, case.kind)
    y = lora.forward(xx, Wx, Ax, Bx, scaling=case.s, bias=bx, layer=case.kind, **conv)
    merged = lora.merge(Wx, Ax, Bx, scaling=case.s, layer=case.kind)
    ym = layer.base_forward(xx, merged, bx, xp, **conv)
    assert_same_namespace(xp, y, ym)
    assert y.dtype == Wx.dtype
    # float64 reference and magnitude
    Weff = f64(W) + ref_delta(case, A, B)
    Wabs = np.abs(f64(W)) + ref_delta(case, A, B, absolute=True)
    b64 = None if b is None else f64(b)
    want = layer.base_forward(x if case.kind == "Embedding" else f64(x), Weff, b64, np, **conv)
    mag = layer.base_forward(x if case.kind == "Embedding" else np.abs(f64(x)), Wabs,
                             None if b is None else np.abs(b64), np, **conv)
    unit = (case.fan_in + case.r + 4) * eps(dtype) * mag
    assert tuple(y.shape) == want.shape
    assert ratio(np.abs(to_np(y) - want), unit) <= 1
    assert ratio(np.abs(to_np(ym) - want), unit) <= 1


@XP
@given(case=cases(kinds=("Linear", "Conv1D", "Conv2d")), dtype=st.sampled_from(["float32", "float64"]))
def test_dropout_callable_and_lora_bias_in_forward(xp, case, dtype):
    W, A, B, b = case.arrays(dtype)
    rng = np.random.default_rng(case.seed + 2)
    conv = case.kind == "Conv2d"
    x = (rng.standard_normal((2, case.inn, 4, 4)) if conv else rng.standard_normal((3, case.inn))).astype(np_dtype(dtype))
    mask = (rng.random(x.shape) < 0.7) / 0.7  # inverted dropout, drawn by hand
    lb = rng.standard_normal(case.out).astype(np_dtype(dtype))
    Wx, Ax, Bx, xx, bx, lbx = (to_xp(xp, a) for a in (W, A, B, x, b, lb))
    maskx = to_xp(xp, mask.astype(np_dtype(dtype)))
    calls = []

    def dropout(t):
        calls.append(t.shape)
        return t * maskx

    y = lora.forward(xx, Wx, Ax, Bx, scaling=case.s, bias=bx, layer=case.kind, dropout=dropout, lora_bias=lbx)
    assert calls and tuple(calls[0]) == x.shape
    assert_same_namespace(xp, y)
    layer = Layer.of(case.weight_shape, case.kind)
    xd = f64(x) * mask
    base = layer.base_forward(f64(x), f64(W), f64(b), np)
    if conv:
        h = layer.base_forward(xd, ref_delta(case, A, B), None, np)  # conv(d(x), s·BA)
        want = base + h + case.s * f64(lb)[None, :, None, None]
        mag = layer.base_forward(np.abs(f64(x)) * (1 + mask), np.abs(f64(W)) + ref_delta(case, A, B, True),
                                 np.abs(f64(b)) + case.s * np.abs(f64(lb)), np)
    else:
        Wm = f64(W) if case.kind == "Linear" else f64(W).T
        want = base + case.s * ((xd @ f64(A).T) @ f64(B).T + f64(lb))
        mag = np.abs(f64(x)) @ np.abs(Wm).T + np.abs(f64(b)) + case.s * (
            (np.abs(xd) @ np.abs(f64(A)).T) @ np.abs(f64(B)).T + np.abs(f64(lb)))
    assert ratio(np.abs(to_np(y) - want), (case.fan_in + case.r + 4) * eps(dtype) * mag) <= 1


def test_dilated_conv_forward_default_vs_peft_compat():
    case = Case("Conv2d", 3, 2, (3, 3), 2, 1.5, 5)
    W, A, B, b = case.arrays("float64")
    x = np.random.default_rng(0).standard_normal((1, 2, 9, 9))
    layer = Layer.of(W.shape)
    y = lora.forward(x, W, A, B, scaling=case.s, bias=b, dilation=2, padding=2)
    ym = layer.base_forward(x, lora.merge(W, A, B, scaling=case.s), b, np, dilation=2, padding=2)
    np.testing.assert_allclose(y, ym, rtol=1e-12, atol=1e-12)
    # PEFT's lora_A ignores the base dilation (issue #3697): the branch output has another size
    with pytest.raises(ShapeError, match="does not match base output"):
        lora.forward(x, W, A, B, scaling=case.s, bias=b, dilation=2, padding=2, peft_compat=True)


# --------------------------------------------------------------------------------------------------
# scaling, lora_bias merge, module-level behaviour
# --------------------------------------------------------------------------------------------------
def _module(case, W, A, B, **cfg):
    config = LoraConfig(r=case.r, lora_alpha=cfg.pop("lora_alpha", 6.0), **cfg)
    emb = case.kind == "Embedding"
    params = {"lora_embedding_A" if emb else "lora_A.weight": A, "lora_embedding_B" if emb else "lora_B.weight": B}
    return config, params


@pytest.mark.parametrize("kind", ["Linear", "Conv1D", "Embedding", "Conv2d"])
def test_rslora_module_delta(kind):
    case = Case(kind, 5, 7, (3, 1) if kind == "Conv2d" else (), 4, 0.0, 3)
    W, A, B, _ = case.arrays("float64")
    config, params = _module(case, W, A, B, lora_alpha=6.0, use_rslora=True)
    mod = LoraModule("m", config, params, Layer.of(W.shape, kind))
    assert mod.scaling == 6.0 / math.sqrt(4) == 3.0
    case.s = 3.0
    np.testing.assert_allclose(mod.delta_weight(), ref_delta(case, A, B), rtol=1e-13, atol=1e-13)
    plain = LoraModule("m", LoraConfig(r=4, lora_alpha=6.0), params, Layer.of(W.shape, kind))
    assert plain.scaling == 1.5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_bias_merge_unmerge(dtype):
    dt = np_dtype(dtype)
    case = Case("Linear", 6, 5, (), 2, 2.0, 9)
    W, A, B, b = case.arrays(dtype)
    lb = np.random.default_rng(1).standard_normal(6).astype(dt)
    config = LoraConfig(r=2, lora_alpha=4.0, lora_bias=True)
    mod = LoraModule("m", config, {"lora_A.weight": A, "lora_B.weight": B, "lora_B.bias": lb}, Layer.of(W.shape))
    res = mod.merge(W, b)
    want = (b.astype(np.float32) + lb.astype(np.float32) * np.float32(2.0)).astype(dt)
    np.testing.assert_array_equal(res.bias.view(np.uint8), want.view(np.uint8))
    back = mod.unmerge(res.weight, res.bias)
    assert np.all(np.abs(f64(back.bias) - f64(b)) <= 2 * eps(dt) * (np.abs(f64(b)) + 2 * np.abs(f64(lb))))
    np.testing.assert_array_equal(b, case.arrays(dtype)[3])  # input bias untouched
    with pytest.raises(ShapeError, match="no bias"):
        mod.merge(W, None)
    # forward: base + s (x Aᵀ Bᵀ + b_B)
    x = np.random.default_rng(2).standard_normal((3, 5)).astype(np.float32)
    if dtype == "float32":
        y = mod.forward(x, W, b)
        want = f64(x) @ f64(W).T + f64(b) + 2.0 * (f64(x) @ f64(A).T @ f64(B).T + f64(lb))
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_merge_bias_functions():
    b = np.array([1.0, -2.0], dtype=np.float32)
    lb = np.array([0.5, 0.25], dtype=np.float32)
    np.testing.assert_array_equal(lora.merge_bias(b, lb, scaling=4.0), [3.0, -1.0])
    np.testing.assert_array_equal(lora.unmerge_bias(np.array([3.0, -1.0], np.float32), lb, scaling=4.0), b)


# --------------------------------------------------------------------------------------------------
# initialisation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,shape", [("Linear", (12, 20)), ("Conv1D", (20, 12)), ("Conv2d", (6, 4, 3, 3))])
def test_init_true_kaiming_a_zero_b(xp, kind, shape):
    layer = Layer.of(shape, kind)
    res = lora.init_weights(layer, 4, init_lora_weights=True, seed=1, xp=xp)
    assert_same_namespace(xp, res.A, res.B)
    A, B = to_np(res.A), to_np(res.B)
    fan_in = layer.in_features * math.prod(layer.kernel_size)
    assert np.all(np.abs(A) <= 1 / math.sqrt(fan_in)) and np.abs(A).max() > 0.5 / math.sqrt(fan_in)
    assert np.all(B == 0) and res.weight is None
    W = to_xp(xp, np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    merged = lora.merge(W, res.A, res.B, scaling=3.0, layer=kind)
    np.testing.assert_array_equal(to_np(merged), to_np(W))  # B = 0: exactly the base
    # one seed, the same numbers on every backend
    np.testing.assert_array_equal(A, to_np(lora.init_weights(layer, 4, seed=1).A))


def test_init_gaussian_embedding_false():
    layer = Layer.of((64, 256))
    g = lora.init_weights(layer, 4, init_lora_weights="gaussian", seed=0)
    assert abs(float(np.std(g.A)) - 1 / 4) < 0.02 and abs(float(np.mean(g.A))) < 0.02
    assert np.all(g.B == 0)
    emb = Layer.of((50, 8), "Embedding")
    for init in (True, "gaussian"):
        e = lora.init_weights(emb, 4, init_lora_weights=init, seed=0)
        assert e.A.shape == (4, 50) and e.B.shape == (8, 4)
        assert np.all(e.A == 0) and np.std(e.B) > 0.5  # PEFT: A = 0, B ~ N(0, 1)
    f = lora.init_weights(layer, 4, init_lora_weights=False, seed=0)
    assert np.all(f.A != 0) and np.all(f.B != 0)
    assert np.all(np.abs(f.B) <= 1 / 2) and np.abs(lora.delta_weight(f.A, f.B, scaling=1.0)).max() > 0
    fb = lora.init_weights(layer, 4, init_lora_weights=False, seed=0, lora_bias=True)
    assert fb.lora_bias.shape == (64,) and np.all(fb.lora_bias != 0)
    assert lora.init_weights(layer, 4, lora_bias=True).lora_bias.shape == (64,)
    assert np.all(lora.init_weights(layer, 4, lora_bias=True).lora_bias == 0)


def _spectrum_matrix(m, n, seed, decay=0.7):
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, m)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = min(m, n)
    S = 3.0 * decay ** np.arange(k)
    return (U[:, :k] * S) @ V[:, :k].T


@pytest.mark.parametrize("kind,shape", [("Linear", (16, 12)), ("Conv1D", (12, 16)), ("Linear", (10, 24))])
def test_init_pissa(kind, shape):
    layer = Layer.of(shape, kind)
    W = _spectrum_matrix(*shape, seed=3).astype(np.float32)
    s, r = 2.0, 4
    res = lora.init_weights(layer, r, init_lora_weights="pissa", scaling=s, weight=W)
    assert res.A.shape == (r, layer.in_features) and res.B.shape == (layer.out_features, r)
    case = Case(kind, layer.out_features, layer.in_features, (), r, s, 0)
    dW = ref_delta(case, res.A, res.B)
    # W_new + s·BA == W
    assert ratio(np.abs(f64(res.weight) + dW - f64(W)), 8 * 2.0**-23 * (np.abs(f64(W)) + np.abs(dW)) + 1e-6) <= 1
    # the adapter holds the top-r singular triplets of W
    sv_w = np.linalg.svd(f64(layer.as_matrix(W, np)), compute_uv=False)
    sv_d = np.linalg.svd(f64(layer.as_matrix(dW, np)), compute_uv=False)
    np.testing.assert_allclose(sv_d[:r], sv_w[:r], rtol=1e-5)
    sv_rest = np.linalg.svd(f64(layer.as_matrix(res.weight, np)), compute_uv=False)
    np.testing.assert_allclose(sv_rest[: min(shape) - r], sv_w[r:], rtol=1e-4, atol=1e-5)
    # A and B are balanced: B = V √(S/s), A = √(S/s) Uh
    np.testing.assert_allclose(np.linalg.norm(res.B, axis=0), np.linalg.norm(res.A, axis=1), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(res.B, axis=0) ** 2 * s, sv_w[:r], rtol=1e-5)


def test_init_pissa_niter_approximates_top_r():
    layer = Layer.of((40, 30))
    W = _spectrum_matrix(40, 30, seed=4, decay=0.5).astype(np.float32)
    res = lora.init_weights(layer, 3, init_lora_weights="pissa_niter_4", scaling=1.0, weight=W, seed=0)
    sv_w = np.linalg.svd(f64(W), compute_uv=False)
    sv_d = np.linalg.svd(f64(res.B) @ f64(res.A), compute_uv=False)
    np.testing.assert_allclose(sv_d[:3], sv_w[:3], rtol=1e-3)
    np.testing.assert_allclose(f64(res.weight) + f64(res.B) @ f64(res.A), f64(W), atol=1e-5)


def test_init_olora():
    layer = Layer.of((16, 12))
    W = np.random.default_rng(5).standard_normal((16, 12)).astype(np.float32)
    res = lora.init_weights(layer, 4, init_lora_weights="olora", scaling=0.5, weight=W)
    np.testing.assert_allclose(f64(res.weight) + 0.5 * f64(res.B) @ f64(res.A), f64(W), atol=2e-6)
    np.testing.assert_allclose(f64(res.B).T @ f64(res.B), np.eye(4), atol=1e-6)  # Q's columns
    assert np.allclose(np.tril(f64(res.A)[:, :4], -1), 0)  # R is upper triangular
    with pytest.raises(ConfigError, match="olora"):
        lora.init_weights(Layer.of((12, 16), "Conv1D"), 4, init_lora_weights="olora", weight=W.T.copy())


def test_init_orthogonal():
    layer = Layer.of((16, 12))
    res = lora.init_weights(layer, 6, init_lora_weights="orthogonal", seed=2)
    A, B = f64(res.A), f64(res.B)
    assert np.abs(A).max() > 0 and np.abs(B).max() > 0
    assert np.all(np.abs(B @ A) <= 6 * 2.0**-23 * (np.abs(B) @ np.abs(A)) + 1e-12)
    with pytest.raises(ConfigError, match="even rank"):
        lora.init_weights(layer, 5, init_lora_weights="orthogonal")


def test_init_errors():
    layer = Layer.of((8, 6))
    with pytest.raises(ConfigError, match="'kaiming'"):
        lora.init_weights(layer, 2, init_lora_weights="kaiming")
    with pytest.raises(ConfigError, match="positive integer"):
        lora.init_weights(layer, 0)
    with pytest.raises(ConfigError, match="base weight"):
        lora.init_weights(layer, 2, init_lora_weights="pissa")
    with pytest.raises(ConfigError, match="exceeds"):
        lora.init_weights(layer, 7, init_lora_weights="pissa", weight=np.ones((8, 6), np.float32))
    with pytest.raises(UnsupportedError, match="eva"):
        lora.init_weights(layer, 2, init_lora_weights="eva")


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_shape_mismatch_names_shapes():
    W = np.zeros((4, 5))
    with pytest.raises(ShapeError, match=r"lora_A has shape \(2, 6\), expected \(2, 5\)"):
        lora.merge(W, np.zeros((2, 6)), np.zeros((4, 2)), scaling=1.0)
    with pytest.raises(ShapeError, match=r"lora_B has shape \(3, 2\), expected \(4, 2\)"):
        lora.merge(W, np.zeros((2, 5)), np.zeros((3, 2)), scaling=1.0)
    with pytest.raises(ShapeError, match=r"\(2, 4\), expected \(2, 5\)"):
        lora.merge(W, np.zeros((2, 4)), np.zeros((5, 2)), scaling=1.0, layer="Linear")
    with pytest.raises(ShapeError, match=r"lora_B"):
        lora.forward(np.zeros((1, 5)), W, np.zeros((2, 5)), np.zeros((4, 3)), scaling=1.0)
    with pytest.raises(ShapeError):
        lora.merge(np.zeros((4, 5, 3)), np.zeros((2, 5, 3)), np.zeros((4, 2, 2)), scaling=1.0)


def test_rank_and_init_config_errors():
    with pytest.raises(ConfigError, match="'r'"):
        LoraConfig(r=0).validate()
    with pytest.raises(ConfigError, match="positive integer"):
        lora.scaling(8, 0)
    with pytest.raises(ConfigError, match="positive integer"):
        lora.parameter_shapes(Layer.of((4, 4)), 0)
    with pytest.raises(ConfigError, match="init_lora_weights"):
        LoraConfig(init_lora_weights="bogus").validate()


def test_grouped_conv_merge_is_unsupported():
    layer = Layer.of((4, 2, 3, 3), groups=2)
    A, B, W = np.ones((2, 4, 3, 3)), np.ones((4, 1, 1, 1)), np.zeros((4, 2, 3, 3))
    with pytest.raises(UnsupportedError, match="groups=2"):
        lora.merge(W, A, B, scaling=1.0, layer=layer)
    with pytest.raises(UnsupportedError, match="groups"):
        lora.delta_weight(A, B, scaling=1.0, layer=layer)
    assert np.all(W == 0)
    # the unmerged forward works: the LoRA branch's second conv is grouped
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 5))
    y = lora.forward(x, W, A, B, scaling=0.5, layer=layer)
    h = layer.base_forward(x, np.zeros((4, 2, 3, 3)), None, np)
    assert y.shape == h.shape and np.abs(y).max() > 0


def test_copy_false_read_only_refused_and_untouched():
    W, A, B, _ = Case("Linear", 4, 3, (), 2, 1.0, 0).arrays("float32")
    W.flags.writeable = False
    before = W.copy()
    with pytest.raises(UnsupportedError, match="writeable"):
        lora.merge(W, A, B, scaling=1.0, copy=False)
    np.testing.assert_array_equal(W, before)
    assert lora.merge(W, A, B, scaling=1.0).flags.writeable  # copy=True works on a read-only input


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_safe_merge_refuses_non_finite(copy, dtype):
    W, A, B, _ = Case("Linear", 4, 3, (), 2, 1.0, 0).arrays(dtype)
    B[1, 0] = np.inf
    before = W.copy()
    with pytest.raises(NonFiniteError, match="unchanged"):
        lora.merge(W, A, B, scaling=1.0, safe=True, copy=copy)
    np.testing.assert_array_equal(W, before)
    # overflow of the half dtype is caught too
    W2, A2, B2, _ = Case("Linear", 4, 3, (), 2, 1.0, 0).arrays(dtype)
    B2 *= np.asarray(1e30 if dtype == "float32" else 6e4, dtype=B2.dtype)
    with pytest.raises(NonFiniteError):
        lora.merge(W2, A2 * np.asarray(1e10 if dtype == "float32" else 100, A2.dtype), B2, scaling=1.0, safe=True,
                   copy=copy)
    # unsafe merge lets the inf through
    assert not np.all(np.isfinite(lora.merge(W, A, B, scaling=1.0)))


def test_mixed_namespaces_refused():
    torch = pytest.importorskip("torch")
    W, A, B, _ = Case("Linear", 4, 3, (), 2, 1.0, 0).arrays("float32")
    with pytest.raises(NamespaceError, match="lora.merge"):
        lora.merge(W, torch.from_numpy(A), B, scaling=1.0)
    with pytest.raises(NamespaceError):
        lora.forward(torch.zeros(1, 3), W, A, B, scaling=1.0)
    with pytest.raises(NamespaceError):
        lora.delta_weight(A, torch.from_numpy(B), scaling=1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_non_default_device_stays_put(kind):
    """array-api-strict's second device: every output stays there (no hidden host round trip)."""
    xs = pytest.importorskip("array_api_strict")
    import array_api_compat

    from peftmath.methods import dora

    dev = xs.Device("device1")
    case = Case(kind, 4, 3, KERNELS[kind][1] if kind in KERNELS else (), 2, 1.5, 3)
    W, A, B, b = case.arrays("float32")
    Wd, Ad, Bd = (xs.asarray(a, device=dev) for a in (W, A, B))
    layer = Layer.of(case.weight_shape, kind)
    if kind == "Embedding":
        x = xs.asarray(np.array([[0, 2, 1]]), device=dev)
    elif kind in KERNELS:
        x = xs.asarray(np.ones((1, 3, *(k + 1 for k in case.kernel)), np.float32), device=dev)
    else:
        x = xs.asarray(np.ones((2, 3), np.float32), device=dev)
    outs = [lora.delta_weight(Ad, Bd, scaling=case.s, layer=kind),
            lora.merge(Wd, Ad, Bd, scaling=case.s, layer=kind),
            lora.unmerge(Wd, Ad, Bd, scaling=case.s, layer=kind),
            lora.forward(x, Wd, Ad, Bd, scaling=case.s, layer=kind)]
    target = xs.asarray(W.copy(), device=dev)
    assert lora.merge(target, Ad, Bd, scaling=case.s, layer=kind, copy=False) is target
    m = dora.init_magnitude(Wd, Ad, Bd, scaling=case.s, layer=kind)
    res = dora.merge(Wd, Ad, Bd, m * 1.5, scaling=case.s, layer=kind)
    outs += [target, m, res.weight, res.record, dora.forward(x, Wd, Ad, Bd, m, scaling=case.s, layer=kind)]
    init = lora.init_weights(layer, 2, xp=xs, device=dev, seed=0)
    outs += [init.A, init.B]
    for o in outs:
        assert array_api_compat.device(o) == dev
    np.testing.assert_allclose(np.asarray(xs.asarray(outs[1], device=xs.Device("CPU_DEVICE"))),
                               W + ref_delta(case, A, B), rtol=1e-5, atol=1e-5)
