"""FourierFT's math against independent computations: the delta weight as an explicit float64 cosine sum
(no FFT), the spectral positions as a full Fisher-Yates shuffle driven by NumPy's legacy Mersenne Twister
(``RandomState``), the FFT round-off, merge / unmerge / forward on Linear and Conv1D, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from peftmath.errors import ConfigError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import fourierft as F


def full_shuffle(n: int, seed: int) -> np.ndarray:
    """The whole permutation, step by step (O(n)), from RandomState's raw 32-bit outputs."""
    rs = np.random.RandomState(seed & 0xFFFFFFFF)
    raw = rs.randint(0, 2**32, size=max(n - 1, 0), dtype=np.uint64)  # one 32-bit output each
    p = np.arange(n)
    for i in range(n - 1):
        z = int(raw[i]) % (n - i)
        p[i], p[i + z] = p[i + z], p[i]
    return p


def cosine_delta(c, rows, cols, out, inn, scaling):
    p, q = np.meshgrid(np.arange(out), np.arange(inn), indexing="ij")
    total = np.zeros((out, inn))
    for cj, rj, sj in zip(np.asarray(c, np.float64), rows, cols):
        total += cj * np.cos(2 * np.pi * (p * rj / out + q * sj / inn))
    return scaling * total / (out * inn)


@pytest.mark.parametrize("n,k,seed", [(1, 1, 0), (2, 2, 5), (60, 60, 777), (200, 10, 777), (999, 50, 2**32 + 3)])
def test_positions_are_a_fisher_yates_prefix(n, k, seed):
    want = full_shuffle(n, seed)[:k]
    rows, cols = F.spectral_indices(n, 1, k, seed)
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_array_equal(cols, 0)
    r2, c2 = F.spectral_indices(n // 1, 1, k, seed)
    assert len(set(zip(r2.tolist(), c2.tolist()))) == k  # distinct


@pytest.mark.parametrize("shape,k", [((6, 4), 5), ((5, 7), 35), ((8, 8), 3)])
def test_delta_matches_cosine_sum(shape, k):
    out, inn = shape
    c = np.random.default_rng(k).standard_normal(k)
    rows, cols = F.spectral_indices(out, inn, k, 11)
    want = cosine_delta(c, rows, cols, out, inn, 2.5)
    got = F.delta_weight(c, out, inn, scaling=2.5, random_loc_seed=11)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, atol=1e-13)
    got32 = F.delta_weight(c.astype(np.float32), out, inn, scaling=2.5, random_loc_seed=11)
    assert got32.dtype == np.float32
    # the spec's round-off statement: normwise error of the float32 transform below u·log2(N)
    rel = np.linalg.norm(got32 - want) / np.linalg.norm(want)
    assert rel < 2.0**-24 * np.log2(out * inn) * 4


def test_merge_unmerge_forward_linear_and_conv1d():
    rng = np.random.default_rng(3)
    W, b, x = rng.standard_normal((6, 4)), rng.standard_normal(6), rng.standard_normal((2, 3, 4))
    c = rng.standard_normal(7)
    cfg = F.FourierFTConfig(target_modules=["m"], n_frequency=7, scaling=3.0, random_loc_seed=5)
    dw = cosine_delta(c, *F.spectral_indices(6, 4, 7, 5), 6, 4, 3.0)
    lin = F.FourierFTModule("m", cfg, {"fourierft_spectrum": c}, Layer.of((6, 4)))
    np.testing.assert_allclose(lin.merge(W).weight, W + dw, atol=1e-13)
    np.testing.assert_allclose(lin.unmerge(W + dw).weight, W, atol=1e-13)
    np.testing.assert_allclose(lin.forward(x, W, b), x @ (W + dw).T + b, atol=1e-12)
    conv = F.FourierFTModule("m", cfg, {"fourierft_spectrum": c}, Layer.of((4, 6), "Conv1D"))
    np.testing.assert_allclose(conv.merge(W.T.copy()).weight, (W + dw).T, atol=1e-13)
    np.testing.assert_allclose(conv.forward(x, W.T.copy(), b), x @ (W + dw).T + b, atol=1e-12)
    # in place, Fortran order, read-only
    Wf = np.asfortranarray(W.astype(np.float32))
    lin32 = F.FourierFTModule("m", cfg, {"fourierft_spectrum": c.astype(np.float32)}, Layer.of((6, 4)))
    out = lin32.merge(Wf, copy=False).weight
    assert out is Wf
    np.testing.assert_allclose(Wf, W + dw, atol=1e-5)
    ro = W.copy()
    ro.flags.writeable = False
    with pytest.raises(UnsupportedError, match="copy=True"):
        lin.merge(ro, copy=False)


def test_scaled_multiplies_the_delta():
    import peftmath as pm

    c = np.random.default_rng(4).standard_normal(5)
    cfg = F.FourierFTConfig(target_modules=["m"], n_frequency=5, scaling=2.0)
    ad = pm.Adapter(cfg, {"m": {"fourierft_spectrum": c}})
    W = np.random.default_rng(5).standard_normal((6, 4))
    dw = cosine_delta(c, *F.spectral_indices(6, 4, 5, 777), 6, 4, 2.0)
    merged = ad.scaled(-0.5).merge({"m.weight": W})["m.weight"]
    np.testing.assert_allclose(merged, W - 0.5 * dw, atol=1e-13)
    np.testing.assert_allclose(ad.scaled(-0.5).unmerge({"m.weight": merged})["m.weight"], W, atol=1e-13)


def test_pattern_rule_and_initialize():
    cfg = F.FourierFTConfig(target_modules=["q", "v"], n_frequency=6, n_frequency_pattern={"v": 3}, init_weights=False)
    assert F.n_frequency_for(cfg, "layers.0.v") == 3 and F.n_frequency_for(cfg, "v") == 6
    p, w = F.FourierFTModule.initialize("layers.0.v", cfg, Layer.of((5, 4)), seed=1)
    assert w is None and p["fourierft_spectrum"].shape == (3,) and np.abs(p["fourierft_spectrum"]).max() > 0
    z, _ = F.FourierFTModule.initialize("q", cfg, Layer.of((5, 4)), init=True)
    assert z["fourierft_spectrum"].shape == (6,) and not z["fourierft_spectrum"].any()


def test_refusals():
    with pytest.raises(ShapeError, match="n_frequency=21"):
        F.spectral_indices(4, 5, 21, 0)
    with pytest.raises(UnsupportedError, match="64-bit"):
        F.spectral_indices(16384, 16384, 10, 0)
    cfg = F.FourierFTConfig(target_modules=["m"], n_frequency=3)
    with pytest.raises(UnsupportedError, match="Conv2d"):
        F.FourierFTModule("m", cfg, {"fourierft_spectrum": np.ones(3)}, Layer.of((4, 2, 3, 3)))
    with pytest.raises(ShapeError, match="do not fit"):
        F.FourierFTModule("m", cfg, {"fourierft_spectrum": np.ones(30)}, Layer.of((4, 5)))
    with pytest.raises(ShapeError, match="unexpected"):
        F.FourierFTModule("m", cfg, {"fourierft_spectrum": np.ones(3), "x": np.ones(3)}, Layer.of((4, 5)))
    # the spectrum does not record the orientation: the Method says so, and the kinds rule asks for evidence
    assert F.METHOD.orientation_in_tensors is False
    for bad in (dict(n_frequency=0), dict(random_loc_seed=-1), dict(bias="lora_only"),
                dict(n_frequency_pattern={"q": 0}), dict(init_weights=None)):
        with pytest.raises(ConfigError):
            F.FourierFTConfig(target_modules=["m"], **bad).validate()
