r"""GraLoRA: granular low-rank adaptation (Jung et al., 2025).

The weight is cut into a ``k × k`` grid of blocks, and every block gets its own low-rank update of rank
``s = r / k``; the total number of trained numbers equals a rank-``r`` LoRA's, while the update can reach
rank ``k·r``. An optional plain LoRA of rank ``h = hybrid_r`` on the whole weight is added ("hybrid")::

    gralora_A: (k, in/k, r)     gralora_B: (k, r, out/k)           per module (PEFT's stacked layout)
    A_{n,j} = gralora_A[n][:, j·s:(j+1)·s]          (in/k, s)       input block n, output block j
    B_{j,n} = gralora_B[j][n·s:(n+1)·s, :]          (s, out/k)
    ΔW[j-th row block, n-th column block] = c · B_{j,n}ᵀ A_{n,j}ᵀ                     (out/k, in/k)
                                           + c · (B_g A_g)[same block]          hybrid: A_g (h, in), B_g (out, h)
    c = alpha / (r + h)
    y = x Wᵀ + b + c · Σ_n (x_n A_{n,j}) B_{j,n}  (output block j; x_n the n-th block of x)  + c · (x A_gᵀ) B_gᵀ

For a transformers ``Conv1D`` (``fan_in_fan_out``) ΔW is stored transposed, ``(in, out)``. Merge is
``W + ΔW``, unmerge ``W − ΔW`` (exact up to the rounding of the sum: ΔW does not depend on W). No
``k·r``-rank matrix and no scattered copy of ``A`` are ever formed: the in-place merge adds the ``k²``
block products per row tile of W (``specs/gralora.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from .._array import as_compute, compute_dtype, is_low_precision, namespace
from ..backends import backend_for, host_rng, kaiming_uniform_bound
from ..config import TunerConfig, check_choice, check_flags, check_fraction, check_number, check_positive_int
from ..errors import ConfigError, ShapeError
from ..layers import Layer, LayerKind
from ._base import ModuleAdapter, SignedModuleAdapter, apply_delta, check_shape, in_row_tiles, require_kind
from ._contract import Method

Array = Any

__all__ = ["GraloraConfig", "parameter_shapes", "init_weights", "block_factors", "delta_weight", "forward", "merge",
           "unmerge", "GraloraModule"]

PEFT_TYPE = "GRALORA"
SUPPORTED_KINDS = (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED)
_PEFT_KINDS = "PEFT raises TypeError for others"
KEY_A, KEY_B = "gralora_A", "gralora_B"
KEY_AG, KEY_BG = "gralora_A_general.weight", "gralora_B_general.weight"
_KEYS = (KEY_A, KEY_B, KEY_AG, KEY_BG)


# --------------------------------------------------------------------------------------------------
# Config (specs/gralora.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class GraloraConfig(TunerConfig):
    """PEFT's ``GraloraConfig`` (``peft_type: "GRALORA"``). PEFT's GraloraConfig has no ``exclude_modules``;
    it is left out of the written config while unset."""

    peft_type: ClassVar[str] = "GRALORA"

    r: int = 32
    hybrid_r: int = 0
    alpha: float = 64
    gralora_dropout: float = 0.0
    gralora_k: int = 2
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "r", self.r)
        check_positive_int(source, "gralora_k", self.gralora_k)
        if not isinstance(self.hybrid_r, int) or isinstance(self.hybrid_r, bool) or self.hybrid_r < 0:
            raise ConfigError(f"{source}: field 'hybrid_r' must be a non-negative integer, got {self.hybrid_r!r}")
        if self.r % self.gralora_k:
            raise ConfigError(f"{source}: r={self.r} is not divisible by gralora_k={self.gralora_k} (each of the "
                              f"k blocks of a row has rank r / k); choose r as a multiple of gralora_k")
        check_number(source, "alpha", self.alpha)
        check_fraction(source, "gralora_dropout", self.gralora_dropout)
        check_flags(source, self, "fan_in_fan_out", "init_weights")
        check_choice(source, "bias", self.bias, ("none", "all", "gralora_only"))

    @property
    def scaling(self) -> float:
        """``c = alpha / (r + hybrid_r)``."""
        return self.alpha / (self.r + self.hybrid_r)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("exclude_modules") is None:  # not a field of PEFT's GraloraConfig
            out.pop("exclude_modules", None)
        return out


# --------------------------------------------------------------------------------------------------
# Shapes (specs/gralora.md, "2. Shapes")
# --------------------------------------------------------------------------------------------------
def parameter_shapes(out_features: int, in_features: int, r: int, k: int, hybrid_r: int = 0,
                     *, where: str = "gralora") -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors of one module, by key: ``gralora_A (k, in/k, r)``, ``gralora_B (k, r, out/k)``
    and, when ``hybrid_r > 0``, ``gralora_A_general.weight (h, in)``, ``gralora_B_general.weight (out, h)``.

    >>> parameter_shapes(6, 8, 4, 2, 1)
    {'gralora_A': (2, 4, 4), 'gralora_B': (2, 4, 3), 'gralora_A_general.weight': (1, 8), 'gralora_B_general.weight': (6, 1)}
    """
    if r % k:
        raise ShapeError(f"{where}: rank r={r} is not divisible by gralora_k={k}")
    for what, n in (("in_features", in_features), ("out_features", out_features)):
        if n % k:
            raise ShapeError(f"{where}: {what}={n} is not divisible by gralora_k={k} (GraLoRA cuts the weight into a "
                             f"k × k grid of equal blocks; PEFT raises ValueError too); choose a gralora_k dividing "
                             f"both sizes")
    out = {KEY_A: (k, in_features // k, r), KEY_B: (k, r, out_features // k)}
    if hybrid_r:
        out.update({KEY_AG: (hybrid_r, in_features), KEY_BG: (out_features, hybrid_r)})
    return out


def _check(where: str, layer: Layer, A: Array, B: Array, Ag: Array | None, Bg: Array | None) -> tuple[int, int, int]:
    """``(k, r, h)`` after checking every tensor against the layer."""
    if A.ndim != 3 or B.ndim != 3 or A.shape[0] != B.shape[0] or A.shape[2] != B.shape[1]:
        raise ShapeError(f"{where}: gralora_A {tuple(A.shape)} and gralora_B {tuple(B.shape)} are not (k, in/k, r) and "
                         f"(k, r, out/k) with one k and one r")
    k, r = int(A.shape[0]), int(A.shape[2])
    if (Ag is None) != (Bg is None):
        raise ShapeError(f"{where}: the hybrid part needs both {KEY_AG} and {KEY_BG}, found only one")
    h = 0 if Ag is None else int(Ag.shape[0])
    for key, shape in parameter_shapes(layer.out_features, layer.in_features, r, k, h, where=where).items():
        check_shape(where, key, {KEY_A: A, KEY_B: B, KEY_AG: Ag, KEY_BG: Bg}[key], shape)
    return k, r, h


def _layer(layer: Layer | LayerKind | str | None, W: Array | None, A: Array, B: Array, where: str) -> Layer:
    if isinstance(layer, Layer):
        lay = layer
    elif W is not None:
        lay = Layer.of(tuple(W.shape), layer)
    else:
        kind = LayerKind.parse(layer) if layer is not None else LayerKind.LINEAR
        inn, out = int(A.shape[0]) * int(A.shape[1]), int(B.shape[0]) * int(B.shape[2])
        lay = Layer(kind, (inn, out) if kind is LayerKind.CONV1D_TRANSPOSED else (out, inn))
    require_kind(lay, where, "GraLoRA", SUPPORTED_KINDS, peft=_PEFT_KINDS, error=ShapeError)
    return lay


# --------------------------------------------------------------------------------------------------
# Delta weight (specs/gralora.md, "3. Delta, forward")
# --------------------------------------------------------------------------------------------------
def block_factors(A: Array, B: Array, *, scaling: float = 1.0, dtype: Any = None) -> tuple[Array, Array]:
    """``(P (k, k, out/k, s), Q (k, k, s, in/k))`` with ``P[j, n] = scaling · B_{j,n}ᵀ`` and ``Q[j, n] = A_{n,j}ᵀ``,
    so that block ``(j, n)`` of ΔW (output block ``j``, input block ``n``) is ``P[j, n] @ Q[j, n]``; in ``dtype``
    (float32, float64 for float64 inputs). ``k·r·(out/k + in/k)`` numbers: the adapter's own size.

    >>> import numpy as np
    >>> A = np.arange(8.0).reshape(2, 2, 2); B = np.arange(4.0).reshape(2, 2, 1)   # k = 2, r = 2, s = 1
    >>> P, Q = block_factors(A, B)
    >>> P[1, 0].tolist(), Q[1, 0].tolist()            # B_{1,0}ᵀ = B[1][0:1, :]ᵀ, A_{0,1}ᵀ = A[0][:, 1:2]ᵀ
    ([[2.0]], [[1.0, 3.0]])
    """
    xp = namespace(A, B, where="gralora.block_factors")
    k, ib, r = (int(n) for n in A.shape)
    ob, s = int(B.shape[2]), r // k
    cd = dtype or compute_dtype(xp, A.dtype, B.dtype)
    # B[j, n·s + t, o] -> (j, n, t, o) -> (j, n, o, t);  A[n, i, j·s + t] -> (n, i, j, t) -> (j, n, t, i)
    P = xp.permute_dims(xp.reshape(as_compute(xp, B, cd), (k, k, s, ob)), (0, 1, 3, 2))
    Q = xp.permute_dims(xp.reshape(as_compute(xp, A, cd), (k, ib, k, s)), (2, 0, 3, 1))
    return (P * scaling if scaling != 1.0 else P), Q


def _general(Ag: Array | None, Bg: Array | None, scaling: float, cd: Any, xp: Any) -> tuple[Array, Array] | None:
    """The hybrid LoRA's ``(c·B_g (out, h), A_g (h, in))`` in ``cd``, or None."""
    if Ag is None:
        return None
    return as_compute(xp, Bg, cd) * scaling, as_compute(xp, Ag, cd)


def delta_matrix(A: Array, B: Array, Ag: Array | None = None, Bg: Array | None = None, *, scaling: float,
                 dtype: Any = None) -> Array:
    """ΔW as the ``(out, in)`` matrix: the ``k²`` block products (``out·in·s`` multiply-adds, not PEFT's
    ``out·in·r``) plus the hybrid LoRA ``c·B_g A_g``."""
    xp = namespace(A, B, Ag, Bg, where="gralora.delta_matrix")
    cd = dtype or compute_dtype(xp, *(t.dtype for t in (A, B, Ag, Bg) if t is not None))
    P, Q = block_factors(A, B, scaling=scaling, dtype=cd)
    k, ob, ib = int(P.shape[0]), int(P.shape[2]), int(Q.shape[3])
    D = xp.reshape(xp.permute_dims(xp.matmul(P, Q), (0, 2, 1, 3)), (k * ob, k * ib))  # (j, o, n, i)
    g = _general(Ag, Bg, scaling, cd, xp)
    return D if g is None else D + xp.matmul(*g)


def _compat_round(xp: Any, A: Array, d: Array) -> Array:
    """PEFT's CPU half rule: half-precision factors give a ΔW rounded to their dtype."""
    if is_low_precision(A.dtype):
        return as_compute(xp, xp.astype(d, A.dtype), d.dtype)
    return d


def delta_weight(A: Array, B: Array, Ag: Array | None = None, Bg: Array | None = None, *, scaling: float,
                 layer: Layer | LayerKind | str | None = None, peft_compat: bool = False) -> Array:
    """``ΔW`` in the stored layout (``(out, in)``, ``(in, out)`` for Conv1D), in float32 (float64 for float64
    inputs). ``peft_compat=True`` rounds it to the factors' dtype when they are float16 / bfloat16 (PEFT).

    >>> import numpy as np
    >>> A = np.ones((2, 1, 2)); B = np.array([[[1.0], [2.0]], [[3.0], [4.0]]])   # k = 2, r = 2: in 2, out 2
    >>> delta_weight(A, B, scaling=0.5)                 # block (j, n) = 0.5 · B[j][n] · A[n][0, j]
    array([[0.5, 1. ],
           [1.5, 2. ]])
    """
    xp = namespace(A, B, Ag, Bg, where="gralora.delta_weight")
    lay = _layer(layer, None, A, B, "gralora.delta_weight")
    _check("gralora.delta_weight", lay, A, B, Ag, Bg)
    d = delta_matrix(A, B, Ag, Bg, scaling=scaling)
    if peft_compat:
        d = _compat_round(xp, A, d)
    return lay.from_matrix(d, xp)


# --------------------------------------------------------------------------------------------------
# Forward (specs/gralora.md, "3. Delta, forward")
# --------------------------------------------------------------------------------------------------
def adapter_output(x: Array, A: Array, B: Array, Ag: Array | None = None, Bg: Array | None = None, *,
                   scaling: float, dropout: Callable[[Array], Array] | None = None, dtype: Any = None) -> Array:
    """The adapter's term ``c · [Σ_n (d(x)_n A_{n,j}) B_{j,n}]_j + c · (d(x) A_gᵀ) B_gᵀ`` for x ``(..., in)``,
    as PEFT's forward computes it (never forms ΔW), in float32 or wider."""
    xp = namespace(x, A, B, Ag, Bg, where="gralora.adapter_output")
    cd = dtype or compute_dtype(xp, x.dtype, *(t.dtype for t in (A, B, Ag, Bg) if t is not None))
    k, ib, r = (int(n) for n in A.shape)
    ob, s = int(B.shape[2]), r // k
    lead = tuple(int(n) for n in x.shape[:-1])
    rows = math.prod(lead)
    xd = as_compute(xp, x, cd)
    if dropout is not None:
        xd = dropout(xd)
    xs = xp.permute_dims(xp.reshape(xd, (rows, k, ib)), (1, 0, 2))                    # (n, b, i)
    H = xp.matmul(xs, as_compute(xp, A, cd))                                          # (n, b, r): r = (j, t)
    G = xp.reshape(xp.permute_dims(xp.reshape(H, (k, rows, k, s)), (2, 1, 0, 3)), (k, rows, r))  # (j, b, (n, t))
    Y = xp.matmul(G, as_compute(xp, B, cd))                                           # (j, b, o)
    y = xp.reshape(xp.permute_dims(Y, (1, 0, 2)), (*lead, k * ob)) * scaling
    g = _general(Ag, Bg, scaling, cd, xp)
    if g is not None:
        y = y + xp.matmul(xp.matmul(xd, xp.matrix_transpose(g[1])), xp.matrix_transpose(g[0]))
    return y


def forward(
    x: Array,
    W: Array,
    A: Array,
    B: Array,
    Ag: Array | None = None,
    Bg: Array | None = None,
    *,
    scaling: float,
    bias: Array | None = None,
    layer: Layer | LayerKind | str | None = None,
    dropout: Callable[[Array], Array] | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int | None = None,
    peft_compat: bool = False,
) -> Array:
    """The unmerged adapted layer ``base(x) + adapter_output(x)``; x ``(..., in)``.

    Computed in float32 (float64 for float64 inputs) and rounded once to the result dtype of ``x`` and ``W``;
    ``peft_compat=True`` rounds as PEFT does: the base output, then each adapter term (the block part, the
    hybrid part), to that dtype before adding. The conv keywords must keep their defaults (see
    :mod:`peftmath.layers`, "Conv keywords").

    >>> import numpy as np
    >>> A = np.ones((2, 1, 2)); B = np.array([[[1.0], [2.0]], [[3.0], [4.0]]])
    >>> forward(np.array([[1.0, 2.0]]), np.zeros((2, 2)), A, B, scaling=0.5)
    array([[2.5, 5.5]])
    """
    xp = namespace(x, W, A, B, Ag, Bg, bias, where="gralora.forward")
    lay = _layer(layer, W, A, B, "gralora.forward")
    lay.check_weight(W)
    lay.check_bias(bias)
    lay.for_input(x, "gralora.forward", groups=groups, stride=stride, padding=padding, dilation=dilation)
    _check("gralora.forward", lay, A, B, Ag, Bg)
    out_dtype = xp.result_type(x.dtype, W.dtype)
    cd = compute_dtype(xp, out_dtype, *(t.dtype for t in (A, B, Ag, Bg) if t is not None))
    xc = as_compute(xp, x, cd)
    base = lay.base_forward(xc, as_compute(xp, W, cd), None if bias is None else as_compute(xp, bias, cd), xp)
    if not peft_compat:
        return as_compute(xp, base + adapter_output(xc, A, B, Ag, Bg, scaling=scaling, dropout=dropout, dtype=cd),
                          out_dtype)

    def rounded(t: Array) -> Array:
        return as_compute(xp, as_compute(xp, t, out_dtype), cd)

    # PEFT: result = base(x); result += c · block(x).to(dtype); result += c · hybrid(x).to(dtype)
    result = rounded(base)
    result = rounded(result + rounded(scaling * rounded(adapter_output(xc, A, B, scaling=1.0, dropout=dropout,
                                                                       dtype=cd))))
    if Ag is not None:
        hyb = xp.matmul(xp.matmul(xc if dropout is None else dropout(xc), xp.matrix_transpose(as_compute(xp, Ag, cd))),
                        xp.matrix_transpose(as_compute(xp, Bg, cd)))
        result = rounded(result + rounded(scaling * rounded(hyb)))
    return as_compute(xp, result, out_dtype)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge (specs/gralora.md, "4. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def _block_kernel(A: Array, B: Array, Ag: Array | None, Bg: Array | None, *, scaling: float, cd: Any,
                  xp: Any) -> Callable[[Array], bool]:
    """The in-place ``M += c·ΔW`` on the ``(out, in)`` matrix view ``M``, per row tile (about 4 MiB, half
    precision widened to ``cd`` and rounded once): each block row ``j`` a tile meets gets the ``k`` products
    ``P[j, n][rows] @ Q[j, n]`` added into its column blocks, then the hybrid ``c·B_g[rows] @ A_g``.

    Each product goes through the backend's gemm with ``beta = 1`` (:meth:`~peftmath.backends.Backend.addmm_`)
    straight into the block where the backend takes that view (torch: any view; NumPy: a contiguous one, i.e.
    ``k = 1`` or the hybrid term on C-ordered rows), else (and on the widened tiles of a half-precision weight)
    NumPy's product goes into one reused buffer of a tile's block that is then added, another library's
    ``xp.matmul`` product is added. Never a temporary of W's size, and
    ``out·in·(r/k + h)`` multiply-adds, PEFT's ``out·in·(r + h)`` less the scattered zeros."""
    P, Q = block_factors(A, B, scaling=scaling, dtype=cd)
    k, ob, ib = int(P.shape[0]), int(P.shape[2]), int(Q.shape[3])
    g = _general(Ag, Bg, scaling, cd, xp)
    be = backend_for(xp)
    reused: list[Array] = []  # one buffer for every block of every tile (a fresh one per block costs page faults)

    def add_product(target: Array, p: Array, q: Array, view: bool) -> None:
        if view and be.addmm_(target, p, q, 1.0):  # only ever on a view of the caller's memory (or its private copy)
            return
        if isinstance(target, np.ndarray) and isinstance(p, np.ndarray) and isinstance(q, np.ndarray):
            size = int(p.shape[0]) * int(q.shape[1])
            if not reused or reused[0].size < size or reused[0].dtype != target.dtype:
                reused[:] = [np.empty(size, dtype=target.dtype)]
            target += np.matmul(p, q, out=reused[0][:size].reshape(int(p.shape[0]), int(q.shape[1])))
            return
        target += xp.matmul(p, q)

    def kernel(M: Array) -> bool:
        view = M.dtype == cd  # the tiles are views of M; else widened copies, which the backend's gemm never gets

        def update(T: Array, r0: int, r1: int) -> None:
            for j in range(r0 // ob, -(-r1 // ob)):
                a, b = max(r0, j * ob), min(r1, (j + 1) * ob)
                for n in range(k):
                    add_product(T[a - r0:b - r0, n * ib:(n + 1) * ib], P[j, n, a - j * ob:b - j * ob, :], Q[j, n, ...],
                                view)
            if g is not None:
                add_product(T, g[0][r0:r1, :], g[1], view)

        in_row_tiles(xp, M, cd, update, tile_full=True)
        return True

    return kernel


def _apply(W: Array, A: Array, B: Array, Ag: Array | None, Bg: Array | None, *, scaling: float, sign: int,
           layer: Layer | LayerKind | str | None, copy: bool, safe: bool, peft_compat: bool, where: str) -> Array:
    xp = namespace(W, A, B, Ag, Bg, where=where)
    lay = _layer(layer, W, A, B, where)
    lay.check_weight(W)
    _check(where, lay, A, B, Ag, Bg)  # before anything is written
    cd = compute_dtype(xp, W.dtype, *(t.dtype for t in (A, B, Ag, Bg) if t is not None))
    c = scaling * sign

    def delta() -> Array:
        d = delta_matrix(A, B, Ag, Bg, scaling=c, dtype=cd)
        if peft_compat:
            d = _compat_round(xp, A, d)
        return lay.from_matrix(d, xp)

    use_kernel = not (peft_compat and is_low_precision(A.dtype))
    kernel = _block_kernel(A, B, Ag, Bg, scaling=c, cd=cd, xp=xp) if use_kernel else None
    return apply_delta(where, W, delta, sign=1, copy=copy, safe=safe, layer=lay, inplace_kernel=kernel, xp=xp)


def merge(W: Array, A: Array, B: Array, Ag: Array | None = None, Bg: Array | None = None, *, scaling: float,
          layer: Layer | LayerKind | str | None = None, copy: bool = True, safe: bool = False,
          peft_compat: bool = False) -> Array:
    """``W + ΔW``, formed in float32 (float64) and rounded once to ``W``'s dtype. ``copy=False`` writes into
    ``W`` (the block kernel, no temporary of W's size); ``copy=True`` runs it on one private copy.
    ``peft_compat=True`` rounds ΔW to half-precision factors' dtype first, as PEFT does.

    >>> import numpy as np
    >>> W = np.zeros((2, 2), dtype=np.float32)
    >>> A = np.ones((2, 1, 2), np.float32); B = np.array([[[1.0], [2.0]], [[3.0], [4.0]]], np.float32)
    >>> merge(W, A, B, scaling=0.5, copy=False) is W, W
    (True, array([[0.5, 1. ],
           [1.5, 2. ]], dtype=float32))
    """
    return _apply(W, A, B, Ag, Bg, scaling=scaling, sign=1, layer=layer, copy=copy, safe=safe,
                  peft_compat=peft_compat, where="gralora.merge")


def unmerge(W: Array, A: Array, B: Array, Ag: Array | None = None, Bg: Array | None = None, *, scaling: float,
            layer: Layer | LayerKind | str | None = None, copy: bool = True, peft_compat: bool = False) -> Array:
    """``W − ΔW``, the inverse of :func:`merge` up to the rounding of the sum (same keywords)."""
    return _apply(W, A, B, Ag, Bg, scaling=scaling, sign=-1, layer=layer, copy=copy, safe=False,
                  peft_compat=peft_compat, where="gralora.unmerge")


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/gralora.md, "5. Initialisation")
# --------------------------------------------------------------------------------------------------
def init_weights(layer: Layer, r: int, k: int, hybrid_r: int = 0, *, init: bool = True,
                 seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                 dtype: Any = None) -> dict[str, Array]:
    """The module's tensors (:func:`parameter_shapes`), host-seeded with PEFT's distributions: each block's
    ``A`` kaiming-uniform ``U(±1/sqrt(in/k))`` and the hybrid ``A_g`` ``U(±1/sqrt(in))``; ``init=True``: every
    ``B`` zero (a no-op); ``False``: ``B`` kaiming-uniform too, ``U(±1/sqrt(r))`` and ``U(±1/sqrt(h))``.

    >>> p = init_weights(Layer.of((6, 8)), 4, 2)
    >>> {key: a.shape for key, a in p.items()}, bool(abs(p["gralora_A"]).max() <= 0.5), float(abs(p["gralora_B"]).max())
    ({'gralora_A': (2, 4, 4), 'gralora_B': (2, 4, 3)}, True, 0.0)
    """
    if xp is None:
        import array_api_compat.numpy as xp
    shapes = parameter_shapes(layer.out_features, layer.in_features, r, k, hybrid_r, where="gralora.init_weights")
    rng = host_rng(seed)
    ib = layer.in_features // k

    def uniform(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        bound = kaiming_uniform_bound(fan_in)
        return rng.uniform(-bound, bound, shape)

    host = {KEY_A: uniform(shapes[KEY_A], ib),
            KEY_B: np.zeros(shapes[KEY_B]) if init else uniform(shapes[KEY_B], r)}
    if hybrid_r:
        host[KEY_AG] = uniform(shapes[KEY_AG], layer.in_features)
        host[KEY_BG] = np.zeros(shapes[KEY_BG]) if init else uniform(shapes[KEY_BG], hybrid_r)
    target = dtype if dtype is not None else xp.float32
    out = {}
    for key, a in host.items():
        t = backend_for(xp).from_host(np.ascontiguousarray(a, dtype=np.float32), xp, device)
        out[key] = t if t.dtype == target else xp.astype(t, target)
    return out


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
class GraloraModule(SignedModuleAdapter):
    """GraLoRA on one base module: ``gralora_A``, ``gralora_B`` and, for hybrid GraLoRA,
    ``gralora_A_general.weight`` / ``gralora_B_general.weight``."""

    peft_type = "GRALORA"
    additive = True
    supported_kinds = SUPPORTED_KINDS

    @classmethod
    def initialize(cls, name: str, config: GraloraConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """The module's tensors (``init`` overrides ``config.init_weights``); the base weight is unchanged."""
        require_kind(layer, name, "GraLoRA", SUPPORTED_KINDS, peft=_PEFT_KINDS, error=ShapeError)
        if xp is None and weight is not None:
            xp = namespace(weight)
        flag = config.init_weights if init is None else init
        if not isinstance(flag, bool):
            raise ConfigError(f"{name}: init_weights must be true or false, got {flag!r}")
        params = init_weights(layer, config.r, config.gralora_k, config.hybrid_r, init=flag, seed=seed, xp=xp,
                              device=device, dtype=dtype)
        return params, None

    @classmethod
    def infer_layer(cls, name: str, config: GraloraConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """The tensors give ``in = k·(in/k)`` and ``out = k·(out/k)``: a 2-D weight ``(out, in)`` is a Linear,
        ``(in, out)`` a Conv1D; a square one follows ``kind``, else the config's ``fan_in_fan_out``."""
        missing = [key for key in (KEY_A, KEY_B) if key not in params]
        if missing:
            raise ShapeError(f"{name}: the adapter has no {' / '.join(missing)} for this module (found {sorted(params)})")
        A, B = params[KEY_A], params[KEY_B]
        inn, out = int(A.shape[0]) * int(A.shape[1]), int(B.shape[0]) * int(B.shape[-1])
        if weight_shape is None:
            k = LayerKind.parse(kind) if kind is not None else (
                LayerKind.CONV1D_TRANSPOSED if config.fan_in_fan_out else LayerKind.LINEAR)
            return Layer(k, (inn, out) if k is LayerKind.CONV1D_TRANSPOSED else (out, inn))
        shape = tuple(int(s) for s in weight_shape)
        if kind is not None or len(shape) != 2:
            return Layer.of(shape, kind)
        if shape == (out, inn) and (out != inn or not config.fan_in_fan_out):
            return Layer(LayerKind.LINEAR, shape)
        if shape == (inn, out):
            return Layer(LayerKind.CONV1D_TRANSPOSED, shape)
        raise ShapeError(f"{name}: base weight {shape} is neither (out, in) = {(out, inn)} nor (in, out) of the "
                         f"GraLoRA tensors; does the adapter belong to this model?")

    #: ``scaled(c)`` multiplies this (PEFT's ``scale_layer`` is not defined for GraLoRA)
    scaling: float = 1.0

    def validate(self) -> None:
        require_kind(self.layer, self.name, "GraLoRA", SUPPORTED_KINDS, peft=_PEFT_KINDS, error=ShapeError)
        unknown = sorted(set(self.params) - set(_KEYS))
        if unknown:
            raise ShapeError(f"{self.name}: unexpected GraLoRA tensors {unknown}; GraLoRA has {', '.join(_KEYS)}")
        missing = [key for key in (KEY_A, KEY_B) if key not in self.params]
        if missing:
            raise ShapeError(f"{self.name}: missing {missing} (found {sorted(self.params)})")
        self.A, self.B = self.params[KEY_A], self.params[KEY_B]
        self.Ag, self.Bg = self.params.get(KEY_AG), self.params.get(KEY_BG)
        k, r, h = _check(self.name, self.layer, self.A, self.B, self.Ag, self.Bg)
        cfg = self.config
        if (k, r, h) != (cfg.gralora_k, cfg.r, cfg.hybrid_r):
            raise ShapeError(f"{self.name}: the tensors have gralora_k={k}, r={r}, hybrid_r={h} but the config says "
                             f"gralora_k={cfg.gralora_k}, r={cfg.r}, hybrid_r={cfg.hybrid_r} (the scale "
                             f"alpha / (r + hybrid_r) comes from the config); does the config belong to this adapter?")

    def scaled(self, c: float) -> "ModuleAdapter":
        """Scale ``c``: ``alpha / (r + h) → c · alpha / (r + h)``, so ``ΔW → c·ΔW``."""
        return self.scale_scaling(c)

    @property
    def s(self) -> float:
        """The scale in use: ``alpha / (r + hybrid_r)`` times :meth:`scaled`'s factor."""
        return self.config.scaling * self.scaling

    def _args(self) -> tuple:
        return self.A, self.B, self.Ag, self.Bg

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        return delta_weight(*self._args(), scaling=self.s, layer=self.layer, peft_compat=peft_compat)

    def _apply(self, weight: Array, sign: int, *, copy: bool, safe: bool, peft_compat: bool) -> Array:
        """``W ± ΔW`` (:func:`merge` / :func:`unmerge`)."""
        return _apply(weight, *self._args(), scaling=self.s, sign=sign, layer=self.layer, copy=copy, safe=safe,
                      peft_compat=peft_compat, where=self.name)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, kw = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, *self._args(), scaling=self.s, bias=bias, layer=layer, **kw)

    def describe(self) -> dict[str, Any]:
        return {"r": self.config.r, "gralora_k": self.config.gralora_k, "hybrid_r": self.config.hybrid_r,
                "scaling": self.s}


#: checkpoint suffixes of the per-module tensors (ParameterDict entries and the hybrid nn.Linear weights)
PARAMETER_SUFFIXES = _KEYS
Config = GraloraConfig
Module = GraloraModule
#: demo / documentation examples (non-trivial: random B, alpha ≠ r, several blocks, the hybrid part)
EXAMPLES = {
    "GraLoRA": dict(r=4, gralora_k=2, alpha=3, init_weights=False),
    "Hybrid GraLoRA": dict(r=4, gralora_k=4, hybrid_r=2, alpha=5, init_weights=False),
}

#: the method's description (peftmath.methods._contract.Method)
METHOD = Method(
    peft_type=PEFT_TYPE, config=GraloraConfig, module=GraloraModule, spec="specs/gralora.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=SUPPORTED_KINDS, additive=True, init_field="init_weights",
    examples=EXAMPLES,
)
