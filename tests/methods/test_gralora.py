"""GraLoRA's own math against an independent float64 computation (PEFT's scatter formula written with loops:
each ΔW entry from the ``k × k`` block products), rank, the in-place kernel on many row tiles and on every layout,
half precision, initialisation and refusals."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from peftmath import Adapter
from peftmath.errors import ConfigError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import gralora

BF16 = np.dtype(ml_dtypes.bfloat16)


def _reference(A, B, Ag, Bg, c):
    """ΔW (out, in) entry by entry: ΔW[j·ob + o, n·ib + i] = c Σ_t A[n, i, j·s + t] B[j, n·s + t, o] (+ c B_g A_g)."""
    k, ib, r = A.shape
    ob, s = B.shape[2], r // k
    D = np.zeros((k * ob, k * ib))
    for j in range(k):
        for n in range(k):
            for t in range(s):
                D[j * ob:(j + 1) * ob, n * ib:(n + 1) * ib] += np.outer(B[j, n * s + t, :], A[n, :, j * s + t])
    if Ag is not None:
        D += Bg @ Ag
    return c * D


def _case(out, inn, r, k, h=0, seed=0):
    cfg = gralora.GraloraConfig(target_modules=["m"], r=r, gralora_k=k, hybrid_r=h, alpha=3.0, init_weights=False)
    p = gralora.init_weights(Layer.of((out, inn)), r, k, h, init=False, seed=seed)
    f = {key: np.asarray(v, np.float64) for key, v in p.items()}
    return cfg, f["gralora_A"], f["gralora_B"], f.get("gralora_A_general.weight"), f.get("gralora_B_general.weight")


@pytest.mark.parametrize("out,inn,r,k,h", [(12, 8, 4, 2, 0), (9, 12, 6, 3, 2), (6, 10, 2, 1, 3), (16, 16, 8, 4, 0)])
def test_delta_merge_forward_match_the_block_sum(out, inn, r, k, h):
    cfg, A, B, Ag, Bg = _case(out, inn, r, k, h)
    c = cfg.scaling
    assert c == 3.0 / (r + h)
    want = _reference(A, B, Ag, Bg, c)
    np.testing.assert_allclose(gralora.delta_weight(A, B, Ag, Bg, scaling=c), want, rtol=1e-12, atol=1e-13)
    # the point of the method: up to rank k·r from the parameters of a rank-r LoRA (+ h)
    assert np.linalg.matrix_rank(want) == min(out, inn, k * r + h)
    W = np.random.default_rng(3).standard_normal((out, inn))
    merged = gralora.merge(W, A, B, Ag, Bg, scaling=c)
    np.testing.assert_allclose(merged, W + want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(gralora.unmerge(merged, A, B, Ag, Bg, scaling=c), W, rtol=1e-12, atol=1e-13)
    x, b = np.random.default_rng(4).standard_normal((2, 3, inn)), np.random.default_rng(5).standard_normal(out)
    np.testing.assert_allclose(gralora.forward(x, W, A, B, Ag, Bg, scaling=c, bias=b), x @ (W + want).T + b,
                               rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(gralora.forward(x[0, 0], W, A, B, Ag, Bg, scaling=c), W @ x[0, 0] + want @ x[0, 0],
                               rtol=1e-11, atol=1e-11)  # one vector
    conv1d = Layer.of((inn, out), "Conv1D")  # the same module on a transformers Conv1D stores ΔWᵀ
    np.testing.assert_allclose(gralora.delta_weight(A, B, Ag, Bg, scaling=c, layer=conv1d), want.T, rtol=1e-12,
                               atol=1e-13)
    np.testing.assert_allclose(gralora.forward(x, W.T.copy(), A, B, Ag, Bg, scaling=c, layer=conv1d),
                               x @ (W + want).T, rtol=1e-11, atol=1e-11)


def test_in_place_kernel_on_many_tiles_every_layout_and_copy():
    """A weight of several 4 MiB row tiles whose boundaries cut through block rows (out/k = 700 rows per block,
    tiles of 1022 rows): ``copy=False`` on C, Fortran, a strided slice, and ``copy=True``, all equal the float64
    sum within float32 rounding."""
    out, inn, r, k, h = 2100, 1026, 6, 3, 2
    cfg, *f = _case(out, inn, r, k, h, seed=7)
    f = [10 * a for a in f]  # kaiming-uniform factors of a wide layer are small: a visible update
    args = [a.astype(np.float32) for a in f]
    W0 = np.random.default_rng(8).standard_normal((out, inn)).astype(np.float32)
    want = W0 + _reference(*f, cfg.scaling)
    tol = 1e-5 * (1 + np.abs(want).max())
    assert np.max(np.abs(want - W0)) > 0.1
    for W in (W0.copy(), np.asfortranarray(W0), np.concatenate([W0, W0], 1)[:, ::2]):
        W[...] = W0
        assert gralora.merge(W, *args, scaling=cfg.scaling, copy=False) is W
        assert np.max(np.abs(W - want)) <= tol
        gralora.unmerge(W, *args, scaling=cfg.scaling, copy=False)
        assert np.max(np.abs(W - W0)) <= tol
    got = gralora.merge(W0, *args, scaling=cfg.scaling)
    assert np.max(np.abs(got - want)) <= tol and np.max(np.abs(W0 - want)) > 0.1  # W0 untouched


def test_conv1d_permuted_and_read_only_layouts_and_scale():
    cfg, A, B, Ag, Bg = _case(6, 8, 4, 2, 1, seed=9)
    args = [a.astype(np.float32) for a in (A, B, Ag, Bg)]
    d = _reference(A, B, Ag, Bg, cfg.scaling)
    W0 = np.random.default_rng(10).standard_normal((8, 6)).astype(np.float32)  # Conv1D (in, out)
    lay = Layer.of((8, 6), "Conv1D")
    for W in (W0.copy(), np.asfortranarray(W0), np.ascontiguousarray(W0.T).T):
        W[...] = W0
        gralora.merge(W, *args, scaling=cfg.scaling, layer=lay, copy=False)
        np.testing.assert_allclose(W, W0 + d.T, rtol=1e-5, atol=1e-5)
    ro = W0.copy()
    ro.setflags(write=False)
    with pytest.raises(UnsupportedError, match="copy=True"):
        gralora.merge(ro, *args, scaling=cfg.scaling, layer=lay, copy=False)
    np.testing.assert_allclose(gralora.merge(ro, *args, scaling=cfg.scaling, layer=lay), W0 + d.T, rtol=1e-5,
                               atol=1e-5)
    params = dict(zip(gralora.PARAMETER_SUFFIXES, args))
    ad = Adapter(cfg, {"m": params}, layer_kinds={"m": "Conv1D"})
    d1 = ad.merge({"m.weight": W0})["m.weight"] - W0
    d2 = ad.scaled(2.0).merge({"m.weight": W0})["m.weight"] - W0
    np.testing.assert_allclose(d2, 2 * d1, rtol=1e-5, atol=1e-5)
    assert ad.num_trainable_parameters() == sum(a.size for a in args)


def test_half_precision_rounds_once_and_peft_compat_rounds_delta_first():
    cfg, A, B, Ag, Bg = _case(12, 8, 4, 2, 2, seed=11)
    W0 = np.random.default_rng(12).standard_normal((12, 8)).astype(BF16)
    f32 = [a.astype(np.float32) for a in (A, B, Ag, Bg)]
    d = _reference(*(a.astype(np.float64) for a in f32), cfg.scaling)
    exact = (W0.astype(np.float64) + d).astype(np.float32).astype(BF16)
    np.testing.assert_array_equal(gralora.merge(W0, *f32, scaling=cfg.scaling), exact)
    Wc = W0.copy()
    gralora.merge(Wc, *f32, scaling=cfg.scaling, copy=False)  # the kernel's float32 row tiles: the same bits
    np.testing.assert_array_equal(Wc, exact)
    # bfloat16 factors: PEFT forms ΔW in float32 and rounds it to bfloat16 before adding
    b16 = [a.astype(BF16) for a in f32]
    db = _reference(*(a.astype(np.float64) for a in b16), cfg.scaling)
    compat = gralora.merge(W0, *b16, scaling=cfg.scaling, peft_compat=True)
    want = (W0.astype(np.float32) + db.astype(np.float32).astype(BF16).astype(np.float32)).astype(BF16)
    np.testing.assert_array_equal(compat, want)


def test_initialisation():
    lay = Layer.of((6, 8))
    p = gralora.init_weights(lay, 4, 2, 3, seed=0)  # PEFT: B = 0, A kaiming-uniform per block (fan_in in/k)
    assert not np.any(p["gralora_B"]) and not np.any(p["gralora_B_general.weight"])
    assert 0.3 < np.abs(p["gralora_A"]).max() <= 0.5 and np.abs(p["gralora_A_general.weight"]).max() <= 8 ** -0.5
    q = gralora.init_weights(lay, 4, 2, 3, init=False, seed=0)
    assert np.abs(q["gralora_B"]).max() <= 0.5 and np.abs(q["gralora_B_general.weight"]).max() <= 3 ** -0.5
    assert np.any(q["gralora_B"]) and np.array_equal(p["gralora_A"], q["gralora_A"])
    sizes = {key: a.size for key, a in gralora.init_weights(Layer.of((16, 16)), 8, 4, seed=1).items()}
    assert sum(sizes.values()) == 8 * (16 + 16)  # the parameters of a rank-r LoRA, whatever k


def test_refusals():
    cfg, A, B, Ag, Bg = _case(6, 8, 4, 2, 1)
    with pytest.raises(ConfigError, match="not divisible by gralora_k"):
        gralora.GraloraConfig(r=3, gralora_k=2).validate()
    with pytest.raises(ConfigError, match="hybrid_r"):
        gralora.GraloraConfig(hybrid_r=-1).validate()
    with pytest.raises(ShapeError, match="in_features=9 is not divisible by gralora_k=2"):
        gralora.GraloraModule.initialize("m", cfg, Layer.of((6, 9)))
    with pytest.raises(ShapeError, match="GraLoRA is not defined for a Conv2d"):
        gralora.GraloraModule.initialize("m", cfg, Layer.of((6, 8, 3, 3)))
    with pytest.raises(ShapeError, match="needs both"):
        gralora.delta_weight(A, B, Ag, None, scaling=1.0)
    params = {"gralora_A": A, "gralora_B": B, "gralora_A_general.weight": Ag, "gralora_B_general.weight": Bg}
    with pytest.raises(ShapeError, match="the config says"):
        Adapter(cfg.replace(hybrid_r=2), {"m": params}).merge({"m.weight": np.zeros((6, 8))})
    with pytest.raises(ShapeError, match="neither"):
        Adapter(cfg, {"m": params}).merge({"m.weight": np.zeros((6, 6))})
    with pytest.raises(ShapeError, match="unexpected GraLoRA tensors"):
        Adapter(cfg, {"m": {**params, "lora_A.weight": A}}).merge({"m.weight": np.zeros((6, 8))})
    W = np.zeros((6, 8))
    before = W.copy()
    with pytest.raises(ShapeError):
        gralora.merge(W, A[:, :3], B, scaling=1.0, copy=False)  # nothing written on an error
    np.testing.assert_array_equal(W, before)
