"""The default merge / unmerge (``copy=True``) runs the in-place kernel on one private copy (issue 20, item 1).

For every method with an in-place kernel (LoRA, DoRA, VeRA, AdaLoRA, DeLoRA, MiSS; IA3 for half precision)
``copy=True`` on a mutable backend allocates the result once, in the weight's dtype and C order, and runs the
kernel on it (:func:`peftmath.methods._base.write_weight`). Checked here against independent float64
formulas (not the library's own code): the numbers within the rounding bound, the input never touched, the
result C-contiguous and of W's dtype on every layout (Fortran, permuted, read-only, torch, channels_last,
half precision), the same bits as ``copy=False`` where both run the same kernel, the old out-of-place path's
numbers within the bound, ``safe=True`` refusing a non-finite adapter, JAX (immutable) still computing out of
place, and, with ``tracemalloc``, no temporary of W's size besides the result.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from peftmath.errors import NonFiniteError
from peftmath.layers import Layer
from peftmath.methods import adalora, delora, dora, fourierft, hira, ia3, lora, miss, road, vera
from tests.helpers import traced_peak

torch = pytest.importorskip("torch")

OUT, IN, R, S = 48, 40, 4, 0.75
EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-7}
BF16 = np.dtype(ml_dtypes.bfloat16)


# --------------------------------------------------------------------------------------------------
# Each method: its merge / unmerge given W and copy=, and the float64 formulas (W in float64)
# --------------------------------------------------------------------------------------------------
class Method:
    def __init__(self, name, merge, unmerge, ref_merge, ref_unmerge, magnitude, *, kernel_full_precision=True):
        self.name, self.merge, self.unmerge = name, merge, unmerge
        self.ref_merge, self.ref_unmerge, self.magnitude = ref_merge, ref_unmerge, magnitude
        #: False: full-precision copy=True computes out of place in one pass (IA3's W * l)
        self.kernel_full_precision = kernel_full_precision

    def __repr__(self) -> str:
        return self.name


def _as(W, *params):
    """The float32 host parameters as arrays of W's library."""
    return params if isinstance(W, np.ndarray) else tuple(torch.from_numpy(np.ascontiguousarray(p)) for p in params)


def _weight(rng, shape=(OUT, IN)):
    return rng.standard_normal(shape).astype(np.float32)


def _methods() -> list[Method]:
    rng = np.random.default_rng(2020)
    f32, d = np.float32, np.float64
    small = lambda *shape: (rng.standard_normal(shape) / 2).astype(f32)  # noqa: E731
    W0 = _weight(rng)

    A, B = small(R, IN), small(OUT, R)
    dA, dB = A.astype(d), B.astype(d)
    ms = [Method("LoRA",
                 lambda W, copy, safe=False: lora.merge(W, *_as(W, A, B), scaling=S, copy=copy, safe=safe),
                 lambda W, copy: lora.unmerge(W, *_as(W, A, B), scaling=S, copy=copy),
                 lambda W: W + S * dB @ dA, lambda W: W - S * dB @ dA,
                 lambda W: np.abs(W) + S * np.abs(dB) @ np.abs(dA))]

    mag = (np.linalg.norm(W0.astype(d) + S * dB @ dA, axis=1) * 1.25).astype(f32)
    n_rec = np.linalg.norm(W0.astype(d) + S * dB @ dA, axis=1)  # the record of merging W0

    def dora_ref(W):
        V = W + S * dB @ dA
        return (mag / np.linalg.norm(V, axis=1))[:, None] * V

    ms.append(Method("DoRA",
                     lambda W, copy, safe=False: dora.merge(W, *_as(W, A, B, mag), scaling=S, copy=copy, safe=safe).weight,
                     lambda W, copy: dora.unmerge(W, *_as(W, A, B, mag), scaling=S, copy=copy,
                                                  weight_norm=_as(W, n_rec.astype(f32))[0]).weight,
                     dora_ref, lambda W: (n_rec / mag)[:, None] * W - S * dB @ dA,
                     lambda W: 2 * (np.abs(W) + S * np.abs(dB) @ np.abs(dA))))

    vA, vB, lb, ld = small(R + 2, IN + 3), small(OUT + 5, R + 2), small(OUT), small(R + 2)
    Bs, As = lb.astype(d)[:, None] * vB[:OUT].astype(d), ld.astype(d)[:, None] * vA[:, :IN].astype(d)
    ms.append(Method("VeRA",
                     lambda W, copy, safe=False: vera.merge(W, *_as(W, lb, ld, vA, vB), copy=copy, safe=safe),
                     lambda W, copy: vera.unmerge(W, *_as(W, lb, ld, vA, vB), copy=copy),
                     lambda W: W + Bs @ As, lambda W: W - Bs @ As,
                     lambda W: np.abs(W) + np.abs(Bs) @ np.abs(As)))

    aA, aE, aB = small(R, IN), small(R, 1), small(OUT, R)
    c = S / (R + 1e-5)  # PEFT divides by ranknum + 1e-5
    aD = (aB.astype(d) @ (aA.astype(d) * aE.astype(d))) * c
    ms.append(Method("AdaLoRA",
                     lambda W, copy, safe=False: adalora.merge(W, *_as(W, aA, aE, aB), scaling=S, ranknum=R, copy=copy,
                                                               safe=safe),
                     lambda W, copy: adalora.unmerge(W, *_as(W, aA, aE, aB), scaling=S, ranknum=R, copy=copy),
                     lambda W: W + aD, lambda W: W - aD,
                     lambda W: np.abs(W) + np.abs(aB.astype(d)) @ np.abs(aA.astype(d) * aE.astype(d)) * c))

    p = delora.init_weights(Layer.of((OUT, IN)), R, W0, init=False, seed=3)
    pA, pB, plam, pw = (p[k] for k in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"))
    sc = float(plam[0]) / R / (np.linalg.norm(pA.astype(d), axis=1) * np.linalg.norm(pB.astype(d), axis=0))
    pBs, pAw = pB.astype(d) * sc, pA.astype(d) * pw.astype(d)
    ms.append(Method("DeLoRA",
                     lambda W, copy, safe=False: delora.merge(W, *_as(W, pA, pB, plam, pw), copy=copy, safe=safe),
                     lambda W, copy: delora.unmerge(W, *_as(W, pA, pB, plam, pw), copy=copy),
                     lambda W: W + pBs @ pAw, lambda W: W - pBs @ pAw,
                     lambda W: np.abs(W) + np.abs(pBs) @ np.abs(pAw)))

    D = small(R, OUT)
    mD = np.stack([D[j % R].astype(d) for j in range(IN)], axis=1)  # ΔW[o, j] = D[j mod r, o]
    ms.append(Method("MiSS",
                     lambda W, copy, safe=False: miss.merge(W, *_as(W, D), copy=copy, safe=safe),
                     lambda W, copy: miss.unmerge(W, *_as(W, D), copy=copy),
                     lambda W: W + mD, lambda W: W - mD, lambda W: np.abs(W) + np.abs(mD)))

    hA, hB = small(R, IN) / 2, small(OUT, R) / 2
    hM = hB.astype(d) @ hA.astype(d)
    ms.append(Method("HiRA",
                     lambda W, copy, safe=False: hira.merge(W, *_as(W, hA, hB), copy=copy, safe=safe),
                     lambda W, copy: hira.unmerge(W, *_as(W, hA, hB), copy=copy),
                     lambda W: W * (1 + hM), lambda W: W / (1 + hM),
                     lambda W: np.abs(W) * (1 + np.abs(hB.astype(d)) @ np.abs(hA.astype(d))) / np.min(np.abs(1 + hM))))

    spec = small(30)
    fmod = fourierft.FourierFTModule("m", fourierft.FourierFTConfig(n_frequency=30, scaling=20.0),
                                     {"fourierft_spectrum": spec}, Layer.of((OUT, IN)))
    dense = np.zeros((OUT, IN), dtype=np.complex128)
    dense[fourierft.spectral_indices(OUT, IN, 30, 777)] = spec.astype(d)
    fD = np.real(np.fft.ifft2(dense)) * 20.0  # the definition: scaling · Re(IDFT₂(S))

    def fmod_of(W):
        return fmod if isinstance(W, np.ndarray) else fourierft.FourierFTModule(
            "m", fmod.config, {"fourierft_spectrum": torch.from_numpy(spec)}, fmod.layer)

    ms.append(Method("FourierFT",
                     lambda W, copy, safe=False: fmod_of(W).merge(W, copy=copy, safe=safe).weight,
                     lambda W, copy: fmod_of(W).unmerge(W, copy=copy).weight,
                     lambda W: W + fD, lambda W: W - fD, lambda W: np.abs(W) + 30 * np.max(np.abs(fD))))

    g = 8  # RoAd road_1: group k's rows k·g + j and k·g + j + g/2 rotate by θ_{k·g/2 + j}, scaled by α
    th, al = small(OUT // 2) * 4, 1 + small(OUT // 2)
    rows_a = np.array([k * g + j for k in range(OUT // g) for j in range(g // 2)])
    rows_b = rows_a + g // 2
    c_, s_ = (al.astype(d) * np.cos(th.astype(d)))[:, None], (al.astype(d) * np.sin(th.astype(d)))[:, None]

    def road_ref(W, inverse=False):
        out = np.empty_like(W)
        a, b = W[rows_a], W[rows_b]
        if inverse:  # R⁻¹ = Rᵀ / α² for a scaled rotation
            den = c_ ** 2 + s_ ** 2
            out[rows_a], out[rows_b] = (c_ * a + s_ * b) / den, (c_ * b - s_ * a) / den
        else:
            out[rows_a], out[rows_b] = c_ * a - s_ * b, s_ * a + c_ * b
        return out

    ms.append(Method("RoAd",
                     lambda W, copy, safe=False: road.merge(W, *_as(W, th, al), group_size=g, copy=copy, safe=safe)[0],
                     lambda W, copy: road.unmerge(W, *_as(W, th, al), group_size=g, copy=copy)[0],
                     road_ref, lambda W: road_ref(W, inverse=True),
                     lambda W: 4 * (np.max(np.abs(W)) + 0 * W)))

    lo = rng.uniform(0.5, 2.0, (OUT, 1)).astype(f32)
    ms.append(Method("IA3",
                     lambda W, copy, safe=False: ia3.merge(W, *_as(W, lo), copy=copy, safe=safe)[0],
                     lambda W, copy: ia3.unmerge(W, *_as(W, lo), copy=copy)[0],
                     lambda W: W * lo, lambda W: W / lo, lambda W: np.abs(W) * 2,
                     kernel_full_precision=False))
    return ms


METHODS = _methods()


def _f64(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    if x.dtype == torch.bfloat16:
        x = x.float()
    return x.detach().numpy().astype(np.float64)


def _bits(x) -> bytes:
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x).tobytes()
    return x.detach().contiguous().view(torch.int16 if x.element_size() == 2 else torch.int32).numpy().tobytes()


def _check_close(method, got, want, W64, dtype="float32", k=R):
    unit = EPS[dtype] * (method.magnitude(W64) + np.abs(want))
    err = np.abs(_f64(got) - want)
    assert np.all(err <= (k + 4) * unit), f"{method}: worst error {float(np.max(err / np.maximum(unit, 1e-300)))} u"


# --------------------------------------------------------------------------------------------------
# Layouts of the same float32 values
# --------------------------------------------------------------------------------------------------
def _np_permuted(w):
    view = np.ascontiguousarray(w.T).T
    assert not view.flags.c_contiguous
    return view


def _np_readonly(w):
    out = w.copy()
    out.flags.writeable = False
    return out


LAYOUTS = {
    "C": lambda w: w.copy(),
    "Fortran": np.asfortranarray,
    "permuted": _np_permuted,
    "read-only": _np_readonly,
    "torch": lambda w: torch.from_numpy(w.copy()),
    "torch-permuted": lambda w: torch.from_numpy(np.ascontiguousarray(w.T)).t(),
}


def _contiguous(x) -> bool:
    return x.flags.c_contiguous if isinstance(x, np.ndarray) else x.is_contiguous()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_copy_true_is_the_float64_result_rounded_and_leaves_w_alone(method, layout):
    W32 = _weight(np.random.default_rng(7))
    W64 = W32.astype(np.float64)
    want = method.ref_merge(W64)
    assert np.max(np.abs(want - W64)) > 1e3 * EPS["float32"] * np.max(np.abs(W64))  # the merge moves W
    W = LAYOUTS[layout](W32)
    before = _bits(W)
    got = method.merge(W, True)
    assert got is not W and _bits(W) == before
    assert got.dtype == W.dtype and tuple(got.shape) == W32.shape
    if method.kernel_full_precision:
        assert _contiguous(got)
    _check_close(method, got, want, W64)
    back = method.unmerge(got, True)
    _check_close(method, back, method.ref_unmerge(_f64(got)), _f64(got))


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_copy_true_equals_the_out_of_place_path_within_the_bound(method, monkeypatch):
    """The numbers of the path copy=True took before issue 20 (``compute``: ΔW, then W + ΔW, rounded), forced
    by declining the private copy: within the rounding bound of the new ones, and both of the reference."""
    from peftmath.methods import _base

    W32 = _weight(np.random.default_rng(8))
    new = method.merge(W32, True)
    monkeypatch.setattr(_base, "_copy_takes_kernel", lambda w: False)
    old = method.merge(W32, True)
    W64 = W32.astype(np.float64)
    _check_close(method, new, _f64(old), W64)
    _check_close(method, old, method.ref_merge(W64), W64)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lib", ["numpy", "numpy-Fortran", "torch"])
@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_copy_true_and_copy_false_agree_bit_for_bit(method, lib, dtype):
    """Both run the same kernel (copy=True on its private C-ordered copy), so they give the same bits: on
    C-ordered NumPy and torch weights, float32 and bfloat16 (torch bfloat16: both compute out of place where
    the torch backend has no half-precision kernel), and on Fortran-ordered NumPy ones except DoRA in
    float32 (its in-place row norms run on the Fortran rows in another summation order)."""
    if lib == "numpy-Fortran" and method.name == "DoRA" and dtype == "float32":
        pytest.skip("DoRA's float32 in-place norms on a Fortran W sum in another order (within the bound)")
    W32 = _weight(np.random.default_rng(9))
    host = W32.astype(BF16) if dtype == "bfloat16" else W32
    if lib == "torch":
        W = torch.from_numpy(W32.copy())
        W = W.to(torch.bfloat16) if dtype == "bfloat16" else W
        target = W.clone()
    else:
        W = np.asfortranarray(host) if lib == "numpy-Fortran" else host.copy()
        target = W.copy(order="K")
    got = method.merge(W, True)
    out = method.merge(target, False)
    assert out is target and _bits(got) == _bits(target)
    back, target_back = method.unmerge(got, True), method.unmerge(target, False)
    assert _bits(back) == _bits(target_back)


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_half_precision_copy_true_rounds_once(method):
    """bfloat16 W (NumPy, ml_dtypes): the float32 work rounded once to bfloat16, W untouched, the result
    in W's dtype and C order."""
    W16 = _weight(np.random.default_rng(10)).astype(BF16)
    W64 = W16.astype(np.float64)
    for W in (W16.copy(), np.asfortranarray(W16), torch.from_numpy(W16.astype(np.float32)).to(torch.bfloat16)):
        before = _bits(W)
        got = method.merge(W, True)
        assert _bits(W) == before and got.dtype == W.dtype and _contiguous(got)
        _check_close(method, got, method.ref_merge(W64), W64, dtype="bfloat16", k=0)


@pytest.mark.parametrize("nd", [1, 2])
def test_conv_layouts_and_channels_last(nd):
    """LoRA on conv weights stored Fortran-ordered, permuted and torch channels_last: copy=True gives a
    C-ordered result equal to the float64 formula, the input untouched."""
    rng = np.random.default_rng(20 + nd)
    shape = (6, 4, 3) if nd == 1 else (6, 4, 3, 2)
    W32 = rng.standard_normal(shape).astype(np.float32)
    A = rng.standard_normal((R, *shape[1:])).astype(np.float32)
    B = rng.standard_normal((shape[0], R, *(1,) * (len(shape) - 2))).astype(np.float32)
    want = W32.astype(np.float64) + S * (B.reshape(shape[0], R).astype(np.float64)
                                         @ A.reshape(R, -1).astype(np.float64)).reshape(shape)
    mag = np.abs(W32) + S * (np.abs(B.reshape(shape[0], R)) @ np.abs(A.reshape(R, -1))).reshape(shape)
    layouts = [np.asfortranarray(W32), np.transpose(np.ascontiguousarray(np.transpose(W32)))]
    if nd == 2:
        layouts.append(torch.from_numpy(W32.copy()).to(memory_format=torch.channels_last))
    for W in layouts:
        a, b = (A, B) if isinstance(W, np.ndarray) else (torch.from_numpy(A), torch.from_numpy(B))
        before = _bits(W)
        got = lora.merge(W, a, b, scaling=S)
        assert _bits(W) == before and _contiguous(got) and tuple(got.shape) == shape
        assert np.all(np.abs(_f64(got) - want) <= (R + 4) * EPS["float32"] * (mag + np.abs(want)))


@pytest.mark.parametrize("method", [m for m in METHODS if m.kernel_full_precision], ids=repr)
def test_copy_true_allocates_only_the_result(method, monkeypatch):
    """tracemalloc (deterministic for NumPy): a copy=True merge / unmerge of a float32 W allocates the result
    and nothing else of W's size (the old path: ΔW, W + ΔW and the rounded copy; HiRA's row tiles of its
    modulation, shrunk here below W's size). FourierFT: nothing beyond building ΔW (its inverse transform's
    arrays), whose output becomes the result."""
    from peftmath.methods import _base

    monkeypatch.setattr(_base, "ROW_TILE_BYTES", 32 << 10)
    W = _weight(np.random.default_rng(11))
    W = np.tile(W, (16, 16))  # 768 x 640: large enough that the factors and row norms are small beside it
    fmod = fourierft.FourierFTModule("m", fourierft.FourierFTConfig(n_frequency=16),
                                     {"fourierft_spectrum": np.ones(16, np.float32)}, Layer.of(W.shape))
    big = {
        "LoRA": lambda W, c: lora.merge(W, np.ones((R, W.shape[1]), np.float32), np.ones((W.shape[0], R), np.float32),
                                        scaling=S, copy=c),
        "DoRA": lambda W, c: dora.merge(W, np.ones((R, W.shape[1]), np.float32), np.ones((W.shape[0], R), np.float32),
                                        np.ones(W.shape[0], np.float32), scaling=S, copy=c).weight,
        "VeRA": lambda W, c: vera.merge(W, np.ones(W.shape[0], np.float32), np.ones(R, np.float32),
                                        np.ones((R, W.shape[1]), np.float32), np.ones((W.shape[0], R), np.float32),
                                        copy=c),
        "AdaLoRA": lambda W, c: adalora.merge(W, np.ones((R, W.shape[1]), np.float32), np.ones((R, 1), np.float32),
                                              np.ones((W.shape[0], R), np.float32), scaling=S, ranknum=R, copy=c),
        "DeLoRA": lambda W, c: delora.merge(W, np.ones((R, W.shape[1]), np.float32),
                                            np.ones((W.shape[0], R), np.float32), np.ones(1, np.float32),
                                            np.ones(W.shape[1], np.float32), copy=c),
        "MiSS": lambda W, c: miss.merge(W, np.ones((R, W.shape[0]), np.float32), copy=c),
        "FourierFT": lambda W, c: fmod.merge(W, copy=c).weight,
        "RoAd": lambda W, c: road.merge(W, np.ones(W.shape[0] // 2, np.float32), np.ones(W.shape[0] // 2, np.float32),
                                        group_size=8, copy=c)[0],
        "HiRA": lambda W, c: hira.merge(W, np.ones((R, W.shape[1]), np.float32), np.ones((W.shape[0], R), np.float32),
                                        copy=c),
    }[method.name]
    own = 0  # what building ΔW itself takes (FourierFT: the inverse transform's arrays), 0 for the others
    if method.name == "FourierFT":
        fmod.delta_weight()  # the cached index maps, once
        own = traced_peak(fmod.delta_weight)[1]
    for layout in (W, np.asfortranarray(W), _np_readonly(W)):
        out, peak = traced_peak(lambda: big(layout, True))
        assert out.nbytes == W.nbytes and peak <= own + 1.1 * W.nbytes - (W.nbytes if own else 0), \
            f"{method}: peak {peak / W.nbytes:.2f} x W"


@pytest.mark.parametrize("name", ["LoRA", "DoRA", "IA3"])
def test_half_precision_copy_true_allocates_the_result_and_float32_tiles(name, monkeypatch):
    """bfloat16 W: the result plus the kernel's float32 row tile, never a float32 copy of W."""
    from peftmath.backends import NumpyBackend

    from peftmath.methods import _base

    monkeypatch.setattr(NumpyBackend, "tile_bytes", 16 << 10)
    monkeypatch.setattr(_base, "ROW_TILE_BYTES", 16 << 10)
    method = next(m for m in METHODS if m.name == name)
    W = np.tile(_weight(np.random.default_rng(12)), (8, 8)).astype(BF16)  # 384 x 320 bfloat16
    if name == "IA3":
        fn = lambda: ia3.merge(W, np.ones((W.shape[0], 1), np.float32))[0]  # noqa: E731
    elif name == "LoRA":
        fn = lambda: lora.merge(W, np.ones((R, W.shape[1]), np.float32), np.ones((W.shape[0], R), np.float32),  # noqa: E731
                                scaling=S)
    else:
        fn = lambda: dora.merge(W, np.ones((R, W.shape[1]), np.float32), np.ones((W.shape[0], R), np.float32),  # noqa: E731
                                np.ones(W.shape[0], np.float32), scaling=S).weight
    out, peak = traced_peak(fn)
    assert out.dtype == BF16 and peak <= 1.1 * W.nbytes + 3 * (16 << 10), f"{method}: peak {peak / W.nbytes:.2f} x W"


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_safe_refuses_a_non_finite_result_writing_nothing(method, copy):
    """safe=True on a W holding one inf: NonFiniteError and every entry of W as before (copy=False runs the
    kernel on the private copy and stores it only after the check, so the finite entries are not merged)."""
    W = _weight(np.random.default_rng(13))
    W[3, 5] = np.inf
    before = _bits(W)
    with np.errstate(invalid="ignore", over="ignore"), pytest.raises(NonFiniteError, match="unchanged"):
        method.merge(W, copy, safe=True)
    assert _bits(W) == before


def test_safe_true_with_a_non_finite_factor_leaves_w_untouched():
    """LoRA and DoRA with an inf in A: NonFiniteError, W bit for bit as before, for copy=True and False."""
    rng = np.random.default_rng(14)
    W = _weight(rng)
    A = rng.standard_normal((R, IN)).astype(np.float32)
    B = rng.standard_normal((OUT, R)).astype(np.float32)
    A[1, 2] = np.inf
    mag = np.ones(OUT, np.float32)
    before = _bits(W)
    for copy in (True, False):
        with np.errstate(invalid="ignore", over="ignore"):
            with pytest.raises(NonFiniteError, match="unchanged"):
                lora.merge(W, A, B, scaling=S, copy=copy, safe=True)
            with pytest.raises(NonFiniteError, match="unchanged"):
                dora.merge(W, A, B, mag, scaling=S, copy=copy, safe=True)
        assert _bits(W) == before
    with np.errstate(invalid="ignore", over="ignore"):
        assert not np.all(np.isfinite(lora.merge(W, A, B, scaling=S)))  # without safe: merged as given


def test_torch_weight_that_requires_grad_keeps_its_graph():
    """A leaf that requires grad (autograd on): copy=True computes out of place, so the result carries the
    graph (no kernel on a copy), with the same numbers."""
    rng = np.random.default_rng(15)
    W32 = _weight(rng)
    A = rng.standard_normal((R, IN)).astype(np.float32)
    B = rng.standard_normal((OUT, R)).astype(np.float32)
    W = torch.from_numpy(W32.copy()).requires_grad_(True)
    got = lora.merge(W, torch.from_numpy(A), torch.from_numpy(B), scaling=S)
    assert got.requires_grad and got.grad_fn is not None
    want = W32.astype(np.float64) + S * B.astype(np.float64) @ A.astype(np.float64)
    assert np.max(np.abs(_f64(got) - want)) <= 64 * EPS["float32"] * np.max(np.abs(want))


def test_jax_keeps_the_out_of_place_path():
    """JAX arrays are immutable: copy=True computes out of place and gives the same numbers."""
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(16)
    W32 = _weight(rng)
    A = rng.standard_normal((R, IN)).astype(np.float32)
    B = rng.standard_normal((OUT, R)).astype(np.float32)
    mag = np.abs(rng.standard_normal(OUT)).astype(np.float32) + 1
    got = lora.merge(jnp.asarray(W32), jnp.asarray(A), jnp.asarray(B), scaling=S)
    d = dora.merge(jnp.asarray(W32), jnp.asarray(A), jnp.asarray(B), jnp.asarray(mag), scaling=S)
    V = W32.astype(np.float64) + S * B.astype(np.float64) @ A.astype(np.float64)
    tol = 64 * EPS["float32"] * np.max(np.abs(V))
    assert np.max(np.abs(np.asarray(got, dtype=np.float64) - V)) <= tol
    dref = (mag / np.linalg.norm(V, axis=1))[:, None] * V
    assert np.max(np.abs(np.asarray(d.weight, dtype=np.float64) - dref)) <= tol * math.sqrt(IN)
