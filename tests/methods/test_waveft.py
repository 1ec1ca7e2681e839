"""WaveFT's math against independent float64 computations: the filters' defining identities, ΔW against a
separable reference (dense padded grid, stride-2 transposed convolutions written as matrices, the crops),
forward / merge / unmerge round trips on several layouts and dtypes, the pattern rule and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

import peftmath as pm
from peftmath.errors import ConfigError, ShapeError, UnsupportedError
from peftmath.layers import Layer, LayerKind
from peftmath.methods import waveft
from tests.methods.test_inplace_contract import _np_permuted, _np_sliced


@pytest.mark.parametrize("family", waveft.SUPPORTED_FAMILIES)
def test_filters_are_orthonormal_daubechies(family):
    lo, hi = (np.array(f) for f in waveft.reconstruction_filters(family))
    L = lo.size
    assert L == 2 * (int(family[3:]) if family.startswith("sym") else int(family[2:]))
    np.testing.assert_allclose(lo.sum(), np.sqrt(2), atol=1e-13)
    for shift in range(0, L, 2):  # orthonormal under even shifts; hi orthogonal to lo
        want = 1.0 if shift == 0 else 0.0
        np.testing.assert_allclose(np.dot(lo[shift:], lo[:L - shift]), want, atol=1e-12)
        np.testing.assert_allclose(np.dot(lo[shift:], hi[:L - shift]), 0.0, atol=1e-12)
    n = L // 2  # N vanishing moments: Σ (−1)^i i^m lo[i] = 0 for m < N
    i = np.arange(L)
    for m in range(n):
        assert abs(np.sum((-1.0) ** i * i**m * lo)) < 1e-9 * max(1, L**m)


def _upsample_matrix(n: int, f: np.ndarray) -> np.ndarray:
    """``T`` with ``(T x)[2i + p] += f[p] x[i]``: the stride-2 transposed convolution of length ``2n + L − 2``."""
    T = np.zeros((2 * n + f.size - 2, n))
    for i in range(n):
        T[2 * i:2 * i + f.size, i] += f
    return T


def reference(spectrum, out, inn, *, scaling, seed, family, use_idwt):
    rows, cols = waveft.positions(out, inn, spectrum.size, seed)
    if not use_idwt:
        S = np.zeros((out, inn))
        S[rows, cols] = spectrum
        return scaling * S
    lo, hi = (np.array(f) for f in waveft.reconstruction_filters(family))
    L = lo.size
    H, W = out + L - 2 + (out + L - 2) % 2, inn + L - 2 + (inn + L - 2) % 2
    S = np.zeros((H, W))
    S[rows + (H - out) // 2, cols + (W - inn) // 2] = spectrum
    h2, w2 = H // 2, W // 2
    cA, cH, cV, cD = S[:h2, :w2], S[:h2, w2:], S[h2:, :w2], S[h2:, w2:]
    Rl, Rh = _upsample_matrix(h2, lo), _upsample_matrix(h2, hi)
    Cl, Ch = _upsample_matrix(w2, lo), _upsample_matrix(w2, hi)
    Y = Rl @ cA @ Cl.T + Rh @ cH @ Cl.T + Rl @ cV @ Ch.T + Rh @ cD @ Ch.T  # hi⊗lo on cH, lo⊗hi on cV
    pad = (2 * L - 3) // 2
    Y = Y[pad:Y.shape[0] - pad, pad:Y.shape[1] - pad]
    t, l = (Y.shape[0] - out) // 2, (Y.shape[1] - inn) // 2
    return scaling * Y[t:t + out, l:l + inn]


@pytest.mark.parametrize("family", ["db1", "db2", "db4", "sym3", "db10"])
@pytest.mark.parametrize("shape", [(20, 10), (7, 9), (3, 30), (16, 16)])
@pytest.mark.parametrize("use_idwt", [True, False])
def test_delta_weight_against_separable_reference(family, shape, use_idwt):
    out, inn = shape
    k = min(25, out * inn)
    spec = np.random.default_rng(out * inn).standard_normal(k)
    got = waveft.delta_weight(spec, out, inn, scaling=2.5, random_loc_seed=11, wavelet_family=family,
                              use_idwt=use_idwt)
    want = reference(spec, out, inn, scaling=2.5, seed=11, family=family, use_idwt=use_idwt)
    assert got.dtype == np.float64 and got.shape == shape
    np.testing.assert_allclose(got, want, atol=1e-13 * max(1.0, np.abs(want).max()))
    got32 = waveft.delta_weight(spec.astype(np.float32), out, inn, scaling=2.5, random_loc_seed=11,
                                wavelet_family=family, use_idwt=use_idwt)
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, want, atol=4e-6 * max(1.0, np.abs(want).max()))


#: memory layouts of the base weight (the in-place contract's permuted view and strided slice)
LAYOUTS = {"C": lambda a: a.copy(), "F": np.asfortranarray, "permuted": _np_permuted,
           "sliced": lambda a: _np_sliced(a, 1)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", [LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED])
def test_forward_merge_unmerge(layout, dtype, kind):
    rng = np.random.default_rng(8)
    out, inn = 10, 12
    cfg = waveft.WaveFTConfig(n_frequency=15, scaling=3.0, wavelet_family="db2",
                              fan_in_fan_out=kind is LayerKind.CONV1D_TRANSPOSED)
    spec = rng.standard_normal(15).astype(dtype)
    shape = (out, inn) if kind is LayerKind.LINEAR else (inn, out)
    mod = waveft.WaveFTModule("m", cfg, {"waveft_spectrum": spec}, Layer(kind, shape))
    dw = reference(spec.astype(np.float64), out, inn, scaling=3.0, seed=777, family="db2", use_idwt=True)
    W = LAYOUTS[layout](rng.standard_normal(shape).astype(dtype))
    bias = rng.standard_normal(out).astype(dtype)
    x = rng.standard_normal((2, 3, inn)).astype(dtype)
    Wm = W.astype(np.float64) if kind is LayerKind.LINEAR else W.astype(np.float64).T
    want = x.astype(np.float64) @ (Wm + dw).T + bias
    eps = float(np.finfo(dtype).eps)
    np.testing.assert_allclose(mod.forward(x, W, bias), want, atol=64 * eps * np.abs(want).max())
    merged = mod.merge(W).weight
    stored = dw if kind is LayerKind.LINEAR else dw.T
    np.testing.assert_allclose(merged, W.astype(np.float64) + stored, atol=4 * eps * np.abs(merged).max())
    np.testing.assert_allclose(mod.unmerge(merged).weight, W, atol=8 * eps * np.abs(merged).max())
    before = W.copy()
    target = LAYOUTS[layout](W.copy())
    assert mod.merge(target, copy=False).weight is target
    np.testing.assert_array_equal(target, merged)
    np.testing.assert_array_equal(W, before)


def test_torch_matches_numpy():
    torch = pytest.importorskip("torch")
    spec = np.random.default_rng(1).standard_normal(30).astype(np.float32)
    cfg = waveft.WaveFTConfig(n_frequency=30, wavelet_family="db3")
    a = waveft.WaveFTModule("m", cfg, {"waveft_spectrum": spec}, Layer(LayerKind.LINEAR, (9, 14)))
    b = waveft.WaveFTModule("m", cfg, {"waveft_spectrum": torch.from_numpy(spec)}, Layer(LayerKind.LINEAR, (9, 14)))
    np.testing.assert_array_equal(b.delta_weight().numpy(), a.delta_weight())


def test_pattern_rule_proportional_and_refusals():
    cfg = waveft.WaveFTConfig(n_frequency=8, n_frequency_pattern={"lin1": 3})
    assert waveft.n_frequency_for(cfg, "lin1") == 3 and waveft.n_frequency_for(cfg, "x.lin1") == 3
    assert waveft.n_frequency_for(cfg, "lin0") == 8
    prop = waveft.WaveFTConfig(n_frequency=16, proportional_parameters=True)
    sizes = {"lin0": (20, 10), "lin1": (2, 20)}  # PEFT's MLP: 200 and 40 weights, budget 32
    assert [waveft.n_frequency_for(prop, n, sizes) for n in sizes] == [27, 5]
    with pytest.raises(UnsupportedError, match="proportional"):
        waveft.WaveFTModule.initialize("m", prop, Layer(LayerKind.LINEAR, (4, 4)))
    with pytest.raises(ConfigError, match="wavelet_family"):
        waveft.WaveFTConfig(wavelet_family="haar").validate()
    for family, why in (("sym4", "only the Daubechies"), ("coif1", "only the Daubechies"), ("db20", "stops at db10")):
        with pytest.raises(UnsupportedError, match=why):
            waveft.WaveFTModule("m", waveft.WaveFTConfig(wavelet_family=family),
                                {"waveft_spectrum": np.zeros(3, np.float32)}, Layer(LayerKind.LINEAR, (4, 4)))
    # without the transform any family name is fine (PEFT ignores it too)
    waveft.WaveFTModule("m", waveft.WaveFTConfig(wavelet_family="sym4", use_idwt=False),
                        {"waveft_spectrum": np.zeros(3, np.float32)}, Layer(LayerKind.LINEAR, (4, 4)))
    with pytest.raises(ShapeError):
        waveft.WaveFTModule("m", waveft.WaveFTConfig(), {"waveft_spectrum": np.zeros(17, np.float32)},
                            Layer(LayerKind.LINEAR, (4, 4)))
    with pytest.raises(UnsupportedError):
        waveft.WaveFTModule("m", waveft.WaveFTConfig(), {"waveft_spectrum": np.zeros(3, np.float32)},
                            Layer(LayerKind.EMBEDDING, (4, 4)))


def test_adapter_end_to_end(tmp_path):
    state = {"a.weight": np.ones((8, 12), np.float32), "b.weight": np.zeros((6, 6), np.float32)}
    cfg = waveft.WaveFTConfig(target_modules=["a", "b"], n_frequency=10, n_frequency_pattern={"b": 4},
                              wavelet_family="db2", init_weights=False)
    ad = pm.create_adapter(state, cfg, seed=0)
    assert ad.params["b"]["waveft_spectrum"].shape == (4,)
    merged = ad.merge(state)
    again = pm.load_adapter(pm.save_adapter(ad, tmp_path / "waveft"))
    for key in state:
        np.testing.assert_array_equal(again.merge(state)[key], merged[key])
        assert np.abs(merged[key] - state[key]).max() > 0
    assert ad.num_trainable_parameters() == 14
