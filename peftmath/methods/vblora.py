r"""VB-LoRA: LoRA factors assembled from a shared vector bank (Li et al., NeurIPS 2024).

Every adapted layer of a model draws the sub-vectors of its LoRA factors from one bank of ``h`` vectors
of length ``L``; a layer trains only logits that pick ``k`` bank vectors per sub-vector and mix them::

    bank: (h, L)                                   vblora_vector_bank, shared, saved once
    ℓ_A: (r, in/L, h)     ℓ_B: (out/L, r, h)        vblora_logits_A / vblora_logits_B, per module
    mix(ℓ)[..., :] = Σ_{j ∈ topk(ℓ)} softmax(ℓ[topk])_j · bank[j, :]        (..., L)
    A = mix(ℓ_A) reshaped (r, in)                   row i: the in/L sub-vectors of A's row i, in order
    B = mix(ℓ_B) (out/L, r, L) -> (out/L, L, r) -> (out, r)
    ΔW = B A (out, in)       y = x Wᵀ + b + (d(x) Aᵀ) Bᵀ

There is no scaling factor. ``topk`` keeps the ``k`` largest logits of each sub-vector (ties: the lower
bank index first, a rule peftmath fixes where ``torch.topk`` leaves the order unspecified). A checkpoint
saved with ``save_only_topk_weights`` holds, instead of the logits, the selected indices and the first
``k − 1`` mixing weights (the last one is ``1 − Σ``): :class:`Selection` holds either form.
For a transformers ``Conv1D`` ΔW is stored transposed, (in, out). Merge ``W + ΔW``, unmerge ``W − ΔW``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple

import numpy as np

from .._array import as_compute, compute_dtype, eps, namespace, refuse_where
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_choice, check_flags, check_fraction, check_number, check_positive_int
from ..errors import CheckpointError, ConfigError, ShapeError
from ..layers import Layer, LayerKind
from ._base import MergeResult, ModuleAdapter, apply_delta, require_kind
from ._contract import Method

Array = Any

__all__ = [
    "VBLoRAConfig",
    "Selection",
    "select",
    "from_saved",
    "to_saved",
    "mix",
    "factors",
    "delta_weight",
    "forward",
    "merge",
    "unmerge",
    "init_vector_bank",
    "init_shared",
    "init_logits",
    "VBLoRAModule",
]

PEFT_TYPE = "VBLORA"
#: checkpoint key of the shared bank (PEFT: ``base_model.vblora_vector_bank.<adapter>`` without the name)
BANK_KEY = "base_model.vblora_vector_bank"
SHARED_KEYS = (BANK_KEY,)
SUPPORTED_KINDS = (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED)
LOGITS = ("vblora_logits_A", "vblora_logits_B")
#: the save_only_topk_weights form of each logits tensor
TOPK_INDICES = tuple(f"{k}_topk_indices" for k in LOGITS)
TOPK_WEIGHTS = tuple(f"{k}_topk_weights" for k in LOGITS)


# --------------------------------------------------------------------------------------------------
# Config (specs/vblora.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class VBLoRAConfig(TunerConfig):
    """PEFT's ``VBLoRAConfig`` (``peft_type: "VBLORA"``). ``init_vector_bank_bound`` and
    ``init_logits_std`` only set the initialisation; ``save_only_topk_weights`` says which form the
    checkpoint holds (peftmath reads the tensors present, either form)."""

    peft_type: ClassVar[str] = "VBLORA"

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    save_only_topk_weights: bool = False
    vblora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        for name in ("r", "num_vectors", "vector_length", "topk"):
            check_positive_int(source, name, getattr(self, name))
        if self.topk > self.num_vectors:
            raise ConfigError(f"{source}: topk={self.topk} exceeds num_vectors={self.num_vectors}: top-k selects "
                              f"k of the bank's vectors")
        check_flags(source, self, "save_only_topk_weights", "fan_in_fan_out")
        check_fraction(source, "vblora_dropout", self.vblora_dropout)
        check_number(source, "init_vector_bank_bound", self.init_vector_bank_bound)
        check_number(source, "init_logits_std", self.init_logits_std)
        check_choice(source, "bias", self.bias, ("none", "all", "vblora_only"))


# --------------------------------------------------------------------------------------------------
# Top-k selection and mixing (specs/vblora.md, "2. Top-k mixing")
# --------------------------------------------------------------------------------------------------
class Selection(NamedTuple):
    """The top-k choice for every sub-vector of one factor: ``indices`` (..., k) into the bank (integers)
    and the mixing ``weights`` (..., k), summing to 1 along the last axis."""

    indices: Array
    weights: Array


def select(logits: Array, topk: int, *, dtype: Any = None) -> Selection:
    """The ``topk`` largest logits along the last axis and their softmax.

    Ties are broken deterministically: among equal logits the lower index comes first (a stable
    descending sort); ``torch.topk`` leaves that order unspecified, so a tie at the k-th place can select
    another vector in PEFT. The weights are ``exp(v − v₀) / Σ exp(v − v₀)`` with ``v₀`` the largest, in
    ``dtype`` (default float32, float64 for float64 logits).

    >>> import numpy as np
    >>> s = select(np.array([[0.0, 2.0, 1.0, 2.0]]), 2)
    >>> s.indices.tolist(), s.weights.tolist()
    ([[1, 3]], [[0.5, 0.5]])
    """
    xp = namespace(logits, where="vblora.select")
    n = int(logits.shape[-1])
    if not isinstance(topk, int) or isinstance(topk, bool) or not 0 < topk <= n:
        raise ConfigError(f"vblora.select: topk must be an integer in 1..{n} (the bank's size), got {topk!r}")
    cd = dtype or compute_dtype(xp, logits.dtype)
    lc = as_compute(xp, logits, cd)
    idx = xp.argsort(lc, axis=-1, descending=True, stable=True)[..., :topk]
    top = xp.sort(lc, axis=-1, descending=True)[..., :topk]  # the same values, in the same order
    e = xp.exp(top - top[..., :1])
    return Selection(idx, e / xp.sum(e, axis=-1, keepdims=True))


def from_saved(indices: Array, weights: Array, num_vectors: int, *, where: str = "vblora",
               peft_compat: bool = False, dtype: Any = None) -> Selection:
    """The :class:`Selection` of a ``save_only_topk_weights`` checkpoint: ``indices`` (..., k) and the
    first ``k − 1`` weights (..., k − 1); the last weight is ``1 − Σ`` of the others.

    A recovered last weight below 0 by rounding only (``≥ −k·eps``) becomes 0 (PEFT takes its log and
    gets NaN); more negative, or an index outside ``0..num_vectors − 1``, is a :class:`CheckpointError`.
    ``peft_compat=True`` renormalises as PEFT's loader does (``softmax(log w)``, the logits it rebuilds).

    >>> import numpy as np
    >>> s = from_saved(np.array([[3, 0]], dtype=np.uint8), np.array([[0.75]]), 4)
    >>> s.indices.tolist(), s.weights.tolist()
    ([[3, 0]], [[0.75, 0.25]])
    """
    xp = namespace(indices, weights, where=where)
    k = int(indices.shape[-1])
    if tuple(weights.shape) != (*indices.shape[:-1], k - 1):
        raise ShapeError(f"{where}: top-k weights {tuple(weights.shape)} do not match top-k indices "
                         f"{tuple(indices.shape)}: a save_only_topk_weights checkpoint stores k − 1 = {k - 1} weights "
                         f"per sub-vector")
    if not xp.isdtype(indices.dtype, "integral"):
        raise CheckpointError(f"{where}: top-k indices have dtype {indices.dtype}, expected an integer dtype")
    cd = dtype or compute_dtype(xp, weights.dtype)
    idx = xp.astype(indices, xp.int64)
    idx = refuse_where(idx, (idx < 0) | (idx >= num_vectors), lambda: CheckpointError(
        f"{where}: top-k indices outside 0..{num_vectors - 1} (the vector bank has {num_vectors} vectors)"), xp=xp)
    w = as_compute(xp, weights, cd)
    last = 1.0 - xp.sum(w, axis=-1, keepdims=True)
    tol = k * eps(cd)
    last = refuse_where(last, last < -tol, lambda: CheckpointError(
        f"{where}: the saved top-k weights sum to more than 1 (beyond rounding), so they are not the softmax "
        f"weights PEFT saves; is the checkpoint damaged?"), xp=xp)
    w = xp.concat([w, xp.clip(last, min=0.0)], axis=-1)
    if peft_compat:  # PEFT rebuilds logits log(w) (−inf where w = 0) and takes their softmax again
        logw = xp.log(w)
        e = xp.exp(logw - xp.max(logw, axis=-1, keepdims=True))
        w = e / xp.sum(e, axis=-1, keepdims=True)
    return Selection(idx, w)


def to_saved(logits: Array, topk: int, num_vectors: int | None = None) -> tuple[Array, Array]:
    """``(indices, weights[..., :-1])`` as PEFT writes them with ``save_only_topk_weights``: the indices in
    the smallest integer dtype PEFT picks for ``num_vectors`` (uint8 below 2⁸, int16 below 2¹⁵, int32
    below 2³¹), the weights in the logits' dtype."""
    xp = namespace(logits, where="vblora.to_saved")
    n = int(logits.shape[-1]) if num_vectors is None else int(num_vectors)
    s = select(logits, topk)
    dt = xp.uint8 if n < 2**8 else xp.int16 if n < 2**15 else xp.int32 if n < 2**31 else xp.int64
    return xp.astype(s.indices, dt), xp.astype(s.weights[..., :-1], logits.dtype)


def mix(sel: Selection, bank: Array, *, dtype: Any = None) -> Array:
    """``Σ_j w_j · bank[i_j]`` (..., L): the selected bank vectors weighted and summed in selection order.

    >>> import numpy as np
    >>> mix(Selection(np.array([[1, 0]]), np.array([[0.75, 0.25]])), np.array([[4.0, 0.0], [0.0, 8.0]]))
    array([[1., 6.]])
    """
    xp = namespace(sel.indices, sel.weights, bank, where="vblora.mix")
    cd = dtype or compute_dtype(xp, sel.weights.dtype, bank.dtype)
    lead, k, L = tuple(sel.indices.shape[:-1]), int(sel.indices.shape[-1]), int(bank.shape[1])
    vecs = xp.take(as_compute(xp, bank, cd), xp.reshape(sel.indices, (-1,)), axis=0)
    vecs = xp.reshape(vecs, (*lead, k, L))
    return xp.sum(as_compute(xp, sel.weights, cd)[..., None] * vecs, axis=-2)


def _as_selection(x: Array | Selection, topk: int | None, dtype: Any, where: str) -> Selection:
    if isinstance(x, Selection):
        return x
    if topk is None:
        raise ConfigError(f"{where}: logits need topk= (the config's topk)")
    return select(x, topk, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Factors and delta weight (specs/vblora.md, "3. Factors, delta, forward")
# --------------------------------------------------------------------------------------------------
def factors(a: Array | Selection, b: Array | Selection, bank: Array, *, topk: int | None = None,
            dtype: Any = None) -> tuple[Array, Array]:
    """``(A (r, in), B (out, r))`` from the logits (or selections) of the two factors and the bank.

    ``a``: logits ``(r, in/L, h)`` or their :class:`Selection`; ``b``: ``(out/L, r, h)``. ``A``'s row
    ``i`` is its ``in/L`` mixed sub-vectors laid end to end; ``B``'s column ``i`` likewise over ``out/L``.

    >>> import numpy as np
    >>> bank = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> la = np.array([[[5.0, 0.0], [0.0, 5.0]]])          # r = 1, in = 4: picks vector 0 then 1 (k = 1)
    >>> lb = np.array([[[0.0, 5.0]]])                      # out = 2
    >>> A, B = factors(la, lb, bank, topk=1)
    >>> A.tolist(), B.tolist()
    ([[1.0, 2.0, 3.0, 4.0]], [[3.0], [4.0]])
    """
    xp = namespace(bank, where="vblora.factors")
    cd = dtype or compute_dtype(xp, bank.dtype, *(s.weights.dtype if isinstance(s, Selection) else s.dtype
                                                    for s in (a, b)))
    sa, sb = _as_selection(a, topk, cd, "vblora.factors"), _as_selection(b, topk, cd, "vblora.factors")
    ma, mb = mix(sa, bank, dtype=cd), mix(sb, bank, dtype=cd)  # (r, in/L, L), (out/L, r, L)
    r = int(ma.shape[0])
    A = xp.reshape(ma, (r, -1))
    B = xp.reshape(xp.permute_dims(mb, (0, 2, 1)), (-1, int(mb.shape[1])))
    return A, B


def _resolve_layer(layer: Layer | LayerKind | str | None, A: Array, B: Array, W: Array | None) -> Layer:
    if isinstance(layer, Layer):
        lay = layer
    elif W is not None:
        lay = Layer.of(tuple(W.shape), layer)
    else:
        kind = LayerKind.parse(layer) if layer is not None else LayerKind.LINEAR
        out, inn = int(B.shape[0]), int(A.shape[1])
        lay = Layer(kind, (inn, out) if kind is LayerKind.CONV1D_TRANSPOSED else (out, inn))
    require_kind(lay, "vblora", "VB-LoRA", SUPPORTED_KINDS, peft="PEFT raises TypeError for others",
                 error=ShapeError)
    if (int(B.shape[0]), int(A.shape[1])) != (lay.out_features, lay.in_features) or A.shape[0] != B.shape[1]:
        raise ShapeError(f"vblora: factors A {tuple(A.shape)} and B {tuple(B.shape)} do not fit a layer with "
                         f"out={lay.out_features}, in={lay.in_features} (does the adapter belong to this model?)")
    return lay


def delta_weight(a: Array | Selection, b: Array | Selection, bank: Array, *, topk: int | None = None,
                 layer: Layer | LayerKind | str | None = None, scale: float = 1.0) -> Array:
    """``ΔW = scale · B A`` in the stored layout: ``(out, in)`` for Linear, ``(in, out)`` for Conv1D; in
    float32 (float64 for float64 inputs). ``scale`` is peftmath's :meth:`~peftmath.Adapter.scaled` (PEFT: 1).

    >>> import numpy as np
    >>> bank = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> delta_weight(np.array([[[5.0, 0.0]]]), np.array([[[0.0, 5.0]]]), bank, topk=1)
    array([[3., 6.],
           [4., 8.]])
    """
    xp = namespace(bank, where="vblora.delta_weight")
    A, B = factors(a, b, bank, topk=topk)
    lay = _resolve_layer(layer, A, B, None)
    d = xp.matmul(B, A)
    return lay.from_matrix(d if scale == 1.0 else d * scale, xp)


def forward(
    x: Array,
    W: Array,
    a: Array | Selection,
    b: Array | Selection,
    bank: Array,
    *,
    topk: int | None = None,
    bias: Array | None = None,
    layer: Layer | LayerKind | str | None = None,
    dropout: Callable[[Array], Array] | None = None,
    scale: float = 1.0,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int | None = None,
    peft_compat: bool = False,
) -> Array:
    """The unmerged adapted layer ``base(x) + scale · (d(x) Aᵀ) Bᵀ`` (never forms ΔW); x ``(..., in)``.

    Computed in float32 (float64 for float64 inputs) and rounded once to the result dtype of ``x`` and
    ``W``; ``peft_compat=True`` rounds the base output to that dtype first, as PEFT does. The conv
    keywords must keep their defaults (VB-LoRA adapts no convolution; see :mod:`peftmath.layers`).

    >>> import numpy as np
    >>> bank = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> forward(np.array([[1.0, 1.0]]), np.zeros((2, 2)), np.array([[[5.0, 0.0]]]), np.array([[[0.0, 5.0]]]),
    ...         bank, topk=1)
    array([[ 9., 12.]])
    """
    xp = namespace(x, W, bank, bias, where="vblora.forward")
    out_dtype = xp.result_type(x.dtype, W.dtype)
    A, B = factors(a, b, bank, topk=topk)
    lay = _resolve_layer(layer, A, B, W)
    lay.check_weight(W)
    lay.check_bias(bias)
    lay.for_input(x, "vblora.forward", groups=groups, stride=stride, padding=padding, dilation=dilation)
    cd = compute_dtype(xp, A.dtype, W.dtype, x.dtype)
    xc = as_compute(xp, x, cd)
    base = lay.base_forward(xc, as_compute(xp, W, cd), None if bias is None else as_compute(xp, bias, cd), xp)
    if peft_compat:  # PEFT rounds the base output to the storage dtype before adding the adapter term
        base = as_compute(xp, as_compute(xp, base, out_dtype), cd)
    xd = xc if dropout is None else dropout(xc)
    h = xp.matmul(xd, xp.matrix_transpose(as_compute(xp, A, cd)))
    lo = xp.matmul(h, xp.matrix_transpose(as_compute(xp, B, cd)))
    return as_compute(xp, base + (lo if scale == 1.0 else lo * scale), out_dtype)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge (specs/vblora.md, "4. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def _apply(W: Array, a: Array | Selection, b: Array | Selection, bank: Array, *, topk: int | None, sign: int,
           layer: Layer | LayerKind | str | None, scale: float, copy: bool, safe: bool, where: str) -> Array:
    xp = namespace(W, bank, where=where)
    cd = compute_dtype(xp, W.dtype, bank.dtype)
    A, B = factors(a, b, bank, topk=topk, dtype=cd)  # O(r (in + out) k): never W's size
    lay = _resolve_layer(layer, A, B, W)
    lay.check_weight(W)
    Bs = B if scale == 1.0 else B * scale

    def delta() -> Array:
        return lay.from_matrix(xp.matmul(Bs, A), xp)

    def kernel(M: Array) -> bool:  # M ± B A: BLAS gemm with beta = 1, no temporary of W's size
        return backend_for(xp).addmm_(M, Bs, A, float(sign))

    return apply_delta(where, W, delta, sign=sign, copy=copy, safe=safe, layer=lay, inplace_kernel=kernel,
                       kernel_on_copy=True, xp=xp)


def merge(W: Array, a: Array | Selection, b: Array | Selection, bank: Array, *, topk: int | None = None,
          layer: Layer | LayerKind | str | None = None, scale: float = 1.0, copy: bool = True,
          safe: bool = False) -> Array:
    """``W + ΔW``, formed in float32 (float64) and rounded once to ``W``'s dtype. ``copy=False`` writes
    into ``W`` (BLAS gemm with ``beta = 1`` on NumPy, no temporary of W's size); ``copy=True`` runs the
    same gemm on one private copy of ``W``.

    >>> import numpy as np
    >>> W = np.zeros((2, 2), dtype=np.float32); bank = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    >>> la = np.array([[[5.0, 0.0]]], dtype=np.float32); lb = np.array([[[0.0, 5.0]]], dtype=np.float32)
    >>> merge(W, la, lb, bank, topk=1, copy=False) is W, W
    (True, array([[3., 6.],
           [4., 8.]], dtype=float32))
    """
    return _apply(W, a, b, bank, topk=topk, sign=1, layer=layer, scale=scale, copy=copy, safe=safe,
                  where="vblora.merge")


def unmerge(W: Array, a: Array | Selection, b: Array | Selection, bank: Array, *, topk: int | None = None,
            layer: Layer | LayerKind | str | None = None, scale: float = 1.0, copy: bool = True) -> Array:
    """``W − ΔW``, the inverse of :func:`merge` up to one rounding (same keywords)."""
    return _apply(W, a, b, bank, topk=topk, sign=-1, layer=layer, scale=scale, copy=copy, safe=False,
                  where="vblora.unmerge")


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/vblora.md, "5. Initialisation")
# --------------------------------------------------------------------------------------------------
def _put(a: np.ndarray, xp: Any, device: Any, dtype: Any) -> Array:
    out = backend_for(xp).from_host(np.ascontiguousarray(a, dtype=np.float32), xp, device)
    target = dtype if dtype is not None else xp.float32
    return out if out.dtype == target else xp.astype(out, target)


def init_vector_bank(num_vectors: int, vector_length: int, *, bound: float = 0.02,
                     seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                     dtype: Any = None) -> Array:
    """A fresh bank ``U(±bound)`` of shape ``(num_vectors, vector_length)`` (PEFT's distribution), drawn on
    the host from ``seed``.

    >>> bank = init_vector_bank(6, 4, bound=0.5, seed=1)
    >>> bank.shape, bool(abs(bank).max() <= 0.5)
    ((6, 4), True)
    """
    if xp is None:
        import array_api_compat.numpy as xp
    return _put(host_rng(seed).uniform(-bound, bound, (num_vectors, vector_length)), xp, device, dtype)


def init_shared(config: VBLoRAConfig, layers: Iterable[Layer] | Mapping[str, Layer] = (), *,
                seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                dtype: Any = None) -> dict[str, Array]:
    """``{BANK_KEY: bank}``: the shared tensor of an adapter (its size does not depend on the layers)."""
    return {BANK_KEY: init_vector_bank(config.num_vectors, config.vector_length,
                                       bound=config.init_vector_bank_bound, seed=0 if seed is None else seed,
                                       xp=xp, device=device, dtype=dtype)}


def _check_divisible(where: str, layer: Layer, L: int) -> None:
    if layer.in_features % L or layer.out_features % L:
        raise ShapeError(f"{where}: VB-LoRA cuts the factors into sub-vectors of vector_length={L}, which must divide "
                         f"in_features={layer.in_features} and out_features={layer.out_features} (PEFT refuses "
                         f"this layer too); choose a vector_length dividing both")


def init_logits(layer: Layer, config: VBLoRAConfig, *, seed: int | np.random.Generator | None = 0, xp: Any = None,
                device: Any = None, dtype: Any = None) -> dict[str, Array]:
    """``{vblora_logits_A (r, in/L, h), vblora_logits_B (out/L, r, h)}`` drawn ``N(0, init_logits_std²)``
    (A first), or, with ``config.save_only_topk_weights``, their top-k form as PEFT saves it."""
    _check_divisible("vblora.init_logits", layer, config.vector_length)
    if xp is None:
        import array_api_compat.numpy as xp
    rng = host_rng(seed)
    L, h, r = config.vector_length, config.num_vectors, config.r
    shapes = {"vblora_logits_A": (r, layer.in_features // L, h), "vblora_logits_B": (layer.out_features // L, r, h)}
    out = {k: _put(rng.normal(0.0, config.init_logits_std, s), xp, device, dtype) for k, s in shapes.items()}
    if config.save_only_topk_weights:
        for key, ki, kw in zip(LOGITS, TOPK_INDICES, TOPK_WEIGHTS):
            out[ki], out[kw] = to_saved(out.pop(key), config.topk, h)
    return out


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
class VBLoRAModule(ModuleAdapter):
    """VB-LoRA on one base module: its logits (or their top-k form) and the shared bank
    (``self.shared[BANK_KEY]``)."""

    peft_type = "VBLORA"
    additive = True
    supported_kinds = SUPPORTED_KINDS
    #: ``scaled(c)`` multiplies this (ΔW → c·ΔW; the bank is shared and the mixing weights normalised)
    scaling: float = 1.0

    @classmethod
    def initialize(cls, name: str, config: VBLoRAConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None,
                   shared: MutableMapping[str, Array] | None = None) -> tuple[dict[str, Array], Array | None]:
        """Fresh logits for module ``name`` (PEFT's VB-LoRA has no no-op initialisation: ``init`` must be
        None); the base weight is not changed. With ``shared=`` lacking the bank, a bank is drawn into it;
        without ``shared=`` the bank is returned among the params (as VeRA's projections are)."""
        require_kind(layer, name, "VB-LoRA", SUPPORTED_KINDS, peft="PEFT raises TypeError for others",
                     error=ShapeError)
        if init is not None:
            raise ConfigError(f"{name}: VB-LoRA has no initialisation option (PEFT always draws the logits and the "
                              f"bank at random); got init={init!r}")
        if xp is None and weight is not None:
            xp = namespace(weight)
        own = shared is None
        if own:
            shared = {}
        if BANK_KEY not in shared:
            shared.update(init_shared(config, [layer], xp=xp, device=device, dtype=dtype))
        params = init_logits(layer, config, seed=seed, xp=xp, device=device, dtype=dtype)
        if own:
            params.update(shared)
        return params, None

    @classmethod
    def infer_layer(cls, name: str, config: VBLoRAConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """``in = L · (in/L)`` and ``out = L · (out/L)`` from the logits (or top-k indices); a 2-D base
        weight ``(out, in)`` is a Linear, ``(in, out)`` a Conv1D, a square one follows ``kind`` or the
        config's ``fan_in_fan_out``."""
        ka = next((k for k in ("vblora_logits_A", "vblora_logits_A_topk_indices") if k in params), None)
        kb = next((k for k in ("vblora_logits_B", "vblora_logits_B_topk_indices") if k in params), None)
        if ka is None or kb is None:
            raise ShapeError(f"{name}: a VB-LoRA module needs vblora_logits_A / _B (or their _topk_indices), "
                             f"found {sorted(params)}")
        L = config.vector_length
        inn, out = L * int(params[ka].shape[1]), L * int(params[kb].shape[0])
        if weight_shape is None:
            if kind is not None:
                return Layer(LayerKind.parse(kind), (inn, out) if LayerKind.parse(kind) is LayerKind.CONV1D_TRANSPOSED
                             else (out, inn))
            return Layer(LayerKind.CONV1D_TRANSPOSED if config.fan_in_fan_out else LayerKind.LINEAR,
                         (inn, out) if config.fan_in_fan_out else (out, inn))
        shape = tuple(int(s) for s in weight_shape)
        if kind is not None or len(shape) != 2:
            return Layer.of(shape, kind)
        if shape == (out, inn) and shape != (inn, out):
            return Layer(LayerKind.LINEAR, shape)
        if shape == (inn, out) and shape != (out, inn):
            return Layer(LayerKind.CONV1D_TRANSPOSED, shape)
        if shape == (out, inn):  # square
            return Layer(LayerKind.CONV1D_TRANSPOSED if config.fan_in_fan_out else LayerKind.LINEAR, shape)
        raise ShapeError(f"{name}: base weight {shape} is neither (out, in) = {(out, inn)} nor (in, out) = "
                         f"{(inn, out)} for these VB-LoRA logits (vector_length={L}); does the adapter belong to "
                         f"this model?")

    def validate(self) -> None:
        require_kind(self.layer, self.name, "VB-LoRA", SUPPORTED_KINDS, peft="PEFT raises TypeError for others",
                     error=ShapeError)
        source = self.shared if BANK_KEY in self.shared else self.params  # initialize() without shared=
        if BANK_KEY not in source:
            raise CheckpointError(f"{self.name}: the VB-LoRA vector bank {BANK_KEY} is not in the checkpoint "
                                  f"(PEFT always saves it); the adapter cannot be used without it")
        self.bank = source[BANK_KEY]
        cfg = self.config
        if tuple(self.bank.shape) != (cfg.num_vectors, cfg.vector_length):
            raise ShapeError(f"{self.name}: the vector bank has shape {tuple(self.bank.shape)}, the config says "
                             f"(num_vectors, vector_length) = {(cfg.num_vectors, cfg.vector_length)}")
        _check_divisible(self.name, self.layer, cfg.vector_length)
        own = {k for k in self.params if k != BANK_KEY}
        logits, topk_form = set(LOGITS), set(TOPK_INDICES + TOPK_WEIGHTS)
        if own not in (logits, topk_form):
            raise ShapeError(f"{self.name}: a VB-LoRA module has either {sorted(logits)} or their top-k form "
                             f"{sorted(topk_form)}; found {sorted(own)}")
        self.topk_form = own == topk_form
        L, h, r, k = cfg.vector_length, cfg.num_vectors, cfg.r, cfg.topk
        shapes = {"vblora_logits_A": (r, self.layer.in_features // L), "vblora_logits_B": (self.layer.out_features // L, r)}
        for key, lead in shapes.items():
            want = {key: (*lead, h)} if not self.topk_form else \
                {f"{key}_topk_indices": (*lead, k), f"{key}_topk_weights": (*lead, k - 1)}
            for name, shape in want.items():
                if tuple(self.params[name].shape) != shape:
                    raise ShapeError(f"{self.name}: {name} has shape {tuple(self.params[name].shape)}, expected "
                                     f"{shape} (r={r}, vector_length={L}, num_vectors={h}, topk={k}, layer out="
                                     f"{self.layer.out_features}, in={self.layer.in_features})")

    def selections(self, *, peft_compat: bool = False) -> tuple[Array | Selection, Array | Selection]:
        """The two factors' logits, or their :class:`Selection` for a top-k checkpoint."""
        if not self.topk_form:
            return self.params["vblora_logits_A"], self.params["vblora_logits_B"]
        return tuple(from_saved(self.params[ki], self.params[kw], self.config.num_vectors, where=self.name,
                                peft_compat=peft_compat)
                     for ki, kw in zip(TOPK_INDICES, TOPK_WEIGHTS))

    def scaled(self, c: float) -> "ModuleAdapter":
        """Scale ``c``: ``ΔW → c·ΔW`` (PEFT defines no VB-LoRA scale)."""
        return self.scale_scaling(c)

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        a, b = self.selections(peft_compat=peft_compat)
        return delta_weight(a, b, self.bank, topk=self.config.topk, layer=self.layer, scale=self.scaling)

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        a, b = self.selections(peft_compat=peft_compat)
        new = _apply(weight, a, b, self.bank, topk=self.config.topk, sign=1, layer=self.layer, scale=self.scaling,
                     copy=copy, safe=safe, where=self.name)
        return MergeResult(new, bias)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        a, b = self.selections(peft_compat=peft_compat)
        new = _apply(weight, a, b, self.bank, topk=self.config.topk, sign=-1, layer=self.layer, scale=self.scaling,
                     copy=copy, safe=False, where=self.name)
        return MergeResult(new, bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, kw = self.input_layer(x, weight, layer_kwargs)
        a, b = self.selections(peft_compat=bool(kw.get("peft_compat", False)))
        return forward(x, weight, a, b, self.bank, topk=self.config.topk, bias=bias, layer=layer,
                       scale=self.scaling, **kw)

    def describe(self) -> dict[str, Any]:
        return {"r": self.config.r, "topk": self.config.topk, "top-k form": self.topk_form}

    def num_parameters(self) -> int:
        """Trainable scalars of this module: its logits (the shared bank is counted once by the adapter's
        shared tensors, not here); for a top-k checkpoint, the stored weights."""
        keys = TOPK_WEIGHTS if self.topk_form else LOGITS
        return sum(math.prod(int(s) for s in self.params[k].shape) for k in keys)


#: checkpoint suffixes of this method's per-module tensors (ParameterDict entries: no ".weight")
PARAMETER_SUFFIXES = LOGITS + TOPK_INDICES + TOPK_WEIGHTS
Config = VBLoRAConfig
Module = VBLoRAModule
#: demo / documentation examples (non-trivial: wide logits so that top-k mixes unequal weights, a visible bank)
EXAMPLES = {
    "VB-LoRA": dict(r=3, num_vectors=10, vector_length=4, topk=3, init_logits_std=1.0, init_vector_bank_bound=0.5),
}

#: the method's description (peftmath.methods._contract.Method)
METHOD = Method(
    peft_type=PEFT_TYPE, config=VBLoRAConfig, module=VBLoRAModule, spec="specs/vblora.md",
    parameter_suffixes=PARAMETER_SUFFIXES, shared_keys=SHARED_KEYS, layer_kinds=SUPPORTED_KINDS, additive=True,
    init_field=None, examples=EXAMPLES, init_shared=init_shared,
    frozen_suffixes=TOPK_INDICES, trainable_shared=SHARED_KEYS,
)
