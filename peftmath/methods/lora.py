r"""LoRA: low-rank adaptation (Hu et al., 2021), with rsLoRA scaling (Kalajdzievski, 2023).

A frozen weight ``W`` (matrix view ``(out, in)``, see :mod:`peftmath.layers`) is adapted by a rank-``r``
product::

    ΔW = s · B A          A: (r, in)   B: (out, r)
    s  = lora_alpha / r               (use_rslora: lora_alpha / sqrt(r))
    y  = x Wᵀ + b + s · (dropout(x) Aᵀ Bᵀ + b_B)      (b_B only with lora_bias)

Layer kinds (shapes as stored in PEFT checkpoints):

=================  ==============================  ==================================  ======================
layer              ``A``                           ``B``                               ``ΔW`` (stored layout)
=================  ==============================  ==================================  ======================
Linear             ``lora_A.weight (r, in)``       ``lora_B.weight (out, r)``          ``s·BA``  (out, in)
Conv1D (GPT-2)     ``lora_A.weight (r, in)``       ``lora_B.weight (out, r)``          ``s·(BA)ᵀ`` (in, out)
Embedding          ``lora_embedding_A (r, V)``     ``lora_embedding_B (D, r)``         ``s·(BA)ᵀ`` (V, D)
ConvNd             ``lora_A.weight (r, in, *k)``   ``lora_B.weight (out, r/g, 1..)``   ``s·B₂A₂`` reshaped
=================  ==============================  ==================================  ======================

where ``B₂ = B.reshape(out, r)`` and ``A₂ = A.reshape(r, in·prod(k))``. Merge is ``W + ΔW`` and unmerge
``W − ΔW``: exact in real arithmetic, within ``4·eps·(|W| + |ΔW|)`` in floating point.

The functions below take arrays of any array-API library and return arrays of the same library; the
``layer`` keyword names the base layer kind (``"Linear"`` by default for 2-D weights, ``"Conv1D"`` for
PEFT's ``fan_in_fan_out=True``, ``"Embedding"``, or a :class:`~peftmath.layers.Layer`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NamedTuple

import numpy as np

from .._array import (
    all_finite,
    as_compute,
    common_device,
    compute_dtype,
    conv,
    embedding_lookup,
    is_low_precision,
    namespace,
)
from .._linalg import randomized_svd  # noqa: F401  (lora.randomized_svd stays importable)
from .._mha import out_proj_owner
from ..backends import backend_for, host_rng, kaiming_uniform_bound
from ..config import (
    TunerConfig,
    check_choice,
    check_flags,
    check_fraction,
    check_number,
    check_pattern,
    check_positive_int,
    resolve_pattern,
)
from ..errors import CheckpointError, ConfigError, NonFiniteError, NotInvertibleError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._contract import Method
from ._base import (
    MergeResult,
    ModuleAdapter,
    add_fresh_delta,
    apply_delta,
    bias_update,
    check_shape,
    orient_2d,
    write_back,
)
from ._svd import low_from_record, low_split, smallest_triplets

Array = Any

__all__ = [
    "LoraConfig",
    "scaling",
    "delta_weight",
    "forward",
    "merge",
    "unmerge",
    "merge_bias",
    "unmerge_bias",
    "init_weights",
    "LoraInit",
    "LoraModule",
]

PEFT_TYPE = "LORA"

_INIT_CHOICES = (True, False, "gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal", "lora_ga", "mica")


# --------------------------------------------------------------------------------------------------
# Config (specs/lora.md, "3. Scaling"; init_lora_weights: "4. Initialisation (`init_lora_weights`)")
# --------------------------------------------------------------------------------------------------
@dataclass
class LoraConfig(TunerConfig):
    """PEFT's ``LoraConfig`` (``peft_type: "LORA"``), the fields that define the math.

    Other fields PEFT writes (``megatron_config``, ``eva_config``, ...) are kept in ``extra`` and
    written back unchanged.
    """

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    loftq_config: dict = field(default_factory=dict)
    layer_replication: list | None = None
    target_parameters: list[str] | None = None
    #: BD-LoRA (PEFT's ``BdLoraConfig`` as saved: ``target_modules_bd_a`` / ``target_modules_bd_b`` / ``nblocks``
    #: / ``match_strict``): block-diagonal ``lora_A`` or ``lora_B`` (specs/lora.md, "12. Variants")
    use_bdlora: dict | None = None
    #: VeLoRA / MonteCLoRA settings: training-time only, their saved tensors take no part in inference
    velora_config: dict | None = None
    monteclora_config: dict | None = None
    #: KaSA (PEFT's ``KasaConfig`` as saved: ``beta``, ``gamma``, its training losses' weights): the base weight's
    #: r smallest singular components dropped, ``ΔW = s·B diag(lora_diag) A`` (specs/lora.md, "12. Variants")
    kasa_config: dict | None = None
    #: aLoRA (activated LoRA): the token ids of the invocation sequence; the adapter acts only on the tokens from
    #: its last occurrence on (specs/lora.md, "12. Variants")
    alora_invocation_tokens: list[int] | None = None
    #: trainable tokens: rows of the token embedding trained beside LoRA (a list: the input embedding's ids; an
    #: object: ids per module), saved as <module>.token_adapter.trainable_tokens_delta (peftmath/methods/_lora_tokens.py)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_positive_int(source, "r", self.r)
        self.validate_lora_fields(source)
        from ._lora_tokens import check_indices  # lazy: _lora_tokens imports this module

        check_indices(self.trainable_token_indices, source)
        self.validate_variants(source)
        if self.rank_pattern is None:
            self.rank_pattern = {}
        if self.alpha_pattern is None:
            self.alpha_pattern = {}
        check_pattern(source, "rank_pattern", self.rank_pattern)
        check_pattern(source, "alpha_pattern", self.alpha_pattern)
        for name, value in (self.rank_pattern or {}).items():
            check_positive_int(source, f"rank_pattern[{name!r}]", value)
        for name, value in (self.alpha_pattern or {}).items():
            check_number(source, f"alpha_pattern[{name!r}]", value)

    def validate_lora_fields(self, source: str) -> bool | str:
        """The checks of the fields LoRA shares with AdaLoRA (PEFT's ``AdaLoraConfig`` runs
        ``LoraConfig.__post_init__`` first): alpha, dropout, bias, the flags, the init option, the
        ``lora_bias`` rule and the LoftQ settings. ``r`` and the patterns are LoRA's own (AdaLoRA uses
        ``init_r`` and a mask pattern). Returns ``init_lora_weights``."""
        check_number(source, "lora_alpha", self.lora_alpha)
        check_fraction(source, "lora_dropout", self.lora_dropout)
        check_choice(source, "bias", self.bias, ("none", "all", "lora_only"))
        check_flags(source, self, "use_rslora", "use_dora", "lora_bias", "fan_in_fan_out")
        init = self.init_lora_weights
        if not (isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init)):
            check_choice(source, "init_lora_weights", init, _INIT_CHOICES)
        if self.lora_bias and (self.use_dora or init not in (True, False)):
            raise ConfigError(
                f"{source}: lora_bias=true needs init_lora_weights true/false and use_dora=false "
                f"(got init_lora_weights={init!r}, use_dora={self.use_dora}); PEFT refuses this too"
            )
        if not isinstance(self.loftq_config, dict):
            raise ConfigError(f"{source}: field 'loftq_config' must be an object, got {self.loftq_config!r}")
        if init == "loftq" and not self.loftq_config:
            raise ConfigError(f"{source}: init_lora_weights='loftq' needs a loftq_config")
        return init

    def validate_variants(self, source: str) -> None:
        """The BD-LoRA / VeLoRA / MonteCLoRA settings: objects with PEFT's fields, and at most one LoRA variant
        (PEFT 0.21.2 resolves one variant per layer and raises on a combination)."""
        for name in ("use_bdlora", "velora_config", "monteclora_config", "kasa_config"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{source}: field {name!r} must be an object (PEFT's {name} as saved), got {value!r}")
        if self.use_bdlora is not None:
            bd = self.use_bdlora
            check_positive_int(source, "use_bdlora.nblocks", bd.get("nblocks", 1))
            for key in ("target_modules_bd_a", "target_modules_bd_b"):
                patterns = bd.get(key)
                if patterns is not None and not (isinstance(patterns, list) and all(isinstance(p, str) for p in patterns)):
                    raise ConfigError(f"{source}: use_bdlora.{key} must be a list of module-name patterns, got {patterns!r}")
            if not isinstance(bd.get("match_strict", True), bool):
                raise ConfigError(f"{source}: use_bdlora.match_strict must be true or false, got {bd['match_strict']!r}")
        if self.velora_config is not None:
            check_positive_int(source, "velora_config.num_groups", variant_setting(self, "velora_config", "num_groups"))
            init_type = variant_setting(self, "velora_config", "init_type")
            if init_type not in VELORA_INIT_TYPES:
                raise ConfigError(f"{source}: velora_config.init_type must be one of {', '.join(VELORA_INIT_TYPES)} "
                                  f"(PEFT's choices), got {init_type!r}")
        if self.monteclora_config is not None:
            check_positive_int(source, "monteclora_config.num_samples",
                               variant_setting(self, "monteclora_config", "num_samples"))
        tokens = self.alora_invocation_tokens
        if tokens is not None and not (isinstance(tokens, list) and tokens
                                       and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)):
            raise ConfigError(f"{source}: alora_invocation_tokens must be a non-empty list of token ids, got {tokens!r}")
        # a sub-config of PEFT's defaults ({}) switches its variant on too
        on = [n for n in ("use_dora", "use_bdlora", "velora_config", "monteclora_config", "alora_invocation_tokens",
                          "kasa_config") if getattr(self, n) not in (None, False)]
        if len(on) > 1:
            raise ConfigError(f"{source}: {' and '.join(on)} are set together; PEFT 0.21.2 runs one LoRA variant per "
                              f"layer and refuses this combination")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` for ``module_name`` after rank_pattern / alpha_pattern (PEFT's rule)."""
        r = resolve_pattern(self.rank_pattern or {}, module_name, self.r)
        alpha = resolve_pattern(self.alpha_pattern or {}, module_name, self.lora_alpha)
        return r, alpha

    def scaling_for(self, module_name: str) -> float:
        """The scaling ``s`` of ``module_name``."""
        r, alpha = self.rank_and_alpha(module_name)
        return scaling(alpha, r, use_rslora=self.use_rslora)


# --------------------------------------------------------------------------------------------------
# Shapes (specs/lora.md, "2. Parameters: names, shapes, counts")
# --------------------------------------------------------------------------------------------------
def parameter_shapes(layer: Layer, r: int) -> dict[str, tuple[int, ...]]:
    """Checkpoint suffix -> shape of LoRA's factors on ``layer``."""
    if r <= 0:
        raise ConfigError(f"LoRA rank r must be a positive integer, got {r!r}")
    if layer.kind is LayerKind.EMBEDDING:
        return {"lora_embedding_A": (r, layer.in_features), "lora_embedding_B": (layer.out_features, r)}
    if layer.kind.is_conv:
        if r % layer.groups:
            raise ConfigError(f"LoRA on a conv with groups={layer.groups} needs r divisible by groups, got r={r}")
        ones = (1,) * len(layer.kernel_size)
        return {
            "lora_A.weight": (r, layer.in_features, *layer.kernel_size),
            "lora_B.weight": (layer.out_features, r // layer.groups, *ones),
        }
    return {"lora_A.weight": (r, layer.in_features), "lora_B.weight": (layer.out_features, r)}


def resolve_layer(layer: Layer | LayerKind | str | None, A: Array, B: Array, weight: Array | None = None) -> Layer:
    """The layer for factors ``A``, ``B`` (and the base ``weight`` when given)."""
    if isinstance(layer, Layer):
        return layer
    if weight is not None:
        return Layer.of(tuple(weight.shape), layer)
    kind = LayerKind.parse(layer) if layer is not None else None
    if A.ndim > 2:  # conv: W is (out, in, *k)
        kind = kind or {3: LayerKind.CONV1D, 4: LayerKind.CONV2D, 5: LayerKind.CONV3D}[A.ndim]
        return Layer(kind, (B.shape[0], A.shape[1], *A.shape[2:]))
    kind = kind or LayerKind.LINEAR
    out, inn = B.shape[0], A.shape[1]
    return Layer(kind, (inn, out) if kind in (LayerKind.CONV1D_TRANSPOSED, LayerKind.EMBEDDING) else (out, inn))


def check_factors(layer: Layer, A: Array, B: Array, where: str) -> int:
    r = A.shape[0]
    if layer.kind.is_conv and layer.groups > 1:
        expected = parameter_shapes(layer, r)
        check_shape(where, "lora_A", A, expected["lora_A.weight"])
        check_shape(where, "lora_B", B, expected["lora_B.weight"])
        return r
    inn = layer.in_features
    if layer.kind.is_conv:
        check_shape(where, "lora_A", A, (r, inn, *layer.kernel_size))
        check_shape(where, "lora_B", B, (layer.out_features, r, *(1,) * len(layer.kernel_size)))
    else:
        check_shape(where, "lora_A", A, (r, inn))
        check_shape(where, "lora_B", B, (layer.out_features, r))
    return r


# --------------------------------------------------------------------------------------------------
# Variants that keep LoRA's inference math (specs/lora.md, "12. Variants: BD-LoRA, VeLoRA, MonteCLoRA")
# --------------------------------------------------------------------------------------------------
#: config field -> (variant, the per-module tensors PEFT saves for it). They serve training only (VeLoRA's
#: activation-compression direction, MonteCLoRA's sampler): PEFT's eval forward and its merge are plain LoRA.
TRAINING_STATE: dict[str, tuple[str, tuple[str, ...]]] = {
    "velora_config": ("VeLoRA", ("lora_velora_embed",)),
    "monteclora_config": ("MonteCLoRA", ("lora_monteclora_sampler.std_prior",
                                         "lora_monteclora_sampler.expert_weights_prior",
                                         "lora_monteclora_sampler.gaussian_var_prior",
                                         "lora_monteclora_sampler.expert_weights")),
}
#: of those, the buffers (not trainable parameters in PEFT's count)
FROZEN_STATE = ("lora_velora_embed", "lora_monteclora_sampler.gaussian_var_prior",
                "lora_monteclora_sampler.expert_weights")
#: PEFT 0.21.2's ``VeloraConfig`` / ``MontecloraConfig`` defaults of the fields that shape or fill these tensors (a
#: config written by hand may leave them out; PEFT fills them in)
VELORA_DEFAULTS = {"num_groups": 64, "scale": 1.0, "init_type": "batch_average"}
MONTECLORA_DEFAULTS = {"num_samples": 8}
VELORA_INIT_TYPES = ("batch_average", "batch_average_once", "random")


def variant_setting(config: Any, field_name: str, key: str) -> Any:
    """``config.<field_name>[key]`` (``velora_config`` / ``monteclora_config``), else PEFT's default."""
    defaults = VELORA_DEFAULTS if field_name == "velora_config" else MONTECLORA_DEFAULTS
    return (getattr(config, field_name) or {}).get(key, defaults[key])


def init_training_state(config: LoraConfig, layer: Layer, r: int, *, seed: Any, like: Array, device: Any,
                        weight: Array | None = None) -> dict[str, Array]:
    """The VeLoRA / MonteCLoRA tensors PEFT 0.21.2 creates with a new adapter (and saves: without them
    ``PeftModel.from_pretrained`` reports missing keys), drawn from a host stream of their own after the factors'
    (specs/lora.md, section 12):

    * VeLoRA ``lora_velora_embed (⌈in/num_groups⌉,)``: ``init_type="random"``: ``v/‖v‖`` with ``v ~ N(0, I)``
      (PEFT's normalised ``torch.randn``); otherwise zeros (PEFT fills it from the first training batch);
    * MonteCLoRA ``lora_monteclora_sampler.*``: the parameters ``std_prior (r,) ~ U[0, 1)`` and
      ``expert_weights_prior (num_samples,) ~ U[0, 1)`` (PEFT's ``torch.rand``), the buffers
      ``gaussian_var_prior = I_r`` and ``expert_weights = 1/num_samples``.

    Dtypes as PEFT saves them on a half-precision base (its adapter tensors cast to float32, the sampler's buffers
    left in the base's dtype): lora_A's, the sampler's buffers the base ``weight``'s (when given, of the same
    library). Empty without either field. ``like``: lora_A (namespace, dtype, device)."""
    out: dict[str, Array] = {}
    if config.peft_type != PEFT_TYPE or (config.velora_config is None and config.monteclora_config is None):
        return out
    child = np.random.default_rng(host_rng(seed).integers(2**63))  # a stream apart from LoRA's draws
    if config.velora_config is not None:
        dim = -(-layer.in_features // variant_setting(config, "velora_config", "num_groups"))
        if variant_setting(config, "velora_config", "init_type") == "random":
            v = child.standard_normal(dim)
            norm = float(np.linalg.norm(v))
            embed = (v / norm if norm else np.full(dim, dim ** -0.5)).astype(np.float32)
        else:
            embed = np.zeros(dim, np.float32)
        out["lora_velora_embed"] = xp_like(like, embed, device)
    if config.monteclora_config is not None:
        n = variant_setting(config, "monteclora_config", "num_samples")
        keys = TRAINING_STATE["monteclora_config"][1]
        host = (child.random(r), child.random(n), np.eye(r), np.full(n, 1.0 / n))
        out.update({k: xp_like(like, h.astype(np.float32), device) for k, h in zip(keys, host)})
        xp = namespace(like)
        if weight is not None and namespace(weight) is xp:  # the buffers: the base's dtype
            out.update({k: as_compute(xp, out[k], weight.dtype) for k in keys if k in FROZEN_STATE})
    return out
#: the layer kinds PEFT 0.21.2 runs these variants on (its Linear class, which also wraps transformers' Conv1D)
VARIANT_KINDS = (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED)


def check_variant_kind(name: str, config: Any, kind: LayerKind) -> None:
    """Refuse (:class:`UnsupportedError`) a VeLoRA / MonteCLoRA / aLoRA config on a layer kind other than Linear
    and transformers Conv1D, and KaSA on one other than nn.Linear (PEFT 0.21.2 runs them there only). Called at
    initialisation and when a module is bound."""
    if config.peft_type != PEFT_TYPE:  # AdaLoRA refuses these fields (its own table)
        return
    on = [f"{variant} ({f})" for f, (variant, _) in TRAINING_STATE.items() if getattr(config, f) is not None]
    on += ["aLoRA (alora_invocation_tokens)"] if config.alora_invocation_tokens is not None else []
    if on and kind not in VARIANT_KINDS:
        raise UnsupportedError(f"{name}: {on[0]} on a {kind.value} layer; PEFT 0.21.2 runs it on Linear (and "
                               f"transformers Conv1D) layers only")
    if config.kasa_config is not None and kind is not LayerKind.LINEAR:
        raise UnsupportedError(f"{name}: KaSA (kasa_config) on a {kind.value} layer; PEFT 0.21.2 runs it on "
                               f"nn.Linear only (it refuses fan_in_fan_out and other layer classes)")


def bdlora_side(config: LoraConfig, name: str) -> str | None:
    """Which factor of module ``name`` BD-LoRA makes block-diagonal: ``"A"``, ``"B"`` or None (plain LoRA).

    PEFT's rule: a pattern of ``use_bdlora.target_modules_bd_a`` (``_b``) matches when it is a substring of
    the module's name; a module matching both, or (with ``match_strict``, the default) neither, is refused.
    """
    bd = config.use_bdlora
    if not bd or config.peft_type != PEFT_TYPE:  # AdaLoRA inherits the field and refuses it (its own table)
        return None
    a = any(p in name for p in bd.get("target_modules_bd_a") or [])
    b = any(p in name for p in bd.get("target_modules_bd_b") or [])
    if a and b:
        raise ConfigError(f"{name}: matches both use_bdlora.target_modules_bd_a and target_modules_bd_b "
                          f"(PEFT refuses this too); make the patterns exclusive")
    if not (a or b) and bd.get("match_strict", True):
        raise ConfigError(f"{name}: matches neither use_bdlora.target_modules_bd_a nor target_modules_bd_b while "
                          f"use_bdlora.match_strict is true (PEFT refuses this too)")
    return "A" if a else "B" if b else None


def block_diagonal(M: Array, nblocks: int) -> Array:
    """The ``(p, nblocks·q)`` block-diagonal matrix whose diagonal blocks are the ``nblocks`` row chunks
    ``(p/nblocks, q)`` of ``M (p, q)``, zeros elsewhere (the dense form of a BD-LoRA factor, PEFT's
    ``weight_as_blockdiagonal_matrix``).

    >>> import numpy as np
    >>> block_diagonal(np.arange(4.0).reshape(2, 2), 2)
    array([[0., 1., 0., 0.],
           [0., 0., 2., 3.]])
    """
    xp = namespace(M)
    p, q = M.shape
    h = p // nblocks
    zero = xp.zeros((h, q), dtype=M.dtype, device=common_device(M))
    rows = [xp.concat([M[i * h:(i + 1) * h, :] if j == i else zero for j in range(nblocks)], axis=1)
            for i in range(nblocks)]
    return rows[0] if nblocks == 1 else xp.concat(rows, axis=0)


def bdlora_shapes(layer: Layer, r: int, side: str | None, nblocks: int, where: str) -> dict[str, tuple[int, ...]]:
    """:func:`parameter_shapes` with BD-LoRA's compact factor: ``lora_A.weight (r, in/n)`` (side A) or
    ``lora_B.weight (out, r/n)`` (side B), ``n = nblocks``, which must divide ``r`` and that dimension."""
    shapes = parameter_shapes(layer, r)
    if side is None:
        return shapes
    if layer.kind is not LayerKind.LINEAR:  # PEFT's BlockDiagonalLinear reads base_layer.out_features: nn.Linear
        raise UnsupportedError(f"{where}: BD-LoRA (use_bdlora) on a {layer.kind.value} layer; PEFT 0.21.2 runs it "
                               f"on nn.Linear layers only (it fails on others)")
    dim = layer.in_features if side == "A" else layer.out_features
    if r % nblocks or dim % nblocks:
        raise ShapeError(f"{where}: BD-LoRA with nblocks={nblocks} needs r={r} and "
                         f"{'in' if side == 'A' else 'out'}_features={dim} divisible by nblocks")
    if side == "A":
        shapes["lora_A.weight"] = (r, layer.in_features // nblocks)
    else:
        shapes["lora_B.weight"] = (layer.out_features, r // nblocks)
    return shapes


def kasa_split(weight: Array, r: int, *, where: str = "kasa") -> tuple[Array, Array, Array]:
    """KaSA's dropped part of a Linear weight ``(out, in)``: its ``r`` smallest singular triplets ``(U (out, r),
    S (r,), Vh (r, in))`` (PEFT keeps the ``min(out, in) − r`` largest as the new frozen base). ``r`` must be
    below ``min(out, in)`` (PEFT refuses otherwise)."""
    _kasa_rank(weight, r, where)
    return smallest_triplets(weight, r, method="KaSA", where=where)


def _kasa_rank(weight: Array, r: int, where: str) -> None:
    k = min(int(weight.shape[0]), int(weight.shape[1]))
    if not 0 < r < k:
        raise ConfigError(f"{where}: KaSA needs r={r} below min(out, in)={k} of the base weight "
                          f"{tuple(weight.shape)}, so that one singular component stays (PEFT refuses this too)")


def kasa_low(weight: Array, r: int, *, dtype: Any = None, where: str = "kasa") -> tuple[Array, Array]:
    """KaSA's dropped part as one matrix ``U S Vh (out, in)`` and its merge record (the packed triplets, or
    the matrix where that is smaller): :func:`peftmath.methods._svd.low_split`, the projection on the ``r``
    smallest singular directions, with :func:`kasa_split`'s check of ``r``."""
    _kasa_rank(weight, r, where)
    return low_split(weight, r, dtype=dtype, method="KaSA", where=where)


def alora_offsets(input_ids: Array, invocation_tokens: list[int]) -> list[int | None]:
    """aLoRA's activation point per row of ``input_ids (batch, T)``: ``T − start`` of the *last* occurrence of
    ``invocation_tokens`` in the row (the invocation sequence and every token after it), None where it does
    not occur (the row is the base model's). PEFT's ``calculate_alora_offsets`` for one adapter.

    >>> alora_offsets([[5, 1, 2, 9, 1, 2, 7], [1, 1, 1, 1, 1, 1, 1]], [1, 2])
    [3, None]
    """
    ids = np.asarray(input_ids if isinstance(input_ids, (list, tuple, np.ndarray))
                     else backend_for(namespace(input_ids)).to_host(input_ids))
    if ids.ndim != 2:
        raise ShapeError(f"aLoRA offsets: input_ids must be (batch, tokens), got shape {ids.shape}")
    n = len(invocation_tokens)
    inv = np.asarray(invocation_tokens)
    out: list[int | None] = []
    for row in ids:
        T = row.shape[0]
        starts = [i for i in range(T - n + 1) if np.array_equal(row[i:i + n], inv)]
        out.append(T - starts[-1] if starts else None)
    return out


def alora_mask(offsets: list[int | None], batch: int, tokens: int) -> np.ndarray:
    """``(batch, tokens)`` booleans: True on the last ``offsets[i]`` positions of row ``i`` (clipped to ``tokens``;
    None and 0 activate nothing), PEFT's aLoRA mask."""
    if len(offsets) != batch:
        raise ShapeError(f"aLoRA: {len(offsets)} alora_offsets for a batch of {batch} rows; give one per row "
                         f"(lora.alora_offsets(input_ids, config.alora_invocation_tokens))")
    k = np.array([0 if o is None else min(int(o), tokens) for o in offsets])
    return np.arange(tokens)[None, :] >= (tokens - k)[:, None]


# --------------------------------------------------------------------------------------------------
# Scaling (specs/lora.md, "3. Scaling")
# --------------------------------------------------------------------------------------------------
def scaling(lora_alpha: float, r: int, *, use_rslora: bool = False) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA.

    >>> scaling(16, 8), scaling(16, 4, use_rslora=True)
    (2.0, 8.0)
    """
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"LoRA rank r must be a positive integer, got {r!r}")
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/lora.md, "4. Initialisation (`init_lora_weights`)")
# --------------------------------------------------------------------------------------------------
class LoraInit(NamedTuple):
    """LoRA factors from an initialisation, and the new base weight where the init changes it."""

    A: Array
    B: Array
    weight: Array | None = None
    lora_bias: Array | None = None


def init_weights(
    layer: Layer,
    r: int,
    *,
    init_lora_weights: bool | str = True,
    scaling: float = 1.0,
    weight: Array | None = None,
    seed: int | np.random.Generator | None = 0,
    xp: Any = None,
    device: Any = None,
    dtype: Any = None,
    lora_bias: bool = False,
    loftq_config: dict | None = None,
) -> LoraInit:
    """PEFT's initialisations of ``lora_A`` / ``lora_B`` (``init_lora_weights``).

    Random draws are made on the host with ``numpy.random.default_rng(seed)`` and moved to ``xp`` /
    ``device``, so one seed gives the same numbers on every backend (PEFT's torch RNG streams cannot
    be reproduced; the distributions and the exact zeros are).

    =====================  ===========================================================================
    ``True``               A ~ U(±1/sqrt(fan_in)) (kaiming-uniform a=√5), B = 0.  Embedding: A = 0, B ~ N(0, 1)
    ``"gaussian"``         A ~ N(0, (1/r)²), B = 0.  Embedding: as True
    ``False``              both as PyTorch's default layer init (the adapter is not a no-op)
    ``"pissa"``            top-r SVD of W: A = √(S/s) Uh, B = V √(S/s); W ← W − s·BA  (Linear, Conv1D)
    ``"pissa_niter_K"``    the same with a randomized SVD (K subspace iterations)
    ``"olora"``            QR of W: A = R[:r], B = Q[:, :r]; W ← W − s·BA  (Linear)
    ``"orthogonal"``       A, B from the even/odd rows of a random orthogonal matrix, so B A = 0 exactly (r even)
    =====================  ===========================================================================

    Returns :class:`LoraInit` with ``weight`` set when the base weight changes (pissa, olora). The
    factors have ``dtype`` (default float32; the base weight's dtype for "orthogonal", as PEFT).
    """
    if xp is None:
        xp = namespace(weight) if weight is not None else _default_xp()
    rng = host_rng(seed)
    backend = backend_for(xp)
    shapes = parameter_shapes(layer, r)
    (a_key, a_shape), (b_key, b_shape) = shapes.items()
    fan_in_a = math.prod(a_shape[1:])

    def put(arr: np.ndarray, dt: Any = None) -> Array:
        out = backend.from_host(np.ascontiguousarray(arr, dtype=np.float32), xp, device)
        target = dt if dt is not None else (dtype if dtype is not None else xp.float32)
        return out if out.dtype == target else xp.astype(out, target)

    bias0 = put(np.zeros(layer.out_features)) if lora_bias else None
    init = init_lora_weights
    if init == "loftq":
        return _loftq(weight, layer, r, loftq_config or {}, xp)
    if isinstance(init, str) and init.lower() in ("eva", "corda", "lora_ga", "mica"):
        raise UnsupportedError(
            f"init_lora_weights={init!r} needs data or a quantizer that this function does not take; "
            f"peftmath implements True, False, 'gaussian', 'pissa', 'pissa_niter_K', 'olora', 'orthogonal' and 'loftq' here"
        )
    if layer.kind is LayerKind.EMBEDDING:
        if init is False:
            return LoraInit(put(rng.standard_normal(a_shape)), put(rng.standard_normal(b_shape)))
        # PEFT: any truthy value resets an embedding to A = 0, B ~ N(0, 1)
        return LoraInit(put(np.zeros(a_shape)), put(rng.standard_normal(b_shape)))
    if init is True:
        bound = kaiming_uniform_bound(fan_in_a)
        return LoraInit(put(rng.uniform(-bound, bound, a_shape)), put(np.zeros(b_shape)), None, bias0)
    if init is False:
        bound_a = kaiming_uniform_bound(fan_in_a)
        bound_b = kaiming_uniform_bound(math.prod(b_shape[1:]))
        bias = put(rng.uniform(-bound_b, bound_b, layer.out_features)) if lora_bias else None
        return LoraInit(put(rng.uniform(-bound_a, bound_a, a_shape)), put(rng.uniform(-bound_b, bound_b, b_shape)),
                        None, bias)
    if not isinstance(init, str):
        raise ConfigError(f"unknown init_lora_weights {init!r}")
    if init.lower() == "gaussian":
        return LoraInit(put(rng.normal(0.0, 1.0 / r, a_shape)), put(np.zeros(b_shape)))
    if layer.kind.is_conv:
        raise ConfigError(f"init_lora_weights={init!r} is not defined for {layer.kind.value} (PEFT: 'Unknown initialization')")
    if init == "orthogonal":
        if r % 2:
            raise ConfigError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}")
        q, _ = np.linalg.qr(rng.standard_normal((r, r)))
        A = (rng.standard_normal((layer.in_features, r // 2)) @ q[0::2]).T / 10.0
        B = rng.standard_normal((r // 2, layer.out_features)).T @ q[1::2] / 10.0
        wdt = weight.dtype if weight is not None else None
        return LoraInit(put(A, wdt), put(B, wdt))
    if weight is None:
        raise ConfigError(f"init_lora_weights={init!r} needs the base weight")
    layer.check_weight(weight)
    if init == "olora":
        return _olora(weight, layer, r, scaling, xp)
    if init == "pissa" or re.fullmatch(r"pissa_niter_\d+", init):
        niter = None if init == "pissa" else int(init.split("_niter_")[-1])
        return _pissa(weight, layer, r, scaling, xp, niter, rng, backend, device)
    raise ConfigError(f"unknown init_lora_weights {init!r}")


def _default_xp() -> Any:
    import array_api_compat.numpy as xp_np

    return xp_np


def _check_svd_rank(layer: Layer, r: int, init: str) -> None:
    if r > min(layer.matrix_shape):
        raise ConfigError(
            f"init_lora_weights={init!r}: rank r={r} exceeds min(out, in) = {min(layer.matrix_shape)} "
            f"of a {layer.kind.value} {layer.weight_shape}; use a smaller r"
        )


def _pissa(weight, layer, r, s, xp, niter, rng, backend, device) -> LoraInit:
    _check_svd_rank(layer, r, "pissa")
    Wm = as_compute(xp, layer.as_matrix(weight, xp), xp.float32)
    if niter is None:
        V, S, Uh = xp.linalg.svd(Wm, full_matrices=False)
        Vr, Sr, Uhr = V[:, :r], S[:r], Uh[:r, :]
    else:
        Vr, Sr, Uhr = randomized_svd(Wm, r, niter=niter, rng=rng, backend=backend, device=device)
    Sr = Sr / s
    root = xp.sqrt(Sr)
    A = root[:, None] * Uhr
    B = Vr * root[None, :]
    new = Wm - s * xp.matmul(B, A)
    return LoraInit(A, B, layer.from_matrix(xp.astype(new, weight.dtype), xp))


def _loftq(weight, layer, r, loftq_config, xp) -> LoraInit:
    """PEFT's LoftQ init (Linear only): ``W ← deq(quant(·))`` and the factors of the residual's SVD."""
    from ..quant import loftq_init

    if weight is None:
        raise ConfigError("init_lora_weights='loftq' needs the base weight")
    if layer.kind is not LayerKind.LINEAR:
        raise ConfigError(f"init_lora_weights='loftq' is defined for Linear layers, not {layer.kind.value} "
                          f"(PEFT raises TypeError there)")
    res = loftq_init(weight, num_bits=int(loftq_config.get("loftq_bits", 4)), reduced_rank=r,
                     num_iter=int(loftq_config.get("loftq_iter", 1)))
    return LoraInit(res.lora_A, res.lora_B, xp.astype(res.dequantized, weight.dtype))


def _olora(weight, layer, r, s, xp) -> LoraInit:
    if layer.kind is not LayerKind.LINEAR:
        raise ConfigError(f"init_lora_weights='olora' is defined for Linear layers, not {layer.kind.value}")
    _check_svd_rank(layer, r, "olora")
    W32 = as_compute(xp, weight, xp.float32)
    Q, R = xp.linalg.qr(W32)
    A, B = R[:r, :], Q[:, :r]
    new = W32 - s * xp.matmul(B, A)
    return LoraInit(A, B, xp.astype(new, weight.dtype))


# --------------------------------------------------------------------------------------------------
# Forward (specs/lora.md, "5. Forward, per layer kind")
# --------------------------------------------------------------------------------------------------
def forward(
    x: Array,
    W: Array,
    A: Array,
    B: Array,
    *,
    scaling: float,
    bias: Array | None = None,
    layer: Layer | LayerKind | str | None = None,
    lora_bias: Array | None = None,
    dropout: Callable[[Array], Array] | None = None,
    embed_scale: float | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int | None = None,
    peft_compat: bool = False,
) -> Array:
    """The unmerged adapted layer: ``base(x) + s · lora_B(lora_A(dropout(x)))``.

    ========== ===========================================================================
    Linear     ``x Wᵀ + b + s (d(x) Aᵀ Bᵀ + b_B)``, x ``(..., in)``
    Conv1D     ``x W + b + s (d(x) Aᵀ Bᵀ + b_B)``
    Embedding  ``embed_scale · (W[ids] + s · Aᵀ[ids] Bᵀ)`` (no dropout, as in PEFT)
    ConvNd     ``conv(x, W, b) + s · conv(conv(d(x), A; stride, padding, dilation), B; groups)``
    ========== ===========================================================================

    ``dropout`` is any callable applied to the adapter's input (identity by default; PEFT's
    ``lora_dropout`` is inverted dropout in training). The LoRA branch is computed in float32 (or
    wider) and the result has the base output's dtype.

    PEFT's conv ``lora_A`` does not copy the base layer's dilation (PEFT issue #3697), so its forward
    fails on dilated convs; peftmath's default uses the base dilation (then the unmerged forward
    equals the merged layer); ``peft_compat=True`` uses dilation 1 like PEFT.

    ``stride``, ``padding``, ``dilation``, ``groups``: the base conv's, described once in
    :mod:`peftmath.layers` ("Conv keywords"); ``groups`` follows from ``x`` and ``lora_A`` (which spans
    all input channels). An input of the wrong width is a :class:`~peftmath.errors.ShapeError`.
    """
    xp = namespace(x, W, A, B, bias, lora_bias, where="lora.forward")
    lay, conv_kwargs = resolve_layer(layer, A, B, W).for_input(
        x, "lora.forward", groups=groups, channels=A.shape[1] if A.ndim > 2 else None, stride=stride,
        padding=padding, dilation=dilation)
    check_factors(lay, A, B, "lora.forward")
    base = lay.base_forward(x, W, bias, xp, **conv_kwargs)
    if embed_scale is not None and lay.kind is LayerKind.EMBEDDING:
        base = base * embed_scale  # a scaled embedding (Gemma) scales its own lookup too, as in PEFT
    lo = adapter_output(x, A, B, scaling=scaling, layer=lay, lora_bias=lora_bias, dropout=dropout,
                        embed_scale=embed_scale, peft_compat=peft_compat, **conv_kwargs)
    if tuple(lo.shape) != tuple(base.shape):
        raise ShapeError(f"lora.forward: adapter output {tuple(lo.shape)} does not match base output {tuple(base.shape)}")
    return as_compute(xp, as_compute(xp, base, lo.dtype) + lo, base.dtype)


def adapter_output(
    x: Array,
    A: Array,
    B: Array,
    *,
    scaling: float,
    layer: Layer,
    lora_bias: Array | None = None,
    dropout: Callable[[Array], Array] | None = None,
    embed_scale: float | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    peft_compat: bool = False,
) -> Array:
    """The adapter's term alone, ``s · lora_B(lora_A(dropout(x)))``, in float32 or wider."""
    xp = namespace(x, A, B, lora_bias, where="lora.adapter_output")
    emb = layer.kind is LayerKind.EMBEDDING
    cd = compute_dtype(xp, A.dtype, B.dtype, *(() if emb else (x.dtype,)))
    Ac, Bc = as_compute(xp, A, cd), as_compute(xp, B, cd)
    if emb:
        h = embedding_lookup(x, xp.matrix_transpose(Ac), xp=xp)
        lo = xp.matmul(h, xp.matrix_transpose(Bc)) * scaling
        return lo * embed_scale if embed_scale is not None else lo
    xin = as_compute(xp, x, cd)
    if dropout is not None:
        xin = dropout(xin)
    if layer.kind.is_conv:
        h = conv(xin, Ac, stride=stride, padding=padding, dilation=1 if peft_compat else dilation, xp=xp)
        lo = conv(h, Bc, groups=layer.groups, xp=xp)
        if lora_bias is not None:
            lo = lo + xp.reshape(as_compute(xp, lora_bias, cd), (1, -1) + (1,) * len(layer.kernel_size))
    else:
        lo = xp.matmul(xp.matmul(xin, xp.matrix_transpose(Ac)), xp.matrix_transpose(Bc))
        if lora_bias is not None:
            lo = lo + as_compute(xp, lora_bias, cd)
    return lo * scaling


# --------------------------------------------------------------------------------------------------
# Delta weight (specs/lora.md, "6. The delta weight")
# --------------------------------------------------------------------------------------------------
def delta_matrix(A: Array, B: Array, *, scaling: float, xp: Any = None, dtype: Any = None) -> Array:
    """``s · B₂ A₂`` as the ``(out, in_flat)`` matrix, computed in ``dtype`` (default: float32/64)."""
    xp = xp or namespace(A, B, where="lora")
    cd = dtype or compute_dtype(xp, A.dtype, B.dtype)
    r = A.shape[0]
    A2 = as_compute(xp, xp.reshape(A, (r, -1)), cd)
    B2 = as_compute(xp, xp.reshape(B, (B.shape[0], -1)), cd)
    return xp.matmul(B2, A2) * scaling


def delta_weight(
    A: Array,
    B: Array,
    *,
    scaling: float,
    layer: Layer | LayerKind | str | None = None,
    peft_compat: bool = False,
) -> Array:
    """``ΔW`` in the base weight's stored layout.

    The product is computed in float32 (float64 for float64 factors); the result has the factors'
    dtype, so half-precision factors give a half-precision ΔW rounded once, as in PEFT on CPU.

    >>> import numpy as np
    >>> A = np.array([[1.0, 2.0, 3.0]])            # (r=1, in=3)
    >>> B = np.array([[1.0], [-1.0]])              # (out=2, r=1)
    >>> delta_weight(A, B, scaling=0.5)
    array([[ 0.5,  1. ,  1.5],
           [-0.5, -1. , -1.5]])
    >>> delta_weight(A, B, scaling=0.5, layer="Conv1D").shape   # stored (in, out)
    (3, 2)
    """
    xp = namespace(A, B, where="lora.delta_weight")
    lay = resolve_layer(layer, A, B)
    check_factors(lay, A, B, "lora.delta_weight")
    if lay.kind.is_conv and lay.groups > 1:
        raise UnsupportedError("lora.delta_weight: a conv with groups > 1 has no dense delta in PEFT's layout")
    d = lay.from_matrix(delta_matrix(A, B, scaling=scaling, xp=xp), xp)
    out_dtype = xp.result_type(A.dtype, B.dtype)
    return as_compute(xp, d, out_dtype)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge (specs/lora.md, "7. Merge and unmerge, and when they are exact")
# --------------------------------------------------------------------------------------------------
def _apply(
    W: Array,
    A: Array,
    B: Array,
    *,
    scaling: float,
    sign: int,
    layer: Layer | LayerKind | str | None,
    copy: bool,
    safe: bool,
    peft_compat: bool,
    where: str,
) -> Array:
    xp = namespace(W, A, B, where=where)
    lay = resolve_layer(layer, A, B, W)
    lay.check_weight(W)
    check_factors(lay, A, B, where)
    if lay.kind.is_conv and lay.groups > 1:
        raise UnsupportedError(
            f"{where}: merging LoRA into a conv with groups={lay.groups} is not defined "
            f"(PEFT raises NotImplementedError too); use the unmerged forward"
        )
    round_to = None
    if peft_compat:
        # PEFT: unsafe Linear/Conv merge adds the delta as computed; every other path
        # (safe merge, Embedding, all unmerges) rounds the delta to W's dtype first.
        if sign < 0 or safe or lay.kind is LayerKind.EMBEDDING:
            round_to = W.dtype

    def build() -> Array:
        d = delta_matrix(A, B, scaling=scaling, xp=xp, dtype=compute_dtype(xp, A.dtype, B.dtype, W.dtype))
        if peft_compat:
            d = compat_delta(xp, A, B, d)
        return lay.from_matrix(d, xp)

    def kernel(M: Array) -> bool:
        r = A.shape[0]
        return backend_for(xp).addmm_(M, xp.reshape(B, (B.shape[0], r)), xp.reshape(A, (r, -1)), sign * scaling)

    return apply_delta(where, W, build, sign=sign, copy=copy, safe=safe, round_delta_to=round_to, layer=lay,
                       inplace_kernel=None if peft_compat else kernel, xp=xp)


def merge(
    W: Array,
    A: Array,
    B: Array,
    *,
    scaling: float,
    layer: Layer | LayerKind | str | None = None,
    copy: bool = True,
    safe: bool = False,
    peft_compat: bool = False,
) -> Array:
    """``W + ΔW``.

    ``copy=True`` (default) returns a new array. ``copy=False`` updates ``W`` in place and returns it:
    on NumPy float32/float64 through BLAS gemm with ``beta=1`` (no temporary of W's size), on
    NumPy float16/bfloat16 through float32 row tiles, elsewhere (and for any layout whose matrix view
    would be a copy: a permuted or Fortran-ordered conv weight, torch ``channels_last``) by computing
    ``W + ΔW`` and storing it into W; it raises :class:`~peftmath.errors.UnsupportedError` for arrays
    it cannot write (JAX, read-only NumPy), writing nothing (the contract of
    :mod:`peftmath.methods._base`). ``safe=True`` refuses a non-finite result
    (:class:`~peftmath.errors.NonFiniteError`) and leaves ``W`` untouched.

    Rounding: ``W + ΔW`` is formed in float32 (float64 for float64) and rounded once to W's dtype.
    ``peft_compat=True`` follows PEFT's order instead: half-precision factors round ΔW to their dtype,
    and a safe merge or an Embedding rounds ΔW to W's dtype before the add.

    >>> import numpy as np
    >>> W = np.zeros((2, 3), dtype=np.float32)
    >>> A = np.ones((1, 3), dtype=np.float32); B = np.full((2, 1), 2.0, dtype=np.float32)
    >>> merge(W, A, B, scaling=0.25, copy=False) is W, W[0]
    (True, array([0.5, 0.5, 0.5], dtype=float32))
    """
    return _apply(W, A, B, scaling=scaling, sign=1, layer=layer, copy=copy, safe=safe, peft_compat=peft_compat,
                  where="lora.merge")


def unmerge(
    W: Array,
    A: Array,
    B: Array,
    *,
    scaling: float,
    layer: Layer | LayerKind | str | None = None,
    copy: bool = True,
    peft_compat: bool = False,
) -> Array:
    """``W − ΔW``, the inverse of :func:`merge` (same keywords). ``peft_compat=True`` rounds ΔW to
    W's dtype before the subtraction, as PEFT's unmerge does."""
    return _apply(W, A, B, scaling=scaling, sign=-1, layer=layer, copy=copy, safe=False, peft_compat=peft_compat,
                  where="lora.unmerge")


def merge_bias(bias: Array | None, lora_bias: Array, *, scaling: float, peft_compat: bool = False) -> Array:
    """``b + s · b_B`` for ``lora_bias=True`` (always a new array)."""
    xp = namespace(lora_bias)
    d = as_compute(xp, lora_bias, compute_dtype(xp, lora_bias.dtype)) * scaling
    # PEFT adds ``b_B * s`` as computed: in the adapter's dtype (rounded there when half) and never
    # rounded to the bias dtype first, on every path (safe, unsafe, unmerge)
    rd = lora_bias.dtype if (peft_compat and is_low_precision(lora_bias.dtype)) else None
    return bias_update("lora.merge_bias", bias, d, round_delta_to=rd)


def unmerge_bias(bias: Array, lora_bias: Array, *, scaling: float, peft_compat: bool = False) -> Array:
    """``b − s · b_B``."""
    xp = namespace(lora_bias)
    d = as_compute(xp, lora_bias, compute_dtype(xp, lora_bias.dtype)) * scaling
    rd = lora_bias.dtype if (peft_compat and is_low_precision(lora_bias.dtype)) else None
    return bias_update("lora.unmerge_bias", bias, d, sign=-1, round_delta_to=rd)


# --------------------------------------------------------------------------------------------------
# PEFT compatibility (specs/lora.md, "10. Dtypes: compute in float32, round once — and PEFT's rounding order")
# --------------------------------------------------------------------------------------------------
def compat_delta(xp: Any, A: Array, B: Array, delta: Array) -> Array:
    """PEFT's CPU rule: half-precision factors give a delta rounded to their dtype."""
    adapter_dtype = xp.result_type(A.dtype, B.dtype)
    if is_low_precision(adapter_dtype):
        return as_compute(xp, xp.astype(delta, adapter_dtype), delta.dtype)
    return delta


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint: the functions above bound to a ModuleAdapter
# --------------------------------------------------------------------------------------------------
def xp_like(like: Array, host: np.ndarray, device: Any) -> Array:
    """Host array ``host`` in ``like``'s namespace and dtype, on ``device``."""
    xp = namespace(like)
    out = backend_for(xp).from_host(host, xp, device)
    return out if out.dtype == like.dtype else xp.astype(out, like.dtype)


class LoraModule(ModuleAdapter):
    """LoRA on one base module.

    A module whose parameters hold ``lora_magnitude_vector`` is DoRA: constructing a ``LoraModule``
    then gives a :class:`peftmath.methods.dora.DoraModule` (a subclass; dora.py imports this module,
    never the other way round at import time).
    """

    peft_type = "LORA"
    supported_kinds = (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED, LayerKind.EMBEDDING,
                       LayerKind.CONV1D, LayerKind.CONV2D, LayerKind.CONV3D)
    #: the magnitude of DoRA (None for plain LoRA; set by DoraModule.validate)
    magnitude: Array | None = None

    def __new__(cls, name: str, config: Any, params: dict[str, Array], *args: Any, **kwargs: Any) -> "LoraModule":
        if cls is LoraModule and config.peft_type == PEFT_TYPE and out_proj_owner(name) is not None:
            from ._lora_mha import AttentionOutModule  # an nn.MultiheadAttention's out-projection (peftmath._mha):

            cls = AttentionOutModule  # first, so that it refuses DoRA tensors there (PEFT refuses DoRA on an attention)
        if cls is LoraModule and "lora_magnitude_vector" in params:
            from .dora import DoraModule  # lazy: dora.py imports lora.py

            cls = DoraModule
        elif cls is LoraModule and TOKENS_KEY in params:  # trainable_token_indices: a table's trained rows
            from ._lora_tokens import LoraTokensModule

            cls = LoraTokensModule
        if cls is LoraModule and is_parameter_wrapper(config, name):  # target_parameters (methods/lora_params.py)
            from .lora_params import ParamLoraModule

            cls = ParamLoraModule
        return super().__new__(cls)

    def __getnewargs_ex__(self) -> tuple[tuple, dict]:
        """Pickling (tasks on dask.distributed workers): ``__new__`` reads the parameters to pick DoRA's class."""
        return (self.name, self.config, self.params), {}

    @classmethod
    def initialize(cls, name: str, config: LoraConfig, layer: Layer, *, weight: Array | None = None,
                   seed: int | np.random.Generator | None = 0, xp: Any = None, device: Any = None,
                   dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """Fresh parameters for module ``name`` (``init`` overrides ``config.init_lora_weights``).

        Returns ``(params by checkpoint suffix, new base weight or None)``. With ``use_dora`` this is
        :meth:`peftmath.methods.dora.DoraModule.initialize` (the magnitude too).
        """
        if config.use_dora and cls is LoraModule:
            from .dora import DoraModule

            return DoraModule.initialize(name, config, layer, weight=weight, seed=seed, xp=xp, device=device,
                                         dtype=dtype, init=init)
        params, res = cls._init_factors(name, config, layer, weight=weight, seed=seed, xp=xp, device=device,
                                        dtype=dtype, init=init)
        return params, res.weight

    @classmethod
    def _init_factors(cls, name: str, config: LoraConfig, layer: Layer, *, weight: Array | None, seed: Any,
                      xp: Any, device: Any, dtype: Any, init: Any) -> tuple[dict[str, Array], LoraInit]:
        """LoRA's factors (and ``lora_B.bias``) by checkpoint suffix, and the :class:`LoraInit` they came from."""
        r, _ = config.rank_and_alpha(name)
        s = config.scaling_for(name)
        res = init_weights(layer, r, init_lora_weights=config.init_lora_weights if init is None else init,
                           scaling=s, weight=weight, seed=seed, xp=xp, device=device, dtype=dtype,
                           lora_bias=config.lora_bias, loftq_config=config.loftq_config)
        keys = list(parameter_shapes(layer, r))
        params = {keys[0]: res.A, keys[1]: res.B}
        if res.lora_bias is not None:
            params["lora_B.bias"] = res.lora_bias
        side = bdlora_side(config, name) if layer.kind is not LayerKind.EMBEDDING else None
        if side is not None:
            params[f"lora_{side}.weight"] = cls._init_bdlora(name, config, layer, r, side, res.A, seed, device,
                                                             init=config.init_lora_weights if init is None else init)
        check_variant_kind(name, config, layer.kind)
        params.update(init_training_state(config, layer, r, seed=seed, like=res.A, device=device, weight=weight))
        if config.peft_type == PEFT_TYPE and config.kasa_config is not None:  # PEFT: lora_diag = torch.randn(r)
            diag = np.random.default_rng(host_rng(seed).integers(2**63)).standard_normal(r).astype(np.float32)
            params["lora_diag"] = xp_like(res.A, diag, device)
        return params, res

    @staticmethod
    def _init_bdlora(name: str, config: LoraConfig, layer: Layer, r: int, side: str, like: Array, seed: Any,
                     device: Any, *, init: Any) -> Array:
        """BD-LoRA's compact factor as PEFT draws it after LoRA's init: side A ``U(±√(6/(in/n)))`` (torch's
        ``kaiming_uniform_`` with a = 0 over the block's fan-in), side B zeros (whatever ``init_lora_weights``)."""
        if init not in (True, False, "gaussian"):
            raise UnsupportedError(f"{name}: BD-LoRA with init_lora_weights={init!r}; peftmath initialises BD-LoRA "
                                   f"with true, false or 'gaussian' (PEFT replaces the factor after that init)")
        nb = config.use_bdlora.get("nblocks", 1)
        shape = bdlora_shapes(layer, r, side, nb, name)[f"lora_{side}.weight"]
        if side == "B":
            arr = np.zeros(shape, np.float32)
        else:
            bound = math.sqrt(6.0 / shape[1])
            child = np.random.default_rng(host_rng(seed).integers(2**63))  # a stream apart from LoRA's draws
            arr = child.uniform(-bound, bound, shape).astype(np.float32)
        return xp_like(like, arr, device)

    @classmethod
    def infer_layer(cls, name: str, config: LoraConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """The layer of ``name`` from its factors, the base weight shape and an optional kind hint.

        A 2-D base weight is a Linear when its shape is ``(out, in)`` and a transformers Conv1D when
        it is ``(in, out)``; a square weight follows ``kind``, else the config's ``fan_in_fan_out``.
        """
        if TOKENS_KEY in params and cls is LoraModule:  # a table's trained rows (trainable_token_indices)
            from ._lora_tokens import LoraTokensModule

            return LoraTokensModule.infer_layer(name, config, params, weight_shape, kind)
        emb = "lora_embedding_A" in params or "lora_embedding_B" in params
        pair = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        missing = [k for k in pair if k not in params]
        if missing:
            raise ShapeError(f"{name}: the adapter has no {' / '.join(missing)} for this module (found: {sorted(params)})")
        if emb:
            A, B = params["lora_embedding_A"], params["lora_embedding_B"]
            return Layer(LayerKind.EMBEDDING, tuple(weight_shape) if weight_shape else (A.shape[1], B.shape[0]))
        A, B = params["lora_A.weight"], params["lora_B.weight"]
        if is_parameter_wrapper(config, name):  # target_parameters: a raw nn.Parameter (methods/lora_params.py)
            from .lora_params import infer_layer

            return infer_layer(name, config, params, weight_shape, kind)
        if A.ndim > 2:
            if weight_shape is None:
                return resolve_layer(kind, A, B)
            groups = (A.shape[1] // weight_shape[1]) if weight_shape[1] else 1
            return Layer.of(tuple(weight_shape), kind, groups=max(groups, 1))
        out, inn = B.shape[0], A.shape[1]
        side = bdlora_side(config, name)
        if side == "A":  # the compact lora_A is (r, in/nblocks)
            inn *= config.use_bdlora.get("nblocks", 1)
        if kind is not None:
            return Layer.of(tuple(weight_shape) if weight_shape else _guess_shape(kind, out, inn), kind)
        if weight_shape is None:
            k = LayerKind.CONV1D_TRANSPOSED if config.fan_in_fan_out else LayerKind.LINEAR
            return Layer(k, _guess_shape(k, out, inn))
        return orient_2d(name, tuple(weight_shape), out, inn, config.fan_in_fan_out,
                         f"lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)}"
                         + (f" (use_bdlora: lora_{side} holds the compact blocks, in/nblocks or r/nblocks wide)"
                            if side else ""))

    def scaled(self, c: float) -> "ModuleAdapter":
        """Scale ``c``: ``s → c·s`` (PEFT's ``scale_layer``), so ``ΔW → c·ΔW`` and the ``lora_bias`` term
        ``s·b_B`` too; for DoRA the direction ``V = W + c·s·BA`` with the magnitude unchanged."""
        return self.scale_scaling(c)

    def validate(self) -> None:
        p = self.params
        emb = self.layer.kind is LayerKind.EMBEDDING
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        for key in (a_key, b_key):
            if key not in p:
                raise ShapeError(f"{self.name}: missing {key} for a {self.layer.kind.value} layer")
        self.A, self.B = p[a_key], p[b_key]
        self.r = int(self.A.shape[0])
        side = None if emb else bdlora_side(self.config, self.name)
        nb = (self.config.use_bdlora or {}).get("nblocks", 1)
        expected = bdlora_shapes(self.layer, self.r, side, nb, self.name)
        check_shape(self.name, a_key, self.A, expected[a_key])
        check_shape(self.name, b_key, self.B, expected[b_key])
        if side == "A":  # the math runs on the dense factor (r x in: the size of a plain lora_A)
            self.A = block_diagonal(self.A, nb)
        elif side == "B":
            self.B = block_diagonal(self.B, nb)
        self._check_training_state()
        self._check_kasa()
        self.alora = self.config.peft_type == PEFT_TYPE and self.config.alora_invocation_tokens is not None
        if self.alora:
            check_variant_kind(self.name, self.config, self.layer.kind)
            self.additive = False  # it cannot be merged
        r_cfg, _ = self.config.rank_and_alpha(self.pattern_name)
        if r_cfg != self.r:
            raise ShapeError(
                f"{self.name}: lora_A has rank {self.r} but the config gives r={r_cfg} for this module "
                f"(check r / rank_pattern in adapter_config.json)"
            )
        self.scaling = self.config.scaling_for(self.pattern_name)
        self.input_channels = int(self.A.shape[1]) if self.layer.kind.is_conv else None
        self.lora_bias = p.get("lora_B.bias")
        if self.lora_bias is not None:
            check_shape(self.name, "lora_B.bias", self.lora_bias, (self.layer.out_features,))

    def _check_training_state(self) -> None:
        """VeLoRA / MonteCLoRA tensors: only with their config field, on the layer kinds PEFT runs them on, of
        the shapes PEFT saves. They take no part in the forward or the merge (PEFT's eval forward and its merge
        are plain LoRA's); they are kept so that the adapter saves back as read."""
        p, cfg = self.params, self.config
        if cfg.peft_type != PEFT_TYPE:  # AdaLoRA refuses these fields (its own table)
            return
        for field_name, (variant, keys) in TRAINING_STATE.items():
            present = [k for k in keys if k in p]
            settings = getattr(cfg, field_name)
            if present and settings is None:
                raise CheckpointError(
                    f"{self.name}: the checkpoint holds {', '.join(present)} ({variant}'s training state) but "
                    f"adapter_config.json has no {field_name}; the config does not belong to these tensors "
                    f"(restore {field_name}, or remove the tensors for a plain LoRA)")
            if settings is not None:
                check_variant_kind(self.name, cfg, self.layer.kind)
        if "lora_velora_embed" in p:
            groups = variant_setting(cfg, "velora_config", "num_groups")
            check_shape(self.name, "lora_velora_embed", p["lora_velora_embed"], (-(-self.layer.in_features // groups),))
        if cfg.monteclora_config is not None:
            n = variant_setting(cfg, "monteclora_config", "num_samples")
            shapes = dict(zip(TRAINING_STATE["monteclora_config"][1], ((self.r,), (n,), (self.r, self.r), (n,))))
            for key, shape in shapes.items():
                if key in p:
                    check_shape(self.name, key, p[key], shape)

    #: KaSA's learned diagonal ``lora_diag (r,)`` (None for other LoRA modules)
    kasa_diag: Array | None = None

    def _check_kasa(self) -> None:
        """KaSA: ``lora_diag (r,)`` with ``kasa_config``, nn.Linear only (PEFT refuses other layers and
        ``fan_in_fan_out``). Its merge returns the dropped singular triplets as the record."""
        p, cfg = self.params, self.config
        if cfg.peft_type != PEFT_TYPE or ("lora_diag" not in p and cfg.kasa_config is None):
            return
        if cfg.kasa_config is None:
            raise CheckpointError(f"{self.name}: the checkpoint holds lora_diag (KaSA's learned singular values) but "
                                  f"adapter_config.json has no kasa_config; the config does not belong to these "
                                  f"tensors (restore kasa_config)")
        if "lora_diag" not in p:
            raise CheckpointError(f"{self.name}: kasa_config is set but the checkpoint has no lora_diag for this module")
        check_variant_kind(self.name, cfg, self.layer.kind)
        check_shape(self.name, "lora_diag", p["lora_diag"], (self.r,))
        kasa_split_rank_check = min(self.layer.out_features, self.layer.in_features)
        if self.r >= kasa_split_rank_check:
            raise ConfigError(f"{self.name}: KaSA needs r={self.r} below min(out, in)={kasa_split_rank_check} "
                              f"(PEFT refuses this too)")
        self.kasa_diag = p["lora_diag"]
        self.merge_record = True   # the dropped singular part, for an exact unmerge
        self.additive = False      # W' = W − (dropped part) + ΔW: not W + ΔW

    def _kasa_B(self) -> Array:
        """``B diag(lora_diag)`` (out, r): KaSA's ``ΔW = s·B diag(d) A`` as a LoRA product."""
        xp = self.xp
        cd = compute_dtype(xp, self.B.dtype, self.kasa_diag.dtype)
        return as_compute(xp, self.B, cd) * as_compute(xp, self.kasa_diag, cd)[None, :]

    def _kasa_merge(self, weight: Array, *, copy: bool, safe: bool, unmerge: bool, record: Any,
                    peft_compat: bool) -> tuple[Array, Array | None]:
        """KaSA's merge ``W' = W − U_d S_d V_d + ΔW`` (the r smallest singular triplets of W dropped, as PEFT's
        load does) returning ``pack(U_d, S_d, V_d)``; the unmerge ``W = W' − ΔW + U_d S_d V_d`` with it. Without
        the record the dropped part is lost: refused, or PEFT's ``W' − ΔW`` (the truncated base) with
        ``peft_compat=True``."""
        xp = self.xp
        out, inn = self.layer.out_features, self.layer.in_features
        cd = compute_dtype(xp, weight.dtype, self.A.dtype)
        Bd = self._kasa_B()

        def delta() -> Array:
            return xp.matmul(Bd, as_compute(xp, self.A, cd)) * self.scaling

        if not unmerge:
            low, rec = kasa_low(weight, self.r, dtype=cd, where=self.name)
            new = add_fresh_delta(self.name, weight, lambda: delta() - low, cd, copy=copy, safe=safe, xp=xp)
            return new, rec
        if record is None:
            if not peft_compat:
                raise NotInvertibleError(
                    f"{self.name}: KaSA's merge dropped the base weight's {self.r} smallest singular components, "
                    f"which the merged weight no longer holds; pass the record its merge returned "
                    f"(Adapter.merge(..., records=...), `peftmath merge` writes them), or peft_compat=True for "
                    f"PEFT's unmerge, which returns the truncated base W' - dW")
            return add_fresh_delta(self.name, weight, lambda: -delta(), cd, copy=copy, xp=xp), None
        low = low_from_record(record, out, inn, self.r, cd, method="KaSA", where=self.name)
        new = add_fresh_delta(self.name, weight, lambda: low - delta(), cd, copy=copy, xp=xp)
        return new, None

    def describe(self) -> dict[str, Any]:
        r, alpha = self.config.rank_and_alpha(self.pattern_name)
        return {"r": r, "alpha": alpha, "scaling": self.scaling, "dora": self.is_dora}

    @property
    def pattern_name(self) -> str:
        """The name ``rank_pattern`` / ``alpha_pattern`` are matched against: the module's (an attention's
        out-projection overrides it, :mod:`peftmath.methods._lora_mha`)."""
        return self.name

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def changes_bias(self) -> bool:
        return self.lora_bias is not None

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        """``s·B A`` in the stored layout (KaSA: ``s·B diag(lora_diag) A``, PEFT's ``get_delta_weight``; its
        merge also drops the base weight's smallest singular part, so ``W' ≠ W + ΔW`` there)."""
        xp = self.xp
        if self.kasa_diag is not None:
            return self.layer.from_matrix(delta_matrix(self.A, self._kasa_B(), scaling=self.scaling, xp=xp), xp)
        d = delta_matrix(self.A, self.B, scaling=self.scaling, xp=xp)
        if peft_compat:
            d = compat_delta(xp, self.A, self.B, d)
        return self.layer.from_matrix(d, xp)

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        self._refuse_alora("merged")
        new_bias = bias
        if self.lora_bias is not None:
            new_bias = merge_bias(bias, self.lora_bias, scaling=self.scaling, peft_compat=peft_compat)
            if safe and not all_finite(new_bias):
                raise NonFiniteError(f"{self.name}: the merged bias would contain NaN or infinity; nothing changed")
        if not copy:  # copy=False updates the bias in place too (both checked before W is touched)
            self.require_inplace(weight, bias)
        rec = None
        if self.kasa_diag is not None:
            self.layer.check_weight(weight)
            new, rec = self._kasa_merge(weight, copy=copy, safe=safe, unmerge=False, record=None,
                                        peft_compat=peft_compat)
        else:
            new = _apply(weight, self.A, self.B, scaling=self.scaling, sign=1, layer=self.layer, copy=copy,
                         safe=safe, peft_compat=peft_compat, where=self.name)
        if not copy and self.lora_bias is not None:
            new_bias = write_back(self.name, bias, new_bias)
        return MergeResult(new, new_bias, rec)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        self._refuse_alora("unmerged")
        new_bias = bias
        if self.lora_bias is not None:
            new_bias = unmerge_bias(bias, self.lora_bias, scaling=self.scaling, peft_compat=peft_compat)
        if not copy:
            self.require_inplace(weight, bias)
        if self.kasa_diag is not None:
            self.layer.check_weight(weight)
            new, _ = self._kasa_merge(weight, copy=copy, safe=False, unmerge=True, record=record,
                                      peft_compat=peft_compat)
            if not copy and self.lora_bias is not None:
                new_bias = write_back(self.name, bias, new_bias)
            return MergeResult(new, new_bias)
        new = _apply(weight, self.A, self.B, scaling=self.scaling, sign=-1, layer=self.layer, copy=copy, safe=False,
                     peft_compat=peft_compat, where=self.name)
        if not copy and self.lora_bias is not None:
            new_bias = write_back(self.name, bias, new_bias)
        return MergeResult(new, new_bias)

    #: aLoRA: the adapter acts only from the invocation sequence on (set by validate)
    alora: bool = False

    def _refuse_alora(self, what: str) -> None:
        if self.alora:
            raise UnsupportedError(
                f"{self.name}: an aLoRA adapter (alora_invocation_tokens) cannot be {what}: it acts only on the tokens "
                f"from its invocation sequence on, a merged weight would act on every token (PEFT refuses too); use "
                f"forward(..., alora_offsets=lora.alora_offsets(input_ids, config.alora_invocation_tokens))")

    def _alora_forward(self, x: Array, weight: Array, bias: Array | None, offsets: Any, kw: dict) -> Array:
        """``base(x) + m ⊙ s·(x Aᵀ Bᵀ + b_B)`` with ``m`` PEFT's mask (:func:`alora_mask`) over ``x (batch, T, in)``
        (or ``(batch, in)``: one token per row); no offsets: the base model (PEFT's default)."""
        xp = self.xp
        if x.ndim not in (2, 3):
            raise ShapeError(f"{self.name}: aLoRA's forward takes x of shape (batch, tokens, in) or (batch, in), "
                             f"got {tuple(x.shape)}")
        batch, T = int(x.shape[0]), (int(x.shape[1]) if x.ndim == 3 else 1)
        mask = alora_mask(offsets if offsets is not None else [None] * batch, batch, T)
        layer = self.layer
        base = layer.base_forward(x, weight, bias, xp)
        lo = adapter_output(x, self.A, self.B, scaling=self.scaling, layer=layer, lora_bias=self.lora_bias, **kw)
        m = backend_for(xp).from_host(mask.reshape((batch, T, 1) if x.ndim == 3 else (batch, 1)).astype(np.float32),
                                      xp, common_device(x))
        return as_compute(xp, as_compute(xp, base, lo.dtype) + lo * as_compute(xp, m, lo.dtype), base.dtype)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        """The adapted forward; an aLoRA module takes ``alora_offsets`` (one per batch row, :func:`alora_offsets`)."""
        offsets = layer_kwargs.pop("alora_offsets", None)
        layer, kw = self.input_layer(x, weight, layer_kwargs)
        if self.alora:
            return self._alora_forward(x, weight, bias, offsets, kw)
        if offsets is not None:
            raise ConfigError(f"{self.name}: alora_offsets given for an adapter without alora_invocation_tokens")
        B = self.B
        if self.kasa_diag is not None:  # the truncated base (as PEFT's load leaves it) and B diag(d)
            xp = self.xp
            cd = compute_dtype(xp, weight.dtype)
            low = kasa_low(weight, self.r, dtype=cd, where=self.name)[0]
            weight = as_compute(xp, as_compute(xp, weight, cd) - low, weight.dtype)
            B = self._kasa_B()
        return forward(x, weight, self.A, B, scaling=self.scaling, bias=bias, layer=layer,
                       lora_bias=self.lora_bias, **kw)


def is_parameter_wrapper(config: Any, name: str) -> bool:
    """Whether module ``name`` is a wrapper of PEFT's ``target_parameters`` (LoRA on a raw nn.Parameter,
    :mod:`peftmath.methods.lora_params`): ``<module>`` or ``<module>.base_layer...`` of a targeted parameter."""
    if not getattr(config, "target_parameters", None) or config.peft_type != PEFT_TYPE:
        return False
    from .lora_params import is_wrapper  # lazy: lora_params imports this module

    return is_wrapper(config, name)


def _parameter_base_tensor(config: Any, name: str, params: Any, shape_of: Any) -> tuple[str, str | None] | None:
    """Method.base_tensor: the raw parameter a ``target_parameters`` wrapper adapts (lora_params.parameter_key)."""
    if not getattr(config, "target_parameters", None):
        return None
    from .lora_params import parameter_key

    return parameter_key(config, name, params, shape_of)


def _guess_shape(kind: Any, out: int, inn: int) -> tuple[int, int]:
    k = LayerKind.parse(kind)
    return (inn, out) if k in (LayerKind.CONV1D_TRANSPOSED, LayerKind.EMBEDDING) else (out, inn)


#: the trained rows of a table wrapped for trainable_token_indices (peftmath/methods/_lora_tokens.py)
TOKENS_KEY = "token_adapter.trainable_tokens_delta"
#: checkpoint suffixes of this method's per-module tensors
PARAMETER_SUFFIXES = (
    "lora_A.weight",
    "lora_B.weight",
    "lora_B.bias",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    *(k for _, keys in TRAINING_STATE.values() for k in keys),
    "lora_diag",
    TOKENS_KEY,
)
Config = LoraConfig
Module = LoraModule
#: demo / documentation examples: row label -> config fields (non-trivial, alpha != r). The variants' settings are
#: written as PEFT saves them (its defaults beside the chosen values); each row adapts the layer kinds its variant
#: runs on (initialize refuses the others)
EXAMPLES = {
    "LoRA": dict(r=4, lora_alpha=12, init_lora_weights=False),
    "rsLoRA": dict(r=4, lora_alpha=12, use_rslora=True, init_lora_weights=False),
    "DoRA": dict(r=4, lora_alpha=12, use_dora=True, init_lora_weights=False),
    "KaSA": dict(r=4, lora_alpha=12, init_lora_weights=False, kasa_config={"beta": 1e-4, "gamma": 1e-3}),
    "VeLoRA": dict(r=4, lora_alpha=12, init_lora_weights=False,
                   velora_config={"num_groups": 4, "scale": 1.0, "init_type": "batch_average"}),
    "MonteCLoRA": dict(r=4, lora_alpha=12, init_lora_weights=False,
                       monteclora_config={"num_samples": 8, "use_entropy": False, "dirichlet_prior": 0.1,
                                          "sample_scaler": 1e-4, "kl_loss_weight": 1e-5, "buffer_size": 150}),
    # the demo's fc_in and fc_out get a block-diagonal lora_A, the other modules (match_strict false) a plain LoRA;
    # no target_modules_bd_b: PEFT starts a block-diagonal lora_B at zero whatever init_lora_weights says
    "BD-LoRA": dict(r=4, lora_alpha=12, init_lora_weights=False,
                    use_bdlora={"target_modules_bd_a": ["fc_in", "fc_out"], "target_modules_bd_b": None, "nblocks": 2,
                                "match_strict": False}),
}
#: demo rows whose merge is refused: label -> (config fields, forward keyword arguments for the demo's 2 x 7 tokens).
#: aLoRA: the offsets of the invocation sequence [1, 2] in two rows of token ids (the second has none: base model)
FORWARD_EXAMPLES = {
    "aLoRA": (dict(r=4, lora_alpha=12, init_lora_weights=False, alora_invocation_tokens=[1, 2]),
              {"alora_offsets": alora_offsets([[5, 1, 2, 9, 1, 2, 7], [1, 1, 1, 1, 1, 1, 1]], [1, 2])}),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=LoraConfig, module=LoraModule, spec="specs/lora.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=LoraModule.supported_kinds, additive=True,
    init_field="init_lora_weights", examples=EXAMPLES, forward_examples=FORWARD_EXAMPLES, combine="low_rank",
    mixed_batch=True,
    # DoRA: merge returns the weight norm; KaSA: the base weight's dropped singular part
    needs_record_for=lambda config: (bool(config.use_dora) or getattr(config, "kasa_config", None) is not None
                                     or getattr(config, "trainable_token_indices", None) is not None),
    frozen_suffixes=FROZEN_STATE,
    # target_parameters: wrappers <module>(.base_layer)* on a raw parameter <module>.<param> (methods/lora_params.py)
    base_tensor=_parameter_base_tensor, wrapped_module=is_parameter_wrapper,
    multihead_attention=True,  # nn.MultiheadAttention: X on X.in_proj_weight, X.base_layer.out_proj (peftmath._mha)
)


def __getattr__(name: str) -> Any:
    """``lora.DoraModule``: the DoRA module class lives in :mod:`peftmath.methods.dora` (imported lazily,
    so that lora.py never imports dora.py at import time)."""
    if name == "DoraModule":
        from .dora import DoraModule

        return DoraModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
