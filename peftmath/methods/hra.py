r"""HRA: Householder reflection adaptation (Yuan et al., 2024, "Bridging the gap between low-rank and
orthogonal adaptation via Householder reflection adaptation").

The base weight is multiplied on its input side by a product of ``r`` Householder reflections::

    W' = W H,      H = H_1 H_2 ... H_r,      H_i = I - 2 ŷ_i ŷ_iᵀ,     ŷ_i = u_i / ||u_i||

with ``hra_u = [u_1 ... u_r]`` of shape ``(n, r)``, ``n`` the input features (Linear) or
``C_in·kH·kW`` (Conv2d, the weight viewed as ``(C_out, C_in·kH·kW)``). With ``apply_GS`` the columns
are first orthonormalised (modified Gram-Schmidt, ``Q``) and ``H = I - 2 Q Qᵀ``.

``H`` is never formed: it is held in the compact WY form ``H = I - Y T Yᵀ`` (``Y`` the unit vectors,
``T`` an ``r×r`` upper-triangular matrix; ``T = 2I`` for Gram-Schmidt), so merging is two thin
products, ``W H = W - ((W Y) T) Yᵀ``, in ``O(out·n·r)`` instead of ``O(out·n²)``. ``H`` is orthogonal,
so unmerge is exact: ``W' Hᵀ = W' - ((W' Y) Tᵀ) Yᵀ``.

PEFT supports nn.Linear and nn.Conv2d (not grouped); the tensor is ``hra_u``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from .._array import as_compute, compute_dtype, conv, namespace
from ..backends import backend_for, host_rng, kaiming_uniform_bound
from ..config import TunerConfig, check_choice, check_flags, check_positive_int
from ..errors import ConfigError, NotInvertibleError, PeftMathWarning, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import MergeResult, ModuleAdapter, require_kind, check_shape, write_weight

Array = Any

__all__ = ["HRAConfig", "parameter_shape", "init_weights", "reflection_factors", "apply_reflections", "forward",
           "merge", "unmerge", "HRAModule"]

PEFT_TYPE = "HRA"
_KEY = "hra_u"
SUPPORTED_KINDS = (LayerKind.LINEAR, LayerKind.CONV2D)


# --------------------------------------------------------------------------------------------------
# Config (specs/hra.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class HRAConfig(TunerConfig):
    """PEFT's ``HRAConfig`` (``peft_type: "HRA"``), PEFT's field names and defaults.

    ``r``: the number of reflections (columns of ``hra_u``); ``apply_GS``: orthonormalise them first;
    ``init_weights``: PEFT's symmetric initialisation (the identity for even ``r``).
    """

    peft_type: ClassVar[str] = "HRA"

    r: int = 8
    apply_GS: bool = False
    init_weights: bool = True
    bias: str = "none"

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "r", self.r)
        check_flags(source, self, "apply_GS", "init_weights")
        check_choice(source, "bias", self.bias, ("none", "all", "hra_only"))


# --------------------------------------------------------------------------------------------------
# Shapes (specs/hra.md, "2. Shapes")
# --------------------------------------------------------------------------------------------------
def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "HRA", SUPPORTED_KINDS, peft="it raises TypeError for others",
                 grouped="PEFT raises NotImplementedError: hra_u spans all input channels, the grouped kernel does not")


def reflected_dim(layer: Layer) -> int:
    """``n``, the dimension the reflections act on: in features, or ``C_in·kH·kW`` for a Conv2d."""
    return layer.matrix_shape[1]


def parameter_shape(layer: Layer, r: int, where: str = "hra") -> tuple[int, int]:
    """The shape of ``hra_u``: ``(n, r)``.

    >>> parameter_shape(Layer.of((6, 4)), 2), parameter_shape(Layer.of((10, 5, 3, 3)), 4)
    ((4, 2), (45, 4))
    """
    _check_kind(layer, where)
    return (reflected_dim(layer), int(r))


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/hra.md, "3. Initialisation")
# --------------------------------------------------------------------------------------------------
def init_weights(shape: tuple[int, int], *, init_weights: bool = True, seed: int | np.random.Generator | None = 0,
                 xp: Any = None, device: Any = None, dtype: Any = None, where: str = "hra") -> Array:
    """PEFT's initialisation of ``hra_u`` ``(n, r)``, drawn on the host from ``seed``.

    ``init_weights=True`` and even ``r``: ``r/2`` columns from ``U(±1/sqrt(r/2))`` (PyTorch's
    ``kaiming_uniform_(a=√5)``), each repeated twice in a row (``[a, a, b, b, ...]``), so that
    ``H = (I - 2ââᵀ)² ... = I``: the adapter starts as the identity. Odd ``r``: a
    :class:`PeftMathWarning` (as PEFT warns) and all ``r`` columns drawn, as for ``init_weights=False``
    (``U(±1/sqrt(r))``). The column scale does not matter: the columns are normalised.

    >>> u = init_weights((4, 2), seed=0)
    >>> bool((u[:, 0] == u[:, 1]).all())
    True
    """
    if not isinstance(init_weights, bool):
        raise ConfigError(f"{where}: init_weights must be true or false, got {init_weights!r}")
    if xp is None:
        import array_api_compat.numpy as xp
    n, r = (int(s) for s in shape)
    rng = host_rng(seed)
    if init_weights and r % 2 == 0:
        half = rng.uniform(-1.0, 1.0, (n, r // 2)) * kaiming_uniform_bound(r // 2)
        host = np.repeat(half, 2, axis=1)
    else:
        if init_weights:
            warnings.warn(f"{where}: HRA's symmetric initialisation needs an even r, got r={r}; the reflections are "
                          f"drawn at random, so the adapter does not start as the identity (PEFT warns too)",
                          PeftMathWarning, stacklevel=2)
        host = rng.uniform(-1.0, 1.0, (n, r)) * kaiming_uniform_bound(r)
    out = backend_for(xp).from_host(np.ascontiguousarray(host, dtype=np.float32), xp, device)
    target = dtype if dtype is not None else xp.float32
    return out if out.dtype == target else xp.astype(out, target)


# --------------------------------------------------------------------------------------------------
# The reflections (specs/hra.md, "4. The product of reflections")
# --------------------------------------------------------------------------------------------------
def _zero_column(where: str, j: int, what: str) -> NotInvertibleError:
    return NotInvertibleError(
        f"{where}: column {j} of hra_u {what}, so its reflection is undefined (PEFT divides by a zero norm and "
        f"produces NaN); nothing was changed. Retrain or fix hra_u")


def reflection_factors(u: Array, *, apply_GS: bool = False, dtype: Any = None,
                       where: str = "hra") -> tuple[Array, Array]:
    """``(Y, T)`` with ``H = I - Y T Yᵀ`` (the compact WY form), from ``u`` ``(n, r)``.

    Without ``apply_GS``: ``Y = u / ||u||`` (column-wise) and ``T`` upper triangular from
    ``T₁ = [2]``, ``T_{k+1} = [[T_k, -2 T_k Y_kᵀ y_{k+1}], [0, 2]]``, so that
    ``H = H_1 H_2 ... H_r``. With ``apply_GS``: ``Y = Q`` from modified Gram-Schmidt on the columns in
    order (as PEFT) and ``T = 2I`` (``H = I - 2QQᵀ``). Computed in ``dtype`` (default: float32, float64
    for float64 ``u``). A zero column (or, with ``apply_GS``, a column in the span of the previous ones)
    is a :class:`NotInvertibleError`.

    >>> import numpy as np
    >>> u = np.array([[1.0, 1.0], [0.0, 1.0]])
    >>> Y, T = reflection_factors(u)
    >>> H = np.eye(2) - Y @ T @ Y.T
    >>> H1 = np.eye(2) - 2 * np.outer(Y[:, 0], Y[:, 0]); H2 = np.eye(2) - 2 * np.outer(Y[:, 1], Y[:, 1])
    >>> bool(np.allclose(H, H1 @ H2))
    True
    """
    xp = namespace(u, where=where)
    cd = dtype if dtype is not None else compute_dtype(xp, u.dtype)
    uc = as_compute(xp, u, cd)
    n, r = (int(s) for s in uc.shape)
    if apply_GS:
        qs: list[Array] = []
        for j in range(r):
            v = uc[:, j]
            norm0 = float(xp.linalg.vector_norm(v))
            for q in qs:
                v = v - xp.sum(q * v) * q
            norm = float(xp.linalg.vector_norm(v))
            if not norm > 0 or not math.isfinite(norm) or norm <= 4 * n * float(xp.finfo(cd).eps) * norm0:
                raise _zero_column(where, j, "is zero or lies in the span of the previous columns (apply_GS)")
            qs.append(v / norm)
        Y = xp.stack(qs, axis=1)
        return Y, 2.0 * xp.eye(r, dtype=cd, device=_device(uc))
    norms = xp.linalg.vector_norm(uc, axis=0)
    bad = xp.logical_or(norms == 0, xp.logical_not(xp.isfinite(norms)))
    if bool(xp.any(bad)):
        raise _zero_column(where, int(xp.nonzero(bad)[0][0]), "is zero or not finite")
    Y = uc / norms
    G = xp.matmul(xp.matrix_transpose(Y), Y)  # r×r Gram matrix
    dev = _device(uc)
    cols: list[Array] = []  # column k of T: [-2 T[:k, :k] G[:k, k], 2, 0, ...]
    for k in range(r):
        two = 2.0 * xp.ones((1,), dtype=cd, device=dev)
        zeros = xp.zeros((r - k - 1,), dtype=cd, device=dev)
        if k:
            Tk = xp.stack([c[:k] for c in cols], axis=1)
            cols.append(xp.concat([-2.0 * xp.matmul(Tk, G[:k, k]), two, zeros]))
        else:
            cols.append(xp.concat([two, zeros]))
    return Y, xp.stack(cols, axis=1)


def _device(a: Array) -> Any:
    return array_api_compat.device(a)


def apply_reflections(M: Array, Y: Array, T: Array, *, transpose: bool = False) -> Array:
    """``M H`` (``M Hᵀ`` with ``transpose``) for ``M`` ``(..., n)``, ``H = I - Y T Yᵀ``:
    ``M - ((M Y) T) Yᵀ``, ``O(size(M)·r)``; ``H`` is never formed."""
    xp = namespace(M, Y, T)
    Tm = xp.matrix_transpose(T) if transpose else T
    return M - xp.matmul(xp.matmul(xp.matmul(M, Y), Tm), xp.matrix_transpose(Y))


# --------------------------------------------------------------------------------------------------
# Forward (specs/hra.md, "5. Forward")
# --------------------------------------------------------------------------------------------------
def _first(value: Any) -> Any:
    return value if isinstance(value, (int, str)) else tuple(value)[0]


def forward(
    x: Array,
    weight: Array,
    u: Array,
    *,
    bias: Array | None = None,
    apply_GS: bool = False,
    layer: Layer | LayerKind | str | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int | None = None,
    peft_compat: bool = False,
) -> Array:
    """The unmerged HRA layer: the base layer with the weight ``W H``.

    Linear: ``(x Hᵀ) Wᵀ + b`` (the input reflected, ``O(size(x)·r)``); Conv2d: ``conv(x, W H) + b``.
    Computed in float32 (float64 for float64 inputs), rounded once to ``x``'s dtype; equal to the
    merged layer. ``peft_compat=True`` (Conv2d) uses PEFT's convolution, which takes only
    ``stride[0]`` and ``padding[0]`` for both axes and no dilation (a PEFT quirk: its layer forgets the
    base conv's other settings).

    >>> import numpy as np
    >>> W = np.eye(2); u = np.array([[1.0], [0.0]])     # H = diag(-1, 1)
    >>> forward(np.array([[3.0, 4.0]]), W, u)
    array([[-3.,  4.]])
    """
    xp = namespace(x, weight, u, bias, where="hra.forward")
    lay, kw = Layer.for_weight(layer, weight).for_input(x, "hra.forward", groups=groups, stride=stride,
                                                        padding=padding, dilation=dilation)
    _check_kind(lay, "hra.forward")
    check_shape("hra.forward", _KEY, u, (reflected_dim(lay), int(u.shape[1])))
    cd = compute_dtype(xp, x.dtype, weight.dtype, u.dtype)
    Y, T = reflection_factors(u, apply_GS=apply_GS, dtype=cd, where="hra.forward")
    bc = None if bias is None else as_compute(xp, bias, cd)
    if lay.kind is LayerKind.LINEAR:
        xr = apply_reflections(as_compute(xp, x, cd), Y, T, transpose=True)
        return as_compute(xp, lay.base_forward(xr, as_compute(xp, weight, cd), bc, xp), x.dtype)
    Wh = xp.reshape(apply_reflections(as_compute(xp, xp.reshape(weight, lay.matrix_shape), cd), Y, T),
                    lay.weight_shape)
    if peft_compat:
        kw = dict(stride=_first(kw["stride"]), padding=_first(kw["padding"]), dilation=1)
    return as_compute(xp, conv(as_compute(xp, x, cd), Wh, bc, xp=xp, **kw), x.dtype)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge (specs/hra.md, "6. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def _merge_or_unmerge(weight: Array, u: Array, layer: Any, *, apply_GS: bool, inverse: bool, copy: bool,
                      safe: bool, where: str) -> Array:
    xp = namespace(weight, u, where=where)
    lay = Layer.for_weight(layer, weight)
    _check_kind(lay, where)
    check_shape(where, _KEY, u, (reflected_dim(lay), int(u.shape[1])))
    cd = compute_dtype(xp, weight.dtype, u.dtype)
    Y, T = reflection_factors(u, apply_GS=apply_GS, dtype=cd, where=where)

    def compute() -> Array:
        Wm = as_compute(xp, xp.reshape(weight, lay.matrix_shape), cd)
        return xp.reshape(apply_reflections(Wm, Y, T, transpose=inverse), lay.weight_shape)

    return write_weight(where, weight, compute, copy=copy, safe=safe, xp=xp)


def merge(weight: Array, u: Array, *, apply_GS: bool = False, layer: Any = None, copy: bool = True,
          safe: bool = False) -> Array:
    """``W H`` on the ``(out, n)`` view, in float32 (float64 for float64), rounded once to W's dtype.

    ``copy=False`` writes into ``weight`` (see :mod:`peftmath.methods._base`); ``safe=True`` refuses a
    non-finite result before anything is written.

    >>> import numpy as np
    >>> merge(np.arange(4.0).reshape(2, 2), np.array([[0.0], [2.0]]))   # H = diag(1, -1)
    array([[ 0., -1.],
           [ 2., -3.]])
    """
    return _merge_or_unmerge(weight, u, layer, apply_GS=apply_GS, inverse=False, copy=copy, safe=safe,
                             where="hra.merge")


def unmerge(weight: Array, u: Array, *, apply_GS: bool = False, layer: Any = None, copy: bool = True) -> Array:
    """``W' Hᵀ``, the exact inverse of :func:`merge` (``H`` is orthogonal).

    >>> import numpy as np
    >>> W = np.arange(6.0).reshape(2, 3); u = np.array([[1.0, 0.5], [2.0, -1.0], [0.0, 3.0]])
    >>> bool(np.allclose(unmerge(merge(W, u), u), W))
    True
    """
    return _merge_or_unmerge(weight, u, layer, apply_GS=apply_GS, inverse=True, copy=copy, safe=False,
                             where="hra.unmerge")


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
class HRAModule(ModuleAdapter):
    """HRA on one base module (Linear or Conv2d): ``hra_u`` ``(n, r)``. Multiplicative: no ``ΔW``."""

    peft_type = "HRA"
    additive = False
    supported_kinds = SUPPORTED_KINDS

    @classmethod
    def infer_layer(cls, name: str, config: HRAConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """Linear / Conv2d from the base weight's number of dimensions; without ``weight_shape`` a
        Linear with unknown (0) output size and ``hra_u.shape[0]`` inputs."""
        if kind is not None and LayerKind.parse(kind) not in cls.supported_kinds:
            raise UnsupportedError(f"{name}: HRA does not support {LayerKind.parse(kind).value} layers "
                                   f"(PEFT: Linear, Conv2d)")
        if _KEY not in params:
            raise ShapeError(f"{name}: no {_KEY} among the module's tensors {sorted(params)}")
        if weight_shape is not None:
            return Layer.of(tuple(weight_shape), kind if kind is not None and len(weight_shape) == 2 else None)
        return Layer(LayerKind.LINEAR, (0, int(params[_KEY].shape[0])))

    def validate(self) -> None:
        _check_kind(self.layer, self.name)
        if _KEY not in self.params:
            raise ShapeError(f"{self.name}: missing {_KEY} for a {self.layer.kind.value} layer "
                             f"(found {sorted(self.params)})")
        extra = sorted(set(self.params) - {_KEY})
        if extra:
            raise ShapeError(f"{self.name}: unexpected HRA tensors {extra} (HRA has only {_KEY})")
        self.u = self.params[_KEY]
        check_shape(self.name, _KEY, self.u, parameter_shape(self.layer, self.config.r, where=self.name))

    def describe(self) -> dict[str, Any]:
        return {"r": int(self.u.shape[1]), "apply_GS": self.config.apply_GS}

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        self.layer.check_weight(weight)
        new = _merge_or_unmerge(weight, self.u, self.layer, apply_GS=self.config.apply_GS, inverse=False, copy=copy,
                                safe=safe, where=self.name)
        return MergeResult(new, bias)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        self.layer.check_weight(weight)
        new = _merge_or_unmerge(weight, self.u, self.layer, apply_GS=self.config.apply_GS, inverse=True, copy=copy,
                                safe=False, where=self.name)
        return MergeResult(new, bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, *, peft_compat: bool = False,
                **layer_kwargs: Any) -> Array:
        layer, kw = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.u, bias=bias, apply_GS=self.config.apply_GS, layer=layer,
                       peft_compat=peft_compat, **kw)

    @classmethod
    def initialize(cls, name: str, config: HRAConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """``{"hra_u": ...}`` for module ``name`` (``init`` overrides ``config.init_weights``); the base
        weight is not changed."""
        if xp is None and weight is not None:
            xp = namespace(weight)
        shape = parameter_shape(layer, config.r, where=name)
        u = init_weights(shape, init_weights=config.init_weights if init is None else init, seed=seed, xp=xp,
                         device=device, dtype=dtype, where=name)
        return {_KEY: u}, None


#: checkpoint suffixes of this method's per-module tensors (a ParameterDict entry: no ".weight")
PARAMETER_SUFFIXES = (_KEY,)
Config = HRAConfig
Module = HRAModule
#: demo / documentation examples: row label -> config fields (non-trivial: random reflections)
EXAMPLES = {
    "HRA": dict(r=4, init_weights=False),
    "HRA Gram-Schmidt": dict(r=3, apply_GS=True, init_weights=False),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=HRAConfig, module=HRAModule, spec="specs/hra.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=HRAModule.supported_kinds, rotation=True,
    init_field="init_weights", examples=EXAMPLES,
)
