r"""Cartridges (Eyuboglu et al., 2025): a trained KV cache, served as prefix tuning's ``past_key_values``.

A cartridge is the prefix table ``Π`` of shape ``(T, 2·L·D)`` itself — no projection, no embedding —
in exactly prefix tuning's layout (:func:`peftmath.methods.prefix_tuning.past_key_values`): element
``(t, ((2ℓ + j)·H + h)·d + e)`` is layer ``ℓ``'s key (``j = 0``) or value (``j = 1``) of head ``h`` at
virtual token ``t``, channel ``e``. On a grouped-query model ``D = head_dim · num_key_value_heads`` and
``H = num_key_value_heads`` (:meth:`~peftmath.methods._prompt.PromptLearningConfig.resolve`).

PEFT keeps the first ``F = num_frozen_tokens`` rows as a frozen parameter (an attention sink) and trains
the other ``T − F``; the checkpoint holds the whole table as ``prompt_embeddings`` (frozen rows first).
Nothing is merged: the rows are keys and values, not a weight change.

Also here: the table of a model's own cache (:func:`table_from_past_key_values`, PEFT's
``prompt_embeddings_from_past_key_values``: the paper's "first tokens of the corpus" initialisation) and
the composition of cartridges by concatenation (:func:`compose`, PEFT's ``compose_cartridge_adapters``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._array import namespace
from ..backends import backend_for, host_rng
from ..errors import ConfigError, ShapeError
from ._contract import Method
from ._prompt import PromptLearningConfig, check_prompt_embeddings

Array = Any

__all__ = [
    "CartridgeConfig",
    "compose",
    "init_cartridge",
    "past_key_values",
    "split_frozen",
    "table_from_past_key_values",
    "trainable_parameters",
]

PEFT_TYPE = "CARTRIDGE"
PROMPT_LEARNING = True
SHARED_KEYS = ("prompt_embeddings",)
PARAMETER_SUFFIXES: tuple[str, ...] = ()
ALLOWS_NO_MODULES = True


# --- Config (specs/cartridge.md, "Config") ---
@dataclass
class CartridgeConfig(PromptLearningConfig):
    """PEFT's ``CartridgeConfig``: a prompt-learning config plus ``num_frozen_tokens`` (default 1)."""

    peft_type: ClassVar[str] = "CARTRIDGE"

    num_frozen_tokens: int = 1

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        f = self.num_frozen_tokens
        if not isinstance(f, int) or isinstance(f, bool) or f < 0:
            raise ConfigError(f"{source}: field 'num_frozen_tokens' must be an integer >= 0, got {f!r}")
        if f > self.num_virtual_tokens:
            raise ConfigError(f"{source}: num_frozen_tokens {f} exceeds num_virtual_tokens {self.num_virtual_tokens} "
                              f"(PEFT refuses it too); freeze at most all the virtual tokens")
        heads = self.num_attention_heads
        if self.token_dim is not None and heads is not None and self.token_dim % heads:
            raise ConfigError(f"{source}: token_dim {self.token_dim} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}; the cache cannot be split into heads")

    def table_shape(self) -> tuple[int, int]:
        """``(T, 2·L·D)``, the shape of the saved ``prompt_embeddings``."""
        if self.token_dim is None or self.num_layers is None:
            raise ConfigError(f"{self.peft_type}: token_dim / num_layers are not set; resolve the config first")
        return (self.num_virtual_tokens, 2 * self.num_layers * self.token_dim)


Config = CartridgeConfig


# --- Parameter shapes (specs/cartridge.md, "The table and its frozen rows") ---
def split_frozen(table: Array, config: CartridgeConfig) -> tuple[Array | None, Array]:
    """PEFT's two parameters from the table: ``frozen_embedding = Π[:F]`` (None when ``F = 0``) and
    ``trainable_embedding = Π[F:]``."""
    check_prompt_embeddings(config, table, config.table_shape())
    f = config.num_frozen_tokens
    return (table[:f, ...] if f else None), table[f:, ...]


def trainable_parameters(config: CartridgeConfig) -> int:
    """The scalars PEFT trains: ``(T − F) · 2·L·D`` (the frozen rows are not counted)."""
    t, width = config.table_shape()
    return (t - config.num_frozen_tokens) * width


# --- Initialisation (specs/cartridge.md, "Initialisation") ---
def init_cartridge(config: CartridgeConfig, *, seed: int | np.random.Generator | None = 0, xp: Any = None,
                   device: Any = None) -> Array:
    """A random table ``(T, 2·L·D)`` with entries ``N(0, 1)`` (PEFT's ``reset_parameters``), in float32,
    drawn on the host. For the paper's better start, take the cache of a real text instead
    (:func:`table_from_past_key_values`)."""
    table = host_rng(seed).standard_normal(config.table_shape()).astype(np.float32)
    if xp is None:
        import array_api_compat.numpy as xp
    return backend_for(xp).from_host(table, xp, device)


# --- Forward: past_key_values (specs/cartridge.md, "Serving the cache") ---
def past_key_values(table: Array, config: CartridgeConfig, batch_size: int) -> list[tuple[Array, ...]]:
    """Per layer ``(key, value)`` (or four tensors for ``S = 2``), each ``(batch_size, H, T, D / H)``:
    prefix tuning's layout, which PEFT serves cartridges with (the same ``get_prompt`` code)."""
    from .prefix_tuning import (
        past_key_values as prefix_past_key_values,  # one layout, written once
    )

    return prefix_past_key_values(table, config, batch_size)


def table_from_past_key_values(cache: Sequence[Sequence[Array]], num_virtual_tokens: int) -> Array:
    """The table ``(T, 2·L·H·d)`` of the first ``T`` tokens of a model's cache, the inverse of
    :func:`past_key_values`: ``cache[ℓ] = (key, value)``, each ``(1, H, ≥T, d)`` (one sequence).

    >>> import numpy as np
    >>> k = np.arange(24.0).reshape(1, 2, 3, 4); v = -k
    >>> table = table_from_past_key_values([(k, v)], 2)
    >>> table.shape, float(table[1, (0 * 2 + 1) * 4 + 2]), float(k[0, 1, 1, 2])   # token 1, key (j=0), head 1
    ((2, 16), 18.0, 18.0)
    """
    cache = [tuple(entry) for entry in cache]
    if not cache:
        raise ShapeError("CARTRIDGE: the cache has no layers")
    first = cache[0][0]
    if len(first.shape) != 4 or first.shape[0] != 1:
        raise ShapeError(f"CARTRIDGE: the cache's keys must be (1, H, tokens, d) (one sequence), got "
                         f"{tuple(first.shape)}")
    _, heads, _, d = first.shape
    xp = namespace(*(a for entry in cache for a in entry[:2]))
    rows = []
    for layer, entry in enumerate(cache):
        if len(entry) < 2:
            raise ShapeError(f"CARTRIDGE: layer {layer} of the cache has no (key, value) pair")
        for j, a in enumerate(entry[:2]):
            if len(a.shape) != 4 or (a.shape[0], a.shape[1], a.shape[3]) != (1, heads, d):
                raise ShapeError(f"CARTRIDGE: layer {layer}'s {'value' if j else 'key'} has shape {tuple(a.shape)}, "
                                 f"layer 0's key {tuple(first.shape)}: heads and head width must agree")
            if a.shape[2] < num_virtual_tokens:
                raise ShapeError(f"CARTRIDGE: layer {layer} caches {a.shape[2]} tokens, fewer than the "
                                 f"{num_virtual_tokens} virtual tokens asked for")
            rows.append(xp.permute_dims(a[0, :, :num_virtual_tokens, :], (1, 0, 2)))  # (T, H, d)
    return xp.reshape(xp.stack(rows, axis=1), (num_virtual_tokens, len(rows) * heads * d))


# --- Composition (specs/cartridge.md, "Composition") ---
_MUST_AGREE = ("task_type", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules")


def compose(configs: Sequence[CartridgeConfig], tables: Sequence[Array]) -> tuple[CartridgeConfig, Array]:
    """Cartridges composed by concatenation (PEFT's ``compose_cartridge_adapters``): the tables stacked
    along the tokens, ``num_virtual_tokens`` the sum, ``num_frozen_tokens`` the first one's (one attention
    sink); every other config field from the first. At least two, agreeing on ``_MUST_AGREE``."""
    if len(configs) != len(tables) or len(configs) < 2:
        raise ConfigError(f"CARTRIDGE compose: needs at least 2 cartridges with one table each, got "
                          f"{len(configs)} configs and {len(tables)} tables")
    base = configs[0]
    for i, cfg in enumerate(configs):
        if cfg.peft_type != PEFT_TYPE:
            raise ConfigError(f"CARTRIDGE compose: cartridge {i} is a {cfg.peft_type} adapter")
        for name in _MUST_AGREE:
            if getattr(cfg, name) != getattr(base, name):
                raise ConfigError(f"CARTRIDGE compose: cartridge {i} has {name}={getattr(cfg, name)!r}, the first "
                                  f"{getattr(base, name)!r}; only cartridges of one model compose")
        check_prompt_embeddings(cfg, tables[i], cfg.table_shape())
    xp = namespace(*tables)
    table = xp.concat(list(tables), axis=0)
    return base.replace(num_virtual_tokens=int(table.shape[0])), table


# --- Checkpoint (specs/cartridge.md, "PEFT compatibility") ---
def expected_shape(config: CartridgeConfig) -> tuple[int, int]:
    return config.table_shape()


def validate_checkpoint(config: CartridgeConfig, shared: dict[str, Array]) -> None:
    if "prompt_embeddings" not in shared:
        raise ShapeError(f"{config.peft_type}: the checkpoint has no prompt_embeddings tensor")
    check_prompt_embeddings(config, shared["prompt_embeddings"], expected_shape(config))


#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=CartridgeConfig, module=None, spec="specs/cartridge.md",
    shared_keys=SHARED_KEYS, prompt_learning=True, init_field=None, validate_checkpoint=validate_checkpoint,
    past_key_values=past_key_values,
    count_trainable=lambda config, params, shared: trainable_parameters(config),  # the frozen rows are not trained
)
