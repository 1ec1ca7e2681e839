"""Several adapters over one base model: a stacked forward, sequential merges, and the mixed batch.

:class:`AdapterSet` holds named adapters the way PEFT's ``PeftModel`` does: some are active, the
forward applies the active ones in order, merging goes in order and unmerging in reverse.

:func:`mixed_batch_forward` is PEFT's ``adapter_names`` inference: each row of a batch names its adapter
(or ``"__base__"`` for none). It is computed the way multi-adapter serving engines do it — the
rows are grouped by adapter and each adapter's factors are read once for its whole segment (Punica's
SGMV), instead of gathering a copy of ``A`` and ``B`` for every row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import array_api_compat

from ._array import as_compute, compute_dtype, namespace
from .adapter import Adapter
from .backends import backend_for
from .errors import ConfigError, ShapeError, UnsupportedError
from .layers import LayerKind

Array = Any

__all__ = ["AdapterSet", "mixed_batch_forward", "BASE"]

#: the adapter name PEFT uses for "no adapter" in ``adapter_names``
BASE = "__base__"


class AdapterSet:
    """Named adapters over one base model, with an ordered list of active ones.

    >>> s = AdapterSet()
    >>> s.add("a", adapter_a); s.add("b", adapter_b)          # doctest: +SKIP
    >>> s.set_active(["b", "a"]); s.forward(module, x, state)  # doctest: +SKIP
    """

    def __init__(self, adapters: Mapping[str, Adapter] | None = None) -> None:
        self.adapters: dict[str, Adapter] = {}
        self.active: list[str] = []
        #: the mixed batch's checked and prepared modules, by (adapter, module, base weight shape)
        self._prepared: dict[tuple, _Prepared] = {}
        for name, ad in (adapters or {}).items():
            self.add(name, ad)

    def add(self, name: str, adapter: Adapter, *, activate: bool = True) -> None:
        if name == BASE or not name:
            raise ConfigError(f"{name!r} cannot name an adapter (it is PEFT's name for the base model)")
        if name in self.adapters:
            raise ConfigError(f"an adapter named {name!r} is already loaded; delete it first")
        self.adapters[name] = adapter
        if activate:
            self.active.append(name)

    def delete(self, name: str) -> None:
        self._check(name)
        del self.adapters[name]
        self._prepared = {k: v for k, v in self._prepared.items() if k[0] != name}
        self.active = [n for n in self.active if n != name]

    def set_active(self, names: Sequence[str]) -> None:
        """Activate ``names``, in this order (PEFT applies active adapters in list order)."""
        for n in names:
            self._check(n)
        self.active = list(names)

    def deactivate(self, name: str) -> None:
        self._check(name)
        self.active = [n for n in self.active if n != name]

    def _check(self, name: str) -> None:
        if name not in self.adapters:
            raise ConfigError(f"no adapter named {name!r} is loaded; loaded: {', '.join(self.adapters) or '(none)'}")

    def forward(self, module: str, x: Array, state: Mapping[str, Array], **layer_kwargs: Any) -> Array:
        """The module's forward with every active adapter that adapts it, in order.

        Additive methods add their terms to the base output (each computed from the same input); a
        multiplicative or DoRA adapter in a stack of several is refused, because PEFT's stacked result
        for them depends on the running output (see specs/combine.md).
        """
        xp = namespace(x)
        active = [self.adapters[n] for n in self.active if module in self.adapters[n].params]
        if not active:
            raise ShapeError(f"{module}: no active adapter adapts this module (active: {self.active})")
        wkey, bkey = active[0].weight_keys(module, state)  # <module>.weight, an attention's in_proj_weight, ...
        if wkey not in state:
            raise ShapeError(f"{module}: the state has no {wkey!r}")
        weight, bias = state[wkey], state.get(bkey)
        mods = [ad.module(module, weight_shape=tuple(weight.shape)) for ad in active]
        if len(mods) == 1:
            return mods[0].forward(x, weight, bias, **layer_kwargs)
        for m in mods:
            if not m.description.stacks(m):
                from .methods.dora import DoraModule

                what = " (DoRA)" if isinstance(m, DoraModule) else (" (its merge needs a record)" if m.needs_record()
                                                                     else "")
                raise UnsupportedError(
                    f"{module}: stacking {m.peft_type}{what} with other adapters is not supported; merge them one "
                    f"after another with AdapterSet.merge instead"
                )
        layer = mods[0].layer
        conv = dict(layer_kwargs) if layer.kind.is_conv else {}
        base = layer.base_forward(x, weight, bias, xp, **conv)
        cd = compute_dtype(xp, base.dtype, *(m.param_dtype() for m in mods))
        total = as_compute(xp, base, cd)
        for m in mods:
            total = total + (as_compute(xp, m.forward(x, weight, bias, **layer_kwargs), cd) - as_compute(xp, base, cd))
        return as_compute(xp, total, base.dtype)

    def merge(self, state: Mapping[str, Array], *, names: Sequence[str] | None = None,
              records: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> dict[str, Array]:
        """Merge ``names`` (default: the active adapters) one after another, in order."""
        out = dict(state)
        for n in (self.active if names is None else names):
            self._check(n)
            rec: dict[str, Any] = {}
            out = self.adapters[n].merge(out, records=rec, **kwargs)
            if records is not None:
                records[n] = rec
        return out

    def unmerge(self, merged: Mapping[str, Array], *, names: Sequence[str] | None = None,
                records: Mapping[str, Mapping[str, Any]] | None = None, **kwargs: Any) -> dict[str, Array]:
        """Undo :meth:`merge`: the same adapters in reverse order (last merged, first unmerged)."""
        out = dict(merged)
        for n in reversed(list(self.active if names is None else names)):
            self._check(n)
            out = self.adapters[n].unmerge(out, records=(records or {}).get(n), **kwargs)
        return out

    def mixed_batch_forward(self, module: str, x: Array, state: Mapping[str, Array], adapter_names: Sequence[str],
                            **layer_kwargs: Any) -> Array:
        """PEFT's ``adapter_names`` forward for one module: row ``b`` uses adapter ``adapter_names[b]``.

        The set keeps what each adapter's mixed batch needs beyond the batch (its module bound and
        checked, its factors cast to the compute dtype and laid out for the products, the scaling folded
        into ``B``) from one call to the next, as PEFT's layers keep ``scaling``: an adapter whose
        arrays, config object or scale are replaced is prepared again, but a config edited in place or
        factors overwritten in place are not seen (delete the adapter and add it again). On NumPy the
        prepared factors are copies (``Aᵀ`` and ``s·Bᵀ`` in the compute dtype): the adapters' factor memory
        once more, held until the adapter is deleted."""
        for n in set(adapter_names) - {BASE}:
            self._check(n)
        return _mixed_batch(module, x, state, self.adapters, adapter_names, layer_kwargs, self._prepared)


def mixed_batch_forward(
    module: str,
    x: Array,
    state: Mapping[str, Array],
    adapters: Mapping[str, Adapter],
    adapter_names: Sequence[str],
    **layer_kwargs: Any,
) -> Array:
    """``y_b = base(x_b) + s_{a(b)} · B_{a(b)} A_{a(b)} x_b`` with ``a(b) = adapter_names[b]``.

    Computed segment by segment, as multi-adapter serving kernels (Punica's SGMV) do: the rows are
    grouped by adapter with one stable sort, each adapter's ``A`` and ``B`` are read once for its whole
    segment, at its own rank (heterogeneous ranks need no padding), and the terms return to batch order
    with one scatter; rows naming ``"__base__"`` (or an adapter that does not adapt this module) get the
    base output alone. A backend with its own mixed-batch kernel (CuPy's shrink/expand) is given the
    factors stacked once instead. Linear, Conv1D and Embedding layers; LoRA adapters without DoRA (PEFT
    refuses DoRA here too). Every term is formed in float32 (float64 for float64 inputs) and the sum with
    the base output is rounded once to its dtype.

    This function binds, checks and prepares every adapter it uses on each call; a server calling it
    step after step should hold the adapters in an :class:`AdapterSet`, whose
    :meth:`~AdapterSet.mixed_batch_forward` does that once per adapter and module.
    """
    return _mixed_batch(module, x, state, adapters, adapter_names, layer_kwargs, {})


class _Prepared:
    """One adapter's module for the mixed batch, checked once: the bound module, the identity of what it
    was bound from (the adapter object, its config object and scale, the module's parameter arrays: a
    replaced one makes a new binding) and, per compute dtype, the factors laid out for NumPy's products."""

    __slots__ = ("adapter", "config", "scale", "arrays", "module", "dtype", "numpy")

    def __init__(self, adapter: Adapter, module: str, m: Any) -> None:
        self.adapter, self.config, self.scale = adapter, adapter.config, adapter.scale
        self.arrays = tuple(adapter.params[module].values())
        self.module = m
        self.dtype = m.param_dtype()
        self.numpy: dict[Any, tuple[Array, Array]] = {}       # by compute dtype

    def current(self, adapter: Adapter, module: str) -> bool:
        """Whether ``adapter`` is still what this was prepared from (identity only: nothing is read)."""
        if adapter is not self.adapter or adapter.config is not self.config or adapter.scale != self.scale:
            return False
        arrays = adapter.params.get(module)
        return arrays is not None and len(arrays) == len(self.arrays) and all(
            a is b for a, b in zip(arrays.values(), self.arrays))


def _prepare(adapters: Mapping[str, Adapter], name: str, module: str, state: Mapping[str, Array], weight: Array,
             cache: dict) -> _Prepared:
    """Adapter ``name``'s module for the mixed batch, from ``cache`` when it is still current, else bound
    and checked (a LoRA module of a layer's weight, without DoRA) and stored there."""
    adapter = adapters[name]
    key = (name, module, tuple(weight.shape))
    hit = cache.get(key)
    if hit is not None and hit.current(adapter, module):
        return hit
    _check_layer_weight(module, state, adapters, [name])
    if not adapter.description.mixed_batch:
        raise UnsupportedError(f"{module}: the mixed batch supports LoRA adapters, not {adapter.peft_type}")
    m = adapter.module(module, weight_shape=tuple(weight.shape))
    if m.needs_record():
        raise UnsupportedError(f"{module}: adapter {name!r} uses DoRA, which the mixed batch cannot serve (as in PEFT)")
    cache[key] = entry = _Prepared(adapter, module, m)
    return entry


def _check_layer_weight(module: str, state: Mapping[str, Array], adapters: Mapping[str, Adapter],
                        names: Sequence[str]) -> None:
    """Refuse a module whose adapted tensor is not ``<module>.weight`` (an nn.MultiheadAttention projection,
    a raw parameter): PEFT's ``adapter_names`` refuses them too."""
    for n in names:
        wkey = adapters[n].weight_keys(module, state)[0]
        if wkey != f"{module}.weight":
            raise UnsupportedError(
                f"{module}: adapts {wkey!r}, not a layer's weight (an nn.MultiheadAttention projection or a raw "
                f"parameter); mixed batches serve Linear, Conv1D and Embedding layers only (PEFT refuses "
                f"adapter_names there too)")


def _mixed_batch(module: str, x: Array, state: Mapping[str, Array], adapters: Mapping[str, Adapter],
                 adapter_names: Sequence[str], layer_kwargs: Mapping[str, Any], cache: dict) -> Array:
    """:func:`mixed_batch_forward`, with the prepared modules kept in ``cache`` (an AdapterSet's)."""
    names = list(adapter_names)
    distinct = list(dict.fromkeys(names))
    adapting = [n for n in distinct if n in adapters and module in adapters[n].params]
    wkey = f"{module}.weight"
    weight = state.get(wkey)
    if weight is None:
        _check_layer_weight(module, state, adapters, adapting)
        raise ShapeError(f"{module}: the state has no {wkey!r}")
    bias = state.get(f"{module}.bias")
    where = f"mixed_batch_forward({module})"
    xp = namespace(x, weight, bias, where=where)
    if x.shape[0] != len(names):
        raise ShapeError(f"{module}: the batch has {x.shape[0]} rows but adapter_names has {len(names)} entries")
    unknown = sorted(set(distinct) - set(adapters) - {BASE})
    if unknown:
        raise ConfigError(f"{module}: adapter_names names {unknown}, which are not loaded ({', '.join(adapters)})")
    used = {n: _prepare(adapters, n, module, state, weight, cache) for n in adapting}
    if not used:
        owner = next((a for a in adapters.values() if module in a.params), None)
        if owner is None:
            raise ShapeError(f"{module}: no loaded adapter adapts this module")
        layer = owner.module(module, weight_shape=tuple(weight.shape)).layer
        return layer.base_forward(x, weight, bias, xp, **(layer_kwargs if layer.kind.is_conv else {}))
    mods = {n: p.module for n, p in used.items()}
    namespace(x, *(t for m in mods.values() for t in (m.A, m.B)), where=where)  # one library, one device
    layer = next(iter(mods.values())).layer
    if layer.kind.is_conv:
        raise UnsupportedError(f"{module}: the mixed batch covers Linear, Conv1D and Embedding layers, not {layer.kind.value}")
    embed_scale = layer_kwargs.get("embed_scale")
    embedding = layer.kind is LayerKind.EMBEDDING
    # on NumPy a Linear's base is one gemm over all the batch's tokens: NumPy's matmul on a (batch, T, in)
    # stack runs one matrix-vector product per row, each reading the whole weight (measured 6x slower at
    # 64 rows x 1 token on a Linear(4096, 4096)); the other libraries fold the leading axes themselves
    numpy_path = not embedding and _numpy_path(xp, x)
    flat = xp.reshape(x, (-1, x.shape[-1])) if numpy_path and x.ndim > 2 else x
    base = layer.base_forward(flat, weight, bias, xp)
    if flat is not x:
        base = xp.reshape(base, (*x.shape[:-1], base.shape[-1]))
    cd = compute_dtype(xp, base.dtype, *{p.dtype for p in used.values()})
    order = list(mods)
    backend = backend_for(xp)
    if not embedding and _has_gather_kernel(backend):
        y = _gather_kernel(backend, xp, x, base, mods, order, names, layer, cd)
        if y is not None:
            return y
    if numpy_path:
        factors = [_numpy_factors(used[n], cd) for n in order]
        term = _numpy_terms(x, factors, {n: i for i, n in enumerate(order)}, names, layer, cd)
    else:
        term = _segmented_terms(xp, x, mods, order, names, layer, cd, embed_scale)
    return as_compute(xp, as_compute(xp, base, cd) + xp.reshape(term, base.shape), base.dtype)


def _numpy_path(xp: Any, x: Array) -> bool:
    """Whether the mixed batch takes the NumPy path (:func:`_numpy_terms`): NumPy arrays."""
    import numpy as np

    return array_api_compat.is_numpy_namespace(xp) and type(x) is np.ndarray


def _numpy_factors(p: _Prepared, cd: Any) -> tuple[Array, Array]:
    """Adapter ``p``'s factors for :func:`_numpy_terms`, made once per compute dtype: ``Aᵀ`` as ``(in, r)``
    and ``s·Bᵀ`` as a C-contiguous ``(r, out)`` (the scaling folded into ``B`` once, rounded once in
    ``cd``: the term differs from ``(s·h) Bᵀ`` by float round-off only).

    ``Aᵀ`` is the transpose view of a C-contiguous ``A`` at ranks up to 8, else a C-contiguous copy of
    ``Aᵀ``: a library preference, not math (OpenBLAS 0.3 on x86 runs ``X Aᵀ`` 2-3x faster from ``A``'s
    own layout at r = 8 with a few rows, and up to 3x slower at r >= 16 with 4 rows or more)."""
    import numpy as np

    got = p.numpy.get(cd)
    if got is None:
        m = p.module
        A = np.asarray(m.A, dtype=cd)
        At = np.ascontiguousarray(A).T if m.r <= 8 else np.ascontiguousarray(A.T)
        sBt = np.ascontiguousarray((np.asarray(m.B, dtype=cd) * np.asarray(m.scaling, dtype=cd)).T)
        got = p.numpy[cd] = (At, sBt)
    return got


#: :func:`_segment_terms` keeps each BLAS call of a segment of ``k`` tokens at rank ``r`` under this many
#: multiply-adds where it can: a library preference, not math. OpenBLAS 0.3 (x86-64, AVX-512) runs products up
#: to 10⁶ multiply-adds with its small-matrix kernels, in the calling thread and without packing its operands;
#: above that it copies both factors into packed panels on every call, which for a few rows costs more than the
#: products. So the first product ``X Aᵀ`` is summed over slices of the input dimension (the factor is read once,
#: unpacked: measured on 2 cores, 16 rows at r = 64 on Linear(4096, 4096) in 83 µs against 242 µs whole, and
#: 1.5x-3.1x faster at 8-64 rows and r = 32-64), and the second ``H (s·Bᵀ)`` is computed in slices of the output
#: columns only when they are wide (16 rows at r = 16: 29 µs against 50 µs whole; but 16 rows at r = 64 in slices
#: of 976 columns take 164 µs against 113 µs whole: the packed operand there is the small ``H``).
_SMALL_GEMM = 1_000_000
#: the narrowest slice worth a call of its own, of the input dimension (first product) and of the output columns
#: (second product); below it the product is one call (packing then costs less than many narrow calls)
_MIN_SLICE = (128, 1024)


def _slice(rows: int, r: int, dim: int, least: int) -> int:
    """The width of the slices of a dimension of ``dim`` in a product of ``rows`` rows at rank ``r``
    (:data:`_SMALL_GEMM`); ``dim`` itself when the product is small enough whole, or its slices would be narrower
    than ``least``."""
    width = _SMALL_GEMM // max(1, rows * r)
    return dim if width >= dim or width < least else width


def _segment_terms(xs: Array, At: Array, sBt: Array, ys: Array) -> None:
    """``ys = (xs Aᵀ)(s·Bᵀ)`` for one adapter's contiguous rows ``xs`` (``k`` tokens, ``k ≥ 2``), written into
    ``ys`` (NumPy), in BLAS calls of at most :data:`_SMALL_GEMM` multiply-adds where the slices stay wide enough
    (:func:`_slice`). Summing the first product over slices of the input dimension changes the order of its
    float additions (round-off only); each output column's dot products over the rank are the same in any slice."""
    import numpy as np

    k, inn = xs.shape
    r, out = At.shape[1], sBt.shape[1]
    w = _slice(k, r, inn, _MIN_SLICE[0])
    if w >= inn:
        h = np.matmul(xs, At)
    else:
        h = np.matmul(xs[:, :w], At[:w])
        part = np.empty_like(h)
        for c in range(w, inn, w):
            h += np.matmul(xs[:, c:c + w], At[c:c + w], out=part)
    w = _slice(k, r, out, _MIN_SLICE[1])
    if w >= out:
        np.matmul(h, sBt, out=ys)
    else:
        for c in range(0, out, w):
            np.matmul(h, sBt[:, c:c + w], out=ys[:, c:c + w])


def _numpy_terms(x: Array, factors: Sequence[tuple[Array, Array]], at: Mapping[str, int], names: Sequence[str],
                 layer: Any, cd: Any) -> Array:
    """:func:`_segmented_terms` for NumPy arrays (Linear and Conv1D layers), from the factors of
    :func:`_numpy_factors` (``factors[i]`` for the adapter ``at`` maps to ``i``; a name ``at`` lacks gets
    no term).

    One stable ``argsort`` of the rows' adapter indices groups them; each adapter then gathers its ``k`` rows
    (``take``, cast once to ``cd``; a view when the batch is already grouped), multiplies them as ``X`` (``k·T``
    tokens): ``H = X Aᵀ`` and ``Y = H (s·Bᵀ)`` (a matrix-vector product for a one-token segment, longer ones in
    small BLAS calls: :func:`_segment_terms`), and puts ``Y`` back at its rows of the result (written in place
    when the batch is grouped, and for an adapter with one row). Rows without an adapter get zeros. Gathering and
    scattering per adapter keeps each segment's rows in cache from the gather to the scatter: measured (64 rows,
    Linear(4096, 4096), one process, interleaved) against one gather of the whole batch before the products and
    one scatter after them, 0.83x-0.95x of the time for 4 adapters of ranks 8-64, 0.75x-0.84x for one r = 64
    adapter, 0.95x for 64 adapters, 1.0x-1.03x for 16; the same numbers.

    Returns the terms as ``(batch, tokens, out)`` in ``cd``."""
    import numpy as np

    batch, inn, out = x.shape[0], layer.in_features, layer.out_features
    per_row = math.prod(x.shape[1:]) // inn                 # tokens per batch row
    n = len(factors)
    codes = np.fromiter((at.get(nm, n) for nm in names), dtype=np.intp, count=batch)
    counts = np.bincount(codes, minlength=n + 1).tolist()
    rows = np.reshape(x, (batch, per_row, inn))
    grouped = batch == 1 or not bool((codes[1:] < codes[:-1]).any())
    order = None if grouped else np.argsort(codes, kind="stable")
    term = np.empty((batch, per_row, out), dtype=cd)
    lo = 0
    for (At, sBt), k in zip(factors, counts):
        if not k:
            continue
        hi = lo + k
        scatter = not grouped and k > 1
        if scatter:
            idx = order[lo:hi]
            xs, ys = rows.take(idx, axis=0).astype(cd, copy=False), np.empty((k, per_row, out), dtype=cd)
        else:  # the rows in place (a grouped batch, or one row: views, nothing to put back)
            at_ = slice(lo, hi) if grouped else int(order[lo])
            xs, ys = rows[at_].astype(cd, copy=False), term[at_]
        tokens = k * per_row
        if tokens == 1:                                     # one token: two matrix-vector products
            np.matmul(np.matmul(xs.reshape(inn), At), sBt, out=ys.reshape(out))
        else:
            _segment_terms(xs.reshape(tokens, inn), At, sBt, ys.reshape(tokens, out))
        if scatter:
            term[idx] = ys
        lo = hi
    if lo < batch:                                          # rows on the base model only
        if grouped:
            term[lo:] = 0
        else:
            term[order[lo:]] = 0
    return term


def _segments(names: Sequence[str], order: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """The batch rows grouped by adapter, in one pass: ``rows[i]`` lists the rows of ``order[i]`` in batch
    order, and ``inverse[b]`` is row ``b``'s position once the groups are laid end to end (``order[0]``'s
    rows, then ``order[1]``'s, ..., rows without an adapter last)."""
    at = {n: i for i, n in enumerate(order)}
    rows: list[list[int]] = [[] for _ in order]
    rest: list[int] = []
    for b, n in enumerate(names):
        (rows[at[n]] if n in at else rest).append(b)
    inverse = [0] * len(names)
    for i, b in enumerate(b for group in rows + [rest] for b in group):
        inverse[b] = i
    return rows, inverse


def _segmented_terms(xp: Any, x: Array, mods: Mapping[str, Any], order: Sequence[str], names: Sequence[str],
                     layer: Any, cd: Any, embed_scale: Any) -> Array:
    """Every row's adapter term ``s·B A x_b``, one segment per adapter (as Punica's SGMV does).

    The rows are grouped by adapter in one pass over ``names``. Each adapter takes its rows ``X`` (``k·T``
    tokens: a slice of ``x`` when they are consecutive, else one ``take`` of just those rows; on torch a
    slice of one ``take`` of all the adapters' rows, grouped) and reads its factors once, in their stored
    layout, for the whole segment: ``H = X Aᵀ`` (``(k·T, r)``, at the adapter's own rank: no padding, no
    per-row copies of ``A`` and ``B``; formed as ``(A Xᵀ)ᵀ`` on NumPy, whose BLAS runs that order faster)
    and ``Y = (s·H) Bᵀ`` (``(k·T, out)``; the scaling goes on the small ``H``). The segments' terms are
    concatenated (rows without an adapter get zeros, last) and put back in batch order with one ``take``,
    skipped when the batch is already grouped. No permuted copy of the whole batch is made on the way in
    (except on torch): the per-segment gathers are small and short-lived (a batch-sized temporary per
    call, freed and faulted in again each time, made the 16-adapter benchmark several times slower on
    NumPy). An Embedding's ``X Aᵀ`` gathers the ids' columns of ``A``.

    Returns the terms as ``(batch, tokens, out)`` in ``cd``."""
    rows, inverse = _segments(names, order)
    dev = array_api_compat.device(x)
    batch = x.shape[0]
    out = layer.out_features
    embedding = layer.kind is LayerKind.EMBEDDING
    per_row = math.prod(x.shape[1:]) // (1 if embedding else layer.in_features)   # tokens per batch row
    # Two library preferences, not math (the same dot products either way): OpenBLAS (NumPy) runs A Xᵀ up
    # to 3x faster than X Aᵀ for a few rows at r >= 32, and a batch-sized gather buffer allocated and freed
    # every call costs NumPy more than small per-segment gathers; torch's CPU BLAS prefers X Aᵀ, and its
    # per-call overhead makes one gather of all the adapters' rows cheaper than one per segment.
    torch_like = array_api_compat.is_torch_namespace(xp)
    flat = [b for group in rows for b in group]                 # the adapters' rows, grouped
    if torch_like:
        grouped = flat == list(range(len(flat)))
        src = x if grouped else xp.take(x, backend_for(xp).from_host(_np_int(flat), xp, dev), axis=0)
    else:
        scattered = [b for g in rows if g and g[-1] - g[0] != len(g) - 1 for b in g]
        # the scattered groups' row indices go to the device in one transfer, each group a slice of it
        index = backend_for(xp).from_host(_np_int(scattered), xp, dev) if scattered else None
    parts = []
    at = 0             # torch: the group's offset in src; else its offset in index
    for n, group in zip(order, rows):
        if not group:
            continue
        if torch_like:
            seg = src[at:at + len(group), ...]
            at += len(group)
        elif group[-1] - group[0] == len(group) - 1:       # consecutive rows: a view
            seg = x[group[0]:group[-1] + 1, ...]
        else:
            seg = xp.take(x, index[at:at + len(group)], axis=0)
            at += len(group)
        m = mods[n]
        A = as_compute(xp, m.A, cd)                                                            # (r, in)
        if embedding:
            h = xp.matrix_transpose(xp.take(A, xp.reshape(seg, (-1,)), axis=1))                # (k·T, r)
        else:
            seg = xp.reshape(as_compute(xp, seg, cd), (-1, layer.in_features))                # (k·T, in)
            if torch_like:
                h = xp.matmul(seg, xp.matrix_transpose(A))                                     # (k·T, r)
            else:
                h = xp.matrix_transpose(xp.matmul(A, xp.matrix_transpose(seg)))                # (k·T, r)
        parts.append(xp.matmul(h * m.scaling, xp.matrix_transpose(as_compute(xp, m.B, cd))))  # (k·T, out)
    rest = batch - len(flat)
    if rest:
        parts.append(xp.zeros((rest * per_row, out), dtype=cd, device=dev))
    term = parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
    term = xp.reshape(term, (batch, per_row, out))
    if inverse != list(range(batch)):
        term = xp.take(term, backend_for(xp).from_host(_np_int(inverse), xp, dev), axis=0)
    if embedding and embed_scale is not None:
        term = term * embed_scale
    return term


def _has_gather_kernel(backend: Any) -> bool:
    """Whether the backend brings its own mixed-batch kernel (``lora_gather_`` overridden: CuPy's
    shrink/expand kernels); the stacks it reads are then worth building."""
    from .backends import ArrayAPIBackend

    return type(backend).lora_gather_ is not ArrayAPIBackend.lora_gather_


def _gather_kernel(backend: Any, xp: Any, x: Array, base: Array, mods: Mapping[str, Any], order: Sequence[str],
                   names: Sequence[str], layer: Any, cd: Any) -> Array | None:
    """The backend's mixed-batch kernel over the factors stacked once into ``(N + 1, r_max, in)`` and
    ``(N + 1, out, r_max)`` (ranks zero-padded, a zero adapter last for rows without one); None when
    the kernel declines."""
    r_max = max(m.r for m in mods.values())
    inn, out = layer.in_features, layer.out_features
    dev = array_api_compat.device(x)

    def padded(a: Array, shape: tuple[int, int]) -> Array:
        full = xp.zeros(shape, dtype=cd, device=dev)
        full[:a.shape[0], :a.shape[1]] = as_compute(xp, a, cd)
        return full

    A_stack = xp.stack([padded(mods[n].A, (r_max, inn)) for n in order] + [xp.zeros((r_max, inn), dtype=cd, device=dev)])
    B_stack = xp.stack([padded(as_compute(xp, mods[n].B, cd) * mods[n].scaling, (out, r_max)) for n in order]
                       + [xp.zeros((out, r_max), dtype=cd, device=dev)])
    zero = len(order)
    idx = backend.from_host(_np_int([order.index(n) if n in mods else zero for n in names]), xp, dev)
    xc = xp.reshape(as_compute(xp, x, cd), (x.shape[0], -1, inn))
    y = xp.reshape(as_compute(xp, base, cd), (x.shape[0], -1, out))
    if not backend.lora_gather_(y, xc, A_stack, B_stack, idx):  # y: this call's own copy of the base output
        return None
    return as_compute(xp, xp.reshape(y, base.shape), base.dtype)


def _np_int(values: list[int]):
    import numpy as np

    return np.asarray(values, dtype=np.int64)
