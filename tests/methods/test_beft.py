"""BEFT's math against independent float64 computations: the forward adds the bias shift, merge moves it into
the bias (the weight is returned untouched), unmerge takes it out again, on every layout and dtype; the
refusals (a layer without a bias, wrong shapes, other layer kinds, PEFT's absent config fields)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import peftmath as pm
from peftmath.errors import ConfigError, NonFiniteError, ShapeError, UnsupportedError
from peftmath.layers import Layer, LayerKind
from peftmath.methods import beft
from tests.helpers import assert_same_namespace, skip_if_immutable, to_np, to_xp
from tests.methods.test_inplace_contract import _np_permuted, _np_sliced

BF16 = np.dtype(ml_dtypes.bfloat16)
LAYOUTS = {"C": lambda a: a.copy(), "F": np.asfortranarray, "permuted": _np_permuted,
           "sliced": lambda a: _np_sliced(a, a.ndim - 1)}


def _module(out=6, inn=4, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    db = rng.standard_normal((1, out)).astype(dtype)
    return beft.BeftModule("m.v", beft.BeftConfig(), {"beft_bias": db}, Layer.of((out, inn))), db, rng


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_merge_unmerge_against_float64(layout, dtype):
    mod, db, rng = _module(dtype=dtype)
    W = LAYOUTS[layout](rng.standard_normal((6, 4)).astype(dtype))
    b = rng.standard_normal(6).astype(dtype)
    b = b if layout == "permuted" else LAYOUTS[layout](b)  # a 1-D bias has no permuted view
    W0, b0 = W.copy(), b.copy()
    x = rng.standard_normal((2, 3, 4)).astype(dtype)
    want_y = x.astype(np.float64) @ W0.T.astype(np.float64) + b0 + db[0]
    eps = float(np.finfo(dtype).eps)
    y = mod.forward(x, W, b)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, want_y, atol=16 * eps * float(np.abs(x).sum(-1).max() * np.abs(W0).max() + 4))
    res = mod.merge(W, b)
    assert res.weight is W and np.array_equal(W, W0) and np.array_equal(b, b0)  # copy=True writes nothing
    np.testing.assert_allclose(res.bias, b0.astype(np.float64) + db[0], rtol=eps, atol=0)
    # merged forward == unmerged forward
    np.testing.assert_allclose(Layer.of((6, 4)).base_forward(x, res.weight, res.bias, np), y,
                               atol=16 * eps * (np.abs(y).max() + 1))
    back = mod.unmerge(res.weight, res.bias)
    np.testing.assert_allclose(back.bias, b0, atol=2 * eps * np.abs(res.bias).max())
    # copy=False writes into the caller's bias (any strides), the weight stays the same array
    target = b.copy() if layout == "permuted" else LAYOUTS[layout](b0)
    out = mod.merge(W, target, copy=False)
    assert out.bias is target and out.weight is W
    np.testing.assert_array_equal(target, res.bias)
    mod.unmerge(W, target, copy=False)
    np.testing.assert_array_equal(target, back.bias)


def test_bfloat16_rounds_once_and_peft_compat_forward():
    mod, db, rng = _module(dtype=np.float32)
    W = rng.standard_normal((6, 4)).astype(BF16)
    b = rng.standard_normal(6).astype(BF16)
    res = mod.merge(W, b)
    assert res.bias.dtype == BF16
    np.testing.assert_array_equal(res.bias, (b.astype(np.float64) + db[0].astype(np.float64)).astype(np.float32)
                                  .astype(BF16))
    target = b.copy()  # in place: the same single rounding, into the caller's bfloat16 bias
    assert mod.merge(W, target, copy=False).bias is target
    np.testing.assert_array_equal(target, res.bias)
    # a float64 shift on a float32 bias: the sum in float64, rounded once to float32, in place as out of place
    mod64, db64, _ = _module(dtype=np.float64)
    b32 = rng.standard_normal(6).astype(np.float32)
    want = (b32.astype(np.float64) + db64[0]).astype(np.float32)
    np.testing.assert_array_equal(mod64.merge(W, b32).bias, want)
    assert mod64.merge(W, b32, copy=False).bias is b32
    np.testing.assert_array_equal(b32, want)
    x = rng.standard_normal((5, 4)).astype(BF16)
    base64 = x.astype(np.float64) @ W.astype(np.float64).T + b.astype(np.float64)
    once = (base64 + db[0]).astype(np.float32).astype(BF16)
    twice = ((base64.astype(np.float32).astype(BF16).astype(np.float32) + db[0]).astype(BF16))
    assert np.array_equal(mod.forward(x, W, b), once)
    assert np.array_equal(mod.forward(x, W, b, peft_compat=True), twice)


def test_without_a_bias_the_forward_works_and_the_merge_is_refused():
    mod, db, rng = _module()
    W = rng.standard_normal((6, 4)).astype(np.float32)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(mod.forward(x, W), x @ W.T + db[0], rtol=1e-5, atol=1e-6)
    for op in (mod.merge, mod.unmerge):
        with pytest.raises(UnsupportedError, match="m.v: the base layer has no bias.*PEFT refuses"):
            op(W, None)


def test_read_only_bias_copy_false_refused_untouched_and_safe_merge():
    mod, db, rng = _module()
    W = rng.standard_normal((6, 4)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    b.flags.writeable = False
    with pytest.raises(UnsupportedError, match="m.v: copy=False .* the bias is not writeable"):
        mod.merge(W, b, copy=False)
    with pytest.raises(UnsupportedError, match="bias is not writeable"):
        mod.require_inplace(W, b)
    np.testing.assert_allclose(mod.merge(W, b).bias, b + db[0])  # copy=True reads a read-only bias
    bad = beft.BeftModule("m", beft.BeftConfig(), {"beft_bias": np.full((1, 6), np.inf, np.float32)},
                          Layer.of((6, 4)))
    bw = b.copy()
    with pytest.raises(NonFiniteError, match="merged bias"):
        bad.merge(W, bw, copy=False, safe=True)
    np.testing.assert_array_equal(bw, b)


def test_shapes_kinds_and_config_refusals():
    rng = np.random.default_rng(1)
    with pytest.raises(ShapeError, match=r"beft_bias has shape \(1, 5\), expected \(1, 6\)"):
        beft.BeftModule("m", beft.BeftConfig(), {"beft_bias": np.zeros((1, 5), np.float32)}, Layer.of((6, 4)))
    with pytest.raises(ShapeError, match="exactly one tensor"):
        beft.BeftModule("m", beft.BeftConfig(), {"beft_bias": np.zeros((1, 6), np.float32), "x": np.zeros(1)},
                        Layer.of((6, 4)))
    for kind, shape in ((LayerKind.CONV2D, (6, 4, 3, 3)), (LayerKind.EMBEDDING, (6, 4)),
                        (LayerKind.CONV1D_TRANSPOSED, (4, 6))):
        with pytest.raises(UnsupportedError, match="BEFT is not defined"):
            beft.BeftModule("m", beft.BeftConfig(), {"beft_bias": np.zeros((1, 6), np.float32)}, Layer.of(shape, kind))
    mod, _, _ = _module()
    with pytest.raises(ShapeError, match="input of shape"):
        mod.forward(rng.standard_normal((2, 5)).astype(np.float32), np.zeros((6, 4), np.float32))
    with pytest.raises(ConfigError, match="no field 'layers_to_transform'"):
        beft.BeftConfig(layers_to_transform=[0], target_modules=["v"]).validate()
    with pytest.raises(ConfigError, match="init_weights"):
        beft.BeftConfig(init_weights=1).validate()
    assert {"exclude_modules", "layers_pattern", "layers_to_transform"}.isdisjoint(beft.BeftConfig().to_dict())
    assert np.array_equal(mod.delta_weight(), np.zeros((6, 4), np.float32))


def test_initialisation_adapter_round_trip_and_count(tmp_path):
    rng = np.random.default_rng(2)
    state = {"a.v.weight": rng.standard_normal((8, 5)).astype(np.float32),
             "a.v.bias": rng.standard_normal(8).astype(np.float32),
             "a.q.weight": rng.standard_normal((3, 5)).astype(np.float32),
             "a.q.bias": rng.standard_normal(3).astype(np.float32)}
    ad = pm.create_adapter(state, beft.BeftConfig(target_modules=["v", "q"]), seed=0)
    assert all(np.array_equal(p["beft_bias"], np.zeros_like(p["beft_bias"])) for p in ad.params.values())
    ad = pm.create_adapter(state, beft.BeftConfig(target_modules=["v", "q"], init_weights=False), seed=0)
    draws = np.concatenate([np.asarray(p["beft_bias"]).ravel() for p in ad.params.values()])
    assert draws.std() > 0.3  # N(0, 1) draws, not zeros
    again = pm.load_adapter(pm.save_adapter(ad, tmp_path / "beft"))
    merged = again.merge(state)
    for m in ("a.v", "a.q"):
        assert merged[f"{m}.weight"] is state[f"{m}.weight"]
        np.testing.assert_allclose(merged[f"{m}.bias"], state[f"{m}.bias"] + np.asarray(ad.params[m]["beft_bias"])[0],
                                   rtol=1e-6)
    back = again.unmerge(merged)
    for key, value in state.items():
        np.testing.assert_allclose(back[key], value, atol=1e-6)
    half = again.scaled(0.5).merge(state)
    np.testing.assert_allclose(half["a.v.bias"] - state["a.v.bias"], 0.5 * (merged["a.v.bias"] - state["a.v.bias"]),
                               atol=1e-6)
    assert again.num_trainable_parameters() == 8 + 3


def test_every_backend_matches_the_float64_bias(xp):
    _, db, rng = _module()
    W = rng.standard_normal((6, 4)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    xmod = beft.BeftModule("m", beft.BeftConfig(), {"beft_bias": to_xp(xp, db)}, Layer.of((6, 4)))
    res = xmod.merge(to_xp(xp, W), to_xp(xp, b))
    assert_same_namespace(xp, res.bias)
    np.testing.assert_allclose(to_np(res.bias), b.astype(np.float64) + db[0], rtol=2e-7)
    y = xmod.forward(to_xp(xp, x), to_xp(xp, W), to_xp(xp, b))
    assert_same_namespace(xp, y)
    np.testing.assert_allclose(to_np(y), x.astype(np.float64) @ W.T + b + db[0], rtol=1e-5, atol=1e-5)
    skip_if_immutable(xp)
    bt = to_xp(xp, b)
    assert xmod.merge(to_xp(xp, W), bt, copy=False).bias is bt
    np.testing.assert_allclose(to_np(bt), to_np(res.bias))
