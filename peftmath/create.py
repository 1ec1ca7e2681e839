"""``create_adapter``: start a new adapter for a base model, without PyTorch (PEFT's ``get_peft_model``).

The base model is a state dict of arrays, or a ``.safetensors`` file, or a folder of them (with
``model.safetensors.index.json`` for shards, and the transformers ``config.json`` whose ``model_type``
selects PEFT's default targets and GPT-2's Conv1D layout).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._peft_tables import IA3_FEEDFORWARD, default_targets
from .adapter import Adapter
from .errors import CheckpointError, ConfigError
from .io import config_from_dict, read_config
from .layers import Layer, LayerKind
from .methods import Method, describe_method
from .targets import checkpoint_to_module, module_kinds, module_to_checkpoint, select_targets

__all__ = ["create_adapter", "open_state"]


def open_state(path: str | os.PathLike) -> tuple[dict[str, Any], str | None]:
    """A read-only state dict (memory-mapped arrays) and the ``model_type`` of a safetensors model.

    ``path`` is a ``.safetensors`` file or a model folder (``model.safetensors``, or shards with
    ``model.safetensors.index.json``, read with :func:`peftmath.io.stream.open_model`'s checks).
    """
    from .io.stream import open_model

    model = open_model(path)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    model_type = None
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise CheckpointError(f"{cfg}: not a valid transformers config.json ({exc})") from exc
    return {k: model.file_of(k)[k] for k in model.keys()}, model_type


def _config(config: Any) -> Any:
    if isinstance(config, (str, os.PathLike)):
        return read_config(config)
    if isinstance(config, Mapping):
        return config_from_dict(config, source="config dict")
    if not hasattr(config, "peft_type"):
        raise ConfigError(f"config must be a peftmath config, a dict or a path, got {type(config).__name__}")
    return config


def _initialised(cfg: Any, method: Method) -> Any:
    """The config to save with factors that an initialisation changing the base (PiSSA, OLoRA, LoftQ)
    produced: the method's init field (``init_lora_weights``, ``init_weights``, ...) set to True, as PEFT's own
    ``save_pretrained(path_initial_model_for_weight_conversion=...)`` and its PiSSA / OLoRA / LoftQ
    examples write. Saved as ``"pissa"``, PEFT would run PiSSA again when it loads the adapter onto the
    new (residual) base and subtract the principal part a second time. LoftQ's ``loftq_config`` goes too
    (PEFT warns that it is ignored otherwise)."""
    changes: dict[str, Any] = {method.init_field: True}
    if getattr(cfg, "loftq_config", None):
        changes["loftq_config"] = {}
    return cfg.replace(**changes)


def _default_feedforward(cfg: Any, model_type: str | None) -> Any:
    """IA3: a null ``feedforward_modules`` is filled from PEFT's table for the model type
    (``TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING``), as ``get_peft_model`` does before it
    saves the config; left null, the adapter would scale a Llama's ``down_proj`` output where PEFT scales
    its input. With a list of targets only the entries in it are kept (PEFT refuses to load a config whose
    feedforward modules are not a subset of its targets). Other model types keep null: no feedforward
    module (PEFT asks for the field there)."""
    if not hasattr(cfg, "feedforward_modules") or cfg.feedforward_modules is not None:
        return cfg
    table = IA3_FEEDFORWARD.get(model_type or "")
    if table is None:
        return cfg
    tm = cfg.target_modules
    listed = tm is not None and not isinstance(tm, str)
    return cfg.replace(feedforward_modules=sorted(m for m in table if not listed or m in tm))


def create_adapter(
    base: Mapping[str, Any] | str | os.PathLike,
    config: Any,
    *,
    seed: int = 0,
    layer_kinds: Mapping[str, LayerKind | str] | None = None,
    model_type: str | None = None,
    init: Any = None,
    return_base: bool = False,
    xp: Any = None,
    device: Any = None,
    progress: Any = None,
) -> Adapter | tuple[Adapter, dict[str, Any]]:
    """A new adapter of ``config``'s method on the modules of ``base`` that PEFT would adapt.

    Modules are selected with PEFT's rules (:mod:`peftmath.targets`); each is initialised by its
    method's ``Module.initialize`` with PEFT's placement of the zeros (a default adapter is a no-op),
    from random numbers drawn on the host: module ``i`` (in sorted order) uses
    ``numpy.random.default_rng(SeedSequence(seed, spawn_key=(i,)))``.

    Initialisations that change the base weight (PiSSA, OLoRA) need ``return_base=True``; the result is
    then ``(adapter, updated_tensors)`` with the new base weights by state-dict key, and the adapter's
    config says ``init_lora_weights=True``: its factors belong to the new base and must not be
    initialised again when PEFT loads them (see :func:`_initialised`). PiSSA (``init_lora_weights="pissa"``)
    takes a full SVD of every target weight, minutes on a large model; ``"pissa_niter_K"`` (PEFT's fast
    PiSSA, a randomized SVD with ``K`` subspace iterations) takes seconds.

    ``progress(1)``, when given, is called after each module is initialised.
    """
    if isinstance(base, (str, os.PathLike)):
        state, found_type = open_state(base)
        model_type = model_type or found_type
    else:
        state = dict(base)
    cfg = _config(config)
    method = describe_method(cfg.peft_type)
    module_cls = method.module
    if module_cls is None:
        raise ConfigError(f"{cfg.peft_type}: create_adapter covers the per-module methods; this one has no module math")
    # module names as transformers (and PEFT) name them; the state dict keeps the checkpoint's names
    hints = {module_to_checkpoint(k, model_type): v for k, v in (layer_kinds or {}).items()}
    kinds = {checkpoint_to_module(n, model_type): k
             for n, k in module_kinds(state, layer_kinds=hints, model_type=model_type).items()}
    targets = select_targets(cfg, kinds, model_type=model_type, supported=module_cls.supported_kinds)
    cfg = _default_feedforward(cfg, model_type)

    def weight_of(name: str) -> Any:
        return state[f"{module_to_checkpoint(name, model_type)}.weight"]

    layers = {name: Layer.of(tuple(weight_of(name).shape), kind) for name, kind in targets.items()}
    shared: dict[str, Any] = {}
    if method.init_shared is not None:
        shared = method.init_shared(cfg, layers, seed=seed, xp=xp, device=device)
    params: dict[str, dict[str, Any]] = {}
    new_base: dict[str, Any] = {}
    for i, (name, layer) in enumerate(layers.items()):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
        weight = weight_of(name)
        p, w = method.initialize(name, cfg, layer, weight=weight, seed=rng, xp=xp, device=device, init=init,
                                 shared=shared or None)
        params[name] = p
        if w is not None:
            new_base[f"{module_to_checkpoint(name, model_type)}.weight"] = w
        if progress is not None:
            progress(1)
    if getattr(cfg, "trainable_token_indices", None):  # LoRA's trainable tokens: the rows start as the table's own
        from .methods._lora_tokens import initial_rows

        params.update(initial_rows(cfg, state, model_type=model_type))
    if new_base and not return_base:
        raise ConfigError(
            f"{cfg.peft_type}: this initialisation changes the base weights ({len(new_base)} tensors); "
            f"call create_adapter(..., return_base=True) to receive them, or the adapter is wrong for the old base"
        )
    if new_base:
        cfg = _initialised(cfg, method)
    if cfg.target_modules is None:  # PEFT writes the default table's entry into the saved config
        entry = default_targets(cfg.peft_type)[model_type]  # (select_targets refused an unknown type)
        cfg = cfg.replace(target_modules=entry if isinstance(entry, str) else sorted(entry))
    elif isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == "all-linear":
        cfg = cfg.replace(target_modules=sorted(layers))  # PEFT saves "all-linear" expanded to module names
    if any(k is LayerKind.CONV1D_TRANSPOSED for k in targets.values()) and hasattr(cfg, "fan_in_fan_out"):
        cfg = cfg.replace(fan_in_fan_out=True)  # as PEFT's saved config says once a Conv1D was adapted
    adapter = Adapter(cfg, params, shared=shared, layer_kinds=targets, model_type=model_type)
    return (adapter, new_base) if return_base else adapter
