r"""Adaption prompts (LLaMA-Adapter, Zhang et al., 2023): a gated attention over learned prompt tokens.

The top ``K = adapter_layers`` attention modules each get a prompt ``P`` of ``T = adapter_len`` hidden
vectors ``(1, T, D)`` and a scalar gate ``g`` (zero at init). The module's output becomes

    out = attn(x) + O( g · softmax(Q P_Kᵀ / √d) P_V )

with ``Q`` the module's own rotated queries of ``x`` (``(B, H, L, d)``), ``P_K = K(P)``, ``P_V = V(P)`` the
prompt's keys and values through the module's own key / value projections (biases included, no
rotary embedding), split into the ``H_kv`` key/value heads (each serving ``H / H_kv`` query heads), and
``O`` the output projection. The prompt's softmax is separate from the real tokens' (no mask: every
query sees the whole prompt). Nothing is merged: the term depends on the input through ``Q``.

Model types (PEFT's ``TRANSFORMERS_MODEL_CONFIG``): ``llama`` and ``mistral`` (``self_attn``: ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, rotary queries) and ``gpt2`` (``attn``: the fused transformers Conv1D
``c_attn``, no rotary embedding, and **no** output projection: PEFT adds the head-concatenated term
directly to the projected output).

Checkpoint: per adapted module ``<module>.adaption_prompt`` ``(1, T, D)`` and ``<module>.adaption_gate``
``(1,)``, both trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._array import as_compute, compute_dtype, namespace
from ..backends import backend_for, host_rng
from ..config import PeftConfig
from ..errors import ConfigError, ShapeError, UnsupportedError
from ._contract import Method

Array = Any

__all__ = [
    "MODEL_TYPES",
    "AdaptionPromptConfig",
    "adapted_modules",
    "adaption_delta",
    "attention_weights",
    "check_params",
    "forward",
    "gated_prompt_attention",
    "init_adaption_prompt",
    "prompt_keys_values",
    "query_states",
]

PEFT_TYPE = "ADAPTION_PROMPT"
PROMPT_LEARNING = True
SHARED_KEYS: tuple[str, ...] = ()
PARAMETER_SUFFIXES = ("adaption_prompt", "adaption_gate")
ALLOWS_NO_MODULES = True

#: transformers model type -> (default target module, attention kind)
MODEL_TYPES: dict[str, tuple[str, str]] = {"llama": ("self_attn", "llama"), "mistral": ("self_attn", "llama"),
                                           "gpt2": ("attn", "gpt2")}


# --- Config (specs/adaption_prompt.md, "Config") ---
@dataclass
class AdaptionPromptConfig(PeftConfig):
    """PEFT's ``AdaptionPromptConfig``: ``target_modules`` (the attention modules' name, a string; default
    by model type), ``adapter_len`` (``T``) and ``adapter_layers`` (``K``, counted from the top)."""

    peft_type: ClassVar[str] = "ADAPTION_PROMPT"

    target_modules: str | None = None
    adapter_len: int | None = None
    adapter_layers: int | None = None

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ConfigError(f"{source}: field 'target_modules' of ADAPTION_PROMPT is one module name (a string, "
                              f"e.g. 'self_attn'), got {self.target_modules!r}")
        for name in ("adapter_len", "adapter_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{source}: field {name!r} must be a positive integer, got {value!r}")

    def target(self, model_type: str | None = None) -> str:
        """The attention modules' name: ``target_modules``, else the model type's default (PEFT's rule)."""
        if self.target_modules is not None:
            return self.target_modules
        return _kind(model_type)[0]

    def sizes(self) -> tuple[int, int]:
        """``(adapter_len, adapter_layers)``, both required to build or check an adapter."""
        if self.adapter_len is None or self.adapter_layers is None:
            raise ConfigError(f"ADAPTION_PROMPT: adapter_len={self.adapter_len!r} and adapter_layers="
                              f"{self.adapter_layers!r} must both be set")
        return self.adapter_len, self.adapter_layers


Config = AdaptionPromptConfig


def _kind(model_type: str | None) -> tuple[str, str]:
    if model_type not in MODEL_TYPES:
        raise UnsupportedError(f"ADAPTION_PROMPT: model type {model_type!r} is not one PEFT 0.21.2 adapts "
                               f"({', '.join(MODEL_TYPES)}); PEFT refuses it too")
    return MODEL_TYPES[model_type]


# --- Parameter shapes and the adapted modules (specs/adaption_prompt.md, "Which modules, which tensors") ---
def adapted_modules(names: Sequence[str], config: AdaptionPromptConfig, model_type: str | None = None) -> list[str]:
    """The modules PEFT adapts: of the module names ``names`` (in the model's order; state-dict keys are
    reduced to their modules), those ending in ``.<target>``, the last ``adapter_layers`` of them."""
    _, layers = config.sizes()
    target = "." + config.target(model_type)
    found: list[str] = []
    for name in names:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            module = ".".join(parts[:i])
            if module.endswith(target) and module not in found:
                found.append(module)
                break
    if len(found) < layers:
        raise ConfigError(f"ADAPTION_PROMPT: adapter_layers={layers} but the model has {len(found)} modules named "
                          f"'*{target}' (PEFT refuses it too)")
    return found[len(found) - layers:]


def attention_weights(state: Mapping[str, Array], module: str) -> dict[str, Array]:
    """The attention module's own tensors from a base state dict, by local name (``"q_proj.weight"``, ...)."""
    prefix = module + "."
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ShapeError(f"ADAPTION_PROMPT: the base state has no tensors under {module!r}")
    return out


def check_params(config: AdaptionPromptConfig, params: Mapping[str, Mapping[str, Array]]) -> int:
    """Check a checkpoint's tensors against the config: ``adapter_layers`` modules, each with
    ``adaption_prompt (1, adapter_len, D)`` and ``adaption_gate (1,)``, one ``D``. Returns ``D``."""
    length, layers = config.sizes()
    if len(params) != layers:
        raise ShapeError(f"ADAPTION_PROMPT: the checkpoint adapts {len(params)} modules, adapter_layers is {layers}")
    widths = set()
    for module, p in params.items():
        missing = [s for s in PARAMETER_SUFFIXES if s not in p]
        if missing:
            raise ShapeError(f"ADAPTION_PROMPT: module {module!r} has no {', '.join(missing)}")
        prompt, gate = p["adaption_prompt"], p["adaption_gate"]
        if len(prompt.shape) != 3 or tuple(prompt.shape[:2]) != (1, length) or tuple(gate.shape) != (1,):
            raise ShapeError(f"ADAPTION_PROMPT: module {module!r} has adaption_prompt {tuple(prompt.shape)} and "
                             f"adaption_gate {tuple(gate.shape)}; expected (1, {length}, D) and (1,)")
        widths.add(int(prompt.shape[2]))
    if len(widths) > 1:
        raise ShapeError(f"ADAPTION_PROMPT: the prompts have different widths {sorted(widths)}")
    return widths.pop()


# --- Initialisation (specs/adaption_prompt.md, "Initialisation") ---
def init_adaption_prompt(config: AdaptionPromptConfig, modules: Sequence[str], hidden_size: int, *,
                         seed: int | np.random.Generator | None = 0, xp: Any = None,
                         device: Any = None) -> dict[str, dict[str, Array]]:
    """Per module: ``adaption_prompt ~ N(0, 1)`` of shape ``(1, T, D)`` and ``adaption_gate = 0`` (zero
    init: the adapted model starts as the base model), float32, drawn on the host in ``modules``' order."""
    length, layers = config.sizes()
    if len(modules) != layers:
        raise ConfigError(f"ADAPTION_PROMPT: {len(modules)} modules given, adapter_layers is {layers}")
    rng = host_rng(seed)
    if xp is None:
        import array_api_compat.numpy as xp
    backend = backend_for(xp)
    return {m: {"adaption_prompt": backend.from_host(rng.standard_normal((1, length, hidden_size)).astype(np.float32),
                                                     xp, device),
                "adaption_gate": backend.from_host(np.zeros(1, np.float32), xp, device)} for m in modules}


# --- Forward (specs/adaption_prompt.md, "The attention change") ---
def _project(x: Array, weights: Mapping[str, Array], name: str, xp: Any, cd: Any, *, conv1d: bool = False) -> Array:
    """``x Wᵀ + b`` (nn.Linear ``(out, in)``) or ``x W + b`` (transformers Conv1D ``(in, out)``)."""
    w = as_compute(xp, weights[f"{name}.weight"], cd)
    y = xp.matmul(x, w if conv1d else xp.matrix_transpose(w))
    bias = weights.get(f"{name}.bias")
    return y if bias is None else y + as_compute(xp, bias, cd)


def _heads(x: Array, heads: int, xp: Any) -> Array:
    """``(B, L, heads·d)`` -> ``(B, heads, L, d)``."""
    b, n, width = x.shape
    if width % heads:
        raise ShapeError(f"ADAPTION_PROMPT: width {width} is not divisible by {heads} heads")
    return xp.permute_dims(xp.reshape(x, (b, n, heads, width // heads)), (0, 2, 1, 3))


def _geometry(weights: Mapping[str, Array], num_heads: int, kind: str) -> tuple[int, int, int]:
    """``(D, d, H_kv)`` from the module's weights; PEFT's grouping ``D // (H_kv·d)`` must equal ``H / H_kv``."""
    if kind == "gpt2":
        hidden = int(weights["c_attn.weight"].shape[0])
        if hidden % num_heads:
            raise ShapeError(f"ADAPTION_PROMPT: hidden size {hidden} is not divisible by {num_heads} heads")
        return hidden, hidden // num_heads, num_heads
    q_rows, hidden = (int(s) for s in weights["q_proj.weight"].shape)
    k_rows = int(weights["k_proj.weight"].shape[0])
    if q_rows % num_heads or k_rows % (q_rows // num_heads):
        raise ShapeError(f"ADAPTION_PROMPT: q_proj has {q_rows} rows and k_proj {k_rows}: not {num_heads} heads "
                         f"of one width")
    d = q_rows // num_heads
    kv = k_rows // d
    if num_heads % kv or hidden // k_rows != num_heads // kv:
        raise UnsupportedError(
            f"ADAPTION_PROMPT: PEFT groups the query heads by k_proj's in/out features ({hidden} // {k_rows} = "
            f"{hidden // k_rows}), but this module has {num_heads} query heads on {kv} key/value heads; PEFT's "
            f"reshape fails on such a layer (head_dim · num_attention_heads != hidden_size), so there is nothing "
            f"to match")
    return hidden, d, kv


def _setup(x: Array, weights: Mapping[str, Array], num_heads: int, model_type: str) -> tuple:
    """``(kind, D, H_kv, xp, compute dtype, x in it)`` for a projection of ``x`` by the module's weights."""
    kind = _kind(model_type)[1]
    hidden, _, kv = _geometry(weights, num_heads, kind)
    xp = namespace(x, *weights.values())
    cd = compute_dtype(xp, x.dtype, *(w.dtype for w in weights.values()))
    return kind, hidden, kv, xp, cd, as_compute(xp, x, cd)


def prompt_keys_values(prompt: Array, weights: Mapping[str, Array], *, num_heads: int,
                       model_type: str = "llama") -> tuple[Array, Array]:
    """The prompt's keys and values ``(1, H_kv, T, d)`` through the module's own projections (biases
    included, no rotary embedding): ``K(P)``, ``V(P)`` (Llama / Mistral) or the key and value thirds of
    ``c_attn(P)`` (GPT-2)."""
    kind, hidden, kv, xp, cd, p = _setup(prompt, weights, num_heads, model_type)
    if kind == "gpt2":
        qkv = _project(p, weights, "c_attn", xp, cd, conv1d=True)
        key, value = qkv[..., hidden:2 * hidden], qkv[..., 2 * hidden:]
    else:
        key, value = _project(p, weights, "k_proj", xp, cd), _project(p, weights, "v_proj", xp, cd)
    return _heads(key, kv, xp), _heads(value, kv, xp)


def _rotate_half(x: Array, xp: Any) -> Array:
    half = x.shape[-1] // 2
    return xp.concat([-x[..., half:], x[..., :half]], axis=-1)


def query_states(hidden_states: Array, weights: Mapping[str, Array], *, num_heads: int, model_type: str = "llama",
                 position_embeddings: tuple[Array, Array] | None = None) -> Array:
    """The module's queries ``(B, H, L, d)`` of ``hidden_states`` ``(B, L, D)``: ``rope(Q(x))`` with
    ``position_embeddings = (cos, sin)`` each ``(B, L, d)`` (Llama / Mistral: ``q·cos + rotate_half(q)·sin``)
    or the query third of ``c_attn(x)`` (GPT-2)."""
    kind, hidden, _, xp, cd, x = _setup(hidden_states, weights, num_heads, model_type)
    if kind == "gpt2":
        return _heads(_project(x, weights, "c_attn", xp, cd, conv1d=True)[..., :hidden], num_heads, xp)
    if position_embeddings is None:
        raise ConfigError("ADAPTION_PROMPT: a Llama / Mistral query needs position_embeddings=(cos, sin), the "
                          "rotary tables the model passes to its attention layers")
    q = _heads(_project(x, weights, "q_proj", xp, cd), num_heads, xp)
    cos, sin = (as_compute(xp, t, cd)[:, None, ...] for t in position_embeddings)
    return q * cos + _rotate_half(q, xp) * sin


def gated_prompt_attention(q: Array, prompt_k: Array, prompt_v: Array, gate: Array) -> Array:
    """``g · softmax(q P_Kᵀ / √d) P_V``, heads concatenated: ``(B, L, H·d)``. ``q`` is ``(B, H, L, d)``,
    ``prompt_k`` / ``prompt_v`` ``(1 or B, H_kv, T, d)``; no mask (every query sees the whole prompt).
    The attention is the reference one (:func:`peftmath.methods.prefix_tuning.scaled_dot_product_attention`)."""
    from .prefix_tuning import (
        scaled_dot_product_attention,  # the one reference attention
    )

    xp = namespace(q, prompt_k, prompt_v, gate)
    b, h, n, d = q.shape
    shape = (b,) + tuple(prompt_k.shape[1:])
    attn = scaled_dot_product_attention(q, xp.broadcast_to(prompt_k, shape), xp.broadcast_to(prompt_v, shape))
    out = xp.reshape(xp.permute_dims(attn, (0, 2, 1, 3)), (b, n, h * d))
    return as_compute(xp, gate, out.dtype) * out


def adaption_delta(hidden_states: Array, prompt: Array, gate: Array, weights: Mapping[str, Array], *, num_heads: int,
                   model_type: str = "llama", position_embeddings: tuple[Array, Array] | None = None,
                   peft_compat: bool = False) -> Array:
    """What the adapter adds to the module's output ``(B, L, D)``: ``O(g · softmax(Q P_Kᵀ/√d) P_V)`` with
    ``O`` the output projection's weight (Llama / Mistral) or nothing (GPT-2). With ``peft_compat`` and an
    ``o_proj.bias``, that bias is added too, as PEFT does (its gate-zero output is then ``attn(x) + b_O``,
    not ``attn(x)``); the default keeps zero-init exact. In ``hidden_states``' dtype, computed in float32
    or wider."""
    kind = _kind(model_type)[1]
    if len(hidden_states.shape) != 3 or len(prompt.shape) != 3 or prompt.shape[0] != 1:
        raise ShapeError(f"ADAPTION_PROMPT: hidden_states {tuple(hidden_states.shape)} must be (B, L, D) and "
                         f"adaption_prompt {tuple(prompt.shape)} (1, T, D)")
    if tuple(gate.shape) != (1,):
        raise ShapeError(f"ADAPTION_PROMPT: adaption_gate has shape {tuple(gate.shape)}, expected (1,)")
    q = query_states(hidden_states, weights, num_heads=num_heads, model_type=model_type,
                     position_embeddings=position_embeddings)
    pk, pv = prompt_keys_values(prompt, weights, num_heads=num_heads, model_type=model_type)
    xp = namespace(hidden_states, prompt, gate, *weights.values())
    out = gated_prompt_attention(q, pk, pv, as_compute(xp, gate, q.dtype))
    if kind == "llama":
        w = as_compute(xp, weights["o_proj.weight"], out.dtype)
        out = xp.matmul(out, xp.matrix_transpose(w))
        if peft_compat and weights.get("o_proj.bias") is not None:
            out = out + as_compute(xp, weights["o_proj.bias"], out.dtype)
    return as_compute(xp, out, hidden_states.dtype)


def forward(attention_output: Array, hidden_states: Array, prompt: Array, gate: Array, weights: Mapping[str, Array],
            *, num_heads: int, model_type: str = "llama", position_embeddings: tuple[Array, Array] | None = None,
            peft_compat: bool = False) -> Array:
    """The adapted module's output: its base output ``attn(x)`` ``(B, L, D)`` plus :func:`adaption_delta`."""
    xp = namespace(attention_output, hidden_states)
    delta = adaption_delta(hidden_states, prompt, gate, weights, num_heads=num_heads, model_type=model_type,
                           position_embeddings=position_embeddings, peft_compat=peft_compat)
    if tuple(delta.shape) != tuple(attention_output.shape):
        raise ShapeError(f"ADAPTION_PROMPT: the attention output {tuple(attention_output.shape)} and the adapter's "
                         f"term {tuple(delta.shape)} differ")
    cd = compute_dtype(xp, attention_output.dtype, delta.dtype)
    return as_compute(xp, as_compute(xp, attention_output, cd) + as_compute(xp, delta, cd), attention_output.dtype)


def validate_checkpoint(config: AdaptionPromptConfig, shared: dict[str, Array]) -> None:
    if shared:
        raise ShapeError(f"ADAPTION_PROMPT: the checkpoint has shared tensors {sorted(shared)[:3]}; an adaption "
                         f"prompt has only per-module adaption_prompt / adaption_gate")


#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=AdaptionPromptConfig, module=None, spec="specs/adaption_prompt.md",
    parameter_suffixes=PARAMETER_SUFFIXES, prompt_learning=True, init_field=None,
    validate_checkpoint=validate_checkpoint,
)
