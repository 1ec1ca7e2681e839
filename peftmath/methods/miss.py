r"""MiSS: matrix shard sharing (Kang & Yin, 2024; PEFT's successor of Bone).

One small trained block is shared by every column shard of a Linear weight ``W (out, in)``. Column
``j`` of ``W`` belongs to shard position ``j mod r``; the three forms (``init_weights``) are::

    default (True/False)   miss_block D (r, out)          ΔW[o, j] = D[j mod r, o]
    "mini"                 miss_block D (r, mini_r)       D_full[k, o] = D[k, o mod mini_r], then as default
    "bat"                  miss_block D (out/r, r, r)     W_bc ← W_bc (I + D_b) + D_b   for each r×r block (b, c)

The default and mini forms are additive (``W ± ΔW``, ΔW independent of ``W``); the forward is
``base(x) + x ΔWᵀ`` (PEFT sums the r-wide shards of ``x`` and multiplies by ``D``, the same product).
"bat" (block affine transformation) multiplies each ``r × r`` block ``W_bc`` (rows ``b``, columns
``c``) by ``I + D_b`` and adds ``D_b``: its unmerge is ``(W'_bc − D_b)(I + D_b)⁻¹``, refused where
``I + D_b`` is singular. There is no scaling factor. Only ``nn.Linear`` layers are adapted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from .._array import all_finite, as_compute, compute_dtype, is_low_precision, namespace, reshape_view
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_choice, check_fraction, check_positive_int
from ..errors import ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._base import MergeResult, ModuleAdapter, apply_delta, in_row_tiles, write_weight
from ._contract import Method

Array = Any

__all__ = ["MissConfig", "block_shape", "init_block", "expand_block", "delta_weight", "bat_merge", "bat_unmerge",
           "forward", "merge", "unmerge", "MissModule"]

PEFT_TYPE = "MISS"
SUPPORTED = (LayerKind.LINEAR,)
KEY = "miss_block"


# --------------------------------------------------------------------------------------------------
# Config (specs/miss.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class MissConfig(TunerConfig):
    """PEFT's ``MissConfig`` (``peft_type: "MISS"``): ``init_weights`` True (zero block, the default
    form), False (random default block), ``"bat"`` or ``"mini"`` (the form of the block)."""

    peft_type: ClassVar[str] = "MISS"

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    init_weights: bool | str = True
    bias: str = "none"

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "r", self.r)
        check_positive_int(source, "mini_r", self.mini_r)
        check_fraction(source, "miss_dropout", self.miss_dropout)
        check_choice(source, "bias", self.bias, ("none", "all", "miss_only"))
        if self.init_weights not in (True, False, "bat", "mini"):
            raise ConfigError(f"{source}: field 'init_weights' must be true, false, \"bat\" or \"mini\", "
                              f"got {self.init_weights!r}")

    @property
    def form(self) -> str:
        """``"bat"``, ``"mini"`` or ``"default"`` (PEFT's ``miss_fn``)."""
        return self.init_weights if self.init_weights in ("bat", "mini") else "default"


# --------------------------------------------------------------------------------------------------
# Shapes and initialisation (specs/miss.md, "2. Shapes and initialisation")
# --------------------------------------------------------------------------------------------------
def _check_layer(layer: Layer, where: str) -> None:
    if layer.kind not in SUPPORTED:
        raise UnsupportedError(f"{where}: MiSS adapts nn.Linear layers only (PEFT raises TypeError for others), "
                               f"not {layer.kind.value}")


def block_shape(layer: Layer, r: int, form: str, *, mini_r: int = 1, where: str = "miss") -> tuple[int, ...]:
    """The shape of ``miss_block`` for a rank-``r`` block of ``form`` on ``layer`` (PEFT's checks:
    ``r <= in``; "bat" needs ``r`` to divide ``in`` and ``out``; "mini" needs ``mini_r`` to divide ``out``)."""
    _check_layer(layer, where)
    out, inn = layer.out_features, layer.in_features
    if r > inn:
        raise ShapeError(f"{where}: r={r} is larger than in_features={inn} (PEFT refuses this too)")
    if form == "bat":
        if inn % r or out % r:
            raise ShapeError(f"{where}: init_weights=\"bat\" needs r={r} to divide in={inn} and out={out}: the weight "
                             f"must split into r×r blocks")
        return (out // r, r, r)
    if form == "mini":
        if out % mini_r:
            raise ShapeError(f"{where}: init_weights=\"mini\" needs mini_r={mini_r} to divide out_features={out}")
        return (r, mini_r)
    return (r, out)


def init_block(layer: Layer, config: MissConfig, *, init: Any = None, r: int | None = None,
               seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
               dtype: Any = None) -> Array:
    """A fresh ``miss_block``: zeros (a no-op) for True, "bat" and "mini"; for False, kaiming-uniform
    ``U(±1/sqrt(out))`` of shape ``(r, out)`` (PEFT's ``reset_miss_parameters_random``), drawn on the host.

    >>> init_block(Layer.of((4, 6)), MissConfig(r=2)).shape
    (2, 4)
    """
    flag = config.init_weights if init is None else init
    r = config.r if r is None else r
    form = flag if flag in ("bat", "mini") else "default"
    shape = block_shape(layer, r, form, mini_r=config.mini_r, where="miss.init_block")
    if xp is None:
        import array_api_compat.numpy as xp
    if flag is False:
        bound = 1.0 / math.sqrt(shape[1])
        host = host_rng(seed).uniform(-bound, bound, shape)
    else:
        host = np.zeros(shape)
    out = backend_for(xp).from_host(np.ascontiguousarray(host, dtype=np.float32), xp, device)
    target = dtype if dtype is not None else xp.float32
    return out if out.dtype == target else xp.astype(out, target)


# --------------------------------------------------------------------------------------------------
# Delta weight (specs/miss.md, "3. Delta, forward")
# --------------------------------------------------------------------------------------------------
def expand_block(block: Array, out_features: int, *, form: str = "default") -> Array:
    """``D_full (r, out)``: the block itself, or for "mini" its ``mini_r`` columns repeated along out."""
    xp = namespace(block, where="miss.expand_block")
    if form != "mini":
        return block
    idx = xp.asarray([o % int(block.shape[1]) for o in range(out_features)], dtype=xp.int64,
                     device=array_api_compat.device(block))
    return xp.take(block, idx, axis=1)


def delta_weight(block: Array, layer: Layer | tuple[int, int], *, form: str = "default", dtype: Any = None) -> Array:
    """``ΔW (out, in)`` with ``ΔW[o, j] = D_full[j mod r, o]`` (default and "mini" forms), in ``dtype``
    (float32, float64 for float64 blocks). "bat" has no ``ΔW`` independent of ``W``.

    >>> import numpy as np
    >>> delta_weight(np.array([[1.0, 2.0], [3.0, 4.0]]), (2, 3))      # r = 2, out = 2, in = 3
    array([[1., 3., 1.],
           [2., 4., 2.]])
    """
    if form == "bat":
        raise UnsupportedError("miss.delta_weight: the \"bat\" form changes W by W_bc D_b + D_b, which depends on W; "
                               "use bat_merge")
    lay = layer if isinstance(layer, Layer) else Layer.of(tuple(layer))
    xp = namespace(block, where="miss.delta_weight")
    cd = dtype or compute_dtype(xp, block.dtype)
    full = as_compute(xp, expand_block(block, lay.out_features, form=form), cd)
    r = int(full.shape[0])
    if tuple(full.shape) != (r, lay.out_features):
        raise ShapeError(f"miss.delta_weight: miss_block {tuple(block.shape)} does not give (r, {lay.out_features}) "
                         f"for a layer with out_features={lay.out_features}")
    idx = xp.asarray([j % r for j in range(lay.in_features)], dtype=xp.int64, device=array_api_compat.device(full))
    return xp.matrix_transpose(xp.take(full, idx, axis=0))


def _bat_blocks(W: Array, r: int) -> Array:
    """``W (out, in)`` as ``(out/r, in/r, r, r)``: block ``[b, c] = W[b r:(b+1) r, c r:(c+1) r]``."""
    xp = namespace(W)
    out, inn = (int(s) for s in W.shape)
    return xp.permute_dims(xp.reshape(W, (out // r, r, inn // r, r)), (0, 2, 1, 3))


def _from_bat_blocks(blocks: Array, shape: tuple[int, int]) -> Array:
    xp = namespace(blocks)
    return xp.reshape(xp.permute_dims(blocks, (0, 2, 1, 3)), shape)


def bat_merge(W: Array, block: Array, *, dtype: Any = None) -> Array:
    """``W_bc (I + D_b) + D_b`` for every ``r × r`` block, as a new ``(out, in)`` array in ``dtype``.

    >>> import numpy as np
    >>> bat_merge(np.eye(2), np.array([[[1.0, 0.0], [0.0, 2.0]]]))   # one block, r = 2
    array([[3., 0.],
           [0., 5.]])
    """
    xp = namespace(W, block, where="miss.bat_merge")
    cd = dtype or compute_dtype(xp, W.dtype, block.dtype)
    D = as_compute(xp, block, cd)[:, None, :, :]
    blocks = _bat_blocks(as_compute(xp, W, cd), int(block.shape[-1]))
    return _from_bat_blocks(xp.matmul(blocks, D) + blocks + D, tuple(W.shape))


def _bat_inverse(block: Array, cd: Any, where: str) -> Array:
    xp = namespace(block)
    r = int(block.shape[-1])
    eye = xp.eye(r, dtype=cd, device=array_api_compat.device(block))
    try:
        inv = xp.linalg.inv(eye + as_compute(xp, block, cd))
    except (ValueError, RuntimeError, ArithmeticError) as exc:  # numpy LinAlgError, torch linalg errors
        raise NotInvertibleError(f"{where}: some I + miss_block[b] is singular ({exc}): the bat merge cannot be "
                                 f"undone; keep a copy of the base weight. Nothing was written") from exc
    if not all_finite(inv, xp=xp):
        raise NotInvertibleError(f"{where}: some I + miss_block[b] is singular (its inverse is not finite): the bat "
                                 f"merge cannot be undone; keep a copy of the base weight. Nothing was written")
    return inv


def bat_unmerge(W: Array, block: Array, *, dtype: Any = None, where: str = "miss.bat_unmerge") -> Array:
    """``(W'_bc − D_b)(I + D_b)⁻¹`` for every block: the inverse of :func:`bat_merge`;
    :class:`NotInvertibleError` where some ``I + D_b`` is singular."""
    xp = namespace(W, block, where=where)
    cd = dtype or compute_dtype(xp, W.dtype, block.dtype)
    inv = _bat_inverse(block, cd, where)[:, None, :, :]
    D = as_compute(xp, block, cd)[:, None, :, :]
    blocks = _bat_blocks(as_compute(xp, W, cd), int(block.shape[-1]))
    return _from_bat_blocks(xp.matmul(blocks - D, inv), tuple(W.shape))


# --------------------------------------------------------------------------------------------------
# Forward (specs/miss.md, "3. Delta, forward")
# --------------------------------------------------------------------------------------------------
def forward(x: Array, W: Array, block: Array, *, bias: Array | None = None, form: str = "default") -> Array:
    """The unmerged adapted Linear: ``x Wᵀ + b + x ΔWᵀ`` (default, "mini") or ``x W'ᵀ + b`` with the
    bat-merged ``W'`` ("bat", as PEFT computes it), in float32 (float64) rounded once to the result dtype.

    >>> import numpy as np
    >>> forward(np.array([[1.0, 1.0, 1.0]]), np.zeros((2, 3)), np.array([[1.0, 2.0], [3.0, 4.0]]))
    array([[5., 8.]])
    """
    xp = namespace(x, W, block, bias, where="miss.forward")
    lay = Layer.of(tuple(W.shape))
    lay.check_bias(bias)
    lay.for_input(x, "miss.forward")
    out_dtype = xp.result_type(x.dtype, W.dtype)
    cd = compute_dtype(xp, out_dtype, block.dtype)
    xc, Wc = as_compute(xp, x, cd), as_compute(xp, W, cd)
    if form == "bat":
        weight = bat_merge(Wc, block, dtype=cd)
    else:
        weight = Wc + delta_weight(block, lay, form=form, dtype=cd)
    y = xp.matmul(xc, xp.matrix_transpose(weight))
    if bias is not None:
        y = y + as_compute(xp, bias, cd)
    return as_compute(xp, y, out_dtype)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge (specs/miss.md, "4. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def merge(W: Array, block: Array, *, form: str = "default", copy: bool = True, safe: bool = False,
          peft_compat: bool = False, where: str = "miss.merge") -> Array:
    """``W + ΔW`` (default, "mini") or the bat merge, formed in float32 (float64) and rounded once;
    ``peft_compat=True`` rounds a half-precision block's ``ΔW`` / result as PEFT does on the CPU."""
    return _apply(W, block, form=form, sign=1, copy=copy, safe=safe, peft_compat=peft_compat, where=where)


def unmerge(W: Array, block: Array, *, form: str = "default", copy: bool = True, peft_compat: bool = False,
            where: str = "miss.unmerge") -> Array:
    """``W − ΔW`` (default, "mini") or :func:`bat_unmerge`; the inverse of :func:`merge`."""
    return _apply(W, block, form=form, sign=-1, copy=copy, safe=False, peft_compat=peft_compat, where=where)


def _apply(W: Array, block: Array, *, form: str, sign: int, copy: bool, safe: bool, peft_compat: bool,
           where: str) -> Array:
    xp = namespace(W, block, where=where)
    lay = Layer.of(tuple(W.shape))
    _check_layer(lay, where)
    cd = compute_dtype(xp, W.dtype, block.dtype)
    half = peft_compat and is_low_precision(block.dtype)
    if form == "bat":
        inv = _bat_inverse(block, cd, where) if sign < 0 else None  # refused before anything is written
        del inv

        def compute() -> Array:
            new = bat_merge(W, block, dtype=cd) if sign > 0 else bat_unmerge(W, block, dtype=cd, where=where)
            return as_compute(xp, xp.astype(new, block.dtype), cd) if half else new

        return write_weight(where, W, compute, copy=copy, safe=safe, xp=xp)

    def delta() -> Array:
        d = delta_weight(block, lay, form=form, dtype=cd)
        return as_compute(xp, xp.astype(d, block.dtype), cd) if half else d

    def kernel(M: Array) -> bool:
        """``W[:, shard] ±= D_fullᵀ`` on the shards of ``M`` (a proven view of the target), without
        forming ΔW: ``(out, in/r, r) ±= D_fullᵀ[:, None, :]`` and the ragged tail; a half-precision ``M``
        through float32 row tiles rounded once (:func:`~peftmath.methods._base.in_row_tiles`). False
        (touching nothing) where the shards are no view of ``M``."""
        out, inn = lay.out_features, lay.in_features
        full_t = xp.matrix_transpose(as_compute(xp, expand_block(block, out, form=form), cd)) * sign  # (out, r)
        if isinstance(full_t, np.ndarray):  # C order: the broadcast add's inner loop then reads contiguously
            full_t = np.ascontiguousarray(full_t)
        r = int(full_t.shape[1])
        n = inn // r
        if n and reshape_view(M[:, :n * r] if n * r < inn else M, (out, n, r), xp=xp) is None:
            return False

        def update(T: Array, r0: int, r1: int) -> None:
            rows = r1 - r0
            if n:
                shards = reshape_view(T[:, :n * r] if n * r < inn else T, (rows, n, r), xp=xp)
                shards += full_t[r0:r1, None, :]
            if n * r < inn:
                T[:, n * r:] += full_t[r0:r1, :inn - n * r]

        in_row_tiles(xp, M, cd, update)
        return True

    return apply_delta(where, W, delta, sign=sign, copy=copy, safe=safe, xp=xp,
                       inplace_kernel=None if half else kernel, kernel_on_copy=True)


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
class MissModule(ModuleAdapter):
    """MiSS on one Linear module: ``miss_block`` in the form the config's ``init_weights`` names."""

    peft_type = "MISS"
    supported_kinds = SUPPORTED

    @classmethod
    def initialize(cls, name: str, config: MissConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """``{"miss_block": ...}`` for module ``name`` (:func:`init_block`); the base weight is unchanged."""
        _check_layer(layer, name)
        if xp is None and weight is not None:
            xp = namespace(weight)
        return {KEY: init_block(layer, config, init=init, seed=seed, xp=xp, device=device, dtype=dtype)}, None

    @classmethod
    def infer_layer(cls, name: str, config: MissConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        if weight_shape is None:
            raise ShapeError(f"{name}: MiSS does not store the input size of a layer; pass the base weight shape")
        layer = Layer.of(tuple(weight_shape), kind)
        _check_layer(layer, name)
        return layer

    def scaled(self, c: float) -> "ModuleAdapter":
        """Scale ``c``: ``D → c·D``, so ``ΔW → c·ΔW`` (default and mini forms). Refused for "bat", whose
        change ``W_bc D_b + D_b`` has no linear scale in ``D`` (PEFT ignores any scale for MiSS)."""
        if c == 1.0:
            return self
        if self.form == "bat":
            raise UnsupportedError(f"{self.name}: the MiSS \"bat\" form changes W by W_bc D_b + D_b, which has no "
                                   f"linear scale; merge it with scale 1 (got scale {c:g})")
        return self.scale_parameter(KEY, lambda a: a * c)

    def validate(self) -> None:
        if set(self.params) != {KEY}:
            raise ShapeError(f"{self.name}: a MiSS module has exactly one tensor, miss_block; found {sorted(self.params)}")
        _check_layer(self.layer, self.name)
        self.block = self.params[KEY]
        self.form = self.config.form
        r = int(self.block.shape[-1]) if self.form == "bat" else int(self.block.shape[0])
        want = block_shape(self.layer, r, self.form, mini_r=self.config.mini_r, where=self.name)
        if tuple(self.block.shape) != want:
            raise ShapeError(f"{self.name}: miss_block has shape {tuple(self.block.shape)}, but init_weights="
                             f"{self.config.init_weights!r} on a Linear {self.layer.weight_shape} needs {want}")
        self.r = r
        #: the bat form has no ΔW independent of W (callers asking modules generically skip delta_weight)
        self.additive = self.form != "bat"

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        d = delta_weight(self.block, self.layer, form=self.form)
        if peft_compat and is_low_precision(self.block.dtype):
            d = as_compute(self.xp, self.xp.astype(d, self.block.dtype), d.dtype)
        return d

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        self.layer.check_weight(weight)
        return MergeResult(merge(weight, self.block, form=self.form, copy=copy, safe=safe, peft_compat=peft_compat,
                                 where=self.name), bias)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        self.layer.check_weight(weight)
        return MergeResult(unmerge(weight, self.block, form=self.form, copy=copy, peft_compat=peft_compat,
                                   where=self.name), bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.block, bias=bias, form=self.form)

    def describe(self) -> dict[str, Any]:
        return {"r": self.r, "form": self.form}


PARAMETER_SUFFIXES = (KEY,)
Config = MissConfig
Module = MissModule
#: demo / documentation examples (non-trivial: a random block; PEFT draws only the default form at random)
EXAMPLES = {"MiSS": dict(r=4, init_weights=False)}

#: the method's description (peftmath.methods._contract.Method)
METHOD = Method(
    peft_type=PEFT_TYPE, config=MissConfig, module=MissModule, spec="specs/miss.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=SUPPORTED, additive=True, init_field="init_weights",
    examples=EXAMPLES,
)
