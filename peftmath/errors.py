"""The exception hierarchy of peftmath.

Every error peftmath raises on purpose derives from :class:`PeftMathError`, so a caller can catch
one class. Each subclass also derives from the built-in exception a Python programmer would expect
(``ValueError``, ``TypeError``, ...), so ``except ValueError`` keeps working.

Messages follow one rule: name the module (or file, or field), the numbers that disagree, and what to
do about it.
"""

from __future__ import annotations

__all__ = [
    "PeftMathError",
    "ShapeError",
    "ConfigError",
    "CheckpointError",
    "NamespaceError",
    "NonFiniteError",
    "NotInvertibleError",
    "UnsupportedError",
    "BackendError",
    "PeftMathWarning",
]


class PeftMathError(Exception):
    """Base class of every error peftmath raises on purpose."""


class ShapeError(PeftMathError, ValueError):
    """Arrays whose shapes disagree with each other or with the base layer."""


class ConfigError(PeftMathError, ValueError):
    """An invalid configuration value (adapter_config.json field, keyword argument)."""


class CheckpointError(PeftMathError, ValueError):
    """A checkpoint file or folder that cannot be read or written as asked."""


class NamespaceError(PeftMathError, TypeError):
    """Arrays from different array libraries or devices mixed in one call."""


class NonFiniteError(PeftMathError, ValueError):
    """A safe merge whose result would contain NaN or infinity."""


class NotInvertibleError(PeftMathError, ValueError):
    """An unmerge that cannot be computed (a zero scale, a missing merge record)."""


class UnsupportedError(PeftMathError, NotImplementedError):
    """A combination PEFT refuses too, or one peftmath does not implement (yet)."""


class BackendError(PeftMathError, RuntimeError):
    """A backend that is unknown, not installed, or cannot run here."""


class PeftMathWarning(UserWarning):
    """Something peftmath did on purpose that the caller should know about (a skipped module, a
    config value PEFT would have changed, a lossy conversion)."""
