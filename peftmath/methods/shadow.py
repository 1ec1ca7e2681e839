"""SHADOW (ShadowPEFT): a small trainable "shadow" state riding the frozen decoder loop (specs/shadow.md).

Not a weight adaptation: at each wrapped decoder block ``l`` (hidden size ``d``, rank ``r``, update
width ``u``) the block input is corrected from the gap between the base hidden states and the shadow
state, and the shadow state advances by a gated residual update from the block output:

    h^(l)  = h + alpha · ((h − s) W_down^T) W_up^T                          (inject, Eq. 2-4)
    h_out  = Block_l(h^(l))
    s^(l)  = (1 − g) ⊙ s + g ⊙ T(h_out),  g = sigmoid(G(h_out))             (update, Eq. 5-7)

with ``T`` and ``G`` two-layer MLPs ``Linear(d,u) → GELU → Linear(u,d)``. ``s^(0)`` is the shadow
backbone's output (a 1-layer model of the base's own class by default), projected to ``d``. The
trajectory depends on the input, so there is nothing to merge: merges are refused.

The per-module ``ModuleAdapter`` cannot express a state carried from block to block, so the method is
described as a whole-model (``prompt_learning``) method, like the adaption prompt, and its forward is
given here as functions over the block callables (:func:`decoder_loop`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._array import as_compute, compute_dtype, namespace
from ..backends import host_rng
from ..config import PeftConfig
from ..errors import CheckpointError, ConfigError, ShapeError, UnsupportedError
from ._contract import Method
from ._special import erf

Array = Any

PEFT_TYPE = "SHADOW"
#: per-block checkpoint suffixes, as PEFT 0.21.2 saves them (the adapter name stays "default" in the key)
PARAMETER_SUFFIXES = (
    "shadow_down.default.weight", "shadow_up.default.weight",
    "shadow_update_transform.default.0.weight", "shadow_update_transform.default.0.bias",
    "shadow_update_transform.default.2.weight", "shadow_update_transform.default.2.bias",
    "shadow_update_gate.default.0.weight", "shadow_update_gate.default.0.bias",
    "shadow_update_gate.default.2.weight", "shadow_update_gate.default.2.bias",
)
#: the model-level tensors: the shadow backbone (a whole model), its projection, a classifier head
SHARED_KEY_PATTERN = r"base_model\.shadow_(backbone|projection|head)\.default\..+"
_MERGE_REFUSAL = ("SHADOW cannot be merged: its adaptation is an input-dependent trajectory of a shadow state "
                  "through the decoder blocks (the injected correction depends on h - s at every token), not a "
                  "static weight delta; run its forward (peftmath.methods.shadow.decoder_loop) instead")


# --- Config (specs/shadow.md, "Config") ---
@dataclass
class ShadowConfig(PeftConfig):
    """PEFT's ``ShadowConfig`` with its names and defaults: ``r`` (injection rank), ``shadow_alpha``,
    ``shadow_dropout`` (training only), ``init_weights`` (``W_up = 0``), the shadow backbone
    (``shadow_model``, ``shadow_num_hidden_layers``, ``shadow_hidden_size``, ``shadow_num_attention_heads``,
    ``shadow_intermediate_size``, ``share_embeddings``), ``update_hidden_size`` (``u``, default ``r``),
    ``auxiliary_loss_weight`` and the block selection fields."""

    peft_type: ClassVar[str] = PEFT_TYPE

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    r: int = 8
    shadow_alpha: float = 0.1
    shadow_dropout: float = 0.2
    init_weights: bool = True
    shadow_model: str = "mirror"
    shadow_num_hidden_layers: int | None = None
    shadow_hidden_size: int | None = None
    shadow_num_attention_heads: int | None = None
    shadow_intermediate_size: int | None = None
    share_embeddings: bool = True
    update_hidden_size: int | None = None
    auxiliary_loss_weight: float = 0.05
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def validate(self, *, source: str = "config") -> None:
        """PEFT's checks (``__post_init__`` and ``update_layer``), as :class:`ConfigError` naming the field."""
        super().validate(source=source)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"{source}: field 'r' of SHADOW must be a positive integer, got {self.r!r}")
        for name in ("update_hidden_size", "shadow_num_hidden_layers", "shadow_hidden_size",
                     "shadow_num_attention_heads", "shadow_intermediate_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{source}: field {name!r} of SHADOW must be a positive integer or null, "
                                  f"got {value!r}")
        if not 0.0 <= float(self.shadow_dropout) < 1.0:
            raise ConfigError(f"{source}: field 'shadow_dropout' must be in [0, 1), got {self.shadow_dropout!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(f"{source}: 'layers_to_transform' cannot be used when 'target_modules' is a str "
                              f"({self.target_modules!r}); give a list of block names")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError(f"{source}: 'layers_pattern' cannot be used when 'target_modules' is a str "
                              f"({self.target_modules!r})")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(f"{source}: 'layers_pattern' ({self.layers_pattern!r}) needs 'layers_to_transform'")
        if self.shadow_model != "mirror":
            set_ = [n for n in ("shadow_num_hidden_layers", "shadow_hidden_size", "shadow_num_attention_heads",
                                "shadow_intermediate_size") if getattr(self, n) is not None]
            if set_:
                raise ConfigError(f"{source}: shadow_model={self.shadow_model!r} is a checkpoint that defines its "
                                  f"own architecture; unset the mirror-only fields {', '.join(set_)}")

    @property
    def update_width(self) -> int:
        """``u``: ``update_hidden_size`` or ``r`` (PEFT's ``update_hidden_size or r``)."""
        return self.update_hidden_size or self.r


Config = ShadowConfig


# --- Parameter shapes (specs/shadow.md, "Tensors and checkpoint keys") ---
def block_shapes(config: ShadowConfig, hidden_size: int) -> dict[str, tuple[int, ...]]:
    """The per-block tensors' shapes, by checkpoint suffix, for a block of hidden size ``d``."""
    d, r, u = int(hidden_size), config.r, config.update_width
    shapes: dict[str, tuple[int, ...]] = {"shadow_down.default.weight": (r, d), "shadow_up.default.weight": (d, r)}
    for net in ("shadow_update_transform", "shadow_update_gate"):
        shapes.update({f"{net}.default.0.weight": (u, d), f"{net}.default.0.bias": (u,),
                       f"{net}.default.2.weight": (d, u), f"{net}.default.2.bias": (d,)})
    return shapes


def _replaces(key: str, config: ShadowConfig) -> bool:
    """``base_model.model.<module>.<tensor>`` of a module named in ``modules_to_save`` (PEFT saves the trained
    copy under the base module's own key, e.g. ``base_model.model.lm_head.weight``)."""
    if not key.startswith("base_model.model.") or not config.modules_to_save:
        return False
    parts = key[len("base_model.model."):].split(".")[:-1]
    return any(name in parts or ".".join(parts).endswith(name) for name in config.modules_to_save)


def split_checkpoint(tensors: Mapping[str, Array], config: ShadowConfig, hidden_size: int
                     ) -> tuple[dict[str, dict[str, Array]], dict[str, Array], dict[str, Array]]:
    """Split a PEFT SHADOW checkpoint into ``({block: {suffix: tensor}}, {shared key: tensor}, {replaced base
    key: tensor})`` and check every tensor: each block has exactly the ten tensors of :func:`block_shapes`; the
    shared ones are the shadow backbone / projection / head (``base_model.shadow_*.default.*``); the replaced
    ones are trained copies of the ``modules_to_save`` modules (``lm_head``). Anything else is a
    :class:`CheckpointError`."""
    shapes = block_shapes(config, hidden_size)
    blocks: dict[str, dict[str, Array]] = {}
    shared: dict[str, Array] = {}
    replaced: dict[str, Array] = {}
    for key, value in tensors.items():
        if re.fullmatch(SHARED_KEY_PATTERN, key):
            shared[key] = value
            continue
        if _replaces(key, config):
            replaced[key] = value
            continue
        suffix = next((s for s in PARAMETER_SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            raise CheckpointError(f"SHADOW checkpoint: tensor {key!r} is neither a block tensor "
                                  f"({', '.join(PARAMETER_SUFFIXES[:2])}, ...) nor a shadow backbone/projection/head "
                                  f"tensor; peftmath does not know what it is")
        block = key[: -len(suffix) - 1]
        if tuple(value.shape) != shapes[suffix]:
            raise ShapeError(f"SHADOW checkpoint: {key} has shape {tuple(value.shape)}, expected {shapes[suffix]} "
                             f"for hidden size {hidden_size}, r={config.r}, update width {config.update_width}")
        blocks.setdefault(block, {})[suffix] = value
    for block, params in blocks.items():
        missing = sorted(set(PARAMETER_SUFFIXES) - set(params))
        if missing:
            raise CheckpointError(f"SHADOW checkpoint: block {block!r} lacks {missing}")
    if not blocks:
        raise CheckpointError("SHADOW checkpoint: no block tensors (shadow_down / shadow_up / ...) found")
    if not shared:
        raise CheckpointError("SHADOW checkpoint: no shadow backbone tensors (base_model.shadow_backbone.default.*)")
    return blocks, shared, replaced


def checkpoint_tensors(blocks: Mapping[str, Mapping[str, Array]], shared: Mapping[str, Array],
                       replaced: Mapping[str, Array] | None = None) -> dict[str, Array]:
    """The inverse of :func:`split_checkpoint`: PEFT's flat key -> tensor mapping."""
    out = {f"{block}.{suffix}": value for block, params in blocks.items() for suffix, value in params.items()}
    out.update(shared)
    out.update(replaced or {})
    return out


def num_trainable_parameters(blocks: Mapping[str, Mapping[str, Array]], shared: Mapping[str, Array],
                             replaced: Mapping[str, Array] | None = None) -> int:
    """PEFT's count: every block tensor, every backbone / projection / head tensor (a mirror backbone that
    shares the base embeddings has no embedding table in the checkpoint) and every ``modules_to_save`` copy."""
    groups = [v for params in blocks.values() for v in params.values()] + list(shared.values())
    return sum(math.prod(v.shape) for v in groups + list((replaced or {}).values()))


# --- Initialisation (specs/shadow.md, "Initialisation") ---
def init_block(config: ShadowConfig, hidden_size: int, *, seed: int | np.random.Generator | None = 0,
               xp: Any = np, dtype: Any = None) -> dict[str, Array]:
    """One block's tensors with torch's ``nn.Linear`` defaults (weights and biases ``U(-1/√fan_in, 1/√fan_in)``,
    host-seeded, not torch's stream) and ``W_up = 0`` when ``init_weights``."""
    rng = host_rng(seed)
    out: dict[str, Array] = {}
    for suffix, shape in block_shapes(config, hidden_size).items():
        fan_in = shape[-1] if len(shape) == 2 else (hidden_size if ".0." in suffix else config.update_width)
        if suffix == "shadow_up.default.weight" and config.init_weights:
            a = np.zeros(shape)
        else:
            bound = 1.0 / math.sqrt(fan_in)
            a = rng.uniform(-bound, bound, size=shape)
        out[suffix] = xp.asarray(a, dtype=dtype if dtype is not None else xp.float32)
    return out


# --- Forward (specs/shadow.md, "The math") ---
def gelu(x: Array) -> Array:
    """The exact GELU ``x·Φ(x) = x/2·(1 + erf(x/√2))`` (torch's ``nn.GELU()`` default; ``erf`` from
    :mod:`peftmath.methods._special`, the array API has none)."""
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _linear(xp: Any, x: Array, w: Array, b: Array | None = None) -> Array:
    y = xp.matmul(x, xp.matrix_transpose(w))
    return y if b is None else y + b


def _check(h: Array, s: Array, params: Mapping[str, Array], where: str) -> int:
    if tuple(h.shape) != tuple(s.shape):
        raise ShapeError(f"SHADOW {where}: hidden states {tuple(h.shape)} and shadow state {tuple(s.shape)} "
                         f"must have the same shape (the shadow state lives at the base hidden size)")
    d = h.shape[-1]
    r, dd = params["shadow_down.default.weight"].shape
    if dd != d:
        raise ShapeError(f"SHADOW {where}: shadow_down is {(r, dd)} but the hidden size is {d}")
    return d


def _mlp(xp: Any, x: Array, params: Mapping[str, Array], net: str, dtype: Any) -> Array:
    p = {k: as_compute(xp, params[f"{net}.default.{k}"], dtype) for k in ("0.weight", "0.bias", "2.weight", "2.bias")}
    return _linear(xp, gelu(_linear(xp, x, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])


def inject(h: Array, s: Array, params: Mapping[str, Array], *, shadow_alpha: float) -> Array:
    """Eq. 2-4 (eval mode, dropout off): ``h + alpha·((h − s) W_downᵀ) W_upᵀ``, in ``h``'s dtype (computed in
    float32 or float64, rounded once)."""
    xp = namespace(h, s, where="SHADOW inject")
    _check(h, s, params, "inject")
    dt = compute_dtype(xp, h.dtype, s.dtype, params["shadow_down.default.weight"].dtype)
    delta = as_compute(xp, h, dt) - as_compute(xp, s, dt)
    low = _linear(xp, delta, as_compute(xp, params["shadow_down.default.weight"], dt))
    corr = _linear(xp, low, as_compute(xp, params["shadow_up.default.weight"], dt))
    return xp.astype(as_compute(xp, h, dt) + shadow_alpha * corr, h.dtype)


def update(h_out: Array, s: Array, params: Mapping[str, Array]) -> Array:
    """Eq. 5-7: ``(1 − g)⊙s + g⊙T(h_out)`` with ``g = sigmoid(G(h_out))``, in ``s``'s dtype."""
    xp = namespace(h_out, s, where="SHADOW update")
    _check(h_out, s, params, "update")
    dt = compute_dtype(xp, h_out.dtype, s.dtype, params["shadow_down.default.weight"].dtype)
    x = as_compute(xp, h_out, dt)
    t = _mlp(xp, x, params, "shadow_update_transform", dt)
    g = 1.0 / (1.0 + xp.exp(-_mlp(xp, x, params, "shadow_update_gate", dt)))
    return xp.astype((1.0 - g) * as_compute(xp, s, dt) + g * t, s.dtype)


def decoder_loop(h: Array, s0: Array, blocks: Sequence[Callable[[Array], Array]],
                 params: Sequence[Mapping[str, Array] | None], *, shadow_alpha: float) -> tuple[Array, Array]:
    """Run the base decoder blocks with the shadow state riding along: for each block ``i``,
    ``h ← block_i(inject(h, s))``, ``s ← update(h, s)`` where ``params[i]`` is not None; a block with
    ``params[i] is None`` runs plainly (PEFT requires the wrapped blocks to be contiguous: checked).
    Returns ``(h_final, s_final)``; the base model's final norm and head follow on ``h_final``."""
    if len(blocks) != len(params):
        raise ShapeError(f"SHADOW decoder_loop: {len(blocks)} blocks but {len(params)} parameter sets")
    wrapped = [i for i, p in enumerate(params) if p is not None]
    if wrapped and wrapped != list(range(wrapped[0], wrapped[-1] + 1)):
        raise ConfigError(f"SHADOW decoder_loop: wrapped blocks {wrapped} are not contiguous; PEFT's shadow state "
                          f"rides from the first wrapped block to the last")
    s = s0
    for block, p in zip(blocks, params):
        if p is None:
            h = block(h)
            continue
        h = block(inject(h, s, p, shadow_alpha=shadow_alpha))
        s = update(h, s, p)
    return h, s


# --- Merge (specs/shadow.md, "Merge and unmerge") ---
def merge(*args: Any, **kwargs: Any) -> None:
    """Refused: :class:`UnsupportedError` (the adaptation depends on the input)."""
    raise UnsupportedError(_MERGE_REFUSAL)


unmerge = merge


def refuse_diffusion() -> None:
    """SHADOW on Diffusers transformers (PEFT's diffusion_models.py backends) is not implemented."""
    raise UnsupportedError("SHADOW on Diffusers transformers (Flux2 backend, token-MLP fallback of PEFT's "
                           "diffusion_models.py) is not implemented in peftmath; only decoder-only language models")


def validate_checkpoint(config: ShadowConfig, shared: dict[str, Array]) -> None:
    bad = [k for k in shared if not re.fullmatch(SHARED_KEY_PATTERN, k)]
    if bad:
        raise CheckpointError(f"SHADOW: shared tensors {sorted(bad)[:3]} are not shadow backbone / projection / "
                              f"head tensors (base_model.shadow_*.default.*)")


#: the method's description (peftmath.methods._contract.Method): a whole-model method like the adaption prompt
METHOD = Method(
    peft_type=PEFT_TYPE, config=ShadowConfig, module=None, spec="specs/shadow.md",
    parameter_suffixes=PARAMETER_SUFFIXES, prompt_learning=True, init_field="init_weights",
    validate_checkpoint=validate_checkpoint, shared_key_pattern=SHARED_KEY_PATTERN, pattern_trainable=True,
)
