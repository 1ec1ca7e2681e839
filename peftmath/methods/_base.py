"""What every method shares: binding parameters to a module, and the one write path of every merge.

A :class:`ModuleAdapter` is one adapter's parameters on one base module plus that method's math.
:class:`~peftmath.adapter.Adapter` holds one per adapted module and calls these methods; nothing
here reads files or knows about checkpoints beyond the parameter names.

The in-place contract (design §3.9) lives here, in :func:`write_weight`, and every merge and unmerge
of every method (LoRA, DoRA, AdaLoRA, IA3, LoHa, LoKr, VeRA, OFT, BOFT) writes through it:

* ``copy=False`` writes the result into the caller's array and returns that array, or raises
  :class:`~peftmath.errors.UnsupportedError` (naming the module and the layout, saying "use
  copy=True") before anything is written: a read-only NumPy array, a JAX array, a lazy dask array, a
  torch leaf tensor that requires grad. Nothing else: never a result computed into a copy and
  returned as if written.
* A backend's in-place kernel (``addmm_``, ``dora_merge_``, ``scale_``, ...) is only ever given the
  weight's matrix view when :meth:`~peftmath.layers.Layer.matrix_view` proves that view aliases the
  caller's memory. A layout whose matrix view would be a copy (a Fortran-ordered, permuted or
  column-sliced conv weight, torch ``channels_last``) is computed out of place and stored with
  ``weight[...] = result``, which writes into the caller's memory whatever its strides.
* ``copy=True`` never touches ``weight`` and returns the same numbers on every layout. On a mutable
  backend with an in-place kernel it allocates the result once, as a private C-ordered copy of
  ``weight`` in its own dtype (:func:`private_copy`: one allocation, one pass), and runs the kernel on
  it (issue 20): no temporary of the weight's size besides the result (half precision: the kernels'
  float32 row tiles), and on a layout whose matrix view is a view the same numbers, bit for bit, as
  ``copy=False``. JAX and dask arrays (immutable or lazy), a kernel that declines, and a method
  without a kernel take the out-of-place ``compute`` path.

:func:`apply_delta` is the additive form of it (``W ± ΔW``, LoRA, AdaLoRA, LoHa, LoKr, VeRA) with
the rounding policy and the safe-merge check.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, ClassVar, NamedTuple

import numpy as np

from .._array import (
    all_finite, as_compute, compute_dtype, contiguous_copy, dtype_name, is_immutable, is_low_precision, namespace,
    why_not_writeable,
)
from ..backends import backend_for
from ..errors import ConfigError, NonFiniteError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind

Array = Any

__all__ = ["MergeResult", "ModuleAdapter", "apply_delta", "orient_2d", "start_shared_init", "write_weight", "finish", "bias_update", "write_back",
           "private_copy", "in_row_tiles", "require_writeable", "require_kind", "check_shape"]


class MergeResult(NamedTuple):
    """What merge and unmerge return for one module.

    ``record`` holds what the inverse needs and cannot recompute (DoRA's weight norm); it is
    ``None`` for methods whose unmerge needs nothing beyond the adapter.
    """

    weight: Array
    bias: Array | None = None
    record: Any = None


def require_kind(layer: Layer, where: str, method: str, supported: tuple, *, peft: str = "",
                 grouped: str | None = None, error: type = UnsupportedError) -> None:
    """Refuse a base layer a method does not adapt: its kind is not in ``supported`` (``peft`` says what PEFT
    does with it), or, when ``grouped`` is given (why a grouped conv has no meaning for the method), a conv
    with ``groups > 1``. ``error`` is the exception class (:class:`UnsupportedError` by default)."""
    if layer.kind not in supported:
        names = ", ".join(k.value for k in supported)
        raise error(f"{where}: {method} is not defined for a {layer.kind.value} layer (peftmath and PEFT adapt "
                    f"{names}{'; ' + peft if peft else ''})")
    if grouped is not None and layer.groups != 1:
        raise UnsupportedError(f"{where}: {method} is not defined on a grouped convolution (groups={layer.groups}): "
                               f"{grouped}")


def check_shape(module: str, what: str, array: Array, expected: tuple[int, ...]) -> None:
    """Raise :class:`ShapeError` unless ``array.shape == expected``, naming module and tensor."""
    if tuple(array.shape) != tuple(expected):
        raise ShapeError(
            f"{module}: {what} has shape {tuple(array.shape)}, expected {tuple(expected)} "
            f"(does the adapter belong to this base model?)"
        )


def require_writeable(module: str, target: Array, what: str = "base weight") -> None:
    """Raise :class:`UnsupportedError` when ``copy=False`` cannot write into ``target`` (see
    :func:`peftmath._array.why_not_writeable`), naming the module and the layout."""
    reason = why_not_writeable(target)
    if reason is not None:
        raise UnsupportedError(
            f"{module}: copy=False writes into the caller's array, but the {what} is not writeable: it is "
            f"{reason}; nothing was written, use copy=True"
        )


def write_back(module: str, target: Array, value: Array) -> Array:
    """Store ``value`` into ``target``'s memory (the ``copy=False`` contract) and return ``target``.

    ``target[...] = value`` writes through any strides (Fortran order, permuted and sliced views,
    torch ``channels_last``)."""
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


def write_weight(
    module: str,
    weight: Array,
    compute: Callable[[], Array],
    *,
    layer: Layer | None = None,
    kernel: Callable[[Array], bool] | None = None,
    copy: bool = True,
    safe: bool = False,
    kernel_on_copy: bool = True,
    xp: Any = None,
) -> Array:
    """The one write path of every merge and unmerge (the module docstring states the contract).

    Parameters
    ----------
    weight
        The base weight in its stored layout and dtype.
    compute
        Builds the new weight in the stored layout, as a fresh array in ``weight``'s dtype or wider
        (rounded once to ``weight.dtype`` here).
    layer
        The weight's layer: ``kernel`` then receives its ``(out, in_flat)`` matrix view
        (:meth:`~peftmath.layers.Layer.matrix_view`); None gives ``kernel`` the array itself.
    kernel
        An in-place fast path: updates the array it is given (always a proven view of the target's
        memory) and returns True, or returns False touching nothing. Skipped with ``safe``.
    copy
        False: write into ``weight`` and return it (kernel on its proven matrix view, else ``compute``
        and ``weight[...] = result``), or raise :class:`UnsupportedError` before writing anything.
        True: return a new array; ``weight`` is never touched.
    safe
        Refuse (:class:`NonFiniteError`) a non-finite result before anything is written.
    kernel_on_copy
        (default True) Where ``kernel`` did not run on ``weight`` itself (``copy=True``, ``safe``, or a
        layout whose matrix view would be a copy), run it on a private C-ordered copy of ``weight``
        (:func:`private_copy`) instead of calling ``compute``: one allocation of the weight's size, no
        temporary of it besides; that copy is the result, or is stored into ``weight`` for
        ``copy=False``. Skipped for immutable and lazy arrays (JAX, dask) and for a torch tensor that
        records gradients (the result keeps its autograd graph through ``compute``). False: always
        ``compute`` there (a method whose ``compute`` already writes its result in one pass).
    """
    xp = xp or namespace(weight, where=module)
    if not copy:
        require_writeable(module, weight)
        if kernel is not None and not safe:
            view = weight if layer is None else layer.matrix_view(weight, xp)
            if view is not None and kernel(view):
                return weight
    if kernel is not None and kernel_on_copy and _copy_takes_kernel(weight):
        out = private_copy(weight, xp=xp)
        view = None if why_not_writeable(out) else out if layer is None else layer.matrix_view(out, xp)
        if view is not None and kernel(view):
            return finish(module, weight, out, copy=copy, safe=safe, xp=xp)
        del out, view  # the kernel declined: free the copy before compute allocates
    return finish(module, weight, compute(), copy=copy, safe=safe, xp=xp)


#: bytes of one compute-dtype row tile in :func:`in_row_tiles` (about 4 MiB)
ROW_TILE_BYTES = 4 << 20


def in_row_tiles(xp: Any, M: Array, cd: Any, update: Callable[[Array, int, int], None], *,
                 tile_full: bool = False) -> None:
    """Run the in-place ``update(T, r0, r1)`` on rows ``r0:r1`` of ``M`` in the compute dtype ``cd``: on ``M``
    itself (one call, all rows) when it has that dtype, else on row tiles of about :data:`ROW_TILE_BYTES`
    widened to ``cd``, each rounded once back into ``M`` (a half-precision kernel without a float32 copy of
    ``M``; the rounding of the out-of-place path). ``tile_full``: tiles in ``cd`` too, ``T`` then a view of
    rows of ``M`` (an update that builds a temporary of its tile's size). ``T`` has ``M``'s trailing shape."""
    n_rows = int(M.shape[0])
    if M.dtype == cd and not tile_full:
        update(M, 0, n_rows)
        return
    per_row = 1
    for n in M.shape[1:]:
        per_row *= int(n)
    rows = max(1, ROW_TILE_BYTES // (4 * max(1, per_row)))
    for r0 in range(0, n_rows, rows):
        r1 = min(r0 + rows, n_rows)
        if M.dtype == cd:
            update(M[r0:r1, ...], r0, r1)
            continue
        tile = xp.astype(M[r0:r1, ...], cd)
        update(tile, r0, r1)
        M[r0:r1, ...] = xp.astype(tile, M.dtype)


def _copy_takes_kernel(weight: Array) -> bool:
    """Whether a private copy of ``weight`` can be updated by an in-place kernel and returned as the
    result: not for JAX / dask arrays (immutable, lazy) nor a torch tensor that requires grad while
    autograd is on (a kernel would cut the result's graph; the kernels decline it anyway)."""
    if is_immutable(weight):
        return False
    if getattr(weight, "requires_grad", False):
        import torch

        return not torch.is_grad_enabled()
    return True


def private_copy(weight: Array, *, xp: Any = None) -> Array:
    """A new, writeable, C-ordered array equal to ``weight`` in its own dtype: one allocation and one
    pass over ``weight`` whatever its layout (NumPy: ``np.array(order="C")``; torch: ``clone`` into the
    contiguous format; others: :func:`~peftmath._array.contiguous_copy`). A read-only input (a memory
    map) gives a writeable copy."""
    if isinstance(weight, np.ndarray):
        return np.array(weight, order="C", copy=True)
    return contiguous_copy(weight, xp=xp)


def layer_of_weight_shape(name: str, key: str, params: Mapping[str, Array], weight_shape: tuple[int, ...] | None,
                          kind: Any, fan_in_fan_out: bool, stores: str) -> Layer:
    """The layer of a method whose tensors do not tell the base layer's shape (FourierFT's and WaveFT's
    coefficients, ``stores`` says what they hold): ``weight_shape`` is required; ``kind`` when given, else
    the config's ``fan_in_fan_out`` (transformers ``Conv1D``) or ``Linear``."""
    if key not in params:
        raise ShapeError(f"{name}: no {key} among the module's tensors {sorted(params)}")
    if weight_shape is None:
        raise ShapeError(f"{name}: {stores}, which do not determine the base layer; pass the base weight shape "
                         f"(weight_shape=...)")
    shape = tuple(int(s) for s in weight_shape)
    if kind is not None or len(shape) != 2:
        return Layer.of(shape, kind)
    return Layer(LayerKind.CONV1D_TRANSPOSED if fan_in_fan_out else LayerKind.LINEAR, shape)


def start_shared_init(name: str, config: Any, layer: Layer, *, weight: Array | None, xp: Any, init: Any,
                      shared: Any, keys: tuple[str, ...], init_shared: Callable[..., dict[str, Array]], device: Any,
                      dtype: Any) -> tuple[Any, bool, dict[str, Array], bool]:
    """The start of ``initialize`` for a method with shared projections drawn once (VeRA, PVeRA, RandLoRA):
    ``(xp, init flag, shared, own)``. ``xp`` defaults to the base weight's namespace; the flag is ``init`` or
    ``config.init_weights`` and must be a bool; ``shared`` missing any of ``keys`` receives projections sized
    to this layer (``init_shared(config, [layer], ...)``); ``own`` says the caller gave no ``shared`` dict (the
    projections then go back among the params)."""
    if xp is None and weight is not None:
        xp = namespace(weight)
    flag = config.init_weights if init is None else init
    if not isinstance(flag, bool):
        raise ConfigError(f"{name}: init_weights must be true or false, got {flag!r}")
    own = shared is None
    if own:
        shared = {}
    if not all(k in shared for k in keys):
        shared.update(init_shared(config, [layer], xp=xp, device=device, dtype=dtype))
    return xp, flag, shared, own


def orient_2d(name: str, shape: tuple[int, ...], out: int, inn: int, fan_in_fan_out: bool, what: str) -> Layer:
    """The layer of a 2-D base weight ``shape`` whose adapter tensors give ``(out, in)``: ``(out, in)`` is an
    nn.Linear, ``(in, out)`` a transformers Conv1D, a square one follows the config's ``fan_in_fan_out``;
    any other shape is a :class:`ShapeError` naming ``what`` (the tensors that gave out and in)."""
    shape = tuple(int(s) for s in shape)
    if shape == (out, inn) and shape != (inn, out):
        return Layer(LayerKind.LINEAR, shape)
    if shape == (inn, out) and shape != (out, inn):
        return Layer(LayerKind.CONV1D_TRANSPOSED, shape)
    if shape == (out, inn):  # square: the config's flag decides
        return Layer(LayerKind.CONV1D_TRANSPOSED if fan_in_fan_out else LayerKind.LINEAR, shape)
    raise ShapeError(f"{name}: base weight {shape} fits neither (out, in) = {(out, inn)} nor (in, out) = "
                     f"{(inn, out)} of {what}; does the adapter belong to this model?")


def add_fresh_delta(module: str, weight: Array, fresh: Callable[[], Array], cd: Any, *, copy: bool = True,
                    safe: bool = False, xp: Any = None) -> Array:
    """``weight + D`` where ``fresh()`` builds ``D = ±ΔW`` as a new array in the stored layout and the compute
    dtype ``cd`` (a transform's output: FourierFT, WaveFT, C3A, OSF), written by :func:`write_weight`:
    ``copy=True`` adds ``weight`` into ``D``'s own memory (``D`` becomes the result: no other array of W's
    size), ``copy=False`` adds ``D`` into a ``weight`` already in ``cd`` (else computed and stored)."""
    xp = xp or namespace(weight, where=module)

    def compute() -> Array:
        d = fresh()
        d += as_compute(xp, weight, cd)  # W + D into D's own memory (JAX and dask rebind)
        return d

    def kernel(M: Array) -> bool:
        if M.dtype != cd:
            return False
        M += fresh()
        return True

    return write_weight(module, weight, compute, kernel=kernel, copy=copy, safe=safe, kernel_on_copy=False, xp=xp)


def apply_delta(
    module: str,
    weight: Array,
    delta: Array | Callable[[], Array],
    *,
    sign: int = 1,
    copy: bool = True,
    safe: bool = False,
    round_delta_to: Any = None,
    layer: Layer | None = None,
    inplace_kernel: Callable[[Array], bool] | None = None,
    kernel_on_copy: bool = True,
    xp: Any = None,
) -> Array:
    """``weight + sign * delta`` with peftmath's rounding policy, written by :func:`write_weight` (whose
    parameters ``weight``, ``copy``, ``safe``, ``layer``, ``kernel_on_copy`` and ``xp`` it shares).

    ``delta`` is ``ΔW`` in the stored layout, in a compute dtype (float32 or float64), or a zero-argument
    callable producing it (so that the in-place kernel can skip building it). ``round_delta_to``:
    ``None`` (the default policy) forms the sum in float32 (float64 for float64 inputs) and rounds it
    once to ``weight.dtype``; a dtype first rounds ``delta`` to it, as PEFT does (``W ± Δ.to(W.dtype)``,
    ``peft_compat=True``; no kernel then). ``inplace_kernel`` is the backend fast path
    ``kernel(M) -> bool`` on ``M``, the proven matrix view of the target, with no temporary of its size.
    """
    xp = xp or namespace(weight, where=module)

    def compute() -> Array:
        d = delta() if callable(delta) else delta
        if tuple(d.shape) != tuple(weight.shape):
            raise ShapeError(f"{module}: delta weight {tuple(d.shape)} does not match base weight {tuple(weight.shape)}")
        cd = compute_dtype(xp, weight.dtype, d.dtype)
        if round_delta_to is not None:
            d = as_compute(xp, xp.astype(d, round_delta_to), cd)
        return as_compute(xp, weight, cd) + d if sign > 0 else as_compute(xp, weight, cd) - d

    kernel = inplace_kernel if round_delta_to is None else None
    return write_weight(module, weight, compute, layer=layer, kernel=kernel, copy=copy, safe=safe,
                        kernel_on_copy=kernel_on_copy, xp=xp)


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
    #: True when merge returns a record that unmerge needs (DoRA's weight norm)
    merge_record: ClassVar[bool] = False

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

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (tasks on dask.distributed workers): the namespace is a module, found again from the arrays."""
        state = dict(self.__dict__)
        state.pop("xp", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.xp = namespace(*self.params.values(), where=self.name)

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
        """The unmerged adapted forward of this module; the conv keywords (``stride``, ``padding``,
        ``dilation``, ``groups``) are described once in :mod:`peftmath.layers` ("Conv keywords")."""
        raise NotImplementedError

    #: input channels of a conv fixed by the adapter's own tensors (None: only the base weight fixes them)
    input_channels: int | None = None

    def changes_bias(self) -> bool:
        """True when this module's merge changes the base bias (LoRA's ``lora_bias``, IA3's output scaling)."""
        return False

    def require_inplace(self, weight: Array, bias: Array | None = None) -> None:
        """Raise :class:`UnsupportedError` (writing nothing) unless ``copy=False`` can write every array
        this module's merge and unmerge change: the weight, and the bias when :meth:`changes_bias`. A
        caller merging many modules in place checks them all first (no half-merged model)."""
        require_writeable(self.name, weight)
        if bias is not None and self.changes_bias():
            require_writeable(self.name, bias, "bias")

    def input_layer(self, x: Array, weight: Array, layer_kwargs: dict[str, Any]) -> tuple[Layer, dict[str, Any]]:
        """The shared input check of every ``Module.forward``: ``weight`` against the module's layer, then
        ``x`` and the conv keywords in ``layer_kwargs`` (:meth:`~peftmath.layers.Layer.for_input`), the
        errors naming this module. Returns the layer with the groups of ``x`` and ``layer_kwargs``
        without ``groups`` (the functional forward receives the layer, which carries them)."""
        check_shape(self.name, "base weight", weight, self.layer.weight_shape)
        kw = dict(layer_kwargs)
        groups = kw.pop("groups", None)
        conv = {k: kw[k] for k in ("stride", "padding", "dilation") if k in kw}
        layer, _ = self.layer.for_input(x, self.name, groups=groups, channels=self.input_channels, **conv)
        if not self.layer.kind.is_conv:  # checked to be the no-op values above: not passed on
            for k in conv:
                kw.pop(k)
        return layer, kw

    # --- shared -------------------------------------------------------------------------------
    @property
    def description(self) -> Any:
        """The :class:`~peftmath.methods.Method` description of this module's method."""
        from . import describe_method  # the registry imports the method modules; not at import time

        return describe_method(self.peft_type)

    def needs_record(self) -> bool:
        """Whether this module's merge returns a record its unmerge needs (DoRA's weight norm)."""
        return self.merge_record

    def rotation_factors(self) -> int:
        """How many rotations merging applies to the weight in sequence: 0 for a method that does not
        rotate, 1 for one rotation (OFT); BOFT overrides it with its butterfly factor count ``m``. It is
        the ``q`` of the rotation bound in :mod:`peftmath.verify`."""
        return 1 if self.description.rotation else 0

    def output_scale_max(self) -> float:
        """The largest ``|s|`` of a scale merging applies after a rotation (BOFT's ``boft_s``); 1.0 where
        there is none. :mod:`peftmath.verify` multiplies its rotation bound by ``max(this, 1)``."""
        return 1.0

    def scaled(self, c: float) -> "ModuleAdapter":
        """This module applied with scale ``c`` (llama.cpp's ``--lora-scaled``, mergekit's weights; see
        :meth:`peftmath.Adapter.scaled` for what ``c`` means per method). The default refuses ``c ≠ 1``
        (:class:`UnsupportedError`); methods with a linear scale override it (:meth:`scale_scaling`,
        :meth:`scale_parameter`)."""
        if c == 1.0:
            return self
        raise UnsupportedError(f"{self.name}: a {self.peft_type} module has no linear scale; merge it with scale 1 "
                               f"(got scale {c:g})")

    def scale_scaling(self, c: float) -> "ModuleAdapter":
        """``scaled`` for a change linear in the scalar :attr:`scaling` (PEFT's ``scale_layer``: ``s → c·s``)."""
        if c == 1.0:
            return self
        out = object.__new__(type(self))  # a shallow copy (not copy.copy: a module class may define __new__)
        out.__dict__.update(self.__dict__)
        out.scaling = self.scaling * c
        return out

    def scale_parameter(self, suffix: str, value: Callable[[Array], Array]) -> "ModuleAdapter":
        """This module rebound with parameter ``suffix`` replaced by ``value(parameter)`` (a scaled factor)."""
        return type(self)(self.name, self.config, {**self.params, suffix: value(self.params[suffix])}, self.layer,
                          shared=self.shared)

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


class SignedModuleAdapter(ModuleAdapter):
    """A module whose merge is ``W + ΔW`` and unmerge ``W − ΔW``, both through one
    ``_apply(weight, sign, *, copy, safe, peft_compat)`` (``sign`` = +1 or −1; an unmerge is never
    ``safe``); the bias is unchanged. The subclass's ``_apply`` documents its rounding."""

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        """``W + ΔW`` (see ``_apply``)."""
        self.layer.check_weight(weight)
        return MergeResult(self._apply(weight, 1, copy=copy, safe=safe, peft_compat=peft_compat), bias)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        """``W − ΔW`` (see ``_apply``)."""
        self.layer.check_weight(weight)
        return MergeResult(self._apply(weight, -1, copy=copy, safe=False, peft_compat=peft_compat), bias)

    def _apply(self, weight: Array, sign: int, *, copy: bool, safe: bool, peft_compat: bool) -> Array:
        raise NotImplementedError
