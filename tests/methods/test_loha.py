"""LoHa (peftmath.methods.loha): every layer kind and form, every backend, against float64 references.

References are computed here in float64 with ``np.einsum`` (an independent formula). Tolerances are
componentwise, with ``u`` the dtype's epsilon and ``|ΔW|ₐ = s·(|w1_a||w1_b|) ⊙ (|w2_a||w2_b|)`` (the CP form
likewise with ``|t|``), the magnitude the float32 products are accurate to:

* delta / merge:    ``|W' − (W + ΔW)| ≤ u·(2|W| + (2n + 4)|ΔW|ₐ)``, n = terms per product (r, or r² for CP)
* merge → unmerge:  ``|W'' − W| ≤ 4·u·(|W| + |ΔW|ₐ)``
* forward:          ``|y − y_merged| ≤ (K + n + 4)·u·|x|·(|W| + |ΔW|ₐ)``, K = fan-in
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import (BF16, XP, assert_same_namespace, np_dtype, ref_base_forward, skip_if_immutable, to_np,
                           to_xp, traced_peak)
from peftmath import Adapter
from peftmath._array import eps
from peftmath.errors import ConfigError, NonFiniteError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import _lycoris, loha
from peftmath.methods.loha import LoHaConfig, LoHaModule

KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


# --------------------------------------------------------------------------------------------------
# Cases and float64 references
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    kind: str
    shape: tuple
    groups: int
    effective: bool
    r: int
    alpha: float
    seed: int

    @property
    def layer(self) -> Layer:
        return Layer.of(self.shape, self.kind, groups=self.groups)

    @property
    def s(self) -> float:
        return self.alpha / self.r

    def params(self) -> dict:
        """float64 host tensors, all non-zero (init_weights=False), scaled to O(1) products."""
        p = loha.init_weights(self.layer, self.r, init_weights=False, effective=self.effective, seed=self.seed,
                              dtype=np.float64)
        return {k: v * 2.0 for k, v in p.items()}

    def weight(self) -> np.ndarray:
        return np.random.default_rng(self.seed + 1).standard_normal(self.shape)


@st.composite
def cases(draw, kinds=("Linear", "Conv1d", "Conv2d")):
    kind = draw(st.sampled_from(kinds))
    r = draw(st.integers(1, 4))
    alpha = draw(st.sampled_from([1.0, 3.0, 8.0, 0.5]))
    seed = draw(st.integers(0, 2**31 - 1))
    if kind == "Linear":
        return Case(kind, (draw(st.integers(1, 12)), draw(st.integers(1, 12))), 1, False, r, alpha, seed)
    groups = draw(st.sampled_from([1, 1, 2]))
    out = draw(st.integers(1, 6)) * groups
    c_in = draw(st.integers(1, 5))
    k = draw(st.sampled_from([(1,), (2,), (3,)] if kind == "Conv1d" else [(1, 1), (3, 3), (2, 3), (1, 3)]))
    layer = Layer.of((out, c_in, *k), kind, groups=groups)
    effective = loha.uses_effective_conv(layer, draw(st.booleans()))
    return Case(kind, (out, c_in, *k), groups, effective, r, alpha, seed)


def ref_factor(p: dict, i: int, effective: bool) -> np.ndarray:
    a, b = p[f"hada_w{i}_a"], p[f"hada_w{i}_b"]
    if effective:
        return np.einsum("ijkl,jr,ip->prkl", p[f"hada_t{i}"], b, a)
    return a @ b


def ref_delta(case: Case, p: dict, absolute: bool = False) -> np.ndarray:
    """float64 ΔW in the stored layout (``absolute``: the same with every tensor's absolute value)."""
    q = {k: np.abs(v) if absolute else v for k, v in p.items()}
    d = ref_factor(q, 1, case.effective) * ref_factor(q, 2, case.effective) * abs(case.s if absolute else case.s)
    return d.reshape(case.shape)


def n_terms(case: Case) -> int:
    return case.r * case.r if case.effective else case.r


def tensors(p: dict, xp=None, dtype=None):
    """``(w1_a, w1_b, w2_a, w2_b)`` and ``dict(t1=, t2=)`` for the functional API."""
    conv_ = (lambda a: to_xp(xp, a, dtype)) if xp is not None else (lambda a: a.astype(dtype or a.dtype))
    four = tuple(conv_(p[k]) for k in KEYS[:4])
    extra = {"t1": conv_(p["hada_t1"]), "t2": conv_(p["hada_t2"])} if "hada_t1" in p else {}
    return four, extra


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
def test_config_defaults_match_peft():
    c = LoHaConfig()
    assert (c.r, c.alpha, c.rank_dropout, c.module_dropout, c.use_effective_conv2d, c.init_weights) == \
        (8, 8, 0.0, 0.0, False, True)
    assert c.rank_pattern == {} and c.alpha_pattern == {} and c.peft_type == "LOHA"
    d = c.to_dict()
    assert d["peft_type"] == "LOHA" and LoHaConfig.from_dict(d) == c


def test_config_patterns_and_scaling():
    c = LoHaConfig(r=8, alpha=16, rank_pattern={r"layers\.1\.q": 4}, alpha_pattern={"v": 6})
    assert c.rank_and_alpha("model.layers.1.q") == (4, 16)
    assert c.rank_and_alpha("model.layers.0.v") == (8, 6)
    assert c.scaling_for("model.layers.1.q") == 4.0 and c.scaling_for("x.v") == 0.75


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=-2), dict(r=2.5), dict(alpha="x"), dict(rank_dropout=1.5),
                                 dict(init_weights="lycoris"), dict(rank_pattern={"q": 0}),
                                 dict(use_effective_conv2d=1)])
def test_config_rejects(bad):
    with pytest.raises(ConfigError):
        LoHaConfig.from_dict({"peft_type": "LOHA", **bad})


# --------------------------------------------------------------------------------------------------
# Shapes and init
# --------------------------------------------------------------------------------------------------
def test_parameter_shapes_all_forms():
    assert loha.parameter_shapes(Layer.of((6, 5)), 2) == {
        "hada_w1_a": (6, 2), "hada_w1_b": (2, 5), "hada_w2_a": (6, 2), "hada_w2_b": (2, 5)}
    assert loha.parameter_shapes(Layer.of((6, 4, 3, 3), groups=2), 2)["hada_w1_b"] == (2, 36)
    eff = loha.parameter_shapes(Layer.of((6, 4, 3, 2)), 2, effective=True)
    assert eff == {"hada_w1_a": (2, 6), "hada_w1_b": (2, 4), "hada_w2_a": (2, 6), "hada_w2_b": (2, 4),
                   "hada_t1": (2, 2, 3, 2), "hada_t2": (2, 2, 3, 2)}
    assert loha.parameter_shapes(Layer.of((6, 4, 5)), 3, effective=True)["hada_t2"] == (3, 3, 5, 1)
    assert not loha.uses_effective_conv(Layer.of((6, 4, 1)), True)
    assert not loha.uses_effective_conv(Layer.of((6, 4)), True)
    with pytest.raises(ConfigError):
        loha.parameter_shapes(Layer.of((6, 5)), 0)


@pytest.mark.parametrize("shape,effective", [((40, 30), False), ((12, 8, 3, 3), True), ((12, 8, 3), True),
                                             ((12, 8, 3, 3), False)])
def test_init_zeros_and_kaiming_bounds(shape, effective):
    layer = Layer.of(shape)
    p = loha.init_weights(layer, 4, init_weights=True, effective=effective, seed=3)
    assert np.all(p["hada_w2_b"] == 0)
    d = loha.delta_weight(*(p[k] for k in KEYS[:4]), t1=p.get("hada_t1"), t2=p.get("hada_t2"), scaling=2.0,
                          layer=layer)
    assert np.all(d == 0)
    q = loha.init_weights(layer, 4, init_weights=False, effective=effective, seed=3)
    for key, arr in q.items():
        assert arr.dtype == np.float32
        bound = 1 / math.sqrt(math.prod(arr.shape[1:]))
        assert np.all(np.abs(arr) <= bound) and np.abs(arr).max() > 0.5 * bound, key
    again = loha.init_weights(layer, 4, init_weights=False, effective=effective, seed=3)
    assert all(np.array_equal(q[k], again[k]) for k in q)


def test_module_initialize_uses_config(xp):
    cfg = LoHaConfig(r=8, alpha=4, rank_pattern={"c": 2}, use_effective_conv2d=True, init_weights=False)
    layer = Layer.of((6, 4, 3, 3))
    params, new_w = LoHaModule.initialize("m.c", cfg, layer, seed=1, xp=xp)
    assert new_w is None and params["hada_t1"].shape == (2, 2, 3, 3)
    assert_same_namespace(xp, *params.values())
    mod = LoHaModule("m.c", cfg, params, layer)
    assert mod.r == 2 and mod.scaling == 2.0
    zero, _ = LoHaModule.initialize("m.c", cfg, layer, seed=1, xp=xp, init=True)
    assert float(np.abs(to_np(LoHaModule("m.c", cfg, zero, layer).delta_weight())).max()) == 0.0


# --------------------------------------------------------------------------------------------------
# Delta against float64 einsum
# --------------------------------------------------------------------------------------------------
@given(case=cases(), dtype=st.sampled_from(["float32", "float64"]))
def test_delta_matches_float64_reference(case, dtype):
    p = case.params()
    four, extra = tensors(p, dtype=np_dtype(dtype))
    d = loha.delta_weight(*four, scaling=case.s, layer=case.layer, **extra)
    assert d.shape == case.shape and d.dtype == np.dtype(dtype)
    want = ref_delta(case, {k: v.astype(dtype).astype(np.float64) for k, v in p.items()})
    tol = (2 * n_terms(case) + 4) * eps(dtype) * ref_delta(case, p, absolute=True)
    assert np.all(np.abs(d - want) <= tol + 1e-300)


def test_cp_weight_matches_einsum():
    rng = np.random.default_rng(0)
    t, a, b = rng.standard_normal((3, 3, 2, 4)), rng.standard_normal((3, 5)), rng.standard_normal((3, 6))
    np.testing.assert_allclose(loha.cp_weight(t, a, b), np.einsum("ijkl,jr,ip->prkl", t, b, a), rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge / forward properties
# --------------------------------------------------------------------------------------------------
@XP
@given(case=cases(), dtype=st.sampled_from(["float32", "float64"]), copy=st.booleans())
def test_merge_unmerge_round_trip(xp, case, dtype, copy):
    if not copy:
        skip_if_immutable(xp)
    p = case.params()
    W = to_xp(xp, case.weight(), getattr(xp, dtype))
    four, extra = tensors(p, xp, getattr(xp, dtype))
    W0 = to_np(W)
    merged = loha.merge(W, *four, scaling=case.s, layer=case.layer, copy=copy, **extra)
    assert_same_namespace(xp, merged)
    assert (merged is W) == (not copy)
    want = W0 + ref_delta(case, {k: to_np(v) for k, v in zip(KEYS, four + tuple(extra.values()))})
    absd = ref_delta(case, p, absolute=True)
    u = eps(dtype)
    assert np.all(np.abs(to_np(merged) - want) <= u * (2 * np.abs(W0) + (2 * n_terms(case) + 4) * absd))
    if copy:
        assert np.array_equal(to_np(W), W0), "copy=True modified the input"
    back = loha.unmerge(merged, *four, scaling=case.s, layer=case.layer, copy=copy, **extra)
    assert np.all(np.abs(to_np(back) - W0) <= 4 * u * (np.abs(W0) + absd))


@given(case=cases(), dtype=st.sampled_from(["float16", "bfloat16"]))
def test_half_precision_merge_rounds_once(case, dtype):
    p = case.params()
    W = case.weight().astype(np_dtype(dtype))
    four, extra = tensors(p, dtype=np.float32)
    merged = loha.merge(W, *four, scaling=case.s, layer=case.layer, **extra)
    assert merged.dtype == W.dtype
    exact = W.astype(np.float64) + ref_delta(case, {k: v.astype(np.float32).astype(np.float64) for k, v in p.items()})
    # one rounding of a float32 sum: within one half-precision ulp of the exact value
    u = eps(dtype)
    assert np.all(np.abs(merged.astype(np.float64) - exact) <= u * np.abs(exact) + 1e-6 * (1 + np.abs(exact)))
    back = loha.unmerge(merged, *four, scaling=case.s, layer=case.layer, **extra)
    absd = ref_delta(case, p, absolute=True)
    W0 = W.astype(np.float64)
    assert np.all(np.abs(back.astype(np.float64) - W0) <= 2 * u * (np.abs(W0) + absd) + 1e-6)


def _conv_input(case: Case, rng) -> tuple[np.ndarray, dict]:
    if case.kind == "Linear":
        return rng.standard_normal((3, case.shape[1])), {}
    c_in = case.shape[1] * case.groups
    spatial = (7,) if case.kind == "Conv1d" else (6, 5)
    kw = dict(stride=1, padding=1, dilation=1)
    return rng.standard_normal((2, c_in, *spatial)), kw


@XP
@given(case=cases(), dtype=st.sampled_from(["float32", "float64"]))
def test_merged_forward_equals_unmerged(xp, case, dtype):
    p = case.params()
    rng = np.random.default_rng(case.seed + 7)
    x, kw = _conv_input(case, rng)
    bias = rng.standard_normal(case.shape[0])
    dt = getattr(xp, dtype)
    Wx, xx, bx = to_xp(xp, case.weight(), dt), to_xp(xp, x, dt), to_xp(xp, bias, dt)
    four, extra = tensors(p, xp, dt)
    y = loha.forward(xx, Wx, *four, scaling=case.s, bias=bx, layer=case.layer, **extra, **kw)
    assert_same_namespace(xp, y)
    merged = loha.merge(Wx, *four, scaling=case.s, layer=case.layer, **extra)
    y_merged = case.layer.base_forward(xx, merged, bx, xp, **kw)
    # float64 reference: the base layer with W + ΔW
    Wd = case.weight() + ref_delta(case, p)
    absw = np.abs(case.weight()) + ref_delta(case, p, absolute=True)
    want, mag = ref_base_forward(x, Wd, absw, bias, groups=case.groups, **kw)
    K = math.prod(case.shape[1:])
    tol = (K + 2 * n_terms(case) + 8) * eps(dtype) * mag + 1e-300
    assert np.all(np.abs(to_np(y) - want) <= tol)
    assert np.all(np.abs(to_np(y_merged) - want) <= tol)


def test_forward_half_precision_base_is_rounded_once():
    case = Case("Linear", (5, 7), 1, False, 2, 3.0, 0)
    p = case.params()
    W = case.weight().astype(BF16)
    x = np.random.default_rng(1).standard_normal((4, 7)).astype(BF16)
    four, _ = tensors(p, dtype=np.float32)
    y = loha.forward(x, W, *four, scaling=case.s)
    assert y.dtype == BF16
    want = (x.astype(np.float32) @ W.astype(np.float32).T) + x.astype(np.float64) @ ref_delta(case, p).T
    assert np.all(np.abs(y.astype(np.float64) - want) <= 2 * eps("bfloat16") * np.abs(want) + 1e-2)


# --------------------------------------------------------------------------------------------------
# Dropout options (explicit, seeded, off by default)
# --------------------------------------------------------------------------------------------------
def test_rank_dropout_rows_and_seed():
    case = Case("Linear", (64, 5), 1, False, 2, 2.0, 0)
    p = case.params()
    four, _ = tensors(p)
    W = case.weight()
    x = np.random.default_rng(2).standard_normal((3, 5))
    base = x @ W.T
    full = loha.forward(x, W, *four, scaling=case.s) - base
    y1 = loha.forward(x, W, *four, scaling=case.s, rank_dropout=0.5, seed=11) - base
    y2 = loha.forward(x, W, *four, scaling=case.s, rank_dropout=0.5, seed=11) - base
    np.testing.assert_array_equal(y1, y2)
    mask = loha.rank_dropout_mask(64, 0.5, seed=np.random.default_rng(11))
    kept = mask > 0
    assert 0 < kept.sum() < 64 and np.allclose(mask[kept], 64 / kept.sum())
    np.testing.assert_allclose(y1, full * mask[None, :], rtol=1e-12, atol=1e-12)
    # module dropout 1.0 always skips; explicit row_mask wins over the drawn one
    np.testing.assert_allclose(loha.forward(x, W, *four, scaling=case.s, module_dropout=1.0, seed=0), base)
    rm = np.zeros(64); rm[3] = 2.0
    y3 = loha.forward(x, W, *four, scaling=case.s, rank_dropout=0.5, seed=5, row_mask=rm) - base
    np.testing.assert_allclose(y3[:, 3], 2 * full[:, 3], rtol=1e-12)
    assert np.all(y3[:, np.arange(64) != 3] == 0)


def test_module_forward_training_flag():
    cfg = LoHaConfig(r=2, alpha=4, rank_dropout=0.5, module_dropout=0.0)
    layer = Layer.of((16, 6))
    params = loha.init_weights(layer, 2, init_weights=False, seed=0)
    mod = LoHaModule("lin", cfg, params, layer)
    W = np.random.default_rng(0).standard_normal((16, 6)).astype(np.float32)
    x = np.ones((2, 6), np.float32)
    np.testing.assert_array_equal(mod.forward(x, W), loha.forward(x, W, *(params[k] for k in KEYS[:4]), scaling=2.0))
    assert not np.array_equal(mod.forward(x, W, training=True, seed=1), mod.forward(x, W))


# --------------------------------------------------------------------------------------------------
# Memory: no temporary of W's size for copy=False, only the result for copy=True
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,effective", [((512, 384), False), ((256, 64, 3, 3), True)])
def test_merge_memory(monkeypatch, shape, effective):
    monkeypatch.setattr(_lycoris, "BLOCK_ELEMENTS", 1 << 12)
    layer = Layer.of(shape)
    p = loha.init_weights(layer, 4, init_weights=False, effective=effective, seed=0)
    W = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    four = [p[k] for k in KEYS[:4]]
    extra = dict(t1=p.get("hada_t1"), t2=p.get("hada_t2"))
    _, peak = traced_peak(lambda: loha.merge(W, *four, scaling=1.0, layer=layer, copy=False, **extra))
    assert peak < W.nbytes / 4, f"in-place merge allocated {peak} bytes for a {W.nbytes}-byte weight"
    _, peak = traced_peak(lambda: loha.merge(W, *four, scaling=1.0, layer=layer, copy=True, **extra))
    assert peak < 1.25 * W.nbytes


# --------------------------------------------------------------------------------------------------
# Errors: clear, of the project's hierarchy, nothing modified
# --------------------------------------------------------------------------------------------------
def test_transformers_conv1d_is_unsupported():
    cfg = LoHaConfig(r=2)
    params = loha.init_weights(Layer.of((6, 4)), 2, seed=0)
    with pytest.raises(UnsupportedError, match="h.0.attn.c_attn.*Conv1D"):
        LoHaModule.infer_layer("h.0.attn.c_attn", cfg, params, (4, 6), kind="Conv1D")
    with pytest.raises(UnsupportedError, match="Embedding"):
        LoHaModule.initialize("emb", cfg, Layer.of((10, 4), "Embedding"))


def test_shape_mismatch_names_module_and_leaves_weight():
    cfg = LoHaConfig(r=2)
    params = loha.init_weights(Layer.of((6, 4)), 2, init_weights=False, seed=0)
    ad = Adapter(cfg, {"blk.q": params})
    W = np.ones((6, 5), np.float32)
    with pytest.raises(ShapeError, match=r"blk\.q.*hada_w1_b.*\(2, 4\).*\(2, 5\)"):
        ad.merge({"blk.q.weight": W}, copy=False)
    assert np.all(W == 1)
    with pytest.raises(ShapeError, match="rank 2 but the config gives r=3"):
        Adapter(LoHaConfig(r=3), {"blk.q": params}).merge({"blk.q.weight": np.ones((6, 4), np.float32)})
    eff = loha.init_weights(Layer.of((6, 4, 3, 3)), 2, effective=True, seed=0)
    with pytest.raises(ShapeError, match="use_effective_conv2d"):
        Adapter(cfg, {"c": eff}).merge({"c.weight": np.ones((6, 4, 3, 3), np.float32)})


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    layer = Layer.of((4, 3))
    p = loha.init_weights(layer, 2, init_weights=False, seed=0)
    p["hada_w1_a"][0, 0] = np.inf
    W = np.ones((4, 3), np.float32)
    with pytest.raises(NonFiniteError, match="loha.merge"):
        loha.merge(W, *(p[k] for k in KEYS[:4]), scaling=1.0, copy=False, safe=True)
    assert np.all(W == 1)


def test_read_only_weight_copy_false():
    p = loha.init_weights(Layer.of((4, 3)), 2, seed=0)
    W = np.ones((4, 3), np.float32)
    W.flags.writeable = False
    with pytest.raises(UnsupportedError, match="copy=False"):
        loha.merge(W, *(p[k] for k in KEYS[:4]), scaling=1.0, copy=False)
    assert loha.merge(W, *(p[k] for k in KEYS[:4]), scaling=1.0).shape == (4, 3)


# --------------------------------------------------------------------------------------------------
# Adapter level and checkpoints
# --------------------------------------------------------------------------------------------------
def test_adapter_merge_unmerge_and_save_load(tmp_path):
    import peftmath as pm

    cfg = LoHaConfig(r=2, alpha=5, rank_pattern={"conv": 3}, use_effective_conv2d=True, init_weights=False,
                     target_modules=["q", "conv"])
    layers = {"blk.q": Layer.of((8, 6)), "blk.conv": Layer.of((6, 4, 3, 3))}
    params = {n: LoHaModule.initialize(n, cfg, lay, seed=i)[0] for i, (n, lay) in enumerate(layers.items())}
    ad = Adapter(cfg, params)
    rng = np.random.default_rng(0)
    state = {f"{n}.weight": rng.standard_normal(lay.weight_shape).astype(np.float32) for n, lay in layers.items()}
    merged = ad.merge(state)
    for n in layers:
        np.testing.assert_allclose(merged[f"{n}.weight"], state[f"{n}.weight"] + ad.delta_weight(
            n, weight_shape=layers[n].weight_shape), rtol=1e-6, atol=1e-6)
    back = ad.unmerge(merged)
    for k in state:
        np.testing.assert_allclose(back[k], state[k], atol=1e-5)
    pm.save_adapter(ad, tmp_path / "a")
    loaded = pm.load_adapter(tmp_path / "a")
    drop = ("inference_mode", "peft_version")
    assert {k: v for k, v in loaded.config.to_dict().items() if k not in drop} == \
        {k: v for k, v in cfg.to_dict().items() if k not in drop}
    assert sorted(loaded.params) == sorted(params)
    for n in params:
        for k, v in params[n].items():
            np.testing.assert_array_equal(np.asarray(loaded.params[n][k]), v)
    assert {k.split(".")[-1] for k in loaded.state_dict()} == set(KEYS)


def test_examples_are_valid():
    for label, fields in loha.EXAMPLES.items():
        cfg = LoHaConfig(**fields)
        assert cfg.alpha != cfg.r, label
        for layer in (Layer.of((8, 6)), Layer.of((6, 4, 3, 3))):
            params, _ = LoHaModule.initialize("m", cfg, layer, seed=0)
            assert np.abs(LoHaModule("m", cfg, params, layer).delta_weight()).max() > 0
