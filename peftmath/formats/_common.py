"""What every format module shares: the format names, :class:`Converted`, :class:`ConversionWarning`,
the metadata key that carries what a target cannot store, small array and message helpers, and the
atomic writer behind :meth:`Converted.save`."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..adapter import Adapter
from ..errors import CheckpointError, ConfigError, PeftMathWarning, UnsupportedError
from ..io.safetensors import atomic_path, save_file

#: the formats :func:`convert` writes and :func:`read_any` reads (GGUF: written only)
FORMATS = ("peft", "kohya", "mlx", "candle-lora", "gguf")
_ALIASES = {"lycoris": "kohya", "candle": "candle-lora", "candle_lora": "candle-lora", "mlx-lm": "mlx", "hf": "peft"}

PEFT_PREFIX = "base_model.model."
#: safetensors metadata key holding what a target format cannot store (module names, alpha, kinds)
META_KEY = "peftmath.convert"


class ConversionWarning(PeftMathWarning):
    """Something the target format does not store (alpha, module names) or a tool's own drop rule."""


@dataclass
class Converted:
    """An adapter in a target format, in memory: tensors (NumPy), config (JSON dict or None), metadata."""

    format: str
    tensors: dict[str, np.ndarray]
    config: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write to ``path``: a folder for PEFT and MLX, a ``.safetensors`` file for kohya and candle-lora,
        a ``.gguf`` file for GGUF."""
        return _write(self, Path(path), force=force)


# ==================================================================================================
# helpers
# ==================================================================================================
def _fmt(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        raise ConfigError(f"unknown adapter format {name!r}; known formats: {', '.join(FORMATS)}")
    return key


def _host(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    from .._array import namespace
    from ..backends import backend_for

    return backend_for(namespace(a)).to_host(a)


def _t(a: np.ndarray) -> np.ndarray:
    """A C-contiguous transpose of a 2-D array (same bits)."""
    return np.ascontiguousarray(np.asarray(a).T)


def _some(names: Iterable[str], n: int = 6) -> str:
    names = sorted(names)
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "") if names else "(none)"


def _scalar(value: float) -> np.ndarray:
    """A 0-d alpha tensor: float32 when that holds the value exactly, else float64."""
    value = float(value)
    f32 = np.array(value, dtype=np.float32)
    return f32 if float(f32) == value else np.array(value, dtype=np.float64)


def _number(x: float) -> float | int:
    x = float(x)
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


def _most_common(values: list) -> Any:
    return Counter(values).most_common(1)[0][0]


def _patterns(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A default value and the per-module exceptions (rank_pattern / alpha_pattern)."""
    default = _most_common(list(values.values()))
    return default, {m: v for m, v in sorted(values.items()) if v != default}


def _check_peft_only(adapter: Adapter, target: str, *, allowed: tuple[str, ...], extra_ok: bool = False) -> None:
    if adapter.peft_type not in allowed:
        raise UnsupportedError(
            f"{target} cannot hold a {adapter.peft_type} adapter (it holds {', '.join(allowed)}); "
            f"every module's {adapter.peft_type} parameters would be lost"
        )
    if adapter.shared:
        raise UnsupportedError(f"{target} has no place for the shared tensors {_some(adapter.shared)}; they would be lost")
    if adapter.other and not extra_ok:
        raise UnsupportedError(
            f"{target} has no place for the base-model tensors the adapter replaces (modules_to_save / trained "
            f"biases): {_some(adapter.other)}; they would be lost"
        )


def _meta_json(data: dict[str, Any]) -> dict[str, str]:
    return {META_KEY: json.dumps(data, sort_keys=True)}


def _read_meta(metadata: Mapping[str, str] | None, source: str) -> dict[str, Any]:
    raw = (metadata or {}).get(META_KEY)
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise CheckpointError(f"{source}: metadata {META_KEY!r} is not valid ({exc})") from None
    return data


def _any_conv1d_t(kinds: Mapping[str, str]) -> bool:
    """PEFT's fan_in_fan_out: true when a module is a transformers Conv1D (weight stored (in, out))."""
    return any(str(getattr(k, "value", k)) == "Conv1D" for k in kinds.values())


def _lora_scales(adapter: Adapter) -> dict[str, float]:
    return {m: adapter.config.scaling_for(m) for m in adapter.modules}


def _no_options(unknown: Mapping[str, Any], fmt: str) -> None:
    if unknown:
        raise ConfigError(f"unknown option(s) for {fmt}: {', '.join(sorted(unknown))}")


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{p}: cannot read as JSON ({exc})") from None


def _target_paths(fmt: str, dst: Path) -> list[Path]:
    if fmt == "peft":
        return [dst / "adapter_model.safetensors", dst / "adapter_config.json"]
    if fmt == "mlx":
        return [dst / "adapters.safetensors", dst / "adapter_config.json"]
    return [dst]


def _write(conv: Converted, dst: Path, *, force: bool) -> Path:
    if conv.format == "gguf":
        return _write_one_file(conv, dst, force=force)
    if conv.format in ("kohya", "candle-lora"):
        if dst.suffix != ".safetensors" or dst.is_dir():
            raise ConfigError(f"{dst}: a {conv.format} adapter is one .safetensors file; give a path ending in "
                              f".safetensors")
    elif dst.exists() and not dst.is_dir():
        raise ConfigError(f"{dst}: a {conv.format} adapter is a folder, and this is a file")
    targets = _target_paths(conv.format, dst)
    existing = [t for t in targets if t.exists()]
    if existing and not force:
        raise CheckpointError(f"{_some(str(t) for t in existing)} already exist(s); pass force=True (--force) "
                              f"to overwrite")
    (dst.parent if conv.format in ("kohya", "candle-lora") else dst).mkdir(parents=True, exist_ok=True)
    save_file(conv.tensors, targets[0], metadata=conv.metadata or None)
    if conv.config is not None:
        tmp = atomic_path(targets[1])
        try:
            tmp.write_text(json.dumps(conv.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, targets[1])
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return dst

def _write_one_file(conv: Converted, dst: Path, *, force: bool) -> Path:
    """A GGUF file, written to a temporary name beside ``dst`` and renamed into place."""
    from .gguf import write_gguf

    if dst.suffix != ".gguf" or dst.is_dir():
        raise ConfigError(f"{dst}: a GGUF adapter is one .gguf file; give a path ending in .gguf")
    if dst.exists() and not force:
        raise CheckpointError(f"{dst} already exists; pass force=True (--force) to overwrite")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(dst)
    try:
        write_gguf(conv, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def _check_prefix(prefix: Any, what: str) -> None:
    if not isinstance(prefix, str) or not prefix or not re.fullmatch(r"[A-Za-z0-9_]+", prefix):
        raise ConfigError(f"{what} prefix must be a non-empty name of letters, digits and underscores, got {prefix!r}")
