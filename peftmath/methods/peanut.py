r"""PEANuT: parameter-efficient adaptation with a weight-aware neural tweaker (Zhong et al., 2024,
arXiv:2410.01870).

PEANuT generates the update of an nn.Linear from the base weight itself, through a small non-linear
network applied to the rows of ``Wᵀ`` (one row per input feature)::

    H₀ = φ(Wᵀ Aᵀ)                                   A: (r, out)  ->  H: (in, r)
    encoders  i = 0..d−1:  R_i = H,  H = φ(H E_iᵀ)   E_i: (r, r)
    decoders  i = 0..d−1:  H = φ(H D_iᵀ) + R_{d−1−i} D_i: (r, r)
    ΔW = s · B Hᵀ                                    B: (out, r),  ΔW: (out, in)

``φ`` is the config's ``act_fn`` (a transformers ``ACT2FN`` name), ``d`` its ``depth``, ``s`` its ``scaling``.
``ΔW`` has rank ≤ r but depends on ``W``: merging adds ``s·B Hᵀ`` and overwrites the ``W`` that ``H`` was
computed from, so merge returns ``H`` (``in·r`` numbers) as its record and unmerge, given it, subtracts the
same ``s·B Hᵀ`` (exact up to rounding); without it the unmerge is refused (``W`` would have to be solved
from a non-linear equation). PEFT supports nn.Linear only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._array import as_compute, compute_dtype, namespace
from ..backends import backend_for, host_rng, kaiming_uniform_bound
from ..config import TunerConfig, check_flags, check_nonnegative_int, check_number, check_positive_int
from ..errors import ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import MergeResult, ModuleAdapter, apply_delta, layer_of_weight_shape, require_kind
from ._special import erf

Array = Any

__all__ = ["PeanutConfig", "ACTIVATIONS", "activation", "erf", "hidden", "delta_weight", "forward", "PeanutModule",
           "MAX_DEPTH"]

PEFT_TYPE = "PEANUT"
_A, _B = "peanut_A.weight", "peanut_B.weight"
SUPPORTED_KINDS = (LayerKind.LINEAR,)
#: the deepest network whose checkpoint keys (``peanut_encoders.<i>.weight``) peftmath lists; deeper is refused
MAX_DEPTH = 64


def _enc(i: int) -> str:
    return f"peanut_encoders.{i}.weight"


def _dec(i: int) -> str:
    return f"peanut_decoders.{i}.weight"


# --------------------------------------------------------------------------------------------------
# Activations (specs/peanut.md, "2. Activations")
# --------------------------------------------------------------------------------------------------
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu(xp: Any, x: Array) -> Array:
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _gelu_tanh(xp: Any, x: Array, c: float = _SQRT_2_OVER_PI) -> Array:
    return 0.5 * x * (1.0 + xp.tanh(c * (x + 0.044715 * x * x * x)))


def _sigmoid(xp: Any, x: Array) -> Array:
    return 1.0 / (1.0 + xp.exp(-x))


def _softplus(xp: Any, x: Array) -> Array:
    return xp.logaddexp(xp.zeros_like(x), x)


def _relu(xp: Any, x: Array) -> Array:
    return xp.maximum(x, xp.zeros_like(x))


#: transformers' ``ACT2FN`` names peftmath implements (the formula of each transformers / torch class)
ACTIVATIONS: dict[str, Callable[[Any, Array], Array]] = {
    "relu": _relu,
    "relu2": lambda xp, x: _relu(xp, x) * _relu(xp, x),
    "relu6": lambda xp, x: xp.clip(x, 0.0, 6.0),
    "leaky_relu": lambda xp, x: xp.where(x >= 0, x, 0.01 * x),
    "linear": lambda xp, x: x,
    "sigmoid": _sigmoid,
    "tanh": lambda xp, x: xp.tanh(x),
    "silu": lambda xp, x: x * _sigmoid(xp, x),
    "swish": lambda xp, x: x * _sigmoid(xp, x),
    "gelu": _gelu,
    "gelu_python": _gelu,
    "gelu_10": lambda xp, x: xp.clip(_gelu(xp, x), -10.0, 10.0),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_fast": lambda xp, x: _gelu_tanh(xp, x, 0.7978845608),  # transformers' FastGELU: √(2/π) to 10 digits
    "gelu_accurate": _gelu_tanh,
    "quick_gelu": lambda xp, x: x * _sigmoid(xp, 1.702 * x),
    "mish": lambda xp, x: x * xp.tanh(_softplus(xp, x)),
    "hardswish": lambda xp, x: x * xp.clip(x + 3.0, 0.0, 6.0) / 6.0,
    "laplace": lambda xp, x: 0.5 * (1.0 + erf((x - 0.707107) / (0.282095 * math.sqrt(2.0)))),
    "sqrtsoftplus": lambda xp, x: xp.sqrt(_softplus(xp, x)),
}
#: ACT2FN names with learned or stateful parameters of their own, which a PEANuT checkpoint does not hold
_REFUSED_ACTIVATIONS = {"prelu": "nn.PReLU has a learned slope", "xielu": "XIELU has learned parameters"}


def activation(name: str) -> Callable[[Any, Array], Array]:
    """``φ`` of ``act_fn`` ``name``: ``fn(xp, x)``; :class:`UnsupportedError` for an ``ACT2FN`` name peftmath does
    not implement, :class:`ConfigError` for any other string."""
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    if name in _REFUSED_ACTIVATIONS:
        raise UnsupportedError(f"PEANuT act_fn {name!r}: {_REFUSED_ACTIVATIONS[name]}, fresh in every PEFT layer and "
                               f"not saved; peftmath implements {', '.join(sorted(ACTIVATIONS))}")
    raise ConfigError(f"PEANuT act_fn {name!r} is not a transformers ACT2FN activation peftmath knows; use one of "
                      f"{', '.join(sorted(ACTIVATIONS))}")


# --------------------------------------------------------------------------------------------------
# Config (specs/peanut.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class PeanutConfig(TunerConfig):
    """PEFT's ``PeanutConfig`` (``peft_type: "PEANUT"``), PEFT's names and defaults."""

    peft_type: ClassVar[str] = "PEANUT"

    r: int = 32
    depth: int = 0
    act_fn: str = "relu"
    scaling: float = 1.0
    init_weights: bool = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "r", self.r)
        check_nonnegative_int(source, "depth", self.depth)
        check_number(source, "scaling", self.scaling)
        check_flags(source, self, "init_weights")
        if not isinstance(self.act_fn, str):
            raise ConfigError(f"{source}: field 'act_fn' must be a transformers ACT2FN name, got {self.act_fn!r}")
        try:
            activation(self.act_fn)
        except (ConfigError, UnsupportedError) as exc:
            raise type(exc)(f"{source}: {exc}") from None
        if self.depth > MAX_DEPTH:
            raise UnsupportedError(f"{source}: depth={self.depth}: peftmath reads PEANuT networks of depth up to "
                                   f"{MAX_DEPTH} (checkpoint keys peanut_encoders.<i>.weight, i < {MAX_DEPTH})")


def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "PEANuT", SUPPORTED_KINDS, peft="it adapts nn.Linear only")


# --------------------------------------------------------------------------------------------------
# Delta weight (specs/peanut.md, "3. Delta weight")
# --------------------------------------------------------------------------------------------------
def hidden(W: Array, A: Array, encoders: list[Array], decoders: list[Array], *, act_fn: str = "relu",
           dtype: Any = None) -> Array:
    """``H (in, r)``: the tweaker network on the rows of ``Wᵀ`` (``W (out, in)``, ``A (r, out)``, encoders and
    decoders ``(r, r)``), in ``dtype`` (default float32, float64 for float64 inputs).

    >>> import numpy as np
    >>> hidden(np.array([[1.0, -2.0]]), np.array([[1.0], [-1.0]]), [], []).tolist()
    [[1.0, 0.0], [0.0, 2.0]]
    """
    xp = namespace(W, A, *encoders, *decoders)
    if len(encoders) != len(decoders):
        raise ShapeError(f"PEANuT needs as many decoders as encoders, got {len(encoders)} and {len(decoders)}")
    cd = dtype if dtype is not None else compute_dtype(xp, W.dtype, A.dtype)
    phi = activation(act_fn)

    def lin(h: Array, M: Array) -> Array:  # h Mᵀ
        return xp.matmul(h, xp.matrix_transpose(as_compute(xp, M, cd)))

    H = phi(xp, lin(xp.matrix_transpose(as_compute(xp, W, cd)), A))
    residuals = []
    for E in encoders:
        residuals.append(H)
        H = phi(xp, lin(H, E))
    for i, D in enumerate(decoders):
        H = phi(xp, lin(H, D)) + residuals[len(decoders) - 1 - i]
    return H


def delta_weight(W: Array, A: Array, B: Array, encoders: list[Array], decoders: list[Array], *,
                 scaling: float = 1.0, act_fn: str = "relu", record: Array | None = None, dtype: Any = None) -> Array:
    """``ΔW = s·B Hᵀ`` ``(out, in)``, ``H`` from ``record`` or :func:`hidden` of ``W``.

    >>> import numpy as np
    >>> W = np.array([[1.0, -2.0]]); A = np.array([[1.0], [-1.0]]); B = np.array([[3.0, 1.0]])
    >>> delta_weight(W, A, B, [], [], scaling=0.5).tolist()   # 0.5 * [3, 1] @ [[1, 0], [0, 2]]
    [[1.5, 1.0]]
    """
    xp = namespace(W, A, B)
    cd = dtype if dtype is not None else compute_dtype(xp, W.dtype, A.dtype, B.dtype)
    H = record if record is not None else hidden(W, A, encoders, decoders, act_fn=act_fn, dtype=cd)
    return scaling * xp.matmul(as_compute(xp, B, cd), xp.matrix_transpose(as_compute(xp, H, cd)))


# --------------------------------------------------------------------------------------------------
# Forward (specs/peanut.md, "4. Forward")
# --------------------------------------------------------------------------------------------------
def forward(x: Array, W: Array, A: Array, B: Array, encoders: list[Array], decoders: list[Array], *,
            scaling: float = 1.0, act_fn: str = "relu", bias: Array | None = None, layer: Any = None,
            peft_compat: bool = False) -> Array:
    """``x Wᵀ + b + s·(x H) Bᵀ`` (never forming ``ΔW``), in float32 (float64 for float64 inputs), rounded once
    to the output dtype. ``peft_compat=True``: PEFT's order — the base output rounded to its dtype, then
    ``x ΔWᵀ`` (``ΔW`` formed in the adapter's dtype) added and rounded again."""
    xp = namespace(x, W, A, B, bias, where="peanut.forward")
    lay, _ = Layer.for_weight(layer, W).for_input(x, "peanut.forward")
    _check_kind(lay, "peanut.forward")
    lay.check_bias(bias)
    out_dtype = xp.result_type(x.dtype, W.dtype)
    if peft_compat:
        ad = compute_dtype(xp, A.dtype)
        d = delta_weight(W, A, B, encoders, decoders, scaling=scaling, act_fn=act_fn, dtype=ad)
        y = lay.base_forward(x, W, bias, xp)
        term = xp.matmul(as_compute(xp, x, ad), xp.matrix_transpose(d))
        cd = compute_dtype(xp, out_dtype, ad)
        return as_compute(xp, as_compute(xp, y, cd) + as_compute(xp, as_compute(xp, term, out_dtype), cd), out_dtype)
    cd = compute_dtype(xp, x.dtype, W.dtype, A.dtype)
    H = hidden(W, A, encoders, decoders, act_fn=act_fn, dtype=cd)
    xc = as_compute(xp, x, cd)
    y = lay.base_forward(xc, as_compute(xp, W, cd), None if bias is None else as_compute(xp, bias, cd), xp)
    term = xp.matmul(xp.matmul(xc, H), xp.matrix_transpose(as_compute(xp, B, cd)))
    return as_compute(xp, y + scaling * term, out_dtype)


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint (merge / unmerge: specs/peanut.md, "5. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
class PeanutModule(ModuleAdapter):
    """PEANuT on one nn.Linear: ``peanut_A (r, out)``, ``peanut_B (out, r)``, ``depth`` encoders and decoders
    ``(r, r)``. Additive with a ``ΔW`` that depends on ``W``; merge returns ``H`` as its record."""

    peft_type = "PEANUT"
    supported_kinds = SUPPORTED_KINDS
    merge_record = True
    #: no standalone ΔW: it needs the base weight (merge / forward take it)
    additive: ClassVar[bool] = False

    @classmethod
    def infer_layer(cls, name: str, config: PeanutConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """The Linear of the base weight's shape (the tensors give ``out`` and ``r`` only)."""
        return layer_of_weight_shape(name, _A, params, weight_shape, kind, False,
                                     "PEANuT's tensors act on the output dimension only")

    def validate(self) -> None:
        _check_kind(self.layer, self.name)
        depth = self.config.depth
        want = {_A, _B} | {_enc(i) for i in range(depth)} | {_dec(i) for i in range(depth)}
        missing, extra = sorted(want - set(self.params)), sorted(set(self.params) - want)
        if missing or extra:
            raise ShapeError(f"{self.name}: PEANuT with depth={depth} has peanut_A, peanut_B and {depth} encoder and "
                             f"decoder weights; missing {missing}, unexpected {extra} (does depth in "
                             f"adapter_config.json match the checkpoint?)")
        self.A, self.B = self.params[_A], self.params[_B]
        self.encoders = [self.params[_enc(i)] for i in range(depth)]
        self.decoders = [self.params[_dec(i)] for i in range(depth)]
        out, r = self.layer.out_features, int(self.A.shape[0])
        shapes = [(self.A, (r, out)), (self.B, (out, r))] + [(t, (r, r)) for t in self.encoders + self.decoders]
        if self.A.ndim != 2 or any(tuple(t.shape) != s for t, s in shapes):
            raise ShapeError(f"{self.name}: PEANuT tensors {[tuple(t.shape) for t, _ in shapes]} do not fit a Linear "
                             f"{self.layer.weight_shape}: peanut_A (r, out), peanut_B (out, r), hidden (r, r)")
        self.scaling = float(self.config.scaling)
        self.act_fn = self.config.act_fn
        activation(self.act_fn)

    def describe(self) -> dict[str, Any]:
        return {"r": int(self.A.shape[0]), "depth": len(self.encoders), "act_fn": self.act_fn,
                "scaling": self.scaling}

    def scaled(self, c: float) -> ModuleAdapter:
        """Scale ``c``: ``s → c·s`` (``ΔW → c·ΔW``; PEFT's ``scaling`` is the same factor)."""
        return self.scale_scaling(c)

    def hidden(self, weight: Array, dtype: Any = None) -> Array:
        """``H (in, r)`` of this module for base weight ``weight``."""
        return hidden(weight, self.A, self.encoders, self.decoders, act_fn=self.act_fn, dtype=dtype)

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        raise UnsupportedError(f"{self.name}: PEANuT's ΔW is computed from the base weight; use merge or forward "
                               f"with the base weight (or peanut.delta_weight(W, ...))")

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        """``W' = W + s·B Hᵀ`` with ``H`` from ``W``; the record is ``H``. ``peft_compat=True`` rounds ``ΔW`` to
        ``W``'s dtype before adding it (PEFT's ``add_(ΔW.to(dtype))``)."""
        self.layer.check_weight(weight)
        xp = self.xp
        cd = compute_dtype(xp, weight.dtype, self.A.dtype)
        H = self.hidden(weight, compute_dtype(xp, self.A.dtype) if peft_compat else cd)
        new = self._apply(weight, H, 1, copy=copy, safe=safe, peft_compat=peft_compat)
        return MergeResult(new, bias, H)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        """``W = W' − s·B Hᵀ`` with the merge's record ``H``; :class:`NotInvertibleError` without it."""
        self.layer.check_weight(weight)
        if record is None:
            raise NotInvertibleError(
                f"{self.name}: unmerging PEANuT needs H, the tweaker network's output on the original weight, which "
                f"merge returns as MergeResult.record (Adapter.merge keeps it when given records={{}}); it cannot be "
                f"recovered from the merged weight (W would have to be solved from W' = W + s·B·H(W)ᵀ). PEFT keeps a "
                f"copy of the whole original weight instead")
        want = (self.layer.in_features, int(self.A.shape[0]))
        if tuple(record.shape) != want:
            raise ShapeError(f"{self.name}: the PEANuT merge record has shape {tuple(record.shape)}, expected (in, r) "
                             f"= {want}")
        return MergeResult(self._apply(weight, record, -1, copy=copy, safe=False, peft_compat=peft_compat), bias)

    def _apply(self, weight: Array, H: Array, sign: int, *, copy: bool, safe: bool, peft_compat: bool) -> Array:
        xp, s = self.xp, self.scaling

        def build() -> Array:
            return delta_weight(weight, self.A, self.B, [], [], scaling=s, record=H, dtype=H.dtype)

        def kernel(M: Array) -> bool:  # M += sign·s·B Hᵀ in place: a rank-r update, no temporary of W's size
            return backend_for(xp).addmm_(M, as_compute(xp, self.B, H.dtype), xp.matrix_transpose(H), sign * s)

        return apply_delta(self.name, weight, build, sign=sign, copy=copy, safe=safe, layer=self.layer,
                           round_delta_to=weight.dtype if peft_compat else None,
                           inplace_kernel=None if peft_compat else kernel, xp=xp)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, *, peft_compat: bool = False,
                **layer_kwargs: Any) -> Array:
        layer, _ = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.A, self.B, self.encoders, self.decoders, scaling=self.scaling,
                       act_fn=self.act_fn, bias=bias, layer=layer, peft_compat=peft_compat)

    @classmethod
    def initialize(cls, name: str, config: PeanutConfig, layer: Layer, *, weight: Array | None = None,
                   seed: Any = 0, xp: Any = None, device: Any = None, dtype: Any = None,
                   init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """PEFT's initialisation: every tensor kaiming-uniform ``U(±1/√fan_in)`` (PyTorch's
        ``kaiming_uniform_(a=√5)``, ``fan_in = shape[1]``) except ``B``, which is zero with ``init_weights=True``
        (the adapter starts as the identity). Drawn on the host; the base weight is not changed."""
        _check_kind(layer, name)
        if xp is None:
            xp = namespace(weight) if weight is not None else None
        if xp is None:
            import array_api_compat.numpy as xp
        flag = config.init_weights if init is None else init
        if not isinstance(flag, bool):
            raise ConfigError(f"{name}: init_weights must be true or false, got {flag!r}")
        rng = host_rng(seed)
        r, out = config.r, layer.out_features
        shapes = {_A: (r, out), **{k(i): (r, r) for i in range(config.depth) for k in (_enc, _dec)}, _B: (out, r)}
        host = {k: rng.uniform(-1.0, 1.0, s) * kaiming_uniform_bound(s[1]) for k, s in shapes.items()}
        if flag:
            host[_B] = np.zeros(shapes[_B])
        target = dtype if dtype is not None else xp.float32
        out_params = {}
        for k, v in host.items():
            a = backend_for(xp).from_host(np.ascontiguousarray(v, dtype=np.float32), xp, device)
            out_params[k] = a if a.dtype == target else xp.astype(a, target)
        return out_params, None


#: checkpoint suffixes of this method's per-module tensors (nn.Linear weights in ModuleDicts / ModuleLists;
#: PEFT drops the adapter name before the list index: ``peanut_encoders.<i>.weight``)
PARAMETER_SUFFIXES = (_A, _B, *(_enc(i) for i in range(MAX_DEPTH)), *(_dec(i) for i in range(MAX_DEPTH)))
Config = PeanutConfig
Module = PeanutModule
#: demo / documentation examples: row label -> config fields (non-trivial: B random, a deeper gelu network)
EXAMPLES = {
    "PEANuT": dict(r=4, init_weights=False, scaling=0.5),
    "PEANuT (depth 2, gelu)": dict(r=3, depth=2, act_fn="gelu", init_weights=False),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=PeanutConfig, module=PeanutModule, spec="specs/peanut.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=PeanutModule.supported_kinds, additive=True,
    init_field="init_weights", examples=EXAMPLES, needs_record_for=lambda config: True,
)
