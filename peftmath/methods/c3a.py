r"""C3A: parameter-efficient fine-tuning with block circular convolution (Chen et al., ACL 2025).

A Linear ``(out, in)`` is cut into ``b × b`` blocks (``b = block_size`` divides ``in`` and ``out``); each
block of the weight change is a circulant matrix given by one length-``b`` kernel::

    kernel  K  (m, n, b),   m = out/b,  n = in/b
    ΔW[i·b + k, j·b + t] = K[i, j, (t − k) mod b] / in

so ``ΔW x`` is, block row by block row, a sum of circular cross-correlations ``y_i[k] = Σ_j Σ_s
K[i, j, s] x_j[(k + s) mod b] / in``, which the FFT computes in ``O(b log b)`` per block. ``ΔW`` itself is a
gather of the kernel's entries (no transform, no round-off). Additive (``W ± ΔW``), so unmerge is exact up
to the rounding of the sums. PEFT supports nn.Linear only; the tensor is ``c3a_kernel`` ``(m, n, b)``.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from .._array import as_compute, compute_dtype, namespace
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_choice, check_pattern, check_positive_int
from ..errors import ConfigError, ShapeError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import ModuleAdapter, SignedModuleAdapter, add_fresh_delta, require_kind

Array = Any

__all__ = ["C3AConfig", "block_size_for", "init_weights", "delta_weight", "block_circular", "forward", "C3AModule"]

PEFT_TYPE = "C3A"
_KEY = "c3a_kernel"
SUPPORTED_KINDS = (LayerKind.LINEAR,)
INITS = (True, False, "gaussian", "kaiming_uniform", "xavier_uniform")


# --------------------------------------------------------------------------------------------------
# Config (specs/c3a.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class C3AConfig(TunerConfig):
    """PEFT's ``C3AConfig`` (``peft_type: "C3A"``), PEFT's names and defaults. PEFT's C3AConfig has no
    ``exclude_modules``: it must stay unset and is left out of the written config."""

    peft_type: ClassVar[str] = "C3A"
    absent_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)  # not a field of PEFT's config

    block_size: int = 256
    bias: str = "none"
    block_size_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: bool | str = "xavier_uniform"

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "block_size", self.block_size)
        check_choice(source, "bias", self.bias, ("none", "all", "c3a_only"))
        if self.block_size_pattern is None:
            self.block_size_pattern = {}
        check_pattern(source, "block_size_pattern", self.block_size_pattern)
        for key, value in self.block_size_pattern.items():
            check_positive_int(source, f"block_size_pattern[{key!r}]", value)
        check_choice(source, "init_weights", self.init_weights, INITS)



def block_size_for(config: C3AConfig, module_name: str) -> int:
    r"""PEFT's C3A rule: the first key ``k`` of ``block_size_pattern`` with ``re.match(rf".*\.{k}$", name)``;
    else the value under the module name itself when it is a key (PEFT falls back to looking up the full
    name); else ``block_size``.

    >>> cfg = C3AConfig(block_size=8, block_size_pattern={"q": 4, "v": 2})
    >>> block_size_for(cfg, "model.layers.0.q"), block_size_for(cfg, "v"), block_size_for(cfg, "k")
    (4, 2, 8)
    """
    pattern = config.block_size_pattern or {}
    for key, value in pattern.items():
        if re.match(rf".*\.{key}$", module_name):
            return value
    return pattern.get(module_name, config.block_size)


# --------------------------------------------------------------------------------------------------
# Shapes (specs/c3a.md, "2. Shapes")
# --------------------------------------------------------------------------------------------------
def kernel_shape(out_features: int, in_features: int, block_size: int, where: str = "c3a") -> tuple[int, int, int]:
    """``(out/b, in/b, b)``; :class:`ShapeError` unless ``b`` divides both sizes (PEFT raises ValueError).

    >>> kernel_shape(12, 16, 4)
    (3, 4, 4)
    """
    b = int(block_size)
    if b <= 0 or in_features % b or out_features % b:
        raise ShapeError(f"{where}: block_size={block_size} must divide both the input size {in_features} and the "
                         f"output size {out_features} of the layer; choose a common divisor (PEFT refuses it too)")
    return out_features // b, in_features // b, b


def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "C3A", SUPPORTED_KINDS, peft="it raises TypeError for others")


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/c3a.md, "3. Initialisation")
# --------------------------------------------------------------------------------------------------
def init_weights(out_features: int, in_features: int, block_size: int, *, init_weights: bool | str = "xavier_uniform",
                 seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                 dtype: Any = None) -> Array:
    """The kernel ``(out/b, in/b, b)``: zeros for ``True`` (``ΔW = 0``); ``U(−a, a)`` with
    ``a = sqrt(6 / (in + out))`` for ``"xavier_uniform"`` and ``False``; ``a = sqrt(1 / in)`` for
    ``"kaiming_uniform"``; ``N(0, 1)`` for ``"gaussian"`` (PEFT's distributions, NumPy's generator).

    >>> init_weights(4, 4, 2, init_weights=True).shape
    (2, 2, 2)
    """
    if not any(init_weights is v or (type(init_weights) is type(v) and init_weights == v) for v in INITS):
        raise ConfigError(f"C3A init_weights must be one of {INITS}, got {init_weights!r}")
    shape = kernel_shape(out_features, in_features, block_size)
    rng = host_rng(seed)
    if init_weights is True:
        host = np.zeros(shape)
    elif init_weights == "gaussian":
        host = rng.standard_normal(shape)
    else:
        a = math.sqrt(1.0 / in_features) if init_weights == "kaiming_uniform" else \
            math.sqrt(3.0) * math.sqrt(2.0 / (in_features + out_features))
        host = rng.uniform(-a, a, shape)
    if xp is None:
        import array_api_compat.numpy as xp
    out = backend_for(xp).from_host(np.ascontiguousarray(host, dtype=np.float32), xp, device)
    target = dtype if dtype is not None else xp.float32
    return out if out.dtype == target else xp.astype(out, target)


# --------------------------------------------------------------------------------------------------
# Delta weight (specs/c3a.md, "4. Delta weight")
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _circulant_index(in_features: int, block_size: int) -> np.ndarray:
    """Flat positions into one block row of the kernel, ``(n, b)`` flattened to ``(in,)``: entry
    ``k·in + j·b + t`` is ``j·b + (t − k) mod b`` (``b·in`` int64; private, never written)."""
    b, n = block_size, in_features // block_size
    k = np.arange(b)[:, None, None]
    j = np.arange(n)[None, :, None]
    t = np.arange(b)[None, None, :]
    return (j * b + (t - k) % b).reshape(-1).astype(np.int64)


def delta_weight(kernel: Array, *, scale: float = 1.0, dtype: Any = None, where: str = "c3a") -> Array:
    """``ΔW = scale · C(K) / in`` of shape ``(out, in)``: ``C(K)[i·b + k, j·b + t] = K[i, j, (t − k) mod b]``,
    one gather of the (scaled) kernel's entries into a new array (exact: no transform).

    >>> import numpy as np
    >>> delta_weight(np.arange(1.0, 3.0).reshape(1, 1, 2)).tolist()   # one 2x2 circulant block, in = 2
    [[0.5, 1.0], [1.0, 0.5]]
    """
    xp = namespace(kernel, where=where)
    if kernel.ndim != 3:
        raise ShapeError(f"{where}: {_KEY} must have 3 dimensions (out/b, in/b, b), got {tuple(kernel.shape)}")
    m, n, b = (int(s) for s in kernel.shape)
    in_features = n * b
    cd = dtype if dtype is not None else compute_dtype(xp, kernel.dtype)
    k = as_compute(xp, kernel, cd) * (scale / in_features)  # (m, n, b): the small tensor is scaled, not ΔW
    idx = xp.asarray(_circulant_index(in_features, b), device=array_api_compat.device(kernel))
    return xp.reshape(xp.take(xp.reshape(k, (m, in_features)), idx, axis=1), (m * b, in_features))


# --------------------------------------------------------------------------------------------------
# Forward (specs/c3a.md, "5. Forward")
# --------------------------------------------------------------------------------------------------
def block_circular(x: Array, kernel: Array, *, dtype: Any = None, where: str = "c3a") -> Array:
    """``x C(K)ᵀ / in`` for ``x`` of shape ``(..., in)`` through the namespace's real FFT, without forming
    ``ΔW``: per frequency ``f``, ``Y_i(f) = Σ_j conj(K̂_ij(f)) X_j(f)`` (a cross-correlation in the time
    domain), one batched complex matmul over ``j``, then ``irfft``.

    >>> import numpy as np
    >>> K = np.random.default_rng(0).standard_normal((2, 3, 4)); x = np.ones((5, 12))
    >>> bool(np.allclose(block_circular(x, K), x @ delta_weight(K).T))
    True
    """
    xp = namespace(x, kernel, where=where)
    m, n, b = (int(s) for s in kernel.shape)
    cd = dtype if dtype is not None else compute_dtype(xp, x.dtype, kernel.dtype)
    lead = tuple(x.shape[:-1])
    rows = math.prod(lead)
    X = xp.fft.rfft(xp.reshape(as_compute(xp, x, cd), (rows, n, b)), axis=-1)  # (N, n, h)
    Kf = xp.conj(xp.fft.rfft(as_compute(xp, kernel, cd), axis=-1))  # (m, n, h)
    # (h, m, n) @ (h, n, N) -> (h, m, N)
    Y = xp.matmul(xp.permute_dims(Kf, (2, 0, 1)), xp.permute_dims(X, (2, 1, 0)))
    y = xp.fft.irfft(xp.permute_dims(Y, (2, 1, 0)), n=b, axis=-1)  # (N, m, b)
    return xp.reshape(y, lead + (m * b,)) / (n * b)


def forward(x: Array, weight: Array, kernel: Array, *, bias: Array | None = None, layer: Any = None) -> Array:
    """``x Wᵀ + b + x ΔWᵀ`` (the last term by :func:`block_circular`), in float32 (float64 for float64
    inputs), rounded once to the output dtype.

    >>> import numpy as np
    >>> W = np.zeros((4, 4)); x = np.eye(4); K = np.arange(8.0).reshape(2, 2, 2)
    >>> bool(np.allclose(forward(x, W, K), delta_weight(K).T))
    True
    """
    xp = namespace(x, weight, kernel, bias, where="c3a.forward")
    lay, _ = Layer.for_weight(layer, weight).for_input(x, "c3a.forward")
    _check_kind(lay, "c3a.forward")
    lay.check_bias(bias)
    if kernel.ndim != 3 or tuple(kernel.shape) != kernel_shape(lay.out_features, lay.in_features,
                                                               int(kernel.shape[-1]), "c3a.forward"):
        raise ShapeError(f"c3a.forward: {_KEY} {tuple(kernel.shape)} does not fit a {lay.out_features}x"
                         f"{lay.in_features} layer")
    out_dtype = xp.result_type(x.dtype, weight.dtype)
    cd = compute_dtype(xp, x.dtype, weight.dtype, kernel.dtype)
    xc = as_compute(xp, x, cd)
    y = lay.base_forward(xc, as_compute(xp, weight, cd), None if bias is None else as_compute(xp, bias, cd), xp)
    return as_compute(xp, y + block_circular(xc, kernel, dtype=cd, where="c3a.forward"), out_dtype)


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint (merge / unmerge: specs/c3a.md, "6. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
class C3AModule(SignedModuleAdapter):
    """C3A on one nn.Linear: ``c3a_kernel`` ``(out/b, in/b, b)``. Additive: merge is ``W + ΔW`` through
    :func:`~peftmath.methods._base.write_weight`."""

    peft_type = "C3A"
    supported_kinds = SUPPORTED_KINDS

    @classmethod
    def infer_layer(cls, name: str, config: C3AConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """A Linear ``(m·b, n·b)`` from the kernel's shape ``(m, n, b)`` (or ``weight_shape`` / ``kind``)."""
        if _KEY not in params:
            raise ShapeError(f"{name}: no {_KEY} among the module's tensors {sorted(params)}")
        if weight_shape is not None:
            return Layer.of(tuple(int(s) for s in weight_shape), kind or LayerKind.LINEAR)
        k = params[_KEY]
        if k.ndim != 3:
            raise ShapeError(f"{name}: {_KEY} must have 3 dimensions (out/b, in/b, b), got {tuple(k.shape)}")
        m, n, b = (int(s) for s in k.shape)
        return Layer(LayerKind.parse(kind) if kind is not None else LayerKind.LINEAR, (m * b, n * b))

    def validate(self) -> None:
        _check_kind(self.layer, self.name)
        if _KEY not in self.params:
            raise ShapeError(f"{self.name}: missing {_KEY} (found {sorted(self.params)})")
        extra = sorted(set(self.params) - {_KEY})
        if extra:
            raise ShapeError(f"{self.name}: unexpected C3A tensors {extra} (C3A has only {_KEY})")
        self.kernel = self.params[_KEY]
        shape = tuple(int(s) for s in self.kernel.shape)
        b = shape[-1] if len(shape) == 3 else 0
        if len(shape) != 3 or shape != kernel_shape(self.layer.out_features, self.layer.in_features, max(b, 1),
                                                     self.name):
            raise ShapeError(f"{self.name}: {_KEY} {shape} does not fit a {self.layer.out_features}x"
                             f"{self.layer.in_features} layer (expected (out/b, in/b, b) with b dividing both)")

    def describe(self) -> dict[str, Any]:
        return {"block_size": int(self.kernel.shape[-1])}

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        """``ΔW`` ``(out, in)`` in the compute dtype (exact gather; PEFT's FFT-built ``ΔW`` differs by
        round-off, ``peft_compat`` changes nothing here: see :meth:`merge` for PEFT's low-precision rounding)."""
        return delta_weight(self.kernel, where=self.name)

    def _apply(self, weight: Array, sign: int, *, copy: bool, safe: bool, peft_compat: bool) -> Array:
        """Merge: ``W + ΔW`` formed in float32 (float64) and rounded once. ``peft_compat=True``: PEFT's rounding
        for a low-precision ``W`` (``C(K)`` rounded to ``W``'s dtype, divided by ``in`` there, then added).
        Unmerge: ``W − ΔW``, as :meth:`merge` (``−ΔW`` by an exact sign flip)."""
        xp = self.xp
        cd = compute_dtype(xp, weight.dtype, self.kernel.dtype)
        n_in = self.layer.in_features

        def fresh() -> Array:  # sign·ΔW, (out, in), compute dtype, a new array
            if peft_compat and weight.dtype != cd:
                d = xp.astype(delta_weight(self.kernel, scale=n_in, dtype=cd, where=self.name), weight.dtype)
                d = d / xp.asarray(n_in, dtype=weight.dtype)
                return as_compute(xp, d if sign > 0 else -d, cd)
            return delta_weight(self.kernel, scale=float(sign), dtype=cd, where=self.name)

        return add_fresh_delta(self.name, weight, fresh, cd, copy=copy, safe=safe, xp=xp)

    def scaled(self, c: float) -> ModuleAdapter:
        """Scale ``c``: ``K → c·K``, so ``ΔW → c·ΔW`` (PEFT defines no scale for C3A; this is the linear one)."""
        if c == 1.0:
            return self
        return self.scale_parameter(_KEY, lambda k: k * c)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, _ = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.kernel, bias=bias, layer=layer)

    @classmethod
    def initialize(cls, name: str, config: C3AConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """``{"c3a_kernel": ...}`` with ``b =`` :func:`block_size_for` (``init`` overrides
        ``config.init_weights``); the base weight is not changed."""
        _check_kind(layer, name)
        if xp is None and weight is not None:
            xp = namespace(weight)
        b = block_size_for(config, name)
        kernel_shape(layer.out_features, layer.in_features, b, name)
        k = init_weights(layer.out_features, layer.in_features, b,
                         init_weights=config.init_weights if init is None else init, seed=seed, xp=xp,
                         device=device, dtype=dtype)
        return {_KEY: k}, None


#: checkpoint suffixes of this method's per-module tensors (a ParameterDict entry: no ".weight")
PARAMETER_SUFFIXES = (_KEY,)
Config = C3AConfig
Module = C3AModule
#: demo / documentation examples: row label -> config fields (non-trivial: random kernel)
EXAMPLES = {
    "C3A": dict(block_size=4, init_weights="xavier_uniform"),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=C3AConfig, module=C3AModule, spec="specs/c3a.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=C3AModule.supported_kinds, additive=True,
    init_field="init_weights", examples=EXAMPLES,
)
