r"""HiRA: Hadamard high-rank adaptation (Huang et al., ICLR 2025).

A low-rank product ``B A`` does not add to the weight: it *modulates* it element by element, so the
update has the rank of ``W₀ ⊙ (B A)``, up to ``rank(W₀)·r``, not ``r``::

    A: (r, in_flat)     B: (out, r)                       (matrix view of the layer, out × in_flat)
    M  = B A                                              (out, in_flat), the modulation
    ΔW = W₀ ⊙ M                                           (elementwise, in the stored layout)
    merge:    W' = W₀ ⊙ (1 + M)
    unmerge:  W₀ = W' ⊘ (1 + M)                           (refused where some 1 + M is 0)
    forward:  y = base(x) + base_{no bias}(d(x); W₀ ⊙ M)

There is no scaling factor. Stored tensors per layer kind (PEFT's names and shapes)::

    Linear (out, in)          hira_A (r, in)            hira_B (out, r)
    Conv1D (in, out)          hira_A (r, in)            hira_B (out, r)        M stored transposed
    Embedding (V, D)          hira_embedding_A (r, V)   hira_embedding_B (D, r) M stored transposed
    ConvNd (out, in, *k)      hira_A (r, in, *k)        hira_B (out, r, 1, …)  M reshaped to the kernel

The spec (specs/hira.md) derives the unmerge error bound and lists PEFT's differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from .._array import as_compute, compute_dtype, is_low_precision, namespace
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_flags, check_fraction, check_pattern, check_positive_int
from ..errors import ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._base import ROW_TILE_BYTES, MergeResult, ModuleAdapter, check_shape, in_row_tiles, require_kind, write_weight
from ._contract import Method

Array = Any

__all__ = ["HiraConfig", "parameter_shapes", "init_weights", "modulation", "delta_weight", "forward", "merge",
           "unmerge", "HiraModule"]

PEFT_TYPE = "HIRA"
SUPPORTED = (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED, LayerKind.EMBEDDING, LayerKind.CONV1D,
             LayerKind.CONV2D, LayerKind.CONV3D)
_KEYS = ("hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B")


# --------------------------------------------------------------------------------------------------
# Config (specs/hira.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class HiraConfig(TunerConfig):
    """PEFT's ``HiraConfig`` (``peft_type: "HIRA"``). ``rank_pattern`` is kept but, as in PEFT 0.21.2
    (whose ``dispatch_default`` reads ``config.r``), new modules get rank ``r``; a loaded module's rank is
    that of its tensors. ``init_weights``: True (kaiming-uniform ``A``,
    ``B = 0``: a no-op), ``"gaussian"`` (``A ~ N(0, 1/r²)``, ``B = 0``) or False (both ``N(0, 1)``)."""

    peft_type: ClassVar[str] = "HIRA"

    r: int = 32
    hira_dropout: float = 0.0
    fan_in_fan_out: bool = False
    init_weights: bool | str | None = True
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "r", self.r)
        check_pattern(source, "rank_pattern", self.rank_pattern or {})
        for name, value in (self.rank_pattern or {}).items():
            check_positive_int(source, f"rank_pattern[{name!r}]", value)
        check_fraction(source, "hira_dropout", self.hira_dropout)
        check_flags(source, self, "fan_in_fan_out")
        if not (self.init_weights in (True, False, None) or (isinstance(self.init_weights, str)
                                                              and self.init_weights.lower() == "gaussian")):
            raise ConfigError(f"{source}: field 'init_weights' must be true, false or \"gaussian\", "
                              f"got {self.init_weights!r}")


# --------------------------------------------------------------------------------------------------
# Shapes (specs/hira.md, "2. Shapes")
# --------------------------------------------------------------------------------------------------
def check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "HiRA", SUPPORTED, grouped="PEFT refuses it too")


def _keys(layer: Layer) -> tuple[str, str]:
    return ("hira_embedding_A", "hira_embedding_B") if layer.kind is LayerKind.EMBEDDING else ("hira_A", "hira_B")


def parameter_shapes(layer: Layer, r: int) -> dict[str, tuple[int, ...]]:
    """``{A key: shape, B key: shape}`` of a rank-``r`` HiRA adapter on ``layer`` (module docstring)."""
    ka, kb = _keys(layer)
    if layer.kind.is_conv:
        return {ka: (r, layer.weight_shape[1], *layer.kernel_size), kb: (layer.out_features, r, *(1,) * len(layer.kernel_size))}
    return {ka: (r, layer.in_features), kb: (layer.out_features, r)}


def _check(where: str, layer: Layer, A: Array, B: Array) -> int:
    ka, kb = _keys(layer)
    r = int(A.shape[0]) if A.ndim else 0
    for key, arr, want in zip((ka, kb), (A, B), parameter_shapes(layer, r).values()):
        check_shape(where, key, arr, want)
    return r


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/hira.md, "3. Initialisation")
# --------------------------------------------------------------------------------------------------
def init_weights(layer: Layer, r: int, *, init: bool | str | None = True, seed: int | np.random.Generator | None = 0,
                 xp: Any = None, device: Any = None, dtype: Any = None) -> dict[str, Array]:
    """Fresh ``{A, B}`` for ``layer`` drawn on the host from ``seed`` (PEFT's distributions).

    Linear / Conv1D / ConvNd: ``init=True`` kaiming-uniform ``A ~ U(±1/sqrt(in_flat))``, ``B = 0``;
    ``"gaussian"`` ``A ~ N(0, 1/r²)`` (a convolution reads it as True, as PEFT does), ``B = 0``;
    False: ``A, B ~ N(0, 1)``. Embedding: any true value gives ``A = 0``, ``B ~ N(0, 1)``; False both
    ``N(0, 1)``.

    >>> p = init_weights(Layer.of((3, 5)), 2)
    >>> p["hira_A"].shape, p["hira_B"].shape, float(abs(p["hira_B"]).max())
    ((2, 5), (3, 2), 0.0)
    """
    check_kind(layer, "hira.init_weights")
    if xp is None:
        import array_api_compat.numpy as xp
    rng = host_rng(seed)
    (ka, sa), (kb, sb) = parameter_shapes(layer, r).items()
    if init is False:
        A, B = rng.standard_normal(sa), rng.standard_normal(sb)
    elif layer.kind is LayerKind.EMBEDDING:
        A, B = np.zeros(sa), rng.standard_normal(sb)
    elif isinstance(init, str) and init.lower() == "gaussian" and not layer.kind.is_conv:
        A, B = rng.normal(0.0, 1.0 / r, sa), np.zeros(sb)
    elif init is True or init is None or isinstance(init, str):
        if isinstance(init, str) and init.lower() != "gaussian":
            raise ConfigError(f"hira.init_weights: unknown initialisation {init!r}; use true, false or \"gaussian\"")
        bound = 1.0 / math.sqrt(math.prod(sa[1:]))
        A, B = rng.uniform(-bound, bound, sa), np.zeros(sb)
    else:
        raise ConfigError(f"hira.init_weights: unknown initialisation {init!r}; use true, false or \"gaussian\"")
    put = backend_for(xp).from_host
    target = dtype if dtype is not None else xp.float32
    return {k: xp.astype(put(np.ascontiguousarray(v, dtype=np.float32), xp, device), target) for k, v in ((ka, A), (kb, B))}


# --------------------------------------------------------------------------------------------------
# Modulation and delta weight (specs/hira.md, "4. Modulation, delta, forward")
# --------------------------------------------------------------------------------------------------
def modulation(A: Array, B: Array, layer: Layer, *, dtype: Any = None, peft_compat: bool = False) -> Array:
    """``M = B A`` in the stored layout of ``layer``'s weight, in ``dtype`` (default float32, float64
    for float64 factors). ``peft_compat=True`` rounds ``M`` to the factors' dtype when they are half
    precision (PEFT computes it in float32 on the CPU and casts back).

    >>> import numpy as np
    >>> modulation(np.array([[1.0, 2.0]]), np.array([[3.0]]), Layer.of((1, 2)))
    array([[3., 6.]])
    """
    xp = namespace(A, B, where="hira.modulation")
    cd = dtype or compute_dtype(xp, A.dtype, B.dtype)
    r = int(A.shape[0])
    m = xp.matmul(xp.reshape(as_compute(xp, B, cd), (layer.out_features, r)),
                  xp.reshape(as_compute(xp, A, cd), (r, layer.matrix_shape[1])))
    if peft_compat and is_low_precision(A.dtype):
        m = as_compute(xp, xp.astype(m, A.dtype), cd)
    return layer.from_matrix(m, xp)


def delta_weight(W: Array, A: Array, B: Array, *, layer: Layer | LayerKind | str | None = None,
                 peft_compat: bool = False) -> Array:
    """``ΔW = W₀ ⊙ M`` in ``W``'s stored layout, in float32 (float64 for float64 inputs).

    >>> import numpy as np
    >>> delta_weight(np.array([[2.0, -1.0]]), np.array([[1.0, 2.0]]), np.array([[3.0]]))
    array([[ 6., -6.]])
    """
    xp = namespace(W, A, B, where="hira.delta_weight")
    lay = Layer.for_weight(layer, W)
    check_kind(lay, "hira.delta_weight")
    _check("hira.delta_weight", lay, A, B)
    cd = compute_dtype(xp, W.dtype, A.dtype, B.dtype)
    return as_compute(xp, W, cd) * modulation(A, B, lay, dtype=cd, peft_compat=peft_compat)


# --------------------------------------------------------------------------------------------------
# Forward (specs/hira.md, "4. Modulation, delta, forward")
# --------------------------------------------------------------------------------------------------
def forward(x: Array, W: Array, A: Array, B: Array, *, bias: Array | None = None,
            layer: Layer | LayerKind | str | None = None, dropout: Callable[[Array], Array] | None = None,
            stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int | None = None) -> Array:
    """``base(x; W₀, b) + base(d(x); W₀ ⊙ M, no bias)``, formed in float32 (float64) and rounded once
    to the result type of ``x`` and ``W``. ``dropout`` acts on the adapter's input (PEFT's
    ``hira_dropout``; not applied to an Embedding, as in PEFT). Conv keywords: :mod:`peftmath.layers`.

    >>> import numpy as np
    >>> forward(np.array([[1.0, 1.0]]), np.array([[2.0, -1.0]]), np.array([[1.0, 2.0]]), np.array([[3.0]]))
    array([[1.]])
    """
    xp = namespace(x, W, A, B, bias, where="hira.forward")
    lay = Layer.for_weight(layer, W)
    check_kind(lay, "hira.forward")
    lay.check_bias(bias)
    lay, conv = lay.for_input(x, "hira.forward", groups=groups, stride=stride, padding=padding, dilation=dilation)
    check_kind(lay, "hira.forward")
    _check("hira.forward", lay, A, B)
    out_dtype = W.dtype if lay.kind is LayerKind.EMBEDDING else xp.result_type(x.dtype, W.dtype)
    cd = compute_dtype(xp, out_dtype, A.dtype, B.dtype)
    Wc = as_compute(xp, W, cd)
    dW = Wc * modulation(A, B, lay, dtype=cd)
    if lay.kind is LayerKind.EMBEDDING:
        return as_compute(xp, lay.base_forward(x, Wc, None, xp) + lay.base_forward(x, dW, None, xp), out_dtype)
    xc = as_compute(xp, x, cd)
    base = lay.base_forward(xc, Wc, None if bias is None else as_compute(xp, bias, cd), xp, **conv)
    hira = lay.base_forward(xc if dropout is None else dropout(xc), dW, None, xp, **conv)
    return as_compute(xp, base + hira, out_dtype)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge (specs/hira.md, "5. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def _factor(W: Array, A: Array, B: Array, lay: Layer, peft_compat: bool) -> tuple[Any, Array]:
    xp = namespace(W, A, B)
    cd = compute_dtype(xp, W.dtype, A.dtype, B.dtype)
    return cd, modulation(A, B, lay, dtype=cd, peft_compat=peft_compat)


def merge(W: Array, A: Array, B: Array, *, layer: Layer | LayerKind | str | None = None, copy: bool = True,
          safe: bool = False, peft_compat: bool = False, where: str = "hira.merge") -> Array:
    """``W₀ ⊙ (1 + M)``, formed in float32 (float64) and rounded once to ``W``'s dtype.

    ``peft_compat=True`` forms PEFT's ``W₀ + round(W₀ ⊙ round(M))`` instead (``M`` and the product rounded
    to ``W``'s dtype, then the sum: three roundings in half precision, two in float32): bit-identical to PEFT
    for float32 and bfloat16. ``copy=False`` writes into ``W``.

    >>> import numpy as np
    >>> merge(np.array([[2.0, -1.0]]), np.array([[1.0, 2.0]]), np.array([[3.0]]))
    array([[ 8., -7.]])
    """
    xp = namespace(W, A, B, where=where)
    lay = Layer.for_weight(layer, W)
    check_kind(lay, where)
    _check(where, lay, A, B)

    def compute() -> Array:
        cd, m = _factor(W, A, B, lay, peft_compat)
        Wc = as_compute(xp, W, cd)
        if peft_compat:  # torch rounds B·A, then W ⊙ round(B·A), then the sum, each to W's dtype
            return Wc + as_compute(xp, xp.astype(Wc * as_compute(xp, xp.astype(m, W.dtype), cd), W.dtype), cd)
        return Wc * (1 + m)

    kernel = None if peft_compat else _tile_kernel(W, A, B, lay, lambda T, q: _mul(T, q))
    return write_weight(where, W, compute, layer=lay, kernel=kernel, copy=copy, safe=safe, xp=xp)


def _mul(T: Array, q: Array) -> None:
    T *= q


def _div(T: Array, q: Array) -> None:
    T /= q


def _row_factors(W: Array, A: Array, B: Array, lay: Layer) -> tuple[Any, Any, Array, Array]:
    """``(xp, cd, B₂, A₂)``: the factors as the ``(out, r)`` and ``(r, in_flat)`` matrices in the compute dtype,
    so that rows ``r0:r1`` of ``1 + M`` (matrix layout) are ``1 + B₂[r0:r1] @ A₂``."""
    xp = namespace(W, A, B)
    cd = compute_dtype(xp, W.dtype, A.dtype, B.dtype)
    r = int(A.shape[0])
    return (xp, cd, xp.reshape(as_compute(xp, B, cd), (lay.out_features, r)),
            xp.reshape(as_compute(xp, A, cd), (r, lay.matrix_shape[1])))


def _tile_kernel(W: Array, A: Array, B: Array, lay: Layer, op: Callable[[Array, Array], None]):
    """The in-place kernel ``M ← op(M, 1 + B₂A₂)`` on the matrix view, per row tile (a product of the tile's
    size, never of W's; half precision widened and rounded once, :func:`~peftmath.methods._base.in_row_tiles`)."""
    xp, cd, B2, A2 = _row_factors(W, A, B, lay)
    reused: list[np.ndarray] = []  # NumPy: one tile buffer for every tile (a fresh one per tile costs page faults)

    def update(T: Array, r0: int, r1: int) -> None:
        if isinstance(T, np.ndarray) and isinstance(B2, np.ndarray) and isinstance(A2, np.ndarray):
            if not reused:
                reused.append(np.empty((r1 - r0, A2.shape[1]), dtype=T.dtype))
            q = reused[0][: r1 - r0]
            np.matmul(B2[r0:r1, ...], A2, out=q)
        else:
            q = xp.matmul(B2[r0:r1, ...], A2)
        q += 1  # in place: one temporary of the tile's size
        op(T, q)

    def kernel(M: Array) -> bool:
        in_row_tiles(xp, M, cd, update, tile_full=True)
        return True

    return kernel


def _count_zeros(W: Array, A: Array, B: Array, lay: Layer) -> int:
    """How many entries of ``1 + B₂A₂`` are 0, one row tile at a time (no array of W's size)."""
    xp, cd, B2, A2 = _row_factors(W, A, B, lay)
    rows = max(1, ROW_TILE_BYTES // (4 * max(1, lay.matrix_shape[1])))
    n = lay.out_features
    if isinstance(B2, np.ndarray) and isinstance(A2, np.ndarray):  # one reused tile buffer
        buf = np.empty((min(rows, n), A2.shape[1]), dtype=B2.dtype)
        total = 0
        for r0 in range(0, n, rows):
            q = buf[: min(r0 + rows, n) - r0]
            np.matmul(B2[r0:r0 + q.shape[0], ...], A2, out=q)
            total += int(np.count_nonzero(q == -1))  # 1 + q == 0 exactly when q == -1 (Sterbenz: 1 + q is exact there)
        return total
    return sum(int(xp.sum(xp.astype(1 + xp.matmul(B2[r0:min(r0 + rows, n), ...], A2) == 0, xp.int64)))
               for r0 in range(0, n, rows))


def unmerge(W: Array, A: Array, B: Array, *, layer: Layer | LayerKind | str | None = None, copy: bool = True,
            where: str = "hira.unmerge") -> Array:
    """``W' ⊘ (1 + M)``, the inverse of :func:`merge` within ``2u|W₀|`` per entry (``u`` the unit
    roundoff of the compute dtype; specs/hira.md derives it).

    Raises :class:`NotInvertibleError`, writing nothing, where some entry of ``1 + M`` is 0: merging
    sent that weight to 0 and nothing recovers it (PEFT unmerges from a saved copy of ``W₀``).
    """
    xp = namespace(W, A, B, where=where)
    lay = Layer.for_weight(layer, W)
    check_kind(lay, where)
    _check(where, lay, A, B)

    def refuse(zero: int) -> None:
        if zero:
            raise NotInvertibleError(
                f"{where}: 1 + B·A is 0 in {zero} of {math.prod(lay.weight_shape)} entries of the {lay.kind.value} "
                f"weight {lay.weight_shape}: merging set those weights to 0, so W₀ cannot be recovered from the "
                f"merged weight; keep a copy of the base weight (PEFT unmerges from its saved copy)")

    def compute() -> Array:
        cd, m = _factor(W, A, B, lay, False)
        return as_compute(xp, W, cd) / (1 + m)

    if copy and isinstance(W, np.ndarray):
        # one pass: the kernel divides a private copy tile by tile and counts the zeros of 1 + M on the way;
        # W is never written, so the refusal can come after (where the kernel did not run, count them then)
        zeros: list[int] = []

        def div_count(T: Array, q: Array) -> None:
            zeros.append(int(np.count_nonzero(q == 0)))
            with np.errstate(divide="ignore", invalid="ignore"):
                T /= q

        out = write_weight(where, W, compute, layer=lay, kernel=_tile_kernel(W, A, B, lay, div_count), copy=True,
                           xp=xp)
        refuse(sum(zeros) if zeros else _count_zeros(W, A, B, lay))
        return out
    refuse(_count_zeros(W, A, B, lay))
    return write_weight(where, W, compute, layer=lay, kernel=_tile_kernel(W, A, B, lay, _div), copy=copy, xp=xp)


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
class HiraModule(ModuleAdapter):
    """HiRA on one base module. Additive in PEFT's sense (``W' = W₀ + ΔW``), but ``ΔW = W₀ ⊙ B A``
    depends on the base weight: :meth:`delta_weight` needs it (``weight=``)."""

    peft_type = "HIRA"
    #: no delta_weight() without the base weight (ΔW = W₀ ⊙ B A); callers that ask modules generically skip it
    additive = False
    supported_kinds = SUPPORTED

    @classmethod
    def initialize(cls, name: str, config: HiraConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """Fresh ``{A, B}`` of rank ``config.r`` for module ``name`` (``init`` overrides
        ``config.init_weights``; ``rank_pattern`` is not applied, as in PEFT 0.21.2, so that PEFT loads the
        result); the base weight is not changed."""
        check_kind(layer, name)
        if xp is None and weight is not None:
            xp = namespace(weight)
        return init_weights(layer, config.r, init=config.init_weights if init is None else init, seed=seed, xp=xp,
                            device=device, dtype=dtype), None

    @classmethod
    def infer_layer(cls, name: str, config: HiraConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """The layer from the base weight shape (and ``kind``): Embedding when the tensors are
        ``hira_embedding_*``; a square 2-D weight follows ``kind``, else ``fan_in_fan_out``."""
        emb = "hira_embedding_A" in params
        if weight_shape is None:
            A, B = (params.get(k) for k in (("hira_embedding_A", "hira_embedding_B") if emb else ("hira_A", "hira_B")))
            if A is None or B is None:
                raise ShapeError(f"{name}: HiRA needs hira_A/hira_B or hira_embedding_A/B, found {sorted(params)}")
            if emb:
                return Layer(LayerKind.EMBEDDING, (int(A.shape[1]), int(B.shape[0])))
            if A.ndim > 2:
                raise ShapeError(f"{name}: pass the base weight shape (weight_shape=...) for a convolution")
            shape = (int(B.shape[0]), int(A.shape[1]))
            return Layer(LayerKind.CONV1D_TRANSPOSED, shape[::-1]) if config.fan_in_fan_out else Layer(LayerKind.LINEAR, shape)
        shape = tuple(int(s) for s in weight_shape)
        if emb:
            return Layer(LayerKind.EMBEDDING, shape)
        if kind is not None or len(shape) != 2:
            return Layer.of(shape, kind)
        out = int(params["hira_B"].shape[0]) if "hira_B" in params else shape[0]
        if shape[0] == out and (shape[1] != out or not config.fan_in_fan_out):
            return Layer(LayerKind.LINEAR, shape)
        return Layer(LayerKind.CONV1D_TRANSPOSED, shape)

    def scaled(self, c: float) -> "ModuleAdapter":
        """Scale ``c``: ``A → c·A``, so ``M → c·M`` and ``ΔW = W₀ ⊙ M → c·ΔW`` (PEFT defines no scale for HiRA)."""
        if c == 1.0:
            return self
        return self.scale_parameter(_keys(self.layer)[0], lambda a: a * c)

    def validate(self) -> None:
        unknown = sorted(set(self.params) - set(_KEYS))
        if unknown:
            raise ShapeError(f"{self.name}: unexpected HiRA tensors {unknown}; HiRA has {', '.join(_KEYS)}")
        check_kind(self.layer, self.name)
        ka, kb = _keys(self.layer)
        missing = [k for k in (ka, kb) if k not in self.params]
        if missing:
            raise ShapeError(f"{self.name}: missing {missing} for a {self.layer.kind.value} HiRA (found {sorted(self.params)})")
        self.A, self.B = self.params[ka], self.params[kb]
        self.r = _check(self.name, self.layer, self.A, self.B)

    def delta_weight(self, *, peft_compat: bool = False, weight: Array | None = None) -> Array:
        """``W₀ ⊙ B A``: needs the base weight (``weight=``); without it an :class:`UnsupportedError`."""
        if weight is None:
            raise UnsupportedError(
                f"{self.name}: HiRA's ΔW = W₀ ⊙ (B·A) depends on the base weight; pass weight= (the modulation "
                f"B·A alone is modulation(A, B, layer))")
        return delta_weight(weight, self.A, self.B, layer=self.layer, peft_compat=peft_compat)

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        return MergeResult(merge(weight, self.A, self.B, layer=self.layer, copy=copy, safe=safe,
                                 peft_compat=peft_compat, where=self.name), bias)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        return MergeResult(unmerge(weight, self.A, self.B, layer=self.layer, copy=copy, where=self.name), bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, kw = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.A, self.B, bias=bias, layer=layer, **kw)


PARAMETER_SUFFIXES = _KEYS
Config = HiraConfig
Module = HiraModule
#: demo / documentation examples (non-trivial: random A and B)
EXAMPLES = {"HiRA": dict(r=4, init_weights=False)}

#: the method's description (peftmath.methods._contract.Method)
METHOD = Method(
    peft_type=PEFT_TYPE, config=HiraConfig, module=HiraModule, spec="specs/hira.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=SUPPORTED, additive=True, init_field="init_weights",
    examples=EXAMPLES,
)
