r"""X-LoRA: a mixture of LoRA experts gated per token (Buehler & Buehler, 2024, arXiv:2402.07148).

X-LoRA takes ``n`` trained LoRA adapters (the experts) on the same modules and a small classifier. The model runs
twice: a *scaling pass* with every expert applied with the constant scaling ``scaling_pass_value`` (0 by default:
the base model) gives the last hidden states ``h (batch, seq, hidden)``; the classifier turns them into scalings
``S (batch, seq, L, n)`` (``L`` = the number of adapted layers); the *real pass* applies expert ``i`` on adapted
layer ``l`` with the per-token weight ``S[..., l, i]``::

    classifier:  z = MLP(h)  (Linear, ReLU)×(depth−1) then Linear   (batch, seq, n) or (batch, seq, L·n)
                 S = z broadcast over the L layers (layerwise_scalings=False) or reshaped (batch, seq, L, n)
                 S = softmax(S / T) over the experts                (enable_softmax, temperature T)
    layer l:     s = S[:, :, l, :]                                    (batch, seq, n)
                 top_k_lora = k:         s keeps its k largest entries per token, the others 0
                 enable_softmax_topk:    softmax over the kept entries (the others stay 0)
                 y = x Wᵀ + b + g Σ_i c_i (s_i ⊙ x) A_iᵀ B_iᵀ        c_i = alpha_i / r_i, g = global_scaling_weight

The scalings depend on the input, token by token, so X-LoRA has no weight to merge: :class:`XLoraModule` refuses
merge and unmerge (:class:`~peftmath.errors.UnsupportedError`). One expert alone, or a fixed mixture with weights
``w``, is the LoRA sum ``Σ_i w_i c_i B_i A_i``: ``pm.combine(experts, w, combination_type="cat")`` builds it.

Checkpoint: PEFT saves the classifier only (``base_model.internal_xlora_classifier.layers.<j>.weight`` /
``.bias``, ``j`` = the index in PEFT's ``nn.Sequential``, which counts the ReLU and Dropout modules) and, in
``adapter_config.json``, ``adapters``: expert name -> the folder of a LoRA checkpoint saved separately (PEFT
also copies each expert into a numbered subfolder). :func:`load_xlora` reads the classifier folder and the
expert folders. PEFT 0.21.2 drops ``layers.0`` (the classifier's first Linear) when it saves (its filter for the
experts' adapter names ``"0"``, ``"1"``, … removes every key with ``.0.``), so its own checkpoints cannot be
reloaded faithfully: see the spec.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .._array import as_compute, compute_dtype, namespace
from ..config import PeftConfig, check_flags, check_number, check_positive_int
from ..errors import CheckpointError, ConfigError, ShapeError, UnsupportedError
from ._contract import Method

Array = Any

__all__ = ["XLoraConfig", "classifier_keys", "classifier_scalings", "layer_scalings", "lora_linear_forward",
           "lora_embedding_forward", "num_trainable_parameters", "load_xlora", "refuse_merge", "PREFIX"]

PEFT_TYPE = "XLORA"
#: the prefix of the classifier's tensors in PEFT's adapter_model.safetensors
PREFIX = "base_model.internal_xlora_classifier.layers."


# --------------------------------------------------------------------------------------------------
# Config (specs/xlora.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class XLoraConfig(PeftConfig):
    """PEFT's ``XLoraConfig`` (``peft_type: "XLORA"``), PEFT's names and defaults (``hidden_size`` and
    ``adapters`` have none in PEFT, which then warns and takes 4096 and ``{}``)."""

    peft_type: ClassVar[str] = "XLORA"

    hidden_size: int | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        if self.hidden_size is not None:
            check_positive_int(source, "hidden_size", self.hidden_size)
        check_positive_int(source, "xlora_depth", self.xlora_depth)
        check_positive_int(source, "xlora_size", self.xlora_size)
        if self.top_k_lora is not None:
            check_positive_int(source, "top_k_lora", self.top_k_lora)
        if self.enable_softmax_topk and self.top_k_lora is None:
            raise ConfigError(f"{source}: enable_softmax_topk needs top_k_lora (PEFT only warns, then applies a "
                              f"softmax over every expert whose scaling is non-zero); set top_k_lora")
        for name in ("softmax_temperature", "scaling_pass_value", "global_scaling_weight", "xlora_dropout_p"):
            check_number(source, name, getattr(self, name))
        if self.softmax_temperature == 0:
            raise ConfigError(f"{source}: softmax_temperature must not be 0 (the logits are divided by it)")
        check_flags(source, self, "enable_softmax", "enable_softmax_topk", "layerwise_scalings",
                    "use_trainable_adapters")
        if not isinstance(self.adapters, Mapping):
            raise ConfigError(f"{source}: field 'adapters' must map expert names to LoRA folders, "
                              f"got {self.adapters!r}")


# --------------------------------------------------------------------------------------------------
# The classifier (specs/xlora.md, "2. The classifier")
# --------------------------------------------------------------------------------------------------
def classifier_keys(config: XLoraConfig, n_experts: int, n_layers: int) -> dict[str, tuple[int, ...]]:
    """PEFT's classifier tensors: ``{key without PREFIX: shape}`` in order. PEFT's ``nn.Sequential`` holds
    ``Linear, ReLU[, Dropout]`` per hidden layer (Dropout when ``xlora_dropout_p > 0``), so the Linear indices step
    by 3 (or 2); the last Linear has ``n`` outputs (``L·n`` with ``layerwise_scalings``)."""
    out_last = n_experts * (n_layers if config.layerwise_scalings else 1)
    hidden = config.hidden_size or 4096
    step = 3 if config.xlora_dropout_p > 0.0 else 2
    shapes: dict[str, tuple[int, ...]] = {}
    fan_in = hidden
    j = 0
    for _ in range(config.xlora_depth - 1):
        shapes[f"{j}.weight"], shapes[f"{j}.bias"] = (config.xlora_size, fan_in), (config.xlora_size,)
        fan_in = config.xlora_size
        j += step
    shapes[f"{j}.weight"], shapes[f"{j}.bias"] = (out_last, fan_in), (out_last,)
    return shapes


def _softmax(xp: Any, z: Array) -> Array:
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def classifier_scalings(hidden: Array, layers: Sequence[tuple[Array, Array]], config: XLoraConfig, *,
                        n_layers: int) -> Array:
    """``S (batch, seq, n_layers, n)`` from the last hidden states ``hidden (batch, seq, hidden_size)`` and the
    classifier's Linear layers ``[(weight, bias), ...]`` in order: ReLU between them (dropout is the identity at
    inference), the logits broadcast over the layers (or reshaped, ``layerwise_scalings``), then
    ``softmax(S / softmax_temperature)`` over the experts when ``enable_softmax``. Float32 or wider."""
    xp = namespace(hidden, *[a for wb in layers for a in wb], where="xlora.classifier_scalings")
    if hidden.ndim != 3:
        raise ShapeError(f"xlora.classifier_scalings: hidden states {tuple(hidden.shape)} must be (batch, seq, hidden)")
    if len(layers) != config.xlora_depth:
        raise ShapeError(f"xlora.classifier_scalings: {len(layers)} Linear layers for xlora_depth={config.xlora_depth}")
    cd = compute_dtype(xp, hidden.dtype, *[w.dtype for w, _ in layers])
    z = as_compute(xp, hidden, cd)
    for k, (w, b) in enumerate(layers):
        if int(w.shape[1]) != int(z.shape[-1]) or tuple(b.shape) != (int(w.shape[0]),):
            raise ShapeError(f"xlora.classifier_scalings: classifier Linear {k} has weight {tuple(w.shape)} and bias "
                             f"{tuple(b.shape)} for inputs of {int(z.shape[-1])} features")
        z = xp.matmul(z, xp.matrix_transpose(as_compute(xp, w, cd))) + as_compute(xp, b, cd)
        if k < len(layers) - 1:
            z = xp.maximum(z, xp.zeros_like(z))
    bs, seq, width = (int(s) for s in z.shape)
    if config.layerwise_scalings:
        if width % n_layers:
            raise ShapeError(f"xlora.classifier_scalings: {width} logits do not split into n_layers={n_layers}")
        S = xp.reshape(z, (bs, seq, n_layers, width // n_layers))
    else:
        S = xp.broadcast_to(z[:, :, None, :], (bs, seq, n_layers, width))
    if config.enable_softmax:
        S = _softmax(xp, S / config.softmax_temperature)
    return S


# --------------------------------------------------------------------------------------------------
# One layer given the scalings (specs/xlora.md, "3. One layer given the scalings")
# --------------------------------------------------------------------------------------------------
def layer_scalings(scalings: Array, layer_number: int, config: XLoraConfig) -> Array:
    """``s (batch, seq, n)``: layer ``layer_number``'s slice of ``S``, with PEFT's ``top_k_lora`` (the ``k`` largest
    per token kept, the others 0; ties: the lower expert index first) and ``enable_softmax_topk`` (softmax over the
    non-zero entries, the others 0)."""
    xp = namespace(scalings, where="xlora.layer_scalings")
    if scalings.ndim != 4 or not 0 <= layer_number < int(scalings.shape[2]):
        raise ShapeError(f"xlora.layer_scalings: scalings {tuple(scalings.shape)} must be (batch, seq, n_layers, n) "
                         f"with layer {layer_number} among the n_layers")
    s = scalings[:, :, layer_number, :]
    n = int(s.shape[-1])
    if config.top_k_lora is not None and config.top_k_lora < n:
        order = xp.argsort(-s, axis=-1, stable=True)  # descending, first index first among equals
        ranks = xp.argsort(order, axis=-1, stable=True)
        s = xp.where(ranks < config.top_k_lora, s, xp.zeros_like(s))
    if config.enable_softmax_topk:
        keep = s != 0
        z = xp.where(keep, s, xp.full_like(s, -xp.inf))
        s = xp.where(keep, _softmax(xp, z), xp.zeros_like(s))
    return s


def lora_linear_forward(x: Array, W: Array, experts: Sequence[tuple[Array, Array, float]], scalings: Array,
                        layer_number: int, config: XLoraConfig, *, bias: Array | None = None) -> Array:
    """X-LoRA's Linear: ``x Wᵀ + b + g Σ_i c_i (s_i ⊙ x) A_iᵀ B_iᵀ`` for ``x (batch, seq, in)``, experts
    ``[(A_i (r_i, in), B_i (out, r_i), c_i = alpha_i / r_i), ...]`` in PEFT's order and ``scalings`` ``(batch, seq,
    n_layers, n)`` (:func:`layer_scalings` picks this layer's); computed in float32 (float64) and rounded once."""
    xp = namespace(x, W, scalings, bias, *[a for e in experts for a in e[:2]], where="xlora.lora_linear_forward")
    s = layer_scalings(scalings, layer_number, config)
    if x.ndim != 3 or tuple(int(d) for d in s.shape[:2]) != tuple(int(d) for d in x.shape[:2]):
        raise ShapeError(f"xlora.lora_linear_forward: x {tuple(x.shape)} must be (batch, seq, in) matching the "
                         f"scalings {tuple(scalings.shape)}")
    if int(s.shape[-1]) != len(experts):
        raise ShapeError(f"xlora.lora_linear_forward: the scalings have {int(s.shape[-1])} experts, "
                         f"{len(experts)} given")
    out, inn = (int(d) for d in W.shape)
    cd = compute_dtype(xp, x.dtype, W.dtype, scalings.dtype, *[a.dtype for e in experts for a in e[:2]])
    xc = as_compute(xp, x, cd)
    y = xp.matmul(xc, xp.matrix_transpose(as_compute(xp, W, cd)))
    if bias is not None:
        y = y + as_compute(xp, bias, cd)
    s = as_compute(xp, s, cd)
    for i, (A, B, c) in enumerate(experts):
        if int(A.shape[1]) != inn or int(B.shape[0]) != out or int(A.shape[0]) != int(B.shape[1]):
            raise ShapeError(f"xlora.lora_linear_forward: expert {i} has lora_A {tuple(A.shape)} and lora_B "
                             f"{tuple(B.shape)}, not (r, {inn}) and ({out}, r)")
        h = xp.matmul(xc * s[:, :, i:i + 1], xp.matrix_transpose(as_compute(xp, A, cd)))
        y = y + (config.global_scaling_weight * float(c)) * xp.matmul(h, xp.matrix_transpose(as_compute(xp, B, cd)))
    return as_compute(xp, y, xp.result_type(x.dtype, W.dtype))


def lora_embedding_forward(ids: Array, table: Array, experts: Sequence[tuple[Array, Array, float]], scalings: Array,
                           layer_number: int, config: XLoraConfig, *, embed_scale: float | None = None) -> Array:
    """X-LoRA's Embedding: ``E[ids] + g Σ_i c_i (s_i ⊙ A_iᵀ[ids]) B_iᵀ`` (times ``embed_scale`` where the base layer
    scales its output, as Gemma's) for token ids ``(batch, seq)``, experts ``[(lora_embedding_A (r_i, vocab),
    lora_embedding_B (dim, r_i), c_i), ...]``; float32 or wider, rounded once to the table's dtype."""
    xp = namespace(ids, table, scalings, *[a for e in experts for a in e[:2]], where="xlora.lora_embedding_forward")
    s = layer_scalings(scalings, layer_number, config)
    if ids.ndim != 2 or tuple(int(d) for d in s.shape[:2]) != tuple(int(d) for d in ids.shape):
        raise ShapeError(f"xlora.lora_embedding_forward: ids {tuple(ids.shape)} must be (batch, seq) matching the "
                         f"scalings {tuple(scalings.shape)}")
    if int(s.shape[-1]) != len(experts):
        raise ShapeError(f"xlora.lora_embedding_forward: the scalings have {int(s.shape[-1])} experts, "
                         f"{len(experts)} given")
    cd = compute_dtype(xp, table.dtype, scalings.dtype, *[a.dtype for e in experts for a in e[:2]])
    flat = xp.reshape(ids, (-1,))
    y = xp.take(as_compute(xp, table, cd), flat, axis=0)
    s = xp.reshape(as_compute(xp, s, cd), (-1, len(experts)))
    term = xp.zeros_like(y)
    for i, (A, B, c) in enumerate(experts):
        rows = xp.take(xp.matrix_transpose(as_compute(xp, A, cd)), flat, axis=0) * s[:, i:i + 1]
        term = term + (config.global_scaling_weight * float(c)) * xp.matmul(
            rows, xp.matrix_transpose(as_compute(xp, B, cd)))
    if embed_scale is not None:
        term = term * embed_scale
    out = xp.reshape(y + term, (*ids.shape, int(table.shape[1])))
    return as_compute(xp, out, table.dtype)


# --------------------------------------------------------------------------------------------------
# Merge: refused (specs/xlora.md, "4. Merge: refused")
# --------------------------------------------------------------------------------------------------
def refuse_merge(what: str = "merged") -> UnsupportedError:
    """The refusal of every X-LoRA merge / unmerge / delta weight."""
    return UnsupportedError(
        f"X-LoRA cannot be {what}: its classifier computes the experts' scalings from the hidden states of each "
        f"input, token by token, so the change depends on the input and is no fixed weight (PEFT does not merge "
        f"X-LoRA either). Merge one expert (its LoRA checkpoint), or a fixed mixture with weights w: "
        f"peftmath.combine(experts, w, combination_type='cat')")


# --------------------------------------------------------------------------------------------------
# Checkpoint (specs/xlora.md, "5. Checkpoint")
# --------------------------------------------------------------------------------------------------
def num_trainable_parameters(config: XLoraConfig, classifier: Mapping[str, Array],
                             experts: Sequence[Any] = ()) -> int:
    """What PEFT trains: the classifier, plus the experts' tensors when ``use_trainable_adapters``."""
    total = sum(int(np.prod(tuple(int(d) for d in a.shape))) for a in classifier.values())
    if config.use_trainable_adapters:
        total += sum(ad.num_trainable_parameters() for ad in experts)
    return total


def load_xlora(folder: str | os.PathLike, adapters: Mapping[str, str | os.PathLike] | None = None, *,
               n_layers: int | None = None) -> tuple[XLoraConfig, list[tuple[Array, Array]], dict[str, Any]]:
    """``(config, classifier [(weight, bias), ...], {expert name: LoRA Adapter})`` from PEFT's X-LoRA folder and
    the experts' LoRA folders (``adapters``, else the config's ``adapters``; a relative path that does not exist
    from the working directory is taken relative to ``folder``). X-LoRA needs more than one folder, so this is not
    :func:`peftmath.load_adapter`.

    PEFT 0.21.2's own saves lack the classifier's first Linear (``layers.0``): refused with a
    :class:`~peftmath.errors.CheckpointError` naming the missing keys."""
    import json

    from ..io.peft import load_adapter  # an X-LoRA is a classifier plus LoRA adapters: read each with the reader
    from ..io.safetensors import load_file

    folder = os.fspath(folder)
    try:
        with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: cannot read adapter_config.json ({e})") from None
    if raw.get("peft_type") != PEFT_TYPE:
        raise CheckpointError(f"{folder}: adapter_config.json has peft_type {raw.get('peft_type')!r}, not 'XLORA'")
    config = XLoraConfig.from_dict(raw, source=f"{folder}/adapter_config.json")
    config.validate(source=f"{folder}/adapter_config.json")
    names = dict(adapters if adapters is not None else config.adapters)
    if not names:
        raise CheckpointError(f"{folder}: no experts: the config's 'adapters' is empty and none were given")
    experts = {}
    for name, path in names.items():
        p = os.fspath(path)
        experts[name] = load_adapter(p if os.path.isabs(p) or os.path.exists(p) else os.path.join(folder, p))
        if experts[name].config.peft_type != "LORA":
            raise CheckpointError(f"{folder}: expert {name!r} ({p}) is a {experts[name].config.peft_type} adapter; "
                                  f"X-LoRA mixes LoRA adapters")
    if n_layers is None:
        n_layers = len({m for ad in experts.values() for m in ad.params})
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    want = classifier_keys(config, len(experts), n_layers)
    got = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    missing = [k for k in want if k not in got]
    extra = sorted(set(got) - set(want)) + sorted(k for k in tensors if not k.startswith(PREFIX))
    if missing or extra:
        raise CheckpointError(
            f"{folder}: the X-LoRA classifier (xlora_depth={config.xlora_depth}, xlora_dropout_p="
            f"{config.xlora_dropout_p}) needs {[PREFIX + k for k in want]}; missing {[PREFIX + k for k in missing]}, "
            f"unexpected {extra}. PEFT 0.21.2 drops layers.0 (the first Linear) when it saves an X-LoRA model, so its "
            f"checkpoints lack it; save the classifier's state_dict yourself")
    for k, shape in want.items():
        if tuple(int(d) for d in got[k].shape) != shape:
            raise CheckpointError(f"{folder}: {PREFIX + k} has shape {tuple(got[k].shape)}, expected {shape}")
    keys = list(want)
    layers = [(got[keys[i]], got[keys[i + 1]]) for i in range(0, len(keys), 2)]
    return config, layers, experts


# --------------------------------------------------------------------------------------------------
# The description (specs/xlora.md): a classifier plus LoRA experts saved in other folders
# --------------------------------------------------------------------------------------------------
def validate_checkpoint(config: XLoraConfig, shared: Mapping[str, Array]) -> None:
    """``load_adapter`` on an X-LoRA folder: refused, pointing to :func:`load_xlora` (the adapter is a classifier
    plus LoRA experts read from the folders its config names, and PEFT 0.21.2's saves lack the classifier's first
    Linear, which :func:`load_xlora` checks)."""
    raise UnsupportedError(
        "an X-LoRA adapter is a classifier over LoRA experts saved in other folders (its config's 'adapters'); "
        "peftmath.load_adapter reads one adapter, so read it with peftmath.methods.xlora.load_xlora(folder, "
        "adapters) (which refuses PEFT 0.21.2's saves: they drop the classifier's first Linear). Its forward is "
        "xlora.classifier_scalings + xlora.lora_linear_forward; it cannot be merged (the mixture depends on the "
        "input); a fixed mixture merges as pm.combine(experts, weights, 'cat')")


Config = XLoraConfig
Module = None
#: the method's description: module-free (the experts are LoRA adapters; the classifier acts on hidden states)
METHOD = Method(
    peft_type=PEFT_TYPE, config=XLoraConfig, module=None, spec="specs/xlora.md", prompt_learning=True,
    init_field=None, shared_key_pattern=r"base_model\.internal_xlora_classifier\..*",
    validate_checkpoint=validate_checkpoint,
)

