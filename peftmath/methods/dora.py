r"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024).

DoRA splits the adapted weight into a direction and a learned magnitude ``m``::

    V  = W + s · B A                       (the LoRA-adapted weight, matrix view (out, in))
    n  = ‖V‖ per output row                (the weight norm; PEFT detaches it in the forward)
    W' = (m / n) ⊙ V                       (row o scaled by m_o / n_o)

so the forward is ``y = g ⊙ (x Wᵀ + s x Aᵀ Bᵀ) + b`` with ``g = m / n`` — the bias is not scaled.
A, B, s and their initialisation are LoRA's (:mod:`peftmath.methods.lora`).

Norm axes and the shape of ``lora_magnitude_vector`` per layer kind:

=============  ===============================  ========================================
layer          ``lora_magnitude_vector``        norm of ``(W + ΔW)`` taken over
=============  ===============================  ========================================
Linear         ``(out,)``                       each output row, over ``in``
Conv1D         ``(out,)``                       each output column of the stored (in, out) W
Embedding      ``(D,)``                         each embedding dimension, over the vocabulary
ConvNd         ``(1, out, 1, ...)``             each output filter, over (in/g, *kernel)
=============  ===============================  ========================================

**Merge and unmerge.** Merging needs the norm ``n`` of the pre-merge weight; unmerging needs the same
``n``, and it cannot be recovered from the merged weight (every ``n`` gives a merged row of norm ``m``).
PEFT keeps ``n`` in memory and loses it across processes; :func:`merge` returns it
(``MergeResult.record``) and :func:`unmerge` takes it (``weight_norm=``), so the round trip is exact up
to rounding in any process.
"""

from __future__ import annotations

from typing import Any, Callable

from .._array import all_finite, as_compute, compute_dtype, is_low_precision, namespace
from ..backends import backend_for
from ..errors import NonFiniteError, NotInvertibleError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from . import lora
from ._base import MergeResult, require_writeable, write_back

Array = Any

__all__ = ["magnitude_shape", "weight_norm", "init_magnitude", "forward", "merge", "unmerge"]


def magnitude_shape(layer: Layer) -> tuple[int, ...]:
    """Shape of ``lora_magnitude_vector`` on ``layer`` (see the module docstring)."""
    if layer.kind.is_conv:
        return (1, layer.out_features) + (1,) * len(layer.kernel_size)
    return (layer.out_features,)


def _layer(layer: Any, A: Array, B: Array, W: Array) -> Layer:
    lay = lora._resolve_layer(layer, A, B, W)
    if lay.kind.is_conv and lay.groups > 1:
        raise UnsupportedError(f"DoRA on a conv with groups={lay.groups} is not defined (PEFT cannot merge it either)")
    return lay


def _checked(W: Array, A: Array, B: Array, magnitude: Array, other: Array | None, layer: Any,
             where: str) -> tuple[Any, Layer, Any, Array]:
    """Merge's and unmerge's checks: ``(xp, layer, compute dtype, magnitude as an (out,) vector)``."""
    xp = namespace(W, A, B, magnitude, other, where=where)
    lay = _layer(layer, A, B, W)
    lay.check_weight(W)
    lora._check_factors(lay, A, B, where)
    cd = compute_dtype(xp, W.dtype, A.dtype, B.dtype)
    m = as_compute(xp, xp.reshape(magnitude, (-1,)), cd)
    if m.shape[0] != lay.out_features:
        raise ShapeError(f"{where}: lora_magnitude_vector has {m.shape[0]} entries, expected {lay.out_features}")
    return xp, lay, cd, m


def weight_norm(W: Array, A: Array, B: Array, *, scaling: float, layer: Any = None) -> Array:
    """``n = ‖W + s·BA‖`` per output (shape ``(out,)``), in float32 or wider."""
    xp = namespace(W, A, B, where="dora.weight_norm")
    lay = _layer(layer, A, B, W)
    cd = compute_dtype(xp, W.dtype, A.dtype, B.dtype)
    V = as_compute(xp, lay.as_matrix(W, xp), cd) + lora.delta_matrix(A, B, scaling=scaling, xp=xp, dtype=cd)
    return xp.linalg.vector_norm(V, axis=1)


def init_magnitude(W: Array, A: Array, B: Array, *, scaling: float, layer: Any = None) -> Array:
    """PEFT's initial magnitude: ``m = ‖W + s·BA‖`` (so ``g = 1``), in ``lora_magnitude_vector``'s shape.

    With the default LoRA init (B = 0) this is the row norm of W.
    """
    xp = namespace(W, A, B)
    lay = _layer(layer, A, B, W)
    return xp.reshape(weight_norm(W, A, B, scaling=scaling, layer=lay), magnitude_shape(lay))


def forward(
    x: Array,
    W: Array,
    A: Array,
    B: Array,
    magnitude: Array,
    *,
    scaling: float,
    bias: Array | None = None,
    layer: Any = None,
    dropout: Callable[[Array], Array] | None = None,
    embed_scale: float | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    peft_compat: bool = False,
) -> Array:
    """The unmerged DoRA layer: ``g ⊙ (base(x) − b) + b + g ⊙ s·lora(x)`` with ``g = m / ‖W + s·BA‖``.

    Without dropout this equals the merged layer exactly (in real arithmetic). With ``dropout``
    (training), PEFT's form is used: ``base(x) + (g − 1) ⊙ (d(x) Wᵀ) + g ⊙ s·lora(d(x))``.
    The norm is passed through the backend's ``stop_gradient`` (``detach`` in torch,
    ``lax.stop_gradient`` in JAX), as PEFT detaches it.
    """
    xp = namespace(x, W, A, B, magnitude, bias, where="dora.forward")
    lay = _layer(layer, A, B, W)
    cd = compute_dtype(xp, A.dtype, B.dtype, magnitude.dtype, W.dtype)
    n = backend_for(xp).stop_gradient(weight_norm(W, A, B, scaling=scaling, layer=lay))
    g = _ratio(xp, as_compute(xp, xp.reshape(magnitude, (-1,)), cd), n, peft_compat)  # (out,)
    conv_kwargs = dict(stride=stride, padding=padding, dilation=dilation) if lay.kind.is_conv else {}
    gv = xp.reshape(g, (1, -1) + (1,) * len(lay.kernel_size)) if lay.kind.is_conv else g
    if lay.kind is LayerKind.EMBEDDING:
        base = lay.base_forward(x, W, None, xp)
        if embed_scale is not None:
            base = base * embed_scale  # the scaled embedding's own output, as in PEFT
        lo = lora.adapter_output(x, A, B, scaling=scaling, layer=lay, embed_scale=embed_scale)
        return as_compute(xp, gv * (as_compute(xp, base, cd) + lo), base.dtype)
    base = lay.base_forward(x, W, None, xp, **conv_kwargs)  # without bias: DoRA does not scale it
    if dropout is None:
        xin, scaled = x, gv * as_compute(xp, base, cd)
    else:
        xin = dropout(as_compute(xp, x, cd))
        dropped = lay.base_forward(as_compute(xp, xin, W.dtype), W, None, xp, **conv_kwargs)
        scaled = as_compute(xp, base, cd) + (gv - 1) * as_compute(xp, dropped, cd)
    lo = lora.adapter_output(xin, A, B, scaling=scaling, layer=lay, peft_compat=peft_compat, **conv_kwargs)
    y = scaled + gv * lo
    if bias is not None:
        b = as_compute(xp, bias, cd)
        y = y + (xp.reshape(b, (1, -1) + (1,) * len(lay.kernel_size)) if lay.kind.is_conv else b)
    return as_compute(xp, y, base.dtype)


def _same(t: Array) -> Array:
    return t


def _round_to(xp: Any, t: Array, dtype: Any, cd: Any) -> Array:
    """``t`` rounded to ``dtype`` when that is a half-precision dtype, returned in ``cd``."""
    return as_compute(xp, xp.astype(t, dtype), cd) if is_low_precision(dtype) else t


def _peft_rounding(xp: Any, W: Array, A: Array, B: Array, magnitude: Array, cd: Any):
    """PEFT's rounding of DoRA's intermediates (``peft_compat``): every torch op rounds to the promoted
    dtype of its operands. Returns three functions rounding ``V = W + ΔW`` and its norm (dtype
    ``promote(W, A, B)``), ``g = m / n`` (``promote(m, V)``) and ``g ⊙ V`` (``promote(g, V)``); each is the
    identity unless that dtype is half precision (a bf16 adapter on a bf16 base: every step rounds)."""
    vd = xp.result_type(W.dtype, A.dtype, B.dtype)
    gd = xp.result_type(magnitude.dtype, vd)
    od = xp.result_type(gd, vd)
    return tuple((lambda t, dt=dt: _round_to(xp, t, dt, cd)) for dt in (vd, gd, od))


def _ratio(xp: Any, m: Array, n: Array, peft_compat: bool) -> Array:
    """``g = m / n``, with ``g = 0`` on rows whose norm ``n`` is zero.

    Such a row of ``W + ΔW`` is all zeros, so its direction is undefined; peftmath keeps it zero (and
    :func:`unmerge` with the recorded ``n = 0`` returns ``W₀ = −ΔW`` for it, exactly). PEFT divides by
    zero and produces NaN (``0 · inf``); ``peft_compat=True`` does the same.
    """
    if peft_compat:
        return m / n
    zero = n == 0
    return xp.where(zero, xp.zeros_like(n), m / xp.where(zero, xp.ones_like(n), n))


def merge(
    W: Array,
    A: Array,
    B: Array,
    magnitude: Array,
    *,
    scaling: float,
    layer: Any = None,
    base_weight: Array | None = None,
    copy: bool = True,
    safe: bool = False,
    peft_compat: bool = False,
    where: str = "dora.merge",
) -> MergeResult:
    """``W' = (m / n) ⊙ (W + s·BA)`` with ``n = ‖W₀ + s·BA‖``; returns ``MergeResult(W', None, n)``.

    ``base_weight`` is ``W₀``, the weight with earlier merges of this layer taken out (PEFT 0.21.2);
    it defaults to ``W``. Keep the returned ``record`` (the norm ``n``, shape ``(out,)``): :func:`unmerge`
    needs it. ``copy=False`` updates ``W`` in place (on NumPy float32/64 with no temporary of W's size:
    gemm with beta=1, then a row scaling). ``safe=True`` refuses a non-finite result and changes
    nothing.
    """
    xp, lay, cd, m = _checked(W, A, B, magnitude, base_weight, layer, where)
    if not copy:
        require_writeable(where, W)
    r = A.shape[0]
    # Fast path, no temporary of W's size: the backend's fused pass (NumPy: W += s·BA by BLAS beta=1,
    # then the rows' norms n and the rescale by m / n; CuPy: one kernel for n, one for the result).
    if not copy and not safe and not peft_compat and base_weight is None:
        n = backend_for(xp).dora_merge_(lay.as_matrix(W, xp), xp.reshape(B, (B.shape[0], r)),
                                        xp.reshape(A, (r, -1)), scaling, m)
        if n is not None:
            return MergeResult(W, None, n)
    d = lora.delta_matrix(A, B, scaling=scaling, xp=xp, dtype=cd)
    if peft_compat:
        d = lora._compat_delta(xp, A, B, d)
    W0 = W if base_weight is None else base_weight
    rv, rg, ro = _peft_rounding(xp, W, A, B, magnitude, cd) if peft_compat else (_same, _same, _same)
    n = rv(xp.linalg.vector_norm(rv(as_compute(xp, lay.as_matrix(W0, xp), cd) + d), axis=1))
    V = ro(rg(_ratio(xp, m, n, peft_compat))[:, None] * rv(as_compute(xp, lay.as_matrix(W, xp), cd) + d))
    new = lay.from_matrix(as_compute(xp, V, W.dtype), xp)
    if safe and not all_finite(new, xp=xp):
        raise NonFiniteError(f"{where}: the merged DoRA weight would contain NaN or infinity; nothing changed")
    return MergeResult(new if copy else write_back(where, W, new), None, n)


def unmerge(
    W: Array,
    A: Array,
    B: Array,
    magnitude: Array,
    *,
    scaling: float,
    weight_norm: Array | None,
    layer: Any = None,
    copy: bool = True,
    peft_compat: bool = False,
    where: str = "dora.unmerge",
) -> MergeResult:
    """``W = W' / (m / n) − s·BA``, the inverse of :func:`merge` given its ``record`` ``n``.

    Raises :class:`~peftmath.errors.NotInvertibleError` without ``weight_norm``: the norm cannot be
    recovered from the merged weight.
    """
    if weight_norm is None:
        raise NotInvertibleError(
            f"{where}: unmerging DoRA needs the weight norm recorded at merge time (merge returns it as "
            f"MergeResult.record; Adapter.merge stores it when given records={{}}); it cannot be recovered "
            f"from the merged weight"
        )
    xp, lay, cd, m = _checked(W, A, B, magnitude, weight_norm, layer, where)
    n = as_compute(xp, xp.reshape(weight_norm, (-1,)), cd)
    if n.shape[0] != lay.out_features:
        raise ShapeError(f"{where}: weight_norm has {n.shape[0]} entries, expected {lay.out_features}")
    if bool(xp.any(m == 0)):
        raise NotInvertibleError(f"{where}: lora_magnitude_vector has zeros; the merged rows are zero and W is lost")
    if not copy:
        require_writeable(where, W)
    r = A.shape[0]
    if not copy and not peft_compat:
        M = lay.as_matrix(W, xp)
        factors = (xp.reshape(B, (B.shape[0], r)), xp.reshape(A, (r, -1)))
        if backend_for(xp).dora_unmerge_(M, *factors, -scaling, n / m):
            return MergeResult(W, None, None)
    if not copy and not peft_compat and W.dtype == cd:
        M = lay.as_matrix(W, xp)
        factors = (xp.reshape(B, (B.shape[0], r)), xp.reshape(A, (r, -1)))
        M *= (n / m)[:, None]
        if backend_for(xp).addmm_(M, *factors, -scaling):
            return MergeResult(W, None, None)
        M -= lora.delta_matrix(A, B, scaling=scaling, xp=xp, dtype=cd)
        return MergeResult(W, None, None)
    d = lora.delta_matrix(A, B, scaling=scaling, xp=xp, dtype=cd)
    if peft_compat:
        d = lora._compat_delta(xp, A, B, d)
    if peft_compat:  # PEFT: (W' / g) - ΔW, each op rounded to its torch-promoted dtype
        _, rg, _ = _peft_rounding(xp, W, A, B, magnitude, cd)
        gd = xp.result_type(magnitude.dtype, xp.result_type(W.dtype, A.dtype, B.dtype))
        q = as_compute(xp, lay.as_matrix(W, xp), cd) / rg(m / n)[:, None]
        q = _round_to(xp, q, xp.result_type(W.dtype, gd), cd)
        V = _round_to(xp, q - d, xp.result_type(W.dtype, gd, A.dtype, B.dtype), cd)
    else:
        V = as_compute(xp, lay.as_matrix(W, xp), cd) * (n / m)[:, None] - d
    new = lay.from_matrix(as_compute(xp, V, W.dtype), xp)
    return MergeResult(new if copy else write_back(where, W, new), None, None)
