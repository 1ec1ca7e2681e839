"""Quantizer parity with bitsandbytes on the CPU (NF4 blocks of 64 without double quantization, int8 row-wise)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

from peftmath import quant  # noqa: E402


@pytest.mark.parametrize("shape", [(33, 65), (128, 64), (7, 3)])
def test_nf4_matches_bitsandbytes_bit_for_bit(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    expected = F.dequantize_4bit(q, state).numpy()
    ours = quant.quantize_nf4(w.numpy())
    np.testing.assert_array_equal(np.asarray(quant.dequantize_nf4(ours)), expected)
    np.testing.assert_array_equal(np.asarray(ours.absmax), state.absmax.numpy())


def test_int8_matches_bitsandbytes():
    torch.manual_seed(1)
    w = torch.randn(17, 40)
    q, scb, _ = F.int8_vectorwise_quant(w)
    ours = quant.quantize_int8(w.numpy())
    np.testing.assert_array_equal(np.asarray(ours.q), q.numpy())
    np.testing.assert_allclose(np.asarray(ours.scb), scb.numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(quant.dequantize_int8(ours)), F.int8_vectorwise_dequant(q, scb).numpy(),
                               rtol=1e-6, atol=1e-7)
