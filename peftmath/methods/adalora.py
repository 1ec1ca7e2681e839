r"""AdaLoRA: adaptive budget allocation for LoRA (Zhang et al., ICLR 2023), as PEFT implements it.

The update of a frozen weight ``W`` (matrix view ``(out, in)``, see :mod:`peftmath.layers`) is kept in
an SVD-like form whose "singular values" ``E`` can be switched off one by one::

    ΔW = c · B (A ⊙ E)        A: (r, in)   E: (r, 1)   B: (out, r)     (A ⊙ E scales row i of A by E_i)
    c  = s / (ranknum + 1e-5)
    s  = lora_alpha  if lora_alpha > 0  else  r
    y  = x Wᵀ + b + c · dropout(x) (A ⊙ E)ᵀ Bᵀ

``ranknum`` is the rank the adapter was *created* with (``init_r``): pruning sets entries of ``E`` to
zero (or, in a checkpoint, drops them) but never changes the divisor, and PEFT does not save
``ranknum`` — a loaded checkpoint divides by ``init_r`` again. peftmath follows PEFT here, because
that choice defines what an AdaLoRA checkpoint means.

=================  ======================  ==========  ==============  ==========================
layer              ``lora_A``              ``lora_E``  ``lora_B``      ``ΔW`` (stored layout)
=================  ======================  ==========  ==============  ==========================
Linear             ``(r, in)``             ``(r, 1)``  ``(out, r)``    ``c·B(A⊙E)``  (out, in)
Conv1D (GPT-2)     ``(r, in)``             ``(r, 1)``  ``(out, r)``    ``c·(B(A⊙E))ᵀ`` (in, out)
Conv2d             ``(r, in·kH·kW)``       ``(r, 1)``  ``(out, r)``    reshaped to ``(out, in, kH, kW)``
=================  ======================  ==========  ==============  ==========================

The checkpoint keys have no ``.weight`` (PEFT keeps the tensors in ``ParameterDict``s):
``base_model.model.<module>.lora_A`` / ``.lora_E`` / ``.lora_B``.

The second half of this module is the rank allocator (PEFT's ``RankAllocator`` and
``AdaLoraModel.update_and_allocate``) written as pure functions: :func:`allocate` takes the
parameters, their gradients, the step and the previous :class:`AllocatorState` and returns the new
state, the masks, the budget and the threshold; :func:`apply_masks`, :func:`resize_by_rank_pattern`
(what PEFT does when it saves) and :func:`orthogonal_regularizer` complete it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, NamedTuple

import array_api_compat
import numpy as np

from .._array import as_compute, compute_dtype, conv, is_low_precision, namespace
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_nonnegative_int, check_number
from ..errors import ConfigError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import MergeResult, ModuleAdapter, apply_delta, check_shape
from .lora import LoraConfig, LoraModule

Array = Any

__all__ = [
    "AdaLoraConfig",
    "scaling",
    "rank_scale",
    "parameter_shapes",
    "delta_weight",
    "forward",
    "merge",
    "unmerge",
    "init_weights",
    "AllocatorState",
    "Allocation",
    "budget_schedule",
    "kthvalue",
    "triplet_scores",
    "allocate",
    "apply_masks",
    "resize_by_rank_pattern",
    "rank_pattern_for_config",
    "orthogonal_regularizer",
    "AdaLoraModule",
]

PEFT_TYPE = "ADALORA"

#: the constant PEFT adds to ``ranknum`` before dividing
RANKNUM_EPS = 1e-5


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
@dataclass
class AdaLoraConfig(LoraConfig):
    """PEFT's ``AdaLoraConfig`` (``peft_type: "ADALORA"``): the LoRA fields plus the schedule.

    ``r`` is not used (PEFT ignores it too); the adapters are created with rank ``init_r``.
    ``rank_pattern`` is ``None`` or ``{"<module>.lora_E": [bool] * init_r}``: which singular values
    the allocator kept. ``total_step`` is required (PEFT refuses a config without it).

    >>> cfg = AdaLoraConfig(init_r=6, target_r=4, lora_alpha=12, total_step=100)
    >>> cfg.scaling_for("q_proj"), round(cfg.rank_scale_for("q_proj"), 6)
    (12, 1.999997)
    >>> AdaLoraConfig(total_step=10, tinit=8, tfinal=2).validate()
    Traceback (most recent call last):
    ...
    peftmath.errors.ConfigError: config: tinit=8 >= total_step - tfinal = 8 leaves no budgeting phase; decrease tinit or tfinal, or increase total_step (PEFT refuses this too)
    """

    peft_type: ClassVar[str] = "ADALORA"

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None

    def validate(self, *, source: str = "config") -> None:
        TunerConfig.validate(self, source=source)   # not LoRA's: AdaLoRA ignores r and has other patterns
        self.validate_lora_fields(source)
        if self.use_dora:
            raise ConfigError(f"{source}: AdaLoRA does not support DoRA (use_dora=true); PEFT refuses this too")
        if self.loftq_config:
            raise ConfigError(f"{source}: AdaLoRA does not support LoftQ (loftq_config is set); PEFT refuses this too")
        for name in ("init_r", "target_r", "tinit", "tfinal"):
            check_nonnegative_int(source, name, getattr(self, name))
        for name in ("deltaT", "beta1", "beta2", "orth_reg_weight"):
            check_number(source, name, getattr(self, name))
        if self.orth_reg_weight < 0:
            raise ConfigError(f"{source}: field 'orth_reg_weight' must be >= 0, got {self.orth_reg_weight!r}")
        T = self.total_step
        if not isinstance(T, int) or isinstance(T, bool) or T <= 0:
            raise ConfigError(
                f"{source}: AdaLoRA needs 'total_step', the number of training steps, as a positive integer "
                f"(got {T!r}); PEFT refuses a config without it"
            )
        if self.tinit >= T - self.tfinal:
            raise ConfigError(
                f"{source}: tinit={self.tinit} >= total_step - tfinal = {T - self.tfinal} leaves no budgeting phase; "
                f"decrease tinit or tfinal, or increase total_step (PEFT refuses this too)"
            )
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, Mapping):
                raise ConfigError(f"{source}: field 'rank_pattern' must be null or an object, got {self.rank_pattern!r}")
            for key, mask in self.rank_pattern.items():
                if not isinstance(mask, (list, tuple)) or not all(isinstance(v, bool) for v in mask):
                    raise ConfigError(
                        f"{source}: rank_pattern[{key!r}] must be a list of true/false (one per singular value), "
                        f"got {mask!r}"
                    )

    # --- per module ---------------------------------------------------------------------------
    def rank_mask(self, module_name: str) -> list[bool] | None:
        """The saved mask of ``module_name`` (key ``"<module>.lora_E"``, with or without the adapter
        name PEFT keeps in memory), or None when the pattern has no entry for it."""
        return _lookup_pattern(self.rank_pattern, module_name)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` of ``module_name``: r = the kept count of its mask, else ``init_r``."""
        mask = self.rank_mask(module_name)
        return (sum(mask) if mask is not None else self.init_r), self.lora_alpha

    def scaling_for(self, module_name: str, r: int | None = None) -> float:
        """``s = lora_alpha if lora_alpha > 0 else r`` (r: the module's current rank)."""
        if r is None:
            r, _ = self.rank_and_alpha(module_name)
        return scaling(self.lora_alpha, r)

    def rank_scale_for(self, module_name: str, r: int | None = None) -> float:
        """The factor ``c = s / (init_r + 1e-5)`` that multiplies ``B (A ⊙ E)`` for ``module_name``."""
        if r is None:
            r, _ = self.rank_and_alpha(module_name)
        return rank_scale(self.scaling_for(module_name, r), self.init_r if r > 0 else 0)


def _lookup_pattern(pattern: Mapping[str, Any] | None, module_name: str) -> Any:
    if not pattern:
        return None
    for key in (module_name, f"{module_name}.lora_E"):
        if key in pattern:
            return pattern[key]
    prefix = f"{module_name}.lora_E."
    for key, value in pattern.items():  # PEFT's in-memory keys carry the adapter name: "<m>.lora_E.default"
        if key.startswith(prefix) and "." not in key[len(prefix):]:
            return value
    return None


# --------------------------------------------------------------------------------------------------
# Scaling and shapes
# --------------------------------------------------------------------------------------------------
def scaling(lora_alpha: float, r: int) -> float:
    """PEFT's ``s``: ``lora_alpha`` when positive, else ``float(r)`` (it is *not* ``alpha / r``).

    >>> scaling(32, 12), scaling(0, 12)
    (32, 12.0)
    """
    return lora_alpha if lora_alpha > 0 else float(r)


def rank_scale(s: float, ranknum: float) -> float:
    """``c = s / (ranknum + 1e-5)``, the factor in front of ``B (A ⊙ E)``.

    >>> rank_scale(12.0, 12)
    0.9999991666673611
    """
    return s / (ranknum + RANKNUM_EPS)


_KINDS = (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED, LayerKind.CONV2D)


def _check_kind(layer: Layer, where: str) -> None:
    if layer.kind not in _KINDS:
        raise UnsupportedError(
            f"{where}: AdaLoRA adapts Linear, transformers Conv1D and Conv2d layers, not {layer.kind.value} "
            f"(PEFT raises ValueError for it too)"
        )
    if layer.groups != 1:
        raise UnsupportedError(
            f"{where}: AdaLoRA on a Conv2d with groups={layer.groups} is not defined (PEFT sizes lora_A for "
            f"all input channels and its delta cannot be reshaped to the grouped weight)"
        )


def parameter_shapes(layer: Layer, r: int) -> dict[str, tuple[int, ...]]:
    """Checkpoint suffix -> shape of the adapter's tensors on ``layer`` at rank ``r``.

    >>> parameter_shapes(Layer.of((8, 3, 3, 3)), 4)
    {'lora_A': (4, 27), 'lora_E': (4, 1), 'lora_B': (8, 4)}
    """
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        raise ConfigError(f"AdaLoRA rank r must be a non-negative integer, got {r!r}")
    _check_kind(layer, "adalora")
    out, inn = layer.matrix_shape
    return {"lora_A": (r, inn), "lora_E": (r, 1), "lora_B": (out, r)}


def _resolve_layer(layer: Layer | LayerKind | str | None, A: Array, B: Array, weight: Array | None = None) -> Layer:
    if isinstance(layer, Layer):
        return layer
    if weight is not None:
        return Layer.of(tuple(weight.shape), layer)
    kind = LayerKind.parse(layer) if layer is not None else LayerKind.LINEAR
    if kind is LayerKind.CONV2D:
        raise ShapeError("adalora: a Conv2d layer needs its kernel size; pass layer=Layer.of(weight_shape) or the weight")
    out, inn = B.shape[0], A.shape[1]
    return Layer(kind, (inn, out) if kind is LayerKind.CONV1D_TRANSPOSED else (out, inn))


def _check_factors(layer: Layer, A: Array, E: Array, B: Array, where: str) -> int:
    r = int(A.shape[0])
    expected = parameter_shapes(layer, r)
    check_shape(where, "lora_A", A, expected["lora_A"])
    check_shape(where, "lora_E", E, expected["lora_E"])
    check_shape(where, "lora_B", B, expected["lora_B"])
    return r


# --------------------------------------------------------------------------------------------------
# Delta weight
# --------------------------------------------------------------------------------------------------
def _scaled_rows(xp: Any, A: Array, E: Array, dtype: Any) -> Array:
    """``A ⊙ E`` (row i of A times E_i) in ``dtype``: (r, in)."""
    return as_compute(xp, A, dtype) * as_compute(xp, E, dtype)


def delta_matrix(A: Array, E: Array, B: Array, *, scale: float, xp: Any = None, dtype: Any = None) -> Array:
    """``scale · B (A ⊙ E)`` as the ``(out, in_flat)`` matrix, in ``dtype`` (default float32/64)."""
    xp = xp or namespace(A, E, B, where="adalora")
    cd = dtype or compute_dtype(xp, A.dtype, E.dtype, B.dtype)
    return xp.matmul(as_compute(xp, B, cd), _scaled_rows(xp, A, E, cd)) * scale


def _compat_delta_matrix(xp: Any, A: Array, E: Array, B: Array, s: float, ranknum: float, dtype: Any) -> Array:
    """PEFT's order: ``((B @ (A*E)) * s) / (ranknum + 1e-5)``, each step rounded to the adapter's dtype
    (``ranknum`` is a tensor of that dtype)."""
    pd = xp.result_type(A.dtype, E.dtype, B.dtype)
    if is_low_precision(pd):
        def rnd(t: Array) -> Array:
            return as_compute(xp, xp.astype(t, pd), dtype)
    else:
        def rnd(t: Array) -> Array:
            return t
    ae = rnd(_scaled_rows(xp, A, E, dtype))
    p = rnd(xp.matmul(as_compute(xp, B, dtype), ae))
    p = rnd(p * s)
    device = array_api_compat.device(A)
    div = rnd(xp.asarray(float(ranknum), dtype=dtype, device=device) + RANKNUM_EPS)
    return rnd(p / div)


def delta_weight(
    A: Array,
    E: Array,
    B: Array,
    *,
    scaling: float,
    ranknum: float | None = None,
    layer: Layer | LayerKind | str | None = None,
    peft_compat: bool = False,
) -> Array:
    """``ΔW = T(B (A ⊙ E)) · s / (ranknum + 1e-5)`` in the base weight's stored layout.

    Parameters
    ----------
    A, E, B
        ``lora_A`` (r, in_flat), ``lora_E`` (r, 1), ``lora_B`` (out, r).
    scaling
        ``s`` (see :func:`scaling`).
    ranknum
        The divisor's rank, ``init_r`` for a pruned adapter; defaults to ``r = A.shape[0]``.
    layer
        ``"Linear"`` (default), ``"Conv1D"`` (fan_in_fan_out: result ``(in, out)``) or a
        :class:`~peftmath.layers.Layer` (needed for Conv2d).
    peft_compat
        Reproduce PEFT's operation order and roundings (multiply by ``s``, then divide by the
        adapter-dtype tensor ``ranknum + 1e-5``). The default multiplies once by the double-precision
        factor ``c``. Both differ by at most a few units in the last place.

    Returns
    -------
    ΔW with the factors' dtype, computed in float32 (float64 for float64 factors) and rounded once
    (as LoRA's :func:`peftmath.methods.lora.delta_weight`); :meth:`AdaLoraModule.delta_weight` keeps
    the compute dtype.

    >>> import numpy as np
    >>> A = np.array([[1.0, 2.0], [3.0, 4.0]]); E = np.array([[0.5], [0.0]]); B = np.eye(2)
    >>> delta_weight(A, E, B, scaling=2.0, ranknum=1.0)   # E_2 = 0 prunes row 2
    array([[0.99999, 1.99998],
           [0.     , 0.     ]])
    """
    xp = namespace(A, E, B, where="adalora.delta_weight")
    d = _delta(xp, A, E, B, scaling=scaling, ranknum=ranknum, layer=_resolve_layer(layer, A, B),
               peft_compat=peft_compat, where="adalora.delta_weight")
    return as_compute(xp, d, xp.result_type(A.dtype, E.dtype, B.dtype))


def _delta(xp: Any, A: Array, E: Array, B: Array, *, scaling: float, ranknum: float | None, layer: Layer,
           peft_compat: bool, where: str) -> Array:
    """``ΔW`` in the stored layout and the compute dtype."""
    r = _check_factors(layer, A, E, B, where)
    rn = float(r) if ranknum is None else float(ranknum)
    cd = compute_dtype(xp, A.dtype, E.dtype, B.dtype)
    if peft_compat:
        d = _compat_delta_matrix(xp, A, E, B, scaling, rn, cd)
    else:
        d = delta_matrix(A, E, B, scale=rank_scale(scaling, rn), xp=xp, dtype=cd)
    return layer.from_matrix(d, xp)


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------
def forward(
    x: Array,
    W: Array,
    A: Array,
    E: Array,
    B: Array,
    *,
    scaling: float,
    ranknum: float | None = None,
    bias: Array | None = None,
    layer: Layer | LayerKind | str | None = None,
    dropout: Callable[[Array], Array] | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int | None = None,
    peft_compat: bool = False,
) -> Array:
    """The unmerged adapted layer.

    ========== ===========================================================================
    Linear     ``x Wᵀ + b + c · d(x) (A⊙E)ᵀ Bᵀ``, x ``(..., in)``
    Conv1D     ``x W + b + c · d(x) (A⊙E)ᵀ Bᵀ``
    Conv2d     ``conv(x, W, b) + conv(d(x), ΔW; stride, padding, dilation)``, x ``(N, in, H, W)``
    ========== ===========================================================================

    with ``c = s / (ranknum + 1e-5)``. ``dropout`` is any callable applied to the adapter's input
    (identity by default). The adapter's term is computed in float32 (or wider) and added to the base
    output, which is rounded once to its dtype. ``peft_compat=True`` builds the Conv2d kernel in
    PEFT's rounding order (:func:`delta_weight`).

    ``stride``, ``padding``, ``dilation``, ``groups``: the base conv's, described once in
    :mod:`peftmath.layers` ("Conv keywords"); a grouped conv (``groups > 1``, inferred from ``x``) is
    refused with :class:`~peftmath.errors.UnsupportedError`.
    """
    xp = namespace(x, W, A, E, B, bias, where="adalora.forward")
    lay, conv_kwargs = _resolve_layer(layer, A, B, W).for_input(
        x, "adalora.forward", groups=groups, stride=stride, padding=padding, dilation=dilation)
    r = _check_factors(lay, A, E, B, "adalora.forward")
    rn = float(r) if ranknum is None else float(ranknum)
    base = lay.base_forward(x, W, bias, xp, **conv_kwargs)
    cd = compute_dtype(xp, A.dtype, E.dtype, B.dtype, x.dtype)
    xin = as_compute(xp, x, cd)
    if dropout is not None:
        xin = dropout(xin)
    if lay.kind.is_conv:
        if peft_compat:
            dm = _compat_delta_matrix(xp, A, E, B, scaling, rn, cd)
        else:
            dm = delta_matrix(A, E, B, scale=rank_scale(scaling, rn), xp=xp, dtype=cd)
        lo = conv(xin, lay.from_matrix(dm, xp), groups=lay.groups, xp=xp, **conv_kwargs)
    else:
        ae = _scaled_rows(xp, A, E, cd)
        h = xp.matmul(xin, xp.matrix_transpose(ae))
        lo = xp.matmul(h, xp.matrix_transpose(as_compute(xp, B, cd)))
        lo = (lo * scaling) / (rn + RANKNUM_EPS) if peft_compat else lo * rank_scale(scaling, rn)
    if tuple(lo.shape) != tuple(base.shape):
        raise ShapeError(f"adalora.forward: adapter output {tuple(lo.shape)} does not match base output {tuple(base.shape)}")
    # the base layer's output dtype (NumPy's bfloat16 matmul answers in float32)
    out_dtype = xp.result_type(x.dtype, W.dtype, *(() if bias is None else (bias.dtype,)))
    return as_compute(xp, as_compute(xp, base, lo.dtype) + lo, out_dtype)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge
# --------------------------------------------------------------------------------------------------
def _apply(W: Array, A: Array, E: Array, B: Array, *, scaling: float, ranknum: float | None, sign: int,
           layer: Layer | LayerKind | str | None, copy: bool, safe: bool, peft_compat: bool, where: str) -> Array:
    xp = namespace(W, A, E, B, where=where)
    lay = _resolve_layer(layer, A, B, W)
    lay.check_weight(W)
    r = _check_factors(lay, A, E, B, where)
    rn = float(r) if ranknum is None else float(ranknum)
    cd = compute_dtype(xp, A.dtype, E.dtype, B.dtype, W.dtype)
    c = rank_scale(scaling, rn)

    def build() -> Array:
        if peft_compat:
            return lay.from_matrix(_compat_delta_matrix(xp, A, E, B, scaling, rn, cd), xp)
        return lay.from_matrix(delta_matrix(A, E, B, scale=c, xp=xp, dtype=cd), xp)

    def kernel(M: Array) -> bool:
        return backend_for(xp).addmm_(M, as_compute(xp, B, cd), _scaled_rows(xp, A, E, cd), sign * c)

    # PEFT adds (subtracts) the delta as computed, without rounding it to W's dtype first (W.data += Δ).
    # copy=True runs the backend's gemm (beta=1) on a C-ordered copy of W: no temporary of W's size besides
    # the result; where the backend has no such kernel, the generic path runs.
    return apply_delta(where, W, build, sign=sign, copy=copy, safe=safe, layer=lay,
                       inplace_kernel=None if peft_compat else kernel, kernel_on_copy=True, xp=xp)


def merge(
    W: Array,
    A: Array,
    E: Array,
    B: Array,
    *,
    scaling: float,
    ranknum: float | None = None,
    layer: Layer | LayerKind | str | None = None,
    copy: bool = True,
    safe: bool = False,
    peft_compat: bool = False,
) -> Array:
    """``W + ΔW`` (see :func:`delta_weight` for ``ΔW``).

    ``copy=False`` updates ``W`` in place and returns it (on NumPy float32/float64 one BLAS gemm with
    ``beta=1`` on the factors ``B`` and ``A ⊙ E``: no temporary of W's size; ``copy=True`` runs the same
    kernel on a C-ordered copy of W where the backend has it); ``safe=True`` refuses a
    non-finite result and leaves ``W`` untouched. The sum is formed in float32 (float64 for float64)
    and rounded once to W's dtype, which is also what PEFT's ``W.data += Δ`` does.

    >>> import numpy as np
    >>> W = np.zeros((2, 2), dtype=np.float32)
    >>> A = np.ones((1, 2), dtype=np.float32); E = np.full((1, 1), 3.0, dtype=np.float32)
    >>> B = np.ones((2, 1), dtype=np.float32)
    >>> merge(W, A, E, B, scaling=1.0, ranknum=2, copy=False) is W, W[0]
    (True, array([1.4999925, 1.4999925], dtype=float32))
    """
    return _apply(W, A, E, B, scaling=scaling, ranknum=ranknum, sign=1, layer=layer, copy=copy, safe=safe,
                  peft_compat=peft_compat, where="adalora.merge")


def unmerge(
    W: Array,
    A: Array,
    E: Array,
    B: Array,
    *,
    scaling: float,
    ranknum: float | None = None,
    layer: Layer | LayerKind | str | None = None,
    copy: bool = True,
    peft_compat: bool = False,
) -> Array:
    """``W − ΔW``, the inverse of :func:`merge` (same keywords; exact in real arithmetic)."""
    return _apply(W, A, E, B, scaling=scaling, ranknum=ranknum, sign=-1, layer=layer, copy=copy, safe=False,
                  peft_compat=peft_compat, where="adalora.unmerge")


# --------------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------------
def init_weights(
    layer: Layer,
    r: int,
    *,
    init_lora_weights: Any = True,
    seed: int | np.random.Generator | None = 0,
    xp: Any = None,
    device: Any = None,
    dtype: Any = None,
) -> dict[str, Array]:
    """PEFT's initialisation (``AdaLoraLayer.reset_lora_parameters``), drawn on the host.

    ==========  ==============================================================
    truthy      ``E = 0``, ``A, B ~ N(0, 0.02²)`` (the adapter starts as a no-op)
    ``False``   ``A, E, B ~ N(0, 1)`` (PEFT's ``torch.randn`` before the reset)
    ==========  ==============================================================

    One seed gives the same numbers on every backend (PEFT's torch RNG stream cannot be reproduced;
    the distributions and the exact zeros are). Returns ``{"lora_A", "lora_E", "lora_B"}`` arrays of
    ``dtype`` (default float32).

    >>> p = init_weights(Layer.of((5, 7)), 3)
    >>> {k: v.shape for k, v in p.items()}, float(abs(p["lora_E"]).max())
    ({'lora_A': (3, 7), 'lora_E': (3, 1), 'lora_B': (5, 3)}, 0.0)
    """
    if xp is None:
        import array_api_compat.numpy as xp
    shapes = parameter_shapes(layer, r)
    rng = host_rng(seed)
    backend = backend_for(xp)
    raw = {k: rng.standard_normal(shape) for k, shape in shapes.items()}
    if init_lora_weights:
        raw = {
            "lora_A": rng.normal(0.0, 0.02, shapes["lora_A"]),
            "lora_E": np.zeros(shapes["lora_E"]),
            "lora_B": rng.normal(0.0, 0.02, shapes["lora_B"]),
        }
    target = dtype if dtype is not None else xp.float32
    out = {}
    for key, value in raw.items():
        arr = backend.from_host(np.ascontiguousarray(value, dtype=np.float32), xp, device)
        out[key] = arr if arr.dtype == target else xp.astype(arr, target)
    return out


# --------------------------------------------------------------------------------------------------
# Rank allocation (PEFT's RankAllocator as pure functions)
# --------------------------------------------------------------------------------------------------
_SUFFIXES = ("lora_A", "lora_E", "lora_B")


@dataclass(frozen=True)
class AllocatorState:
    """What the allocator carries from one step to the next (PEFT's ``RankAllocator`` attributes).

    ``ipt``, ``exp_avg_ipt`` and ``exp_avg_unc`` map a module name to ``{"lora_A", "lora_E", "lora_B"}``
    arrays of the parameters' shapes (the last sensitivity ``I``, its EMA ``Ī`` and the uncertainty
    EMA ``Ū``); empty at the start and again after the final mask. ``rank_pattern`` holds the latest
    masks (module -> bool array ``(r,)``), frozen from step ``total_step - tfinal`` on.
    """

    ipt: dict = field(default_factory=dict)
    exp_avg_ipt: dict = field(default_factory=dict)
    exp_avg_unc: dict = field(default_factory=dict)
    rank_pattern: dict | None = None


class Allocation(NamedTuple):
    """What :func:`allocate` returns: unpack as ``state, masks, budget, threshold``."""

    state: AllocatorState
    #: module -> bool array (r,) to apply with :func:`apply_masks`; None on steps that mask nothing
    masks: dict | None
    #: the total rank budget of this step
    budget: int
    #: the masking threshold θ (E_i is zeroed where S_i <= θ); None when no new threshold was computed
    threshold: float | None


def _check_schedule(config: AdaLoraConfig) -> None:
    config.validate(source="adalora.allocate")
    if not isinstance(config.deltaT, int) or isinstance(config.deltaT, bool) or config.deltaT <= 0:
        raise ConfigError(f"adalora.allocate: deltaT must be a positive integer, got {config.deltaT!r}")
    for name in ("beta1", "beta2"):
        value = getattr(config, name)
        if not 0.0 < value < 1.0:
            raise ConfigError(f"adalora.allocate: {name} must be in (0, 1), got {value!r} (PEFT asserts this too)")


def budget_schedule(step: int, *, init_bgt: int, target_bgt: int, config: AdaLoraConfig) -> tuple[int, bool]:
    """``(budget, mask now?)`` at ``step`` (PEFT's ``RankAllocator.budget_schedule``).

    * ``t <= tinit``: ``init_bgt``, no mask (warm-up);
    * ``tinit < t <= T - tfinal``: ``int((init_bgt - target_bgt) · (1 - (t - ti)/(T - tf - ti))³ + target_bgt)``,
      mask when ``t % deltaT == 0`` (cubic decrease);
    * ``t > T - tfinal``: ``target_bgt``, mask (the frozen pattern).

    >>> cfg = AdaLoraConfig(total_step=10, tinit=2, tfinal=3, deltaT=2)
    >>> [budget_schedule(t, init_bgt=24, target_bgt=16, config=cfg) for t in (2, 3, 4, 7, 8)]
    [(24, False), (20, False), (17, True), (16, False), (16, True)]
    """
    ti, tf, T = config.tinit, config.tfinal, config.total_step
    if step <= ti:
        return init_bgt, False
    if step > T - tf:
        return target_bgt, True
    coeff = 1 - (step - ti) / (T - tf - ti)
    return int((init_bgt - target_bgt) * (coeff**3) + target_bgt), step % config.deltaT == 0


def kthvalue(x: Array, k: int) -> Array:
    """The ``k``-th smallest element of the 1-D array ``x`` (1-based, ``torch.kthvalue``'s value).

    >>> import numpy as np
    >>> float(kthvalue(np.array([3.0, 1.0, 2.0, 1.0]), 2)), float(kthvalue(np.array([3.0, 1.0, 2.0]), 3))
    (1.0, 3.0)
    """
    xp = namespace(x)
    n = int(x.shape[0])
    if not 1 <= k <= n:
        raise ShapeError(f"kthvalue: k={k} is out of range for {n} values (1 <= k <= {n})")
    return xp.sort(x)[k - 1]


def _sensitivity(params: Mapping[str, Mapping[str, Array]], grads: Mapping[str, Mapping[str, Array]],
                 state: AllocatorState, beta1: float, beta2: float) -> AllocatorState:
    ipt, avg, unc = {}, {}, {}
    for module, p in params.items():
        if module not in grads:
            raise ShapeError(f"adalora.allocate: no gradients for module {module!r}")
        ipt[module], avg[module], unc[module] = {}, {}, {}
        for suffix in _SUFFIXES:
            value, grad = p[suffix], grads[module].get(suffix)
            if grad is None:
                raise ShapeError(f"adalora.allocate: {module}: no gradient for {suffix}")
            check_shape(module, f"gradient of {suffix}", grad, tuple(value.shape))
            xp = namespace(value, grad, where=module)
            i = xp.abs(value * grad)
            prev_avg = state.exp_avg_ipt.get(module, {}).get(suffix)
            prev_unc = state.exp_avg_unc.get(module, {}).get(suffix)
            a = (1 - beta1) * i if prev_avg is None else beta1 * prev_avg + (1 - beta1) * i
            u = (1 - beta2) * xp.abs(i - a) if prev_unc is None else beta2 * prev_unc + (1 - beta2) * xp.abs(i - a)
            ipt[module][suffix], avg[module][suffix], unc[module][suffix] = i, a, u
    return AllocatorState(ipt, avg, unc, state.rank_pattern)


def triplet_scores(exp_avg_ipt: Mapping[str, Mapping[str, Array]],
                   exp_avg_unc: Mapping[str, Mapping[str, Array]]) -> dict[str, Array]:
    """Module -> ``S`` (r,): ``S_i = s(E)_i + (mean_j s(A)_{i,j} + mean_k s(B)_{k,i})`` with the
    element score ``s = Ī ⊙ Ū`` (summed in PEFT's order)."""
    out = {}
    for module, avg in exp_avg_ipt.items():
        unc = exp_avg_unc[module]
        xp = namespace(avg["lora_E"])
        score = {s: avg[s] * unc[s] for s in _SUFFIXES}
        r = int(score["lora_E"].shape[0])
        out[module] = xp.reshape(score["lora_E"], (r,)) + (xp.mean(score["lora_A"], axis=1)
                                                           + xp.mean(score["lora_B"], axis=0))
    return out


def _mask_to_budget(scores: Mapping[str, Array], budget: int, init_bgt: int) -> tuple[dict, float]:
    xp = namespace(*scores.values())
    k = init_bgt - budget
    if k <= 0:  # PEFT's torch.kthvalue raises here; nothing needs pruning
        return {m: xp.logical_not(s <= -math.inf) for m, s in scores.items()}, -math.inf
    theta = kthvalue(xp.concat([scores[m] for m in scores]), k)
    return {m: xp.logical_not(s <= theta) for m, s in scores.items()}, float(theta)


def allocate(
    step: int,
    params: Mapping[str, Mapping[str, Array]],
    grads: Mapping[str, Mapping[str, Array]] | None,
    state: AllocatorState | None,
    config: AdaLoraConfig,
) -> Allocation:
    """One call of PEFT's ``AdaLoraModel.update_and_allocate(step)``, without side effects.

    Parameters
    ----------
    step
        The global step ``t`` (PEFT calls it after ``optimizer.step()``).
    params, grads
        Module -> ``{"lora_A": (r, in), "lora_E": (r, 1), "lora_B": (out, r)}``: the current
        parameters and their gradients (``grads`` is unused, and may be None, from ``T - tfinal`` on).
    state
        The previous :class:`AllocatorState` (None at the start).
    config
        ``total_step`` ``T``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``, ``target_r``.

    Returns
    -------
    Allocation ``(state, masks, budget, threshold)``.

    Notes
    -----
    With ``init_bgt = Σ r`` over the modules and ``target_bgt = target_r · #modules``:

    1. ``t < T - tf``: for every parameter ``p`` with gradient ``g``: ``I = |p ⊙ g|``,
       ``Ī ← β1 Ī + (1-β1) I``, ``Ū ← β2 Ū + (1-β2) |I - Ī|`` (with the new ``Ī``). If the schedule
       masks at ``t`` (:func:`budget_schedule`): ``θ = kthvalue(all S, init_bgt - budget)`` over the
       :func:`triplet_scores` of every module and ``mask_i = not (S_i <= θ)``.
    2. ``t == T - tf``: no update; a forced mask to ``target_bgt`` with the current EMAs, which then
       become the frozen ``rank_pattern``; the EMAs are reset.
    3. ``t > T - tf``: the frozen masks are returned again (PEFT re-applies them every step).

    The masks zero ``E_i`` through :func:`apply_masks`. Unlike PEFT, a step whose budget equals
    ``init_bgt`` (``k = 0``) masks nothing instead of failing in ``torch.kthvalue``.
    """
    _check_schedule(config)
    state = state if state is not None else AllocatorState()
    for module, p in params.items():
        for suffix in _SUFFIXES:
            if suffix not in p:
                raise ShapeError(f"adalora.allocate: {module}: missing {suffix}")
    init_bgt = sum(int(p["lora_A"].shape[0]) for p in params.values())
    target_bgt = config.target_r * len(params)
    final = config.total_step - config.tfinal
    budget, mask_now = budget_schedule(step, init_bgt=init_bgt, target_bgt=target_bgt, config=config)
    if step < final:
        if grads is None:
            raise ShapeError(f"adalora.allocate: step {step} < total_step - tfinal = {final} needs gradients")
        new = _sensitivity(params, grads, state, config.beta1, config.beta2)
        if not mask_now:
            return Allocation(new, None, budget, None)
        masks, theta = _mask_to_budget(triplet_scores(new.exp_avg_ipt, new.exp_avg_unc), budget, init_bgt)
        return Allocation(AllocatorState(new.ipt, new.exp_avg_ipt, new.exp_avg_unc, masks), masks, budget, theta)
    if step == final:
        missing = sorted(set(params) - set(state.exp_avg_ipt))
        if missing:
            raise ConfigError(
                f"adalora.allocate: the final mask at step {step} needs the sensitivity of every module, "
                f"but the state has none for {missing[:3]}; call allocate on the earlier steps first"
            )
        scores = triplet_scores({m: state.exp_avg_ipt[m] for m in params}, {m: state.exp_avg_unc[m] for m in params})
        masks, theta = _mask_to_budget(scores, budget, init_bgt)
        return Allocation(AllocatorState(rank_pattern=masks), masks, budget, theta)
    if state.rank_pattern is None:
        raise ConfigError(
            f"adalora.allocate: step {step} > total_step - tfinal = {final} re-applies the frozen rank pattern, "
            f"but the state has none; call allocate at step {final} first"
        )
    return Allocation(state, state.rank_pattern, budget, None)


def _mask_list(mask: Any) -> list[bool]:
    if isinstance(mask, (list, tuple)):
        return [bool(v) for v in mask]
    n = int(mask.shape[0])
    return [bool(mask[i]) for i in range(n)]


def apply_masks(params: Mapping[str, Mapping[str, Array]], masks: Mapping[str, Any]) -> dict[str, dict[str, Array]]:
    """New parameters with ``E_i = 0`` wherever ``masks[module][i]`` is False (PEFT's ``masked_fill_``).

    ``masks`` maps a module (or its ``"<module>.lora_E"`` key, as in a config's ``rank_pattern``)
    to a bool array or list of length r. Modules without a mask are passed through.
    """
    out = {}
    for module, p in params.items():
        mask = _lookup_pattern(masks, module)
        p = dict(p)
        if mask is not None:
            E = p["lora_E"]
            xp = namespace(E)
            r = int(E.shape[0])
            if isinstance(mask, (list, tuple)):
                mask = xp.asarray(_mask_list(mask), dtype=xp.bool, device=array_api_compat.device(E))
            if tuple(mask.shape) != (r,):
                raise ShapeError(f"{module}: rank mask has {tuple(mask.shape)} entries, lora_E has r={r}")
            p["lora_E"] = xp.where(xp.reshape(mask, (r, 1)), E, xp.zeros_like(E))
        out[module] = p
    return out


def resize_by_rank_pattern(params: Mapping[str, Mapping[str, Array]],
                           rank_pattern: Mapping[str, Any]) -> dict[str, dict[str, Array]]:
    """What PEFT does when it saves: keep the rows of ``lora_A`` and ``lora_E`` and the columns of
    ``lora_B`` whose mask entry is True (``AdaLoraModel.resize_state_dict_by_rank_pattern``).

    >>> import numpy as np
    >>> p = {"q": {"lora_A": np.arange(6.0).reshape(3, 2), "lora_E": np.ones((3, 1)), "lora_B": np.eye(3)}}
    >>> out = resize_by_rank_pattern(p, {"q.lora_E": [True, False, True]})
    >>> out["q"]["lora_A"], out["q"]["lora_B"].shape
    (array([[0., 1.],
           [4., 5.]]), (3, 2))
    """
    out = {}
    for module, p in params.items():
        mask = _lookup_pattern(rank_pattern, module)
        p = dict(p)
        if mask is not None:
            keep = _mask_list(mask)
            r = int(p["lora_A"].shape[0])
            if len(keep) != r:
                raise ShapeError(f"{module}: rank mask has {len(keep)} entries but lora_A has r={r} rows")
            if sum(keep) != r:
                xp = namespace(p["lora_A"])
                idx = xp.asarray([i for i, k in enumerate(keep) if k], dtype=xp.int64,
                                 device=array_api_compat.device(p["lora_A"]))
                p["lora_A"] = xp.take(p["lora_A"], idx, axis=0)
                p["lora_E"] = xp.take(p["lora_E"], idx, axis=0)
                p["lora_B"] = xp.take(p["lora_B"], idx, axis=1)
        out[module] = p
    return out


def rank_pattern_for_config(masks: Mapping[str, Any]) -> dict[str, list[bool]]:
    """Masks by module as the config's ``rank_pattern`` as PEFT saves it: ``{"<module>.lora_E": [bool]}``.

    >>> import numpy as np
    >>> rank_pattern_for_config({"layers.0.q": np.array([True, False])})
    {'layers.0.q.lora_E': [True, False]}
    """
    return {(m if m.endswith(".lora_E") else f"{m}.lora_E"): _mask_list(v) for m, v in masks.items()}


def orthogonal_regularizer(params: Mapping[str, Mapping[str, Array]]) -> Array:
    """AdaLoRA's regulariser ``R = mean over {A, B} of every module of ‖C − I‖_F``, with ``C = A Aᵀ``
    for ``lora_A`` and ``C = Bᵀ B`` for ``lora_B`` (both r × r); PEFT adds ``orth_reg_weight · R``
    to the loss. Returns a 0-d array in the parameters' dtype (0 for no modules).

    >>> import numpy as np
    >>> p = {"q": {"lora_A": np.eye(2, 3), "lora_E": np.zeros((2, 1)), "lora_B": 2 * np.eye(3, 2)}}
    >>> float(orthogonal_regularizer(p))    # (‖0‖ + ‖3 I₂‖) / 2
    2.1213203435596424
    """
    arrays = [a for p in params.values() for a in (p["lora_A"], p["lora_B"])]
    if not arrays:
        return 0.0
    xp = namespace(*arrays)
    total = None
    for p in params.values():
        for suffix in ("lora_A", "lora_B"):
            P = p[suffix]
            C = xp.matmul(P, xp.matrix_transpose(P)) if suffix == "lora_A" else xp.matmul(xp.matrix_transpose(P), P)
            eye = xp.eye(int(C.shape[0]), dtype=C.dtype, device=array_api_compat.device(C))
            term = xp.sqrt(xp.sum((C - eye) ** 2))
            total = term if total is None else total + term
    return total / len(arrays)


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
class AdaLoraModule(ModuleAdapter):
    """AdaLoRA on one base module (PEFT's ``SVDLinear`` / ``SVDConv2d``)."""

    peft_type = "ADALORA"
    supported_kinds = _KINDS

    @classmethod
    def initialize(cls, name: str, config: AdaLoraConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """Fresh parameters of rank ``init_r`` (``init`` overrides ``config.init_lora_weights``).

        When ``config.rank_pattern`` has a mask for ``name``, the pruned rows are dropped, as in a
        checkpoint PEFT saved. The base weight is never changed (second item None).
        """
        if xp is None and weight is not None:
            xp = namespace(weight)
        params = init_weights(layer, config.init_r, init_lora_weights=config.init_lora_weights if init is None else init,
                              seed=seed, xp=xp, device=device, dtype=dtype)
        mask = config.rank_mask(name)
        if mask is not None:
            _check_mask(name, mask, config.init_r, None)
            params = resize_by_rank_pattern({name: params}, {name: mask})[name]
        return params, None

    @classmethod
    def infer_layer(cls, name: str, config: AdaLoraConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """Linear vs Conv1D from the base weight's shape (a square one follows ``kind``, then the
        config's ``fan_in_fan_out``); a 4-D base weight is a Conv2d."""
        for key in _SUFFIXES:
            if key not in params:
                raise ShapeError(f"{name}: missing {key} (an AdaLoRA module holds lora_A, lora_E and lora_B)")
        A, B = params["lora_A"], params["lora_B"]
        if (weight_shape is not None and len(weight_shape) == 4) or (
                kind is not None and LayerKind.parse(kind) is LayerKind.CONV2D):
            if weight_shape is None:
                raise ShapeError(f"{name}: a Conv2d AdaLoRA module needs the base weight's shape (its kernel size)")
            return Layer.of(tuple(weight_shape), kind)
        if A.ndim != 2 or B.ndim != 2:
            raise ShapeError(f"{name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} must be matrices")
        return LoraModule.infer_layer(name, config, {"lora_A.weight": A, "lora_B.weight": B}, weight_shape, kind)

    def validate(self) -> None:
        p = self.params
        for key in _SUFFIXES:
            if key not in p:
                raise ShapeError(f"{self.name}: missing {key} for an AdaLoRA {self.layer.kind.value} layer")
        _check_kind(self.layer, self.name)
        self.A, self.E, self.B = p["lora_A"], p["lora_E"], p["lora_B"]
        self.r = int(self.A.shape[0])
        expected = parameter_shapes(self.layer, self.r)
        for key in _SUFFIXES:
            check_shape(self.name, key, p[key], expected[key])
        init_r = self.config.init_r
        mask = self.config.rank_mask(self.name)
        if mask is not None:
            _check_mask(self.name, mask, init_r, self.r)
        elif self.r != init_r:
            raise ShapeError(
                f"{self.name}: lora_A has {self.r} rows but init_r={init_r} and rank_pattern has no mask for "
                f"'{self.name}.lora_E' (a pruned checkpoint records its kept rows there)"
            )
        #: PEFT's ``ranknum``: init_r even after pruning (not saved; reset to init_r on load)
        self.ranknum = float(init_r) if self.r > 0 else 0.0
        self.scaling = scaling(self.config.lora_alpha, self.r)

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        return _delta(self.xp, self.A, self.E, self.B, scaling=self.scaling, ranknum=self.ranknum, layer=self.layer,
                      peft_compat=peft_compat, where=self.name)

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        new = _apply(weight, self.A, self.E, self.B, scaling=self.scaling, ranknum=self.ranknum, sign=1,
                     layer=self.layer, copy=copy, safe=safe, peft_compat=peft_compat, where=self.name)
        return MergeResult(new, bias)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        new = _apply(weight, self.A, self.E, self.B, scaling=self.scaling, ranknum=self.ranknum, sign=-1,
                     layer=self.layer, copy=copy, safe=False, peft_compat=peft_compat, where=self.name)
        return MergeResult(new, bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, kw = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.A, self.E, self.B, scaling=self.scaling, ranknum=self.ranknum, bias=bias,
                       layer=layer, **kw)


def _check_mask(name: str, mask: Any, init_r: int, r: int | None) -> None:
    keep = _mask_list(mask)
    if len(keep) != init_r:
        raise ShapeError(
            f"{name}: rank_pattern mask for '{name}.lora_E' has {len(keep)} entries but init_r={init_r}; "
            f"the mask must have one entry per initial singular value (is this the adapter's config?)"
        )
    if r is not None and sum(keep) != r:
        raise ShapeError(
            f"{name}: rank_pattern keeps {sum(keep)} of {init_r} singular values but the checkpoint holds "
            f"r={r} (lora_A has {r} rows); the tensors and the config do not belong together"
        )


#: checkpoint suffixes of this method's per-module tensors (ParameterDicts: no ".weight")
PARAMETER_SUFFIXES = ("lora_A", "lora_B", "lora_E")
Config = AdaLoraConfig
Module = AdaLoraModule
#: demo / documentation examples: row label -> config fields (non-trivial: E random, alpha != r)
EXAMPLES = {
    "AdaLoRA": dict(init_r=6, target_r=4, lora_alpha=12, total_step=100, tinit=10, tfinal=20,
                    init_lora_weights=False),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=AdaLoraConfig, module=AdaLoraModule, spec="specs/adalora.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=AdaLoraModule.supported_kinds, additive=True,
    init_field="init_lora_weights", examples=EXAMPLES,
)
