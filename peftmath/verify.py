"""Is a merged model what its base plus its adapters should be? (``peftmath verify`` and ``peftmath diff``)

Both commands stream their models one tensor at a time (:func:`peftmath.io.stream.open_model`), as
``peftmath merge`` does: peak memory is about one tensor (in float64) plus the adapters.

:func:`verify` plans the merge of BASE with the adapters (:func:`peftmath.io.stream.plan`) and, for each
adapted group (a weight and its bias), computes the **exact merge** with the merge's own per-group
computation (:func:`peftmath.io.stream.compute_group`) in float64, from the stored base tensors and the
adapter tensors converted exactly to float64. MERGED's tensor ``m`` is compared with it elementwise.

The error bound
---------------
Notation, per element: ``x`` the exact value (float64 from the stored inputs), ``W`` the stored base
value, ``d`` MERGED's dtype with unit roundoff ``u_d`` (``2^-24`` float32, ``2^-11`` float16, ``2^-8``
bfloat16, ``2^-53`` float64) and ``eta_d`` half its smallest subnormal (underflow); ``c`` the compute
dtype peftmath merges in (float32 for float32 and half-precision models, float64 for float64), unit
roundoff ``u_c``. For each adapter step ``i`` of the group, ``|dW_i|`` is the delta formed from the
*absolute values* of every factor (``|s|·|B||A|`` for LoRA; the same elementwise majorant for AdaLoRA,
LoHa, LoKr, VeRA) and ``k_i`` the sum of its factors' contraction lengths (``2r`` for LoRA: a bound on
the number of roundings in one entry of ``dW``). ``S = |W| + sum_i |dW_i|``.

* Additive methods (LoRA, rsLoRA, AdaLoRA, LoHa, LoKr, VeRA): peftmath forms ``W + dW`` in ``c`` (a dot
  product of length ``k_i`` plus the scaling and the add: at most ``k_i + 2`` roundings, each of
  relative size ``u_c``, on terms bounded by ``S``), then rounds once to ``d`` (float32: no second
  rounding, the compute dtype is the stored one). Standard forward error analysis gives::

      |m - x| <= u_d·|x| + (1 + u_d)·K·u_c·S + eta_d,         K = sum_i (k_i + 2)

  (``u_d·|x|`` is dropped when ``d`` is the compute dtype.)
* ``--peft-compat``: the exact merge is PEFT's math where a method's ``peft_compat=True`` departs from the
  default (an ``nn.MultiheadAttention`` out-projection's LoRA change counts twice either way, as PEFT 0.21.2
  merges it, specs/lora.md §12). PEFT's order rounds ``dW`` to the factors' (or the weight's) half-precision dtype before the add, so one more rounding of size ``u_d·|dW| <= u_d·sum_i |dW_i|`` enters: the bound gets
  ``+ (1 + u_d)·u_d·sum_i |dW_i| + eta_d``. When ``|dW|`` is comparable to ``|W|`` this is about twice
  the default bound; a merge made by PEFT itself in bfloat16 may exceed the default bound and pass this
  one.
* DoRA: ``x = g·V`` with ``V = W + dW`` and the per-row factor ``g = magnitude / ||V||``. ``V`` is formed
  as above (error ``K·u_c·S``); the norm of a row of length ``n`` in ``c`` has relative error at most
  ``(n/2 + 2)·u_c`` plus the propagated ``K·u_c·||S||/||V||``, and the scaling two more roundings. With
  ``G = max |x|/|V|`` over the tensor (``>= |g|`` of every row)::

      |m - x| <= u_d·|x| + (1 + u_d)·u_c·(G·K·S + (n + K·R + 4)·|x|) + eta_d

  where ``R`` is the largest row ratio ``||S||/||V||``; ``n`` is taken as the longest reduction of the
  weight (an over-estimate for either norm axis).
* IA3 (``x = W·l``): one product, ``|m - x| <= u_d·|x| + (1 + u_d)·2·u_c·|x| + eta_d``.
* OFT / BOFT (``x = (W R)·s``, ``R`` orthogonal, ``|R_jk| <= 1``): each output is a dot product of
  length ``n`` (the rotated dimension) per rotation factor, so with ``q`` factors (1 for OFT) and the
  Cayley map computed to ``O(n·u_c)``::

      |m - x| <= u_d·|x| + (1 + u_d)·(q·(2n + 8))·u_c·L + eta_d,    L = row L1 norm of |W|·|s|

  This one rests on the Cayley solve being accurate to ``O(n·u_c)`` (``I + Q`` with ``Q`` skew has all
  singular values ``>= 1``, so it is well conditioned); it is a first-order bound, not a proof.

The bound of each element is computed in float64 and an element passes when ``|m - x| <= bound``.
Tensors a step replaces (``modules_to_save``, trained biases) are bounded by one rounding to ``d``.
Tensors no adapter touches must be **bit-identical** to BASE (cast to ``dtype`` when one is given).
A NaN in MERGED fails unless the exact value is NaN too.

:func:`diff` compares two models: per tensor the max absolute and relative difference, tensors only in
one, and dtype or shape changes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ._array import dtype_name
from .errors import UnsupportedError
from .io.stream import Model, compute_group, plan

__all__ = ["TensorCheck", "VerifyReport", "verify", "diff", "unit_roundoff", "exact_adapter"]

_F64 = np.dtype(np.float64)


def unit_roundoff(dtype: Any) -> tuple[float, float]:
    """``(u, eta)`` of a floating dtype: the unit roundoff (half the machine epsilon) and half the
    smallest subnormal (the absolute error of rounding near zero).

    >>> unit_roundoff(np.float32)
    (5.960464477539063e-08, 7.006492321624085e-46)
    """
    name = dtype_name(dtype)
    table = {"float64": (2.0 ** -53, 2.0 ** -1075), "float32": (2.0 ** -24, 2.0 ** -150),
             "float16": (2.0 ** -11, 2.0 ** -25), "bfloat16": (2.0 ** -8, 2.0 ** -134)}
    if name not in table:
        return 0.0, 0.0
    return table[name]


def exact_adapter(ad: Any, transform: Any = None) -> Any:
    """A shallow copy of adapter ``ad`` whose tensors are float64 copies (each exactly its stored value),
    passed through ``transform`` (e.g. ``np.abs``) when given."""
    fn = transform or (lambda a: a)

    def conv(a: Any) -> np.ndarray:
        return fn(np.asarray(a).astype(np.float64))

    out = copy.copy(ad)
    out.params = {m: {s: conv(a) for s, a in p.items()} for m, p in ad.params.items()}
    out.shared = {k: conv(v) for k, v in ad.shared.items()}
    out.other = {k: conv(v) for k, v in ad.other.items()}
    return out


@dataclass
class TensorCheck:
    """The verdict on one tensor."""

    key: str
    status: str  # "ok", "exceeds bound", "untouched but differs", "missing", "only in MERGED", "dtype", "shape"
    kind: str  # "merged", "replaced", "untouched", "-"
    dtype: str = ""
    shape: list[int] = field(default_factory=list)
    max_abs: float | None = None
    max_rel: float | None = None
    bound: float | None = None  # the bound at the worst element (largest error / bound ratio)
    ratio: float | None = None  # max over elements of |m - x| / bound (<= 1 passes)
    worst_index: list[int] | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "identical")


@dataclass
class VerifyReport:
    checks: list[TensorCheck]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[TensorCheck]:
        return [c for c in self.checks if not c.ok]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite numbers are the strings ``"inf"`` / ``"nan"`` (strict JSON)."""
        def clean(v: Any) -> Any:
            return v if not isinstance(v, float) or math.isfinite(v) else str(v)

        tensors = [{k: clean(v) for k, v in asdict(c).items()} for c in self.checks]
        return {"ok": self.ok, "tensors": tensors, "failures": [c.key for c in self.failures()]}


def _errors(m: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(|m - x| with NaN where only one side is NaN -> inf, max abs, max rel)."""
    m64 = m.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(m64 - x)
        both_nan = np.isnan(m64) & np.isnan(x)
        same_inf = np.isinf(m64) & (m64 == x)
        err = np.where(both_nan | same_inf, 0.0, err)
        err = np.where(np.isnan(err), np.inf, err)
        rel = err / np.where(np.abs(x) > 0, np.abs(x), np.inf)
        rel = np.where((err > 0) & (x == 0), np.inf, rel)
    max_abs = float(err.max()) if err.size else 0.0
    max_rel = float(np.nanmax(rel)) if rel.size else 0.0
    return err, max_abs, max_rel


def _row_ratio(S: np.ndarray, V: np.ndarray, axis: int) -> float:
    """The largest ratio ``||S_row|| / ||V_row||`` over the rows along ``axis`` (0 when V's row is zero)."""
    s = np.moveaxis(S, axis, 0).reshape(S.shape[axis], -1)
    v = np.moveaxis(V, axis, 0).reshape(V.shape[axis], -1)
    ns, nv = np.linalg.norm(s, axis=1), np.linalg.norm(v, axis=1)
    return float(np.max(np.where(nv > 0, ns / np.where(nv > 0, nv, 1.0), 0.0), initial=0.0))


def _contraction(params: Mapping[str, Any]) -> int:
    """Sum over the factor tensors of their smallest dimension (>= the roundings of one delta entry)."""
    return int(sum(min(np.shape(a)) for a in params.values() if np.ndim(a) >= 2))


def _bound_terms(base: Model, pl: Any, adapters: Sequence[Any], abs_adapters: Sequence[Any], wkey: str,
                 exact: Mapping[str, np.ndarray], u_c: float, peft_compat: bool, u_d: float) -> dict[str, np.ndarray]:
    """The compute-error term of the bound (everything but ``u_d·|x| + eta_d``) for each tensor of a group."""
    W = np.abs(base.read(wkey).astype(np.float64))
    x = exact[wkey]
    shape = W.shape
    n = max(math.prod(shape) // max(shape[0], 1), math.prod(shape) // max(shape[-1], 1)) if W.ndim else 1
    deltas = np.zeros(shape)
    K = 0.0
    dora = iso = rot = False
    q = 0
    for st in pl.groups[wkey]:
        if st.module is None:
            continue
        mod = st.mod
        desc = mod.description
        if desc.additive:
            amod = abs_adapters[st.adapter].module(st.module, weight_shape=shape, kind=st.kind,
                                                   model_type=base.model_type)
            deltas = deltas + np.abs(np.asarray(amod.delta_weight(peft_compat=peft_compat)))
            K += _contraction(mod.params) + 2
            dora = dora or mod.needs_record()
        elif desc.scale:
            iso = True
        elif desc.rotation:
            rot = True
            q += mod.rotation_factors()
        else:
            raise UnsupportedError(f"verify: {st.module}: no error bound is derived for {desc.peft_type} "
                                   f"(neither additive, scale nor rotation); it cannot be verified")
    S = W + deltas
    term = K * u_c * S
    if dora:
        V = base.read(wkey).astype(np.float64)
        for st in pl.groups[wkey]:
            if st.module is not None and st.mod.description.additive:
                fmod = exact_adapter(adapters[st.adapter]).module(st.module, weight_shape=shape, kind=st.kind,
                                                                  model_type=base.model_type)
                V = V + np.asarray(fmod.delta_weight())
        absV = np.abs(V)
        with np.errstate(divide="ignore", invalid="ignore"):
            G = float(np.max(np.where(absV > 0, np.abs(x) / np.where(absV > 0, absV, 1.0), 0.0), initial=0.0))
        R = max(_row_ratio(S, V, 0), _row_ratio(S, V, -1))
        term = u_c * (G * K * S + (n + K * R + 4) * np.abs(x))
    if iso:
        term = term + 2 * u_c * np.abs(x)
    if rot:
        mat = W.reshape(shape[0], -1) if W.ndim >= 2 else W.reshape(1, -1)
        L = np.broadcast_to(mat.sum(axis=1, keepdims=True), mat.shape).reshape(shape)
        scale = max((st.mod.output_scale_max() for st in pl.groups[wkey] if st.module is not None), default=1.0)
        term = term + q * (2 * n + 8) * u_c * L * max(scale, 1.0) + 8 * u_c * np.abs(x)
    if peft_compat:
        term = term + u_d * deltas
    out = {wkey: term}
    bkey = pl.group_bias.get(wkey)
    if bkey is not None:  # bias: a few roundings of the bias and its update (lora_bias, IA3 scaling)
        xb = exact[bkey]
        out[bkey] = (K + 8) * u_c * (np.abs(xb) + np.abs(base.read(bkey).astype(np.float64)))
    return out


def _check_one(key: str, kind: str, m: np.ndarray, x: np.ndarray, term: np.ndarray | float, dtype: Any,
               compute_dtype: Any) -> TensorCheck:
    u_d, eta = unit_roundoff(dtype)
    u_c, _ = unit_roundoff(compute_dtype)
    err, max_abs, max_rel = _errors(m, x)
    rounding = u_d * np.abs(x) if dtype_name(dtype) != dtype_name(compute_dtype) else 0.0
    bound = rounding + (1 + u_d) * term + eta
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / bound)
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    c = TensorCheck(key, "ok", kind, dtype_name(m.dtype), list(m.shape), max_abs, max_rel)
    if ratio.size:
        i = int(np.argmax(ratio))
        idx = np.unravel_index(i, ratio.shape)
        c.ratio = float(ratio.reshape(-1)[i])
        c.bound = float(np.broadcast_to(bound, ratio.shape)[idx])
        c.worst_index = [int(j) for j in idx]
        if c.ratio > 1:
            c.status = "exceeds bound"
            c.detail = (f"at {tuple(c.worst_index)}: merged {float(m[idx])!r}, exact {float(x[idx])!r}, "
                        f"|error| {float(err[idx]):.3g} > bound {c.bound:.3g}")
    return c


def _compare_layout(key: str, a: Model, b: Model, want_dtype: Any) -> TensorCheck | None:
    """A check for a missing tensor or a dtype / shape change (None when the layouts agree)."""
    if key not in b:
        return TensorCheck(key, "missing", "-", dtype_name(want_dtype), list(a.shape(key)),
                           detail=f"not in {b.path}")
    if b.shape(key) != a.shape(key):
        return TensorCheck(key, "shape", "-", dtype_name(b.dtype(key)), list(b.shape(key)),
                           detail=f"shape {list(b.shape(key))}, expected {list(a.shape(key))}")
    if b.dtype(key) != want_dtype:
        return TensorCheck(key, "dtype", "-", dtype_name(b.dtype(key)), list(b.shape(key)),
                           detail=f"dtype {dtype_name(b.dtype(key))}, expected {dtype_name(want_dtype)}")
    return None


def verify(base: Model, adapters: Sequence[Any], merged: Model, *, peft_compat: bool = False,
           layer_kinds: Mapping[str, Any] | None = None, dtype: Any = None,
           names: Sequence[str] | None = None) -> VerifyReport:
    """Check ``merged`` against ``base`` merged with ``adapters`` (in order), tensor by tensor.

    ``dtype``: the dtype MERGED's floating-point tensors should have (``peftmath merge --dtype``);
    None keeps BASE's. See the module docstring for the bound. Shapes and layer kinds are checked by
    :func:`~peftmath.io.stream.plan` first (a :class:`~peftmath.errors.ShapeError` names the adapter).
    """
    pl = plan(base, adapters, dtype=np.dtype(dtype) if dtype is not None else None, layer_kinds=layer_kinds,
              names=names)
    exact_ads = [exact_adapter(ad) for ad in adapters]
    abs_ads = [exact_adapter(ad, np.abs) for ad in adapters]
    pl64 = plan(base, exact_ads, layer_kinds=layer_kinds, names=names)
    checks: list[TensorCheck] = []
    done: dict[str, tuple[np.ndarray, np.ndarray | float]] = {}
    for fname in base.files:
        for key in base.ordered(fname):
            op = pl.ops[key]
            want = _dtype(op.dst_dtype)
            bad = _compare_layout(key, base, merged, want)
            if bad is not None:
                checks.append(bad)
                continue
            m = merged.read(key)
            if op.operation in ("copy", "cast"):
                ref = base.read(key).astype(want, copy=False)
                if m.tobytes() != ref.tobytes():
                    c = TensorCheck(key, "untouched but differs", "untouched", dtype_name(m.dtype), list(m.shape))
                    _fill_diff(c, ref, m)
                    c.detail = f"no adapter touches it, yet {c.detail} of BASE"
                    checks.append(c)
                else:
                    checks.append(TensorCheck(key, "ok", "untouched", dtype_name(m.dtype), list(m.shape), 0.0, 0.0))
                continue
            if op.operation == "replace":
                x = np.asarray(pl64.replaced[key], dtype=np.float64)
                checks.append(_check_one(key, "replaced", m, x, 0.0, want, _F64))  # one rounding to want
                continue
            wkey = pl.key_group[key]
            if key not in done:
                exact = compute_group(base, pl64, exact_ads, wkey, work=_F64, peft_compat=peft_compat)
                u_c = unit_roundoff(_compute_dtype(pl.ops[wkey].work_dtype))[0]
                u_d = unit_roundoff(want)[0]
                terms = _bound_terms(base, pl, adapters, abs_ads, wkey, exact, u_c, peft_compat, u_d)
                for k in exact:
                    done[k] = (exact[k], terms[k])
            x, term = done.pop(key)
            checks.append(_check_one(key, "merged", m, x, term, want, _compute_dtype(op.work_dtype)))
    for key in merged.keys():
        if key not in base:
            checks.append(TensorCheck(key, "only in MERGED", "-", dtype_name(merged.dtype(key)),
                                      list(merged.shape(key)), detail=f"not in {base.path}"))
    return VerifyReport(checks)


def diff(a: Model, b: Model) -> VerifyReport:
    """Per tensor of ``a`` and ``b``: ``"identical"`` (same bytes), ``"differs"`` (max abs / rel
    difference, relative to ``|a|``), ``"dtype"`` or ``"shape"`` changes, ``"only in A"`` / ``"only in B"``."""
    checks: list[TensorCheck] = []
    for key in a.keys():
        if key not in b:
            checks.append(TensorCheck(key, "only in A", "-", dtype_name(a.dtype(key)), list(a.shape(key))))
            continue
        if a.shape(key) != b.shape(key):
            checks.append(TensorCheck(key, "shape", "-", dtype_name(b.dtype(key)), list(b.shape(key)),
                                      detail=f"shape {list(a.shape(key))} -> {list(b.shape(key))}"))
            continue
        x, y = a.read(key), b.read(key)
        c = TensorCheck(key, "identical", "-", dtype_name(y.dtype), list(y.shape))
        if x.dtype != y.dtype:
            c.status = "dtype"
            c.detail = f"dtype {dtype_name(x.dtype)} -> {dtype_name(y.dtype)}"
            try:
                _, c.max_abs, c.max_rel = _errors(y, x.astype(np.float64))
            except (TypeError, ValueError):  # not a number type
                pass
        elif x.tobytes() == y.tobytes():
            c.max_abs = c.max_rel = 0.0
            checks.append(c)
            continue
        else:
            c.status = "differs"
            _fill_diff(c, x, y)
        checks.append(c)
    for key in b.keys():
        if key not in a:
            checks.append(TensorCheck(key, "only in B", "-", dtype_name(b.dtype(key)), list(b.shape(key))))
    return VerifyReport(checks)


def _fill_diff(c: TensorCheck, ref: np.ndarray, m: np.ndarray) -> None:
    """Fill ``c``'s max abs / rel difference of ``m`` from ``ref`` (floats) and the count of elements
    whose bytes differ."""
    n = int(np.count_nonzero(np.any(ref.reshape(-1).view(np.uint8).reshape(ref.size, -1)
                                    != m.reshape(-1).view(np.uint8).reshape(m.size, -1), axis=1))) if m.size else 0
    c.detail = f"{n} of {m.size} elements differ from those"
    try:
        _, c.max_abs, c.max_rel = _errors(m, ref.astype(np.float64))
    except (TypeError, ValueError):  # not a number type
        pass


def _compute_dtype(work: str) -> np.dtype:
    """The dtype the methods compute in for a work dtype: float64 for float64, else float32 (half-precision
    weights are merged in float32 and rounded once)."""
    return _F64 if work == "float64" else np.dtype(np.float32)


def _dtype(name: str) -> np.dtype:
    from .io.stream import _np_dtype

    return _np_dtype(name)

