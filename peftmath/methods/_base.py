"""What every method shares: binding parameters to a module, and the additive merge.

A :class:`ModuleAdapter` is one adapter's parameters on one base module plus that method's math.
:class:`~peftmath.adapter.Adapter` holds one per adapted module and calls these methods; nothing
here reads files or knows about checkpoints beyond the parameter names.

:func:`apply_delta` is the one place where ``W ± ΔW`` is computed for every additive method
(LoRA, AdaLoRA, LoHa, LoKr, VeRA): the rounding policy, the safe-merge check and the in-place
(``copy=False``) contract live here.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, NamedTuple

from .._array import all_finite, as_compute, compute_dtype, dtype_name, is_low_precision, is_writeable, namespace
from ..backends import backend_for
from ..errors import NonFiniteError, ShapeError, UnsupportedError
from ..layers import Layer

Array = Any

__all__ = ["MergeResult", "ModuleAdapter", "apply_delta", "finish", "bias_update", "write_back", "require_writeable", "check_shape"]


class MergeResult(NamedTuple):
    """What merge and unmerge return for one module.

    ``record`` holds what the inverse needs and cannot recompute (DoRA's weight norm); it is
    ``None`` for methods whose unmerge needs nothing beyond the adapter.
    """

    weight: Array
    bias: Array | None = None
    record: Any = None


def check_shape(module: str, what: str, array: Array, expected: tuple[int, ...]) -> None:
    """Raise :class:`ShapeError` unless ``array.shape == expected``, naming module and tensor."""
    if tuple(array.shape) != tuple(expected):
        raise ShapeError(
            f"{module}: {what} has shape {tuple(array.shape)}, expected {tuple(expected)} "
            f"(does the adapter belong to this base model?)"
        )


def require_writeable(module: str, target: Array) -> None:
    """Raise :class:`UnsupportedError` when ``copy=False`` cannot write into ``target``."""
    if not is_writeable(target):
        raise UnsupportedError(
            f"{module}: copy=False needs a writeable array, got a read-only {type(target).__name__}; "
            f"use copy=True (JAX arrays are immutable)"
        )


def write_back(module: str, target: Array, value: Array) -> Array:
    """Store ``value`` into ``target``'s memory (the ``copy=False`` contract) and return ``target``."""
    require_writeable(module, target)
    target[...] = value
    return target


def finish(module: str, weight: Array, new: Array, *, copy: bool, safe: bool, xp: Any) -> Array:
    """Round ``new`` (computed in a wider dtype) once to ``weight``'s dtype, refuse a non-finite result
    when ``safe``, then return it (``copy=True``) or store it into ``weight`` (``copy=False``).

    The last step of every merge and unmerge: nothing is written before the checks pass.
    """
    result = as_compute(xp, new, weight.dtype)
    if safe and not all_finite(result, xp=xp):
        raise NonFiniteError(
            f"{module}: the merged weight would contain NaN or infinity (dtype {dtype_name(weight.dtype)}); "
            f"the base weight is unchanged. Check the adapter for non-finite values or merge into a wider dtype"
        )
    return result if copy else write_back(module, weight, result)


def apply_delta(
    module: str,
    weight: Array,
    delta: Array | Callable[[], Array],
    *,
    sign: int = 1,
    copy: bool = True,
    safe: bool = False,
    round_delta_to: Any = None,
    inplace_kernel: Callable[[], bool] | None = None,
    xp: Any = None,
) -> Array:
    """``weight + sign * delta`` with peftmath's rounding policy.

    Parameters
    ----------
    weight
        The base weight in its stored layout and dtype.
    delta
        ``ΔW`` in the same layout, in a compute dtype (float32 or float64), or a zero-argument
        callable producing it (so that the in-place kernel can skip building it).
    round_delta_to
        ``None`` (the default policy): the sum is formed in float32 (float64 for float64 inputs) and
        rounded once to ``weight.dtype``. A dtype: ``delta`` is first rounded to it, as PEFT does
        (``W ± Δ.to(W.dtype)``); used by ``peft_compat=True``.
    copy
        True returns a new array. False writes into ``weight`` and returns it, or raises
        :class:`UnsupportedError` for an immutable array; nothing is written when an error is raised.
    safe
        Refuse (:class:`NonFiniteError`) a result with NaN or infinity; ``weight`` is untouched.
    inplace_kernel
        A backend fast path for ``copy=False`` that updates ``weight`` in place without a temporary
        of its size and returns True, or returns False (touching nothing) when it cannot.
    xp
        The namespace of ``weight`` when the caller already knows it.
    """
    xp = xp or namespace(weight, where=module)
    if not copy:
        require_writeable(module, weight)
        if not safe and round_delta_to is None and inplace_kernel is not None and inplace_kernel():
            return weight
    if callable(delta):
        delta = delta()
    if tuple(delta.shape) != tuple(weight.shape):
        raise ShapeError(f"{module}: delta weight {tuple(delta.shape)} does not match base weight {tuple(weight.shape)}")
    cd = compute_dtype(xp, weight.dtype, delta.dtype)
    if round_delta_to is not None:
        delta = as_compute(xp, xp.astype(delta, round_delta_to), cd)
    total = as_compute(xp, weight, cd) + delta if sign > 0 else as_compute(xp, weight, cd) - delta
    return finish(module, weight, total, copy=copy, safe=safe, xp=xp)


def bias_update(
    module: str,
    bias: Array | None,
    delta: Array,
    *,
    sign: int = 1,
    round_delta_to: Any = None,
) -> Array:
    """``bias + sign * delta`` under the same rounding policy as :func:`apply_delta` (always a copy)."""
    if bias is None:
        raise ShapeError(
            f"{module}: the adapter has a bias term (lora_bias) but the base layer has no bias; "
            f"add a zero bias to the base layer to merge it"
        )
    xp = namespace(bias, delta, where=module)
    cd = compute_dtype(xp, bias.dtype, delta.dtype)
    if round_delta_to is not None:
        delta = xp.astype(delta, round_delta_to)
    b = as_compute(xp, bias, cd)
    d = as_compute(xp, delta, cd)
    return as_compute(xp, b + d if sign > 0 else b - d, bias.dtype)


class ModuleAdapter:
    """One adapter on one base module: its parameters, its layer geometry and its math.

    Subclasses set :attr:`peft_type`, implement :meth:`validate` and the operations. ``params`` maps
    the parameter's checkpoint suffix (``"lora_A.weight"``, ``"hada_w1_a"``, ...) to its array.
    """

    peft_type: ClassVar[str] = ""
    #: True when merging adds a delta weight (so :meth:`delta_weight` exists)
    additive: ClassVar[bool] = True

    def __init__(self, name: str, config: Any, params: dict[str, Array], layer: Layer, *,
                 shared: dict[str, Array] | None = None) -> None:
        self.name = name
        #: tensors the adapter shares across modules (VeRA's projections), by checkpoint key
        self.shared = shared or {}
        self.config = config
        self.params = dict(params)
        self.layer = layer
        self.xp = namespace(*self.params.values(), where=name)
        self.validate()

    # --- to implement -------------------------------------------------------------------------
    def validate(self) -> None:
        """Check parameter names and shapes against the layer; raise ShapeError naming the module."""

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        """``ΔW`` in the base weight's stored layout, in the compute dtype (additive methods)."""
        raise UnsupportedError(f"{self.name}: {self.peft_type} is not additive; it has no delta weight")

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        """Default additive merge: ``W + ΔW``."""
        self.layer.check_weight(weight)
        new = apply_delta(self.name, weight, lambda: self.delta_weight(peft_compat=peft_compat), copy=copy, safe=safe)
        return MergeResult(new, bias)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        """Default additive unmerge: ``W - ΔW``."""
        self.layer.check_weight(weight)
        new = apply_delta(self.name, weight, lambda: self.delta_weight(peft_compat=peft_compat), sign=-1, copy=copy)
        return MergeResult(new, bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        """The unmerged adapted forward of this module."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Resolved per-module hyper-parameters for summaries (rank, alpha, scaling, ...)."""
        return {}

    def num_parameters(self) -> int:
        """Number of trainable scalars held by this module's adapter."""
        total = 0
        for a in self.params.values():
            n = 1
            for s in a.shape:
                n *= int(s)
            total += n
        return total

    def dtypes(self) -> set[str]:
        return {dtype_name(a.dtype) for a in self.params.values()}

    def backend(self):
        return backend_for(self.xp)

    def param_dtype(self) -> Any:
        """The dtype of the adapter's parameters (the first one)."""
        return next(iter(self.params.values())).dtype

    def low_precision_params(self) -> bool:
        return any(is_low_precision(a.dtype) for a in self.params.values())
