"""GLoRA's math against an independent float64 computation: the merged weight and bias of every support form,
the forward, the exact unmerge and its refusal, the shapes read from the tensors, and the config."""

from __future__ import annotations

import numpy as np
import pytest

from peftmath.errors import ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from peftmath.layers import Layer, LayerKind
from peftmath.methods import glora
from tests.methods.test_inplace_contract import _np_permuted, _np_sliced

LAYOUTS = {"C": lambda a: a.copy(), "F": np.asfortranarray, "permuted": _np_permuted,
           "sliced": lambda a: _np_sliced(a, 1)}
FORMS = [dict(), dict(config_A_B="vector", config_C="vector", config_D_E="vector"),
         dict(config_A_B="constant", config_C="none", config_D_E="constant"),
         dict(config_A_B="none", config_C="lora", config_D_E="none")]


def _module(shape, dtype, seed, **forms):
    cfg = glora.GloraConfig(r=3, init_weights=False, **forms)
    layer = Layer(LayerKind.LINEAR, shape)
    params, _ = glora.GloraModule.initialize("m", cfg, layer, seed=seed)
    rng = np.random.default_rng(seed)
    # constants away from 0 and "none" buffers left at zero, everything in the test dtype
    params = {k: (v + rng.uniform(0.1, 0.5, v.shape) if k.endswith(".X") and v.shape == (1,) else v).astype(dtype)
              for k, v in params.items()}
    return glora.GloraModule("m", cfg, params, layer), params


def _value(params, letter, shape):
    """The support's value as a float64 array of ``shape``, from the definitions (spec §2)."""
    p = {k.split(".")[1]: np.asarray(v, np.float64) for k, v in params.items() if k.startswith(f"glora_{letter}.")}
    if "Xd" in p:
        v = p["Xd"] @ p["Xu"]
    else:
        v = p.get("X", p.get("zeros"))
    return np.broadcast_to(v if v.shape != (1,) else v[0], shape)


def _reference(W, b, params):
    W64 = W.astype(np.float64)
    out, inn = W.shape
    A, B = _value(params, "A", (out, inn)), _value(params, "B", (out, inn))
    C = _value(params, "C", (inn, 1))
    D, E = _value(params, "D", (out,)), _value(params, "E", (out,))
    W1 = W64 + W64 * A + B
    b1 = None if b is None else b.astype(np.float64) * (1 + D) + E + (W64 @ C)[:, 0]
    return W1, b1


@pytest.mark.parametrize("forms", FORMS, ids=lambda f: "-".join(f.values()) or "default")
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_forward_unmerge_against_float64(forms, layout, dtype):
    shape = (7, 5)
    mod, params = _module(shape, dtype, 3, **forms)
    rng = np.random.default_rng(11)
    W = LAYOUTS[layout](rng.standard_normal(shape).astype(dtype))
    b = rng.standard_normal(shape[0]).astype(dtype)
    W_before, b_before = W.copy(), b.copy()
    want_w, want_b = _reference(W, b, params)
    eps = float(np.finfo(dtype).eps)
    tol = 16 * eps * (np.abs(want_w).max() + np.abs(W).max())
    res = mod.merge(W, b)
    np.testing.assert_allclose(res.weight, want_w, atol=tol)
    np.testing.assert_allclose(res.bias, want_b, atol=tol * shape[1])
    np.testing.assert_array_equal(W, W_before)  # copy=True touches nothing
    np.testing.assert_array_equal(b, b_before)
    x = rng.standard_normal((2, 3, shape[1])).astype(dtype)
    np.testing.assert_allclose(mod.forward(x, W, b), x.astype(np.float64) @ want_w.T + want_b,
                               atol=tol * np.abs(x).sum(-1).max() * 4)
    back = mod.unmerge(res.weight, res.bias)
    np.testing.assert_allclose(back.weight, W, atol=tol * 4)
    np.testing.assert_allclose(back.bias, b, atol=tol * 4 * shape[1])
    target = LAYOUTS[layout](W.copy())
    assert mod.merge(target, b, copy=False).weight is target
    np.testing.assert_allclose(target, res.weight, atol=2 * eps * np.abs(want_w).max())


def test_without_bias_c_d_e_do_nothing():
    mod, params = _module((6, 4), np.float64, 5)
    W = np.random.default_rng(0).standard_normal((6, 4))
    res = mod.merge(W)
    assert res.bias is None
    np.testing.assert_allclose(res.weight, _reference(W, None, params)[0], atol=1e-13)
    x = np.ones((2, 4))
    np.testing.assert_allclose(mod.forward(x, W), x @ res.weight.T, atol=1e-12)


def test_unmerge_refuses_a_zero_of_one_plus_a_and_writes_nothing():
    mod, params = _module((4, 3), np.float64, 1, config_A_B="vector", config_C="none", config_D_E="constant")
    params["glora_A.X"][2, 0] = -1.0  # row 2 of W' is B alone
    mod = glora.GloraModule("m", mod.config, params, mod.layer)
    W = np.arange(12.0).reshape(4, 3)
    merged = mod.merge(W, np.ones(4)).weight
    np.testing.assert_allclose(merged[2], params["glora_B.X"][2, 0])
    before = merged.copy()
    with pytest.raises(NotInvertibleError, match="1 \\+ A is 0 in 3 entries"):
        mod.unmerge(merged, np.ones(4), copy=False)
    np.testing.assert_array_equal(merged, before)
    params["glora_A.X"][2, 0] = 0.5
    params["glora_D.X"][0] = -1.0
    mod = glora.GloraModule("m", mod.config, params, mod.layer)
    with pytest.raises(NotInvertibleError, match="1 \\+ D"):
        mod.unmerge(merged, np.ones(4))
    mod.unmerge(merged)  # without a bias, D does not matter


def test_init_is_identity_and_shapes():
    layer = Layer(LayerKind.LINEAR, (9, 6))
    for forms in FORMS:
        cfg = glora.GloraConfig(r=2, **forms)
        params, new_w = glora.GloraModule.initialize("m", cfg, layer, seed=0)
        assert new_w is None
        mod = glora.GloraModule("m", cfg, params, layer)
        W, b = np.random.default_rng(1).standard_normal((9, 6)).astype(np.float32), np.ones(9, np.float32)
        res = mod.merge(W, b)
        np.testing.assert_array_equal(res.weight, W)
        np.testing.assert_array_equal(res.bias, b)
        if forms.get("config_D_E") == "constant" and forms.get("config_A_B") == "constant":
            with pytest.raises(ShapeError, match="weight_shape"):  # scalars and C (in, 1) do not give `out`
                glora.GloraModule.infer_layer("m", cfg, params)
        else:
            assert glora.GloraModule.infer_layer("m", cfg, params).weight_shape == (9, 6)
    params, _ = glora.GloraModule.initialize("m", glora.GloraConfig(r=2, init_weights=False), layer, seed=0)
    assert params["glora_A.Xu"].std() > 0 and abs(params["glora_A.Xu"]).max() <= 1 / np.sqrt(6)
    assert abs(params["glora_A.Xd"]).max() <= 1 / np.sqrt(2)


def test_refusals():
    layer = Layer(LayerKind.LINEAR, (4, 3))
    params, _ = glora.GloraModule.initialize("m", glora.GloraConfig(r=2), layer)
    with pytest.raises(UnsupportedError, match="nn.Linear"):
        glora.GloraModule("m", glora.GloraConfig(), params, Layer(LayerKind.CONV1D_TRANSPOSED, (3, 4)))
    with pytest.raises(ShapeError, match="glora_A.Xd has shape"):
        glora.GloraModule("m", glora.GloraConfig(), {**params, "glora_A.Xd": np.zeros((5, 2))}, layer)
    with pytest.raises(ShapeError, match="no glora_E"):
        glora.GloraModule("m", glora.GloraConfig(), {k: v for k, v in params.items() if "_E" not in k}, layer)
    with pytest.raises(ShapeError, match="unexpected"):
        glora.GloraModule("m", glora.GloraConfig(), {**params, "glora_F.X": np.zeros(1)}, layer)
    with pytest.raises(ConfigError, match="config_C"):
        glora.GloraConfig(config_C="constant").validate()
    with pytest.raises(ConfigError, match="exclude_modules"):
        glora.GloraConfig(exclude_modules=["x"]).validate()
    assert "layers_pattern" not in glora.GloraConfig().to_dict()
