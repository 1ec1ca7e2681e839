r"""LoKr: low-rank Kronecker product adaptation (LyCORIS; Yeh et al., 2023).

The update of a frozen weight ``W`` is a Kronecker product of a small factor ``w1`` and a larger
factor ``w2``, either of which may itself be a rank-``r`` product::

    ΔW = s · kron(w1, w2)      w1: (a, c)          w2: (b, d[, k...])
    s  = alpha / r             (always, even when both factors are full matrices)
    out = a·b,  in_flat = c·d  (·Πk for a conv)

so that ``ΔW[i·b + j, p·d + q] = s · w1[i, p] · w2[j, q]``. The factor sizes come from
:func:`factorization` (PEFT's rule, reproduced exactly): ``(a, b) = factorization(out, f)`` and
``(c, d) = factorization(in / groups, f)`` with ``f = decompose_factor``.

Which tensors exist (PEFT's keys, no ``.weight``):

* ``w1``: ``lokr_w1 (a, c)``, or ``lokr_w1_a (a, r)`` and ``lokr_w1_b (r, c)`` when
  ``decompose_both`` and ``r < max(a, c) / 2``;
* ``w2``: ``lokr_w2 (b, d[, *k])`` when ``r >= max(b, d) / 2``; otherwise for an effective conv
  (``use_effective_conv2d`` and a kernel that is not all ones) ``lokr_t2 (r, r, kH, kW)`` (Conv1d:
  ``(r, r, k, 1)``), ``lokr_w2_a (r, b)``, ``lokr_w2_b (r, d)``; otherwise ``lokr_w2_a (b, r)`` and
  ``lokr_w2_b (r, d·Πk)``.

**Conv1d quirk.** With a full ``lokr_w2`` of shape ``(b, d, k)`` PEFT takes ``kron`` of the 2-D ``w1`` and
the 3-D ``w2`` (``w1`` is padded to ``(1, a, c)``) and reshapes the ``(b, a·d, c·k)`` result to
``(a·b, c·d, k)``; peftmath reproduces this layout because it defines what such a checkpoint means:
``ΔW[j·a + i, q·c + p, t] = s · w1[i, p] · w2[j, q, t]`` (the roles of the row factors swap).

Merge ``W ± ΔW`` never materialises ``kron(w1, w2)``: W's matrix view is updated in row blocks, each
block a broadcast outer product ``w1[:, None, :, None] · w2[None, :, None, :]`` of a few rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import numpy as np

from .._array import as_compute, common_device, compute_dtype, kron, namespace
from ..backends import host_rng
from ..config import check_choice, check_flags
from ..errors import ConfigError, ShapeError
from ..layers import Layer, LayerKind
from ._base import MergeResult, ModuleAdapter, check_shape
from ._contract import Method
from ._lycoris import (
    SUPPORTED, LycorisConfig, adapted_forward, apply_row_blocks, block_rows, check_kind, cp_weight, default_xp,
    draw_dropout, kaiming, masked, put_host, rank_dropout_mask, round_to_dtype, scaling, uses_effective_conv,
)

Array = Any

__all__ = [
    "LoKrConfig",
    "factorization",
    "LoKrGeometry",
    "geometry",
    "parameter_shapes",
    "kron_factors",
    "delta_weight",
    "forward",
    "merge",
    "unmerge",
    "init_weights",
    "LoKrModule",
    "scaling",
    "rank_dropout_mask",
]

PEFT_TYPE = "LOKR"


# --------------------------------------------------------------------------------------------------
# Config (specs/lokr.md, "4. Configuration, scaling, initialisation")
# --------------------------------------------------------------------------------------------------
@dataclass
class LoKrConfig(LycorisConfig):
    """PEFT's ``LoKrConfig`` (``peft_type: "LOKR"``): fields, names and defaults as in PEFT 0.21.2."""

    peft_type: ClassVar[str] = "LOKR"

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | str = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_choice(source, "init_weights", self.init_weights, (True, False, "lycoris"))
        check_flags(source, self, "decompose_both", "rank_dropout_scale")
        f = self.decompose_factor
        if not isinstance(f, int) or isinstance(f, bool):
            raise ConfigError(f"{source}: field 'decompose_factor' must be an integer (-1: near the square root), "
                              f"got {f!r}")


# --------------------------------------------------------------------------------------------------
# Factorization and shapes (specs/lokr.md, "2. Factorization (PEFT's rule, exactly)", "3. Which tensors exist")
# --------------------------------------------------------------------------------------------------
def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS') ``factorization(dim, factor)``: ``(m, n)`` with ``m · n = dim``.

    * ``factor > 0`` dividing ``dim``: ``(factor, dim // factor)``, **not** reordered.
    * otherwise (``factor = -1`` means ``dim``): walk the divisors ``m`` of ``dim`` upwards from 1 while
      ``m < n = dim / m``, stopping before a divisor larger than ``factor``; then order so that
      ``m ≤ n``. (PEFT also stops when ``m + n`` exceeds ``1 + dim``, which never happens.)

    >>> [factorization(256), factorization(128), factorization(127)]
    [(16, 16), (8, 16), (1, 127)]
    >>> [factorization(128, 4), factorization(128, 3), factorization(128, 32)]
    [(4, 32), (2, 64), (32, 4)]
    """
    dim, factor = int(dim), int(factor)
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    if factor == -1:
        factor = dim
    m, n = 1, dim
    length = m + n  # computed once, never updated: the test below on it never fires
    while m < n:
        new_m = m + 1
        while dim % new_m != 0:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        m, n = n, m
    return m, n


@dataclass(frozen=True)
class LoKrGeometry:
    """The Kronecker structure of LoKr on one layer: ``out = a·b``, ``in/groups = c·d``, the kernel, and
    which tensors exist (``use_w1``, ``use_w2``, ``effective``)."""

    a: int
    b: int
    c: int
    d: int
    kernel: tuple[int, ...]
    r: int
    use_w1: bool
    use_w2: bool
    effective: bool
    kind: LayerKind

    @property
    def quirk(self) -> bool:
        """PEFT's Conv1d full-``w2`` layout (``kron`` of a 2-D and a 3-D array, then a reshape)."""
        return self.kind is LayerKind.CONV1D and self.use_w2


def geometry(layer: Layer, r: int, *, decompose_both: bool = False, decompose_factor: int = -1,
             use_effective_conv2d: bool = False) -> LoKrGeometry:
    """PEFT's ``LoKrLayer.update_layer`` shape rules for ``layer``.

    >>> g = geometry(Layer.of((128, 256)), 4)
    >>> (g.a, g.b, g.c, g.d, g.use_w1, g.use_w2)
    (8, 16, 16, 16, True, False)
    """
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"LoKr rank r must be a positive integer, got {r!r}")
    out, c_in = layer.weight_shape[0], layer.weight_shape[1]
    a, b = factorization(out, decompose_factor)
    c, d = factorization(c_in, decompose_factor)
    use_w1 = not (decompose_both and r < max(a, c) / 2)
    use_w2 = not (r < max(b, d) / 2)
    effective = uses_effective_conv(layer, use_effective_conv2d)
    return LoKrGeometry(a, b, c, d, tuple(layer.kernel_size), r, use_w1, use_w2, effective, layer.kind)


def parameter_shapes(g: LoKrGeometry) -> dict[str, tuple[int, ...]]:
    """Checkpoint suffix -> shape of the LoKr tensors of geometry ``g``.

    >>> parameter_shapes(geometry(Layer.of((128, 256)), 4))
    {'lokr_w1': (8, 16), 'lokr_w2_a': (16, 4), 'lokr_w2_b': (4, 16)}
    >>> parameter_shapes(geometry(Layer.of((128, 256)), 8))   # r >= max(b, d) / 2: a full w2
    {'lokr_w1': (8, 16), 'lokr_w2': (16, 16)}
    """
    r, k = g.r, g.kernel
    shapes: dict[str, tuple[int, ...]] = {}
    if g.use_w1:
        shapes["lokr_w1"] = (g.a, g.c)
    else:
        shapes["lokr_w1_a"] = (g.a, r)
        shapes["lokr_w1_b"] = (r, g.c)
    if g.use_w2:
        shapes["lokr_w2"] = (g.b, g.d, *k)
    elif g.effective:
        shapes["lokr_w2_a"] = (r, g.b)
        shapes["lokr_w2_b"] = (r, g.d)
        shapes["lokr_t2"] = (r, r, *(k if len(k) == 2 else (k[0], 1)))
    else:
        shapes["lokr_w2_a"] = (g.b, r)
        shapes["lokr_w2_b"] = (r, g.d * math.prod(k))
    return shapes


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/lokr.md, "4. Configuration, scaling, initialisation")
# --------------------------------------------------------------------------------------------------
def init_weights(g: LoKrGeometry, *, init_weights: bool | str = True, seed: int | np.random.Generator | None = 0,
                 xp: Any = None, device: Any = None, dtype: Any = None) -> dict[str, Array]:
    """PEFT's LoKr initialisations, drawn on the host from ``seed`` (Kaiming-uniform a=√5 is
    ``U(±1/sqrt(fan_in))``, ``fan_in = prod(shape[1:])``).

    =============  ==========================================================  ==================
    ``True``       ``lokr_w1 = 0`` (or ``lokr_w1_a = 0``); the rest Kaiming      ΔW = 0
    ``"lycoris"``  ``lokr_w2 = 0`` (or ``lokr_w2_b = 0``); the rest Kaiming      ΔW = 0
    ``False``      everything Kaiming                                          ΔW ≠ 0
    =============  ==========================================================  ==================

    >>> p = init_weights(geometry(Layer.of((64, 64)), 2), seed=0)
    >>> {k: float(abs(v).max()) == 0.0 for k, v in sorted(p.items())}
    {'lokr_w1': True, 'lokr_w2_a': False, 'lokr_w2_b': False}
    """
    if not (init_weights is True or init_weights is False or init_weights == "lycoris"):
        raise ConfigError(f"LoKr init_weights must be true, false or 'lycoris', got {init_weights!r}")
    xp = xp or default_xp()
    rng = host_rng(seed)
    zero = set()
    if init_weights == "lycoris":
        zero = {"lokr_w2", "lokr_w2_b"}
    elif init_weights is True:
        zero = {"lokr_w1", "lokr_w1_a"}
    host = {}
    for key, shape in parameter_shapes(g).items():
        host[key] = np.zeros(shape) if key in zero else kaiming(rng, shape)
    return put_host(host, xp, device, dtype)


# --------------------------------------------------------------------------------------------------
# Delta weight (specs/lokr.md, "5. Delta weight")
# --------------------------------------------------------------------------------------------------
def kron_factors(params: dict[str, Array], *, dtype: Any = None, peft_compat: bool = False) -> tuple[Array, Array]:
    """``(w1, w2)``: the full Kronecker factors from whichever tensors ``params`` holds.

    ``w1 = lokr_w1`` or ``lokr_w1_a @ lokr_w1_b`` (``(a, c)``); ``w2 = lokr_w2``, or
    ``lokr_w2_a @ lokr_w2_b`` (``(b, d·Πk)``), or the CP form ``cp_weight(lokr_t2, lokr_w2_a, lokr_w2_b)``
    (``(b, d, kH, kW)``). Computed in ``dtype`` (default float32/float64); ``peft_compat=True`` rounds
    each product to half-precision tensors' dtype as PEFT does.
    """
    xp = namespace(*params.values(), where="lokr")
    cd = dtype or compute_dtype(xp, *(a.dtype for a in params.values()))
    rnd = xp.result_type(*(a.dtype for a in params.values())) if peft_compat else None

    def c(key: str) -> Array:
        return as_compute(xp, params[key], cd)

    if "lokr_w1" in params:
        w1 = c("lokr_w1")
    else:
        w1 = round_to_dtype(xp, xp.matmul(c("lokr_w1_a"), c("lokr_w1_b")), rnd)
    if "lokr_w2" in params:
        w2 = c("lokr_w2")
    elif "lokr_t2" in params:
        w2 = round_to_dtype(xp, cp_weight(c("lokr_t2"), c("lokr_w2_a"), c("lokr_w2_b")), rnd)
    else:
        w2 = round_to_dtype(xp, xp.matmul(c("lokr_w2_a"), c("lokr_w2_b")), rnd)
    return w1, w2


def make_kron(w1: Array, w2: Array, *, scaling: float, peft_compat: bool = False, round_to: Any = None) -> Array:
    """``s · kron(w1, w2)`` with PEFT's shape rule: a 4-D ``w2`` turns ``w1`` into ``(a, c, 1, 1)``; a 3-D
    ``w2`` (Conv1d, full) keeps ``w1`` 2-D, which ``kron`` pads to ``(1, a, c)`` (the layout quirk).

    >>> import numpy as np
    >>> make_kron(np.array([[1.0, 2.0]]), np.array([[1.0], [10.0]]), scaling=0.5)
    array([[ 0.5,  1. ],
           [ 5. , 10. ]])
    """
    xp = namespace(w1, w2, where="lokr.make_kron")
    if w2.ndim == 4:
        w1 = xp.reshape(w1, (w1.shape[0], w1.shape[1], 1, 1))
    k = kron(w1, w2, xp=xp)
    if peft_compat:
        k = round_to_dtype(xp, k, round_to)
    return round_to_dtype(xp, k * scaling, round_to) if peft_compat else k * scaling


def _check_params(where: str, layer: Layer, params: dict[str, Array], g: LoKrGeometry) -> None:
    expected = parameter_shapes(g)
    if set(params) != set(expected):
        raise ShapeError(
            f"{where}: LoKr tensors {sorted(params)} do not match what PEFT creates for a {layer.kind.value} "
            f"{layer.weight_shape} with r={g.r} (factors out {layer.weight_shape[0]} = {g.a}·{g.b}, "
            f"in {layer.weight_shape[1]} = {g.c}·{g.d}): expected {sorted(expected)}; check r / rank_pattern, "
            f"decompose_both, decompose_factor and use_effective_conv2d"
        )
    for key, shape in expected.items():
        check_shape(where, key, params[key], shape)


def _geometry_from_params(where: str, layer: Layer, params: dict[str, Array]) -> LoKrGeometry:
    """The geometry implied by the tensors themselves (functional API, no config)."""
    check_kind(layer, where, "LoKr")
    out, c_in = layer.weight_shape[0], layer.weight_shape[1]
    k = tuple(layer.kernel_size)
    if "lokr_w1" in params:
        a, c = params["lokr_w1"].shape[:2]
        r1 = None
    elif "lokr_w1_a" in params and "lokr_w1_b" in params:
        a, c = params["lokr_w1_a"].shape[0], params["lokr_w1_b"].shape[-1]
        r1 = params["lokr_w1_a"].shape[-1]
    else:
        raise ShapeError(f"{where}: no lokr_w1 or lokr_w1_a/lokr_w1_b among {sorted(params)}")
    if a == 0 or c == 0 or out % a or c_in % c:
        raise ShapeError(
            f"{where}: the Kronecker factor w1 of shape ({a}, {c}) does not divide the {layer.kind.value} weight "
            f"{layer.weight_shape}: out {out} and in {c_in} must be multiples of {a} and {c}"
        )
    b, d = out // a, c_in // c
    use_w2 = "lokr_w2" in params
    effective = "lokr_t2" in params
    if use_w2:
        r = r1 or 1
    elif "lokr_w2_a" in params:
        r = params["lokr_w2_a"].shape[0] if effective else params["lokr_w2_a"].shape[-1]
    else:
        raise ShapeError(f"{where}: no lokr_w2 or lokr_w2_a/lokr_w2_b among {sorted(params)}")
    if r1 is not None and r1 != r:
        raise ShapeError(f"{where}: lokr_w1_a has rank {r1} but lokr_w2_a has rank {r}")
    return LoKrGeometry(int(a), int(b), int(c), int(d), k, int(r), r1 is None, use_w2, effective, layer.kind)


def _resolve_layer(layer: Any, params: dict[str, Array], weight: Array | None = None, groups: int = 1) -> Layer:
    if isinstance(layer, Layer):
        return layer
    if weight is not None:
        return Layer.of(tuple(weight.shape), layer, groups=groups)
    kind = LayerKind.parse(layer) if layer is not None else None
    if kind is None or kind is LayerKind.LINEAR:
        if any(a.ndim > 2 for a in params.values()):
            raise ShapeError("LoKr: a conv adapter needs the base weight's shape (pass layer=Layer.of(shape))")
        w1, w2 = kron_factors(params)
        return Layer(LayerKind.LINEAR, (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]))
    raise ShapeError(f"LoKr: a {kind.value} adapter needs the base weight's shape (pass layer=Layer.of(shape))")


def _delta(params: dict[str, Array], layer: Layer, s: float, *, dtype: Any = None, peft_compat: bool = False) -> Array:
    xp = namespace(*params.values())
    w1, w2 = kron_factors(params, dtype=dtype, peft_compat=peft_compat)
    rnd = xp.result_type(*(a.dtype for a in params.values())) if peft_compat else None
    k = make_kron(w1, w2, scaling=s, peft_compat=peft_compat, round_to=rnd)
    return xp.reshape(k, layer.weight_shape)


def delta_weight(params: dict[str, Array], *, scaling: float, layer: Layer | LayerKind | str | None = None,
                 peft_compat: bool = False) -> Array:
    """``ΔW = s · kron(w1, w2)`` reshaped to the base weight's stored layout, in float32 (float64).

    ``params`` maps PEFT's suffixes (``"lokr_w1"``, ``"lokr_w2_a"``, ...) to arrays. ``layer`` is
    required for a conv (the tensors do not fix its shape).

    >>> import numpy as np
    >>> p = {"lokr_w1": np.eye(2), "lokr_w2": np.array([[1.0, 2.0]])}
    >>> delta_weight(p, scaling=2.0)
    array([[2., 4., 0., 0.],
           [0., 0., 2., 4.]])
    """
    lay = _resolve_layer(layer, params)
    g = _geometry_from_params("lokr.delta_weight", lay, params)
    _check_params("lokr.delta_weight", lay, params, g)
    return _delta(params, lay, scaling, peft_compat=peft_compat)


# --------------------------------------------------------------------------------------------------
# Forward (specs/lokr.md, "6. Forward")
# --------------------------------------------------------------------------------------------------
def forward(
    x: Array,
    W: Array,
    params: dict[str, Array],
    *,
    scaling: float,
    bias: Array | None = None,
    layer: Layer | LayerKind | str | None = None,
    groups: int | None = None,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
    rank_dropout_scale: bool = False,
    seed: int | np.random.Generator | None = None,
    row_mask: Array | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    peft_compat: bool = False,
) -> Array:
    """The unmerged adapted layer ``base(x) + x ΔWᵀ`` (Linear) or ``base(x) + conv(x, ΔW)`` (Conv).

    ``stride``, ``padding``, ``dilation``, ``groups``: the base conv's, described once in
    :mod:`peftmath.layers` ("Conv keywords"); ``groups`` is inferred from ``x`` (a checkpoint does not
    record it).

    Training-time dropout (off by default): with probability ``module_dropout`` the adapter is
    skipped; ``rank_dropout`` multiplies output row ``o`` of ΔW by the float32 ``1[u_o > p]``, divided by
    its mean only when ``rank_dropout_scale`` (PEFT's default is not to). Drawn from ``seed`` on the host
    (module first, then rows); ``row_mask`` (shape ``(out,)``) supplies the row factors instead.
    """
    xp = namespace(x, W, bias, *params.values(), where="lokr.forward")
    lay = _resolve_layer(layer, params, W)
    lay.check_weight(W)
    lay, conv_kwargs = lay.for_input(x, "lokr.forward", groups=groups, stride=stride, padding=padding,
                                     dilation=dilation)
    g = _geometry_from_params("lokr.forward", lay, params)
    _check_params("lokr.forward", lay, params, g)
    keep, mask = draw_dropout(lay.out_features, rank_dropout, module_dropout, seed, rank_dropout_scale,
                                    xp, common_device(W))
    if not keep:
        return as_compute(xp, lay.base_forward(x, W, bias, xp, **conv_kwargs), x.dtype)
    mask = row_mask if row_mask is not None else mask
    cd = compute_dtype(xp, x.dtype, *(a.dtype for a in params.values()))
    d = masked(xp, _delta(params, lay, scaling, dtype=cd, peft_compat=peft_compat), mask)
    return adapted_forward(x, W, bias, d, lay, xp, **conv_kwargs)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge without a Kronecker temporary (specs/lokr.md, "7. Merge and unmerge without a Kronecker temporary")
# --------------------------------------------------------------------------------------------------
def _kron_blocks(w1: Array, w2: Array, s: float, g: LoKrGeometry) -> Callable[[Any], Iterator]:
    """Row blocks of ``s · kron(w1, w2)`` on W's ``(out, in_flat)`` matrix view.

    Regular layout: row ``i·b + j``, column ``p·D + q`` (``D = d·Πk``) holds ``s·w1[i, p]·w2[j, q]``; the
    Conv1d quirk has row ``j·a + i`` and column ``q·(c·k) + p·k + t`` holding ``s·w1[i, p]·w2[j, q, t]``.
    Each block is a broadcast outer product of a few rows, never the whole ``kron``.
    """
    def gen(cd: Any) -> Iterator:
        xp = namespace(w1, w2)
        v1 = as_compute(xp, w1, cd) * s
        kk = math.prod(g.kernel)
        in_flat = g.c * g.d * kk
        step = block_rows(in_flat)
        if not g.quirk:
            u, n_outer, n_inner = v1, g.a, g.b  # outer rows i of w1, inner rows j of w2
            v = xp.reshape(as_compute(xp, w2, cd), (g.b, g.d * kk))
        else:
            u, n_outer, n_inner = as_compute(xp, w2, cd), g.b, g.a  # outer rows j of w2, inner rows i of w1
        if step >= n_inner:  # whole outer rows per block
            per = step // n_inner
            for o0 in range(0, n_outer, per):
                o1 = min(n_outer, o0 + per)
                if not g.quirk:
                    blk = v1[o0:o1, None, :, None] * v[None, :, None, :]            # (no, b, c, D)
                else:
                    blk = u[o0:o1, None, :, None, :] * v1[None, :, None, :, None]   # (no, a, d, c, k)
                yield o0 * n_inner, o1 * n_inner, xp.reshape(blk, ((o1 - o0) * n_inner, in_flat))
                del blk
        else:  # part of one outer row per block
            for o in range(n_outer):
                for i0 in range(0, n_inner, step):
                    i1 = min(n_inner, i0 + step)
                    if not g.quirk:
                        blk = v1[o, None, :, None] * v[i0:i1, None, :]                # (ni, c, D)
                    else:
                        blk = u[o, None, :, None, :] * v1[i0:i1, None, :, None]       # (ni, d, c, k)
                    yield o * n_inner + i0, o * n_inner + i1, xp.reshape(blk, (i1 - i0, in_flat))
                    del blk
    return gen


def _apply(W: Array, params: dict[str, Array], *, scaling: float, layer: Any, g: LoKrGeometry | None, sign: int,
           copy: bool, safe: bool, peft_compat: bool, where: str) -> Array:
    xp = namespace(W, *params.values(), where=where)
    lay = _resolve_layer(layer, params, W)
    lay.check_weight(W)
    g = g or _geometry_from_params(where, lay, params)
    _check_params(where, lay, params, g)
    dts = tuple(a.dtype for a in params.values())
    cd = compute_dtype(xp, W.dtype, *dts)
    w1, w2 = kron_factors(params, dtype=cd)

    def full() -> Array:
        return _delta(params, lay, scaling, dtype=cd, peft_compat=peft_compat)

    return apply_row_blocks(where, W, lay, _kron_blocks(w1, w2, scaling, g), full, param_dtypes=dts, sign=sign,
                            copy=copy, safe=safe, peft_compat=peft_compat, params=tuple(params.values()))


def merge(W: Array, params: dict[str, Array], *, scaling: float, layer: Layer | LayerKind | str | None = None,
          copy: bool = True, safe: bool = False, peft_compat: bool = False) -> Array:
    """``W + s · kron(w1, w2)`` without a Kronecker temporary.

    ``copy=False`` updates ``W`` in place (no temporary of W's size); ``copy=True`` allocates only the
    result. ``safe=True`` refuses a non-finite result and changes nothing. Each element is summed in
    float32 (float64) and rounded once; ``peft_compat=True`` builds the whole ``kron`` and rounds its
    intermediates to half-precision tensors' dtype, as PEFT does.

    >>> import numpy as np
    >>> W = np.zeros((2, 4), dtype=np.float32)
    >>> p = {"lokr_w1": np.eye(2, dtype=np.float32), "lokr_w2": np.array([[1.0, 2.0]], dtype=np.float32)}
    >>> merge(W, p, scaling=2.0, copy=False) is W, W[1]
    (True, array([0., 0., 2., 4.], dtype=float32))
    """
    return _apply(W, params, scaling=scaling, layer=layer, g=None, sign=1, copy=copy, safe=safe,
                  peft_compat=peft_compat, where="lokr.merge")


def unmerge(W: Array, params: dict[str, Array], *, scaling: float, layer: Layer | LayerKind | str | None = None,
            copy: bool = True, peft_compat: bool = False) -> Array:
    """``W − s · kron(w1, w2)``, the inverse of :func:`merge` (same keywords)."""
    return _apply(W, params, scaling=scaling, layer=layer, g=None, sign=-1, copy=copy, safe=False,
                  peft_compat=peft_compat, where="lokr.unmerge")


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _config_geometry(name: str, config: LoKrConfig, layer: Layer) -> LoKrGeometry:
    r, _ = config.rank_and_alpha(name)
    return geometry(layer, r, decompose_both=config.decompose_both, decompose_factor=config.decompose_factor,
                    use_effective_conv2d=config.use_effective_conv2d)


class LoKrModule(ModuleAdapter):
    """LoKr on one base module (Linear, Conv1d or Conv2d)."""

    peft_type = "LOKR"
    supported_kinds = SUPPORTED

    @classmethod
    def initialize(cls, name: str, config: LoKrConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """Fresh parameters for module ``name`` (``init`` overrides ``config.init_weights``); the base
        weight is never changed (second item ``None``)."""
        check_kind(layer, name, "LoKr")
        if xp is None and weight is not None:
            xp = namespace(weight)
        g = _config_geometry(name, config, layer)
        params = init_weights(g, init_weights=config.init_weights if init is None else init, seed=seed, xp=xp,
                              device=device, dtype=dtype)
        return params, None

    @classmethod
    def infer_layer(cls, name: str, config: LoKrConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """The layer of ``name``: from the base weight shape (and ``kind``) when given, else a Linear
        ``(a·b, c·d)`` from the tensors (a conv needs ``weight_shape``)."""
        if weight_shape is not None:
            layer = Layer.of(tuple(weight_shape), kind)
        else:
            try:
                layer = _resolve_layer(kind, params)
            except ShapeError as exc:
                raise ShapeError(f"{name}: {exc}") from None
        check_kind(layer, name, "LoKr")
        return layer

    def scaled(self, c: float) -> "ModuleAdapter":
        """Scale ``c``: ``s → c·s``, so ``ΔW → c·ΔW`` (PEFT's ``scale_layer``)."""
        return self.scale_scaling(c)

    def validate(self) -> None:
        p = self.params
        unknown = sorted(set(p) - set(_KEYS))
        if unknown:
            raise ShapeError(f"{self.name}: unexpected LoKr tensors {unknown}; LoKr has {', '.join(_KEYS)}")
        check_kind(self.layer, self.name, "LoKr")
        # the tensors must factor the layer (clear message first), then match PEFT's rules for the config
        _geometry_from_params(self.name, self.layer, p)
        self.geometry = _config_geometry(self.name, self.config, self.layer)
        _check_params(self.name, self.layer, p, self.geometry)
        self.r = self.geometry.r
        self.scaling = self.config.scaling_for(self.name)

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        return _delta(self.params, self.layer, self.scaling, peft_compat=peft_compat)

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        new = _apply(weight, self.params, scaling=self.scaling, layer=self.layer, g=self.geometry, sign=1,
                     copy=copy, safe=safe, peft_compat=peft_compat, where=self.name)
        return MergeResult(new, bias)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        new = _apply(weight, self.params, scaling=self.scaling, layer=self.layer, g=self.geometry, sign=-1,
                     copy=copy, safe=False, peft_compat=peft_compat, where=self.name)
        return MergeResult(new, bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, *, training: bool = False,
                seed: int | np.random.Generator | None = None, peft_compat: bool = False,
                **layer_kwargs: Any) -> Array:
        """The unmerged forward; ``training=True`` applies the config's rank/module dropout from ``seed``.
        The conv keywords (``groups`` inferred from ``x``) are described in :mod:`peftmath.layers`."""
        cfg = self.config
        layer, layer_kwargs = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.params, scaling=self.scaling, bias=bias,
                       layer=layer,
                       rank_dropout=cfg.rank_dropout if training else 0.0,
                       module_dropout=cfg.module_dropout if training else 0.0,
                       rank_dropout_scale=cfg.rank_dropout_scale, seed=seed, peft_compat=peft_compat,
                       **layer_kwargs)


#: checkpoint suffixes of LoKr's per-module tensors (ParameterDict entries: no ".weight")
PARAMETER_SUFFIXES = _KEYS
Config = LoKrConfig
Module = LoKrModule
#: demo / documentation examples: row label -> config fields (non-trivial, alpha != r)
EXAMPLES = {
    "LoKr": dict(r=4, alpha=12, init_weights=False),
    "LoKr (decompose both)": dict(r=2, alpha=6, init_weights=False, decompose_both=True, decompose_factor=4),
    "LoKr (effective conv)": dict(r=2, alpha=5, init_weights=False, use_effective_conv2d=True),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=LoKrConfig, module=LoKrModule, spec="specs/lokr.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=LoKrModule.supported_kinds, additive=True,
    init_field="init_weights", examples=EXAMPLES,
)
