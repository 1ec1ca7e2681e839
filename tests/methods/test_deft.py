"""DEFT's math against an independent float64 computation: the adapted weight through the explicit ``out × out``
projector, the forward as ``x W'ᵀ + b``, the identity initialisation, merge / unmerge with and without the
record (the ``r × r`` solve for relu, the refusal for qr), PEFT's low-precision order, layouts and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from peftmath import Adapter
from peftmath.errors import ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from peftmath.layers import Layer, LayerKind
from peftmath.methods import deft


def _adapted_reference(W, P, R, method, s):
    """``(I − Q Hᵀ) W + s·Q R`` in float64 with the explicit projector (``R=None``: no injection); ``Q`` from a
    Gram-Schmidt of P's columns with LAPACK's signs (those of NumPy's QR), checked orthonormal."""
    W, P = np.asarray(W, np.float64), np.asarray(P, np.float64)
    if method == "relu":
        Q, H = P, np.maximum(P, 0.0)
    else:
        Q = np.zeros_like(P)
        for j in range(P.shape[1]):  # classical Gram-Schmidt, twice (an independent route to qr's Q)
            v = P[:, j].copy()
            for _ in range(2):
                v -= Q[:, :j] @ (Q[:, :j].T @ v)
            Q[:, j] = v / np.linalg.norm(v)
        signs = np.sign(np.diag(np.linalg.qr(P)[1]))  # only the signs come from LAPACK
        Q = Q * signs
        np.testing.assert_allclose(Q.T @ Q, np.eye(P.shape[1]), atol=1e-12)
        H = Q
    out = (np.eye(W.shape[0]) - Q @ H.T) @ W
    return out if R is None else out + s * Q @ np.asarray(R, np.float64)


def _factors(rng, out, inn, r, *, std=0.5):
    return rng.normal(0, std, (out, r)), rng.normal(0, std, (r, inn))


@pytest.mark.parametrize("method", ["relu", "qr"])
@pytest.mark.parametrize("para", [False, True])
def test_delta_weight_matches_the_explicit_projector(method, para):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((7, 5))
    P, R = _factors(rng, 7, 5, 3)
    R = None if para else R
    got = W + deft.delta_weight(W, P, R, method=method, scaling=1.5)
    np.testing.assert_allclose(got, _adapted_reference(W, P, R, method, 1.5), atol=1e-12)


def test_conv1d_storage_is_the_transposed_linear():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((6, 4))  # logical (out=6, in=4)
    P, R = _factors(rng, 6, 4, 2)
    lin = deft.delta_weight(W, P, R, method="qr", layer=Layer(LayerKind.LINEAR, (6, 4)))
    conv = deft.delta_weight(np.ascontiguousarray(W.T), P, R, method="qr",
                             layer=Layer(LayerKind.CONV1D_TRANSPOSED, (4, 6)))
    np.testing.assert_allclose(conv, lin.T, atol=1e-13)


@pytest.mark.parametrize("method", ["relu", "qr"])
@pytest.mark.parametrize("kind", [LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED])
def test_forward_is_the_adapted_linear_map(method, kind):
    rng = np.random.default_rng(2)
    Wl = rng.standard_normal((6, 5)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    P, R = (a.astype(np.float32) for a in _factors(rng, 6, 5, 2))
    x = rng.standard_normal((3, 2, 5)).astype(np.float32)
    W = Wl if kind is LayerKind.LINEAR else np.ascontiguousarray(Wl.T)
    y = deft.forward(x, W, P, R, method=method, scaling=0.75, bias=b, layer=Layer(kind, W.shape))
    want = x.astype(np.float64) @ _adapted_reference(Wl, P, R, method, 0.75).T + b
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-5)


def test_scaling_and_rank_cap():
    assert deft.scaling_for(16, 4) == 4.0 and deft.scaling_for(None, 4) == deft.scaling_for(0, 4) == 1.0
    layer = Layer(LayerKind.LINEAR, (2, 9))
    p = deft.init_weights(layer, 8, init_weights=False, seed=0)
    assert p["deft_P"].shape == (2, 2) and p["deft_R"].shape == (2, 9)  # r capped at out, as PEFT


@pytest.mark.parametrize("method", ["relu", "qr"])
def test_identity_initialisation(method):
    rng = np.random.default_rng(3)
    W = rng.standard_normal((8, 6))
    layer = Layer(LayerKind.LINEAR, W.shape)
    p = deft.init_weights(layer, 3, method=method, alpha=6, weight=W, seed=4, dtype=np.float64)
    dw = deft.delta_weight(W, p["deft_P"], p["deft_R"], method=method, scaling=deft.scaling_for(6, 3))
    assert np.max(np.abs(dw)) < 1e-6  # R was formed in float32 (PEFT's dtype)
    assert 0.01 < float(np.std(p["deft_P"])) < 0.04  # N(0, 0.02²)
    para = deft.init_weights(layer, 3, para=True, seed=4)
    assert set(para) == {"deft_P"}
    with pytest.raises(ConfigError, match="pass the base weight"):
        deft.init_weights(layer, 3, seed=0)


def _module(method="relu", para=False, *, seed=5, shape=(9, 7), r=3, alpha=None, dtype=np.float32, kind=None):
    rng = np.random.default_rng(seed)
    kind = kind or LayerKind.LINEAR
    layer = Layer(kind, shape)
    P, R = (a.astype(dtype) for a in _factors(rng, layer.out_features, layer.in_features, r, std=0.3))
    params = {"deft_P": P} if para else {"deft_P": P, "deft_R": R}
    cfg = deft.DeftConfig(target_modules=["m"], r=r, decomposition_method=method, para=para, alpha=alpha,
                          fan_in_fan_out=kind is LayerKind.CONV1D_TRANSPOSED)
    ad = Adapter(cfg, {"m": params}, layer_kinds={"m": kind})
    W = rng.standard_normal(shape).astype(dtype)
    return ad.module("m", weight_shape=shape, kind=kind), W


@pytest.mark.parametrize("method,para", [("relu", False), ("qr", False), ("relu", True), ("qr", True)])
def test_merge_returns_the_record_and_unmerges_exactly(method, para):
    mod, W = _module(method, para, alpha=5)
    res = mod.merge(W)
    want = _adapted_reference(W, mod.P, mod.R, method, mod.scaling)
    np.testing.assert_allclose(res.weight, want, atol=2e-6, rtol=1e-6)
    _, H = deft.projector_factors(mod.P, method)
    np.testing.assert_allclose(res.record, H.T.astype(np.float64) @ W, atol=2e-6)  # M = Hᵀ W
    back = mod.unmerge(res.weight, record=res.record)
    np.testing.assert_allclose(back.weight, W, atol=4e-6)


@pytest.mark.parametrize("para", [False, True])
def test_relu_unmerge_without_record_solves_for_the_removed_part(para):
    mod, W = _module("relu", para, dtype=np.float64)
    merged = mod.merge(W).weight
    back = mod.unmerge(merged)  # M recovered from W' by the r × r solve
    np.testing.assert_allclose(back.weight, W, atol=1e-12)


@pytest.mark.parametrize("para", [False, True])
def test_qr_unmerge_without_record_is_refused_and_writes_nothing(para):
    mod, W = _module("qr", para)
    merged = mod.merge(W).weight
    target = merged.copy()
    with pytest.raises(NotInvertibleError, match="idempotent"):
        mod.unmerge(target, copy=False)
    np.testing.assert_array_equal(target, merged)


def test_relu_unmerge_refused_when_the_solve_is_singular():
    """``P = e₀`` gives ``G = relu(P)ᵀ P = 1``: the relu projector is then idempotent too."""
    P = np.zeros((4, 1), np.float32)
    P[0, 0] = 1.0
    cfg = deft.DeftConfig(target_modules=["m"], r=1)
    mod = Adapter(cfg, {"m": {"deft_P": P, "deft_R": np.ones((1, 3), np.float32)}}).module("m", weight_shape=(4, 3))
    W = np.arange(12, dtype=np.float32).reshape(4, 3)
    res = mod.merge(W)
    with pytest.raises(NotInvertibleError, match="singular"):
        mod.unmerge(res.weight)
    np.testing.assert_allclose(mod.unmerge(res.weight, record=res.record).weight, W, atol=1e-5)


@pytest.mark.parametrize("layout", ["F", "strided", "readonly"])
def test_layouts(layout):
    mod, W = _module("qr", kind=LayerKind.CONV1D_TRANSPOSED, shape=(7, 9))
    want = mod.merge(W.copy()).weight
    if layout == "F":
        Wl = np.asfortranarray(W)
    elif layout == "strided":
        big = np.zeros((7, 18), np.float32)
        big[:, ::2] = W
        Wl = big[:, ::2]
    else:
        Wl = W.copy()
        Wl.setflags(write=False)
    np.testing.assert_array_equal(mod.merge(Wl).weight, want)  # copy=True: same numbers on every layout
    if layout == "readonly":
        with pytest.raises(UnsupportedError, match="not writeable"):
            mod.merge(Wl, copy=False)
        np.testing.assert_array_equal(Wl, W)
        return
    res = mod.merge(Wl, copy=False)
    assert res.weight is Wl
    np.testing.assert_allclose(Wl, want, atol=2e-6)
    mod.unmerge(Wl, record=res.record, copy=False)
    np.testing.assert_allclose(Wl, W, atol=4e-6)


def test_float16_rounds_once_and_peft_compat_rounds_delta_first():
    mod, W = _module("relu", alpha=4, dtype=np.float16)
    _, H = deft.projector_factors(mod.P, "relu", dtype=np.float64)
    M = H.T @ W.astype(np.float64)
    Q = mod.P.astype(np.float64)
    dw = Q @ (mod.R.astype(np.float64) * mod.scaling - M)
    once = mod.merge(W).weight
    compat = mod.merge(W, peft_compat=True).weight
    assert once.dtype == compat.dtype == np.float16
    np.testing.assert_array_equal(once, (W.astype(np.float64) + dw).astype(np.float16))
    two = (W.astype(np.float32) + dw.astype(np.float16).astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(compat, two)


def test_delta_weight_alone_is_refused():
    mod, _ = _module()
    with pytest.raises(UnsupportedError, match="depends on the base weight"):
        mod.delta_weight()


def test_checkpoint_errors():
    P, R = np.zeros((4, 2), np.float32), np.zeros((2, 3), np.float32)
    with pytest.raises(ShapeError, match="weight_shape"):
        Adapter(deft.DeftConfig(target_modules=["m"], para=True), {"m": {"deft_P": P}}).module("m")
    with pytest.raises(ShapeError, match="unexpected"):
        Adapter(deft.DeftConfig(target_modules=["m"], para=True), {"m": {"deft_P": P, "deft_R": R}}).module("m")
    with pytest.raises(ShapeError, match="deft_R"):
        Adapter(deft.DeftConfig(target_modules=["m"]), {"m": {"deft_P": P, "deft_R": R}}).module(
            "m", weight_shape=(4, 5))
    with pytest.raises(ConfigError, match="decomposition_method"):
        deft.DeftConfig(decomposition_method="svd").validate()
    with pytest.raises(ConfigError, match="bias"):
        deft.DeftConfig(bias="lora_only").validate()
