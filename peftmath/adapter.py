"""``Adapter``: a loaded adapter (config + parameters per module) and its operations on a base model.

A base model is a *state dict*: a mapping from PyTorch parameter names (``"model.layers.0.q_proj.weight"``)
to arrays of any array-API library. Adapted modules are named as PEFT names them, relative to the model
(``"model.layers.0.q_proj"``); the weight and bias of module ``m`` are ``m + ".weight"`` and ``m + ".bias"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._array import dtype_name
from .errors import ShapeError, UnsupportedError
from .layers import LayerKind
from .methods import get_method
from .methods._base import ModuleAdapter, require_writeable

Array = Any

__all__ = ["Adapter"]


class Adapter:
    """One PEFT adapter: its typed config and its parameters, module by module.

    Parameters
    ----------
    config
        A typed config (``LoraConfig``, ...); its ``peft_type`` selects the method.
    params
        ``{module name: {parameter suffix: array}}``, suffixes as in PEFT checkpoints
        (``"lora_A.weight"``, ``"lora_embedding_B"``, ``"lora_magnitude_vector"``, ...).
    shared
        Tensors not tied to one module (VeRA's ``vera_A`` / ``vera_B``), by their checkpoint key.
    other
        Base-model tensors the checkpoint replaces (``modules_to_save``, ``bias="all"``), by base key.
    model_type
        The base model's transformers ``model_type`` (Dinov2 names its checkpoint tensors differently
        from its modules; see :data:`peftmath.targets.CHECKPOINT_RENAMES`).
    layer_kinds
        Known layer kinds by module name (a square transformers Conv1D cannot be told from a Linear
        by its shape). :func:`~peftmath.create_adapter` fills it, :func:`~peftmath.save_adapter` records it
        in the safetensors metadata and :func:`~peftmath.load_adapter` reads it back.
    """

    def __init__(
        self,
        config: Any,
        params: Mapping[str, Mapping[str, Array]],
        *,
        shared: Mapping[str, Array] | None = None,
        other: Mapping[str, Array] | None = None,
        layer_kinds: Mapping[str, LayerKind | str] | None = None,
        model_type: str | None = None,
    ) -> None:
        self.config = config
        self.method = get_method(config.peft_type)
        self.params: dict[str, dict[str, Array]] = {m: dict(p) for m, p in params.items()}
        self.shared: dict[str, Array] = dict(shared or {})
        self.other: dict[str, Array] = dict(other or {})
        self.layer_kinds: dict[str, LayerKind] = {k: LayerKind.parse(v) for k, v in (layer_kinds or {}).items()}
        #: the transformers ``model_type`` of the base, when known: it maps module names to checkpoint
        #: names where transformers renames them (:data:`peftmath.targets.CHECKPOINT_RENAMES`)
        self.model_type = model_type

    def __repr__(self) -> str:
        return f"Adapter({self.config.peft_type}, {len(self.params)} modules, {self.num_trainable_parameters()} parameters)"

    @property
    def peft_type(self) -> str:
        return self.config.peft_type

    @property
    def modules(self) -> list[str]:
        """Adapted module names, sorted."""
        return sorted(self.params)

    # --- prompt-learning methods ---------------------------------------------------------------
    @property
    def is_prompt_learning(self) -> bool:
        """True for prompt tuning, P-tuning and prefix tuning (virtual tokens, no weight changes)."""
        return bool(getattr(self.method, "PROMPT_LEARNING", False))

    def prompt_embeddings(self) -> Array:
        """The saved virtual-token table: ``(T·S, D)`` (prompt tuning, P-tuning) or ``(T, 2·L·D)`` (prefix)."""
        if not self.is_prompt_learning:
            raise UnsupportedError(f"{self.peft_type} has no prompt embeddings; it adapts module weights")
        return self.shared["prompt_embeddings"]

    def past_key_values(self, batch_size: int) -> list[tuple[Array, ...]]:
        """Prefix tuning's per-layer keys and values, ``(batch_size, H, T, D / H)`` each."""
        if self.peft_type != "PREFIX_TUNING":
            raise UnsupportedError(f"past_key_values belongs to prefix tuning, not {self.peft_type}")
        return self.method.past_key_values(self.prompt_embeddings(), self.config, batch_size)

    def _require_modules(self, what: str) -> None:
        if self.is_prompt_learning:
            raise UnsupportedError(
                f"{self.peft_type} adds virtual tokens and changes no weight, so it has no {what}; use "
                f"prompt_embeddings(){' / past_key_values(batch_size)' if self.peft_type == 'PREFIX_TUNING' else ''}"
            )

    # --- per module ---------------------------------------------------------------------------
    def module(
        self,
        name: str,
        *,
        weight_shape: tuple[int, ...] | None = None,
        kind: LayerKind | str | None = None,
    ) -> ModuleAdapter:
        """The bound :class:`~peftmath.methods._base.ModuleAdapter` of module ``name``.

        The layer geometry comes from the base weight's shape when given (and ``kind`` for a square
        transformers Conv1D or an explicit override), otherwise from the parameters and the config.
        """
        self._require_modules("modules")
        if name not in self.params:
            raise ShapeError(f"{name}: not adapted by this {self.peft_type} adapter; adapted modules: {_some(self.modules)}")
        cls = self.method.Module
        params = dict(self.params[name])
        kind = kind if kind is not None else self.layer_kinds.get(name)
        layer = cls.infer_layer(name, self.config, params, weight_shape, kind)
        return cls(name, self.config, params, layer, shared=self.shared)

    def delta_weight(self, name: str, *, weight_shape: tuple[int, ...] | None = None,
                     kind: LayerKind | str | None = None, peft_compat: bool = False) -> Array:
        """``ΔW`` of module ``name`` in the base weight's stored layout (additive methods)."""
        return self.module(name, weight_shape=weight_shape, kind=kind).delta_weight(peft_compat=peft_compat)

    def forward(self, name: str, x: Array, state: Mapping[str, Array], *, kind: LayerKind | str | None = None,
                **layer_kwargs: Any) -> Array:
        """One module's unmerged adapted forward, the base bias included.

        ``layer_kwargs`` are the base layer's hyper-parameters (conv ``stride``, ``padding``,
        ``dilation``; ``embed_scale`` for scaled embeddings).
        """
        weight, bias = self._base_tensors(name, state)
        mod = self.module(name, weight_shape=tuple(weight.shape), kind=kind)
        return mod.forward(x, weight, bias, **layer_kwargs)

    # --- whole model --------------------------------------------------------------------------
    def merge(
        self,
        state: Mapping[str, Array],
        *,
        peft_compat: bool = False,
        safe: bool = False,
        layer_kinds: Mapping[str, LayerKind | str] | None = None,
        records: dict[str, Any] | None = None,
        copy: bool = True,
    ) -> dict[str, Array]:
        """The merged state dict: a new dict in which adapted weights (and biases) are replaced.

        Tensors the adapter does not touch are passed through as the same objects. ``records``, when
        a dict is given, receives what :meth:`unmerge` needs per module (DoRA's weight norms).
        ``copy=False`` updates the adapted arrays in place. Every module is validated (shapes, layer
        kinds) before any array is computed, and with ``copy=True`` nothing is modified on an error.
        """
        self._require_modules("merge")
        bound = self._bind_all(state, layer_kinds)
        if not copy:  # refuse before the first in-place write, not half-way through the model
            for name, (_, wkey, _) in bound.items():
                require_writeable(name, state[wkey])
        out = dict(state)
        new_records: dict[str, Any] = {}
        for name, (mod, wkey, bkey) in bound.items():
            res = mod.merge(state[wkey], state.get(bkey), copy=copy, safe=safe, peft_compat=peft_compat)
            out[wkey] = res.weight
            if res.bias is not None:
                out[bkey] = res.bias
            if res.record is not None:
                new_records[name] = res.record
        for key, value in self.other.items():
            out[key] = value
        if records is not None:
            records.update(new_records)
        return out

    def unmerge(
        self,
        merged: Mapping[str, Array],
        *,
        peft_compat: bool = False,
        layer_kinds: Mapping[str, LayerKind | str] | None = None,
        records: Mapping[str, Any] | None = None,
        copy: bool = True,
    ) -> dict[str, Array]:
        """The inverse of :meth:`merge` where it exists (``records`` from that merge where needed)."""
        self._require_modules("unmerge")
        bound = self._bind_all(merged, layer_kinds)
        if not copy:
            for name, (_, wkey, _) in bound.items():
                require_writeable(name, merged[wkey])
        out = dict(merged)
        for name, (mod, wkey, bkey) in bound.items():
            rec = (records or {}).get(name)
            res = mod.unmerge(merged[wkey], merged.get(bkey), record=rec, copy=copy, peft_compat=peft_compat)
            out[wkey] = res.weight
            if res.bias is not None:
                out[bkey] = res.bias
        return out

    def base_key(self, name: str, state: Mapping[str, Array]) -> str:
        """The state-dict prefix of module ``name``: the name itself, or its checkpoint name."""
        if f"{name}.weight" in state:
            return name
        from .targets import module_to_checkpoint

        return module_to_checkpoint(name, self.model_type)

    def _base_tensors(self, name: str, state: Mapping[str, Array]) -> tuple[Array, Array | None]:
        key = self.base_key(name, state)
        wkey = f"{key}.weight"
        if wkey not in state:
            raise ShapeError(
                f"{name}: adapted module has no weight {wkey!r} in the base state dict "
                f"(closest keys: {_some(_closest(wkey, state))})"
            )
        return state[wkey], state.get(f"{key}.bias")

    def _bind_all(self, state: Mapping[str, Array], layer_kinds: Mapping[str, Any] | None) -> dict:
        bound = {}
        for name in self.modules:
            weight, _ = self._base_tensors(name, state)
            kind = (layer_kinds or {}).get(name)
            key = self.base_key(name, state)
            bound[name] = (self.module(name, weight_shape=tuple(weight.shape), kind=kind),
                           f"{key}.weight", f"{key}.bias")
        return bound

    # --- bookkeeping --------------------------------------------------------------------------
    def num_trainable_parameters(self) -> int:
        """Trainable scalars (shared frozen projections and replaced base tensors not counted)."""
        return sum(_numel(a) for p in self.params.values() for a in p.values())

    def summary(self, base: Mapping[str, Array] | None = None) -> dict[str, Any]:
        """Trainable parameters (and, given the base state, the total and the percentage, as PEFT's
        ``print_trainable_parameters``), plus one row per module: kind, parameters and the resolved
        hyper-parameters (r, alpha, scaling, ...)."""
        rows = []
        for name in self.modules:
            shape = None
            if base is not None and f"{name}.weight" in base:
                shape = tuple(base[f"{name}.weight"].shape)
            mod = self.module(name, weight_shape=shape)
            rows.append({"module": name, "kind": mod.layer.kind.value, "parameters": mod.num_parameters(),
                         **mod.describe()})
        trainable = self.num_trainable_parameters()
        out: dict[str, Any] = {"method": self.peft_type, "trainable": trainable, "modules": rows}
        if base is not None:
            total = trainable + sum(_numel(v) for v in base.values())
            out.update(total=total, percent=100.0 * trainable / total if total else 0.0)
        return out

    def trainable_parameters_line(self, base: Mapping[str, Array]) -> str:
        """PEFT's ``print_trainable_parameters`` line for this adapter on ``base``."""
        s = self.summary(base)
        return f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || trainable%: {s['percent']:.4f}"

    def dtypes(self) -> list[str]:
        return sorted({dtype_name(a.dtype) for p in self.params.values() for a in p.values()})

    def state_dict(self, *, prefix: str = "base_model.model.") -> dict[str, Array]:
        """Tensors under PEFT's checkpoint keys (``base_model.model.<module>.<suffix>``)."""
        out = {f"{prefix}{m}.{s}": a for m, p in self.params.items() for s, a in p.items()}
        out.update(self.shared)
        out.update({f"{prefix}{k}": v for k, v in self.other.items()})
        return out


def _numel(a: Any) -> int:
    n = 1
    for s in a.shape:
        n *= int(s)
    return n


def _closest(key: str, state: Mapping[str, Any], n: int = 3) -> list[str]:
    import difflib

    return difflib.get_close_matches(key, list(state), n=n, cutoff=0.3)


def _some(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "") if names else "(none)"
