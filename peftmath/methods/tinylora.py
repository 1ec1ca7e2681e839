r"""TinyLoRA: a LoRA-XS core built from a tiny trained vector and fixed random projections
(Morris et al., "Learning to Reason in 13 Parameters", 2026).

Each adapted layer keeps the top-``r`` part of its base weight's SVD, frozen, with the singular values
split evenly between the two factors; a small ``r × r`` core between them is a fixed random combination
of the entries of a vector ``v`` of length ``u``, the only trained tensor, shared by every layer of a
weight-tying group::

    W = U S Vᵀ (out, in)         r' = min(r, out, in)
    A = √S[:r'] Vᵀ[:r']  (r', in)        B = U[:, :r'] √S[:r']  (out, r')      tinylora_A / tinylora_B, frozen
    P (u, r', r')                fixed, N(0, 1/r'), drawn from projection_seed + layer index       tinylora_P
    v (u,)                       trained, one per group                         base_model.tinylora_v.<group>
    R = Σ_i v_i P_i  (r', r')
    ΔW = B R A  (out, in)        y = x Wᵀ + b + ((d(x) Aᵀ) Rᵀ) Bᵀ

There is no scaling factor. A transformers ``Conv1D`` (``fan_in_fan_out``) stores ``W`` and ``ΔW``
transposed, ``(in, out)``; the SVD is of ``Wᵀ``. An ``Embedding`` ``(V, D)`` takes the SVD of its table:
``A (r', D)``, ``B (V, r')``, ``ΔW = B R A (V, D)``, and looks up ``B``: ``y = W[x] + (B[x] R) A``. Merge
``W + ΔW``, unmerge ``W − ΔW`` (exact up to one rounding).

Which ``v`` a layer reads depends on its place among all the adapted layers (PEFT's weight tying), not
on anything the layer holds: :func:`link_modules` recovers each layer's place from its ``P``, which PEFT
draws from ``torch.Generator(projection_seed + place)`` (:func:`projection` reproduces that stream).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, ClassVar

import numpy as np

from .._array import as_compute, compute_dtype, embedding_lookup, namespace
from ..backends import backend_for, host_rng
from ..config import (
    TunerConfig,
    check_choice,
    check_flags,
    check_fraction,
    check_number,
    check_positive_int,
)
from ..errors import CheckpointError, ConfigError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._base import (
    ModuleAdapter,
    SignedModuleAdapter,
    apply_delta,
    check_shape,
    orient_2d,
    require_kind,
)
from ._contract import Method

Array = Any

__all__ = [
    "TinyLoraConfig",
    "projection",
    "group_plan",
    "svd_factors",
    "core",
    "delta_weight",
    "forward",
    "merge",
    "unmerge",
    "init_vector",
    "init_shared",
    "link_modules",
    "TinyLoraModule",
]

PEFT_TYPE = "TINYLORA"
#: checkpoint key of group ``g``'s vector (PEFT: ``base_model.tinylora_v.<adapter>.<g>`` without the name)
V_PREFIX = "base_model.tinylora_v."
V_PATTERN = r"base_model\.tinylora_v\.(0|[1-9][0-9]*)"
#: the name under which a bound module sees its group's vector (set by the adapter from link_modules)
V_ALIAS = "tinylora_v"
PARAMETER_SUFFIXES = ("tinylora_A", "tinylora_B", "tinylora_P")
SUPPORTED_KINDS = (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED, LayerKind.EMBEDDING)
#: init_shared's private note of each layer's place, read (and removed) by TinyLoraModule.initialize
_PLAN = "peftmath.tinylora.places"


def v_key(group: int) -> str:
    """The checkpoint key of group ``group``'s vector."""
    return f"{V_PREFIX}{int(group)}"


# --------------------------------------------------------------------------------------------------
# Config (specs/tinylora.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class TinyLoraConfig(TunerConfig):
    """PEFT's ``TinyLoraConfig`` (``peft_type: "TINYLORA"``). ``init_weights``: True (v = 0, a no-op),
    ``"uniform"`` (``U(±init_v_bound)``) or False (PEFT leaves v uninitialised; peftmath draws zeros)."""

    peft_type: ClassVar[str] = "TINYLORA"
    absent_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)  # not a field of PEFT's config

    r: int = 2
    u: int = 64
    weight_tying: float = 0.0
    projection_seed: int = 42
    save_projection: bool = True
    init_v_bound: float = 0.02
    tinylora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool | str = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "r", self.r)
        check_positive_int(source, "u", self.u)
        check_fraction(source, "weight_tying", self.weight_tying, closed=True)
        if not isinstance(self.projection_seed, int) or isinstance(self.projection_seed, bool):
            raise ConfigError(f"{source}: field 'projection_seed' must be an integer, got {self.projection_seed!r}")
        check_flags(source, self, "save_projection", "fan_in_fan_out")
        check_number(source, "init_v_bound", self.init_v_bound)
        check_fraction(source, "tinylora_dropout", self.tinylora_dropout)
        check_choice(source, "bias", self.bias, ("none", "all", "tinylora_only"))
        check_choice(source, "init_weights", self.init_weights, (True, False, "uniform"))



# --------------------------------------------------------------------------------------------------
# Projections and weight tying (specs/tinylora.md, "2. Projections and groups")
# --------------------------------------------------------------------------------------------------
def projection(seed: int, u: int, r: int) -> np.ndarray:
    """PEFT's fixed projections for one layer: ``torch.normal(0, 1/√r, (u, r, r),
    generator=torch.Generator().manual_seed(seed))`` on the CPU, reproduced on the host (float32).

    torch's CPU generator is the 32-bit Mersenne Twister seeded as ``init_genrand(seed mod 2³²)``, the
    legacy seeding of ``numpy.random.RandomState``. With ``n = u·r²`` values, ``n ≥ 16`` fills ``n`` uniform
    floats ``(w mod 2²⁴)·2⁻²⁴`` from 32-bit words ``w`` and turns each block of 16 into normals by
    Box–Muller (``ρ = √(−2 ln(1 − a_j))``, ``θ = 2π b_j`` for the block's halves ``a``, ``b``: ``ρ cos θ`` then
    ``ρ sin θ``), redrawing 16 fresh uniforms for a last partial block; ``n < 16`` draws each value from two
    53-bit doubles ``u₁, u₂`` (``ρ = √(−2 ln(1 − u₂))``, ``θ = 2π u₁``), keeping ``ρ sin θ`` for the next
    value. The results agree with torch's to a few float32 ulps (its vectorised log / cos / sin).

    >>> projection(42, 4, 2).shape
    (4, 2, 2)
    """
    n, std = u * r * r, 1.0 / math.sqrt(r)
    rng = np.random.RandomState(int(seed) & 0xFFFFFFFF)

    def words(k: int) -> np.ndarray:
        return rng.randint(0, 2**32, size=k, dtype=np.uint32)

    if n >= 16:
        def box_muller(block: np.ndarray) -> np.ndarray:
            rho = np.sqrt(-2.0 * np.log(1.0 - block[:8]))
            theta = 2.0 * np.pi * block[8:]
            return np.concatenate([rho * np.cos(theta), rho * np.sin(theta)])

        unif = (words(n) & np.uint32((1 << 24) - 1)).astype(np.float32) * np.float32(2.0 ** -24)
        out = np.empty(n, np.float32)
        for i in range(0, n - 15, 16):
            out[i:i + 16] = box_muller(unif[i:i + 16])
        if n % 16:
            last = (words(16) & np.uint32((1 << 24) - 1)).astype(np.float32) * np.float32(2.0 ** -24)
            out[n - 16:] = box_muller(last)
        return (out * np.float32(std)).reshape(u, r, r)
    out64 = np.empty(n, np.float64)
    cached = None
    mask = np.uint64((1 << 53) - 1)
    for i in range(n):
        if cached is not None:
            out64[i], cached = cached, None
            continue
        w = words(4).astype(np.uint64)
        u1 = float(((w[0] << np.uint64(32)) | w[1]) & mask) * 2.0 ** -53
        u2 = float(((w[2] << np.uint64(32)) | w[3]) & mask) * 2.0 ** -53
        rho, theta = math.sqrt(-2.0 * math.log1p(-u2)), 2.0 * math.pi * u1
        out64[i], cached = rho * math.cos(theta), rho * math.sin(theta)
    return (out64 * std).astype(np.float32).reshape(u, r, r)


def group_plan(n_layers: int, weight_tying: float) -> tuple[int, int]:
    """PEFT's weight tying for ``n_layers`` adapted layers: ``(groups, group size)`` with
    ``groups = max(1, round(n·(1 − weight_tying)))`` (Python's round, half to even) and
    ``size = max(1, n // groups)``; layer ``i`` (in the model's module order) reads the vector of group
    ``min(i // size, groups − 1)``.

    >>> group_plan(10, 0.0), group_plan(10, 1.0), group_plan(10, 0.5)
    ((10, 1), (1, 10), (5, 2))
    """
    groups = max(1, round(n_layers * (1.0 - weight_tying)))
    return groups, max(1, n_layers // groups)


def group_of(place: int, n_layers: int, weight_tying: float) -> int:
    """The group of the layer at ``place`` (0-based, the model's module order) among ``n_layers``."""
    groups, size = group_plan(n_layers, weight_tying)
    return min(place // size, groups - 1)


@lru_cache(maxsize=64)
def _candidates(seed: int, n: int, u: int, r: int) -> np.ndarray:
    """``projection(seed + i, u, r)`` for ``i < n``, stacked ``(n, u·r²)`` (float64), cached."""
    return np.stack([projection(seed + i, u, r).astype(np.float64).ravel() for i in range(n)])


def _place_of(P: np.ndarray, seed: int, n: int) -> int | None:
    """The ``i < n`` whose projection PEFT would draw as ``P``, or None when none or several fit: first
    within a few float32 ulps (torch's vectorised log / cos), then within one bfloat16 rounding (PEFT casts
    the buffers to a half-precision model's dtype, and may save them back in float32)."""
    u, r = int(P.shape[0]), int(P.shape[1])
    cand = _candidates(seed, n, u, r)
    err = np.abs(cand - P.astype(np.float64).ravel())
    for rel in (2.0 ** -20, 2.0 ** -7):
        hits = np.flatnonzero(np.all(err <= rel * np.abs(cand) + 1e-6, axis=1))
        if hits.size:
            return int(hits[0]) if hits.size == 1 else None
    return None


# --------------------------------------------------------------------------------------------------
# The frozen factors (specs/tinylora.md, "3. The SVD factors")
# --------------------------------------------------------------------------------------------------
def _svd_matrix(W: Array, layer: Layer, xp: Any) -> Array:
    """The matrix PEFT decomposes: ``W`` (Linear, Embedding), ``Wᵀ`` (transformers Conv1D)."""
    return xp.matrix_transpose(W) if layer.kind is LayerKind.CONV1D_TRANSPOSED else W


def svd_factors(W: Array, r: int, *, layer: Layer | LayerKind | str | None = None) -> tuple[Array, Array]:
    """``(A, B)`` of the top ``r' = min(r, rows, cols)`` singular triplets of ``M`` (``W``; ``Wᵀ`` for a
    Conv1D): ``A = √s[:r'] · Vᵀ[:r']`` ``(r', cols)`` and ``B = U[:, :r'] · √s[:r']`` ``(rows, r')``, so that
    ``B A`` is the best rank-``r'`` approximation of ``M``. As PEFT: the SVD in float32 (float64 for a
    float64 weight), the truncated factors rounded to ``W``'s dtype before the square root.

    The signs of singular vectors are the LAPACK driver's (each pair ``(u_i, v_i)`` may flip together):
    ``B A`` does not depend on them, ``B R A`` does; a checkpoint holds ``A`` and ``B``, so loading is
    exact, but a fresh initialisation here and in PEFT may differ by such flips (specs/tinylora.md §3).

    >>> import numpy as np
    >>> A, B = svd_factors(np.diag([3.0, 2.0, 1.0]), 2)
    >>> np.allclose(B @ A, np.diag([3.0, 2.0, 0.0]))
    True
    """
    xp = namespace(W, where="tinylora.svd_factors")
    lay = Layer.for_weight(layer, W)
    require_kind(lay, "tinylora.svd_factors", "TinyLoRA", SUPPORTED_KINDS, error=ShapeError)
    M = as_compute(xp, _svd_matrix(W, lay, xp), compute_dtype(xp, W.dtype))
    U, S, Vh = xp.linalg.svd(M, full_matrices=False)
    k = min(int(r), int(M.shape[0]), int(M.shape[1]))
    Ur, Sr, Vr = (as_compute(xp, a, W.dtype) for a in (U[:, :k], S[:k], Vh[:k, :]))
    root = xp.sqrt(Sr)
    return root[:, None] * Vr, Ur * root[None, :]


def _dims(layer: Layer) -> tuple[int, int]:
    """``(rows, cols)`` of the decomposed matrix: B has ``rows`` rows, A ``cols`` columns."""
    if layer.kind is LayerKind.CONV1D_TRANSPOSED:
        return layer.out_features, layer.in_features
    return int(layer.weight_shape[0]), int(layer.weight_shape[1])


# --------------------------------------------------------------------------------------------------
# Delta weight (specs/tinylora.md, "4. The core and the delta weight")
# --------------------------------------------------------------------------------------------------
def core(v: Array, P: Array, *, dtype: Any = None) -> Array:
    """``R = Σ_i v_i P_i`` ``(r', r')`` from ``v (u,)`` and ``P (u, r', r')``, in ``dtype`` (default: the
    compute dtype of both).

    >>> import numpy as np
    >>> core(np.array([1.0, 2.0]), np.stack([np.eye(2), np.ones((2, 2))])).tolist()
    [[3.0, 2.0], [2.0, 3.0]]
    """
    xp = namespace(v, P, where="tinylora.core")
    if v.ndim != 1 or P.ndim != 3 or P.shape[0] != v.shape[0] or P.shape[1] != P.shape[2]:
        raise ShapeError(f"tinylora.core: v {tuple(v.shape)} and P {tuple(P.shape)} must be (u,) and (u, r, r)")
    cd = dtype or compute_dtype(xp, v.dtype, P.dtype)
    u, r = int(P.shape[0]), int(P.shape[1])
    return xp.reshape(xp.matmul(as_compute(xp, v, cd)[None, :], xp.reshape(as_compute(xp, P, cd), (u, r * r))), (r, r))


def _core_as_peft(v: Array, P: Array, A: Array, cd: Any, xp: Any) -> Array:
    """PEFT's ``R`` for a merge: formed in ``v``'s dtype, then rounded to the factors' dtype (``R.to(A.dtype)``
    in ``get_delta_weight``; bfloat16 for a bfloat16 model) before the products."""
    return as_compute(xp, as_compute(xp, core(v, P), A.dtype), cd)


def _check(where: str, lay: Layer, A: Array, B: Array, P: Array, v: Array) -> None:
    rows, cols = _dims(lay)
    k = min(rows, cols)
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != cols or B.shape[0] != rows or A.shape[0] != B.shape[1] \
            or A.shape[0] > k:
        raise ShapeError(f"{where}: tinylora_A {tuple(A.shape)} and tinylora_B {tuple(B.shape)} do not fit the "
                         f"{lay.kind.value} weight {lay.weight_shape}: expected A (r', {cols}) and B ({rows}, r') "
                         f"with r' <= {k}")
    r = int(A.shape[0])
    if tuple(P.shape[1:]) != (r, r) or P.ndim != 3 or v.ndim != 1 or v.shape[0] != P.shape[0]:
        raise ShapeError(f"{where}: tinylora_P {tuple(P.shape)} and v {tuple(v.shape)} must be (u, {r}, {r}) and "
                         f"(u,) for rank r'={r}")


def _factor_pair(A: Array, B: Array, R: Array, lay: Layer, xp: Any, cd: Any) -> tuple[Array, Array]:
    """``(L, Q)`` with ``ΔM = L Q`` on the layer's matrix view ``M``: ``(B R, A)``; for an Embedding, whose
    matrix view is ``Wᵀ`` (D, V), ``(Aᵀ Rᵀ, Bᵀ)``."""
    Ac, Bc = as_compute(xp, A, cd), as_compute(xp, B, cd)
    if lay.kind is LayerKind.EMBEDDING:
        return xp.matmul(xp.matrix_transpose(Ac), xp.matrix_transpose(R)), xp.matrix_transpose(Bc)
    return xp.matmul(Bc, R), Ac


def _layer_of(A: Array, B: Array, kind: LayerKind | str | None) -> Layer:
    """The layer of factors ``A (r', cols)``, ``B (rows, r')``: a Conv1D weight is ``(cols, rows)``, a Linear
    (the default) or Embedding weight ``(rows, cols)``."""
    k = LayerKind.parse(kind or LayerKind.LINEAR)
    rows, cols = int(B.shape[0]), int(A.shape[1])
    return Layer(k, (cols, rows) if k is LayerKind.CONV1D_TRANSPOSED else (rows, cols))


def delta_weight(A: Array, B: Array, P: Array, v: Array, *, layer: Layer | LayerKind | str | None = None,
                 scale: float = 1.0, peft_compat: bool = False) -> Array:
    """``ΔW = B R A`` in the base weight's stored layout (transposed, ``(in, out)``, for a Conv1D), in the
    compute dtype; ``layer`` defaults to a Linear ``(rows of B, columns of A)``. ``peft_compat`` rounds ``R``
    to the factors' dtype first, as PEFT's merge does (it differs only for half-precision factors).

    >>> import numpy as np
    >>> delta_weight(np.ones((1, 3)), np.ones((2, 1)), np.full((1, 1, 1), 2.0), np.array([0.5])).tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    xp = namespace(A, B, P, v, where="tinylora.delta_weight")
    lay = layer if isinstance(layer, Layer) else _layer_of(A, B, layer)
    _check("tinylora.delta_weight", lay, A, B, P, v)
    cd = compute_dtype(xp, A.dtype, B.dtype, P.dtype, v.dtype)
    R = _core_as_peft(v, P, A, cd, xp) if peft_compat else core(v, P, dtype=cd)
    L, Q = _factor_pair(A, B, R, lay, xp, cd)
    d = xp.matmul(L if scale == 1.0 else L * scale, Q)
    return lay.from_matrix(d, xp)


# --------------------------------------------------------------------------------------------------
# Forward (specs/tinylora.md, "5. Forward")
# --------------------------------------------------------------------------------------------------
def forward(x: Array, W: Array, A: Array, B: Array, P: Array, v: Array, *, bias: Array | None = None,
            layer: Layer | LayerKind | str | None = None, dropout: Callable[[Array], Array] | None = None,
            scale: float = 1.0, peft_compat: bool = False) -> Array:
    """The unmerged adapted layer. Linear ``x Wᵀ + b + ((d(x) Aᵀ) Rᵀ) Bᵀ``, Conv1D the same with ``x W + b``,
    Embedding (``x`` integer ids) ``W[x] + (d(B[x]) R) A``. ``peft_compat`` rounds the base output to the
    storage dtype before the adapter term is added, as PEFT does.

    >>> import numpy as np
    >>> forward(np.ones((1, 3)), np.zeros((2, 3)), np.ones((1, 3)), np.ones((2, 1)), np.ones((1, 1, 1)),
    ...         np.array([2.0])).tolist()
    [[6.0, 6.0]]
    """
    xp = namespace(W, A, B, P, v, bias, where="tinylora.forward")
    lay = Layer.for_weight(layer, W)
    require_kind(lay, "tinylora.forward", "TinyLoRA", SUPPORTED_KINDS, error=ShapeError)
    _check("tinylora.forward", lay, A, B, P, v)
    lay.check_bias(bias)
    lay.for_input(x, "tinylora.forward")
    emb = lay.kind is LayerKind.EMBEDDING
    out_dtype = W.dtype if emb else xp.result_type(x.dtype, W.dtype)
    cd = compute_dtype(xp, A.dtype, W.dtype, *(() if emb else (x.dtype,)))
    R = core(v, P, dtype=cd)
    Ac, Bc = as_compute(xp, A, cd), as_compute(xp, B, cd)
    Wc = as_compute(xp, W, cd)
    if emb:
        base = embedding_lookup(x, Wc, xp=xp)
        h = embedding_lookup(x, Bc, xp=xp)
        h = h if dropout is None else dropout(h)
        lo = xp.matmul(xp.matmul(h, R), Ac)
    else:
        xc = as_compute(xp, x, cd)
        base = lay.base_forward(xc, Wc, None if bias is None else as_compute(xp, bias, cd), xp)
        xd = xc if dropout is None else dropout(xc)
        h = xp.matmul(xp.matmul(xd, xp.matrix_transpose(Ac)), xp.matrix_transpose(R))
        lo = xp.matmul(h, xp.matrix_transpose(Bc))
    if peft_compat:  # PEFT rounds the base output to the storage dtype before adding the adapter term
        base = as_compute(xp, as_compute(xp, base, out_dtype), cd)
    return as_compute(xp, base + (lo if scale == 1.0 else lo * scale), out_dtype)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge (specs/tinylora.md, "6. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def _apply(W: Array, A: Array, B: Array, P: Array, v: Array, *, sign: int, layer: Layer | LayerKind | str | None,
           scale: float, copy: bool, safe: bool, peft_compat: bool, where: str) -> Array:
    xp = namespace(W, A, B, P, v, where=where)
    lay = Layer.for_weight(layer, W)
    require_kind(lay, where, "TinyLoRA", SUPPORTED_KINDS, error=ShapeError)
    _check(where, lay, A, B, P, v)
    cd = compute_dtype(xp, W.dtype, A.dtype, B.dtype, P.dtype, v.dtype)
    R = _core_as_peft(v, P, A, cd, xp) if peft_compat else core(v, P, dtype=cd)
    L, Q = _factor_pair(A, B, R, lay, xp, cd)  # (rows, r') and (r', cols): never W's size
    Ls = L if scale == 1.0 else L * scale

    def delta() -> Array:
        return lay.from_matrix(xp.matmul(Ls, Q), xp)

    def kernel(M: Array) -> bool:  # M ± L Q: BLAS gemm with beta = 1, no temporary of W's size
        return backend_for(xp).addmm_(M, Ls, Q, float(sign))

    return apply_delta(where, W, delta, sign=sign, copy=copy, safe=safe, layer=lay, inplace_kernel=kernel,
                       round_delta_to=A.dtype if peft_compat else None, xp=xp)


def merge(W: Array, A: Array, B: Array, P: Array, v: Array, *, layer: Layer | LayerKind | str | None = None,
          scale: float = 1.0, copy: bool = True, safe: bool = False, peft_compat: bool = False) -> Array:
    """``W + ΔW``, formed in float32 (float64) and rounded once to ``W``'s dtype; ``peft_compat`` rounds ``R``
    and ``ΔW`` to the factors' dtype first, as PEFT does (it differs only for half-precision factors, which
    PEFT keeps in float32 by default: ``autocast_adapter_dtype``). ``copy=False`` writes
    into ``W`` (BLAS gemm with ``beta = 1`` on NumPy: no temporary of W's size).

    >>> import numpy as np
    >>> W = np.zeros((2, 3), dtype=np.float32)
    >>> merge(W, np.ones((1, 3)), np.ones((2, 1)), np.ones((1, 1, 1)), np.array([2.0]), copy=False) is W, W[0]
    (True, array([2., 2., 2.], dtype=float32))
    """
    return _apply(W, A, B, P, v, sign=1, layer=layer, scale=scale, copy=copy, safe=safe, peft_compat=peft_compat,
                  where="tinylora.merge")


def unmerge(W: Array, A: Array, B: Array, P: Array, v: Array, *, layer: Layer | LayerKind | str | None = None,
            scale: float = 1.0, copy: bool = True, peft_compat: bool = False) -> Array:
    """``W − ΔW``, the inverse of :func:`merge` up to one rounding (same keywords)."""
    return _apply(W, A, B, P, v, sign=-1, layer=layer, scale=scale, copy=copy, safe=False, peft_compat=peft_compat,
                  where="tinylora.unmerge")


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/tinylora.md, "7. Initialisation")
# --------------------------------------------------------------------------------------------------
def _put(a: np.ndarray, xp: Any, device: Any, dtype: Any) -> Array:
    out = backend_for(xp).from_host(np.ascontiguousarray(a, dtype=np.float32), xp, device)
    target = dtype if dtype is not None else xp.float32
    return out if out.dtype == target else xp.astype(out, target)


def init_vector(config: TinyLoraConfig, *, seed: int | np.random.Generator | None = 0, xp: Any = None,
                device: Any = None, dtype: Any = None) -> Array:
    """One group's ``v (u,)``: zeros for ``init_weights=True`` (the adapter is a no-op) and ``False``,
    ``U(±init_v_bound)`` drawn on the host from ``seed`` for ``"uniform"`` (PEFT's distribution)."""
    if xp is None:
        import array_api_compat.numpy as xp
    u = config.u
    host = host_rng(seed).uniform(-config.init_v_bound, config.init_v_bound, u) if config.init_weights == "uniform" \
        else np.zeros(u)
    return _put(host, xp, device, dtype)


def init_shared(config: TinyLoraConfig, layers: Iterable[Layer] | Mapping[str, Layer] = (), *,
                seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                dtype: Any = None) -> dict[str, Array]:
    """The vector of ``layers``: ``{base_model.tinylora_v.0: v}`` (:func:`init_vector`). With more than one
    group (:func:`group_plan`: several layers and ``weight_tying < 1``) refused (:class:`UnsupportedError`):
    which layer reads which vector is its place in the model's module order, which peftmath does not know.

    The dict also holds a private note of each layer's place that :meth:`TinyLoraModule.initialize` reads
    and removes (it draws the layer's ``P`` from ``projection_seed + place``, as PEFT does): initialise every
    layer given here, the same ``Layer`` objects, before building the adapter."""
    seq = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
    groups, _ = group_plan(max(1, len(seq)), config.weight_tying)
    if groups > 1:
        raise UnsupportedError(
            f"TinyLoRA over {len(seq)} layers with weight_tying={config.weight_tying} ties them in {groups} groups "
            f"by the layers' order in the model (PEFT's named_modules order), which peftmath does not know (it "
            f"orders modules by name); a vector or projection given by the wrong place would be silently wrong "
            f"once PEFT trains the adapter. Create it with weight_tying=1.0 (one vector for all), one layer, or "
            f"in PEFT (peftmath loads PEFT's adapters: their projections tell each layer's place)")
    rng = host_rng(seed)
    out: dict[str, Any] = {v_key(g): init_vector(config, seed=rng, xp=xp, device=device, dtype=dtype)
                           for g in range(groups)}
    if seq:
        out[_PLAN] = {id(layer): i for i, layer in enumerate(seq)}
    return out


# --------------------------------------------------------------------------------------------------
# Which vector each module reads (specs/tinylora.md, "2. Projections and groups")
# --------------------------------------------------------------------------------------------------
def _host(a: Array) -> np.ndarray:
    return backend_for(namespace(a)).to_host(a) if not isinstance(a, np.ndarray) else a


def link_modules(config: TinyLoraConfig, params: Mapping[str, Mapping[str, Array]],
                 shared: Mapping[str, Array]) -> dict[str, dict[str, str]]:
    """``{module: {"tinylora_v": base_model.tinylora_v.<g>}}``: the vector each module reads.

    PEFT gives the layer at place ``i`` (the model's module order among the ``n`` adapted layers) the vector
    of group ``min(i // size, groups − 1)`` (:func:`group_plan`) and does not save the places. With one
    group there is nothing to decide; otherwise each module's place is the ``i < n`` whose projection
    ``projection(projection_seed + i)`` equals its saved ``tinylora_P`` (PEFT draws it so; so does
    :meth:`TinyLoraModule.initialize`). A module whose ``P`` fits no place, or two modules at one place,
    is refused (:class:`CheckpointError`): the checkpoint does not say which vector it reads.

    Modules that hold their vector among their own params (an adapter of one module built without
    ``shared``) are left out."""
    keys = [k for k in shared if k.startswith(V_PREFIX)]
    names = [m for m, p in params.items() if not any(k.startswith(V_PREFIX) for k in p)]
    if not names:
        return {}
    n = len(names)
    groups, _ = group_plan(n, config.weight_tying)
    want = {v_key(g) for g in range(groups)}
    if set(keys) != want:
        raise CheckpointError(
            f"TinyLoRA adapter of {n} module(s) with weight_tying={config.weight_tying}: PEFT makes {groups} "
            f"vector(s) {sorted(want)[:4]}{' ...' if groups > 4 else ''}, the checkpoint has {len(keys)}: "
            f"{sorted(keys)[:4]}; is this the config the adapter was saved with?")
    if groups == 1:
        return {m: {V_ALIAS: v_key(0)} for m in names}
    places: dict[str, int] = {}
    for m in names:
        if "tinylora_P" not in params[m]:
            raise CheckpointError(f"{m}: tinylora_P is not in the checkpoint (save_projection=False); PEFT "
                                  f"regenerates it from the module's place in the model, which peftmath cannot "
                                  f"know. Save the adapter with save_projection=True")
        place = _place_of(_host(params[m]["tinylora_P"]), config.projection_seed, n)
        if place is None:
            raise CheckpointError(
                f"{m}: with {groups} weight-tying groups over {n} modules, the vector a module reads depends on "
                f"its place in the model, which PEFT does not save; its tinylora_P is not PEFT's projection for "
                f"any place 0..{n - 1} (projection_seed={config.projection_seed}), so peftmath cannot tell which "
                f"vector it reads. Use weight_tying=1.0 (one vector), or an adapter PEFT or peftmath created")
        places[m] = place
    if sorted(places.values()) != list(range(n)):
        dup = sorted(m for m in places if list(places.values()).count(places[m]) > 1)
        raise CheckpointError(f"TinyLoRA modules {dup[:4]} carry the same projection (same place in the model); "
                              f"the checkpoint does not say which vector each reads")
    return {m: {V_ALIAS: v_key(group_of(places[m], n, config.weight_tying))} for m in names}


def validate_checkpoint(config: TinyLoraConfig, shared: Mapping[str, Array]) -> None:
    """A loaded checkpoint: its vectors are ``(u,)``."""
    for k, v in shared.items():
        if k.startswith(V_PREFIX) and tuple(v.shape) != (config.u,):
            raise ShapeError(f"{k} has shape {tuple(v.shape)}, the config says u={config.u}")


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
class TinyLoraModule(SignedModuleAdapter):
    """TinyLoRA on one base module: its frozen ``A``, ``B``, ``P`` and its group's vector ``v``
    (``self.shared["tinylora_v"]``, chosen by :func:`link_modules`; or a ``base_model.tinylora_v.<g>``
    among its own params for an adapter of one module)."""

    peft_type = "TINYLORA"
    additive = True
    supported_kinds = SUPPORTED_KINDS
    #: ``scaled(c)`` multiplies this (ΔW → c·ΔW; PEFT has no TinyLoRA scale)
    scaling: float = 1.0

    @classmethod
    def initialize(cls, name: str, config: TinyLoraConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None,
                   shared: MutableMapping[str, Array] | None = None) -> tuple[dict[str, Array], Array | None]:
        """``{tinylora_A, tinylora_B, tinylora_P}`` for module ``name``: ``A``, ``B`` from the SVD of its base
        ``weight`` (required), ``P = projection(projection_seed + place)`` with the place init_shared noted
        for ``layer`` (0 without one, as for the only layer of a model). Without ``shared=``, the group vector
        ``base_model.tinylora_v.0`` is returned among the params. The base weight is not changed."""
        require_kind(layer, name, "TinyLoRA", SUPPORTED_KINDS, peft="PEFT raises TypeError for others",
                     error=ShapeError)
        if init is not None:
            raise ConfigError(f"{name}: TinyLoRA's initialisation is config.init_weights (True, False or "
                              f"'uniform'); got init={init!r}")
        if weight is None:
            raise ConfigError(f"{name}: TinyLoRA's frozen factors are the SVD of the base weight; pass weight=")
        if xp is None:
            xp = namespace(weight)
        place = 0
        plan = shared.get(_PLAN) if shared is not None else None
        if plan is not None:
            if id(layer) not in plan:
                raise ConfigError(f"{name}: init_shared was given other layers; initialise each layer it was given")
            place = plan.pop(id(layer))
            if not plan:
                del shared[_PLAN]
        A, B = svd_factors(weight, config.r, layer=layer)
        dt = dtype if dtype is not None else weight.dtype
        params = {"tinylora_A": xp.astype(A, dt), "tinylora_B": xp.astype(B, dt),
                  "tinylora_P": _put(projection(config.projection_seed + place, config.u, int(A.shape[0])),
                                     xp, device, None)}
        if shared is None:
            params[v_key(0)] = init_vector(config, seed=seed, xp=xp, device=device)
        elif v_key(0) not in shared:
            shared.update({k: v for k, v in init_shared(config, [layer], seed=seed, xp=xp, device=device).items()
                           if k != _PLAN})
        return params, None

    @classmethod
    def infer_layer(cls, name: str, config: TinyLoraConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """``(rows, cols) = (B.shape[0], A.shape[1])``: a Linear or Embedding weight ``(rows, cols)`` (the
        same tensors and ΔW; :meth:`forward` looks integer ids up), a Conv1D ``(cols, rows)``; a square one
        follows ``kind`` or the config's ``fan_in_fan_out``."""
        if "tinylora_A" not in params or "tinylora_B" not in params:
            raise ShapeError(f"{name}: a TinyLoRA module needs tinylora_A and tinylora_B, found {sorted(params)}")
        rows, cols = int(params["tinylora_B"].shape[0]), int(params["tinylora_A"].shape[1])
        if kind is not None or weight_shape is None:
            fallback = LayerKind.CONV1D_TRANSPOSED if config.fan_in_fan_out else LayerKind.LINEAR
            return _layer_of(params["tinylora_A"], params["tinylora_B"], kind if kind is not None else fallback)
        shape = tuple(int(s) for s in weight_shape)
        if len(shape) != 2:
            return Layer.of(shape)
        return orient_2d(name, shape, rows, cols, config.fan_in_fan_out, "these TinyLoRA factors")

    def validate(self) -> None:
        require_kind(self.layer, self.name, "TinyLoRA", SUPPORTED_KINDS, peft="PEFT raises TypeError for others",
                     error=ShapeError)
        missing = [k for k in PARAMETER_SUFFIXES if k not in self.params]
        if missing:
            why = " (saved with save_projection=False: PEFT regenerates P from the module's place in the model, " \
                  "which peftmath cannot know; save with save_projection=True)" if missing == ["tinylora_P"] else ""
            raise CheckpointError(f"{self.name}: TinyLoRA needs {', '.join(missing)}, not in the checkpoint{why}")
        own = [k for k in self.params if k.startswith(V_PREFIX)]
        if V_ALIAS in self.shared:
            self.v = self.shared[V_ALIAS]
        elif len(own) == 1:
            self.v = self.params[own[0]]
        elif len(self.shared) == 1 and v_key(0) in self.shared:  # one module: group 0
            self.v = self.shared[v_key(0)]
        else:
            raise CheckpointError(f"{self.name}: no TinyLoRA vector for this module (an adapter binds it from "
                                  f"base_model.tinylora_v.<group>; found shared {sorted(self.shared)[:4]})")
        A, B, P = (self.params[k] for k in PARAMETER_SUFFIXES)
        _check(self.name, self.layer, A, B, P, self.v)
        if int(P.shape[0]) != self.config.u:
            raise ShapeError(f"{self.name}: tinylora_P has u={int(P.shape[0])} projections, the config says "
                             f"u={self.config.u}")

    def scaled(self, c: float) -> "ModuleAdapter":
        """Scale ``c``: ``ΔW → c·ΔW`` (PEFT defines no TinyLoRA scale)."""
        return self.scale_scaling(c)

    def _tensors(self) -> tuple[Array, Array, Array, Array]:
        return self.params["tinylora_A"], self.params["tinylora_B"], self.params["tinylora_P"], self.v

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        return delta_weight(*self._tensors(), layer=self.layer, scale=self.scaling, peft_compat=peft_compat)

    def _apply(self, weight: Array, sign: int, *, copy: bool, safe: bool, peft_compat: bool) -> Array:
        """``W ± ΔW`` through the module-level kernel (merge and unmerge of :class:`SignedModuleAdapter`)."""
        return _apply(weight, *self._tensors(), sign=sign, layer=self.layer, scale=self.scaling, copy=copy, safe=safe,
                      peft_compat=peft_compat, where=self.name)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer = self.layer
        xp = namespace(x)
        if layer.kind is LayerKind.LINEAR and xp.isdtype(x.dtype, "integral"):
            # integer ids: a Linear cannot take them (PEFT's F.linear raises), an Embedding of the same
            # tensors and ΔW looks them up (specs/tinylora.md §5)
            layer = Layer(LayerKind.EMBEDDING, layer.weight_shape)
        check_shape(self.name, "base weight", weight, layer.weight_shape)
        kw = dict(layer_kwargs)
        if layer.kind is not LayerKind.EMBEDDING:
            layer, _ = layer.for_input(x, self.name, **{k: kw.pop(k) for k in ("groups", "stride", "padding",
                                                                                 "dilation") if k in kw})
        return forward(x, weight, *self._tensors(), bias=bias, layer=layer, scale=self.scaling, **kw)

    def describe(self) -> dict[str, Any]:
        return {"r": int(self.params["tinylora_A"].shape[0]), "u": self.config.u,
                "weight_tying": self.config.weight_tying}

    def num_parameters(self) -> int:
        """Trainable scalars of this module: none of its own (A, B and P are frozen; its group's vector is
        counted once by the adapter's shared tensors)."""
        return 0


Config = TinyLoraConfig
Module = TinyLoraModule
#: demo / documentation examples (non-trivial: uniform v with a visible bound)
#: (tied: the demo adapts several layers, and peftmath creates one group only; init_shared)
EXAMPLES = {
    "TinyLoRA": dict(r=2, u=8, weight_tying=1.0, init_weights="uniform", init_v_bound=0.5),
    "TinyLoRA r=3": dict(r=3, u=4, weight_tying=1.0, init_weights="uniform", init_v_bound=0.5),
}

#: the method's description (peftmath.methods._contract.Method)
METHOD = Method(
    peft_type=PEFT_TYPE, config=TinyLoraConfig, module=TinyLoraModule, spec="specs/tinylora.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=SUPPORTED_KINDS, additive=True,
    init_field="init_weights", examples=EXAMPLES, init_shared=init_shared, validate_checkpoint=validate_checkpoint,
    frozen_suffixes=PARAMETER_SUFFIXES, shared_key_pattern=V_PATTERN, pattern_trainable=True,
    link_modules=link_modules,
)
