r"""Super-tuning: a sparse support of the base weight's own entries, chosen by magnitude, plus an optional
low-rank term ("Supra").

Super-tuning trains ``k = int(out·in·(1 − sparsity))`` individual entries of a Linear's weight, the ``k``
largest (``select_top``) or smallest magnitudes ``|W_ij|`` of the base weight, and in "Supra" mode (``r`` set)
a LoRA pair beside them::

    ΔW = Σ_j v_j e_{p_j}  +  (α / r)·B A          p_j = supertuning_indices[j] (flat, row-major), v = values

``A (r, in)``, ``B (out, r)``, ``α = lora_alpha`` (``2r`` when unset). Additive, so unmerge is exact up to the
rounding of the sums. The positions are saved with the adapter (int32) unless ``save_precomputed_indices`` is
false: then they are recomputed from the base weight's magnitudes (as PEFT does when it loads), so merge
returns them as its record and unmerge needs it (the merged weight's magnitudes choose other positions).
PEFT supports nn.Linear only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from .._array import as_compute, compute_dtype, namespace, reshape_view
from ..backends import backend_for, host_rng, kaiming_uniform_bound
from ..config import TunerConfig, check_flags, check_number
from ..errors import CheckpointError, ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import MergeResult, ModuleAdapter, check_shape, require_kind, write_weight

Array = Any

__all__ = ["SupertuningConfig", "num_trainable", "lora_scaling", "select_positions", "Support", "delta_weight",
           "forward", "init_weights", "SupertuningModule"]

PEFT_TYPE = "SUPERTUNING"
_V, _IDX, _A, _B = "supertuning_values", "supertuning_indices", "supertuning_lora_A.weight", "supertuning_lora_B.weight"
SUPPORTED_KINDS = (LayerKind.LINEAR,)
#: TunerConfig fields that PEFT's SupertuningConfig does not have
_NOT_PEFT_FIELDS = ("exclude_modules", "layers_to_transform", "layers_pattern")


# --------------------------------------------------------------------------------------------------
# Config (specs/supertuning.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class SupertuningConfig(TunerConfig):
    """PEFT's ``SupertuningConfig`` (``peft_type: "SUPERTUNING"``), PEFT's names and defaults.

    PEFT's config has no ``exclude_modules`` / ``layers_to_transform`` / ``layers_pattern``: they must stay unset
    and are left out of the written config. ``lora_alpha`` unset with ``r`` set means ``2r`` (PEFT writes it so).
    """

    peft_type: ClassVar[str] = "SUPERTUNING"
    absent_fields: ClassVar[tuple[str, ...]] = _NOT_PEFT_FIELDS

    sparsity: float = 0.99
    select_top: bool = True
    r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    init_weights: bool = True
    save_precomputed_indices: bool = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_number(source, "sparsity", self.sparsity)
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"{source}: field 'sparsity' must be in [0, 1), got {self.sparsity!r} (PEFT refuses it "
                              f"too)")
        if self.r is not None and (not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0):
            raise ConfigError(f"{source}: field 'r' must be a positive integer or null, got {self.r!r}")
        if self.r is None and self.lora_alpha is not None:
            raise ConfigError(f"{source}: lora_alpha={self.lora_alpha!r} is set but r is null; the Supra (LoRA) term "
                              f"needs an explicit r (PEFT refuses it too)")
        if self.lora_alpha is not None:
            check_number(source, "lora_alpha", self.lora_alpha)
        check_number(source, "lora_dropout", self.lora_dropout)
        check_flags(source, self, "select_top", "init_weights", "save_precomputed_indices")



def num_trainable(numel: int, sparsity: float, where: str = "supertuning") -> int:
    """``k = int(numel·(1 − sparsity))`` (PEFT's rule); :class:`ConfigError` when it is 0.

    >>> num_trainable(200, 0.5), num_trainable(1000, 0.99)
    (100, 10)
    """
    k = int(numel * (1 - sparsity))
    if k < 1:
        raise ConfigError(f"{where}: sparsity={sparsity} leaves no trainable entry of a weight with {numel} entries; "
                          f"lower the sparsity (PEFT refuses it too)")
    return k


def lora_scaling(config: SupertuningConfig, r: int) -> float:
    """The Supra term's scale ``α / r`` (``α = lora_alpha``, ``2r`` when unset).

    >>> lora_scaling(SupertuningConfig(r=2, lora_alpha=3), 2), lora_scaling(SupertuningConfig(r=4), 4)
    (1.5, 2.0)
    """
    alpha = config.lora_alpha if config.lora_alpha is not None else 2 * r
    return float(alpha) / int(r)


# --------------------------------------------------------------------------------------------------
# The support (specs/supertuning.md, "2. Shapes and the support")
# --------------------------------------------------------------------------------------------------
def select_positions(weight: Array, k: int, *, select_top: bool = True) -> Array:
    """The flat positions of the ``k`` largest (``select_top``) or smallest ``|W_ij|``, in that order (largest
    first, or smallest first), ties in index order: a stable ``xp.argsort`` of ``|W|`` in ``W``'s dtype (PEFT's
    ``torch.topk``; its order among equal magnitudes is unspecified).

    >>> import numpy as np
    >>> select_positions(np.array([[0.5, -3.0], [2.0, 0.1]]), 2).tolist()
    [1, 2]
    """
    xp = namespace(weight)
    flat = xp.abs(xp.reshape(weight, (-1,)))
    return xp.argsort(flat, descending=bool(select_top), stable=True)[:k]


class Support:
    """The checked positions of one module on the host: ``flat`` (the ``k`` positions, in the values' order)
    and, built on first use, ``order`` / ``sorted_flat`` / ``rows`` / ``cols`` (row-major order, the values
    permuted by ``order``) and ``grid`` (for each entry of the weight, the index of its value, or ``k``; only the
    out-of-place paths and the forward read it)."""

    def __init__(self, indices: Array, out_features: int, in_features: int, k: int, where: str):
        host = np.asarray(backend_for(namespace(indices)).to_host(indices))
        if host.shape != (k,):
            raise ShapeError(f"{where}: {_IDX} must have shape ({k},) (one flat position per value), got "
                             f"{tuple(host.shape)}")
        if host.dtype.kind == "f" and (not np.all(np.isfinite(host)) or np.any(host != np.round(host))):
            raise CheckpointError(f"{where}: {_IDX} holds non-integer values; they must be flat positions")
        if host.dtype.kind not in "fiu":
            raise CheckpointError(f"{where}: {_IDX} must be integers, got dtype {host.dtype}")
        flat = host.astype(np.int64)
        numel = out_features * in_features
        bad = (flat < 0) | (flat >= numel)
        if np.any(bad):
            j = int(np.argmax(bad))
            raise CheckpointError(f"{where}: {_IDX}[{j}] = {flat[j]} is outside the {out_features}x{in_features} "
                                  f"weight (flat positions 0..{numel - 1})")
        order = np.argsort(flat, kind="stable")
        sorted_flat = flat[order]
        if np.any(sorted_flat[1:] == sorted_flat[:-1]):
            raise CheckpointError(f"{where}: {_IDX} repeats a position; PEFT's top-k support never does (a "
                                  f"hand-made checkpoint?). Sum the values of each position and save each once")
        self.flat, self.shape, self.k = flat, (out_features, in_features), k
        #: the values' permutation into row-major order (None: already in it), and the positions in that order
        #: (a sorted gather / scatter runs faster than one in PEFT's magnitude order)
        self.order = None if np.array_equal(order, np.arange(k)) else order
        self.sorted_flat = sorted_flat

    @functools.cached_property
    def rows(self) -> np.ndarray:
        return self.sorted_flat // self.shape[1]

    @functools.cached_property
    def cols(self) -> np.ndarray:
        return self.sorted_flat % self.shape[1]

    @functools.cached_property
    def grid(self) -> np.ndarray:
        """``(out·in,)`` int64: the index of each entry's value, ``k`` where there is none (8 bytes per weight
        entry: built when an out-of-place path first needs it, not at load)."""
        grid = np.full(self.shape[0] * self.shape[1], self.k, dtype=np.int64)
        grid[self.flat] = np.arange(self.k)
        return grid


def _sparse_dense(xp: Any, values: Array, support: Support) -> Array:
    """A new dense ``(out, in)`` array holding ``values[j]`` at position ``flat[j]`` and zeros elsewhere: one
    gather through the host grid (the array API has no scatter)."""
    dev = array_api_compat.device(values)
    padded = xp.concat([values, xp.zeros((1,), dtype=values.dtype, device=dev)])
    return xp.reshape(xp.take(padded, xp.asarray(support.grid, device=dev), axis=0), support.shape)


# --------------------------------------------------------------------------------------------------
# Delta weight (specs/supertuning.md, "3. Delta weight")
# --------------------------------------------------------------------------------------------------
def delta_weight(values: Array, support: Support, *, A: Array | None = None, B: Array | None = None,
                 scaling: float = 1.0, dtype: Any = None) -> Array:
    """Dense ``ΔW`` ``(out, in)``: the values at their positions plus ``scaling·B A`` (Supra), in ``dtype``.

    >>> import numpy as np
    >>> s = Support(np.array([2, 0]), 2, 2, 2, "doc")
    >>> delta_weight(np.array([5.0, 7.0]), s).tolist()
    [[7.0, 0.0], [5.0, 0.0]]
    """
    xp = namespace(values, A, B)
    cd = dtype if dtype is not None else compute_dtype(xp, values.dtype)
    d = _sparse_dense(xp, as_compute(xp, values, cd), support)
    if A is not None:
        d = d + xp.matmul(as_compute(xp, B, cd), as_compute(xp, A, cd)) * scaling
    return d


# --------------------------------------------------------------------------------------------------
# Forward (specs/supertuning.md, "4. Forward")
# --------------------------------------------------------------------------------------------------
def forward(x: Array, weight: Array, values: Array, support: Support, *, A: Array | None = None,
            B: Array | None = None, scaling: float = 1.0, bias: Array | None = None, layer: Any = None) -> Array:
    """``x (W + S)ᵀ + b + scaling·(x Aᵀ) Bᵀ`` (``S`` the sparse part), in float32 (float64 for float64 inputs),
    rounded once to the output dtype.

    >>> import numpy as np
    >>> forward(np.ones((1, 2)), np.zeros((2, 2)), np.array([3.0]), Support(np.array([1]), 2, 2, 1, "doc")).tolist()
    [[3.0, 0.0]]
    """
    xp = namespace(x, weight, values, bias, where="supertuning.forward")
    lay, _ = Layer.for_weight(layer, weight).for_input(x, "supertuning.forward")
    _check_kind(lay, "supertuning.forward")
    lay.check_bias(bias)
    out_dtype = xp.result_type(x.dtype, weight.dtype)
    cd = compute_dtype(xp, x.dtype, weight.dtype, values.dtype)
    Wc = _sparse_dense(xp, as_compute(xp, values, cd), support)
    Wc += as_compute(xp, weight, cd)
    xc = as_compute(xp, x, cd)
    y = lay.base_forward(xc, Wc, None if bias is None else as_compute(xp, bias, cd), xp)
    if A is not None:
        low = xp.matmul(xp.matmul(xc, xp.matrix_transpose(as_compute(xp, A, cd))), xp.matrix_transpose(
            as_compute(xp, B, cd)))
        y = y + low * scaling
    return as_compute(xp, y, out_dtype)


def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "Super-tuning", SUPPORTED_KINDS, peft="it raises TypeError for others")


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/supertuning.md, "5. Initialisation")
# --------------------------------------------------------------------------------------------------
def init_weights(layer: Layer, weight: Array, config: SupertuningConfig, *, init_weights: bool = True,
                 seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                 dtype: Any = None, where: str = "supertuning") -> dict[str, Array]:
    """The positions of ``weight``'s ``k`` largest (smallest) magnitudes (int32), values zero
    (``init_weights``) or ``N(0, 1)``; with ``r``: ``A ~ U(±1/√in)``, ``B`` zero or ``U(±1/√r)`` (PyTorch's
    ``kaiming_uniform_(a=√5)``). Drawn on the host from ``seed``; positions saved only when
    ``save_precomputed_indices``."""
    _check_kind(layer, where)
    xp = xp or namespace(weight)
    rng = host_rng(seed)
    k = num_trainable(layer.out_features * layer.in_features, config.sparsity, where)
    back = backend_for(xp)
    target = dtype if dtype is not None else xp.float32

    def put(host: np.ndarray) -> Array:
        out = back.from_host(np.ascontiguousarray(host, dtype=np.float32), xp, device)
        return out if out.dtype == target else xp.astype(out, target)

    out = {_V: put(np.zeros(k) if init_weights else rng.standard_normal(k))}
    if config.save_precomputed_indices:
        out[_IDX] = xp.astype(select_positions(weight, k, select_top=config.select_top), xp.int32)
    if config.r is not None:
        r, n_in, n_out = int(config.r), layer.in_features, layer.out_features
        out[_A] = put(rng.uniform(-1.0, 1.0, (r, n_in)) * kaiming_uniform_bound(n_in))
        out[_B] = put(np.zeros((n_out, r)) if init_weights else
                      rng.uniform(-1.0, 1.0, (n_out, r)) * kaiming_uniform_bound(r))
    return out


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint (merge / unmerge: specs/supertuning.md, "6. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
class SupertuningModule(ModuleAdapter):
    """Super-tuning on one nn.Linear: ``supertuning_values (k,)``, ``supertuning_indices (k,)`` (unless not
    saved) and, for Supra, ``supertuning_lora_A.weight (r, in)`` / ``supertuning_lora_B.weight (out, r)``."""

    peft_type = "SUPERTUNING"
    supported_kinds = SUPPORTED_KINDS

    @classmethod
    def infer_layer(cls, name: str, config: SupertuningConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """``weight_shape`` (and ``kind``), else ``(out, in)`` from the Supra factors; the sparse part alone does
        not give the layer's size."""
        if weight_shape is not None:
            return Layer.of(tuple(int(s) for s in weight_shape), kind or LayerKind.LINEAR)
        if _A in params and _B in params:
            return Layer.of((int(params[_B].shape[0]), int(params[_A].shape[-1])), kind or LayerKind.LINEAR)
        raise ShapeError(f"{name}: Super-tuning stores sparse entries, which do not determine the base layer; pass "
                         f"the base weight shape (weight_shape=...)")

    def validate(self) -> None:
        _check_kind(self.layer, self.name)
        allowed = {_V, _IDX, _A, _B}
        extra = sorted(set(self.params) - allowed)
        if extra or _V not in self.params:
            raise ShapeError(f"{self.name}: Super-tuning has {_V}, {_IDX} (unless not saved) and, for Supra, {_A} and "
                             f"{_B}; found {sorted(self.params)}")
        if (_A in self.params) != (_B in self.params):
            raise ShapeError(f"{self.name}: the Supra term needs both {_A} and {_B}, found {sorted(self.params)}")
        self.values = self.params[_V]
        if self.values.ndim != 1:
            raise ShapeError(f"{self.name}: {_V} must be a vector (k,), got shape {tuple(self.values.shape)}")
        self.k = int(self.values.shape[0])
        out, inn = self.layer.out_features, self.layer.in_features
        if not 1 <= self.k <= out * inn:
            raise ShapeError(f"{self.name}: {self.k} values do not fit a {out}x{inn} weight")
        self.A, self.B = self.params.get(_A), self.params.get(_B)
        self.scaling = 1.0
        if self.A is not None:
            r = int(self.A.shape[0])
            check_shape(self.name, _A, self.A, (r, inn))
            check_shape(self.name, _B, self.B, (out, r))
            self.scaling = lora_scaling(self.config, r)
        #: whether the positions are saved (else they are recomputed from the base weight on each use)
        self.has_positions = _IDX in self.params
        #: a standalone ΔW exists only with saved positions (else it needs the base weight)
        self.additive = self.has_positions
        if self.has_positions and not array_api_compat.is_dask_array(self.params[_IDX]):
            self.saved  # checked now, at load (a lazy index tensor: on first use)  # noqa: B018
        self.xp = namespace(self.values, where=self.name)

    @functools.cached_property
    def saved(self) -> Support | None:
        """The saved positions, checked and read on the host (the structure of ΔW, not its values): when the module
        is bound, or, for a lazy (dask) index tensor, on first use; None when they are not saved."""
        if not self.has_positions:
            return None
        return Support(self.params[_IDX], self.layer.out_features, self.layer.in_features, self.k, self.name)

    def needs_record(self) -> bool:
        """Only when the positions are not saved: they are recomputed from the base weight, which merge changes."""
        return not self.has_positions

    def support(self, weight: Array) -> Support:
        """The saved support, or the ``k`` positions recomputed from ``weight``'s magnitudes (:func:`select_positions`)."""
        if self.has_positions:
            return self.saved
        self.layer.check_weight(weight)
        return Support(select_positions(weight, self.k, select_top=self.config.select_top), self.layer.out_features,
                       self.layer.in_features, self.k, self.name)

    def describe(self) -> dict[str, Any]:
        out = {"num_values": self.k, "positions_saved": self.has_positions}
        if self.A is not None:
            out |= {"r": int(self.A.shape[0]), "scaling": self.scaling}
        return out

    def num_parameters(self) -> int:
        """The trained values and the Supra factors; the positions are not trained."""
        return self.k + sum(int(np.prod(a.shape)) for a in (self.A, self.B) if a is not None)

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        """Dense ``ΔW`` ``(out, in)`` in the compute dtype (needs the saved positions)."""
        if not self.has_positions:
            raise UnsupportedError(f"{self.name}: the positions are not saved (save_precomputed_indices=false); they "
                                   f"come from the base weight's magnitudes: use merge or forward with the base weight")
        return delta_weight(self.values, self.saved, A=self.A, B=self.B, scaling=self.scaling)

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        """``W + ΔW``; the record is the recomputed positions when they are not saved (else None)."""
        self.layer.check_weight(weight)
        support = self.support(weight)
        record = None if self.has_positions else backend_for(self.xp).from_host(
            support.flat, self.xp, array_api_compat.device(self.values))
        return MergeResult(self._apply(weight, support, 1, copy=copy, safe=safe, peft_compat=peft_compat), bias,
                           record)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        """``W' − ΔW``; without saved positions the merge's record is needed (:class:`NotInvertibleError`
        without it: the merged weight's magnitudes choose other positions)."""
        self.layer.check_weight(weight)
        if self.has_positions:
            support = self.saved
        elif record is None:
            raise NotInvertibleError(
                f"{self.name}: the positions are not saved (save_precomputed_indices=false) and merge changed the "
                f"magnitudes they are chosen by; unmerge needs the merge's record (MergeResult.record; Adapter.merge "
                f"keeps it when given records={{}}); nothing was changed")
        else:
            support = Support(record, self.layer.out_features, self.layer.in_features, self.k, self.name)
        return MergeResult(self._apply(weight, support, -1, copy=copy, safe=False, peft_compat=peft_compat), bias)

    def _apply(self, weight: Array, support: Support, sign: int, *, copy: bool, safe: bool,
               peft_compat: bool) -> Array:
        """``W ± ΔW``: each touched entry formed in float32 (float64) and rounded once. In place: the Supra term by
        the backend's ``addmm_`` (float32 / float64 weights; a half-precision weight with a Supra term is formed
        out of place, so it is rounded once), then the ``k`` entries: on a NumPy weight in its compute dtype by
        one ``np.add.at`` / ``np.subtract.at`` read-modify-write pass on its flat view (PEFT's ``scatter_add_``),
        else by integer-array gather and assignment in row-major order. ``peft_compat=True``: PEFT's order and
        roundings (values and ``α/r·BA`` rounded to ``W``'s dtype, the sparse part added first on merge and last
        on unmerge, each sum rounded)."""
        xp = self.xp
        cd = compute_dtype(xp, weight.dtype, self.values.dtype)
        values = as_compute(xp, self.values, cd)  # not negated: the kernels subtract on unmerge

        def signed() -> Array:
            return values if sign > 0 else -values

        def lora() -> Array | None:
            if self.A is None:
                return None
            return xp.matmul(as_compute(xp, self.B, cd), as_compute(xp, self.A, cd)) * (sign * self.scaling)

        def compute() -> Array:
            if peft_compat:
                return self._compat(weight, support, signed(), lora(), sign, cd)
            d = _sparse_dense(xp, signed(), support)
            low = lora()
            if low is not None:
                d += low
            d += as_compute(xp, weight, cd)
            return d

        def add_lora(M: Array) -> bool:
            return self.A is None or backend_for(xp).addmm_(M, as_compute(xp, self.B, cd), as_compute(xp, self.A, cd),
                                                            sign * self.scaling)

        def kernel(M: Array) -> bool:
            if self.A is not None and M.dtype != cd:
                return False
            flat = reshape_view(M, (int(M.shape[0]) * int(M.shape[1]),), xp=xp)
            if isinstance(flat, np.ndarray) and flat.dtype == cd and isinstance(values, np.ndarray):
                # NumPy: one unbuffered read-modify-write pass over the k distinct entries, in the values' own
                # order (no permutation; about twice as fast as a sorted gather + assignment, measured)
                if not add_lora(M):
                    return False
                (np.add if sign > 0 else np.subtract).at(flat, support.flat, values)
                return True
            # others (torch, CuPy; a half-precision NumPy weight): the k entries by integer-array assignment in
            # row-major order, on the flat view of M where it is one, else by (row, column); a namespace without
            # it declines before any write
            dev = array_api_compat.device(M)
            try:
                if flat is not None:
                    target, index = flat, xp.asarray(support.sorted_flat, device=dev)
                else:
                    target = M
                    index = (xp.asarray(support.rows, device=dev), xp.asarray(support.cols, device=dev))
                if self.A is not None:
                    target[index] = target[index]  # proves the assignment before the Supra term is written
                    if not add_lora(M):
                        return False
                v = signed()
                v = v if support.order is None else xp.take(v, xp.asarray(support.order, device=dev), axis=0)
                target[index] = as_compute(xp, as_compute(xp, target[index], cd) + v, M.dtype)
            except (TypeError, IndexError, NotImplementedError):
                return False
            return True

        return write_weight(self.name, weight, compute, layer=self.layer, kernel=None if peft_compat else kernel,
                            copy=copy, safe=safe, xp=xp)

    def _compat(self, weight: Array, support: Support, vals: Array, low: Array | None, sign: int, cd: Any) -> Array:
        """PEFT's merge (sparse, then low rank) and unmerge (low rank, then sparse), each term rounded to ``W``'s
        dtype and each sum rounded."""
        xp, wd = self.xp, weight.dtype

        def rounded(a: Array) -> Array:
            return as_compute(xp, xp.astype(a, wd), cd)

        terms = [_sparse_dense(xp, rounded(vals), support)] + ([] if low is None else [rounded(low)])
        w = as_compute(xp, weight, cd)
        for t in (terms if sign > 0 else terms[::-1]):
            w = rounded(w + t)
        return w

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, _ = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.values, self.support(weight), A=self.A, B=self.B, scaling=self.scaling,
                       bias=bias, layer=layer)

    @classmethod
    def initialize(cls, name: str, config: SupertuningConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """:func:`init_weights` (``init`` overrides ``init_weights``); ``weight`` is required (the positions are
        its largest / smallest magnitudes). The base weight is not changed."""
        if weight is None:
            raise ConfigError(f"{name}: Super-tuning chooses its positions by the base weight's magnitudes; pass the "
                              f"base weight")
        params = init_weights(layer, weight, config, init_weights=config.init_weights if init is None else bool(init),
                              seed=seed, xp=xp, device=device, dtype=dtype, where=name)
        return params, None


#: checkpoint suffixes of this method's per-module tensors
PARAMETER_SUFFIXES = (_V, _IDX, _A, _B)
Config = SupertuningConfig
Module = SupertuningModule
#: demo / documentation examples: row label -> config fields (non-trivial: random values, alpha != r)
EXAMPLES = {
    "Super-tuning": dict(sparsity=0.9, init_weights=False),
    "Supra bottom-k": dict(sparsity=0.75, select_top=False, r=2, lora_alpha=3, init_weights=False),
    "Super-tuning unsaved positions": dict(sparsity=0.9, init_weights=False, save_precomputed_indices=False),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=SupertuningConfig, module=SupertuningModule, spec="specs/supertuning.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=SupertuningModule.supported_kinds, additive=True,
    init_field="init_weights", examples=EXAMPLES, orientation_in_tensors=False, frozen_suffixes=(_IDX,),
    needs_record_for=lambda config: not config.save_precomputed_indices,
)
