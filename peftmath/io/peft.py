r"""PEFT's on-disk adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Checkpoint keys are ``base_model.model.<module>.<suffix>`` where ``<module>`` is the module path in
the base model and ``<suffix>`` a parameter of the method (``lora_A.weight``, ``lora_embedding_A``,
``lora_magnitude_vector``, ``hada_w1_a``, ...); the adapter name (``default``) is not in the file.
A checkpoint written by ``inject_adapter_in_model`` has no ``base_model.model.`` prefix; both load.
Every tensor of the checkpoint must be understood (design rule 9): a parameter of the method (its
``Method.parameter_suffixes``), a tensor the method shares (``Method.is_shared``: its ``shared_keys`` or a key matching its
``shared_key_pattern``), or a base-model tensor the adapter replaces, as PEFT saves them:

* ``<module>.<name>`` under a ``modules_to_save`` module (PEFT's rule ``(^|.*\.)m($|\..*)``);
* ``<adapted module>.base_layer.<name>``: the base layer's bias with ``bias="lora_only"`` / ``"all"``, or a
  targeted embedding layer saved with ``save_embedding_layers``;
* ``<module>.weight`` / ``<module>.bias`` of a module that is not adapted: a bias trained with
  ``bias="all"``, an embedding layer PEFT saved because it was resized, or any base parameter PEFT's
  loader would copy into the model (``load_state_dict`` of the wrapped model). The base tensors of an
  adapted module are ``<module>.base_layer.*``; PEFT ignores ``<module>.weight`` there, and so is it refused.

Anything else fails the load with a :class:`~peftmath.errors.CheckpointError` listing the keys and what
they look like (KaSA's ``lora_diag``, trainable tokens, ...); a replacement whose base tensor does not
exist is refused when merging (:meth:`~peftmath.Adapter.merge`). A config field that switches on a PEFT
variant peftmath does not implement is refused by name (:func:`peftmath.config.check_supported`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._mha import base_module, check_pairs, out_proj_owner
from .._peft_tables import PEFT_VERSION, UNKNOWN_TENSORS
from ..adapter import Adapter
from ..backends import backend_for, get_backend
from ..config import check_supported, strict_fields
from ..errors import CheckpointError, ConfigError, UnsupportedError
from ..methods import describe_method
from .safetensors import SafeTensorsFile, atomic_path, save_file

__all__ = ["load_adapter", "adapter_from_tensors", "save_adapter", "read_config", "config_from_dict", "split_key",
           "PREFIX"]

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


def config_from_dict(data: Mapping[str, Any], *, source: str = "config", strict: bool = False) -> Any:
    """A typed config from an adapter_config.json dict (its ``peft_type`` picks the class).

    A field that neither peftmath's config class nor PEFT 0.21.2 knows (``lora_alfa``) warns with the
    closest known field (:class:`~peftmath.errors.PeftMathWarning`); ``strict=True`` makes it a
    :class:`~peftmath.errors.ConfigError`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if "peft_type" not in data:
        raise ConfigError(f"{source}: no 'peft_type' field; is this a PEFT adapter_config.json?")
    try:
        method = describe_method(data["peft_type"])
    except (ConfigError, UnsupportedError) as exc:  # unknown, or a PEFT method peftmath lacks
        raise type(exc)(f"{source}: {exc}") from None
    with strict_fields(strict):
        return method.config.from_dict(data, source=source)


def read_config(path: str | os.PathLike, *, strict: bool = False) -> Any:
    """Read an ``adapter_config.json`` (or the folder holding it) into a typed config (``strict``: as
    :func:`config_from_dict`)."""
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
    return config_from_dict(data, source=str(p), strict=strict)


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
    strict: bool = False,
) -> Adapter:
    """Load a PEFT adapter folder (or its ``adapter_model.safetensors``).

    Arrays are memory-mapped NumPy arrays by default (read-only, no copy); pass ``xp`` (an array
    namespace) and ``device``, or ``backend="cupy"``, to get them in another library.

    Refused: a tensor that is neither the method's, nor shared, nor a base tensor the adapter replaces
    (:class:`~peftmath.errors.CheckpointError` listing them), and a config field that switches on a PEFT
    variant peftmath does not implement (:class:`~peftmath.errors.UnsupportedError`). An unknown config
    field warns, or with ``strict=True`` raises :class:`~peftmath.errors.ConfigError`.
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
    config = read_config(folder / CONFIG_NAME, strict=strict)
    check_supported(config, source=str(folder / CONFIG_NAME))
    tensors = SafeTensorsFile(weights)
    return adapter_from_tensors(tensors, config, metadata=tensors.metadata, source=weights,
                                convert=_converter(xp, device, backend))


def adapter_from_tensors(tensors: Mapping[str, Any], config: Any, *, metadata: Mapping[str, str] | None = None,
                         source: str | os.PathLike = "tensors", convert: Callable[[Any], Any] = lambda a: a) -> Adapter:
    """An :class:`Adapter` from PEFT-format ``tensors`` (``{"base_model.model.<module>.<suffix>": array}``, a
    mapping or an open safetensors file) and its parsed ``config``: every key is the method's (per module),
    shared (the method's shared keys), a base tensor the adapter replaces, or refused (:class:`CheckpointError`
    listing the tensors nobody owns) — the one reading of a PEFT checkpoint that :func:`load_adapter` and
    :func:`peftmath.convert` share. ``convert`` maps each array (to another library / device)."""
    check_supported(config, source=str(source))  # a variant peftmath refuses, by name (load_adapter: already)
    method = describe_method(config.peft_type)
    weights = Path(source)
    suffixes = method.parameter_suffixes
    shared_keys = {key for key in tensors if method.is_shared(key)}
    found: dict[str, tuple[str, str]] = {}
    rest: list[str] = []
    for key in tensors:
        parts = None if key in shared_keys else split_key(key, suffixes)
        if parts is not None and ("base_layer" not in parts[0].split(".")
                                  or (method.multihead_attention and out_proj_owner(parts[0]) is not None)
                                  or (method.wrapped_module is not None and method.wrapped_module(config, parts[0]))):
            found[key] = parts  # (an nn.MultiheadAttention's out-projection: X.base_layer.out_proj, peftmath._mha)
        elif key not in shared_keys:
            rest.append(key)
    modules = {m for m, _ in found.values()}
    check_pairs(modules, str(weights))
    replaced = _replacements(rest, config, modules)
    unknown = [k for k in rest if k not in replaced]
    if unknown:
        raise CheckpointError(_unknown_tensors_message(weights, unknown, config, suffixes, modules))
    params: dict[str, dict[str, Any]] = {}
    shared: dict[str, Any] = {}
    other: dict[str, Any] = {}
    for key in tensors:
        array = convert(tensors[key])
        if key in found:
            module, suffix = found[key]
            params.setdefault(module, {})[suffix] = array
        elif key in replaced:
            other[replaced[key]] = array
        else:
            shared[key] = array
    if method.validate_checkpoint is not None:  # first: a method's own reason (UniLoRA without its indices)
        method.validate_checkpoint(config, shared)
    from ..methods._lora_tokens import check_token_modules  # LoRA's trainable tokens: the rows the config names

    check_token_modules(config, params, str(weights))
    if not params and not method.allows_no_modules:
        raise CheckpointError(
            f"{weights}: no {config.peft_type} parameters found (expected keys ending in {', '.join(suffixes)})"
        )
    kinds = _layer_kinds_from_metadata(metadata or {}, weights)
    return Adapter(config, params, shared=shared, other=other, layer_kinds=kinds)


def _replacements(keys: list[str], config: Any, modules: set[str]) -> dict[str, str]:
    """``{checkpoint key: base key}`` for the keys of ``keys`` that are base tensors the adapter replaces,
    as PEFT's loader applies them (``load_state_dict`` of the wrapped model; see the module docstring);
    the others are not understood. ``modules``: the adapted modules."""
    out = {}
    to_save = list(getattr(config, "modules_to_save", None) or [])
    for key in keys:
        body = key[len(PREFIX):] if key.startswith(PREFIX) else key
        module, _, leaf = body.rpartition(".")
        if ".base_layer." in body:
            owner, _, inner = body.rpartition(".base_layer.")
            if owner in modules and "." not in inner:  # the wrapped layer's own weight / bias (an attention's
                out[key] = f"{base_module(owner)}.{inner}"  # X.base_layer.out_proj.base_layer.bias: X.out_proj.bias)
        elif any(_under(body, m) for m in to_save):
            out[key] = body  # a modules_to_save copy: any of its tensors (weight, bias, buffers)
        elif module and module not in modules and leaf in ("weight", "bias"):
            # a bias trained with bias="all", a saved embedding layer, or any base parameter PEFT's
            # loader would copy into the model; Adapter.merge checks that the base has it. (The
            # base tensors of an adapted module live under <module>.base_layer: PEFT ignores <module>.weight.)
            out[key] = body
    return out


def _under(body: str, module: str) -> bool:
    r"""True when tensor ``body`` belongs to module ``module`` or a submodule of it (PEFT's
    ``modules_to_save`` rule ``(^|.*\.)m($|\..*)`` on module names)."""
    try:
        return re.match(rf"(^|.*\.){module}\..+", body) is not None
    except re.error:
        return re.match(rf"(^|.*\.){re.escape(module)}\..+", body) is not None


def _unknown_tensors_message(weights: Path, unknown: list[str], config: Any, suffixes: tuple[str, ...],
                             modules: set[str]) -> str:
    def looks(key: str) -> str:
        body = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for pattern, what in UNKNOWN_TENSORS:
            if re.search(pattern, body):
                return f"{what}: not implemented in peftmath"
        module, _, leaf = body.rpartition(".")
        if module in modules and leaf in ("weight", "bias"):
            return (f"a base tensor of the adapted module {module}, which PEFT saves and loads as "
                    f"{module}.base_layer.{leaf}: PEFT would ignore it")
        return "neither a parameter of this method nor a base-model parameter (weight / bias) it could replace"

    shown = "; ".join(f"{k!r} ({looks(k)})" for k in unknown[:5])
    more = f"; and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    to_save = getattr(config, "modules_to_save", None)
    return (f"{weights}: {len(unknown)} tensor(s) that this {config.peft_type} adapter cannot account for: {shown}{more}. "
            f"Every tensor must be a {config.peft_type} parameter ({', '.join(suffixes) or 'none'}), a shared tensor, or "
            f"a base-model tensor the adapter replaces (under modules_to_save={to_save!r}, <module>.base_layer.* of "
            f"an adapted module, or another module's weight / bias); peftmath refuses the adapter rather than merge "
            f"it without them")


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


