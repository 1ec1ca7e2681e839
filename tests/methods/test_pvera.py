"""PVeRA's own math against an independent float64 computation (the mean and log-variance halves written out
with explicit diagonal matrices), the sampled forward, in-place layouts, half precision, initialisation and
refusals."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from peftmath import Adapter
from peftmath.errors import CheckpointError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import pvera

BF16 = np.dtype(ml_dtypes.bfloat16)


def _case(out, inn, r=3, seed=0, **cfg_extra):
    cfg = pvera.PveraConfig(target_modules=["m"], r=r, init_weights=False, **cfg_extra)
    layer = Layer.of((out, inn))
    shared = pvera.init_shared(cfg, [Layer.of((out + 3, inn + 2))], seed=seed)  # larger than the layer: slices
    params, _ = pvera.PveraModule.initialize("m", cfg, layer, seed=seed + 1, shared=shared)
    params["pvera_lambda_b"] = np.random.default_rng(seed + 2).normal(0, 1, out)  # PEFT's init_weights=False: ones
    f = {k: np.asarray(v, np.float64) for k, v in {**params, **shared}.items()}
    return (cfg, layer, f["pvera_lambda_b"], f["pvera_lambda_d"], f[pvera.PVERA_A_KEY], f[pvera.PVERA_B_KEY])


def _reference(lb, ld, A, B, out, inn):
    """diag(λ_b) B[:out] diag(λ_d[:r]) A[:r, :in] with explicit diagonal matrices."""
    r = B.shape[1]
    return np.diag(lb) @ B[:out] @ np.diag(ld[:r]) @ A[:r, :inn]


@pytest.mark.parametrize("out,inn", [(10, 7), (7, 10)])
def test_delta_merge_forward_match_the_mean_layer(out, inn):
    cfg, layer, lb, ld, A, B = _case(out, inn)
    want = _reference(lb, ld, A, B, out, inn)
    np.testing.assert_allclose(pvera.delta_weight(lb, ld, A, B, layer=layer), want, rtol=1e-12, atol=1e-13)
    W = np.random.default_rng(3).standard_normal((out, inn))
    merged = pvera.merge(W, lb, ld, A, B)
    np.testing.assert_allclose(merged, W + want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(pvera.unmerge(merged, lb, ld, A, B), W, rtol=1e-12, atol=1e-13)
    x, b = np.random.default_rng(4).standard_normal((2, 3, inn)), np.random.default_rng(5).standard_normal(out)
    np.testing.assert_allclose(pvera.forward(x, W, lb, ld, A, B, bias=b), x @ (W + want).T + b, rtol=1e-11, atol=1e-11)
    # the sampled forward: z = μ + ε ⊙ exp(½ λ_v ⊙ (x A_vᵀ)), y = base + λ_b ⊙ (z B_lᵀ)
    r = cfg.r
    eps = np.random.default_rng(6).standard_normal((2, 3, r))
    mu = (x @ A[:r, :inn].T) * ld[:r]
    sigma = np.exp(0.5 * (x @ A[r:, :inn].T) * ld[r:])
    want_s = x @ W.T + ((mu + eps * sigma) @ B[:out].T) * lb
    np.testing.assert_allclose(pvera.forward(x, W, lb, ld, A, B, noise=eps), want_s, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(pvera.forward(x, W, lb, ld, A, B, noise=lambda shape: eps.reshape(shape)), want_s,
                               rtol=1e-11, atol=1e-11)
    conv1d = Layer.of((inn, out), "Conv1D")  # the same module on a transformers Conv1D stores ΔWᵀ
    np.testing.assert_allclose(pvera.delta_weight(lb, ld, A, B, layer=conv1d), want.T, rtol=1e-12, atol=1e-13)
    # the log-variance half changes nothing but the sampled forward
    ld2 = ld.copy()
    ld2[r:] += 1.0
    np.testing.assert_array_equal(pvera.merge(W, lb, ld2, A, B), merged)


def test_float32_in_place_layouts_read_only_scale_and_half():
    cfg, layer, lb, ld, A, B = _case(9, 6, seed=6)
    args = [a.astype(np.float32) for a in (lb, ld, A, B)]
    d = _reference(*(a.astype(np.float64) for a in args), 9, 6)
    W0 = np.random.default_rng(7).standard_normal((9, 6)).astype(np.float32)
    for W in (W0.copy(), np.asfortranarray(W0), np.concatenate([W0, W0], 1)[:, ::2]):
        W[...] = W0
        assert pvera.merge(W, *args, copy=False) is W
        np.testing.assert_allclose(W, W0 + d, rtol=1e-5, atol=1e-5)
        pvera.unmerge(W, *args, copy=False)
        np.testing.assert_allclose(W, W0, rtol=0, atol=1e-5)
    ro = W0.copy()
    ro.setflags(write=False)
    with pytest.raises(UnsupportedError, match="copy=True"):
        pvera.merge(ro, *args, copy=False)
    ad = Adapter(cfg, {"m": {"pvera_lambda_b": args[0], "pvera_lambda_d": args[1]}},
                 shared={pvera.PVERA_A_KEY: args[2], pvera.PVERA_B_KEY: args[3]})
    d1 = ad.merge({"m.weight": W0})["m.weight"] - W0
    np.testing.assert_allclose(ad.scaled(2.0).merge({"m.weight": W0})["m.weight"] - W0, 2 * d1, rtol=1e-5, atol=1e-5)
    assert ad.num_trainable_parameters() == 9 + 2 * cfg.r
    # bfloat16 weight: W + ΔW rounded once; bfloat16 projections with peft_compat: ΔW rounded to bfloat16 first
    Wb = W0.astype(BF16)
    np.testing.assert_array_equal(pvera.merge(Wb, *args), (Wb.astype(np.float64) + d).astype(np.float32).astype(BF16))
    b16 = [a.astype(BF16) for a in args]
    db = _reference(*(a.astype(np.float64) for a in b16), 9, 6)
    want = (Wb.astype(np.float32) + db.astype(np.float32).astype(BF16).astype(np.float32)).astype(BF16)
    np.testing.assert_array_equal(pvera.merge(Wb, *b16, peft_compat=True), want)


def test_initialisation():
    cfg = pvera.PveraConfig(target_modules=["m"], r=4, projection_prng_key=2)
    sh = pvera.init_shared(cfg, [Layer.of((12, 9)), Layer.of((5, 20))])  # PEFT's _find_dim: max in 20, max out 12
    A, B = sh[pvera.PVERA_A_KEY], sh[pvera.PVERA_B_KEY]
    assert A.shape == (8, 20) and B.shape == (12, 4)
    assert np.abs(A).max() <= (6 / 20) ** 0.5 and np.abs(B).max() <= (6 / 4) ** 0.5
    assert not np.array_equal(A[:4], A[4:])  # two independent halves
    p, _ = pvera.PveraModule.initialize("m", cfg, Layer.of((12, 9)), shared=dict(sh))
    assert not np.any(p["pvera_lambda_b"]) and np.allclose(p["pvera_lambda_d"], 0.1) and p["pvera_lambda_d"].shape == (8,)
    q, _ = pvera.PveraModule.initialize("m", cfg, Layer.of((12, 9)), shared=dict(sh), init=False)
    assert np.all(q["pvera_lambda_b"] == 1) and np.std(q["pvera_lambda_d"]) > 0.1


def test_refusals():
    cfg, layer, lb, ld, A, B = _case(8, 5)
    shared = {pvera.PVERA_A_KEY: A, pvera.PVERA_B_KEY: B}
    params = {"pvera_lambda_b": lb, "pvera_lambda_d": ld}
    W = np.zeros((8, 5))
    with pytest.raises(CheckpointError, match="save_projection=false"):
        Adapter(cfg.replace(save_projection=False), {"m": params}).merge({"m.weight": W})
    with pytest.raises(ShapeError, match="sized to the largest adapted layer"):
        Adapter(cfg, {"m": {**params, "pvera_lambda_b": np.ones(40)}}, shared=shared).merge(
            {"m.weight": np.zeros((40, 5))})
    with pytest.raises(ShapeError, match="len\\(pvera_lambda_b\\) = 8"):
        Adapter(cfg, {"m": params}, shared=shared).merge({"m.weight": np.zeros((6, 5))})
    with pytest.raises(ShapeError, match="has rank 3 but the config has r=4"):
        Adapter(cfg.replace(r=4), {"m": params}, shared=shared).merge({"m.weight": W})
    with pytest.raises(ShapeError, match=r"\(2r,\)"):
        Adapter(cfg, {"m": {**params, "pvera_lambda_d": ld[:3]}}, shared=shared).merge({"m.weight": W})
    with pytest.raises(ShapeError, match="PVeRA is not defined for a Conv2d"):
        pvera.PveraModule.initialize("m", cfg, Layer.of((8, 4, 3, 3)))
    sampling = Adapter(cfg.replace(sample_at_inference=True), {"m": params}, shared=shared)
    with pytest.raises(UnsupportedError, match="sample_at_inference=true"):
        sampling.merge({"m.weight": W})
    with pytest.raises(UnsupportedError, match="noise="):
        sampling.forward("m", np.ones((1, 5)), {"m.weight": W})
    mean = Adapter(cfg, {"m": params}, shared=shared).merge({"m.weight": W})["m.weight"]
    np.testing.assert_array_equal(sampling.merge({"m.weight": W}, peft_compat=True)["m.weight"], mean)
