r"""P-tuning (Liu et al., 2021): virtual-token embeddings produced by a small prompt encoder.

``ids = 0 .. T·S − 1`` index an embedding ``E`` of shape ``(T·S, D)``; the encoder maps ``E`` to the
prompt that is prepended exactly as in prompt tuning (:func:`peftmath.methods.prompt_tuning.prepend`):

* ``"MLP"`` (default): ``P = L₃(ReLU(L₂(ReLU(L₁(E)))))`` with ``L₁: D → h``, ``L₂: h → h``,
  ``L₃: h → D`` (``h = encoder_hidden_size``, default ``D``; PEFT ignores ``encoder_num_layers`` here);
* ``"LSTM"``: a bidirectional ``encoder_num_layers``-layer LSTM of hidden size ``h`` over the ``T·S``
  tokens (as one sequence), then ``P = L₂(ReLU(L₁(·)))`` with ``L₁: 2h → 2h``, ``L₂: 2h → D``.

Parameters use PyTorch's state-dict names (``embedding.weight``, ``mlp_head.0.weight``,
``lstm_head.weight_ih_l0``, ``lstm_head.weight_hh_l0_reverse``, ...).

**What a checkpoint keeps.** PEFT saves only the encoder's output ``P`` (``prompt_embeddings``,
``(T·S, D)``), not ``E`` nor the MLP/LSTM weights: a loaded adapter reproduces the prompt exactly, but
training cannot resume from the encoder (PEFT itself resumes from a plain embedding).
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
from ._prompt import PromptLearningConfig
from .prompt_tuning import prepend, split_seq2seq  # noqa: F401  (P-tuning prompts are used the same way)

Array = Any

__all__ = ["PromptEncoderConfig", "encode", "mlp_head", "lstm", "init_encoder"]

PEFT_TYPE = "P_TUNING"
PROMPT_LEARNING = True
SHARED_KEYS = ("prompt_embeddings",)
PARAMETER_SUFFIXES: tuple[str, ...] = ()
ALLOWS_NO_MODULES = True


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """PEFT's ``PromptEncoderConfig``."""

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_choice(source, "encoder_reparameterization_type", self.encoder_reparameterization_type, ("MLP", "LSTM"))
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers <= 0:
            raise ConfigError(f"{source}: encoder_num_layers must be a positive integer, got {self.encoder_num_layers!r}")

    def embeddings_shape(self) -> tuple[int, int]:
        if self.token_dim is None:
            raise ConfigError(f"{self.peft_type}: token_dim is not set; resolve the config against the model first")
        return (self.total_virtual_tokens, self.token_dim)


Config = PromptEncoderConfig


def _linear(x: Array, params: dict[str, Array], name: str, xp: Any) -> Array:
    return xp.matmul(x, xp.matrix_transpose(params[f"{name}.weight"])) + params[f"{name}.bias"]


def mlp_head(x: Array, params: dict[str, Array], *, layers: int = 3) -> Array:
    """``mlp_head``: Linear-ReLU-Linear-ReLU-Linear (``layers=3``) or Linear-ReLU-Linear (``layers=2``)."""
    xp = namespace(x, *params.values())
    h = x
    for i in range(layers):
        h = _linear(h, params, f"mlp_head.{2 * i}", xp)
        if i < layers - 1:
            h = xp.maximum(h, xp.zeros_like(h))
    return h


def _sigmoid(x: Array, xp: Any) -> Array:
    return 1.0 / (1.0 + xp.exp(-x))


def _lstm_direction(x: Array, params: dict[str, Array], suffix: str, hidden: int, reverse: bool, xp: Any) -> Array:
    """One direction of one LSTM layer over ``x`` (B, T, in); PyTorch's gate order (i, f, g, o)."""
    w_ih, w_hh = params[f"lstm_head.weight_ih_{suffix}"], params[f"lstm_head.weight_hh_{suffix}"]
    b = params[f"lstm_head.bias_ih_{suffix}"] + params[f"lstm_head.bias_hh_{suffix}"]
    batch, steps = x.shape[0], x.shape[1]
    gates_x = xp.matmul(x, xp.matrix_transpose(w_ih)) + b  # (B, T, 4h)
    h = xp.zeros((batch, hidden), dtype=x.dtype, device=array_api_compat.device(x))
    c = xp.zeros((batch, hidden), dtype=x.dtype, device=array_api_compat.device(x))
    outputs = [None] * steps
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        g = gates_x[:, t, :] + xp.matmul(h, xp.matrix_transpose(w_hh))
        i, f = _sigmoid(g[:, :hidden], xp), _sigmoid(g[:, hidden:2 * hidden], xp)
        cand, o = xp.tanh(g[:, 2 * hidden:3 * hidden]), _sigmoid(g[:, 3 * hidden:], xp)
        c = f * c + i * cand
        h = o * xp.tanh(c)
        outputs[t] = h
    return xp.stack(outputs, axis=1)


def lstm(x: Array, params: dict[str, Array], *, num_layers: int, hidden: int) -> Array:
    """A bidirectional multi-layer LSTM (``batch_first``, PyTorch's equations), output ``(B, T, 2h)``.

    Layer ``k`` runs forward (``_l{k}``) and backward (``_l{k}_reverse``) over its input and concatenates
    the two hidden sequences; the next layer reads that concatenation. (Inter-layer dropout is a
    training-time option of PEFT's LSTM and is not applied here.)
    """
    xp = namespace(x, *params.values())
    h = x
    for k in range(num_layers):
        fwd = _lstm_direction(h, params, f"l{k}", hidden, False, xp)
        bwd = _lstm_direction(h, params, f"l{k}_reverse", hidden, True, xp)
        h = xp.concat([fwd, bwd], axis=-1)
    return h


def encode(params: dict[str, Array], config: PromptEncoderConfig) -> Array:
    """The virtual-token embeddings ``P`` (T·S, D): the prompt encoder on ``ids = 0 .. T·S − 1``."""
    total, dim = config.embeddings_shape()
    emb = params["embedding.weight"]
    if tuple(emb.shape) != (total, dim):
        raise ShapeError(f"P_TUNING: embedding.weight has shape {tuple(emb.shape)}, expected {(total, dim)}")
    if config.encoder_reparameterization_type == "MLP":
        return mlp_head(emb, params, layers=3)
    hidden = config.encoder_hidden_size or dim
    out = lstm(emb[None, ...], params, num_layers=config.encoder_num_layers, hidden=hidden)[0, ...]
    return mlp_head(out, params, layers=2)


def init_encoder(config: PromptEncoderConfig, *, seed: int | np.random.Generator | None = 0, xp: Any = None,
                 device: Any = None) -> dict[str, Array]:
    """Fresh encoder parameters with PyTorch's default distributions, drawn on the host.

    ``embedding.weight ~ N(0, 1)``; Linear weights and biases ``U(±1/sqrt(fan_in))``; LSTM weights and
    biases ``U(±1/sqrt(h))``.
    """
    rng = host_rng(seed)
    total, dim = config.embeddings_shape()
    hidden = config.encoder_hidden_size or dim
    host: dict[str, np.ndarray] = {"embedding.weight": rng.standard_normal((total, dim))}

    def linear(name: str, fan_in: int, fan_out: int) -> None:
        bound = 1.0 / math.sqrt(fan_in)
        host[f"{name}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in))
        host[f"{name}.bias"] = rng.uniform(-bound, bound, fan_out)

    if config.encoder_reparameterization_type == "MLP":
        linear("mlp_head.0", dim, hidden)
        linear("mlp_head.2", hidden, hidden)
        linear("mlp_head.4", hidden, dim)
    else:
        bound = 1.0 / math.sqrt(hidden)
        for k in range(config.encoder_num_layers):
            width = dim if k == 0 else 2 * hidden
            for suffix in (f"l{k}", f"l{k}_reverse"):
                host[f"lstm_head.weight_ih_{suffix}"] = rng.uniform(-bound, bound, (4 * hidden, width))
                host[f"lstm_head.weight_hh_{suffix}"] = rng.uniform(-bound, bound, (4 * hidden, hidden))
                host[f"lstm_head.bias_ih_{suffix}"] = rng.uniform(-bound, bound, 4 * hidden)
                host[f"lstm_head.bias_hh_{suffix}"] = rng.uniform(-bound, bound, 4 * hidden)
        linear("mlp_head.0", 2 * hidden, 2 * hidden)
        linear("mlp_head.2", 2 * hidden, dim)
    if xp is None:
        import array_api_compat.numpy as xp
    backend = backend_for(xp)
    return {k: backend.from_host(v.astype(np.float32), xp, device) for k, v in host.items()}


def expected_shape(config: PromptEncoderConfig) -> tuple[int, int]:
    return config.embeddings_shape()


def validate_checkpoint(config: PromptEncoderConfig, shared: dict[str, Array]) -> None:
    from ._prompt import check_prompt_embeddings

    if "prompt_embeddings" not in shared:
        raise ShapeError(f"{config.peft_type}: the checkpoint has no prompt_embeddings tensor")
    check_prompt_embeddings(config, shared["prompt_embeddings"], expected_shape(config))

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=PromptEncoderConfig, module=None, spec="specs/p_tuning.md",
    shared_keys=SHARED_KEYS, prompt_learning=True, init_field=None, validate_checkpoint=validate_checkpoint,
)
