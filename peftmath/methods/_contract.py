"""The method contract: what every method module declares about itself (design §3 rule 10).

Each method module ends with ``METHOD = Method(...)``. The adapter, the checkpoint reader, the
streamer, the command, ``combine``, ``multi``, the demo and ``create_adapter`` read this description;
they never probe a method module with ``getattr`` and never compare a ``peft_type`` against a method
name. Adding a method is one module (with its ``METHOD``), one spec, and one line in
:data:`peftmath.methods.METHOD_MODULES`; the contract tests (tests/methods/test_method_contract.py)
then run on it without further edits.

Nothing here imports a method module: the description is plain data plus a few callables that the
method module fills in.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..layers import LayerKind
from ._base import ModuleAdapter

__all__ = ["Method", "PEFT_TYPES_0_21_2"]

#: Every ``peft.utils.peft_types.PeftType`` value of PEFT 0.21.2, written down as data (peft is never
#: imported at run time). A type here that peftmath does not implement is refused with
#: :class:`~peftmath.errors.UnsupportedError`; a string that is not here is a :class:`ConfigError`.
PEFT_TYPES_0_21_2: tuple[str, ...] = (
    "PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "LORA", "ADALORA", "ADAMSS", "BOFT",
    "ADAPTION_PROMPT", "IA3", "BEFT", "LILY", "LOHA", "LOKR", "OFT", "POLY", "LN_TUNING", "VERA", "FROD", "PVERA",
    "FOURIERFT", "GLORA", "XLORA", "HRA", "VBLORA", "UNILORA", "CPT", "MISS", "RANDLORA", "ROAD", "TRAINABLE_TOKENS",
    "HIRA", "SHIRA", "C3A", "WAVEFT", "OSF", "DELORA", "GRALORA", "CARTRIDGE", "TINYLORA", "PSOFT", "PEANUT",
    "SHADOW", "SUPERTUNING", "DEFT",
)


def _never(config: Any) -> bool:
    return False


@dataclass(frozen=True)
class Method:
    """The description of one PEFT method, as the rest of peftmath sees it.

    Attributes
    ----------
    peft_type
        PEFT's ``peft_type`` (``"LORA"``, ``"LOHA"``, ...).
    config
        The config dataclass (``LoraConfig``, ...).
    module
        The :class:`~peftmath.methods._base.ModuleAdapter` subclass binding the method to one base
        module; None for prompt-learning methods, which change no weight.
    spec
        The spec file, relative to the repository root (``"specs/lora.md"``).
    parameter_suffixes
        Checkpoint key suffixes of the per-module parameters (``"lora_A.weight"``, ...).
    shared_keys
        Checkpoint keys of tensors shared by all modules (VeRA's projections, a prompt table).
    layer_kinds
        The base layer kinds the method adapts.
    additive, rotation, scale, prompt_learning
        What merging does: adds ``ΔW`` (LoRA, LoHa, LoKr, AdaLoRA, VeRA), multiplies by a rotation
        (OFT, BOFT), scales rows or columns (IA3); or nothing to merge (prompt learning).
    inplace
        ``merge(copy=False)`` / ``unmerge(copy=False)`` write into the caller's array (through
        :func:`~peftmath.methods._base.write_weight`) or refuse the layout.
    init_field
        The config field saying how to initialise (``init_lora_weights``, ``init_ia3_weights``,
        ``init_weights``); None where the method has none.
    examples
        Demo / documentation rows: label -> config fields (non-trivial: random init, alpha != r).
    forward_examples
        Demo rows of configs whose merge is refused (aLoRA acts on some token positions only): label ->
        ``(config fields, forward keyword arguments)``. ``peftmath demo`` runs their forward on its inputs (2 rows
        of 7 tokens for Linear-like layers) against a float64 reference and checks that merge is refused; the
        merge contract tests, which merge every row of :attr:`examples`, do not use them.
    combine
        How :func:`peftmath.combine` combines adapters of this method: ``"low_rank"`` (LoRA's
        factors), ``"scale"`` (IA3's vectors), or None (PEFT does not combine them).
    mixed_batch
        Whether :func:`peftmath.multi.mixed_batch_forward` serves this method (PEFT: LoRA only).
    init_shared
        ``init_shared(config, layers, *, seed, xp, device) -> {shared key: array}`` for methods with
        shared tensors drawn once (VeRA), else None.
    validate_checkpoint
        ``validate_checkpoint(config, shared)``: checks a loaded checkpoint's shared tensors, or None.
    past_key_values
        ``past_key_values(table, config, batch_size)``: the per-layer keys and values of a prefix
        method (prefix tuning), else None.
    needs_record_for
        ``config -> bool``: whether merge returns a record unmerge needs (DoRA's weight norm: LoRA
        with ``use_dora``). Ask it through :meth:`needs_record`.
    rank_excludes
        Config fields set to 0 when the rank ``r`` is given (``init --rank``), because the method takes
        either the rank or these (OFT: ``r`` or ``oft_block_size``, exactly one non-zero). Ask it through
        :meth:`fields_for_rank`.
    orientation_in_tensors
        True when a module's tensors tell a Linear ``(out, in)`` from a transformers Conv1D ``(in, out)`` by
        their shapes (LoRA's ``A (r, in)``, ``B (out, r)``); False when they do not (FourierFT's spectrum):
        then only explicit or recorded kinds, the model type and the config's flag decide
        (:mod:`peftmath.kinds`).
    frozen_suffixes
        Per-module tensors of the checkpoint that are not trainable parameters and are left out of
        :meth:`~peftmath.Adapter.num_trainable_parameters` (RandLoRA's per-module copies of the shared
        bases, VB-LoRA's saved top-k indices).
    trainable_shared
        Shared tensors that are trained (VB-LoRA's vector bank), counted once by
        :meth:`~peftmath.Adapter.num_trainable_parameters`; other shared tensors are frozen projections.
    identity_init
        The method's initialisation is always the identity and its config has no field to draw random
        tensors (LN tuning's copy of the base layer): :meth:`example_params` makes its examples non-trivial.
    bias_only
        Merging changes the base bias only, and the weight is returned untouched (BEFT); a layer without
        a bias cannot be merged.
    requires
        Python packages the method's math needs beyond peftmath's own dependencies (PSOFT: ``torch``, whose
        SVD signs define the adapter); ``peftmath demo`` skips its examples, saying so, where one is missing.
    count_trainable
        ``count_trainable(config, params, shared) -> int``: the trainable scalars as PEFT counts them, where
        the tensors alone do not say it (Lily's tied copies, a Cartridge's frozen rows); None: every
        per-module tensor but :attr:`frozen_suffixes`, plus :attr:`trainable_shared`.
    forward_only
        The method's adaptation depends on the input (Lily's batch-averaged router), so merges are refused
        in general and it may have no :attr:`examples` (the demo and the merge contract tests use them); its
        forward is tested against PEFT by the method's own tests.
    shared_key_pattern
        A regular expression (matched against the whole key) for shared checkpoint keys whose number
        depends on the adapter (TinyLoRA's one vector per weight-tying group, ``base_model.tinylora_v.<g>``),
        besides the fixed :attr:`shared_keys`; None (the default) when the fixed tuple says it all. Ask
        through :meth:`is_shared`.
    pattern_trainable
        Whether the tensors under :attr:`shared_key_pattern` are trained (TinyLoRA's vectors are): then
        :meth:`is_trainable_shared` counts them like :attr:`trainable_shared`.
    link_modules
        ``link_modules(config, params, shared) -> {module: {alias: shared key}}`` for a method whose module
        reads a shared tensor chosen by the module's place among all the adapted modules (TinyLoRA's
        weight-tying groups); None for the others. The adapter asks it once, with all its modules, when it
        is built, and binds module ``m`` with ``shared[alias] = shared[key]`` for each pair of ``m``'s entry
        (a key, not an array, so that moving the adapter to another library keeps it valid). It raises a
        :class:`~peftmath.errors.PeftMathError` when the checkpoint does not settle the choice.
    multihead_attention
        The method adapts torch's ``nn.MultiheadAttention`` as PEFT's LoRA does (:mod:`peftmath._mha`): module
        ``X`` on ``X.in_proj_weight`` and module ``X.base_layer.out_proj`` on ``X.out_proj.weight``, both Linear.
    """

    peft_type: str
    config: type
    module: type | None
    spec: str
    parameter_suffixes: tuple[str, ...] = ()
    shared_keys: tuple[str, ...] = ()
    layer_kinds: tuple[LayerKind, ...] = ()
    additive: bool = False
    rotation: bool = False
    scale: bool = False
    prompt_learning: bool = False
    inplace: bool = True
    init_field: str | None = "init_weights"
    examples: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    forward_examples: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]] = field(default_factory=dict)
    combine: str | None = None
    mixed_batch: bool = False
    init_shared: Callable[..., dict[str, Any]] | None = None
    validate_checkpoint: Callable[[Any, dict[str, Any]], None] | None = None
    past_key_values: Callable[[Any, Any, int], list] | None = None
    needs_record_for: Callable[[Any], bool] = _never
    rank_excludes: tuple[str, ...] = ()
    orientation_in_tensors: bool = True
    frozen_suffixes: tuple[str, ...] = ()
    #: ``base_tensor(config, name, params, shape_of) -> (weight key, bias key or None) | None``: the base tensor
    #: module ``name`` adapts where it is not ``<module>.weight`` (LoRA's ``target_parameters`` wrappers adapt a
    #: raw parameter ``<module>.<param>``); ``params``: all the adapter's modules, ``shape_of(key)``: a base
    #: tensor's shape or None. None (the default, or returned): ``<module>.weight``.
    base_tensor: Callable[[Any, str, Mapping[str, Mapping[str, Any]], Callable[[str], Any]], Any] | None = None
    #: ``wrapped_module(config, path) -> bool``: checkpoint module path ``path`` holding ``base_layer`` is one of
    #: the method's own modules (LoRA's nested ``target_parameters`` wrappers ``<module>.base_layer``)
    wrapped_module: Callable[[Any, str], bool] | None = None
    trainable_shared: tuple[str, ...] = ()
    identity_init: bool = False
    bias_only: bool = False
    forward_only: bool = False
    count_trainable: Callable[[Any, Mapping[str, Mapping[str, Any]], Mapping[str, Any]], int] | None = None
    requires: tuple[str, ...] = ()
    shared_key_pattern: str | None = None
    pattern_trainable: bool = False
    link_modules: Callable[[Any, Mapping[str, Mapping[str, Any]], Mapping[str, Any]],
                           Mapping[str, Mapping[str, str]]] | None = None
    multihead_attention: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "examples", MappingProxyType({k: MappingProxyType(dict(v))
                                                               for k, v in self.examples.items()}))
        object.__setattr__(self, "forward_examples", MappingProxyType({
            k: (MappingProxyType(dict(fields)), MappingProxyType(dict(kwargs)))
            for k, (fields, kwargs) in self.forward_examples.items()}))
        object.__setattr__(self, "layer_kinds", tuple(LayerKind.parse(k) for k in self.layer_kinds))
        if self.prompt_learning != (self.module is None):
            raise TypeError(f"Method {self.peft_type}: a prompt-learning method has no module, every other one has one")
        if sum((self.additive, self.rotation, self.scale, self.prompt_learning)) != 1:
            raise TypeError(f"Method {self.peft_type}: exactly one of additive, rotation, scale, prompt_learning")
        if self.rank_excludes and dataclasses.is_dataclass(self.config):
            names = {f.name for f in dataclasses.fields(self.config)}
            unknown = [f for f in self.rank_excludes if f not in names or "r" not in names]
            if unknown:
                raise TypeError(f"Method {self.peft_type}: rank_excludes {unknown} are not fields of "
                                f"{self.config.__name__} beside its rank r")
        if self.shared_key_pattern is not None:
            re.compile(self.shared_key_pattern)  # a bad pattern fails at import, not at the first load
        elif self.pattern_trainable:
            raise TypeError(f"Method {self.peft_type}: pattern_trainable without a shared_key_pattern")

    # --- questions the rest of peftmath asks ---------------------------------------------------
    @property
    def allows_no_modules(self) -> bool:
        """A checkpoint of this method may have no per-module tensors (prompt learning)."""
        return self.prompt_learning

    @property
    def merges_weights(self) -> bool:
        """The method changes base weights (it has a module), so merge / unmerge / forward exist."""
        return self.module is not None

    def is_shared(self, key: str) -> bool:
        """Whether checkpoint key ``key`` is a tensor shared by all modules: one of :attr:`shared_keys`,
        or a whole match of :attr:`shared_key_pattern`."""
        return key in self.shared_keys or (self.shared_key_pattern is not None
                                           and re.fullmatch(self.shared_key_pattern, key) is not None)

    def is_trainable_shared(self, key: str) -> bool:
        """Whether shared tensor ``key`` is trained (counted once by the adapter's trainable count): one of
        :attr:`trainable_shared`, or under :attr:`shared_key_pattern` when :attr:`pattern_trainable`."""
        return key in self.trainable_shared or (self.pattern_trainable and key not in self.shared_keys
                                                and self.is_shared(key))

    def needs_record(self, config_or_module: Any) -> bool:
        """Whether merging with this config (or a bound module's config) returns a record that
        unmerge needs (DoRA's weight norm)."""
        if isinstance(config_or_module, ModuleAdapter):  # a bound module knows from its tensors
            return config_or_module.needs_record()
        return bool(self.needs_record_for(config_or_module))

    def stacks(self, config_or_module: Any) -> bool:
        """Whether several adapters of this method can be summed in one forward (additive, no record)."""
        return self.additive and not self.needs_record(config_or_module)

    def fields_for_rank(self) -> dict[str, int]:
        """The config fields to zero when the rank ``r`` is given: ``{field: 0}`` for each of
        :attr:`rank_excludes` (OFT: ``{"oft_block_size": 0}``), empty for most methods."""
        return {name: 0 for name in self.rank_excludes}

    def example_params(self, params: dict[str, Any], seed: Any = 0) -> dict[str, Any]:
        """``params`` of a new example adapter as a trained one would be (the demo and the contract tests):
        unchanged, except for an :attr:`identity_init` method, whose every tensor gets ``N(0, 0.1²)`` added
        (host-seeded; NumPy arrays)."""
        if not self.identity_init:
            return params
        import numpy as np

        from ..backends import host_rng

        rng = host_rng(seed)
        return {k: (np.asarray(v) + rng.normal(0.0, 0.1, tuple(v.shape))).astype(np.asarray(v).dtype)
                for k, v in params.items()}

    def supports(self, kind: LayerKind | str) -> bool:
        return LayerKind.parse(kind) in self.layer_kinds

    def initialize(self, name: str, config: Any, layer: Any, *, weight: Any = None, seed: Any = 0,
                   shared: Any = None, **kwargs: Any) -> tuple[dict[str, Any], Any]:
        """``module.initialize(...)``: ``(params by checkpoint suffix, new base weight or None)``; the
        ``shared`` tensors are passed to methods that take them."""
        if self.module is None:
            from ..errors import UnsupportedError

            raise UnsupportedError(f"{self.peft_type} adapts no module weights; it has no per-module initialisation")
        if shared is not None and "shared" in inspect.signature(self.module.initialize).parameters:
            kwargs["shared"] = shared
        return self.module.initialize(name, config, layer, weight=weight, seed=seed, **kwargs)
