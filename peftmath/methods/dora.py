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
ConvNd         ``(1, out, 1, ...)``             each output filter, over ``(in/g, *kernel)``
=============  ===============================  ========================================

**Merge and unmerge.** Merging needs the norm ``n`` of the pre-merge weight; unmerging needs the same
``n``, and it cannot be recovered from the merged weight (every ``n`` gives a merged row of norm ``m``).
PEFT keeps ``n`` in memory and loses it across processes; :func:`merge` returns it
(``MergeResult.record``) and :func:`unmerge` takes it (``weight_norm=``), so the round trip is exact up
to rounding in any process.
"""

from __future__ import annotations

from typing import Any, Callable

from .._array import as_compute, compute_dtype, is_low_precision, namespace
from ..backends import backend_for
from ..errors import ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from . import lora
from ._base import MergeResult, check_shape, write_weight

Array = Any

__all__ = ["magnitude_shape", "weight_norm", "init_magnitude", "forward", "merge", "unmerge", "DoraModule"]


# --- Shapes and the norm (specs/dora.md, "2. Parameters and the norm axes, per layer kind") ----------
def magnitude_shape(layer: Layer) -> tuple[int, ...]:
    """Shape of ``lora_magnitude_vector`` on ``layer`` (see the module docstring)."""
    if layer.kind.is_conv:
        return (1, layer.out_features) + (1,) * len(layer.kernel_size)
    return (layer.out_features,)


def _layer(layer: Any, A: Array, B: Array, W: Array) -> Layer:
    return _ungrouped(lora.resolve_layer(layer, A, B, W))


def _ungrouped(lay: Layer) -> Layer:
    """``lay``, refused for a grouped conv (merge and unmerge): LoRA's ``ΔW`` there spans every input channel,
    so ``W + ΔW`` has no place in the grouped weight (see specs/dora.md); the forward is defined."""
    if lay.kind.is_conv and lay.groups > 1:
        raise UnsupportedError(
            f"DoRA on a conv with groups={lay.groups} (weight {lay.weight_shape}) cannot be merged: LoRA's delta "
            f"there spans every input channel, not only each group's, so W + ΔW does not exist in W's shape "
            f"(PEFT cannot merge it either); run the adapter unmerged (forward), or use LoRA without DoRA on "
            f"grouped convolutions"
        )
    return lay


def weight_norm(W: Array, A: Array, B: Array, *, scaling: float, layer: Any = None) -> Array:
    """``n = ‖W + s·BA‖`` per output (shape ``(out,)``), in float32 or wider.

    On a conv with ``groups = g > 1`` (forward only: no merge exists there) this is PEFT's norm, which defines
    what such a checkpoint's magnitudes mean: ``‖W + s·L‖`` per output filter with ``L`` the reshape of
    ``lora_B.reshape(-1, r) @ lora_A.reshape(r, -1)`` to ``W``'s shape (specs/dora.md, "Grouped
    convolutions")."""
    xp = namespace(W, A, B, where="dora.weight_norm")
    lay = lora.resolve_layer(layer, A, B, W)
    cd = compute_dtype(xp, W.dtype, A.dtype, B.dtype)
    if lay.kind.is_conv and lay.groups > 1:
        r = int(A.shape[0])
        L = xp.matmul(as_compute(xp, xp.reshape(B, (-1, r)), cd), as_compute(xp, xp.reshape(A, (r, -1)), cd))
        V = as_compute(xp, xp.reshape(W, (W.shape[0], -1)), cd) + xp.reshape(L, (W.shape[0], -1)) * scaling
        return xp.linalg.vector_norm(V, axis=1)
    V = as_compute(xp, lay.as_matrix(W, xp), cd) + lora.delta_matrix(A, B, scaling=scaling, xp=xp, dtype=cd)
    return xp.linalg.vector_norm(V, axis=1)


# --- Initialisation (specs/dora.md, "3. Initialisation") ---------------------------------------------
def init_magnitude(W: Array, A: Array, B: Array, *, scaling: float, layer: Any = None) -> Array:
    """PEFT's initial magnitude: ``m = ‖W + s·BA‖`` (so ``g = 1``), in ``lora_magnitude_vector``'s shape.

    With the default LoRA init (B = 0) this is the row norm of W.
    """
    xp = namespace(W, A, B)
    lay = lora.resolve_layer(layer, A, B, W)
    return xp.reshape(weight_norm(W, A, B, scaling=scaling, layer=lay), magnitude_shape(lay))


# --- Forward (specs/dora.md, "4. Forward") -----------------------------------------------------------
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
    groups: int | None = None,
    peft_compat: bool = False,
) -> Array:
    """The unmerged DoRA layer: ``g ⊙ (base(x) − b) + b + g ⊙ s·lora(x)`` with ``g = m / ‖W + s·BA‖``.

    Without dropout this equals the merged layer exactly (in real arithmetic). With ``dropout``
    (training), PEFT's form is used: ``base(x) + (g − 1) ⊙ (d(x) Wᵀ) + g ⊙ s·lora(d(x))``.
    The norm is passed through the backend's ``stop_gradient`` (``detach`` in torch,
    ``lax.stop_gradient`` in JAX), as PEFT detaches it.

    ``stride``, ``padding``, ``dilation``, ``groups``: the base conv's, described once in
    :mod:`peftmath.layers` ("Conv keywords"). On a grouped conv (``groups > 1``, inferred from ``x``) ``n`` is
    PEFT's norm (:func:`weight_norm`), the one such a checkpoint was trained with; merges are refused there.
    """
    xp = namespace(x, W, A, B, magnitude, bias, where="dora.forward")
    lay, conv_kwargs = lora.resolve_layer(layer, A, B, W).for_input(
        x, "dora.forward", groups=groups, channels=A.shape[1] if A.ndim > 2 else None, stride=stride,
        padding=padding, dilation=dilation)
    lora.check_factors(lay, A, B, "dora.forward")
    cd = compute_dtype(xp, A.dtype, B.dtype, magnitude.dtype, W.dtype)
    n = backend_for(xp).stop_gradient(weight_norm(W, A, B, scaling=scaling, layer=lay))
    g = _ratio(xp, as_compute(xp, xp.reshape(magnitude, (-1,)), cd), n, peft_compat)  # (out,)
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


# --- Merge / unmerge (specs/dora.md, "5. Merge, and why unmerge needs a record") ---------------------
def _checked(W: Array, A: Array, B: Array, magnitude: Array, other: Array | None, layer: Any,
             where: str) -> tuple[Any, Layer, Any, Array]:
    """Merge's and unmerge's checks: ``(xp, layer, compute dtype, magnitude as an (out,) vector)``."""
    xp = namespace(W, A, B, magnitude, other, where=where)
    lay = _layer(layer, A, B, W)
    lay.check_weight(W)
    lora.check_factors(lay, A, B, where)
    cd = compute_dtype(xp, W.dtype, A.dtype, B.dtype)
    m = as_compute(xp, xp.reshape(magnitude, (-1,)), cd)
    if m.shape[0] != lay.out_features:
        raise ShapeError(f"{where}: lora_magnitude_vector has {m.shape[0]} entries, expected {lay.out_features}")
    return xp, lay, cd, m


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
    r = A.shape[0]
    factors = (xp.reshape(B, (B.shape[0], r)), xp.reshape(A, (r, -1)))
    norm: list[Array] = []  # n, from whichever path ran

    def kernel(M: Array) -> bool:
        # no temporary of W's size: the backend's fused pass on W's proven matrix view (NumPy: W += s·BA by
        # BLAS beta=1, then the rows' norms n and the rescale by m / n; CuPy: one kernel for n, one for W')
        n = backend_for(xp).dora_merge_(M, *factors, scaling, m)
        if n is None:
            return False
        norm.append(n)
        return True

    def compute() -> Array:
        d = lora.delta_matrix(A, B, scaling=scaling, xp=xp, dtype=cd)
        if peft_compat:
            d = lora.compat_delta(xp, A, B, d)
        W0 = W if base_weight is None else base_weight
        rv, rg, ro = _peft_rounding(xp, W, A, B, magnitude, cd) if peft_compat else (_same, _same, _same)
        n = rv(xp.linalg.vector_norm(rv(as_compute(xp, lay.as_matrix(W0, xp), cd) + d), axis=1))
        norm.append(n)
        V = ro(rg(_ratio(xp, m, n, peft_compat))[:, None] * rv(as_compute(xp, lay.as_matrix(W, xp), cd) + d))
        return lay.from_matrix(V, xp)

    fast = not peft_compat and base_weight is None
    new = write_weight(where, W, compute, layer=lay, kernel=kernel if fast else None, copy=copy, safe=safe, xp=xp)
    return MergeResult(new, None, norm[-1])


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
    r = A.shape[0]
    factors = (xp.reshape(B, (B.shape[0], r)), xp.reshape(A, (r, -1)))
    q = n / m

    def kernel(M: Array) -> bool:
        # in place on W's proven matrix view: the backend's fused pass, else M ← q ⊙ M − s·BA in two passes
        backend = backend_for(xp)
        if backend.dora_unmerge_(M, *factors, -scaling, q):
            return True
        if M.dtype != cd:
            return False
        M *= q[:, None]
        if not backend.addmm_(M, *factors, -scaling):
            M -= lora.delta_matrix(A, B, scaling=scaling, xp=xp, dtype=cd)
        return True

    def compute() -> Array:
        d = lora.delta_matrix(A, B, scaling=scaling, xp=xp, dtype=cd)
        if peft_compat:  # PEFT: (W' / g) - ΔW, each op rounded to its torch-promoted dtype
            d = lora.compat_delta(xp, A, B, d)
            _, rg, _ = _peft_rounding(xp, W, A, B, magnitude, cd)
            gd = xp.result_type(magnitude.dtype, xp.result_type(W.dtype, A.dtype, B.dtype))
            q_ = as_compute(xp, lay.as_matrix(W, xp), cd) / rg(m / n)[:, None]
            q_ = _round_to(xp, q_, xp.result_type(W.dtype, gd), cd)
            V = _round_to(xp, q_ - d, xp.result_type(W.dtype, gd, A.dtype, B.dtype), cd)
        else:
            V = as_compute(xp, lay.as_matrix(W, xp), cd) * q[:, None] - d
        return lay.from_matrix(V, xp)

    new = write_weight(where, W, compute, layer=lay, kernel=None if peft_compat else kernel, copy=copy, xp=xp)
    return MergeResult(new, None, None)


# --- One module of a checkpoint (specs/dora.md) ------------------------------------------------------
class DoraModule(lora.LoraModule):
    """DoRA on one base module: LoRA's factors plus ``lora_magnitude_vector`` (PEFT saves it in a LORA
    checkpoint with ``use_dora``). ``LoraModule(...)`` with a magnitude among the parameters builds one.

    Merge returns the weight norm as its record; unmerge needs it back (``record=``)."""

    merge_record = True

    @classmethod
    def initialize(cls, name: str, config: Any, layer: Layer, *, weight: Array | None = None, seed: Any = 0,
                   xp: Any = None, device: Any = None, dtype: Any = None,
                   init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """LoRA's factors, then the magnitude ``‖W + s·BA‖`` (``weight`` required)."""
        if weight is None:
            raise ConfigError(f"{name}: DoRA's magnitude is initialised from the base weight; pass weight=")
        params, res = cls._init_factors(name, config, layer, weight=weight, seed=seed, xp=xp, device=device,
                                        dtype=dtype, init=init)
        base = res.weight if res.weight is not None else weight
        mag = init_magnitude(base, res.A, res.B, scaling=config.scaling_for(name), layer=layer)
        # in the factors' dtype, like every other tensor of the adapter (dtype=)
        params["lora_magnitude_vector"] = as_compute(namespace(res.A), mag, res.A.dtype)
        return params, res.weight

    def validate(self) -> None:
        super().validate()
        self.magnitude = self.params.get("lora_magnitude_vector")
        if self.magnitude is None:
            raise ShapeError(f"{self.name}: DoRA needs lora_magnitude_vector for this module")
        if self.lora_bias is not None:
            raise ConfigError(f"{self.name}: DoRA with lora_bias is not defined (PEFT refuses it too)")
        check_shape(self.name, "lora_magnitude_vector", self.magnitude, magnitude_shape(self.layer))

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        res = merge(weight, self.A, self.B, self.magnitude, scaling=self.scaling, layer=self.layer,
                    copy=copy, safe=safe, peft_compat=peft_compat, where=self.name)
        return res._replace(bias=bias)  # DoRA does not change the bias: pass it through

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        res = unmerge(weight, self.A, self.B, self.magnitude, scaling=self.scaling, weight_norm=record,
                      layer=self.layer, copy=copy, peft_compat=peft_compat, where=self.name)
        return res._replace(bias=bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, kw = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.A, self.B, self.magnitude, scaling=self.scaling, bias=bias, layer=layer, **kw)
