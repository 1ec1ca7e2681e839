r"""RandLoRA: a full-rank update from shared random bases (Albert et al., ICLR 2025).

Two frozen random bases are shared by every adapted layer; a layer trains a small matrix ``λ`` and a
matrix ``γ`` that scale them, and the update has full rank ``min(out, in)``::

    randlora_A: (r, 1, D_min)     randlora_B: (D_max, N, r)          shared, frozen, saved
    m = min(out, in), M = max(out, in), n = ceil(m / r)                per layer (n ≤ N)
    λ: (r, n)     γ: (n, m)                                           randlora_lambda / randlora_gamma
    U_B = randlora_B[:M, :n, :] flattened to (M, n·r)                 column c = basis c // r, rank c % r
    U_A[c, :] = λ[k, j] · randlora_A[k, 0, :m] ⊙ γ[j, :],   k = c // n, j = c % n     (n·r, m)
    D = U_B U_A (M, m);   ΔW = s·D (out, in) when in ≤ out, else s·Dᵀ;   s = randlora_alpha / r

The two flattenings pair ``U_B``'s column ``c`` with ``(k, j) = divmod(c, n)`` of ``U_A``, as PEFT's code
does; the bases are random, so this fixed pairing is as good as any (specs/randlora.md). For a
transformers ``Conv1D`` ΔW is stored transposed. Merge ``W + ΔW``, unmerge ``W − ΔW``.

PEFT saves the bases once (``base_model.randlora_A`` / ``_B``) and again under every adapted module (each
layer holds a reference to them); peftmath reads both and refuses copies that differ. A checkpoint saved
with ``save_projection=False`` has no bases (PEFT regenerates them from a torch generator) and is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from .._array import (
    as_compute,
    compute_dtype,
    is_low_precision,
    namespace,
    refuse_where,
)
from ..backends import backend_for, host_rng
from ..config import (
    TunerConfig,
    check_choice,
    check_flags,
    check_fraction,
    check_number,
    check_positive_int,
)
from ..errors import BackendError, CheckpointError, ConfigError, ShapeError
from ..layers import Layer, LayerKind
from ._base import (
    ModuleAdapter,
    SignedModuleAdapter,
    apply_delta,
    check_shape,
    require_kind,
    start_shared_init,
)
from ._contract import Method

Array = Any

__all__ = ["RandLoraConfig", "num_bases", "init_bases", "init_shared", "init_weights", "factors", "delta_weight",
           "forward", "merge", "unmerge", "RandLoraModule"]

PEFT_TYPE = "RANDLORA"
A_KEY = "base_model.randlora_A"
B_KEY = "base_model.randlora_B"
SHARED_KEYS = (A_KEY, B_KEY)
#: the per-module references to the shared bases that PEFT's state dict (and checkpoint) repeats
COPIES = {"randlora_A": A_KEY, "randlora_B": B_KEY}
SUPPORTED_KINDS = (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED)
_PEFT_KINDS = "PEFT raises ValueError for others"


# --------------------------------------------------------------------------------------------------
# Config (specs/randlora.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class RandLoraConfig(TunerConfig):
    """PEFT's ``RandLoraConfig`` (``peft_type: "RANDLORA"``). PEFT's RandLoraConfig has no
    ``exclude_modules``; it is left out of the written config while unset."""

    peft_type: ClassVar[str] = "RANDLORA"

    r: int = 32
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    randlora_alpha: float = 640
    bias: str = "none"
    init_weights: bool = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "r", self.r)
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ConfigError(f"{source}: field 'projection_prng_key' must be an integer, got {self.projection_prng_key!r}")
        check_flags(source, self, "save_projection", "sparse", "very_sparse", "fan_in_fan_out", "init_weights")
        check_fraction(source, "randlora_dropout", self.randlora_dropout)
        check_number(source, "randlora_alpha", self.randlora_alpha)
        check_choice(source, "bias", self.bias, ("none", "all", "randlora_only"))

    @property
    def scaling(self) -> float:
        """``s = randlora_alpha / r``."""
        return self.randlora_alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("exclude_modules") is None:  # not a field of PEFT's RandLoraConfig
            out.pop("exclude_modules", None)
        return out


# --------------------------------------------------------------------------------------------------
# Shapes (specs/randlora.md, "2. Shapes")
# --------------------------------------------------------------------------------------------------
def num_bases(m: int, r: int) -> int:
    """``n = ceil(m / r)``: enough bases of rank ``r`` for full rank ``m``.

    >>> num_bases(10, 4), num_bases(8, 4)
    (3, 2)
    """
    return -(-int(m) // int(r))


def _check(where: str, layer: Layer, lam: Array, gamma: Array, A: Array, B: Array) -> tuple[int, int, int, int]:
    """``(r, n, m, M)`` after checking every shape against the layer."""
    m, M = min(layer.out_features, layer.in_features), max(layer.out_features, layer.in_features)
    if A.ndim != 3 or A.shape[1] != 1 or B.ndim != 3 or A.shape[0] != B.shape[2]:
        raise ShapeError(f"{where}: randlora_A {tuple(A.shape)} and randlora_B {tuple(B.shape)} are not "
                         f"(r, 1, D_min) and (D_max, N, r) with one r")
    r = int(A.shape[0])
    n = num_bases(m, r)
    if A.shape[2] < m or B.shape[0] < M or B.shape[1] < n:
        raise ShapeError(f"{where}: the layer (out={layer.out_features}, in={layer.in_features}) needs bases covering "
                         f"D_min >= {m}, D_max >= {M} and {n} bases of rank {r}, but randlora_A is {tuple(A.shape)} and "
                         f"randlora_B {tuple(B.shape)}; the bases must be sized to the largest adapted layer")
    check_shape(where, "randlora_lambda", lam, (r, n))
    check_shape(where, "randlora_gamma", gamma, (n, m))
    return r, n, m, M


# --------------------------------------------------------------------------------------------------
# Factors, delta, forward (specs/randlora.md, "3. Delta, forward")
# --------------------------------------------------------------------------------------------------
def factors(lam: Array, gamma: Array, A: Array, B: Array, *, layer: Layer, dtype: Any = None) -> tuple[Array, Array]:
    """``(P (out, n·r), Q (n·r, in))`` with ``ΔW = s · P Q`` in the ``(out, in)`` frame: ``(U_B, U_A)`` when
    ``in ≤ out``, ``(U_Aᵀ, U_Bᵀ)`` otherwise; in ``dtype`` (float32, float64 for float64 inputs).

    >>> import numpy as np
    >>> A = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])                 # r = 2, D_min = 2: one basis (n = 1)
    >>> B = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])   # D_max = 3
    >>> P, Q = factors(np.array([[2.0], [3.0]]), np.ones((1, 2)), A, B, layer=Layer.of((3, 2)))
    >>> P.tolist(), Q.tolist()
    ([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 3.0]])
    """
    return _factor_block(lam, gamma, A, B, layer, 0, None, dtype, "randlora.factors")


def _factor_block(lam: Array, gamma: Array, A: Array, B: Array, layer: Layer, k0: int, k1: int | None, dtype: Any,
                  where: str) -> tuple[Array, Array]:
    """The columns / rows ``c ∈ [k0·n, k1·n)`` of ``(P, Q)`` (all of them for ``k1 = None``): ``U_A``'s rows of
    ranks ``k0 .. k1 − 1`` and the matching columns of ``U_B``, a view of the shared ``randlora_B``."""
    xp = namespace(lam, gamma, A, B, where=where)
    r, n, m, M = _check(where, layer, lam, gamma, A, B)
    k1 = r if k1 is None else k1
    cd = dtype or compute_dtype(xp, lam.dtype, gamma.dtype, A.dtype, B.dtype)
    # U_B's column c is randlora_B[:M, c // r, c % r]: the leading n·r columns of randlora_B[:M] flattened
    UB = xp.reshape(B[:M, ...], (M, int(B.shape[1]) * r))[:, k0 * n:k1 * n]
    UB = as_compute(xp, UB, cd)
    UA = as_compute(xp, lam[k0:k1, :], cd)[:, :, None] * as_compute(xp, A[k0:k1, :, :m], cd) \
        * as_compute(xp, gamma, cd)[None, :, :]
    UA = xp.reshape(UA, ((k1 - k0) * n, m))
    if layer.in_features <= layer.out_features:
        return UB, UA
    return xp.matrix_transpose(UA), xp.matrix_transpose(UB)


def _layer(layer: Layer | LayerKind | str | None, W: Array | None, where: str) -> Layer:
    if isinstance(layer, Layer):
        lay = layer
    elif W is not None:
        lay = Layer.of(tuple(W.shape), layer)
    else:
        raise ShapeError(f"{where}: RandLoRA's tensors do not give the layer's in and out sizes; pass layer=Layer.of("
                         f"weight shape, kind)")
    require_kind(lay, where, "RandLoRA", SUPPORTED_KINDS, peft=_PEFT_KINDS, error=ShapeError)
    return lay


def delta_weight(lam: Array, gamma: Array, A: Array, B: Array, *, scaling: float,
                 layer: Layer | LayerKind | str | None = None) -> Array:
    """``ΔW = s · P Q`` in the stored layout (``(out, in)``, or ``(in, out)`` for Conv1D), in float32
    (float64 for float64 inputs); ``layer`` is required (``Layer.of(weight_shape, kind)``).

    >>> import numpy as np
    >>> A = np.array([[[1.0, 0.0]], [[0.0, 1.0]]]); B = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])
    >>> delta_weight(np.array([[2.0], [3.0]]), np.ones((1, 2)), A, B, scaling=0.5, layer=Layer.of((3, 2)))
    array([[1. , 0. ],
           [0. , 1.5],
           [1. , 1.5]])
    """
    xp = namespace(lam, gamma, A, B, where="randlora.delta_weight")
    lay = _layer(layer, None, "randlora.delta_weight")
    P, Q = factors(lam, gamma, A, B, layer=lay)
    return lay.from_matrix(xp.matmul(P * scaling, Q), xp)


def forward(
    x: Array,
    W: Array,
    lam: Array,
    gamma: Array,
    A: Array,
    B: Array,
    *,
    scaling: float,
    bias: Array | None = None,
    layer: Layer | LayerKind | str | None = None,
    dropout: Callable[[Array], Array] | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int | None = None,
    peft_compat: bool = False,
) -> Array:
    """``base(x) + s · (d(x) Qᵀ) Pᵀ`` (never forms ΔW); x ``(..., in)``. Computed in float32 (float64) and
    rounded once to the result dtype of ``x`` and ``W``; ``peft_compat=True`` rounds the base output to that
    dtype first, as PEFT does. The conv keywords must keep their defaults (see :mod:`peftmath.layers`).

    >>> import numpy as np
    >>> A = np.array([[[1.0, 0.0]], [[0.0, 1.0]]]); B = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])
    >>> forward(np.array([[1.0, 1.0]]), np.zeros((3, 2)), np.array([[2.0], [3.0]]), np.ones((1, 2)), A, B,
    ...         scaling=0.5)
    array([[1. , 1.5, 2.5]])
    """
    xp = namespace(x, W, lam, gamma, A, B, bias, where="randlora.forward")
    lay = _layer(layer, W, "randlora.forward")
    lay.check_weight(W)
    lay.check_bias(bias)
    lay.for_input(x, "randlora.forward", groups=groups, stride=stride, padding=padding, dilation=dilation)
    out_dtype = xp.result_type(x.dtype, W.dtype)
    cd = compute_dtype(xp, out_dtype, lam.dtype, gamma.dtype, A.dtype, B.dtype)
    P, Q = factors(lam, gamma, A, B, layer=lay, dtype=cd)
    xc = as_compute(xp, x, cd)
    base = lay.base_forward(xc, as_compute(xp, W, cd), None if bias is None else as_compute(xp, bias, cd), xp)
    if peft_compat:  # PEFT rounds the base output to the storage dtype before adding the adapter term
        base = as_compute(xp, as_compute(xp, base, out_dtype), cd)
    xd = xc if dropout is None else dropout(xc)
    lo = xp.matmul(xp.matmul(xd, xp.matrix_transpose(Q)), xp.matrix_transpose(P))
    return as_compute(xp, base + lo * scaling, out_dtype)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge (specs/randlora.md, "4. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def _apply(W: Array, lam: Array, gamma: Array, A: Array, B: Array, *, scaling: float, sign: int,
           layer: Layer | LayerKind | str | None, copy: bool, safe: bool, peft_compat: bool, where: str) -> Array:
    xp = namespace(W, lam, gamma, A, B, where=where)
    lay = _layer(layer, W, where)
    lay.check_weight(W)
    cd = compute_dtype(xp, W.dtype, lam.dtype, gamma.dtype, A.dtype, B.dtype)
    r, n, _, _ = _check(where, lay, lam, gamma, A, B)  # before anything is written

    def delta() -> Array:
        P, Q = factors(lam, gamma, A, B, layer=lay, dtype=cd)
        return lay.from_matrix(xp.matmul(P * scaling, Q), xp)

    def kernel(M: Array) -> bool:
        # M ± s·P Q as BLAS gemms with beta = 1 over blocks of ~512 of the n·r columns of P: the full-rank
        # factors are W's size, their blocks are not (no temporary of W's size). A half-precision M takes one
        # call (the kernel rounds to M's dtype once per call).
        step = r if is_low_precision(M.dtype) else max(1, 512 // n)
        for k0 in range(0, r, step):
            P, Q = _factor_block(lam, gamma, A, B, lay, k0, min(r, k0 + step), cd, where)
            if not backend_for(xp).addmm_(M, P, Q, sign * scaling):  # s folded into the gemm's alpha
                if k0:  # the conditions do not depend on the block: a backend that accepted the first accepts all
                    raise BackendError(f"{where}: the backend's in-place gemm refused a block after accepting the "
                                       f"first; the weight is partly updated, reload it")
                return False
        return True

    # PEFT adds ΔW rounded to the weight's dtype (W ± ΔW.to(W.dtype)): a second rounding for half weights
    round_to = W.dtype if peft_compat and is_low_precision(W.dtype) else None
    return apply_delta(where, W, delta, sign=sign, copy=copy, safe=safe, round_delta_to=round_to, layer=lay,
                       inplace_kernel=kernel, kernel_on_copy=True, xp=xp)


def merge(W: Array, lam: Array, gamma: Array, A: Array, B: Array, *, scaling: float,
          layer: Layer | LayerKind | str | None = None, copy: bool = True, safe: bool = False,
          peft_compat: bool = False) -> Array:
    """``W + ΔW``, formed in float32 (float64) and rounded once; ``copy=False`` writes into ``W`` (one BLAS
    gemm with ``beta = 1`` on NumPy), ``copy=True`` runs the same gemm on one private copy.
    ``peft_compat=True`` rounds ΔW to a half-precision weight's dtype first, as PEFT does.

    >>> import numpy as np
    >>> W = np.zeros((3, 2), dtype=np.float32)
    >>> A = np.array([[[1, 0]], [[0, 1]]], np.float32); B = np.array([[[1, 0]], [[0, 1]], [[1, 1]]], np.float32)
    >>> lam = np.array([[2.0], [3.0]], np.float32); gamma = np.ones((1, 2), np.float32)
    >>> merge(W, lam, gamma, A, B, scaling=0.5, copy=False) is W, W
    (True, array([[1. , 0. ],
           [0. , 1.5],
           [1. , 1.5]], dtype=float32))
    """
    return _apply(W, lam, gamma, A, B, scaling=scaling, sign=1, layer=layer, copy=copy, safe=safe,
                  peft_compat=peft_compat, where="randlora.merge")


def unmerge(W: Array, lam: Array, gamma: Array, A: Array, B: Array, *, scaling: float,
            layer: Layer | LayerKind | str | None = None, copy: bool = True, peft_compat: bool = False) -> Array:
    """``W − ΔW``, the inverse of :func:`merge` up to rounding (same keywords)."""
    return _apply(W, lam, gamma, A, B, scaling=scaling, sign=-1, layer=layer, copy=copy, safe=False,
                  peft_compat=peft_compat, where="randlora.unmerge")


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/randlora.md, "5. Initialisation")
# --------------------------------------------------------------------------------------------------
def _put(a: np.ndarray, xp: Any, device: Any, dtype: Any) -> Array:
    out = backend_for(xp).from_host(np.ascontiguousarray(a, dtype=np.float32), xp, device)
    target = dtype if dtype is not None else xp.float32
    return out if out.dtype == target else xp.astype(out, target)


def init_bases(r: int, max_out: int, max_in: int, *, sparse: bool = False, very_sparse: bool = False,
               seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
               dtype: Any = None) -> tuple[Array, Array]:
    """Fresh shared bases ``(randlora_A (r, 1, D_min), randlora_B (D_max, N, r))`` for layers up to
    ``(max_out, max_in)``, ``N = ceil(D_min / r)``, each divided by its standard deviation (ddof 1), with
    PEFT's distributions: kaiming-uniform ``U(±1/sqrt(D_min))`` for A and ``U(±1/sqrt(r))`` for B; or, with
    ``sparse`` (``s = 3``) / ``very_sparse`` (``s = sqrt(D_min)``), ternary entries −1 / 0 / +1 with
    probabilities ``1/(2s)``, ``1 − 1/s``, ``1/(2s)``. Host draws from ``seed`` (not PEFT's torch stream).

    >>> A, B = init_bases(2, 6, 4, seed=0)
    >>> A.shape, B.shape, round(float(np.std(np.asarray(A), ddof=1)), 5)
    ((2, 1, 4), (6, 2, 2), 1.0)
    """
    if xp is None:
        import array_api_compat.numpy as xp
    rng = host_rng(seed)
    d_max, d_min = max(max_out, max_in), min(max_out, max_in)
    n = num_bases(d_min, r)
    if sparse or very_sparse:
        s = math.sqrt(d_min) if very_sparse else 3.0
        ua, ub = rng.random((r, 1, d_min)), rng.random((d_max, n, r))
        a = np.where(ua < 1 / (2 * s), -1.0, np.where(ua > 1 - 1 / (2 * s), 1.0, 0.0))
        b = np.where(ub < 1 / (2 * s), -1.0, np.where(ub > 1 - 1 / (2 * s), 1.0, 0.0))
    else:
        a = rng.uniform(-1, 1, (r, 1, d_min)) / math.sqrt(d_min)
        b = rng.uniform(-1, 1, (d_max, n, r)) / math.sqrt(r)
    for arr, what in ((a, "randlora_A"), (b, "randlora_B")):
        if arr.size < 2 or not np.std(arr, ddof=1) > 0:
            raise ConfigError(f"randlora.init_bases: {what} {arr.shape} has no spread to normalise (PEFT would divide "
                              f"by a zero or undefined standard deviation); use larger layers, another seed or r")
    return _put(a / np.std(a, ddof=1), xp, device, dtype), _put(b / np.std(b, ddof=1), xp, device, dtype)


def init_shared(config: RandLoraConfig, layers: Iterable[Layer] | Mapping[str, Layer], *,
                seed: int | np.random.Generator | None = None, xp: Any = None, device: Any = None,
                dtype: Any = None) -> dict[str, Array]:
    """The shared bases of an adapter over ``layers``, sized to the largest ``(out, in)`` (PEFT's
    ``_find_dim``: the elementwise maximum); the host seed is ``seed``, else ``config.projection_prng_key``."""
    layers = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
    if not layers:
        raise ConfigError("randlora.init_shared: no layers to size the bases for")
    max_out = max(layer.out_features for layer in layers)
    max_in = max(layer.in_features for layer in layers)
    A, B = init_bases(config.r, max_out, max_in, sparse=config.sparse, very_sparse=config.very_sparse,
                      seed=config.projection_prng_key if seed is None else seed, xp=xp, device=device, dtype=dtype)
    return {A_KEY: A, B_KEY: B}


def init_weights(layer: Layer, r: int, *, init: bool = True, seed: int | np.random.Generator | None = 0,
                 xp: Any = None, device: Any = None, dtype: Any = None) -> tuple[Array, Array]:
    """``(randlora_lambda (r, n), randlora_gamma (n, m))``. ``init=True``: ``λ = 0`` (a no-op) and
    ``γ = 1 / max(n, m)`` (PEFT's reset); ``False``: ``λ ~ N(0, 1)`` and ``γ = 1 / max(out, in)``.

    >>> lam, gamma = init_weights(Layer.of((3, 5)), 2)
    >>> lam.shape, gamma.shape, float(gamma[0, 0])
    ((2, 2), (2, 3), 0.3333333432674408)
    """
    if xp is None:
        import array_api_compat.numpy as xp
    m, M = min(layer.out_features, layer.in_features), max(layer.out_features, layer.in_features)
    n = num_bases(m, r)
    if init:
        lam, gamma = np.zeros((r, n)), np.full((n, m), 1.0 / max(n, m))
    else:
        lam, gamma = host_rng(seed).standard_normal((r, n)), np.full((n, m), 1.0 / M)
    return _put(lam, xp, device, dtype), _put(gamma, xp, device, dtype)


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
class RandLoraModule(SignedModuleAdapter):
    """RandLoRA on one base module: ``randlora_lambda``, ``randlora_gamma``, the shared bases
    (``self.shared[A_KEY]``, ``self.shared[B_KEY]``) and PEFT's per-module copies of them."""

    peft_type = "RANDLORA"
    additive = True
    supported_kinds = SUPPORTED_KINDS

    @classmethod
    def initialize(cls, name: str, config: RandLoraConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None,
                   shared: MutableMapping[str, Array] | None = None) -> tuple[dict[str, Array], Array | None]:
        """``{randlora_lambda, randlora_gamma, randlora_A, randlora_B}`` for module ``name`` (the last two are
        the shared bases, as PEFT's checkpoint repeats them per module; ``init`` overrides
        ``config.init_weights``). A ``shared=`` dict lacking the bases receives bases sized to this layer;
        without ``shared=`` they are also returned under :data:`SHARED_KEYS` (move them into
        ``Adapter(shared=...)``, or build them once with :func:`init_shared` over all layers)."""
        require_kind(layer, name, "RandLoRA", SUPPORTED_KINDS, peft=_PEFT_KINDS, error=ShapeError)
        xp, flag, shared, own = start_shared_init(name, config, layer, weight=weight, xp=xp, init=init, shared=shared,
                                                  keys=SHARED_KEYS, init_shared=init_shared, device=device,
                                                  dtype=dtype)
        lam, gamma = init_weights(layer, config.r, init=flag, seed=seed, xp=xp, device=device, dtype=dtype)
        _check(name, layer, lam, gamma, shared[A_KEY], shared[B_KEY])
        params = {"randlora_lambda": lam, "randlora_gamma": gamma,
                  **{suffix: shared[key] for suffix, key in COPIES.items()}}
        if own:
            params.update({k: shared[k] for k in SHARED_KEYS})
        return params, None

    @classmethod
    def infer_layer(cls, name: str, config: RandLoraConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """The tensors hold only ``min(out, in)``: the base weight's shape is needed; a 2-D weight is a
        Linear unless ``kind`` (or, for lack of evidence, the config's ``fan_in_fan_out``) says Conv1D."""
        if weight_shape is None:
            raise ShapeError(f"{name}: RandLoRA does not store a layer's in and out sizes; pass the base weight "
                             f"shape (weight_shape=...)")
        shape = tuple(int(s) for s in weight_shape)
        if kind is None and len(shape) == 2 and config.fan_in_fan_out:
            kind = LayerKind.CONV1D_TRANSPOSED
        return Layer.of(shape, kind)

    #: ``scaled(c)`` multiplies this (s → c·s, PEFT's ``scale_layer`` is not defined for RandLoRA)
    scaling: float = 1.0

    def validate(self) -> None:
        require_kind(self.layer, self.name, "RandLoRA", SUPPORTED_KINDS, peft=_PEFT_KINDS, error=ShapeError)
        for key in ("randlora_lambda", "randlora_gamma"):
            if key not in self.params:
                raise ShapeError(f"{self.name}: missing {key}")
        unknown = sorted(set(self.params) - {"randlora_lambda", "randlora_gamma", *COPIES, *SHARED_KEYS})
        if unknown:
            raise ShapeError(f"{self.name}: unexpected RandLoRA tensors {unknown}")
        bases = {}
        for suffix, key in COPIES.items():
            source = self.shared.get(key, self.params.get(key, self.params.get(suffix)))
            if source is None:
                raise _missing_bases(self.name, self.config)
            copy = self.params.get(suffix)
            if copy is not None and copy is not source:
                xp = namespace(copy, source, where=self.name)
                if tuple(copy.shape) != tuple(source.shape):
                    raise CheckpointError(f"{self.name}: its copy of {key} has shape {tuple(copy.shape)}, the shared "
                                          f"tensor {tuple(source.shape)}; PEFT saves identical copies")
                source = refuse_where(source, xp.any(copy != source), lambda k=key: CheckpointError(
                    f"{self.name}: the per-module copy {self.name}.{k.rsplit('.', 1)[1]} differs from the shared {k}; "
                    f"PEFT saves identical copies (and would load whichever comes last), so peftmath refuses the "
                    f"checkpoint"), xp=xp)
            bases[suffix] = source
        self.A, self.B = bases["randlora_A"], bases["randlora_B"]
        self.lam, self.gamma = self.params["randlora_lambda"], self.params["randlora_gamma"]
        r, self.n, _, _ = _check(self.name, self.layer, self.lam, self.gamma, self.A, self.B)
        if r != self.config.r:
            raise ShapeError(f"{self.name}: the shared randlora_A {tuple(self.A.shape)} has rank {r} but the config "
                             f"has r={self.config.r}")

    def scaled(self, c: float) -> "ModuleAdapter":
        """Scale ``c``: ``s → c·s``, so ``ΔW → c·ΔW`` (PEFT defines no RandLoRA scale)."""
        return self.scale_scaling(c)

    @property
    def s(self) -> float:
        """The scale in use: ``randlora_alpha / r`` times :meth:`scaled`'s factor."""
        return self.config.scaling * self.scaling

    def _args(self) -> tuple:
        return self.lam, self.gamma, self.A, self.B

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        return delta_weight(*self._args(), scaling=self.s, layer=self.layer)

    def _apply(self, weight: Array, sign: int, *, copy: bool, safe: bool, peft_compat: bool) -> Array:
        """``W ± ΔW`` through the module-level kernel (merge and unmerge of :class:`SignedModuleAdapter`)."""
        return _apply(weight, *self._args(), scaling=self.s, sign=sign, layer=self.layer, copy=copy, safe=safe,
                      peft_compat=peft_compat, where=self.name)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, kw = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, *self._args(), scaling=self.s, bias=bias, layer=layer, **kw)

    def describe(self) -> dict[str, Any]:
        return {"r": self.config.r, "bases": self.n, "scaling": self.s}

    def num_parameters(self) -> int:
        """Trainable scalars: ``λ`` and ``γ`` (the shared bases are frozen and not counted)."""
        return sum(math.prod(int(s) for s in a.shape) for a in (self.lam, self.gamma))


def _missing_bases(name: str, config: RandLoraConfig) -> CheckpointError:
    why = ("was saved with save_projection=false, so it does not contain the shared bases"
           if not config.save_projection else f"lacks the shared bases {list(SHARED_KEYS)}")
    return CheckpointError(
        f"{name}: this RandLoRA adapter {why}. PEFT regenerates them with torch.Generator(seed=projection_prng_key="
        f"{config.projection_prng_key}) (in bfloat16 where available), which peftmath does not reproduce. Fix: load the "
        f"adapter in PEFT and save it again with RandLoraConfig(save_projection=True) (the default)")


#: checkpoint suffixes of the per-module tensors (ParameterDict / BufferDict entries: no ".weight")
PARAMETER_SUFFIXES = ("randlora_lambda", "randlora_gamma", *COPIES)
Config = RandLoraConfig
Module = RandLoraModule
#: demo / documentation examples (non-trivial: random λ, r not dividing min(out, in), alpha ≠ r)
EXAMPLES = {
    "RandLoRA": dict(r=5, randlora_alpha=2.5, init_weights=False, projection_prng_key=3),
    "RandLoRA sparse": dict(r=4, randlora_alpha=1.0, init_weights=False, sparse=True),
}

#: the method's description (peftmath.methods._contract.Method)
METHOD = Method(
    peft_type=PEFT_TYPE, config=RandLoraConfig, module=RandLoraModule, spec="specs/randlora.md",
    parameter_suffixes=PARAMETER_SUFFIXES, shared_keys=SHARED_KEYS, layer_kinds=SUPPORTED_KINDS, additive=True,
    init_field="init_weights", examples=EXAMPLES, init_shared=init_shared, orientation_in_tensors=False,
    frozen_suffixes=tuple(COPIES),
)
