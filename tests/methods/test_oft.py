"""OFT: properties against independent float64 references (dense block-diagonal matrices, explicit
convolutions), round trips, dtypes, backends and bad input."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, strategies as st

from tests.helpers import assert_same_namespace, to_np, to_xp
from peftmath import Adapter
from peftmath._array import conv
from peftmath.errors import ConfigError, PeftMathError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import oft

EPS = {"float32": 2.0**-23, "float64": 2.0**-52}


def params(rng, k, b, scale):
    return rng.normal(0.0, scale, (k, b * (b - 1) // 2))


def dense_skew(q, b):
    """An independent skew construction: loops over the upper triangle."""
    out = []
    for row in q:
        S = np.zeros((b, b))
        it = iter(row)
        for i in range(b):
            for j in range(i + 1, b):
                v = next(it)
                S[i, j], S[j, i] = v, -v
        out.append(S)
    return np.stack(out)


def dense_rotation(blocks, n):
    b = blocks.shape[-1]
    reps = n // b if blocks.shape[0] == 1 else 1
    return scipy.linalg.block_diag(*([blk for blk in blocks] * reps))


# --------------------------------------------------------------------------------------------------
# rotation blocks
# --------------------------------------------------------------------------------------------------
@given(b=st.integers(2, 12), k=st.integers(1, 4), scale=st.floats(0.01, 2.0), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(["float32", "float64"]))
def test_exact_cayley_is_orthogonal(b, k, scale, seed, dtype):
    q = params(np.random.default_rng(seed), k, b, scale).astype(dtype)
    R = oft.rotation_blocks(q, use_cayley_neumann=False)
    assert R.dtype == np.dtype(dtype)
    err = np.abs(np.swapaxes(R, -1, -2).astype(np.float64) @ R - np.eye(b)).max()
    # ||RᵀR − I|| grows with b and the conditioning of I + S (≤ 1 + ||S||)
    cond = 1.0 + np.linalg.norm(dense_skew(q.astype(np.float64), b), 2, axis=(1, 2)).max()
    assert err <= 8 * b * EPS[dtype] * cond**2


@given(b=st.integers(1, 8), k=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_skew_matches_loop_construction(b, k, seed):
    q = params(np.random.default_rng(seed), k, b, 1.0)
    np.testing.assert_array_equal(oft.skew_blocks(q, b), dense_skew(q, b))


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 8])
def test_neumann_series_formula(terms):
    S = dense_skew(params(np.random.default_rng(terms), 3, 5, 0.2), 5)
    want = np.eye(5) + np.zeros_like(S)
    if terms == 2:
        want = want + 2 * S
    elif terms >= 3:
        top = max(terms - 2, 2)
        for p in range(1, top + 1):
            want = want + 2 * np.linalg.matrix_power(S, p)
        want = want + np.linalg.matrix_power(S, top + 1)
    np.testing.assert_allclose(oft.cayley_neumann(S, terms), want, rtol=1e-13, atol=1e-13)


def test_neumann_and_exact_are_transposed():
    """PEFT's two options are mutually transposed: the series approximates (I+S)(I−S)⁻¹."""
    q = params(np.random.default_rng(3), 2, 6, 0.02)
    neumann = oft.rotation_blocks(q, num_cayley_neumann_terms=30)
    exact = oft.rotation_blocks(q, use_cayley_neumann=False)
    np.testing.assert_allclose(neumann, np.swapaxes(exact, -1, -2), atol=1e-14)
    assert np.abs(neumann - exact).max() > 0.01  # and they really differ


def test_coft_projection_bounds_norm_and_is_functional():
    q = params(np.random.default_rng(0), 4, 6, 0.5)
    before = q.copy()
    eps = 0.1
    p = oft.coft_project(q, eps=eps)
    np.testing.assert_array_equal(q, before)  # not mutated (PEFT writes into the parameter)
    norms = np.linalg.norm(dense_skew(p, 6), axis=(1, 2))
    np.testing.assert_allclose(norms, eps / 2.0, rtol=1e-12)  # eps / sqrt(4 blocks)
    small = params(np.random.default_rng(1), 4, 6, 1e-5)
    np.testing.assert_array_equal(oft.coft_project(small, eps=eps), small)  # inside the ball: unchanged
    np.testing.assert_allclose(oft.coft_project(p, eps=eps), p, rtol=1e-12)  # idempotent


# --------------------------------------------------------------------------------------------------
# forward / merge / unmerge against dense float64 references
# --------------------------------------------------------------------------------------------------
layers_st = st.sampled_from(["Linear", "Embedding", "Conv2d"])


def make_case(kind, seed, b, k, out):
    rng = np.random.default_rng(seed)
    n = b * k
    if kind == "Linear":
        W = rng.standard_normal((out, n))
    elif kind == "Embedding":
        W = rng.standard_normal((out + 3, n))  # (V, D)
    else:
        kh, kw = [(1, 1), (3, 3), (3, 2), (1, 2)][seed % 4]
        c = max(1, n // (kh * kw))
        n = c * kh * kw
        W = rng.standard_normal((out, c, kh, kw))
    return rng, W, n


@given(kind=layers_st, b=st.sampled_from([1, 2, 3, 4, 6]), k=st.integers(1, 4), out=st.integers(1, 6),
       share=st.booleans(), neumann=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_merge_matches_dense_reference_and_round_trips(kind, b, k, out, share, neumann, seed):
    rng, W, n = make_case(kind, seed, b, k, out)
    lay = Layer.of(W.shape, kind if kind == "Embedding" else None)
    if n % b:
        return
    q = params(rng, 1 if share else n // b, b, 0.3)
    R = oft.rotation_blocks(q, use_cayley_neumann=neumann)
    D = dense_rotation(R, n)
    merged = oft.merge(W, R, layer=lay)
    if kind == "Embedding":
        want = W @ D
    else:
        want = (W.reshape(W.shape[0], -1) @ D.T).reshape(W.shape)
    tol = 8 * b * EPS["float64"] * (np.abs(W).reshape(W.shape[0], -1).max(axis=1).max() * b + 1)
    np.testing.assert_allclose(merged, want, atol=tol, rtol=0)
    back = oft.unmerge(merged, R, layer=lay)
    np.testing.assert_allclose(back, W, atol=16 * tol, rtol=0)


@given(kind=layers_st, b=st.sampled_from([2, 3, 4]), k=st.integers(1, 3), out=st.integers(1, 5),
       neumann=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_merged_forward_equals_unmerged_forward(kind, b, k, out, neumann, seed):
    rng, W, n = make_case(kind, seed, b, k, out)
    if n % b:
        return
    lay = Layer.of(W.shape, kind if kind == "Embedding" else None)
    R = oft.rotation_blocks(params(rng, n // b, b, 0.3), use_cayley_neumann=neumann)
    bias = None if kind == "Embedding" else rng.standard_normal(W.shape[0])
    kw = {}
    if kind == "Linear":
        x = rng.standard_normal((2, 3, n))
    elif kind == "Embedding":
        x = rng.integers(0, W.shape[0], (2, 4))
    else:
        x = rng.standard_normal((2, W.shape[1], 6, 5))
        kw = dict(stride=(1, 2), padding=1)
    y = oft.forward(x, W, R, bias=bias, layer=lay, **kw)
    merged = oft.merge(W, R, layer=lay)
    y_merged = lay.base_forward(x, merged, bias, np, **kw)
    np.testing.assert_allclose(y, y_merged, atol=1e-11 * (1 + np.abs(y_merged).max()), rtol=0)
    if kind == "Linear":  # and against the dense rotation of x
        want = x @ dense_rotation(R, n) @ W.T + bias
        np.testing.assert_allclose(y, want, atol=1e-12 * (1 + np.abs(want).max()))


def test_conv_peft_compat_fold_differs_even_at_identity():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((3, 2, 3, 3))
    x = rng.standard_normal((1, 2, 5, 6))
    R = oft.rotation_blocks(np.zeros((3, 15)))  # R = I
    base = conv(x, W)
    np.testing.assert_allclose(oft.forward(x, W, R), base, atol=1e-12)
    compat = oft.forward(x, W, R, peft_compat=True)
    assert np.abs(compat - base).max() > 1.0
    # 1x1 kernels: the fold is the identity and both forwards agree
    W1 = rng.standard_normal((3, 4, 1, 1))
    x1 = rng.standard_normal((2, 4, 3, 3))
    R1 = oft.rotation_blocks(params(rng, 2, 2, 0.3))
    np.testing.assert_allclose(oft.forward(x1, W1, R1, peft_compat=True), oft.forward(x1, W1, R1), atol=1e-12)


def test_fold_reference_loops():
    """The peft_compat transform against an explicit loop over PEFT's index arithmetic."""
    rng = np.random.default_rng(4)
    B, C, H, Wd, kh, kw = 2, 2, 4, 5, 2, 3
    x = rng.standard_normal((B, C, H, Wd))
    R = oft.rotation_blocks(params(rng, 2, 6, 0.4))
    got = oft._peft_fold_rotate(x, R, (kh, kw))
    ho, wo = H - kh + 1, Wd - kw + 1
    D = dense_rotation(R, C * kh * kw)
    rot = np.zeros((B, ho, wo, C * kh * kw))
    for bb in range(B):
        for i in range(ho):
            for j in range(wo):
                rot[bb, i, j] = x[bb, :, i:i + kh, j:j + kw].reshape(-1) @ D
    flat = rot.reshape(B, ho, wo, C, kh, kw).transpose(0, 3, 1, 2, 4, 5).reshape(B, C * kh * kw, ho * wo)
    want = np.zeros_like(x)
    for bb in range(B):
        for ch in range(C * kh * kw):
            c, rem = divmod(ch, kh * kw)
            p, qq = divmod(rem, kw)
            for l_ in range(ho * wo):
                i, j = divmod(l_, wo)
                want[bb, c, i + p, j + qq] += flat[bb, ch, l_]
    np.testing.assert_allclose(got, want, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# dtypes and backends
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_rounds_once(dtype):
    rng = np.random.default_rng(1)
    W64 = rng.standard_normal((5, 8))
    W = W64.astype(dtype)
    q = params(rng, 2, 4, 0.2).astype(np.float32)
    R = oft.rotation_blocks(q)
    got = oft.merge(W, R)
    assert got.dtype == W.dtype
    exact = W.astype(np.float64) @ dense_rotation(R.astype(np.float64), 8).T
    want = exact.astype(dtype)
    # float32 compute then one rounding: at most one ulp of the target dtype away from the exact rounding
    spacing = np.abs(np.spacing(np.abs(exact).astype(dtype).astype(np.float32)).astype(np.float64))
    assert (np.abs(got.astype(np.float64) - want.astype(np.float64)) <= spacing * 1.01 + 1e-30).all()
    back = oft.unmerge(got, R)
    assert back.dtype == W.dtype
    y = oft.forward(rng.standard_normal((3, 8)).astype(dtype), W, R)
    assert y.dtype == W.dtype


def test_backends(xp):
    rng = np.random.default_rng(2)
    W = rng.standard_normal((4, 6)).astype(np.float32)
    q = params(rng, 3, 2, 0.3).astype(np.float32)
    Wx, qx = to_xp(xp, W), to_xp(xp, q)
    R = oft.rotation_blocks(qx)
    merged = oft.merge(Wx, R)
    back = oft.unmerge(merged, R)
    x = rng.standard_normal((2, 6)).astype(np.float32)
    y = oft.forward(to_xp(xp, x), Wx, R)
    E = to_xp(xp, rng.standard_normal((5, 6)).astype(np.float32))
    ids = xp.asarray([[0, 4, 2]])
    ye = oft.forward(ids, E, R, layer="Embedding")
    Rexact = oft.rotation_blocks(qx, use_cayley_neumann=False)
    Wc = to_xp(xp, rng.standard_normal((3, 2, 3, 1)).astype(np.float32))
    yc = oft.forward(to_xp(xp, rng.standard_normal((1, 2, 4, 4)).astype(np.float32)), Wc, Rexact, peft_compat=True)
    assert_same_namespace(xp, R, merged, back, y, ye, Rexact, yc)
    Rn = oft.rotation_blocks(q.astype(np.float64))
    np.testing.assert_allclose(to_np(merged), W @ dense_rotation(Rn, 6).T, atol=1e-5)
    np.testing.assert_allclose(to_np(back), W, atol=1e-5)
    np.testing.assert_allclose(to_np(y), x @ dense_rotation(Rn, 6) @ W.T, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# config, layout, module, adapter
# --------------------------------------------------------------------------------------------------
def test_config_defaults_and_validation():
    c = oft.OFTConfig()
    assert (c.r, c.oft_block_size, c.use_cayley_neumann, c.num_cayley_neumann_terms, c.eps) == (0, 32, True, 5, 6e-5)
    for bad in (dict(r=4), dict(r=0, oft_block_size=0), dict(oft_block_size=-2), dict(init_weights="x"),
                dict(bias="lora_only"), dict(num_cayley_neumann_terms=0), dict(module_dropout=1.0)):
        with pytest.raises(ConfigError):
            c.replace(**bad)
    with pytest.raises(ConfigError, match="0.14"):
        oft.OFTConfig.from_dict({"peft_type": "OFT", "r": 8})
    with pytest.warns(UserWarning, match="0.18"):
        oft.OFTConfig.from_dict({"peft_type": "OFT", "oft_block_size": 4, "peft_version": "0.17.1"})


@pytest.mark.parametrize("n,p", [(768, 20), (10, 4), (10, 64), (12, 5), (7, 3), (96, 32)])
def test_block_layout_adjusts_like_peft(n, p):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        r, b = oft.block_layout(n, oft_block_size=p)
    assert r * b == n and n % b == 0
    assert bool(rec) == (n % p != 0 or p > n)
    assert b == oft.adjust_oft_parameters(n, p) if rec else b == p


def _module(kind, W, config, seed=0):
    lay = Layer.of(W.shape, kind)
    params_, _ = oft.OFTModule.initialize("m", config, lay, seed=seed, init=False)
    return oft.OFTModule("m", config, params_, lay), params_


def test_module_and_adapter_round_trip():
    rng = np.random.default_rng(0)
    state = {"a.weight": rng.standard_normal((5, 8)).astype(np.float32), "a.bias": np.ones(5, np.float32),
             "e.weight": rng.standard_normal((9, 8)).astype(np.float32),
             "c.weight": rng.standard_normal((3, 2, 2, 2)).astype(np.float32)}
    cfg = oft.OFTConfig(oft_block_size=4, use_cayley_neumann=False, coft=True, eps=0.2)
    ps = {}
    for name, kind in (("a", None), ("e", "Embedding"), ("c", None)):
        lay = Layer.of(state[f"{name}.weight"].shape, kind)
        ps[name], _ = oft.OFTModule.initialize(name, cfg, lay, seed=1, init=False)
    assert "oft_embedding_R.weight" in ps["e"] and "oft_R.weight" in ps["a"]
    ad = Adapter(cfg, ps)
    mod = ad.module("e", weight_shape=(9, 8))
    assert mod.layer.kind.value == "Embedding"
    merged = ad.merge(state)
    back = ad.unmerge(merged)
    for key in ("a.weight", "e.weight", "c.weight"):
        np.testing.assert_allclose(back[key], state[key], atol=2e-6)
        assert not np.array_equal(merged[key], state[key])
    x = rng.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(ad.forward("a", x, state), x @ merged["a.weight"].T + 1, atol=2e-6)
    with pytest.raises(UnsupportedError, match="multiplicative"):
        ad.delta_weight("a", weight_shape=(5, 8))
    assert ad.module("a", weight_shape=(5, 8)).rotation().shape == (2, 4, 4)
    # in place
    W = state["a.weight"].copy()
    res = ad.module("a", weight_shape=W.shape).merge(W, copy=False)
    assert res.weight is W and np.array_equal(W, merged["a.weight"])


def test_initialize_and_examples():
    lay = Layer.of((6, 8))
    p0, w = oft.OFTModule.initialize("m", oft.OFTConfig(oft_block_size=4), lay)
    assert w is None and p0["oft_R.weight"].shape == (2, 6) and not p0["oft_R.weight"].any()
    p1, _ = oft.OFTModule.initialize("m", oft.OFTConfig(r=2, oft_block_size=0, block_share=True), Layer.of((6, 64)),
                                     init=False, seed=3)
    q = p1["oft_R.weight"]
    assert q.shape == (1, 32 * 31 // 2) and 0.08 < q.std() < 0.12
    for label, fields in oft.EXAMPLES.items():
        cfg = oft.OFTConfig(**fields)
        for kind, shape in ((None, (8, 16)), ("Embedding", (10, 16)), (None, (4, 4, 2, 2))):
            lay = Layer.of(shape, kind)
            ps, _ = oft.OFTModule.initialize("m", cfg, lay, init=cfg.init_weights)
            mod = oft.OFTModule("m", cfg, ps, lay)
            W = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            merged = mod.merge(W).weight
            assert np.abs(merged - W).max() > 1e-4, label
            np.testing.assert_allclose(mod.unmerge(merged).weight, W, atol=1e-5)


def test_bad_input_raises_and_modifies_nothing():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 8)).astype(np.float32)
    before = W.copy()
    cfg = oft.OFTConfig(oft_block_size=4)
    with pytest.raises(ShapeError, match="oft_R.weight"):
        oft.OFTModule("m", cfg, {"oft_R.weight": np.zeros((3, 6), np.float32)}, Layer.of((4, 8)))
    with pytest.raises(ShapeError):
        oft.OFTModule("m", cfg, {"oft_R.weight": np.zeros((2, 5), np.float32)}, Layer.of((4, 8)))
    R = oft.rotation_blocks(np.zeros((3, 3), np.float32))  # three 3x3 blocks: 9 != 8
    for fn in (oft.merge, oft.unmerge):
        with pytest.raises(ShapeError):
            fn(W, R, copy=False)
    with pytest.raises(ShapeError):
        oft.forward(np.ones((2, 8), np.float32), W, R)
    np.testing.assert_array_equal(W, before)
    with pytest.raises(UnsupportedError):
        oft.OFTModule.infer_layer("m", cfg, {"oft_R.weight": np.zeros((2, 6))}, (8, 4), "Conv1D")
    with pytest.raises(UnsupportedError, match="groups"):
        oft.rotated_dim(Layer.of((4, 1, 3, 3), groups=2))
    with pytest.raises(UnsupportedError, match="Conv1d"):
        oft.rotated_dim(Layer.of((4, 2, 3)))
    Wc = rng.standard_normal((2, 2, 2, 2)).astype(np.float32)
    Rc = oft.rotation_blocks(np.zeros((2, 6), np.float32))
    with pytest.raises(UnsupportedError, match="dilation"):
        oft.forward(np.ones((1, 2, 5, 5), np.float32), Wc, Rc, dilation=2)
    # a singular "rotation" cannot be unmerged
    sing = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(PeftMathError):
        oft.unmerge(W, sing, copy=False)
    np.testing.assert_array_equal(W, before)
    # safe merge refuses non-finite results
    Wn = W.copy()
    Wn[0, 0] = np.inf
    with pytest.raises(PeftMathError):
        oft.merge(Wn, oft.rotation_blocks(params(rng, 2, 4, 0.3).astype(np.float32)), safe=True)
