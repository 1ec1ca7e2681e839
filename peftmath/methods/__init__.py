"""One module per PEFT method, each written once against the array API.

Each method module reads top to bottom: its config, the parameter shapes, initialisation, the delta
(or rotation / scale), forward, merge and unmerge — first as plain functions on arrays, then as a
:class:`~peftmath.methods._base.ModuleAdapter` that binds them to one module of a checkpoint.

:func:`get_method` maps a PEFT ``peft_type`` to its module; methods are imported on first use.
:func:`describe_method` gives its :class:`Method` description (``get_method(t).METHOD``): what the
adapter, the checkpoint reader, the streamer, the command, ``combine``, ``multi``, the demo and
``create_adapter`` ask about a method (design §3 rule 10). A ``peft_type`` that PEFT 0.21.2 defines but
peftmath does not implement is an :class:`~peftmath.errors.UnsupportedError`; any other string is a
:class:`~peftmath.errors.ConfigError`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ConfigError, UnsupportedError
from ._contract import PEFT_TYPES_0_21_2, Method

__all__ = ["get_method", "describe_method", "Method", "METHOD_MODULES", "PEFT_TYPES_0_21_2", "implemented_methods"]

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
    "HRA": "peftmath.methods.hra",
    "ROAD": "peftmath.methods.road",
    "FOURIERFT": "peftmath.methods.fourierft",
    "PROMPT_TUNING": "peftmath.methods.prompt_tuning",
    "P_TUNING": "peftmath.methods.p_tuning",
    "PREFIX_TUNING": "peftmath.methods.prefix_tuning",
    "CARTRIDGE": "peftmath.methods.cartridge",
    "ADAPTION_PROMPT": "peftmath.methods.adaption_prompt",
    "SHADOW": "peftmath.methods.shadow",
    "HIRA": "peftmath.methods.hira",
    "MISS": "peftmath.methods.miss",
    "DELORA": "peftmath.methods.delora",
    "VBLORA": "peftmath.methods.vblora",
    "RANDLORA": "peftmath.methods.randlora",
    "C3A": "peftmath.methods.c3a",
    "SHIRA": "peftmath.methods.shira",
    "WAVEFT": "peftmath.methods.waveft",
    "OSF": "peftmath.methods.osf",
    "GRALORA": "peftmath.methods.gralora",
    "PVERA": "peftmath.methods.pvera",
    "FROD": "peftmath.methods.frod",
    "GLORA": "peftmath.methods.glora",
    "PSOFT": "peftmath.methods.psoft",
    "LILY": "peftmath.methods.lily",
    "ADAMSS": "peftmath.methods.adamss",
    "DEFT": "peftmath.methods.deft",
    "SUPERTUNING": "peftmath.methods.supertuning",
    "BEFT": "peftmath.methods.beft",
    "TRAINABLE_TOKENS": "peftmath.methods.trainable_tokens",
    "PEANUT": "peftmath.methods.peanut",
    "TINYLORA": "peftmath.methods.tinylora",
    "UNILORA": "peftmath.methods.unilora",
    "LN_TUNING": "peftmath.methods.ln_tuning",
    "POLY": "peftmath.methods.poly",
    "MULTITASK_PROMPT_TUNING": "peftmath.methods.multitask_prompt_tuning",
    "CPT": "peftmath.methods.cpt",
    "XLORA": "peftmath.methods.xlora",
}


def get_method(peft_type: str) -> ModuleType:
    """The method module for ``peft_type`` (``"LORA"``, ``"LOHA"``, ...); its ``METHOD`` is the
    description (:func:`describe_method`).

    Raises :class:`UnsupportedError` for a type of PEFT 0.21.2 that peftmath does not implement yet
    (``"HRA"``, ``"GLORA"``, ...) and :class:`ConfigError` for a string that is no PEFT type.
    """
    key = peft_type.upper() if isinstance(peft_type, str) else None
    if key not in METHOD_MODULES:
        known = ", ".join(sorted(METHOD_MODULES))
        if key in PEFT_TYPES_0_21_2:
            raise UnsupportedError(
                f"peft_type {peft_type!r} is a PEFT 0.21.2 method peftmath does not implement yet; peftmath "
                f"implements {known}")
        raise ConfigError(f"unknown peft_type {peft_type!r}: not a PEFT 0.21.2 method type; peftmath knows {known}")
    name = METHOD_MODULES[key]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise UnsupportedError(f"peft_type {peft_type!r} is not implemented in this version of peftmath") from exc


def describe_method(peft_type: str) -> Method:
    """The :class:`Method` description of ``peft_type`` (errors as :func:`get_method`)."""
    return get_method(peft_type).METHOD


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
