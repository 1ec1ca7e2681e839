"""RandLoRA's own math against an independent float64 computation (a sum of rank-one terms over PEFT's
pairing of basis columns), full rank, initialisation, layouts and refusals."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from peftmath import Adapter
from peftmath.errors import CheckpointError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import randlora

BF16 = np.dtype(ml_dtypes.bfloat16)


def _delta_terms(lam, gamma, A, B, out, inn, s):
    """s · Σ_c B[:M, c // r, c % r] ⊗ (λ[k, j] A[k, 0, :m] ⊙ γ[j]) with (k, j) = divmod(c, n), in the
    (max, min) frame, transposed when in > out."""
    r, n = lam.shape
    m, M = min(out, inn), max(out, inn)
    D = np.zeros((M, m))
    for c in range(n * r):
        k, j = divmod(c, n)
        D += np.outer(B[:M, c // r, c % r], lam[k, j] * A[k, 0, :m] * gamma[j])
    return s * (D if inn <= out else D.T)


def _case(out, inn, r=3, seed=0, sparse=False):
    cfg = randlora.RandLoraConfig(target_modules=["m"], r=r, randlora_alpha=2.0, init_weights=False, sparse=sparse)
    layer = Layer.of((out, inn))
    shared = randlora.init_shared(cfg, [Layer.of((out + 3, inn + 2))], seed=seed)  # larger than the layer: slices
    params, _ = randlora.RandLoraModule.initialize("m", cfg, layer, seed=seed + 1, shared=shared)
    rng = np.random.default_rng(seed + 2)
    params["randlora_gamma"] = rng.normal(0.2, 0.1, params["randlora_gamma"].shape)  # not constant
    f = {k: np.asarray(v, np.float64) for k, v in params.items()}
    return cfg, layer, f["randlora_lambda"], f["randlora_gamma"], f["randlora_A"], f["randlora_B"]


@pytest.mark.parametrize("out,inn", [(10, 7), (7, 10), (8, 8)])
def test_delta_merge_forward_match_the_rank_one_sum(out, inn):
    cfg, layer, lam, gamma, A, B = _case(out, inn)
    s = cfg.scaling
    want = _delta_terms(lam, gamma, A, B, out, inn, s)
    np.testing.assert_allclose(randlora.delta_weight(lam, gamma, A, B, scaling=s, layer=layer), want,
                               rtol=1e-12, atol=1e-13)
    assert np.linalg.matrix_rank(want) == min(out, inn)  # full rank, the method's point
    W = np.random.default_rng(3).standard_normal((out, inn))
    merged = randlora.merge(W, lam, gamma, A, B, scaling=s)
    np.testing.assert_allclose(merged, W + want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(randlora.unmerge(merged, lam, gamma, A, B, scaling=s), W, rtol=1e-12, atol=1e-13)
    x, b = np.random.default_rng(4).standard_normal((2, 3, inn)), np.random.default_rng(5).standard_normal(out)
    np.testing.assert_allclose(randlora.forward(x, W, lam, gamma, A, B, scaling=s, bias=b), x @ (W + want).T + b,
                               rtol=1e-11, atol=1e-11)
    conv1d = Layer.of((inn, out), "Conv1D")  # the same module on a transformers Conv1D stores ΔWᵀ
    np.testing.assert_allclose(randlora.delta_weight(lam, gamma, A, B, scaling=s, layer=conv1d), want.T,
                               rtol=1e-12, atol=1e-13)


def test_initialisation():
    layer = Layer.of((6, 9))
    lam, gamma = randlora.init_weights(layer, 4)  # PEFT's reset: λ = 0, γ = 1 / max(n, m)
    assert not np.any(lam) and lam.shape == (4, 2) and np.all(gamma == np.float32(1 / 6))
    lam, gamma = randlora.init_weights(layer, 4, init=False, seed=1)  # λ ~ N(0, 1), γ = 1 / max(out, in)
    assert np.any(lam) and np.all(gamma == np.float32(1 / 9))
    A, B = randlora.init_bases(4, 6, 9, seed=2)
    assert A.shape == (4, 1, 6) and B.shape == (9, 2, 4)
    for basis in (A, B):
        assert abs(np.std(np.asarray(basis, np.float64), ddof=1) - 1) < 1e-6
    A, B = randlora.init_bases(4, 60, 90, sparse=True, seed=3)  # ternary: P(±1) = 1/6 each, normalised
    vals = np.unique(np.round(np.asarray(B, np.float64), 5))
    assert len(vals) == 3 and vals[1] == 0 and vals[0] == -vals[2]
    assert abs(np.mean(np.asarray(B) == 0) - 2 / 3) < 0.03
    A, B = randlora.init_bases(4, 64, 90, very_sparse=True, seed=4)  # P(±1) = 1/(2·sqrt(64)) each
    assert abs(np.mean(np.asarray(B) != 0) - 1 / 8) < 0.02


def test_float32_in_place_layouts_read_only_scale_and_half_compat():
    cfg, layer, lam, gamma, A, B = _case(9, 6, seed=6)
    args = [a.astype(np.float32) for a in (lam, gamma, A, B)]
    s = cfg.scaling
    W0 = np.random.default_rng(7).standard_normal((9, 6)).astype(np.float32)
    d = _delta_terms(*(a.astype(np.float64) for a in args), 9, 6, s)
    for W in (W0.copy(), np.asfortranarray(W0), np.concatenate([W0, W0], 1)[:, ::2]):
        W[...] = W0
        assert randlora.merge(W, *args, scaling=s, copy=False) is W
        np.testing.assert_allclose(W, W0 + d, rtol=1e-5, atol=1e-5)
        randlora.unmerge(W, *args, scaling=s, copy=False)
        np.testing.assert_allclose(W, W0, rtol=0, atol=1e-5)
    ro = W0.copy()
    ro.setflags(write=False)
    with pytest.raises(UnsupportedError, match="copy=True"):
        randlora.merge(ro, *args, scaling=s, copy=False)
    ad = Adapter(cfg, {"m": {"randlora_lambda": args[0], "randlora_gamma": args[1]}},
                 shared={randlora.A_KEY: args[2], randlora.B_KEY: args[3]})
    d1 = ad.merge({"m.weight": W0})["m.weight"] - W0
    d2 = ad.scaled(2.0).merge({"m.weight": W0})["m.weight"] - W0
    np.testing.assert_allclose(d2, 2 * d1, rtol=1e-5, atol=1e-5)
    # bfloat16: the default rounds W + ΔW once; peft_compat rounds ΔW to bfloat16 first, as PEFT does
    Wb = W0.astype(BF16)
    exact = Wb.astype(np.float64) + d
    np.testing.assert_array_equal(randlora.merge(Wb, *args, scaling=s), exact.astype(np.float32).astype(BF16))
    compat = randlora.merge(Wb, *args, scaling=s, peft_compat=True)
    want = (Wb.astype(np.float32) + d.astype(np.float32).astype(BF16).astype(np.float32)).astype(BF16)
    np.testing.assert_array_equal(compat, want)


def test_refusals():
    cfg, layer, lam, gamma, A, B = _case(8, 5)
    W = np.zeros((8, 5))
    shared = {randlora.A_KEY: A, randlora.B_KEY: B}
    params = {"randlora_lambda": lam, "randlora_gamma": gamma}
    bad = B.copy()
    bad[0, 0, 0] += 1
    with pytest.raises(CheckpointError, match="differs from the shared base_model.randlora_B"):
        Adapter(cfg, {"m": {**params, "randlora_A": A.copy(), "randlora_B": bad}}, shared=shared).merge({"m.weight": W})
    Adapter(cfg, {"m": {**params, "randlora_A": A.copy(), "randlora_B": B.copy()}}, shared=shared).merge({"m.weight": W})
    with pytest.raises(CheckpointError, match="save_projection=false"):
        Adapter(cfg.replace(save_projection=False), {"m": params}).merge({"m.weight": W})
    with pytest.raises(ShapeError, match="sized to the largest adapted layer"):
        Adapter(cfg, {"m": params}, shared=shared).merge({"m.weight": np.zeros((40, 5))})
    with pytest.raises(ShapeError, match="has rank 3 but the config has r=4"):
        Adapter(cfg.replace(r=4), {"m": params}, shared=shared).merge({"m.weight": W})
    with pytest.raises(ShapeError, match="RandLoRA is not defined for a Conv2d"):
        randlora.RandLoraModule.initialize("m", cfg, Layer.of((8, 4, 3, 3)))
    with pytest.raises(ShapeError, match="pass layer="):
        randlora.delta_weight(lam, gamma, A, B, scaling=1.0)


def test_blocked_in_place_kernel_equals_one_gemm():
    """With n = ceil(m / r) = 300 bases the in-place merge runs one gemm per rank block (no factor of W's
    size); it equals the float64 sum within float32 rounding, in place and on a copy."""
    cfg, layer, lam, gamma, A, B = _case(600, 640, r=2, seed=9)
    args = [a.astype(np.float32) for a in (lam, gamma, A, B)]
    W0 = np.random.default_rng(10).standard_normal((600, 640)).astype(np.float32)
    want = W0 + _delta_terms(*(a.astype(np.float64) for a in args), 600, 640, cfg.scaling)
    W = W0.copy()
    randlora.merge(W, *args, scaling=cfg.scaling, copy=False)
    tol = 1e-5 * (1 + np.abs(want).max())
    assert np.max(np.abs(W - want)) <= tol
    assert np.max(np.abs(randlora.merge(W0, *args, scaling=cfg.scaling) - want)) <= tol
    assert np.max(np.abs(want - W0)) > 0.1
