"""Several adapters over one base model: a stacked forward, sequential merges, and the mixed batch.

:class:`AdapterSet` holds named adapters the way PEFT's ``PeftModel`` does: some are active, the
forward applies the active ones in order, merging goes in order and unmerging in reverse.

:func:`mixed_batch_forward` is PEFT's ``adapter_names`` inference: each row of a batch names its adapter
(or ``"__base__"`` for none). It is computed the way multi-adapter serving engines do it — the
factors of all adapters are stacked once (ranks zero-padded to the largest), each row *gathers* its
``A`` and ``B`` and one batched product serves the whole batch — instead of a Python loop over adapters.
"""

from __future__ import annotations

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
        weight = state[f"{module}.weight"]
        bias = state.get(f"{module}.bias")
        active = [self.adapters[n] for n in self.active if module in self.adapters[n].params]
        if not active:
            raise ShapeError(f"{module}: no active adapter adapts this module (active: {self.active})")
        mods = [ad.module(module, weight_shape=tuple(weight.shape)) for ad in active]
        if len(mods) == 1:
            return mods[0].forward(x, weight, bias, **layer_kwargs)
        for m in mods:
            if not m.description.stacks(m):
                raise UnsupportedError(
                    f"{module}: stacking {m.peft_type}{' (DoRA)' if m.needs_record() else ''} with other "
                    f"adapters is not supported; merge them one after another with AdapterSet.merge instead"
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
        """PEFT's ``adapter_names`` forward for one module: row ``b`` uses adapter ``adapter_names[b]``."""
        for n in set(adapter_names) - {BASE}:
            self._check(n)
        return mixed_batch_forward(module, x, state, self.adapters, adapter_names, **layer_kwargs)


def mixed_batch_forward(
    module: str,
    x: Array,
    state: Mapping[str, Array],
    adapters: Mapping[str, Adapter],
    adapter_names: Sequence[str],
    **layer_kwargs: Any,
) -> Array:
    """``y_b = base(x_b) + s_{a(b)} · B_{a(b)} A_{a(b)} x_b`` with ``a(b) = adapter_names[b]``.

    The LoRA factors of every adapter named in the batch are stacked once into ``(N + 1, r_max, in)``
    and ``(N + 1, out, r_max)`` (ranks zero-padded, a zero adapter last for ``"__base__"`` and for
    adapters that do not adapt this module), each row gathers its pair, and two batched matmuls give
    every row's adapter term. Linear, Conv1D and Embedding layers; LoRA adapters without DoRA (PEFT
    refuses DoRA here too).
    """
    weight = state[f"{module}.weight"]
    bias = state.get(f"{module}.bias")
    where = f"mixed_batch_forward({module})"
    xp = namespace(x, weight, bias, where=where)
    names = list(adapter_names)
    if x.shape[0] != len(names):
        raise ShapeError(f"{module}: the batch has {x.shape[0]} rows but adapter_names has {len(names)} entries")
    unknown = sorted(set(names) - set(adapters) - {BASE})
    if unknown:
        raise ConfigError(f"{module}: adapter_names names {unknown}, which are not loaded ({', '.join(adapters)})")
    used = [n for n in dict.fromkeys(names) if n != BASE and module in adapters[n].params]
    mods = {}
    for n in used:
        if not adapters[n].description.mixed_batch:
            raise UnsupportedError(f"{module}: the mixed batch supports LoRA adapters, not {adapters[n].peft_type}")
        m = adapters[n].module(module, weight_shape=tuple(weight.shape))
        if m.needs_record():
            raise UnsupportedError(f"{module}: adapter {n!r} uses DoRA, which the mixed batch cannot serve (as in PEFT)")
        mods[n] = m
    if not mods:
        owner = next((a for a in adapters.values() if module in a.params), None)
        if owner is None:
            raise ShapeError(f"{module}: no loaded adapter adapts this module")
        layer = owner.module(module, weight_shape=tuple(weight.shape)).layer
        return layer.base_forward(x, weight, bias, xp, **(layer_kwargs if layer.kind.is_conv else {}))
    namespace(x, *(t for m in mods.values() for t in (m.A, m.B)), where=where)  # one library, one device
    layer = next(iter(mods.values())).layer
    if layer.kind.is_conv:
        raise UnsupportedError(f"{module}: the mixed batch covers Linear, Conv1D and Embedding layers, not {layer.kind.value}")
    embed_scale = layer_kwargs.get("embed_scale")
    base = layer.base_forward(x, weight, bias, xp)
    cd = compute_dtype(xp, base.dtype, *(m.param_dtype() for m in mods.values()))
    r_max = max(m.r for m in mods.values())
    inn, out = layer.in_features, layer.out_features

    def pad_rows(a: Array, r: int) -> Array:  # (r, in) -> (r_max, in)
        a = as_compute(xp, a, cd)
        if r == r_max:
            return a
        return xp.concat([a, xp.zeros((r_max - r, a.shape[1]), dtype=cd, device=array_api_compat.device(a))], axis=0)

    def pad_cols(b: Array, r: int) -> Array:  # (out, r) -> (out, r_max)
        b = as_compute(xp, b, cd)
        if r == r_max:
            return b
        return xp.concat([b, xp.zeros((b.shape[0], r_max - r), dtype=cd, device=array_api_compat.device(b))], axis=1)

    order = list(mods)
    dev = array_api_compat.device(x)
    A_stack = xp.stack([pad_rows(mods[n].A, mods[n].r) for n in order]
                       + [xp.zeros((r_max, inn), dtype=cd, device=dev)], axis=0)          # (N+1, r, in)
    B_stack = xp.stack([pad_cols(mods[n].B * mods[n].scaling, mods[n].r) for n in order]
                       + [xp.zeros((out, r_max), dtype=cd, device=dev)], axis=0)          # (N+1, out, r)
    zero = len(order)
    index = [order.index(n) if n in mods else zero for n in names]
    idx = backend_for(xp).from_host(_np_int(index), xp, dev)
    if layer.kind is LayerKind.EMBEDDING:
        B_rows = xp.take(B_stack, idx, axis=0)                                                 # (B, out, r)
        # row b, token t reads column ids[b, t] of its adapter's A: one flat gather
        ids = xp.reshape(x, (x.shape[0], -1))
        flat = xp.reshape(xp.permute_dims(A_stack, (0, 2, 1)), (-1, r_max))                     # ((N+1)·V, r)
        pos = xp.astype(idx, ids.dtype)[:, None] * inn + ids
        h = xp.reshape(xp.take(flat, xp.reshape(pos, (-1,)), axis=0), (*x.shape, r_max))
        h = xp.reshape(h, (x.shape[0], -1, r_max))
        term = xp.matmul(h, xp.matrix_transpose(B_rows))
        if embed_scale is not None:
            term = term * embed_scale
    else:
        xc = xp.reshape(as_compute(xp, x, cd), (x.shape[0], -1, inn))
        y = xp.reshape(as_compute(xp, base, cd), (x.shape[0], -1, out))  # base is this call's own array
        if backend_for(xp).lora_gather_(y, xc, A_stack, B_stack, idx):  # a kernel reading the factors in place
            return as_compute(xp, xp.reshape(y, base.shape), base.dtype)
        A_rows = xp.take(A_stack, idx, axis=0)                                                 # (B, r, in)
        B_rows = xp.take(B_stack, idx, axis=0)                                                 # (B, out, r)
        term = xp.matmul(xp.matmul(xc, xp.matrix_transpose(A_rows)), xp.matrix_transpose(B_rows))
    term = xp.reshape(term, base.shape)
    return as_compute(xp, as_compute(xp, base, cd) + term, base.dtype)


def _np_int(values: list[int]):
    import numpy as np

    return np.asarray(values, dtype=np.int64)
