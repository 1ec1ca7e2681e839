r"""GLoRA: generalized LoRA (Chavan et al., 2023, "One-for-All: Generalized LoRA for Parameter-Efficient
Fine-tuning").

GLoRA scales the frozen weight element by element, shifts it, and moves the bias, with five support tensors
``A`` … ``E``, each a low-rank product, a vector, a scalar or absent (zeros)::

    W' = W₀ + W₀ ⊙ A + B                      A, B broadcast to (out, in)
    b' = b₀ + b₀ ⊙ D + E + W₀ C               C (in, 1), D, E broadcast to (out,)
    forward:  y = x W'ᵀ + b'                  (the merged layer; a base without a bias keeps none: C, D, E unused)
    unmerge:  W₀ = (W' − B) ⊘ (1 + A),   b₀ = (b' − E − W₀ C) ⊘ (1 + D)      (refused where 1 + A or 1 + D is 0)

Stored tensors per support (PEFT's names, ``glora_<X>.<name>``)::

    "lora"      Xd (rows, r), Xu (r, cols)     value Xd @ Xu     A, B: (out, r), (r, in); C: (in, r), (r, 1)
    "vector"    X  (rows, 1) or (out,)          A, B: (out, 1) (per output row); C: (in, 1); D, E: (out,)
    "constant"  X  (1,)                         one scalar
    "none"      zeros, a buffer of the full shape (out, in), (in, 1) or (out,), saved by PEFT; used as the value

PEFT adapts ``nn.Linear`` only. There is no scaling factor and no PEFT inconsistency (specs/glora.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._array import as_compute, compute_dtype, is_immutable, namespace, refuse_where
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_choice, check_flags, check_positive_int
from ..errors import NonFiniteError, NotInvertibleError, ShapeError
from ..layers import Layer, LayerKind
from ..backends import kaiming_uniform_bound
from ._base import ROW_TILE_BYTES, MergeResult, ModuleAdapter, in_row_tiles, require_kind, write_weight
from ._contract import Method

Array = Any

__all__ = ["GloraConfig", "support_shapes", "init_weights", "support_rows", "effective_weight", "effective_bias",
           "forward", "merge", "unmerge", "GloraModule"]

PEFT_TYPE = "GLORA"
SUPPORTED_KINDS = (LayerKind.LINEAR,)
LETTERS = ("A", "B", "C", "D", "E")
#: the tensor names of each support form
_FORMS = {"lora": ("Xd", "Xu"), "vector": ("X",), "constant": ("X",), "none": ("zeros",)}
_KEYS = tuple(f"glora_{c}.{n}" for c in LETTERS for n in ("Xd", "Xu", "X", "zeros")
              if not (c in "DE" and n in ("Xd", "Xu")))
#: TunerConfig fields that PEFT's GloraConfig does not have
_NOT_PEFT_FIELDS = ("exclude_modules", "layers_to_transform", "layers_pattern")


# --------------------------------------------------------------------------------------------------
# Config (specs/glora.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class GloraConfig(TunerConfig):
    """PEFT's ``GloraConfig`` (``peft_type: "GLORA"``), PEFT's names and defaults. ``config_A_B`` /
    ``config_C`` / ``config_D_E`` choose the form of the supports (module docstring) for new adapters; a loaded
    module's forms are read from its tensors. PEFT's GloraConfig has no ``exclude_modules`` /
    ``layers_to_transform`` / ``layers_pattern``: they must stay unset and are left out of the written config."""

    peft_type: ClassVar[str] = "GLORA"
    absent_fields: ClassVar[tuple[str, ...]] = _NOT_PEFT_FIELDS

    r: int = 8
    bias: str = "none"
    config_A_B: str = "lora"
    config_C: str = "lora"
    config_D_E: str = "constant"
    init_weights: bool = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "r", self.r)
        check_choice(source, "bias", self.bias, ("none", "all", "glora_only"))
        check_choice(source, "config_A_B", self.config_A_B, ("lora", "vector", "constant", "none"))
        check_choice(source, "config_C", self.config_C, ("lora", "vector", "none"))
        check_choice(source, "config_D_E", self.config_D_E, ("vector", "constant", "none"))
        check_flags(source, self, "init_weights")



def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "GLoRA", SUPPORTED_KINDS, peft="PEFT adapts plain nn.Linear only")


# --------------------------------------------------------------------------------------------------
# Shapes (specs/glora.md, "2. Shapes")
# --------------------------------------------------------------------------------------------------
def support_shapes(letter: str, form: str, out: int, inn: int, r: int) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of support ``letter`` in ``form`` on an ``(out, in)`` Linear (module docstring).

    >>> support_shapes("C", "lora", 20, 10, 8)
    {'Xd': (10, 8), 'Xu': (8, 1)}
    """
    rows, cols = {"A": (out, inn), "B": (out, inn), "C": (inn, 1)}.get(letter, (out, None))
    if form == "lora":
        return {"Xd": (rows, r), "Xu": (r, cols)}
    if form == "vector":
        return {"X": (rows, 1) if cols is not None else (rows,)}
    if form == "constant":
        return {"X": (1,)}
    return {"zeros": (rows, cols) if cols is not None else (rows,)}


def _form_of(letter: str, tensors: dict[str, Array], where: str) -> str:
    """The form of support ``letter`` from its tensor names (``X`` of shape ``(1,)``: a constant)."""
    names = tuple(sorted(tensors))
    if names == ("Xd", "Xu"):
        return "lora"
    if names == ("X",):  # a constant is one number (1,); C has no constant form
        return "constant" if tuple(tensors["X"].shape) == (1,) and letter != "C" else "vector"
    if names == ("zeros",):
        return "none"
    raise ShapeError(f"{where}: glora_{letter} has tensors {list(names)}; expected Xd and Xu (lora), X (vector or "
                     f"constant) or zeros (none)")


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/glora.md, "3. Initialisation")
# --------------------------------------------------------------------------------------------------
def _kaiming(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """``kaiming_uniform_(a=√5)`` of a 2-D tensor: ``U(±1/sqrt(shape[1]))``."""
    bound = kaiming_uniform_bound(shape[1])
    return rng.uniform(-bound, bound, shape)


def init_weights(layer: Layer, config: GloraConfig, *, seed: int | np.random.Generator | None = 0,
                 init: bool | None = None, xp: Any = None, device: Any = None,
                 dtype: Any = None) -> dict[str, Array]:
    """Fresh supports in the config's forms, PEFT's distributions: ``Xu`` kaiming-uniform; ``Xd`` zeros
    (``init_weights=True``, a no-op) or kaiming-uniform; a vector zeros or kaiming-uniform (``(rows, 1)``: fan-in 1,
    ``(out,)``: fan-in ``out``); a constant zero or ``N(0, 0.02²)``; ``none`` a zeros buffer. ``C``, ``D``, ``E``
    take their configured forms (a base layer with a bias is assumed: on one without, PEFT stores zeros and
    the three are unused either way)."""
    _check_kind(layer, "glora.init_weights")
    rng = host_rng(seed)
    xp = xp if xp is not None else np
    flag = config.init_weights if init is None else init
    out, inn = layer.out_features, layer.in_features
    forms = {"A": config.config_A_B, "B": config.config_A_B, "C": config.config_C, "D": config.config_D_E,
             "E": config.config_D_E}
    host: dict[str, np.ndarray] = {}
    for letter in LETTERS:
        form = forms[letter]
        for name, shape in support_shapes(letter, form, out, inn, config.r).items():
            if form == "none" or (flag and name != "Xu"):
                value = np.zeros(shape)
            elif form == "constant":
                value = rng.normal(0.0, 0.02, shape)
            elif len(shape) == 1:  # a row vector (out,): kaiming on its (1, out) view, as PEFT
                value = _kaiming(rng, (1, shape[0])).reshape(shape)
            else:
                value = _kaiming(rng, shape)
            host[f"glora_{letter}.{name}"] = value
    b = backend_for(xp)
    arrays = {k: b.from_host(np.ascontiguousarray(v, dtype=np.float32), xp, device) for k, v in host.items()}
    return arrays if dtype is None else {k: xp.astype(v, dtype) for k, v in arrays.items()}


# --------------------------------------------------------------------------------------------------
# Effective weight and bias (specs/glora.md, "4. Effective weight and bias")
# --------------------------------------------------------------------------------------------------
def support_rows(xp: Any, form: str, tensors: dict[str, Array], cd: Any, r0: int | None = None,
                 r1: int | None = None) -> Array:
    """The value of one support (rows ``r0:r1`` of it where it has rows) in ``cd``, broadcastable against the
    rows of its target: ``Xd[r0:r1] @ Xu``, ``X[r0:r1]``, the scalar ``X`` (shape ``(1,)``), ``zeros[r0:r1]``."""
    sl = slice(r0, r1)
    if form == "lora":
        return xp.matmul(as_compute(xp, tensors["Xd"][sl, ...], cd), as_compute(xp, tensors["Xu"], cd))
    if form == "constant":
        return as_compute(xp, tensors["X"], cd)
    t = tensors["X" if form == "vector" else "zeros"]
    return as_compute(xp, t[sl, ...], cd)


def effective_weight(W: Array, supports: dict[str, tuple[str, dict[str, Array]]], *, dtype: Any = None) -> Array:
    """``W' = W + W ⊙ A + B`` ``(out, in)`` in the compute dtype (float32; float64 for float64)."""
    xp = namespace(W, where="glora")
    cd = dtype if dtype is not None else compute_dtype(xp, W.dtype)
    Wc = as_compute(xp, W, cd)
    fa, ta = supports["A"]
    fb, tb = supports["B"]
    return Wc + Wc * support_rows(xp, fa, ta, cd) + support_rows(xp, fb, tb, cd)


def _bias_terms(W: Array, supports: dict[str, tuple[str, dict[str, Array]]], cd: Any) -> tuple[Array, Array, Array]:
    """``(D, E, W C)``, each broadcastable to ``(out,)``, in ``cd``."""
    xp = namespace(W)
    fc, tc = supports["C"]
    wc = xp.reshape(xp.matmul(as_compute(xp, W, cd), support_rows(xp, fc, tc, cd)), (-1,))
    fd, td = supports["D"]
    fe, te = supports["E"]
    d = xp.reshape(support_rows(xp, fd, td, cd), (-1,))
    e = xp.reshape(support_rows(xp, fe, te, cd), (-1,))
    return d, e, wc


def effective_bias(W: Array, b: Array, supports: dict[str, tuple[str, dict[str, Array]]], *,
                   dtype: Any = None) -> Array:
    """``b' = b + b ⊙ D + E + W C`` ``(out,)`` in the compute dtype, ``W`` the base (unmerged) weight."""
    xp = namespace(W, b, where="glora")
    cd = dtype if dtype is not None else compute_dtype(xp, W.dtype, b.dtype)
    d, e, wc = _bias_terms(W, supports, cd)
    bc = as_compute(xp, b, cd)
    return bc + bc * d + e + wc


# --------------------------------------------------------------------------------------------------
# Forward (specs/glora.md, "5. Forward")
# --------------------------------------------------------------------------------------------------
def forward(x: Array, W: Array, supports: dict[str, tuple[str, dict[str, Array]]], *, bias: Array | None = None,
            layer: Layer | None = None) -> Array:
    """``x W'ᵀ + b'`` (no bias term where the base has none), in float32 (float64 for float64 inputs), rounded
    once to the output dtype."""
    xp = namespace(x, W, bias, where="glora.forward")
    lay, _ = Layer.for_weight(layer, W).for_input(x, "glora.forward")
    _check_kind(lay, "glora.forward")
    lay.check_bias(bias)
    out_dtype = xp.result_type(x.dtype, W.dtype)
    cd = compute_dtype(xp, x.dtype, W.dtype)
    w_eff = effective_weight(W, supports, dtype=cd)
    b_eff = None if bias is None else effective_bias(W, bias, supports, dtype=cd)
    return as_compute(xp, lay.base_forward(as_compute(xp, x, cd), w_eff, b_eff, xp), out_dtype)


# --------------------------------------------------------------------------------------------------
# Merge and unmerge (specs/glora.md, "6. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def _inc(q: Array) -> Array:
    q += 1  # in place: q is a fresh product (or the reused tile buffer)
    return q


#: bytes of one float32 row tile of the tiled merge and unmerge (256 KiB: the tile and its two products stay in
#: cache; measured on Linear(4096, 4096): 128-256 KiB tiles 5-10x faster than PEFT's merge, 1-4 MiB tiles 1-2x)
TILE_BYTES = 1 << 18


def _tiles(W: Array, supports: dict[str, tuple[str, dict[str, Array]]], inverse: bool):
    """``update(src, dst, r0, r1)``: rows ``r0:r1`` of the merged (``dst = src ⊙ (1 + A) + B``) or unmerged
    (``dst = (src − B) ⊘ (1 + A)``) weight, ``A`` and ``B`` formed for those rows only (NumPy: into one reused
    buffer per low-rank product); ``dst`` may be ``src`` (in place)."""
    xp = namespace(W)
    cd = compute_dtype(xp, W.dtype)
    (fa, ta), (fb, tb) = supports["A"], supports["B"]
    reused: dict[str, np.ndarray] = {}
    numpy = isinstance(W, np.ndarray)

    def rows(key: str, form: str, tensors: dict[str, Array], r0: int, r1: int) -> Array:
        if form == "lora" and numpy:
            xd, xu = as_compute(xp, tensors["Xd"], cd), as_compute(xp, tensors["Xu"], cd)
            if key not in reused or reused[key].shape[0] < r1 - r0:
                reused[key] = np.empty((r1 - r0, xu.shape[1]), dtype=cd)
            return np.matmul(xd[r0:r1], xu, out=reused[key][: r1 - r0])
        return support_rows(xp, form, tensors, cd, r0, r1)

    def update(src: Array, dst: Array, r0: int, r1: int) -> None:
        q = rows("A", fa, ta, r0, r1)
        q = _inc(q) if fa == "lora" else q + 1  # only a fresh product may change in place
        if numpy:
            if inverse:
                np.subtract(src, rows("B", fb, tb, r0, r1), out=dst)
                dst /= q
            else:
                np.multiply(src, q, out=dst)
                dst += rows("B", fb, tb, r0, r1)
        elif inverse:  # in place on another library (src is dst)
            dst -= rows("B", fb, tb, r0, r1)
            dst /= q
        else:
            dst *= q
            dst += rows("B", fb, tb, r0, r1)

    return cd, update


def _tile_rows(W: Array) -> int:
    return max(1, TILE_BYTES // (4 * max(1, int(W.shape[-1]))))


def _tile_kernel(W: Array, supports: dict[str, tuple[str, dict[str, Array]]], inverse: bool):
    """The in-place update of the weight's rows, tile by tile (:func:`_tiles`; half precision widened per tile
    and rounded once, :func:`~peftmath.methods._base.in_row_tiles`): no temporary of W's size."""
    xp = namespace(W)
    cd, update = _tiles(W, supports, inverse)

    def kernel(M: Array) -> bool:
        if M.dtype != cd:
            in_row_tiles(xp, M, cd, lambda T, r0, r1: update(T, T, r0, r1), tile_full=True)
            return True
        n, step = int(M.shape[0]), _tile_rows(M)
        for r0 in range(0, n, step):
            T = M[r0:min(r0 + step, n), ...]
            update(T, T, r0, min(r0 + step, n))
        return True

    return kernel


def _fresh_tiles(W: Array) -> bool:
    """Whether :func:`_compute` writes the result tile by tile (a NumPy weight in its compute dtype); elsewhere
    ``copy=True`` runs the in-place kernel on a private copy (``write_weight``'s ``kernel_on_copy``)."""
    return isinstance(W, np.ndarray) and W.dtype == compute_dtype(np, W.dtype)


def _compute(W: Array, supports: dict[str, tuple[str, dict[str, Array]]], inverse: bool, dense):
    """The out-of-place result: for a NumPy weight in its compute dtype, written tile by tile into one fresh
    array (``W`` read once, the result written once, no other array of its size); else ``dense()``."""

    def compute() -> Array:
        if not _fresh_tiles(W):
            return dense()
        _, update = _tiles(W, supports, inverse)
        out = np.empty(W.shape, dtype=W.dtype)
        n, step = int(W.shape[0]), _tile_rows(W)
        for r0 in range(0, n, step):
            r1 = min(r0 + step, n)
            update(W[r0:r1], out[r0:r1], r0, r1)
        return out

    return compute


def _peft_order(W: Array, b: Array | None, supports: dict[str, tuple[str, dict[str, Array]]]
                ) -> tuple[Array, Array | None]:
    """PEFT's merge, operation by operation, each result rounded to ``W``'s dtype as torch rounds it:
    ``W + ((W ⊙ A) + B)`` and ``b + (((b ⊙ D) + E) + W C)`` (the supports first rounded to that dtype), in the
    compute dtype (``peft_compat``; bit-identical to PEFT 0.21.2 in float32 and bfloat16)."""
    xp = namespace(W, b)
    cd = compute_dtype(xp, W.dtype)

    def rnd(t: Array) -> Array:
        return as_compute(xp, xp.astype(t, W.dtype), cd)

    Wc = as_compute(xp, W, cd)
    A, B = (rnd(support_rows(xp, *supports[k], cd)) for k in "AB")
    new_w = rnd(Wc + rnd(rnd(Wc * A) + B))
    if b is None:
        return new_w, None
    C, D, E = (rnd(xp.reshape(support_rows(xp, *supports[k], cd), (-1,) if k != "C" else (W.shape[1], -1)))
               for k in "CDE")
    bc = as_compute(xp, b, cd)
    wc = rnd(xp.reshape(xp.matmul(Wc, C), (-1,)))
    return new_w, rnd(bc + rnd(rnd(rnd(bc * D) + E) + wc))


def merge(W: Array, supports: dict[str, tuple[str, dict[str, Array]]], *, bias: Array | None = None,
          layer: Layer | None = None, copy: bool = True, safe: bool = False, peft_compat: bool = False,
          where: str = "glora.merge") -> tuple[Array, Array | None]:
    """``(W', b')``: formed in float32 (float64) and rounded once to each one's dtype; ``b'`` from the base ``W``
    (computed before ``W`` is written); ``None`` bias stays ``None``. ``copy=False`` writes into ``W``.
    ``peft_compat=True``: PEFT's order of operations and roundings (:func:`_peft_order`)."""
    xp = namespace(W, bias, where=where)
    lay = Layer.for_weight(layer, W)
    _check_kind(lay, where)
    lay.check_bias(bias)
    if peft_compat:
        compat_w, compat_b = _peft_order(W, bias, supports)
    new_b = None
    if bias is not None:
        new_b = as_compute(xp, compat_b if peft_compat else effective_bias(W, bias, supports), bias.dtype)
        if safe:  # before the weight is written (on dask: when the bias is computed)
            new_b = refuse_where(new_b, ~xp.isfinite(new_b), lambda: NonFiniteError(
                f"{where}: the merged bias would contain NaN or infinity; the base weight and bias are unchanged"),
                xp=xp)
    if peft_compat:
        new_w = write_weight(where, W, lambda: compat_w, layer=lay, kernel=None, copy=copy, safe=safe, xp=xp)
        return new_w, new_b
    new_w = write_weight(where, W, _compute(W, supports, False, lambda: effective_weight(W, supports)), layer=lay,
                         kernel=_tile_kernel(W, supports, False), copy=copy, safe=safe,
                         kernel_on_copy=not _fresh_tiles(W), xp=xp)
    return new_w, new_b


def _zeros_of_one_plus(xp: Any, form: str, tensors: dict[str, Array], cd: Any, rows: int, tile: int,
                       size: int) -> Array:
    """How many of the ``size`` entries of the target (weight or bias) meet a 0 of ``1 + X`` (``X`` a
    support's value, broadcast to the target), the low-rank form one row tile at a time: a 0-d integer
    array (lazy on dask)."""
    if form != "lora":
        v = support_rows(xp, form, tensors, cd) + 1
        return xp.sum(xp.astype(v == 0, xp.int64)) * (size // math.prod(int(s) for s in v.shape))
    total = None
    for r0 in range(0, rows, tile):
        n = xp.sum(xp.astype(support_rows(xp, form, tensors, cd, r0, min(r0 + tile, rows)) + 1 == 0, xp.int64))
        total = n if total is None else total + n
    return total


def unmerge(W: Array, supports: dict[str, tuple[str, dict[str, Array]]], *, bias: Array | None = None,
            layer: Layer | None = None, copy: bool = True, where: str = "glora.unmerge") -> tuple[Array, Array | None]:
    """``W₀ = (W' − B) ⊘ (1 + A)`` and ``b₀ = (b' − E − W₀ C) ⊘ (1 + D)`` (``W₀`` the recovered weight, as
    rounded), the inverse of :func:`merge` within a few units of roundoff per entry (specs/glora.md).

    Raises :class:`NotInvertibleError`, writing nothing, where an entry of ``1 + A`` (or of ``1 + D``, with a
    bias) is 0: merging sent those weights to ``B`` alone and nothing recovers them. On dask the check stays
    in the task graph (:func:`~peftmath._array.refuse_where`): the error comes when the result is computed.
    """
    xp = namespace(W, bias, where=where)
    lay = Layer.for_weight(layer, W)
    _check_kind(lay, where)
    lay.check_bias(bias)
    cd = compute_dtype(xp, W.dtype)
    out, inn = lay.out_features, lay.in_features
    tile = max(1, ROW_TILE_BYTES // (4 * max(1, inn)))
    zeros = {"A": _zeros_of_one_plus(xp, *supports["A"], cd, out, tile, out * inn)}
    if bias is not None:
        zeros["D"] = _zeros_of_one_plus(xp, *supports["D"], cd, out, tile, out)
    bad = zeros["A"] > 0 if bias is None else (zeros["A"] > 0) | (zeros["D"] > 0)

    def error() -> NotInvertibleError:
        what = ", ".join(f"1 + {k} is 0 in {int(v)} entries" for k, v in zeros.items() if int(v))
        return NotInvertibleError(
            f"{where}: {what} (weight {out}x{inn}): merging replaced those weights (bias entries) by B (E + W C) "
            f"alone, so the base cannot be recovered from the merged layer; keep a copy of the base weights "
            f"(PEFT's unmerge divides by 0 there)")

    lazy = is_immutable(W)
    if not lazy:
        refuse_where(bad, bad, error, xp=xp)  # before anything is written

    def dense() -> Array:
        fa, ta = supports["A"]
        fb, tb = supports["B"]
        return (as_compute(xp, W, cd) - support_rows(xp, fb, tb, cd)) / (support_rows(xp, fa, ta, cd) + 1)

    new_w = write_weight(where, W, _compute(W, supports, True, dense), layer=lay,
                         kernel=_tile_kernel(W, supports, True), copy=copy, kernel_on_copy=not _fresh_tiles(W), xp=xp)
    new_b = None
    if bias is not None:
        cdb = compute_dtype(xp, W.dtype, bias.dtype)
        d, e, wc = _bias_terms(new_w, supports, cdb)
        new_b = as_compute(xp, (as_compute(xp, bias, cdb) - e - wc) / (d + 1), bias.dtype)
    if lazy:
        new_w = refuse_where(new_w, bad, error, xp=xp)
        new_b = None if new_b is None else refuse_where(new_b, bad, error, xp=xp)
    return new_w, new_b


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
class GloraModule(ModuleAdapter):
    """GLoRA on one nn.Linear: the five supports, each in the form its tensors say. ``W' = W + ΔW`` with
    ``ΔW = W ⊙ A + B`` depending on the base weight, and the bias moves too."""

    peft_type = "GLORA"
    supported_kinds = SUPPORTED_KINDS
    #: no delta_weight() without the base weight (ΔW = W ⊙ A + B)
    additive: ClassVar[bool] = False

    @classmethod
    def initialize(cls, name: str, config: GloraConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """Fresh supports for module ``name`` (:func:`init_weights`; ``init`` overrides ``config.init_weights``);
        the base weight is not changed."""
        _check_kind(layer, name)
        if xp is None and weight is not None:
            xp = namespace(weight)
        return init_weights(layer, config, seed=seed, init=init, xp=xp, device=device, dtype=dtype), None

    @classmethod
    def infer_layer(cls, name: str, config: GloraConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """A Linear ``(out, in)``: the base weight shape, else from ``C`` (``in``) and ``D`` / ``E`` or ``A`` /
        ``B`` (``out``) where their forms tell."""
        if weight_shape is not None:
            return Layer.of(tuple(int(s) for s in weight_shape), kind or LayerKind.LINEAR)
        def get(letter: str, tname: str) -> Array | None:
            return params.get(f"glora_{letter}.{tname}")

        out = inn = None
        for letter in "AB":
            if get(letter, "zeros") is not None:
                out, inn = (int(s) for s in get(letter, "zeros").shape)
            if get(letter, "Xu") is not None:
                out, inn = int(get(letter, "Xd").shape[0]), int(get(letter, "Xu").shape[1])
            if get(letter, "X") is not None and get(letter, "X").ndim == 2:
                out = int(get(letter, "X").shape[0])
        for tname in ("Xd", "X", "zeros"):
            if inn is None and get("C", tname) is not None:
                inn = int(get("C", tname).shape[0])
        for letter in "DE":
            for tname in ("X", "zeros"):
                t = get(letter, tname)
                if out is None and t is not None and (tname == "zeros" or tuple(t.shape) != (1,)):
                    out = int(t.shape[0])
        if out is None or inn is None:
            raise ShapeError(f"{name}: GLoRA's tensors {sorted(params)} do not determine the base layer; pass the "
                             f"base weight shape (weight_shape=...)")
        return Layer(LayerKind.parse(kind) if kind is not None else LayerKind.LINEAR, (out, inn))

    def validate(self) -> None:
        _check_kind(self.layer, self.name)
        unknown = sorted(set(self.params) - set(_KEYS))
        if unknown:
            raise ShapeError(f"{self.name}: unexpected GLoRA tensors {unknown}; GLoRA has glora_A … glora_E with "
                             f"Xd/Xu, X or zeros")
        out, inn = self.layer.out_features, self.layer.in_features
        self.supports: dict[str, tuple[str, dict[str, Array]]] = {}
        rank = None
        for letter in LETTERS:
            tensors = {k.partition(".")[2]: v for k, v in self.params.items() if k.startswith(f"glora_{letter}.")}
            if not tensors:
                raise ShapeError(f"{self.name}: no glora_{letter} tensors (PEFT saves all five supports; a disabled "
                                 f"one as its zeros buffer)")
            form = _form_of(letter, tensors, self.name)
            if form == "lora" and letter in "DE":
                raise ShapeError(f"{self.name}: glora_{letter} cannot be low rank (D and E are bias-sized)")
            r = int(tensors["Xu"].shape[0]) if form == "lora" else 0
            want = support_shapes(letter, form, out, inn, r)
            for tname, shape in want.items():
                if tuple(tensors[tname].shape) != shape:
                    raise ShapeError(f"{self.name}: glora_{letter}.{tname} has shape {tuple(tensors[tname].shape)}, "
                                     f"expected {shape} for a {form} support on a {out}x{inn} Linear")
            rank = r if r else rank
            self.supports[letter] = (form, tensors)
        self.r = rank

    def describe(self) -> dict[str, Any]:
        return {"r": self.r, **{f"form_{k}": f for k, (f, _) in self.supports.items()}}

    def changes_bias(self) -> bool:
        return True

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        """:func:`merge`; ``peft_compat=True``: PEFT's order of operations and roundings."""
        self.layer.check_weight(weight)
        return MergeResult(*merge(weight, self.supports, bias=bias, layer=self.layer, copy=copy, safe=safe,
                                  peft_compat=peft_compat, where=self.name))

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        """:func:`unmerge`: exact up to roundoff, refused where ``1 + A`` or ``1 + D`` is 0."""
        self.layer.check_weight(weight)
        return MergeResult(*unmerge(weight, self.supports, bias=bias, layer=self.layer, copy=copy, where=self.name))

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, _ = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.supports, bias=bias, layer=layer)

    def num_parameters(self) -> int:
        """Trainable scalars: every support but the ``zeros`` buffers."""
        return sum(math.prod(int(s) for s in a.shape) for k, a in self.params.items() if not k.endswith(".zeros"))


#: checkpoint suffixes of this method's per-module tensors
PARAMETER_SUFFIXES = _KEYS
Config = GloraConfig
Module = GloraModule
#: demo / documentation examples: row label -> config fields (non-trivial: random supports)
EXAMPLES = {
    "GLoRA": dict(r=3, init_weights=False),
    "GLoRA (vectors)": dict(config_A_B="vector", config_C="vector", config_D_E="vector", init_weights=False),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=GloraConfig, module=GloraModule, spec="specs/glora.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=SUPPORTED_KINDS, additive=True, init_field="init_weights",
    examples=EXAMPLES, frozen_suffixes=tuple(k for k in _KEYS if k.endswith(".zeros")),
)
