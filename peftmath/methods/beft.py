r"""BEFT: bias-efficient fine-tuning (Huang et al., 2025, arXiv:2509.15974).

BEFT trains one additive vector per targeted ``nn.Linear`` and nothing else: a learned bias shift on the
layer's output (the paper tunes the bias of the value projections; PEFT lets ``target_modules`` choose)::

    y = x Wᵀ + b + Δb            Δb = beft_bias: (1, out) in the checkpoint
    merge:   W unchanged,  b ← b + Δb          unmerge:  b ← b − Δb

The weight never changes (``ΔW = 0``); merging moves the vector into the base bias, so a layer without a
bias cannot hold it: its merge is refused, as PEFT refuses it (its forward still works). Unmerge is exact
up to the rounding of the merged bias. PEFT supports nn.Linear only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._array import all_finite, as_compute, compute_dtype, namespace
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_flags
from ..errors import ConfigError, NonFiniteError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import (
    MergeResult, ModuleAdapter, layer_of_weight_shape, require_kind, require_writeable, write_back, write_weight,
)

Array = Any

__all__ = ["BeftConfig", "init_bias", "forward", "merge_bias", "BeftModule"]

PEFT_TYPE = "BEFT"
_KEY = "beft_bias"
SUPPORTED_KINDS = (LayerKind.LINEAR,)
#: TunerConfig fields that PEFT's BeftConfig does not have
_NOT_PEFT_FIELDS = ("exclude_modules", "layers_to_transform", "layers_pattern")


# --------------------------------------------------------------------------------------------------
# Config (specs/beft.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class BeftConfig(TunerConfig):
    """PEFT's ``BeftConfig`` (``peft_type: "BEFT"``): ``target_modules``, ``modules_to_save``, ``init_weights``.
    PEFT's BeftConfig has no ``exclude_modules`` / ``layers_to_transform`` / ``layers_pattern``: they must stay
    unset and are left out of the written config."""

    peft_type: ClassVar[str] = "BEFT"
    absent_fields: ClassVar[tuple[str, ...]] = _NOT_PEFT_FIELDS

    init_weights: bool = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_flags(source, self, "init_weights")



def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "BEFT", SUPPORTED_KINDS, peft="it adapts nn.Linear only")


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/beft.md, "3. Initialisation")
# --------------------------------------------------------------------------------------------------
def init_bias(out_features: int, *, init_weights: bool = True, seed: Any = 0, xp: Any = None, device: Any = None,
              dtype: Any = None) -> Array:
    """``beft_bias`` ``(1, out)``: zeros (``init_weights=True``: the identity) or ``N(0, 1)`` draws (PEFT's
    ``torch.randn``; drawn on the host with ``numpy.random.default_rng(seed)``, same distribution).

    >>> init_bias(3).tolist()
    [[0.0, 0.0, 0.0]]
    """
    if xp is None:
        import array_api_compat.numpy as xp
    shape = (1, int(out_features))
    host = np.zeros(shape) if init_weights else host_rng(seed).standard_normal(shape)
    out = backend_for(xp).from_host(np.ascontiguousarray(host, dtype=np.float32), xp, device)
    target = dtype if dtype is not None else xp.float32
    return out if out.dtype == target else xp.astype(out, target)


# --------------------------------------------------------------------------------------------------
# Forward (specs/beft.md, "4. Forward")
# --------------------------------------------------------------------------------------------------
def forward(x: Array, weight: Array, beft_bias: Array, *, bias: Array | None = None, layer: Any = None,
            peft_compat: bool = False) -> Array:
    """``x Wᵀ + b + Δb`` for an nn.Linear ``weight (out, in)`` and ``beft_bias (1, out)``.

    The default forms the sum in float32 (float64 for float64 inputs) and rounds once to the output dtype
    (the result type of ``x`` and ``W``). ``peft_compat=True`` follows PEFT: the base output is rounded to
    its dtype first, then ``Δb`` is added and the sum rounded again (the same numbers in float32).

    >>> import numpy as np
    >>> W = np.eye(2, dtype=np.float32); b = np.ones(2, dtype=np.float32)
    >>> forward(np.array([[1.0, 2.0]], dtype=np.float32), W, np.array([[10.0, 20.0]], dtype=np.float32), bias=b)
    array([[12., 23.]], dtype=float32)
    """
    xp = namespace(x, weight, beft_bias, bias, where="beft.forward")
    lay, _ = Layer.for_weight(layer, weight).for_input(x, "beft.forward")
    _check_kind(lay, "beft.forward")
    lay.check_bias(bias)
    check_shape_of(lay, beft_bias, "beft.forward")
    out_dtype = xp.result_type(x.dtype, weight.dtype)
    cd = compute_dtype(xp, x.dtype, weight.dtype, beft_bias.dtype)
    d = xp.reshape(as_compute(xp, beft_bias, cd), (-1,))
    if peft_compat:  # PEFT: base_layer(x) in the storage dtype, then (result + Δb).to(result dtype)
        y = lay.base_forward(x, weight, bias, xp)
        return as_compute(xp, as_compute(xp, y, cd) + d, out_dtype)
    y = lay.base_forward(as_compute(xp, x, cd), as_compute(xp, weight, cd),
                         None if bias is None else as_compute(xp, bias, cd), xp)
    return as_compute(xp, y + d, out_dtype)


def check_shape_of(layer: Layer, beft_bias: Array, where: str) -> None:
    """``beft_bias`` must be ``(1, out)`` for ``layer`` (:class:`ShapeError` naming ``where`` otherwise)."""
    if tuple(beft_bias.shape) != (1, layer.out_features):
        raise ShapeError(f"{where}: beft_bias has shape {tuple(beft_bias.shape)}, expected (1, {layer.out_features}) "
                         f"for a Linear {layer.weight_shape}; does the adapter belong to this base model?")


# --------------------------------------------------------------------------------------------------
# Merge and unmerge (specs/beft.md, "5. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def merge_bias(bias: Array | None, beft_bias: Array, *, sign: int = 1, copy: bool = True, safe: bool = False,
               where: str = "beft") -> Array:
    """``b + sign·Δb`` (``sign`` +1 merges, −1 unmerges), formed in float32 (float64 for float64) and rounded
    once to ``b``'s dtype (PEFT's in-place ``add_`` rounds the same way). ``copy=False`` writes into ``bias``
    (refused, writing nothing, when it is not writeable). A layer without a bias cannot hold ``Δb``:
    :class:`UnsupportedError` (PEFT refuses the merge too). ``safe`` refuses a non-finite result.

    >>> import numpy as np
    >>> b = np.array([1.0, 2.0], dtype=np.float32)
    >>> merge_bias(b, np.array([[0.5, -1.0]], dtype=np.float32), copy=False) is b, b
    (True, array([1.5, 1. ], dtype=float32))
    """
    if bias is None:
        raise UnsupportedError(
            f"{where}: the base layer has no bias, so BEFT's bias shift (beft_bias) cannot be merged into it (PEFT "
            f"refuses this merge too); keep the adapter unmerged (its forward works), or give the base layer a "
            f"zero bias first")
    if tuple(beft_bias.shape) != (1, int(bias.shape[0])) or bias.ndim != 1:
        raise ShapeError(f"{where}: beft_bias {tuple(beft_bias.shape)} does not fit the base bias {tuple(bias.shape)}")
    if not copy:
        require_writeable(where, bias, "bias")
    xp = namespace(bias, beft_bias, where=where)
    # compute_dtype's answer for the usual case (one float32 / float64 dtype) without its dtype-name lookup, which
    # costs more than this whole merge of a 4096-element bias (measured: 12 µs -> 6 µs per merge)
    same = bias.dtype == beft_bias.dtype and bias.dtype in (xp.float32, xp.float64)
    cd = bias.dtype if same else compute_dtype(xp, bias.dtype, beft_bias.dtype)
    d = as_compute(xp, beft_bias[0, ...], cd)

    def compute() -> Array:
        b = as_compute(xp, bias, cd)
        return b + d if sign > 0 else b - d

    def kernel(b: Array) -> bool:  # a bias in the compute dtype: the sum in place, rounded once (no temporary)
        if b.dtype != cd:
            return False
        if sign > 0:
            b += d
        else:
            b -= d
        return True

    if safe:  # checked before anything is written (write_weight's own message speaks of the weight)
        new = as_compute(xp, compute(), bias.dtype)
        if not all_finite(new, xp=xp):
            raise NonFiniteError(f"{where}: the merged bias would contain NaN or infinity; nothing was changed")
        return new if copy else write_back(where, bias, new)
    return write_weight(where, bias, compute, kernel=kernel, copy=copy, kernel_on_copy=False, xp=xp)


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
class BeftModule(ModuleAdapter):
    """BEFT on one nn.Linear: ``beft_bias (1, out)`` added to the output; merging changes the bias only."""

    peft_type = "BEFT"
    supported_kinds = SUPPORTED_KINDS

    @classmethod
    def infer_layer(cls, name: str, config: BeftConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """The Linear of the base weight's shape (``beft_bias`` gives only ``out``)."""
        return layer_of_weight_shape(name, _KEY, params, weight_shape, kind, False,
                                     "BEFT stores one bias vector per module")

    def validate(self) -> None:
        _check_kind(self.layer, self.name)
        extra = sorted(set(self.params) - {_KEY})
        if _KEY not in self.params or extra:
            raise ShapeError(f"{self.name}: BEFT has exactly one tensor, beft_bias; found {sorted(self.params)}")
        self.b = self.params[_KEY]
        check_shape_of(self.layer, self.b, self.name)

    def changes_bias(self) -> bool:
        return True

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        """``ΔW = 0`` (zeros of the stored weight's shape, in the parameters' dtype): BEFT changes the bias only."""
        return self.xp.zeros(self.layer.weight_shape, dtype=self.b.dtype)

    def scaled(self, c: float) -> ModuleAdapter:
        """Scale ``c``: ``Δb → c·Δb`` (PEFT has no BEFT scale; the change is linear in ``Δb``)."""
        return self if c == 1.0 else self.scale_parameter(_KEY, lambda b: c * b)

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        """``(W, b + Δb)``: the weight is returned as given (the same array, never written)."""
        self.layer.check_weight(weight)
        self.layer.check_bias(bias)
        return MergeResult(weight, merge_bias(bias, self.b, copy=copy, safe=safe, where=self.name))

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        """``(W, b − Δb)``, exact up to the rounding of the merged bias."""
        self.layer.check_weight(weight)
        self.layer.check_bias(bias)
        return MergeResult(weight, merge_bias(bias, self.b, sign=-1, copy=copy, where=self.name))

    def forward(self, x: Array, weight: Array, bias: Array | None = None, *, peft_compat: bool = False,
                **layer_kwargs: Any) -> Array:
        layer, _ = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.b, bias=bias, layer=layer, peft_compat=peft_compat)

    @classmethod
    def initialize(cls, name: str, config: BeftConfig, layer: Layer, *, weight: Array | None = None,
                   seed: Any = 0, xp: Any = None, device: Any = None, dtype: Any = None,
                   init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """``{"beft_bias": ...}`` (:func:`init_bias`; ``init`` overrides ``config.init_weights``); the base
        weight is not changed."""
        _check_kind(layer, name)
        if xp is None and weight is not None:
            xp = namespace(weight)
        flag = config.init_weights if init is None else init
        if not isinstance(flag, bool):
            raise ConfigError(f"{name}: init_weights must be true or false, got {flag!r}")
        return {_KEY: init_bias(layer.out_features, init_weights=flag, seed=seed, xp=xp, device=device,
                                dtype=dtype)}, None


#: checkpoint suffixes of this method's per-module tensors (a ParameterDict entry: no ".weight")
PARAMETER_SUFFIXES = (_KEY,)
Config = BeftConfig
Module = BeftModule
#: demo / documentation examples: row label -> config fields (non-trivial: a random bias shift)
EXAMPLES = {
    "BEFT": dict(init_weights=False),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=BeftConfig, module=BeftModule, spec="specs/beft.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=BeftModule.supported_kinds, additive=True,
    init_field="init_weights", examples=EXAMPLES, bias_only=True,
)
