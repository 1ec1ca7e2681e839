r"""Prefix tuning (Li & Liang, 2021): trained keys and values prepended to every attention layer.

The prefix is a table ``Π`` of shape ``(T, 2·L·D)`` — either a parameter itself (default) or the output
of a projection ``Π = W₂ tanh(W₁ E + b₁) + b₂`` of a ``(T, D)`` embedding ``E`` (``prefix_projection``).
It is saved as the checkpoint tensor ``prompt_embeddings`` (the projection's weights are not saved).

**Layout of past_key_values** (``H`` heads, ``d = D / H``): element ``(t, ((2ℓ + j)·H + h)·d + e)`` of
``Π`` is, for layer ``ℓ``, the key (``j = 0``) or value (``j = 1``) of head ``h`` at virtual token ``t``,
channel ``e``. :func:`past_key_values` returns per layer ``(key, value)``, each ``(B, H, T, d)`` — PEFT's
``view(B, T, 2L, H, d).permute(2, 0, 3, 1, 4)``. For encoder-decoder models (``S = 2``) PEFT duplicates
the ``2L`` rows and takes layer ``ℓ``'s four tensors from rows ``(4ℓ + u) mod 2L``, ``u = 0..3``, as
(self-key, self-value, cross-key, cross-value); it then discards the cross-attention pair.

**Grouped-query attention.** With ``num_key_value_heads`` in the model config, the prefix has the
key/value width: ``D = head_dim · num_key_value_heads`` and ``H = num_key_value_heads``
(:meth:`~peftmath.methods._prompt.PromptLearningConfig.resolve`).

:func:`scaled_dot_product_attention` is a reference attention with the prefix prepended to the keys
and values and the mask extended, so that what a prefix does to attention outputs can be checked end to
end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from .._array import as_compute, compute_dtype, namespace
from ..backends import backend_for, host_rng
from ..errors import ConfigError, ShapeError
from ._contract import Method
from ._prompt import PromptLearningConfig, check_prompt_embeddings

Array = Any

__all__ = ["PrefixTuningConfig", "encode", "past_key_values", "init_prefix", "scaled_dot_product_attention"]

PEFT_TYPE = "PREFIX_TUNING"
PROMPT_LEARNING = True
SHARED_KEYS = ("prompt_embeddings",)
PARAMETER_SUFFIXES: tuple[str, ...] = ()
ALLOWS_NO_MODULES = True


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """PEFT's ``PrefixTuningConfig``."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"{source}: field 'init_weights' must be null or 'zero', got {self.init_weights!r}")
        if self.token_dim is not None and self.num_attention_heads is not None and self.token_dim % self.num_attention_heads:
            raise ConfigError(
                f"{source}: token_dim {self.token_dim} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; the prefix cannot be split into heads"
            )

    def table_shape(self) -> tuple[int, int]:
        if self.token_dim is None or self.num_layers is None:
            raise ConfigError(f"{self.peft_type}: token_dim / num_layers are not set; resolve the config first")
        return (self.num_virtual_tokens, 2 * self.num_layers * self.token_dim)


Config = PrefixTuningConfig


def encode(params: dict[str, Array], config: PrefixTuningConfig) -> Array:
    """The prefix table ``Π`` (T, 2·L·D): ``embedding.weight``, or the projection of it."""
    shape = config.table_shape()
    emb = params["embedding.weight"]
    if not config.prefix_projection:
        if tuple(emb.shape) != shape:
            raise ShapeError(f"PREFIX_TUNING: embedding.weight has shape {tuple(emb.shape)}, expected {shape}")
        return emb
    xp = namespace(*params.values())
    h = xp.tanh(xp.matmul(emb, xp.matrix_transpose(params["transform.0.weight"])) + params["transform.0.bias"])
    return xp.matmul(h, xp.matrix_transpose(params["transform.2.weight"])) + params["transform.2.bias"]


def past_key_values(table: Array, config: PrefixTuningConfig, batch_size: int) -> list[tuple[Array, ...]]:
    """Per layer ``(key, value)`` (``S = 1``) or ``(key, value, cross_key, cross_value)`` (``S = 2``),
    each ``(batch_size, H, T, D / H)``, from the prefix table ``Π`` (T, 2·L·D).

    >>> import numpy as np
    >>> cfg = PrefixTuningConfig(num_virtual_tokens=2, token_dim=4, num_layers=3, num_attention_heads=2,
    ...                          num_transformer_submodules=1)
    >>> pkv = past_key_values(np.arange(2 * 24.0).reshape(2, 24), cfg, batch_size=1)
    >>> len(pkv), pkv[0][0].shape
    (3, (1, 2, 2, 2))
    >>> float(pkv[1][1][0, 1, 0, 1])   # layer 1, value (j=1), head 1, token 0, channel 1: ((2+1)*2+1)*2+1
    15.0
    """
    xp = namespace(table)
    t, width = config.table_shape()
    check_prompt_embeddings(config, table, (t, width))
    layers, heads, dim = config.num_layers, config.num_attention_heads, config.token_dim
    if dim % heads:
        raise ShapeError(f"token_dim {dim} is not divisible by num_attention_heads {heads}")
    d = dim // heads
    rows = xp.permute_dims(xp.reshape(table, (t, 2 * layers, heads, d)), (1, 2, 0, 3))  # (2L, H, T, d)
    s = config.submodules
    per_layer = 2 * s
    out = []
    for layer in range(layers):
        idx = [(per_layer * layer + u) % (2 * layers) for u in range(per_layer)]
        out.append(tuple(xp.broadcast_to(rows[i, ...][None, ...], (batch_size, heads, t, d)) for i in idx))
    return out


def init_prefix(config: PrefixTuningConfig, *, seed: int | np.random.Generator | None = 0, xp: Any = None,
                device: Any = None) -> dict[str, Array]:
    """Fresh parameters with PyTorch's default distributions (host-drawn); ``init_weights="zero"``
    zeroes the table (or the projection's last layer) as PEFT does."""
    rng = host_rng(seed)
    t, width = config.table_shape()
    host: dict[str, np.ndarray] = {}
    zero = config.init_weights == "zero"
    if not config.prefix_projection:
        host["embedding.weight"] = np.zeros((t, width)) if zero else rng.standard_normal((t, width))
    else:
        dim, hidden = config.token_dim, config.encoder_hidden_size or config.token_dim
        host["embedding.weight"] = rng.standard_normal((t, dim))
        b1, b2 = 1.0 / math.sqrt(dim), 1.0 / math.sqrt(hidden)
        host["transform.0.weight"] = rng.uniform(-b1, b1, (hidden, dim))
        host["transform.0.bias"] = rng.uniform(-b1, b1, hidden)
        host["transform.2.weight"] = np.zeros((width, hidden)) if zero else rng.uniform(-b2, b2, (width, hidden))
        host["transform.2.bias"] = np.zeros(width) if zero else rng.uniform(-b2, b2, width)
    if xp is None:
        import array_api_compat.numpy as xp
    backend = backend_for(xp)
    return {k: backend.from_host(v.astype(np.float32), xp, device) for k, v in host.items()}


def scaled_dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    prefix: tuple[Array, Array] | None = None,
    attention_mask: Array | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Array:
    """``softmax(q kᵀ · scale + mask) v`` with a key/value prefix, grouped-query heads and a causal mask.

    ``q`` is ``(B, Hq, Lq, d)``; ``k``, ``v`` are ``(B, Hkv, Lk, d)`` with ``Hq`` a multiple of ``Hkv``
    (each key/value head serves ``Hq / Hkv`` query heads); ``prefix = (pk, pv)`` of shape
    ``(B, Hkv, T, d)`` is prepended to the keys and values. ``attention_mask`` ``(B, Lk)`` (1 keep, 0 drop)
    is extended with ``T`` ones, as PEFT extends it. With ``causal``, query ``i`` sits at position
    ``T + Lk − Lq + i`` and sees every key at or before it, the whole prefix included. Computed in
    float32 (or wider); the result has ``q``'s dtype.
    """
    xp = namespace(q, k, v, attention_mask, *(prefix or ()))
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ShapeError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    cd = compute_dtype(xp, q.dtype, k.dtype, v.dtype)
    t = 0
    if prefix is not None:
        pk, pv = prefix
        if pk.shape[:2] != (b, hkv) or pk.shape[3] != d or pk.shape != pv.shape:
            raise ShapeError(f"attention: prefix {tuple(pk.shape)} does not fit keys {tuple(k.shape)}")
        t = pk.shape[2]
        k = xp.concat([as_compute(xp, pk, cd), as_compute(xp, k, cd)], axis=2)
        v = xp.concat([as_compute(xp, pv, cd), as_compute(xp, v, cd)], axis=2)
    lk = k.shape[2]
    group = hq // hkv
    qg = xp.reshape(as_compute(xp, q, cd), (b, hkv, group, lq, d))
    kc, vc = as_compute(xp, k, cd)[:, :, None, ...], as_compute(xp, v, cd)[:, :, None, ...]
    scores = xp.matmul(qg, xp.matrix_transpose(kc)) * (scale if scale is not None else 1.0 / math.sqrt(d))
    keep = xp.ones((lq, lk), dtype=xp.bool, device=array_api_compat.device(q))
    if causal:
        qpos = xp.arange(lq, device=array_api_compat.device(q))[:, None] + (lk - lq)
        keep = xp.arange(lk, device=array_api_compat.device(q))[None, :] <= qpos
    keep = xp.broadcast_to(keep[None, None, None, ...], (b, 1, 1, lq, lk))
    if attention_mask is not None:
        ones = xp.ones((b, t), dtype=xp.bool, device=array_api_compat.device(q))
        m = xp.concat([ones, xp.astype(attention_mask, xp.bool)], axis=1)
        keep = xp.logical_and(keep, m[:, None, None, None, :])
    scores = xp.where(keep, scores, xp.asarray(-xp.inf, dtype=cd, device=array_api_compat.device(q)))
    scores = scores - xp.max(scores, axis=-1, keepdims=True)
    weights = xp.exp(scores)
    weights = weights / xp.sum(weights, axis=-1, keepdims=True)
    out = xp.matmul(weights, vc)
    return as_compute(xp, xp.reshape(out, (b, hq, lq, d)), q.dtype)


def expected_shape(config: PrefixTuningConfig) -> tuple[int, int]:
    return config.table_shape()


def validate_checkpoint(config: PrefixTuningConfig, shared: dict[str, Array]) -> None:
    if "prompt_embeddings" not in shared:
        raise ShapeError(f"{config.peft_type}: the checkpoint has no prompt_embeddings tensor")
    check_prompt_embeddings(config, shared["prompt_embeddings"], expected_shape(config))

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=PrefixTuningConfig, module=None, spec="specs/prefix_tuning.md",
    shared_keys=SHARED_KEYS, prompt_learning=True, init_field=None, validate_checkpoint=validate_checkpoint,
    past_key_values=past_key_values,
)
