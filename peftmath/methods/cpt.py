r"""CPT, context-aware prompt tuning (Blau et al., 2024): in-context examples as a prompt, refined by a
norm-bounded delta.

The prompt is the embedded token ids of a few-shot context, ``E[c]`` (``T`` = ``len(cpt_token_ids)``
rows of the model's ``(V, D)`` embedding matrix), plus a trained delta ``Δ`` whose row ``i`` is projected
onto the ball of radius ``ε_i`` (:func:`project`):

``P = E[c] + proj(Δ)``, ``(T, D)``, prepended to the input embeddings as prompt tuning's table.

Each context token has a type (``cpt_tokens_type_mask``): ``type % 4`` is 1 (input template), 2 (input),
3 (output template) or 0 (output label; ``type > 0``). Only rows of types 1-3 are trained, with radius
``opt_projection_format_epsilon·sqrt(D/2048)`` (templates) or ``opt_projection_epsilon·sqrt(D/2048)``
(inputs); the loss (:func:`loss`) is a cross-entropy on the output labels, of the context and of the input,
optionally decayed per example. PEFT saves ``P`` itself as ``prompt_embeddings``; nothing is merged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from .._array import namespace
from ..backends import backend_for
from ..config import check_choice
from ..errors import ConfigError, ShapeError
from ._contract import Method
from ._prompt import PromptLearningConfig, check_prompt_embeddings

Array = Any

__all__ = ["CPTConfig", "epsilon", "init_prompt", "labels_and_type_mask", "loss", "project", "prompt",
           "trained_rows"]

PEFT_TYPE = "CPT"
SHARED_KEYS = ("prompt_embeddings",)
MIN_EPSILON = 1e-10  # PEFT's radius for the rows it does not train (types 0 and the labels)
REFERENCE_DIM = 2048  # the radii scale with sqrt(D / 2048)


# --- Config (specs/cpt.md, "Notation and parameters") ---
@dataclass
class CPTConfig(PromptLearningConfig):
    """PEFT's ``CPTConfig``. As PEFT's ``__post_init__``: ``cpt_token_ids`` defaults to ``[0]``, the two masks
    to ones, ``num_virtual_tokens`` to ``len(cpt_token_ids)``, ``num_transformer_submodules`` to 1."""

    peft_type: ClassVar[str] = PEFT_TYPE

    cpt_token_ids: list[int] | None = None
    cpt_mask: list[int] | None = None
    cpt_tokens_type_mask: list[int] | None = None
    opt_weighted_loss_type: str | None = "none"
    opt_loss_decay_factor: float | None = 1.0
    opt_projection_epsilon: float | None = 0.1
    opt_projection_format_epsilon: float | None = 0.1
    tokenizer_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if self.cpt_token_ids is None:
            self.cpt_token_ids = [0]
        n = len(self.cpt_token_ids)
        if self.cpt_mask is None:
            self.cpt_mask = [1] * n
        if self.cpt_tokens_type_mask is None:
            self.cpt_tokens_type_mask = [1] * n
        if self.num_virtual_tokens is None:
            self.num_virtual_tokens = n
        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 1

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        if self.task_type != "CAUSAL_LM":
            raise ConfigError(f"{source}: CPT only supports task_type='CAUSAL_LM' (as PEFT), got {self.task_type!r}")
        for name in ("cpt_token_ids", "cpt_mask", "cpt_tokens_type_mask"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value or \
                    not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"{source}: field {name!r} must be a non-empty list of integers, got {value!r}")
        if any(v < 0 for v in self.cpt_token_ids):
            raise ConfigError(f"{source}: cpt_token_ids must be token ids >= 0, got {self.cpt_token_ids}")
        lengths = {len(self.cpt_token_ids), len(self.cpt_mask), len(self.cpt_tokens_type_mask),
                   self.num_virtual_tokens}
        if len(lengths) != 1:
            raise ConfigError(f"{source}: cpt_token_ids ({len(self.cpt_token_ids)}), cpt_mask ({len(self.cpt_mask)}), "
                              f"cpt_tokens_type_mask ({len(self.cpt_tokens_type_mask)}) and num_virtual_tokens "
                              f"({self.num_virtual_tokens}) must agree")
        if self.num_transformer_submodules != 1:
            raise ConfigError(f"{source}: CPT has num_transformer_submodules=1 (PEFT sets it), got "
                              f"{self.num_transformer_submodules}")
        check_choice(source, "opt_weighted_loss_type", self.opt_weighted_loss_type, ("none", "decay"))
        for name in ("opt_loss_decay_factor", "opt_projection_epsilon", "opt_projection_format_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{source}: field {name!r} must be a finite number >= 0, got {value!r}")

    def embeddings_shape(self) -> tuple[int, int]:
        if self.token_dim is None:
            raise ConfigError(f"{PEFT_TYPE}: token_dim is not set; resolve the config against the model first")
        return (self.num_virtual_tokens, self.token_dim)


Config = CPTConfig


# --- Projection (specs/cpt.md, "The math") ---
def trained_rows(config: CPTConfig) -> list[bool]:
    """The rows of ``Δ`` PEFT updates (its gradient hook): ``type % 4`` in {1, 2, 3}."""
    return [t % 4 in (1, 2, 3) for t in config.cpt_tokens_type_mask]


def epsilon(config: CPTConfig) -> list[float]:
    """Row radii ``ε_i``: ``opt_projection_format_epsilon·sqrt(D/2048)`` for ``type > 0`` with ``type % 4`` in
    {1, 3}, ``opt_projection_epsilon·sqrt(D/2048)`` for ``type % 4 = 2``, else ``1e-10``.

    >>> epsilon(CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[5, 6, 7, 8], cpt_tokens_type_mask=[1, 2, 3, 4],
    ...                   token_dim=512, opt_projection_epsilon=0.2))
    [0.05, 0.1, 0.05, 1e-10]
    """
    dim = config.embeddings_shape()[1]
    scale = math.sqrt(dim / REFERENCE_DIM)
    out = []
    for t in config.cpt_tokens_type_mask:
        if t > 0 and t % 4 in (1, 3):
            out.append(config.opt_projection_format_epsilon * scale)
        elif t > 0 and t % 4 == 2:
            out.append(config.opt_projection_epsilon * scale)
        else:
            out.append(MIN_EPSILON)
    return out


def project(delta: Array, config: CPTConfig) -> Array:
    """Row ``i`` of ``Δ`` scaled by ``ε_i / max(‖Δ_i‖, ε_i)``: rows longer than ``ε_i`` are shortened to it,
    the others kept (PEFT's ``get_projection``, which its forward writes back into ``Δ``)."""
    xp = namespace(delta)
    if tuple(delta.shape) != config.embeddings_shape():
        raise ShapeError(f"{PEFT_TYPE}: delta has shape {tuple(delta.shape)}, the config gives "
                         f"{config.embeddings_shape()} (num_virtual_tokens, token_dim)")
    eps = backend_for(xp).from_host(np.asarray(epsilon(config), dtype=np.float64), xp,
                                    array_api_compat.device(delta))
    eps = xp.astype(eps, delta.dtype)
    norm = xp.sqrt(xp.sum(delta * delta, axis=1))
    factor = xp.where(norm > 0, eps / xp.maximum(norm, eps), xp.ones_like(norm))
    return delta * factor[:, None]


def prompt(embedding: Array, delta: Array, config: CPTConfig) -> Array:
    """``P = E[c] + proj(Δ)``, ``(T, D)``: what PEFT prepends (and saves as ``prompt_embeddings``)."""
    if tuple(embedding.shape) != config.embeddings_shape():
        raise ShapeError(f"{PEFT_TYPE}: the context embedding has shape {tuple(embedding.shape)}, the config gives "
                         f"{config.embeddings_shape()}")
    return embedding + project(delta, config)


# --- Initialisation (specs/cpt.md, "Initialisation") ---
def init_prompt(config: CPTConfig, word_embeddings: Array) -> tuple[Array, Array]:
    """``(E[c], Δ = 0)`` in float32: the rows of the ``(V, D)`` embedding matrix at ``cpt_token_ids`` (frozen)
    and a zero delta (trained)."""
    xp = namespace(word_embeddings)
    vocab, dim = word_embeddings.shape
    if dim != config.embeddings_shape()[1]:
        raise ShapeError(f"{PEFT_TYPE}: word_embeddings has {dim} columns, token_dim is {config.token_dim}")
    bad = [i for i in config.cpt_token_ids if i >= vocab]
    if bad:
        raise ShapeError(f"{PEFT_TYPE}: cpt_token_ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    device = array_api_compat.device(word_embeddings)
    index = backend_for(xp).from_host(np.asarray(config.cpt_token_ids, dtype=np.int64), xp, device)
    embedding = xp.astype(xp.take(word_embeddings, index, axis=0), xp.float32)
    return embedding, xp.zeros_like(embedding)


# --- Labels and loss (specs/cpt.md, "Loss") ---
def labels_and_type_mask(config: CPTConfig, labels: Array, input_type_mask: Array | None = None
                         ) -> tuple[Array, Array]:
    """The labels and type mask of ``[context ; input]``, ``(B, T + L)`` each (PEFT's ``_cpt_forward``).

    Types: the context's ``cpt_tokens_type_mask``, then ``input_type_mask`` (default 4 everywhere: all
    labels) with its positive entries shifted by the context's largest type. Labels: ``cpt_token_ids`` then
    ``labels``, kept where ``type > 0`` and ``type % 4 = 0``, else -100. ``input_type_mask`` is not
    modified (PEFT's is, in place).
    """
    xp = namespace(labels, input_type_mask)
    if len(labels.shape) != 2:
        raise ShapeError(f"{PEFT_TYPE}: labels must be (batch, length), got {tuple(labels.shape)}")
    b, length = labels.shape
    device = array_api_compat.device(labels)
    to = backend_for(xp)
    prefix_types = np.asarray(config.cpt_tokens_type_mask, dtype=np.int64)
    if input_type_mask is None:
        types = xp.full((b, length), 4, dtype=xp.int64, device=device)
    else:
        if tuple(input_type_mask.shape) != (b, length):
            raise ShapeError(f"{PEFT_TYPE}: input_type_mask has shape {tuple(input_type_mask.shape)}, labels "
                             f"{(b, length)}")
        types = xp.astype(input_type_mask, xp.int64)
    types = xp.where(types > 0, types + int(prefix_types.max()), types)
    prefix = xp.broadcast_to(to.from_host(prefix_types, xp, device)[None, :], (b, prefix_types.shape[0]))
    types = xp.concat([prefix, types], axis=1)
    ids = to.from_host(np.asarray(config.cpt_token_ids, dtype=np.int64), xp, device)
    all_labels = xp.concat([xp.broadcast_to(ids[None, :], (b, ids.shape[0])), xp.astype(labels, xp.int64)], axis=1)
    keep = (types > 0) & (types % 4 == 0)
    return xp.where(keep, all_labels, xp.full_like(all_labels, -100)), types


def loss(logits: Array, labels: Array, type_mask: Array, config: CPTConfig) -> Array:
    """CPT's loss (PEFT's ``CPTEmbedding.calculate_loss``): the next-token cross-entropy ``ℓ_j`` at every
    position ``j`` whose (shifted) label is not -100, times a weight ``w_j``, averaged over those positions.
    ``w_j = 1``, or with ``opt_weighted_loss_type="decay"``: ``γ^k`` with ``γ = opt_loss_decay_factor`` and
    ``k`` the number of distinct label types (``> 0``, ``% 4 = 0``) of the row larger than ``j``'s type (the
    last example gets weight 1, the one before ``γ``, ...). ``logits`` ``(B, N, V)``, ``labels`` and
    ``type_mask`` ``(B, N)`` as from :func:`labels_and_type_mask`."""
    xp = namespace(logits, labels, type_mask)
    if len(logits.shape) != 3 or tuple(labels.shape) != tuple(logits.shape[:2]) or \
            tuple(type_mask.shape) != tuple(labels.shape):
        raise ShapeError(f"{PEFT_TYPE}: logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and type_mask "
                         f"{tuple(type_mask.shape)} must be (B, N, V), (B, N), (B, N)")
    z = logits[:, :-1, :]
    target = xp.astype(labels[:, 1:], xp.int64)
    types = xp.astype(type_mask[:, 1:], xp.int64)
    valid = target != -100
    peak = xp.max(z, axis=-1, keepdims=True)
    logz = xp.log(xp.sum(xp.exp(z - peak), axis=-1)) + peak[..., 0]
    picked = xp.take_along_axis(z, xp.where(valid, target, xp.zeros_like(target))[..., None], axis=-1)[..., 0]
    nll = logz - picked
    weights = xp.ones_like(nll)
    if config.opt_weighted_loss_type == "decay":
        is_label = (types > 0) & (types % 4 == 0)
        rows = []
        for i in range(types.shape[0]):
            distinct = xp.unique_values(types[i, ...][is_label[i, ...]])  # sorted ascending
            above = xp.sum(xp.astype(distinct[None, :] > types[i, :, None], nll.dtype), axis=1)
            rows.append(xp.where(is_label[i, ...], float(config.opt_loss_decay_factor) ** above,
                                 xp.ones_like(above)))
        weights = xp.stack(rows)
    count = xp.sum(xp.astype(valid, nll.dtype))
    return xp.sum(xp.where(valid, nll * weights, xp.zeros_like(nll))) / count


# --- Checkpoint (specs/cpt.md, "PEFT compatibility") ---
def trainable_parameters(config: CPTConfig) -> int:
    """PEFT trains ``Δ``, all ``T·D`` numbers (its hook zeroes the gradients of the label rows; the
    embedding ``E[c]`` is frozen)."""
    t, d = config.embeddings_shape()
    return t * d


def validate_checkpoint(config: CPTConfig, shared: dict[str, Array]) -> None:
    if "prompt_embeddings" not in shared:
        raise ShapeError(f"{PEFT_TYPE}: the checkpoint has no prompt_embeddings tensor")
    check_prompt_embeddings(config, shared["prompt_embeddings"], config.embeddings_shape())


#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=CPTConfig, module=None, spec="specs/cpt.md",
    shared_keys=SHARED_KEYS, prompt_learning=True, init_field=None, validate_checkpoint=validate_checkpoint,
    count_trainable=lambda config, params, shared: trainable_parameters(config),
)
