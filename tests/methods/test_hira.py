"""HiRA's own math against independent float64 computations (einsum over the stored layouts)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from peftmath import Adapter
from peftmath.errors import ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from peftmath.layers import Layer, LayerKind
from peftmath.methods import hira


def _factors(layer: Layer, r: int, seed: int, dtype=np.float64):
    p = hira.init_weights(layer, r, init=False, seed=seed)
    return tuple(np.asarray(v, np.float64).astype(dtype) for v in p.values())


def _modulation64(layer: Layer, A, B):
    """M in the stored layout, by einsum (no reshape to the matrix view)."""
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    if layer.kind is LayerKind.LINEAR:
        return np.einsum("or,ri->oi", B, A)
    if layer.kind in (LayerKind.CONV1D_TRANSPOSED, LayerKind.EMBEDDING):
        return np.einsum("or,ri->io", B, A)
    return np.einsum("or...,ri...->oi...", B.reshape(B.shape[:2]), A)


CASES = [(LayerKind.LINEAR, (6, 5)), (LayerKind.CONV1D_TRANSPOSED, (5, 6)), (LayerKind.EMBEDDING, (7, 4)),
         (LayerKind.CONV1D, (6, 3, 3)), (LayerKind.CONV2D, (6, 3, 2, 3)), (LayerKind.CONV3D, (4, 2, 2, 2, 3))]


@pytest.mark.parametrize("kind,shape", CASES)
def test_merge_delta_unmerge_match_float64(kind, shape):
    layer = Layer.of(shape, kind)
    A, B = _factors(layer, 3, seed=1)
    W = np.random.default_rng(2).standard_normal(shape)
    M = _modulation64(layer, A, B)
    np.testing.assert_allclose(hira.delta_weight(W, A, B, layer=layer), W * M, rtol=1e-13, atol=1e-13)
    merged = hira.merge(W, A, B, layer=layer)
    np.testing.assert_allclose(merged, W + W * M, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(hira.unmerge(merged, A, B, layer=layer), W, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind,shape", CASES)
def test_forward_is_the_merged_layer(kind, shape):
    layer = Layer.of(shape, kind)
    A, B = _factors(layer, 2, seed=3)
    rng = np.random.default_rng(4)
    W = rng.standard_normal(shape)
    bias = None if kind is LayerKind.EMBEDDING else rng.standard_normal(layer.out_features)
    if kind is LayerKind.EMBEDDING:
        x = rng.integers(0, shape[0], (2, 5))
    elif kind.is_conv:
        x = rng.standard_normal((2, shape[1]) + (5,) * kind.conv_dims)
    else:
        x = rng.standard_normal((2, layer.in_features))
    want = layer.base_forward(x, W * (1 + _modulation64(layer, A, B)), bias, np)
    np.testing.assert_allclose(hira.forward(x, W, A, B, bias=bias, layer=layer), want, rtol=1e-12, atol=1e-12)


def test_float32_layouts_in_place_and_bound():
    layer = Layer.of((8, 6))
    A, B = _factors(layer, 4, seed=5, dtype=np.float32)
    W0 = np.random.default_rng(6).standard_normal((8, 6)).astype(np.float32)
    ref = hira.merge(W0.astype(np.float64), A.astype(np.float64), B.astype(np.float64))
    for W in (W0.copy(), np.asfortranarray(W0), W0.T.copy().T):
        out = hira.merge(W, A, B, copy=False)
        assert out is W
        np.testing.assert_allclose(W, ref, rtol=4e-6 * 4, atol=1e-6)
        back = hira.unmerge(W, A, B, copy=False)
        assert back is W
        # the bound of specs/hira.md: |W₀ - unmerge(merge(W₀))| <= 2u|W₀| per entry (+ M's own rounding)
        assert np.all(np.abs(W.astype(np.float64) - W0) <= 8 * np.finfo(np.float32).eps * np.abs(W0) + 1e-30)


def test_copy_false_refuses_read_only_and_writes_nothing():
    A, B = _factors(Layer.of((3, 4)), 2, seed=0)
    W = np.ones((3, 4))
    W.setflags(write=False)
    with pytest.raises(UnsupportedError, match="copy=True"):
        hira.merge(W, A, B, copy=False)
    np.testing.assert_array_equal(W, 1.0)


def test_unmerge_refuses_a_zeroed_entry_and_writes_nothing(monkeypatch):
    W = np.array([[1.0, 2.0]])
    A, B = np.array([[1.0, 0.25]]), np.array([[-1.0]])
    merged = hira.merge(W, A, B)
    before = merged.copy()
    with pytest.raises(NotInvertibleError, match="1 \\+ B·A is 0 in 1 of 2"):
        hira.unmerge(merged, A, B, copy=False)
    np.testing.assert_array_equal(merged, before)
    # copy=True counts the zeros while it divides a private copy (one pass): the same refusal, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NotInvertibleError, match="1 \\+ B·A is 0 in 1 of 2"):
            hira.unmerge(merged, A, B)
        from peftmath.methods import _base

        monkeypatch.setattr(_base, "ROW_TILE_BYTES", 4 * 700 * 64)  # 64-row tiles: five of them
        big = np.ones((300, 700), dtype=np.float32)           # one zero, in the last tile
        Ab, Bb = np.zeros((1, 700), np.float32), np.zeros((300, 1), np.float32)
        Ab[0, 650], Bb[290, 0] = 1.0, -1.0
        with pytest.raises(NotInvertibleError, match="is 0 in 1 of 210000"):
            hira.unmerge(big, Ab, Bb)
    np.testing.assert_array_equal(merged, before)


def test_init_distributions():
    lin, emb, conv = Layer.of((40, 50)), Layer.of((50, 40), "Embedding"), Layer.of((8, 4, 3, 3))
    p = hira.init_weights(lin, 8, seed=0)
    assert np.all(np.asarray(p["hira_B"]) == 0) and np.abs(p["hira_A"]).max() <= 1 / np.sqrt(50)
    g = hira.init_weights(lin, 8, init="gaussian", seed=0)
    assert abs(float(np.std(g["hira_A"])) - 1 / 8) < 0.02
    e = hira.init_weights(emb, 8, seed=0)
    assert np.all(np.asarray(e["hira_embedding_A"]) == 0) and abs(float(np.std(e["hira_embedding_B"])) - 1) < 0.2
    c = hira.init_weights(conv, 8, init="gaussian", seed=0)  # a conv reads "gaussian" as True (PEFT)
    assert c["hira_A"].shape == (8, 4, 3, 3) and np.abs(c["hira_A"]).max() <= 1 / 6 and c["hira_B"].shape == (8, 8, 1, 1)
    with pytest.raises(ConfigError, match="init_weights"):
        hira.HiraConfig(init_weights="orthogonal").validate()


def test_module_refusals():
    cfg = hira.HiraConfig(target_modules=["m"], r=2, init_weights=False)
    params, _ = hira.HiraModule.initialize("m", cfg, Layer.of((3, 4)), seed=0)
    ad = Adapter(cfg, {"m": params})
    mod = ad.module("m", weight_shape=(3, 4))
    with pytest.raises(UnsupportedError, match="depends on the base weight"):
        mod.delta_weight()
    W = np.ones((3, 4))
    np.testing.assert_allclose(mod.delta_weight(weight=W), _modulation64(mod.layer, *params.values()), rtol=1e-6)
    with pytest.raises(ShapeError, match="hira_B"):
        hira.merge(W, params["hira_A"], params["hira_B"][:2])
    d2 = ad.scaled(-0.5).merge({"m.weight": W})["m.weight"] - W  # scale c: ΔW → c·ΔW
    np.testing.assert_allclose(d2, -0.5 * (ad.merge({"m.weight": W})["m.weight"] - W), rtol=1e-6, atol=1e-7)
    with pytest.raises(UnsupportedError, match="grouped"):
        hira.HiraModule.initialize("m", cfg, Layer.of((4, 2, 3), groups=2))
