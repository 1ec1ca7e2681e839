r"""RoAd: 2×2 rotation adaptation (Liao et al., 2024, "RoAd: a 2D rotary adapter for efficient
batch inference").

The output of a Linear layer is split into groups of ``group_size = g`` features; within a group, feature
``j`` of the first half is paired with feature ``j`` of the second half (``h = g/2``), and each pair
``(a, b)`` is multiplied by a 2×2 matrix::

    [a']   [ f_a  -s_a ] [a]        f = α cos θ,   s = α sin θ   (per output feature)
    [b'] = [ s_b   f_b ] [b]

so ``y' = R y`` with ``R`` a permuted block-diagonal of 2×2 blocks. The variants differ in how many
angles θ and scales α a pair has: ``road_1`` one (θ, α) per pair (a scaled rotation), ``road_2`` one per
feature, ``road_4`` two per feature (``f = α₁ cos θ₁``, ``s = α₂ sin θ₂``).

Merge: ``W ← R W``, ``b ← R b``. Unmerge: each 2×2 block is inverted in closed form
(``det = f_a f_b + s_a s_b``), exact whenever no determinant is zero; ``R`` is never formed (PEFT builds the
dense ``out×out`` matrix and inverts it with ``torch.linalg.inv``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._array import all_finite, as_compute, compute_dtype, namespace, reshape_view
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_choice, check_flags, check_positive_int
from ..errors import ConfigError, NonFiniteError, NotInvertibleError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import (MergeResult, ModuleAdapter, check_shape, in_row_tiles, require_kind, require_writeable, write_back,
                    write_weight)

Array = Any

__all__ = ["RoadConfig", "parameter_size", "init_weights", "coefficients", "inverse_coefficients",
           "apply_rotation", "forward", "merge", "unmerge", "RoadModule"]

PEFT_TYPE = "ROAD"
VARIANTS = ("road_1", "road_2", "road_4")
SUPPORTED_KINDS = (LayerKind.LINEAR,)
_THETA, _ALPHA = "road_theta", "road_alpha"
#: TunerConfig fields that PEFT's RoadConfig does not have
_NOT_PEFT_FIELDS = ("exclude_modules", "layers_to_transform", "layers_pattern")


# --------------------------------------------------------------------------------------------------
# Config (specs/road.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class RoadConfig(TunerConfig):
    """PEFT's ``RoadConfig`` (``peft_type: "ROAD"``): ``variant`` (``road_1``/``road_2``/``road_4``),
    ``group_size`` (even; divides every adapted layer's output size), ``init_weights``.

    PEFT's RoadConfig has no ``exclude_modules`` / ``layers_to_transform`` / ``layers_pattern``: they must
    stay unset and are left out of the written config.
    """

    peft_type: ClassVar[str] = "ROAD"
    absent_fields: ClassVar[tuple[str, ...]] = _NOT_PEFT_FIELDS

    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_choice(source, "variant", self.variant, VARIANTS)
        check_positive_int(source, "group_size", self.group_size)
        if self.group_size % 2:
            raise ConfigError(f"{source}: field 'group_size' must be even (features are paired within a group), "
                              f"got {self.group_size} (PEFT refuses it too)")
        check_flags(source, self, "init_weights")



# --------------------------------------------------------------------------------------------------
# Shapes (specs/road.md, "2. Shapes")
# --------------------------------------------------------------------------------------------------
def parameter_size(out_features: int, variant: str, group_size: int, where: str = "road") -> int:
    """The length of ``road_theta`` and of ``road_alpha``: ``out/2``, ``out`` or ``2·out``.

    >>> [parameter_size(8, v, 4) for v in VARIANTS]
    [4, 8, 16]
    """
    if variant not in VARIANTS:
        raise ConfigError(f"{where}: variant {variant!r} is not one of {', '.join(VARIANTS)}")
    if group_size <= 0 or group_size % 2 or out_features % group_size:
        raise ShapeError(f"{where}: the {out_features} output features are not a multiple of group_size="
                         f"{group_size} (an even number); choose a group_size that divides them (PEFT refuses too)")
    return {"road_1": out_features // 2, "road_2": out_features, "road_4": 2 * out_features}[variant]


def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "RoAd", SUPPORTED_KINDS, peft="it raises TypeError for others")


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/road.md, "3. Initialisation")
# --------------------------------------------------------------------------------------------------
def init_weights(size: int, *, init_weights: bool = True, seed: int | np.random.Generator | None = 0,
                 xp: Any = None, device: Any = None, dtype: Any = None) -> tuple[Array, Array]:
    """``(road_theta, road_alpha)`` of length ``size``: ``θ = 0, α = 1`` (the identity), or with
    ``init_weights=False`` ``θ ~ N(0, 0.5²)``, ``α ~ N(1, 0.5²)`` (PEFT's distributions, NumPy's
    generator).

    >>> [a.tolist() for a in init_weights(2)]
    [[0.0, 0.0], [1.0, 1.0]]
    """
    if not isinstance(init_weights, bool):
        raise ConfigError(f"RoAd init_weights must be true or false, got {init_weights!r}")
    if xp is None:
        import array_api_compat.numpy as xp
    if init_weights:
        hosts = (np.zeros(size), np.ones(size))
    else:
        rng = host_rng(seed)
        hosts = (rng.normal(0.0, 0.5, size), rng.normal(1.0, 0.5, size))
    target = dtype if dtype is not None else xp.float32
    out = []
    for host in hosts:
        a = backend_for(xp).from_host(np.ascontiguousarray(host, dtype=np.float32), xp, device)
        out.append(a if a.dtype == target else xp.astype(a, target))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------
# The 2×2 blocks (specs/road.md, "4. The rotation")
# --------------------------------------------------------------------------------------------------
def coefficients(theta: Array, alpha: Array, *, variant: str, group_size: int,
                 dtype: Any = None) -> tuple[Array, Array]:
    """``(f, s)``, each of length ``out``: output feature ``i`` becomes ``f_i y_i ∓ s_i y_partner(i)``.

    ``road_1``: group ``k``'s ``h`` angles serve both halves; ``road_2``: ``f = α cos θ``, ``s = α sin θ``
    elementwise; ``road_4``: per group the first ``g`` entries of θ / α give ``f``, the next ``g`` give ``s``.
    Computed in ``dtype`` (default float32, float64 for float64 parameters).
    """
    xp = namespace(theta, alpha)
    cd = dtype if dtype is not None else compute_dtype(xp, theta.dtype, alpha.dtype)
    t, a = as_compute(xp, theta, cd), as_compute(xp, alpha, cd)
    h = group_size // 2
    if variant == "road_1":
        t, a = (xp.reshape(xp.stack([z, z], axis=1), (-1,)) for z in (xp.reshape(t, (-1, h)), xp.reshape(a, (-1, h))))
    if variant in ("road_1", "road_2"):
        return a * xp.cos(t), a * xp.sin(t)
    if variant != "road_4":
        raise ConfigError(f"road: variant {variant!r} is not one of {', '.join(VARIANTS)}")
    t, a = xp.reshape(t, (-1, 2, group_size)), xp.reshape(a, (-1, 2, group_size))
    return (xp.reshape(a[:, 0, :] * xp.cos(t[:, 0, :]), (-1,)), xp.reshape(a[:, 1, :] * xp.sin(t[:, 1, :]), (-1,)))


def inverse_coefficients(f: Array, s: Array, *, group_size: int, where: str = "road") -> tuple[Array, Array]:
    """``(f', s')`` of the inverse blocks: ``[[f_a, -s_a], [s_b, f_b]]⁻¹ = [[f_b, s_a], [-s_b, f_a]] / det``,
    ``det = f_a f_b + s_a s_b``. A zero or non-finite determinant is a :class:`NotInvertibleError`.

    >>> import numpy as np
    >>> f, s = inverse_coefficients(np.array([2.0, 3.0]), np.array([1.0, 1.0]), group_size=2)
    >>> (np.array([[2.0, -1.0], [1.0, 3.0]]) @ np.array([[f[0], -s[0]], [s[1], f[1]]])).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    xp = namespace(f, s)
    h = group_size // 2
    fg, sg = xp.reshape(f, (-1, 2, h)), xp.reshape(s, (-1, 2, h))
    fa, fb, sa, sb = fg[:, 0, :], fg[:, 1, :], sg[:, 0, :], sg[:, 1, :]
    det = fa * fb + sa * sb
    bad = xp.reshape(xp.logical_or(det == 0, xp.logical_not(xp.isfinite(det))), (-1,))
    if bool(xp.any(bad)):
        k = int(xp.nonzero(bad)[0][0])
        grp, j = divmod(k, h)
        i = grp * group_size + j
        raise NotInvertibleError(
            f"{where}: the 2x2 block of output features {i} and {i + h} has determinant "
            f"{float(xp.reshape(det, (-1,))[k])!r} "
            f"(f_a f_b + s_a s_b; a zero scale alpha makes it 0), so the merge cannot be undone; nothing was changed. "
            f"Keep the unmerged weight")
    inv_f = xp.reshape(xp.stack([fb / det, fa / det], axis=1), (-1,))
    inv_s = xp.reshape(xp.stack([-sa / det, -sb / det], axis=1), (-1,))
    return inv_f, inv_s


def apply_rotation(Z: Array, f: Array, s: Array, *, group_size: int) -> Array:
    """``R`` applied along the last axis of ``Z`` (``(..., out)``), elementwise, ``O(size(Z))``:
    ``a' = f_a a - s_a b``, ``b' = s_b a + f_b b`` for each pair ``(a, b)`` (features ``j`` and ``j + h`` of
    a group)."""
    xp = namespace(Z, f, s)
    h = group_size // 2
    lead = tuple(Z.shape[:-1])
    Zg = xp.reshape(Z, lead + (-1, 2, h))
    fg, sg = xp.reshape(f, (-1, 2, h)), xp.reshape(s, (-1, 2, h))
    a, b = Zg[..., 0, :], Zg[..., 1, :]
    out = xp.stack([fg[:, 0, :] * a - sg[:, 0, :] * b, sg[:, 1, :] * a + fg[:, 1, :] * b], axis=-2)
    return xp.reshape(out, tuple(Z.shape))


# --------------------------------------------------------------------------------------------------
# Forward (specs/road.md, "5. Forward")
# --------------------------------------------------------------------------------------------------
def forward(x: Array, weight: Array, theta: Array, alpha: Array, *, bias: Array | None = None,
            variant: str = "road_1", group_size: int = 64, layer: Any = None, peft_compat: bool = False) -> Array:
    """``R (x Wᵀ + b)`` along the output features, computed in float32 (float64 for float64 inputs) and
    rounded once to the output dtype. ``peft_compat=True`` rounds the base output to its dtype first, as
    PEFT does (it runs the base layer, then rotates in the parameters' dtype).

    >>> import numpy as np
    >>> W = np.eye(2); theta = np.array([np.pi / 2]); alpha = np.array([2.0])   # road_1, one pair
    >>> forward(np.array([[1.0, 0.0]]), W, theta, alpha, group_size=2).round(12)
    array([[0., 2.]])
    """
    xp = namespace(x, weight, theta, alpha, bias, where="road.forward")
    lay, _ = Layer.for_weight(layer, weight).for_input(x, "road.forward")
    _check_kind(lay, "road.forward")
    _check_params(lay, theta, alpha, variant, group_size, "road.forward")
    lay.check_bias(bias)
    out_dtype = xp.result_type(x.dtype, weight.dtype)
    cd = compute_dtype(xp, x.dtype, weight.dtype, theta.dtype, alpha.dtype)
    if peft_compat:
        y = as_compute(xp, lay.base_forward(x, weight, bias, xp), cd)
    else:
        y = lay.base_forward(as_compute(xp, x, cd), as_compute(xp, weight, cd),
                             None if bias is None else as_compute(xp, bias, cd), xp)
    f, s = coefficients(theta, alpha, variant=variant, group_size=group_size, dtype=cd)
    return as_compute(xp, apply_rotation(y, f, s, group_size=group_size), out_dtype)


def _check_params(lay: Layer, theta: Array, alpha: Array, variant: str, group_size: int, where: str) -> None:
    n = parameter_size(lay.out_features, variant, group_size, where)
    check_shape(where, _THETA, theta, (n,))
    check_shape(where, _ALPHA, alpha, (n,))


# --------------------------------------------------------------------------------------------------
# Merge / unmerge (specs/road.md, "6. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def _merge_or_unmerge(weight: Array, theta: Array, alpha: Array, bias: Array | None, *, variant: str,
                      group_size: int, layer: Any, inverse: bool, copy: bool, safe: bool, peft_compat: bool,
                      where: str) -> tuple[Array, Array | None]:
    xp = namespace(weight, theta, alpha, bias, where=where)
    lay = Layer.for_weight(layer, weight)
    _check_kind(lay, where)
    _check_params(lay, theta, alpha, variant, group_size, where)
    lay.check_bias(bias)
    if not copy:  # both arrays checked before either is written
        require_writeable(where, weight)
        if bias is not None:
            require_writeable(where, bias, "bias")
    cd = compute_dtype(xp, weight.dtype, theta.dtype, alpha.dtype)
    f, s = coefficients(theta, alpha, variant=variant, group_size=group_size, dtype=cd)
    if inverse:
        f, s = inverse_coefficients(f, s, group_size=group_size, where=where)
    if peft_compat:  # PEFT rounds R (or its float32 inverse) to the weight's dtype before the product
        f, s = (as_compute(xp, as_compute(xp, z, weight.dtype), cd) for z in (f, s))

    new_bias = bias
    if bias is not None:
        bcd = compute_dtype(xp, bias.dtype, cd)
        new_bias = as_compute(xp, apply_rotation(as_compute(xp, bias, bcd), f, s, group_size=group_size), bias.dtype)
        if safe and not all_finite(new_bias, xp=xp):
            raise NonFiniteError(f"{where}: the merged bias would contain NaN or infinity; nothing was changed")

    def compute() -> Array:  # rotate the rows of W: the output axis last, then back
        Wt = xp.matrix_transpose(as_compute(xp, weight, cd))
        return xp.matrix_transpose(apply_rotation(Wt, f, s, group_size=group_size))

    def kernel(M: Array) -> bool:
        """The rotation in place on the ``(out, in)`` matrix view, a row tile of whole groups at a time (two
        products of the tile's size; half precision widened and rounded once, ``in_row_tiles``): rows ``a``
        and ``b = a + h`` of a group become ``f_a a − s_a b`` and ``s_b a + f_b b``, as ``compute``."""
        out, inn = int(M.shape[0]), int(M.shape[1])
        h = group_size // 2
        groups = reshape_view(M, (out // group_size, group_size * inn), xp=xp)
        if groups is None:
            return False
        fg, sg = (xp.reshape(z, (out // group_size, 2, h, 1)) for z in (f, s))

        def update(T: Array, g0: int, g1: int) -> None:
            Tg = reshape_view(T, (g1 - g0, 2, h, inn), xp=xp)  # a block of whole rows: always a view
            a, b = Tg[:, 0, ...], Tg[:, 1, ...]
            new_a = fg[g0:g1, 0, ...] * a - sg[g0:g1, 0, ...] * b
            new_b = sg[g0:g1, 1, ...] * a + fg[g0:g1, 1, ...] * b
            Tg[:, 0, ...] = new_a
            Tg[:, 1, ...] = new_b

        in_row_tiles(xp, groups, cd, update, tile_full=True)
        return True

    new = write_weight(where, weight, compute, layer=lay, kernel=kernel, copy=copy, safe=safe, xp=xp)
    if not copy and bias is not None:
        new_bias = write_back(where, bias, new_bias)
    return new, new_bias


def merge(weight: Array, theta: Array, alpha: Array, *, bias: Array | None = None, variant: str = "road_1",
          group_size: int = 64, layer: Any = None, copy: bool = True, safe: bool = False,
          peft_compat: bool = False) -> tuple[Array, Array | None]:
    """``(R W, R b)``, formed in float32 (float64 for float64) and rounded once to the weight's (bias's)
    dtype. ``peft_compat=True`` first rounds the coefficients of ``R`` to the weight's dtype, as PEFT does
    (``road_R.to(W.dtype) @ W``; no difference for float32 weights).

    >>> import numpy as np
    >>> W = np.arange(4.0).reshape(2, 2)
    >>> merge(W, np.array([np.pi / 2]), np.array([1.0]), group_size=2)[0].round(12)    # rows (a, b) -> (-b, a)
    array([[-2., -3.],
           [ 0.,  1.]])
    """
    return _merge_or_unmerge(weight, theta, alpha, bias, variant=variant, group_size=group_size, layer=layer,
                             inverse=False, copy=copy, safe=safe, peft_compat=peft_compat, where="road.merge")


def unmerge(weight: Array, theta: Array, alpha: Array, *, bias: Array | None = None, variant: str = "road_1",
            group_size: int = 64, layer: Any = None, copy: bool = True,
            peft_compat: bool = False) -> tuple[Array, Array | None]:
    """``(R⁻¹ W', R⁻¹ b')`` with each 2×2 block inverted in closed form; a singular block is a
    :class:`NotInvertibleError` (nothing is changed).

    >>> import numpy as np
    >>> W = np.arange(8.0).reshape(4, 2); th = np.array([0.3, -1.0, 2.0, 0.5]); al = np.array([1.5, 0.5, 2.0, 1.0])
    >>> m = merge(W, th, al, variant="road_2", group_size=4)[0]
    >>> bool(np.allclose(unmerge(m, th, al, variant="road_2", group_size=4)[0], W))
    True
    """
    return _merge_or_unmerge(weight, theta, alpha, bias, variant=variant, group_size=group_size, layer=layer,
                             inverse=True, copy=copy, safe=False, peft_compat=peft_compat, where="road.unmerge")


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
class RoadModule(ModuleAdapter):
    """RoAd on one nn.Linear: ``road_theta`` and ``road_alpha``. Multiplicative on the output side."""

    peft_type = "ROAD"
    additive = False
    supported_kinds = SUPPORTED_KINDS

    @classmethod
    def infer_layer(cls, name: str, config: RoadConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """A Linear; without ``weight_shape`` its output size follows from the tensors and the variant, its
        input size is unknown (0)."""
        if kind is not None and LayerKind.parse(kind) not in cls.supported_kinds:
            raise UnsupportedError(f"{name}: RoAd does not support {LayerKind.parse(kind).value} layers "
                                   f"(PEFT: nn.Linear only)")
        if _THETA not in params:
            raise ShapeError(f"{name}: no {_THETA} among the module's tensors {sorted(params)}")
        if weight_shape is not None:
            return Layer.of(tuple(weight_shape), LayerKind.LINEAR if len(weight_shape) == 2 else None)
        n = int(params[_THETA].shape[0])
        out = {"road_1": 2 * n, "road_2": n, "road_4": n // 2}[config.variant]
        return Layer(LayerKind.LINEAR, (out, 0))

    def validate(self) -> None:
        _check_kind(self.layer, self.name)
        missing = sorted({_THETA, _ALPHA} - set(self.params))
        if missing:
            raise ShapeError(f"{self.name}: missing {missing} (found {sorted(self.params)})")
        extra = sorted(set(self.params) - {_THETA, _ALPHA})
        if extra:
            raise ShapeError(f"{self.name}: unexpected RoAd tensors {extra} (RoAd has {_THETA} and {_ALPHA})")
        self.theta, self.alpha = self.params[_THETA], self.params[_ALPHA]
        _check_params(self.layer, self.theta, self.alpha, self.config.variant, self.config.group_size, self.name)

    def describe(self) -> dict[str, Any]:
        return {"variant": self.config.variant, "group_size": self.config.group_size}

    def changes_bias(self) -> bool:
        return True

    def _apply(self, weight: Array, bias: Array | None, *, inverse: bool, copy: bool, safe: bool,
               peft_compat: bool) -> MergeResult:
        self.layer.check_weight(weight)
        w, b = _merge_or_unmerge(weight, self.theta, self.alpha, bias, variant=self.config.variant,
                                 group_size=self.config.group_size, layer=self.layer, inverse=inverse, copy=copy,
                                 safe=safe, peft_compat=peft_compat, where=self.name)
        return MergeResult(w, b)

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        return self._apply(weight, bias, inverse=False, copy=copy, safe=safe, peft_compat=peft_compat)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        return self._apply(weight, bias, inverse=True, copy=copy, safe=False, peft_compat=peft_compat)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, *, peft_compat: bool = False,
                **layer_kwargs: Any) -> Array:
        layer, _ = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.theta, self.alpha, bias=bias, variant=self.config.variant,
                       group_size=self.config.group_size, layer=layer, peft_compat=peft_compat)

    @classmethod
    def initialize(cls, name: str, config: RoadConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """``{"road_theta", "road_alpha"}`` for module ``name`` (``init`` overrides ``config.init_weights``);
        the base weight is not changed."""
        _check_kind(layer, name)
        if xp is None and weight is not None:
            xp = namespace(weight)
        n = parameter_size(layer.out_features, config.variant, config.group_size, name)
        theta, alpha = init_weights(n, init_weights=config.init_weights if init is None else init, seed=seed, xp=xp,
                                    device=device, dtype=dtype)
        return {_THETA: theta, _ALPHA: alpha}, None


#: checkpoint suffixes of this method's per-module tensors (ParameterDict entries: no ".weight")
PARAMETER_SUFFIXES = (_THETA, _ALPHA)
Config = RoadConfig
Module = RoadModule
#: demo / documentation examples: row label -> config fields (non-trivial: random angles and scales)
EXAMPLES = {
    "RoAd": dict(variant="road_1", group_size=4, init_weights=False),
    "RoAd road_4": dict(variant="road_4", group_size=2, init_weights=False),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=RoadConfig, module=RoadModule, spec="specs/road.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=RoadModule.supported_kinds, rotation=True,
    init_field="init_weights", examples=EXAMPLES,
)
