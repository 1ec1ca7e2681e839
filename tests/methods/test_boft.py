"""BOFT: the block-aware butterfly against a dense float64 reference built from permutation matrices,
round trips, dtypes, backends, PEFT's validation rules and bad input."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, strategies as st

from tests.helpers import assert_same_namespace, to_np, to_xp
from peftmath import Adapter
from peftmath.errors import ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import boft


def perm_matrix(perm):
    n = len(perm)
    P = np.zeros((n, n))
    P[np.arange(n), perm] = 1.0
    return P


def reference_perm(n, nb, rr, levels):
    """An independent reading of PEFT's block_butterfly_perm (numpy slicing, not lists)."""
    if levels == 0:
        return np.arange(n)
    size = n // nb
    chunks = np.arange(size).reshape(size // rr, rr)
    order = np.concatenate([chunks[0::2], chunks[1::2]]).reshape(-1)
    return np.concatenate([g + order for g in range(0, n, size)])


def dense_M(Q):
    """M = B_{m-1} ... B_0 with dense P_i D_i P_iᵀ and a dense float64 Cayley map."""
    m, nb, b, _ = Q.shape
    n = nb * b
    M = np.eye(n)
    for i in range(m):
        blocks = []
        for blk in Q[i]:
            S = 0.5 * (blk - blk.T)
            blocks.append((np.eye(b) - S) @ np.linalg.inv(np.eye(b) + S))
        D = scipy.linalg.block_diag(*blocks)
        P = perm_matrix(reference_perm(n, nb // 2**i, b // 2, m - 1))
        M = P @ D @ P.T @ M
    return M


@st.composite
def butterfly(draw):
    m = draw(st.integers(1, 3))
    b = draw(st.sampled_from([2, 4] if m > 1 else [1, 2, 3, 4]))
    nb = draw(st.sampled_from([2**(m - 1) * k for k in (1, 2)] if m > 1 else [1, 2, 3]))
    if m > 1 and nb % 2:
        nb *= 2
    return m, nb, b


@given(layout=butterfly(), out=st.integers(1, 5), seed=st.integers(0, 2**32 - 1), conv2d=st.booleans())
def test_block_aware_equals_dense_reference(layout, out, seed, conv2d):
    m, nb, b = layout
    n = nb * b
    rng = np.random.default_rng(seed)
    Q = rng.normal(0, 0.4, (m, nb, b, b))
    if conv2d:
        W = rng.standard_normal((out, n, 1, 1))
        s = rng.normal(1, 0.2, (1, out))
    else:
        W = rng.standard_normal((out, n))
        s = rng.normal(1, 0.2, (out, 1))
    M = dense_M(Q)
    np.testing.assert_allclose(boft.dense_rotation(boft.cayley(Q)), M, atol=1e-12)
    np.testing.assert_allclose(M.T @ M, np.eye(n), atol=1e-12)
    sv = s.reshape(-1)
    merged = boft.merge(W, Q, s)
    want = sv[:, None] * (W.reshape(out, n) @ M.T)
    np.testing.assert_allclose(merged.reshape(out, n), want, atol=1e-12 * (1 + np.abs(want).max()))
    back = boft.unmerge(merged, Q, s)
    np.testing.assert_allclose(back, W, atol=1e-12 * (1 + np.abs(W).max()) / np.abs(sv).min())
    bias = rng.standard_normal(out)
    if conv2d:
        x = rng.standard_normal((2, n, 3, 2))
        y = boft.forward(x, W, Q, s, bias=bias)
        want_y = np.einsum("oc,bchw->bohw", want, x) + bias[None, :, None, None]
    else:
        x = rng.standard_normal((3, n))
        y = boft.forward(x, W, Q, s, bias=bias)
        want_y = (x @ M @ W.T) * sv + bias
        np.testing.assert_allclose(y, x @ merged.T + bias, atol=1e-11 * (1 + np.abs(want_y).max()))
    np.testing.assert_allclose(y, want_y, atol=1e-11 * (1 + np.abs(want_y).max()))


def test_perm_matches_reference_and_example():
    assert boft.butterfly_perm(16, 2, 2, 1) == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    for n, nb, rr in ((16, 4, 2), (32, 2, 4), (24, 3, 2), (64, 4, 4)):
        np.testing.assert_array_equal(boft.butterfly_perm(n, nb, rr, 2), reference_perm(n, nb, rr, 2))


@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 10), scale=st.floats(0.01, 3.0))
def test_cayley_orthogonal(seed, b, scale):
    Q = np.random.default_rng(seed).normal(0, scale, (3, b, b)).astype(np.float32)
    R = boft.cayley(Q)
    assert R.dtype == np.float32
    S = 0.5 * (Q - np.swapaxes(Q, -1, -2)).astype(np.float64)
    cond = 1 + np.linalg.norm(S, 2, axis=(1, 2)).max()
    err = np.abs(np.swapaxes(R, -1, -2).astype(np.float64) @ R - np.eye(b)).max()
    assert err <= 8 * b * 2.0**-23 * cond**2


def test_conv2d_kxk_non_square_and_geometry():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((3, 2, 3, 2))  # non-square kernel: n = 12
    Q = rng.normal(0, 0.3, (2, 3, 4, 4))  # m=2 needs N_b even -> use block_num 2 below instead
    Q = rng.normal(0, 0.3, (2, 2, 6, 6))
    s = rng.normal(1, 0.1, (1, 3))
    bias = rng.standard_normal(3)
    x = rng.standard_normal((2, 2, 7, 6))
    kw = dict(stride=(2, 1), padding=(1, 0), dilation=(2, 1))
    y = boft.forward(x, W, Q, s, bias=bias, **kw)
    lay = Layer.of(W.shape)
    want = lay.base_forward(x, boft.merge(W, Q, s), bias, np, **kw)
    np.testing.assert_allclose(y, want, atol=1e-12)
    # PEFT ignores dilation in its Conv2d forward: peft_compat reproduces it (different output size)
    yc = boft.forward(x, W, Q, s, bias=bias, stride=2, padding=1, dilation=2, peft_compat=True)
    assert yc.shape != boft.forward(x, W, Q, s, bias=bias, stride=2, padding=1, dilation=2).shape


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_dtypes(dtype):
    rng = np.random.default_rng(2)
    W = rng.standard_normal((4, 8)).astype(dtype)
    Q = rng.normal(0, 0.2, (2, 2, 4, 4)).astype(np.float32)
    s = rng.normal(1, 0.1, (4, 1)).astype(np.float32)
    merged = boft.merge(W, Q, s)
    assert merged.dtype == W.dtype
    want = (s.reshape(-1, 1) * (W.astype(np.float64) @ dense_M(Q.astype(np.float64)).T))
    spacing = np.spacing(np.abs(want).astype(dtype).astype(np.float32)).astype(np.float64)
    tol = spacing * 1.01 + (1e-5 if dtype in (np.float32, np.float64) else 0) * np.abs(want)
    assert (np.abs(merged.astype(np.float64) - want.astype(dtype).astype(np.float64)) <= tol).all()
    y = boft.forward(rng.standard_normal((2, 8)).astype(dtype), W, Q, s)
    assert y.dtype == W.dtype
    assert boft.unmerge(merged, Q, s).dtype == W.dtype


def test_backends(xp):
    rng = np.random.default_rng(3)
    W = rng.standard_normal((4, 16)).astype(np.float32)
    Q = rng.normal(0, 0.2, (2, 4, 4, 4)).astype(np.float32)
    s = rng.normal(1, 0.1, (4, 1)).astype(np.float32)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    Wx, Qx, sx = to_xp(xp, W), to_xp(xp, Q), to_xp(xp, s)
    merged = boft.merge(Wx, Qx, sx)
    back = boft.unmerge(merged, Qx, sx)
    y = boft.forward(to_xp(xp, x), Wx, Qx, sx)
    assert_same_namespace(xp, merged, back, y)
    M = dense_M(Q.astype(np.float64))
    np.testing.assert_allclose(to_np(merged), s * (W @ M.T), atol=1e-5)
    np.testing.assert_allclose(to_np(back), W, atol=1e-5)
    np.testing.assert_allclose(to_np(y), (x @ M @ W.T) * s.reshape(-1), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# config and validation
# --------------------------------------------------------------------------------------------------
def test_config():
    c = boft.BOFTConfig()
    assert (c.boft_block_size, c.boft_block_num, c.boft_n_butterfly_factor, c.init_weights) == (4, 0, 1, True)
    for bad in (dict(boft_block_num=2), dict(boft_block_size=0), dict(boft_n_butterfly_factor=0),
                dict(bias="lora_only"), dict(boft_dropout=-0.1), dict(init_weights=None)):
        with pytest.raises(ConfigError):
            c.replace(**bad)


@pytest.mark.parametrize("n,kw", [
    (10, dict(boft_block_size=4)),                               # does not divide
    (12, dict(boft_block_num=5)),                                # does not divide
    (16, dict(boft_block_num=2, boft_n_butterfly_factor=3)),     # m-1 > log2(N_b)
    (24, dict(boft_block_num=6, boft_n_butterfly_factor=3)),     # N_b not a multiple of 2^(m-1)
    (12, dict(boft_block_size=4, boft_n_butterfly_factor=2)),    # n not a multiple of b·2^(m-1)
    (12, dict(boft_block_size=3, boft_n_butterfly_factor=2)),    # odd block size with m > 1
    (6, dict(boft_block_num=2, boft_n_butterfly_factor=2)),      # odd block size (3) with m > 1
    (8, dict(boft_block_size=4, boft_n_butterfly_factor=0)),
])
def test_layout_rejects_like_peft(n, kw):
    with pytest.raises(ConfigError):
        boft.butterfly_layout(n, **kw)


def test_module_adapter_and_bad_input():
    rng = np.random.default_rng(0)
    state = {"l.weight": rng.standard_normal((6, 8)).astype(np.float32), "l.bias": np.ones(6, np.float32),
             "c.weight": rng.standard_normal((4, 2, 2, 2)).astype(np.float32)}
    cfg = boft.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, init_weights=False)
    ps = {}
    for name in ("l", "c"):
        ps[name], w = boft.BOFTModule.initialize(name, cfg, Layer.of(state[f"{name}.weight"].shape), seed=2)
        assert w is None
    assert ps["l"]["boft_s"].shape == (6, 1) and ps["c"]["boft_s"].shape == (1, 4)
    assert ps["l"]["boft_R"].shape == (2, 4, 2, 2)
    ad = Adapter(cfg, ps)
    merged = ad.merge(state)
    back = ad.unmerge(merged)
    for key in ("l.weight", "c.weight"):
        np.testing.assert_allclose(back[key], state[key], atol=1e-5)
    np.testing.assert_array_equal(merged["l.bias"], state["l.bias"])
    x = rng.standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(ad.forward("l", x, state), x @ merged["l.weight"].T + 1, atol=1e-5)
    assert ad.module("l").layer.weight_shape == (6, 8)  # inferred without the base weight
    with pytest.raises(UnsupportedError, match="multiplicative"):
        ad.delta_weight("l")
    # a PEFT-on-CPU checkpoint: config m=2 but boft_R saved with one level
    one = dict(ps["l"], boft_R=rng.normal(0, 0.1, (1, 4, 2, 2)).astype(np.float32))
    with pytest.warns(UserWarning, match="butterfly"):
        mod = boft.BOFTModule("l", cfg, one, Layer.of((6, 8)))
    assert mod.m == 1
    # zero scale on unmerge: refused, nothing modified
    W = merged["l.weight"].copy()
    s0 = ps["l"]["boft_s"].copy()
    s0[2, 0] = 0.0
    with pytest.raises(NotInvertibleError, match="boft_s"):
        boft.unmerge(W, ps["l"]["boft_R"], s0, copy=False)
    s0[2, 0] = np.nan
    with pytest.raises(NotInvertibleError):
        boft.BOFTModule("l", cfg, dict(ps["l"], boft_s=s0), Layer.of((6, 8))).unmerge(W, copy=False)
    np.testing.assert_array_equal(W, merged["l.weight"])
    with pytest.raises(ShapeError, match="boft_R"):
        boft.BOFTModule("l", cfg, dict(ps["l"], boft_R=np.zeros((2, 2, 4, 4), np.float32)), Layer.of((6, 8)))
    with pytest.raises(ShapeError, match="boft_s"):
        boft.BOFTModule("l", cfg, dict(ps["l"], boft_s=np.ones((1, 6), np.float32)), Layer.of((6, 8)))
    with pytest.raises(ShapeError):
        boft.merge(W, ps["l"]["boft_R"], ps["l"]["boft_s"], layer=Layer.of((6, 10)))
    with pytest.raises(UnsupportedError):
        boft.BOFTModule.initialize("e", cfg, Layer.of((10, 8), "Embedding"))
    with pytest.raises(UnsupportedError, match="groups"):
        boft.rotated_dim(Layer.of((4, 1, 2, 2), groups=2))
    with pytest.raises(ConfigError):
        boft.BOFTModule.initialize("x", cfg, Layer.of((4, 6)))  # 6 not a multiple of 2·2


def test_examples_are_non_trivial():
    for label, fields in boft.EXAMPLES.items():
        cfg = boft.BOFTConfig(**fields)
        for shape in ((8, 16), (4, 4, 2, 2)):
            lay = Layer.of(shape)
            ps, _ = boft.BOFTModule.initialize("m", cfg, lay)
            mod = boft.BOFTModule("m", cfg, ps, lay)
            W = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            merged = mod.merge(W).weight
            assert np.abs(merged - W).max() > 1e-3, label
            np.testing.assert_allclose(mod.unmerge(merged).weight, W, atol=1e-5)
    assert math.isclose(float(np.std(boft.init_weights(Layer.of((64, 64)), 1, 16, 4, init_weights=False)[0])), 0.1,
                        rel_tol=0.1)
