"""HRA's math against an independent float64 computation: the dense product of the reflections built one
by one (never through peftmath's WY form), merge / unmerge / forward on Linear and Conv2d, layouts,
initialisation and refusals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from peftmath.errors import ConfigError, NotInvertibleError, PeftMathWarning, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import hra


def dense_H(u: np.ndarray, apply_GS: bool = False) -> np.ndarray:
    """The n×n matrix, the textbook way (float64)."""
    u = np.asarray(u, np.float64)
    n, r = u.shape
    if apply_GS:
        Q, _ = np.linalg.qr(u)  # the projector QQᵀ does not depend on the signs
        return np.eye(n) - 2 * Q @ Q.T
    H = np.eye(n)
    for i in range(r):
        y = u[:, i] / np.linalg.norm(u[:, i])
        H = H @ (np.eye(n) - 2 * np.outer(y, y))
    return H


def rng_u(n, r, seed=1):
    return np.random.default_rng(seed).standard_normal((n, r))


@pytest.mark.parametrize("apply_GS", [False, True])
@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 2, 2), (6, 2, 3, 1)])
def test_merge_matches_dense_product(shape, apply_GS):
    W = np.random.default_rng(0).standard_normal(shape)
    lay = Layer.of(shape)
    n = lay.matrix_shape[1]
    for r in (1, 3, n):
        u = rng_u(n, r, seed=r)
        H = dense_H(u, apply_GS)
        want = (W.reshape(shape[0], -1) @ H).reshape(shape)
        got = hra.merge(W, u, apply_GS=apply_GS)
        np.testing.assert_allclose(got, want, atol=1e-12, rtol=1e-12)
        back = hra.unmerge(got, u, apply_GS=apply_GS)
        np.testing.assert_allclose(back, W, atol=1e-12, rtol=0)
        np.testing.assert_allclose(H @ H.T, np.eye(n), atol=1e-12)


def test_float32_round_trip_and_rank_of_change():
    W = np.random.default_rng(2).standard_normal((16, 24)).astype(np.float32)
    u = rng_u(24, 4).astype(np.float32)
    merged = hra.merge(W, u)
    assert merged.dtype == np.float32
    assert np.linalg.matrix_rank(merged.astype(np.float64) - W, tol=1e-4) <= 4
    back = hra.unmerge(merged, u)
    assert np.abs(back - W).max() < 20 * np.finfo(np.float32).eps * np.abs(W).max()


def test_bfloat16_rounds_once():
    import ml_dtypes

    W = np.random.default_rng(3).standard_normal((6, 8)).astype(ml_dtypes.bfloat16)
    u = rng_u(8, 2).astype(np.float32)
    got = hra.merge(W, u)
    want = (W.astype(np.float64) @ dense_H(u)).astype(np.float32).astype(ml_dtypes.bfloat16)
    assert got.dtype == W.dtype
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    assert (diff <= np.abs(np.spacing(want.astype(np.float32))) * 256).all()  # at most one bf16 ulp


@pytest.mark.parametrize("apply_GS", [False, True])
def test_linear_forward_equals_merged_layer(apply_GS):
    rng = np.random.default_rng(4)
    W, b, x = rng.standard_normal((5, 7)), rng.standard_normal(5), rng.standard_normal((2, 3, 7))
    u = rng_u(7, 3)
    want = x @ (W @ dense_H(u, apply_GS)).T + b
    np.testing.assert_allclose(hra.forward(x, W, u, bias=b, apply_GS=apply_GS), want, atol=1e-12)


def _conv2d_ref(x, w, b, stride, padding):
    """Direct float64 cross-correlation (no peftmath code)."""
    sh, sw = stride
    ph, pw = padding
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    N, C, H, Wd = x.shape
    O, _, kh, kw = w.shape
    ho, wo = (H - kh) // sh + 1, (Wd - kw) // sw + 1
    out = np.zeros((N, O, ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
            out[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w)
    return out + b[None, :, None, None]


def test_conv2d_forward_and_peft_compat_keywords():
    rng = np.random.default_rng(5)
    W, b = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    x = rng.standard_normal((2, 3, 7, 8))
    u = rng_u(27, 4)
    Wm = (W.reshape(4, -1) @ dense_H(u)).reshape(W.shape)
    got = hra.forward(x, W, u, bias=b, stride=(2, 1), padding=(1, 0))
    np.testing.assert_allclose(got, _conv2d_ref(x, Wm, b, (2, 1), (1, 0)), atol=1e-11)
    # PEFT's unmerged conv takes stride[0] and padding[0] for both axes
    compat = hra.forward(x, W, u, bias=b, stride=(2, 1), padding=(1, 0), peft_compat=True)
    np.testing.assert_allclose(compat, _conv2d_ref(x, Wm, b, (2, 2), (1, 1)), atol=1e-11)


def test_layouts_and_inplace():
    rng = np.random.default_rng(6)
    base = rng.standard_normal((6, 5)).astype(np.float32)
    u = rng_u(5, 2).astype(np.float32)
    want = hra.merge(base, u)
    for W in (np.asfortranarray(base), base.T.copy().T, np.ascontiguousarray(np.repeat(base, 2, axis=1))[:, ::2]):
        np.testing.assert_allclose(hra.merge(W, u), want, atol=1e-6)
        W2 = W.copy(order="K") if W.base is None else W
        out = hra.merge(W2, u, copy=False)
        assert out is W2
        np.testing.assert_allclose(W2, want, atol=1e-6)
    ro = base.copy()
    ro.flags.writeable = False
    with pytest.raises(UnsupportedError, match="copy=True"):
        hra.merge(ro, u, copy=False)
    np.testing.assert_array_equal(ro, base)
    conv = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    perm = np.ascontiguousarray(conv.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # channels_last-like
    uc = rng_u(18, 3).astype(np.float32)
    want = hra.merge(conv, uc)
    hra.merge(perm, uc, copy=False)
    np.testing.assert_allclose(perm, want, atol=1e-6)


def test_torch_channels_last_inplace():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    conv = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    u = rng_u(18, 3).astype(np.float32)
    t = torch.from_numpy(conv.copy()).to(memory_format=torch.channels_last)
    out = hra.merge(t, torch.from_numpy(u), copy=False)
    assert out is t
    np.testing.assert_allclose(t.numpy(), hra.merge(conv, u), atol=1e-6)


def test_init_identity_odd_and_random():
    u = hra.init_weights((12, 4), seed=3)
    assert u.dtype == np.float32 and u.shape == (12, 4)
    np.testing.assert_array_equal(u[:, 0], u[:, 1])
    assert np.abs(u).max() <= 1 / np.sqrt(2) and np.abs(u).max() > 0.3
    np.testing.assert_allclose(dense_H(u), np.eye(12), atol=1e-6)
    with pytest.warns(PeftMathWarning, match="even r"):
        odd = hra.init_weights((12, 3), seed=3)
    assert np.abs(dense_H(odd) - np.eye(12)).max() > 0.1
    rand = hra.init_weights((12, 4), init_weights=False, seed=3)
    assert np.abs(dense_H(rand) - np.eye(12)).max() > 0.1
    assert np.abs(rand).max() <= 0.5
    with pytest.raises(ConfigError):
        hra.init_weights((12, 4), init_weights="yes")


def test_refusals():
    W = np.ones((3, 4))
    u = rng_u(4, 2)
    u0 = u.copy()
    u0[:, 1] = 0
    with pytest.raises(NotInvertibleError, match="column 1"):
        hra.merge(W, u0)
    dep = np.stack([u[:, 0], 2 * u[:, 0]], axis=1)
    with pytest.raises(NotInvertibleError, match="apply_GS"):
        hra.merge(W, dep, apply_GS=True)
    with pytest.raises(ShapeError, match="hra_u"):
        hra.merge(W, rng_u(5, 2))
    with pytest.raises(UnsupportedError, match="Conv1D"):
        hra.merge(W, u, layer="Conv1D")
    with pytest.raises(UnsupportedError, match="Conv1d"):
        hra.merge(np.ones((2, 2, 3)), rng_u(6, 2))
    with pytest.raises(UnsupportedError, match="groups=2"):
        hra.forward(np.ones((1, 4, 5, 5)), np.ones((2, 2, 3, 3)), rng_u(18, 2))
    cfg = hra.HRAConfig(target_modules=["q"], r=2)
    with pytest.raises(ShapeError, match="expected"):
        hra.HRAModule("q", cfg, {"hra_u": rng_u(4, 3)}, Layer.of((3, 4)))
    with pytest.raises(ShapeError, match="unexpected"):
        hra.HRAModule("q", cfg, {"hra_u": u, "hra_v": u}, Layer.of((3, 4)))
    for bad in (dict(r=0), dict(bias="lora_only"), dict(apply_GS=1)):
        with pytest.raises(ConfigError):
            hra.HRAConfig(target_modules=["q"], **bad).validate()


def test_module_round_trip_and_initialize():
    cfg = hra.HRAConfig(target_modules=["q"], r=4, init_weights=False)
    lay = Layer.of((6, 5))
    params, new_w = hra.HRAModule.initialize("q", cfg, lay, seed=0)
    assert new_w is None and params["hra_u"].shape == (5, 4)
    mod = hra.HRAModule("q", cfg, params, lay)
    W = np.random.default_rng(8).standard_normal((6, 5)).astype(np.float32)
    merged = mod.merge(W).weight
    np.testing.assert_allclose(merged, W.astype(np.float64) @ dense_H(params["hra_u"]), atol=1e-5)
    np.testing.assert_allclose(mod.unmerge(merged).weight, W, atol=1e-5)
    x = np.random.default_rng(9).standard_normal((2, 5)).astype(np.float32)
    np.testing.assert_allclose(mod.forward(x, W), x @ merged.T, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ident, _ = hra.HRAModule.initialize("q", hra.HRAConfig(target_modules=["q"], r=2), lay, seed=0)
    np.testing.assert_allclose(hra.HRAModule("q", hra.HRAConfig(target_modules=["q"], r=2), ident, lay).merge(W).weight,
                               W, atol=1e-6)
