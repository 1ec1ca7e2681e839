r"""Reference quantizers for LoftQ: bitsandbytes' NF4 and int8, and PEFT's legacy NF2/NF4 normal map.

LoftQ (Li et al., 2023) initialises LoRA for a quantized base: it alternates quantization and a
truncated SVD so that ``W ≈ Q + B A`` with ``Q`` the dequantized quantized weight.

* **NF4** (bitsandbytes ``quant_type="nf4"``, ``compress_statistics=False``): the weight is flattened in C
  order and cut into blocks of 64 (the last block may be shorter); each block is divided by its absolute
  maximum (kept in float32, no double quantization) and every value is replaced by the nearest of the 16
  NF4 codes; dequantization is ``code · absmax``.
* **int8** (bitsandbytes ``Int8Params``, row-wise): ``SCB = max |row|``, ``q = round(127 · v / SCB)`` as int8,
  dequantized as ``q · SCB / 127`` (an all-zero row stays zero).
* **legacy NF-k** (PEFT ≤ 0.19's ``NFQuantizer``): codes from the normal quantiles
  ``create_normal_map(offset=0.9677083, k)``, blocks of exactly 64 (the size must divide), nearest code by
  ``argmin |v / max − code|``, and ``8 / k`` codes packed per uint8, code ``j`` of a byte shifted left by
  ``j · k`` bits. NF2 is ``[-1, 0, 0.3379152, 1]``.

Every quantizer is written against the array API (nearest code by ``searchsorted`` on the midpoints
between codes) and returns arrays of the input's library.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from ._array import as_compute, namespace
from .backends import backend_for
from .errors import ConfigError, ShapeError

Array = Any

__all__ = [
    "NF4_CODES",
    "create_normal_map",
    "quantize_nf4",
    "dequantize_nf4",
    "quantize_int8",
    "dequantize_int8",
    "quantize_nf_legacy",
    "dequantize_nf_legacy",
    "loftq_init",
    "LoftQResult",
]

#: bitsandbytes' NF4 code book (ascending)
NF4_CODES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0)


def create_normal_map(offset: float = 0.9677083, num_bits: int = 4) -> np.ndarray:
    """PEFT's legacy NF code book: normal quantiles, symmetric around an exact 0, scaled to ``[-1, 1]``.

    >>> np.round(create_normal_map(num_bits=2), 7).tolist()
    [-1.0, 0.0, 0.3379152, 1.0]
    """
    from scipy.stats import norm

    half = 2 ** (num_bits - 1)
    v1 = norm.ppf(np.linspace(offset, 0.5, half + 1)[:-1]).tolist()
    v3 = (-norm.ppf(np.linspace(offset, 0.5, half)[:-1])).tolist()
    values = np.sort(np.array(v1 + [0.0] + v3))
    return values / values.max()


def _nearest(xp: Any, values: Array, codes: Array) -> Array:
    """Index of the nearest code for every value (ties: the lower code), via the midpoints."""
    mid = (codes[1:] + codes[:-1]) / 2
    flat = xp.reshape(values, (-1,))
    idx = xp.searchsorted(mid, flat, side="left")
    return xp.reshape(idx, values.shape)


def _codes(xp: Any, values: Any, like: Array) -> Array:
    return backend_for(xp).from_host(np.asarray(values, dtype=np.float32), xp, array_api_compat.device(like))


class QuantNF4(NamedTuple):
    codes: Array      # uint8 code indices, flattened weight order, one per value
    absmax: Array     # float32, one per block
    shape: tuple[int, ...]
    blocksize: int


def quantize_nf4(weight: Array, *, blocksize: int = 64) -> QuantNF4:
    """bitsandbytes NF4 (blocks of ``blocksize`` in C order, absmax per block, nearest of 16 codes)."""
    xp = namespace(weight)
    flat = xp.reshape(as_compute(xp, weight, xp.float32), (-1,))
    n = flat.shape[0]
    nblocks = math.ceil(n / blocksize)
    pad = nblocks * blocksize - n
    if pad:
        flat = xp.concat([flat, xp.zeros((pad,), dtype=flat.dtype, device=array_api_compat.device(flat))])
    blocks = xp.reshape(flat, (nblocks, blocksize))
    absmax = xp.max(xp.abs(blocks), axis=1)
    safe = xp.where(absmax > 0, absmax, xp.ones_like(absmax))
    idx = _nearest(xp, blocks / safe[:, None], _codes(xp, NF4_CODES, weight))
    codes = xp.astype(xp.reshape(idx, (-1,))[:n], xp.uint8)
    return QuantNF4(codes, absmax, tuple(weight.shape), blocksize)


def dequantize_nf4(q: QuantNF4) -> Array:
    """``code · absmax`` per block, in float32, in the original shape."""
    xp = namespace(q.codes, q.absmax)
    n = q.codes.shape[0]
    values = xp.take(_codes(xp, NF4_CODES, q.codes), xp.astype(q.codes, xp.int64), axis=0)
    block = xp.arange(n, device=array_api_compat.device(q.codes)) // q.blocksize
    return xp.reshape(values * xp.take(q.absmax, block, axis=0), q.shape)


class QuantInt8(NamedTuple):
    q: Array          # int8, the weight's shape
    scb: Array        # float32, max |row|, one per row


def quantize_int8(weight: Array) -> QuantInt8:
    """Row-wise int8: ``q = round(127 · v / max|row|)`` (round half to even)."""
    xp = namespace(weight)
    w = as_compute(xp, weight, xp.float32)
    if w.ndim != 2:
        raise ShapeError(f"quantize_int8: a 2-D weight is quantized row-wise, got shape {tuple(w.shape)}")
    scb = xp.max(xp.abs(w), axis=1)
    safe = xp.where(scb > 0, scb, xp.ones_like(scb))
    return QuantInt8(xp.astype(xp.round(w * (127.0 / safe)[:, None]), xp.int8), scb)


def dequantize_int8(q: QuantInt8) -> Array:
    xp = namespace(q.q, q.scb)
    return xp.astype(q.q, xp.float32) * (q.scb / 127.0)[:, None]


class QuantNFLegacy(NamedTuple):
    packed: Array     # uint8, 8/k codes per byte
    maxima: Array     # float32, one per block of 64
    shape: tuple[int, ...]
    num_bits: int


def quantize_nf_legacy(weight: Array, *, num_bits: int = 4, blocksize: int = 64) -> QuantNFLegacy:
    """PEFT ≤ 0.19's NFQuantizer ("normal" method): blocks of ``blocksize``, per-block max, packed codes."""
    if num_bits not in (2, 4, 8):
        raise ConfigError(f"legacy NF quantization supports 2, 4 or 8 bits, got {num_bits}")
    xp = namespace(weight)
    flat = xp.reshape(as_compute(xp, weight, xp.float32), (-1,))
    n = flat.shape[0]
    if n % blocksize:
        raise ShapeError(f"legacy NF quantization needs a size divisible by {blocksize}, got {n} values "
                         f"(PEFT's NFQuantizer refuses it too)")
    blocks = xp.reshape(flat, (-1, blocksize))
    maxima = xp.max(xp.abs(blocks), axis=1)
    safe = xp.where(maxima > 0, maxima, xp.ones_like(maxima))
    idx = xp.reshape(_nearest(xp, blocks / safe[:, None], _codes(xp, create_normal_map(num_bits=num_bits), weight)),
                     (-1, 8 // num_bits))
    idx = xp.astype(idx, xp.int64)
    shifts = xp.asarray([j * num_bits for j in range(8 // num_bits)], dtype=xp.int64,
                        device=array_api_compat.device(idx))
    packed = xp.sum(xp.bitwise_left_shift(idx, shifts[None, :]), axis=1)
    return QuantNFLegacy(xp.astype(packed, xp.uint8), maxima, tuple(weight.shape), num_bits)


def dequantize_nf_legacy(q: QuantNFLegacy, *, blocksize: int = 64) -> Array:
    xp = namespace(q.packed, q.maxima)
    k = q.num_bits
    per = 8 // k
    shifts = xp.asarray([j * k for j in range(per)], dtype=xp.int64, device=array_api_compat.device(q.packed))
    idx = xp.bitwise_and(xp.bitwise_right_shift(xp.astype(q.packed, xp.int64)[:, None], shifts[None, :]), (1 << k) - 1)
    idx = xp.reshape(idx, (-1,))
    values = xp.take(_codes(xp, create_normal_map(num_bits=k), q.packed), idx, axis=0)
    values = xp.reshape(values, (-1, blocksize)) * q.maxima[:, None]
    return xp.reshape(values, q.shape)


class LoftQResult(NamedTuple):
    """``W ≈ dequantized + lora_B @ lora_A`` (LoRA factors without the LoRA scaling)."""

    quantized: Any        # the quantizer's representation (QuantNF4 or QuantInt8)
    dequantized: Array    # float32, W's shape
    lora_A: Array         # (r, in)
    lora_B: Array         # (out, r)


def loftq_init(weight: Array, *, num_bits: int = 4, reduced_rank: int, num_iter: int = 1) -> LoftQResult:
    """PEFT's ``loftq_init``: alternate quantization and a rank-``r`` SVD of the residual.

    ``res = W``; for ``i = 1..num_iter``: ``Q = deq(quant(res))``, ``res = W − Q``, ``U S Vᵀ = svd(res)``,
    ``B = U_r √S_r``, ``A = √S_r V_rᵀ``, and (before the last step) ``res = W − B A``. All in float32.

    PEFT uses these factors as ``lora_A`` / ``lora_B`` unchanged, so the layer computes
    ``Q x + s · B A x``: the initialisation only preserves the output when the LoRA scaling ``s`` is 1
    (e.g. ``lora_alpha = r``); PEFT does not compensate it (see specs/loftq.md).
    """
    if num_bits not in (4, 8):
        raise ConfigError(f"loftq_bits must be 4 or 8, got {num_bits}")
    if num_iter < 1:
        raise ConfigError(f"loftq_iter must be at least 1, got {num_iter}")
    xp = namespace(weight)
    if weight.ndim != 2:
        raise ShapeError(f"LoftQ applies to a 2-D Linear weight, got shape {tuple(weight.shape)} (PEFT: Linear only)")
    if reduced_rank < 1 or reduced_rank > min(weight.shape):
        raise ConfigError(f"LoftQ rank {reduced_rank} must be between 1 and min(out, in) = {min(weight.shape)}")
    W = as_compute(xp, weight, xp.float32)
    res = W
    for i in range(1, num_iter + 1):
        if num_bits == 4:
            quantized = quantize_nf4(res)
            Q = dequantize_nf4(quantized)
        else:
            quantized = quantize_int8(res)
            Q = dequantize_int8(quantized)
        res = W - Q
        U, S, Vh = xp.linalg.svd(res, full_matrices=False)
        root = xp.sqrt(S[:reduced_rank])
        B = U[:, :reduced_rank] * root[None, :]
        A = root[:, None] * Vh[:reduced_rank, :]
        if i < num_iter:
            res = W - xp.matmul(B, A)
    return LoftQResult(quantized, Q, A, B)
