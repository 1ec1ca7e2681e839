r"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024).

Two frozen random projections are shared by every adapted layer of a model; each layer trains only
two vectors that scale them::

    vera_A: (r, max_in)     vera_B: (max_out, r)          shared, frozen, saved once
    A_l = vera_A[:, :in]    B_l = vera_B[:out, :]         leading slices for a layer (out, in)
    ΔW  = diag(λ_b) B_l diag(λ_d) A_l = (λ_b[:, None] ⊙ B_l) @ (λ_d[:, None] ⊙ A_l)     (out, in)
    y   = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (x A_lᵀ)) B_lᵀ)
    λ_b = vera_lambda_b (out,)      λ_d = vera_lambda_d (r,)

``max_in`` / ``max_out`` are the largest input / output sizes over all targeted layers. There is no
scaling factor. For a transformers ``Conv1D`` (``fan_in_fan_out``) ΔW is stored transposed, (in, out).
Merge is ``W + ΔW`` and unmerge ``W − ΔW``.

The projections are read from the checkpoint: PEFT draws them with ``torch.Generator`` seeded by
``projection_prng_key``, a stream peftmath cannot reproduce, so a checkpoint saved with
``save_projection=False`` cannot be loaded here. peftmath's own initialisation draws them on the host
from a seed (:func:`init_projections`), with PEFT's distribution.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from .._array import as_compute, compute_dtype, is_low_precision, namespace
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_choice, check_flags, check_fraction, check_number, check_positive_int
from ..errors import CheckpointError, ConfigError, ShapeError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import MergeResult, ModuleAdapter, apply_delta, check_shape, start_shared_init

Array = Any

__all__ = [
    "VeraConfig",
    "init_projections",
    "init_shared",
    "init_lambdas",
    "slice_projections",
    "delta_matrix",
    "delta_weight",
    "forward",
    "merge",
    "unmerge",
    "VeraModule",
]

PEFT_TYPE = "VERA"
#: checkpoint keys of the shared projections (PEFT: ``base_model.vera_A.<adapter>`` without the name)
VERA_A_KEY = "base_model.vera_A"
VERA_B_KEY = "base_model.vera_B"
SHARED_KEYS = (VERA_A_KEY, VERA_B_KEY)
SUPPORTED_KINDS = (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED)


# --------------------------------------------------------------------------------------------------
# Config (specs/vera.md, "Config (`peft_type: "VERA"`)")
# --------------------------------------------------------------------------------------------------
@dataclass
class VeraConfig(TunerConfig):
    """PEFT's ``VeraConfig`` (``peft_type: "VERA"``). PEFT's VeraConfig has no ``exclude_modules``;
    it is left out of the written config while unset."""

    peft_type: ClassVar[str] = "VERA"

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "r", self.r)
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ConfigError(f"{source}: field 'projection_prng_key' must be an integer, got {self.projection_prng_key!r}")
        check_flags(source, self, "save_projection", "fan_in_fan_out", "init_weights")
        check_fraction(source, "vera_dropout", self.vera_dropout)
        check_number(source, "d_initial", self.d_initial)
        check_choice(source, "bias", self.bias, ("none", "all", "vera_only"))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("exclude_modules") is None:  # not a field of PEFT's VeraConfig
            out.pop("exclude_modules", None)
        return out


# --------------------------------------------------------------------------------------------------
# Shapes and slicing (specs/vera.md, "Notation and shapes", "Slicing: the picture")
# --------------------------------------------------------------------------------------------------
def slice_projections(vera_A: Array, vera_B: Array, in_features: int, out_features: int, *,
                      where: str = "vera") -> tuple[Array, Array]:
    """``(A_l = vera_A[:, :in], B_l = vera_B[:out, :])``; :class:`ShapeError` when the layer is larger
    than the saved projections or their ranks disagree."""
    if vera_A.ndim != 2 or vera_B.ndim != 2 or vera_A.shape[0] != vera_B.shape[1]:
        raise ShapeError(
            f"{where}: vera_A {tuple(vera_A.shape)} and vera_B {tuple(vera_B.shape)} are not (r, max_in) and "
            f"(max_out, r) with one r"
        )
    if in_features > vera_A.shape[1] or out_features > vera_B.shape[0]:
        raise ShapeError(
            f"{where}: the layer has in={in_features}, out={out_features} but the shared projections cover only "
            f"in <= {vera_A.shape[1]} (vera_A {tuple(vera_A.shape)}) and out <= {vera_B.shape[0]} "
            f"(vera_B {tuple(vera_B.shape)}); the projections must be sized to the largest adapted layer"
        )
    return vera_A[:, :in_features], vera_B[:out_features, :]


def _check_lambdas(lambda_b: Array, lambda_d: Array, vera_A: Array, out: int, where: str) -> None:
    check_shape(where, "vera_lambda_b", lambda_b, (out,))
    check_shape(where, "vera_lambda_d", lambda_d, (int(vera_A.shape[0]),))


# --------------------------------------------------------------------------------------------------
# Delta weight (specs/vera.md, "Delta, forward, merge, unmerge")
# --------------------------------------------------------------------------------------------------
def _factors(lambda_b: Array, lambda_d: Array, A_l: Array, B_l: Array, cd: Any) -> tuple[Array, Array]:
    """``(λ_b[:, None] ⊙ B_l (out, r), λ_d[:, None] ⊙ A_l (r, in))`` in ``cd``."""
    xp = namespace(lambda_b, lambda_d, A_l, B_l)
    Bs = as_compute(xp, lambda_b, cd)[:, None] * as_compute(xp, B_l, cd)
    As = as_compute(xp, lambda_d, cd)[:, None] * as_compute(xp, A_l, cd)
    return Bs, As


def delta_matrix(lambda_b: Array, lambda_d: Array, A_l: Array, B_l: Array, *, dtype: Any = None) -> Array:
    """``(λ_b[:, None] ⊙ B_l) @ (λ_d[:, None] ⊙ A_l)``, the ``(out, in)`` matrix, in ``dtype``
    (default: float32, float64 when any input is float64)."""
    xp = namespace(lambda_b, lambda_d, A_l, B_l, where="vera")
    cd = dtype or compute_dtype(xp, lambda_b.dtype, lambda_d.dtype, A_l.dtype, B_l.dtype)
    Bs, As = _factors(lambda_b, lambda_d, A_l, B_l, cd)
    return xp.matmul(Bs, As)


def _compat_round(xp: Any, vera_B: Array, d: Array) -> Array:
    """PEFT's CPU half rule: half-precision projections give a ΔW rounded to their dtype."""
    if is_low_precision(vera_B.dtype):
        return as_compute(xp, xp.astype(d, vera_B.dtype), d.dtype)
    return d


def _resolve_layer(layer: Layer | LayerKind | str | None, lambda_b: Array, vera_A: Array, W: Array | None,
                   in_features: int | None) -> Layer:
    if isinstance(layer, Layer):
        lay = layer
    elif W is not None:
        lay = Layer.of(tuple(W.shape), layer)
    else:
        kind = LayerKind.parse(layer) if layer is not None else LayerKind.LINEAR
        inn = int(vera_A.shape[1]) if in_features is None else int(in_features)
        out = int(lambda_b.shape[0])
        lay = Layer(kind, (inn, out) if kind is LayerKind.CONV1D_TRANSPOSED else (out, inn))
    if lay.kind not in SUPPORTED_KINDS:
        raise ShapeError(f"vera: VeRA is defined for Linear and transformers Conv1D layers, not {lay.kind.value}")
    return lay


def delta_weight(
    lambda_b: Array,
    lambda_d: Array,
    vera_A: Array,
    vera_B: Array,
    *,
    in_features: int | None = None,
    layer: Layer | LayerKind | str | None = None,
    peft_compat: bool = False,
) -> Array:
    """``ΔW`` in the stored layout: ``(out, in)`` for Linear, ``(in, out)`` for Conv1D.

    ``out = len(λ_b)``; ``in`` comes from ``layer`` (a :class:`Layer`), else ``in_features``, else all
    of ``vera_A``'s columns. Computed in float32 (float64 for float64 inputs); the result has that
    dtype. ``peft_compat=True`` rounds ΔW to the projections' dtype when they are float16/bfloat16
    (PEFT's CPU rule).

    >>> import numpy as np
    >>> A = np.array([[1.0, 2.0, 3.0]]); B = np.array([[1.0], [2.0]])     # r = 1, max_in 3, max_out 2
    >>> delta_weight(np.array([1.0, -1.0]), np.array([0.5]), A, B, in_features=2)
    array([[ 0.5,  1. ],
           [-1. , -2. ]])
    """
    xp = namespace(lambda_b, lambda_d, vera_A, vera_B, where="vera.delta_weight")
    lay = _resolve_layer(layer, lambda_b, vera_A, None, in_features)
    A_l, B_l = slice_projections(vera_A, vera_B, lay.in_features, lay.out_features, where="vera.delta_weight")
    _check_lambdas(lambda_b, lambda_d, vera_A, lay.out_features, "vera.delta_weight")
    d = delta_matrix(lambda_b, lambda_d, A_l, B_l)
    if peft_compat:
        d = _compat_round(xp, vera_B, d)
    return lay.from_matrix(d, xp)


# --------------------------------------------------------------------------------------------------
# Forward (specs/vera.md, "Delta, forward, merge, unmerge")
# --------------------------------------------------------------------------------------------------
def adapter_output(x: Array, lambda_b: Array, lambda_d: Array, A_l: Array, B_l: Array, *,
                   dropout: Callable[[Array], Array] | None = None) -> Array:
    """The adapter's term alone, ``λ_b ⊙ ((λ_d ⊙ (d(x) A_lᵀ)) B_lᵀ)``, in float32 or wider."""
    xp = namespace(x, lambda_b, lambda_d, A_l, B_l, where="vera.adapter_output")
    cd = compute_dtype(xp, x.dtype, lambda_b.dtype, lambda_d.dtype, A_l.dtype, B_l.dtype)
    xin = as_compute(xp, x, cd)
    if dropout is not None:
        xin = dropout(xin)
    h = xp.matmul(xin, xp.matrix_transpose(as_compute(xp, A_l, cd))) * as_compute(xp, lambda_d, cd)
    return xp.matmul(h, xp.matrix_transpose(as_compute(xp, B_l, cd))) * as_compute(xp, lambda_b, cd)


def forward(
    x: Array,
    W: Array,
    lambda_b: Array,
    lambda_d: Array,
    vera_A: Array,
    vera_B: Array,
    *,
    bias: Array | None = None,
    layer: Layer | LayerKind | str | None = None,
    dropout: Callable[[Array], Array] | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int | None = None,
    peft_compat: bool = False,
) -> Array:
    """The unmerged adapted layer: ``base(x) + λ_b ⊙ ((λ_d ⊙ (d(x) A_lᵀ)) B_lᵀ)``; x ``(..., in)``.

    ``dropout`` is any callable on the adapter's input (identity by default; PEFT's ``vera_dropout``).
    Everything is computed in float32 (float64 for float64 inputs) and rounded once to the result type
    of ``x`` and ``W``. ``peft_compat=True`` rounds the base output to that dtype first, then adds the
    adapter term and rounds again, as PEFT does (the same numbers for float32, within one ulp for
    float16/bfloat16).

    ``stride``, ``padding``, ``dilation``, ``groups``: the conv keywords every method accepts (see
    :mod:`peftmath.layers`, "Conv keywords"); VeRA adapts no convolution, so they must keep their
    defaults. An input of the wrong width is a :class:`~peftmath.errors.ShapeError`.

    >>> import numpy as np
    >>> A = np.ones((1, 2)); B = np.ones((2, 1)); W = np.zeros((2, 2))
    >>> forward(np.array([[1.0, 2.0]]), W, np.array([1.0, 2.0]), np.array([0.5]), A, B)
    array([[1.5, 3. ]])
    """
    xp = namespace(x, W, lambda_b, lambda_d, vera_A, vera_B, bias, where="vera.forward")
    lay = _resolve_layer(layer, lambda_b, vera_A, W, None)
    lay.check_weight(W)
    lay.check_bias(bias)
    lay.for_input(x, "vera.forward", groups=groups, stride=stride, padding=padding, dilation=dilation)
    A_l, B_l = slice_projections(vera_A, vera_B, lay.in_features, lay.out_features, where="vera.forward")
    _check_lambdas(lambda_b, lambda_d, vera_A, lay.out_features, "vera.forward")
    lo = adapter_output(x, lambda_b, lambda_d, A_l, B_l, dropout=dropout)
    cd = compute_dtype(xp, lo.dtype, W.dtype)
    out_dtype = xp.result_type(x.dtype, W.dtype)
    base = lay.base_forward(as_compute(xp, x, cd), as_compute(xp, W, cd),
                            None if bias is None else as_compute(xp, bias, cd), xp)
    if peft_compat:  # PEFT rounds the base output to the storage dtype before adding the adapter term
        base = as_compute(xp, as_compute(xp, base, out_dtype), cd)
    return as_compute(xp, base + as_compute(xp, lo, cd), out_dtype)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge (specs/vera.md, "Delta, forward, merge, unmerge")
# --------------------------------------------------------------------------------------------------
def _apply(W: Array, lambda_b: Array, lambda_d: Array, vera_A: Array, vera_B: Array, *, sign: int,
           layer: Layer, copy: bool, safe: bool, peft_compat: bool, where: str) -> Array:
    xp = namespace(W, lambda_b, lambda_d, vera_A, vera_B, where=where)
    layer.check_weight(W)
    A_l, B_l = slice_projections(vera_A, vera_B, layer.in_features, layer.out_features, where=where)
    _check_lambdas(lambda_b, lambda_d, vera_A, layer.out_features, where)

    def build() -> Array:
        cd = compute_dtype(xp, W.dtype, lambda_b.dtype, lambda_d.dtype, vera_A.dtype, vera_B.dtype)
        d = delta_matrix(lambda_b, lambda_d, A_l, B_l, dtype=cd)
        if peft_compat:
            d = _compat_round(xp, vera_B, d)
        return layer.from_matrix(d, xp)

    def kernel(M: Array) -> bool:
        cd = compute_dtype(xp, W.dtype, lambda_b.dtype, lambda_d.dtype, vera_A.dtype, vera_B.dtype)
        Bs, As = _factors(lambda_b, lambda_d, A_l, B_l, cd)  # O(r (in + out)) each
        return backend_for(xp).addmm_(M, Bs, As, float(sign))

    use_kernel = not (peft_compat and is_low_precision(vera_B.dtype))
    return apply_delta(where, W, build, sign=sign, copy=copy, safe=safe, layer=layer,
                       inplace_kernel=kernel if use_kernel else None, xp=xp)


def merge(W: Array, lambda_b: Array, lambda_d: Array, vera_A: Array, vera_B: Array, *,
          layer: Layer | LayerKind | str | None = None, copy: bool = True, safe: bool = False,
          peft_compat: bool = False) -> Array:
    """``W + ΔW``.

    ``copy=False`` updates ``W`` in place; on NumPy float32/float64 through BLAS gemm with ``beta=1``
    on the scaled factors (no temporary of W's size). The sum is formed in float32 (float64) and
    rounded once, as PEFT's ``W += ΔW`` does; ``peft_compat=True`` additionally rounds ΔW to the
    projections' dtype when they are half precision.

    >>> import numpy as np
    >>> W = np.zeros((2, 2), dtype=np.float32)
    >>> A = np.ones((1, 3), dtype=np.float32); B = np.ones((2, 1), dtype=np.float32)
    >>> lb = np.array([1.0, 2.0], dtype=np.float32); ld = np.array([3.0], dtype=np.float32)
    >>> merge(W, lb, ld, A, B, copy=False) is W, W
    (True, array([[3., 3.],
           [6., 6.]], dtype=float32))
    """
    lay = _resolve_layer(layer, lambda_b, vera_A, W, None)
    return _apply(W, lambda_b, lambda_d, vera_A, vera_B, sign=1, layer=lay, copy=copy, safe=safe,
                  peft_compat=peft_compat, where="vera.merge")


def unmerge(W: Array, lambda_b: Array, lambda_d: Array, vera_A: Array, vera_B: Array, *,
            layer: Layer | LayerKind | str | None = None, copy: bool = True, peft_compat: bool = False) -> Array:
    """``W − ΔW``, the inverse of :func:`merge` (same keywords; PEFT's unmerge rounds the same way)."""
    lay = _resolve_layer(layer, lambda_b, vera_A, W, None)
    return _apply(W, lambda_b, lambda_d, vera_A, vera_B, sign=-1, layer=lay, copy=copy, safe=False,
                  peft_compat=peft_compat, where="vera.unmerge")


# --------------------------------------------------------------------------------------------------
# Projections and initialisation (specs/vera.md, "Initialisation")
# --------------------------------------------------------------------------------------------------
def init_projections(r: int, max_in: int, max_out: int, *, seed: int | np.random.Generator | None = 0,
                     xp: Any = None, device: Any = None, dtype: Any = None) -> tuple[Array, Array]:
    """Fresh shared projections ``(vera_A (r, max_in), vera_B (max_out, r))``.

    Kaiming-uniform with gain √2, as PEFT's ``_kaiming_init``: ``U(±sqrt(6 / fan_in))`` with
    ``fan_in = max_in`` for ``vera_A`` and ``r`` for ``vera_B``; ``vera_A`` is drawn first. The draws
    come from ``numpy.random.default_rng(seed)`` on the host, so they are the same on every backend but
    differ from PEFT's torch stream for the same ``projection_prng_key``.

    >>> A, B = init_projections(4, 8, 6, seed=0)
    >>> A.shape, B.shape, bool(abs(A).max() <= (6 / 8) ** 0.5), bool(abs(B).max() <= (6 / 4) ** 0.5)
    ((4, 8), (6, 4), True, True)
    """
    for what, n in (("r", r), ("max_in", max_in), ("max_out", max_out)):
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ConfigError(f"vera.init_projections: {what} must be a positive integer, got {n!r}")
    if xp is None:
        import array_api_compat.numpy as xp
    rng = host_rng(seed)
    bound_a = math.sqrt(6.0 / max_in)
    bound_b = math.sqrt(6.0 / r)
    A = rng.uniform(-bound_a, bound_a, (r, max_in))
    B = rng.uniform(-bound_b, bound_b, (max_out, r))
    return _put(A, xp, device, dtype), _put(B, xp, device, dtype)


def init_shared(config: VeraConfig, layers: Iterable[Layer] | Mapping[str, Layer], *,
                seed: int | np.random.Generator | None = None, xp: Any = None, device: Any = None,
                dtype: Any = None) -> dict[str, Array]:
    """The shared tensors of an adapter over ``layers``: projections sized to the largest layer.

    ``layers`` is an iterable of :class:`Layer` or a mapping name -> Layer. ``max_in`` / ``max_out``
    are the maxima of in / out features over them (PEFT's ``VeraModel._find_dim``). The host seed is
    ``seed`` when given, else ``config.projection_prng_key`` (neither reproduces PEFT's torch draws;
    the projections are saved with the adapter either way).
    """
    layers = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
    if not layers:
        raise ConfigError("vera.init_shared: no layers to size the projections for")
    max_in = max(layer.in_features for layer in layers)
    max_out = max(layer.out_features for layer in layers)
    A, B = init_projections(config.r, max_in, max_out, seed=config.projection_prng_key if seed is None else seed,
                            xp=xp, device=device, dtype=dtype)
    return {VERA_A_KEY: A, VERA_B_KEY: B}


def init_lambdas(layer: Layer, r: int, *, init_weights: bool = True, d_initial: float = 0.1,
                 seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                 dtype: Any = None) -> tuple[Array, Array]:
    """``(vera_lambda_b (out,), vera_lambda_d (r,))``.

    ``init_weights=True``: ``λ_b = 0`` (the adapter starts as a no-op) and ``λ_d = d_initial``.
    ``False``: ``λ_b = 1`` and ``λ_d ~ N(0, 1)`` (host draws from ``seed``).

    >>> b, d = init_lambdas(Layer.of((3, 5)), 2)
    >>> b.tolist(), [round(v, 6) for v in d.tolist()]
    ([0.0, 0.0, 0.0], [0.1, 0.1])
    """
    if xp is None:
        import array_api_compat.numpy as xp
    out = layer.out_features
    if init_weights:
        lb, ld = np.zeros(out), np.full(r, float(d_initial))
    else:
        lb, ld = np.ones(out), host_rng(seed).standard_normal(r)
    return _put(lb, xp, device, dtype), _put(ld, xp, device, dtype)


def _put(a: np.ndarray, xp: Any, device: Any, dtype: Any) -> Array:
    out = backend_for(xp).from_host(np.ascontiguousarray(a, dtype=np.float32), xp, device)
    target = dtype if dtype is not None else xp.float32
    return out if out.dtype == target else xp.astype(out, target)


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
def _missing_projections(name: str, config: VeraConfig, shared: dict[str, Array]) -> CheckpointError:
    missing = [k for k in SHARED_KEYS if k not in shared]
    if not config.save_projection:
        why = "was saved with save_projection=false, so it does not contain the shared projections"
    else:
        why = f"lacks the shared projections {missing}"
    return CheckpointError(
        f"{name}: this VeRA adapter {why}. PEFT regenerates them with torch.Generator(seed=projection_prng_key="
        f"{config.projection_prng_key}), which peftmath cannot reproduce bit for bit. Fix: load the adapter in PEFT "
        f"and save it again with VeraConfig(save_projection=True) (the default), which writes "
        f"{VERA_A_KEY} and {VERA_B_KEY}"
    )


class VeraModule(ModuleAdapter):
    """VeRA on one base module: ``vera_lambda_b``, ``vera_lambda_d`` and the shared projections
    (``self.shared[VERA_A_KEY]``, ``self.shared[VERA_B_KEY]``)."""

    peft_type = "VERA"
    additive = True
    supported_kinds = SUPPORTED_KINDS

    @classmethod
    def initialize(cls, name: str, config: VeraConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None,
                   shared: MutableMapping[str, Array] | None = None) -> tuple[dict[str, Array], Array | None]:
        """``{"vera_lambda_b", "vera_lambda_d"}`` for module ``name`` (``init`` overrides
        ``config.init_weights``); the base weight is not changed.

        The shared projections are not per-module parameters. With ``shared=`` (a dict) that holds
        them, they are checked to cover this layer (:class:`ShapeError` otherwise); a dict that lacks
        them receives projections sized to *this* layer (``max_in = in``, ``max_out = out``) drawn from
        ``config.projection_prng_key``. Without ``shared=``, such layer-sized projections are returned
        in the params dict under :data:`SHARED_KEYS`: move them into ``Adapter(shared=...)`` before
        saving (a :class:`VeraModule` also finds them among its params). For several layers of
        different sizes build them once with :func:`init_shared` over all layers.
        """
        if layer.kind not in SUPPORTED_KINDS:
            raise ShapeError(f"{name}: VeRA is defined for Linear and transformers Conv1D layers, not {layer.kind.value}")
        xp, flag, shared, own = start_shared_init(name, config, layer, weight=weight, xp=xp, init=init, shared=shared,
                                                  keys=SHARED_KEYS, init_shared=init_shared, device=device,
                                                  dtype=dtype)
        A, B = shared[VERA_A_KEY], shared[VERA_B_KEY]
        slice_projections(A, B, layer.in_features, layer.out_features, where=name)
        if A.shape[0] != config.r:
            raise ShapeError(f"{name}: shared vera_A has rank {A.shape[0]} but the config has r={config.r}")
        lb, ld = init_lambdas(layer, config.r, init_weights=flag, d_initial=config.d_initial, seed=seed, xp=xp,
                              device=device, dtype=dtype)
        params = {"vera_lambda_b": lb, "vera_lambda_d": ld}
        if own:
            params.update(shared)
        return params, None

    @classmethod
    def infer_layer(cls, name: str, config: VeraConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """A 2-D base weight ``(a, b)`` is a Linear when ``len(λ_b) == a`` and a Conv1D when it is ``b``;
        a square weight follows ``kind``, else the config's ``fan_in_fan_out``."""
        if "vera_lambda_b" not in params:
            raise ShapeError(f"{name}: no vera_lambda_b among the parameters {sorted(params)}")
        if weight_shape is None:
            raise ShapeError(
                f"{name}: VeRA does not store the input size of a layer; pass the base weight shape (weight_shape=...)"
            )
        shape = tuple(int(s) for s in weight_shape)
        if kind is not None or len(shape) != 2:
            return Layer.of(shape, kind)
        out = int(params["vera_lambda_b"].shape[0])
        if shape[0] == out and shape[1] != out:
            return Layer(LayerKind.LINEAR, shape)
        if shape[1] == out and shape[0] != out:
            return Layer(LayerKind.CONV1D_TRANSPOSED, shape)
        if shape[0] == out:  # square
            return Layer(LayerKind.CONV1D_TRANSPOSED if config.fan_in_fan_out else LayerKind.LINEAR, shape)
        raise ShapeError(
            f"{name}: base weight {shape} has no dimension of size len(vera_lambda_b) = {out}; "
            f"does the adapter belong to this model?"
        )

    def scaled(self, c: float) -> "ModuleAdapter":
        """Scale ``c``: ``λ_b → c·λ_b`` (``ΔW`` is linear in ``λ_b``; PEFT has no VeRA scale), rounded once
        to ``λ_b``'s dtype."""
        if c == 1.0:
            return self
        return self.scale_parameter("vera_lambda_b", lambda lam: lam * c)

    def validate(self) -> None:
        if self.layer.kind not in SUPPORTED_KINDS:
            raise ShapeError(f"{self.name}: VeRA is defined for Linear and transformers Conv1D layers, "
                             f"not {self.layer.kind.value}")
        for key in ("vera_lambda_b", "vera_lambda_d"):
            if key not in self.params:
                raise ShapeError(f"{self.name}: missing {key}")
        source = self.shared
        if not all(k in source for k in SHARED_KEYS) and all(k in self.params for k in SHARED_KEYS):
            source = self.params  # as returned by initialize() without shared=
        if not all(k in source for k in SHARED_KEYS):
            raise _missing_projections(self.name, self.config, self.shared)
        self.lambda_b, self.lambda_d = self.params["vera_lambda_b"], self.params["vera_lambda_d"]
        self.vera_A, self.vera_B = source[VERA_A_KEY], source[VERA_B_KEY]
        slice_projections(self.vera_A, self.vera_B, self.layer.in_features, self.layer.out_features, where=self.name)
        r = int(self.vera_A.shape[0])
        if r != self.config.r:
            raise ShapeError(f"{self.name}: the shared vera_A {tuple(self.vera_A.shape)} has rank {r} but the config "
                             f"has r={self.config.r}")
        _check_lambdas(self.lambda_b, self.lambda_d, self.vera_A, self.layer.out_features, self.name)

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        return delta_weight(self.lambda_b, self.lambda_d, self.vera_A, self.vera_B, layer=self.layer,
                            peft_compat=peft_compat)

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        new = _apply(weight, self.lambda_b, self.lambda_d, self.vera_A, self.vera_B, sign=1, layer=self.layer,
                     copy=copy, safe=safe, peft_compat=peft_compat, where=self.name)
        return MergeResult(new, bias)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        new = _apply(weight, self.lambda_b, self.lambda_d, self.vera_A, self.vera_B, sign=-1, layer=self.layer,
                     copy=copy, safe=False, peft_compat=peft_compat, where=self.name)
        return MergeResult(new, bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, kw = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.lambda_b, self.lambda_d, self.vera_A, self.vera_B, bias=bias,
                       layer=layer, **kw)

    def num_parameters(self) -> int:
        """Trainable scalars: ``out + r`` (the shared projections are frozen and not counted)."""
        return int(self.lambda_b.shape[0]) + int(self.lambda_d.shape[0])


#: checkpoint suffixes of this method's per-module tensors (ParameterDict entries: no ".weight")
PARAMETER_SUFFIXES = ("vera_lambda_b", "vera_lambda_d")
Config = VeraConfig
Module = VeraModule
#: demo / documentation examples: row label -> config fields (non-trivial: random λ, a small rank)
EXAMPLES = {
    "VeRA": dict(r=16, init_weights=False, projection_prng_key=7),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=VeraConfig, module=VeraModule, spec="specs/vera.md",
    parameter_suffixes=PARAMETER_SUFFIXES, shared_keys=SHARED_KEYS, layer_kinds=VeraModule.supported_kinds,
    additive=True, init_field="init_weights", examples=EXAMPLES, init_shared=init_shared,
)
