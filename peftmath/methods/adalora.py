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

The rank allocator (PEFT's ``RankAllocator`` and ``AdaLoraModel.update_and_allocate``), written as
pure functions, lives in :mod:`peftmath.methods.adalora_allocator`; every name of it is importable from
here too. :func:`allocate` takes the
parameters, their gradients, the step and the previous :class:`AllocatorState` and returns the new
state, the masks, the budget and the threshold; :func:`apply_masks`, :func:`resize_by_rank_pattern`
(what PEFT does when it saves) and :func:`orthogonal_regularizer` complete it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import array_api_compat
import numpy as np

from .._array import as_compute, compute_dtype, conv, is_low_precision, namespace
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_nonnegative_int, check_number
from ..errors import ConfigError, ShapeError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import MergeResult, ModuleAdapter, require_kind, apply_delta, check_shape
from .lora import LoraConfig, LoraModule

# the rank allocator lives in its own module; every name stays importable from here
from .adalora_allocator import (  # noqa: F401
    Allocation, AllocatorState, allocate, apply_masks, budget_schedule, kthvalue, lookup_mask, orthogonal_regularizer,
    rank_pattern_for_config, resize_by_rank_pattern, triplet_scores,
)
from . import adalora_allocator as _allocator
from .adalora_allocator import TENSORS, mask_list

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
    "AdaLoraModule",
    *(name for name in _allocator.__all__ if name != "lookup_mask"),  # the rank allocator, re-exported
]

PEFT_TYPE = "ADALORA"

#: the constant PEFT adds to ``ranknum`` before dividing
RANKNUM_EPS = 1e-5


# --------------------------------------------------------------------------------------------------
# Config (specs/adalora.md, "Config (`peft_type: "ADALORA"`)")
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
        return lookup_mask(self.rank_pattern, module_name)

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


# --------------------------------------------------------------------------------------------------
# Shapes (specs/adalora.md, "Notation and shapes")
# --------------------------------------------------------------------------------------------------
_KINDS = (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED, LayerKind.CONV2D)


def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "AdaLoRA", _KINDS, peft="it raises ValueError for others",
                 grouped="PEFT sizes lora_A for all input channels and its delta cannot be reshaped to the grouped "
                         "weight")


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
# Scaling (specs/adalora.md, "Scaling")
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


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/adalora.md, "Initialisation (`init_lora_weights`)")
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
# Delta weight (specs/adalora.md, "Delta, forward, merge, unmerge")
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
# Forward (specs/adalora.md, "Delta, forward, merge, unmerge")
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
# Merge / unmerge (specs/adalora.md, "Delta, forward, merge, unmerge")
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
# One module of a checkpoint (specs/adalora.md, "Loading a pruned checkpoint")
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
        for key in TENSORS:
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

    def scaled(self, c: float) -> "ModuleAdapter":
        """Scale ``c``: ``s → c·s``, so ``ΔW → c·ΔW`` (PEFT's ``scale_layer``)."""
        return self.scale_scaling(c)

    def validate(self) -> None:
        p = self.params
        for key in TENSORS:
            if key not in p:
                raise ShapeError(f"{self.name}: missing {key} for an AdaLoRA {self.layer.kind.value} layer")
        _check_kind(self.layer, self.name)
        self.A, self.E, self.B = p["lora_A"], p["lora_E"], p["lora_B"]
        self.r = int(self.A.shape[0])
        expected = parameter_shapes(self.layer, self.r)
        for key in TENSORS:
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
    keep = mask_list(mask)
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
