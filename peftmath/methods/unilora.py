r"""Uni-LoRA: every LoRA factor entry of a model read from one trained vector (Li et al., "Uni-LoRA: One
Vector Is All You Need", 2025).

All adapted layers share one vector ``θ_d`` of length ``d`` (``theta_d_length``), the only trained tensor.
Each entry of each layer's LoRA factors is one entry of ``θ_d`` at a fixed random index, times a fixed
scale that normalises how often that index is used over the whole model::

    θ_d (d,)                                      base_model.unilora_theta_d, shared, trained
    I_A (r, in), I_B (out, r)   integer indices  unilora_indices_A / _B, per module, fixed
    s_A (r, in), s_B (out, r)   scales           unilora_scales_A / _B, per module, fixed
    A = θ_d[I_A] ⊙ s_A          B = θ_d[I_B] ⊙ s_B
    ΔW = B A (out, in)          y = x Wᵀ + b + (d(x) Aᵀ) Bᵀ

The indices of all layers together (A then B of each layer, layers in the model's module order) are a
balanced assignment: each of the ``d`` indices appears ``⌊D/d⌋`` or ``⌈D/d⌉`` times over the ``D`` factor
entries, shuffled by ``proj_seed`` (:func:`generate_index`); an index used ``c`` times has scale ``1/√c``.
There is no other scaling factor. A transformers ``Conv1D`` stores ``ΔW`` transposed, ``(in, out)``.
Merge ``W + ΔW``, unmerge ``W − ΔW`` (exact up to one rounding).

PEFT saves the indices and scales only with ``save_indices=True``; by default (``False``) a checkpoint
holds ``θ_d`` alone and PEFT regenerates the rest from the model's module order, which a checkpoint does
not record: peftmath refuses such a checkpoint (:func:`validate_checkpoint`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from .._array import as_compute, compute_dtype, namespace, refuse_where
from ..backends import backend_for, host_rng
from ..config import (
    TunerConfig,
    check_choice,
    check_flags,
    check_fraction,
    check_number,
    check_positive_int,
)
from ..errors import CheckpointError, ConfigError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._base import (
    ModuleAdapter,
    SignedModuleAdapter,
    apply_delta,
    check_shape,
    orient_2d,
    require_kind,
)
from ._contract import Method

Array = Any

__all__ = [
    "UniLoraConfig",
    "generate_index",
    "assign",
    "factors",
    "delta_weight",
    "forward",
    "merge",
    "unmerge",
    "init_theta",
    "init_shared",
    "regenerate",
    "validate_checkpoint",
    "UniLoraModule",
]

PEFT_TYPE = "UNILORA"
#: checkpoint key of the shared vector (PEFT: ``base_model.unilora_theta_d.<adapter>`` without the name)
THETA_KEY = "base_model.unilora_theta_d"
SHARED_KEYS = (THETA_KEY,)
INDICES = ("unilora_indices_A", "unilora_indices_B")
SCALES = ("unilora_scales_A", "unilora_scales_B")
PARAMETER_SUFFIXES = INDICES + SCALES
SUPPORTED_KINDS = (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED)
#: init_shared's private plan (each layer's indices and scales), read and removed by UniLoraModule.initialize
_PLAN = "peftmath.unilora.plan"


# --------------------------------------------------------------------------------------------------
# Config (specs/unilora.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class UniLoraConfig(TunerConfig):
    """PEFT's ``UniLoraConfig`` (``peft_type: "UNILORA"``). ``save_indices`` says whether the checkpoint
    holds the indices and scales (peftmath reads and writes only those that do)."""

    peft_type: ClassVar[str] = "UNILORA"
    absent_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)  # not a field of PEFT's config

    r: int = 4
    proj_seed: int = 42
    theta_d_length: int = 256
    unilora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_theta_d_bound: float = 0.02
    init_weights: bool = True
    save_indices: bool = False

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "r", self.r)
        check_positive_int(source, "theta_d_length", self.theta_d_length)
        if not isinstance(self.proj_seed, int) or isinstance(self.proj_seed, bool) or self.proj_seed < 0:
            raise ConfigError(f"{source}: field 'proj_seed' must be a non-negative integer (a NumPy seed), got "
                              f"{self.proj_seed!r}")
        check_fraction(source, "unilora_dropout", self.unilora_dropout, closed=True)
        check_flags(source, self, "fan_in_fan_out", "init_weights", "save_indices")
        check_number(source, "init_theta_d_bound", self.init_theta_d_bound)
        if self.init_theta_d_bound <= 0:
            raise ConfigError(f"{source}: field 'init_theta_d_bound' must be positive, got {self.init_theta_d_bound!r}")
        check_choice(source, "bias", self.bias, ("none", "all", "unilora_only"))



# --------------------------------------------------------------------------------------------------
# The index assignment (specs/unilora.md, "2. Indices and scales")
# --------------------------------------------------------------------------------------------------
def generate_index(count: int, length: int, seed: int) -> np.ndarray:
    """PEFT's balanced assignment of ``count`` factor entries to the ``length`` entries of ``θ_d`` (int64):
    each index ``⌊count/length⌋`` times, plus ``count mod length`` distinct extra indices
    (``rng.choice(length, size=rest, replace=False)``), shuffled (``rng.shuffle``), with
    ``rng = numpy.random.default_rng(seed)``: the same numbers as PEFT's ``UniLoraModel.generate_index``.

    >>> np.bincount(generate_index(10, 4, 0), minlength=4).tolist() in ([3, 3, 2, 2], [3, 2, 3, 2], [3, 2, 2, 3],
    ...                                                                [2, 3, 3, 2], [2, 3, 2, 3], [2, 2, 3, 3])
    True
    """
    if count < 0 or length <= 0:
        raise ConfigError(f"unilora.generate_index: count {count} must be >= 0 and theta_d_length {length} > 0")
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(length), count // length)
    if count % length:
        data = np.concatenate([data, rng.choice(length, size=count % length, replace=False)])
    rng.shuffle(data)
    return data.astype(np.int64)


def assign(layers: Iterable[Layer], config: UniLoraConfig) -> list[dict[str, np.ndarray]]:
    """The indices and scales of ``layers`` (the model's module order), as PEFT assigns them: one
    :func:`generate_index` over all factor entries, cut in order into ``I_A (r, in)`` then ``I_B (out, r)`` of
    each layer; the scale of an index used ``c`` times is ``1/√c`` (float32), ``s_A = scale[I_A]``,
    ``s_B = scale[I_B]``.

    >>> out = assign([Layer.of((3, 2))], UniLoraConfig(r=1, theta_d_length=4))
    >>> [a.shape for a in out[0].values()]
    [(1, 2), (3, 1), (1, 2), (3, 1)]
    """
    seq = list(layers)
    r = config.r
    sizes = [(r * lay.in_features, lay.out_features * r) for lay in seq]
    idx = generate_index(sum(a + b for a, b in sizes), config.theta_d_length, config.proj_seed)
    counts = np.bincount(idx, minlength=config.theta_d_length)
    inv = np.zeros(config.theta_d_length, np.float32)
    used = counts > 0
    inv[used] = (np.float32(1.0) / np.sqrt(counts[used].astype(np.float32))).astype(np.float32)
    out, at = [], 0
    for lay, (na, nb) in zip(seq, sizes):
        ia = idx[at:at + na].reshape(r, lay.in_features)
        ib = idx[at + na:at + na + nb].reshape(lay.out_features, r)
        at += na + nb
        out.append({"unilora_indices_A": ia, "unilora_indices_B": ib,
                    "unilora_scales_A": inv[ia], "unilora_scales_B": inv[ib]})
    return out


# --------------------------------------------------------------------------------------------------
# Factors and delta weight (specs/unilora.md, "3. Factors and the delta weight")
# --------------------------------------------------------------------------------------------------
def factors(theta: Array, ia: Array, ib: Array, sa: Array, sb: Array, *, dtype: Any = None) -> tuple[Array, Array]:
    """``A = θ_d[I_A] ⊙ s_A`` ``(r, in)`` and ``B = θ_d[I_B] ⊙ s_B`` ``(out, r)`` in ``dtype`` (default: the
    compute dtype of ``θ_d`` and the scales).

    >>> import numpy as np
    >>> A, B = factors(np.array([1.0, 2.0]), np.array([[1, 0]]), np.array([[0], [1]]), np.ones((1, 2)),
    ...                np.full((2, 1), 0.5))
    >>> A.tolist(), B.tolist()
    ([[2.0, 1.0]], [[0.5], [1.0]])
    """
    xp = namespace(theta, sa, sb, where="unilora.factors")
    if ia.shape != sa.shape or ib.shape != sb.shape or ia.ndim != 2 or ib.ndim != 2 or ia.shape[0] != ib.shape[1]:
        raise ShapeError(f"unilora.factors: indices A {tuple(ia.shape)} / B {tuple(ib.shape)} and scales A "
                         f"{tuple(sa.shape)} / B {tuple(sb.shape)} must be (r, in) and (out, r) in pairs")
    cd = dtype or compute_dtype(xp, theta.dtype, sa.dtype, sb.dtype)
    t = as_compute(xp, theta, cd)

    def pick(i: Array, s: Array) -> Array:
        flat = xp.take(t, xp.reshape(xp.astype(i, xp.int64), (-1,)), axis=0)
        return xp.reshape(flat, tuple(i.shape)) * as_compute(xp, s, cd)

    return pick(ia, sa), pick(ib, sb)


def _layer_of(A: Array, B: Array, kind: LayerKind | str | None) -> Layer:
    k = LayerKind.parse(kind or LayerKind.LINEAR)
    out, inn = int(B.shape[0]), int(A.shape[1])
    return Layer(k, (inn, out) if k is LayerKind.CONV1D_TRANSPOSED else (out, inn))


def delta_weight(theta: Array, ia: Array, ib: Array, sa: Array, sb: Array, *,
                 layer: Layer | LayerKind | str | None = None, scale: float = 1.0) -> Array:
    """``ΔW = B A`` in the base weight's stored layout (``(in, out)`` for a Conv1D), compute dtype.

    >>> import numpy as np
    >>> delta_weight(np.array([1.0, 2.0]), np.array([[1, 0]]), np.array([[0], [1]]), np.ones((1, 2)),
    ...              np.ones((2, 1))).tolist()
    [[2.0, 1.0], [4.0, 2.0]]
    """
    xp = namespace(theta, sa, sb, where="unilora.delta_weight")
    A, B = factors(theta, ia, ib, sa, sb)
    lay = layer if isinstance(layer, Layer) else _layer_of(A, B, layer)
    _check("unilora.delta_weight", lay, A, B)
    return lay.from_matrix(xp.matmul(B if scale == 1.0 else B * scale, A), xp)


def _check(where: str, lay: Layer, A: Array, B: Array) -> None:
    if tuple(A.shape) != (A.shape[0], lay.in_features) or tuple(B.shape) != (lay.out_features, A.shape[0]):
        raise ShapeError(f"{where}: factors A {tuple(A.shape)} and B {tuple(B.shape)} do not fit the "
                         f"{lay.kind.value} weight {lay.weight_shape}: expected (r, {lay.in_features}) and "
                         f"({lay.out_features}, r)")


# --------------------------------------------------------------------------------------------------
# Forward (specs/unilora.md, "4. Forward")
# --------------------------------------------------------------------------------------------------
def forward(x: Array, W: Array, theta: Array, ia: Array, ib: Array, sa: Array, sb: Array, *,
            bias: Array | None = None, layer: Layer | LayerKind | str | None = None,
            dropout: Callable[[Array], Array] | None = None, scale: float = 1.0, peft_compat: bool = False) -> Array:
    """``x Wᵀ + b + (d(x) Aᵀ) Bᵀ`` (Conv1D: ``x W + b + ...``); ``peft_compat`` rounds the base output to the
    storage dtype before the adapter term is added, as PEFT does.

    >>> import numpy as np
    >>> forward(np.ones((1, 2)), np.zeros((2, 2)), np.array([1.0, 2.0]), np.array([[1, 0]]),
    ...         np.array([[0], [1]]), np.ones((1, 2)), np.ones((2, 1))).tolist()
    [[3.0, 6.0]]
    """
    xp = namespace(x, W, theta, sa, sb, bias, where="unilora.forward")
    lay = Layer.for_weight(layer, W)
    require_kind(lay, "unilora.forward", "UniLoRA", SUPPORTED_KINDS, error=ShapeError)
    lay.check_bias(bias)
    lay.for_input(x, "unilora.forward")
    out_dtype = xp.result_type(x.dtype, W.dtype)
    cd = compute_dtype(xp, x.dtype, W.dtype, theta.dtype)
    A, B = factors(theta, ia, ib, sa, sb, dtype=cd)
    _check("unilora.forward", lay, A, B)
    xc = as_compute(xp, x, cd)
    base = lay.base_forward(xc, as_compute(xp, W, cd), None if bias is None else as_compute(xp, bias, cd), xp)
    if peft_compat:
        base = as_compute(xp, as_compute(xp, base, out_dtype), cd)
    xd = xc if dropout is None else dropout(xc)
    lo = xp.matmul(xp.matmul(xd, xp.matrix_transpose(A)), xp.matrix_transpose(B))
    return as_compute(xp, base + (lo if scale == 1.0 else lo * scale), out_dtype)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge (specs/unilora.md, "5. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def _apply(W: Array, theta: Array, ia: Array, ib: Array, sa: Array, sb: Array, *, sign: int,
           layer: Layer | LayerKind | str | None, scale: float, copy: bool, safe: bool, peft_compat: bool,
           where: str) -> Array:
    xp = namespace(W, theta, sa, sb, where=where)
    lay = Layer.for_weight(layer, W)
    require_kind(lay, where, "UniLoRA", SUPPORTED_KINDS, error=ShapeError)
    cd = compute_dtype(xp, W.dtype, theta.dtype, sa.dtype, sb.dtype)
    A, B = factors(theta, ia, ib, sa, sb, dtype=cd)  # O(r (in + out)): never W's size
    _check(where, lay, A, B)
    Bs = B if scale == 1.0 else B * scale

    def delta() -> Array:
        return lay.from_matrix(xp.matmul(Bs, A), xp)

    def kernel(M: Array) -> bool:  # M ± B A: BLAS gemm with beta = 1, no temporary of W's size
        return backend_for(xp).addmm_(M, Bs, A, float(sign))

    return apply_delta(where, W, delta, sign=sign, copy=copy, safe=safe, layer=lay, inplace_kernel=kernel,
                       round_delta_to=W.dtype if peft_compat else None, xp=xp)


def merge(W: Array, theta: Array, ia: Array, ib: Array, sa: Array, sb: Array, *,
          layer: Layer | LayerKind | str | None = None, scale: float = 1.0, copy: bool = True, safe: bool = False,
          peft_compat: bool = False) -> Array:
    """``W + ΔW``, formed in float32 (float64) and rounded once to ``W``'s dtype; ``peft_compat`` rounds ``ΔW``
    to ``W``'s dtype first, as PEFT does. ``copy=False`` writes into ``W`` (BLAS gemm with ``beta = 1`` on
    NumPy: no temporary of W's size).

    >>> import numpy as np
    >>> W = np.zeros((2, 2), dtype=np.float32)
    >>> merge(W, np.array([1.0, 2.0]), np.array([[1, 0]]), np.array([[0], [1]]), np.ones((1, 2)),
    ...       np.ones((2, 1)), copy=False) is W, W[1]
    (True, array([4., 2.], dtype=float32))
    """
    return _apply(W, theta, ia, ib, sa, sb, sign=1, layer=layer, scale=scale, copy=copy, safe=safe,
                  peft_compat=peft_compat, where="unilora.merge")


def unmerge(W: Array, theta: Array, ia: Array, ib: Array, sa: Array, sb: Array, *,
            layer: Layer | LayerKind | str | None = None, scale: float = 1.0, copy: bool = True,
            peft_compat: bool = False) -> Array:
    """``W − ΔW``, the inverse of :func:`merge` up to one rounding (same keywords)."""
    return _apply(W, theta, ia, ib, sa, sb, sign=-1, layer=layer, scale=scale, copy=copy, safe=False,
                  peft_compat=peft_compat, where="unilora.unmerge")


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/unilora.md, "6. Initialisation")
# --------------------------------------------------------------------------------------------------
def _put(a: np.ndarray, xp: Any, device: Any, dtype: Any) -> Array:
    out = backend_for(xp).from_host(np.ascontiguousarray(a), xp, device)
    return out if dtype is None or out.dtype == dtype else xp.astype(out, dtype)


def init_theta(config: UniLoraConfig, *, seed: int | np.random.Generator | None = 0, xp: Any = None,
               device: Any = None, dtype: Any = None) -> Array:
    """A fresh ``θ_d (theta_d_length,)``: ``U(±init_theta_d_bound)`` for ``init_weights=True``, ``N(0, 1)``
    otherwise (PEFT's distributions), drawn on the host from ``seed`` (float32 unless ``dtype``)."""
    if xp is None:
        import array_api_compat.numpy as xp
    rng, n = host_rng(seed), config.theta_d_length
    host = rng.uniform(-config.init_theta_d_bound, config.init_theta_d_bound, n) if config.init_weights \
        else rng.standard_normal(n)
    return _put(host.astype(np.float32), xp, device, dtype)


def _require_saved_indices(config: UniLoraConfig, where: str) -> None:
    if not config.save_indices:
        raise UnsupportedError(
            f"{where}: save_indices=False: PEFT does not keep a UniLoRA adapter's indices and scales but regenerates "
            f"them, whenever it loads the adapter, from proj_seed and the order of the adapted modules in the model, "
            f"which a checkpoint does not record (a safetensors file sorts its tensors by name); peftmath cannot know "
            f"that order. Save the adapter with save_indices=True (PEFT then keeps the indices and scales it used), or, "
            f"knowing the model's order, rebuild them with peftmath.methods.unilora.regenerate")


def init_shared(config: UniLoraConfig, layers: Iterable[Layer] | Mapping[str, Layer] = (), *,
                seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                dtype: Any = None) -> dict[str, Any]:
    """``{base_model.unilora_theta_d: θ_d}`` (:func:`init_theta`) for ``layers`` (the model's module order).

    The dict also holds a private plan of each layer's indices and scales (:func:`assign`, over all of
    ``layers``) that :meth:`UniLoraModule.initialize` reads and removes: initialise every layer given here,
    the same ``Layer`` objects, before building the adapter."""
    seq = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
    out: dict[str, Any] = {THETA_KEY: init_theta(config, seed=seed, xp=xp, device=device, dtype=dtype)}
    if seq:
        out[_PLAN] = {id(lay): part for lay, part in zip(seq, assign(seq, config))}
    return out


def regenerate(config: UniLoraConfig, layers: Mapping[str, Layer], *, xp: Any = None, device: Any = None,
               dtype: Any = None) -> tuple[UniLoraConfig, dict[str, dict[str, Array]]]:
    """``(config with save_indices=True, {module: indices and scales})`` for a checkpoint PEFT saved with
    ``save_indices=False`` (``θ_d`` only), given its adapted ``layers`` **in the model's module order**
    (``named_modules``; a ``torch`` model's ``state_dict()`` keeps it, a safetensors file does not): the
    assignment PEFT regenerates when it loads that checkpoint into that model (:func:`assign`). The order is
    the caller's statement; peftmath cannot check it. Scales in ``dtype`` (the weight's, as PEFT stores them;
    default float32). ``Adapter(config, params, shared={THETA_KEY: θ_d})`` is then the adapter PEFT runs.

    >>> cfg, params = regenerate(UniLoraConfig(r=1, theta_d_length=4), {"b": Layer.of((3, 2)), "a": Layer.of((2, 3))})
    >>> cfg.save_indices, list(params), params["b"]["unilora_indices_A"].shape
    (True, ['b', 'a'], (1, 2))
    """
    if xp is None:
        import array_api_compat.numpy as xp
    parts = assign(list(layers.values()), config)
    params = {name: {k: _put(part[k], xp, device, dtype if k in SCALES else None) for k in PARAMETER_SUFFIXES}
              for name, part in zip(layers, parts)}
    return config.replace(save_indices=True), params


def validate_checkpoint(config: UniLoraConfig, shared: Mapping[str, Array]) -> None:
    """A loaded checkpoint: ``save_indices=True`` (else refused: :class:`UnsupportedError` with the reason),
    and ``θ_d`` of length ``theta_d_length``."""
    _require_saved_indices(config, "UniLoRA checkpoint")
    if THETA_KEY not in shared:
        raise CheckpointError(f"UniLoRA checkpoint: no {THETA_KEY} (PEFT always saves it)")
    if tuple(shared[THETA_KEY].shape) != (config.theta_d_length,):
        raise ShapeError(f"{THETA_KEY} has shape {tuple(shared[THETA_KEY].shape)}, the config says "
                         f"theta_d_length={config.theta_d_length}")


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
class UniLoraModule(SignedModuleAdapter):
    """UniLoRA on one base module: its indices and scales, and the shared ``θ_d``
    (``self.shared[THETA_KEY]``, or among its own params for an adapter of one module)."""

    peft_type = "UNILORA"
    additive = True
    supported_kinds = SUPPORTED_KINDS
    #: ``scaled(c)`` multiplies this (ΔW → c·ΔW; PEFT has no UniLoRA scale)
    scaling: float = 1.0

    @classmethod
    def initialize(cls, name: str, config: UniLoraConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None,
                   shared: MutableMapping[str, Any] | None = None) -> tuple[dict[str, Array], Array | None]:
        """The indices and scales of module ``name``: from the plan init_shared made for ``layer``, or, without
        one, as for the only adapted layer of a model (:func:`assign` of ``[layer]``). Without ``shared=``,
        ``θ_d`` is returned among the params. Needs ``save_indices=True`` (see :func:`validate_checkpoint`)."""
        require_kind(layer, name, "UniLoRA", SUPPORTED_KINDS, peft="PEFT raises TypeError for others",
                     error=ShapeError)
        _require_saved_indices(config, name)
        if init is not None:
            raise ConfigError(f"{name}: UniLoRA's initialisation is config.init_weights; got init={init!r}")
        if xp is None:
            xp = namespace(weight) if weight is not None else None
        if xp is None:
            import array_api_compat.numpy as xp
        plan = shared.get(_PLAN) if shared is not None else None
        if plan is not None:
            if id(layer) not in plan:
                raise ConfigError(f"{name}: init_shared was given other layers; initialise each layer it was given")
            part = plan.pop(id(layer))
            if not plan:
                del shared[_PLAN]
        else:
            part = assign([layer], config)[0]
        fdt = dtype if dtype is not None else (weight.dtype if weight is not None else None)
        params = {k: _put(part[k], xp, device, None) for k in INDICES}
        params.update({k: _put(part[k], xp, device, fdt) for k in SCALES})
        if shared is None:
            params[THETA_KEY] = init_theta(config, seed=seed, xp=xp, device=device)
        elif THETA_KEY not in shared:
            shared[THETA_KEY] = init_theta(config, seed=seed, xp=xp, device=device)
        return params, None

    @classmethod
    def infer_layer(cls, name: str, config: UniLoraConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """``out = I_B.shape[0]``, ``in = I_A.shape[1]``: a weight ``(out, in)`` is a Linear, ``(in, out)`` a
        Conv1D; a square one follows ``kind`` or the config's ``fan_in_fan_out``."""
        if any(k not in params for k in INDICES):
            raise ShapeError(f"{name}: a UniLoRA module needs {' and '.join(INDICES)} (saved with save_indices=True), "
                             f"found {sorted(params)}")
        A, B = params["unilora_indices_A"], params["unilora_indices_B"]
        out, inn = int(B.shape[0]), int(A.shape[1])
        if kind is not None or weight_shape is None:
            fallback = LayerKind.CONV1D_TRANSPOSED if config.fan_in_fan_out else LayerKind.LINEAR
            return _layer_of(A, B, kind if kind is not None else fallback)
        shape = tuple(int(s) for s in weight_shape)
        if len(shape) != 2:
            return Layer.of(shape)
        return orient_2d(name, shape, out, inn, config.fan_in_fan_out, "these UniLoRA indices")

    def validate(self) -> None:
        require_kind(self.layer, self.name, "UniLoRA", SUPPORTED_KINDS, peft="PEFT raises TypeError for others",
                     error=ShapeError)
        missing = [k for k in PARAMETER_SUFFIXES if k not in self.params]
        if missing:
            raise CheckpointError(f"{self.name}: UniLoRA needs {', '.join(missing)} (PEFT saves them with "
                                  f"save_indices=True), not in the checkpoint")
        source = self.shared if THETA_KEY in self.shared else self.params
        if THETA_KEY not in source:
            raise CheckpointError(f"{self.name}: the UniLoRA vector {THETA_KEY} is not in the checkpoint (PEFT always "
                                  f"saves it)")
        self.theta = source[THETA_KEY]
        d = self.config.theta_d_length
        if tuple(self.theta.shape) != (d,):
            raise ShapeError(f"{self.name}: {THETA_KEY} has shape {tuple(self.theta.shape)}, the config says "
                             f"theta_d_length={d}")
        r, lay = self.config.r, self.layer
        want = {"unilora_indices_A": (r, lay.in_features), "unilora_indices_B": (lay.out_features, r)}
        want.update({"unilora_scales_A": want["unilora_indices_A"], "unilora_scales_B": want["unilora_indices_B"]})
        for k, shape in want.items():
            check_shape(self.name, k, self.params[k], shape)
        xp = self.xp
        self.indices = []
        for k in INDICES:
            i = self.params[k]
            # value checks through refuse_where: now on eager arrays, in the task graph on lazy ones (no compute)
            if xp.isdtype(i.dtype, "real floating"):  # a float copy of the indices: whole numbers only
                i = refuse_where(i, i != xp.round(i), lambda k=k: CheckpointError(
                    f"{self.name}: {k} holds non-integer values; they index {THETA_KEY}"), xp=xp)
                i = xp.astype(i, xp.int64)
            elif not xp.isdtype(i.dtype, "integral"):
                raise CheckpointError(f"{self.name}: {k} must hold integers (indices into {THETA_KEY}), got "
                                      f"{i.dtype}")
            if math.prod(i.shape):
                i = refuse_where(i, (i < 0) | (i >= d), lambda k=k: CheckpointError(
                    f"{self.name}: {k} holds indices outside 0..{d - 1} (theta_d_length={d})"), xp=xp)
            self.indices.append(i)

    def scaled(self, c: float) -> "ModuleAdapter":
        """Scale ``c``: ``ΔW → c·ΔW`` (PEFT defines no UniLoRA scale)."""
        return self.scale_scaling(c)

    def _tensors(self) -> tuple[Array, ...]:
        return (self.theta, *self.indices, *(self.params[k] for k in SCALES))

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        return delta_weight(*self._tensors(), layer=self.layer, scale=self.scaling)

    def _apply(self, weight: Array, sign: int, *, copy: bool, safe: bool, peft_compat: bool) -> Array:
        """``W ± ΔW`` through the module-level kernel (merge and unmerge of :class:`SignedModuleAdapter`)."""
        return _apply(weight, *self._tensors(), sign=sign, layer=self.layer, scale=self.scaling, copy=copy, safe=safe,
                      peft_compat=peft_compat, where=self.name)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, kw = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, *self._tensors(), bias=bias, layer=layer, scale=self.scaling, **kw)

    def describe(self) -> dict[str, Any]:
        return {"r": self.config.r, "theta_d_length": self.config.theta_d_length}

    def num_parameters(self) -> int:
        """Trainable scalars of this module: none of its own (its indices and scales are fixed; ``θ_d`` is
        counted once by the adapter's shared tensors)."""
        return 0


Config = UniLoraConfig
Module = UniLoraModule
#: demo / documentation examples (non-trivial: θ_d drawn N(0, 1), r = 3, few entries so that indices repeat)
EXAMPLES = {
    "UniLoRA": dict(r=3, theta_d_length=37, init_weights=False, save_indices=True),
}

#: the method's description (peftmath.methods._contract.Method)
METHOD = Method(
    peft_type=PEFT_TYPE, config=UniLoraConfig, module=UniLoraModule, spec="specs/unilora.md",
    parameter_suffixes=PARAMETER_SUFFIXES, shared_keys=SHARED_KEYS, layer_kinds=SUPPORTED_KINDS, additive=True,
    init_field="init_weights", examples=EXAMPLES, init_shared=init_shared, validate_checkpoint=validate_checkpoint,
    frozen_suffixes=PARAMETER_SUFFIXES, trainable_shared=SHARED_KEYS,
)
