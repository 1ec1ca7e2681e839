"""One module per PEFT method, each written once against the array API.

Each method module reads top to bottom: its config, the parameter shapes, initialisation, the delta
(or rotation / scale), forward, merge and unmerge — first as plain functions on arrays, then as a
:class:`~peftmath.methods._base.ModuleAdapter` that binds them to one module of a checkpoint.

:func:`get_method` maps a PEFT ``peft_type`` to its module; methods are imported on first use.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ConfigError, UnsupportedError

__all__ = ["get_method", "METHOD_MODULES", "implemented_methods"]

#: PEFT's ``peft_type`` -> the module that implements it
METHOD_MODULES: dict[str, str] = {
    "LORA": "peftmath.methods.lora",
    "ADALORA": "peftmath.methods.adalora",
    "IA3": "peftmath.methods.ia3",
    "LOHA": "peftmath.methods.loha",
    "LOKR": "peftmath.methods.lokr",
    "OFT": "peftmath.methods.oft",
    "BOFT": "peftmath.methods.boft",
    "VERA": "peftmath.methods.vera",
    "PROMPT_TUNING": "peftmath.methods.prompt_tuning",
    "P_TUNING": "peftmath.methods.p_tuning",
    "PREFIX_TUNING": "peftmath.methods.prefix_tuning",
}


def get_method(peft_type: str) -> ModuleType:
    """The method module for ``peft_type`` (``"LORA"``, ``"LOHA"``, ...)."""
    if not isinstance(peft_type, str) or peft_type.upper() not in METHOD_MODULES:
        known = ", ".join(sorted(METHOD_MODULES))
        raise ConfigError(f"unknown peft_type {peft_type!r}; peftmath knows {known}")
    name = METHOD_MODULES[peft_type.upper()]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise UnsupportedError(f"peft_type {peft_type!r} is not implemented in this version of peftmath") from exc


def implemented_methods() -> list[str]:
    """The peft_types whose modules are present."""
    out = []
    for peft_type in METHOD_MODULES:
        try:
            get_method(peft_type)
        except UnsupportedError:
            continue
        out.append(peft_type)
    return out
