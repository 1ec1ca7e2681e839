r"""Prompt tuning (Lester et al., 2021): a trained soft prompt prepended to the input embeddings.

Parameters: one table ``P`` of shape ``(T·S, D)`` (``num_virtual_tokens · num_transformer_submodules``,
``token_dim``), saved as the single checkpoint tensor ``prompt_embeddings``.

Forward (causal LM): ``inputs_embeds ← [P ; E(ids)]`` along the sequence axis, the attention mask gets
``T`` leading ones and the labels ``T`` leading ``-100`` (ignored by the loss). Encoder-decoder models
(``S = 2``): the encoder gets ``P[:T]`` and the decoder inputs ``P[T:]``.

Initialisation (``prompt_tuning_init``): ``"RANDOM"`` draws ``N(0, 1)``; ``"SAMPLE_VOCAB"`` copies
rows of the word-embedding matrix at random ids; ``"TEXT"`` copies the rows of the token ids of a text,
repeated and truncated to ``T·S`` (peftmath takes the ids, not a tokenizer: tokenize with the model's
tokenizer, special tokens included, as PEFT does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from .._array import namespace
from ..backends import backend_for, host_rng
from ..config import check_choice
from ..errors import ConfigError, ShapeError
from ._contract import Method
from ._prompt import PromptLearningConfig, check_prompt_embeddings

Array = Any

__all__ = ["PromptTuningConfig", "init_prompt", "text_token_ids", "prepend", "split_seq2seq"]

PEFT_TYPE = "PROMPT_TUNING"
PROMPT_LEARNING = True
SHARED_KEYS = ("prompt_embeddings",)
PARAMETER_SUFFIXES: tuple[str, ...] = ()
ALLOWS_NO_MODULES = True


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """PEFT's ``PromptTuningConfig``."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_choice(source, "prompt_tuning_init", self.prompt_tuning_init, ("RANDOM", "SAMPLE_VOCAB", "TEXT"))
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            raise ConfigError(f"{source}: tokenizer_kwargs only applies to prompt_tuning_init='TEXT' (PEFT refuses it too)")

    def embeddings_shape(self) -> tuple[int, int]:
        if self.token_dim is None:
            raise ConfigError(f"{self.peft_type}: token_dim is not set; resolve the config against the model first")
        return (self.total_virtual_tokens, self.token_dim)


Config = PromptTuningConfig


def text_token_ids(token_ids: list[int], total: int) -> list[int]:
    """PEFT's TEXT rule: truncate to ``total``, or repeat ``ceil(total / n)`` times and truncate.

    >>> text_token_ids([5, 6, 7], 8)
    [5, 6, 7, 5, 6, 7, 5, 6]
    >>> text_token_ids([5, 6, 7], 2)
    [5, 6]
    """
    ids = [int(i) for i in token_ids]
    if not ids:
        raise ConfigError("prompt_tuning_init='TEXT' needs at least one token id")
    if len(ids) < total:
        ids = ids * math.ceil(total / len(ids))
    return ids[:total]


def init_prompt(
    config: PromptTuningConfig,
    *,
    word_embeddings: Array | None = None,
    token_ids: list[int] | None = None,
    seed: int | np.random.Generator | None = 0,
    xp: Any = None,
    device: Any = None,
) -> Array:
    """The initial prompt table ``(T·S, D)`` in float32, drawn on the host for RANDOM / SAMPLE_VOCAB.

    ``word_embeddings`` (V, D) is the model's input embedding matrix (SAMPLE_VOCAB, TEXT);
    ``token_ids`` the tokenized ``prompt_tuning_init_text`` (TEXT). Ids outside ``[0, V)`` raise.
    """
    total, dim = config.embeddings_shape()
    rng = host_rng(seed)
    init = config.prompt_tuning_init
    if init == "RANDOM":
        if xp is None:
            xp = namespace(word_embeddings) if word_embeddings is not None else _np_xp()
        return backend_for(xp).from_host(rng.standard_normal((total, dim)).astype(np.float32), xp, device)
    if word_embeddings is None:
        raise ConfigError(f"prompt_tuning_init={init!r} needs the model's word_embeddings (V, D)")
    xp = namespace(word_embeddings)
    vocab = word_embeddings.shape[0]
    if word_embeddings.shape[1] != dim:
        raise ShapeError(f"word_embeddings has {word_embeddings.shape[1]} columns, token_dim is {dim}")
    if init == "SAMPLE_VOCAB":
        ids = rng.integers(0, vocab, size=total)
    else:
        if token_ids is None:
            raise ConfigError("prompt_tuning_init='TEXT' needs token_ids (the tokenized prompt_tuning_init_text)")
        ids = np.asarray(text_token_ids(token_ids, total))
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.size:
            raise ShapeError(f"token ids {sorted(set(bad.tolist()))[:5]} are outside the vocabulary [0, {vocab})")
    index = backend_for(xp).from_host(ids.astype(np.int64), xp, device)
    return xp.astype(xp.take(word_embeddings, index, axis=0), xp.float32)


def _np_xp() -> Any:
    import array_api_compat.numpy as xp

    return xp


def prepend(
    prompt: Array,
    inputs_embeds: Array,
    *,
    attention_mask: Array | None = None,
    labels: Array | None = None,
) -> tuple[Array, Array | None, Array | None]:
    """``[P ; inputs_embeds]`` for every batch row, with the mask and labels extended.

    ``prompt`` is ``(T, D)``, ``inputs_embeds`` ``(B, L, D)``, ``attention_mask`` and ``labels``
    ``(B, L)``. Returns ``(B, T + L, D)``, the mask with ``T`` leading ones and the labels with ``T``
    leading ``-100``.

    >>> import numpy as np
    >>> e, m, l = prepend(np.ones((2, 3)), np.zeros((1, 4, 3)), attention_mask=np.ones((1, 4), dtype=np.int64),
    ...                   labels=np.arange(4).reshape(1, 4))
    >>> e.shape, m.tolist(), l.tolist()
    ((1, 6, 3), [[1, 1, 1, 1, 1, 1]], [[-100, -100, 0, 1, 2, 3]])
    """
    xp = namespace(prompt, inputs_embeds, attention_mask, labels)
    b, _, dim = inputs_embeds.shape
    t = prompt.shape[0]
    if prompt.shape[1] != dim:
        raise ShapeError(f"prompt has width {prompt.shape[1]} but the input embeddings have {dim}")
    p = xp.broadcast_to(xp.astype(prompt, inputs_embeds.dtype)[None, ...], (b, t, dim))
    embeds = xp.concat([p, inputs_embeds], axis=1)
    mask = None
    if attention_mask is not None:
        ones = xp.ones((b, t), dtype=attention_mask.dtype, device=array_api_compat.device(attention_mask))
        mask = xp.concat([ones, attention_mask], axis=1)
    lab = None
    if labels is not None:
        ignore = xp.full((b, t), -100, dtype=labels.dtype, device=array_api_compat.device(labels))
        lab = xp.concat([ignore, labels], axis=1)
    return embeds, mask, lab


def split_seq2seq(prompt: Array, num_virtual_tokens: int) -> tuple[Array, Array | None]:
    """Encoder part ``P[:T]`` and decoder part ``P[T:]`` (None when ``S = 1``)."""
    enc = prompt[:num_virtual_tokens, ...]
    dec = prompt[num_virtual_tokens:, ...] if prompt.shape[0] > num_virtual_tokens else None
    return enc, dec


def expected_shape(config: PromptTuningConfig) -> tuple[int, int]:
    return config.embeddings_shape()


def validate_checkpoint(config: PromptTuningConfig, shared: dict[str, Array]) -> None:
    if "prompt_embeddings" not in shared:
        raise ShapeError(f"{config.peft_type}: the checkpoint has no prompt_embeddings tensor")
    check_prompt_embeddings(config, shared["prompt_embeddings"], expected_shape(config))

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=PromptTuningConfig, module=None, spec="specs/prompt_tuning.md",
    shared_keys=SHARED_KEYS, prompt_learning=True, init_field="prompt_tuning_init",
    validate_checkpoint=validate_checkpoint,
)
