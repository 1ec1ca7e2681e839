r"""LN tuning: train copies of chosen layers, typically the LayerNorms (Zhao et al., 2023, arXiv:2312.11420).

PEFT's LN tuning wraps each targeted module, of any kind, with a trainable deep copy of it; the adapter is
that copy's tensors. Its forward is the copy's forward, and merging swaps the copy in for the original::

    forward:  y = f(x; W̃, b̃)                      (f: the layer's own function, W̃, b̃: the copy's tensors)
    merge:    W ← W̃,  b ← b̃                       unmerge: W ← W₀, b ← b₀ (the originals, kept by merge)

Checkpoint keys: ``<module>.ln_tuning_layers.weight`` / ``.bias``, each of the base tensor's shape. A copy
has no memory of the tensors it replaced, so merge returns the originals as its record and unmerge, given
it, restores them bit for bit; without it the unmerge is refused. peftmath adapts the modules whose
tensors are a ``weight`` and optionally a ``bias`` (LayerNorm, Linear, transformers Conv1D, Embedding,
Conv1d/2d/3d); a module with other tensors (a whole block, BatchNorm's running statistics) fails to load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .._array import all_finite, as_compute, namespace
from ..config import TunerConfig
from ..errors import NonFiniteError, NotInvertibleError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import MergeResult, ModuleAdapter, require_kind, require_writeable, write_back, write_weight

Array = Any

__all__ = ["LNTuningConfig", "pack_record", "unpack_record", "LNTuningModule"]

PEFT_TYPE = "LN_TUNING"
_W, _B = "ln_tuning_layers.weight", "ln_tuning_layers.bias"
SUPPORTED_KINDS = (LayerKind.LAYER_NORM, LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED, LayerKind.EMBEDDING,
                   LayerKind.CONV1D, LayerKind.CONV2D, LayerKind.CONV3D)
#: TunerConfig fields that PEFT's LNTuningConfig does not have
_NOT_PEFT_FIELDS = ("layers_to_transform", "layers_pattern")


# --------------------------------------------------------------------------------------------------
# Config (specs/ln_tuning.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class LNTuningConfig(TunerConfig):
    """PEFT's ``LNTuningConfig`` (``peft_type: "LN_TUNING"``): ``target_modules``, ``exclude_modules``,
    ``modules_to_save``. It has no ``layers_to_transform`` / ``layers_pattern``: they must stay unset and are left
    out of the written config."""

    peft_type: ClassVar[str] = "LN_TUNING"
    absent_fields: ClassVar[tuple[str, ...]] = _NOT_PEFT_FIELDS

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)



# --------------------------------------------------------------------------------------------------
# The merge record (specs/ln_tuning.md, "4. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def pack_record(weight: Array, bias: Array | None) -> Array:
    """The originals a merge replaces, as one flat vector: ``weight`` then ``bias``, in their common (wider)
    dtype, so that :func:`unpack_record` gives them back bit for bit.

    >>> import numpy as np
    >>> pack_record(np.array([[1.0, 2.0]], np.float32), np.array([3.0], np.float32)).tolist()
    [1.0, 2.0, 3.0]
    """
    xp = namespace(weight, bias)
    if bias is None:
        return xp.asarray(xp.reshape(weight, (-1,)), copy=True)  # never a view of the weight merge overwrites
    dt = xp.result_type(weight.dtype, bias.dtype)
    return xp.concat([xp.reshape(as_compute(xp, weight, dt), (-1,)), xp.reshape(as_compute(xp, bias, dt), (-1,))])


def unpack_record(record: Array, weight: Array, bias: Array | None, *, where: str = "ln_tuning") -> tuple[Array, Array | None]:
    """The original weight and bias from ``record``, in the shapes and dtypes of ``weight`` / ``bias`` (the
    merged tensors); :class:`ShapeError` for a record of another module."""
    xp = namespace(record, weight)
    n_w = 1
    for s in weight.shape:
        n_w *= int(s)
    n_b = 0 if bias is None else int(bias.shape[0])
    if tuple(record.shape) != (n_w + n_b,):
        raise ShapeError(f"{where}: the LN tuning merge record has shape {tuple(record.shape)}, expected "
                         f"({n_w + n_b},) = the original weight {tuple(weight.shape)} and bias ({n_b},), flattened")
    w = as_compute(xp, xp.reshape(record[:n_w], tuple(weight.shape)), weight.dtype)
    return w, None if bias is None else as_compute(xp, record[n_w:], bias.dtype)


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint (forward, merge, unmerge: specs/ln_tuning.md, "3. Forward", "4. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
class LNTuningModule(ModuleAdapter):
    """LN tuning on one module: the trained copy's ``weight`` (the base weight's shape) and, when the module has
    one, ``bias``. Merging replaces the base tensors with them and returns the originals as the record."""

    peft_type = "LN_TUNING"
    supported_kinds = SUPPORTED_KINDS
    merge_record = True
    #: merging replaces the weight; there is no ΔW independent of the base
    additive: ClassVar[bool] = False

    @classmethod
    def infer_layer(cls, name: str, config: LNTuningConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """The layer of the base weight's shape (the copy has the same shape): a 1-D weight is a LayerNorm,
        2-D a Linear unless ``kind`` says otherwise, 3/4/5-D a Conv1d/2d/3d."""
        if _W not in params:
            raise ShapeError(f"{name}: LN tuning holds {_W}, found {sorted(params)}")
        shape = tuple(int(s) for s in (weight_shape if weight_shape is not None else params[_W].shape))
        if kind is None and len(shape) == 1:
            kind = LayerKind.LAYER_NORM
        return Layer.of(shape, kind)

    def validate(self) -> None:
        require_kind(self.layer, self.name, "LN tuning", SUPPORTED_KINDS,
                     peft="PEFT copies any module; peftmath adapts modules holding a weight and a bias")
        extra = sorted(set(self.params) - {_W, _B})
        if _W not in self.params or extra:
            raise ShapeError(f"{self.name}: LN tuning holds {_W} and optionally {_B}; found {sorted(self.params)} (a "
                             f"copy of a module with other tensors cannot be applied by peftmath)")
        self.W, self.b = self.params[_W], self.params.get(_B)
        self.layer.check_weight(self.W, "the copy's weight (ln_tuning_layers.weight)")
        if self.b is not None and tuple(self.b.shape) != (self.layer.out_features,):
            raise ShapeError(f"{self.name}: the copy's bias has shape {tuple(self.b.shape)}, expected "
                             f"({self.layer.out_features},)")

    def changes_bias(self) -> bool:
        return self.b is not None

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        raise UnsupportedError(f"{self.name}: LN tuning replaces the weight rather than adding to it; ΔW = W̃ − W "
                               f"needs the base weight (merge, or subtract it yourself)")

    def _check_bias(self, bias: Array | None) -> None:
        self.layer.check_bias(bias)
        if self.b is not None and bias is None:
            raise UnsupportedError(f"{self.name}: the adapter holds a trained bias ({_B}) but the base layer has none; "
                                   f"is this the adapter's base model?")

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        """``(W̃, b̃)`` in the base tensors' dtypes (``copy=False``: written into them), and the originals as the
        record. A base bias the adapter holds no copy of stays as it is."""
        self.layer.check_weight(weight)
        self._check_bias(bias)
        if not copy and self.b is not None:
            require_writeable(self.name, bias, "bias")
        record = pack_record(weight, bias if self.b is not None else None)  # a new array: it outlives the write
        return MergeResult(*self._put(weight, bias, self.W, self.b, copy=copy, safe=safe), record)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        """The originals from the merge's ``record`` (bit for bit); :class:`NotInvertibleError` without it."""
        self.layer.check_weight(weight)
        self._check_bias(bias)
        if record is None:
            raise NotInvertibleError(
                f"{self.name}: LN tuning's merge replaced the base tensors with the trained copy, which says nothing "
                f"about the originals; unmerging needs them: the record merge returns (MergeResult.record; "
                f"Adapter.merge keeps it when given records={{}}), or the base model itself")
        w0, b0 = unpack_record(record, weight, bias if self.b is not None else None, where=self.name)
        return MergeResult(*self._put(weight, bias, w0, b0, copy=copy, safe=False))

    def _put(self, weight: Array, bias: Array | None, new_w: Array, new_b: Array | None, *, copy: bool,
             safe: bool) -> tuple[Array, Array | None]:
        """``(new_w, new_b)`` in ``weight``'s / ``bias``'s dtypes, through :func:`write_weight` (``copy=False``:
        into the caller's arrays, both checked before either is written); ``new_b`` None keeps ``bias``.

        In place the tensors are copied straight into the caller's memory (``weight[...] = W̃``, whatever its
        strides: one pass, no temporary); ``copy=True`` returns one fresh array (never the adapter's own tensor
        nor a view of the record)."""
        xp = self.xp
        if new_b is not None:
            if not copy:
                require_writeable(self.name, bias, "bias")
            if safe and not all_finite(new_b, xp=xp):
                raise NonFiniteError(f"{self.name}: the merged bias ({_B}) contains NaN or infinity; nothing was "
                                     f"changed")

        def fresh(new: Array, like: Array) -> Array:
            return xp.asarray(new, copy=True) if new.dtype == like.dtype else xp.astype(new, like.dtype)

        def kernel(M: Array) -> bool:
            M[...] = as_compute(xp, new_w, M.dtype)
            return True

        w = write_weight(self.name, weight, lambda: fresh(new_w, weight), kernel=kernel, copy=copy, safe=safe,
                         kernel_on_copy=False, xp=xp)
        if new_b is None:
            return w, bias
        return w, (fresh(new_b, bias) if copy else write_back(self.name, bias, as_compute(xp, new_b, bias.dtype)))

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        """The copy's forward: the base layer's function with ``W̃`` (and ``b̃``) in the base tensors' dtypes; the
        conv keywords as every method's, and ``eps`` (required) for a LayerNorm."""
        layer, kw = self.input_layer(x, weight, layer_kwargs)
        self._check_bias(bias)
        xp = namespace(x, weight)
        w = as_compute(xp, self.W, weight.dtype)
        b = bias if self.b is None else as_compute(xp, self.b, bias.dtype)
        return layer.base_forward(x, w, b, xp, **kw)

    @classmethod
    def initialize(cls, name: str, config: LNTuningConfig, layer: Layer, *, weight: Array | None = None,
                   seed: Any = 0, xp: Any = None, device: Any = None, dtype: Any = None,
                   init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """A copy of the base weight, as PEFT's ``deepcopy`` (``{"ln_tuning_layers.weight": W}``; the adapter is
        the identity). The bias is not passed here, so no bias copy is made: the base bias stays unchanged."""
        if weight is None:
            raise UnsupportedError(f"{name}: LN tuning starts from a copy of the base weight; pass the base weight")
        require_kind(layer, name, "LN tuning", SUPPORTED_KINDS)
        xp = xp or namespace(weight)
        w = xp.asarray(weight, copy=True)
        return {_W: w if dtype is None or w.dtype == dtype else xp.astype(w, dtype)}, None


#: checkpoint suffixes of this method's per-module tensors (the copied module's own parameter names)
PARAMETER_SUFFIXES = (_W, _B)
Config = LNTuningConfig
Module = LNTuningModule
#: demo / documentation examples: row label -> config fields (LNTuningConfig has no field beyond the targets)
EXAMPLES = {
    "LN tuning": dict(),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=LNTuningConfig, module=LNTuningModule, spec="specs/ln_tuning.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=LNTuningModule.supported_kinds, additive=True,
    init_field=None, examples=EXAMPLES, needs_record_for=lambda config: True, orientation_in_tensors=False,
    identity_init=True,
)
