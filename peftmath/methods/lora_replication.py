r"""LoRA with layer replication: PEFT's ``LoraConfig(layer_replication=[[start, end], ...])``.

PEFT builds a deeper model before it adds the adapter: the base's stack of decoder (or encoder) layers is
replaced by copies of the ranges ``[start, end)`` one after the other (``peft.tuners.tuners_utils.
replicate_layers``), and the transformers config's ``num_hidden_layers`` becomes the new count::

    layer_replication = [[0, 4], [2, 5]]     base layers 0 1 2 3 4   ->   new layers 0 1 2 3 4 5 6
                                                                          = base     0 1 2 3 2 3 4

The copies *share* their base weights with the originals (``clone_module(share_weights=True)``); the LoRA
modules are added to the new layers and are independent, so the checkpoint's keys use the new indices
(``model.layers.5.self_attn.q_proj.lora_A.weight`` adapts the copy of base layer 3). The adapter therefore
does not belong to the base model's state dict but to the replicated one, and peftmath refuses to merge it
into the base (``peftmath.load_adapter`` names the field). :func:`load_replicated` reads such an adapter with
the base it belongs to: the replicated state dict (:func:`replicate_state`, the base's arrays under the new
keys, nothing copied) and the adapter for it, which then merges, unmerges and runs its modules as any LoRA.

A new adapter is built as PEFT builds it: ``peftmath.create_adapter`` (and ``peftmath init``) with a config that
has the field replicates the base first (:func:`replicate_state`, the same layer map), creates the modules of that
model (every copy with factors of its own, from its own seed stream) and keeps the field in the config, so that
PEFT replicates the layers when it loads the adapter. :func:`replicated_view` gives such an adapter with the model
it belongs to, to merge or describe it without saving it first.

Where the layers are (PEFT's walk on the model's attributes, read here from the state-dict keys): the longest
prefix ``model.model. … model.`` that the keys have, then ``bert.`` when present, then ``layers.<i>``, else
``encoder.layer.<i>``, else ``h.<i>`` (Llama-, BERT- and Falcon-style stacks). Any other layout is refused, as
PEFT refuses it.

**PEFT's merge differs from its own model.** Because the copies share the base weights, PEFT's
``merge_and_unload`` adds the ΔW of every copy of base layer ``i`` into the one shared weight: each copy then
holds ``W_i + Σ_copies ΔW``, which is not the model PEFT trained and runs unmerged (on a tiny Llama the logits
differ by ~4e-3). peftmath's merge gives every copy its own weight ``W_i + ΔW_copy``: the merged model is PEFT's
unmerged model, with ``num_hidden_layers`` new layers (save it with the config :func:`load_replicated` returns).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, ShapeError

Array = Any

__all__ = ["layer_stack", "replicated_order", "replicate_state", "load_replicated", "replicated_view",
           "distinct_arrays"]

FIELD = "layer_replication"


def layer_stack(keys: Any) -> tuple[str, int]:
    """``(prefix, count)`` of the stack of layers in state-dict ``keys``: the prefix before the layer index
    (``"model.layers."``, ``"bert.encoder.layer."``, ``"h."``) found as PEFT's ``replicate_layers`` walks the
    model, and the number of layers (one more than the largest index). :class:`ShapeError` when there is none.

    >>> layer_stack(["model.embed_tokens.weight", "model.layers.0.mlp.w", "model.layers.1.mlp.w", "lm_head.weight"])
    ('model.layers.', 2)
    >>> layer_stack(["bert.encoder.layer.0.attention.w", "bert.pooler.w"])
    ('bert.encoder.layer.', 1)
    """
    keys = list(keys)
    depth = 0
    while any(k.startswith("model." * (depth + 1)) for k in keys):
        depth += 1
    base = "model." * depth
    if any(k.startswith(base + "bert.") for k in keys):
        base += "bert."
    for stack in ("layers.", "encoder.layer.", "h."):
        pat = re.compile(re.escape(base + stack) + r"(\d+)\.")
        found = [int(m.group(1)) for k in keys if (m := pat.match(k))]
        if found:
            return base + stack, max(found) + 1
    raise ShapeError(
        f"{FIELD}: no stack of layers in the base state dict (PEFT replicates <model.>*layers.<i>, "
        f"<model.>*[bert.]encoder.layer.<i> or h.<i>, found under the prefix {base!r} nothing of the kind; "
        f"e.g. {sorted(keys)[:3]}); PEFT's replicate_layers refuses such a model too")


def replicated_order(layer_map: Any, count: int) -> list[int]:
    """The base layer of each new layer: ``[i for start, end in layer_map for i in range(start, end)]``, with
    ``layer_map`` checked against a base of ``count`` layers (:class:`ConfigError`).

    >>> replicated_order([[0, 4], [2, 5]], 5)
    [0, 1, 2, 3, 2, 3, 4]
    """
    if not isinstance(layer_map, (list, tuple)) or not layer_map:
        raise ConfigError(f"{FIELD} must be a non-empty list of [start, end] ranges, got {layer_map!r}")
    order: list[int] = []
    for pair in layer_map:
        ok = (isinstance(pair, (list, tuple)) and len(pair) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in pair))
        if not ok or not 0 <= pair[0] < pair[1] <= count:
            raise ConfigError(f"{FIELD}: range {pair!r} is not [start, end] with 0 <= start < end <= {count} (the base "
                              f"has {count} layers); is this the adapter's base model?")
        order.extend(range(pair[0], pair[1]))
    return order


def replicate_state(state: Mapping[str, Array], layer_map: Any, *,
                    model_config: Mapping[str, Any] | None = None) -> tuple[dict[str, Array], dict[str, Any] | None]:
    """The replicated base, as PEFT builds it: ``(state dict, config)``. New layer ``j`` holds the tensors of
    base layer ``replicated_order(layer_map)[j]`` (the same array objects: nothing is copied; a merge with
    ``copy=True`` gives each adapted copy its own array); the tensors outside the stack are passed through and
    base layers that no range names are left out. ``model_config`` (a transformers config.json dict), when
    given, is returned as a new dict with ``num_hidden_layers`` set to the new count (else None).

    >>> import numpy as np
    >>> s = {"model.layers.0.w": np.zeros(1), "model.layers.1.w": np.ones(1), "lm_head.weight": np.ones(2)}
    >>> new, cfg = replicate_state(s, [[0, 2], [1, 2]], model_config={"num_hidden_layers": 2})
    >>> sorted(new), cfg
    (['lm_head.weight', 'model.layers.0.w', 'model.layers.1.w', 'model.layers.2.w'], {'num_hidden_layers': 3})
    >>> new["model.layers.2.w"] is s["model.layers.1.w"]
    True
    """
    prefix, count = layer_stack(state)
    order = replicated_order(layer_map, count)
    pat = re.compile(re.escape(prefix) + r"(\d+)\.(.*)$", re.S)
    by_layer: dict[int, list[tuple[str, str]]] = {}
    out: dict[str, Array] = {}
    for key in state:
        m = pat.match(key)
        if m is None:
            out[key] = state[key]
        else:
            by_layer.setdefault(int(m.group(1)), []).append((m.group(2), key))
    for j, i in enumerate(order):
        for rest, key in by_layer.get(i, []):
            out[f"{prefix}{j}.{rest}"] = state[key]
    config = None
    if model_config is not None:
        config = dict(model_config)
        config["num_hidden_layers"] = len(order)
    return out, config


def load_replicated(path: str | os.PathLike, state: Mapping[str, Array], *, model_config: Mapping[str, Any] | None = None,
                    xp: Any = None, device: Any = None, backend: str | None = None,
                    strict: bool = False) -> tuple[Any, dict[str, Array], dict[str, Any] | None]:
    """A PEFT adapter folder saved with ``layer_replication``, with the base it belongs to: ``(adapter,
    replicated state dict, config)``. The state dict and config are :func:`replicate_state`'s; the adapter is
    the checkpoint read for that replicated model (its config without ``layer_replication``, which it already
    is the adapter of), so ``adapter.merge(replicated)`` is the merged deeper model, PEFT's *unmerged* model
    (see the module docstring for PEFT's own merge). Do not save this adapter as a PEFT adapter for the base
    model: PEFT would load it onto the unreplicated layers. Other refused config fields are still refused."""
    from pathlib import Path

    from ..config import check_supported
    from ..io.peft import CONFIG_NAME, WEIGHTS_NAME, _converter, adapter_from_tensors, read_config
    from ..io.safetensors import SafeTensorsFile

    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    config = read_config(folder / CONFIG_NAME, strict=strict)
    layer_map = getattr(config, FIELD, None)
    if layer_map is None:
        raise ConfigError(f"{folder / CONFIG_NAME}: no {FIELD} in the config; load it with peftmath.load_adapter")
    try:
        replicated, new_config = replicate_state(state, layer_map, model_config=model_config)
    except (ConfigError, ShapeError) as exc:
        raise type(exc)(f"{folder / CONFIG_NAME}: {exc}") from None
    plain = config.replace(**{FIELD: None})
    check_supported(plain, source=str(folder / CONFIG_NAME))
    tensors = SafeTensorsFile(folder / WEIGHTS_NAME)
    adapter = adapter_from_tensors(tensors, plain, metadata=tensors.metadata, source=folder / WEIGHTS_NAME,
                                   convert=_converter(xp, device, backend))
    return adapter, replicated, new_config


def replicated_view(adapter: Any, state: Mapping[str, Array]) -> tuple[Any, Mapping[str, Array]]:
    """``(adapter, state)`` as the adapter sees them: an adapter whose config has ``layer_replication`` (as
    ``create_adapter`` makes it) becomes the same modules with the field off, and the base ``state`` the replicated
    one (:func:`replicate_state`) that they belong to; any other adapter and ``state`` come back as given. The
    returned adapter merges, unmerges, runs and describes as any LoRA; save the one with the field for PEFT."""
    layer_map = getattr(adapter.config, FIELD, None)
    if layer_map is None:
        return adapter, state
    from ..adapter import Adapter

    plain = Adapter(adapter.config.replace(**{FIELD: None}), adapter.params, shared=adapter.shared,
                    layer_kinds=adapter.layer_kinds, model_type=adapter.model_type)
    return plain, replicate_state(state, layer_map)[0]


def distinct_arrays(state: Mapping[str, Array]) -> dict[str, Array]:
    """``state`` with every array object once (its first key): the parameters a model of shared weights has, as
    PyTorch's ``named_parameters()`` (and so PEFT's ``print_trainable_parameters``) counts them.

    >>> import numpy as np
    >>> w = np.zeros(2)
    >>> sorted(distinct_arrays({"a": w, "b": w, "c": np.ones(2)}))
    ['a', 'c']
    """
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        if id(value) not in seen:
            seen.add(id(value))
            out[key] = value
    return out
