"""What the prompt-learning methods share: their config fields and how PEFT fills them from a model.

Prompt tuning, P-tuning and prefix tuning adapt no weight; they add virtual tokens. Their checkpoint
holds exactly one tensor, ``prompt_embeddings``: the encoder's output for the virtual tokens (not the
encoder's own parameters). ``T`` = num_virtual_tokens, ``D`` = token_dim, ``S`` =
num_transformer_submodules (2 for encoder-decoder models, else 1), ``L`` = num_layers, ``H`` =
num_attention_heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import PeftConfig
from ..errors import ConfigError, ShapeError

__all__ = ["PromptLearningConfig", "check_prompt_embeddings"]

PREFIX_TYPES = ("PREFIX_TUNING", "CARTRIDGE")  # PEFT sizes both caches to the key/value heads


@dataclass
class PromptLearningConfig(PeftConfig):
    """PEFT's ``PromptLearningConfig`` fields."""

    peft_type: ClassVar[str] = ""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        for name in ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                     "num_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{source}: field {name!r} must be a positive integer or null, got {value!r}")
        if self.num_virtual_tokens is None:
            raise ConfigError(f"{source}: num_virtual_tokens is required")

    @property
    def submodules(self) -> int:
        """``S``: the saved value, else 2 for ``task_type="SEQ_2_SEQ_LM"`` and 1 otherwise (PEFT's rule)."""
        if self.num_transformer_submodules is not None:
            return self.num_transformer_submodules
        return 2 if self.task_type == "SEQ_2_SEQ_LM" else 1

    @property
    def total_virtual_tokens(self) -> int:
        return self.num_virtual_tokens * self.submodules

    def resolve(self, model_config: Mapping[str, Any] | None = None) -> "PromptLearningConfig":
        """A copy with the missing sizes filled from a transformers ``config.json`` dict, as PEFT does.

        ``num_layers`` from num_hidden_layers / num_layers / n_layer; ``token_dim`` from hidden_size /
        n_embd / d_model; ``num_attention_heads`` from num_attention_heads / n_head / num_heads /
        encoder_attention_heads. For prefix tuning and cartridges on a grouped-query model (``num_key_value_heads``
        present), ``head_dim`` is the config's ``head_dim`` (else ``D / H``) and then
        ``token_dim = head_dim * num_key_value_heads`` and ``num_attention_heads = num_key_value_heads``.
        """
        mc = dict(model_config or {})
        if "text_config" in mc and isinstance(mc["text_config"], Mapping):
            mc = dict(mc["text_config"])

        def first(*names: str, what: str) -> int:
            for n in names:
                if mc.get(n) is not None:
                    return int(mc[n])
            raise ConfigError(f"{self.peft_type}: {what} is not set and the model config has none of {names}")

        changes: dict[str, Any] = {}
        if self.num_layers is None:
            changes["num_layers"] = first("num_hidden_layers", "num_layers", "n_layer", what="num_layers")
        if self.token_dim is None:
            changes["token_dim"] = first("hidden_size", "n_embd", "d_model", what="token_dim")
        if self.num_attention_heads is None:
            changes["num_attention_heads"] = first("num_attention_heads", "n_head", "num_heads",
                                                   "encoder_attention_heads", what="num_attention_heads")
        if self.num_transformer_submodules is None:
            changes["num_transformer_submodules"] = self.submodules
        new = dataclasses.replace(self, **changes)
        new.extra = dict(self.extra)
        if self.peft_type in PREFIX_TYPES and mc.get("num_key_value_heads") is not None:
            kv = int(mc["num_key_value_heads"])
            head_dim = int(mc.get("head_dim") or new.token_dim // new.num_attention_heads)
            new.token_dim, new.num_attention_heads = head_dim * kv, kv
        if hasattr(new, "encoder_hidden_size") and getattr(new, "encoder_hidden_size") is None:
            new.encoder_hidden_size = new.token_dim
        new.validate()
        return new


def check_prompt_embeddings(config: PromptLearningConfig, embeddings: Any, expected: tuple[int, ...]) -> None:
    """Raise :class:`ShapeError` unless the checkpoint's ``prompt_embeddings`` has ``expected`` shape."""
    if tuple(embeddings.shape) != tuple(expected):
        raise ShapeError(
            f"{config.peft_type}: prompt_embeddings has shape {tuple(embeddings.shape)} but the config "
            f"(num_virtual_tokens, token_dim, num_layers, num_transformer_submodules) gives {tuple(expected)}"
        )
