"""(IA)³ (peftmath.methods.ia3): every layer kind, every backend, against float64 references.

Tolerances are componentwise, with ``u`` the storage dtype's epsilon:

* merge:            ``|W' − W·l| ≤ u·|W·l|``                (one product, rounded once)
* merge → unmerge:  ``|W'' − W| ≤ 3·u·|W|``                 (two roundings in the storage dtype)
* forward:          ``|y − y₆₄| ≤ (K + 4)·u·(|x|·|l|·|W| + |l|·|b|)``, K = fan-in (a dot product)

Scales are drawn away from zero (|l| in [0.25, 4], random sign) so that division is well conditioned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import XP, assert_same_namespace, floor, np_dtype, to_np, to_xp, traced_peak
from peftmath import Adapter
from peftmath._array import eps, is_writeable
from peftmath.errors import ConfigError, NonFiniteError, NotInvertibleError, ShapeError, UnsupportedError
from peftmath.layers import Layer, LayerKind
from peftmath.methods import ia3
from peftmath.methods.ia3 import IA3Config, IA3Module

KINDS = ("Linear", "Conv1D", "Conv2d", "Conv3d", "Conv2d_grouped")
DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass
class Case:
    kind: str
    out: int
    inn: int
    groups: int
    ff: bool
    seed: int

    @property
    def layer(self) -> Layer:
        if self.kind == "Conv1D":
            return Layer.of((self.inn, self.out), "Conv1D")
        if self.kind == "Linear":
            return Layer.of((self.out, self.inn))
        k = (3, 2) if self.kind.startswith("Conv2d") else (2, 1, 2)
        return Layer.of((self.out, self.inn // self.groups, *k), groups=self.groups)

    def arrays(self, dtype="float64", bias=True):
        rng = np.random.default_rng(self.seed)
        layer = self.layer
        W = rng.standard_normal(layer.weight_shape)
        shape = ia3.parameter_shape(layer, feedforward=self.ff)
        l = rng.uniform(0.25, 4.0, shape) * rng.choice([-1.0, 1.0], shape)
        b = rng.standard_normal(layer.out_features) if bias else None
        dt = np_dtype(dtype)
        return W.astype(dt), l.astype(np.float32 if dtype != "float64" else np.float64), \
            (None if b is None else b.astype(dt))

    def x(self, dtype="float64", batch=2):
        rng = np.random.default_rng(self.seed + 1)
        layer = self.layer
        shape = (batch, layer.in_features, 5, 4) if self.kind.startswith("Conv2d") else \
            (batch, layer.in_features, 3, 2, 3) if self.kind == "Conv3d" else (batch, 3, layer.in_features)
        return rng.standard_normal(shape).astype(np_dtype(dtype))


@st.composite
def cases(draw, kinds=KINDS):
    kind = draw(st.sampled_from(kinds))
    groups = draw(st.sampled_from([2, 3])) if kind == "Conv2d_grouped" else 1
    out = draw(st.integers(1, 6)) * groups
    inn = draw(st.integers(1, 6)) * groups
    return Case(kind, out, inn, groups, draw(st.booleans()), draw(st.integers(0, 2**32 - 1)))


def ref_scale(case: Case, l: np.ndarray) -> np.ndarray:
    """The multiplier of every weight entry in float64, built independently of ia3.weight_scale."""
    layer = case.layer
    lf = np.asarray(l, np.float64).reshape(-1)
    full = np.ones(layer.weight_shape)
    if case.kind == "Conv1D":  # stored (in, out)
        return full * (lf[:, None] if case.ff else lf[None, :])
    if case.kind == "Linear":
        return full * (lf[None, :] if case.ff else lf[:, None])
    extra = (1,) * len(layer.kernel_size)
    if not case.ff:
        return full * lf.reshape((-1, 1) + extra)
    cin_g, cout_g = layer.in_features // layer.groups, layer.out_features // layer.groups
    for o in range(layer.out_features):
        g = o // cout_g
        full[o] *= lf[g * cin_g:(g + 1) * cin_g].reshape((cin_g,) + extra)
    return full


def ref_forward(case: Case, x, W, l, b):
    """float64 forward built from scratch (einsum / explicit conv through the merged weight)."""
    x, W, l = (np.asarray(a, np.float64) for a in (x, W, l))
    b = None if b is None else np.asarray(b, np.float64)
    layer = case.layer
    lf = l.reshape(-1)
    if case.kind in ("Linear", "Conv1D"):
        Wm = W if case.kind == "Linear" else W.T
        y = (x * lf if case.ff else x) @ Wm.T + (0 if b is None else b)
        return y if case.ff else y * lf
    # conv: merged weight route is exact in real arithmetic; compute with torch-free direct loops
    from peftmath._array import conv
    import array_api_compat.numpy as xp

    Wm = W * ref_scale(case, l) if case.ff else W
    y = conv(x, Wm, b, groups=layer.groups, xp=xp)
    return y if case.ff else y * lf.reshape((1, -1) + (1,) * len(layer.kernel_size))


def module(case: Case, l, config=None) -> IA3Module:
    config = config or IA3Config(target_modules=["m"], feedforward_modules=["m"] if case.ff else None)
    return IA3Module("m", config, {"ia3_l": l}, case.layer)


# --------------------------------------------------------------------------------------------------
# feedforward matching and shapes
# --------------------------------------------------------------------------------------------------
def test_is_feedforward_rules():
    # list: a raw suffix, no dot boundary (PEFT quirk)
    assert ia3.is_feedforward("model.mlp.down_proj", ["down_proj"])
    assert ia3.is_feedforward("model.mlp.down_proj", ["proj"])
    assert ia3.is_feedforward("model.mlp.xdown_proj", ["down_proj"])
    assert not ia3.is_feedforward("model.mlp.down_proj.x", ["down_proj"])
    # str: the whole name must match
    assert ia3.is_feedforward("model.mlp.down_proj", r".*down_proj")
    assert not ia3.is_feedforward("model.mlp.down_proj", r"down_proj")
    assert not ia3.is_feedforward("anything", None)
    assert not ia3.is_feedforward("anything", [])


def test_parameter_shapes():
    assert ia3.parameter_shape(Layer.of((6, 4)), feedforward=False) == (6, 1)
    assert ia3.parameter_shape(Layer.of((6, 4)), feedforward=True) == (1, 4)
    conv1d_t = Layer.of((4, 6), "Conv1D")  # stored (in, out)
    assert ia3.parameter_shape(conv1d_t, feedforward=False) == (6, 1)
    assert ia3.parameter_shape(conv1d_t, feedforward=True) == (1, 4)
    assert ia3.parameter_shape(Layer.of((8, 3, 3, 3)), feedforward=False) == (1, 8, 1, 1)
    assert ia3.parameter_shape(Layer.of((8, 3, 3, 3, 3)), feedforward=True) == (1, 3, 1, 1, 1)
    assert ia3.parameter_shape(Layer.of((8, 2, 3, 3), groups=2), feedforward=True) == (1, 4, 1, 1)
    for bad in (Layer.of((5, 4), "Embedding"), Layer.of((8, 3, 3))):
        with pytest.raises(ShapeError, match="not defined"):
            ia3.parameter_shape(bad, feedforward=False)


# --------------------------------------------------------------------------------------------------
# properties (NumPy, every dtype)
# --------------------------------------------------------------------------------------------------
@given(case=cases(), dtype=st.sampled_from(DTYPES), copy=st.booleans())
def test_merge_unmerge_round_trip(case, dtype, copy):
    W, l, b = case.arrays(dtype)
    W0, b0 = W.copy(), b.copy()
    mod = module(case, l)
    u = eps(dtype)
    # subnormal results are rounded to an absolute grid: its spacing bounds their error
    tiny = floor(W.dtype)
    W1, b1, _ = mod.merge(W, b, copy=copy)
    assert W1.dtype == W0.dtype and (W1 is W) == (not copy)
    want = W0.astype(np.float64) * ref_scale(case, l)
    assert np.all(np.abs(W1.astype(np.float64) - want) <= u * np.abs(want) + tiny)
    if case.ff:
        assert b1 is b  # the bias of a feedforward layer is not scaled
    else:  # copy=False writes the scaled bias into b too (the in-place contract covers every array it changes)
        assert (b1 is b) == (not copy)
        wb = b0.astype(np.float64) * l.astype(np.float64).reshape(-1)
        assert np.all(np.abs(b1.astype(np.float64) - wb) <= u * np.abs(wb) + tiny)
    W2, b2, _ = mod.unmerge(W1, b1, copy=copy)
    assert np.all(np.abs(W2.astype(np.float64) - W0.astype(np.float64)) <= 3 * u * np.abs(W0.astype(np.float64))
                  + 3 * tiny * np.max(np.abs(1 / ref_scale(case, l))))
    assert np.all(np.abs(b2.astype(np.float64) - b0.astype(np.float64)) <= 3 * u * np.abs(b0.astype(np.float64))
                  + 3 * tiny * float(np.max(np.abs(1 / l.astype(np.float64)))))


@given(case=cases(), dtype=st.sampled_from(["float32", "float64"]))
def test_merged_forward_equals_unmerged_forward(case, dtype):
    W, l, b = case.arrays(dtype)
    x = case.x(dtype)
    mod = module(case, l)
    y = mod.forward(x, W, b)
    ref = ref_forward(case, x, W, l, b)
    mag = np.abs(ref_forward(case, np.abs(x), np.abs(W), np.abs(l), np.abs(b)))
    fan_in = math.prod(case.layer.matrix_shape[1:])
    tol = (fan_in + 4) * eps(dtype) * mag
    assert y.dtype == W.dtype and y.shape == ref.shape
    assert np.all(np.abs(y - ref) <= tol)
    Wm, bm, _ = mod.merge(W, b)
    ym = case.layer.base_forward(x, Wm, bm, __import__("array_api_compat.numpy").numpy)
    assert np.all(np.abs(ym - ref) <= tol)
    assert np.all(np.abs(ym - y) <= 2 * tol)


@given(case=cases(kinds=("Linear", "Conv1D", "Conv2d")), dtype=st.sampled_from(["float16", "bfloat16"]))
def test_forward_half(case, dtype):
    W, l, b = case.arrays(dtype)
    x = case.x(dtype)
    mod = module(case, l)
    y = mod.forward(x, W, b)
    yc = mod.forward(x, W, b, peft_compat=True)
    assert y.dtype == np_dtype(dtype) and yc.dtype == np_dtype(dtype)
    ref = ref_forward(case, x, W, l, b)
    mag = np.abs(ref_forward(case, np.abs(x), np.abs(W), np.abs(l), np.abs(b)))
    fan_in = math.prod(case.layer.matrix_shape[1:])
    # default: float32 all the way, one rounding
    assert np.all(np.abs(y.astype(np.float64) - ref) <= eps(dtype) * np.abs(ref) + (fan_in + 4) * 2.0**-23 * mag)
    # PEFT's order: a second rounding of the scaled input / of the base output
    assert np.all(np.abs(yc.astype(np.float64) - ref) <= 3 * eps(dtype) * mag + (fan_in + 4) * 2.0**-23 * mag)


def test_unmerge_peft_compat_epsilon():
    """PEFT divides by l + 1e-8: invisible in float32 for |l| >= 0.25, visible for small l or float64."""
    case = Case("Linear", 3, 4, 1, False, 0)
    W, _, b = case.arrays("float64")
    l = np.array([[1e-6], [0.5], [-2.0]])
    Wm, bm = ia3.merge(W, l, bias=b)
    Wd, bd = ia3.unmerge(Wm, l, bias=bm)
    Wc, bc = ia3.unmerge(Wm, l, bias=bm, peft_compat=True)
    np.testing.assert_allclose(Wd, W, rtol=4e-16)
    np.testing.assert_allclose(Wc[0], W[0] * 1e-6 / (1e-6 + 1e-8), rtol=1e-15)  # off by 1 %
    assert abs(Wc[0, 0] / W[0, 0] - 1) > 5e-3
    np.testing.assert_allclose(bc[1:], bm[1:] / (l[1:, 0] + 1e-8), rtol=1e-15)


def test_copy_false_no_temporary_of_weight_size():
    W = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
    for ff, shape in ((False, (512, 1)), (True, (1, 512))):
        l = np.random.default_rng(1).uniform(0.5, 2.0, shape).astype(np.float32)

        def merge_unmerge():
            out, _ = ia3.merge(W, l, feedforward=ff, copy=False)
            ia3.unmerge(W, l, feedforward=ff, copy=False)
            return out

        out, peak = traced_peak(merge_unmerge)
        assert out is W
        assert peak < W.nbytes // 8, peak


def test_copy_false_half_precision_tiles():
    case = Case("Linear", 64, 48, 1, False, 3)
    W, l, _ = case.arrays("bfloat16")
    want, _ = ia3.merge(W, l)
    out, _ = ia3.merge(W, l, copy=False)
    assert out is W and np.array_equal(W.view(np.int16), want.view(np.int16))


def test_grouped_feedforward_merge_matches_forward():
    case = Case("Conv2d_grouped", 6, 9, 3, True, 7)
    W, l, b = case.arrays("float64")
    Wm, bm = ia3.merge(W, l, bias=b, layer=case.layer)
    assert bm is b
    np.testing.assert_allclose(Wm, W * ref_scale(case, l), rtol=1e-15)
    x = case.x()
    import array_api_compat.numpy as xp

    np.testing.assert_allclose(case.layer.base_forward(x, Wm, bm, xp), ia3.forward(x, W, l, bias=b, layer=case.layer),
                               rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------------
@XP
@given(case=cases(), data=st.data())
def test_cross_backend(xp, case, data):
    dtypes = ["float32", "float64"] + (["bfloat16", "float16"] if "torch" in xp.__name__ else [])
    dtype = data.draw(st.sampled_from(dtypes))
    W, l, b = case.arrays(dtype)
    x = case.x(dtype)
    mod_np = module(case, l)
    Wx, lx, bx, xx = to_xp(xp, W), to_xp(xp, l), to_xp(xp, b), to_xp(xp, x)
    mod = module(case, lx)
    W1, b1, _ = mod.merge(Wx, bx)
    W2, b2, _ = mod.unmerge(W1, b1)
    y = mod.forward(xx, Wx, bx)
    assert_same_namespace(xp, W1, b1, W2, b2, y)
    W1n, b1n, _ = mod_np.merge(W, b)
    # elementwise products with one rounding: the same bits on every backend
    np.testing.assert_array_equal(to_np(W1), W1n.astype(np.float64))
    np.testing.assert_array_equal(to_np(b1), np.asarray(b1n, np.float64))
    u = eps(dtype)
    # relative to |W| where W' = W·l and W'/l are normal numbers; below, the format's subnormal step (float16
    # 2⁻²⁴, bfloat16 2⁻¹³³) is the absolute round-off of each of the two roundings
    tiny = float(np.finfo(np_dtype(dtype)).smallest_subnormal)
    assert np.all(np.abs(to_np(W2) - W.astype(np.float64)) <= 3 * u * np.abs(W.astype(np.float64)) + 2 * tiny)
    yn = mod_np.forward(x, W, b)
    mag = np.abs(ref_forward(case, np.abs(x), np.abs(W), np.abs(l), np.abs(b)))
    fan_in = math.prod(case.layer.matrix_shape[1:])
    assert np.all(np.abs(to_np(y) - yn.astype(np.float64)) <= 2 * u * np.abs(yn.astype(np.float64))
                  + (fan_in + 4) * 2.0**-23 * mag)


def test_copy_false_in_place_every_backend(xp):
    case = Case("Conv2d_grouped", 6, 4, 2, True, 1)
    W, l, _ = case.arrays("float32")
    Wx = to_xp(xp, W.copy())
    if not is_writeable(Wx):  # JAX: immutable arrays
        with pytest.raises(UnsupportedError):
            ia3.merge(Wx, to_xp(xp, l), layer=case.layer, copy=False)
        return
    out, _ = ia3.merge(Wx, to_xp(xp, l), layer=case.layer, copy=False)
    assert out is Wx
    np.testing.assert_allclose(to_np(Wx), W.astype(np.float64) * ref_scale(case, l), rtol=2**-23)


# --------------------------------------------------------------------------------------------------
# bad inputs: a clear error, nothing modified
# --------------------------------------------------------------------------------------------------
def test_zero_and_nonfinite_scale_refused_nothing_changed():
    case = Case("Linear", 4, 3, 1, False, 0)
    W, l, b = case.arrays("float32")
    for bad, idx in ((0.0, 2), (np.nan, 1), (np.inf, 3)):
        lb = l.copy()
        lb[idx, 0] = bad
        W0 = W.copy()
        mod = module(case, lb)
        with pytest.raises(NotInvertibleError, match=rf"m: ia3_l\[{idx}\] = {bad!r}"):
            mod.unmerge(W, b, copy=False)
        assert np.array_equal(W, W0)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
def test_safe_merge_refuses_nonfinite():
    case = Case("Linear", 4, 3, 1, False, 0)
    W, l, b = case.arrays("float16")
    W0 = W.copy()
    big = np.full_like(l, 1e6)
    with pytest.raises(NonFiniteError, match="m: the merged"):
        module(case, big).merge(W, b, copy=False, safe=True)
    assert np.array_equal(W, W0)


def test_shape_errors():
    case = Case("Linear", 4, 3, 1, False, 0)
    W, l, b = case.arrays("float32")
    with pytest.raises(ShapeError, match=r"m: ia3_l has shape \(4, 2\)|fits neither"):
        module(case, np.ones((4, 2), np.float32))
    with pytest.raises(ShapeError, match="expected"):
        module(case, l).merge(np.ones((3, 4), np.float32))
    with pytest.raises(ShapeError, match="bias"):
        module(case, l).merge(W, np.ones(3, np.float32))
    with pytest.raises(ShapeError, match="not defined for a Embedding"):
        IA3Module("m", IA3Config(), {"ia3_l": l}, Layer.of((4, 3), "Embedding"))
    with pytest.raises(UnsupportedError, match="writeable"):
        module(case, l).merge(np.broadcast_to(W, W.shape), b, copy=False)


def test_feedforward_config_disagrees_with_shape():
    case = Case("Linear", 4, 3, 1, True, 0)
    _, l, _ = case.arrays("float32")  # (1, 3): an input scaling
    cfg = IA3Config(target_modules=["m"], feedforward_modules=["other"])
    with pytest.raises(ShapeError, match=r"m: ia3_l of shape \(1, 3\) is an input \(feedforward\).*is not matched"):
        IA3Module("m", cfg, {"ia3_l": l}, case.layer)
    cfg = IA3Config(target_modules=["m"], feedforward_modules=r"m")
    with pytest.raises(ShapeError, match=r"output \(non-feedforward\).*is matched"):
        IA3Module("m", cfg, {"ia3_l": np.ones((4, 1), np.float32)}, case.layer)
    # square layer + conv vector: ambiguous shape, the config decides
    sq = Layer.of((3, 3, 1, 1))
    mod = IA3Module("m", IA3Config(feedforward_modules=["m"]), {"ia3_l": np.ones((1, 3, 1, 1))}, sq)
    assert mod.feedforward


def test_config_validation_and_json():
    with pytest.raises(ConfigError, match="subset of target_modules"):
        IA3Config.from_dict({"peft_type": "IA3", "target_modules": ["q"], "feedforward_modules": ["fc"]})
    with pytest.raises(ConfigError, match="init_ia3_weights"):
        IA3Config.from_dict({"peft_type": "IA3", "init_ia3_weights": "yes"})
    with pytest.raises(ConfigError, match="feedforward_modules"):
        IA3Config.from_dict({"peft_type": "IA3", "feedforward_modules": 3})
    cfg = IA3Config.from_dict({"peft_type": "IA3", "target_modules": ["q", "fc"], "feedforward_modules": ["fc"],
                               "peft_version": "0.21.2"})
    d = cfg.to_dict()
    assert "layers_to_transform" not in d and "layers_pattern" not in d and d["peft_type"] == "IA3"
    assert IA3Config.from_dict(d) == cfg
    assert cfg.is_feedforward("blocks.0.fc") and not cfg.is_feedforward("blocks.0.q")


def test_initialize_and_infer_layer():
    cfg = IA3Config(target_modules=["q", "fc", "conv"], feedforward_modules=["fc", "conv"])
    p, w = IA3Module.initialize("blocks.q", cfg, Layer.of((6, 4)))
    assert w is None and p["ia3_l"].shape == (6, 1) and np.all(p["ia3_l"] == 1) and p["ia3_l"].dtype == np.float32
    p1, _ = IA3Module.initialize("blocks.fc", cfg, Layer.of((6, 4)), init=False, seed=3)
    p2, _ = IA3Module.initialize("blocks.fc", cfg, Layer.of((6, 4)), init=False, seed=3)
    assert p1["ia3_l"].shape == (1, 4) and np.array_equal(p1["ia3_l"], p2["ia3_l"]) and np.std(p1["ia3_l"]) > 0
    # Linear vs transformers Conv1D from ia3_l's shape
    lin = IA3Module.infer_layer("q", cfg, {"ia3_l": np.ones((6, 1))}, (6, 4))
    c1d = IA3Module.infer_layer("q", cfg, {"ia3_l": np.ones((6, 1))}, (4, 6))
    assert lin.kind is LayerKind.LINEAR and c1d.kind is LayerKind.CONV1D_TRANSPOSED
    sq = IA3Module.infer_layer("q", IA3Config(fan_in_fan_out=True), {"ia3_l": np.ones((6, 1))}, (6, 6))
    assert sq.kind is LayerKind.CONV1D_TRANSPOSED
    g = IA3Module.infer_layer("conv", cfg, {"ia3_l": np.ones((1, 6, 1, 1))}, (9, 2, 3, 3))
    assert g.groups == 3
    with pytest.raises(ShapeError, match="weight shape"):
        IA3Module.infer_layer("q", cfg, {"ia3_l": np.ones((6, 1))})


def test_adapter_round_trip(xp):
    """Through Adapter: merge then unmerge restores the state dict (float64)."""
    cfg = IA3Config(target_modules=["a", "b"], feedforward_modules=["b"], init_ia3_weights=False)
    rng = np.random.default_rng(0)
    state = {"a.weight": rng.standard_normal((5, 3)), "a.bias": rng.standard_normal(5),
             "b.weight": rng.standard_normal((3, 5)), "b.bias": rng.standard_normal(3)}
    params = {"a": {"ia3_l": rng.uniform(0.5, 2, (5, 1))}, "b": {"ia3_l": rng.uniform(0.5, 2, (1, 5))}}
    ad = Adapter(cfg, {m: {k: to_xp(xp, v) for k, v in p.items()} for m, p in params.items()})
    sx = {k: to_xp(xp, v) for k, v in state.items()}
    merged = ad.merge(sx)
    back = ad.unmerge(merged)
    for k, v in state.items():
        np.testing.assert_allclose(to_np(back[k]), v, rtol=4e-16)
    assert np.array_equal(to_np(merged["b.bias"]), state["b.bias"])  # feedforward: bias untouched
