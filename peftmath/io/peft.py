"""PEFT's on-disk adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Checkpoint keys are ``base_model.model.<module>.<suffix>`` where ``<module>`` is the module path in
the base model and ``<suffix>`` a parameter of the method (``lora_A.weight``, ``lora_embedding_A``,
``lora_magnitude_vector``, ``hada_w1_a``, ...); the adapter name (``default``) is not in the file.
A checkpoint written by ``inject_adapter_in_model`` has no ``base_model.model.`` prefix; both load.
Keys that are not adapter parameters (``modules_to_save`` copies, trained biases) are kept as
base-model tensors that the adapter replaces on merge.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..adapter import Adapter
from ..backends import backend_for, get_backend
from ..errors import CheckpointError, ConfigError
from ..methods import get_method
from .safetensors import SafeTensorsFile, atomic_path, save_file

__all__ = ["load_adapter", "save_adapter", "read_config", "config_from_dict", "split_key", "PREFIX"]

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
#: peft_version written into configs that peftmath creates
PEFT_VERSION = "0.21.2"


def config_from_dict(data: Mapping[str, Any], *, source: str = "config") -> Any:
    """A typed config from an adapter_config.json dict (its ``peft_type`` picks the class)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if "peft_type" not in data:
        raise ConfigError(f"{source}: no 'peft_type' field; is this a PEFT adapter_config.json?")
    try:
        method = get_method(data["peft_type"])
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return method.Config.from_dict(data, source=source)


def read_config(path: str | os.PathLike) -> Any:
    """Read an ``adapter_config.json`` (or the folder holding it) into a typed config."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_NAME
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no such file (an adapter folder holds {CONFIG_NAME})") from None
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from exc
    return config_from_dict(data, source=str(p))


def split_key(key: str, suffixes: tuple[str, ...]) -> tuple[str, str] | None:
    """``"base_model.model.a.b.lora_A.weight"`` -> ``("a.b", "lora_A.weight")``; None when no suffix fits.

    >>> split_key("base_model.model.model.layers.0.q_proj.lora_A.weight", ("lora_A.weight",))
    ('model.layers.0.q_proj', 'lora_A.weight')
    """
    body = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for suffix in sorted(suffixes, key=len, reverse=True):
        if body.endswith("." + suffix):
            return body[: -len(suffix) - 1], suffix
    return None


def load_adapter(
    path: str | os.PathLike,
    *,
    xp: Any = None,
    device: Any = None,
    backend: str | None = None,
) -> Adapter:
    """Load a PEFT adapter folder (or its ``adapter_model.safetensors``).

    Arrays are memory-mapped NumPy arrays by default (read-only, no copy); pass ``xp`` (an array
    namespace) and ``device``, or ``backend="cupy"``, to get them in another library.
    """
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    weights = p if p.is_file() else folder / WEIGHTS_NAME
    if not folder.exists() or not p.exists():
        raise CheckpointError(f"{p}: no such adapter folder")
    if not weights.exists():
        if (folder / PICKLE_NAME).exists():
            raise CheckpointError(
                f"{folder / PICKLE_NAME}: pickle checkpoints are never loaded (they can run arbitrary code). "
                f"Convert it once with a trusted PEFT install: "
                f"PeftModel.from_pretrained(model, dir).save_pretrained(out, safe_serialization=True)"
            )
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} in the adapter folder")
    config = read_config(folder / CONFIG_NAME)
    method = get_method(config.peft_type)
    tensors = SafeTensorsFile(weights)
    suffixes = tuple(method.PARAMETER_SUFFIXES)
    shared_keys = tuple(getattr(method, "SHARED_KEYS", ()))
    params: dict[str, dict[str, Any]] = {}
    shared: dict[str, Any] = {}
    other: dict[str, Any] = {}
    convert = _converter(xp, device, backend)
    for key in tensors:
        array = convert(tensors[key])
        if key in shared_keys:
            shared[key] = array
            continue
        parts = split_key(key, suffixes)
        if parts is not None:
            module, suffix = parts
            params.setdefault(module, {})[suffix] = array
            continue
        base_key = key[len(PREFIX):] if key.startswith(PREFIX) else key
        other[base_key.replace(".base_layer.", ".")] = array
    if not params and not getattr(method, "ALLOWS_NO_MODULES", False):
        raise CheckpointError(
            f"{weights}: no {config.peft_type} parameters found (expected keys ending in {', '.join(suffixes)})"
        )
    if hasattr(method, "validate_checkpoint"):
        method.validate_checkpoint(config, shared)
    kinds = _layer_kinds_from_metadata(tensors.metadata, weights)
    return Adapter(config, params, shared=shared, other=other, layer_kinds=kinds)


#: safetensors metadata key under which save_adapter records the layer kinds it knows
LAYER_KINDS_KEY = "peftmath.layer_kinds"


def _layer_kinds_from_metadata(metadata: Mapping[str, str], path: Path) -> dict[str, str]:
    raw = metadata.get(LAYER_KINDS_KEY)
    if raw is None:
        return {}
    from ..layers import LayerKind

    try:
        kinds = json.loads(raw)
        if not isinstance(kinds, dict):
            raise ValueError("not an object")
        for value in kinds.values():
            LayerKind.parse(value)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: metadata {LAYER_KINDS_KEY!r} is not a valid layer-kind map ({exc})") from None
    return kinds


def _converter(xp: Any, device: Any, backend: str | None):
    if backend is not None:
        b = get_backend(backend)
        if xp is None:
            xp = getattr(b, "namespace", lambda: None)()
            if xp is None:
                raise CheckpointError(f"backend {backend!r} does not name an array namespace; pass xp= as well")
    if xp is None:
        return lambda a: a
    b = backend_for(xp)
    return lambda a: b.from_host(np.asarray(a), xp, device)


def save_adapter(adapter: Adapter, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``adapter`` as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

    Both files are written to temporary names and renamed into place, the config last.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, array in adapter.state_dict().items():
        tensors[key] = _to_host(array)
    meta = {"format": "pt", **(metadata or {})}
    if adapter.layer_kinds:
        meta[LAYER_KINDS_KEY] = json.dumps({k: v.value for k, v in sorted(adapter.layer_kinds.items())})
    save_file(tensors, folder / WEIGHTS_NAME, metadata=meta)
    data = adapter.config.to_dict()
    data.setdefault("peft_version", PEFT_VERSION)
    if data.get("peft_version") is None:
        data["peft_version"] = PEFT_VERSION
    data["inference_mode"] = True
    tmp = atomic_path(folder / CONFIG_NAME)
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, folder / CONFIG_NAME)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return folder


def _to_host(array: Any) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    from .._array import namespace

    return backend_for(namespace(array)).to_host(array)


