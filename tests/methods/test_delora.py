"""DeLoRA's own math against an independent float64 computation (a sum of normalised rank-one terms)."""

from __future__ import annotations

import numpy as np
import pytest

from peftmath import Adapter
from peftmath.errors import ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import delora


def _delta_terms(A, B, lam, w):
    """Σ_i λ/r · b_i a_iᵀ / (max(‖a_i‖, 1e-4) max(‖b_i‖, 1e-4)), then the input columns scaled by w."""
    r = A.shape[0]
    d = sum(lam[0] / r * np.outer(B[:, i], A[i]) / (max(np.linalg.norm(A[i]), 1e-4) * max(np.linalg.norm(B[:, i]), 1e-4))
            for i in range(r))
    return d * w[None, :]


def _params(out=6, inn=5, r=3, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out, inn))
    p = delora.init_weights(Layer.of((out, inn)), r, W, init=False, delora_lambda=2.5, seed=seed)
    return W, {k: np.asarray(v, np.float64) for k, v in p.items()}


def test_delta_merge_forward_match_the_rank_one_sum():
    W, p = _params()
    A, B, lam, w = (p[k] for k in delora._KEYS)
    np.testing.assert_allclose(w, np.linalg.norm(W, axis=0), rtol=1e-6)  # stored from float32
    want = _delta_terms(A, B, lam, w)
    np.testing.assert_allclose(delora.delta_weight(A, B, lam, w), want, rtol=1e-13, atol=1e-14)
    merged = delora.merge(W, A, B, lam, w)
    np.testing.assert_allclose(merged, W + want, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(delora.unmerge(merged, A, B, lam, w), W, rtol=1e-13, atol=1e-14)
    x, b = np.random.default_rng(1).standard_normal((2, 3, 5)), np.random.default_rng(2).standard_normal(6)
    np.testing.assert_allclose(delora.forward(x, W, A, B, lam, w, bias=b), x @ (W + want).T + b, rtol=1e-12, atol=1e-12)


def test_norm_bound_and_clamp():
    W, p = _params(out=8, inn=7, r=4, seed=3)
    A, B, lam, w = (p[k] for k in delora._KEYS)
    d = delora.delta_weight(A, B, lam, w)
    assert np.linalg.norm(d) <= lam[0] * w.max() * (1 + 1e-12)  # ‖ΔW‖_F ≤ λ max w (specs/delora.md)
    tiny = np.zeros_like(B)  # ‖B^i‖ = 0 is clamped to 1e-4: ΔW = 0, not NaN
    assert np.all(delora.delta_weight(A, tiny, lam, w) == 0)


def test_float32_in_place_layouts_and_read_only():
    W64, p = _params(out=6, inn=8, r=2, seed=4)
    p32 = {k: v.astype(np.float32) for k, v in p.items()}
    args = [p32[k] for k in delora._KEYS]
    W0 = W64.astype(np.float32)
    want = W0.astype(np.float64) + _delta_terms(*(p32[k].astype(np.float64) for k in delora._KEYS))
    for W in (W0.copy(), np.asfortranarray(W0), np.concatenate([W0, W0], 1)[:, ::2]):
        W[...] = W0  # a strided column slice of a wider array
        assert delora.merge(W, *args, copy=False) is W
        np.testing.assert_allclose(W, want, rtol=1e-6, atol=1e-6)
        delora.unmerge(W, *args, copy=False)
        np.testing.assert_allclose(W, W0, rtol=0, atol=2e-6)
    ro = W0.copy()
    ro.setflags(write=False)
    with pytest.raises(UnsupportedError, match="copy=True"):
        delora.merge(ro, *args, copy=False)


def test_module_rank_pattern_scale_and_refusals():
    cfg = delora.DeloraConfig(target_modules=["m"], r=2, rank_pattern={"m": 3}, lambda_pattern={"m": 4.0},
                              init_weights=False)
    W = np.random.default_rng(5).standard_normal((4, 6)).astype(np.float32)
    params, new = delora.DeloraModule.initialize("m", cfg, Layer.of((4, 6)), weight=W, seed=1)
    assert new is None and params["delora_A"].shape == (3, 6) and float(params["delora_lambda"][0]) == 4.0
    ad = Adapter(cfg, {"m": params})
    state = {"m.weight": W}
    d1 = ad.merge(state)["m.weight"] - W
    d2 = ad.scaled(0.5).merge(state)["m.weight"] - W  # λ → λ/2, so ΔW → ΔW/2
    np.testing.assert_allclose(d2, 0.5 * d1, rtol=1e-5, atol=1e-7)
    with pytest.raises(ShapeError, match="rank 3 but the config gives r=2"):
        Adapter(delora.DeloraConfig(target_modules=["m"], r=2), {"m": params}).merge(state)
    with pytest.raises(ShapeError, match="pass weight="):
        delora.DeloraModule.initialize("m", cfg, Layer.of((4, 6)))
    with pytest.raises(UnsupportedError, match="nn.Linear"):
        delora.DeloraModule.initialize("m", cfg, Layer.of((4, 6), "Conv1D"), weight=W.T)
