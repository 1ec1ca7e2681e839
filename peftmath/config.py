"""Typed adapter configurations: PEFT's ``adapter_config.json`` fields, names and defaults.

Each method module defines its config as a subclass of :class:`PeftConfig` (``LoraConfig`` in
:mod:`peftmath.methods.lora`, ...). Reading keeps every field PEFT wrote, including the ones peftmath
does not use (in :attr:`PeftConfig.extra`), and writes them back unchanged; an invalid value raises a
:class:`~peftmath.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError, PeftMathWarning, UnsupportedError

__all__ = ["PeftConfig", "TunerConfig", "get_pattern_key", "resolve_pattern", "known_fields", "field_status",
           "unsupported_fields", "check_supported", "strict_fields"]

#: set by :func:`strict_fields`: unknown fields are errors instead of warnings
_STRICT: contextvars.ContextVar[bool] = contextvars.ContextVar("peftmath_strict_fields", default=False)


@contextlib.contextmanager
def strict_fields(strict: bool = True) -> Iterator[None]:
    """Within this block, :meth:`PeftConfig.from_dict` raises :class:`ConfigError` for an unknown field
    instead of warning (how ``config_from_dict(..., strict=True)`` reaches every config class)."""
    token = _STRICT.set(bool(strict))
    try:
        yield
    finally:
        _STRICT.reset(token)


def known_fields(cls: type) -> set[str]:
    """The fields a config of class ``cls`` may hold: its own and every field of PEFT 0.21.2's config
    dataclass of the same ``peft_type`` (written by PEFT, not all of them needed by peftmath)."""
    from ._peft_tables import CONFIG_FIELDS

    return set(cls.field_names()) | set(CONFIG_FIELDS.get(cls.peft_type, {})) | {"peft_type"}


def check_unknown_fields(cls: type, data: Mapping[str, Any], *, source: str, strict: bool | None = None) -> None:
    """Warn (:class:`PeftMathWarning`) about each field of ``data`` that neither ``cls`` nor PEFT 0.21.2
    knows, naming the closest known field; ``strict`` (default: :func:`strict_fields`) raises
    :class:`ConfigError` instead. A misspelt field (``lora_alfa``) would otherwise be ignored silently."""
    known = known_fields(cls)
    unknown = [k for k in data if k not in known]
    if not unknown:
        return
    what = f"PEFT 0.21.2's {cls.__name__}" if cls.peft_type else cls.__name__
    notes = []
    for name in unknown:
        close = difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else "not a field of " + what
        notes.append(f"unknown field {name!r} ({hint})")
    if _STRICT.get() if strict is None else strict:
        raise ConfigError(f"{source}: {'; '.join(notes)} (strict: unknown fields are errors)")
    for note in notes:
        warnings.warn(f"{source}: {note}; it has no effect (kept and written back as read)", PeftMathWarning,
                      stacklevel=4)


def field_status(peft_type: str, name: str) -> Any:
    """What field ``name`` of ``peft_type`` means to peftmath: ``"implemented"``, ``"irrelevant"`` or a
    :class:`~peftmath._peft_tables.Refused` (``None`` for a field PEFT 0.21.2 does not have)."""
    from ._peft_tables import CONFIG_FIELDS

    return CONFIG_FIELDS.get(peft_type, {}).get(name)


def unsupported_fields(config: "PeftConfig") -> list[tuple[str, Any, Any]]:
    """``(field, value, Refused rule)`` for every field of ``config`` that switches on a PEFT variant
    peftmath does not implement (a value the table of :mod:`peftmath._peft_tables` does not allow)."""
    from ._peft_tables import CONFIG_FIELDS, Refused

    own = set(config.field_names())
    out = []
    for name, rule in CONFIG_FIELDS.get(config.peft_type, {}).items():
        if not isinstance(rule, Refused):
            continue
        if name in own:
            value = getattr(config, name)
        elif name in config.extra:
            value = config.extra[name]
        else:
            continue
        if not rule.allows(value):
            out.append((name, value, rule))
    return out


def check_supported(config: "PeftConfig", *, source: str = "config") -> None:
    """Raise :class:`UnsupportedError` naming every field of ``config`` that changes the math in a way
    peftmath does not implement (:func:`unsupported_fields`): applied as the plain method, such an
    adapter would give wrong numbers."""
    bad = unsupported_fields(config)
    if not bad:
        return
    parts = []
    for name, value, rule in bad:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        parts.append(f"{name}={shown} switches on PEFT 0.21.2's {rule.variant}, which peftmath does not implement: "
                     f"{rule.why}")
    raise UnsupportedError(f"{source}: {'; '.join(parts)}. Merged or run as a plain {config.peft_type} adapter it "
                           f"would give wrong numbers, so it is refused")


@dataclass
class PeftConfig:
    """Fields every PEFT config has (``config.py::PeftConfigMixin`` / ``PeftConfig``)."""

    peft_type: ClassVar[str] = ""

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    peft_version: str | None = None
    auto_mapping: dict | None = None
    #: fields read from adapter_config.json that this class does not model, written back as read
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config", strict: bool | None = None) -> "PeftConfig":
        """Build from a dict as read from adapter_config.json. Fields this class does not model go to
        ``extra`` (written back as read); those that PEFT 0.21.2 does not know either (a misspelling) warn
        with the closest known name, or raise :class:`ConfigError` with ``strict`` (default: the
        :func:`strict_fields` setting)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        check_unknown_fields(cls, data, source=source, strict=strict)
        peft_type = data.get("peft_type", cls.peft_type)
        if cls.peft_type and peft_type != cls.peft_type:
            raise ConfigError(f"{source}: peft_type is {peft_type!r}, expected {cls.peft_type!r}")
        known = set(cls.field_names())
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k != "peft_type"}
        try:
            config = cls(**kwargs, extra=extra)
        except TypeError as exc:  # pragma: no cover - dataclass construction with known names
            raise ConfigError(f"{source}: {exc}") from exc
        config.validate(source=source)
        return config

    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content (sets as sorted lists, ``extra`` fields restored)."""
        out: dict[str, Any] = dict(self.extra)
        for name in self.field_names():
            value = getattr(self, name)
            if isinstance(value, (set, frozenset)):
                value = sorted(value)
            out[name] = value
        out["peft_type"] = self.peft_type
        return out

    def replace(self, **changes: Any) -> "PeftConfig":
        """A copy with ``changes`` applied and validated."""
        new = dataclasses.replace(self, **changes)
        new.extra = dict(self.extra)
        new.validate()
        return new

    def validate(self, *, source: str = "config") -> None:
        """Raise :class:`ConfigError` for an invalid value. Subclasses extend this."""
        _check_type(source, "inference_mode", self.inference_mode, bool)


@dataclass
class TunerConfig(PeftConfig):
    """Fields of the non-prompt tuners: which modules are adapted."""

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    #: fields above that PEFT's config of this method does not have (PEFT's BeftConfig has no
    #: ``exclude_modules``, ...): refused when set, and left out of adapter_config.json
    absent_fields: ClassVar[tuple[str, ...]] = ()

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        for name in self.absent_fields:
            if getattr(self, name) is not None:
                raise ConfigError(f"{source}: PEFT's {type(self).__name__} has no field {name!r}; leave it unset "
                                  f"(got {getattr(self, name)!r})")
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            check_names(source, name, getattr(self, name), allow_str=True)
        check_names(source, "modules_to_save", self.modules_to_save, allow_str=False)
        lt = self.layers_to_transform
        if lt is not None and not (_is_int(lt) or (isinstance(lt, list) and all(_is_int(v) for v in lt))):
            raise ConfigError(f"{source}: field 'layers_to_transform' must be an integer or a list of integers, got {lt!r}")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ConfigError(
                f"{source}: layers_to_transform / layers_pattern need target_modules as a list, "
                f"not the regex {self.target_modules!r} (PEFT refuses this too)"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(f"{source}: layers_pattern is set but layers_to_transform is not")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in self.absent_fields:
            out.pop(name, None)
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_names(source: str, name: str, value: Any, *, allow_str: bool) -> None:
    """A module-name field: None, a list of strings, or (``allow_str``) a regex string."""
    if value is None or (allow_str and isinstance(value, str)):
        return
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return
    wanted = "a string (regex), a list of strings or null" if allow_str else "a list of strings or null"
    raise ConfigError(f"{source}: field {name!r} must be {wanted}, got {value!r}")


def check_pattern(source: str, name: str, value: Any) -> None:
    """rank_pattern / alpha_pattern: an object mapping module-name patterns to values."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{source}: field {name!r} must be an object mapping module names to values, got {value!r}")


def _check_type(source: str, name: str, value: Any, types: type | tuple[type, ...]) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        wanted = " or ".join(t.__name__ for t in _as_tuple(types))
        raise ConfigError(f"{source}: field {name!r} must be {wanted}, got {value!r}")


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def check_positive_int(source: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{source}: field {name!r} must be a positive integer, got {value!r}")


def check_nonnegative_int(source: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{source}: field {name!r} must be a non-negative integer, got {value!r}")


def check_fraction(source: str, name: str, value: Any, *, closed: bool = False) -> None:
    """A probability field: a number in ``[0, 1)`` (dropouts), or ``[0, 1]`` with ``closed``."""
    check_number(source, name, value)
    if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        raise ConfigError(f"{source}: field {name!r} must be in [0, 1{']' if closed else ')'}, got {value!r}")


def check_flags(source: str, config: Any, *names: str) -> None:
    """Boolean fields of ``config``: each must be true or false (not 0/1, not a string)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: field {name!r} must be true or false, got {value!r}")


def check_number(source: str, name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{source}: field {name!r} must be a number, got {value!r}")


def check_choice(source: str, name: str, value: Any, choices: tuple) -> None:
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise ConfigError(f"{source}: field {name!r} must be one of {choices}, got {value!r}")


def get_pattern_key(pattern_keys: list[str], module_name: str) -> str | None:
    """PEFT's rule (``utils/other.py::get_pattern_key``): the first key ``k``, in insertion order,
    with ``re.match(rf"(.*\\.)?({k})$", module_name)``; ``None`` when no key matches.

    >>> get_pattern_key(["q_proj", "layers.0.v_proj"], "model.layers.0.v_proj")
    'layers.0.v_proj'
    >>> get_pattern_key(["proj"], "model.layers.0.q_proj") is None
    True
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def resolve_pattern(pattern: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """The value of ``pattern`` (rank_pattern / alpha_pattern) for ``module_name``, else ``default``."""
    key = get_pattern_key(list(pattern), module_name)
    return default if key is None else pattern[key]
