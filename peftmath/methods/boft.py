r"""BOFT: butterfly orthogonal fine-tuning (Liu et al., 2024), as PEFT implements it.

The input side of a frozen weight is rotated by a product of ``m`` sparse orthogonal factors, and each
output is rescaled::

    M   = B_{m−1} ⋯ B_1 B_0,      B_i = P_i D_i P_iᵀ,      D_i = diag(R_{i,1}, …, R_{i,N_b})
    y   = ((x M) Wᵀ) ⊙ s + bias                   (Linear; Conv2d on the (out, in·kH·kW) view)
    W'  = diag(s) · W Mᵀ                          (merge)
    W   = diag(1/s) · W' M                        (unmerge: Mᵀ = M⁻¹ for the Cayley rotation)

* ``R_{i,j} = (I − S)(I + S)⁻¹`` with ``S = (Q − Qᵀ)/2`` from the full ``b × b`` block ``Q`` of
  ``boft_R`` ``(m, N_b, b, b)`` (the exact Cayley map, so every factor is orthogonal);
* ``P_i`` is PEFT's ``block_butterfly_perm`` for level ``i`` (``P[k, perm[k]] = 1``); ``P_0 = I``;
* ``s`` is ``boft_s``: ``(out, 1)`` for Linear, ``(1, out)`` for Conv2d. The bias is not scaled.

``n`` (the rotated dimension) is ``in_features`` or ``in·kH·kW``. Nothing builds an ``n × n``
matrix: a permutation is a gather (``take`` along the last axis) and ``D_i`` is one batched matmul
on the ``(…, N_b, b)`` view. ``m = boft_n_butterfly_factor > 1`` works on every backend (PEFT on a
machine without its CUDA extension silently uses ``m = 1``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import array_api_compat
import numpy as np

from .._array import as_compute, compute_dtype, conv, is_low_precision, namespace
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_choice, check_flags, check_fraction, check_nonnegative_int
from ..errors import ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import MergeResult, ModuleAdapter, check_shape, write_weight
from .oft import (
    GENERIC_TILE_ELEMENTS, _dense_copy, apply_blocks, fresh_result, rotate_rows, run_row_tiles, split_stack, tile_rows,
    tile_threads,
)

Array = Any

__all__ = [
    "BOFTConfig",
    "butterfly_layout",
    "butterfly_perm",
    "cayley",
    "apply_rotation",
    "forward",
    "merge",
    "unmerge",
    "init_weights",
    "BOFTModule",
]

PEFT_TYPE = "BOFT"


# --------------------------------------------------------------------------------------------------
# Config (specs/boft.md, "Sizes and validation (`boft_block_size`, `boft_block_num`, `boft_n_butterfly_factor`)")
# --------------------------------------------------------------------------------------------------
@dataclass
class BOFTConfig(TunerConfig):
    """PEFT's ``BOFTConfig`` (``peft_type: "BOFT"``), PEFT's field names and defaults.

    Exactly one of ``boft_block_size`` and ``boft_block_num`` must be non-zero;
    ``boft_n_butterfly_factor`` (``m``) is a positive integer.
    """

    peft_type: ClassVar[str] = "BOFT"

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        for name in ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor"):
            check_nonnegative_int(source, name, getattr(self, name))
        if (self.boft_block_size != 0) == (self.boft_block_num != 0):
            raise ConfigError(
                f"{source}: set exactly one of boft_block_size ({self.boft_block_size}) and boft_block_num "
                f"({self.boft_block_num}) to a non-zero value (PEFT refuses this too)"
            )
        if self.boft_n_butterfly_factor < 1:
            raise ConfigError(f"{source}: boft_n_butterfly_factor must be a positive integer, got "
                              f"{self.boft_n_butterfly_factor} (PEFT refuses it when its CUDA extension is present)")
        check_fraction(source, "boft_dropout", self.boft_dropout)
        check_choice(source, "bias", self.bias, ("none", "all", "boft_only"))
        check_flags(source, self, "init_weights", "fan_in_fan_out")


# --------------------------------------------------------------------------------------------------
# Sizes (specs/boft.md, "Notation and shapes",
#        "Sizes and validation (`boft_block_size`, `boft_block_num`, `boft_n_butterfly_factor`)")
# --------------------------------------------------------------------------------------------------
def rotated_dim(layer: Layer) -> int:
    """``n``: in_features (Linear) or in·kH·kW (Conv2d, non-square kernels included)."""
    if layer.kind is LayerKind.LINEAR:
        return layer.weight_shape[1]
    if layer.kind is LayerKind.CONV2D:
        if layer.groups != 1:
            raise UnsupportedError(f"BOFT on a Conv2d with groups={layer.groups} is not defined "
                                   f"(PEFT raises NotImplementedError too); use groups=1")
        return layer.matrix_shape[1]
    raise UnsupportedError(f"BOFT supports Linear and Conv2d layers, not {layer.kind.value} (as PEFT)")


def butterfly_layout(n: int, *, boft_block_size: int = 0, boft_block_num: int = 0, boft_n_butterfly_factor: int = 1,
                     where: str = "boft") -> tuple[int, int, int]:
    """``(m, N_b, b)`` for rotated dimension ``n``, with PEFT's validation (ConfigError).

    >>> butterfly_layout(16, boft_block_size=4, boft_n_butterfly_factor=2)
    (2, 4, 4)
    >>> butterfly_layout(12, boft_block_num=3)
    (1, 3, 4)
    """
    m1 = boft_n_butterfly_factor - 1  # PEFT's internal count of extra levels
    if m1 < 0:
        raise ConfigError(f"{where}: boft_n_butterfly_factor must be a positive integer, got {boft_n_butterfly_factor}")
    if (boft_block_size != 0) == (boft_block_num != 0):
        raise ConfigError(f"{where}: give exactly one of boft_block_size ({boft_block_size}) and boft_block_num "
                          f"({boft_block_num})")
    m = boft_n_butterfly_factor
    if boft_block_num:
        nb = boft_block_num
        if n % nb:
            raise ConfigError(f"{where}: the rotated dimension {n} is not divisible by boft_block_num {nb}")
        if m1 and (m1 > int(math.log2(nb)) or nb % (2 ** m1)):
            raise ConfigError(f"{where}: boft_n_butterfly_factor {m} needs boft_block_num ({nb}) to be a multiple of "
                              f"2^{m1} (PEFT refuses this combination)")
        b = n // nb
    else:
        b = boft_block_size
        if n % b:
            raise ConfigError(f"{where}: the rotated dimension {n} is not divisible by boft_block_size {b}")
        if m1 and n % (b * 2 ** m1):
            raise ConfigError(f"{where}: boft_n_butterfly_factor {m} with boft_block_size {b} needs the rotated "
                              f"dimension ({n}) to be a multiple of {b * 2 ** m1} (PEFT refuses this combination)")
        nb = n // b
    if m1 and (nb % 2 or b % 2):
        raise ConfigError(f"{where}: with boft_n_butterfly_factor {m} both boft_block_num ({nb}) and boft_block_size "
                          f"({b}) must be even (PEFT refuses this combination)")
    return m, nb, b


# --------------------------------------------------------------------------------------------------
# Rotation and butterfly permutations (specs/boft.md, "The rotation")
# --------------------------------------------------------------------------------------------------
def cayley(Q: Array, *, dtype: Any = None) -> Array:
    """``R = (I − S)(I + S)⁻¹``, ``S = (Q − Qᵀ)/2``, for blocks ``Q`` ``(..., b, b)``; float32 or float64.

    >>> import numpy as np
    >>> R = cayley(np.array([[[0.0, 1.0], [-1.0, 0.0]]]))
    >>> R[0]
    array([[ 0., -1.],
           [ 1.,  0.]])
    """
    xp = namespace(Q, where="boft.cayley")
    cd = dtype or compute_dtype(xp, Q.dtype)
    Qc = as_compute(xp, Q, cd)
    S = 0.5 * (Qc - xp.matrix_transpose(Qc))
    eye = xp.eye(Q.shape[-1], dtype=cd, device=array_api_compat.device(Q))
    solve = backend_for(xp).solve  # batched (dask: per chunk; NumPy: the stack split over threads)
    return split_stack(lambda a, c: solve(a, c, where="boft.cayley"), eye + S, eye - S)


def butterfly_perm(n: int, nb: int, rr: int, levels: int) -> list[int]:
    """PEFT's ``block_butterfly_perm(n, nb, rr, levels)`` as a list: ``perm`` with ``P[k, perm[k]] = 1``.

    Inside each consecutive group of ``n / nb`` indices, chunks of ``rr`` are reordered even chunks
    first, then odd ones. ``levels = 0`` is the identity.

    >>> butterfly_perm(16, 2, 2, 1)
    [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    """
    if levels == 0:
        return list(range(n))
    if nb * rr * 2 > n:
        raise ConfigError(f"boft: invalid butterfly level ({nb} blocks of {2 * rr} in {n})")
    size = n // nb
    chunks = size // rr
    order = [c for c in range(0, chunks, 2)] + [c for c in range(1, chunks, 2)]
    within = [c * rr + k for c in order for k in range(rr)]
    return [g + j for g in range(0, n, size) for j in within]


def level_perms(n: int, m: int, nb: int, b: int) -> list[list[int] | None]:
    """``perm_i`` for every level ``i < m`` (``None`` where it is the identity)."""
    out: list[list[int] | None] = []
    for i in range(m):
        p = butterfly_perm(n, int(nb / 2 ** i), int(b / 2), m - 1)
        out.append(None if p == list(range(n)) else p)
    return out


def _gather(X: Array, perm: list[int], xp: Any) -> Array:
    """``X[..., perm]``, taken as rows of ``Xᵀ``: whole rows are copied when ``X`` is column-major,
    the layout :func:`~peftmath.methods.oft.apply_blocks` returns."""
    idx = xp.asarray(perm, dtype=xp.int64, device=array_api_compat.device(X))
    if X.ndim == 1:
        return xp.take(X, idx, axis=0)
    flat = xp.reshape(X, (-1, X.shape[-1]))
    out = xp.matrix_transpose(xp.take(xp.matrix_transpose(flat), idx, axis=0))
    return xp.reshape(out, X.shape)


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for k, p in enumerate(perm):
        inv[p] = k
    return inv


def apply_rotation(X: Array, blocks: Array, perms: list[list[int] | None] | None = None, *,
                   transpose: bool = False) -> Array:
    """``X M`` (or ``X Mᵀ`` with ``transpose=True``) for ``X`` ``(..., n)``, without forming ``M``.

    ``blocks`` are the Cayley blocks ``(m, N_b, b, b)``; ``perms`` the level permutations from
    :func:`level_perms` (default: computed). ``X B_i = ((X P_i) D_i) P_iᵀ``: a gather by the inverse
    permutation, a block-batched matmul, a gather by the permutation.
    """
    xp = namespace(X, blocks, where="boft.apply_rotation")
    m, nb, b = blocks.shape[0], blocks.shape[1], blocks.shape[2]
    n = X.shape[-1]
    if nb * b != n:
        raise ShapeError(f"boft: {nb} blocks of size {b} do not cover the rotated dimension {n}")
    if perms is None:
        perms = level_perms(n, m, nb, b)
    levels = range(m) if transpose else range(m - 1, -1, -1)  # X Mᵀ = X B_0ᵀ ⋯ B_{m−1}ᵀ; X M = X B_{m−1} ⋯ B_0
    for i in levels:
        p = perms[i]
        if p is not None:
            X = _gather(X, _inverse(p), xp)
        X = apply_blocks(X, blocks[i, ...], transpose=transpose)
        if p is not None:
            X = _gather(X, p, xp)
    return X


def dense_rotation(blocks: Array) -> Array:
    """The dense ``n × n`` matrix ``M`` (for tests and teaching; merges never build it)."""
    xp = namespace(blocks)
    n = blocks.shape[1] * blocks.shape[2]
    eye = xp.eye(n, dtype=blocks.dtype, device=array_api_compat.device(blocks))
    return apply_rotation(eye, blocks)


def composed_size(m: int, b: int) -> int:
    """``b·2^(m−1)``: the size of the diagonal blocks of ``M = B_{m−1}⋯B_0``.

    Level ``i``'s permutation keeps every index inside its group of ``b·2^i`` consecutive indices and
    ``D_i``'s blocks tile those groups, so ``B_i`` is block diagonal with blocks of ``b·2^i`` and the
    product with blocks of ``b·2^(m−1)`` (the largest group).

    >>> composed_size(1, 32), composed_size(3, 8)
    (32, 32)
    """
    return b * 2 ** (m - 1)


#: elements of the float64 work array of :func:`composed_blocks` per step (groups are composed in chunks)
COMPOSE_ELEMENTS = 1 << 16


def composed_blocks(blocks: Array) -> Array:
    """The diagonal blocks ``(n/B, B, B)`` of ``M = B_{m−1}⋯B_0``, ``B = b·2^(m−1)`` (:func:`composed_size`).

    Read off products: for a run of groups covering ``n_c`` indices, ``E = [I_B I_B ⋯ I_B]`` ``(B, n_c)``
    has ``(E M_c)[k, g·B + j] = M[g·B + k, g·B + j]`` because ``M`` is block diagonal, and a run of groups
    is a butterfly of its own (the level permutations of dimension ``n_c`` are those of ``n`` restricted
    to it). The factors are multiplied in float64, :data:`COMPOSE_ELEMENTS` work elements at a time, and
    the blocks rounded once to ``blocks``' dtype (``m = 1``: ``blocks[0]`` itself).

    >>> import numpy as np
    >>> R = cayley(np.random.default_rng(0).normal(size=(2, 4, 2, 2)))
    >>> C = composed_blocks(R)
    >>> M = dense_rotation(R)
    >>> C.shape, bool(np.allclose(M[4:8, 4:8], C[1])), bool(np.allclose(M[:4, 4:], 0.0))
    ((2, 4, 4), True, True)
    """
    xp = namespace(blocks)
    m, nb, b = int(blocks.shape[0]), int(blocks.shape[1]), int(blocks.shape[2])
    if m == 1:
        return blocks[0, ...]
    size = composed_size(m, b)
    per = size // b  # factor blocks per group and level
    groups = nb // per
    step = max(1, COMPOSE_ELEMENTS // (size * size))  # groups per chunk
    dev = array_api_compat.device(blocks)
    eye = xp.eye(size, dtype=xp.float64, device=dev)
    perms: dict[int, list] = {}  # per chunk width n_c: the butterfly of n_c indices (computed once)

    def chunk(g0: int, g1: int) -> Array:
        sub = xp.astype(blocks[:, g0 * per:g1 * per, ...], xp.float64)
        E = xp.concat([eye] * (g1 - g0), axis=1)
        EM = apply_rotation(E, sub, perms[(g1 - g0) * size])  # (B, n_c)
        C = xp.permute_dims(xp.reshape(EM, (size, g1 - g0, size)), (1, 0, 2))
        return xp.astype(C, blocks.dtype)

    runs = [(g0, min(groups, g0 + step)) for g0 in range(0, groups, step)]
    for g0, g1 in runs:
        if (g1 - g0) * size not in perms:
            perms[(g1 - g0) * size] = level_perms((g1 - g0) * size, m, (g1 - g0) * per, b)
    threads = min(tile_threads(), len(runs)) if isinstance(blocks, np.ndarray) else 1
    if threads > 1:  # NumPy: the chunks on threads (their products and gathers release the GIL)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(lambda run: chunk(*run), runs))
    else:
        parts = [chunk(g0, g1) for g0, g1 in runs]
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def _composes(m: int, b: int) -> bool:
    """Whether merging applies :func:`composed_blocks` (one product with blocks of ``b·2^(m−1)``) rather
    than the ``m`` levels one after the other: when that costs at most the flops of ``m + 1`` levels
    (``m ≤ 3``) or the composed blocks are at most 128 wide."""
    return 2 ** (m - 1) <= m + 1 or composed_size(m, b) <= 128


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/boft.md, "Initialisation (`init_weights`)")
# --------------------------------------------------------------------------------------------------
def init_weights(
    layer: Layer,
    m: int,
    nb: int,
    b: int,
    *,
    init_weights: bool = True,
    seed: int | np.random.Generator | None = 0,
    xp: Any = None,
    device: Any = None,
    dtype: Any = None,
) -> tuple[Array, Array]:
    """``(boft_R, boft_s)``: ``True`` gives ``R = 0`` (identity rotation), ``s = 1``; ``False`` gives
    ``R ~ N(0, 0.1²)``, ``s ~ N(1, 0.1²)`` (drawn on the host, moved to ``xp``)."""
    if not isinstance(init_weights, bool):
        raise ConfigError(f"BOFT init_weights must be true or false, got {init_weights!r}")
    if xp is None:
        import array_api_compat.numpy as xp
    out = layer.out_features
    s_shape = (out, 1) if layer.kind is LayerKind.LINEAR else (1, out)
    if init_weights:
        R, s = np.zeros((m, nb, b, b)), np.ones(s_shape)
    else:
        rng = host_rng(seed)
        R, s = rng.normal(0.0, 0.1, (m, nb, b, b)), rng.normal(1.0, 0.1, s_shape)
    backend = backend_for(xp)
    target = dtype if dtype is not None else xp.float32

    def put(a: np.ndarray) -> Array:
        arr = backend.from_host(np.ascontiguousarray(a, dtype=np.float32), xp, device)
        return arr if arr.dtype == target else xp.astype(arr, target)

    return put(R), put(s)


# --------------------------------------------------------------------------------------------------
# Forward, merge, unmerge (specs/boft.md, "Forward, merge, unmerge")
# --------------------------------------------------------------------------------------------------
def _scale_vector(scale: Array, lay: Layer, where: str) -> Array:
    xp = namespace(scale)
    out = lay.out_features
    expected = (out, 1) if lay.kind is LayerKind.LINEAR else (1, out)
    check_shape(where, "boft_s", scale, expected)
    return xp.reshape(scale, (out,))


def _check(lay: Layer, blocks: Array, where: str) -> None:
    n = rotated_dim(lay)
    if blocks.ndim != 4 or blocks.shape[-1] != blocks.shape[-2] or blocks.shape[1] * blocks.shape[2] != n:
        raise ShapeError(f"{where}: boft_R of shape {tuple(blocks.shape)} does not fit the rotated dimension {n} of a "
                         f"{lay.kind.value} {lay.weight_shape} (expected (m, N_b, b, b) with N_b·b = {n})")


def forward(
    x: Array,
    weight: Array,
    boft_R: Array,
    boft_s: Array,
    *,
    bias: Array | None = None,
    layer: Layer | LayerKind | str | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int | None = None,
    peft_compat: bool = False,
) -> Array:
    """The unmerged BOFT layer: ``((x M) Wᵀ) ⊙ s + bias`` (Conv2d: ``conv(x, diag(s) W_flat Mᵀ) + bias``).

    Computed in float32 (float64 for float64) and rounded once to x's dtype. PEFT's Conv2d forward
    ignores the base dilation (and uses only the first stride / padding entry); peftmath uses the
    base layer's geometry, ``peft_compat=True`` reproduces PEFT's choice. For Linear,
    ``peft_compat=True`` rounds ``M`` and ``x M`` to x's dtype as PEFT does.

    ``stride``, ``padding``, ``dilation``, ``groups``: the base conv's, described once in
    :mod:`peftmath.layers` ("Conv keywords"); a grouped conv (``groups > 1``, inferred from ``x``) is
    refused with :class:`~peftmath.errors.UnsupportedError`.
    """
    xp = namespace(x, weight, boft_R, boft_s, bias, where="boft.forward")
    lay, _ = Layer.for_weight(layer, weight).for_input(x, "boft.forward", groups=groups, stride=stride,
                                                        padding=padding, dilation=dilation)
    _check(lay, boft_R, "boft.forward")
    s = _scale_vector(boft_s, lay, "boft.forward")
    cd = compute_dtype(xp, x.dtype, weight.dtype, boft_R.dtype, boft_s.dtype)
    R = cayley(boft_R, dtype=cd)
    sc = as_compute(xp, s, cd)
    bc = None if bias is None else as_compute(xp, bias, cd)
    if lay.kind is LayerKind.CONV2D:
        Wm = as_compute(xp, xp.reshape(weight, lay.matrix_shape), cd)
        Wr = xp.reshape(apply_rotation(Wm, R, transpose=True) * sc[:, None], lay.weight_shape)
        if peft_compat:
            stride = stride if isinstance(stride, int) else tuple(stride)[0]
            padding = padding if isinstance(padding, (int, str)) else tuple(padding)[0]
            dilation = 1
        return as_compute(xp, conv(as_compute(xp, x, cd), Wr, bc, stride=stride, padding=padding, dilation=dilation,
                                   xp=xp), x.dtype)
    if peft_compat and is_low_precision(x.dtype):
        Mx = as_compute(xp, xp.astype(dense_rotation(R), x.dtype), cd)
        xr = as_compute(xp, xp.astype(xp.matmul(as_compute(xp, x, cd), Mx), x.dtype), cd)
    else:
        xr = apply_rotation(as_compute(xp, x, cd), R)
    y = xp.matmul(xr, xp.matrix_transpose(as_compute(xp, weight, cd))) * sc
    if bc is not None:
        y = y + bc
    return as_compute(xp, y, x.dtype)


def merge(
    weight: Array,
    boft_R: Array,
    boft_s: Array,
    *,
    layer: Layer | LayerKind | str | None = None,
    copy: bool = True,
    safe: bool = False,
) -> Array:
    """``diag(s) · W Mᵀ`` on the ``(out, n)`` view, in float32 (float64 for float64), rounded once.

    >>> import numpy as np
    >>> W = np.arange(8.0).reshape(2, 4)
    >>> merge(W, np.zeros((1, 2, 2, 2)), np.array([[1.0], [-2.0]]))     # R = I: only the scale
    array([[  0.,   1.,   2.,   3.],
           [ -8., -10., -12., -14.]])
    """
    return _merge(weight, boft_R, boft_s, layer=layer, copy=copy, safe=safe, where="boft.merge")


def _merge(weight: Array, boft_R: Array, boft_s: Array, *, layer: Any, copy: bool, safe: bool, where: str) -> Array:
    xp = namespace(weight, boft_R, boft_s, where=where)
    lay = Layer.for_weight(layer, weight)
    _check(lay, boft_R, where)
    s = _scale_vector(boft_s, lay, where)
    cd = compute_dtype(xp, weight.dtype, boft_R.dtype, boft_s.dtype)

    def compute() -> Array:
        Wm = as_compute(xp, xp.reshape(weight, lay.matrix_shape), cd)
        new = apply_rotation(Wm, cayley(boft_R, dtype=cd), transpose=True)
        new *= as_compute(xp, s, cd)[:, None]  # in place on the fresh product (saves a weight-sized temporary)
        return xp.reshape(new, lay.weight_shape)

    return _write_rotated(where, weight, lambda: cayley(boft_R, dtype=cd), as_compute(xp, s, cd), compute,
                          params=(boft_R, boft_s), transpose=True, divide=False, copy=copy, safe=safe, cd=cd, xp=xp)


def _write_rotated(where: str, weight: Array, rotation: Callable[[], Array], scale: Array, compute: Callable[[], Array],
                   *, params: tuple, transpose: bool, divide: bool, copy: bool, safe: bool, cd: Any, xp: Any) -> Array:
    """Write ``diag(s) · W Mᵀ`` (``transpose``) or ``diag(1/s) · W M`` through the one write path:
    row tiles of the stored weight (:func:`peftmath.methods.oft.rotate_rows`) in place and into the
    ``copy=True`` result (:func:`~peftmath.methods.oft.fresh_result`); ``compute`` (the whole product)
    where :func:`~peftmath.methods.oft.fresh_result` says so (JAX, dask, torch recording gradients of
    ``params``, a 2-D weight of another library already in ``cd``)."""
    def rows(src: Array, dst: Array) -> bool:
        R = rotation()
        m, b = int(R.shape[0]), int(R.shape[-1])
        if _composes(m, b):
            C = composed_blocks(R)
            F = _dense_copy(xp, xp.matrix_transpose(C)) if transpose else C
            return rotate_rows(src, dst, F, cd=cd, scale=scale, divide=divide, xp=xp)
        return _levels_rows(src, dst, R, scale, transpose=transpose, divide=divide, cd=cd, xp=xp)

    def new() -> Array:
        out = fresh_result(weight, *params, cd=cd)
        if out is None:
            return compute()
        rows(weight, out)
        return out

    return write_weight(where, weight, new, kernel=lambda W: rows(W, W), copy=copy, safe=safe, kernel_on_copy=False,
                        xp=xp)


def _levels_rows(src: Array, dst: Array, R: Array, scale: Array, *, transpose: bool, divide: bool, cd: Any,
                 xp: Any) -> bool:
    """:func:`apply_rotation` level by level on row tiles of ``src`` into ``dst`` (may be ``src``), scaled
    per row; for ``m`` whose composed blocks would cost more than the levels (:func:`_composes`)."""
    rows = int(src.shape[0])
    n = math.prod(int(d) for d in src.shape[1:])
    perms = level_perms(n, int(R.shape[0]), int(R.shape[1]), int(R.shape[2]))

    def make_worker(run: int) -> Callable[[int, int], None]:
        def work(start: int, stop: int) -> None:
            X = as_compute(xp, xp.reshape(src[start:stop, ...], (stop - start, n)), cd)
            Y = apply_rotation(X, R, perms, transpose=transpose)
            Y = Y / scale[start:stop, None] if divide else Y * scale[start:stop, None]
            dst[start:stop, ...] = xp.reshape(as_compute(xp, Y, dst.dtype), tuple(dst[start:stop, ...].shape))
        return work

    numpy = isinstance(src, np.ndarray)
    step = tile_rows(n, np.dtype(cd).itemsize) if numpy else max(1, GENERIC_TILE_ELEMENTS // max(1, n))
    run_row_tiles(rows, step, make_worker, threads=tile_threads() if numpy else 1)
    return True


def unmerge(
    weight: Array,
    boft_R: Array,
    boft_s: Array,
    *,
    layer: Layer | LayerKind | str | None = None,
    copy: bool = True,
    peft_compat: bool = False,
) -> Array:
    """``diag(1/s) · W M``, the inverse of :func:`merge` (``M⁻¹ = Mᵀ`` for the Cayley rotation).

    A zero or non-finite entry of ``boft_s`` raises :class:`~peftmath.errors.NotInvertibleError`
    (PEFT silently produces infinities). peftmath divides by ``s``; ``peft_compat=True`` multiplies by
    ``1/s`` as PEFT does.
    """
    return _unmerge(weight, boft_R, boft_s, layer=layer, copy=copy, peft_compat=peft_compat, where="boft.unmerge")


def _unmerge(weight: Array, boft_R: Array, boft_s: Array, *, layer: Any, copy: bool, peft_compat: bool,
             where: str) -> Array:
    xp = namespace(weight, boft_R, boft_s, where=where)
    lay = Layer.for_weight(layer, weight)
    _check(lay, boft_R, where)
    s = _scale_vector(boft_s, lay, where)
    bad = xp.logical_or(s == 0, xp.logical_not(xp.isfinite(s)))
    if bool(xp.any(bad)):
        count = int(xp.sum(xp.astype(bad, xp.int64)))
        raise NotInvertibleError(
            f"{where}: boft_s has {count} zero or non-finite entr{'y' if count == 1 else 'ies'} (of "
            f"{lay.out_features}); the merged rows cannot be unscaled. The weight is unchanged"
        )
    cd = compute_dtype(xp, weight.dtype, boft_R.dtype, boft_s.dtype)
    sc = as_compute(xp, s, cd)

    def compute() -> Array:
        Wm = as_compute(xp, xp.reshape(weight, lay.matrix_shape), cd)
        rotated = apply_rotation(Wm, cayley(boft_R, dtype=cd))
        if peft_compat:
            rotated *= (1.0 / sc)[:, None]
        else:
            rotated /= sc[:, None]
        return xp.reshape(rotated, lay.weight_shape)

    # peftmath divides by s; peft_compat multiplies by 1/s (PEFT's rounding)
    return _write_rotated(where, weight, lambda: cayley(boft_R, dtype=cd), 1.0 / sc if peft_compat else sc, compute,
                          params=(boft_R, boft_s), transpose=False, divide=not peft_compat, copy=copy, safe=False,
                          cd=cd, xp=xp)


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
class BOFTModule(ModuleAdapter):
    """BOFT on one base module (Linear or Conv2d). Multiplicative: no ``ΔW``."""

    peft_type = "BOFT"
    additive = False
    supported_kinds = (LayerKind.LINEAR, LayerKind.CONV2D)

    @classmethod
    def infer_layer(cls, name: str, config: BOFTConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """Linear or Conv2d from the base weight's shape; without it, a Linear ``(out, N_b·b)`` from
        ``boft_s`` ``(out, 1)`` and ``boft_R`` (a Conv2d needs the weight shape)."""
        if kind is not None and LayerKind.parse(kind) not in cls.supported_kinds:
            raise UnsupportedError(f"{name}: BOFT does not support {LayerKind.parse(kind).value} layers "
                                   f"(PEFT: Linear, Conv2d)")
        for key in ("boft_R", "boft_s"):
            if key not in params:
                raise ShapeError(f"{name}: missing {key} (found {sorted(params)})")
        if weight_shape is not None:
            return Layer.of(tuple(weight_shape), kind if len(weight_shape) == 2 else None)
        R, s = params["boft_R"], params["boft_s"]
        if s.ndim == 2 and s.shape[1] == 1 and R.ndim == 4:
            return Layer(LayerKind.LINEAR, (int(s.shape[0]), int(R.shape[1] * R.shape[2])))
        raise ShapeError(f"{name}: a BOFT Conv2d needs the base weight shape to be bound")

    def validate(self) -> None:
        lay = self.layer
        if lay.kind not in self.supported_kinds:
            raise UnsupportedError(f"{self.name}: BOFT does not support {lay.kind.value} layers (PEFT: Linear, Conv2d)")
        for key in ("boft_R", "boft_s"):
            if key not in self.params:
                raise ShapeError(f"{self.name}: missing {key} for a {lay.kind.value} layer")
        extra = sorted(set(self.params) - {"boft_R", "boft_s"})
        if extra:
            raise ShapeError(f"{self.name}: unexpected BOFT tensors {extra}")
        self.R, self.s = self.params["boft_R"], self.params["boft_s"]
        c = self.config
        n = rotated_dim(lay)
        m_cfg = c.boft_n_butterfly_factor
        # PEFT without its CUDA extension stores m = 1 whatever the config says: accept both.
        m = 1 if (self.R.ndim == 4 and self.R.shape[0] == 1) else m_cfg
        m, nb, b = butterfly_layout(n, boft_block_size=c.boft_block_size, boft_block_num=c.boft_block_num,
                                    boft_n_butterfly_factor=m, where=self.name)
        check_shape(self.name, "boft_R", self.R, (m, nb, b, b))
        _scale_vector(self.s, lay, self.name)
        self.m, self.block_num, self.block_size = m, nb, b
        if m != m_cfg:
            warnings.warn(f"{self.name}: boft_R has 1 butterfly level but the config says boft_n_butterfly_factor="
                          f"{m_cfg} (PEFT without its CUDA extension saves such checkpoints); using 1", stacklevel=2)

    def rotation(self, *, dtype: Any = None) -> Array:
        """The Cayley blocks ``(m, N_b, b, b)`` in float32 (float64 for float64 parameters)."""
        return cayley(self.R, dtype=dtype)

    def rotation_factors(self) -> int:
        """``m``: the butterfly factors merging multiplies in sequence (``boft_R``'s first axis)."""
        return int(self.m)

    def output_scale_max(self) -> float:
        """``max |boft_s|``, the scale applied after the rotation."""
        return float(self.xp.max(self.xp.abs(self.s)))

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        raise UnsupportedError(
            f"{self.name}: BOFT is multiplicative (merge computes diag(s) W Mᵀ), so it has no delta weight; "
            f"use rotation() and boft_s, or merge()"
        )

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        self.layer.check_weight(weight)
        return MergeResult(_merge(weight, self.R, self.s, layer=self.layer, copy=copy, safe=safe, where=self.name), bias)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        self.layer.check_weight(weight)
        return MergeResult(_unmerge(weight, self.R, self.s, layer=self.layer, copy=copy, peft_compat=peft_compat,
                                    where=self.name), bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, *, peft_compat: bool = False,
                **layer_kwargs: Any) -> Array:
        layer, kw = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.R, self.s, bias=bias, layer=layer, peft_compat=peft_compat, **kw)

    @classmethod
    def initialize(cls, name: str, config: BOFTConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """Fresh ``boft_R`` / ``boft_s`` for module ``name`` (``init`` overrides ``config.init_weights``)."""
        if layer.kind not in cls.supported_kinds:
            raise UnsupportedError(f"{name}: BOFT does not support {layer.kind.value} layers")
        if xp is None and weight is not None:
            xp = namespace(weight)
        m, nb, b = butterfly_layout(rotated_dim(layer), boft_block_size=config.boft_block_size,
                                    boft_block_num=config.boft_block_num,
                                    boft_n_butterfly_factor=config.boft_n_butterfly_factor, where=name)
        R, s = init_weights(layer, m, nb, b, init_weights=config.init_weights if init is None else init, seed=seed,
                            xp=xp, device=device, dtype=dtype)
        return {"boft_R": R, "boft_s": s}, None


#: checkpoint suffixes of this method's per-module tensors (ParameterDict entries: no ".weight")
PARAMETER_SUFFIXES = ("boft_R", "boft_s")
Config = BOFTConfig
Module = BOFTModule
#: demo / documentation examples: row label -> config fields (non-trivial: random init)
EXAMPLES = {
    "BOFT": dict(boft_block_size=4, init_weights=False),
    "BOFT butterfly m=2": dict(boft_block_size=2, boft_n_butterfly_factor=2, init_weights=False),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=BOFTConfig, module=BOFTModule, spec="specs/boft.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=BOFTModule.supported_kinds, rotation=True,
    init_field="init_weights", examples=EXAMPLES,
)
