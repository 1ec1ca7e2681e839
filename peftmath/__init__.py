"""peftmath: the math of parameter-efficient fine-tuning, defined once against the array API.

>>> import peftmath as pm
>>> pm.LoraConfig(r=4, lora_alpha=8).scaling_for("q_proj")
2.0

The public names below are imported on first use (PEP 562 module ``__getattr__``), so that
``import peftmath`` and ``peftmath --help`` do not pay for NumPy, SciPy, ml_dtypes or the format
readers; ``from peftmath import X``, ``peftmath.X``, ``dir(peftmath)`` and ``__all__`` are as before.
"""

import importlib as _importlib
import sys as _sys
import types as _types

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterSet",
    "combine",
    "convert",
    "create_adapter",
    "mixed_batch_forward",
    "Layer",
    "LayerKind",
    "LoraConfig",
    "PeftMathError",
    "backends",
    "errors",
    "layers",
    "load_adapter",
    "read_config",
    "save_adapter",
]

#: public name -> (submodule it lives in, attribute of that submodule)
_PUBLIC = {
    "Adapter": ("adapter", "Adapter"),
    "AdapterSet": ("multi", "AdapterSet"),
    "combine": ("combine", "combine"),
    "convert": ("formats", "convert"),
    "create_adapter": ("create", "create_adapter"),
    "mixed_batch_forward": ("multi", "mixed_batch_forward"),
    "Layer": ("layers", "Layer"),
    "LayerKind": ("layers", "LayerKind"),
    "LoraConfig": ("methods.lora", "LoraConfig"),
    "PeftMathError": ("errors", "PeftMathError"),
    "load_adapter": ("io", "load_adapter"),
    "read_config": ("io", "read_config"),
    "save_adapter": ("io", "save_adapter"),
}

#: submodules reachable as attributes (``peftmath.io``, ...) without an import statement, as they were
#: when this file imported them all
_SUBMODULES = ("_array", "_linalg", "_peft_tables", "adapter", "backends", "combine", "config", "create", "errors",
               "formats", "io", "kinds", "layers", "methods", "multi", "targets")

_HIDDEN = {"_importlib", "_sys", "_types", "_PUBLIC", "_SUBMODULES", "_HIDDEN", "_Package", "__getattr__", "__dir__"}


def __getattr__(name: str):
    """``peftmath.X`` for a public name or submodule not imported yet: import it, keep it."""
    if name in _PUBLIC:
        module, attr = _PUBLIC[name]
        value = getattr(_importlib.import_module(f".{module}", __name__), attr)
    elif name in _SUBMODULES:
        value = _importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, the listed submodules and the dunders: the same list before and after any import (an
    internal submodule such as ``_mha``, bound by the import system when it is first imported, is not listed)."""
    dunders = {n for n in globals() if n.startswith("__") and n.endswith("__")}
    return sorted((dunders - _HIDDEN) | set(_PUBLIC) | set(_SUBMODULES))


class _Package(_types.ModuleType):
    """The package's module type: importing submodule ``peftmath.combine`` binds it as an attribute of the
    package, which would hide the public function :func:`peftmath.combine` of the same name; a public name
    keeps its value (or stays lazy) when the import system binds a submodule over it."""

    def __setattr__(self, name: str, value) -> None:
        if name in _PUBLIC and isinstance(value, _types.ModuleType) and _PUBLIC[name][0] == name:
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
