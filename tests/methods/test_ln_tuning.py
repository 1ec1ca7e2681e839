"""LN tuning against independent computations: merge puts the trained copy in place (any layout, in place or
not) and returns the originals, unmerge restores them bit for bit, the forward is the base layer's function of
the copy (LayerNorm against a float64 formula); the refusals (no record, shapes, bias mismatches, config)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import peftmath as pm
from peftmath.errors import (
    CheckpointError, ConfigError, NonFiniteError, NotInvertibleError, ShapeError, UnsupportedError,
)
from peftmath.layers import Layer, LayerKind
from peftmath.methods import ln_tuning
from tests.helpers import assert_same_namespace, skip_if_immutable, to_np, to_xp
from tests.methods.test_inplace_contract import _np_permuted, _np_sliced

BF16 = np.dtype(ml_dtypes.bfloat16)
KINDS = [("LayerNorm", (7,)), ("Linear", (5, 7)), ("Conv1D", (7, 5)), ("Embedding", (9, 7)),
         ("Conv2d", (5, 7, 3, 3))]
LAYOUTS = {"C": lambda a: a.copy(), "F": np.asfortranarray, "permuted": lambda a: _np_permuted(a) if a.ndim > 1
           else a.copy(), "sliced": lambda a: _np_sliced(a, a.ndim - 1)}


def _module(kind, shape, rng, dtype=np.float32, bias=True):
    layer = Layer.of(shape, kind)
    p = {"ln_tuning_layers.weight": rng.standard_normal(shape).astype(dtype)}
    if bias:
        p["ln_tuning_layers.bias"] = rng.standard_normal(layer.out_features).astype(dtype)
    return ln_tuning.LNTuningModule("m", ln_tuning.LNTuningConfig(), p, layer), p


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind,shape", KINDS)
def test_merge_replaces_and_the_record_restores_bit_for_bit(kind, shape, layout):
    rng = np.random.default_rng(len(shape) + len(layout))
    mod, p = _module(kind, shape, rng)
    W0 = rng.standard_normal(shape).astype(np.float32)
    b0 = rng.standard_normal(mod.layer.out_features).astype(np.float32)
    W, b = LAYOUTS[layout](W0), LAYOUTS["sliced"](b0)
    res = mod.merge(W, b)
    np.testing.assert_array_equal(W, W0)
    np.testing.assert_array_equal(b, b0)
    np.testing.assert_array_equal(res.weight, p["ln_tuning_layers.weight"])
    np.testing.assert_array_equal(res.bias, p["ln_tuning_layers.bias"])
    assert not np.shares_memory(res.weight, p["ln_tuning_layers.weight"])  # never the adapter's own tensor
    assert not np.shares_memory(res.bias, p["ln_tuning_layers.bias"])
    back = mod.unmerge(res.weight, res.bias, record=res.record)
    assert not np.shares_memory(back.weight, res.record) and not np.shares_memory(back.bias, res.record)
    np.testing.assert_array_equal(back.weight, W0)
    np.testing.assert_array_equal(back.bias, b0)
    with pytest.raises(NotInvertibleError, match="record"):
        mod.unmerge(res.weight, res.bias)
    # copy=False: into the caller's arrays; the record still holds the originals
    res2 = mod.merge(W, b, copy=False)
    assert res2.weight is W and res2.bias is b
    np.testing.assert_array_equal(W, p["ln_tuning_layers.weight"])
    back2 = mod.unmerge(W, b, record=res2.record, copy=False)
    assert back2.weight is W
    np.testing.assert_array_equal(W, W0)
    np.testing.assert_array_equal(b, b0)


def test_layer_norm_forward_against_float64_and_dtypes():
    rng = np.random.default_rng(3)
    mod, p = _module("LayerNorm", (6,), rng, np.float64)
    x = rng.standard_normal((2, 3, 6)) * 4 + 1
    g, be = p["ln_tuning_layers.weight"], p["ln_tuning_layers.bias"]
    for eps in (1e-5, 10.0):
        mu = x.mean(-1, keepdims=True)
        want = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * g + be
        got = mod.forward(x, np.ones(6), np.zeros(6), eps=eps)
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
        got16 = mod.forward(x.astype(BF16), np.ones(6, BF16), np.zeros(6, BF16), eps=eps)
        assert got16.dtype == BF16  # the copy in the base dtype, computed in float32, rounded once
        np.testing.assert_allclose(got16.astype(np.float64), want, rtol=2 ** -7, atol=2 ** -7 * np.abs(want).max())
    with pytest.raises(ShapeError, match="keyword eps"):
        mod.forward(x, np.ones(6), np.zeros(6))


@pytest.mark.parametrize("kind,shape", KINDS[1:])
def test_forward_is_the_base_layer_with_the_copy(kind, shape):
    rng = np.random.default_rng(4)
    mod, p = _module(kind, shape, rng)
    layer = mod.layer
    W, b = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(layer.out_features).astype(np.float32)
    if kind == "Embedding":
        x = rng.integers(0, shape[0], (2, 4))
    elif layer.kind.is_conv:
        x = rng.standard_normal((2, 7, 6, 6)).astype(np.float32)
    else:
        x = rng.standard_normal((3, 7)).astype(np.float32)
    want = layer.base_forward(x, p["ln_tuning_layers.weight"], p["ln_tuning_layers.bias"], np)
    np.testing.assert_array_equal(mod.forward(x, W, b), want)
    merged = mod.merge(W, b)
    np.testing.assert_array_equal(layer.base_forward(x, merged.weight, merged.bias, np), want)


def test_bias_rules_and_refusals():
    rng = np.random.default_rng(5)
    mod, p = _module("Linear", (5, 7), rng)
    W = rng.standard_normal((5, 7)).astype(np.float32)
    with pytest.raises(UnsupportedError, match="trained bias .* base layer has none"):
        mod.merge(W, None)
    only_w, _ = _module("Linear", (5, 7), rng, bias=False)  # no bias copy: the base bias stays
    b = rng.standard_normal(5).astype(np.float32)
    res = only_w.merge(W, b)
    assert res.bias is b and res.record.shape == (35,)
    np.testing.assert_array_equal(only_w.unmerge(res.weight, b, record=res.record).weight, W)
    ro = b.copy()
    ro.flags.writeable = False
    with pytest.raises(UnsupportedError, match="bias is not writeable"):
        mod.merge(W.copy(), ro, copy=False)
    with pytest.raises(ShapeError, match="record"):
        mod.unmerge(W, b, record=np.zeros(3, np.float32))
    for bad in ("ln_tuning_layers.weight", "ln_tuning_layers.bias"):  # safe: a NaN in either copy, nothing written
        nan = dict(p)
        nan[bad] = p[bad].copy()
        nan[bad].flat[1] = np.nan
        mod_nan = ln_tuning.LNTuningModule("m", ln_tuning.LNTuningConfig(), nan, Layer.of((5, 7)))
        Wc, bc = W.copy(), b.copy()
        with pytest.raises(NonFiniteError, match="NaN"):
            mod_nan.merge(Wc, bc, copy=False, safe=True)
        np.testing.assert_array_equal(Wc, W)
        np.testing.assert_array_equal(bc, b)
    with pytest.raises(ShapeError, match="copy's weight"):
        ln_tuning.LNTuningModule("m", ln_tuning.LNTuningConfig(), {"ln_tuning_layers.weight": np.zeros((4, 7))},
                                 Layer.of((5, 7)))
    with pytest.raises(ShapeError, match="found"):
        ln_tuning.LNTuningModule("m", ln_tuning.LNTuningConfig(), {"ln_tuning_layers.weight": np.zeros(5),
                                                                   "ln_tuning_layers.running_mean": np.zeros(5)},
                                 Layer.of((5,), LayerKind.LAYER_NORM))
    with pytest.raises(UnsupportedError, match="replaces the weight"):
        mod.delta_weight()
    with pytest.raises(UnsupportedError, match="no linear scale"):
        mod.scaled(0.5)
    with pytest.raises(ConfigError, match="no field 'layers_to_transform'"):
        ln_tuning.LNTuningConfig(target_modules=["a"], layers_pattern="h", layers_to_transform=[0]).validate()
    assert "layers_to_transform" not in ln_tuning.LNTuningConfig().to_dict()


def test_adapter_merge_records_round_trip_count_and_foreign_tensors(tmp_path):
    rng = np.random.default_rng(6)
    state = {"norm.weight": rng.standard_normal(8).astype(np.float32),
             "norm.bias": rng.standard_normal(8).astype(np.float32),
             "proj.weight": rng.standard_normal((4, 8)).astype(np.float32),
             "proj.bias": rng.standard_normal(4).astype(np.float32)}
    params = {"norm": {"ln_tuning_layers.weight": state["norm.weight"] + 1,
                       "ln_tuning_layers.bias": state["norm.bias"] - 1},
              "proj": {"ln_tuning_layers.weight": state["proj.weight"] * 2,
                       "ln_tuning_layers.bias": state["proj.bias"] * 0}}
    ad = pm.Adapter(ln_tuning.LNTuningConfig(target_modules=["norm", "proj"]), params)
    again = pm.load_adapter(pm.save_adapter(ad, tmp_path / "ln"))
    assert again.num_trainable_parameters() == 8 + 8 + 32 + 4
    records: dict = {}
    merged = again.merge(state, records=records)
    for m in ("norm", "proj"):
        for leaf in ("weight", "bias"):
            np.testing.assert_array_equal(merged[f"{m}.{leaf}"], params[m][f"ln_tuning_layers.{leaf}"])
    x = rng.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_array_equal(again.forward("proj", x, state), x @ (2 * state["proj.weight"]).T)
    back = again.unmerge(merged, records=records)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value)
    with pytest.raises(NotInvertibleError):
        again.unmerge(merged)
    created = pm.create_adapter({k: v for k, v in state.items() if k.startswith("proj")},
                                ln_tuning.LNTuningConfig(target_modules=["proj"]))
    np.testing.assert_array_equal(created.params["proj"]["ln_tuning_layers.weight"], state["proj.weight"])
    from safetensors.numpy import save_file

    folder = pm.save_adapter(ad, tmp_path / "block")
    save_file({"base_model.model.block.ln_tuning_layers.0.weight": np.zeros(3, np.float32),
               "base_model.model.norm.ln_tuning_layers.weight": np.zeros(8, np.float32)},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError):  # a copied block's nested tensors are not placed
        pm.load_adapter(folder).merge(state)


def test_every_backend_replaces_and_restores(xp):
    rng = np.random.default_rng(7)
    _, p = _module("LayerNorm", (6,), rng)
    mod = ln_tuning.LNTuningModule("m", ln_tuning.LNTuningConfig(), {k: to_xp(xp, v) for k, v in p.items()},
                                   Layer.of((6,), "LayerNorm"))
    W, b = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    res = mod.merge(to_xp(xp, W), to_xp(xp, b))
    assert_same_namespace(xp, res.weight)
    np.testing.assert_array_equal(to_np(res.weight), p["ln_tuning_layers.weight"])
    back = mod.unmerge(res.weight, res.bias, record=res.record)
    np.testing.assert_array_equal(to_np(back.weight), W)
    np.testing.assert_array_equal(to_np(back.bias), b)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    y = mod.forward(to_xp(xp, x), to_xp(xp, W), to_xp(xp, b), eps=1e-5)
    np.testing.assert_allclose(to_np(y), Layer.of((6,), "LayerNorm").base_forward(
        x.astype(np.float64), p["ln_tuning_layers.weight"], p["ln_tuning_layers.bias"], np, eps=1e-5), atol=1e-5)
    skip_if_immutable(xp)
    Wt = to_xp(xp, W)
    bt = to_xp(xp, b)
    assert mod.merge(Wt, bt, copy=False).weight is Wt
    np.testing.assert_array_equal(to_np(bt), p["ln_tuning_layers.bias"])
