"""bfloat16 <-> float32 with integer operations (peftmath.io.bf16) against ml_dtypes' casts, bit for bit."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from peftmath.errors import ShapeError, UnsupportedError
from peftmath.io import bf16
from peftmath.io.bf16 import is_bf16, round_bf16, widen_bf16

BF16 = np.dtype(ml_dtypes.bfloat16)
ALL16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def _ref_round(x32: np.ndarray) -> np.ndarray:
    """ml_dtypes' float32 -> bfloat16, as uint16 bits."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(x32, dtype=np.float32).astype(BF16).view(np.uint16)


def test_widen_every_bfloat16_value():
    got = widen_bf16(ALL16.view(BF16))
    ref = ALL16.view(BF16).astype(np.float32)
    assert got.dtype == np.float32 and got.shape == (1 << 16,)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))  # NaN payloads and signed zeros too
    np.testing.assert_array_equal(widen_bf16(ALL16).view(np.uint32), ref.view(np.uint32))  # the uint16 bits


def test_round_every_bfloat16_value_and_its_neighbours():
    """For every bf16 value v: v itself, v + half an ulp (a tie), one bit either side of the tie, and the
    float32 just below v; signs, subnormals, the largest finite values, infinities and NaNs included."""
    hi = ALL16.astype(np.uint32) << 16
    lows = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    bits = (hi[:, None] | lows[None, :]).reshape(-1)
    x = bits.view(np.float32)
    np.testing.assert_array_equal(round_bf16(x), _ref_round(x))


def test_round_edges():
    edges = np.array([
        0x00000000, 0x80000000,  # +-0
        0x00000001, 0x80000001, 0x00007FFF, 0x00008000, 0x00018000, 0x007FFFFF, 0x00800000,  # subnormals
        0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001, 0x7F7EFFFF,  # largest finite, to inf
        0x7F800000, 0xFF800000,  # +-inf
        0x7F800001, 0xFF800001, 0x7FC00000, 0xFFC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FBFFFFF, 0x7F808000,  # NaNs
        0x3F800000, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,  # 1 and ties to even around it
    ], dtype=np.uint32)
    x = edges.view(np.float32)
    got = round_bf16(x)
    np.testing.assert_array_equal(got, _ref_round(x))
    back = widen_bf16(got)
    assert np.all(np.isnan(back) == np.isnan(x))  # NaN stays NaN (never becomes an infinity)
    assert np.all(np.signbit(back) == np.signbit(x))
    assert got[9] == 0x7F80 and got[15] == 0x7F80  # the largest finite float32 rounds up to +inf


def test_round_random_bit_patterns_across_chunks():
    """All of float32's bit patterns at random, in an array longer than one chunk and not a multiple of it."""
    rng = np.random.default_rng(20)
    bits = rng.integers(0, 1 << 32, size=2 * bf16.CHUNK + 12345, dtype=np.uint64).astype(np.uint32)
    bits[::97] |= 0x7F800000  # many infinities and NaNs, spread over the chunks
    x = bits.view(np.float32)
    np.testing.assert_array_equal(round_bf16(x), _ref_round(x))
    normal = rng.standard_normal(bf16.CHUNK + 3).astype(np.float32) * np.float32(1e3)
    np.testing.assert_array_equal(round_bf16(normal), _ref_round(normal))


@pytest.mark.parametrize("view", ["fortran", "strided", "transposed", "0-d", "empty"])
def test_layouts_and_shapes(view):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((40, 30)).astype(np.float32)
    x = {"fortran": np.asfortranarray(base), "strided": base[::3, 1::2], "transposed": base.T,
         "0-d": np.float32(2.5) * np.ones((), np.float32), "empty": base[:0]}[view]
    got = round_bf16(x)
    assert got.shape == x.shape and got.dtype == np.uint16
    np.testing.assert_array_equal(got, _ref_round(x))
    xb = x.astype(BF16)
    wide = widen_bf16(xb)
    assert wide.shape == x.shape
    np.testing.assert_array_equal(wide, xb.astype(np.float32))


def test_out_arguments_and_errors():
    x = np.linspace(-3, 3, 1001, dtype=np.float32).reshape(7, 143)
    out = np.empty((7, 143), dtype=BF16)
    assert round_bf16(x, out=out) is out
    np.testing.assert_array_equal(out.view(np.uint16), _ref_round(x))
    w = np.empty(x.shape, np.float32)
    assert widen_bf16(out, out=w) is w
    np.testing.assert_array_equal(w, out.astype(np.float32))
    with pytest.raises(UnsupportedError, match="float32"):
        round_bf16(x.astype(np.float64))
    with pytest.raises(ShapeError, match="1001 elements"):
        round_bf16(x, out=np.empty(10, np.uint16))
    with pytest.raises(ShapeError, match="1001 elements"):
        widen_bf16(out, out=np.empty((143, 7), np.float32).T)  # not C-contiguous
    assert is_bf16(BF16) and not is_bf16(np.dtype(np.float16)) and not is_bf16(np.dtype(np.uint16))


@pytest.mark.parametrize("where", ["first", "middle", "last", "none"])
def test_round_a_lone_nan_in_one_chunk(where):
    """NaNs are found per chunk (a max, which NaN propagates through): one NaN whose rounding would carry into
    an infinity (0x7F80_0001..0x7F80_7FFF) or wrap to -0 (0xFFFF_FFFF) in any one chunk, infinities and the
    largest finite values in the others, all as ml_dtypes rounds them."""
    rng = np.random.default_rng(7)
    n = 3 * bf16.CHUNK + 5
    x = rng.standard_normal(n).astype(np.float32)
    bits = x.view(np.uint32)
    bits[1::4096] = 0x7F800000  # +inf, and the largest finite float32 (rounds to +inf) in every chunk
    bits[2::4096] = 0xFF7FFFFF
    at = {"first": 10, "middle": bf16.CHUNK + 123, "last": n - 1, "none": None}[where]
    if at is not None:
        bits[at] = 0x7F800001
        bits[at - 3] = 0xFFFFFFFF
    got = round_bf16(x)
    np.testing.assert_array_equal(got, _ref_round(x))
    assert np.isnan(widen_bf16(got)).sum() == (0 if at is None else 2)


def test_widen_into_a_reused_buffer():
    """``out`` may hold anything (a buffer reused from a larger weight): every bit of it is rewritten."""
    rng = np.random.default_rng(8)
    src = rng.integers(0, 1 << 16, size=(33, 17), dtype=np.uint16)
    out = np.full((33, 17), np.nan, dtype=np.float32)
    out.view(np.uint32)[...] = 0xFFFFFFFF
    widen_bf16(src, out=out)
    np.testing.assert_array_equal(out.view(np.uint32), src.astype(np.uint32) << 16)
    np.testing.assert_array_equal(out.view(np.uint32), src.view(BF16).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("n", [1, 5, bf16.CHUNK - 1, bf16.CHUNK, 2 * bf16.CHUNK + 7])
def test_round_in_place_into_the_first_half(n):
    """``out`` = ``x``'s own memory from its start (what the streamed merge's writer does with a widened weight):
    the same bits as into a separate array, NaNs (in the first chunk too, where bits overwrite the floats being
    read) included."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32) * 1e3
    bits = x.view(np.uint32)
    bits[:: max(1, n // 7)] = 0x7F800001  # NaNs whose rounding would carry into an infinity
    bits[n // 2] = 0xFFFFFFFF
    want = _ref_round(x)
    got = round_bf16(x, out=x.view(np.uint16)[:n])
    assert np.shares_memory(got, x)
    np.testing.assert_array_equal(got, want)
