r"""FRoD: fine-tuning with rotation and diagonal scaling on a shared basis (AAAI 2026).

Each adapted weight is written in a basis ``V`` shared by the layers of one *category* (the same role in every
block, e.g. all ``q_proj``), and the layer trains the diagonal of the decomposition and a few off-diagonal
entries (a sparse ``S``)::

    V: (in, in)                 frod_V.<category>           shared, frozen (PEFT: from the category's weights)
    S: (in, in) sparse          frod_s_indices.<category> (2, nnz) positions, frod_lambda_s_values (nnz,) values
    λ: (in,)                    frod_lambda_l
    W V⁻ᵀ = U diag(λ₀)          U (out, in) unit columns, λ₀ their norms: computed from the base weight
    W_FRoD = U (S + diag(λ)) Vᵀ                              the adapted weight (replaces W)
    ΔW = W_FRoD − W;   y = x W_FRoDᵀ + b

At initialisation ``λ = λ₀`` and ``S = 0``, so ``W_FRoD = W``. ``U`` is never saved: it is recomputed from the base
weight (PEFT: at load), so ΔW depends on the base weight. Merging replaces ``W`` by ``W_FRoD``; it returns ``λ₀``
as its record, with which unmerge recovers ``W = W_FRoD V⁻ᵀ (S + diag λ)⁻¹ diag(λ₀) Vᵀ`` (refused without the
record, or where ``S + diag(λ)`` is singular). For a transformers ``Conv1D`` the stored weight is transposed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from .._array import as_compute, compute_dtype, namespace, widest_float
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_choice, check_flags, check_fraction, check_number
from ..errors import CheckpointError, ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._base import MergeResult, ModuleAdapter, check_shape, layer_of_weight_shape, private_copy, require_kind, write_weight
from ._contract import Method

Array = Any

__all__ = ["FrodConfig", "category", "base_factors", "frod_weight", "delta_weight", "forward", "merge", "unmerge",
           "FrodModule"]

PEFT_TYPE = "FROD"
SUPPORTED_KINDS = (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED)
_PEFT_KINDS = "PEFT raises TypeError for others"
#: the shared tensors of a category, by alias (the key is ``<prefix><category>``)
PREFIXES = {"frod_V": "base_model.frod_V.", "frod_s_indices": "base_model.frod_s_indices.",
            "frod_s_size": "base_model.frod_s_size."}
SHARED_PATTERN = r"base_model\.frod_(V|s_indices|s_size)\.[^.]+"
_ZERO_NORM = 1e-12  # PEFT: a column of W V⁻ᵀ with a norm at most this gets U = 0
#: a column of W V⁻ᵀ with a norm below this fraction of the largest is a direction W lacks (out < in): its column of U
#: is rounding noise, normalised (specs/frod.md, "PEFT compatibility")
_NULL_RELATIVE = 1e-5


# --------------------------------------------------------------------------------------------------
# Config (specs/frod.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class FrodConfig(TunerConfig):
    """PEFT's ``FrodConfig`` (``peft_type: "FROD"``). PEFT's FrodConfig has no ``exclude_modules``; it is left out
    of the written config while unset."""

    peft_type: ClassVar[str] = "FROD"

    projection_prng_key: int = 0
    save_projection: bool = True
    frod_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    sparse_rate: float = 0.01
    regularization_alpha: float = 1e-3
    progressbar: bool = True
    runtime_offload_base_weight: bool = False

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ConfigError(f"{source}: field 'projection_prng_key' must be an integer, got {self.projection_prng_key!r}")
        check_flags(source, self, "save_projection", "fan_in_fan_out", "init_weights", "progressbar",
                    "runtime_offload_base_weight")
        check_fraction(source, "frod_dropout", self.frod_dropout)
        check_fraction(source, "sparse_rate", self.sparse_rate, closed=True)
        check_number(source, "regularization_alpha", self.regularization_alpha)
        check_choice(source, "bias", self.bias, ("none", "all", "frod_only"))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("exclude_modules") is None:  # not a field of PEFT's FrodConfig
            out.pop("exclude_modules", None)
        return out


# --------------------------------------------------------------------------------------------------
# Shapes and categories (specs/frod.md, "2. Shapes")
# --------------------------------------------------------------------------------------------------
def category(module: str) -> str:
    """The projection-sharing category of a module (PEFT's ``_category_from_key``): the last name, or the last two
    joined by ``_`` (``encoder.layer.0.attention.self.query`` → ``self_query``), a BERT attention output
    ``attention.output.dense`` → ``attention_output``.

    >>> category("lin0"), category("model.layers.3.self_attn.q_proj"), category("h.0.attention.output.dense")
    ('lin0', 'self_attn_q_proj', 'attention_output')
    """
    parts = module.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    name = f"{parts[-2]}_{parts[-1]}"
    if name == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return name


def shared_keys_of(module: str) -> dict[str, str]:
    """``{alias: checkpoint key}`` of the shared tensors module ``module`` reads."""
    cat = category(module)
    return {alias: prefix + cat for alias, prefix in PREFIXES.items()}


def link_modules(config: FrodConfig, params: Mapping[str, Any], shared: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``{module: {alias: shared key}}``: each module reads its category's ``V``, ``S`` positions and size
    (:class:`CheckpointError` naming the missing keys otherwise)."""
    out = {}
    for module, own in params.items():
        keys = shared_keys_of(module)
        if all(k in own for k in keys.values()):  # as FrodModule.initialize returns them without shared=
            continue
        missing = [k for k in keys.values() if k not in shared]
        if missing:
            raise _missing_projections(module, config, missing)
        out[module] = keys
    return out


def _missing_projections(module: str, config: FrodConfig, missing: list[str]) -> CheckpointError:
    why = ("was saved with save_projection=false, so it does not contain the shared projections"
           if not config.save_projection else f"lacks the shared tensors {missing}")
    return CheckpointError(
        f"{module}: this FRoD adapter {why}. PEFT recomputes V from the base weights of all adapted layers of the "
        f"category {category(module)!r} and draws S's positions with torch.Generator(projection_prng_key="
        f"{config.projection_prng_key}); peftmath reads them from the checkpoint. Fix: load the adapter in PEFT and "
        f"save it again with FrodConfig(save_projection=True) (the default)")


def _check(where: str, layer: Layer, V: Array, idx: Array, size: Array, lam: Array, values: Array) -> int:
    """``in`` after checking the shapes against the layer."""
    n = layer.in_features
    check_shape(where, "frod_V", V, (n, n))
    check_shape(where, "frod_lambda_l", lam, (n,))
    if idx.ndim != 2 or idx.shape[0] != 2:
        raise ShapeError(f"{where}: frod_s_indices has shape {tuple(idx.shape)}, expected (2, nnz)")
    check_shape(where, "frod_lambda_s_values", values, (int(idx.shape[1]),))
    got = [int(v) for v in backend_for(namespace(size)).to_host(size).tolist()]
    if got != [n, n]:
        raise ShapeError(f"{where}: frod_s_size is {got}, expected [{n}, {n}] (the layer's input size)")
    return n


def _layer(layer: Layer | LayerKind | str | None, W: Array | None, where: str) -> Layer:
    lay = layer if isinstance(layer, Layer) else Layer.of(tuple(W.shape), layer) if W is not None else None
    if lay is None:
        raise ShapeError(f"{where}: pass the base weight (FRoD's adapted weight is built from it)")
    require_kind(lay, where, "FRoD", SUPPORTED_KINDS, peft=_PEFT_KINDS, error=ShapeError)
    return lay


# --------------------------------------------------------------------------------------------------
# Factors, adapted weight, delta, forward (specs/frod.md, "3. The adapted weight")
# --------------------------------------------------------------------------------------------------
def base_factors(W: Array, V: Array, *, layer: Layer | LayerKind | str | None = None, dtype: Any = None,
                 where: str = "frod.base_factors") -> tuple[Array, Array]:
    """``(U (out, in), λ₀ (in,))`` with ``W = U diag(λ₀) Vᵀ``: ``B = W V⁻ᵀ`` in float64 (a pseudo-inverse
    with ``rtol = 1e-6`` where ``V`` is singular, as PEFT), ``λ₀`` its column norms, ``U = B / λ₀`` (0 for a
    column of norm ≤ 1e-12); returned in ``dtype`` (default float32, float64 for float64 inputs).

    ``B`` solves ``V Bᵀ = Wᵀ`` (PEFT's ``torch.linalg.solve(V, Wᵀ)ᵀ``). NumPy: LAPACK's LU of ``Vᵀ`` and its two
    triangular solves (:func:`_numpy_solve`, about ``(2/3) in³ + 2 out·in²`` flops); other libraries: ``V⁻¹``, then
    the product (``(8/3) in³ + 2 out·in²``).

    >>> import numpy as np
    >>> U, lam0 = base_factors(np.array([[3.0, 0.0], [4.0, 2.0]]), np.eye(2))
    >>> U.tolist(), lam0.tolist()
    ([[0.6, 0.0], [0.8, 1.0]], [5.0, 2.0])
    """
    xp = namespace(W, V, where=where)
    lay = _layer(layer, W, where)
    cd = dtype or compute_dtype(xp, W.dtype, V.dtype)
    f64 = widest_float(xp)
    Wm = lay.as_matrix(W, xp)
    B = _numpy_solve(Wm, V) if isinstance(Wm, np.ndarray) and isinstance(V, np.ndarray) else None
    if B is None:
        W64, V64 = as_compute(xp, Wm, f64), as_compute(xp, V, f64)
        try:  # B = W V⁻ᵀ through V⁻¹: the backends' inv refuses a singular V on every library (JAX's solve
            # returns inf/NaN instead of raising)
            B = xp.matmul(W64, xp.matrix_transpose(backend_for(xp).inv(V64, where=where, what="frod_V")))
        except NotInvertibleError:
            B = xp.matmul(W64, xp.matrix_transpose(xp.linalg.pinv(V64, rtol=1e-6)))
    lam0 = xp.linalg.vector_norm(B, axis=0)
    keep = lam0 > _ZERO_NORM
    if isinstance(B, np.ndarray):  # B / λ₀ rounded once into a cd array: no float64 temporaries of W's size
        U = np.empty(B.shape, dtype=cd)
        np.divide(B, np.where(keep, lam0, 1.0), out=U, casting="unsafe")
        if not bool(keep.all()):
            U[:, ~keep] = 0
        return U, as_compute(xp, lam0, cd)
    U = B / xp.where(keep, lam0, xp.ones_like(lam0))[None, :] * xp.astype(keep, B.dtype)[None, :]
    return as_compute(xp, U, cd), as_compute(xp, lam0, cd)


def _numpy_solve(Wm: np.ndarray, V: np.ndarray) -> np.ndarray | None:
    """``B = W V⁻ᵀ`` (float64) for NumPy arrays: ``Bᵀ = V⁻¹ Wᵀ`` by LAPACK's LU of ``Vᵀ`` (``dgetrf``) and its two
    transposed triangular solves with the ``out`` right-hand sides (``dgetrs``), through SciPy, on private
    Fortran-ordered float64 copies (the inputs are never written). NumPy's ``inv`` is the same LU and solves with the identity as
    right-hand side, so ``inv`` then the product costs a float64 product more. None where ``V`` is singular (an
    exactly zero pivot, as ``torch.linalg.solve`` and ``numpy.linalg.inv`` report it) or not finite: the caller's
    generic path then decides (a pseudo-inverse, as PEFT)."""
    from scipy.linalg import lapack

    # LU of Vᵀ, then Bᵀ = (Vᵀ)⁻ᵀ Wᵀ: Vᵀ and Wᵀ are Fortran-ordered views of the usual C-ordered V and W, so both
    # copies are straight conversions (a C-to-Fortran copy of V is a transpose, 10x slower)
    lu, piv, info = lapack.dgetrf(np.array(V.T, dtype=np.float64, order="F"), overwrite_a=True)
    if info != 0 or not bool(np.isfinite(lu).all()):
        return None
    Bt, info = lapack.dgetrs(lu, piv, np.array(Wm.T, dtype=np.float64, order="F"), trans=1, overwrite_b=True)
    return None if info != 0 else Bt.T


def sparse_matrix(idx: Array, values: Array, n: int, *, dtype: Any = None) -> Array:
    """The dense ``(n, n)`` ``S`` with ``S[idx[0, k], idx[1, k]] += values[k]`` (PEFT's coalesced COO tensor), built
    on the host (the array API has no scatter-add) and returned in ``values``' namespace and ``dtype``.

    >>> import numpy as np
    >>> sparse_matrix(np.array([[0, 1], [1, 0]]), np.array([2.0, 3.0]), 2)
    array([[0., 2.],
           [3., 0.]])
    """
    xp = namespace(values)
    be = backend_for(xp)
    cd = dtype or compute_dtype(xp, values.dtype)
    return as_compute(xp, be.from_host(_host_sparse(idx, values, n), xp, getattr(values, "device", None)), cd)


def _host_sparse(idx: Array, values: Array, n: int) -> np.ndarray:
    """:func:`sparse_matrix` on the host in float64: the duplicates summed in the order of ``idx`` (one
    ``bincount`` over the flat positions, the sums of ``numpy.add.at`` at a fraction of its time)."""
    be = backend_for(namespace(values))
    host_idx = np.asarray(be.to_host(idx) if not isinstance(idx, np.ndarray) else idx)
    rows, cols = (np.asarray(a if np.issubdtype(a.dtype, np.integer) else np.rint(a), dtype=np.int64)
                  for a in host_idx)
    if host_idx.size and (rows.min() < 0 or cols.min() < 0 or rows.max() >= n or cols.max() >= n):
        raise ShapeError(f"frod: frod_s_indices has positions outside the ({n}, {n}) matrix")
    weights = np.asarray(be.to_host(values), dtype=np.float64)
    return np.bincount(rows * n + cols, weights=weights, minlength=n * n).reshape(n, n)


def _core(lam: Array, idx: Array, values: Array, n: int, cd: Any, xp: Any) -> Array:
    """``S + diag(λ)`` (n, n) in ``cd`` (NumPy: ``λ`` added to the diagonal in place, no ``(n, n)`` identity)."""
    if isinstance(lam, np.ndarray) and isinstance(values, np.ndarray):
        core = _host_sparse(idx, values, n).astype(cd)
        core[np.diag_indices(n)] += lam.astype(cd, copy=False)
        return core
    eye = xp.eye(n, dtype=cd)
    return sparse_matrix(idx, values, n, dtype=cd) + eye * as_compute(xp, lam, cd)[None, :]


def _adapted(U: Array, V: Array, lam: Array, idx: Array, values: Array, n: int, cd: Any, xp: Any) -> Array:
    """``U (S + diag λ) Vᵀ`` in ``cd`` (``U`` in ``cd``), the two products in the cheaper order: ``(U C) Vᵀ`` costs
    ``4 out·in²`` flops, ``U (C Vᵀ)`` ``2 in³ + 2 out·in²`` (taken for ``out > in``)."""
    core, Vt = _core(lam, idx, values, n, cd, xp), xp.matrix_transpose(as_compute(xp, V, cd))
    if U.shape[0] > n:
        return xp.matmul(U, xp.matmul(core, Vt))
    return xp.matmul(xp.matmul(U, core), Vt)


def frod_weight(W: Array, V: Array, idx: Array, size: Array, lam: Array, values: Array, *,
                layer: Layer | LayerKind | str | None = None, dtype: Any = None, where: str = "frod.frod_weight") -> Array:
    """The adapted weight ``U (S + diag λ) Vᵀ`` as the ``(out, in)`` matrix, in ``dtype`` (float32, float64 for
    float64 inputs); ``U`` from :func:`base_factors` of ``W``."""
    xp = namespace(W, V, lam, values, where=where)
    lay = _layer(layer, W, where)
    n = _check(where, lay, V, idx, size, lam, values)
    cd = dtype or compute_dtype(xp, W.dtype, V.dtype, lam.dtype, values.dtype)
    U, _ = base_factors(W, V, layer=lay, dtype=cd, where=where)
    return _adapted(U, V, lam, idx, values, n, cd, xp)


def delta_weight(W: Array, V: Array, idx: Array, size: Array, lam: Array, values: Array, *,
                 layer: Layer | LayerKind | str | None = None) -> Array:
    """``ΔW = W_FRoD − W`` in the stored layout, in float32 (float64 for float64 inputs): it needs the base weight.

    >>> import numpy as np
    >>> W = np.array([[3.0, 0.0], [4.0, 2.0]]); V = np.eye(2); idx = np.array([[0], [1]])
    >>> delta_weight(W, V, idx, np.array([2, 2]), np.array([5.0, 2.0]), np.array([1.0]))   # S[0, 1] = 1
    array([[0. , 0.6],
           [0. , 0.8]])
    """
    xp = namespace(W, V, lam, values, where="frod.delta_weight")
    lay = _layer(layer, W, "frod.delta_weight")
    F = frod_weight(W, V, idx, size, lam, values, layer=lay, where="frod.delta_weight")
    return lay.from_matrix(F - as_compute(xp, lay.as_matrix(W, xp), F.dtype), xp)


def forward(x: Array, W: Array, V: Array, idx: Array, size: Array, lam: Array, values: Array, *,
            bias: Array | None = None, layer: Layer | LayerKind | str | None = None,
            dropout: Callable[[Array], Array] | None = None, stride: int | tuple[int, ...] = 1,
            padding: int | tuple[int, ...] | str = 0, dilation: int | tuple[int, ...] = 1,
            groups: int | None = None, peft_compat: bool = False) -> Array:
    """``x W_FRoDᵀ + b`` as PEFT's forward computes it, ``((x V)(S + diag λ)ᵀ) Uᵀ + b`` (never forms ``W_FRoD``);
    with ``dropout``, ``x W₀ᵀ + b + (d(x) W_FRoDᵀ − d(x) W₀ᵀ)`` (PEFT's training path). Computed in float32
    (float64) and rounded once to the result dtype of ``x`` and ``W``. The conv keywords must keep their defaults.

    >>> import numpy as np
    >>> W = np.array([[3.0, 0.0], [4.0, 2.0]]); V = np.eye(2); idx = np.array([[0], [1]])
    >>> forward(np.array([[1.0, 1.0]]), W, V, idx, np.array([2, 2]), np.array([5.0, 2.0]), np.array([0.0]))
    array([[3., 6.]])
    """
    xp = namespace(x, W, V, lam, values, bias, where="frod.forward")
    lay = _layer(layer, W, "frod.forward")
    lay.check_weight(W)
    lay.check_bias(bias)
    lay.for_input(x, "frod.forward", groups=groups, stride=stride, padding=padding, dilation=dilation)
    n = _check("frod.forward", lay, V, idx, size, lam, values)
    out_dtype = xp.result_type(x.dtype, W.dtype)
    cd = compute_dtype(xp, out_dtype, V.dtype, lam.dtype, values.dtype)
    U, _ = base_factors(W, V, layer=lay, dtype=cd, where="frod.forward")
    xc = as_compute(xp, x, cd)
    xd = xc if dropout is None else dropout(xc)
    z = xp.matmul(xd, as_compute(xp, V, cd))
    y = xp.matmul(xp.matmul(z, xp.matrix_transpose(_core(lam, idx, values, n, cd, xp))), xp.matrix_transpose(U))
    if dropout is not None:  # the base layer on x, FRoD's change on d(x)
        Wm = as_compute(xp, lay.as_matrix(W, xp), cd)
        y = y + xp.matmul(xc, xp.matrix_transpose(Wm)) - xp.matmul(xd, xp.matrix_transpose(Wm))
    if bias is not None:
        y = y + as_compute(xp, bias, cd)
    return as_compute(xp, y, out_dtype)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge (specs/frod.md, "4. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
def merge(W: Array, V: Array, idx: Array, size: Array, lam: Array, values: Array, *,
          layer: Layer | LayerKind | str | None = None, copy: bool = True, safe: bool = False,
          peft_compat: bool = False, where: str = "frod.merge") -> tuple[Array, Array]:
    """``(W_FRoD, W₀)``: the adapted weight ``U (S + diag λ) Vᵀ`` in ``W``'s layout and dtype (``U`` from a float64
    solve, the products in float32, float64 for float64 inputs, rounded once), and a copy of the base weight
    ``W₀``, the record :func:`unmerge` needs (merging replaces the weight; PEFT keeps the same copy). ``copy=False`` writes into ``W``. ``peft_compat=True`` forms
    PEFT's ``W + (W_FRoD − W)`` with ``U`` rounded to float32 (and, for a half-precision weight, every factor and
    ``W_FRoD − W`` rounded to its dtype) instead.

    >>> import numpy as np
    >>> W = np.array([[3.0, 0.0], [4.0, 2.0]]); V = np.eye(2); idx = np.array([[0], [1]])
    >>> merged, W0 = merge(W, V, idx, np.array([2, 2]), np.array([5.0, 2.0]), np.array([1.0]))
    >>> merged.tolist(), W0.tolist() == W.tolist()
    ([[3.0, 0.6], [4.0, 2.8]], True)
    """
    xp = namespace(W, V, lam, values, where=where)
    lay = _layer(layer, W, where)
    lay.check_weight(W)
    n = _check(where, lay, V, idx, size, lam, values)  # before anything is written
    cd = compute_dtype(xp, W.dtype, V.dtype, lam.dtype, values.dtype)
    U, _ = base_factors(W, V, layer=lay, dtype=cd, where=where)  # the float64 solve, rounded once to cd
    record = private_copy(W, xp=xp)

    def compute() -> Array:
        if peft_compat:  # PEFT: U rounded to float32, every factor in W's dtype, W + (W_FRoD − W)
            r = (lambda a: as_compute(xp, xp.astype(a, W.dtype), cd)) if W.dtype != cd else (  # noqa: E731
                lambda a: as_compute(xp, a, cd))
            F = xp.matmul(r(xp.matmul(r(U), r(_core(lam, idx, values, n, cd, xp)))), xp.matrix_transpose(r(V)))
            Wm = as_compute(xp, lay.as_matrix(W, xp), cd)
            return lay.from_matrix(Wm + r(r(F) - Wm), xp)
        return lay.from_matrix(_adapted(U, V, lam, idx, values, n, cd, xp), xp)  # the products in cd, as PEFT's

    return write_weight(where, W, compute, layer=lay, copy=copy, safe=safe, xp=xp), record


def unmerge(W: Array, V: Array, idx: Array, size: Array, lam: Array, values: Array, *, record: Array | None,
            layer: Layer | LayerKind | str | None = None, copy: bool = True, where: str = "frod.unmerge") -> Array:
    """The base weight back: the ``record`` :func:`merge` returned (a copy of ``W₀``), exactly. Refused
    (:class:`NotInvertibleError`, nothing written) without it: the merged weight ``U (S + diag λ) Vᵀ`` no longer
    holds ``W₀``'s own diagonal ``λ₀``, and ``U`` was computed from ``W₀``."""
    xp = namespace(W, V, lam, values, where=where)
    lay = _layer(layer, W, where)
    lay.check_weight(W)
    _check(where, lay, V, idx, size, lam, values)
    if record is None:
        raise NotInvertibleError(
            f"{where}: merging FRoD replaced the weight by U (S + diag λ) Vᵀ, which does not hold the base weight's own "
            f"diagonal λ₀ (the column norms of W₀ V⁻ᵀ), and U was computed from W₀; pass the record merge returned "
            f"(records=... in Adapter.merge / unmerge: a copy of W₀, as PEFT keeps), or reload the base weights")
    lay.check_weight(record, "the merge record (the base weight)")
    return write_weight(where, W, lambda: as_compute(xp, record, compute_dtype(xp, record.dtype)), layer=lay,
                        copy=copy, xp=xp)


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/frod.md, "5. Initialisation")
# --------------------------------------------------------------------------------------------------
def projection(matrices: list[np.ndarray], regularization_alpha: float) -> np.ndarray:
    """PEFT's ``_projection_from_weights`` on the host in float64: the ``(in, in)`` basis of the stacked ``(out, in)``
    matrices of one category (right singular vectors when they have fewer rows than columns; else ``Rᵀ E`` with
    ``QR`` of the stack and ``E`` the eigenvectors of the mean of ``(Q_iᵀ Q_i + α I)⁻¹``).

    >>> V = projection([np.array([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]])], 1e-3)
    >>> V.shape, bool(abs(np.linalg.det(V)) > 0)
    ((2, 2), True)
    """
    stacked = np.concatenate([np.asarray(m, np.float64) for m in matrices], axis=0)
    if stacked.shape[0] < stacked.shape[1]:
        return np.linalg.svd(stacked, full_matrices=True)[2].T
    q, r = np.linalg.qr(stacked)
    dim, t_pi, start = r.shape[1], np.zeros((r.shape[1], r.shape[1])), 0
    for m in matrices:
        qs = q[start:start + m.shape[0]]
        start += m.shape[0]
        t_pi += np.linalg.inv(qs.T @ qs + regularization_alpha * np.eye(dim))
    return r.T @ np.linalg.eigh(t_pi / len(matrices))[1]


def positions(n: int, sparse_rate: float, *, seed: int | np.random.Generator | None = 0) -> np.ndarray:
    """``(2, nnz)`` off-diagonal positions of ``S``, ``nnz = min(⌊n² · sparse_rate⌋, n² − n)`` (at least 1 for a
    positive rate), a host-seeded random choice without repetition (PEFT: ``torch.randperm``).

    >>> positions(4, 0.25, seed=0).shape
    (2, 4)
    """
    off = np.array([(i, j) for i in range(n) for j in range(n) if i != j], dtype=np.int64).reshape(-1, 2)
    nnz = min(int(n * n * sparse_rate), off.shape[0])
    if sparse_rate > 0 and off.shape[0] > 0:
        nnz = max(1, nnz)
    return np.ascontiguousarray(off[host_rng(seed).permutation(off.shape[0])[:nnz]].T)


def init_shared(config: FrodConfig, layers: Iterable[Layer] | Mapping[str, Layer], *,
                seed: int | np.random.Generator | None = None, xp: Any = None, device: Any = None,
                dtype: Any = None) -> dict[str, Array]:
    """The shared tensors that do not depend on the weights: per category of the named ``layers`` (a mapping
    name -> Layer), ``S``'s positions (:func:`positions`, host-seeded from ``seed``, else
    ``config.projection_prng_key``, over the categories in sorted order as PEFT) and size. The basis ``V`` comes
    from the base weights: :meth:`FrodModule.initialize` adds it. Unnamed layers (an iterable) give an empty dict,
    which ``initialize`` fills the same way."""
    if not isinstance(layers, Mapping):
        return {}
    if xp is None:
        import array_api_compat.numpy as xp
    sizes: dict[str, int] = {}
    for name, layer in layers.items():
        cat, n = category(name), layer.in_features
        if sizes.setdefault(cat, n) != n:
            raise ConfigError(f"frod.init_shared: the modules of category {cat!r} have input sizes {sizes[cat]} and "
                              f"{n} ({name}); FRoD shares one (in, in) basis per category (PEFT fails here too)")
    rng = host_rng(config.projection_prng_key if seed is None else seed)
    be = backend_for(xp)
    out = {}
    for cat in sorted(sizes):
        n = sizes[cat]
        out[PREFIXES["frod_s_indices"] + cat] = be.from_host(positions(n, config.sparse_rate, seed=rng), xp, device)
        out[PREFIXES["frod_s_size"] + cat] = be.from_host(np.array([n, n], dtype=np.int64), xp, device)
    return out


class FrodModule(ModuleAdapter):
    """FRoD on one base module: ``frod_lambda_l``, ``frod_lambda_s_values`` and its category's shared ``V``, ``S``
    positions and size (``self.shared["frod_V"]`` etc., linked by :func:`link_modules`)."""

    peft_type = "FROD"
    additive = False  # ΔW depends on the base weight: delta_weight needs weight=
    merge_record = True
    supported_kinds = SUPPORTED_KINDS

    @classmethod
    def initialize(cls, name: str, config: FrodConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None,
                   shared: MutableMapping[str, Array] | None = None) -> tuple[dict[str, Array], Array | None]:
        """``{frod_lambda_l: λ₀, frod_lambda_s_values}`` from the base ``weight`` (required). The category's ``V``
        (PEFT's projection of this weight alone: PEFT decomposes all the category's weights jointly) and, unless
        :func:`init_shared` gave them, ``S``'s positions (host-seeded from ``projection_prng_key``) and size go into
        ``shared`` when it lacks them; without ``shared=`` they are returned among the params under their checkpoint
        keys (move them into ``Adapter(shared=...)`` before saving; a module also finds them there).
        ``init`` (else ``config.init_weights``): True gives ``λ = λ₀``, ``S = 0`` (the adapter is a no-op); False
        ``λ = λ₀ (1 + N(0, 0.1²))`` (PEFT adds ``N(0, 0.1²)``: specs/frod.md) and ``S ~ N(0, 0.1²)`` (host draws from
        ``seed``)."""
        require_kind(layer, name, "FRoD", SUPPORTED_KINDS, peft=_PEFT_KINDS, error=ShapeError)
        if weight is None:
            raise ConfigError(f"{name}: FRoD's initialisation needs the base weight (weight=...): its basis and U are "
                              f"computed from it")
        flag = config.init_weights if init is None else init
        if not isinstance(flag, bool):
            raise ConfigError(f"{name}: init_weights must be true or false, got {flag!r}")
        xp = xp or namespace(weight)
        be = backend_for(xp)
        keys = shared_keys_of(name)
        n = layer.in_features
        target = dtype if dtype is not None else xp.float32
        own = shared is None
        store: MutableMapping[str, Array] = {} if own else shared
        if keys["frod_s_indices"] not in store:
            store[keys["frod_s_indices"]] = be.from_host(positions(n, config.sparse_rate,
                                                                   seed=config.projection_prng_key), xp, device)
            store[keys["frod_s_size"]] = be.from_host(np.array([n, n], dtype=np.int64), xp, device)
        if keys["frod_V"] not in store:
            Wm = np.asarray(be.to_host(layer.as_matrix(weight, xp)), dtype=np.float64)
            V = projection([Wm], config.regularization_alpha).astype(np.float32)
            store[keys["frod_V"]] = xp.astype(be.from_host(V, xp, device), target)
        V, idx = store[keys["frod_V"]], store[keys["frod_s_indices"]]
        check_shape(name, "frod_V", V, (n, n))
        _, lam0 = base_factors(weight, V, layer=layer, where=name)
        nnz = int(idx.shape[1])
        lam = np.asarray(be.to_host(lam0), dtype=np.float64)
        values = np.zeros(nnz)
        if not flag:  # PEFT adds N(0, 0.1²) to λ and S; peftmath keeps off the directions W lacks (specs/frod.md)
            rng = host_rng(seed)
            rows = np.rint(np.asarray(be.to_host(idx), dtype=np.float64)[0]).astype(np.int64)
            has = lam > _NULL_RELATIVE * max(float(lam.max()), 0.0)
            values = rng.normal(0.0, 0.1, nnz) * has[rows]
            lam = lam * (1.0 + rng.normal(0.0, 0.1, n))
        put = lambda a: xp.astype(be.from_host(np.asarray(a, np.float32), xp, device), target)  # noqa: E731
        params = {"frod_lambda_l": put(lam), "frod_lambda_s_values": put(values)}
        if own:
            params.update(store)
        return params, None

    @classmethod
    def infer_layer(cls, name: str, config: FrodConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """The base weight's shape is needed (the tensors give only ``in = len(λ)``): a 2-D weight ``(·, in)`` is a
        Linear, ``(in, ·)`` a Conv1D (square: ``kind``, else ``fan_in_fan_out``)."""
        lay = layer_of_weight_shape(name, "frod_lambda_l", params, weight_shape, kind, config.fan_in_fan_out,
                                    "FRoD's tensors give only the input size")
        shape, n = lay.weight_shape, int(params["frod_lambda_l"].shape[0])
        if kind is not None or len(shape) != 2:
            return lay
        if n not in shape:
            raise ShapeError(f"{name}: base weight {shape} has no dimension of size len(frod_lambda_l) = {n}; does "
                             f"the adapter belong to this model?")
        conv1d = shape[0] == n and (shape[1] != n or config.fan_in_fan_out)
        return Layer(LayerKind.CONV1D_TRANSPOSED if conv1d else LayerKind.LINEAR, shape)

    def validate(self) -> None:
        require_kind(self.layer, self.name, "FRoD", SUPPORTED_KINDS, peft=_PEFT_KINDS, error=ShapeError)
        keys = shared_keys_of(self.name)
        unknown = sorted(set(self.params) - {"frod_lambda_l", "frod_lambda_s_values", *keys.values()})
        missing = sorted({"frod_lambda_l", "frod_lambda_s_values"} - set(self.params))
        if unknown or missing:
            raise ShapeError(f"{self.name}: FRoD has frod_lambda_l and frod_lambda_s_values; missing {missing}, "
                             f"unexpected {unknown}")
        if all(k in self.params for k in keys.values()):  # as initialize() returns them without shared=
            self.V, self.idx, self.size = (self.params[keys[a]] for a in PREFIXES)
        else:
            absent = [a for a in PREFIXES if a not in self.shared]
            if absent:
                raise _missing_projections(self.name, self.config, [keys[a] for a in absent])
            self.V, self.idx, self.size = (self.shared[a] for a in PREFIXES)
        self.lam, self.values = self.params["frod_lambda_l"], self.params["frod_lambda_s_values"]
        _check(self.name, self.layer, self.V, self.idx, self.size, self.lam, self.values)

    def _args(self) -> tuple:
        return self.V, self.idx, self.size, self.lam, self.values

    def delta_weight(self, *, peft_compat: bool = False, weight: Array | None = None) -> Array:
        """``W_FRoD − W``: needs the base weight (``weight=``)."""
        if weight is None:
            raise UnsupportedError(f"{self.name}: FRoD's ΔW = U (S + diag λ) Vᵀ − W depends on the base weight "
                                   f"(U is computed from it); pass weight=")
        return delta_weight(weight, *self._args(), layer=self.layer)

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        new, lam0 = merge(weight, *self._args(), layer=self.layer, copy=copy, safe=safe, peft_compat=peft_compat,
                          where=self.name)
        return MergeResult(new, bias, lam0)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        return MergeResult(unmerge(weight, *self._args(), record=record, layer=self.layer, copy=copy,
                                   where=self.name), bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        layer, kw = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, *self._args(), bias=bias, layer=layer, **kw)

    def describe(self) -> dict[str, Any]:
        return {"category": category(self.name), "nnz": int(self.idx.shape[1])}


#: checkpoint suffixes of the per-module tensors (ParameterDict entries: no ".weight")
PARAMETER_SUFFIXES = ("frod_lambda_l", "frod_lambda_s_values")
Config = FrodConfig
Module = FrodModule
#: demo / documentation examples (non-trivial: λ moved off λ₀ and a random S)
EXAMPLES = {"FRoD": dict(init_weights=False, sparse_rate=0.1)}

#: the method's description (peftmath.methods._contract.Method)
METHOD = Method(
    peft_type=PEFT_TYPE, config=FrodConfig, module=FrodModule, spec="specs/frod.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=SUPPORTED_KINDS, additive=True, init_field="init_weights",
    examples=EXAMPLES, init_shared=init_shared, orientation_in_tensors=False, needs_record_for=lambda config: True,
    shared_key_pattern=SHARED_PATTERN, link_modules=link_modules,
)
