r"""SHiRA: sparse high-rank adapters (Bhardwaj et al., NeurIPS 2024).

SHiRA trains ``k = r·(in + out)`` individual entries of a Linear's weight (LoRA's parameter count, but a
sparse, generally high-rank change) at positions fixed by a mask::

    ΔW = scaling · Σ_j w_j · e_{p_j} e_{q_j}ᵀ        (p_j, q_j) = shira_indices[:, j],  w = shira_weight

The positions are saved with the adapter (``shira_indices`` ``(2, k)`` int32, rows then columns); positions
that repeat add up (PEFT's sparse COO tensor sums them). ``scaling`` is 1 (PEFT's ``set_scale`` changes it
at inference only; it is not saved). Additive (``W ± ΔW``), so unmerge is exact up to the rounding of the
sums; merge touches only the ``k`` entries. PEFT supports nn.Linear only.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from .._array import as_compute, compute_dtype, namespace
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_flags, check_positive_int
from ..errors import CheckpointError, ConfigError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import ModuleAdapter, SignedModuleAdapter, require_kind, write_weight
from ._sparse import add_at

Array = Any

__all__ = ["ShiraConfig", "num_shira_weights", "random_positions", "init_weights", "Positions", "delta_weight",
           "forward", "ShiraModule"]

PEFT_TYPE = "SHIRA"
_W, _IDX = "shira_weight", "shira_indices"
SUPPORTED_KINDS = (LayerKind.LINEAR,)
#: TunerConfig fields that PEFT's ShiraConfig does not have
_NOT_PEFT_FIELDS = ("exclude_modules", "layers_to_transform", "layers_pattern")


# --------------------------------------------------------------------------------------------------
# Config (specs/shira.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class ShiraConfig(TunerConfig):
    """PEFT's ``ShiraConfig`` (``peft_type: "SHIRA"``), PEFT's names and defaults.

    PEFT's ShiraConfig has no ``exclude_modules`` / ``layers_to_transform`` / ``layers_pattern``: they must
    stay unset and are left out of the written config. ``mask_type`` and ``random_seed`` only choose the
    positions, which the checkpoint holds.
    """

    peft_type: ClassVar[str] = "SHIRA"
    absent_fields: ClassVar[tuple[str, ...]] = _NOT_PEFT_FIELDS

    r: int = 32
    mask_type: str = "random"
    random_seed: int | None = None
    fan_in_fan_out: bool = False
    init_weights: bool = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "r", self.r)
        if not isinstance(self.mask_type, str):
            raise ConfigError(f"{source}: field 'mask_type' must be a string, got {self.mask_type!r}")
        if self.random_seed is not None and (not isinstance(self.random_seed, int) or isinstance(self.random_seed, bool)):
            raise ConfigError(f"{source}: field 'random_seed' must be an integer or null, got {self.random_seed!r}")
        check_flags(source, self, "fan_in_fan_out", "init_weights")



# --------------------------------------------------------------------------------------------------
# Shapes and positions (specs/shira.md, "2. Shapes and positions")
# --------------------------------------------------------------------------------------------------
def num_shira_weights(out_features: int, in_features: int, r: int, where: str = "shira") -> int:
    """``k = r·(in + out)``; :class:`ShapeError` when it exceeds ``out·in`` (PEFT raises ValueError).

    >>> num_shira_weights(20, 10, 1)
    30
    """
    k = int(r) * (int(in_features) + int(out_features))
    if k > out_features * in_features:
        raise ShapeError(f"{where}: r={r} gives r*(in+out) = {k} SHiRA weights, more than the {out_features}x"
                         f"{in_features} = {out_features * in_features} entries of the layer; lower r (PEFT refuses "
                         f"it too)")
    return k


def random_positions(out_features: int, in_features: int, k: int, *,
                     seed: int | np.random.Generator | None = 0) -> np.ndarray:
    """``(2, k)`` int32 rows and columns of ``k`` distinct entries drawn uniformly (NumPy's generator), in
    row-major order as PEFT's mask gives them (``torch.where(mask == 1)``).

    >>> random_positions(3, 4, 5, seed=0).shape
    (2, 5)
    """
    flat = np.sort(host_rng(seed).choice(out_features * in_features, size=k, replace=False))
    return np.stack([flat // in_features, flat % in_features]).astype(np.int32)


class Positions:
    """The positions of one module on the host, checked once: ``rows`` / ``cols`` of the distinct entries
    (row-major order) and ``groups``, ``(levels, n_unique)`` int64 maps from each distinct entry to the
    ``levels`` weights that land on it (``k``, the index of an appended zero, where fewer do). Without
    repeats (every random mask) ``levels == 1`` and ``groups[0]`` is a permutation."""

    def __init__(self, indices: Array, out_features: int, in_features: int, k: int, where: str):
        host = np.asarray(backend_for(namespace(indices)).to_host(indices))
        if host.ndim != 2 or host.shape != (2, k):
            raise ShapeError(f"{where}: {_IDX} must have shape (2, {k}) (rows, columns of the {k} {_W} entries), "
                             f"got {tuple(host.shape)}")
        if host.dtype.kind == "f":  # PEFT saves them as float32 on Windows; whole numbers only
            if not np.all(np.isfinite(host)) or np.any(host != np.round(host)):
                raise CheckpointError(f"{where}: {_IDX} holds non-integer values; they must be row / column "
                                      f"indices")
        elif host.dtype.kind not in "iu":
            raise CheckpointError(f"{where}: {_IDX} must be integers, got dtype {host.dtype}")
        idx = host.astype(np.int64)
        bad = (idx[0] < 0) | (idx[0] >= out_features) | (idx[1] < 0) | (idx[1] >= in_features)
        if np.any(bad):
            j = int(np.argmax(bad))
            raise CheckpointError(f"{where}: {_IDX}[:, {j}] = ({idx[0, j]}, {idx[1, j]}) is outside the "
                                  f"{out_features}x{in_features} weight")
        flat = idx[0] * in_features + idx[1]
        order = np.argsort(flat, kind="stable")
        uniq, first, counts = np.unique(flat[order], return_index=True, return_counts=True)
        self.rows, self.cols = uniq // in_features, uniq % in_features
        levels = int(counts.max()) if k else 1
        groups = np.full((levels, uniq.size), k, dtype=np.int64)
        for level in range(levels):
            has = counts > level
            groups[level, has] = order[first[has] + level]
        self.groups = groups
        #: no repeats and already in row-major order (every PEFT random mask): the weights need no gather
        self.identity = levels == 1 and bool(np.array_equal(groups[0], np.arange(k)))
        self.flat = uniq
        self.shape = (out_features, in_features)


def _summed_values(xp: Any, values: Array, pos: Positions, cd: Any) -> Array:
    """The weight on each distinct position, ``(n_unique,)`` in ``cd``: one gather per repeat level (the
    repeats summed in index order, like PEFT's coalesced sparse tensor)."""
    if pos.identity:
        return as_compute(xp, values, cd)
    dev = array_api_compat.device(values)
    padded = xp.concat([as_compute(xp, values, cd), xp.zeros((1,), dtype=cd, device=dev)])
    total = None
    for level in range(pos.groups.shape[0]):
        part = xp.take(padded, xp.asarray(pos.groups[level], device=dev), axis=0)
        total = part if total is None else total + part
    return total


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/shira.md, "3. Initialisation")
# --------------------------------------------------------------------------------------------------
def init_weights(k: int, *, init_weights: bool = True, seed: int | np.random.Generator | None = 0, xp: Any = None,
                 device: Any = None, dtype: Any = None) -> Array:
    """``shira_weight`` ``(k,)``: zeros (PEFT's default, ``ΔW = 0``) or ``N(0, 1)`` draws.

    >>> init_weights(3).tolist()
    [0.0, 0.0, 0.0]
    """
    if not isinstance(init_weights, bool):
        raise ConfigError(f"SHiRA init_weights must be true or false, got {init_weights!r}")
    if xp is None:
        import array_api_compat.numpy as xp
    host = np.zeros(k) if init_weights else host_rng(seed).standard_normal(k)
    out = backend_for(xp).from_host(np.ascontiguousarray(host, dtype=np.float32), xp, device)
    target = dtype if dtype is not None else xp.float32
    return out if out.dtype == target else xp.astype(out, target)


# --------------------------------------------------------------------------------------------------
# Delta weight (specs/shira.md, "4. Delta weight")
# --------------------------------------------------------------------------------------------------
def delta_weight(values: Array, indices: Array, out_features: int, in_features: int, *, scaling: float = 1.0,
                 dtype: Any = None, where: str = "shira", positions: Positions | None = None) -> Array:
    """Dense ``ΔW`` ``(out, in)``: ``scaling·w_j`` at ``(p_j, q_j)``, repeats summed, zeros elsewhere; built
    by one gather through a host map of the grid (the array API has no scatter).

    >>> import numpy as np
    >>> delta_weight(np.array([1.0, 2.0, 4.0]), np.array([[0, 1, 0], [2, 0, 2]]), 2, 3).tolist()
    [[0.0, 0.0, 5.0], [2.0, 0.0, 0.0]]
    """
    xp = namespace(values, where=where)
    k = int(values.shape[0]) if values.ndim == 1 else -1
    if k < 0:
        raise ShapeError(f"{where}: {_W} must be a vector (k,), got shape {tuple(values.shape)}")
    pos = positions or Positions(indices, out_features, in_features, k, where)
    cd = dtype if dtype is not None else compute_dtype(xp, values.dtype)
    return _dense(xp, _summed_values(xp, values, pos, cd) * scaling, pos)


def _dense(xp: Any, summed: Array, pos: Positions) -> Array:
    """A new dense ``(out, in)`` array holding ``summed[u]`` at distinct position ``u``, zeros elsewhere: one
    gather through a host map of the grid (each cell: its position's number, or the appended zero)."""
    dev = array_api_compat.device(summed)
    grid = np.full(pos.shape[0] * pos.shape[1], pos.flat.size, dtype=np.int64)
    grid[pos.flat] = np.arange(pos.flat.size)
    padded = xp.concat([summed, xp.zeros((1,), dtype=summed.dtype, device=dev)])
    return xp.reshape(xp.take(padded, xp.asarray(grid, device=dev), axis=0), pos.shape)


# --------------------------------------------------------------------------------------------------
# Forward (specs/shira.md, "5. Forward")
# --------------------------------------------------------------------------------------------------
def forward(x: Array, weight: Array, values: Array, indices: Array, *, bias: Array | None = None,
            scaling: float = 1.0, layer: Any = None, positions: Positions | None = None) -> Array:
    """``x (W + ΔW)ᵀ + b`` (PEFT's forward: the base layer's weight plus ``ΔW``), in float32 (float64 for
    float64 inputs), rounded once to the output dtype.

    >>> import numpy as np
    >>> forward(np.ones((1, 2)), np.zeros((2, 2)), np.array([3.0]), np.array([[1], [0]])).tolist()
    [[0.0, 3.0]]
    """
    xp = namespace(x, weight, values, bias, where="shira.forward")
    lay, _ = Layer.for_weight(layer, weight).for_input(x, "shira.forward")
    _check_kind(lay, "shira.forward")
    lay.check_bias(bias)
    out_dtype = xp.result_type(x.dtype, weight.dtype)
    cd = compute_dtype(xp, x.dtype, weight.dtype, values.dtype)
    dw = delta_weight(values, indices, lay.out_features, lay.in_features, scaling=scaling, dtype=cd,
                      where="shira.forward", positions=positions)
    dw += as_compute(xp, weight, cd)
    y = lay.base_forward(as_compute(xp, x, cd), dw, None if bias is None else as_compute(xp, bias, cd), xp)
    return as_compute(xp, y, out_dtype)


def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "SHiRA", SUPPORTED_KINDS, peft="it raises TypeError for others")


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint (merge / unmerge: specs/shira.md, "6. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
class ShiraModule(SignedModuleAdapter):
    """SHiRA on one nn.Linear: ``shira_weight`` ``(k,)`` and ``shira_indices`` ``(2, k)``. Additive; the
    in-place merge updates only the ``k`` entries."""

    peft_type = "SHIRA"
    supported_kinds = SUPPORTED_KINDS

    @classmethod
    def infer_layer(cls, name: str, config: ShiraConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """A Linear of ``weight_shape`` (required: the sparse tensors do not give the layer's size)."""
        if _W not in params or _IDX not in params:
            raise ShapeError(f"{name}: SHiRA needs {_W} and {_IDX}, found {sorted(params)}")
        if weight_shape is None:
            raise ShapeError(f"{name}: SHiRA stores sparse entries, which do not determine the base layer; pass "
                             f"the base weight shape (weight_shape=...)")
        return Layer.of(tuple(int(s) for s in weight_shape), kind or LayerKind.LINEAR)

    def validate(self) -> None:
        _check_kind(self.layer, self.name)
        missing = sorted({_W, _IDX} - set(self.params))
        if missing:
            raise ShapeError(f"{self.name}: missing {missing} (found {sorted(self.params)})")
        extra = sorted(set(self.params) - {_W, _IDX})
        if extra:
            raise ShapeError(f"{self.name}: unexpected SHiRA tensors {extra} (SHiRA has {_W} and {_IDX})")
        self.values = self.params[_W]
        if self.values.ndim != 1:
            raise ShapeError(f"{self.name}: {_W} must be a vector (k,), got shape {tuple(self.values.shape)}")
        if not array_api_compat.is_dask_array(self.params[_IDX]):
            self.positions  # checked now, at load (a lazy index tensor: on first use)  # noqa: B018
        #: PEFT's per-layer scaling (1 unless scaled); :meth:`scaled` multiplies it
        self.scaling = 1.0
        self.xp = namespace(self.values, where=self.name)

    @functools.cached_property
    def positions(self) -> Positions:
        """The checked positions, read on the host: when the module is bound, or, for a lazy (dask) index
        tensor, on first use (it is computed then: the positions are the structure of ΔW, not its values),
        so that a refusal that needs no position (``copy=False`` on a dask array) computes nothing."""
        return Positions(self.params[_IDX], self.layer.out_features, self.layer.in_features,
                         int(self.values.shape[0]), self.name)

    def describe(self) -> dict[str, Any]:
        return {"num_shira_weights": int(self.values.shape[0]), "distinct_positions": int(self.positions.flat.size)}

    def num_parameters(self) -> int:
        """The trainable entries (``shira_weight``); the positions are not trained."""
        return int(self.values.shape[0])

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        """Dense ``ΔW`` ``(out, in)`` in the compute dtype."""
        return delta_weight(self.values, None, self.layer.out_features, self.layer.in_features, scaling=self.scaling,
                            where=self.name, positions=self.positions)

    def _apply(self, weight: Array, sign: int, *, copy: bool, safe: bool, peft_compat: bool) -> Array:
        """Merge: ``W + ΔW``: each touched entry formed in float32 (float64) and rounded once, which is also what
        PEFT's ``W += sparse`` gives for a low-precision ``W`` (``peft_compat`` changes nothing). Unmerge: ``W −
        ΔW``, as :meth:`merge`."""
        xp = self.xp
        cd = compute_dtype(xp, weight.dtype, self.values.dtype)
        pos = self.positions

        def summed() -> Array:  # sign·scaling·(summed weights) per distinct position, in cd
            return _summed_values(xp, self.values, pos, cd) * (sign * self.scaling)

        def compute() -> Array:
            d = _dense(xp, summed(), pos)
            d += as_compute(xp, weight, cd)  # W + sign·ΔW into ΔW's own memory (JAX and dask rebind)
            return d

        def kernel(M: Array) -> bool:  # only the k entries (methods._sparse.add_at: M's flat view where it has one)
            return add_at(xp, M, pos.flat, pos.shape[1], summed(), cd)

        return write_weight(self.name, weight, compute, layer=self.layer, kernel=kernel, copy=copy, safe=safe,
                            xp=xp)

    def scaled(self, c: float) -> ModuleAdapter:
        """Scale ``c``: ``scaling → c·scaling`` (PEFT's ``set_scale``), so ``ΔW → c·ΔW``."""
        return self.scale_scaling(c)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, _ = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.values, None, bias=bias, scaling=self.scaling, layer=layer,
                       positions=self.positions)

    @classmethod
    def initialize(cls, name: str, config: ShiraConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """``{"shira_weight": ..., "shira_indices": ...}``: ``k = r·(in + out)`` distinct random positions
        (NumPy's generator: PEFT's ``mask_type="random"`` distribution, not its positions) and zero weights
        (``init`` overrides ``config.init_weights``); the base weight is not changed."""
        _check_kind(layer, name)
        if config.mask_type != "random":
            raise UnsupportedError(f"{name}: SHiRA mask_type={config.mask_type!r} names a user mask function "
                                   f"(PEFT's config.mask_fn, Python code); peftmath draws only 'random' masks. "
                                   f"Create the adapter in PEFT and load its checkpoint (the positions are saved)")
        if xp is None and weight is not None:
            xp = namespace(weight)
        if xp is None:
            import array_api_compat.numpy as xp
        rng = host_rng(seed)
        k = num_shira_weights(layer.out_features, layer.in_features, config.r, name)
        idx = backend_for(xp).from_host(random_positions(layer.out_features, layer.in_features, k, seed=rng), xp,
                                        device)
        values = init_weights(k, init_weights=config.init_weights if init is None else init, seed=rng, xp=xp,
                              device=device, dtype=dtype)
        return {_W: values, _IDX: idx}, None


#: checkpoint suffixes of this method's per-module tensors (a ParameterDict entry and a plain saved tensor)
PARAMETER_SUFFIXES = (_W, _IDX)
Config = ShiraConfig
Module = ShiraModule
#: demo / documentation examples: row label -> config fields (non-trivial: random weights)
EXAMPLES = {
    "SHiRA": dict(r=1, init_weights=False),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=ShiraConfig, module=ShiraModule, spec="specs/shira.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=ShiraModule.supported_kinds, additive=True,
    init_field="init_weights", examples=EXAMPLES, orientation_in_tensors=False,
    frozen_suffixes=(_IDX,),
)
