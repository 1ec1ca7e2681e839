r"""OSF: orthogonal subspace fine-tuning (Nayak et al., 2025).

OSF splits a Linear's weight by its singular value decomposition into a frozen top part (the ``k`` largest
singular directions, ``k = effective_rank``) and a trainable rest, and trains the rest's factors::

    W = U_hi S_hi V_hiᵀ + U_lo⁰ S_lo⁰ V_lo⁰        (the SVD of the base weight W, split after k)
    W' = U_hi S_hi V_hiᵀ + U_lo S_lo V_lo            (U_lo (out, r), S_lo (r,), V_lo (r, in) trained)
    ΔW = U_lo S_lo V_lo − U_lo⁰ S_lo⁰ V_lo⁰          r = min(out, in) − k

Only ``U_lo``, ``S_lo``, ``V_lo`` are saved; the initial low part is recomputed from the base weight's SVD
(as PEFT does when it loads the adapter), so ``ΔW`` depends on ``W``. Merging replaces ``W``'s low part,
which is lost: merge returns it as its record (``U_lo⁰, S_lo⁰, V_lo⁰``, ``r·(out + in + 1)`` numbers) and
unmerge needs it (PEFT cannot unmerge OSF at all). PEFT supports nn.Linear.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._array import as_compute, compute_dtype, namespace
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_flags, check_pattern
from ..errors import ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import MergeResult, ModuleAdapter, add_fresh_delta, require_kind
from ._svd import low_from_record, low_split, pack_triplets, smallest_triplets, triplet_product, unpack_triplets

Array = Any

__all__ = ["OSFConfig", "resolve_rank", "effective_rank_for", "low_part", "pack_record", "unpack_record",
           "delta_weight", "forward", "OSFModule"]

PEFT_TYPE = "OSF"
_U, _S, _V = "osf_svd_params.U_low", "osf_svd_params.S_low", "osf_svd_params.V_low"
SUPPORTED_KINDS = (LayerKind.LINEAR,)
#: TunerConfig fields that PEFT's OSFConfig does not have
_NOT_PEFT_FIELDS = ("exclude_modules", "layers_to_transform", "layers_pattern")


# --------------------------------------------------------------------------------------------------
# Config (specs/osf.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class OSFConfig(TunerConfig):
    """PEFT's ``OSFConfig`` (``peft_type: "OSF"``), PEFT's names and defaults. ``target_svd_config`` is
    accepted and ignored, as by PEFT. PEFT's OSFConfig has no ``exclude_modules`` / ``layers_to_transform`` /
    ``layers_pattern``: they must stay unset and are left out of the written config."""

    peft_type: ClassVar[str] = "OSF"
    absent_fields: ClassVar[tuple[str, ...]] = _NOT_PEFT_FIELDS

    effective_rank: int | float | None = None
    rank_pattern: dict[str, int | float] | None = None
    init_weights: bool = True
    target_svd_config: dict[str, int] | None = None

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        for name, value in [("effective_rank", self.effective_rank),
                            *((f"rank_pattern[{k!r}]", v) for k, v in (self.rank_pattern or {}).items())]:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ConfigError(f"{source}: field {name} must be a non-negative integer or a fraction in (0, 1], "
                                  f"got {value!r}")
        if self.rank_pattern is not None:
            check_pattern(source, "rank_pattern", self.rank_pattern)
        check_flags(source, self, "init_weights")



def resolve_rank(value: int | float | None, min_dim: int) -> int:
    """PEFT's rule: None -> ``min_dim // 2``; a float in (0, 1] -> ``int(min_dim · value)``; else ``int(value)``;
    clipped to ``[0, min_dim]``.

    >>> resolve_rank(None, 10), resolve_rank(0.25, 10), resolve_rank(30, 10)
    (5, 2, 10)
    """
    if value is None:
        return max(min_dim // 2, 0)
    r = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(min_dim, r), 0)


def effective_rank_for(config: OSFConfig, module_name: str, min_dim: int) -> int:
    """The frozen rank ``k`` of a new adapter: the first ``rank_pattern`` key with ``re.search(key, name)``,
    else ``effective_rank`` (:func:`resolve_rank` either way). A loaded adapter's ``k`` is
    ``min_dim − len(S_low)``.

    >>> effective_rank_for(OSFConfig(rank_pattern={"lin1": 1}), "model.lin1", 10)
    1
    """
    for key, value in (config.rank_pattern or {}).items():
        if re.search(key, module_name):
            return resolve_rank(value, min_dim)
    return resolve_rank(config.effective_rank, min_dim)


def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "OSF", SUPPORTED_KINDS, peft="it adapts nn.Linear only")


# --------------------------------------------------------------------------------------------------
# Delta weight (specs/osf.md, "3. Delta weight")
# --------------------------------------------------------------------------------------------------
def low_part(weight: Array, r: int, *, dtype: Any = None, where: str = "osf") -> tuple[Array, Array, Array]:
    """``(U_lo⁰ (out, r), S_lo⁰ (r,), V_lo⁰ (r, in))``: the ``r`` smallest singular triplets of ``weight`` (its
    ``xp.linalg.svd``, in ``dtype``: float32, float64 for float64 weights, as PEFT's float32 SVD)."""
    return smallest_triplets(weight, r, dtype=dtype, method="OSF", where=where)


def _product(xp: Any, U: Array, S: Array, V: Array, cd: Any) -> Array:
    return triplet_product(xp, U, S, V, cd)


def delta_weight(weight: Array, U_low: Array, S_low: Array, V_low: Array, *, record: Any = None,
                 dtype: Any = None, where: str = "osf") -> Array:
    """``ΔW = U_lo S_lo V_lo − U_lo⁰ S_lo⁰ V_lo⁰`` ``(out, in)``, the initial low part from ``record`` or from
    ``weight``'s split (:func:`peftmath.methods._svd.low_split`: the projection on its smallest singular
    directions, not the triplets themselves).

    >>> import numpy as np
    >>> W = np.diag([3.0, 2.0, 1.0])
    >>> dw = delta_weight(W, np.array([[0.0], [0.0], [1.0]]), np.array([5.0]), np.array([[0.0, 0.0, 1.0]]))
    >>> np.round(W + dw, 12).tolist()   # the smallest direction's 1 replaced by 5
    [[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 5.0]]
    """
    xp = namespace(weight, U_low, where=where)
    cd = dtype if dtype is not None else compute_dtype(xp, weight.dtype, U_low.dtype)
    r = int(S_low.shape[0])
    out, inn = int(U_low.shape[0]), int(V_low.shape[-1])
    if record is None:
        L0 = low_split(weight, r, dtype=cd, method="OSF", where=where)[0]
    else:
        L0 = low_from_record(record, out, inn, r, cd, method="OSF", where=where)
    return _product(xp, U_low, S_low, V_low, cd) - L0


def pack_record(xp: Any, U0: Array, S0: Array, V0: Array) -> Array:
    """The merge record: ``U_lo⁰``, ``S_lo⁰``, ``V_lo⁰`` flattened into one vector of ``r·(out + in + 1)``."""
    return pack_triplets(xp, U0, S0, V0)


def unpack_record(record: Array, out: int, inn: int, r: int, *, where: str = "osf") -> tuple[Array, Array, Array]:
    """Inverse of :func:`pack_record`; :class:`ShapeError` for a record of another module. (A merge record
    may also be the low part itself, ``(out, in)``, where that is smaller: see :meth:`OSFModule.merge`.)"""
    return unpack_triplets(record, out, inn, r, method="OSF", where=where)


# --------------------------------------------------------------------------------------------------
# Forward (specs/osf.md, "4. Forward")
# --------------------------------------------------------------------------------------------------
def forward(x: Array, weight: Array, U_low: Array, S_low: Array, V_low: Array, *, bias: Array | None = None,
            layer: Any = None) -> Array:
    """``x Wᵀ + b + x ΔWᵀ``, in float32 (float64 for float64 inputs), rounded once to the output dtype."""
    xp = namespace(x, weight, U_low, bias, where="osf.forward")
    lay, _ = Layer.for_weight(layer, weight).for_input(x, "osf.forward")
    _check_kind(lay, "osf.forward")
    lay.check_bias(bias)
    out_dtype = xp.result_type(x.dtype, weight.dtype)
    cd = compute_dtype(xp, x.dtype, weight.dtype, U_low.dtype)
    dw = delta_weight(weight, U_low, S_low, V_low, dtype=cd, where="osf.forward")
    xc = as_compute(xp, x, cd)
    y = lay.base_forward(xc, as_compute(xp, weight, cd), None if bias is None else as_compute(xp, bias, cd), xp)
    return as_compute(xp, y + xp.matmul(xc, xp.matrix_transpose(dw)), out_dtype)


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint (merge / unmerge: specs/osf.md, "5. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
class OSFModule(ModuleAdapter):
    """OSF on one nn.Linear: ``U_low (out, r)``, ``S_low (r,)``, ``V_low (r, in)``. Additive with a ``ΔW`` that
    depends on ``W``; merge returns the replaced low part as its record, unmerge needs it."""

    peft_type = "OSF"
    supported_kinds = SUPPORTED_KINDS
    merge_record = True
    #: no standalone ΔW: it needs the base weight (merge / forward take it)
    additive: ClassVar[bool] = False

    @classmethod
    def infer_layer(cls, name: str, config: OSFConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """A Linear ``(out, in)`` from ``U_low (out, r)`` and ``V_low (r, in)``."""
        if _U not in params or _V not in params:
            raise ShapeError(f"{name}: OSF needs {_U}, {_S} and {_V}, found {sorted(params)}")
        shape = (int(params[_U].shape[0]), int(params[_V].shape[-1]))
        return Layer.of(tuple(int(s) for s in weight_shape) if weight_shape is not None else shape,
                        kind or LayerKind.LINEAR)

    def validate(self) -> None:
        _check_kind(self.layer, self.name)
        missing = sorted({_U, _S, _V} - set(self.params))
        extra = sorted(set(self.params) - {_U, _S, _V})
        if missing or extra:
            raise ShapeError(f"{self.name}: OSF has exactly {_U}, {_S}, {_V}; missing {missing}, unexpected {extra}")
        self.U, self.S, self.V = self.params[_U], self.params[_S], self.params[_V]
        out, inn = self.layer.out_features, self.layer.in_features
        r = int(self.S.shape[0]) if self.S.ndim == 1 else -1
        if not 0 <= r <= min(out, inn) or tuple(self.U.shape) != (out, r) or tuple(self.V.shape) != (r, inn):
            raise ShapeError(f"{self.name}: OSF factors U_low {tuple(self.U.shape)}, S_low {tuple(self.S.shape)}, "
                             f"V_low {tuple(self.V.shape)} do not fit a {out}x{inn} layer ((out, r), (r,), (r, in) "
                             f"with r <= {min(out, inn)})")

    def describe(self) -> dict[str, Any]:
        r = int(self.S.shape[0])
        return {"trainable_rank": r, "effective_rank": min(self.layer.out_features, self.layer.in_features) - r}

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        raise UnsupportedError(f"{self.name}: OSF's ΔW depends on the base weight (it replaces W's smallest "
                               f"singular directions); use merge or forward with the base weight")

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        """``W' = W + ΔW`` (= the top part of ``W`` plus the trained low part), formed in float32 (float64) and
        rounded once. The record is ``W``'s replaced low part ``L⁰ = U_lo⁰ S_lo⁰ V_lo⁰`` in the smaller of two
        forms: the triplets packed (:func:`pack_record`, ``r·(out + in + 1)`` numbers) or ``L⁰`` itself
        ``(out, in)`` (:func:`peftmath.methods._svd.low_split`)."""
        self.layer.check_weight(weight)
        cd = compute_dtype(self.xp, weight.dtype, self.U.dtype)
        low, record = low_split(weight, int(self.S.shape[0]), dtype=cd, method="OSF", where=self.name)
        new = self._apply(weight, low, 1, copy=copy, safe=safe)
        return MergeResult(new, bias, record)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        """``W = W' − U_lo S_lo V_lo + U_lo⁰ S_lo⁰ V_lo⁰`` with the merge's ``record``; without it
        :class:`NotInvertibleError` (the low part of the original ``W`` was overwritten)."""
        self.layer.check_weight(weight)
        if record is None:
            raise NotInvertibleError(
                f"{self.name}: unmerging OSF needs the low part of the original weight that merge replaced "
                f"(merge returns it as MergeResult.record; Adapter.merge keeps it when given records={{}}); it "
                f"cannot be recovered from the merged weight (PEFT cannot unmerge OSF either)")
        cd = compute_dtype(self.xp, weight.dtype, self.U.dtype)
        low = low_from_record(record, self.layer.out_features, self.layer.in_features, int(self.S.shape[0]), cd,
                              method="OSF", where=self.name)
        return MergeResult(self._apply(weight, low, -1, copy=copy, safe=False), bias)

    def _apply(self, weight: Array, low: Array, sign: int, *, copy: bool, safe: bool) -> Array:
        """``W ± (U_lo S_lo V_lo − L⁰)`` with the low part ``L⁰ (out, in)`` given."""
        xp = self.xp
        cd = compute_dtype(xp, weight.dtype, self.U.dtype)

        def fresh() -> Array:
            trained = _product(xp, self.U, self.S, self.V, cd)
            return trained - low if sign > 0 else low - trained

        return add_fresh_delta(self.name, weight, fresh, cd, copy=copy, safe=safe, xp=xp)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, _ = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.U, self.S, self.V, bias=bias, layer=layer)

    @classmethod
    def initialize(cls, name: str, config: OSFConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """The low factors of ``weight``'s SVD (``init_weights=True``: ``ΔW = 0``) or ``N(0, 1)`` draws of their
        shapes (``False``); ``weight`` is required. The base weight is not changed."""
        _check_kind(layer, name)
        if weight is None:
            raise UnsupportedError(f"{name}: OSF starts from the base weight's SVD; pass the base weight")
        xp = namespace(weight)
        out, inn = layer.out_features, layer.in_features
        r = min(out, inn) - effective_rank_for(config, name, min(out, inn))
        if (config.init_weights if init is None else init):
            U, S, V = low_part(weight, r, where=name)
        else:
            rng = host_rng(seed)
            U, S, V = (backend_for(xp).from_host(np.ascontiguousarray(rng.standard_normal(s), dtype=np.float32), xp,
                                                 device) for s in ((out, r), (r,), (r, inn)))
        target = dtype if dtype is not None else weight.dtype
        return {k: v if v.dtype == target else xp.astype(v, target) for k, v in ((_U, U), (_S, S), (_V, V))}, None


#: checkpoint suffixes of this method's per-module tensors (a ParameterDict inside a ModuleDict)
PARAMETER_SUFFIXES = (_U, _S, _V)
Config = OSFConfig
Module = OSFModule
#: demo / documentation examples: row label -> config fields (non-trivial: random factors)
EXAMPLES = {
    "OSF": dict(effective_rank=2, init_weights=False),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=OSFConfig, module=OSFModule, spec="specs/osf.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=OSFModule.supported_kinds, additive=True,
    init_field="init_weights", examples=EXAMPLES, needs_record_for=lambda config: True,
)
