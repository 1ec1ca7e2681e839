"""Which format an adapter path holds: from its files (``adapter_config.json`` with ``peft_type`` or
``lora_parameters``) and, for a bare ``.safetensors`` file, from the grammar every key must fit."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import CheckpointError
from ..io.safetensors import SafeTensorsFile
from ._common import PEFT_PREFIX, _read_json, _some
from .candle import _CANDLE_RE

# ==================================================================================================
# files
# ==================================================================================================
_PEFT_SUFFIX_RE = re.compile(r"\.(lora_[AB]\.weight|lora_B\.bias|lora_embedding_[AB]|lora_magnitude_vector|"
                             r"hada_(w[12]_[ab]|t[12])|lokr_(w[12](_[ab])?|t2)|ia3_l|oft_R\.weight|oft_r|boft_R|boft_s|"
                             r"vera_lambda_[bd]|lora_E|ranknum)$")
_KOHYA_RE = re.compile(r"^[A-Za-z0-9_]+\.(lora_(down|up|mid)\.weight|alpha|dora_scale|hada_(w[12]_[ab]|t[12])|"
                       r"lokr_(w[12](_[ab])?|t2))$")
_MLX_RE = re.compile(r"^.+\.(lora_a|lora_b|m)$")


def _classify_keys(keys: Iterable[str]) -> dict[str, list[str]]:
    """Key -> the formats whose grammar it fits (first match wins in kohya, candle, peft, mlx order)."""
    out: dict[str, list[str]] = {}
    for k in keys:
        if _KOHYA_RE.match(k):
            fmt = "kohya"
        elif _CANDLE_RE.match(k):
            fmt = "candle-lora"
        elif _PEFT_SUFFIX_RE.search(k) or k.startswith(PEFT_PREFIX):
            fmt = "peft"
        elif _MLX_RE.match(k):
            fmt = "mlx"
        else:
            fmt = "unknown"
        out.setdefault(fmt, []).append(k)
    return out


def _locate(path: Path) -> tuple[str, Path, Path | None]:
    """(format, weights file, config file or None) of an adapter path, from its files and keys."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        cfg = path / "adapter_config.json"
        data = _read_json(cfg) if cfg.exists() else None
        if (path / "adapter_model.safetensors").exists() and isinstance(data, dict) and "peft_type" in data:
            return "peft", path / "adapter_model.safetensors", cfg
        if (path / "adapters.safetensors").exists() and isinstance(data, dict) and "lora_parameters" in data:
            return "mlx", path / "adapters.safetensors", cfg
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(f"{path}: not a PEFT folder (adapter_config.json with peft_type + "
                                  f"adapter_model.safetensors) nor an MLX one (adapter_config.json with "
                                  f"lora_parameters + adapters.safetensors); safetensors files: "
                                  f"{_some(f.name for f in files)}")
        path = files[0]
    folder = path.parent
    cfg = folder / "adapter_config.json"
    if cfg.exists():
        data = _read_json(cfg)
        if path.name == "adapter_model.safetensors" and isinstance(data, dict) and "peft_type" in data:
            return "peft", path, cfg
        if path.name == "adapters.safetensors" and isinstance(data, dict) and "lora_parameters" in data:
            return "mlx", path, cfg
    f = SafeTensorsFile(path)
    fmt = _format_of_keys(list(f), str(path))
    return fmt, path, (cfg if fmt in ("peft", "mlx") and cfg.exists() else None)


def _format_of_keys(keys: list[str], source: str) -> str:
    if not keys:
        raise CheckpointError(f"{source}: no tensors, so no format")
    by = _classify_keys(keys)
    if "unknown" in by:
        raise CheckpointError(f"{source}: keys in no known adapter grammar (PEFT, kohya, MLX, candle-lora): "
                              f"{_some(by['unknown'])}")
    if len(by) > 1:
        raise CheckpointError(f"{source}: keys of several formats in one file: "
                              + "; ".join(f"{f}: {_some(ks, 3)}" for f, ks in sorted(by.items())))
    return next(iter(by))


def detect_format(path: str | os.PathLike) -> str:
    """The format of the adapter at ``path`` (a folder or a ``.safetensors`` file): one of :data:`FORMATS`.

    PEFT: ``adapter_config.json`` (with ``peft_type``) + ``adapter_model.safetensors``; MLX:
    ``adapter_config.json`` (with ``lora_parameters``) + ``adapters.safetensors``; kohya and candle-lora:
    a ``.safetensors`` file whose every key fits their grammar. Unknown or mixed keys raise
    :class:`~peftmath.errors.CheckpointError` naming them.
    """
    return _locate(Path(path))[0]
