"""VeRA (peftmath.methods.vera): Linear and Conv1D, every backend, against float64 references.

With ``u`` the storage dtype's epsilon, ``u₃₂`` float32's, and ``|ΔW|ₐ = |λ_b| |B_l| |λ_d| |A_l|`` (the
magnitude the float32 product is accurate to):

* merge:            ``|W' − (W + ΔW)| ≤ u·|W + ΔW| + (r + 2)·u_c·|ΔW|ₐ``   (u_c: the compute dtype's)
* merge → unmerge:  ``|W'' − W| ≤ 4·u·(|W| + |ΔW|ₐ) + (r + 2)·u_c·|ΔW|ₐ``
* forward:          ``|y − y₆₄| ≤ (K + r + 4)·u·(|x|·(|W| + |ΔW|ₐ) + |b|)``, K = fan-in

The float64 reference builds ``ΔW = diag(λ_b) B_l diag(λ_d) A_l`` with explicit diagonal matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import BF16, XP, assert_same_namespace, np_dtype, to_np, to_xp, traced_peak
import peftmath
from peftmath import Adapter
from peftmath._array import eps, is_writeable
from peftmath.errors import CheckpointError, ConfigError, ShapeError, UnsupportedError
from peftmath.layers import Layer, LayerKind
from peftmath.methods import vera
from peftmath.methods.vera import VeraConfig, VeraModule

DTYPES = ("float32", "float64", "float16", "bfloat16")
U32 = 2.0**-23


@dataclass
class Case:
    kind: str
    out: int
    inn: int
    r: int
    max_out: int
    max_in: int
    seed: int

    @property
    def layer(self) -> Layer:
        return Layer.of((self.inn, self.out), "Conv1D") if self.kind == "Conv1D" else Layer.of((self.out, self.inn))

    def arrays(self, dtype="float64", adapter_dtype=None):
        rng = np.random.default_rng(self.seed)
        W = rng.standard_normal(self.layer.weight_shape).astype(np_dtype(dtype))
        b = rng.standard_normal(self.out).astype(np_dtype(dtype))
        A, B = vera.init_projections(self.r, self.max_in, self.max_out, seed=self.seed + 1)
        lb, ld = rng.standard_normal(self.out), rng.standard_normal(self.r)
        adt = np_dtype(adapter_dtype or ("float64" if dtype == "float64" else "float32"))
        return W, b, lb.astype(adt), ld.astype(adt), A.astype(adt), B.astype(adt)

    def config(self):
        return VeraConfig(r=self.r, target_modules=["m"])

    def module(self, lb, ld, A, B):
        return VeraModule("m", self.config(), {"vera_lambda_b": lb, "vera_lambda_d": ld}, self.layer,
                          shared={vera.VERA_A_KEY: A, vera.VERA_B_KEY: B})


@st.composite
def cases(draw):
    out, inn = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    return Case(draw(st.sampled_from(["Linear", "Conv1D"])), out, inn, draw(st.integers(1, 6)),
                out + draw(st.integers(0, 4)), inn + draw(st.integers(0, 4)), draw(st.integers(0, 2**32 - 1)))


def ref_delta(case: Case, lb, ld, A, B):
    """float64 ``(diag(λ_b) B_l diag(λ_d) A_l)`` in the stored layout, and its magnitude."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    A_l, B_l = f(A)[:, :case.inn], f(B)[:case.out, :]
    d = np.diag(f(lb)) @ B_l @ np.diag(f(ld)) @ A_l
    mag = np.diag(np.abs(f(lb))) @ np.abs(B_l) @ np.diag(np.abs(f(ld))) @ np.abs(A_l)
    return (d.T, mag.T) if case.kind == "Conv1D" else (d, mag)


# --------------------------------------------------------------------------------------------------
# initialisation
# --------------------------------------------------------------------------------------------------
def test_init_projections_distribution_and_order():
    A, B = vera.init_projections(64, 300, 200, seed=5)
    assert A.shape == (64, 300) and B.shape == (200, 64) and A.dtype == np.float32
    ba, bb = np.sqrt(6 / 300), np.sqrt(6 / 64)
    assert np.abs(A).max() <= ba and np.abs(B).max() <= bb
    assert abs(A.std() - ba / np.sqrt(3)) < 0.02 * ba and abs(B.std() - bb / np.sqrt(3)) < 0.02 * bb
    rng = np.random.default_rng(5)  # vera_A is drawn first
    np.testing.assert_array_equal(A, rng.uniform(-ba, ba, (64, 300)).astype(np.float32))
    A2, _ = vera.init_projections(64, 300, 200, seed=5)
    assert np.array_equal(A, A2)
    with pytest.raises(ConfigError, match="max_in"):
        vera.init_projections(4, 0, 3, seed=0)


def test_init_shared_and_lambdas():
    cfg = VeraConfig(r=4, projection_prng_key=3)
    shared = vera.init_shared(cfg, [Layer.of((6, 10)), Layer.of((12, 5), "Conv1D")])
    assert shared[vera.VERA_A_KEY].shape == (4, 12) and shared[vera.VERA_B_KEY].shape == (6, 4)
    lb, ld = vera.init_lambdas(Layer.of((6, 10)), 4, d_initial=0.25)
    assert np.all(lb == 0) and np.all(ld == np.float32(0.25))
    lb, ld = vera.init_lambdas(Layer.of((6, 10)), 4, init_weights=False, seed=1)
    assert np.all(lb == 1) and ld.std() > 0


def test_initialize_with_shared_dict():
    cfg = VeraConfig(r=4, init_weights=False)
    shared: dict = {}
    p, w = VeraModule.initialize("a", cfg, Layer.of((6, 10)), shared=shared)
    assert w is None and set(p) == {"vera_lambda_b", "vera_lambda_d"} and p["vera_lambda_b"].shape == (6,)
    assert shared[vera.VERA_A_KEY].shape == (4, 10)  # sized to this layer
    with pytest.raises(ShapeError, match=r"b: the layer has in=20, out=6.*in <= 10"):
        VeraModule.initialize("b", cfg, Layer.of((6, 20)), shared=shared)
    # no shared=: layer-sized projections come back under the shared keys, and a module finds them there
    p2, _ = VeraModule.initialize("c", cfg, Layer.of((3, 7)))
    assert p2["vera_lambda_d"].shape == (4,) and p2[vera.VERA_A_KEY].shape == (4, 7)
    assert p2[vera.VERA_B_KEY].shape == (3, 4)
    mod = VeraModule("c", cfg, p2, Layer.of((3, 7)))
    assert mod.num_parameters() == 3 + 4 and mod.delta_weight().shape == (3, 7)
    # init_shared takes a mapping of layers and an explicit seed
    s1 = vera.init_shared(cfg, {"a": Layer.of((6, 10)), "b": Layer.of((3, 12))}, seed=9)
    assert s1[vera.VERA_A_KEY].shape == (4, 12) and s1[vera.VERA_B_KEY].shape == (6, 4)


# --------------------------------------------------------------------------------------------------
# properties (NumPy, every dtype)
# --------------------------------------------------------------------------------------------------
@given(case=cases(), dtype=st.sampled_from(DTYPES), copy=st.booleans())
def test_merge_unmerge_round_trip(case, dtype, copy):
    W, b, lb, ld, A, B = case.arrays(dtype)
    W0 = W.astype(np.float64)
    mod = case.module(lb, ld, A, B)
    d, mag = ref_delta(case, lb, ld, A, B)
    u, uc = eps(dtype), (2.0**-52 if dtype == "float64" else U32)
    W1 = mod.merge(W, b, copy=copy).weight
    assert W1.dtype == np_dtype(dtype) and (W1 is W) == (not copy)
    want = W0 + d
    assert np.all(np.abs(W1.astype(np.float64) - want) <= u * np.abs(want) + (case.r + 2) * uc * mag)
    W2 = mod.unmerge(W1, b, copy=copy).weight
    assert np.all(np.abs(W2.astype(np.float64) - W0) <= 4 * u * (np.abs(W0) + mag) + (case.r + 2) * uc * mag)


@given(case=cases(), dtype=st.sampled_from(["float32", "float64"]))
def test_delta_and_forward_against_reference(case, dtype):
    W, b, lb, ld, A, B = case.arrays(dtype)
    mod = case.module(lb, ld, A, B)
    d, mag = ref_delta(case, lb, ld, A, B)
    u = eps(dtype)
    got = mod.delta_weight()
    assert got.shape == case.layer.weight_shape
    assert np.all(np.abs(got - d) <= (case.r + 2) * u * mag)
    rng = np.random.default_rng(case.seed + 2)
    x = rng.standard_normal((2, 3, case.inn)).astype(np_dtype(dtype))
    Wm = W.astype(np.float64) + d
    Wmat = Wm.T if case.kind == "Conv1D" else Wm
    ref = x.astype(np.float64) @ Wmat.T + b
    Wabs = np.abs(W.astype(np.float64)) + mag
    bound = (case.inn + case.r + 4) * u * (np.abs(x) @ (Wabs.T if case.kind == "Conv1D" else Wabs).T + np.abs(b))
    y = mod.forward(x, W, b)
    assert y.dtype == W.dtype and np.all(np.abs(y - ref) <= bound)
    Wmerged = mod.merge(W, b).weight
    ym = x @ (Wmerged if case.kind == "Conv1D" else Wmerged.T) + b
    assert np.all(np.abs(ym - ref) <= bound)  # merged forward == unmerged forward within the bound


@given(case=cases(), dtype=st.sampled_from(["float16", "bfloat16"]))
def test_forward_half(case, dtype):
    W, b, lb, ld, A, B = case.arrays(dtype)
    mod = case.module(lb, ld, A, B)
    d, mag = ref_delta(case, lb, ld, A, B)
    x = np.random.default_rng(case.seed).standard_normal((2, case.inn)).astype(np_dtype(dtype))
    Wm = W.astype(np.float64) + d
    ref = x.astype(np.float64) @ (Wm if case.kind == "Conv1D" else Wm.T) + b.astype(np.float64)
    Wabs = np.abs(W.astype(np.float64)) + mag
    mag_y = np.abs(x.astype(np.float64)) @ (Wabs if case.kind == "Conv1D" else Wabs.T) + np.abs(b.astype(np.float64))
    k = case.inn + case.r + 4
    y = mod.forward(x, W, b)
    yc = mod.forward(x, W, b, peft_compat=True)
    assert y.dtype == np_dtype(dtype) and yc.dtype == np_dtype(dtype)
    assert np.all(np.abs(y.astype(np.float64) - ref) <= eps(dtype) * np.abs(ref) + k * U32 * mag_y)
    assert np.all(np.abs(yc.astype(np.float64) - ref) <= 2 * eps(dtype) * mag_y + k * U32 * mag_y)


def test_peft_compat_rounds_delta_for_half_projections():
    case = Case("Linear", 6, 5, 3, 6, 5, 0)
    W, b, lb, ld, A, B = case.arrays("bfloat16", adapter_dtype="bfloat16")
    mod = case.module(lb, ld, A, B)
    d32 = mod.delta_weight()
    dc = mod.delta_weight(peft_compat=True)
    assert d32.dtype == np.float32
    np.testing.assert_array_equal(dc, d32.astype(BF16).astype(np.float32))
    got = mod.merge(W, peft_compat=True).weight
    want = (W.astype(np.float32) + d32.astype(BF16).astype(np.float32)).astype(BF16)
    assert np.array_equal(got.view(np.int16), want.view(np.int16))


def test_copy_false_uses_gemm_without_temporary():
    case = Case("Linear", 384, 256, 16, 400, 300, 1)
    W, b, lb, ld, A, B = case.arrays("float32")
    want = case.module(lb, ld, A, B).merge(W).weight
    for kind in ("Linear", "Conv1D"):
        c = Case(kind, 384, 256, 16, 400, 300, 1)
        W = np.ascontiguousarray(W if kind == "Linear" else W.T)
        mod = c.module(lb, ld, A, B)
        out, peak = traced_peak(lambda: mod.merge(W, copy=False).weight)
        assert out is W and peak < W.nbytes // 4, peak
        np.testing.assert_allclose(W if kind == "Linear" else W.T, want, rtol=1e-5, atol=1e-5)
        mod.unmerge(W, copy=False)


# --------------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------------
@XP
@given(case=cases(), data=st.data())
def test_cross_backend(xp, case, data):
    dtypes = ["float32", "float64"] + (["bfloat16", "float16"] if "torch" in xp.__name__ else [])
    dtype = data.draw(st.sampled_from(dtypes))
    W, b, lb, ld, A, B = case.arrays(dtype)
    mod_np = case.module(lb, ld, A, B)
    mod = case.module(*(to_xp(xp, a) for a in (lb, ld, A, B)))
    Wx, bx = to_xp(xp, W.copy()), to_xp(xp, b)
    x = np.random.default_rng(case.seed).standard_normal((2, case.inn)).astype(np_dtype(dtype))
    W1 = mod.merge(Wx, bx).weight
    W2 = mod.unmerge(W1, bx).weight
    dW = mod.delta_weight()
    y = mod.forward(to_xp(xp, x), Wx, bx)
    assert_same_namespace(xp, W1, W2, dW, y)
    d, mag = ref_delta(case, lb, ld, A, B)
    u, uc = eps(dtype), (2.0**-52 if dtype == "float64" else U32)
    W1n = mod_np.merge(W, b).weight.astype(np.float64)
    assert np.all(np.abs(to_np(W1) - W1n) <= 2 * u * np.abs(W1n) + 2 * (case.r + 2) * uc * mag)
    assert np.all(np.abs(to_np(dW) - d) <= (case.r + 2) * uc * mag)
    W0 = W.astype(np.float64)
    assert np.all(np.abs(to_np(W2) - W0) <= 4 * u * (np.abs(W0) + mag) + (case.r + 2) * uc * mag)
    yn = mod_np.forward(x, W, b).astype(np.float64)
    Wabs = np.abs(W0) + mag
    mag_y = np.abs(x.astype(np.float64)) @ (Wabs if case.kind == "Conv1D" else Wabs.T) + np.abs(b.astype(np.float64))
    assert np.all(np.abs(to_np(y) - yn) <= 2 * u * np.abs(yn) + (case.inn + case.r + 4) * uc * mag_y)


def test_copy_false_every_backend(xp):
    case = Case("Conv1D", 7, 5, 3, 9, 6, 2)
    W, b, lb, ld, A, B = case.arrays("float32")
    mod = case.module(*(to_xp(xp, a) for a in (lb, ld, A, B)))
    Wx = to_xp(xp, W.copy())
    if not is_writeable(Wx):
        with pytest.raises(UnsupportedError):
            mod.merge(Wx, copy=False)
        return
    assert mod.merge(Wx, copy=False).weight is Wx
    d, mag = ref_delta(case, lb, ld, A, B)
    assert np.all(np.abs(to_np(Wx) - (W + d)) <= U32 * (np.abs(W + d) + 8 * mag))


# --------------------------------------------------------------------------------------------------
# bad inputs, config, checkpoints
# --------------------------------------------------------------------------------------------------
def test_missing_projections():
    lam = {"vera_lambda_b": np.zeros(4, np.float32), "vera_lambda_d": np.zeros(2, np.float32)}
    with pytest.raises(CheckpointError, match=r"m: this VeRA adapter was saved with save_projection=false.*"
                                              r"save_projection=True"):
        VeraModule("m", VeraConfig(r=2, save_projection=False), lam, Layer.of((4, 3)))
    with pytest.raises(CheckpointError, match=r"lacks the shared projections \['base_model.vera_B'\]"):
        VeraModule("m", VeraConfig(r=2), lam, Layer.of((4, 3)), shared={vera.VERA_A_KEY: np.zeros((2, 3))})


def test_shape_errors():
    case = Case("Linear", 6, 5, 3, 6, 5, 0)
    W, b, lb, ld, A, B = case.arrays("float32")
    big = Case("Linear", 7, 5, 3, 6, 5, 0)
    with pytest.raises(ShapeError, match=r"m: the layer has in=5, out=7 .*out <= 6"):
        VeraModule("m", big.config(), {"vera_lambda_b": np.zeros(7), "vera_lambda_d": ld}, big.layer,
                   shared={vera.VERA_A_KEY: A, vera.VERA_B_KEY: B})
    with pytest.raises(ShapeError, match=r"m: vera_lambda_d has shape \(4,\), expected \(3,\)"):
        case.module(lb, np.zeros(4, np.float32), A, B)
    with pytest.raises(ShapeError, match="rank 3 but the config has r=8"):
        VeraModule("m", VeraConfig(r=8), {"vera_lambda_b": lb, "vera_lambda_d": ld}, case.layer,
                   shared={vera.VERA_A_KEY: A, vera.VERA_B_KEY: B})
    with pytest.raises(ShapeError, match="not Conv2d"):
        VeraModule("m", case.config(), {"vera_lambda_b": lb, "vera_lambda_d": ld}, Layer.of((6, 5, 1, 1)),
                   shared={vera.VERA_A_KEY: A, vera.VERA_B_KEY: B})
    mod = case.module(lb, ld, A, B)
    with pytest.raises(ShapeError, match="expected"):
        mod.merge(np.zeros((5, 6), np.float32))
    with pytest.raises(UnsupportedError, match="writeable"):
        mod.merge(np.broadcast_to(W, W.shape), copy=False)


def test_config():
    with pytest.raises(ConfigError, match="'r'"):
        VeraConfig.from_dict({"peft_type": "VERA", "r": 0})
    with pytest.raises(ConfigError, match="vera_dropout"):
        VeraConfig.from_dict({"peft_type": "VERA", "vera_dropout": 1.5})
    with pytest.raises(ConfigError, match="bias"):
        VeraConfig.from_dict({"peft_type": "VERA", "bias": "lora_only"})
    cfg = VeraConfig.from_dict({"peft_type": "VERA", "r": 16, "target_modules": ["q"], "d_initial": 0.2})
    d = cfg.to_dict()
    assert "exclude_modules" not in d and d["r"] == 16 and d["save_projection"] is True
    assert VeraConfig.from_dict(d) == cfg


def test_infer_layer():
    cfg = VeraConfig(r=2)
    lam = {"vera_lambda_b": np.zeros(6)}
    assert VeraModule.infer_layer("m", cfg, lam, (6, 4)).kind is LayerKind.LINEAR
    assert VeraModule.infer_layer("m", cfg, lam, (4, 6)).kind is LayerKind.CONV1D_TRANSPOSED
    assert VeraModule.infer_layer("m", VeraConfig(fan_in_fan_out=True), lam, (6, 6)).kind is LayerKind.CONV1D_TRANSPOSED
    with pytest.raises(ShapeError, match="no dimension of size"):
        VeraModule.infer_layer("m", cfg, lam, (5, 4))
    with pytest.raises(ShapeError, match="weight shape"):
        VeraModule.infer_layer("m", cfg, lam)


def test_save_load_round_trip(tmp_path):
    cfg = VeraConfig(r=4, target_modules=["a", "b"], init_weights=False)
    layers = {"a": Layer.of((6, 10)), "b": Layer.of((8, 5), "Conv1D")}
    shared = vera.init_shared(cfg, layers.values())
    params = {n: VeraModule.initialize(n, cfg, lay, seed=i, shared=shared)[0] for i, (n, lay) in enumerate(layers.items())}
    ad = Adapter(cfg, params, shared=shared)
    peftmath.save_adapter(ad, tmp_path)
    back = peftmath.load_adapter(tmp_path)
    assert set(back.shared) == set(vera.SHARED_KEYS)
    for k in vera.SHARED_KEYS:
        assert np.array_equal(back.shared[k], shared[k])
    state = {"a.weight": np.ones((6, 10), np.float32), "b.weight": np.ones((8, 5), np.float32)}
    m1, m2 = ad.merge(state, layer_kinds={"b": "Conv1D"}), back.merge(state, layer_kinds={"b": "Conv1D"})
    for k in state:
        assert np.array_equal(m1[k], m2[k])
    assert back.num_trainable_parameters() == 6 + 4 + 5 + 4  # projections are frozen, not counted
