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
from .errors import CheckpointError, ConfigError, UnsupportedError
from .io import config_from_dict, read_config
from .layers import Layer, LayerKind
from .methods import Method, describe_method
from .methods.lora_replication import FIELD as REPLICATION, replicate_state
from .targets import ALL_LINEAR, checkpoint_to_module, module_kinds, module_to_checkpoint, select_targets

__all__ = ["create_adapter", "open_state"]


class FileState(dict):
    """A state dict read from safetensors files (:func:`open_state`): its keys are in the files' sorted order, not
    in the model's parameter registration order that PEFT nests ``target_parameters`` wrappers by."""


def open_state(path: str | os.PathLike) -> tuple[dict[str, Any], str | None]:
    """A read-only state dict (memory-mapped arrays) and the ``model_type`` of a safetensors model.

    ``path`` is a ``.safetensors`` file or a model folder (``model.safetensors``, or shards with
    ``model.safetensors.index.json``, read with :func:`peftmath.io.stream.open_model`'s checks). The state is a
    :class:`FileState`: :func:`create_adapter` knows that its key order is not the registration order.
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
    return FileState({k: model.file_of(k)[k] for k in model.keys()}), model_type


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


# --------------------------------------------------------------------------------------------------
# LoRA's special targets: nn.MultiheadAttention modules and raw parameters (target_parameters)
# --------------------------------------------------------------------------------------------------
def _attentions(state: Mapping[str, Any], model_type: str | None) -> dict[str, int | str]:
    """The ``nn.MultiheadAttention`` modules of ``state`` by module name: the embedding size ``E`` of a packed one
    (``X.in_proj_weight (3E, E)`` and ``X.out_proj.weight (E, E)``), or why PEFT cannot adapt it (a string)."""
    out: dict[str, int | str] = {}
    for key, value in state.items():
        ckpt, _, leaf = key.rpartition(".")
        if leaf not in ("in_proj_weight", "q_proj_weight") or not ckpt or f"{ckpt}.out_proj.weight" not in state:
            continue
        name = checkpoint_to_module(ckpt, model_type)
        shape, out_shape = tuple(value.shape), tuple(state[f"{ckpt}.out_proj.weight"].shape)
        if leaf == "q_proj_weight":
            out[name] = ("separate q/k/v projection weights (kdim or vdim differs from embed_dim); PEFT 0.21.2's "
                         "lora.MultiheadAttention adapts the packed layout only (ValueError)")
        elif len(shape) == 2 and len(out_shape) == 2 and shape == (3 * shape[1], shape[1]) and out_shape == (shape[1],) * 2:
            out[name] = int(shape[1])
        else:
            out[name] = (f"in_proj_weight {shape} / out_proj.weight {out_shape} are not an attention's (3E, E) / (E, E)")
    return out


def _uses_modules(cfg: Any, model_type: str | None) -> bool:
    """Whether ``target_modules`` selects modules: not when it is ``[]``, nor when it is null beside
    ``target_parameters`` on a model type without PEFT's default (PEFT keeps null then and adapts parameters only)."""
    if not getattr(cfg, "target_parameters", None):
        return True
    tm = cfg.target_modules
    if tm is None:
        return model_type in default_targets(cfg.peft_type)
    return not (isinstance(tm, (list, tuple, set)) and not tm)


def _parameter_targets(cfg: Any, state: Mapping[str, Any], model_type: str | None, taken: Mapping[str, str], *,
                       order: Any, from_file: bool, is_transposed: bool | None) -> dict[str, Any]:
    """``{wrapper name: ParameterLayer}`` of the parameters ``cfg.target_parameters`` targets (PEFT's
    ``_inject_parameters``): a parameter ``<module>.<p>`` whose name equals a pattern or ends with ``"." +`` it;
    several of one module nest, the first in the module's registration order innermost
    (:func:`~peftmath.methods.lora_params.wrapper_names`). ``taken``: modules already adapted, with what adapts them."""
    from .methods.lora_params import TRANSPOSED_EXPERTS_MODEL_TYPES, ParameterLayer, wrapper_names

    patterns = list(getattr(cfg, "target_parameters", None) or ())
    if not patterns:
        return {}
    found: dict[str, list[str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for key, value in state.items():
        ckpt, _, leaf = key.rpartition(".")
        module = checkpoint_to_module(ckpt, model_type) if ckpt else ""
        full = f"{module}.{leaf}"
        if not any(full == t or full.endswith("." + t) for t in patterns):
            continue
        if not module:
            raise ConfigError(f"target_parameters: {leaf} is a parameter of the top-level module; PEFT 0.21.2 cannot "
                              f"wrap it (ValueError); target parameters of submodules")
        if module in taken:
            raise ConfigError(
                f"target_parameters: {full} belongs to {module}, which is already adapted ({taken[module]}); PEFT 0.21.2 "
                f"refuses to wrap a parameter of an adapted module (ValueError): remove {module} from target_modules "
                f"(target_modules=[] adapts the parameters only)")
        shape = tuple(int(s) for s in value.shape)
        if len(shape) not in (2, 3):
            raise ConfigError(f"target_parameters: {full} has shape {shape}; PEFT 0.21.2's ParamWrapper adapts 2-D and "
                              f"3-D parameters only (ValueError)")
        found.setdefault(module, []).append(leaf)
        shapes[full] = shape
    if not found:
        raise ConfigError(f"LORA: target_parameters ({', '.join(patterns)}) match no parameter of the model")
    transposed = model_type in TRANSPOSED_EXPERTS_MODEL_TYPES if is_transposed is None else bool(is_transposed)
    out: dict[str, Any] = {}
    for module, leaves in found.items():
        if len(leaves) > 1:
            if order is not None:
                missing = [p for p in leaves if p not in order]
                if missing:
                    raise ConfigError(f"{module}: parameter_order {list(order)} does not list its targeted parameter(s) "
                                      f"{', '.join(missing)}")
                leaves = sorted(leaves, key=list(order).index)
            elif from_file:
                raise ConfigError(
                    f"{module}: target_parameters names {len(leaves)} of its parameters ({', '.join(leaves)}); PEFT nests "
                    f"their wrappers in the module's registration order, which a safetensors file does not keep (its "
                    f"keys are sorted). Pass parameter_order=[...] (e.g. ['gate_up_proj', 'down_proj'] for "
                    f"transformers' experts modules), or the base as a PyTorch state_dict() (its order is the "
                    f"registration order)")
        for wrapper, leaf in wrapper_names(module, leaves).items():
            key = f"{module}.{leaf}"
            shape = shapes[key]
            out[wrapper] = ParameterLayer(LayerKind.LINEAR, shape, parameter=key, transposed=len(shape) == 3 and transposed)
    return out


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
    parameter_order: Any = None,
    is_transposed: bool | None = None,
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

    LoRA also adapts, as PEFT does (specs/lora.md, 12):

    * an ``nn.MultiheadAttention`` ``X`` that ``target_modules`` names (``X.in_proj_weight (3E, E)`` and
      ``X.out_proj.weight`` in the base): modules ``X`` and ``X.base_layer.out_proj``, both with ``X``'s ``r`` /
      ``lora_alpha`` (:func:`peftmath.methods._lora_mha.initialize`);
    * the parameters ``target_parameters`` names (2-D, or 3-D experts ``(E, d1, d2)``): one wrapper per parameter,
      named as PEFT's model names it (:func:`peftmath.methods.lora_params.initialize`). Several parameters of one
      module nest in the module's registration order: the base mapping's key order (a PyTorch ``state_dict()``
      keeps it), or ``parameter_order`` (the parameter names, first registered first), which a base read from
      safetensors files (sorted keys) needs. ``is_transposed``: whether the experts modules store ``(E, in, out)``
      (transformers' ``is_transposed``); None: True for the model types whose experts do
      (:data:`~peftmath.methods.lora_params.TRANSPOSED_EXPERTS_MODEL_TYPES`), else False.

    Their inits are ``true``, ``false`` and ``"gaussian"``; other values, and what PEFT refuses there, are refused.

    * ``layer_replication`` (LoRA, AdaLoRA): PEFT adapts the deeper model it builds first, whose layers are copies
      of the base's sharing their weights (:func:`peftmath.methods.lora_replication.replicate_state`, the same layer
      map); so does ``create_adapter``. Module names, ``layer_kinds``, ``layers_to_transform`` and the seed streams
      are the replicated model's (``model.layers.3.q_proj`` adapts new layer 3), every copy gets factors of its own,
      and the config keeps the field, so that PEFT replicates the layers again when it loads the adapter. A layer
      map that does not fit the base's layers, or a base without a stack of layers PEFT can replicate, is refused
      (:class:`ConfigError` / :class:`ShapeError`), as is an initialisation that changes the base weights (the
      copies share them; :class:`UnsupportedError`). Merge or run it with the replicated state
      (:func:`~peftmath.methods.lora_replication.replicated_view`; once saved,
      :func:`~peftmath.methods.lora_replication.load_replicated`: ``peftmath.load_adapter`` refuses it).
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
    layer_map = getattr(cfg, REPLICATION, None)
    if layer_map is not None:  # the deeper model PEFT adapts (replicate_layers), its copies sharing the base's arrays
        state = replicate_state(state, layer_map)[0]
        cfg = cfg.replace(**{REPLICATION: None})
    # module names as transformers (and PEFT) name them; the state dict keeps the checkpoint's names
    hints = {module_to_checkpoint(k, model_type): v for k, v in (layer_kinds or {}).items()}
    kinds = {checkpoint_to_module(n, model_type): k
             for n, k in module_kinds(state, layer_kinds=hints, model_type=model_type).items()}
    attentions = _attentions(state, model_type) if method.multihead_attention else {}
    targets: dict[str, LayerKind] = {}
    if _uses_modules(cfg, model_type):
        tm = cfg.target_modules
        every_linear = isinstance(tm, str) and tm.lower() == ALL_LINEAR
        candidates = dict(kinds) if every_linear else {**kinds, **{x: LayerKind.LINEAR for x in attentions}}
        targets = select_targets(cfg, candidates, model_type=model_type, supported=module_cls.supported_kinds)
    attention = {x: attentions[x] for x in targets if x in attentions}
    for x, e in attention.items():
        del targets[x]
        if isinstance(e, str):
            raise ConfigError(f"{x}: an nn.MultiheadAttention named by target_modules with {e}")
        if f"{x}.out_proj" in targets:
            raise ConfigError(
                f"{x}.out_proj: target_modules names both the nn.MultiheadAttention {x} and its out_proj; PEFT 0.21.2 "
                f"adapts the out-projection inside the attention already ({x}.base_layer.out_proj) and registers a "
                f"second LoRA on it that the attention never runs (saving a copy of the out-projection's weights in the "
                f"adapter); drop the entry that names out_proj")
    taken = {**{m: "target_modules" for m in targets},
             **{y: f"as the nn.MultiheadAttention {x}" for x in attention for y in (x, f"{x}.out_proj")}}
    wrappers = _parameter_targets(cfg, state, model_type, taken, order=parameter_order,
                                  from_file=isinstance(base, (str, os.PathLike, FileState)), is_transposed=is_transposed)
    cfg = _default_feedforward(cfg, model_type)

    def weight_of(name: str) -> Any:
        return state[f"{module_to_checkpoint(name, model_type)}.weight"]

    layers = {name: Layer.of(tuple(weight_of(name).shape), kind) for name, kind in targets.items()}
    shared: dict[str, Any] = {}
    if method.init_shared is not None:
        shared = method.init_shared(cfg, layers, seed=seed, xp=xp, device=device)
    params: dict[str, dict[str, Any]] = {}
    new_base: dict[str, Any] = {}
    special = {**wrappers, **{m: e for x, e in attention.items() for m in (x, f"{x}.base_layer.out_proj")}}
    order = {m: i for i, m in enumerate(sorted([*layers, *special]))}  # seed stream i: the i-th module, sorted
    if special:
        params.update(_init_special(cfg, special, order, seed=seed, xp=xp, device=device, init=init, progress=progress))
    for name, layer in layers.items():
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(order[name],)))
        weight = weight_of(name)
        p, w = method.initialize(name, cfg, layer, weight=weight, seed=rng, xp=xp, device=device, init=init,
                                 shared=shared or None)
        params[name] = p
        if w is not None and layer_map is not None:
            raise UnsupportedError(_replicated_base_change(method, cfg, layer_map, name, init))
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
    if cfg.target_modules is None and model_type in default_targets(cfg.peft_type):  # PEFT writes the table's entry
        entry = default_targets(cfg.peft_type)[model_type]  # (null is left only beside target_parameters)
        cfg = cfg.replace(target_modules=entry if isinstance(entry, str) else sorted(entry))
    elif isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == "all-linear":
        cfg = cfg.replace(target_modules=sorted(layers))  # PEFT saves "all-linear" expanded to module names
    if any(k is LayerKind.CONV1D_TRANSPOSED for k in targets.values()) and hasattr(cfg, "fan_in_fan_out"):
        cfg = cfg.replace(fan_in_fan_out=True)  # as PEFT's saved config says once a Conv1D was adapted
    if special:
        params = dict(sorted(params.items()))
    if layer_map is not None:
        cfg = cfg.replace(**{REPLICATION: layer_map})  # PEFT replicates the layers on load, then finds the modules
    adapter = Adapter(cfg, params, shared=shared, layer_kinds=targets, model_type=model_type)
    return (adapter, new_base) if return_base else adapter


def _replicated_base_change(method: Method, cfg: Any, layer_map: Any, name: str, init: Any) -> str:
    """Why an initialisation that changes the base weights is refused with ``layer_replication``."""
    field = method.init_field or "init"
    value = init if init is not None else getattr(cfg, field, None)
    return (f"{REPLICATION}={layer_map!r} with {field}={value!r}: this initialisation rewrites "
            f"the base weight of every adapted module ({name} first), and the copies of a replicated layer share one "
            f"base weight, so PEFT would rewrite it once per copy (each copy's factors then start from another "
            f"copy's residual) and no base model fits the adapter; use an initialisation that leaves the base "
            f"unchanged (e.g. {field}=true), or leave out {REPLICATION}")


def _init_special(cfg: Any, special: Mapping[str, Any], order: Mapping[str, int], *, seed: int, xp: Any, device: Any,
                  init: Any, progress: Any) -> dict[str, dict[str, Any]]:
    """The factors of LoRA's target_parameters wrappers (a ParameterLayer each) and attention projections (their
    attention's embedding size), each from its seed stream ``order[name]``."""
    from .methods import _lora_mha, lora_params

    out = {}
    for name, what in special.items():
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(order[name],)))
        if isinstance(what, int):
            out[name] = _lora_mha.initialize(name, cfg, what, seed=rng, xp=xp, device=device, init=init)
        else:
            out[name] = lora_params.initialize(name, cfg, what, seed=rng, xp=xp, device=device, init=init)
        if progress is not None:
            progress(1)
    return out
