r"""(IA)³: infused adapter by inhibiting and amplifying inner activations (Liu et al., 2022).

One learned vector ``l`` rescales either the *output* of a layer or, for the layers listed in
``feedforward_modules``, its *input*::

    not feedforward:   y = (x Wᵀ + b) ⊙ l          l: (out, 1)        merge: W ← diag(l) W,  b ← l ⊙ b
    feedforward:       y = (x ⊙ l) Wᵀ + b          l: (1, in)         merge: W ← W diag(l)   (b unchanged)

The scale multiplies the whole output, bias included, so only non-feedforward layers scale the bias.
Merge is a multiplication and unmerge a division: exact in real arithmetic whenever no entry of ``l``
is zero. peftmath refuses to unmerge a zero (or non-finite) scale; PEFT divides by ``l + 1e-8``
(``peft_compat=True``).

=================  ========================  ===========================  ==================================
layer              ``ia3_l`` (feedforward)   ``ia3_l`` (otherwise)        scale in the stored layout
=================  ========================  ===========================  ==================================
Linear (out, in)   ``(1, in)``               ``(out, 1)``                 ``l`` (broadcasts as stored)
Conv1D (in, out)   ``(1, in)``               ``(out, 1)``                 ``lᵀ``
Conv2d/Conv3d      ``(1, C_in, 1, 1[, 1])``  ``(1, C_out, 1, 1[, 1])``    ``l`` / ``lᵀ`` (C_out, 1, 1, 1)
=================  ========================  ===========================  ==================================

A grouped convolution (``groups = g``) with a feedforward vector: output channel ``o`` of group
``⌊o g / C_out⌋`` sees only that group's ``C_in / g`` input channels, so the merge multiplies the
kernel ``(C_out, C_in/g, *k)`` by the group's slice of ``l`` (PEFT 0.21.2 regroups the same way).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._array import all_finite, as_compute, compute_dtype, namespace
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_flags
from ..errors import ConfigError, NonFiniteError, NotInvertibleError, ShapeError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import (MergeResult, ModuleAdapter, in_row_tiles, require_kind, require_writeable, write_back,
                    write_weight)

Array = Any

__all__ = [
    "IA3Config",
    "is_feedforward",
    "parameter_shape",
    "infer_feedforward",
    "weight_scale",
    "init_weights",
    "forward",
    "merge",
    "unmerge",
    "IA3Module",
]

PEFT_TYPE = "IA3"
#: PEFT's ``tolerance`` in the IA3 unmerge (``W / (l + 1e-8)``), used with ``peft_compat=True``
PEFT_UNMERGE_EPS = 1e-8
#: the layer kinds PEFT wraps with IA3 (nn.Linear, transformers Conv1D, nn.Conv2d, nn.Conv3d)
SUPPORTED_KINDS = (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED, LayerKind.CONV2D, LayerKind.CONV3D)


# --------------------------------------------------------------------------------------------------
# Config (specs/ia3.md, 'Config (`peft_type: "IA3"`)')
# --------------------------------------------------------------------------------------------------
@dataclass
class IA3Config(TunerConfig):
    """PEFT's ``IA3Config`` (``peft_type: "IA3"``).

    ``feedforward_modules`` names the modules whose *input* is scaled (see :func:`is_feedforward`).
    PEFT's IA3Config has no ``layers_to_transform`` / ``layers_pattern``; they are left out of the
    written config while unset.
    """

    peft_type: ClassVar[str] = "IA3"

    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_flags(source, self, "fan_in_fan_out", "init_ia3_weights")
        ff = self.feedforward_modules
        if ff is not None and not isinstance(ff, str):
            if not isinstance(ff, (list, tuple, set, frozenset)) or not all(isinstance(t, str) for t in ff):
                raise ConfigError(f"{source}: field 'feedforward_modules' must be a string, a list of strings or null, "
                                  f"got {ff!r}")
        tm = self.target_modules
        if ff is not None and not isinstance(ff, str) and tm is not None and not isinstance(tm, str):
            extra = sorted(set(ff) - set(tm))
            if extra:
                raise ConfigError(
                    f"{source}: feedforward_modules {extra} are not in target_modules {sorted(set(tm))}; "
                    f"PEFT requires feedforward_modules to be a subset of target_modules"
                )
        if isinstance(ff, str):
            try:
                re.compile(ff)
            except re.error as exc:
                raise ConfigError(f"{source}: feedforward_modules {ff!r} is not a valid regex ({exc})") from exc

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in ("layers_to_transform", "layers_pattern"):  # not fields of PEFT's IA3Config
            if out.get(name) is None:
                out.pop(name, None)
        return out

    def is_feedforward(self, module_name: str) -> bool:
        """Whether ``module_name`` is a feedforward module under this config."""
        return is_feedforward(module_name, self.feedforward_modules)


def is_feedforward(module_name: str, feedforward_modules: str | Iterable[str] | None) -> bool:
    """PEFT's rule (``IA3Model._check_target_module_feedforward``).

    A string is a regex that must match the whole name (``re.fullmatch``). A list is a set of plain
    suffixes: ``module_name.endswith(t)`` **without a dot boundary**, so ``"proj"`` also matches
    ``"up_proj"`` (a PEFT quirk, reproduced because it decides what a checkpoint means). ``None``:
    no module is feedforward.

    >>> is_feedforward("model.layers.0.mlp.down_proj", ["down_proj"])
    True
    >>> is_feedforward("model.layers.0.mlp.up_proj", ["p_proj"])     # raw suffix, no dot boundary
    True
    >>> is_feedforward("model.layers.0.mlp.up_proj", r".*\\.down_proj")
    False
    """
    if feedforward_modules is None:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module_name) is not None
    return any(module_name.endswith(t) for t in feedforward_modules)


# --------------------------------------------------------------------------------------------------
# Shapes and feedforward (specs/ia3.md, "Notation and shapes", "Feedforward or not: the picture")
# --------------------------------------------------------------------------------------------------
def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "IA3", SUPPORTED_KINDS, error=ShapeError)


def parameter_shape(layer: Layer, *, feedforward: bool) -> tuple[int, ...]:
    """The shape of ``ia3_l`` on ``layer``.

    >>> parameter_shape(Layer.of((6, 4)), feedforward=False), parameter_shape(Layer.of((6, 4)), feedforward=True)
    ((6, 1), (1, 4))
    >>> parameter_shape(Layer.of((8, 2, 3, 3), groups=2), feedforward=True)   # all 4 input channels
    (1, 4, 1, 1)
    """
    _check_kind(layer, "ia3")
    if layer.kind.is_conv:
        c = layer.in_features if feedforward else layer.out_features
        return (1, c) + (1,) * len(layer.kernel_size)
    return (1, layer.in_features) if feedforward else (layer.out_features, 1)


def infer_feedforward(layer: Layer, l_shape: tuple[int, ...]) -> bool | None:
    """Whether a vector of shape ``l_shape`` scales the input (True) or the output (False) of ``layer``.

    ``None`` when both readings fit (a layer with as many inputs as outputs, and a conv vector);
    :class:`ShapeError` when neither does.

    >>> infer_feedforward(Layer.of((6, 4)), (1, 4)), infer_feedforward(Layer.of((4, 4, 1, 1)), (1, 4, 1, 1)) is None
    (True, True)
    """
    l_shape = tuple(int(s) for s in l_shape)
    fits = [ff for ff in (True, False) if parameter_shape(layer, feedforward=ff) == l_shape]
    if not fits:
        raise ShapeError(
            f"ia3_l of shape {l_shape} fits neither the input scaling {parameter_shape(layer, feedforward=True)} "
            f"nor the output scaling {parameter_shape(layer, feedforward=False)} of a {layer.kind.value} "
            f"{layer.weight_shape}; does the adapter belong to this base model?"
        )
    return fits[0] if len(fits) == 1 else None


def weight_scale(l: Array, layer: Layer, *, feedforward: bool) -> Array:
    """``l`` reshaped to broadcast over the stored weight (ungrouped layers).

    Linear: ``l`` itself; Conv1D: ``lᵀ``; conv: ``l`` (feedforward, scales dim 1) or
    ``(C_out, 1, ...)`` (scales dim 0). A grouped conv with a feedforward vector has no broadcastable
    form (each output group sees its own slice); see :func:`merge`.
    """
    xp = namespace(l)
    if layer.kind is LayerKind.CONV1D_TRANSPOSED:
        return xp.matrix_transpose(l)
    if layer.kind.is_conv and not feedforward:
        return xp.reshape(l, (layer.out_features,) + (1,) * (l.ndim - 1))
    return l


def _group_scales(l: Array, layer: Layer) -> list[tuple[int, int, Array]]:
    """Per output group ``(o0, o1, scale of shape (1, C_in/g, 1, ...))`` for a feedforward conv."""
    xp = namespace(l)
    g = layer.groups
    cin_g = layer.in_features // g
    cout_g = layer.out_features // g
    flat = xp.reshape(l, (-1,))
    ones = (1,) * len(layer.kernel_size)
    return [(i * cout_g, (i + 1) * cout_g, xp.reshape(flat[i * cin_g:(i + 1) * cin_g], (1, cin_g) + ones))
            for i in range(g)]


def _check(layer: Layer, l: Array, feedforward: bool, where: str) -> None:
    _check_kind(layer, where)
    expected = parameter_shape(layer, feedforward=feedforward)
    if tuple(l.shape) != expected:
        kind = "feedforward (input)" if feedforward else "output"
        raise ShapeError(
            f"{where}: ia3_l has shape {tuple(l.shape)}, expected {expected} for {kind} scaling of a "
            f"{layer.kind.value} {layer.weight_shape}; does the adapter belong to this base model?"
        )


def _resolve(layer: Layer | LayerKind | str | None, weight: Array, l: Array, feedforward: bool | None,
             where: str) -> tuple[Layer, bool]:
    lay = Layer.for_weight(layer, weight)
    if feedforward is None:
        feedforward = infer_feedforward(lay, tuple(l.shape))
        if feedforward is None:
            raise ShapeError(f"{where}: ia3_l {tuple(l.shape)} fits both input and output scaling of "
                             f"{lay.weight_shape}; pass feedforward=True or False")
    _check(lay, l, feedforward, where)
    return lay, feedforward


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/ia3.md, "Initialisation (`init_ia3_weights`)")
# --------------------------------------------------------------------------------------------------
def init_weights(layer: Layer, *, feedforward: bool, init_ia3_weights: bool = True,
                 seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                 dtype: Any = None) -> Array:
    """``ia3_l`` for ``layer``: ones (``init_ia3_weights=True``, the identity) or ``N(0, 1)`` draws.

    Draws are made on the host with ``numpy.random.default_rng(seed)`` (PEFT uses ``torch.randn``;
    the distribution is the same, the numbers are not).

    >>> init_weights(Layer.of((3, 2)), feedforward=False).tolist()
    [[1.0], [1.0], [1.0]]
    """
    if xp is None:
        import array_api_compat.numpy as xp
    shape = parameter_shape(layer, feedforward=feedforward)
    host = np.ones(shape) if init_ia3_weights else host_rng(seed).standard_normal(shape)
    out = backend_for(xp).from_host(np.ascontiguousarray(host, dtype=np.float32), xp, device)
    target = dtype if dtype is not None else xp.float32
    return out if out.dtype == target else xp.astype(out, target)


# --------------------------------------------------------------------------------------------------
# Forward (specs/ia3.md, "Forward")
# --------------------------------------------------------------------------------------------------
def forward(
    x: Array,
    W: Array,
    l: Array,
    *,
    bias: Array | None = None,
    feedforward: bool | None = None,
    layer: Layer | LayerKind | str | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int | None = None,
    peft_compat: bool = False,
) -> Array:
    """The unmerged adapted layer.

    ============== ===============================================  ===================================
    feedforward    ``base(x ⊙ l)``                                   x ``(..., in)`` or ``(N, C_in, ...)``
    otherwise      ``base(x) ⊙ l`` (the bias is scaled too)          output ``(..., out)`` / ``(N, C_out, ...)``
    ============== ===============================================  ===================================

    The default computes in float32 (float64 for float64 inputs) and rounds once to the output dtype
    (the result type of ``x`` and ``W``). ``peft_compat=True`` follows PEFT's order: the scaled input
    is rounded to ``x``'s dtype before the base layer (feedforward), or the base output is computed
    in the storage dtype and then scaled. ``feedforward=None`` infers it from ``l``'s shape.

    ``stride``, ``padding``, ``dilation``, ``groups``: the base conv's, described once in
    :mod:`peftmath.layers` ("Conv keywords"); ``groups`` is inferred from ``x`` (a feedforward
    ``ia3_l`` spans all input channels of a grouped conv).

    >>> import numpy as np
    >>> W = np.eye(2, dtype=np.float32); b = np.ones(2, dtype=np.float32)
    >>> l = np.array([[2.0], [3.0]], dtype=np.float32)           # (out, 1): output scaling
    >>> forward(np.array([[1.0, 1.0]], dtype=np.float32), W, l, bias=b)
    array([[4., 6.]], dtype=float32)
    """
    xp = namespace(x, W, l, bias, where="ia3.forward")
    lay = Layer.for_weight(layer, W)
    channels = int(l.shape[1]) if feedforward and lay.kind.is_conv and l.ndim > 1 else None
    lay, conv_kwargs = lay.for_input(x, "ia3.forward", groups=groups, channels=channels, stride=stride,
                                     padding=padding, dilation=dilation)
    lay, ff = _resolve(lay, W, l, feedforward, "ia3.forward")
    lay.check_bias(bias)
    out_dtype = xp.result_type(x.dtype, W.dtype)
    cd = compute_dtype(xp, x.dtype, W.dtype, l.dtype)
    if lay.kind.is_conv:
        vec = xp.reshape(as_compute(xp, l, cd), (1, -1) + (1,) * len(lay.kernel_size))
    else:
        vec = xp.reshape(as_compute(xp, l, cd), (-1,))
    Wc = as_compute(xp, W, cd)
    bc = None if bias is None else as_compute(xp, bias, cd)
    xc = as_compute(xp, x, cd)
    if peft_compat:
        # PEFT: the base layer runs in the storage dtype (one rounding of its float32-accumulated
        # output), and the scaled input / the scaled output is rounded again
        if ff:  # PEFT rounds the scaled input to x's dtype (Linear) or to the weight's dtype (conv)
            xs = as_compute(xp, as_compute(xp, xc * vec, W.dtype if lay.kind.is_conv else x.dtype), cd)
            return as_compute(xp, lay.base_forward(xs, Wc, bc, xp, **conv_kwargs), out_dtype)
        y = as_compute(xp, as_compute(xp, lay.base_forward(xc, Wc, bc, xp, **conv_kwargs), out_dtype), cd)
        return as_compute(xp, y * vec, out_dtype)
    if ff:
        y = lay.base_forward(xc * vec, Wc, bc, xp, **conv_kwargs)
    else:
        y = lay.base_forward(xc, Wc, bc, xp, **conv_kwargs) * vec
    return as_compute(xp, y, out_dtype)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge (specs/ia3.md, "Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def _check_invertible(l: Array, where: str) -> None:
    """Refuse a zero or non-finite entry of ``l`` (the division would not undo the merge)."""
    xp = namespace(l)
    flat = xp.reshape(l, (-1,))
    bad = xp.logical_or(flat == 0, xp.logical_not(xp.isfinite(flat)))
    if bool(xp.any(bad)):
        idx = int(xp.nonzero(bad)[0][0])
        value = float(flat[idx])
        raise NotInvertibleError(
            f"{where}: ia3_l[{idx}] = {value!r} (flat index, ia3_l shape {tuple(l.shape)}); a zero or non-finite "
            f"scale cannot be divided out, so the original weight is lost. Nothing was changed. Keep the unmerged "
            f"weight instead, or use peft_compat=True to divide by (l + 1e-8) as PEFT does"
        )


def _apply(
    W: Array,
    l: Array,
    bias: Array | None,
    *,
    inverse: bool,
    layer: Layer,
    feedforward: bool,
    copy: bool,
    safe: bool,
    peft_compat: bool,
    where: str,
) -> tuple[Array, Array | None]:
    xp = namespace(W, l, bias, where=where)
    scales_bias = not feedforward and bias is not None
    if not copy:  # both arrays checked before either is written
        require_writeable(where, W)
        if scales_bias:
            require_writeable(where, bias, "bias")
    cd = compute_dtype(xp, W.dtype, l.dtype)
    if inverse:
        if peft_compat:  # PEFT: W / (l + 1e-8), the sum formed in l's own dtype
            l = l + PEFT_UNMERGE_EPS
        else:
            _check_invertible(l, where)
    lc = as_compute(xp, l, cd)

    def op(block: Array, s: Array) -> Array:
        return block / s if inverse else block * s

    new_bias = bias
    if scales_bias:
        b = op(as_compute(xp, bias, compute_dtype(xp, bias.dtype, l.dtype)), xp.reshape(
            as_compute(xp, l, compute_dtype(xp, bias.dtype, l.dtype)), (-1,)))
        new_bias = as_compute(xp, b, bias.dtype)
        if safe and not all_finite(new_bias, xp=xp):
            raise NonFiniteError(f"{where}: the merged bias would contain NaN or infinity; nothing was changed")

    grouped = layer.kind.is_conv and feedforward and layer.groups > 1
    if grouped:
        blocks = [(o0, o1, as_compute(xp, s, cd)) for o0, o1, s in _group_scales(l, layer)]
    else:
        blocks = [(0, layer.weight_shape[0], weight_scale(lc, layer, feedforward=feedforward))]

    def scale_rows(s: Array, o0: int, o1: int) -> Array:
        # the scale restricted to rows o0:o1 of the stored weight (only the output scales vary by row)
        if grouped or s.shape[0] == 1:
            return s
        return s[o0:o1, ...]

    def compute() -> Array:
        if grouped:
            return xp.concat([op(as_compute(xp, W[o0:o1, ...], cd), s) for o0, o1, s in blocks], axis=0)
        return op(as_compute(xp, W, cd), blocks[0][2])

    def kernel(Wt: Array) -> bool:
        # in place on the caller's array (elementwise: any layout), no temporary of W's size: the
        # backend's fused pass (CuPy: one kernel, any dtype), else block by block on W itself, or for a
        # half-precision W on float32 row tiles rounded once (in_row_tiles)
        if not grouped and backend_for(xp).scale_(Wt, blocks[0][2], inverse):
            return True

        def update(T: Array, r0: int, r1: int) -> None:
            for o0, o1, s in blocks:
                a, b = max(o0, r0), min(o1, r1)
                if a >= b:
                    continue
                if (a, b) == (r0, r1):
                    if inverse:
                        T /= scale_rows(s, a, b)
                    else:
                        T *= scale_rows(s, a, b)
                else:
                    T[a - r0:b - r0, ...] = op(T[a - r0:b - r0, ...], scale_rows(s, a, b))

        in_row_tiles(xp, Wt, cd, update)
        return True

    # copy=True: in full precision ``compute`` writes the product into one new array in one pass (cheaper
    # than a copy plus the kernel); a half-precision W takes the kernel's float32 row tiles on a private
    # copy instead (no float32 temporary of W's size)
    new = write_weight(where, W, compute, kernel=kernel, copy=copy, safe=safe, kernel_on_copy=W.dtype != cd, xp=xp)
    if not copy and scales_bias:
        new_bias = write_back(where, bias, new_bias)
    return new, new_bias


def merge(
    W: Array,
    l: Array,
    *,
    bias: Array | None = None,
    feedforward: bool | None = None,
    layer: Layer | LayerKind | str | None = None,
    copy: bool = True,
    safe: bool = False,
) -> tuple[Array, Array | None]:
    """``W ⊙ scale`` (and ``b ⊙ l`` for output scaling): returns ``(new weight, new bias)``.

    The product is formed in float32 (float64 for float64) and rounded once to W's dtype, which is
    also what PEFT computes (``peft_compat`` has nothing to change here). ``copy=False`` multiplies
    ``W`` in place without a temporary of its size (half-precision weights go through float32 row
    tiles) and writes the scaled bias into ``bias`` (both are checked before either is written, see
    :mod:`peftmath.methods._base`). ``safe=True`` refuses a non-finite result and changes nothing.

    >>> import numpy as np
    >>> W = np.arange(6, dtype=np.float32).reshape(2, 3)
    >>> l = np.array([[1.0, 10.0, 100.0]], dtype=np.float32)        # (1, in): feedforward
    >>> merge(W, l, copy=False)[0] is W, W
    (True, array([[  0.,  10., 200.],
           [  3.,  40., 500.]], dtype=float32))
    """
    lay, ff = _resolve(layer, W, l, feedforward, "ia3.merge")
    lay.check_bias(bias)
    return _apply(W, l, bias, inverse=False, layer=lay, feedforward=ff, copy=copy, safe=safe, peft_compat=False,
                  where="ia3.merge")


def unmerge(
    W: Array,
    l: Array,
    *,
    bias: Array | None = None,
    feedforward: bool | None = None,
    layer: Layer | LayerKind | str | None = None,
    copy: bool = True,
    peft_compat: bool = False,
) -> tuple[Array, Array | None]:
    """``W / scale`` (and ``b / l`` for output scaling), the inverse of :func:`merge`.

    The default divides by ``l`` itself and raises :class:`~peftmath.errors.NotInvertibleError`
    (naming the entry) when ``l`` has a zero or non-finite entry; nothing is changed then.
    ``peft_compat=True`` divides by ``l + 1e-8`` (formed in ``l``'s dtype) as PEFT does, and refuses
    nothing.

    >>> import numpy as np
    >>> W = np.array([[2.0, 4.0]], dtype=np.float32); l = np.array([[2.0]], dtype=np.float32)
    >>> unmerge(W, l)[0]
    array([[1., 2.]], dtype=float32)
    >>> unmerge(W, np.zeros((1, 1), dtype=np.float32))
    Traceback (most recent call last):
    ...
    peftmath.errors.NotInvertibleError: ia3.unmerge: ia3_l[0] = 0.0 (flat index, ia3_l shape (1, 1)); ...
    """
    lay, ff = _resolve(layer, W, l, feedforward, "ia3.unmerge")
    lay.check_bias(bias)
    return _apply(W, l, bias, inverse=True, layer=lay, feedforward=ff, copy=copy, safe=False,
                  peft_compat=peft_compat, where="ia3.unmerge")


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
class IA3Module(ModuleAdapter):
    """(IA)³ on one base module: ``ia3_l`` and whether it scales the input (feedforward)."""

    peft_type = "IA3"
    additive = False
    supported_kinds = SUPPORTED_KINDS

    @classmethod
    def initialize(cls, name: str, config: IA3Config, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """``{"ia3_l": ...}`` for module ``name`` (feedforward from ``config.feedforward_modules``);
        ``init`` overrides ``config.init_ia3_weights``. The base weight is not changed."""
        if xp is None and weight is not None:
            xp = namespace(weight)
        ff = config.is_feedforward(name)
        flag = config.init_ia3_weights if init is None else init
        if not isinstance(flag, bool):
            raise ConfigError(f"{name}: init_ia3_weights must be true or false, got {flag!r}")
        l = init_weights(layer, feedforward=ff, init_ia3_weights=flag, seed=seed, xp=xp, device=device, dtype=dtype)
        return {"ia3_l": l}, None

    @classmethod
    def infer_layer(cls, name: str, config: IA3Config, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """The layer from the base weight shape and ``ia3_l``'s shape.

        A 2-D weight ``(a, b)`` is a Linear or a transformers Conv1D; ``ia3_l``'s shape tells which
        (``(1, b)``/``(a, 1)``: Linear, ``(1, a)``/``(b, 1)``: Conv1D). When both fit (a square
        weight) ``kind`` decides, else the config's ``fan_in_fan_out``. A conv's groups follow from
        ``ia3_l`` only when it scales the input; pass ``kind`` and groups through a Layer otherwise.
        """
        if "ia3_l" not in params:
            raise ShapeError(f"{name}: no ia3_l among the parameters {sorted(params)}")
        if weight_shape is None:
            raise ShapeError(
                f"{name}: IA3 stores one vector per module, which does not determine the base layer; "
                f"pass the base weight shape (weight_shape=...)"
            )
        shape = tuple(int(s) for s in weight_shape)
        l_shape = tuple(int(s) for s in params["ia3_l"].shape)
        if len(shape) != 2:
            layer = Layer.of(shape, kind)
            if layer.kind.is_conv and len(l_shape) == len(shape) and shape[1]:
                c = l_shape[1]
                # C_in = groups * shape[1]: a vector over more channels than shape[1] that is not an
                # output scaling (or that the config calls feedforward) scales a grouped conv's input
                if c != shape[1] and c % shape[1] == 0 and (c != shape[0] or config.is_feedforward(name)):
                    groups = c // shape[1]
                    if shape[0] % groups == 0:
                        layer = Layer.of(shape, kind, groups=groups)
            return layer
        if kind is not None:
            return Layer.of(shape, kind)
        candidates = []
        for k in (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED):
            lay = Layer(k, shape)
            if l_shape in (parameter_shape(lay, feedforward=True), parameter_shape(lay, feedforward=False)):
                candidates.append(lay)
        if len(candidates) == 1:
            return candidates[0]
        return Layer(LayerKind.CONV1D_TRANSPOSED if config.fan_in_fan_out else LayerKind.LINEAR, shape)

    def scaled(self, c: float) -> "ModuleAdapter":
        """Scale ``c``: ``l → 1 + c·(l − 1)`` (``c = 0``: the identity, ``c = 1``: the adapter), computed in
        ``l``'s dtype. PEFT has no IA3 scale; this definition, peftmath's, interpolates the vector toward 1."""
        if c == 1.0:
            return self
        return self.scale_parameter("ia3_l", lambda l: 1 + c * (l - 1))

    def validate(self) -> None:
        if "ia3_l" not in self.params:
            raise ShapeError(f"{self.name}: missing ia3_l for a {self.layer.kind.value} layer")
        unknown = sorted(set(self.params) - {"ia3_l"})
        if unknown:
            raise ShapeError(f"{self.name}: unexpected IA3 parameters {unknown} (IA3 has only ia3_l)")
        _check_kind(self.layer, self.name)
        self.l = self.params["ia3_l"]
        by_shape = infer_feedforward(self.layer, tuple(self.l.shape))
        try:
            by_config = self.config.is_feedforward(self.name)
        except re.error as exc:
            raise ConfigError(f"{self.name}: feedforward_modules is not a valid regex ({exc})") from exc
        if by_shape is not None and by_shape != by_config:
            said = "is" if by_config else "is not"
            found = "input (feedforward)" if by_shape else "output (non-feedforward)"
            raise ShapeError(
                f"{self.name}: ia3_l of shape {tuple(self.l.shape)} is an {found} scaling of the "
                f"{self.layer.kind.value} {self.layer.weight_shape}, but the module {said} matched by "
                f"feedforward_modules={self.config.feedforward_modules!r}; fix feedforward_modules in "
                f"adapter_config.json"
            )
        self.feedforward = by_config if by_shape is None else by_shape
        _check(self.layer, self.l, self.feedforward, self.name)
        if self.feedforward and self.layer.kind.is_conv:
            self.input_channels = int(self.l.shape[1])  # a feedforward vector spans every input channel

    def changes_bias(self) -> bool:
        return not self.feedforward

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        self.layer.check_weight(weight)
        self.layer.check_bias(bias)
        w, b = _apply(weight, self.l, bias, inverse=False, layer=self.layer, feedforward=self.feedforward, copy=copy,
                      safe=safe, peft_compat=peft_compat, where=self.name)
        return MergeResult(w, b)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        self.layer.check_weight(weight)
        self.layer.check_bias(bias)
        w, b = _apply(weight, self.l, bias, inverse=True, layer=self.layer, feedforward=self.feedforward, copy=copy,
                      safe=False, peft_compat=peft_compat, where=self.name)
        return MergeResult(w, b)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        """The unmerged forward; the conv keywords (``groups`` inferred from ``x``, which an output scaling
        cannot tell) are described in :mod:`peftmath.layers`."""
        layer, kw = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.l, bias=bias, feedforward=self.feedforward, layer=layer, **kw)


#: checkpoint suffixes of this method's per-module tensors (a ParameterDict entry: no ".weight")
PARAMETER_SUFFIXES = ("ia3_l",)
Config = IA3Config
Module = IA3Module
#: demo / documentation examples: row label -> config fields (non-trivial: random scales, a feedforward module)
EXAMPLES = {
    "IA3": dict(init_ia3_weights=False),
    "IA3 (feedforward)": dict(init_ia3_weights=False, feedforward_modules=["fc_out", "conv1x1"]),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=IA3Config, module=IA3Module, spec="specs/ia3.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=IA3Module.supported_kinds, scale=True,
    init_field="init_ia3_weights", examples=EXAMPLES, combine="scale",
)
