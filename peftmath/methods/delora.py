r"""DeLoRA: decoupled low-rank adaptation (Bini et al., ICLR 2025).

A LoRA update whose rank-one terms are normalised, so the update's *strength* is one trained scalar
``λ`` and its direction the factors; the base weight's input-column norms are frozen into the adapter::

    A: (r, in)    B: (out, r)    λ: (1,)    w = ‖W₀[:, j]‖₂: (in,)     (delora_w_norm, saved)
    s_i = λ / r / (max(‖A_i‖, 1e-4) · max(‖B^i‖, 1e-4))      A_i row i of A, B^i column i of B
    ΔW  = (B diag(s) A) ⊙ w[None, :]                          (out, in)
    y   = x W₀ᵀ + b + ((d(x) ⊙ w) Aᵀ ⊙ s) Bᵀ

``‖ΔW‖_F ≤ λ · max_j w_j`` whatever A and B are (each normalised rank-one term has unit Frobenius
norm before the column scaling). Merge ``W + ΔW``, unmerge ``W − ΔW`` (``w`` is stored, so ΔW does
not depend on the current weight). Only ``nn.Linear`` layers are adapted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from .._array import as_compute, compute_dtype, is_low_precision, namespace
from ..backends import backend_for, host_rng
from ..config import (TunerConfig, check_choice, check_fraction, check_number, check_pattern, check_positive_int,
                      resolve_pattern)
from ..errors import ConfigError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._base import MergeResult, ModuleAdapter, apply_delta, check_shape
from ._contract import Method

Array = Any

__all__ = ["DeloraConfig", "init_weights", "weight_norm", "scales", "delta_weight", "forward", "merge", "unmerge",
           "DeloraModule"]

PEFT_TYPE = "DELORA"
SUPPORTED = (LayerKind.LINEAR,)
_KEYS = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
#: PEFT's clamp of the factor norms
NORM_FLOOR = 1e-4


# --------------------------------------------------------------------------------------------------
# Config (specs/delora.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class DeloraConfig(TunerConfig):
    """PEFT's ``DeloraConfig`` (``peft_type: "DELORA"``). ``delora_lambda`` / ``lambda_pattern`` set
    the initial ``λ`` (the checkpoint holds the trained one); ``rank_pattern`` the per-module rank."""

    peft_type: ClassVar[str] = "DELORA"

    r: int = 8
    delora_lambda: float = 15
    module_dropout: float = 0.0
    bias: str = "none"
    init_weights: bool = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    lambda_pattern: dict[str, float] = field(default_factory=dict)

    def rank_for(self, module_name: str) -> int:
        """``r`` for ``module_name`` after ``rank_pattern`` (PEFT's ``get_pattern_key`` rule)."""
        return resolve_pattern(self.rank_pattern or {}, module_name, self.r)

    def lambda_for(self, module_name: str) -> float:
        """The initial ``λ`` for ``module_name`` after ``lambda_pattern``."""
        return float(resolve_pattern(self.lambda_pattern or {}, module_name, self.delora_lambda))

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "r", self.r)
        check_number(source, "delora_lambda", self.delora_lambda)
        check_fraction(source, "module_dropout", self.module_dropout)
        check_choice(source, "bias", self.bias, ("none", "all", "delora_only"))
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"{source}: field 'init_weights' must be true or false, got {self.init_weights!r}")
        for name in ("rank_pattern", "lambda_pattern"):
            check_pattern(source, name, getattr(self, name) or {})
        for key, value in (self.rank_pattern or {}).items():
            check_positive_int(source, f"rank_pattern[{key!r}]", value)
        for key, value in (self.lambda_pattern or {}).items():
            check_number(source, f"lambda_pattern[{key!r}]", value)


# --------------------------------------------------------------------------------------------------
# Shapes and initialisation (specs/delora.md, "2. Shapes and initialisation")
# --------------------------------------------------------------------------------------------------
def _check_layer(layer: Layer, where: str) -> None:
    if layer.kind not in SUPPORTED:
        raise UnsupportedError(f"{where}: DeLoRA adapts nn.Linear layers only (PEFT raises TypeError for others), "
                               f"not {layer.kind.value}")


def weight_norm(W: Array) -> Array:
    """``w_j = ‖W[:, j]‖₂`` (in,), the input-column norms of a Linear weight (out, in), in float32
    (float64 for float64 weights).

    >>> import numpy as np
    >>> weight_norm(np.array([[3.0, 0.0], [4.0, 1.0]]))
    array([5., 1.])
    """
    xp = namespace(W, where="delora.weight_norm")
    Wc = as_compute(xp, W, compute_dtype(xp, W.dtype))
    return xp.sqrt(xp.sum(Wc * Wc, axis=0))


def init_weights(layer: Layer, r: int, weight: Array, *, init: bool = True, delora_lambda: float = 15.0,
                 seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                 dtype: Any = None) -> dict[str, Array]:
    """Fresh ``{delora_A, delora_B, delora_lambda, delora_w_norm}``: ``A ~ U(±1/sqrt(in))``
    (kaiming-uniform, ``a = √5``), ``B = 0`` (``init=True``: a no-op) or ``B ~ U(±1/sqrt(r))``
    (``False``), ``λ = delora_lambda``, ``w`` the column norms of ``weight``; host draws from ``seed``."""
    _check_layer(layer, "delora.init_weights")
    layer.check_weight(weight)
    xp = xp or namespace(weight)
    rng = host_rng(seed)
    out, inn = layer.out_features, layer.in_features
    A = rng.uniform(-1 / math.sqrt(inn), 1 / math.sqrt(inn), (r, inn))
    B = np.zeros((out, r)) if init else rng.uniform(-1 / math.sqrt(r), 1 / math.sqrt(r), (out, r))
    put = backend_for(xp).from_host
    target = dtype if dtype is not None else xp.float32
    params = {k: xp.astype(put(np.ascontiguousarray(v, dtype=np.float32), xp, device), target)
              for k, v in (("delora_A", A), ("delora_B", B), ("delora_lambda", np.array([delora_lambda])))}
    params["delora_w_norm"] = xp.astype(weight_norm(weight), target)
    return params


def _check(where: str, layer: Layer, A: Array, B: Array, lam: Array, w: Array) -> int:
    r = int(A.shape[0]) if A.ndim == 2 else -1
    check_shape(where, "delora_A", A, (r, layer.in_features))
    check_shape(where, "delora_B", B, (layer.out_features, r))
    check_shape(where, "delora_lambda", lam, (1,))
    check_shape(where, "delora_w_norm", w, (layer.in_features,))
    return r


# --------------------------------------------------------------------------------------------------
# Delta weight, forward (specs/delora.md, "3. Delta, forward")
# --------------------------------------------------------------------------------------------------
def scales(A: Array, B: Array, lam: Array, *, r: int | None = None, dtype: Any = None) -> Array:
    """``s_i = λ / r / (max(‖A_i‖, 1e-4) · max(‖B^i‖, 1e-4))`` (r,), in ``dtype``.

    >>> import numpy as np
    >>> scales(np.array([[3.0, 4.0]]), np.array([[2.0]]), np.array([10.0]))
    array([1.])
    """
    xp = namespace(A, B, lam, where="delora.scales")
    cd = dtype or compute_dtype(xp, A.dtype, B.dtype, lam.dtype)
    Ac, Bc = as_compute(xp, A, cd), as_compute(xp, B, cd)
    an = xp.clip(xp.sqrt(xp.sum(Ac * Ac, axis=1)), min=NORM_FLOOR)
    bn = xp.clip(xp.sqrt(xp.sum(Bc * Bc, axis=0)), min=NORM_FLOOR)
    r = int(A.shape[0]) if r is None else r
    return as_compute(xp, lam, cd) / r / (an * bn)


def delta_weight(A: Array, B: Array, lam: Array, w: Array, *, dtype: Any = None, peft_compat: bool = False) -> Array:
    """``ΔW = (B diag(s) A) ⊙ w[None, :]`` (out, in), in float32 (float64 for float64 inputs);
    ``peft_compat=True`` with half-precision factors: PEFT's roundings, one per torch operation
    (:func:`_peft_half_delta`).

    >>> import numpy as np
    >>> delta_weight(np.array([[3.0, 4.0]]), np.array([[2.0], [0.0]]), np.array([10.0]), np.array([1.0, 2.0]))
    array([[ 6., 16.],
           [ 0.,  0.]])
    """
    xp = namespace(A, B, lam, w, where="delora.delta_weight")
    cd = dtype or compute_dtype(xp, A.dtype, B.dtype, lam.dtype, w.dtype)
    if peft_compat and is_low_precision(A.dtype):
        return _peft_half_delta(xp, A, B, lam, w, cd)
    s = scales(A, B, lam, dtype=cd)
    return xp.matmul(as_compute(xp, B, cd) * s, as_compute(xp, A, cd)) * as_compute(xp, w, cd)


def _peft_half_delta(xp: Any, A: Array, B: Array, lam: Array, w: Array, cd: Any) -> Array:
    """PEFT's ``ΔW`` with half-precision factors: each torch operation of its ``_compute_delta`` rounds its
    result to the factors' dtype (norms, their product, ``λ / r``, the quotient, ``B diag(s)``, the product
    with ``A``, the scaling by ``w``); every step is computed in ``cd`` and rounded, which is what torch's CPU
    kernels do (float32 accumulation, one rounding per operation). Returned in ``cd``."""
    hd = A.dtype

    def rnd(t: Array) -> Array:
        return as_compute(xp, xp.astype(t, hd), cd)

    Ac, Bc = as_compute(xp, A, cd), as_compute(xp, B, cd)
    floor = rnd(xp.asarray(NORM_FLOOR, dtype=cd))
    an = xp.maximum(rnd(xp.sqrt(xp.sum(Ac * Ac, axis=1))), floor)
    bn = xp.maximum(rnd(xp.sqrt(xp.sum(Bc * Bc, axis=0))), floor)
    s = rnd(rnd(as_compute(xp, lam, cd) / int(A.shape[0])) / rnd(an * bn))
    return rnd(rnd(xp.matmul(rnd(Bc * s), Ac)) * as_compute(xp, w, cd))


def forward(x: Array, W: Array, A: Array, B: Array, lam: Array, w: Array, *, bias: Array | None = None,
            dropout: Callable[[Array], Array] | None = None) -> Array:
    """``x W₀ᵀ + b + ((d(x) ⊙ w) Aᵀ ⊙ s) Bᵀ`` (never forms ΔW), in float32 (float64) rounded once to
    the result dtype of ``x`` and ``W``; ``dropout`` is PEFT's ``module_dropout`` on the adapter's input.

    >>> import numpy as np
    >>> forward(np.array([[1.0, 1.0]]), np.zeros((2, 2)), np.array([[3.0, 4.0]]), np.array([[2.0], [0.0]]),
    ...         np.array([10.0]), np.array([1.0, 2.0]))
    array([[22.,  0.]])
    """
    xp = namespace(x, W, A, B, lam, w, bias, where="delora.forward")
    lay = Layer.of(tuple(W.shape))
    lay.check_bias(bias)
    lay.for_input(x, "delora.forward")
    _check("delora.forward", lay, A, B, lam, w)
    out_dtype = xp.result_type(x.dtype, W.dtype)
    cd = compute_dtype(xp, out_dtype, A.dtype, B.dtype, lam.dtype, w.dtype)
    xc = as_compute(xp, x, cd)
    y = xp.matmul(xc, xp.matrix_transpose(as_compute(xp, W, cd)))
    if bias is not None:
        y = y + as_compute(xp, bias, cd)
    xd = xc if dropout is None else dropout(xc)
    h = xp.matmul(xd * as_compute(xp, w, cd), xp.matrix_transpose(as_compute(xp, A, cd))) * scales(A, B, lam, dtype=cd)
    return as_compute(xp, y + xp.matmul(h, xp.matrix_transpose(as_compute(xp, B, cd))), out_dtype)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge (specs/delora.md, "4. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def _apply(W: Array, A: Array, B: Array, lam: Array, w: Array, *, sign: int, copy: bool, safe: bool,
           peft_compat: bool, where: str) -> Array:
    xp = namespace(W, A, B, lam, w, where=where)
    lay = Layer.of(tuple(W.shape))
    _check(where, lay, A, B, lam, w)
    cd = compute_dtype(xp, W.dtype, A.dtype, B.dtype, lam.dtype, w.dtype)

    def kernel(M: Array) -> bool:  # W ± (B ⊙ s) (A ⊙ w): BLAS gemm with beta = 1, no temporary of W's size
        s = scales(A, B, lam, dtype=cd)
        Bs = as_compute(xp, B, cd) * s
        Aw = as_compute(xp, A, cd) * as_compute(xp, w, cd)
        return backend_for(xp).addmm_(M, Bs, Aw, float(sign))

    compat_half = peft_compat and is_low_precision(A.dtype)
    return apply_delta(where, W, lambda: delta_weight(A, B, lam, w, dtype=cd, peft_compat=peft_compat), sign=sign,
                       copy=copy, safe=safe, inplace_kernel=None if compat_half else kernel,
                       kernel_on_copy=True, xp=xp)


def merge(W: Array, A: Array, B: Array, lam: Array, w: Array, *, copy: bool = True, safe: bool = False,
          peft_compat: bool = False, where: str = "delora.merge") -> Array:
    """``W + ΔW``, formed in float32 (float64) and rounded once; ``copy=False`` writes into ``W``
    (through BLAS gemm on NumPy, no temporary of W's size), ``copy=True`` runs the same gemm on one
    private copy of ``W``."""
    return _apply(W, A, B, lam, w, sign=1, copy=copy, safe=safe, peft_compat=peft_compat, where=where)


def unmerge(W: Array, A: Array, B: Array, lam: Array, w: Array, *, copy: bool = True, peft_compat: bool = False,
            where: str = "delora.unmerge") -> Array:
    """``W − ΔW``, the inverse of :func:`merge` (``w`` is the stored norm of ``W₀``, not recomputed)."""
    return _apply(W, A, B, lam, w, sign=-1, copy=copy, safe=False, peft_compat=peft_compat, where=where)


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
class DeloraModule(ModuleAdapter):
    """DeLoRA on one Linear module: ``delora_A``, ``delora_B``, ``delora_lambda``, ``delora_w_norm``."""

    peft_type = "DELORA"
    supported_kinds = SUPPORTED

    @classmethod
    def initialize(cls, name: str, config: DeloraConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """Fresh parameters for module ``name`` (rank and λ after ``rank_pattern`` / ``lambda_pattern``);
        ``weight`` is required (``delora_w_norm`` holds its column norms) and is not changed."""
        _check_layer(layer, name)
        if weight is None:
            raise ShapeError(f"{name}: DeLoRA stores the base weight's column norms (delora_w_norm); pass weight=")
        flag = config.init_weights if init is None else init
        return init_weights(layer, config.rank_for(name), weight, init=bool(flag), delora_lambda=config.lambda_for(name),
                            seed=seed, xp=xp, device=device, dtype=dtype), None

    @classmethod
    def infer_layer(cls, name: str, config: DeloraConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        if weight_shape is None:
            A, B = params.get("delora_A"), params.get("delora_B")
            if A is None or B is None:
                raise ShapeError(f"{name}: DeLoRA needs delora_A and delora_B, found {sorted(params)}")
            weight_shape = (int(B.shape[0]), int(A.shape[1]))
        layer = Layer.of(tuple(weight_shape), kind)
        _check_layer(layer, name)
        return layer

    def validate(self) -> None:
        missing = [k for k in _KEYS if k not in self.params]
        unknown = sorted(set(self.params) - set(_KEYS))
        if missing or unknown:
            raise ShapeError(f"{self.name}: a DeLoRA module has {', '.join(_KEYS)}; missing {missing}, "
                             f"unexpected {unknown}")
        _check_layer(self.layer, self.name)
        self.A, self.B, self.lam, self.w = (self.params[k] for k in _KEYS)
        self.r = _check(self.name, self.layer, self.A, self.B, self.lam, self.w)
        r_cfg = self.config.rank_for(self.name)
        if self.r != r_cfg:
            raise ShapeError(f"{self.name}: the DeLoRA tensors have rank {self.r} but the config gives r={r_cfg} for "
                             f"this module (check r / rank_pattern in adapter_config.json)")

    #: ``scaled(c)`` multiplies this (λ → c·λ, so ΔW → c·ΔW; scaling A or B would be normalised away)
    scaling: float = 1.0

    def scaled(self, c: float) -> "ModuleAdapter":
        """Scale ``c``: ``λ → c·λ``, so ``ΔW → c·ΔW`` (PEFT defines no scale for DeLoRA)."""
        return self.scale_scaling(c)

    def _tensors(self) -> tuple:
        lam = self.lam if self.scaling == 1.0 else self.lam * self.scaling
        return self.A, self.B, lam, self.w

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        return delta_weight(*self._tensors(), peft_compat=peft_compat)

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        self.layer.check_weight(weight)
        return MergeResult(merge(weight, *self._tensors(), copy=copy, safe=safe, peft_compat=peft_compat,
                                 where=self.name), bias)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        self.layer.check_weight(weight)
        return MergeResult(unmerge(weight, *self._tensors(), copy=copy, peft_compat=peft_compat, where=self.name), bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, *self._tensors(), bias=bias)

    def describe(self) -> dict[str, Any]:
        return {"r": self.r, "lambda": float(self.xp.reshape(self._tensors()[2], (-1,))[0])}


#: checkpoint suffixes (ParameterDict / BufferDict entries: no ".weight")
PARAMETER_SUFFIXES = _KEYS
Config = DeloraConfig
Module = DeloraModule
#: demo / documentation examples (non-trivial: random B, λ not the default)
EXAMPLES = {"DeLoRA": dict(r=4, init_weights=False, delora_lambda=3.0)}

#: the method's description (peftmath.methods._contract.Method)
METHOD = Method(
    peft_type=PEFT_TYPE, config=DeloraConfig, module=DeloraModule, spec="specs/delora.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=SUPPORTED, additive=True, init_field="init_weights",
    examples=EXAMPLES,
)
