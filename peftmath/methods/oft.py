r"""OFT: orthogonal fine-tuning (Qiu et al., 2023), in PEFT's current (>= 0.15) form.

A frozen weight is rotated on its *input* side by a block-diagonal orthogonal (or near-orthogonal)
matrix ``R = diag(R_1, ..., R_r)`` of ``r`` blocks of size ``b`` (``n = r·b`` is the rotated
dimension)::

    y = (x R) Wᵀ + b                 Linear   (n = in_features)
    y = conv(x, W_flat Rᵀ) + b       Conv2d   (n = in·kH·kW, flattened in (C, kH, kW) order)
    y = W[ids] R                     Embedding (n = embedding_dim; rotation on the output)

Each block comes from ``b(b-1)/2`` numbers ``q`` (the strict upper triangle, row-major, as
``numpy.triu_indices(b, 1)``): ``S = U − Uᵀ`` with ``U[triu] = q``, then

* ``use_cayley_neumann=True`` (PEFT's default), ``T = num_cayley_neumann_terms``:
  ``R = I + 2 Σ_{k=1}^{T−2} S^k + S^{T−1}`` (T=1: I; T=2: I + 2S; T=3 and 4: I + 2S + 2S² + S³),
  a truncation of ``(I + S)(I − S)⁻¹``;
* ``use_cayley_neumann=False``: ``R = (I − S)(I + S)⁻¹`` (exactly orthogonal).

The two are *mutually transposed* (the series approximates the transpose of the exact map); the
config records which one a checkpoint was trained with, and peftmath follows it.

Merge: ``W ← W Rᵀ`` (Linear, Conv2d on the ``(out, n)`` view), ``W ← W R`` (Embedding). Unmerge uses
the exact inverse of every block (``R⁻¹`` per block, never ``Rᵀ``: the Neumann ``R`` is only
approximately orthogonal). Nothing here builds the dense ``n × n`` matrix: every product is a
reshape to ``(…, r, b)`` and one batched matmul with the ``(r, b, b)`` blocks.

Checkpoint keys: ``<module>.oft_R.weight`` (Linear, Conv2d) and ``<module>.oft_embedding_R.weight``
(Embedding), shape ``(r, b(b−1)/2)``, or ``(1, b(b−1)/2)`` with ``block_share``.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import array_api_compat
import array_api_extra as xpx
import numpy as np

from .._array import (
    as_compute, compute_dtype, conv, embedding_lookup, is_immutable, is_low_precision, namespace, why_not_writeable,
)
from ..backends import backend_for, host_rng
from ..config import (
    TunerConfig,
    check_choice,
    check_flags,
    check_fraction,
    check_nonnegative_int,
    check_number,
    check_positive_int,
)
from ..errors import ConfigError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import MergeResult, ModuleAdapter, check_shape, write_weight

Array = Any

__all__ = [
    "OFTConfig",
    "adjust_oft_parameters",
    "block_layout",
    "rotated_dim",
    "skew_blocks",
    "coft_project",
    "cayley_neumann",
    "cayley_exact",
    "rotation_blocks",
    "apply_blocks",
    "forward",
    "merge",
    "unmerge",
    "init_weights",
    "OFTModule",
]

PEFT_TYPE = "OFT"


# --------------------------------------------------------------------------------------------------
# Config (specs/oft.md, "Block size (`r`, `oft_block_size`)")
# --------------------------------------------------------------------------------------------------
@dataclass
class OFTConfig(TunerConfig):
    """PEFT's ``OFTConfig`` (``peft_type: "OFT"``), PEFT's field names and defaults.

    Exactly one of ``r`` (number of blocks) and ``oft_block_size`` must be non-zero. ``module_dropout``
    is kept for round trips; PEFT creates the dropout layer but never calls it, so it has no effect.
    """

    peft_type: ClassVar[str] = "OFT"

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "config") -> "OFTConfig":
        """As :meth:`PeftConfig.from_dict`; a config without ``oft_block_size`` (OFT before PEFT 0.14,
        a different parametrisation) is refused, as PEFT refuses it."""
        if hasattr(data, "keys") and "oft_block_size" not in data:
            raise ConfigError(
                f"{source}: no 'oft_block_size' field: this OFT adapter predates PEFT 0.14 and uses a different "
                f"parametrisation (PEFT refuses it too); retrain it or convert it with PEFT <= 0.13"
            )
        config = super().from_dict(data, source=source)
        # PEFT warns when peft_version is missing (written since 0.18) or older than 0.18; a null value
        # (a config built in memory, not read from a PEFT file) is not a version
        raw = data.get("peft_version", "0.0.0")
        version = str(raw).partition("@")[0] if raw is not None else None
        if config.use_cayley_neumann and version is not None and _version_tuple(version) < (0, 18):
            warnings.warn(
                f"{source}: a Cayley-Neumann OFT adapter from PEFT {version} (< 0.18) used a slightly different "
                f"series; peftmath evaluates the >= 0.18 series, as PEFT does",
                stacklevel=2,
            )
        return config

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            check_nonnegative_int(source, name, getattr(self, name))
        if (self.r != 0) == (self.oft_block_size != 0):
            raise ConfigError(
                f"{source}: set exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}) to a non-zero "
                f"value (r x oft_block_size = the rotated dimension; PEFT refuses this too)"
            )
        check_positive_int(source, "num_cayley_neumann_terms", self.num_cayley_neumann_terms)
        check_number(source, "eps", self.eps)
        if self.eps < 0:
            raise ConfigError(f"{source}: field 'eps' must be >= 0, got {self.eps!r}")
        check_fraction(source, "module_dropout", self.module_dropout)
        check_choice(source, "bias", self.bias, ("none", "all", "oft_only"))
        check_flags(source, self, "init_weights", "coft", "block_share", "use_cayley_neumann", "fan_in_fan_out")


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# --------------------------------------------------------------------------------------------------
# Block structure (specs/oft.md, "Notation and shapes", "Block size (`r`, `oft_block_size`)")
# --------------------------------------------------------------------------------------------------
def rotated_dim(layer: Layer) -> int:
    """``n``, the dimension OFT rotates: in_features, embedding_dim, or in·kH·kW for a Conv2d.

    >>> rotated_dim(Layer.of((8, 3, 3, 2)))      # non-square kernels are handled (PEFT assumes k×k)
    18
    """
    if layer.kind is LayerKind.EMBEDDING:
        return layer.weight_shape[1]
    if layer.kind is LayerKind.LINEAR:
        return layer.weight_shape[1]
    if layer.kind is LayerKind.CONV2D:
        if layer.groups != 1:
            raise UnsupportedError(
                f"OFT on a Conv2d with groups={layer.groups} is not defined (PEFT's rotation spans all input "
                f"channels while the weight holds in/groups); use groups=1"
            )
        return layer.matrix_shape[1]
    raise UnsupportedError(
        f"OFT supports Linear, Conv2d and Embedding layers, not {layer.kind.value} (PEFT raises TypeError too)"
    )


def adjust_oft_parameters(n: int, p: int) -> int:
    """PEFT's ``OFTLayer.adjust_oft_parameters``: the divisor of ``n`` nearest to ``p`` (ties: smaller).

    >>> adjust_oft_parameters(768, 20), adjust_oft_parameters(10, 4), adjust_oft_parameters(10, 64)
    (16, 5, 10)
    """
    if p >= n:
        return n
    hi = p
    while hi <= n and n % hi:
        hi += 1
    lo = p
    while lo > 1 and n % lo:
        lo -= 1
    return lo if p - lo <= hi - p else hi


def block_layout(n: int, *, r: int = 0, oft_block_size: int = 0, where: str = "oft") -> tuple[int, int]:
    """``(r, b)`` for a rotated dimension ``n`` from ``r`` or ``oft_block_size`` (PEFT's rule).

    A value that does not divide ``n`` (or exceeds it) is replaced by the nearest divisor
    (:func:`adjust_oft_parameters`) with a warning, as PEFT does.

    >>> block_layout(64, oft_block_size=32), block_layout(64, r=4)
    ((2, 32), (4, 16))
    """
    if n <= 0:
        raise ShapeError(f"{where}: the rotated dimension is {n}; OFT needs at least one feature")
    if (r != 0) == (oft_block_size != 0) or r < 0 or oft_block_size < 0:
        raise ConfigError(f"{where}: give exactly one of r ({r}) and oft_block_size ({oft_block_size}), positive")
    if oft_block_size:
        b = oft_block_size
        if n % b or b > n:
            b = adjust_oft_parameters(n, b)
            warnings.warn(f"{where}: oft_block_size {oft_block_size} does not divide {n}; adjusted to {b} (as PEFT)",
                          stacklevel=2)
        return n // b, b
    rr = r
    if n % rr or rr > n:
        rr = adjust_oft_parameters(n, rr)
        warnings.warn(f"{where}: r {r} does not divide {n}; adjusted to {rr} (as PEFT)", stacklevel=2)
    return rr, n // rr


def parameter_shape(layer: Layer, config: OFTConfig, where: str = "oft") -> tuple[int, int]:
    """Shape of ``oft_R.weight`` / ``oft_embedding_R.weight`` on ``layer``."""
    r, b = block_layout(rotated_dim(layer), r=config.r, oft_block_size=config.oft_block_size, where=where)
    return (1 if config.block_share else r, b * (b - 1) // 2)


def block_size_of(n_elements: int) -> int:
    """The ``b`` with ``b(b−1)/2 == n_elements`` (ShapeError when there is none).

    >>> block_size_of(496), block_size_of(0)
    (32, 1)
    """
    b = int((1 + math.isqrt(1 + 8 * n_elements)) // 2)
    if b * (b - 1) // 2 != n_elements:
        raise ShapeError(f"oft: {n_elements} parameters per block is not b(b-1)/2 for any block size b")
    return b


# --------------------------------------------------------------------------------------------------
# Rotation blocks (specs/oft.md, "From parameters to rotation blocks")
# --------------------------------------------------------------------------------------------------
def _index_array(xp: Any, values: list[int] | tuple[int, ...], like: Array) -> Array:
    return xp.asarray(values, dtype=xp.int64, device=array_api_compat.device(like))


@functools.lru_cache(maxsize=16)
def _upper_index(b: int) -> tuple[int, ...]:
    """For each entry ``(i, j)`` of a ``b × b`` block in C order, its position in ``q``'s row (the strict
    upper triangle, row by row) or ``b(b−1)/2`` (the appended zero) elsewhere. Cached: built once per size."""
    ne = b * (b - 1) // 2
    position = {pair: k for k, pair in enumerate((i, j) for i in range(b) for j in range(i + 1, b))}
    return tuple(position.get((i, j), ne) for i in range(b) for j in range(b))


def skew_blocks(q: Array, block_size: int) -> Array:
    """Skew-symmetric blocks ``S = U − Uᵀ`` with ``U[triu_indices(b, 1)] = q``.

    ``q`` is ``(k, b(b−1)/2)``; the result is ``(k, b, b)``. Built with one gather (no scatter).

    >>> import numpy as np
    >>> skew_blocks(np.array([[1.0, 2.0, 3.0]]), 3)[0]
    array([[ 0.,  1.,  2.],
           [-1.,  0.,  3.],
           [-2., -3.,  0.]])
    """
    xp = namespace(q, where="oft.skew_blocks")
    b = block_size
    ne = b * (b - 1) // 2
    if q.ndim != 2 or q.shape[1] != ne:
        raise ShapeError(f"oft.skew_blocks: parameter of shape {tuple(q.shape)}, expected (k, {ne}) for block size {b}")
    padded = xp.concat([q, xp.zeros((q.shape[0], 1), dtype=q.dtype, device=array_api_compat.device(q))], axis=1)
    upper = xp.reshape(xp.take(padded, _index_array(xp, _upper_index(b), q), axis=1), (q.shape[0], b, b))
    return upper - xp.matrix_transpose(upper)


def coft_project(q: Array, *, eps: float) -> Array:
    """COFT's projection: scale each block's ``q`` so that ``‖S‖_F ≤ eps / sqrt(k)``.

    ``k = q.shape[0]`` (1 under block_share). A block with ``‖S‖_F ≤ ε'`` is unchanged. PEFT writes
    the projected values back into the parameter on every forward and merge; this function returns
    them and leaves ``q`` alone.
    """
    xp = namespace(q, where="oft.coft_project")
    bound = eps / math.sqrt(q.shape[0])
    norm = math.sqrt(2.0) * xp.sqrt(xp.sum(q * q, axis=1, keepdims=True))  # ‖S‖_F = √2 ‖q‖
    safe = xp.where(norm > bound, norm, xp.ones_like(norm))
    factor = xp.where(norm > bound, bound / safe, xp.ones_like(norm))
    return q * factor


def _eye(xp: Any, b: int, dtype: Any, like: Array) -> Array:
    return xp.eye(b, dtype=dtype, device=array_api_compat.device(like))


def cayley_neumann(S: Array, num_terms: int = 5) -> Array:
    """PEFT's truncated Cayley–Neumann series for skew blocks ``S`` ``(k, b, b)``.

    ``T = num_terms``: T=1 gives ``I``; T=2 ``I + 2S``; T ≥ 3 ``I + 2 Σ_{k=1}^{max(T−2, 2)} S^k + S^{max(T−1, 3)}``
    (so T=3 and T=4 agree). The terms are added in PEFT's order.

    >>> import numpy as np
    >>> S = skew_blocks(np.array([[0.1]]), 2)
    >>> cayley_neumann(S, 2)[0]
    array([[ 1. ,  0.2],
           [-0.2,  1. ]])
    """
    xp = namespace(S, where="oft.cayley_neumann")
    b = S.shape[-1]
    R = xp.broadcast_to(_eye(xp, b, S.dtype, S), S.shape)
    if num_terms > 1:
        R = R + 2.0 * S
        if num_terms > 2:
            power = xp.matmul(S, S)
            R = R + 2.0 * power
            for _ in range(3, num_terms - 1):
                power = xp.matmul(power, S)
                R = R + 2.0 * power
            power = xp.matmul(power, S)
            R = R + power
    return R


def cayley_exact(S: Array) -> Array:
    """The Cayley map ``R = (I − S)(I + S)⁻¹`` of skew blocks ``S`` ``(k, b, b)`` (orthogonal).

    Solved as ``(I + S)⁻¹ (I − S)`` (the factors commute), one batched solve through the backend
    (:meth:`peftmath.backends.Backend.solve`: dask solves each chunk of the stack).

    >>> import numpy as np
    >>> R = cayley_exact(skew_blocks(np.array([[0.3, -0.2, 0.5]]), 3))
    >>> bool(np.allclose(R[0].T @ R[0], np.eye(3)))
    True
    """
    xp = namespace(S, where="oft.cayley_exact")
    eye = _eye(xp, S.shape[-1], S.dtype, S)
    solve = backend_for(xp).solve
    return split_stack(lambda a, c: solve(a, c, where="oft.cayley_exact"), eye + S, eye - S)


def rotation_blocks(
    q: Array,
    *,
    block_size: int | None = None,
    use_cayley_neumann: bool = True,
    num_cayley_neumann_terms: int = 5,
    coft: bool = False,
    eps: float = 6e-5,
    dtype: Any = None,
) -> Array:
    """The rotation blocks ``R_i`` ``(k, b, b)`` from the parameter ``q`` ``(k, b(b−1)/2)``.

    Computed in ``dtype`` (default: float64 for float64 ``q``, float32 otherwise): COFT projection
    (when ``coft``), skew blocks, then the Neumann series or the exact Cayley map.

    >>> import numpy as np
    >>> q = np.zeros((2, 6), dtype=np.float32)
    >>> rotation_blocks(q).shape, bool((rotation_blocks(q) == np.eye(4)).all())
    ((2, 4, 4), True)
    """
    xp = namespace(q, where="oft.rotation_blocks")
    b = block_size if block_size is not None else block_size_of(q.shape[-1])
    cd = dtype or compute_dtype(xp, q.dtype)
    qc = as_compute(xp, q, cd)
    if coft:
        qc = coft_project(qc, eps=eps)
    S = skew_blocks(qc, b)
    return cayley_neumann(S, num_cayley_neumann_terms) if use_cayley_neumann else cayley_exact(S)


def apply_blocks(X: Array, blocks: Array, *, transpose: bool = False) -> Array:
    """``X · diag(R_1..R_r)`` (or ``X · diag(R_i)ᵀ``) for ``X`` ``(..., n)`` and blocks ``(r|1, b, b)``.

    Block-aware, one batched matmul and no copy of ``X``: with ``X`` flattened to ``(M, n)``,
    ``Yᵀ = diag(R_i)ᵀ Xᵀ`` where ``Xᵀ`` (a transposed view) splits into ``r`` panels ``(b, M)``
    (a view again), so ``(r, b, b) @ (r, b, M)`` gives ``Yᵀ`` as a contiguous ``(n, M)`` array and
    ``Y`` is its transposed view. The result is therefore column-major (Fortran order) for a 2-D
    ``X``; values and shape are what the formula says, and a caller needing row-major storage pays
    one transposing copy (``numpy.ascontiguousarray``). A single shared block (block_share) is one
    ``(M·r, b) @ (b, b)`` product on the row-major view instead. Costs ``2·M·n·b`` flops instead
    of ``2·M·n²``.

    >>> import numpy as np
    >>> X = np.arange(8.0).reshape(2, 4)
    >>> R = np.stack([np.eye(2), np.array([[0.0, 1.0], [1.0, 0.0]])])
    >>> apply_blocks(X, R)
    array([[0., 1., 3., 2.],
           [4., 5., 7., 6.]])
    """
    xp = namespace(X, blocks, where="oft.apply_blocks")
    b = blocks.shape[-1]
    n = X.shape[-1]
    if n % b:
        raise ShapeError(f"oft: rotated dimension {n} is not a multiple of the block size {b}")
    r = n // b
    if blocks.shape[0] not in (1, r):
        raise ShapeError(f"oft: {blocks.shape[0]} rotation blocks of size {b} do not cover dimension {n} (need {r} or 1)")
    lead = tuple(X.shape[:-1])
    m = math.prod(lead)
    if blocks.shape[0] == 1 or r == 1:
        # one (shared) block: a plain (M·r, b) @ (b, b) product on the row-major view
        R = xp.matrix_transpose(blocks) if transpose else blocks
        out = xp.matmul(xp.reshape(X, (m * r, b)), R[0, ...])
        return xp.reshape(out, (*lead, n))
    # X·diag(R) = (diag(R)ᵀ Xᵀ)ᵀ: left factors diag(R)ᵀ (or diag(R) for X·diag(R)ᵀ), small and copied
    left = blocks if transpose else _dense_copy(xp, xp.matrix_transpose(blocks))
    XT = xp.reshape(xp.matrix_transpose(xp.reshape(X, (m, n))), (r, b, m))  # views for strided arrays
    YT = xp.reshape(xp.matmul(left, XT), (n, m))
    return xp.reshape(xp.matrix_transpose(YT), (*lead, n))


def _dense_copy(xp: Any, a: Array) -> Array:
    """``a`` in C order (a flat reshape forces the copy; libraries with lazy layouts may skip it)."""
    return xp.reshape(xp.reshape(a, (-1,)), a.shape)


def _inverse_blocks(blocks: Array) -> Array:
    """The exact inverse of every block (a batched inverse of ``(k, b, b)`` through the backend,
    :meth:`peftmath.backends.Backend.inv`): a singular block is :class:`NotInvertibleError` (on dask when
    the result is computed); a library that cannot invert a stack is :class:`UnsupportedError`."""
    inv = backend_for(namespace(blocks)).inv
    return split_stack(lambda a: inv(a, where="oft.unmerge", what="a rotation block"), blocks)


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/oft.md, "Initialisation (`init_weights`)")
# --------------------------------------------------------------------------------------------------
def init_weights(
    shape: tuple[int, int],
    *,
    init_weights: bool = True,
    seed: int | np.random.Generator | None = 0,
    xp: Any = None,
    device: Any = None,
    dtype: Any = None,
) -> Array:
    """PEFT's init of the OFT parameter: ``True`` gives zeros (``R = I``), ``False`` ``N(0, 0.1²)``.

    Drawn on the host with ``numpy.random.default_rng(seed)`` and moved to ``xp`` / ``device``.
    """
    if not isinstance(init_weights, bool):
        raise ConfigError(f"OFT init_weights must be true or false, got {init_weights!r} (PEFT: 'Unknown initialization')")
    if xp is None:
        import array_api_compat.numpy as xp
    host = np.zeros(shape) if init_weights else host_rng(seed).normal(0.0, 0.1, shape)
    out = backend_for(xp).from_host(np.ascontiguousarray(host, dtype=np.float32), xp, device)
    target = dtype if dtype is not None else xp.float32
    return out if out.dtype == target else xp.astype(out, target)


# --------------------------------------------------------------------------------------------------
# Forward (specs/oft.md, "Forward, merge, unmerge")
# --------------------------------------------------------------------------------------------------
def _check_blocks(lay: Layer, blocks: Array, where: str) -> None:
    n = rotated_dim(lay)
    if blocks.ndim != 3 or blocks.shape[-1] != blocks.shape[-2]:
        raise ShapeError(f"{where}: rotation blocks of shape {tuple(blocks.shape)}, expected (r, b, b)")
    b = blocks.shape[-1]
    if n % b or blocks.shape[0] not in (1, n // b):
        raise ShapeError(
            f"{where}: {blocks.shape[0]} blocks of size {b} do not fit the rotated dimension {n} of a "
            f"{lay.kind.value} {lay.weight_shape} (need r x b = {n}, or one shared block)"
        )


def forward(
    x: Array,
    weight: Array,
    blocks: Array,
    *,
    bias: Array | None = None,
    layer: Layer | LayerKind | str | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int | None = None,
    peft_compat: bool = False,
) -> Array:
    """The unmerged OFT layer with rotation ``blocks`` ``(r|1, b, b)`` (from :func:`rotation_blocks`).

    ========== ================================================================================
    Linear     ``(x R) Wᵀ + b``, x ``(..., in)``
    Embedding  ``W[ids] R`` (the rotation acts on the embedding dimension)
    Conv2d     ``conv(x, W_flat Rᵀ) + b``: the same as the merged layer (default), or, with
               ``peft_compat=True``, PEFT's unfold / rotate / fold-with-overlapping-sums input
               transform followed by the base conv (differs from the merged layer for k > 1)
    ========== ================================================================================

    Computed in float32 (float64 for float64 inputs) and rounded once to the output dtype (x's
    dtype; the weight's for an Embedding). ``peft_compat=True`` rounds the rotated input to x's
    dtype before the base layer, as PEFT does.

    ``stride``, ``padding``, ``dilation``, ``groups``: the base conv's, described once in
    :mod:`peftmath.layers` ("Conv keywords"); a grouped conv (``groups > 1``, inferred from ``x``) is
    refused with :class:`~peftmath.errors.UnsupportedError`.
    """
    xp = namespace(x, weight, blocks, bias, where="oft.forward")
    lay, _ = Layer.for_weight(layer, weight).for_input(x, "oft.forward", groups=groups, stride=stride,
                                                        padding=padding, dilation=dilation)
    _check_blocks(lay, blocks, "oft.forward")
    emb = lay.kind is LayerKind.EMBEDDING
    out_dtype = weight.dtype if emb else x.dtype
    cd = compute_dtype(xp, blocks.dtype, weight.dtype, *(() if emb else (x.dtype,)))
    R = as_compute(xp, blocks, cd)
    if emb:
        rows = as_compute(xp, embedding_lookup(x, weight, xp=xp), cd)  # look up first: no full-table cast
        return as_compute(xp, apply_blocks(rows, R), out_dtype)
    if lay.kind is LayerKind.CONV2D:
        if any(d != 1 for d in ((dilation,) * 2 if isinstance(dilation, int) else tuple(dilation))):
            raise UnsupportedError(
                f"oft.forward: Conv2d with dilation={dilation} is not supported by OFT (PEFT raises ValueError too)"
            )
        if peft_compat:
            xr = _peft_fold_rotate(as_compute(xp, x, cd), R, lay.kernel_size)
            xr = as_compute(xp, as_compute(xp, xr, x.dtype), cd)
            Wc = as_compute(xp, weight, cd)
        else:
            xr = as_compute(xp, x, cd)
            Wm = as_compute(xp, xp.reshape(weight, lay.matrix_shape), cd)
            Wc = xp.reshape(apply_blocks(Wm, R, transpose=True), lay.weight_shape)
        bc = None if bias is None else as_compute(xp, bias, cd)
        return as_compute(xp, conv(xr, Wc, bc, stride=stride, padding=padding, dilation=dilation, xp=xp), out_dtype)
    xr = apply_blocks(as_compute(xp, x, cd), R)
    if peft_compat:
        xr = as_compute(xp, as_compute(xp, xr, x.dtype), cd)
    y = lay.base_forward(xr, as_compute(xp, weight, cd), None if bias is None else as_compute(xp, bias, cd), xp)
    return as_compute(xp, y, out_dtype)


def _peft_fold_rotate(x: Array, R: Array, kernel: tuple[int, ...]) -> Array:
    """PEFT's Conv2d input transform (``OFTRotationModule._unfold`` / ``_fold``), reproduced.

    Every ``kH×kW`` patch (stride 1, no padding) is flattened in ``(C, kH, kW)`` order and rotated;
    the rotated patches are laid out as ``(B, C, H_out, W_out, kH, kW)``, that buffer is *read* as
    ``(B, C·kH·kW, H_out·W_out)`` (PEFT's ``view`` after ``permute``, which reorders the values) and
    summed back with ``fold`` (overlapping patches add up).
    """
    xp = namespace(x, R)
    B, C, H, W = x.shape
    kh, kw = kernel
    ho, wo = H - kh + 1, W - kw + 1
    if ho <= 0 or wo <= 0:
        raise ShapeError(f"oft.forward: input {H}x{W} is smaller than the {kh}x{kw} kernel")
    cols = [x[:, :, p:p + ho, q:q + wo] for p in range(kh) for q in range(kw)]
    patches = xp.reshape(xp.stack(cols, axis=-1), (B, C, ho, wo, kh, kw))
    patches = xp.reshape(xp.permute_dims(patches, (0, 2, 3, 1, 4, 5)), (B * ho * wo, C * kh * kw))
    rotated = apply_blocks(patches, R)
    t = xp.permute_dims(xp.reshape(rotated, (B, ho, wo, C, kh, kw)), (0, 3, 1, 2, 4, 5))
    t = xp.reshape(t, (B, C, kh, kw, ho, wo))  # PEFT's view(B, C*kh*kw, L) read as (c, p, q) x (i, j)
    out = None
    for p in range(kh):
        for q in range(kw):
            part = xpx.pad(t[:, :, p, q, :, :], [(0, 0), (0, 0), (p, kh - 1 - p), (q, kw - 1 - q)], xp=xp)
            out = part if out is None else out + part
    return out


# --------------------------------------------------------------------------------------------------
# Merge / unmerge (specs/oft.md, "Forward, merge, unmerge")
# --------------------------------------------------------------------------------------------------
def _rotate_weight(weight: Array, blocks: Array, lay: Layer, *, inverse: bool, xp: Any, cd: Any) -> Array:
    """The rotated weight as a new array, the whole product at once (arrays that are never written,
    JAX and dask, torch tensors recording gradients, 2-D weights of libraries other than NumPy already
    in the compute dtype; see :func:`fresh_result`)."""
    R = as_compute(xp, blocks, cd)
    if inverse:
        R = _inverse_blocks(R)
    if lay.kind is LayerKind.EMBEDDING:  # W (V, D) -> W R
        return apply_blocks(as_compute(xp, weight, cd), R)
    Wm = as_compute(xp, xp.reshape(weight, lay.matrix_shape), cd)  # (out, n) -> W Rᵀ
    return xp.reshape(apply_blocks(Wm, R, transpose=True), lay.weight_shape)


# --------------------------------------------------------------------------------------------------
# Row tiles: the in-place kernel (specs/oft.md, "In place: row tiles")
# --------------------------------------------------------------------------------------------------
#: bytes of one NumPy row tile buffer (float32 or float64): the tile, its product and the rows being
#: written back stay in one core's L2 cache (512 KiB: 32 rows of a 4096-wide float32 matrix)
TILE_BYTES = 512 << 10
#: elements of one row tile on other libraries (torch, CuPy, array-api-strict): one library call per
#: step and tile, the library threads inside it
GENERIC_TILE_ELEMENTS = 1 << 22


def tile_rows(n_cols: int, itemsize: int, budget: int = TILE_BYTES) -> int:
    """Rows per tile: ``budget`` bytes of ``n_cols``-wide rows of ``itemsize`` bytes, at least one.

    >>> tile_rows(4096, 4), tile_rows(10**7, 4)
    (32, 1)
    """
    return max(1, budget // max(1, n_cols * itemsize))


#: bytes of one core's cache the NumPy rotation tiles aim to stay in: two tiles of rows (the rows read and
#: their product) plus the factors, which every tile reads again (768 KiB: 8 rows of a 4096-wide float32
#: matrix beside its 128 blocks of 32 x 32, 512 KiB)
CACHE_BYTES = 768 << 10
#: fewest rows of a rotation tile: below 8, each block's product is a BLAS call too small to pay for itself
MIN_TILE_ROWS = 8


def factor_tile_rows(n_cols: int, itemsize: int, factor_bytes: int) -> int:
    """Rows per tile of :func:`rotate_rows`: the most that keep two tiles and the factors (``factor_bytes``)
    in :data:`CACHE_BYTES`, at least :data:`MIN_TILE_ROWS`, at most :func:`tile_rows` (:data:`TILE_BYTES`).
    Measured on Linear(4096, 4096), blocks of 32 (``benchmarks/bench_oft.py``): 8-row tiles take about 0.75x
    the CPU time of 32-row tiles, whose buffers and factors (1.5 MiB) spill out of a 1 MiB L2 cache.

    >>> blocks = 128 * 32 * 32 * 4  # Linear(4096), blocks of 32, float32
    >>> factor_tile_rows(4096, 4, blocks), factor_tile_rows(4096, 4, 32 * 32 * 4), factor_tile_rows(10**5, 4, 0)
    (8, 23, 1)
    """
    fit = (CACHE_BYTES - factor_bytes) // max(1, 2 * n_cols * itemsize)
    return max(1, min(tile_rows(n_cols, itemsize, TILE_BYTES), max(MIN_TILE_ROWS, fit)))


#: threads of the NumPy row-tile loops; None: :func:`tile_threads` follows the BLAS thread limit (set it
#: to 1 where merges already run on several threads of their own)
TILE_THREADS: int | None = None


def tile_threads() -> int:
    """Threads of the NumPy row-tile loops: :data:`TILE_THREADS` when set, else the BLAS thread limit
    (``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, the first one set to a positive
    integer), else the CPUs this process may use. Each tile's products are small BLAS calls that run on
    one thread, so the loop spreads tiles over as many threads as one large BLAS call would use."""
    import os

    if TILE_THREADS is not None:
        return max(1, int(TILE_THREADS))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def run_row_tiles(n_rows: int, step: int, make_worker: Callable[[int], Callable[[int, int], None]], *,
                  threads: int = 1) -> None:
    """Call ``work(start, stop)`` on consecutive row tiles ``[start, stop)`` of ``step`` rows covering
    ``range(n_rows)``, where ``work = make_worker(rows)`` is built once per thread for its run of
    ``rows`` rows (its own buffers, at most ``min(step, rows)`` rows each).

    With ``threads > 1`` the rows are cut into that many contiguous runs of whole tiles, each run on a
    thread of a pool (NumPy and BLAS release the GIL); the tiles, hence the numbers, are the same as
    with one thread. NumPy's floating-point warnings are off inside the runs, as inside one large BLAS
    call: NaN and infinity propagate to the result (``safe=True`` refuses it). An exception in a thread
    is raised here after every thread has stopped.
    """
    n_tiles = -(-n_rows // step) if n_rows else 0
    count = max(1, min(threads, n_tiles))

    def run(lo: int, hi: int) -> None:
        with np.errstate(all="ignore"):
            work = make_worker(hi - lo)
            for start in range(lo, hi, step):
                work(start, min(hi, start + step))

    if count == 1:
        run(0, n_rows)
        return
    cuts = [min(n_rows, (n_tiles * i // count) * step) for i in range(count + 1)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(count) as pool:
        list(pool.map(lambda i: run(cuts[i], cuts[i + 1]), range(count)))


#: fewest ``(b, b)`` matrices per thread of :func:`split_stack`
MIN_SPLIT_MATRICES = 16


def split_stack(fn: Callable[..., Array], *stacks: Array) -> Array:
    """``fn(*stacks)`` for stacks of matrices ``(..., p, q)`` with one leading shape (a batched inverse or
    solve), on NumPy cut along the flattened leading axes into :func:`tile_threads` runs of at least
    :data:`MIN_SPLIT_MATRICES` matrices computed on threads of a pool (LAPACK releases the GIL; each matrix
    is solved on its own, so the numbers are those of one call) and joined. Other libraries, and small
    stacks, call ``fn`` once. An error of a run (a singular matrix) is raised after every run has stopped.
    """
    lead = tuple(int(d) for d in stacks[0].shape[:-2])
    k = math.prod(lead)
    count = min(tile_threads(), k // MIN_SPLIT_MATRICES)
    if count < 2 or not all(isinstance(a, np.ndarray) for a in stacks):
        return fn(*stacks)
    flat = [a.reshape((k,) + a.shape[-2:]) for a in stacks]
    cuts = [k * i // count for i in range(count + 1)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(count) as pool:
        parts = list(pool.map(lambda i: fn(*(a[cuts[i]:cuts[i + 1]] for a in flat)), range(count)))
    out = np.concatenate(parts, axis=0)
    return out.reshape(lead + out.shape[1:])


def rotate_rows(src: Array, dst: Array, factors: Array, *, cd: Any, scale: Array | None = None,
                divide: bool = False, xp: Any = None) -> bool:
    """``dst ← src · diag(F_1, …, F_r)`` row tile by row tile (then ``⊙ scale`` or ``⊘ scale`` per row).

    ``src`` and ``dst`` hold the same rows on their first axis, each row flattened in C order to the
    ``n`` entries being rotated (a Linear or Embedding weight, a Conv2d weight ``(out, C, kH, kW)``
    whatever its strides, or its ``(out, n)`` matrix); ``dst`` may be ``src`` itself (in place: every
    row is read before it is written). ``factors`` are the right factors ``(r|1, b, b)`` in the compute
    dtype ``cd`` (``Rᵀ`` for ``W Rᵀ``), ``scale`` a ``(rows,)`` vector in ``cd`` or None.

    Each tile of rows is widened to ``cd`` when stored narrower (float16, bfloat16), multiplied block by
    block, scaled, and rounded once to ``dst``'s dtype as it is written: the numbers of
    :func:`apply_blocks` on the whole matrix with no temporary of its size. On NumPy the tile buffers
    (:data:`TILE_BYTES` each) are reused across tiles (``out=``), a product goes straight into ``dst``
    when it can, and the tiles spread over :func:`tile_threads` threads; other libraries take tiles of
    about :data:`GENERIC_TILE_ELEMENTS` elements through :func:`apply_blocks`. Returns True.
    """
    xp = xp or namespace(src, dst, factors)
    rows = int(src.shape[0])
    n = math.prod(int(d) for d in src.shape[1:])
    numpy = all(isinstance(a, np.ndarray) for a in (src, dst, factors) + (() if scale is None else (scale,)))
    if numpy:
        F = np.ascontiguousarray(factors)
        step = factor_tile_rows(n, np.dtype(cd).itemsize, F.nbytes)
        run_row_tiles(rows, step, lambda run: _numpy_tile_worker(src, dst, F, cd, min(step, run), scale, divide),
                      threads=tile_threads())
        return True
    step = max(1, GENERIC_TILE_ELEMENTS // max(1, n))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        X = as_compute(xp, xp.reshape(src[start:stop, ...], (stop - start, n)), cd)
        Y = apply_blocks(X, factors)
        if scale is not None:
            Y = Y / scale[start:stop, None] if divide else Y * scale[start:stop, None]
        dst[start:stop, ...] = xp.reshape(as_compute(xp, Y, dst.dtype), tuple(dst[start:stop, ...].shape))
    return True


def _numpy_tile_worker(src: np.ndarray, dst: np.ndarray, F: np.ndarray, cd: Any, t_max: int,
                       scale: np.ndarray | None, divide: bool) -> Callable[[int, int], None]:
    """One thread's ``work(start, stop)`` for :func:`rotate_rows` on NumPy, with its own buffers of
    ``t_max`` rows."""
    k, b = F.shape[0], F.shape[-1]
    n = math.prod(src.shape[1:])
    r = n // b
    # read the rows in place when they are C-ordered in cd; else widen / gather them into a tile buffer
    stage = None if src.dtype == cd and src.flags.c_contiguous else np.empty((t_max, n), dtype=cd)
    # write the product straight into dst when its rows are C-ordered in cd and it is not the source
    direct = dst is not src and dst.dtype == cd and dst.flags.c_contiguous and not np.may_share_memory(dst, src)
    out = None if direct else np.empty((t_max, n), dtype=cd)
    sc_shape = (-1,) + (1,) * (dst.ndim - 1)  # the per-row scale against a tile of dst's rows

    def work(start: int, stop: int) -> None:
        t = stop - start
        if stage is None:
            X = src[start:stop].reshape(t, n)
        else:
            X = stage[:t]
            np.copyto(X.reshape((t,) + src.shape[1:]), src[start:stop], casting="unsafe")
        Y = dst[start:stop].reshape(t, n) if direct else out[:t]
        if k == 1:  # one shared block: (t·r, b) @ (b, b)
            np.matmul(X.reshape(t * r, b), F[0], out=Y.reshape(t * r, b))
        else:  # block i of every row: (r, t, b) @ (r, b, b), views of the tiles
            np.matmul(X.reshape(t, r, b).transpose(1, 0, 2), F, out=Y.reshape(t, r, b).transpose(1, 0, 2))
        rows = dst[start:stop]
        if scale is not None and not direct and dst.dtype == cd:  # scaled on the way back: one pass, not two
            (np.divide if divide else np.multiply)(Y.reshape(rows.shape), scale[start:stop].reshape(sc_shape), out=rows)
            return
        if scale is not None:
            (np.divide if divide else np.multiply)(Y, scale[start:stop, None], out=Y)
        if not direct:  # rounds once (to nearest even) when dst is narrower
            np.copyto(rows, Y.reshape(rows.shape), casting="unsafe")

    return work


def fresh_result(weight: Array, *params: Array | None, cd: Any = None) -> Array | None:
    """A new writeable C-ordered array of ``weight``'s shape and dtype, for a ``copy=True`` result filled
    row tile by row tile from ``weight`` (read once, written once: the only allocation of its size), or
    None where the result is computed out of place instead: arrays that are never written (JAX, dask),
    torch tensors recording gradients (``weight`` or a parameter requires grad while autograd is on; the
    out-of-place result keeps the graph), and, given the compute dtype ``cd``, a 2-D weight of another
    library already in ``cd`` (one library product writes the result, nothing else of its size: faster
    there than tiles, which such libraries cannot multiply into reused buffers)."""
    if is_immutable(weight):
        return None
    if cd is not None and not isinstance(weight, np.ndarray) and weight.ndim == 2 and weight.dtype == cd:
        return None
    arrays = (weight,) + tuple(a for a in params if a is not None)
    if any(getattr(a, "requires_grad", False) for a in arrays):
        import torch

        if torch.is_grad_enabled():
            return None
    xp = namespace(weight)
    out = xp.empty(tuple(weight.shape), dtype=weight.dtype, device=array_api_compat.device(weight))
    return out if why_not_writeable(out) is None else None


def _right_factors(xp: Any, R: Array, *, transpose: bool) -> Array:
    """The right factors of ``X · diag(R)`` (``transpose=False``) or ``X · diag(R)ᵀ``, C-ordered."""
    return _dense_copy(xp, xp.matrix_transpose(R)) if transpose else R


def merge(
    weight: Array,
    blocks: Array,
    *,
    layer: Layer | LayerKind | str | None = None,
    copy: bool = True,
    safe: bool = False,
) -> Array:
    """The merged weight: ``W Rᵀ`` on the ``(out, n)`` view (Linear, Conv2d), ``W R`` (Embedding).

    Computed in float32 (float64 for float64) and rounded once to W's dtype. ``copy=False`` writes
    into ``weight``; ``safe=True`` refuses a non-finite result before anything is written. A 2-D
    result is returned in column-major storage (see :func:`apply_blocks`).

    >>> import numpy as np
    >>> W = np.arange(6.0).reshape(2, 3)
    >>> R = np.array([[[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    >>> merge(W, R)
    array([[ 1.,  0.,  2.],
           [ 4., -3.,  5.]])
    """
    return _merge_or_unmerge(weight, blocks, layer, inverse=False, copy=copy, safe=safe, where="oft.merge")


def unmerge(
    weight: Array,
    blocks: Array,
    *,
    layer: Layer | LayerKind | str | None = None,
    copy: bool = True,
) -> Array:
    """The inverse of :func:`merge`: ``W R⁻ᵀ`` (Embedding ``W R⁻¹``) with the exact inverse of each block.

    >>> import numpy as np
    >>> W = np.arange(6.0).reshape(2, 3)
    >>> R = cayley_neumann(skew_blocks(np.array([[0.2, -0.1, 0.3]]), 3), 5)
    >>> bool(np.allclose(unmerge(merge(W, R), R), W))
    True
    """
    return _merge_or_unmerge(weight, blocks, layer, inverse=True, copy=copy, safe=False, where="oft.unmerge")


def _merge_or_unmerge(weight: Array, blocks: Array, layer: Layer | LayerKind | str | None, *, inverse: bool,
                      copy: bool, safe: bool, where: str) -> Array:
    xp = namespace(weight, blocks, where=where)
    lay = Layer.for_weight(layer, weight)
    _check_blocks(lay, blocks, where)
    cd = compute_dtype(xp, weight.dtype, blocks.dtype)

    emb = lay.kind is LayerKind.EMBEDDING

    def factors() -> Array:  # right factors: W Rᵀ (Linear, Conv2d), W R (Embedding); R⁻¹ per block to unmerge
        R = as_compute(xp, blocks, cd)
        return _right_factors(xp, _inverse_blocks(R) if inverse else R, transpose=not emb)

    def compute() -> Array:
        out = fresh_result(weight, blocks, cd=cd)
        if out is None:
            return _rotate_weight(weight, blocks, lay, inverse=inverse, xp=xp, cd=cd)
        rotate_rows(weight, out, factors(), cd=cd, xp=xp)
        return out

    # the kernel receives the stored weight itself (any strides: its first-axis row tiles are views);
    # copy=True fills the new array from the weight in one pass (compute), not a copy then the kernel
    return write_weight(where, weight, compute, kernel=lambda W: rotate_rows(W, W, factors(), cd=cd, xp=xp),
                        copy=copy, safe=safe, kernel_on_copy=False, xp=xp)


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
_KEY = "oft_R.weight"
_EMB_KEY = "oft_embedding_R.weight"


class OFTModule(ModuleAdapter):
    """OFT on one base module (Linear, Conv2d or Embedding).

    OFT is multiplicative (``additive = False``): there is no ``ΔW``; :meth:`rotation` gives the
    blocks and :meth:`merge` / :meth:`unmerge` rotate the weight.
    """

    peft_type = "OFT"
    additive = False
    supported_kinds = (LayerKind.LINEAR, LayerKind.CONV2D, LayerKind.EMBEDDING)

    @classmethod
    def infer_layer(cls, name: str, config: OFTConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """Embedding when the module holds ``oft_embedding_R.weight``; otherwise Linear / Conv2d by the
        base weight's number of dimensions. Without ``weight_shape`` the output size is unknown (OFT's
        parameters do not record it) and is set to 0."""
        if kind is not None and LayerKind.parse(kind) not in cls.supported_kinds:
            raise UnsupportedError(f"{name}: OFT does not support {LayerKind.parse(kind).value} layers "
                                   f"(PEFT: Linear, Conv2d, Embedding)")
        if _EMB_KEY in params:
            if weight_shape is not None:
                return Layer(LayerKind.EMBEDDING, tuple(weight_shape))
            return Layer(LayerKind.EMBEDDING, (0, cls._dim_from_params(name, config, params[_EMB_KEY])))
        if _KEY not in params:
            raise ShapeError(f"{name}: no {_KEY} or {_EMB_KEY} among the module's tensors {sorted(params)}")
        if weight_shape is not None:
            return Layer.of(tuple(weight_shape), kind if kind is not None and len(weight_shape) == 2 else None)
        return Layer(LayerKind.LINEAR, (0, cls._dim_from_params(name, config, params[_KEY])))

    @staticmethod
    def _dim_from_params(name: str, config: OFTConfig, q: Array) -> int:
        if config.block_share:
            raise ShapeError(f"{name}: with block_share the rotated dimension is not in the checkpoint; "
                             f"pass the base weight shape")
        return int(q.shape[0]) * block_size_of(int(q.shape[1]))

    def validate(self) -> None:
        lay = self.layer
        if lay.kind not in self.supported_kinds:
            raise UnsupportedError(f"{self.name}: OFT does not support {lay.kind.value} layers (PEFT: Linear, Conv2d, "
                                   f"Embedding; it raises TypeError for others)")
        key = _EMB_KEY if lay.kind is LayerKind.EMBEDDING else _KEY
        if key not in self.params:
            raise ShapeError(f"{self.name}: missing {key} for a {lay.kind.value} layer (found {sorted(self.params)})")
        extra = sorted(set(self.params) - {key})
        if extra:
            raise ShapeError(f"{self.name}: unexpected OFT tensors {extra} for a {lay.kind.value} layer")
        self.q = self.params[key]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.r, self.block_size = block_layout(rotated_dim(lay), r=self.config.r,
                                                   oft_block_size=self.config.oft_block_size, where=self.name)
        expected = (1 if self.config.block_share else self.r, self.block_size * (self.block_size - 1) // 2)
        check_shape(self.name, key, self.q, expected)

    def rotation(self, *, peft_compat: bool = False, dtype: Any = None) -> Array:
        """The rotation blocks ``(r, b, b)`` (``(1, b, b)`` with block_share), float32 or float64.

        ``peft_compat=True`` rounds them to the parameter's dtype first when that is float16/bfloat16
        (PEFT's CPU rule: computed in float32, cast back).
        """
        xp = self.xp
        c = self.config
        R = rotation_blocks(self.q, block_size=self.block_size, use_cayley_neumann=c.use_cayley_neumann,
                            num_cayley_neumann_terms=c.num_cayley_neumann_terms, coft=c.coft, eps=c.eps, dtype=dtype)
        if peft_compat and is_low_precision(self.q.dtype):
            R = as_compute(xp, xp.astype(R, self.q.dtype), R.dtype)
        return R

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        raise UnsupportedError(
            f"{self.name}: OFT is multiplicative (merge computes W Rᵀ), so it has no delta weight; "
            f"use rotation() for the (r, b, b) blocks, or merge()"
        )

    def _blocks_for(self, weight: Array, peft_compat: bool) -> Array:
        cd = compute_dtype(self.xp, weight.dtype, self.q.dtype)
        return self.rotation(peft_compat=peft_compat, dtype=cd)

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        self.layer.check_weight(weight)
        new = _merge_or_unmerge(weight, self._blocks_for(weight, peft_compat), self.layer, inverse=False, copy=copy,
                                safe=safe, where=self.name)
        return MergeResult(new, bias)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        self.layer.check_weight(weight)
        new = _merge_or_unmerge(weight, self._blocks_for(weight, peft_compat), self.layer, inverse=True, copy=copy,
                                safe=False, where=self.name)
        return MergeResult(new, bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, *, peft_compat: bool = False,
                **layer_kwargs: Any) -> Array:
        layer, kw = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self._blocks_for(weight, peft_compat), bias=bias, layer=layer,
                       peft_compat=peft_compat, **kw)

    @classmethod
    def initialize(cls, name: str, config: OFTConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """Fresh parameters for module ``name`` (``init`` overrides ``config.init_weights``); the base
        weight is not changed, so the second item is ``None``."""
        if layer.kind not in cls.supported_kinds:
            raise UnsupportedError(f"{name}: OFT does not support {layer.kind.value} layers")
        if xp is None and weight is not None:
            xp = namespace(weight)
        shape = parameter_shape(layer, config, where=name)
        key = _EMB_KEY if layer.kind is LayerKind.EMBEDDING else _KEY
        q = init_weights(shape, init_weights=config.init_weights if init is None else init, seed=seed, xp=xp,
                         device=device, dtype=dtype)
        return {key: q}, None


#: checkpoint suffixes of this method's per-module tensors
PARAMETER_SUFFIXES = (_KEY, _EMB_KEY)
Config = OFTConfig
Module = OFTModule
#: demo / documentation examples: row label -> config fields (non-trivial: random init)
EXAMPLES = {
    "OFT": dict(oft_block_size=4, init_weights=False),
    "OFT exact Cayley + COFT": dict(oft_block_size=4, use_cayley_neumann=False, coft=True, eps=0.05,
                                    init_weights=False),
    "OFT block_share": dict(r=2, oft_block_size=0, block_share=True, init_weights=False),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=OFTConfig, module=OFTModule, spec="specs/oft.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=OFTModule.supported_kinds, rotation=True,
    init_field="init_weights", examples=EXAMPLES,
    rank_excludes=("oft_block_size",),  # PEFT wants exactly one of r and oft_block_size non-zero
)
