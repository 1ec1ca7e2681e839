"""LoKr (peftmath.methods.lokr): factorization, shape rules, every layer kind and form, every backend.

The float64 reference builds ΔW with ``np.einsum`` index formulas (not ``kron``):

* regular layout ``ΔW[i·b + j, p·D + q] = s·w1[i, p]·w2[j, q]`` (``D = d·Πk``, w2 flattened per row);
* PEFT's Conv1d full-``w2`` layout ``ΔW[j·a + i, q·(c·k) + p·k + t] = s·w1[i, p]·w2[j, q, t]``.

Tolerances are componentwise with ``|ΔW|ₐ`` the same formula on absolute values and ``n`` the terms
per product (r for a low-rank factor, r² for the CP core, 0 for a full one):
``|ΔW − ΔW₆₄| ≤ (n₁ + n₂ + 4)·u·|ΔW|ₐ``; merge → unmerge ``|W'' − W| ≤ 4·u·(|W| + |ΔW|ₐ)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import (XP, assert_same_namespace, np_dtype, ref_base_forward, skip_if_immutable, to_np, to_xp,
                           traced_peak)
from peftmath import Adapter
from peftmath._array import eps
from peftmath.errors import ConfigError, NonFiniteError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import _lycoris, lokr
from peftmath.methods.lokr import LoKrConfig, LoKrModule



# --------------------------------------------------------------------------------------------------
# Factorization: PEFT's rule
# --------------------------------------------------------------------------------------------------
def _peft_rule(dim: int, factor: int) -> tuple[int, int]:
    """An independent statement of the rule: the divisor pair (m ≤ n) with the largest m ≤ factor
    reachable by walking divisors upward while m < n; a dividing positive factor is returned as is."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    cap = dim if factor == -1 else factor
    best = 1
    for m in range(2, dim + 1):
        if dim % m:
            continue
        if m > cap or best >= dim // best:
            break
        best = m
    m, n = best, dim // best
    return (m, n) if m <= n else (n, m)


def test_factorization_table():
    table = {(256, -1): (16, 16), (128, -1): (8, 16), (127, -1): (1, 127), (128, 4): (4, 32),
             (128, 3): (2, 64), (128, 32): (32, 4), (1, -1): (1, 1), (12, -1): (3, 4), (4096, -1): (64, 64),
             (96, 5): (4, 24), (64, 0): (1, 64), (64, -3): (1, 64)}
    for (dim, f), want in table.items():
        assert lokr.factorization(dim, f) == want, (dim, f)


@given(dim=st.integers(1, 600), factor=st.sampled_from([-1, 1, 2, 3, 4, 5, 8, 16, 32, 100]))
def test_factorization_matches_rule(dim, factor):
    m, n = lokr.factorization(dim, factor)
    assert m * n == dim
    assert (m, n) == _peft_rule(dim, factor)


# --------------------------------------------------------------------------------------------------
# Config and shape rules
# --------------------------------------------------------------------------------------------------
def test_config_defaults_match_peft():
    c = LoKrConfig()
    assert (c.r, c.alpha, c.rank_dropout, c.module_dropout, c.use_effective_conv2d, c.decompose_both,
            c.decompose_factor, c.rank_dropout_scale, c.init_weights) == (8, 8, 0.0, 0.0, False, False, -1, False, True)
    assert c.peft_type == "LOKR" and LoKrConfig.from_dict(c.to_dict()) == c
    assert LoKrConfig.from_dict({"peft_type": "LOKR", "init_weights": "lycoris"}).init_weights == "lycoris"


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=-1), dict(init_weights="gaussian"), dict(decompose_factor=2.0),
                                 dict(decompose_both="yes"), dict(module_dropout=-0.1), dict(alpha_pattern={"q": "a"})])
def test_config_rejects(bad):
    with pytest.raises(ConfigError):
        LoKrConfig.from_dict({"peft_type": "LOKR", **bad})


def test_scaling_is_alpha_over_r_even_for_full_factors():
    cfg = LoKrConfig(r=16, alpha=4)
    layer = Layer.of((8, 8))
    params, _ = LoKrModule.initialize("m", cfg, layer, init=False)
    assert sorted(params) == ["lokr_w1", "lokr_w2"]  # r plays no role in the shapes
    assert LoKrModule("m", cfg, params, layer).scaling == 0.25


@pytest.mark.parametrize("shape,cfg,want", [
    ((64, 96), dict(r=2), {"lokr_w1": (8, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 12)}),
    ((64, 96), dict(r=8), {"lokr_w1": (8, 8), "lokr_w2": (8, 12)}),
    ((64, 96), dict(r=2, decompose_both=True),
     {"lokr_w1_a": (8, 2), "lokr_w1_b": (2, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 12)}),
    ((128, 128), dict(r=4, decompose_factor=4), {"lokr_w1": (4, 4), "lokr_w2_a": (32, 4), "lokr_w2_b": (4, 32)}),
    ((48, 32, 3, 3), dict(r=2), {"lokr_w1": (6, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 72)}),
    ((48, 32, 3, 2), dict(r=2, use_effective_conv2d=True),
     {"lokr_w1": (6, 4), "lokr_w2_a": (2, 8), "lokr_w2_b": (2, 8), "lokr_t2": (2, 2, 3, 2)}),
    ((48, 32, 1, 1), dict(r=2, use_effective_conv2d=True), {"lokr_w1": (6, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}),
    ((48, 32, 3), dict(r=2, use_effective_conv2d=True),
     {"lokr_w1": (6, 4), "lokr_w2_a": (2, 8), "lokr_w2_b": (2, 8), "lokr_t2": (2, 2, 3, 1)}),
    ((12, 8, 3), dict(r=8), {"lokr_w1": (3, 2), "lokr_w2": (4, 4, 3)}),
    ((12, 8, 3, 3), dict(r=8), {"lokr_w1": (3, 2), "lokr_w2": (4, 4, 3, 3)}),
])
def test_parameter_shapes(shape, cfg, want):
    c = LoKrConfig(**cfg)
    g = lokr.geometry(Layer.of(shape), c.r, decompose_both=c.decompose_both, decompose_factor=c.decompose_factor,
                      use_effective_conv2d=c.use_effective_conv2d)
    assert lokr.parameter_shapes(g) == want


@pytest.mark.parametrize("init,zero", [(True, {"lokr_w1", "lokr_w1_a"}), ("lycoris", {"lokr_w2", "lokr_w2_b"}),
                                       (False, set())])
@pytest.mark.parametrize("cfg", [dict(r=2), dict(r=2, decompose_both=True), dict(r=16)])
def test_init_zeros(init, zero, cfg):
    c = LoKrConfig(**cfg)
    layer = Layer.of((64, 96))
    params, _ = LoKrModule.initialize("m", c, layer, seed=4, init=init)
    for key, arr in params.items():
        bound = 1 / math.sqrt(math.prod(arr.shape[1:]))
        if key in zero:
            assert np.all(arr == 0), key
        else:
            assert np.all(np.abs(arr) <= bound) and np.abs(arr).max() > 0.5 * bound, key
    d = LoKrModule("m", c, params, layer).delta_weight()
    assert (np.abs(d).max() == 0) == (init is not False)


# --------------------------------------------------------------------------------------------------
# Cases and references
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    shape: tuple
    kind: str
    groups: int
    config: LoKrConfig
    seed: int

    @property
    def layer(self) -> Layer:
        return Layer.of(self.shape, self.kind, groups=self.groups)

    @property
    def geometry(self):
        c = self.config
        return lokr.geometry(self.layer, c.r, decompose_both=c.decompose_both, decompose_factor=c.decompose_factor,
                             use_effective_conv2d=c.use_effective_conv2d)

    @property
    def s(self) -> float:
        return self.config.alpha / self.config.r

    def params(self) -> dict:
        p = lokr.init_weights(self.geometry, init_weights=False, seed=self.seed, dtype=np.float64)
        return {k: v * 2.0 for k, v in p.items()}

    def weight(self) -> np.ndarray:
        return np.random.default_rng(self.seed + 1).standard_normal(self.shape)


@st.composite
def cases(draw, kinds=("Linear", "Conv1d", "Conv2d")):
    kind = draw(st.sampled_from(kinds))
    cfg = LoKrConfig(r=draw(st.integers(1, 5)), alpha=draw(st.sampled_from([1.0, 3.0, 8.0])),
                     decompose_both=draw(st.booleans()), decompose_factor=draw(st.sampled_from([-1, -1, 2, 3, 4])),
                     use_effective_conv2d=draw(st.booleans()))
    seed = draw(st.integers(0, 2**31 - 1))
    if kind == "Linear":
        return Case((draw(st.integers(1, 24)), draw(st.integers(1, 24))), kind, 1, cfg, seed)
    groups = draw(st.sampled_from([1, 1, 2]))
    out = draw(st.integers(1, 10)) * groups
    c_in = draw(st.integers(1, 12))
    k = draw(st.sampled_from([(1,), (2,), (3,)] if kind == "Conv1d" else [(1, 1), (3, 3), (2, 3), (1, 2)]))
    return Case((out, c_in, *k), kind, groups, cfg, seed)


def ref_factors(p: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """float64 ``(w1, w2, n1 + n2)`` with ``n`` the number of terms in each product."""
    n = 0
    if "lokr_w1" in p:
        w1 = p["lokr_w1"]
    else:
        w1 = np.einsum("ir,rp->ip", p["lokr_w1_a"], p["lokr_w1_b"])
        n += p["lokr_w1_a"].shape[1]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        w2 = np.einsum("ijkl,ip,jq->pqkl", p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        n += p["lokr_t2"].shape[0] ** 2
    else:
        w2 = np.einsum("jr,rq->jq", p["lokr_w2_a"], p["lokr_w2_b"])
        n += p["lokr_w2_a"].shape[1]
    return w1, w2, n


def ref_delta(case: Case, p: dict, absolute: bool = False) -> np.ndarray:
    """float64 ΔW from the index formulas (no kron)."""
    q = {k: np.abs(v) if absolute else v for k, v in p.items()}
    w1, w2, _ = ref_factors(q)
    s = abs(case.s) if absolute else case.s
    (a, _), b, out = w1.shape, w2.shape[0], case.shape[0]
    if case.kind == "Conv1d" and "lokr_w2" in p:  # PEFT's layout quirk
        d = np.einsum("ip,jqt->jiqpt", w1, w2).reshape(case.shape[0], -1)
    else:
        w2m = w2.reshape(b, -1)
        d = np.einsum("ip,jq->ijpq", w1, w2m).reshape(a * b, -1)
    assert d.shape[0] == out
    return (s * d).reshape(case.shape)


def n_terms(p: dict) -> int:
    return ref_factors(p)[2]


# --------------------------------------------------------------------------------------------------
# Delta, merge, unmerge, forward
# --------------------------------------------------------------------------------------------------
def test_conv1d_full_w2_layout_quirk():
    """PEFT's kron of a 2-D w1 and a 3-D w2, reshaped, is NOT the Kronecker conv kernel."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((2, 3)), rng.standard_normal((4, 5, 3))
    layer = Layer.of((8, 15, 3))
    d = lokr.delta_weight({"lokr_w1": w1, "lokr_w2": w2}, scaling=0.5, layer=layer)
    np.testing.assert_allclose(d, 0.5 * np.kron(w1, w2).reshape(8, 15, 3), rtol=1e-14)
    j, i, q, p, t = 3, 1, 2, 1, 2  # ΔW[j·a + i, q·c + p, t] = s·w1[i, p]·w2[j, q, t]
    assert d[j * 2 + i, q * 3 + p, t] == pytest.approx(0.5 * w1[i, p] * w2[j, q, t])
    intended = 0.5 * np.kron(w1[:, :, None], w2)  # the Kronecker kernel: ΔW[i·b + j, p·d + q, t]
    assert not np.allclose(d, intended)


@given(case=cases(), dtype=st.sampled_from(["float32", "float64"]))
def test_delta_matches_float64_reference(case, dtype):
    p = case.params()
    pd = {k: v.astype(dtype) for k, v in p.items()}
    d = lokr.delta_weight(pd, scaling=case.s, layer=case.layer)
    assert d.shape == case.shape and d.dtype == np.dtype(dtype)
    want = ref_delta(case, {k: v.astype(np.float64) for k, v in pd.items()})
    tol = (n_terms(p) + 4) * eps(dtype) * ref_delta(case, p, absolute=True)
    assert np.all(np.abs(d - want) <= tol + 1e-300)


@XP
@given(case=cases(), dtype=st.sampled_from(["float32", "float64"]), copy=st.booleans())
def test_merge_unmerge_round_trip(xp, case, dtype, copy):
    if not copy:
        skip_if_immutable(xp)
    p = case.params()
    dt = getattr(xp, dtype)
    px = {k: to_xp(xp, v, dt) for k, v in p.items()}
    W = to_xp(xp, case.weight(), dt)
    W0 = to_np(W)
    mod = LoKrModule("blk.m", case.config, px, case.layer)
    res = mod.merge(W, copy=copy)
    assert_same_namespace(xp, res.weight)
    assert (res.weight is W) == (not copy)
    want = W0 + ref_delta(case, {k: to_np(v) for k, v in px.items()})
    absd = ref_delta(case, p, absolute=True)
    u = eps(dtype)
    assert np.all(np.abs(to_np(res.weight) - want) <= u * (2 * np.abs(W0) + (n_terms(p) + 6) * absd))
    if copy:
        assert np.array_equal(to_np(W), W0)
    back = mod.unmerge(res.weight, copy=copy).weight
    assert np.all(np.abs(to_np(back) - W0) <= 4 * u * (np.abs(W0) + absd))


@given(case=cases(), dtype=st.sampled_from(["float16", "bfloat16"]))
def test_half_precision_merge_rounds_once(case, dtype):
    p = {k: v.astype(np.float32) for k, v in case.params().items()}
    W = case.weight().astype(np_dtype(dtype))
    merged = lokr.merge(W, p, scaling=case.s, layer=case.layer)
    assert merged.dtype == W.dtype
    exact = W.astype(np.float64) + ref_delta(case, {k: v.astype(np.float64) for k, v in p.items()})
    u = eps(dtype)
    assert np.all(np.abs(merged.astype(np.float64) - exact) <= u * np.abs(exact) + 1e-6 * (1 + np.abs(exact)))
    back = lokr.unmerge(merged, p, scaling=case.s, layer=case.layer)
    W0 = W.astype(np.float64)
    absd = ref_delta(case, p, absolute=True)
    assert np.all(np.abs(back.astype(np.float64) - W0) <= 2 * u * (np.abs(W0) + absd) + 1e-6)


@XP
@given(case=cases(), dtype=st.sampled_from(["float32", "float64"]))
def test_merged_forward_equals_unmerged(xp, case, dtype):
    p = case.params()
    rng = np.random.default_rng(case.seed + 3)
    if case.kind == "Linear":
        x, kw = rng.standard_normal((3, case.shape[1])), {}
    else:
        spatial = (6,) if case.kind == "Conv1d" else (5, 6)
        x, kw = rng.standard_normal((2, case.shape[1] * case.groups, *spatial)), dict(padding=1)
    bias = rng.standard_normal(case.shape[0])
    dt = getattr(xp, dtype)
    px = {k: to_xp(xp, v, dt) for k, v in p.items()}
    Wx, xx, bx = to_xp(xp, case.weight(), dt), to_xp(xp, x, dt), to_xp(xp, bias, dt)
    y = lokr.forward(xx, Wx, px, scaling=case.s, bias=bx, layer=case.layer, **kw)
    assert_same_namespace(xp, y)
    y_merged = case.layer.base_forward(xx, lokr.merge(Wx, px, scaling=case.s, layer=case.layer), bx, xp, **kw)
    Wd = case.weight() + ref_delta(case, p)
    absw = np.abs(case.weight()) + ref_delta(case, p, absolute=True)
    want, mag = ref_base_forward(x, Wd, absw, bias, groups=case.groups, **kw)
    tol = (math.prod(case.shape[1:]) + n_terms(p) + 8) * eps(dtype) * mag + 1e-300
    assert np.all(np.abs(to_np(y) - want) <= tol)
    assert np.all(np.abs(to_np(y_merged) - want) <= tol)


def test_rank_dropout_scale_option():
    layer = Layer.of((64, 12))
    g = lokr.geometry(layer, 2)
    p = lokr.init_weights(g, init_weights=False, seed=0, dtype=np.float64)
    W = np.zeros((64, 12))
    x = np.random.default_rng(0).standard_normal((3, 12))
    full = lokr.forward(x, W, p, scaling=1.0)
    plain = lokr.forward(x, W, p, scaling=1.0, rank_dropout=0.5, seed=3)
    scaled = lokr.forward(x, W, p, scaling=1.0, rank_dropout=0.5, rank_dropout_scale=True, seed=3)
    mask = lokr.rank_dropout_mask(64, 0.5, seed=np.random.default_rng(3), normalize=False)
    assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
    np.testing.assert_allclose(plain, full * mask, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(scaled, full * mask / mask.mean(), rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(lokr.forward(x, W, p, scaling=1.0, module_dropout=1.0, seed=1), 0 * full)


@pytest.mark.parametrize("shape,cfg", [((1024, 512), dict(r=4)), ((127, 4096), dict(r=4)),
                                       ((1024, 64, 3), dict(r=64)), ((256, 64, 3, 3), dict(r=2))])
def test_merge_without_kron_temporary(monkeypatch, shape, cfg):
    monkeypatch.setattr(_lycoris, "BLOCK_ELEMENTS", 1 << 13)
    c = LoKrConfig(**cfg)
    layer = Layer.of(shape)
    params, _ = LoKrModule.initialize("m", c, layer, init=False, seed=0)
    mod = LoKrModule("m", c, params, layer)
    W = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = W + mod.delta_weight()
    _, peak = traced_peak(lambda: mod.merge(W, copy=False))
    assert peak < W.nbytes / 4, f"in-place merge allocated {peak} bytes for a {W.nbytes}-byte weight"
    np.testing.assert_allclose(W, want, rtol=1e-6, atol=1e-6)
    out, peak = traced_peak(lambda: mod.unmerge(W, copy=True).weight)
    assert peak < 1.25 * W.nbytes and out is not W


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def test_factor_not_dividing_the_layer():
    p = {"lokr_w1": np.ones((3, 2)), "lokr_w2": np.ones((4, 4))}
    W = np.ones((10, 8))
    with pytest.raises(ShapeError, match=r"w1 of shape \(3, 2\) does not divide.*out 10"):
        lokr.merge(W, p, scaling=1.0)
    ad = Adapter(LoKrConfig(r=8), {"enc.k": p})
    with pytest.raises(ShapeError, match=r"enc\.k.*does not divide"):
        ad.merge({"enc.k.weight": W}, copy=False)
    assert np.all(W == 1)


def test_tensors_that_disagree_with_config_or_layer():
    layer = Layer.of((64, 96))
    params, _ = LoKrModule.initialize("q", LoKrConfig(r=2), layer, init=False)
    with pytest.raises(ShapeError, match=r"q: LoKr tensors .* expected \['lokr_w1', 'lokr_w2'\]"):
        LoKrModule("q", LoKrConfig(r=8), params, layer)
    with pytest.raises(ShapeError, match=r"q: lokr_w2_b has shape \(2, 12\), expected \(2, 8\)"):
        LoKrModule("q", LoKrConfig(r=2), params, Layer.of((64, 64)))
    with pytest.raises(ShapeError, match="unexpected LoKr tensors"):
        LoKrModule("q", LoKrConfig(r=2), {**params, "hada_w1_a": params["lokr_w1"]}, layer)


def test_unsupported_layers_and_safe_merge():
    with pytest.raises(UnsupportedError, match="c_attn.*Conv1D"):
        LoKrModule.infer_layer("h.0.c_attn", LoKrConfig(), {}, (8, 8), kind="Conv1D")
    with pytest.raises(UnsupportedError, match="Conv3d"):
        LoKrModule.initialize("c3", LoKrConfig(), Layer.of((4, 4, 1, 1, 1)))
    p = {"lokr_w1": np.array([[np.nan]], np.float32), "lokr_w2": np.ones((2, 2), np.float32)}
    W = np.ones((2, 2), np.float32)
    with pytest.raises(NonFiniteError):
        lokr.merge(W, p, scaling=1.0, copy=False, safe=True)
    assert np.all(W == 1)


def test_examples_and_adapter_round_trip(tmp_path):
    import peftmath as pm

    for label, fields in lokr.EXAMPLES.items():
        cfg = LoKrConfig(**fields, target_modules=["q", "conv"])
        assert cfg.alpha != cfg.r, label
        layers = {"blk.q": Layer.of((64, 48)), "blk.conv": Layer.of((32, 16, 3, 3))}
        params = {n: LoKrModule.initialize(n, cfg, lay, seed=1)[0] for n, lay in layers.items()}
        ad = Adapter(cfg, params)
        rng = np.random.default_rng(0)
        state = {f"{n}.weight": rng.standard_normal(lay.weight_shape).astype(np.float32) for n, lay in layers.items()}
        merged = ad.merge(state)
        for n in layers:
            assert np.abs(merged[f"{n}.weight"] - state[f"{n}.weight"]).max() > 0
        back = ad.unmerge(merged)
        for k in state:
            np.testing.assert_allclose(back[k], state[k], atol=1e-5)
        pm.save_adapter(ad, tmp_path / label)
        loaded = pm.load_adapter(tmp_path / label)
        for n in params:
            assert sorted(loaded.params[n]) == sorted(params[n])
            np.testing.assert_array_equal(loaded.delta_weight(n, weight_shape=layers[n].weight_shape),
                                          ad.delta_weight(n, weight_shape=layers[n].weight_shape))
