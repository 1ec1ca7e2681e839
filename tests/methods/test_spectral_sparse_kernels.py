"""The fast merge paths of the spectral and sparse methods against independent computations.

* FourierFT's row-tiled transform (``fourierft._SpectralRows``: the occupied half-grid columns transformed
  along ``out``, then ``irfft`` row tile by row tile): ΔW against the float64 cosine sum, on several tiles
  (the tile size shrunk), every layout of the in-place contract, half-precision weights (each entry rounded
  once), torch and array-api-strict, no array of W's size on the in-place merge (``tracemalloc``).
* ``methods._sparse.add_at`` (SHiRA's and WaveFT's in-place merges: only ΔW's nonzero entries): against a dense
  float64 sum, through the flat view and the 2-D fallback, bfloat16 rounding once, array-api-strict declining
  before writing; WaveFT's merge touching nothing else and allocating nothing of W's size.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from peftmath.layers import Layer, LayerKind
from peftmath.methods import _base, _sparse, fourierft, waveft
from tests.methods.test_inplace_contract import _np_permuted, _np_sliced

LAYOUTS = {"C": lambda a: a.copy(), "F": np.asfortranarray, "permuted": _np_permuted,
           "sliced": lambda a: _np_sliced(a, 1)}


def _cosine_sum(spec, out, inn, scaling, seed):
    """``α/(out·in) Σ_j c_j cos(2π(p r_j/out + q s_j/in))`` in float64, term by term (no FFT)."""
    rows, cols = fourierft.spectral_indices(out, inn, spec.size, seed)
    p, q = np.meshgrid(np.arange(out), np.arange(inn), indexing="ij")
    dw = np.zeros((out, inn))
    for c, r, s in zip(np.asarray(spec, np.float64), rows, cols):
        dw += c * np.cos(2 * np.pi * (p * r / out + q * s / inn))
    return scaling / (out * inn) * dw


def _peak(fn) -> int:
    """Bytes allocated (and traced) at the peak of ``fn()``, beyond what was allocated before."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few rows, so that the small test layers run through several of them."""
    monkeypatch.setattr(_base, "ROW_TILE_BYTES", 256)
    monkeypatch.setattr(fourierft, "ROW_TILE_BYTES", 256)


@pytest.mark.parametrize("shape,k", [((16, 12), 30), ((9, 7), 63), ((1, 10), 4), ((11, 1), 5), ((24, 33), 3)])
def test_fourierft_tiles_match_the_cosine_sum(small_tiles, shape, k):
    spec = np.random.default_rng(k).standard_normal(k)
    want = _cosine_sum(spec, *shape, 2.5, 5)
    got = fourierft.delta_weight(spec, *shape, scaling=2.5, random_loc_seed=5)  # float64
    np.testing.assert_allclose(got, want, atol=1e-13 * max(1.0, np.abs(want).max()))
    got32 = fourierft.delta_weight(spec.astype(np.float32), *shape, scaling=2.5, random_loc_seed=5)
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, want, atol=4e-7 * np.abs(want).max())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind", [LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED])
def test_fourierft_tiled_merge_layouts(small_tiles, layout, kind):
    rng = np.random.default_rng(3)
    out, inn, k = 14, 10, 25
    cfg = fourierft.FourierFTConfig(n_frequency=k, scaling=3.0, random_loc_seed=2,
                                    fan_in_fan_out=kind is LayerKind.CONV1D_TRANSPOSED)
    spec = rng.standard_normal(k)
    shape = (out, inn) if kind is LayerKind.LINEAR else (inn, out)
    mod = fourierft.FourierFTModule("m", cfg, {"fourierft_spectrum": spec}, Layer(kind, shape))
    dw = _cosine_sum(spec, out, inn, 3.0, 2)
    stored = dw if kind is LayerKind.LINEAR else dw.T
    W = rng.standard_normal(shape)
    target = LAYOUTS[layout](W)
    assert mod.merge(target, copy=False).weight is target
    np.testing.assert_allclose(target, W + stored, atol=1e-13)
    copied = mod.merge(W).weight  # copy=True: the same kernel on a private copy
    np.testing.assert_array_equal(copied, target)
    assert mod.unmerge(target, copy=False).weight is target
    np.testing.assert_allclose(target, W, atol=1e-13)


def test_fourierft_half_precision_weight_rounds_once(small_tiles):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(4)
    spec = rng.standard_normal(40).astype(np.float32)
    mod = fourierft.FourierFTModule("m", fourierft.FourierFTConfig(n_frequency=40, scaling=20.0),
                                    {"fourierft_spectrum": spec}, Layer(LayerKind.LINEAR, (12, 16)))
    W = rng.standard_normal((12, 16)).astype(ml_dtypes.bfloat16)
    want = (W.astype(np.float64) + _cosine_sum(spec, 12, 16, 20.0, 777)).astype(np.float32)
    target = W.copy()
    mod.merge(target, copy=False)
    # one rounding of the float32 sum (exactly representable neighbours may differ by one bf16 step only
    # where the float32 sum sits on a rounding boundary: none here)
    np.testing.assert_array_equal(target, want.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(mod.merge(W).weight, target)


def test_fourierft_torch_and_strict_match_numpy(small_tiles):
    spec = np.random.default_rng(6).standard_normal(30).astype(np.float32)
    want = fourierft.delta_weight(spec, 13, 18, scaling=2.0, random_loc_seed=9)
    torch = pytest.importorskip("torch")
    got = fourierft.delta_weight(torch.from_numpy(spec), 13, 18, scaling=2.0, random_loc_seed=9)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6 * np.abs(want).max())
    cfg = fourierft.FourierFTConfig(n_frequency=30, scaling=2.0, random_loc_seed=9)
    W = torch.randn(13, 18)
    mod = fourierft.FourierFTModule("m", cfg, {"fourierft_spectrum": torch.from_numpy(spec)},
                                    Layer(LayerKind.LINEAR, (13, 18)))
    target = W.clone()
    mod.merge(target, copy=False)
    np.testing.assert_allclose(target.numpy(), W.numpy() + want, atol=1e-6)
    xp = pytest.importorskip("array_api_strict")
    got = fourierft.delta_weight(xp.asarray(spec), 13, 18, scaling=2.0, random_loc_seed=9)
    np.testing.assert_allclose(np.asarray(got._array), want, atol=1e-6 * np.abs(want).max())


def test_fourierft_in_place_merge_allocates_no_weight_sized_array(monkeypatch):
    monkeypatch.setattr(_base, "ROW_TILE_BYTES", 1 << 16)  # tiles of 64 KiB on a 1.5 MiB weight
    out, inn, k = 512, 768, 20
    spec = np.random.default_rng(7).standard_normal(k).astype(np.float32)
    mod = fourierft.FourierFTModule("m", fourierft.FourierFTConfig(n_frequency=k),
                                    {"fourierft_spectrum": spec}, Layer(LayerKind.LINEAR, (out, inn)))
    W = np.zeros((out, inn), np.float32)
    mod.merge(W, copy=False)  # the host plan is cached by the first call
    want = W.copy()
    W[...] = 0
    peak = _peak(lambda: mod.merge(W, copy=False))
    np.testing.assert_array_equal(W, want)
    assert peak < 0.3 * W.nbytes, peak  # Z (out × at most 2k + 1 columns) and one tile, not W's size


# -- methods._sparse.add_at -------------------------------------------------------------------------
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_add_at_flat_view_and_fallback(layout):
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(8)
    W = rng.standard_normal((9, 11)).astype(np.float32)
    flat = np.sort(rng.choice(99, size=20, replace=False))
    values = rng.standard_normal(20).astype(np.float32)
    want = W.astype(np.float64)
    want.reshape(-1)[flat] += values
    target = LAYOUTS[layout](W)
    assert _sparse.add_at(xp, target, flat, 11, values, xp.float32)
    np.testing.assert_allclose(target, want, rtol=1e-6, atol=1e-6)
    untouched = np.ones(99, bool)
    untouched[flat] = False
    np.testing.assert_array_equal(np.asarray(target).reshape(-1)[untouched], W.reshape(-1)[untouched])


def test_add_at_bfloat16_rounds_once_and_strict_declines():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(9)
    W = rng.standard_normal((6, 5)).astype(ml_dtypes.bfloat16)
    flat = np.array([0, 7, 29])
    values = np.array([1e-3, -0.25, 3.0], np.float32)
    want = W.astype(np.float32)
    want.reshape(-1)[flat] += values
    target = W.copy()
    assert _sparse.add_at(xp, target, flat, 5, values, xp.float32)
    np.testing.assert_array_equal(target, want.astype(ml_dtypes.bfloat16))
    strict = pytest.importorskip("array_api_strict")
    M = strict.asarray(np.ones((6, 5), np.float32))
    assert not _sparse.add_at(strict, M, flat, 5, strict.asarray(values), strict.float32)
    np.testing.assert_array_equal(np.asarray(M._array), 1.0)


@pytest.mark.parametrize("family", ["db1", "db3"])
def test_waveft_sparse_merge_touches_only_the_atoms(family):
    rng = np.random.default_rng(10)
    out, inn, k = 256, 320, 12
    cfg = waveft.WaveFTConfig(n_frequency=k, scaling=4.0, wavelet_family=family)
    spec = rng.standard_normal(k).astype(np.float32)
    mod = waveft.WaveFTModule("m", cfg, {"waveft_spectrum": spec}, Layer(LayerKind.LINEAR, (out, inn)))
    dw = waveft.delta_weight(spec.astype(np.float64), out, inn, scaling=4.0, wavelet_family=family)
    W = rng.standard_normal((out, inn)).astype(np.float32)
    target = W.copy()
    mod.merge(target, copy=False)
    np.testing.assert_allclose(target, W.astype(np.float64) + dw, atol=1e-6 * np.abs(W).max())
    np.testing.assert_array_equal(target[dw == 0], W[dw == 0])  # nothing else read-modified
    lo = waveft.reconstruction_filters(family)[0]
    assert np.count_nonzero(dw) <= k * len(lo) ** 2
    peak = _peak(lambda: mod.unmerge(target, copy=False))
    np.testing.assert_allclose(target, W, atol=1e-6 * np.abs(W).max())
    assert peak < 0.05 * W.nbytes, peak  # the touched cells' values and indices only
