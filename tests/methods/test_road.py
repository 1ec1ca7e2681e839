"""RoAd's math against an independent float64 computation: the dense out×out matrix R built entry by entry
from the paper's pairing (never through peftmath's elementwise form), merge / unmerge / forward, layouts,
initialisation and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from peftmath.errors import ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import road


def dense_R(theta, alpha, variant, g):
    """R entry by entry: pair (a, b) = (k·g + j, k·g + j + g/2)."""
    theta, alpha = np.asarray(theta, np.float64), np.asarray(alpha, np.float64)
    h = g // 2
    out = {"road_1": 2 * theta.size, "road_2": theta.size, "road_4": theta.size // 2}[variant]
    R = np.zeros((out, out))
    for k in range(out // g):
        for j in range(h):
            a, b = k * g + j, k * g + j + h
            if variant == "road_1":
                t, al = theta[k * h + j], alpha[k * h + j]
                fa = fb = al * np.cos(t)
                sa = sb = al * np.sin(t)
            elif variant == "road_2":
                fa, sa = alpha[a] * np.cos(theta[a]), alpha[a] * np.sin(theta[a])
                fb, sb = alpha[b] * np.cos(theta[b]), alpha[b] * np.sin(theta[b])
            else:  # per group 2g entries: the first g give f, the next g give s
                base = 2 * g * k
                fa = alpha[base + j] * np.cos(theta[base + j])
                fb = alpha[base + j + h] * np.cos(theta[base + j + h])
                sa = alpha[base + g + j] * np.sin(theta[base + g + j])
                sb = alpha[base + g + j + h] * np.sin(theta[base + g + j + h])
            R[a, a], R[a, b], R[b, a], R[b, b] = fa, -sa, sb, fb
    return R


def params(out, variant, g, seed=0):
    n = road.parameter_size(out, variant, g)
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.0, n), rng.normal(1.0, 0.5, n)


@pytest.mark.parametrize("variant", road.VARIANTS)
@pytest.mark.parametrize("g", [2, 4, 8])
def test_merge_unmerge_forward_match_dense(variant, g):
    rng = np.random.default_rng(1)
    W, b, x = rng.standard_normal((8, 5)), rng.standard_normal(8), rng.standard_normal((2, 3, 5))
    th, al = params(8, variant, g)
    R = dense_R(th, al, variant, g)
    m, mb = road.merge(W, th, al, bias=b, variant=variant, group_size=g)
    np.testing.assert_allclose(m, R @ W, atol=1e-13)
    np.testing.assert_allclose(mb, R @ b, atol=1e-13)
    w0, b0 = road.unmerge(m, th, al, bias=mb, variant=variant, group_size=g)
    np.testing.assert_allclose(w0, np.linalg.solve(R, R @ W), atol=1e-11)
    np.testing.assert_allclose(w0, W, atol=1e-11)
    np.testing.assert_allclose(b0, b, atol=1e-11)
    y = road.forward(x, W, th, al, bias=b, variant=variant, group_size=g)
    np.testing.assert_allclose(y, (x @ W.T + b) @ R.T, atol=1e-12)


def test_float32_and_peft_compat_bf16():
    import ml_dtypes

    rng = np.random.default_rng(2)
    W = rng.standard_normal((8, 6)).astype(np.float32)
    th, al = (a.astype(np.float32) for a in params(8, "road_4", 4))
    m, _ = road.merge(W, th, al, variant="road_4", group_size=4)
    assert m.dtype == np.float32
    back, _ = road.unmerge(m, th, al, variant="road_4", group_size=4)
    R = dense_R(th, al, "road_4", 4)
    assert np.abs(back - W).max() < 50 * np.linalg.cond(R) * np.finfo(np.float32).eps * np.abs(W).max()
    Wb = W.astype(ml_dtypes.bfloat16)
    default, _ = road.merge(Wb, th, al, variant="road_4", group_size=4)
    compat, _ = road.merge(Wb, th, al, variant="road_4", group_size=4, peft_compat=True)
    Rb = R.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)  # PEFT: R rounded to bf16 first
    want = (Rb @ Wb.astype(np.float64)).astype(np.float32).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(compat.astype(np.float32), want.astype(np.float32))
    exact = (R @ Wb.astype(np.float64)).astype(np.float32).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(default.astype(np.float32), exact.astype(np.float32))


def test_layouts_inplace_and_readonly():
    rng = np.random.default_rng(3)
    base, bias = rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    th, al = (a.astype(np.float32) for a in params(8, "road_2", 4))
    want, want_b = road.merge(base, th, al, bias=bias, variant="road_2", group_size=4)
    for W in (np.asfortranarray(base), np.repeat(base, 2, axis=1)[:, ::2], base.T.copy().T):
        b = bias.copy()
        np.testing.assert_allclose(road.merge(W, th, al, bias=b, variant="road_2", group_size=4)[0], want, atol=1e-6)
        out, out_b = road.merge(W, th, al, bias=b, variant="road_2", group_size=4, copy=False)
        assert out is W and out_b is b
        np.testing.assert_allclose(W, want, atol=1e-6)
        np.testing.assert_allclose(b, want_b, atol=1e-6)
    W, b = base.copy(), bias.copy()
    b.flags.writeable = False
    with pytest.raises(UnsupportedError, match="bias"):
        road.merge(W, th, al, bias=b, variant="road_2", group_size=4, copy=False)
    np.testing.assert_array_equal(W, base)  # nothing written


def test_init():
    th, al = road.init_weights(6)
    assert th.dtype == np.float32 and not th.any() and (al == 1).all()
    th, al = road.init_weights(4000, init_weights=False, seed=1)
    assert abs(th.std() - 0.5) < 0.03 and abs(al.mean() - 1.0) < 0.03 and abs(th.mean()) < 0.03
    cfg = road.RoadConfig(target_modules=["q"], variant="road_4", group_size=4)
    p, w = road.RoadModule.initialize("q", cfg, Layer.of((8, 3)), seed=0)
    assert w is None and p["road_theta"].shape == (16,) and p["road_alpha"].shape == (16,)
    W = np.random.default_rng(4).standard_normal((8, 3)).astype(np.float32)
    np.testing.assert_allclose(road.RoadModule("q", cfg, p, Layer.of((8, 3))).merge(W).weight, W, atol=1e-7)


def test_refusals():
    W = np.ones((4, 3))
    th, al = params(4, "road_2", 2)
    al0 = al.copy()
    al0[1] = 0.0  # with theta[0] = pi/2 ... make a singular block: f_a f_b + s_a s_b = 0
    th0 = th.copy()
    th0[0] = 0.0
    with pytest.raises(NotInvertibleError, match="output features 0 and 1"):
        road.unmerge(W, th0, al0, variant="road_2", group_size=2)
    with pytest.raises(ShapeError, match="group_size"):
        road.merge(W, *params(4, "road_1", 4), variant="road_1", group_size=8)
    with pytest.raises(ShapeError, match="road_theta"):
        road.merge(W, th[:3], al, variant="road_2", group_size=2)
    with pytest.raises(UnsupportedError, match="Conv1D"):
        road.merge(W, th, al, variant="road_2", group_size=2, layer="Conv1D")
    with pytest.raises(UnsupportedError):
        road.RoadModule.initialize("c", road.RoadConfig(target_modules=["c"], group_size=2), Layer.of((4, 2, 3, 3)))
    for bad in (dict(group_size=3), dict(group_size=0), dict(variant="road_3"), dict(exclude_modules=["x"]),
                dict(init_weights="no")):
        with pytest.raises(ConfigError):
            road.RoadConfig(target_modules=["q"], **bad).validate()
    d = road.RoadConfig(target_modules=["q"], group_size=2).to_dict()
    assert "exclude_modules" not in d and "layers_to_transform" not in d and d["peft_type"] == "ROAD"
