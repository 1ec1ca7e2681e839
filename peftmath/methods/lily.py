r"""Lily: low-rank interconnected adaptation across layers (Zhong et al., 2024, arXiv:2407.09946).

Each adapted Linear has a low-dimensional projector ``A`` ("LP"), shared by ``stride_A`` consecutive layers
of the same target, and a bank of ``num_B`` high-dimensional projectors ``B_e`` ("HP"), shared by every layer
of that target; a per-layer router mixes the bank, with weights averaged over the whole input batch::

    A: (r, in)   R: (num_B, r)   B: (num_B·r, out) = [B_0; …; B_{num_B−1}],  B_e: (r, out)
    h = x Aᵀ                       (…, r)             the low-rank code of every token
    p = softmax(h Rᵀ)              (…, num_B)         the router's probabilities per token
    p̄ = mean of p over every token of the batch       (num_B,)
    y = x Wᵀ + b + s · h (Σ_e p̄_e B_e)               s = scaling

Because ``p̄`` averages over the whole input, the adapter's change is not a fixed weight: for one batch it
is the linear map ``ΔW_x = s (Σ_e p̄_e(x) B_e)ᵀ A`` (:func:`batch_delta_weight`), and another batch mixes
the bank differently. So Lily has a forward and, in general, no merge: merge and unmerge refuse with
:class:`~peftmath.errors.UnsupportedError` (PEFT raises NotImplementedError always). The one exception is a
bank of equal projectors (a fresh adapter's zeros): then ``Σ_e p̄_e B_e = B_0`` for every input and merge is
``W + s B_0ᵀ A``.

Checkpoint: PEFT ties the tensors at injection time and saves one copy per module (``<module>.lily_A.weight``,
``<module>.lily_B.weight``, ``<module>.lily_router.weight``), so every module's copy is read as its own.
:func:`tie_groups` gives PEFT's groups (which modules hold the same ``A`` / ``B``);
:func:`num_trainable_parameters` counts each shared tensor once, as PEFT's ``get_nb_trainable_parameters``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from .._array import as_compute, compute_dtype, namespace
from ..backends import backend_for, host_rng, kaiming_uniform_bound
from ..config import TunerConfig, check_flags, check_number, check_positive_int
from ..errors import ConfigError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._base import MergeResult, ModuleAdapter, apply_delta, check_shape, require_kind
from ._contract import Method

Array = Any

__all__ = ["LilyConfig", "router_weights", "combined_B", "batch_delta_weight", "adapter_output", "forward",
           "tie_groups", "num_trainable_parameters", "init_module", "init_adapter", "LilyModule"]

PEFT_TYPE = "LILY"
SUPPORTED_KINDS = (LayerKind.LINEAR,)
_A, _B, _R = "lily_A.weight", "lily_B.weight", "lily_router.weight"


# --------------------------------------------------------------------------------------------------
# Config (specs/lily.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class LilyConfig(TunerConfig):
    """PEFT's ``LilyConfig`` (``peft_type: "LILY"``), PEFT's names and defaults."""

    peft_type: ClassVar[str] = "LILY"

    r: int = 32
    stride_A: int = 1
    num_B: int = 2
    scaling: float = 1.0
    init_weights: bool = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "r", self.r)
        check_positive_int(source, "stride_A", self.stride_A)
        check_positive_int(source, "num_B", self.num_B)
        if self.num_B < 2:
            raise ConfigError(f"{source}: field 'num_B' must be at least 2 (the router mixes num_B high-dimensional "
                              f"projectors; PEFT refuses fewer), got {self.num_B}")
        check_number(source, "scaling", self.scaling)
        check_flags(source, self, "init_weights")


def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "Lily", SUPPORTED_KINDS, peft="PEFT's Lily wraps nn.Linear only")


# --------------------------------------------------------------------------------------------------
# Shapes and the router (specs/lily.md, "2. Shapes and the router")
# --------------------------------------------------------------------------------------------------
def _check(A: Array, router: Array, B: Array, where: str) -> tuple[int, int, int, int]:
    """``(r, in, num_B, out)`` from ``A (r, in)``, ``R (num_B, r)``, ``B (num_B·r, out)``; ShapeError otherwise."""
    if A.ndim != 2 or router.ndim != 2 or B.ndim != 2:
        raise ShapeError(f"{where}: lily_A {tuple(A.shape)}, lily_router {tuple(router.shape)} and lily_B "
                         f"{tuple(B.shape)} must all be matrices")
    r, inn = int(A.shape[0]), int(A.shape[1])
    num_B = int(router.shape[0])
    check_shape(where, "lily_router.weight", router, (num_B, r))
    if int(B.shape[0]) != num_B * r:
        raise ShapeError(f"{where}: lily_B.weight has {int(B.shape[0])} rows, expected num_B·r = {num_B}·{r} = "
                         f"{num_B * r} (num_B from lily_router {tuple(router.shape)}, r from lily_A {tuple(A.shape)})")
    return r, inn, num_B, int(B.shape[1])


def router_weights(h: Array, router: Array) -> Array:
    """``p̄``: the softmax of ``h Rᵀ`` over the bank, averaged over every token of ``h (…, r)``; ``(num_B,)``.

    >>> import numpy as np
    >>> router_weights(np.array([[1.0], [-1.0]]), np.array([[1.0], [0.0]])).round(6).tolist()
    [0.5, 0.5]
    """
    xp = namespace(h, router, where="lily.router_weights")
    cd = compute_dtype(xp, h.dtype, router.dtype)
    logits = xp.matmul(as_compute(xp, h, cd), xp.matrix_transpose(as_compute(xp, router, cd)))
    num_B = int(router.shape[0])
    logits = xp.reshape(logits, (-1, num_B))
    e = xp.exp(logits - xp.max(logits, axis=-1, keepdims=True))
    p = e / xp.sum(e, axis=-1, keepdims=True)
    return xp.mean(p, axis=0)


def combined_B(weights: Array, B: Array) -> Array:
    """``Σ_e p̄_e B_e`` ``(r, out)`` from ``p̄ (num_B,)`` and ``B (num_B·r, out)``, in float32 or wider."""
    xp = namespace(weights, B, where="lily.combined_B")
    cd = compute_dtype(xp, weights.dtype, B.dtype)
    num_B = int(weights.shape[0])
    bank = xp.reshape(as_compute(xp, B, cd), (num_B, -1, int(B.shape[1])))
    return xp.sum(as_compute(xp, weights, cd)[:, None, None] * bank, axis=0)


# --------------------------------------------------------------------------------------------------
# The adapter's change for one batch (specs/lily.md, "3. Forward")
# --------------------------------------------------------------------------------------------------
def batch_delta_weight(x: Array, A: Array, router: Array, B: Array, *, scaling: float = 1.0) -> Array:
    """``ΔW_x = s (Σ_e p̄_e(x) B_e)ᵀ A`` ``(out, in)``: the linear map the adapter adds for the batch ``x``
    (``x ΔW_xᵀ`` is the adapter's term of :func:`forward` on that batch; another batch has another map)."""
    xp = namespace(x, A, router, B, where="lily.batch_delta_weight")
    _check(A, router, B, "lily.batch_delta_weight")
    cd = compute_dtype(xp, x.dtype, A.dtype, router.dtype, B.dtype)
    h = xp.matmul(as_compute(xp, x, cd), xp.matrix_transpose(as_compute(xp, A, cd)))
    mix = combined_B(router_weights(h, router), B)
    return scaling * xp.matmul(xp.matrix_transpose(mix), as_compute(xp, A, cd))


def adapter_output(x: Array, A: Array, router: Array, B: Array, *, scaling: float = 1.0,
                   dropout: Callable[[Array], Array] | None = None) -> Array:
    """The adapter's term alone, ``s · h (Σ_e p̄_e B_e)`` with ``h = x Aᵀ``, in float32 or wider."""
    xp = namespace(x, A, router, B, where="lily.adapter_output")
    cd = compute_dtype(xp, x.dtype, A.dtype, router.dtype, B.dtype)
    xin = as_compute(xp, x, cd)
    if dropout is not None:
        xin = dropout(xin)
    h = xp.matmul(xin, xp.matrix_transpose(as_compute(xp, A, cd)))
    return scaling * xp.matmul(h, combined_B(router_weights(h, router), B))


def forward(x: Array, W: Array, A: Array, router: Array, B: Array, *, bias: Array | None = None,
            scaling: float = 1.0, layer: Layer | LayerKind | str | None = None,
            dropout: Callable[[Array], Array] | None = None, peft_compat: bool = False) -> Array:
    """The adapted Linear: ``x Wᵀ + b + s · h (Σ_e p̄_e B_e)``, ``h = x Aᵀ``, ``p̄`` averaged over every token
    of ``x (…, in)`` (so the rows of a batch are not independent: split a batch and the output changes).

    Computed in float32 (float64 for float64 inputs) and rounded once to the result type of ``x`` and ``W``;
    ``peft_compat=True`` rounds the base output first, then adds the adapter's term, as PEFT does.

    >>> import numpy as np
    >>> A = np.array([[1.0, 0.0]]); R = np.array([[1.0], [0.0]]); B = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> forward(np.array([[0.0, 0.0]]), np.eye(2), A, R, B)       # h = 0: the router is even, Δ = 0
    array([[0., 0.]])
    """
    xp = namespace(x, W, A, router, B, bias, where="lily.forward")
    lay, _ = Layer.for_weight(layer, W).for_input(x, "lily.forward")
    _check_kind(lay, "lily.forward")
    lay.check_bias(bias)
    r, inn, _, out = _check(A, router, B, "lily.forward")
    if (out, inn) != lay.weight_shape:
        raise ShapeError(f"lily.forward: lily_A {tuple(A.shape)} and lily_B {tuple(B.shape)} fit a Linear ({out}, "
                         f"{inn}), not the base weight {tuple(W.shape)}")
    delta = adapter_output(x, A, router, B, scaling=scaling, dropout=dropout)
    cd = compute_dtype(xp, delta.dtype, W.dtype)
    out_dtype = xp.result_type(x.dtype, W.dtype)
    base = lay.base_forward(as_compute(xp, x, cd), as_compute(xp, W, cd),
                            None if bias is None else as_compute(xp, bias, cd), xp)
    if peft_compat:  # PEFT: base output in the storage dtype, then + (delta * scaling).to(that dtype)
        base = as_compute(xp, as_compute(xp, base, out_dtype), cd)
        delta = as_compute(xp, as_compute(xp, delta, out_dtype), cd)
    return as_compute(xp, base + as_compute(xp, delta, cd), out_dtype)


# --------------------------------------------------------------------------------------------------
# Sharing across layers (specs/lily.md, "4. Sharing across layers")
# --------------------------------------------------------------------------------------------------
def _model_order(name: str) -> tuple:
    """A sort key for module names that puts ``layers.2`` before ``layers.10`` (the model's order)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name))


def _suffix(config: LilyConfig, name: str) -> str | None:
    """The target that groups ``name``: the regex string itself, else the longest entry of ``target_modules``
    that ``name`` ends with (PEFT: the last match in its set's iteration order; see the spec)."""
    targets = config.target_modules
    if isinstance(targets, str):
        return targets
    found = [t for t in (targets or ()) if name.endswith(t)]
    return max(found, key=lambda t: (len(t), t)) if found else None


def tie_groups(config: LilyConfig, layers: Mapping[str, Layer] | Iterable[tuple[str, Any]]
               ) -> list[tuple[list[str], list[list[str]]]]:
    """PEFT's sharing: ``[(modules of one group, [modules sharing one A, ...]), ...]``.

    A group is the modules with the same target (:func:`_suffix`) and the same weight shape, in model order
    (numbers in names compared as numbers); all of a group share one ``B`` (and one bank), and each run of
    ``stride_A`` consecutive modules of a group shares one ``A``. ``layers``: name -> Layer or weight shape.

    >>> cfg = LilyConfig(target_modules=["q"], stride_A=2)
    >>> tie_groups(cfg, {f"l.{i}.q": (4, 4) for i in (0, 1, 2, 10)})
    [(['l.0.q', 'l.1.q', 'l.2.q', 'l.10.q'], [['l.0.q', 'l.1.q'], ['l.2.q', 'l.10.q']])]
    """
    items = layers.items() if isinstance(layers, Mapping) else layers
    groups: dict[tuple, list[str]] = {}
    for name, lay in sorted(items, key=lambda kv: _model_order(kv[0])):
        shape = tuple(lay.weight_shape) if isinstance(lay, Layer) else tuple(int(s) for s in lay)
        groups.setdefault((_suffix(config, name), shape), []).append(name)
    s = config.stride_A
    return [(names, [names[i:i + s] for i in range(0, len(names), s)]) for names in groups.values()]


def num_trainable_parameters(config: LilyConfig, params: Mapping[str, Mapping[str, Array]]) -> int:
    """Trainable scalars as PEFT counts them: each module's router, each shared ``A`` once per stride block,
    each group's ``B`` once (PEFT's parameters are tied, its checkpoint holds one copy per module)."""
    shapes = {m: (int(p[_B].shape[1]), int(p[_A].shape[1])) for m, p in params.items()}
    total = 0
    for names, blocks in tie_groups(config, shapes):
        total += _numel(params[names[0]][_B]) + sum(_numel(params[n][_R]) for n in names)
        total += sum(_numel(params[block[0]][_A]) for block in blocks)
    return total


def _numel(a: Array) -> int:
    n = 1
    for s in a.shape:
        n *= int(s)
    return n


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/lily.md, "5. Initialisation")
# --------------------------------------------------------------------------------------------------
def _draw(rng: np.random.Generator, shape: tuple[int, int], xp: Any, device: Any, dtype: Any) -> Array:
    """Kaiming-uniform ``U(±1/sqrt(fan_in))`` (PyTorch's ``kaiming_uniform_(a=sqrt(5))``), fan_in = shape[1]."""
    b = kaiming_uniform_bound(shape[1])
    return _put(rng.uniform(-b, b, shape), xp, device, dtype)


def _put(a: np.ndarray, xp: Any, device: Any, dtype: Any) -> Array:
    if xp is None:
        import array_api_compat.numpy as xp
    out = backend_for(xp).from_host(np.ascontiguousarray(a, dtype=np.float32), xp, device)
    target = dtype if dtype is not None else xp.float32
    return out if out.dtype == target else xp.astype(out, target)


def init_module(config: LilyConfig, layer: Layer, *, seed: int | np.random.Generator | None = 0,
                init_weights: bool | None = None, xp: Any = None, device: Any = None,
                dtype: Any = None) -> dict[str, Array]:
    """One module's tensors, untied: ``A`` and the router Kaiming-uniform, ``B`` zero (``init_weights=True``:
    the adapter starts as a no-op) or Kaiming-uniform (``False``); drawn on the host in that order."""
    _check_kind(layer, "lily.init_module")
    flag = config.init_weights if init_weights is None else init_weights
    rng = host_rng(seed)
    r, nb = config.r, config.num_B
    A = _draw(rng, (r, layer.in_features), xp, device, dtype)
    R = _draw(rng, (nb, r), xp, device, dtype)
    B = (_draw(rng, (nb * r, layer.out_features), xp, device, dtype) if not flag
         else _put(np.zeros((nb * r, layer.out_features)), xp, device, dtype))
    return {_A: A, _B: B, _R: R}


def init_adapter(config: LilyConfig, layers: Mapping[str, Layer], *, seed: int = 0,
                 init_weights: bool | None = None, xp: Any = None, device: Any = None,
                 dtype: Any = None) -> dict[str, dict[str, Array]]:
    """Every module's tensors with PEFT's ties (:func:`tie_groups`): one ``A`` per stride block, one ``B`` per
    group, a router per module; each module's own draws from ``SeedSequence(seed, spawn_key=(i,))`` over the
    modules in model order, the block leader's ``A`` and the group leader's ``B`` copied to the others."""
    order = sorted(layers, key=_model_order)
    own = {name: init_module(config, layers[name], seed=np.random.default_rng(np.random.SeedSequence(seed,
                             spawn_key=(i,))), init_weights=init_weights, xp=xp, device=device, dtype=dtype)
           for i, name in enumerate(order)}
    for names, blocks in tie_groups(config, layers):
        for block in blocks:
            for n in block:
                own[n][_A] = own[block[0]][_A]
        for n in names:
            own[n][_B] = own[names[0]][_B]
    return {n: own[n] for n in layers}


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint (merge / unmerge: specs/lily.md, "6. Merge: only a bank of equal projectors")
# --------------------------------------------------------------------------------------------------
class LilyModule(ModuleAdapter):
    """Lily on one nn.Linear: ``lily_A.weight (r, in)``, ``lily_router.weight (num_B, r)``,
    ``lily_B.weight (num_B·r, out)`` (this module's copies of the tensors PEFT ties across layers)."""

    peft_type = "LILY"
    supported_kinds = SUPPORTED_KINDS
    #: a weight delta only for a bank of equal projectors: the router's mixture depends on the input batch
    additive: ClassVar[bool] = False

    @classmethod
    def initialize(cls, name: str, config: LilyConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """One module's tensors (:func:`init_module`). PEFT ties ``A`` over ``stride_A`` layers and ``B`` over a
        whole group, which one module alone cannot honour: with ``stride_A > 1`` or random ``B``
        (``init_weights=False``) this refuses (:class:`UnsupportedError`) and names :func:`init_adapter`,
        which initialises all modules together; the default (``stride_A=1``, ``B = 0``) ties nothing that
        differs."""
        _check_kind(layer, name)
        flag = config.init_weights if init is None else init
        if not isinstance(flag, bool):
            raise ConfigError(f"{name}: init_weights must be true or false, got {flag!r}")
        if config.stride_A > 1 or not flag:
            raise UnsupportedError(
                f"{name}: Lily ties lily_A over stride_A={config.stride_A} consecutive layers and lily_B over all "
                f"layers of a target{'' if flag else ' (init_weights=False draws a random lily_B)'}; a module "
                f"initialised alone would hold untied copies that PEFT overwrites when it loads them. Initialise "
                f"all modules together with peftmath.methods.lily.init_adapter(config, layers, seed=...)")
        if xp is None and weight is not None:
            xp = namespace(weight)
        return init_module(config, layer, seed=seed, init_weights=flag, xp=xp, device=device, dtype=dtype), None

    @classmethod
    def infer_layer(cls, name: str, config: LilyConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """A Linear ``(out, in)`` from ``lily_A (r, in)`` and ``lily_B (num_B·r, out)``."""
        if _A not in params or _B not in params:
            raise ShapeError(f"{name}: Lily needs {_A}, {_B} and {_R}, found {sorted(params)}")
        shape = (int(params[_B].shape[-1]), int(params[_A].shape[-1]))
        return Layer.of(tuple(int(s) for s in weight_shape) if weight_shape is not None else shape,
                        kind or LayerKind.LINEAR)

    def validate(self) -> None:
        _check_kind(self.layer, self.name)
        missing = sorted({_A, _B, _R} - set(self.params))
        extra = sorted(set(self.params) - {_A, _B, _R})
        if missing or extra:
            raise ShapeError(f"{self.name}: Lily has exactly {_A}, {_B}, {_R}; missing {missing}, unexpected {extra}")
        self.A, self.B, self.router = self.params[_A], self.params[_B], self.params[_R]
        r, inn, num_B, out = _check(self.A, self.router, self.B, self.name)
        if (out, inn) != self.layer.weight_shape:
            raise ShapeError(f"{self.name}: lily_A {tuple(self.A.shape)} and lily_B {tuple(self.B.shape)} fit a "
                             f"Linear ({out}, {inn}), not the base weight {self.layer.weight_shape}")
        if (r, num_B) != (self.config.r, self.config.num_B):
            raise ShapeError(f"{self.name}: the tensors have r={r}, num_B={num_B} but the config says "
                             f"r={self.config.r}, num_B={self.config.num_B} (PEFT reshapes lily_B by the config's "
                             f"num_B); does the config belong to this checkpoint?")
        self.scaling = float(self.config.scaling)

    def describe(self) -> dict[str, Any]:
        return {"r": int(self.A.shape[0]), "num_B": int(self.router.shape[0]), "scaling": self.scaling}

    def _fixed_delta(self, what: str, dtype: Any = None) -> Array:
        """``ΔW = s B_0ᵀ A`` when every projector of the bank is the same (then ``B̄ = B_0`` whatever the router
        says: the weights ``p̄`` sum to one), else :class:`UnsupportedError`: the change depends on the input."""
        xp = self.xp
        num_B = int(self.router.shape[0])
        bank = xp.reshape(self.B, (num_B, -1, int(self.B.shape[1])))
        if not bool(xp.all(bank == bank[:1, ...])):
            raise UnsupportedError(
                f"{self.name}: Lily cannot be {what}: its router averages the mixing weights of the num_B={num_B} "
                f"projectors in lily_B over every token of the input batch, and these projectors differ, so the "
                f"adapter's change depends on the input and is no fixed weight (PEFT refuses too). Use forward "
                f"(peftmath.methods.lily.batch_delta_weight gives the map of one batch)")
        cd = dtype if dtype is not None else compute_dtype(xp, self.A.dtype, self.B.dtype)
        return self.scaling * xp.matmul(xp.matrix_transpose(as_compute(xp, bank[0, ...], cd)),
                                        as_compute(xp, self.A, cd))

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        """``s B_0ᵀ A`` ``(out, in)`` when the bank's projectors are all equal (a fresh adapter: all zero);
        otherwise refused (see :meth:`_fixed_delta`)."""
        return self._fixed_delta("written as a delta weight")

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        """``W + s B_0ᵀ A`` when the bank's projectors are all equal, formed in float32 (float64) and rounded
        once; otherwise :class:`UnsupportedError` (nothing written)."""
        self.layer.check_weight(weight)
        cd = compute_dtype(self.xp, weight.dtype, self.A.dtype, self.B.dtype)
        d = self._fixed_delta("merged", cd)
        return MergeResult(apply_delta(self.name, weight, d, copy=copy, safe=safe, layer=self.layer), bias)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        """``W − s B_0ᵀ A`` (the inverse of :meth:`merge`, up to rounding), under the same condition."""
        self.layer.check_weight(weight)
        cd = compute_dtype(self.xp, weight.dtype, self.A.dtype, self.B.dtype)
        d = self._fixed_delta("unmerged", cd)
        return MergeResult(apply_delta(self.name, weight, d, sign=-1, copy=copy, layer=self.layer), bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, *, peft_compat: bool = False,
                **layer_kwargs: Any) -> Array:
        layer, _ = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.A, self.router, self.B, bias=bias, scaling=self.scaling, layer=layer,
                       peft_compat=peft_compat)

    def scaled(self, c: float) -> "ModuleAdapter":
        """Scale ``c``: ``s → c·s`` (the adapter's term is linear in ``scaling``)."""
        return self.scale_scaling(c)


#: checkpoint suffixes of this method's per-module tensors (nn.Linear modules in ModuleDicts)
PARAMETER_SUFFIXES = (_A, _B, _R)
Config = LilyConfig
Module = LilyModule
#: no demo rows: the demo and the contract tests merge every example, and a trained Lily cannot be merged
EXAMPLES: dict[str, dict[str, Any]] = {}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=LilyConfig, module=LilyModule, spec="specs/lily.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=LilyModule.supported_kinds, additive=True,
    init_field="init_weights", examples=EXAMPLES, forward_only=True,
    count_trainable=lambda config, params, shared: num_trainable_parameters(config, params),  # PEFT's ties
)
