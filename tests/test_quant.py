"""Quantizers (NF4, int8, legacy NF-k) and LoftQ: error bounds, layouts, and the LoftQ alternation."""

from __future__ import annotations

import numpy as np
import pytest
from tests.helpers import assert_same_namespace, to_np, to_xp
from hypothesis import given
from hypothesis import strategies as st

from peftmath import quant
from peftmath.errors import ConfigError, ShapeError


def _gap(codes) -> float:
    """Half the largest gap between neighbouring codes: the worst rounding of a value in [-1, 1]."""
    c = np.sort(np.asarray(codes))
    return float(np.max(np.diff(c))) / 2


@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 9), cols=st.integers(1, 70))
def test_nf4_error_is_bounded_by_half_the_largest_code_gap(xp, seed, rows, cols):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    q = quant.quantize_nf4(to_xp(xp, w))
    d = quant.dequantize_nf4(q)
    assert_same_namespace(xp, d)
    flat = w.reshape(-1)
    absmax = np.array([np.abs(flat[i:i + 64]).max() for i in range(0, flat.size, 64)])
    bound = _gap(quant.NF4_CODES) * np.repeat(absmax, 64)[: flat.size] * (1 + 1e-6)
    assert np.all(np.abs(to_np(d).reshape(-1) - flat) <= bound)
    np.testing.assert_allclose(to_np(q.absmax), absmax, rtol=0, atol=0)


def test_nf4_codes_are_exact_and_nearest():
    codes = np.array(quant.NF4_CODES, dtype=np.float32)
    w = np.concatenate([codes, -codes, codes * 0.5]).astype(np.float32)   # absmax 1 in each block
    w = np.concatenate([w, np.zeros(64 - w.size % 64, np.float32)])[:64]
    w[0] = 1.0
    q = quant.quantize_nf4(w)
    d = np.asarray(quant.dequantize_nf4(q))
    brute = codes[np.argmin(np.abs(w[:, None] - codes[None, :]), axis=1)]
    np.testing.assert_array_equal(d, brute)


def test_int8_formula(xp):
    w = np.random.default_rng(1).standard_normal((5, 33)).astype(np.float32)
    w[2] = 0.0
    q = quant.quantize_int8(to_xp(xp, w))
    scb = np.abs(w).max(1)
    expected = np.round(w * (127.0 / np.where(scb > 0, scb, 1))[:, None]).astype(np.int8)
    np.testing.assert_array_equal(to_np(q.q), expected)
    d = to_np(quant.dequantize_int8(q))
    assert np.all(np.abs(d - w) <= scb[:, None] / 254 * (1 + 1e-6)) and not d[2].any()


def test_legacy_normal_maps():
    nf4 = quant.create_normal_map(num_bits=4)
    np.testing.assert_allclose(nf4, quant.NF4_CODES, atol=2e-7)     # -0.6961930 vs -0.6961928: the offset
    np.testing.assert_allclose(quant.create_normal_map(num_bits=2), [-1, 0, 0.3379152, 1], atol=1e-7)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_legacy_quantizer_packs_and_round_trips(bits):
    w = np.random.default_rng(bits).standard_normal((8, 64)).astype(np.float32)
    q = quant.quantize_nf_legacy(w, num_bits=bits)
    assert q.packed.dtype == np.uint8 and q.packed.size == w.size * bits // 8
    codes = quant.create_normal_map(num_bits=bits)
    blocks = w.reshape(-1, 64)
    m = np.abs(blocks).max(1, keepdims=True)
    idx = np.argmin(np.abs((blocks / m)[..., None] - codes), axis=-1).reshape(-1, 8 // bits)
    packed = sum(idx[:, j].astype(np.int64) << (j * bits) for j in range(8 // bits)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(q.packed), packed)
    np.testing.assert_allclose(np.asarray(quant.dequantize_nf_legacy(q)), (codes[idx.reshape(-1, 64)] * m).reshape(w.shape),
                               rtol=1e-6)
    with pytest.raises(ShapeError, match="divisible by 64"):
        quant.quantize_nf_legacy(np.ones(65, np.float32), num_bits=bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_alternation(bits):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((48, 64)) + rng.standard_normal((48, 2)) @ rng.standard_normal((2, 64))).astype(np.float32)
    errors = []
    for it in (1, 2, 4):
        r = quant.loftq_init(w, num_bits=bits, reduced_rank=4, num_iter=it)
        assert r.lora_A.shape == (4, 64) and r.lora_B.shape == (48, 4)
        errors.append(float(np.linalg.norm(w - r.dequantized - r.lora_B @ r.lora_A)))
    first = quant.loftq_init(w, num_bits=bits, reduced_rank=4, num_iter=1)
    plain = float(np.linalg.norm(w - first.dequantized))
    assert errors[0] < plain            # the low-rank part removes part of the quantization error
    assert errors[2] <= errors[0] * (1 + 1e-6)
    with pytest.raises(ConfigError, match="loftq_bits"):
        quant.loftq_init(w, num_bits=3, reduced_rank=4)
    with pytest.raises(ConfigError, match="rank"):
        quant.loftq_init(w, reduced_rank=100)
