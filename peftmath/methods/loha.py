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

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import numpy as np

from .._array import as_compute, common_device, compute_dtype, conv, is_low_precision, namespace
from ..backends import backend_for, host_rng, kaiming_uniform_bound
from ..config import TunerConfig, check_flags, check_fraction, check_number, check_positive_int, resolve_pattern
from ..errors import ConfigError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import MergeResult, ModuleAdapter, apply_delta, check_shape

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

_SUPPORTED = (LayerKind.LINEAR, LayerKind.CONV1D, LayerKind.CONV2D)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
@dataclass
class LycorisConfig(TunerConfig):
    """What PEFT's ``LycorisConfig`` gives LoHa and LoKr: rank, alpha, dropouts, the effective-conv
    switch and the per-module patterns, with ``s = alpha / r`` per module."""

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        _validate_lycoris(self, source)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """``(r, alpha)`` for ``module_name`` after rank_pattern / alpha_pattern (PEFT's rule)."""
        r = resolve_pattern(self.rank_pattern or {}, module_name, self.r)
        alpha = resolve_pattern(self.alpha_pattern or {}, module_name, self.alpha)
        return r, alpha

    def scaling_for(self, module_name: str) -> float:
        """The scaling ``s = alpha / r`` of ``module_name``."""
        r, alpha = self.rank_and_alpha(module_name)
        return scaling(alpha, r)


@dataclass
class LoHaConfig(LycorisConfig):
    """PEFT's ``LoHaConfig`` (``peft_type: "LOHA"``): fields, names and defaults as in PEFT 0.21.2."""

    peft_type: ClassVar[str] = "LOHA"

    init_weights: bool = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_flags(source, self, "init_weights")


def _validate_lycoris(config: Any, source: str) -> None:
    """Checks shared by LoHa and LoKr configs."""
    check_positive_int(source, "r", config.r)
    check_number(source, "alpha", config.alpha)
    for name in ("rank_dropout", "module_dropout"):
        check_fraction(source, name, getattr(config, name), closed=True)
    check_flags(source, config, "use_effective_conv2d")
    for pattern in ("rank_pattern", "alpha_pattern"):
        value = getattr(config, pattern)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{source}: field {pattern!r} must be a mapping, got {value!r}")
    for name, value in (config.rank_pattern or {}).items():
        check_positive_int(source, f"rank_pattern[{name!r}]", value)
    for name, value in (config.alpha_pattern or {}).items():
        check_number(source, f"alpha_pattern[{name!r}]", value)


# --------------------------------------------------------------------------------------------------
# Scaling and shapes
# --------------------------------------------------------------------------------------------------
def scaling(alpha: float, r: int) -> float:
    """``s = alpha / r`` (LoHa and LoKr have no rsLoRA variant).

    >>> scaling(12, 4)
    3.0
    """
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"LoHa/LoKr rank r must be a positive integer, got {r!r}")
    return alpha / r


def check_kind(layer: Layer, where: str, method: str = "LoHa") -> None:
    """Raise :class:`UnsupportedError` for a layer kind PEFT does not adapt with LoHa / LoKr."""
    if layer.kind not in _SUPPORTED:
        extra = (" (a transformers Conv1D, fan_in_fan_out=True)" if layer.kind is LayerKind.CONV1D_TRANSPOSED else "")
        raise UnsupportedError(
            f"{where}: {method} is not defined for a {layer.kind.value} layer{extra}; PEFT supports "
            f"nn.Linear, nn.Conv1d and nn.Conv2d only (it raises TypeError too). Remove this module from "
            f"target_modules"
        )


def uses_effective_conv(layer: Layer, use_effective_conv2d: bool) -> bool:
    """PEFT's rule: the CP form applies to Conv1d/Conv2d whose kernel is not all ones.

    >>> uses_effective_conv(Layer.of((8, 4, 3, 3)), True), uses_effective_conv(Layer.of((8, 4, 1, 1)), True)
    (True, False)
    """
    return bool(use_effective_conv2d) and layer.kind.is_conv and math.prod(layer.kernel_size) != 1


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
# Delta weight
# --------------------------------------------------------------------------------------------------
def cp_weight(t: Array, w_a: Array, w_b: Array) -> Array:
    """The CP/Tucker factor ``F[p, q, h, w] = Σ_{i,j} t[i, j, h, w] · w_a[i, p] · w_b[j, q]``.

    ``t`` is ``(r, r, kH, kW)``, ``w_a`` is ``(r, p)``, ``w_b`` is ``(r, q)``; the result is
    ``(p, q, kH, kW)`` (PEFT's ``einsum("ijkl,jr,ip->prkl")``, written with two ``tensordot``).

    >>> import numpy as np
    >>> t = np.ones((1, 1, 2, 1)); cp_weight(t, np.array([[2.0, 3.0]]), np.array([[5.0]]))[:, :, :, 0]
    array([[[10., 10.]],
    <BLANKLINE>
           [[15., 15.]]])
    """
    xp = namespace(t, w_a, w_b, where="cp_weight")
    tmp = xp.tensordot(w_b, t, axes=([0], [1]))         # (q, i, h, w)
    return xp.tensordot(w_a, tmp, axes=([0], [1]))      # (p, q, h, w), contiguous (torch.kron needs that)


def _round_to(xp: Any, x: Array, dtype: Any) -> Array:
    """``x`` rounded to a half-precision ``dtype`` and widened back (PEFT's intermediate rounding)."""
    if dtype is None or not is_low_precision(dtype):
        return x
    return xp.astype(xp.astype(x, dtype), x.dtype)


def _factor_rows(xp: Any, a: Array, b: Array, t: Array | None, rows: slice, cd: Any, round_to: Any = None) -> Array:
    """Rows ``rows`` of one Hadamard factor as an ``(n_rows, in_flat)`` matrix in ``cd``."""
    if t is None:
        f = xp.matmul(as_compute(xp, a[rows, :], cd), as_compute(xp, b, cd))
        return _round_to(xp, f, round_to)
    f = cp_weight(as_compute(xp, t, cd), as_compute(xp, a[:, rows], cd), as_compute(xp, b, cd))
    f = _round_to(xp, f, round_to)
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
    return _round_to(xp, _round_to(xp, f1 * f2, rnd) * scaling, rnd)


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
# Forward (with PEFT's training-time rank and module dropout as explicit options)
# --------------------------------------------------------------------------------------------------
def rank_dropout_mask(
    n: int,
    p: float,
    *,
    seed: int | np.random.Generator | None = None,
    normalize: bool = True,
    xp: Any = None,
    device: Any = None,
) -> Array:
    """PEFT's rank-dropout row mask: keep row ``o`` when ``u_o > p`` (``u ~ U[0, 1)``), divided by its mean.

    Drawn on the host with ``numpy.random.default_rng(seed)`` (PEFT's torch stream cannot be
    reproduced) and returned as float32 of ``xp`` (NumPy by default), shape ``(n,)``. When every row is
    dropped PEFT divides by zero (NaN); here the mask is then all zeros.

    >>> rank_dropout_mask(4, 0.0)
    array([1., 1., 1., 1.], dtype=float32)
    """
    keep = (host_rng(seed).random(n) > p).astype(np.float32)
    if normalize:
        mean = keep.mean(dtype=np.float32)
        keep = keep / mean if mean > 0 else keep
    keep = np.ascontiguousarray(keep, dtype=np.float32)
    if xp is None:
        return keep
    return backend_for(xp).from_host(keep, xp, device)


def _draw_dropout(out: int, rank_dropout: float, module_dropout: float, seed: Any, normalize: bool,
                  xp: Any, device: Any) -> tuple[bool, Array | None]:
    """(keep the module?, row mask or None), drawn in PEFT's order: module first, then rows."""
    if not rank_dropout and not module_dropout:
        return True, None
    rng = host_rng(seed)
    if module_dropout and not rng.random() > module_dropout:
        return False, None
    if not rank_dropout:
        return True, None
    return True, rank_dropout_mask(out, rank_dropout, seed=rng, normalize=normalize, xp=xp, device=device)


def adapted_forward(x: Array, W: Array, bias: Array | None, delta: Array, layer: Layer, xp: Any, *,
                    stride: Any = 1, padding: Any = 0, dilation: Any = 1) -> Array:
    """``base(x) + x ΔWᵀ`` or ``base(x) + conv(x, ΔW)``: the adapter term in ``delta``'s dtype, the
    result rounded once to x's dtype (PEFT adds in float32 and casts back to x's dtype)."""
    conv_kwargs = dict(stride=stride, padding=padding, dilation=dilation) if layer.kind.is_conv else {}
    base = layer.base_forward(x, W, bias, xp, **conv_kwargs)
    xin = as_compute(xp, x, delta.dtype)
    if layer.kind.is_conv:
        lo = conv(xin, delta, groups=layer.groups, xp=xp, **conv_kwargs)
    else:
        lo = xp.matmul(xin, xp.matrix_transpose(delta))
    if tuple(lo.shape) != tuple(base.shape):
        raise ShapeError(f"forward: adapter output {tuple(lo.shape)} does not match base output {tuple(base.shape)}")
    return as_compute(xp, as_compute(xp, base, lo.dtype) + lo, x.dtype)


def _masked(xp: Any, delta: Array, mask: Array | None) -> Array:
    if mask is None:
        return delta
    m = as_compute(xp, mask, delta.dtype)
    return delta * xp.reshape(m, (-1,) + (1,) * (delta.ndim - 1))


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
    keep, mask = _draw_dropout(lay.out_features, rank_dropout, module_dropout, seed, True, xp, common_device(W))
    if not keep:
        return as_compute(xp, lay.base_forward(x, W, bias, xp, **conv_kwargs), x.dtype)
    mask = row_mask if row_mask is not None else mask
    cd = compute_dtype(xp, x.dtype, w1_a.dtype, w1_b.dtype, w2_a.dtype, w2_b.dtype)
    d = delta_matrix(w1_a, w1_b, w2_a, w2_b, scaling=scaling, t1=t1, t2=t2, dtype=cd, peft_compat=peft_compat)
    d = _masked(xp, lay.from_matrix(d, xp), mask)
    return adapted_forward(x, W, bias, d, lay, xp, **conv_kwargs)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge, row block by row block
# --------------------------------------------------------------------------------------------------
#: elements per row block of ΔW built at a time (1 MiB in float32: the block, its second factor and the
#: rows of W being updated stay in cache; measured fastest on Linear(4096, 4096) among 2^16 ... 2^22)
BLOCK_ELEMENTS = 1 << 18


def _update_rows(xp: Any, M: Array, blocks: Callable[[Any], Iterator], cd: Any, sign: int) -> bool:
    """``M ± ΔW`` in place, one row block at a time; ``M`` is the target's proven ``(out, in_flat)``
    matrix view (given by :func:`~peftmath.methods._base.write_weight`)."""
    for start, stop, block in blocks(cd):
        if M.dtype == cd:  # augmented assignment: in place where getitem is a view, written back otherwise
            if sign > 0:
                M[start:stop, :] += block
            else:
                M[start:stop, :] -= block
        else:  # half precision: widen the rows, add, round once
            cur = as_compute(xp, M[start:stop, :], cd)
            M[start:stop, :] = as_compute(xp, cur + block if sign > 0 else cur - block, M.dtype)
            del cur
        del block  # free this block before the generator builds the next one
    return True


def apply_row_blocks(
    where: str,
    weight: Array,
    layer: Layer,
    blocks: Callable[[Any], Iterator[tuple[int, int, Array]]],
    full_delta: Callable[[], Array],
    *,
    param_dtypes: tuple = (),
    sign: int = 1,
    copy: bool = True,
    safe: bool = False,
    peft_compat: bool = False,
) -> Array:
    """``W ± ΔW`` where ``ΔW`` is produced as row blocks of its ``(out, in_flat)`` matrix view.

    ``blocks(cd)`` yields ``(start, stop, block)`` with ``block`` the rows ``start:stop`` of ``ΔW`` in
    compute dtype ``cd``; ``full_delta()`` builds the whole ``ΔW`` (stored layout) for the generic path.
    Each element is formed in float32 (float64 with float64 inputs) and rounded once to W's dtype, as
    :func:`~peftmath.methods._base.apply_delta` does, and written by its one write path:

    * ``copy=False``: updates ``W``'s proven matrix view in place with no temporary of W's size; a
      layout whose matrix view would be a copy is computed and stored into ``W``; arrays that cannot be
      written raise :class:`UnsupportedError`.
    * ``copy=True``: one allocation of W's size (a C-ordered copy updated block by block), the result.
    * ``safe=True``: the result is formed in a copy and checked before anything is written.
    * ``peft_compat=True``: the whole ``ΔW`` is built (``full_delta``) and added.
    """
    xp = namespace(weight, where=where)
    layer.check_weight(weight)
    cd = compute_dtype(xp, weight.dtype, *param_dtypes)

    def kernel(M: Array) -> bool:
        return _update_rows(xp, M, blocks, cd, sign)

    return apply_delta(where, weight, full_delta, sign=sign, copy=copy, safe=safe, layer=layer,
                       inplace_kernel=None if peft_compat else kernel, kernel_on_copy=True, xp=xp)


def _block_rows(in_flat: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, in_flat))


def _hada_blocks(w1_a: Array, w1_b: Array, w2_a: Array, w2_b: Array, t1: Array | None, t2: Array | None,
                 s: float, out: int, in_flat: int) -> Callable[[Any], Iterator]:
    def gen(cd: Any) -> Iterator:
        step = _block_rows(in_flat)
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
    return apply_row_blocks(where, W, lay, blocks, full, param_dtypes=tuple(a.dtype for a in params), sign=sign,
                            copy=copy, safe=safe, peft_compat=peft_compat)


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
# Initialisation
# --------------------------------------------------------------------------------------------------
def kaiming(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch's ``kaiming_uniform_(a=√5)``: ``U(±1/sqrt(fan_in))``, ``fan_in = prod(shape[1:])``."""
    bound = kaiming_uniform_bound(math.prod(shape[1:]))
    return rng.uniform(-bound, bound, shape)


def put_host(arrays: dict[str, np.ndarray], xp: Any, device: Any, dtype: Any) -> dict[str, Array]:
    """Host float arrays as arrays of ``xp`` on ``device`` with ``dtype`` (float32 by default)."""
    backend = backend_for(xp)
    out = {}
    for key, arr in arrays.items():
        a = backend.from_host(np.ascontiguousarray(arr, dtype=np.float32), xp, device)
        target = dtype if dtype is not None else xp.float32
        out[key] = a if a.dtype == target else xp.astype(a, target)
    return out


def default_xp() -> Any:
    import array_api_compat.numpy as xp_np

    return xp_np


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
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


class LoHaModule(ModuleAdapter):
    """LoHa on one base module (Linear, Conv1d or Conv2d; matrix or effective-conv form)."""

    peft_type = "LOHA"
    supported_kinds = _SUPPORTED

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
