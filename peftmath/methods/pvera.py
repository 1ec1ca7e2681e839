r"""PVeRA: probabilistic vector-based random matrix adaptation (Fein-Ashley et al., 2025).

VeRA (:mod:`peftmath.methods.vera`) with a latent code drawn from a learned Gaussian: the shared frozen
projection ``A`` has twice VeRA's rows, and ``λ_d`` scales both halves; the first half gives the mean ``μ``,
the second the log-variance of the code that ``B`` maps to the output::

    pvera_A: (2r, max_in)     pvera_B: (max_out, r)                 shared, frozen, saved once
    A_l = pvera_A[:, :in] = [A_μ; A_v]   B_l = pvera_B[:out, :]      leading slices for a layer (out, in)
    λ_d = [λ_μ; λ_v] (2r,)    λ_b (out,)                            pvera_lambda_d / pvera_lambda_b
    μ = λ_μ ⊙ (x A_μᵀ),   log σ² = λ_v ⊙ (x A_vᵀ)                   (..., r) each
    z = μ (eval)   or   z = μ + ε ⊙ σ, ε ~ N(0, 1) (training, or sample_at_inference)
    y = x Wᵀ + b + λ_b ⊙ (z B_lᵀ)
    ΔW = diag(λ_b) B_l diag(λ_μ) A_μ                                 (out, in): VeRA's ΔW on the mean halves

With ``z = μ`` the layer is VeRA's on ``(λ_μ, A_μ)``, and merging, forward and the in-place kernel are
VeRA's (:func:`vera.delta_matrix`, :func:`vera.adapter_output`, the rank-``r`` gemm). A layer that samples at
inference is stochastic: no merged weight reproduces it, so peftmath refuses that merge
(``UnsupportedError``); ``peft_compat=True`` merges the mean, as PEFT does (specs/pvera.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from .._array import as_compute, compute_dtype, is_low_precision, namespace
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_choice, check_flags, check_fraction, check_number, check_positive_int
from ..errors import CheckpointError, ConfigError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from . import vera
from ._base import (
    ModuleAdapter,
    SignedModuleAdapter,
    apply_delta,
    check_shape,
    layer_of_weight_shape,
    require_kind,
    start_shared_init,
)
from ._contract import Method

Array = Any

__all__ = ["PveraConfig", "mean_halves", "init_shared", "delta_weight", "forward", "merge", "unmerge",
           "PveraModule"]

PEFT_TYPE = "PVERA"
PVERA_A_KEY = "base_model.pvera_A"
PVERA_B_KEY = "base_model.pvera_B"
SHARED_KEYS = (PVERA_A_KEY, PVERA_B_KEY)
SUPPORTED_KINDS = vera.SUPPORTED_KINDS
_PEFT_KINDS = "PEFT raises ValueError for others"


# --------------------------------------------------------------------------------------------------
# Config (specs/pvera.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class PveraConfig(TunerConfig):
    """PEFT's ``PveraConfig`` (``peft_type: "PVERA"``). PEFT's PveraConfig has no ``exclude_modules``; it is left
    out of the written config while unset."""

    peft_type: ClassVar[str] = "PVERA"

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    pvera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    sample_at_inference: bool = False
    generator_seed: int | None = None

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "r", self.r)
        for name in ("projection_prng_key", "generator_seed"):
            value = getattr(self, name)
            if not (value is None and name == "generator_seed") and (not isinstance(value, int)
                                                                      or isinstance(value, bool)):
                raise ConfigError(f"{source}: field {name!r} must be an integer, got {value!r}")
        check_flags(source, self, "save_projection", "fan_in_fan_out", "init_weights", "sample_at_inference")
        check_fraction(source, "pvera_dropout", self.pvera_dropout)
        check_number(source, "d_initial", self.d_initial)
        check_choice(source, "bias", self.bias, ("none", "all", "pvera_only"))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("exclude_modules") is None:  # not a field of PEFT's PveraConfig
            out.pop("exclude_modules", None)
        return out


# --------------------------------------------------------------------------------------------------
# Shapes (specs/pvera.md, "2. Shapes")
# --------------------------------------------------------------------------------------------------
def mean_halves(lambda_d: Array, pvera_A: Array, *, where: str = "pvera") -> tuple[Array, Array, Array, Array]:
    """``(λ_μ, A_μ, λ_v, A_v)``: the mean and log-variance halves of ``λ_d (2r,)`` and ``pvera_A (2r, max_in)``
    (rows ``:r`` and ``r:``); :class:`ShapeError` when they are not of one even length ``2r``.

    >>> import numpy as np
    >>> lm, Am, lv, Av = mean_halves(np.arange(4.0), np.arange(12.0).reshape(4, 3))
    >>> lm.tolist(), Am.shape, lv.tolist(), Av[0].tolist()
    ([0.0, 1.0], (2, 3), [2.0, 3.0], [6.0, 7.0, 8.0])
    """
    if pvera_A.ndim != 2 or pvera_A.shape[0] % 2 or lambda_d.ndim != 1 or lambda_d.shape[0] != pvera_A.shape[0]:
        raise ShapeError(f"{where}: pvera_lambda_d {tuple(lambda_d.shape)} and pvera_A {tuple(pvera_A.shape)} are not "
                         f"(2r,) and (2r, max_in) with one r (the mean and log-variance halves)")
    r = int(pvera_A.shape[0]) // 2
    return lambda_d[:r], pvera_A[:r, ...], lambda_d[r:], pvera_A[r:, ...]


def _check(where: str, layer: Layer, lambda_b: Array, lambda_d: Array, A: Array, B: Array) -> tuple[Array, ...]:
    """``(λ_μ, A_μ_l, λ_v, A_v_l, B_l)`` sliced for ``layer`` after checking every shape."""
    lm, Am, lv, Av = mean_halves(lambda_d, A, where=where)
    Am_l, B_l = vera.slice_projections(Am, B, layer.in_features, layer.out_features, where=where)
    check_shape(where, "pvera_lambda_b", lambda_b, (layer.out_features,))
    return lm, Am_l, lv, Av[:, :layer.in_features], B_l


def _layer(layer: Layer | LayerKind | str | None, W: Array | None, lambda_b: Array, A: Array, where: str) -> Layer:
    if isinstance(layer, Layer):
        lay = layer
    elif W is not None:
        lay = Layer.of(tuple(W.shape), layer)
    else:
        raise ShapeError(f"{where}: PVeRA's tensors do not give the layer's input size; pass layer=Layer.of(weight "
                         f"shape, kind)")
    require_kind(lay, where, "PVeRA", SUPPORTED_KINDS, peft=_PEFT_KINDS, error=ShapeError)
    return lay


# --------------------------------------------------------------------------------------------------
# Delta weight (specs/pvera.md, "3. Delta, forward")
# --------------------------------------------------------------------------------------------------
def delta_weight(lambda_b: Array, lambda_d: Array, pvera_A: Array, pvera_B: Array, *,
                 layer: Layer | LayerKind | str | None, peft_compat: bool = False) -> Array:
    """``ΔW = diag(λ_b) B_l diag(λ_μ) A_μ`` in the stored layout (``(out, in)``, ``(in, out)`` for Conv1D), in
    float32 (float64 for float64 inputs): the weight change of the mean code ``z = μ``. ``peft_compat=True``
    rounds it to the projections' dtype when they are float16 / bfloat16 (PEFT's CPU rule).

    >>> import numpy as np
    >>> A = np.array([[1.0, 2.0], [5.0, 5.0]]); B = np.array([[1.0], [2.0]])      # r = 1: rows [mean; log-var]
    >>> delta_weight(np.array([1.0, -1.0]), np.array([0.5, 9.0]), A, B, layer=Layer.of((2, 2)))
    array([[ 0.5,  1. ],
           [-1. , -2. ]])
    """
    xp = namespace(lambda_b, lambda_d, pvera_A, pvera_B, where="pvera.delta_weight")
    lay = _layer(layer, None, lambda_b, pvera_A, "pvera.delta_weight")
    lm, Am_l, _, _, B_l = _check("pvera.delta_weight", lay, lambda_b, lambda_d, pvera_A, pvera_B)
    d = vera.delta_matrix(lambda_b, lm, Am_l, B_l)
    if peft_compat and is_low_precision(pvera_B.dtype):
        d = as_compute(xp, xp.astype(d, pvera_B.dtype), d.dtype)
    return lay.from_matrix(d, xp)


# --------------------------------------------------------------------------------------------------
# Forward (specs/pvera.md, "3. Delta, forward")
# --------------------------------------------------------------------------------------------------
def forward(
    x: Array,
    W: Array,
    lambda_b: Array,
    lambda_d: Array,
    pvera_A: Array,
    pvera_B: Array,
    *,
    bias: Array | None = None,
    layer: Layer | LayerKind | str | None = None,
    noise: Array | Callable[[tuple[int, ...]], Array] | None = None,
    dropout: Callable[[Array], Array] | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int | None = None,
    peft_compat: bool = False,
) -> Array:
    """``base(x) + λ_b ⊙ (z B_lᵀ)``; x ``(..., in)``.

    ``noise=None`` (eval, PEFT's default ``sample_at_inference=False``): ``z = μ``, the layer of :func:`merge`.
    ``noise`` = ``ε`` (an array broadcasting against ``(..., r)``, or a callable ``shape -> ε``): the sample
    ``z = μ + ε ⊙ exp(½ log σ²)`` (PEFT's training / ``sample_at_inference`` forward draws ``ε`` from torch's
    generator). ``dropout`` acts once on the input of both halves, as PEFT's. Computed in float32 (float64) and
    rounded once to the result dtype of ``x`` and ``W``; ``peft_compat=True`` rounds the base output first, as
    PEFT does. The conv keywords must keep their defaults (see :mod:`peftmath.layers`).

    >>> import numpy as np
    >>> A = np.array([[1.0, 0.0], [0.0, 2.0]]); B = np.array([[1.0], [1.0]])
    >>> x = np.array([[1.0, 1.0]]); lb = np.array([1.0, 2.0]); ld = np.array([3.0, 1.0])
    >>> forward(x, np.zeros((2, 2)), lb, ld, A, B)                   # μ = 3, log σ² = 2
    array([[3., 6.]])
    >>> forward(x, np.zeros((2, 2)), lb, ld, A, B, noise=np.array([1.0]))   # z = 3 + e
    array([[ 5.71828183, 11.43656366]])
    """
    xp = namespace(x, W, lambda_b, lambda_d, pvera_A, pvera_B, bias, where="pvera.forward")
    lay = _layer(layer, W, lambda_b, pvera_A, "pvera.forward")
    lay.check_weight(W)
    lay.check_bias(bias)
    lay.for_input(x, "pvera.forward", groups=groups, stride=stride, padding=padding, dilation=dilation)
    lm, Am_l, lv, Av_l, B_l = _check("pvera.forward", lay, lambda_b, lambda_d, pvera_A, pvera_B)
    out_dtype = xp.result_type(x.dtype, W.dtype)
    cd = compute_dtype(xp, out_dtype, lambda_b.dtype, lambda_d.dtype, pvera_A.dtype, pvera_B.dtype)
    xc = as_compute(xp, x, cd)
    xd = xc if dropout is None else dropout(xc)
    lo = vera.adapter_output(xd, lambda_b, lm, Am_l, B_l)  # λ_b ⊙ (μ B_lᵀ)
    if noise is not None:
        logvar = xp.matmul(xd, xp.matrix_transpose(as_compute(xp, Av_l, cd))) * as_compute(xp, lv, cd)
        eps = noise(tuple(int(n) for n in logvar.shape)) if callable(noise) else noise
        spread = as_compute(xp, eps, cd) * xp.exp(0.5 * logvar)
        lo = lo + xp.matmul(spread, xp.matrix_transpose(as_compute(xp, B_l, cd))) * as_compute(xp, lambda_b, cd)
    base = lay.base_forward(xc, as_compute(xp, W, cd), None if bias is None else as_compute(xp, bias, cd), xp)
    if peft_compat:  # PEFT rounds the base output to the storage dtype before adding the adapter term
        base = as_compute(xp, as_compute(xp, base, out_dtype), cd)
    return as_compute(xp, base + as_compute(xp, lo, cd), out_dtype)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge (specs/pvera.md, "4. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def _apply(W: Array, lambda_b: Array, lambda_d: Array, pvera_A: Array, pvera_B: Array, *, sign: int,
           layer: Layer | LayerKind | str | None, copy: bool, safe: bool, peft_compat: bool, where: str) -> Array:
    """``W ± ΔW`` through :func:`~peftmath.methods._base.apply_delta`: the in-place path is one rank-``r`` gemm
    with ``beta = 1`` on VeRA's scaled factors ``λ_b ⊙ B_l`` and ``λ_μ ⊙ A_μ`` (no temporary of W's size)."""
    xp = namespace(W, lambda_b, lambda_d, pvera_A, pvera_B, where=where)
    lay = _layer(layer, W, lambda_b, pvera_A, where)
    lay.check_weight(W)
    lm, Am_l, _, _, B_l = _check(where, lay, lambda_b, lambda_d, pvera_A, pvera_B)  # before anything is written
    cd = compute_dtype(xp, W.dtype, lambda_b.dtype, lambda_d.dtype, pvera_A.dtype, pvera_B.dtype)
    compat = peft_compat and is_low_precision(pvera_B.dtype)

    def build() -> Array:
        d = vera.delta_matrix(lambda_b, lm, Am_l, B_l, dtype=cd)
        if compat:
            d = as_compute(xp, xp.astype(d, pvera_B.dtype), cd)
        return lay.from_matrix(d, xp)

    def kernel(M: Array) -> bool:
        Bs = as_compute(xp, lambda_b, cd)[:, None] * as_compute(xp, B_l, cd)   # (out, r)
        As = as_compute(xp, lm, cd)[:, None] * as_compute(xp, Am_l, cd)        # (r, in)
        return backend_for(xp).addmm_(M, Bs, As, float(sign))

    return apply_delta(where, W, build, sign=sign, copy=copy, safe=safe, layer=lay,
                       inplace_kernel=None if compat else kernel, xp=xp)


def merge(W: Array, lambda_b: Array, lambda_d: Array, pvera_A: Array, pvera_B: Array, *,
          layer: Layer | LayerKind | str | None = None, copy: bool = True, safe: bool = False,
          peft_compat: bool = False) -> Array:
    """``W + ΔW`` (the mean code), formed in float32 (float64) and rounded once; ``copy=False`` writes into ``W``
    (BLAS gemm with ``beta = 1`` on NumPy). ``peft_compat=True`` rounds ΔW to half-precision projections' dtype
    first, as PEFT does. (The module refuses to merge a layer that samples at inference; this function merges
    the mean it is given.)

    >>> import numpy as np
    >>> W = np.zeros((2, 2), np.float32); A = np.array([[1, 2], [5, 5]], np.float32); B = np.ones((2, 1), np.float32)
    >>> merge(W, np.array([1, 2], np.float32), np.array([3, 9], np.float32), A, B, copy=False) is W, W
    (True, array([[ 3.,  6.],
           [ 6., 12.]], dtype=float32))
    """
    return _apply(W, lambda_b, lambda_d, pvera_A, pvera_B, sign=1, layer=layer, copy=copy, safe=safe,
                  peft_compat=peft_compat, where="pvera.merge")


def unmerge(W: Array, lambda_b: Array, lambda_d: Array, pvera_A: Array, pvera_B: Array, *,
            layer: Layer | LayerKind | str | None = None, copy: bool = True, peft_compat: bool = False) -> Array:
    """``W − ΔW``, the inverse of :func:`merge` up to the rounding of the sum (same keywords)."""
    return _apply(W, lambda_b, lambda_d, pvera_A, pvera_B, sign=-1, layer=layer, copy=copy, safe=False,
                  peft_compat=peft_compat, where="pvera.unmerge")


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/pvera.md, "5. Initialisation")
# --------------------------------------------------------------------------------------------------
def init_shared(config: PveraConfig, layers: Iterable[Layer] | Mapping[str, Layer], *,
                seed: int | np.random.Generator | None = None, xp: Any = None, device: Any = None,
                dtype: Any = None) -> dict[str, Array]:
    """The shared projections ``pvera_A (2r, max_in)``, ``pvera_B (max_out, r)`` sized to the largest layer, with
    PEFT's distribution (kaiming-uniform, gain √2: ``U(±sqrt(6 / max_in))`` for A, ``U(±sqrt(6 / r))`` for B):
    the mean half of A and B drawn by :func:`vera.init_projections`, then the log-variance half of A from the same
    host generator (seed ``seed``, else ``config.projection_prng_key``; not PEFT's torch stream)."""
    layers = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
    if not layers:
        raise ConfigError("pvera.init_shared: no layers to size the projections for")
    if xp is None:
        import array_api_compat.numpy as xp
    max_in = max(layer.in_features for layer in layers)
    max_out = max(layer.out_features for layer in layers)
    rng = host_rng(config.projection_prng_key if seed is None else seed)
    A_mean, B = vera.init_projections(config.r, max_in, max_out, seed=rng, xp=xp, device=device, dtype=dtype)
    A_logvar, _ = vera.init_projections(config.r, max_in, 1, seed=rng, xp=xp, device=device, dtype=dtype)
    return {PVERA_A_KEY: xp.concat([A_mean, A_logvar], axis=0), PVERA_B_KEY: B}


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
def _missing_projections(name: str, config: PveraConfig) -> CheckpointError:
    why = ("was saved with save_projection=false, so it does not contain the shared projections"
           if not config.save_projection else f"lacks the shared projections {list(SHARED_KEYS)}")
    return CheckpointError(
        f"{name}: this PVeRA adapter {why}. PEFT regenerates them with torch.Generator(seed=projection_prng_key="
        f"{config.projection_prng_key}), which peftmath cannot reproduce bit for bit. Fix: load the adapter in PEFT "
        f"and save it again with PveraConfig(save_projection=True) (the default)")


class PveraModule(SignedModuleAdapter):
    """PVeRA on one base module: ``pvera_lambda_b``, ``pvera_lambda_d`` and the shared projections
    (``self.shared[PVERA_A_KEY]``, ``self.shared[PVERA_B_KEY]``)."""

    peft_type = "PVERA"
    additive = True
    supported_kinds = SUPPORTED_KINDS

    @classmethod
    def initialize(cls, name: str, config: PveraConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None,
                   shared: MutableMapping[str, Array] | None = None) -> tuple[dict[str, Array], Array | None]:
        """``{"pvera_lambda_b", "pvera_lambda_d"}`` (``init`` overrides ``config.init_weights``: True gives PEFT's
        ``λ_b = 0``, ``λ_d = d_initial``; False ``λ_b = 1``, ``λ_d ~ N(0, 1)``, :func:`vera.init_lambdas` with
        ``2r``). A ``shared=`` dict lacking the projections receives projections sized to this layer; without
        ``shared=`` they are returned among the params under :data:`SHARED_KEYS` (move them into
        ``Adapter(shared=...)``, or build them once with :func:`init_shared` over all layers)."""
        require_kind(layer, name, "PVeRA", SUPPORTED_KINDS, peft=_PEFT_KINDS, error=ShapeError)
        xp, flag, shared, own = start_shared_init(name, config, layer, weight=weight, xp=xp, init=init, shared=shared,
                                                  keys=SHARED_KEYS, init_shared=init_shared, device=device,
                                                  dtype=dtype)
        lb, ld = vera.init_lambdas(layer, 2 * config.r, init_weights=flag, d_initial=config.d_initial, seed=seed,
                                   xp=xp, device=device, dtype=dtype)
        _check(name, layer, lb, ld, shared[PVERA_A_KEY], shared[PVERA_B_KEY])
        params = {"pvera_lambda_b": lb, "pvera_lambda_d": ld}
        if own:
            params.update(shared)
        return params, None

    @classmethod
    def infer_layer(cls, name: str, config: PveraConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """The base weight's shape is needed (the tensors hold no input size); a 2-D weight is a Linear when
        ``len(λ_b)`` is its first size, a Conv1D when it is the second (square: ``kind``, else ``fan_in_fan_out``)."""
        lay = layer_of_weight_shape(name, "pvera_lambda_b", params, weight_shape, kind, config.fan_in_fan_out,
                                    "PVeRA's tensors give only the output size")
        shape, out = lay.weight_shape, int(params["pvera_lambda_b"].shape[0])
        if kind is not None or len(shape) != 2:
            return lay
        if out not in shape:
            raise ShapeError(f"{name}: base weight {shape} has no dimension of size len(pvera_lambda_b) = {out}; does "
                             f"the adapter belong to this model?")
        conv1d = shape[1] == out and (shape[0] != out or config.fan_in_fan_out)
        return Layer(LayerKind.CONV1D_TRANSPOSED if conv1d else LayerKind.LINEAR, shape)

    def validate(self) -> None:
        require_kind(self.layer, self.name, "PVeRA", SUPPORTED_KINDS, peft=_PEFT_KINDS, error=ShapeError)
        for key in ("pvera_lambda_b", "pvera_lambda_d"):
            if key not in self.params:
                raise ShapeError(f"{self.name}: missing {key}")
        unknown = sorted(set(self.params) - {"pvera_lambda_b", "pvera_lambda_d", *SHARED_KEYS})
        if unknown:
            raise ShapeError(f"{self.name}: unexpected PVeRA tensors {unknown}")
        source = self.shared
        if not all(k in source for k in SHARED_KEYS) and all(k in self.params for k in SHARED_KEYS):
            source = self.params  # as returned by initialize() without shared=
        if not all(k in source for k in SHARED_KEYS):
            raise _missing_projections(self.name, self.config)
        self.lambda_b, self.lambda_d = self.params["pvera_lambda_b"], self.params["pvera_lambda_d"]
        self.A, self.B = source[PVERA_A_KEY], source[PVERA_B_KEY]
        _check(self.name, self.layer, self.lambda_b, self.lambda_d, self.A, self.B)
        if int(self.B.shape[1]) != self.config.r:
            raise ShapeError(f"{self.name}: the shared pvera_B {tuple(self.B.shape)} has rank {self.B.shape[1]} but "
                             f"the config has r={self.config.r}")

    def scaled(self, c: float) -> "ModuleAdapter":
        """Scale ``c``: ``λ_b → c·λ_b`` (``ΔW`` and the adapter's term are linear in ``λ_b``; PEFT has no PVeRA
        scale), rounded once to ``λ_b``'s dtype."""
        if c == 1.0:
            return self
        return self.scale_parameter("pvera_lambda_b", lambda lam: lam * c)

    def _args(self) -> tuple:
        return self.lambda_b, self.lambda_d, self.A, self.B

    def _mean_only(self, what: str, peft_compat: bool) -> None:
        if self.config.sample_at_inference and not peft_compat:
            raise UnsupportedError(
                f"{self.name}: this PVeRA adapter has sample_at_inference=true, so its layer draws z = μ + ε·σ anew "
                f"on every forward and no single weight reproduces it; {what} would give the mean layer (z = μ). "
                f"Pass peft_compat=True to {what} the mean as PEFT does, or set sample_at_inference to false")

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        self._mean_only("delta_weight", peft_compat)
        return delta_weight(*self._args(), layer=self.layer, peft_compat=peft_compat)

    def _apply(self, weight: Array, sign: int, *, copy: bool, safe: bool, peft_compat: bool) -> Array:
        """``W ± ΔW`` (:func:`merge` / :func:`unmerge`); refused for a layer that samples at inference."""
        self._mean_only("merge" if sign > 0 else "unmerge", peft_compat)
        return _apply(weight, *self._args(), sign=sign, layer=self.layer, copy=copy, safe=safe,
                      peft_compat=peft_compat, where=self.name)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        """The eval forward (``z = μ``); a layer with ``sample_at_inference=true`` is refused (its forward is
        random: call :func:`forward` with ``noise=``)."""
        if self.config.sample_at_inference:
            raise UnsupportedError(
                f"{self.name}: this PVeRA adapter has sample_at_inference=true: PEFT's forward adds ε·σ with ε drawn "
                f"from torch's generator on every call. Call peftmath.methods.pvera.forward(..., noise=ε) with your own "
                f"draws, or set sample_at_inference to false for the mean layer")
        layer, kw = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, *self._args(), bias=bias, layer=layer, **kw)

    def describe(self) -> dict[str, Any]:
        return {"r": self.config.r, "sample_at_inference": self.config.sample_at_inference}

    def num_parameters(self) -> int:
        """Trainable scalars: ``out + 2r`` (the shared projections are frozen and not counted)."""
        return int(self.lambda_b.shape[0]) + int(self.lambda_d.shape[0])


#: checkpoint suffixes of this method's per-module tensors (ParameterDict entries: no ".weight")
PARAMETER_SUFFIXES = ("pvera_lambda_b", "pvera_lambda_d")
Config = PveraConfig
Module = PveraModule
#: demo / documentation examples (non-trivial: random λ, a small rank)
EXAMPLES = {
    "PVeRA": dict(r=8, init_weights=False, projection_prng_key=5),
}

#: the method's description (peftmath.methods._contract.Method)
METHOD = Method(
    peft_type=PEFT_TYPE, config=PveraConfig, module=PveraModule, spec="specs/pvera.md",
    parameter_suffixes=PARAMETER_SUFFIXES, shared_keys=SHARED_KEYS, layer_kinds=SUPPORTED_KINDS, additive=True,
    init_field="init_weights", examples=EXAMPLES, init_shared=init_shared,
)
