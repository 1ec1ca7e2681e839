"""PEFT's layout of LoRA on torch's ``nn.MultiheadAttention`` (specs/lora.md, 12, "nn.MultiheadAttention").

PEFT 0.21.2 adapts an attention ``X`` (one packed q/k/v projection: ``kdim = vdim = embed_dim = E``) with two
LoRAs, both created from ``X``'s ``r`` and ``lora_alpha``:

* module ``X``: the packed in-projection ``X.in_proj_weight (3E, E)`` (bias ``X.in_proj_bias``), a Linear map;
* module ``X.base_layer.out_proj``: the out-projection ``X.out_proj.weight (E, E)`` (bias ``X.out_proj.bias``),
  the ``nn.Linear`` PEFT wraps inside the attention's base layer, so its factors are saved under
  ``X.base_layer.out_proj.lora_*``.

This module only names things: which adapted modules form such a pair, and the base-model names of their
tensors. The math is LoRA's (:mod:`peftmath.methods.lora`).
"""

from __future__ import annotations

from collections.abc import Collection

from .errors import CheckpointError

__all__ = ["OUT_PROJ", "IN_PROJ_LEAVES", "out_proj_owner", "base_module", "check_pairs"]

#: the suffix of the out-projection module inside an adapted attention ``X``: ``X.base_layer.out_proj``
OUT_PROJ = ".base_layer.out_proj"
#: the base tensors of the in-projection: ``X.in_proj_weight``, ``X.in_proj_bias``
IN_PROJ_LEAVES = ("in_proj_weight", "in_proj_bias")


def out_proj_owner(name: str) -> str | None:
    """The attention ``X`` when ``name`` is ``X.base_layer.out_proj``, else None.

    >>> out_proj_owner("enc.mha.base_layer.out_proj"), out_proj_owner("enc.mha")
    ('enc.mha', None)
    """
    if name.endswith(OUT_PROJ) and len(name) > len(OUT_PROJ):
        return name[: -len(OUT_PROJ)]
    return None


def base_module(name: str) -> str:
    """The base model's name of adapted module ``name``: ``X.out_proj`` for ``X.base_layer.out_proj``, else
    ``name`` (PEFT's wrapper adds the ``base_layer`` step; the base model has none).

    >>> base_module("mha.base_layer.out_proj"), base_module("q_proj")
    ('mha.out_proj', 'q_proj')
    """
    owner = out_proj_owner(name)
    return name if owner is None else f"{owner}.out_proj"


def check_pairs(modules: Collection[str], where: str) -> None:
    """Every out-projection module ``X.base_layer.out_proj`` comes with its attention's in-projection module
    ``X`` (PEFT creates both, always): a :class:`~peftmath.errors.CheckpointError` naming the lone ones."""
    lone = sorted(m for m in modules if (o := out_proj_owner(m)) is not None and o not in modules)
    if lone:
        raise CheckpointError(
            f"{where}: {', '.join(lone)} adapted without the attention's in-projection "
            f"({', '.join(out_proj_owner(m) for m in lone)}): PEFT's LoRA on an nn.MultiheadAttention saves both "
            f"(lora_A / lora_B of X on X.in_proj_weight, and of X.base_layer.out_proj on X.out_proj.weight); is "
            f"the checkpoint complete?")
