r"""LoRA with trainable tokens: PEFT's ``LoraConfig(trainable_token_indices=...)``.

A LoRA adapter may also train a few rows of the token embedding (new tokens after a vocabulary resize,
or re-trained ones) without training the whole table. PEFT wraps the embedding (not a LoRA layer) in a
``TrainableTokensWrapper`` whose ``token_adapter`` is PEFT's trainable-tokens layer, and saves its rows
under the module's name::

    base_model.model.<module>.token_adapter.trainable_tokens_delta: R (k, D)     W: (V, D)

The math is trainable tokens' (:mod:`peftmath.methods.trainable_tokens`, ``specs/trainable_tokens.md``):
merging *replaces* rows, ``W'[t_j] = R_j`` (rounded to ``W``'s dtype), every other row is ``W``'s bit for
bit; there is no standalone ``ΔW``; merge returns the original rows as its record and unmerge needs it.
A LoRA adapter with trainable tokens is the LoRA modules plus one such module per wrapped table: a
module whose only tensor is ``token_adapter.trainable_tokens_delta`` binds as :class:`LoraTokensModule`
(:class:`~peftmath.methods.lora.LoraModule` picks it, as it picks DoRA's class), so ``Adapter.merge``,
``peftmath merge`` (one module per tensor group), ``inspect`` and saving back treat it as one module
of the adapter.

Which rows (``trainable_token_indices``, specs/lora.md, "12. Variants"):

* a list ``[t_0, ..., t_{k-1}]``: the rows of the model's input embedding (PEFT resolves its name with
  ``get_input_embeddings``, else ``embed_tokens``); the checkpoint names the module;
* a dict ``{name: [t, ...]}``: the rows of each module whose full name ends with ``name`` (PEFT's
  ``key.endswith(name)``; with several matching keys the first in the dict's order, as PEFT's first
  wrap wins).

With tied embeddings (``tie_word_embeddings``) PEFT ties the output layer's token adapter to the
embedding's and saves the rows once, under the embedding: merging them into the shared table changes
the output layer too, exactly as PEFT's merged (and unmerged) model does.
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError, ConfigError, ShapeError, UnsupportedError
from ..layers import Layer
from . import trainable_tokens as tt
from ._base import MergeResult
from .lora import TOKENS_KEY, LoraModule

Array = Any

__all__ = ["TOKENS_KEY", "check_indices", "token_indices_for", "token_modules", "check_token_modules", "initial_rows",
           "LoraTokensModule"]

#: the config field
FIELD = "trainable_token_indices"


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


def check_indices(value: Any, source: str) -> None:
    """Check ``trainable_token_indices``: None, a list of token ids, or ``{module name: list of token ids}``
    (ids are non-negative integers; :class:`ConfigError` naming the field otherwise).

    >>> check_indices({"embed_tokens": [0, 3]}, "cfg")
    >>> check_indices([1, -2], "cfg")
    Traceback (most recent call last):
    ...
    peftmath.errors.ConfigError: cfg: field 'trainable_token_indices' must be a list of token ids ...
    """
    if value is None:
        return
    shape = ("a list of token ids (non-negative integers: rows of the input embedding) or an object "
             "{module name: list of token ids}")
    if isinstance(value, dict):
        for name, ids in value.items():
            if not isinstance(name, str) or not name or not _is_ids(ids):
                raise ConfigError(f"{source}: field {FIELD!r} must be {shape}; entry {name!r}: {ids!r}")
        if not value:
            raise ConfigError(f"{source}: field {FIELD!r} is an empty object; leave it null for no trainable tokens")
        return
    if not _is_ids(value):
        raise ConfigError(f"{source}: field {FIELD!r} must be {shape}, got {value!r}")


def token_indices_for(config: Any, name: str) -> list[int]:
    """The token ids of module ``name``: the list form's ids (the input embedding: the module that holds the
    rows), or the dict entry whose key ``name`` ends with (the first in the dict's order). Raises
    :class:`CheckpointError` when the config gives this module no ids."""
    value = getattr(config, FIELD, None)
    if value is None:
        raise CheckpointError(
            f"{name}: the checkpoint holds {name}.{TOKENS_KEY} (rows of a table trained with PEFT's trainable "
            f"tokens) but the adapter config has no {FIELD}, so which rows they are is unknown; is this the "
            f"adapter_config.json saved with these tensors?")
    if isinstance(value, list):
        return list(value)
    for key, ids in value.items():
        if name.endswith(key):
            return list(ids)
    raise CheckpointError(
        f"{name}: the checkpoint holds {name}.{TOKENS_KEY}, but no key of {FIELD} ({sorted(value)}) is the end "
        f"of this module's name (PEFT wraps the modules whose names end with a key); is this the adapter_config.json "
        f"saved with these tensors?")


def token_modules(params: Any) -> list[str]:
    """The modules of ``params`` (``{module: {suffix: array}}``) that hold trainable-token rows, sorted."""
    return sorted(m for m, p in params.items() if TOKENS_KEY in p)


def check_token_modules(config: Any, params: Any, source: str) -> None:
    """A whole checkpoint against its config: rows without ``trainable_token_indices``, a config with it
    whose checkpoint holds no rows, a list form (one input embedding) with rows for several modules, and
    rows for a module no dict key names are each a :class:`CheckpointError` (PEFT saves the rows of every
    table it wraps, except a tied output layer's, which are the embedding's)."""
    from ..config import field_status

    if field_status(config.peft_type, FIELD) != "implemented":
        return  # AdaLoRA: the field is refused by name (peftmath.config.check_supported), the rows are unknown tensors
    found = token_modules(params)
    value = getattr(config, FIELD, None)
    if value is None and not found:
        return
    if value is not None and not found:
        raise CheckpointError(
            f"{source}: the config sets {FIELD}={value!r} but the checkpoint holds no <module>.{TOKENS_KEY} "
            f"tensor: the trained rows are missing, and merged without them the adapter would be wrong (a new "
            f"adapter gets them from initial_rows in peftmath/methods/_lora_tokens.py)")
    if isinstance(value, list) and len(found) > 1:
        raise CheckpointError(
            f"{source}: {FIELD} is a list (the rows of the input embedding), but the checkpoint holds rows for "
            f"{len(found)} modules ({', '.join(found)}); PEFT wraps one table for a list")
    for m in found:
        token_indices_for(config, m)


def initial_rows(config: Any, state: Any, *, model_type: str | None = None) -> dict[str, dict[str, Array]]:
    """The rows a new LoRA adapter with ``trainable_token_indices`` starts with, ``{module: {TOKENS_KEY: W[t]}}``
    (PEFT's wrapper copies the table's current rows whatever ``init_lora_weights`` says: the adapter starts as the
    identity), for the tables of base state dict ``state`` (module name -> ``<module>.weight``; checkpoint names
    mapped with ``model_type``). The list form takes the input embedding: the one module of ``state`` whose last
    name is one of :data:`peftmath.targets.WORD_EMBEDDING_NAMES`; the dict form every module whose name ends with
    a key (the first key in order). :class:`ConfigError` when a key or the embedding is not found (PEFT raises
    too). With tied embeddings PEFT saves the embedding's rows only: leave a tied ``lm_head`` out of the dict."""
    import array_api_compat

    from .._array import namespace
    from ..targets import WORD_EMBEDDING_NAMES, checkpoint_to_module

    value = getattr(config, FIELD, None)
    if value is None:
        return {}
    modules = {checkpoint_to_module(k[: -len(".weight")], model_type): k for k in state if k.endswith(".weight")}
    if isinstance(value, list):
        found = sorted(m for m in modules if m.rsplit(".", 1)[-1] in WORD_EMBEDDING_NAMES)
        if len(found) != 1:
            raise ConfigError(f"{FIELD}: a list takes the rows of the model's input embedding, and the base has "
                              f"{'none' if not found else 'several: ' + ', '.join(found)} among the names "
                              f"{list(WORD_EMBEDDING_NAMES)}; give the table by name ({{'<module>': [ids]}})")
        picked = {found[0]: list(value)}
    else:
        picked = {}
        for m in sorted(modules):
            key = next((k for k in value if m.endswith(k)), None)
            if key is not None:
                picked[m] = list(value[key])
        missing = [k for k in value if not any(m.endswith(k) for m in picked)]
        if missing:
            raise ConfigError(f"{FIELD}: no module of the base ends with {missing} (PEFT raises too)")
    out = {}
    for m, ids in picked.items():
        W = state[modules[m]]
        tokens = tt.TokenRows(ids, int(W.shape[0]), m)
        xp = namespace(W, where=m)
        out[m] = {TOKENS_KEY: xp.take(W, xp.asarray(tokens.indices, device=array_api_compat.device(W)), axis=0)}
    return out


def _rows_config(config: Any, name: str) -> tt.TrainableTokensConfig:
    return tt.TrainableTokensConfig(target_modules=[name], token_indices=token_indices_for(config, name))


class LoraTokensModule(LoraModule):
    """The trainable-token rows of one table (an nn.Embedding ``(V, D)``, or an nn.Linear output layer) in a
    LoRA adapter: :class:`~peftmath.methods.trainable_tokens.TrainableTokensModule`'s math with the ids of
    ``trainable_token_indices`` for this module. Merge replaces the rows and returns the originals as its
    record; unmerge needs the record; no delta weight, no scale."""

    merge_record = True

    @classmethod
    def infer_layer(cls, name: str, config: Any, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """An Embedding of the base weight's shape, unless ``kind`` says Linear (a tied or untied ``lm_head``):
        the rows ``(k, D)`` tell neither ``V`` nor the kind, so the base weight's shape is required."""
        if TOKENS_KEY not in params:
            raise ShapeError(f"{name}: no {TOKENS_KEY} among the module's tensors {sorted(params)}")
        return tt.TrainableTokensModule.infer_layer(name, _rows_config(config, name),
                                                    {"trainable_tokens_delta": params[TOKENS_KEY]}, weight_shape, kind)

    def validate(self) -> None:
        other = sorted(set(self.params) - {TOKENS_KEY})
        if other:
            raise CheckpointError(
                f"{self.name}: the checkpoint holds both LoRA tensors ({', '.join(other)}) and trainable-token rows "
                f"({TOKENS_KEY}) for this module; PEFT 0.21.2 cannot build such a model (a LoRA-adapted layer "
                f"cannot also be wrapped for trainable_token_indices: TypeError), so the adapter is not one PEFT "
                f"wrote. Remove the module from target_modules or from {FIELD}")
        self.rows = tt.TrainableTokensModule(self.name, _rows_config(self.config, self.name),
                                             {"trainable_tokens_delta": self.params[TOKENS_KEY]}, self.layer)
        self.tokens = self.rows.tokens
        self.additive = False  # a replacement: W' − W depends on W
        self.alora = False

    def describe(self) -> dict[str, Any]:
        return {"tokens": int(self.tokens.unique.size)}

    def changes_bias(self) -> bool:
        return False

    def scaled(self, c: float) -> "LoraTokensModule":
        if c == 1.0:
            return self
        raise UnsupportedError(
            f"{self.name}: trainable-token rows ({FIELD}) replace rows of the table, which has no linear scale; "
            f"merge this LoRA adapter with scale 1 (got scale {c:g})")

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        raise tt.no_delta_weight(self.name, f"this LoRA adapter's trainable tokens ({FIELD}) replace rows of the "
                                            f"table (W[t] = {TOKENS_KEY})")

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        """``W'[t] = R`` (trainable tokens' merge); the record is the original rows ``W[sorted distinct ids]``."""
        return self.rows.merge(weight, bias, copy=copy, safe=safe, peft_compat=peft_compat)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        """The original rows back from the merge's ``record`` (trainable tokens' unmerge; refused without it)."""
        return self.rows.unmerge(weight, bias, record=record, copy=copy, peft_compat=peft_compat)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        """The lookup in the table with the rows replaced (``embed_scale=`` for a scaled embedding), or for a
        module bound as Linear ``x W'ᵀ + b`` (``peft_compat=True``: without the bias, as PEFT's layer)."""
        return self.rows.forward(x, weight, bias, **layer_kwargs)
