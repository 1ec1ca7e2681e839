r"""LoHa: low-rank Hadamard product adaptation (FedPara, Hyeon-Woo et al., 2022; LyCORIS).

The update of a frozen weight ``W`` (matrix view ``(out, in_flat)``, see :mod:`peftmath.layers`) is the
elementwise (Hadamard) product of two rank-``r`` products::

    ΔW = s · (W₁ ⊙ W₂)        W₁ = w1_a @ w1_b,   W₂ = w2_a @ w2_b
    s  = alpha / r             (per module after rank_pattern / alpha_pattern; no rsLoRA)
    y  = base(x) + x ΔWᵀ       (Linear)   or   base(x) + conv(x, ΔW; stride, padding, dilation, groups)

so ``rank(ΔW) ≤ r²`` with ``4·r·(out + in_flat)`` parameters.

Layer kinds and parameter shapes, with ``c_in = in_channels / groups`` and kernel ``k`` (PEFT's keys have
no ``.weight``: they are ``ParameterDict`` entries):

===================================  =================  ==================  ===================
layer                                ``hada_w*_a``      ``hada_w*_b``       ``hada_t*``
===================================  =================  ==================  ===================
Linear ``(out, in)``                 ``(out, r)``       ``(r, in)``         —
Conv1d/2d, matrix form               ``(out, r)``       ``(r, c_in·Πk)``    —
Conv2d, effective (kernel ≠ 1×1)     ``(r, out)``       ``(r, c_in)``       ``(r, r, kH, kW)``
Conv1d, effective (kernel ≠ 1)       ``(r, out)``       ``(r, c_in)``       ``(r, r, k, 1)``
===================================  =================  ==================  ===================

The effective ("CP/Tucker", FedPara Proposition 3) form is chosen by ``use_effective_conv2d=True``; its
factors are::

    W₁[p, q, h, w] = Σ_{i,j} t1[i, j, h, w] · w1_a[i, p] · w1_b[j, q]

Note that ``w1_a`` is ``(r, out)`` there and ``(out, r)`` in the matrix form.

Merge is ``W + ΔW`` and unmerge ``W − ΔW``: exact in real arithmetic, within ``4·eps·(|W| + |ΔW|)`` in
floating point. The in-place merge (``copy=False``) builds ``ΔW`` row block by row block, so no
temporary of W's size exists; ``copy=True`` allocates only the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import numpy as np

from .._array import as_compute, common_device, compute_dtype, namespace
from ..backends import host_rng
from ..config import check_flags
from ..errors import ConfigError, ShapeError
from ..layers import Layer, LayerKind
from ._base import MergeResult, ModuleAdapter, check_shape
from ._contract import Method
# the LyCORIS plumbing LoHa shares with LoKr; every name stays importable from here
from ._lycoris import (  # noqa: F401  (BLOCK_ELEMENTS: loha.BLOCK_ELEMENTS is documented)
    BLOCK_ELEMENTS, SUPPORTED, LycorisConfig, adapted_forward, apply_row_blocks, block_rows, check_kind, cp_weight,
    default_xp, draw_dropout, kaiming, masked, put_host, rank_dropout_mask, round_to_dtype, run_row_tiles, scaling,
    tile_threads, uses_effective_conv,
)

Array = Any

__all__ = [
    "LoHaConfig",
    "scaling",
    "uses_effective_conv",
    "parameter_shapes",
    "cp_weight",
    "delta_matrix",
    "delta_weight",
    "rank_dropout_mask",
    "forward",
    "merge",
    "unmerge",
    "init_weights",
    "apply_row_blocks",
    "LoHaModule",
]

PEFT_TYPE = "LOHA"


# --------------------------------------------------------------------------------------------------
# Config (specs/loha.md, "3. Configuration and scaling")
# --------------------------------------------------------------------------------------------------
@dataclass
class LoHaConfig(LycorisConfig):
    """PEFT's ``LoHaConfig`` (``peft_type: "LOHA"``): fields, names and defaults as in PEFT 0.21.2."""

    peft_type: ClassVar[str] = "LOHA"

    init_weights: bool = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_flags(source, self, "init_weights")


# --------------------------------------------------------------------------------------------------
# Shapes (specs/loha.md, "2. Parameters: names, shapes, counts")
# --------------------------------------------------------------------------------------------------
def _cp_kernel(layer: Layer) -> tuple[int, int]:
    """The 2-D kernel of the CP core: ``(kH, kW)`` for Conv2d, ``(k, 1)`` for Conv1d."""
    k = layer.kernel_size
    return (k[0], k[1]) if len(k) == 2 else (k[0], 1)


def parameter_shapes(layer: Layer, r: int, *, effective: bool = False) -> dict[str, tuple[int, ...]]:
    """Checkpoint suffix -> shape of LoHa's tensors on ``layer``.

    >>> parameter_shapes(Layer.of((6, 5)), 2)["hada_w1_b"]
    (2, 5)
    >>> parameter_shapes(Layer.of((6, 4, 3, 3)), 2, effective=True)["hada_t1"]
    (2, 2, 3, 3)
    """
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"LoHa rank r must be a positive integer, got {r!r}")
    out, in_flat = layer.matrix_shape
    if effective:
        c_in = layer.weight_shape[1]
        t = (r, r, *_cp_kernel(layer))
        return {"hada_w1_a": (r, out), "hada_w1_b": (r, c_in), "hada_w2_a": (r, out), "hada_w2_b": (r, c_in),
                "hada_t1": t, "hada_t2": t}
    return {"hada_w1_a": (out, r), "hada_w1_b": (r, in_flat), "hada_w2_a": (out, r), "hada_w2_b": (r, in_flat)}


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/loha.md, "4. Initialisation")
# --------------------------------------------------------------------------------------------------
def init_weights(
    layer: Layer,
    r: int,
    *,
    init_weights: bool = True,
    effective: bool = False,
    seed: int | np.random.Generator | None = 0,
    xp: Any = None,
    device: Any = None,
    dtype: Any = None,
) -> dict[str, Array]:
    """PEFT's LoHa initialisation, drawn on the host from ``seed``.

    ``True``: ``hada_w2_b = 0`` and every other tensor Kaiming-uniform(a=√5), i.e.
    ``U(±1/sqrt(fan_in))`` with fan-ins ``(out, r) → r``, ``(r, in) → in``, ``(r, out) → out``,
    ``(r, r, kH, kW) → r·kH·kW`` (so ΔW = 0). ``False``: every tensor Kaiming-uniform.

    >>> p = init_weights(Layer.of((6, 5)), 2, seed=0)
    >>> sorted(p), float(abs(p["hada_w2_b"]).max())
    (['hada_w1_a', 'hada_w1_b', 'hada_w2_a', 'hada_w2_b'], 0.0)
    """
    check_kind(layer, "loha.init_weights")
    xp = xp or default_xp()
    rng = host_rng(seed)
    shapes = parameter_shapes(layer, r, effective=effective)
    host = {}
    for key in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"):
        if key not in shapes:
            continue
        if key == "hada_w2_b" and init_weights:
            host[key] = np.zeros(shapes[key])
        else:
            host[key] = kaiming(rng, shapes[key])
    return put_host(host, xp, device, dtype)


# --------------------------------------------------------------------------------------------------
# Delta weight (specs/loha.md, "5. Delta weight")
# --------------------------------------------------------------------------------------------------
def _factor_rows(xp: Any, a: Array, b: Array, t: Array | None, rows: slice, cd: Any, round_to: Any = None) -> Array:
    """Rows ``rows`` of one Hadamard factor as an ``(n_rows, in_flat)`` matrix in ``cd``."""
    if t is None:
        f = xp.matmul(as_compute(xp, a[rows, :], cd), as_compute(xp, b, cd))
        return round_to_dtype(xp, f, round_to)
    f = cp_weight(as_compute(xp, t, cd), as_compute(xp, a[:, rows], cd), as_compute(xp, b, cd))
    f = round_to_dtype(xp, f, round_to)
    return xp.reshape(f, (f.shape[0], -1))


def delta_matrix(
    w1_a: Array,
    w1_b: Array,
    w2_a: Array,
    w2_b: Array,
    *,
    scaling: float,
    t1: Array | None = None,
    t2: Array | None = None,
    rows: slice | None = None,
    dtype: Any = None,
    peft_compat: bool = False,
) -> Array:
    """``s · (W₁ ⊙ W₂)`` as the ``(out, in_flat)`` matrix (or its ``rows``), in float32/float64.

    ``peft_compat=True`` with half-precision factors rounds each intermediate (W₁, W₂, their product,
    the scaled product) to the factors' dtype as PEFT's CPU arithmetic does.
    """
    xp = namespace(w1_a, w1_b, w2_a, w2_b, t1, t2, where="loha")
    pdt = [a.dtype for a in (w1_a, w1_b, w2_a, w2_b, t1, t2) if a is not None]
    cd = dtype or compute_dtype(xp, *pdt)
    rows = rows if rows is not None else slice(None)
    rnd = xp.result_type(*pdt) if peft_compat else None
    f1 = _factor_rows(xp, w1_a, w1_b, t1, rows, cd, rnd)
    f2 = _factor_rows(xp, w2_a, w2_b, t2, rows, cd, rnd)
    return round_to_dtype(xp, round_to_dtype(xp, f1 * f2, rnd) * scaling, rnd)


def _resolve_layer(layer: Layer | LayerKind | str | None, w1_a: Array, w1_b: Array, t1: Array | None,
                   weight: Array | None = None, groups: int = 1) -> Layer:
    if isinstance(layer, Layer):
        return layer
    if weight is not None:
        return Layer.of(tuple(weight.shape), layer, groups=groups)
    kind = LayerKind.parse(layer) if layer is not None else None
    if t1 is not None:  # effective conv: (out, c_in, kH, kW) or (out, c_in, k)
        out, c_in, kh, kw = w1_a.shape[1], w1_b.shape[1], t1.shape[2], t1.shape[3]
        if kind is LayerKind.CONV1D:
            return Layer(kind, (out, c_in, kh), groups)
        return Layer(LayerKind.CONV2D, (out, c_in, kh, kw), groups)
    if kind is not None and kind.is_conv:
        raise ShapeError(f"LoHa: a {kind.value} in matrix form needs the base weight's shape (pass layer=Layer.of(shape))")
    return Layer(kind or LayerKind.LINEAR, (w1_a.shape[0], w1_b.shape[1]))


def _check_params(where: str, layer: Layer, w1_a: Array, w1_b: Array, w2_a: Array, w2_b: Array,
                  t1: Array | None, t2: Array | None) -> int:
    """Check every tensor against ``layer``; return the rank."""
    check_kind(layer, where)
    if (t1 is None) != (t2 is None):
        raise ShapeError(f"{where}: hada_t1 and hada_t2 must both be present (effective conv) or both absent")
    effective = t1 is not None
    if effective and not layer.kind.is_conv:
        raise ShapeError(f"{where}: hada_t1/hada_t2 (effective conv form) on a {layer.kind.value} layer")
    r = int(w1_a.shape[0] if effective else w1_a.shape[-1])
    if w1_a.ndim != 2:
        raise ShapeError(f"{where}: hada_w1_a must be 2-D, got shape {tuple(w1_a.shape)}")
    expected = parameter_shapes(layer, r, effective=effective)
    for key, arr in (("hada_w1_a", w1_a), ("hada_w1_b", w1_b), ("hada_w2_a", w2_a), ("hada_w2_b", w2_b),
                     ("hada_t1", t1), ("hada_t2", t2)):
        if arr is not None:
            check_shape(where, key, arr, expected[key])
    return r


def delta_weight(
    w1_a: Array,
    w1_b: Array,
    w2_a: Array,
    w2_b: Array,
    *,
    scaling: float,
    t1: Array | None = None,
    t2: Array | None = None,
    layer: Layer | LayerKind | str | None = None,
    peft_compat: bool = False,
) -> Array:
    """``ΔW = s · (W₁ ⊙ W₂)`` in the base weight's stored layout, in float32 (float64 for float64).

    ``layer`` is needed for a conv in matrix form (its kernel is not in the factors); otherwise it is
    inferred: a Linear for the matrix form, a Conv2d for the effective form (``layer="Conv1d"`` for a
    Conv1d's ``(r, r, k, 1)`` core).

    >>> import numpy as np
    >>> ones = np.ones((2, 1))
    >>> delta_weight(ones, np.array([[1.0, 2.0, 3.0]]), ones, np.array([[2.0, 2.0, 2.0]]), scaling=0.5)
    array([[1., 2., 3.],
           [1., 2., 3.]])
    """
    xp = namespace(w1_a, w1_b, w2_a, w2_b, t1, t2, where="loha.delta_weight")
    lay = _resolve_layer(layer, w1_a, w1_b, t1)
    _check_params("loha.delta_weight", lay, w1_a, w1_b, w2_a, w2_b, t1, t2)
    d = delta_matrix(w1_a, w1_b, w2_a, w2_b, scaling=scaling, t1=t1, t2=t2, peft_compat=peft_compat)
    return lay.from_matrix(d, xp)


# --------------------------------------------------------------------------------------------------
# Forward, with PEFT's training-time rank and module dropout as options (specs/loha.md, "6. Forward")
# --------------------------------------------------------------------------------------------------
def forward(
    x: Array,
    W: Array,
    w1_a: Array,
    w1_b: Array,
    w2_a: Array,
    w2_b: Array,
    *,
    scaling: float,
    t1: Array | None = None,
    t2: Array | None = None,
    bias: Array | None = None,
    layer: Layer | LayerKind | str | None = None,
    groups: int | None = None,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
    seed: int | np.random.Generator | None = None,
    row_mask: Array | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    peft_compat: bool = False,
) -> Array:
    """The unmerged adapted layer ``base(x) + x ΔWᵀ`` (Linear) or ``base(x) + conv(x, ΔW)`` (Conv).

    ``x`` is ``(..., in)`` for a Linear and ``(N, C_in, *spatial)`` for a conv; ``stride``, ``padding``,
    ``dilation``, ``groups`` are the base conv's, described once in :mod:`peftmath.layers` ("Conv
    keywords"): ``groups`` is inferred from ``x`` (a checkpoint does not record it). The adapter term
    is computed in float32 (float64 for float64) and the sum is rounded once to the base output's dtype.

    Training-time dropout (off by default; PEFT applies it in ``train()`` mode only): with probability
    ``module_dropout`` the adapter is skipped; ``rank_dropout`` multiplies each output row of ΔW by
    ``1[u_o > p] / mean``. Both are drawn from ``seed`` on the host (module first, then rows, as in
    PEFT); ``row_mask`` (shape ``(out,)``) supplies the row factors instead.
    """
    xp = namespace(x, W, w1_a, w1_b, w2_a, w2_b, t1, t2, bias, where="loha.forward")
    lay = _resolve_layer(layer, w1_a, w1_b, t1, W)
    lay.check_weight(W)
    lay, conv_kwargs = lay.for_input(x, "loha.forward", groups=groups, stride=stride, padding=padding,
                                     dilation=dilation)
    _check_params("loha.forward", lay, w1_a, w1_b, w2_a, w2_b, t1, t2)
    keep, mask = draw_dropout(lay.out_features, rank_dropout, module_dropout, seed, True, xp, common_device(W))
    if not keep:
        return as_compute(xp, lay.base_forward(x, W, bias, xp, **conv_kwargs), x.dtype)
    mask = row_mask if row_mask is not None else mask
    cd = compute_dtype(xp, x.dtype, w1_a.dtype, w1_b.dtype, w2_a.dtype, w2_b.dtype)
    d = delta_matrix(w1_a, w1_b, w2_a, w2_b, scaling=scaling, t1=t1, t2=t2, dtype=cd, peft_compat=peft_compat)
    d = masked(xp, lay.from_matrix(d, xp), mask)
    return adapted_forward(x, W, bias, d, lay, xp, **conv_kwargs)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge, row block by row block (specs/loha.md, "7. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def _hada_blocks(w1_a: Array, w1_b: Array, w2_a: Array, w2_b: Array, t1: Array | None, t2: Array | None,
                 s: float, out: int, in_flat: int) -> Callable[[Any], Iterator]:
    def gen(cd: Any) -> Iterator:
        step = block_rows(in_flat)
        if t1 is not None:
            for start in range(0, out, step):
                stop = min(out, start + step)
                yield start, stop, delta_matrix(w1_a, w1_b, w2_a, w2_b, scaling=s, t1=t1, t2=t2,
                                                rows=slice(start, stop), dtype=cd)
            return
        # matrix form: s is folded into w1_a (rounding differs from (W1 ⊙ W2)·s by at most an ulp)
        xp = namespace(w1_a, w1_b, w2_a, w2_b)
        a1, b1 = as_compute(xp, w1_a, cd) * s, as_compute(xp, w1_b, cd)
        a2, b2 = as_compute(xp, w2_a, cd), as_compute(xp, w2_b, cd)
        for start in range(0, out, step):
            stop = min(out, start + step)
            block = xp.matmul(a1[start:stop, :], b1)
            block *= xp.matmul(a2[start:stop, :], b2)  # a fresh temporary: in place is safe
            yield start, stop, block
            del block
    return gen


#: multiply-adds of one rank-r product of a LoHa row tile on NumPy (``rows·n·r``): small enough that
#: BLAS runs it on the calling thread (OpenBLAS threads a gemm above 2¹⁸), the tiles being spread over
#: threads of their own instead
SMALL_PRODUCT = 1 << 18


def _hada_rows_numpy(a1: np.ndarray, b1: np.ndarray, a2: np.ndarray, b2: np.ndarray) -> Callable[..., bool]:
    """``dst = src ± (a1 @ b1) ⊙ (a2 @ b2)`` on NumPy (matrix form; ``s`` already folded into ``a1``).

    Per row tile: ``t1 = a1[rows] @ b1`` and ``t2 = a2[rows] @ b2`` into two buffers reused across tiles
    (``out=``), ``t1 *= t2``, then ``dst[rows] = src[rows] ± t1`` in one pass (half precision or strided
    rows: widened into ``t2``, added, rounded once as they are written). The same operations in the same
    order as the generic row blocks, so the same numbers. A tile has :data:`SMALL_PRODUCT` ``// (n·r)``
    rows (at most :func:`~peftmath.methods._lycoris.block_rows`): its products are small enough that BLAS
    runs them on the calling thread (OpenBLAS threads a gemm above ``m·n·k = 2¹⁸``), and the tiles spread
    over :func:`~peftmath.methods._lycoris.tile_threads` threads of their own — on a busy 2-core machine
    3-10x faster than tiles whose products BLAS threads itself (its threads wait to be scheduled).
    """
    def rows(src: np.ndarray, dst: np.ndarray, cd: Any, sign: int) -> bool:
        n_rows, n = int(src.shape[0]), int(b1.shape[1])
        f1, g1, f2, g2 = (np.ascontiguousarray(x, dtype=cd) for x in (a1, b1, a2, b2))
        step = max(1, min(block_rows(n), SMALL_PRODUCT // max(1, n * int(b1.shape[0]))))
        op = np.add if sign > 0 else np.subtract
        plain = src.dtype == cd and dst.dtype == cd and src.flags.c_contiguous and dst.flags.c_contiguous

        def make_worker(run: int) -> Callable[[int, int], None]:
            t1 = np.empty((min(step, run), n), dtype=cd)
            t2 = np.empty_like(t1)

            def work(start: int, stop: int) -> None:
                t = stop - start
                x1, x2 = t1[:t], t2[:t]
                np.matmul(f1[start:stop], g1, out=x1)
                np.matmul(f2[start:stop], g2, out=x2)
                np.multiply(x1, x2, out=x1)
                if plain:
                    op(src[start:stop].reshape(t, n), x1, out=dst[start:stop].reshape(t, n))
                    return
                np.copyto(x2.reshape((t,) + src.shape[1:]), src[start:stop], casting="unsafe")
                op(x2, x1, out=x2)
                np.copyto(dst[start:stop], x2.reshape((t,) + dst.shape[1:]), casting="unsafe")

            return work

        run_row_tiles(n_rows, step, make_worker, threads=tile_threads())
        return True

    return rows


def _apply(W: Array, w1_a: Array, w1_b: Array, w2_a: Array, w2_b: Array, *, t1: Array | None, t2: Array | None,
           scaling: float, layer: Any, sign: int, copy: bool, safe: bool, peft_compat: bool, where: str) -> Array:
    xp = namespace(W, w1_a, w1_b, w2_a, w2_b, t1, t2, where=where)
    lay = _resolve_layer(layer, w1_a, w1_b, t1, W)
    lay.check_weight(W)
    _check_params(where, lay, w1_a, w1_b, w2_a, w2_b, t1, t2)
    params = [a for a in (w1_a, w1_b, w2_a, w2_b, t1, t2) if a is not None]
    cd = compute_dtype(xp, W.dtype, *(a.dtype for a in params))

    def full() -> Array:
        d = delta_matrix(w1_a, w1_b, w2_a, w2_b, scaling=scaling, t1=t1, t2=t2, dtype=cd, peft_compat=peft_compat)
        return lay.from_matrix(d, xp)

    out, in_flat = lay.matrix_shape
    blocks = _hada_blocks(w1_a, w1_b, w2_a, w2_b, t1, t2, scaling, out, in_flat)
    fast = None
    if t1 is None and all(isinstance(a, np.ndarray) for a in params):
        # s folded into w1_a in cd, as the generic blocks do
        fast = _hada_rows_numpy(as_compute(xp, w1_a, cd) * scaling, w1_b, w2_a, w2_b)
    return apply_row_blocks(where, W, lay, blocks, full, param_dtypes=tuple(a.dtype for a in params), sign=sign,
                            copy=copy, safe=safe, peft_compat=peft_compat, numpy_rows=fast, params=tuple(params))


def merge(
    W: Array,
    w1_a: Array,
    w1_b: Array,
    w2_a: Array,
    w2_b: Array,
    *,
    scaling: float,
    t1: Array | None = None,
    t2: Array | None = None,
    layer: Layer | LayerKind | str | None = None,
    copy: bool = True,
    safe: bool = False,
    peft_compat: bool = False,
) -> Array:
    """``W + ΔW`` (PEFT's ``LycorisLayer.merge``).

    ``copy=False`` updates ``W`` in place and returns it, building ΔW one row block at a time (no
    temporary of W's size); ``copy=True`` allocates only the result. ``safe=True`` refuses a
    non-finite result (:class:`~peftmath.errors.NonFiniteError`) and leaves ``W`` untouched. Every
    element is summed in float32 (float64) and rounded once, which is also what PEFT's
    ``W.data += ΔW`` does with its float32 adapter on a half-precision base; ``peft_compat=True``
    additionally rounds ΔW's intermediates to half-precision factors' dtype, as PEFT computes them.

    >>> import numpy as np
    >>> W = np.zeros((2, 3), dtype=np.float32); ones = np.ones((2, 1), dtype=np.float32)
    >>> b = np.full((1, 3), 2.0, dtype=np.float32)
    >>> merge(W, ones, b, ones, b, scaling=0.25, copy=False) is W, W[0]
    (True, array([1., 1., 1.], dtype=float32))
    """
    return _apply(W, w1_a, w1_b, w2_a, w2_b, t1=t1, t2=t2, scaling=scaling, layer=layer, sign=1, copy=copy,
                  safe=safe, peft_compat=peft_compat, where="loha.merge")


def unmerge(
    W: Array,
    w1_a: Array,
    w1_b: Array,
    w2_a: Array,
    w2_b: Array,
    *,
    scaling: float,
    t1: Array | None = None,
    t2: Array | None = None,
    layer: Layer | LayerKind | str | None = None,
    copy: bool = True,
    peft_compat: bool = False,
) -> Array:
    """``W − ΔW``, the inverse of :func:`merge` (same keywords; PEFT's ``LycorisLayer.unmerge``)."""
    return _apply(W, w1_a, w1_b, w2_a, w2_b, t1=t1, t2=t2, scaling=scaling, layer=layer, sign=-1, copy=copy,
                  safe=False, peft_compat=peft_compat, where="loha.unmerge")


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint: the functions above bound to a ModuleAdapter
# --------------------------------------------------------------------------------------------------
_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


class LoHaModule(ModuleAdapter):
    """LoHa on one base module (Linear, Conv1d or Conv2d; matrix or effective-conv form)."""

    peft_type = "LOHA"
    supported_kinds = SUPPORTED

    @classmethod
    def initialize(cls, name: str, config: LoHaConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """Fresh parameters for module ``name`` (``init`` overrides ``config.init_weights``); the base
        weight is never changed (second item ``None``)."""
        check_kind(layer, name)
        r, _ = config.rank_and_alpha(name)
        if xp is None and weight is not None:
            xp = namespace(weight)
        params = init_weights(layer, r, init_weights=config.init_weights if init is None else init,
                              effective=uses_effective_conv(layer, config.use_effective_conv2d), seed=seed, xp=xp,
                              device=device, dtype=dtype)
        return params, None

    @classmethod
    def infer_layer(cls, name: str, config: LoHaConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """The layer of ``name`` from its base weight shape (and ``kind``), else from the tensors.

        A 2-D weight is a Linear; ``kind="Conv1D"`` (transformers) raises :class:`UnsupportedError`.
        A conv in matrix form needs ``weight_shape`` (the kernel is not in the tensors).
        """
        for key in ("hada_w1_a", "hada_w1_b"):
            if key not in params:
                raise ShapeError(f"{name}: missing {key} (found {sorted(params)})")
        if weight_shape is not None:
            layer = Layer.of(tuple(weight_shape), kind)
        else:
            try:
                layer = _resolve_layer(kind, params["hada_w1_a"], params["hada_w1_b"], params.get("hada_t1"))
            except ShapeError as exc:
                raise ShapeError(f"{name}: {exc}") from None
        check_kind(layer, name)
        return layer

    def scaled(self, c: float) -> "ModuleAdapter":
        """Scale ``c``: ``s → c·s``, so ``ΔW → c·ΔW`` (PEFT's ``scale_layer``)."""
        return self.scale_scaling(c)

    def validate(self) -> None:
        p = self.params
        unknown = sorted(set(p) - set(_KEYS))
        if unknown:
            raise ShapeError(f"{self.name}: unexpected LoHa tensors {unknown}; LoHa has {', '.join(_KEYS)}")
        check_kind(self.layer, self.name)
        effective = "hada_t1" in p or "hada_t2" in p
        wanted = parameter_shapes(self.layer, 1, effective=effective)
        missing = [k for k in wanted if k not in p]
        if missing:
            raise ShapeError(f"{self.name}: missing {missing} for a {self.layer.kind.value} "
                             f"{'effective-conv' if effective else 'matrix'} LoHa (found {sorted(p)})")
        self.w1_a, self.w1_b, self.w2_a, self.w2_b = (p[k] for k in _KEYS[:4])
        self.t1, self.t2 = p.get("hada_t1"), p.get("hada_t2")
        self.r = _check_params(self.name, self.layer, self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t1, self.t2)
        r_cfg, _ = self.config.rank_and_alpha(self.name)
        if r_cfg != self.r:
            raise ShapeError(f"{self.name}: the LoHa tensors have rank {self.r} but the config gives r={r_cfg} for "
                             f"this module (check r / rank_pattern in adapter_config.json)")
        if effective != uses_effective_conv(self.layer, self.config.use_effective_conv2d):
            raise ShapeError(
                f"{self.name}: the checkpoint {'has' if effective else 'lacks'} hada_t1/hada_t2 but the config's "
                f"use_effective_conv2d={self.config.use_effective_conv2d} on a {self.layer.kind.value} with kernel "
                f"{self.layer.kernel_size} {'does not' if effective else 'does'} call for them; PEFT would not load it"
            )
        self.scaling = self.config.scaling_for(self.name)

    def _tensors(self) -> tuple:
        return self.w1_a, self.w1_b, self.w2_a, self.w2_b

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        d = delta_matrix(*self._tensors(), scaling=self.scaling, t1=self.t1, t2=self.t2, peft_compat=peft_compat)
        return self.layer.from_matrix(d, self.xp)

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        new = _apply(weight, *self._tensors(), t1=self.t1, t2=self.t2, scaling=self.scaling, layer=self.layer,
                     sign=1, copy=copy, safe=safe, peft_compat=peft_compat, where=self.name)
        return MergeResult(new, bias)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        new = _apply(weight, *self._tensors(), t1=self.t1, t2=self.t2, scaling=self.scaling, layer=self.layer,
                     sign=-1, copy=copy, safe=False, peft_compat=peft_compat, where=self.name)
        return MergeResult(new, bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, *, training: bool = False,
                seed: int | np.random.Generator | None = None, peft_compat: bool = False,
                **layer_kwargs: Any) -> Array:
        """The unmerged forward; ``training=True`` applies the config's rank/module dropout from ``seed``.
        The conv keywords (``groups`` inferred from ``x``) are described in :mod:`peftmath.layers`."""
        cfg = self.config
        layer, layer_kwargs = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, *self._tensors(), scaling=self.scaling, t1=self.t1, t2=self.t2, bias=bias,
                       layer=layer,
                       rank_dropout=cfg.rank_dropout if training else 0.0,
                       module_dropout=cfg.module_dropout if training else 0.0, seed=seed, peft_compat=peft_compat,
                       **layer_kwargs)


#: checkpoint suffixes of LoHa's per-module tensors (ParameterDict entries: no ".weight")
PARAMETER_SUFFIXES = _KEYS
Config = LoHaConfig
Module = LoHaModule
#: demo / documentation examples: row label -> config fields (non-trivial, alpha != r)
EXAMPLES = {
    "LoHa": dict(r=4, alpha=12, init_weights=False),
    "LoHa (effective conv)": dict(r=4, alpha=6, init_weights=False, use_effective_conv2d=True),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=LoHaConfig, module=LoHaModule, spec="specs/loha.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=LoHaModule.supported_kinds, additive=True,
    init_field="init_weights", examples=EXAMPLES,
)
