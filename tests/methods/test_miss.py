"""MiSS's own math against independent float64 computations (explicit loops over columns and blocks)."""

from __future__ import annotations

import numpy as np
import pytest

from peftmath.errors import NotInvertibleError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import miss


def _delta_loop(D_full: np.ndarray, out: int, inn: int) -> np.ndarray:
    r = D_full.shape[0]
    return np.array([[D_full[j % r, o] for j in range(inn)] for o in range(out)])


def _bat_loop(W: np.ndarray, D: np.ndarray) -> np.ndarray:
    r = D.shape[-1]
    new = np.empty_like(W)
    for b in range(W.shape[0] // r):
        for c in range(W.shape[1] // r):
            blk = W[b * r:(b + 1) * r, c * r:(c + 1) * r]
            new[b * r:(b + 1) * r, c * r:(c + 1) * r] = blk @ (np.eye(r) + D[b]) + D[b]
    return new


@pytest.mark.parametrize("out,inn,r", [(4, 6, 2), (5, 7, 3), (3, 3, 3), (6, 5, 1)])
def test_default_delta_forward_merge(out, inn, r):
    rng = np.random.default_rng(out * inn + r)
    D, W = rng.standard_normal((r, out)), rng.standard_normal((out, inn))
    want = _delta_loop(D, out, inn)
    np.testing.assert_allclose(miss.delta_weight(D, (out, inn)), want, rtol=0, atol=0)
    np.testing.assert_allclose(miss.merge(W, D), W + want, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(miss.unmerge(miss.merge(W, D), D), W, rtol=1e-14, atol=1e-14)
    x, b = rng.standard_normal((2, 3, inn)), rng.standard_normal(out)
    # PEFT's own forward: pad x to a multiple of r, sum the r-wide shards, multiply by D
    pad = np.concatenate([x, np.zeros((2, 3, (-inn) % r))], axis=-1)
    shards = pad.reshape(2, 3, -1, r).sum(axis=-2)
    np.testing.assert_allclose(miss.forward(x, W, D, bias=b), x @ W.T + b + shards @ D, rtol=1e-12, atol=1e-12)


def test_mini_repeats_the_block_along_out():
    rng = np.random.default_rng(1)
    D, W = rng.standard_normal((2, 3)), rng.standard_normal((6, 4))
    full = np.tile(D, (1, 2))  # torch's repeat(1, out // mini_r)
    np.testing.assert_allclose(miss.merge(W, D, form="mini"), W + _delta_loop(full, 6, 4), rtol=1e-15, atol=1e-15)
    with pytest.raises(ShapeError, match="mini_r=4 to divide out_features=6"):
        miss.block_shape(Layer.of((6, 4)), 2, "mini", mini_r=4)


def test_bat_merge_unmerge_and_forward():
    rng = np.random.default_rng(2)
    W, D = rng.standard_normal((6, 4)), 0.3 * rng.standard_normal((3, 2, 2))
    merged = miss.merge(W, D, form="bat")
    np.testing.assert_allclose(merged, _bat_loop(W, D), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(miss.unmerge(merged, D, form="bat"), W, rtol=1e-12, atol=1e-12)
    x = rng.standard_normal((3, 4))
    np.testing.assert_allclose(miss.forward(x, W, D, form="bat"), x @ _bat_loop(W, D).T, rtol=1e-12, atol=1e-12)
    with pytest.raises(UnsupportedError, match="depends on W"):
        miss.delta_weight(D, (6, 4), form="bat")


def test_bat_unmerge_refuses_a_singular_block_and_writes_nothing():
    W = np.ones((2, 2))
    D = np.array([[[-1.0, 0.0], [0.0, 0.5]]])  # I + D = diag(0, 1.5)
    before = W.copy()
    with pytest.raises(NotInvertibleError, match="singular"):
        miss.unmerge(W, D, form="bat", copy=False)
    np.testing.assert_array_equal(W, before)


def test_float32_layouts_in_place():
    rng = np.random.default_rng(3)
    D = rng.standard_normal((2, 6)).astype(np.float32)
    W0 = rng.standard_normal((6, 8)).astype(np.float32)
    want = W0.astype(np.float64) + _delta_loop(D.astype(np.float64), 6, 8)
    for W in (W0.copy(), np.asfortranarray(W0), np.ascontiguousarray(np.concatenate([W0, W0], 1))[:, ::2]):
        W[...] = W0
        assert miss.merge(W, D, copy=False) is W
        np.testing.assert_allclose(W, want, rtol=2e-7, atol=2e-7)
        miss.unmerge(W, D, copy=False)
        np.testing.assert_allclose(W, W0, rtol=0, atol=4e-7)


def test_shapes_init_and_refusals():
    lay = Layer.of((4, 6))
    assert miss.block_shape(lay, 2, "bat") == (2, 2, 2)
    with pytest.raises(ShapeError, match="larger than in_features"):
        miss.block_shape(lay, 8, "default")
    with pytest.raises(ShapeError, match="r×r blocks"):
        miss.block_shape(Layer.of((4, 6)), 4, "bat")
    with pytest.raises(UnsupportedError, match="nn.Linear"):
        miss.block_shape(Layer.of((4, 6, 3)), 2, "default")
    cfg = miss.MissConfig(r=3, init_weights=False)
    blk = np.asarray(miss.init_block(Layer.of((50, 6)), cfg, seed=0))
    assert blk.shape == (3, 50) and np.abs(blk).max() <= 1 / np.sqrt(50) and blk.std() > 0.05
    assert not np.asarray(miss.init_block(lay, miss.MissConfig(r=2, init_weights="bat"))).any()


def test_scale_is_linear_for_default_and_refused_for_bat():
    from peftmath import Adapter

    rng = np.random.default_rng(9)
    W = rng.standard_normal((4, 6)).astype(np.float32)
    blk = rng.standard_normal((2, 4)).astype(np.float32)
    ad = Adapter(miss.MissConfig(target_modules=["m"], r=2), {"m": {"miss_block": blk}})
    d1 = ad.merge({"m.weight": W})["m.weight"] - W
    np.testing.assert_allclose(ad.scaled(3.0).merge({"m.weight": W})["m.weight"] - W, 3 * d1, rtol=1e-5, atol=1e-6)
    bat = Adapter(miss.MissConfig(target_modules=["m"], r=2, init_weights="bat"),
                  {"m": {"miss_block": rng.standard_normal((2, 2, 2)).astype(np.float32)}})
    with pytest.raises(UnsupportedError, match="no linear scale"):
        bat.scaled(3.0).merge({"m.weight": W})
