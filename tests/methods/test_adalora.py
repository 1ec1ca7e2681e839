"""AdaLoRA (peftmath.methods.adalora): SVD-form math on every backend, the rank allocator, checkpoints.

Tolerances are componentwise, with ``u`` the dtype's epsilon, ``c = s / (ranknum + 1e-5)`` and
``|ΔW|ₐ = c·|B| (|A| ⊙ |E|)`` (the magnitude the float32 product is accurate to):

* delta:            ``|ΔW − ΔW₆₄| ≤ (r + 3)·u·|ΔW|ₐ``
* merge:            ``|W' − (W + ΔW)| ≤ (r + 4)·u·(|W| + |ΔW|ₐ)``
* merge → unmerge:  ``|W'' − W| ≤ 4·u·(|W| + |ΔW|ₐ)``   (half dtypes: ``2·u_half·(|W| + |ΔW|) + float32 error``)
* forward:          ``|y − y₆₄| ≤ (K + r + 4)·u·(|x|·(|W| + |ΔW|ₐ) + |b|)``, K = fan-in
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import (BF16, XP, assert_same_namespace, f64, floor, np_dtype, ratio, skip_if_immutable, to_np,
                           to_xp)
import peftmath as pm
from peftmath._array import eps
from peftmath.errors import ConfigError, NonFiniteError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import adalora
from peftmath.methods.adalora import AdaLoraConfig, AdaLoraModule

KINDS = ("Linear", "Conv1D", "Conv2d")
KERNELS = [(1, 1), (3, 3), (2, 3)]


@dataclass
class Case:
    kind: str
    out: int
    inn: int
    kernel: tuple
    r: int
    s: float
    ranknum: int
    seed: int

    @property
    def layer(self):
        return Layer.of(self.weight_shape, self.kind)

    @property
    def weight_shape(self):
        return (self.inn, self.out) if self.kind == "Conv1D" else (self.out, self.inn, *self.kernel)

    @property
    def c(self):
        return self.s / (self.ranknum + 1e-5)

    def arrays(self, dtype="float64"):
        rng = np.random.default_rng(self.seed)
        dt = np_dtype(dtype)
        W = rng.standard_normal(self.weight_shape).astype(dt)
        A = rng.standard_normal((self.r, self.inn * math.prod(self.kernel))).astype(dt)
        E = rng.standard_normal((self.r, 1)).astype(dt)
        B = rng.standard_normal((self.out, self.r)).astype(dt)
        b = rng.standard_normal(self.out).astype(dt)
        return W, A, E, B, b

    def ref_delta(self, A, E, B, absolute=False):
        A2, E2, B2 = f64(A), f64(E), f64(B)
        if absolute:
            A2, E2, B2 = np.abs(A2), np.abs(E2), np.abs(B2)
        M = self.c * B2 @ (A2 * E2)
        return M.T if self.kind == "Conv1D" else M.reshape(self.weight_shape)


@st.composite
def cases(draw, kinds=KINDS, max_dim=9, max_r=6):
    kind = draw(st.sampled_from(kinds))
    kernel = draw(st.sampled_from(KERNELS)) if kind == "Conv2d" else ()
    r = draw(st.integers(1, max_r))
    return Case(kind, draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim)), kernel, r,
                draw(st.floats(1e-2, 32.0)), r + draw(st.integers(0, 6)), draw(st.integers(0, 2**32 - 1)))


def kw(case):
    return dict(scaling=case.s, ranknum=case.ranknum, layer=case.layer)


# --------------------------------------------------------------------------------------------------
# delta, merge, unmerge
# --------------------------------------------------------------------------------------------------
@XP
@given(case=cases(), dtype=st.sampled_from(["float32", "float64"]), compat=st.booleans())
def test_delta_merge_unmerge(xp, case, dtype, compat):
    W, A, E, B, _ = case.arrays(dtype)
    Wx, Ax, Ex, Bx = (to_xp(xp, a) for a in (W, A, E, B))
    u = eps(dtype)
    dW, dWa = case.ref_delta(A, E, B), case.ref_delta(A, E, B, absolute=True)

    d = adalora.delta_weight(Ax, Ex, Bx, peft_compat=compat, **kw(case))
    assert_same_namespace(xp, d)
    assert tuple(d.shape) == case.weight_shape
    assert ratio(np.abs(to_np(d) - dW), (case.r + 3) * u * dWa) <= 1

    merged = adalora.merge(Wx, Ax, Ex, Bx, peft_compat=compat, **kw(case))
    assert_same_namespace(xp, merged)
    assert merged.dtype == Wx.dtype
    np.testing.assert_array_equal(to_np(Wx), f64(W))  # copy=True: input untouched
    assert ratio(np.abs(to_np(merged) - (f64(W) + dW)), (case.r + 4) * u * (np.abs(f64(W)) + dWa)) <= 1

    back = adalora.unmerge(merged, Ax, Ex, Bx, peft_compat=compat, **kw(case))
    assert_same_namespace(xp, back)
    assert ratio(np.abs(to_np(back) - f64(W)), 4 * u * (np.abs(f64(W)) + dWa)) <= 1


@XP
@given(case=cases(), dtype=st.sampled_from(["float32", "float64"]))
def test_copy_false_is_in_place(xp, case, dtype):
    skip_if_immutable(xp)
    W, A, E, B, _ = case.arrays(dtype)
    Ax, Ex, Bx = (to_xp(xp, a) for a in (A, E, B))
    u = eps(dtype)
    dW, dWa = case.ref_delta(A, E, B), case.ref_delta(A, E, B, absolute=True)
    target = to_xp(xp, W.copy())
    out = adalora.merge(target, Ax, Ex, Bx, copy=False, **kw(case))
    assert out is target
    assert ratio(np.abs(to_np(target) - (f64(W) + dW)), (case.r + 4) * u * (np.abs(f64(W)) + dWa)) <= 1
    out = adalora.unmerge(target, Ax, Ex, Bx, copy=False, **kw(case))
    assert out is target
    assert ratio(np.abs(to_np(target) - f64(W)), 4 * u * (np.abs(f64(W)) + dWa)) <= 1


def test_copy_false_numpy_uses_the_weights_memory():
    for kind, shape in (("Linear", (6, 5)), ("Conv1D", (5, 6)), ("Conv2d", (6, 2, 3, 3))):
        case = Case(kind, 6, 5 if kind != "Conv2d" else 2, (3, 3) if kind == "Conv2d" else (), 3, 4.0, 5, 1)
        W, A, E, B, _ = case.arrays("float32")
        alias = W.reshape(-1)
        ref = adalora.merge(W, A, E, B, **kw(case))
        assert adalora.merge(W, A, E, B, copy=False, **kw(case)) is W
        assert np.shares_memory(alias, W)
        np.testing.assert_allclose(W, ref, rtol=1e-6, atol=1e-6)


@given(case=cases(), dtype=st.sampled_from(["float16", "bfloat16"]), copy=st.booleans(),
       factors=st.sampled_from(["half", "float32"]))
def test_half_merge_unmerge(case, dtype, copy, factors):
    dt = np_dtype(dtype)
    W, A, E, B, _ = case.arrays(dtype)
    if factors == "float32":
        A, E, B = (a.astype(np.float32) for a in (A, E, B))
    Win = W.copy()
    merged = adalora.merge(Win, A, E, B, copy=copy, **kw(case))
    assert merged.dtype == dt and (merged is Win) == (not copy)
    dW, dWa = case.ref_delta(A, E, B), case.ref_delta(A, E, B, absolute=True)
    exact = f64(W) + dW
    bound = 0.5 * eps(dt) * np.abs(exact) * (1 + eps(dt)) + (case.r + 4) * 2.0**-23 * (np.abs(f64(W)) + dWa) + floor(dt)
    assert ratio(np.abs(f64(merged) - exact), bound) <= 1
    back = adalora.unmerge(merged, A, E, B, copy=copy, **kw(case))
    assert ratio(np.abs(f64(back) - f64(W)), 2 * eps(dt) * (np.abs(f64(W)) + np.abs(dW)) + 2 * floor(dt)
                 + (case.r + 4) * 2.0**-23 * dWa) <= 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_peft_compat_rounds_after_every_step(dtype):
    """peft_compat=True on half factors: round(round(round(B @ round(A*E)) * s) / round(ranknum + 1e-5))."""
    dt = np_dtype(dtype)
    case = Case("Linear", 12, 10, (), 4, 3.3, 6, 5)
    _, A, E, B, _ = case.arrays(dtype)

    def rnd(x):
        return x.astype(dt).astype(np.float32)

    ae = rnd(A.astype(np.float32) * E.astype(np.float32))
    p = rnd(rnd(B.astype(np.float32) @ ae) * np.float32(3.3))
    want = rnd(p / rnd(np.float32(6.0) + np.float32(1e-5)))
    got = adalora.delta_weight(A, E, B, scaling=3.3, ranknum=6, peft_compat=True)
    np.testing.assert_array_equal(got, want)
    default = adalora.delta_weight(A, E, B, scaling=3.3, ranknum=6)
    exact = case.ref_delta(A, E, B)
    # the default rounds only at the end: never further from the float64 value than one half ulp + f32 error
    assert np.max(np.abs(f64(default) - exact)) <= np.max(np.abs(f64(got) - exact)) + 1e-5


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
def ref_forward(case, x, W, A, E, B, b, conv_kw):
    import torch

    dW = case.ref_delta(A, E, B)
    Wt = f64(W) + dW
    if case.kind == "Linear":
        return f64(x) @ Wt.T + f64(b)
    if case.kind == "Conv1D":
        return f64(x) @ Wt + f64(b)
    return torch.nn.functional.conv2d(torch.from_numpy(f64(x)), torch.from_numpy(Wt), torch.from_numpy(f64(b)),
                                      **conv_kw).numpy()


@XP
@given(case=cases(), dtype=st.sampled_from(["float32", "float64"]),
       stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2))
def test_forward_merged_equals_unmerged(xp, case, dtype, stride, padding, dilation):
    pytest.importorskip("torch")
    W, A, E, B, b = case.arrays(dtype)
    rng = np.random.default_rng(case.seed + 1)
    conv_kw = dict(stride=stride, padding=padding, dilation=dilation) if case.kind == "Conv2d" else {}
    if case.kind == "Conv2d":
        x = rng.standard_normal((2, case.inn, 7, 8)).astype(dtype)
    else:
        x = rng.standard_normal((2, 3, case.inn)).astype(dtype)
    X, Wx, Ax, Ex, Bx, bx = (to_xp(xp, a) for a in (x, W, A, E, B, b))
    y = adalora.forward(X, Wx, Ax, Ex, Bx, bias=bx, **kw(case), **conv_kw)
    assert_same_namespace(xp, y)
    assert y.dtype == Wx.dtype
    merged = adalora.merge(Wx, Ax, Ex, Bx, **kw(case))
    y_merged = case.layer.base_forward(X, merged, bx, xp, **conv_kw)
    want = ref_forward(case, x, W, A, E, B, b, conv_kw)
    u = eps(dtype)
    K = case.inn * math.prod(case.kernel)
    Wabs = np.abs(f64(W)) + case.ref_delta(A, E, B, absolute=True)
    if case.kind == "Conv2d":
        import torch

        mag = torch.nn.functional.conv2d(torch.from_numpy(np.abs(f64(x))), torch.from_numpy(Wabs), **conv_kw).numpy()
    else:
        mag = np.abs(f64(x)) @ (Wabs.T if case.kind == "Linear" else Wabs)
    babs = np.abs(f64(b)).reshape(-1, 1, 1) if case.kind == "Conv2d" else np.abs(f64(b))
    unit = (K + case.r + 4) * u * (mag + babs)
    assert ratio(np.abs(to_np(y) - want), unit) <= 1
    assert ratio(np.abs(to_np(y_merged) - want), unit) <= 1


def test_forward_dropout_callable_and_bf16_output():
    case = Case("Linear", 7, 5, (), 3, 2.0, 3, 0)
    W, A, E, B, b = case.arrays("float32")
    x = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
    seen = []
    y = adalora.forward(x, W, A, E, B, bias=b, scaling=2.0, dropout=lambda t: seen.append(t.dtype) or t * 0)
    np.testing.assert_allclose(y, x @ W.T + b, rtol=1e-6, atol=1e-6)  # the adapter sees the dropped input
    assert seen == [np.float32]
    yb = adalora.forward(x.astype(BF16), W.astype(BF16), A, E, B, scaling=2.0)
    assert yb.dtype == BF16


# --------------------------------------------------------------------------------------------------
# Module: checkpoints, rank_pattern, ranknum
# --------------------------------------------------------------------------------------------------
def _config(**kw):
    base = dict(init_r=6, target_r=3, lora_alpha=10, total_step=20, target_modules=["q"])
    base.update(kw)
    cfg = AdaLoraConfig(**base)
    cfg.validate()
    return cfg


def test_pruned_module_uses_init_r_as_ranknum():
    """Truncated tensors + rank_pattern == the full-rank adapter with masked E, both divided by init_r."""
    layer = Layer.of((9, 7))
    full = adalora.init_weights(layer, 6, init_lora_weights=False, seed=3)
    mask = [True, False, True, True, False, True]
    masked = adalora.apply_masks({"m.q": full}, {"m.q": mask})["m.q"]
    trunc = adalora.resize_by_rank_pattern({"m.q": full}, {"m.q.lora_E": mask})["m.q"]
    assert trunc["lora_A"].shape == (4, 7) and trunc["lora_B"].shape == (9, 4)
    full_mod = AdaLoraModule("m.q", _config(), masked, layer)
    cfg = _config(rank_pattern=adalora.rank_pattern_for_config({"m.q": mask}))
    trunc_mod = AdaLoraModule("m.q", cfg, trunc, layer)
    assert trunc_mod.r == 4 and trunc_mod.ranknum == 6.0 and full_mod.ranknum == 6.0
    np.testing.assert_allclose(trunc_mod.delta_weight(), full_mod.delta_weight(), rtol=1e-6, atol=1e-7)
    # with lora_alpha <= 0, PEFT's s is the module's current rank (4), the divisor still init_r
    cfg0 = _config(lora_alpha=0, rank_pattern=cfg.rank_pattern)
    m0 = AdaLoraModule("m.q", cfg0, trunc, layer)
    assert m0.scaling == 4.0
    np.testing.assert_allclose(m0.delta_weight(), full_mod.delta_weight() * (4.0 / 10), rtol=1e-6, atol=1e-7)


def test_rank_pattern_errors_name_module_and_numbers():
    layer = Layer.of((9, 7))
    trunc = adalora.resize_by_rank_pattern({"m.q": adalora.init_weights(layer, 6, seed=0)},
                                           {"m.q": [True, True, False, True, False, True]})["m.q"]
    bad_len = _config(rank_pattern={"m.q.lora_E": [True] * 4 + [False] * 3})
    with pytest.raises(ShapeError, match=r"m\.q.*7 entries but init_r=6"):
        AdaLoraModule("m.q", bad_len, trunc, layer)
    bad_sum = _config(rank_pattern={"m.q.lora_E": [True] * 5 + [False]})
    with pytest.raises(ShapeError, match=r"m\.q.*keeps 5 of 6.*r=4"):
        AdaLoraModule("m.q", bad_sum, trunc, layer)
    with pytest.raises(ShapeError, match=r"m\.q: lora_A has 4 rows but init_r=6"):
        AdaLoraModule("m.q", _config(), trunc, layer)
    with pytest.raises(ShapeError, match=r"lora_B has shape \(9, 4\), expected \(8, 4\)"):
        AdaLoraModule("m.q", _config(rank_pattern=bad_sum.rank_pattern | {"m.q.lora_E": [True] * 4 + [False] * 2}),
                      trunc, Layer.of((8, 7)))
    with pytest.raises(ShapeError, match="entries, lora_E has r=6"):
        adalora.apply_masks({"q": adalora.init_weights(layer, 6)}, {"q": [True] * 5})


def test_unsupported_layers_and_missing_tensors():
    p = adalora.init_weights(Layer.of((4, 3)), 2)
    with pytest.raises(UnsupportedError, match="Embedding"):
        adalora.parameter_shapes(Layer.of((4, 3), "Embedding"), 2)
    with pytest.raises(UnsupportedError, match="groups=2"):
        adalora.parameter_shapes(Layer.of((4, 1, 3, 3), groups=2), 2)
    with pytest.raises(UnsupportedError, match="Conv1d"):
        adalora.parameter_shapes(Layer.of((4, 3, 3)), 2)
    with pytest.raises(ShapeError, match="missing lora_E"):
        AdaLoraModule.infer_layer("q", _config(), {"lora_A": p["lora_A"], "lora_B": p["lora_B"]}, (4, 3))
    with pytest.raises(ShapeError, match="kernel"):
        adalora.delta_weight(p["lora_A"], p["lora_E"], p["lora_B"], scaling=1.0, layer="Conv2d")


def test_infer_layer_kinds():
    cfg = _config()
    p = adalora.init_weights(Layer.of((5, 3)), 6)
    assert AdaLoraModule.infer_layer("q", cfg, p, (5, 3)).kind.value == "Linear"
    assert AdaLoraModule.infer_layer("q", cfg, p, (3, 5)).kind.value == "Conv1D"
    assert AdaLoraModule.infer_layer("q", cfg, p).kind.value == "Linear"
    pc = adalora.init_weights(Layer.of((5, 2, 3, 3)), 6)
    lay = AdaLoraModule.infer_layer("q", cfg, pc, (5, 2, 3, 3))
    assert lay.kind.value == "Conv2d" and lay.matrix_shape == (5, 18)
    with pytest.raises(ShapeError, match="fits neither"):
        AdaLoraModule.infer_layer("q", cfg, p, (4, 4))


def test_merge_validates_before_writing_and_safe_merge():
    case = Case("Linear", 5, 4, (), 2, 1.0, 2, 0)
    W, A, E, B, _ = case.arrays("float32")
    W0 = W.copy()
    with pytest.raises(ShapeError):
        adalora.merge(W, A[:, :3], E, B, scaling=1.0, copy=False)
    np.testing.assert_array_equal(W, W0)
    E_bad = E.copy()
    E_bad[0, 0] = np.inf
    with pytest.raises(NonFiniteError):
        adalora.merge(W, A, E_bad, B, scaling=1.0, copy=False, safe=True)
    np.testing.assert_array_equal(W, W0)


def test_initialize_and_init_distributions(xp):
    cfg = _config()
    layer = Layer.of((64, 48))
    p, new_w = AdaLoraModule.initialize("q", cfg, layer, seed=0, xp=xp)
    assert new_w is None
    assert_same_namespace(xp, *p.values())
    a, e, b = (to_np(p[k]) for k in ("lora_A", "lora_E", "lora_B"))
    assert a.shape == (6, 48) and e.shape == (6, 1) and b.shape == (64, 6)
    assert np.all(e == 0) and abs(a.std() - 0.02) < 0.003 and abs(b.std() - 0.02) < 0.003
    q, _ = AdaLoraModule.initialize("q", cfg, layer, seed=0, xp=xp, init=False)
    assert abs(to_np(q["lora_A"]).std() - 1) < 0.1 and np.all(to_np(q["lora_E"]) != 0)
    # the same seed gives the same numbers on every backend
    ref, _ = AdaLoraModule.initialize("q", cfg, layer, seed=0, init=False)
    np.testing.assert_array_equal(to_np(q["lora_B"]), f64(ref["lora_B"]))
    # a config with a rank pattern gives the truncated tensors a checkpoint holds
    cfg_p = _config(rank_pattern={"q.lora_E": [True, False] * 3})
    pp, _ = AdaLoraModule.initialize("q", cfg_p, layer, seed=0, xp=xp, dtype=xp.float64)
    assert pp["lora_A"].shape == (3, 48) and pp["lora_A"].dtype == xp.float64
    AdaLoraModule("q", cfg_p, pp, layer)


def test_examples_build_on_every_kind():
    for label, fields in adalora.EXAMPLES.items():
        cfg = AdaLoraConfig(**fields, target_modules=["q"])
        cfg.validate()
        assert cfg.lora_alpha != cfg.init_r
        for shape, kind in (((8, 6), "Linear"), ((6, 8), "Conv1D"), ((8, 3, 3, 3), "Conv2d")):
            layer = Layer.of(shape, kind)
            p, _ = AdaLoraModule.initialize("q", cfg, layer, seed=1)
            assert np.all(p["lora_E"] != 0), label
            mod = AdaLoraModule("q", cfg, p, layer)
            W = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            back = mod.unmerge(mod.merge(W).weight).weight
            np.testing.assert_allclose(back, W, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    masks = {"a.q": [True, False, True, True, False, False], "a.v": [True] * 6}
    cfg = _config(target_modules=["q", "v"], rank_pattern=adalora.rank_pattern_for_config(masks))
    layers = {"a.q": Layer.of((9, 7)), "a.v": Layer.of((7, 9), "Conv1D")}
    params = {n: AdaLoraModule.initialize(n, cfg, lay, seed=i, init=False)[0] for i, (n, lay) in enumerate(layers.items())}
    ad = pm.Adapter(cfg, params)
    pm.save_adapter(ad, tmp_path / "ad")
    back = pm.load_adapter(tmp_path / "ad")
    assert back.peft_type == "ADALORA" and back.config.rank_pattern == cfg.rank_pattern
    assert sorted(back.params["a.q"]) == ["lora_A", "lora_B", "lora_E"]
    state = {"a.q.weight": np.ones((9, 7), np.float32), "a.v.weight": np.ones((7, 9), np.float32)}
    kinds = {"a.v": "Conv1D"}
    m1, m2 = ad.merge(state, layer_kinds=kinds), back.merge(state, layer_kinds=kinds)
    for k in state:
        np.testing.assert_array_equal(m1[k], m2[k])
    import json

    data = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert data["peft_type"] == "ADALORA" and data["init_r"] == 6 and data["total_step"] == 20


# --------------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, match", [
    (dict(total_step=None), "total_step"),
    (dict(total_step=0), "total_step"),
    (dict(total_step=10, tinit=5, tfinal=5), r"tinit=5 >= total_step - tfinal = 5"),
    (dict(init_r=-1), "init_r"),
    (dict(use_dora=True), "DoRA"),
    (dict(loftq_config={"loftq_bits": 4}), "LoftQ"),
    (dict(orth_reg_weight=-0.1), "orth_reg_weight"),
    (dict(rank_pattern={"q.lora_E": [1, 0]}), "rank_pattern"),
])
def test_config_errors(fields, match):
    base = dict(total_step=20)
    base.update(fields)
    with pytest.raises(ConfigError, match=match):
        AdaLoraConfig(**base).validate()


#: fields LoRA and AdaLoRA share, each with a bad value and the field the refusal must name
SHARED_BAD_FIELDS = [
    (dict(lora_alpha="8"), "lora_alpha"),
    (dict(lora_dropout=1.5), "lora_dropout"),
    (dict(bias="some"), "bias"),
    (dict(fan_in_fan_out="yes"), "fan_in_fan_out"),
    (dict(init_lora_weights="uniform"), "init_lora_weights"),
    (dict(lora_bias=True, init_lora_weights="gaussian"), "lora_bias"),   # PEFT's LoraConfig rule
    (dict(init_lora_weights="loftq"), "loftq_config"),                    # 'loftq' without its config
    (dict(loftq_config="4 bits"), "loftq_config"),                        # not an object
]


@pytest.mark.parametrize("fields, field", SHARED_BAD_FIELDS)
def test_config_refuses_bad_shared_lora_fields_as_lora_does(fields, field):
    """AdaLoraConfig runs every check of the fields it shares with LoraConfig (PEFT's AdaLoraConfig runs
    LoraConfig.__post_init__ first): the same ConfigError, word for word, as LoraConfig's."""
    from peftmath.methods.lora import LoraConfig

    with pytest.raises(ConfigError, match=field) as lora_err:
        LoraConfig(**fields).validate()
    with pytest.raises(ConfigError, match=field) as ada_err:
        AdaLoraConfig(total_step=20, **fields).validate()
    assert str(ada_err.value) == str(lora_err.value)


def test_config_shared_checks_leave_lora_only_fields_alone():
    """r and LoRA's patterns are not AdaLoRA's: r=0 is ignored (PEFT ignores r) and rank_pattern is a mask."""
    AdaLoraConfig(total_step=20, r=0, rank_pattern={"q.lora_E": [True, False] * 6}).validate()
    with pytest.raises(ConfigError, match="'r'"):
        from peftmath.methods.lora import LoraConfig

        LoraConfig(r=0).validate()


def test_config_from_peft_dict_round_trip():
    from peftmath.io.peft import config_from_dict

    data = {"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "total_step": 9, "lora_alpha": 8,
            "rank_pattern": {"x.lora_E": [True, False, True, True]}, "r": 8, "use_qalora": False}
    cfg = config_from_dict(data)
    assert isinstance(cfg, AdaLoraConfig) and cfg.rank_mask("x") == [True, False, True, True]
    assert cfg.rank_and_alpha("x") == (3, 8) and cfg.rank_and_alpha("y") == (4, 8)
    out = cfg.to_dict()
    assert out["use_qalora"] is False and out["rank_pattern"] == data["rank_pattern"]
    with pytest.raises(ConfigError, match="tinit"):
        config_from_dict({**data, "tinit": 9})
    assert adalora.rank_scale(8, 4) == cfg.rank_scale_for("x")
    with pytest.raises(ConfigError, match="r must be a non-negative integer"):
        adalora.parameter_shapes(Layer.of((3, 3)), -1)


# --------------------------------------------------------------------------------------------------
# Rank allocator
# --------------------------------------------------------------------------------------------------
def test_kthvalue_matches_sorting(xp):
    rng = np.random.default_rng(0)
    v = np.round(rng.standard_normal(25), 1)  # ties included
    for k in (1, 7, 25):
        assert float(adalora.kthvalue(to_xp(xp, v), k)) == np.sort(v)[k - 1]
    with pytest.raises(ShapeError, match="k=0"):
        adalora.kthvalue(to_xp(xp, v), 0)


def _model_params(seed, rs=(5, 4, 6), dtype=np.float64):
    rng = np.random.default_rng(seed)
    shapes = {"l0": (7, 5), "l1": (4, 9), "l2": (6, 6)}
    return {m: {"lora_A": rng.standard_normal((r, shapes[m][1])).astype(dtype),
                "lora_E": rng.standard_normal((r, 1)).astype(dtype),
                "lora_B": rng.standard_normal((shapes[m][0], r)).astype(dtype)}
            for m, r in zip(shapes, rs)}


def _reference_run(cfg, steps, seed):
    """An independent float64 transcription of the paper's loop (dicts of NumPy arrays)."""
    params = _model_params(0)
    rng = np.random.default_rng(seed)
    avg, unc, pattern, history = {}, {}, None, []
    init_bgt = sum(p["lora_A"].shape[0] for p in params.values())
    target = cfg.target_r * len(params)
    T, ti, tf = cfg.total_step, cfg.tinit, cfg.tfinal
    for t in range(1, steps + 1):
        grads = {m: {s: rng.standard_normal(a.shape) for s, a in p.items()} for m, p in params.items()}
        if t < T - tf:
            for m, p in params.items():
                for s, a in p.items():
                    i = np.abs(a * grads[m][s])
                    avg[(m, s)] = cfg.beta1 * avg.get((m, s), 0) + (1 - cfg.beta1) * i
                    unc[(m, s)] = cfg.beta2 * unc.get((m, s), 0) + (1 - cfg.beta2) * np.abs(i - avg[(m, s)])
        if t <= ti:
            budget, mask = init_bgt, False
        elif t > T - tf:
            budget, mask = target, True
        else:
            budget = int((init_bgt - target) * (1 - (t - ti) / (T - tf - ti)) ** 3 + target)
            mask = t % cfg.deltaT == 0 or t == T - tf
        if t > T - tf:
            masks = pattern
        elif mask:
            sc = {m: (avg[(m, "lora_E")] * unc[(m, "lora_E")]).ravel()
                  + (avg[(m, "lora_A")] * unc[(m, "lora_A")]).mean(axis=1)
                  + (avg[(m, "lora_B")] * unc[(m, "lora_B")]).mean(axis=0) for m in params}
            theta = np.sort(np.concatenate(list(sc.values())))[init_bgt - budget - 1]
            masks = pattern = {m: s > theta for m, s in sc.items()}
            if t == T - tf:
                avg, unc = {}, {}
        else:
            masks = None
        if masks is not None:
            for m in params:
                params[m]["lora_E"] = np.where(masks[m][:, None], params[m]["lora_E"], 0.0)
        history.append((grads, budget, None if masks is None else {m: v.copy() for m, v in masks.items()},
                        {m: dict(p) for m, p in params.items()}))
    return history


def test_allocate_matches_an_independent_transcription(xp):
    cfg = _config(total_step=10, tinit=2, tfinal=3, deltaT=2, target_r=3, beta1=0.7, beta2=0.9)
    history = _reference_run(cfg, 12, seed=4)
    params = {m: {s: to_xp(xp, a) for s, a in p.items()} for m, p in _model_params(0).items()}
    state = None
    for t, (grads, budget, masks, want_params) in enumerate(history, start=1):
        g = {m: {s: to_xp(xp, a) for s, a in p.items()} for m, p in grads.items()}
        state, got_masks, got_budget, theta = adalora.allocate(t, params, g, state, cfg)
        assert got_budget == budget, t
        assert (got_masks is None) == (masks is None), t
        if masks is not None:
            for m in masks:
                assert_same_namespace(xp, got_masks[m])
                np.testing.assert_array_equal(to_np(got_masks[m]).astype(bool), masks[m])
            params = adalora.apply_masks(params, got_masks)
        for m in params:
            np.testing.assert_allclose(to_np(params[m]["lora_E"]), want_params[m]["lora_E"], rtol=0, atol=0)
        if t == 7:  # T - tf: final mask, EMAs reset, budget = target
            assert got_budget == 9 and state.exp_avg_ipt == {} and theta is not None
            assert sum(int(np.sum(to_np(v))) for v in got_masks.values()) == 9
        if t > 7:
            assert theta is None and state.rank_pattern is got_masks


def test_allocate_edge_cases():
    cfg = _config(total_step=6, tinit=0, tfinal=2, deltaT=1, target_r=5)
    params = _model_params(1)  # init_bgt = 15 = target_bgt: k = 0 on every step
    grads = _model_params(2)
    state, masks, budget, theta = adalora.allocate(1, params, grads, None, cfg)
    assert budget == 15 and theta == -math.inf and all(bool(np.all(m)) for m in masks.values())
    with pytest.raises(ConfigError, match="step 5 > total_step - tfinal = 4"):
        adalora.allocate(5, params, grads, None, cfg)
    with pytest.raises(ConfigError, match="needs the sensitivity"):
        adalora.allocate(4, params, grads, None, cfg)
    with pytest.raises(ShapeError, match="needs gradients"):
        adalora.allocate(1, params, None, None, cfg)
    with pytest.raises(ShapeError, match="gradient of lora_A"):
        adalora.allocate(1, params, {**grads, "l0": {**grads["l0"], "lora_A": grads["l0"]["lora_A"][:, :2]}}, None, cfg)
    with pytest.raises(ConfigError, match="deltaT"):
        adalora.allocate(1, params, grads, None, _config(total_step=6, deltaT=0))
    with pytest.raises(ConfigError, match="beta1"):
        adalora.allocate(1, params, grads, None, _config(total_step=6, beta1=1.0))
    with pytest.raises(ConfigError, match="tinit"):
        adalora.allocate(1, params, grads, None, AdaLoraConfig(total_step=6, tinit=6))


def test_orthogonal_regularizer(xp):
    params = _model_params(3)
    want = np.mean([np.linalg.norm(p["lora_A"] @ p["lora_A"].T - np.eye(p["lora_A"].shape[0]))
                    for p in params.values()]
                   + [np.linalg.norm(p["lora_B"].T @ p["lora_B"] - np.eye(p["lora_B"].shape[1]))
                      for p in params.values()])
    got = adalora.orthogonal_regularizer({m: {s: to_xp(xp, a) for s, a in p.items()} for m, p in params.items()})
    assert_same_namespace(xp, got)
    assert abs(float(got) - want) <= 1e-12 * want
    assert adalora.orthogonal_regularizer({}) == 0.0


def test_resize_by_rank_pattern_backends(xp):
    params = {m: {s: to_xp(xp, a) for s, a in p.items()} for m, p in _model_params(5).items()}
    masks = {"l0": [False, True, True, False, True], "l1.lora_E": [True] * 4}
    out = adalora.resize_by_rank_pattern(params, masks)
    assert_same_namespace(xp, *out["l0"].values())
    np.testing.assert_array_equal(to_np(out["l0"]["lora_B"]), to_np(params["l0"]["lora_B"])[:, [1, 2, 4]])
    assert out["l1"]["lora_A"] is params["l1"]["lora_A"]  # nothing pruned: the same array
    with pytest.raises(ShapeError, match="l0: rank mask has 4 entries but lora_A has r=5"):
        adalora.resize_by_rank_pattern(params, {"l0": [True] * 4})
