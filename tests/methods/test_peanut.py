"""PEANuT's math against independent float64 computations: the tweaker network (every depth, the activations
against scalar formulas from Python's ``math``), ΔW, forward, merge and the record-based unmerge on every layout
and dtype; the refusals (no record, wrong shapes, unknown or stateful activations, depth mismatches)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import peftmath as pm
from peftmath.errors import ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from peftmath.layers import Layer, LayerKind
from peftmath.methods import peanut
from tests.helpers import assert_same_namespace, to_np, to_xp
from tests.methods.test_inplace_contract import _np_permuted, _np_sliced

BF16 = np.dtype(ml_dtypes.bfloat16)
LAYOUTS = {"C": lambda a: a.copy(), "F": np.asfortranarray, "permuted": _np_permuted,
           "sliced": lambda a: _np_sliced(a, 1)}


def _phi(name: str, v: float) -> float:
    """The activations, one scalar at a time, from their textbook definitions (Python's math)."""
    sig = 1.0 / (1.0 + math.exp(-v)) if v > -700 else 0.0
    gelu = 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))
    tanh_gelu, fast = (0.5 * v * (1.0 + math.tanh(c * (v + 0.044715 * v ** 3)))
                       for c in (math.sqrt(2.0 / math.pi), 0.7978845608))
    softplus = max(v, 0.0) + math.log1p(math.exp(-abs(v)))
    return {"relu": max(v, 0.0), "relu2": max(v, 0.0) ** 2, "relu6": min(max(v, 0.0), 6.0),
            "leaky_relu": v if v >= 0 else 0.01 * v, "linear": v, "sigmoid": sig, "tanh": math.tanh(v),
            "silu": v * sig, "swish": v * sig, "gelu": gelu, "gelu_python": gelu,
            "gelu_10": min(max(gelu, -10.0), 10.0), "gelu_new": tanh_gelu, "gelu_pytorch_tanh": tanh_gelu,
            "gelu_python_tanh": tanh_gelu, "gelu_fast": fast, "gelu_accurate": tanh_gelu,
            "quick_gelu": v / (1.0 + math.exp(-1.702 * v)), "mish": v * math.tanh(softplus),
            "hardswish": v * min(max(v + 3.0, 0.0), 6.0) / 6.0,
            "laplace": 0.5 * (1.0 + math.erf((v - 0.707107) / (0.282095 * math.sqrt(2.0)))),
            "sqrtsoftplus": math.sqrt(softplus)}[name]


@pytest.mark.parametrize("name", sorted(peanut.ACTIVATIONS))
def test_activations_match_their_scalar_definitions(name):
    x = np.concatenate([np.linspace(-12.0, 12.0, 481), [-1e-3, 0.0, 1e-3, 40.0, -40.0]])
    want = np.array([_phi(name, float(v)) for v in x])
    got = peanut.activation(name)(np, x)
    np.testing.assert_allclose(got, want, rtol=4e-15, atol=4e-15)
    got32 = peanut.activation(name)(np, x.astype(np.float32))
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, want, rtol=2e-6, atol=2e-6 * max(1.0, float(np.abs(want).max()) / 10))


def test_erf_against_math_erf():
    x = np.linspace(-30.0, 30.0, 60001)
    want = np.array([math.erf(v) for v in x])
    assert np.abs(peanut.erf(x) - want).max() < 1e-15
    assert np.abs(peanut.erf(x.astype(np.float32)) - want).max() < 4e-7


def _reference_hidden(W, A, encs, decs, name):
    """H by the paper's recursion, in float64, element by element through the scalar activation."""
    phi = np.vectorize(lambda v: _phi(name, float(v)))
    H = phi(W.astype(np.float64).T @ A.astype(np.float64).T)
    saved = []
    for E in encs:
        saved.append(H)
        H = phi(H @ E.astype(np.float64).T)
    for i, D in enumerate(decs):
        H = phi(H @ D.astype(np.float64).T) + saved[len(decs) - 1 - i]
    return H


def _params(rng, out, r, depth, dtype=np.float32):
    p = {"peanut_A.weight": rng.standard_normal((r, out)) / math.sqrt(out),
         "peanut_B.weight": rng.standard_normal((out, r)) * 0.3}
    for i in range(depth):
        p[f"peanut_encoders.{i}.weight"] = rng.standard_normal((r, r)) / math.sqrt(r)
        p[f"peanut_decoders.{i}.weight"] = rng.standard_normal((r, r)) / math.sqrt(r)
    return {k: v.astype(dtype) for k, v in p.items()}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("depth,act", [(0, "relu"), (1, "gelu"), (2, "tanh"), (3, "silu")])
def test_merge_forward_and_recorded_unmerge_against_float64(layout, dtype, depth, act):
    rng = np.random.default_rng(depth * 7 + len(act))
    out, inn, r, s = 9, 7, 3, 0.75
    p = _params(rng, out, r, depth, dtype)
    cfg = peanut.PeanutConfig(r=r, depth=depth, act_fn=act, scaling=s)
    mod = peanut.PeanutModule("m", cfg, p, Layer.of((out, inn)))
    W0 = rng.standard_normal((out, inn)).astype(dtype)
    W = LAYOUTS[layout](W0)
    b = rng.standard_normal(out).astype(dtype)
    encs = [p[f"peanut_encoders.{i}.weight"] for i in range(depth)]
    decs = [p[f"peanut_decoders.{i}.weight"] for i in range(depth)]
    H = _reference_hidden(W0, p["peanut_A.weight"], encs, decs, act)
    dW = s * p["peanut_B.weight"].astype(np.float64) @ H.T
    eps = float(np.finfo(dtype).eps)
    tol = 64 * eps * (np.abs(W0).max() + np.abs(dW).max() + 1)
    res = mod.merge(W)
    np.testing.assert_array_equal(W, W0)  # copy=True never writes
    np.testing.assert_allclose(res.weight, W0 + dW, atol=tol)
    np.testing.assert_allclose(res.record, H, atol=tol)
    x = rng.standard_normal((2, 3, inn)).astype(dtype)
    want_y = x.astype(np.float64) @ (W0 + dW).T + b
    np.testing.assert_allclose(mod.forward(x, W, b), want_y, atol=tol * float(np.abs(x).sum(-1).max()))
    back = mod.unmerge(res.weight, record=res.record)
    np.testing.assert_allclose(back.weight, W0, atol=tol)
    with pytest.raises(NotInvertibleError, match="needs H"):
        mod.unmerge(res.weight)
    with pytest.raises(ShapeError, match="record"):
        mod.unmerge(res.weight, record=res.record[:, :2])
    target = LAYOUTS[layout](W0)
    got = mod.merge(target, copy=False)
    assert got.weight is target
    np.testing.assert_allclose(target, res.weight, atol=tol)
    assert mod.unmerge(target, record=got.record, copy=False).weight is target
    np.testing.assert_allclose(target, W0, atol=tol)


def test_bfloat16_merge_rounds_once_and_peft_compat_rounds_the_delta_first():
    rng = np.random.default_rng(4)
    p = _params(rng, 16, 4, 1)
    mod = peanut.PeanutModule("m", peanut.PeanutConfig(r=4, depth=1, act_fn="gelu"), p, Layer.of((16, 12)))
    W = rng.standard_normal((16, 12)).astype(BF16)
    H = mod.hidden(W, np.float32)
    d32 = p["peanut_B.weight"] @ H.T
    once = (W.astype(np.float32) + d32).astype(BF16)
    twice = (W.astype(np.float32) + d32.astype(BF16).astype(np.float32)).astype(BF16)
    assert mod.merge(W).weight.dtype == BF16
    assert np.abs(mod.merge(W).weight.astype(np.float64) - once.astype(np.float64)).max() <= \
        2 ** -7 * np.abs(once.astype(np.float64)).max()
    np.testing.assert_array_equal(mod.merge(W, peft_compat=True).weight, twice)
    assert not np.array_equal(once, twice)  # the two roundings differ somewhere (the flag is not vacuous)


def test_config_and_module_refusals():
    with pytest.raises(ConfigError, match="'r'"):
        peanut.PeanutConfig(r=0).validate()
    with pytest.raises(ConfigError, match="'depth'"):
        peanut.PeanutConfig(depth=-1).validate()
    with pytest.raises(ConfigError, match="act_fn 'softmax'"):
        peanut.PeanutConfig(act_fn="softmax").validate()
    with pytest.raises(UnsupportedError, match="act_fn 'prelu'.*learned slope"):
        peanut.PeanutConfig(act_fn="prelu").validate()
    with pytest.raises(UnsupportedError, match="depth up to 64"):
        peanut.PeanutConfig(depth=65).validate()
    rng = np.random.default_rng(0)
    p = _params(rng, 6, 2, 1)
    with pytest.raises(ShapeError, match="missing .*peanut_decoders.1"):
        peanut.PeanutModule("m", peanut.PeanutConfig(r=2, depth=2), p, Layer.of((6, 4)))
    with pytest.raises(ShapeError, match="unexpected .*peanut_encoders.0"):
        peanut.PeanutModule("m", peanut.PeanutConfig(r=2, depth=0), p, Layer.of((6, 4)))
    with pytest.raises(ShapeError, match="do not fit"):
        peanut.PeanutModule("m", peanut.PeanutConfig(r=2, depth=1), p, Layer.of((5, 4)))
    with pytest.raises(UnsupportedError, match="PEANuT is not defined"):
        peanut.PeanutModule("m", peanut.PeanutConfig(r=2, depth=1), p, Layer.of((6, 4, 3), LayerKind.CONV1D))
    mod = peanut.PeanutModule("m", peanut.PeanutConfig(r=2, depth=1), p, Layer.of((6, 4)))
    with pytest.raises(UnsupportedError, match="computed from the base weight"):
        mod.delta_weight()
    with pytest.raises(ShapeError, match="input of shape"):
        mod.forward(np.zeros((2, 5), np.float32), np.zeros((6, 4), np.float32))


def test_initialisation_adapter_records_and_count(tmp_path):
    rng = np.random.default_rng(5)
    state = {"a.q.weight": rng.standard_normal((10, 6)).astype(np.float32),
             "a.q.bias": rng.standard_normal(10).astype(np.float32),
             "a.v.weight": rng.standard_normal((5, 6)).astype(np.float32)}
    cfg = peanut.PeanutConfig(target_modules=["q", "v"], r=3, depth=1, act_fn="gelu_new")
    ad = pm.create_adapter(state, cfg, seed=0)
    for m, out in (("a.q", 10), ("a.v", 5)):
        p = ad.params[m]
        assert np.array_equal(p["peanut_B.weight"], np.zeros((out, 3), np.float32))  # identity at init
        assert 0.5 / math.sqrt(out) < np.abs(p["peanut_A.weight"]).max() <= 1 / math.sqrt(out)
        assert 0.3 < np.abs(p["peanut_encoders.0.weight"]).max() <= 1 / math.sqrt(3)
    merged = ad.merge(state)
    for key in state:
        np.testing.assert_array_equal(merged[key], state[key])
    ad = pm.create_adapter(state, cfg.replace(init_weights=False), seed=0)
    again = pm.load_adapter(pm.save_adapter(ad, tmp_path / "peanut"))
    records: dict = {}
    merged = again.merge(state, records=records)
    assert sorted(records) == ["a.q", "a.v"] and records["a.q"].shape == (6, 3)
    assert np.abs(merged["a.q.weight"] - state["a.q.weight"]).max() > 1e-2
    back = again.unmerge(merged, records=records)
    for key in state:
        np.testing.assert_allclose(back[key], state[key], atol=1e-5)
    with pytest.raises(NotInvertibleError):
        again.unmerge(merged)
    assert again.num_trainable_parameters() == sum(3 * o + o * 3 + 2 * 9 for o in (10, 5))
    assert again.module("a.q", weight_shape=(10, 6)).describe() == {"r": 3, "depth": 1, "act_fn": "gelu_new",
                                                                    "scaling": 1.0}


def test_every_backend_matches_the_float64_merge(xp):
    rng = np.random.default_rng(6)
    p = _params(rng, 8, 3, 1)
    W = rng.standard_normal((8, 5)).astype(np.float32)
    cfg = peanut.PeanutConfig(r=3, depth=1, act_fn="gelu")
    ref = peanut.PeanutModule("m", cfg, {k: v.astype(np.float64) for k, v in p.items()}, Layer.of((8, 5)))
    mod = peanut.PeanutModule("m", cfg, {k: to_xp(xp, v) for k, v in p.items()}, Layer.of((8, 5)))
    res = mod.merge(to_xp(xp, W))
    assert_same_namespace(xp, res.weight)
    want = ref.merge(W.astype(np.float64)).weight
    np.testing.assert_allclose(to_np(res.weight), want, atol=1e-5)
    back = mod.unmerge(res.weight, record=res.record)
    np.testing.assert_allclose(to_np(back.weight), W, atol=1e-5)
