"""``Adapter``: a loaded adapter (config + parameters per module) and its operations on a base model.

A base model is a *state dict*: a mapping from PyTorch parameter names (``"model.layers.0.q_proj.weight"``)
to arrays of any array-API library. Adapted modules are named as PEFT names them, relative to the model
(``"model.layers.0.q_proj"``); the weight and bias of module ``m`` are ``m + ".weight"`` and ``m + ".bias"``
(:meth:`~peftmath.Adapter.weight_keys` names the exceptions: an ``nn.MultiheadAttention``'s projections, raw parameters).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import warnings

from ._array import dtype_name
from ._mha import IN_PROJ_LEAVES, base_module, out_proj_owner
from .config import check_supported
from .errors import (CheckpointError, ConfigError, NamespaceError, NotInvertibleError, PeftMathError, PeftMathWarning,
                     ShapeError, UnsupportedError)
from .kinds import TWO_D, Evidence, decide, resolve
from .layers import LayerKind
from .methods import Method, get_method
from .methods._base import ModuleAdapter, require_writeable
from .targets import OUTPUT_EMBEDDING_NAMES, WORD_EMBEDDING_NAMES

Array = Any

__all__ = ["Adapter", "not_invertible_replacements"]

#: :meth:`Adapter._evidence` for a module whose kind is not a Linear-or-Conv1D question (conv, embedding)
_NOT_2D = object()


def not_invertible_replacements(keys: list[str], who: str = "", *,
                                how: str = "Adapter.unmerge(..., originals=base_state_dict)") -> NotInvertibleError:
    """The error of an unmerge that would have to restore base tensors the adapter replaced
    (``modules_to_save`` copies, trained biases, saved embeddings): the merged model no longer holds them.
    ``who`` names the adapter, ``how`` says how to give the originals (the command says its own way)."""
    return NotInvertibleError(
        f"{who + ': ' if who else ''}the adapter replaces {_some(sorted(keys))} (modules_to_save, trained biases or "
        f"saved embedding layers); the original tensors cannot be recovered from the merged model. Take them from "
        f"the base model instead ({how})")


class Adapter:
    """One PEFT adapter: its typed config and its parameters, module by module.

    A config that switches on a PEFT variant peftmath does not implement (``kasa_config``,
    ``use_bdlora``, ``init_lora_weights="pissa"``, ...) is refused by every operation on its modules
    (binding, merge, unmerge, forward, delta; :func:`peftmath.config.check_supported`), and by
    :func:`~peftmath.load_adapter`.

    Parameters
    ----------
    config
        A typed config (``LoraConfig``, ...); its ``peft_type`` selects the method.
    params
        ``{module name: {parameter suffix: array}}``, suffixes as in PEFT checkpoints
        (``"lora_A.weight"``, ``"lora_embedding_B"``, ``"lora_magnitude_vector"``, ...).
    shared
        Tensors not tied to one module (VeRA's ``vera_A`` / ``vera_B``), by their checkpoint key.
    other
        Base-model tensors the checkpoint replaces (``modules_to_save``, ``bias="all"`` / ``"lora_only"``,
        saved embedding layers), by base key. :meth:`merge` puts them in place before it merges (each must
        exist in the base); :meth:`unmerge` needs the originals back (``originals=``).
    model_type
        The base model's transformers ``model_type`` (Dinov2 names its checkpoint tensors differently
        from its modules; see :data:`peftmath.targets.CHECKPOINT_RENAMES`).
    layer_kinds
        Known layer kinds by module name (a square transformers Conv1D cannot be told from a Linear
        by its shape). :func:`~peftmath.create_adapter` fills it, :func:`~peftmath.save_adapter` records it
        in the safetensors metadata and :func:`~peftmath.load_adapter` reads it back. The rule for a 2-D
        module without one is in :mod:`peftmath.kinds`.
    """

    def __init__(
        self,
        config: Any,
        params: Mapping[str, Mapping[str, Array]],
        *,
        shared: Mapping[str, Array] | None = None,
        other: Mapping[str, Array] | None = None,
        layer_kinds: Mapping[str, LayerKind | str] | None = None,
        model_type: str | None = None,
    ) -> None:
        self.config = config
        self.method = get_method(config.peft_type)
        #: the method's :class:`~peftmath.methods.Method` description: what this adapter asks of its method
        self.description: Method = self.method.METHOD
        self.params: dict[str, dict[str, Array]] = {m: dict(p) for m, p in params.items()}
        if getattr(config, "trainable_token_indices", None) is not None:  # LoRA's trainable tokens: ids <-> rows
            from .methods._lora_tokens import check_token_modules

            check_token_modules(config, self.params, f"{config.peft_type} adapter")
        self.shared: dict[str, Array] = dict(shared or {})
        self.other: dict[str, Array] = dict(other or {})
        self.layer_kinds: dict[str, LayerKind] = {k: LayerKind.parse(v) for k, v in (layer_kinds or {}).items()}
        #: the transformers ``model_type`` of the base, when known: it maps module names to checkpoint
        #: names where transformers renames them (:data:`peftmath.targets.CHECKPOINT_RENAMES`)
        self.model_type = model_type
        #: factors moved to another library / device, by (id of the source array, library, device):
        #: ``(source, moved)`` (the source is kept so that its id is not reused); shared with the shallow
        #: copies of this adapter (:meth:`on`, the streamer's per-module parts)
        self._moved: dict[tuple[int, str, str], tuple[Array, Array]] = {}
        #: the factor :meth:`merge` / :meth:`unmerge` / :meth:`delta_weight` apply this adapter with (times
        #: their own ``scale=``); 1 for a plain adapter, set by :meth:`scaled` (``peftmath merge BASE A:0.5``)
        self.scale: float = 1.0
        #: ``{module: {alias: shared key}}`` from the method's ``link_modules`` (TinyLoRA's weight-tying
        #: groups), asked once here with every module: the shallow copies (:meth:`on`, the streamer's
        #: per-module parts) keep it
        link = self.description.link_modules
        self._links = {} if link is None else {m: dict(v) for m, v in link(config, self.params, self.shared).items()}
        #: the adapted ``nn.MultiheadAttention`` modules ``X`` (``X.base_layer.out_proj`` adapted too,
        #: :mod:`peftmath._mha`), found once here: the shallow copies (the streamer's per-module parts) keep it
        self._attention = frozenset(o for m in self.params if (o := out_proj_owner(m)) is not None and o in self.params
                                    ) if self.description.multihead_attention else frozenset()

    def __repr__(self) -> str:
        return f"Adapter({self.config.peft_type}, {len(self.params)} modules, {self.num_trainable_parameters()} parameters)"

    @property
    def peft_type(self) -> str:
        return self.config.peft_type

    @property
    def modules(self) -> list[str]:
        """Adapted module names, sorted."""
        return sorted(self.params)

    # --- prompt-learning methods ---------------------------------------------------------------
    @property
    def is_prompt_learning(self) -> bool:
        """True for prompt tuning, P-tuning and prefix tuning (virtual tokens, no weight changes)."""
        return self.description.prompt_learning

    def prompt_embeddings(self) -> Array:
        """The saved virtual-token table: ``(T·S, D)`` (prompt tuning, P-tuning) or ``(T, 2·L·D)`` (prefix)."""
        if not self.is_prompt_learning:
            raise UnsupportedError(f"{self.peft_type} has no prompt embeddings; it adapts module weights")
        if "prompt_embeddings" not in self.shared:
            raise UnsupportedError(f"{self.peft_type} has no virtual-token table: its tensors are per module "
                                   f"(adapter.params[module]; see the method module's forward)")
        return self.shared["prompt_embeddings"]

    def past_key_values(self, batch_size: int) -> list[tuple[Array, ...]]:
        """Prefix tuning's per-layer keys and values, ``(batch_size, H, T, D / H)`` each."""
        pkv = self.description.past_key_values
        if pkv is None:
            raise UnsupportedError(f"past_key_values belongs to prefix tuning, not {self.peft_type}")
        return pkv(self.prompt_embeddings(), self.config, batch_size)

    def _require_modules(self, what: str) -> None:
        if self.is_prompt_learning:
            desc = self.description
            if "prompt_embeddings" not in desc.shared_keys:  # adaption prompt, Shadow: input-dependent, whole model
                raise UnsupportedError(
                    f"{self.peft_type} changes no weight (what it adds depends on the input), so it has no {what}; "
                    f"its forward is in its method module (see {desc.spec})")
            raise UnsupportedError(
                f"{self.peft_type} adds virtual tokens and changes no weight, so it has no {what}; use "
                f"prompt_embeddings(){' / past_key_values(batch_size)' if desc.past_key_values else ''}"
            )

    # --- scale ---------------------------------------------------------------------------------
    def scaled(self, scale: float) -> "Adapter":
        """This adapter applied with factor ``scale`` (times :attr:`scale`) by :meth:`merge`, :meth:`unmerge`,
        :meth:`delta_weight`, :meth:`forward` and :meth:`module`, as llama.cpp's ``--lora-scaled`` and mergekit's per-model weights; a
        shallow copy sharing the factors (nothing is computed here). What a scale ``c`` means per method:

        * additive methods with a scaling ``s`` (LoRA, AdaLoRA, LoHa, LoKr): ``s → c·s``, so ``ΔW → c·ΔW``
          (LoRA's ``lora_bias`` term ``s·b_B`` too). This is PEFT's ``LoraLayer.scale_layer(c)`` /
          ``set_scale``, which multiplies ``scaling`` and leaves everything else as it is.
        * DoRA: the same ``s → c·s`` inside the direction, ``V = W + c·s·BA``, with the magnitude unchanged:
          ``W' = m ⊙ V / ‖V‖`` (PEFT's ``scale_layer`` on a DoRA layer does exactly this; the result is
          *not* ``W + c·(W_dora − W)``).
        * VeRA (no scaling in PEFT): ``λ_b → c·λ_b``, so ``ΔW → c·ΔW`` (the factor rounded once to
          ``λ_b``'s dtype).
        * IA3: ``l → 1 + c·(l − 1)`` (``c = 0`` is the identity, ``c = 1`` the adapter). PEFT has no scale
          for IA3; this definition interpolates the learned vector toward 1 (computed in ``l``'s dtype).
        * OFT / BOFT: refused for ``c ≠ 1`` (:class:`~peftmath.errors.UnsupportedError`): a rotation has no
          linear scale, and PEFT defines none.

        A ``c ≠ 1`` is also refused for an adapter that replaces base tensors (:attr:`other`:
        ``modules_to_save`` copies, trained biases): a replaced tensor is not a change that can be scaled.
        :meth:`unmerge` with the same scale is the exact inverse of :meth:`merge` with it.
        """
        c = float(scale)
        if not math.isfinite(c):
            raise ConfigError(f"{self.peft_type} adapter: scale must be a finite number, got {scale!r}")
        out = copy.copy(self)
        out.scale = self.scale * c
        out._check_scale(1.0, f"{self.peft_type} adapter")  # refused now, not at the first module
        return out

    def _check_scale(self, scale: float, what: str) -> float:
        """The effective scale (:attr:`scale` times ``scale``), refused where it has no meaning."""
        c = self.scale * float(scale)
        if c == 1.0:
            return c
        if not math.isfinite(c):
            raise ConfigError(f"{what}: scale must be a finite number, got {c!r}")
        if self.description.rotation:
            raise UnsupportedError(
                f"{what}: {self.peft_type} multiplies the weight by a rotation, which has no linear scale (PEFT "
                f"defines none); merge it with scale 1, or scale an additive adapter instead (got scale {c:g})")
        if self.other:
            raise UnsupportedError(
                f"{what}: this {self.peft_type} adapter replaces base tensors ({_some(sorted(self.other), 3)}: "
                f"modules_to_save copies, trained biases or saved embeddings); a replaced tensor is not a change "
                f"that can be scaled. Merge it with scale 1 (got scale {c:g})")
        return c

    # --- library and device -------------------------------------------------------------------
    def on(self, xp: Any, device: Any = None) -> "Adapter":
        """This adapter with its factors (:attr:`params`, :attr:`shared`, :attr:`other`) as arrays of
        namespace ``xp`` on ``device`` (default: the library's default device); ``self`` when they already are.

        The factors are moved through the backend registry (:meth:`~peftmath.backends.Backend.to_host`
        of their library, then :meth:`~peftmath.backends.Backend.from_host` of ``xp``), or with
        ``to_device`` between two devices of one library, each once: the moved arrays are cached on the
        adapter by (source array, library, device), so merging again (or another module of the same
        adapter) converts nothing. The cache holds the source arrays it was made from: replacing a factor
        in :attr:`params` moves the new one; writing into a source array in place after a move is not seen.
        The result shares config, layer kinds and the cache with ``self``. :meth:`merge`, :meth:`unmerge`,
        :meth:`forward` and :meth:`delta_weight` call it for the base weights' library and device.
        """
        import array_api_compat

        if device is None:
            probe = xp.asarray(0.0) if not hasattr(xp, "empty") else xp.empty((0,))
            device = array_api_compat.device(probe)
        arrays = [a for p in self.params.values() for a in p.values()] + list(self.shared.values()) + list(self.other.values())
        if all(_same_place(a, xp, device) for a in arrays):
            return self
        moved = copy.copy(self)
        moved.params = {m: {k: self._move(a, xp, device) for k, a in p.items()} for m, p in self.params.items()}
        moved.shared = {k: self._move(a, xp, device) for k, a in self.shared.items()}
        moved.other = {k: self._move(a, xp, device) for k, a in self.other.items()}
        return moved

    def _move(self, a: Array, xp: Any, device: Any) -> Array:
        """Factor ``a`` as an array of ``xp`` on ``device`` (cached; never a base weight)."""
        if _same_place(a, xp, device):
            return a
        key = (id(a), _library(xp), str(device))
        cache = self.__dict__.setdefault("_moved", {})
        hit = cache.get(key)
        if hit is not None and hit[0] is a:
            return hit[1]
        import array_api_compat

        from ._array import namespace
        from .backends import backend_for

        src = namespace(a)
        if _library(src) == _library(xp):
            out = array_api_compat.to_device(a, device)
        else:
            host = backend_for(src).to_host(a)
            try:
                out = backend_for(xp).from_host(host, xp, device)
            except (TypeError, ValueError) as exc:
                raise NamespaceError(
                    f"{self.peft_type} adapter: cannot move a {dtype_name(a.dtype)} factor of shape {tuple(a.shape)} "
                    f"from {_library(src)} to {_library(xp)} ({exc}); load the adapter in that library instead: "
                    f"load_adapter(path, xp=..., device=...)") from exc
        cache[key] = (a, out)
        return out

    def _follow(self, arrays: Mapping[str, Array], where: str) -> "Adapter":
        """This adapter on the library and device of ``arrays`` (the base tensors it reads, by key); a
        :class:`~peftmath.errors.NamespaceError` saying what to call when they are of several libraries
        or devices."""
        present = {k: v for k, v in arrays.items() if v is not None}
        if not present:
            return self
        from ._array import common_device, namespace

        try:
            xp = namespace(*present.values())
            device = common_device(*present.values())
        except NamespaceError:
            raise _mixed_error(present, where) from None
        if device is None:  # traced values: let the module operations decide
            return self
        return self.on(xp, device)

    def _touched(self, state: Mapping[str, Array], model_type: str | None) -> dict[str, Array]:
        """The tensors of ``state`` a merge / unmerge of this adapter reads: adapted weights and biases and
        the tensors it replaces."""
        out = {}
        for m in self.modules:
            for k in self.weight_keys(m, state, model_type=model_type):
                if k in state:
                    out[k] = state[k]
        for kb in self._replacement_keys(state, model_type).values():
            out[kb] = state[kb]
        return out

    # --- per module ---------------------------------------------------------------------------
    def module(
        self,
        name: str,
        *,
        weight_shape: tuple[int, ...] | None = None,
        kind: LayerKind | str | None = None,
        model_type: str | None = None,
        scale: float = 1.0,
    ) -> ModuleAdapter:
        """The bound :class:`~peftmath.methods._base.ModuleAdapter` of module ``name``, with ``scale`` times
        :attr:`scale` applied (:meth:`scaled`).

        The layer geometry comes from the base weight's shape when given, otherwise from the parameters
        and the config. Whether a 2-D weight is an ``nn.Linear`` or a transformers ``Conv1D`` is decided
        by :mod:`peftmath.kinds`: ``kind``, then the kinds recorded in the adapter, then ``model_type``
        (default :attr:`model_type`), then the shape, then the config's ``fan_in_fan_out`` where no other
        module contradicts it (here only the other modules' recorded kinds and ``model_type`` are known;
        :meth:`resolve_layer_kinds` and the whole-model operations also use their base shapes).
        """
        self._require_modules("modules")
        self._require_module(name)
        if kind is None:
            kind = self._kind_for(name, weight_shape, None, model_type or self.model_type)
        return self._bind(name, weight_shape, kind, scale=scale)

    def resolve_layer_kinds(
        self,
        shapes: Mapping[str, tuple[int, ...] | None],
        *,
        layer_kinds: Mapping[str, LayerKind | str] | None = None,
        model_type: str | None = None,
    ) -> dict[str, LayerKind | None]:
        """The layer kind of every adapted module (the rule of :mod:`peftmath.kinds`), from their base
        weight shapes ``shapes`` (by module name; a missing one is unknown), the explicit ``layer_kinds``
        and ``model_type`` (default :attr:`model_type`). None where the shape decides alone (convs,
        embeddings). Pass each to :meth:`module` as ``kind``. Raises
        :class:`~peftmath.errors.ConfigError` naming a module whose kind the evidence leaves ambiguous.
        """
        self._require_modules("layer kinds")
        model_type = model_type or self.model_type
        layer_kinds = dict(layer_kinds or {})
        out: dict[str, LayerKind | None] = {}
        ambiguous = []
        for m in self.modules:
            ev = self._evidence(m, shapes.get(m), layer_kinds.get(m), model_type)
            if ev is None:
                ambiguous.append(m)
            else:
                out[m] = None if ev is _NOT_2D else ev.kind
        if ambiguous:  # one error naming every module the evidence leaves open
            kind = self._flag_kind(ambiguous, model_type, shapes, layer_kinds)
            out.update(dict.fromkeys(ambiguous, kind))
        return {m: out[m] for m in self.modules}

    def delta_weight(self, name: str, *, weight_shape: tuple[int, ...] | None = None,
                     kind: LayerKind | str | None = None, model_type: str | None = None,
                     peft_compat: bool = False, xp: Any = None, device: Any = None, scale: float = 1.0) -> Array:
        """``ΔW`` of module ``name`` in the base weight's stored layout (additive methods), as an array of
        the factors' library, or of ``xp`` on ``device`` when given (the factors move once, :meth:`on`);
        with ``scale`` (times :attr:`scale`) applied as :meth:`scaled` says."""
        if xp is not None:
            return self.on(xp, device).delta_weight(name, weight_shape=weight_shape, kind=kind, model_type=model_type,
                                                    peft_compat=peft_compat, scale=scale)
        mod = self.module(name, weight_shape=weight_shape, kind=kind, model_type=model_type, scale=scale)
        return mod.delta_weight(peft_compat=peft_compat)

    def forward(self, name: str, x: Array, state: Mapping[str, Array], *, kind: LayerKind | str | None = None,
                model_type: str | None = None, **layer_kwargs: Any) -> Array:
        """One module's unmerged adapted forward, the base bias included (a bias the adapter replaces,
        ``bias="all"`` / ``"lora_only"``, is the replacement, as in PEFT's loaded model).

        ``layer_kwargs`` are the base layer's hyper-parameters (conv ``stride``, ``padding``,
        ``dilation``; ``embed_scale`` for scaled embeddings).
        """
        self._require_modules("forward")
        self._require_module(name)
        model_type = model_type or self.model_type
        weight, bias = self._base_tensors(name, state, model_type=model_type)
        key = self.base_key(name, state, model_type=model_type)
        wkey, bkey = self.weight_keys(name, state, model_type=model_type)
        follow = self._follow({wkey: weight, bkey: bias}, f"{name}: forward")
        if follow is not self:
            return follow.forward(name, x, state, kind=kind, model_type=model_type, **layer_kwargs)
        weight = self._replacement(name, key, wkey[len(key) + 1:], weight)
        bias = self._replacement(name, key, bkey[len(key) + 1:], bias)
        if kind is None:
            kind = self._kind_for(name, tuple(weight.shape), None, model_type, shapes=self._module_shapes(state, model_type))
        mod = self._bind(name, tuple(weight.shape), kind)
        return mod.forward(x, weight, bias, **layer_kwargs)

    # --- whole model --------------------------------------------------------------------------
    def merge(
        self,
        state: Mapping[str, Array],
        *,
        peft_compat: bool = False,
        safe: bool = False,
        layer_kinds: Mapping[str, LayerKind | str] | None = None,
        records: dict[str, Any] | None = None,
        copy: bool = True,
        model_type: str | None = None,
        model_config: Mapping[str, Any] | None = None,
        scale: float = 1.0,
    ) -> dict[str, Array]:
        """The merged state dict: a new dict in which adapted weights (and biases) are replaced.

        ``scale`` (times :attr:`scale`) applies the adapter with that factor; what it means per method
        (``ΔW → c·ΔW`` for additive methods, PEFT's ``scale_layer``; IA3 ``l → 1 + c·(l − 1)``; refused for
        OFT/BOFT and for adapters that replace base tensors) is in :meth:`scaled`. :meth:`unmerge` with the
        same scale inverts it.

        Tensors the adapter does not touch are passed through as the same objects. ``records``, when
        a dict is given, receives what :meth:`unmerge` needs per module (DoRA's weight norms).
        ``copy=False`` updates the adapted arrays in place. Every module is validated (shapes, layer
        kinds, the base tensors the adapter replaces) before any array is computed, and with
        ``copy=True`` nothing is modified on an error.

        Tensors the adapter replaces (:attr:`other`: ``modules_to_save`` copies, biases trained with
        ``bias="all"`` / ``"lora_only"``, saved embedding layers) replace their base tensors first, in the
        base tensor's dtype, as PEFT's loader copies them into the model, and a module adapted on top of
        a replaced tensor merges into the replacement (``copy=False`` copies the replacement into the
        caller's array, then merges there; the adapter's own tensors are never written). Every replaced
        tensor must exist in ``state`` with the same shape (:class:`~peftmath.errors.CheckpointError` /
        :class:`~peftmath.errors.ShapeError` otherwise).

        ``model_config`` is the base model's ``config.json`` (a dict): its ``model_type`` (unless
        ``model_type`` is given) helps decide layer kinds, and its ``tie_word_embeddings`` tells when an
        adapted input embedding is also the output layer (a :class:`~peftmath.errors.PeftMathWarning`
        says so; an output layer tied to the embedding and so absent from ``state`` is refused with an
        error naming both tensors). A tensor of ``state`` that shares its storage with an adapted
        embedding (a tied torch state dict) is kept tied: it refers to the merged array too.
        """
        self._require_modules("merge")
        model_type = self._model_type(model_type, model_config)
        follow = self._follow(self._touched(state, model_type), "merge")
        if follow is not self:
            return follow.merge(state, peft_compat=peft_compat, safe=safe, layer_kinds=layer_kinds, records=records,
                                copy=copy, model_type=model_type, model_config=model_config, scale=scale)
        self._check_scale(scale, "merge")  # refused before anything is computed
        self.check_base({k: tuple(v.shape) for k, v in state.items()}, model_config=model_config,
                        model_type=model_type)
        replaced = self._replacements(state, model_type)
        bound = self._bind_all({**state, **replaced}, layer_kinds, model_type, scale=scale)
        if not copy:  # refuse before the first in-place write, not half-way through the model
            for kb in replaced:
                require_writeable(f"replaced tensor {kb}", state[kb])
            for name, (mod, wkey, bkey) in bound.items():  # the weight, and the bias where the merge moves it
                mod.require_inplace(state[wkey], state.get(bkey) if bkey else None)
        base = dict(state)
        for kb, value in replaced.items():  # PEFT copies them into the model's tensors (its dtype)
            if copy:
                base[kb] = _like(value, state[kb])
            else:
                state[kb][...] = _like(value, state[kb])
        out = dict(base)
        new_records: dict[str, Any] = {}
        for name, (mod, wkey, bkey) in bound.items():
            res = mod.merge(base[wkey], base.get(bkey), copy=copy, safe=safe, peft_compat=peft_compat)
            out[wkey] = res.weight
            if res.bias is not None:
                out[bkey] = res.bias
            if res.record is not None:
                new_records[name] = res.record
        self._keep_ties(state, out, bound, model_config)
        if records is not None:
            records.update(new_records)
        return out

    def unmerge(
        self,
        merged: Mapping[str, Array],
        *,
        peft_compat: bool = False,
        layer_kinds: Mapping[str, LayerKind | str] | None = None,
        records: Mapping[str, Any] | None = None,
        copy: bool = True,
        model_type: str | None = None,
        originals: Mapping[str, Array] | None = None,
        scale: float = 1.0,
    ) -> dict[str, Array]:
        """The inverse of :meth:`merge` where it exists (``records`` from that merge where needed); a merge
        made with a scale is undone with the same ``scale`` (:meth:`scaled`).

        A tensor the adapter replaced (:attr:`other`) cannot be recovered from the merged model: unless
        ``originals`` holds it (the base model's tensors by key, e.g. the original state dict), this
        raises :class:`~peftmath.errors.NotInvertibleError` naming the replaced tensors, as ``peftmath
        unmerge`` does. With ``originals``, those tensors are taken from it (the same objects).
        """
        self._require_modules("unmerge")
        model_type = model_type or self.model_type
        touched = self._touched(merged, model_type)
        follow = self._follow(touched, "unmerge")
        if follow is not self:
            if records:  # DoRA's weight norms from a merge on the host: small, they follow too
                import array_api_compat

                from ._array import namespace

                ref = next(iter(touched.values()))
                xp, dev = namespace(ref), array_api_compat.device(ref)
                records = {k: follow._move(v, xp, dev) if hasattr(v, "dtype") else v for k, v in records.items()}
            return follow.unmerge(merged, peft_compat=peft_compat, layer_kinds=layer_kinds, records=records, copy=copy,
                                  model_type=model_type, originals=originals, scale=scale)
        self._check_scale(scale, "unmerge")
        replaced = {k: self._replaced_key(k, merged, model_type) or k for k in self.other}
        missing = sorted(k for k in replaced.values() if originals is None or k not in originals)
        if missing:
            raise not_invertible_replacements(missing)
        for k in replaced.values():
            if k in merged and tuple(originals[k].shape) != tuple(merged[k].shape):
                raise ShapeError(f"originals[{k!r}] has shape {tuple(originals[k].shape)}, the merged model's "
                                 f"tensor has {tuple(merged[k].shape)}")
        bound = self._bind_all(merged, layer_kinds, model_type, scale=scale)
        restored = set(replaced.values())
        todo = {n: b for n, b in bound.items() if b[1] not in restored}
        if not copy:
            for name, (mod, wkey, bkey) in todo.items():
                mod.require_inplace(merged[wkey], merged.get(bkey) if bkey else None)
        out = dict(merged)
        for name, (mod, wkey, bkey) in todo.items():
            rec = (records or {}).get(name)
            res = mod.unmerge(merged[wkey], merged.get(bkey), record=rec, copy=copy, peft_compat=peft_compat)
            out[wkey] = res.weight
            if res.bias is not None:
                out[bkey] = res.bias
        for k in restored:
            out[k] = originals[k]
        return out

    def check_base(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        model_config: Mapping[str, Any] | None = None,
        model_type: str | None = None,
        source: str = "the base state dict",
    ) -> None:
        """Check that this adapter fits a base model whose tensors have ``shapes`` (by state-dict key)
        before anything is merged, as :meth:`merge` does (the streamed merge calls it too):

        * every adapted module has its weight; one missing because the model ties it to its input
          embedding (``lm_head`` with ``tie_word_embeddings=true`` in ``model_config``) is an
          :class:`~peftmath.errors.UnsupportedError` saying what is tied to what and what to do,
          any other a :class:`~peftmath.errors.ShapeError` listing the closest keys;
        * every tensor the adapter replaces exists (:class:`~peftmath.errors.CheckpointError` listing
          those that do not) with the same shape (:class:`~peftmath.errors.ShapeError`);
        * an adapted input embedding that the model ties to its output layer is reported with a
          :class:`~peftmath.errors.PeftMathWarning`: the merged embedding is the output layer too.
        """
        if self.is_prompt_learning:
            return
        model_type = self._model_type(model_type, model_config)
        tied = _ties_embeddings(model_config)
        for name in self.modules:
            wkey, _ = self.weight_keys(name, shapes, model_type=model_type)
            if wkey not in shapes:
                raise self._missing_weight(name, wkey, shapes, tied, source)
        missing = [k for k in self.other if self._replaced_key(k, shapes, model_type) is None]
        if missing:
            raise CheckpointError(
                f"the adapter replaces base tensors that {source} lacks: {_some(sorted(missing))} "
                f"(modules_to_save copies / trained biases / saved embeddings of another model?); "
                f"is this the adapter's base model?")
        for k, v in self.other.items():
            kb = self._replaced_key(k, shapes, model_type)
            if tuple(v.shape) != tuple(shapes[kb]):
                raise ShapeError(f"the adapter's replacement for {kb!r} has shape {tuple(v.shape)}, "
                                 f"{source} has {tuple(shapes[kb])}; is this the adapter's base model?")
        if tied:
            for name in self.modules:
                if _leaf_in(name, WORD_EMBEDDING_NAMES):
                    outputs = [k for k in shapes if _leaf_in(k[: -len(".weight")], OUTPUT_EMBEDDING_NAMES)
                               and k.endswith(".weight")]
                    where = (f"the checkpoint also holds {_some(outputs)}, which transformers ties to it on load"
                             if outputs else "the checkpoint holds no separate output-layer tensor such as "
                                             "lm_head.weight")
                    warnings.warn(
                        f"{name}: the model ties its input embedding to its output layer (tie_word_embeddings=true "
                        f"in its config.json; {where}), so the merged {name}.weight is also the output layer's "
                        f"weight: this adapter changes the output logits too, as PEFT's merge_and_unload does "
                        f"(PEFT warns about it as well). To change the input embedding only, untie the model "
                        f"first: give the output layer its own copy of the embedding and set "
                        f"tie_word_embeddings=false in config.json", PeftMathWarning, stacklevel=3)

    def base_key(self, name: str, state: Mapping[str, Any], *, model_type: str | None = None) -> str:
        """The state-dict prefix of module ``name``: the name itself, or its checkpoint name (the out-projection
        ``X.base_layer.out_proj`` of an adapted ``nn.MultiheadAttention`` is the base model's ``X.out_proj``)."""
        if self.description.multihead_attention:
            name = base_module(name)
        if f"{name}.weight" in state:
            return name
        from .targets import module_to_checkpoint

        return module_to_checkpoint(name, model_type or self.model_type)

    def weight_keys(self, name: str, state: Mapping[str, Any], *, model_type: str | None = None) -> tuple[str, str]:
        """The state-dict keys of module ``name``'s weight and bias: ``<base_key>.weight`` / ``.bias``, or for the
        in-projection of an adapted ``nn.MultiheadAttention`` (a module ``X`` whose ``X.base_layer.out_proj`` is
        adapted too, :mod:`peftmath._mha`) ``X.in_proj_weight`` / ``X.in_proj_bias``."""
        hook = self.description.base_tensor  # a raw parameter (LoRA's target_parameters)
        found = hook(self.config, name, self.params, _shape_in(state)) if hook is not None else None
        if found is not None:
            return found
        key = self.base_key(name, state, model_type=model_type)
        if self._attention_in(name):
            return tuple(f"{key}.{leaf}" for leaf in IN_PROJ_LEAVES)  # type: ignore[return-value]
        return f"{key}.weight", f"{key}.bias"

    def _attention_in(self, name: str) -> bool:
        """Module ``name`` is the packed in-projection of an adapted ``nn.MultiheadAttention``."""
        return name in self._attention

    # --- helpers --------------------------------------------------------------------------------
    def _require_module(self, name: str) -> None:
        if name not in self.params:
            raise ShapeError(f"{name}: not adapted by this {self.peft_type} adapter; adapted modules: {_some(self.modules)}")

    def _model_type(self, model_type: str | None, model_config: Mapping[str, Any] | None) -> str | None:
        if model_type:
            return model_type
        found = model_config.get("model_type") if isinstance(model_config, Mapping) else None
        return found if isinstance(found, str) else self.model_type

    def _bind(self, name: str, weight_shape: tuple[int, ...] | None, kind: Any, *, scale: float = 1.0) -> ModuleAdapter:
        """Module ``name`` bound, with ``scale`` times :attr:`scale` applied (:meth:`scaled`)."""
        check_supported(self.config, source=f"{self.peft_type} adapter config")
        c = self._check_scale(scale, name)
        cls = self.description.module
        params = dict(self.params[name])
        layer = cls.infer_layer(name, self.config, params, weight_shape, kind)
        links = self._links.get(name)
        shared = self.shared if not links else {**self.shared, **{a: self.shared[k] for a, k in links.items()}}
        return cls(name, self.config, params, layer, shared=shared).scaled(c)

    def _two_kinds(self) -> bool:
        """True when the method adapts both nn.Linear and transformers Conv1D layers."""
        return all(self.description.supports(k) for k in TWO_D)

    def _evidence(self, name: str, weight_shape: tuple[int, ...] | None, explicit: Any, model_type: str | None,
                  *, quiet: bool = False) -> Evidence | None | object:
        """The evidence for module ``name``'s kind (:func:`peftmath.kinds.decide`), None when only the
        config's flag is left, or :data:`_NOT_2D` when its kind is not a Linear/Conv1D question."""
        recorded = self.layer_kinds.get(name)
        if self._attention_in(name) or out_proj_owner(name) in self._attention:
            given = explicit if explicit is not None else recorded
            if given is not None and LayerKind.parse(given) is not LayerKind.LINEAR:
                raise ShapeError(f"{name}: a projection of an nn.MultiheadAttention is a Linear (weight stored (out, in)), "
                                 f"not a {LayerKind.parse(given).value}; drop its layer kind")
            return Evidence(LayerKind.LINEAR, "a projection of an nn.MultiheadAttention")
        shape = tuple(int(s) for s in weight_shape) if weight_shape is not None else None
        if explicit is None and recorded is None and shape is not None and len(shape) != 2:
            return _NOT_2D
        try:
            default = self.description.module.infer_layer(name, self.config, dict(self.params[name]), shape, None)
        except PeftMathError:
            if not quiet and explicit is None and recorded is None:
                raise
            default = None
        if explicit is None and recorded is None and default is not None and default.kind not in TWO_D:
            return _NOT_2D
        square = shape is not None and len(shape) == 2 and shape[0] == shape[1]
        shape_kind = default.kind if (default is not None and shape is not None and len(shape) == 2 and not square
                                      and default.kind in TWO_D
                                      and self.description.orientation_in_tensors) else None
        ev = decide(name, explicit=explicit, recorded=recorded,
                    model_type=model_type if (default is None or default.kind in TWO_D) else None,
                    shape_kind=shape_kind, weight_shape=shape)
        if (not quiet and ev is not None and shape_kind is not None and ev.kind in TWO_D and ev.kind is not shape_kind
                and self._two_kinds()):
            raise ShapeError(
                f"{name}: {ev.source} makes it a {ev.kind.value}, but its base weight {shape} fits the adapter only "
                f"as a {shape_kind.value} (weight stored {'(out, in)' if shape_kind is LayerKind.LINEAR else '(in, out)'}); "
                f"is this the adapter's base model? Otherwise pass layer_kinds={{{name!r}: {shape_kind.value!r}}}")
        return ev

    def _kind_for(self, name: str, weight_shape: tuple[int, ...] | None, explicit: Any, model_type: str | None, *,
                  shapes: Mapping[str, Any] | None = None, explicit_all: Mapping[str, Any] | None = None) -> Any:
        """The kind to bind module ``name`` with (None: the geometry alone decides)."""
        ev = self._evidence(name, weight_shape, explicit, model_type)
        if ev is _NOT_2D:
            return None
        if ev is not None:
            return ev.kind
        return self._flag_kind([name], model_type, shapes or {name: weight_shape}, explicit_all)

    def _flag_kind(self, names: list[str], model_type: str | None, shapes: Mapping[str, Any],
                   explicit_all: Mapping[str, Any] | None) -> LayerKind:
        """The kind of the ambiguous 2-D modules ``names``: the config's flag where nothing contradicts it
        (:func:`peftmath.kinds.resolve`); a method without Conv1D layers has the Linear only."""
        if not self._two_kinds():
            return LayerKind.LINEAR
        others = {m: self._evidence(m, shapes.get(m), (explicit_all or {}).get(m), model_type, quiet=True)
                  for m in self.modules if m not in names}
        return resolve(names, fan_in_fan_out=bool(getattr(self.config, "fan_in_fan_out", False)),
                       others={m: e for m, e in others.items() if isinstance(e, Evidence)},
                       weight_shapes=shapes, peft_type=self.peft_type)

    def _module_shapes(self, state: Mapping[str, Any], model_type: str | None) -> dict[str, tuple[int, ...]]:
        """Base weight shapes of the adapted modules present in ``state``."""
        out = {}
        for m in self.modules:
            wkey, _ = self.weight_keys(m, state, model_type=model_type)
            if wkey in state:
                out[m] = tuple(state[wkey].shape)
        return out

    def _base_tensors(self, name: str, state: Mapping[str, Array], *,
                      model_type: str | None = None) -> tuple[Array, Array | None]:
        wkey, bkey = self.weight_keys(name, state, model_type=model_type)
        if wkey not in state:
            raise self._missing_weight(name, wkey, state, None, "the base state dict")
        return state[wkey], state.get(bkey)

    def _missing_weight(self, name: str, wkey: str, keys: Mapping[str, Any], tied: bool | None,
                        source: str) -> Exception:
        """The error for module ``name`` whose weight ``wkey`` is not among ``keys``."""
        partners = []
        if _leaf_in(name, OUTPUT_EMBEDDING_NAMES + WORD_EMBEDDING_NAMES):
            partners = sorted(k for k in keys if k.endswith(".weight") and k != wkey
                              and _leaf_in(k[: -len(".weight")], WORD_EMBEDDING_NAMES))
        if tied and partners:
            table = partners[0] if len(partners) == 1 else " / ".join(partners)
            shape = getattr(keys[partners[0]], "shape", keys[partners[0]])
            return UnsupportedError(
                f"{name}: this model ties {wkey} to {table} (tie_word_embeddings=true in its config.json), so the "
                f"checkpoint stores only {table}, a {tuple(shape)} table that is both the input embedding and "
                f"the output layer. Merging this adapter's {name} would change that shared table, and so the input "
                f"embedding as well (PEFT's merge_and_unload does exactly that). peftmath does not do it silently: "
                f"to change the output layer only, untie the model first (add {wkey} as a copy of {table} to the "
                f"base and set tie_word_embeddings=false in its config.json), then merge again")
        hint = ""
        if partners:
            hint = (f"; if this model ties {wkey} to {partners[0]} (tie_word_embeddings in its config.json), "
                    f"pass the model's config (model_config=) to be told what merging it would do")
        return ShapeError(
            f"{name}: adapted module has no weight {wkey!r} in {source} "
            f"(closest keys: {_some(_closest(wkey, keys))}){hint}; is this the adapter's base model?")

    def _replaced_key(self, key: str, keys: Mapping[str, Any], model_type: str | None) -> str | None:
        """The base key replacement ``key`` stands for in ``keys`` (checkpoint renames applied), or None."""
        if key in keys:
            return key
        from .targets import module_to_checkpoint

        module, _, leaf = key.rpartition(".")
        mapped = f"{module_to_checkpoint(module, model_type or self.model_type)}.{leaf}" if module else key
        return mapped if mapped in keys else None

    def _replacement_keys(self, state: Mapping[str, Any], model_type: str | None) -> dict[str, str]:
        """``{replacement key: base key}`` for every tensor the adapter replaces that ``state`` holds."""
        out = {}
        for k in self.other:
            kb = self._replaced_key(k, state, model_type)
            if kb is not None:
                out[k] = kb
        return out

    def _replacements(self, state: Mapping[str, Any], model_type: str | None) -> dict[str, Array]:
        return {kb: self.other[k] for k, kb in self._replacement_keys(state, model_type).items()}

    def _replacement(self, name: str, key: str, leaf: str, value: Array | None) -> Array | None:
        """The base tensor ``leaf`` of module ``name`` (state-dict prefix ``key``) as the adapter replaces
        it (in the base tensor's dtype), else ``value``."""
        new = self.other.get(f"{name}.{leaf}", self.other.get(f"{key}.{leaf}"))
        if new is None:
            return value
        return new if value is None else _like(new, value)

    def _bind_all(self, state: Mapping[str, Array], layer_kinds: Mapping[str, Any] | None,
                  model_type: str | None = None, *, scale: float = 1.0) -> dict:
        model_type = model_type or self.model_type
        shapes = {}
        for name in self.modules:
            weight, _ = self._base_tensors(name, state, model_type=model_type)
            shapes[name] = tuple(weight.shape)
        kinds = self.resolve_layer_kinds(shapes, layer_kinds=layer_kinds, model_type=model_type)
        bound = {}
        for name in self.modules:
            bound[name] = (self._bind(name, shapes[name], kinds[name], scale=scale),
                           *self.weight_keys(name, state, model_type=model_type))
        return bound

    def _keep_ties(self, state: Mapping[str, Array], out: dict[str, Array], bound: dict,
                   model_config: Mapping[str, Any] | None) -> None:
        """Tensors of ``state`` sharing storage with a merged input embedding refer to the merged array."""
        for name, (_, wkey, _) in bound.items():
            if not _leaf_in(name, WORD_EMBEDDING_NAMES) or out[wkey] is state[wkey]:
                continue
            for k, v in state.items():
                if k != wkey and k.endswith(".weight") and _same_storage(v, state[wkey]):
                    out[k] = out[wkey]
                    if not _ties_embeddings(model_config):
                        warnings.warn(
                            f"{name}: {k} shares its storage with {wkey} in the given state dict (tied weights), so "
                            f"it is the merged embedding too: the adapter changes that tensor as well, as PEFT's "
                            f"merge_and_unload does", PeftMathWarning, stacklevel=3)

    # --- bookkeeping --------------------------------------------------------------------------
    def num_trainable_parameters(self) -> int:
        """Trainable scalars, as PEFT's ``get_nb_trainable_parameters`` counts them: shared frozen
        projections, frozen replaced base tensors (saved embedding layers) and the method's ``frozen_suffixes``
        are not counted, its ``trainable_shared`` tensors once, ``modules_to_save`` copies and biases trained
        with ``bias="all"`` / ``"<method>_only"`` are. (VB-LoRA saved with ``save_only_topk_weights`` counts the saved
        top-k weights, not the logits they were taken from.)"""
        replaced = sum(_numel(self.other[k]) for k in self._trained_replacements())
        if self.description.count_trainable is not None:  # the method says (Lily's ties, Cartridge's frozen rows)
            return int(self.description.count_trainable(self.config, self.params, self.shared)) + replaced
        frozen = set(self.description.frozen_suffixes)
        shared = sum(_numel(v) for k, v in self.shared.items() if self.description.is_trainable_shared(k))
        return shared + sum(_numel(a) for p in self.params.values() for k, a in p.items() if k not in frozen) + replaced

    def _trained_replacements(self) -> list[str]:
        """The replaced base tensors PEFT trains: every tensor of a ``modules_to_save`` copy, and the biases
        trained with ``bias="all"`` / ``"<method>_only"`` (a saved embedding layer is a replacement too, but
        frozen)."""
        saved = getattr(self.config, "modules_to_save", None) or []
        bias = getattr(self.config, "bias", "none")
        out = []
        for k in self.other:
            module = k.rsplit(".", 1)[0]
            if ".modules_to_save." in k or ".original_module." in k:  # PEFT's duplicate bias keys (bias="all"
                continue                                                # with modules_to_save): the copy is counted
            if any(module == m or module.endswith("." + m) for m in saved) or (bias not in (None, "none")
                                                                               and k.endswith(".bias")):
                out.append(k)
        return out

    def summary(self, base: Mapping[str, Array] | None = None) -> dict[str, Any]:
        """Trainable parameters (and, given the base state, the total and the percentage, as PEFT's
        ``print_trainable_parameters``), plus one row per module: kind, parameters and the resolved
        hyper-parameters (r, alpha, scaling, ...)."""
        rows = []
        shapes = self._module_shapes(base, self.model_type) if base is not None else {}
        kinds = self.resolve_layer_kinds(shapes)
        for name in self.modules:
            mod = self._bind(name, shapes.get(name), kinds[name])
            rows.append({"module": name, "kind": mod.layer.kind.value, "parameters": mod.num_parameters(),
                         **mod.describe()})
        trainable = self.num_trainable_parameters()
        out: dict[str, Any] = {"method": self.peft_type, "trainable": trainable, "modules": rows}
        if base is not None:
            total = trainable + sum(_numel(v) for v in base.values())
            out.update(total=total, percent=100.0 * trainable / total if total else 0.0)
        return out

    def trainable_parameters_line(self, base: Mapping[str, Array]) -> str:
        """PEFT's ``print_trainable_parameters`` line for this adapter on ``base``."""
        s = self.summary(base)
        return f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || trainable%: {s['percent']:.4f}"

    def dtypes(self) -> list[str]:
        return sorted({dtype_name(a.dtype) for p in self.params.values() for a in p.values()})

    def state_dict(self, *, prefix: str = "base_model.model.") -> dict[str, Array]:
        """Tensors under PEFT's checkpoint keys (``base_model.model.<module>.<suffix>``); a replaced base
        tensor of an adapted module as ``<module>.base_layer.<name>``, where PEFT saves and loads it."""
        out = {f"{prefix}{m}.{s}": a for m, p in self.params.items() for s, a in p.items()}
        out.update(self.shared)
        inner = {base_module(m): m for m in self.params if out_proj_owner(m) in self._attention}  # X.out_proj
        for k, v in self.other.items():
            module, _, leaf = k.rpartition(".")
            module = inner.get(module, module)  # an attention's out-projection is PEFT's X.base_layer.out_proj
            # a base tensor of an adapted module lives on its wrapped base layer, as PEFT saves it
            out[f"{prefix}{module}.base_layer.{leaf}" if module in self.params else f"{prefix}{k}"] = v
        return out


def _shape_in(state: Any) -> Any:
    """``shape_of(key)`` over a state dict, a ``{key: shape}`` dict or a streamed model (its ``shape(key)``):
    the tensor's shape, or None when ``state`` lacks it."""
    def shape_of(key: str) -> tuple[int, ...] | None:
        if key not in state:
            return None
        reader = getattr(state, "shape", None)
        value = reader(key) if callable(reader) else state[key]
        return tuple(int(s) for s in getattr(value, "shape", value))
    return shape_of


def _numel(a: Any) -> int:
    n = 1
    for s in a.shape:
        n *= int(s)
    return n


def _like(value: Any, target: Any) -> Any:
    """``value`` in ``target``'s dtype (itself when it has it, or when the two are of different libraries)."""
    if value.dtype == target.dtype:
        return value
    from ._array import namespace
    from .errors import NamespaceError

    try:
        xp = namespace(value, target)
    except NamespaceError:
        return value
    return xp.astype(value, target.dtype)


def _library(xp: Any) -> str:
    """The array library of namespace ``xp`` (``"torch"``, ``"numpy"``, ``"jax"``, ``"array_api_strict"``)."""
    name = getattr(xp, "__name__", type(xp).__name__)
    if name.startswith("array_api_compat."):
        name = name[len("array_api_compat."):]
    return name.split(".")[0]


def _same_place(a: Any, xp: Any, device: Any) -> bool:
    """True when ``a`` is an array of ``xp``'s library on ``device``."""
    import array_api_compat

    from ._array import namespace

    try:
        own = namespace(a)
    except NamespaceError:
        return False
    return _library(own) == _library(xp) and array_api_compat.device(a) == device


#: how to convert one array ``v`` to a library, for the error naming a state dict of several libraries
_AS_LIBRARY = {"torch": "torch.as_tensor(v)", "numpy": "np.asarray(v)", "jax": "jnp.asarray(v)",
               "array_api_strict": "array_api_strict.asarray(v)", "cupy": "cupy.asarray(v)"}


def _mixed_error(tensors: Mapping[str, Any], where: str) -> NamespaceError:
    """The error of a state dict whose tensors this adapter reads are of several libraries or devices."""
    import array_api_compat

    from ._array import namespace

    groups: dict[str, list[str]] = {}
    for k, v in tensors.items():
        try:
            lib = _library(namespace(v))
        except NamespaceError:
            lib = type(v).__module__.split(".")[0]
        groups.setdefault(f"{lib} on {array_api_compat.device(v)}", []).append(k)
    listed = "; ".join(f"{g}: {_some(sorted(ks), 3)}" for g, ks in sorted(groups.items()))
    target = max(groups, key=lambda g: len(groups[g])).split(" on ")[0]
    conv = _AS_LIBRARY.get(target, f"{target}.asarray(v)")
    return NamespaceError(
        f"{where}: the base tensors this adapter reads are of several libraries or devices ({listed}); the "
        f"adapter follows the base weights, so they must be of one: convert the state dict first, e.g. "
        f"state = {{k: {conv} for k, v in state.items()}} (and .to(device) / device= for one device)")


def _leaf_in(module: str, names: tuple[str, ...]) -> bool:
    """True when ``module`` is one of ``names`` or ends with ``"." + name`` (names may be dotted)."""
    return any(module == n or module.endswith("." + n) for n in names)


def _ties_embeddings(model_config: Mapping[str, Any] | None) -> bool:
    """``tie_word_embeddings`` of a transformers config.json (top level, else its text_config): True only
    when the file says true."""
    if not isinstance(model_config, Mapping):
        return False
    value = model_config.get("tie_word_embeddings")
    if value is None and isinstance(model_config.get("text_config"), Mapping):
        value = model_config["text_config"].get("tie_word_embeddings")
    return value is True


def _same_storage(a: Any, b: Any) -> bool:
    """True when arrays ``a`` and ``b`` are views of the same memory (tied weights)."""
    if a is b:
        return True
    if tuple(a.shape) != tuple(b.shape):
        return False
    try:
        import numpy as np

        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            return bool(np.shares_memory(a, b))
    except ImportError:  # pragma: no cover
        pass
    ptr_a, ptr_b = getattr(a, "data_ptr", None), getattr(b, "data_ptr", None)
    if callable(ptr_a) and callable(ptr_b) and type(a) is type(b):
        return ptr_a() == ptr_b()
    return False


def _closest(key: str, state: Mapping[str, Any], n: int = 3) -> list[str]:
    import difflib

    return difflib.get_close_matches(key, list(state), n=n, cutoff=0.3)


def _some(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "") if names else "(none)"
