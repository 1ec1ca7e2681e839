"""Which modules of a model get an adapter: PEFT's target-module rules, on names and shapes alone.

PEFT decides on a live ``torch.nn.Module`` (``tuners_utils.py::check_target_module_exists``); peftmath
decides on a state dict (or a safetensors file), so it also has to tell the layer kinds apart from the
weights: :func:`module_kinds`.

The rules, in PEFT's order, for a module ``key`` (its dotted name in the model):

1. ``exclude_modules``: a string is a regex (``re.fullmatch``); a list matches ``key == e`` or a suffix
   ``"." + e``. A match excludes the module.
2. Modules under ``modules_to_save`` are excluded (regex ``(^|.*\\.)m($|\\..*)``).
3. ``target_modules``: a string is a regex (``re.fullmatch``) — ``"all-linear"`` (any case) means every
   Linear / transformers Conv1D except the output layer; a list matches ``key == t`` or a suffix
   ``"." + t``; ``None`` means PEFT's default table for the model type.
4. ``layers_to_transform`` (with list-style targets): the layer index is the first ``\\.<name>\\.(\\d+)\\.``
   of the key, or the one after ``layers_pattern`` (a string or a list tried in order).
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from ._peft_tables import default_targets
from .errors import ConfigError, PeftMathWarning, ShapeError
from .kinds import CONV1D_MODEL_TYPES, kind_from_model_type
from .layers import LayerKind

__all__ = ["is_target", "select_targets", "module_kinds", "checkpoint_to_module", "module_to_checkpoint",
           "ALL_LINEAR", "CONV1D_MODEL_TYPES", "OUTPUT_LAYER_NAMES", "CHECKPOINT_RENAMES", "WORD_EMBEDDING_NAMES",
           "OUTPUT_EMBEDDING_NAMES"]

ALL_LINEAR = "all-linear"
#: names transformers gives to embedding tables (a 2-D weight there is an Embedding, not a Linear)
EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
                   "embed_positions", "shared", "embed_in", "relative_attention_bias")
#: the token-embedding tables among them: the ones a model may tie to its output layer (tie_word_embeddings)
WORD_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "shared", "embed_in")
#: output layers "all-linear" leaves out (PEFT excludes the model's output embedding / seq-cls head)
OUTPUT_LAYER_NAMES = ("lm_head", "embed_out", "cls.predictions.decoder", "score", "classifier")
#: the output embeddings among them: the ones tie_word_embeddings ties to the token embedding
OUTPUT_EMBEDDING_NAMES = ("lm_head", "embed_out", "cls.predictions.decoder")


#: transformers 5 loads some checkpoints under other module names (its ``conversion_mapping``): per
#: model type, (checkpoint module suffix, in-memory module suffix). PEFT adapters use the in-memory names;
#: the safetensors files keep the checkpoint names. Only plain renames are listed: a tensor that
#: transformers splits on load (Dinov2's SwiGLU ``mlp.weights_in``) has no single module to adapt.
CHECKPOINT_RENAMES: dict[str, list[tuple[str, str]]] = {
    "dinov2": [
        ("attention.attention.query", "attention.q_proj"),
        ("attention.attention.key", "attention.k_proj"),
        ("attention.attention.value", "attention.v_proj"),
        ("attention.output.dense", "attention.o_proj"),
    ],
}


def _rename(name: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        if name == old:
            return new
        if name.endswith("." + old):
            return name[: -len(old)] + new
    return name


def checkpoint_to_module(name: str, model_type: str | None) -> str:
    """The module name transformers (and so PEFT) uses for checkpoint module ``name``.

    >>> checkpoint_to_module("encoder.layer.0.attention.attention.query", "dinov2")
    'encoder.layer.0.attention.q_proj'
    """
    return _rename(name, CHECKPOINT_RENAMES.get(model_type or "", []))


def module_to_checkpoint(name: str, model_type: str | None) -> str:
    """The checkpoint module name of in-memory module ``name`` (the inverse of :func:`checkpoint_to_module`).

    >>> module_to_checkpoint("encoder.layer.3.attention.o_proj", "dinov2")
    'encoder.layer.3.attention.output.dense'
    """
    return _rename(name, [(new, old) for old, new in CHECKPOINT_RENAMES.get(model_type or "", [])])


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _matches_list(key: str, names: Iterable[str]) -> bool:
    return any(key == n or key.endswith("." + n) for n in names)


def _layer_index(key: str, layers_pattern: Any) -> int | None:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        m = None
        for p in patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def is_target(config: Any, key: str, *, target_modules: Any = None) -> bool:
    """PEFT's rule for one module name (``target_modules`` overrides the config's, e.g. after
    "all-linear" or the default table has been expanded to a list)."""
    excl = getattr(config, "exclude_modules", None)
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, key):
                return False
        elif _matches_list(key, excl):
            return False
    for m in getattr(config, "modules_to_save", None) or ():
        if re.match(rf"(^|.*\.){m}($|\..*)", key):
            return False
    targets = config.target_modules if target_modules is None else target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith("." + t) for t in targets)
    indexes = getattr(config, "layers_to_transform", None)
    using = indexes is not None and (len(indexes) != 0 if isinstance(indexes, list) else True)
    if using and found:
        idx = _layer_index(key, getattr(config, "layers_pattern", None))
        if idx is None:
            return False
        return idx == indexes if isinstance(indexes, int) else idx in indexes
    return found


def module_kinds(
    state: Mapping[str, Any],
    *,
    layer_kinds: Mapping[str, LayerKind | str] | None = None,
    model_type: str | None = None,
) -> dict[str, LayerKind]:
    """The kind of every module with a ``.weight`` of 2 to 5 dimensions in ``state``.

    2-D weights are Linear, except embedding tables (named as transformers names them) and the Conv1D
    projections of GPT-2-style architectures (``model_type``); 3/4/5-D weights are Conv1d/2d/3d.
    ``layer_kinds`` overrides any of them (a module name -> kind).
    """
    shapes = {k[: -len(".weight")]: tuple(_shape(v)) for k, v in state.items() if k.endswith(".weight")}
    out: dict[str, LayerKind] = {}
    for name, shape in shapes.items():
        if len(shape) == 2:
            if _leaf(name) in EMBEDDING_NAMES:
                kind = LayerKind.EMBEDDING
            else:  # the rule of peftmath.kinds: the model type's Conv1D layers, else a Linear
                kind = kind_from_model_type(name, model_type) or LayerKind.LINEAR
        elif len(shape) in (3, 4, 5):
            kind = {3: LayerKind.CONV1D, 4: LayerKind.CONV2D, 5: LayerKind.CONV3D}[len(shape)]
        else:
            continue
        out[name] = kind
    for name, kind in (layer_kinds or {}).items():
        if name not in shapes:
            raise ShapeError(f"layer_kinds names {name!r}, which has no weight in the base model "
                             f"(closest: {', '.join(difflib.get_close_matches(name, list(shapes), 3, 0.3)) or 'none'})")
        out[name] = LayerKind.parse(kind)
    return out


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in v.shape)


def select_targets(
    config: Any,
    kinds: Mapping[str, LayerKind],
    *,
    model_type: str | None = None,
    supported: Iterable[LayerKind] | None = None,
) -> dict[str, LayerKind]:
    """The modules ``config`` adapts, among ``kinds`` (from :func:`module_kinds`).

    Raises :class:`ConfigError` when ``target_modules`` is None without a known ``model_type``, and
    when a target matches nothing (PEFT only warns; here the error lists the closest module names).
    Modules whose kind the method does not support are skipped, as PEFT skips them, unless the target
    names them exactly, which is an error naming the kind.
    """
    targets = config.target_modules
    if targets is None:
        table = default_targets(config.peft_type)
        if not model_type or model_type not in table:
            raise ConfigError(
                f"{config.peft_type}: target_modules is null and the model type {model_type!r} has no default "
                f"in PEFT's table; set target_modules (e.g. ['q_proj', 'v_proj'] or 'all-linear')"
            )
        targets = table[model_type]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = sorted(n for n, k in kinds.items()
                         if k in (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED) and not _is_output_layer(n))
    chosen = {n: k for n, k in kinds.items() if is_target(config, n, target_modules=targets)}
    supported = tuple(supported) if supported is not None else None
    if supported is not None:
        explicit = set(targets) if isinstance(targets, (list, set, tuple)) else set()
        skipped = []
        for n, k in list(chosen.items()):
            if k not in supported:
                if n in explicit:
                    raise ConfigError(f"{n}: {config.peft_type} does not support {k.value} layers (PEFT refuses it too)")
                skipped.append(f"{n} ({k.value})")
                del chosen[n]
        if skipped:
            warnings.warn(f"{config.peft_type} does not support these layer kinds; skipped as PEFT skips them: "
                          f"{', '.join(skipped[:8])}{' ...' if len(skipped) > 8 else ''}", PeftMathWarning, stacklevel=3)
    if not chosen:
        names = sorted(kinds)
        wanted = targets if isinstance(targets, str) else ", ".join(map(str, targets))
        close = sorted({c for t in ([targets] if isinstance(targets, str) else targets)
                        for c in difflib.get_close_matches(str(t), names + [_leaf(n) for n in names], 5, 0.4)})
        raise ConfigError(
            f"{config.peft_type}: target_modules ({wanted}) match no module of the model; closest module names: "
            f"{', '.join(close) if close else ', '.join(names[:8])}"
        )
    if isinstance(targets, (list, set, tuple)):
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in kinds)]
        if unmatched:
            close = {t: difflib.get_close_matches(t, [_leaf(n) for n in kinds], 3, 0.4) for t in unmatched}
            hints = "; ".join(f"{t!r} (closest: {', '.join(c) or 'none'})" for t, c in close.items())
            raise ConfigError(f"{config.peft_type}: target_modules entries match no module: {hints}")
    return dict(sorted(chosen.items()))


def _is_output_layer(name: str) -> bool:
    return any(name == o or name.endswith("." + o) for o in OUTPUT_LAYER_NAMES)
