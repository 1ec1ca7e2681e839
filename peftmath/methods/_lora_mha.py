"""LoRA on torch's ``nn.MultiheadAttention``: the out-projection's module (specs/lora.md, 12, "nn.MultiheadAttention").

PEFT 0.21.2 adapts an attention ``X`` (packed q/k/v, ``E = embed_dim``) with two plain LoRAs that share ``X``'s
``r`` and ``lora_alpha`` (:mod:`peftmath._mha` names them):

* ``X`` on the packed in-projection ``W_in = X.in_proj_weight (3E, E)``: ``ΔW_in = s·B A``, ``A (r, E)``,
  ``B (3E, r)``. It is an ordinary :class:`~peftmath.methods.lora.LoraModule` on a Linear ``(3E, E)`` (the
  adapter maps it to ``X.in_proj_weight`` / ``X.in_proj_bias``).
* ``X.base_layer.out_proj`` on ``W_out = X.out_proj.weight (E, E)``: ``ΔW_out = s·B_o A_o``, ``A_o (r, E)``,
  ``B_o (E, r)``: :class:`AttentionOutModule` here, LoRA with three differences:

  1. ``rank_pattern`` / ``alpha_pattern`` are matched against ``X``, not against its own name (PEFT builds the
     inner Linear with the attention's ``r`` and ``lora_alpha``);
  2. the LoRA variants PEFT refuses on an attention (DoRA, VeLoRA, KaSA, aLoRA), those it does not run there
     (BD-LoRA, MonteCLoRA) and ``lora_bias`` (PEFT trains ``lora_B.bias`` of the in-projection but never applies
     it) are refused, naming the attention;
  3. the out-projection's change counts twice: ``W_out + 2·ΔW_out`` (:data:`PEFT_OUT_PROJ_FACTOR`) in merge,
     unmerge, :meth:`~AttentionOutModule.delta_weight` and forward, by default (``peft_compat`` only picks PEFT's
     rounding order, as for any LoRA).

Why twice: the project follows PEFT where PEFT's choice defines what a checkpoint means. PEFT 0.21.2's
``lora.MultiheadAttention.merge`` writes ``W_out + ΔW_out`` into the out-projection and then calls the inner
``lora.Linear.merge``, which adds ``ΔW_out`` again (its unmerge subtracts both); its forward merges, runs the
attention and unmerges, so an attention adapter was *trained* and evaluated with ``W_out + 2·s·B_o A_o``, and
``merge_and_unload`` gives that same model. That is the model the checkpoint means. Two numbers of PEFT's say
``ΔW_out`` once: the inner ``lora.Linear.get_delta_weight`` and the inner Linear's own forward
``x (W_out + ΔW_out)ᵀ + b``, which the attention never calls (torch's attention reads ``out_proj.weight``). Open
PEFT pull request #3774 removes the second addition: a checkpoint trained with a PEFT that has it means
``W_out + ΔW_out``; peftmath follows 0.21.2, and warns (:class:`~peftmath.errors.PeftMathWarning`) when the
adapter's ``peft_version`` is newer than 0.21.2.
"""

from __future__ import annotations

import warnings
from typing import Any

from .._mha import out_proj_owner
from .._peft_tables import PEFT_VERSION
from ..errors import PeftMathWarning, UnsupportedError
from ._base import MergeResult
from .lora import LoraModule
from .oft import _version_tuple

Array = Any

__all__ = ["AttentionOutModule", "PEFT_OUT_PROJ_FACTOR", "initialize"]

#: how many times PEFT 0.21.2's lora.MultiheadAttention adds the out-projection's ``s·B_o A_o`` (merge, unmerge and
#: its forward, in training and inference): peftmath's out-projection change, default and ``peft_compat`` alike
PEFT_OUT_PROJ_FACTOR = 2.0

#: the PEFT whose meaning of an attention checkpoint peftmath follows
_PEFT_VERSION = _version_tuple(PEFT_VERSION)

#: config fields of the LoRA variants refused on an attention, with what PEFT does with them there
_VARIANTS = {
    "use_dora": "DoRA (PEFT refuses it on nn.MultiheadAttention)",
    "velora_config": "VeLoRA (PEFT refuses it on nn.MultiheadAttention)",
    "kasa_config": "KaSA (PEFT refuses it on nn.MultiheadAttention)",
    "alora_invocation_tokens": "aLoRA (PEFT refuses it on nn.MultiheadAttention)",
    "use_bdlora": "BD-LoRA (PEFT runs it on the inner out_proj Linear only, not on the in-projection)",
    "monteclora_config": "MonteCLoRA (PEFT does not run it on the in-projection)",
    "lora_bias": "lora_bias (PEFT trains the in-projection's lora_B.bias but never applies it)",
}


class AttentionOutModule(LoraModule):
    """LoRA on the out-projection ``X.base_layer.out_proj`` of an adapted ``nn.MultiheadAttention`` ``X`` (a
    Linear ``(E, E)``): LoRA's math with the attention's ``r`` / ``alpha`` and the change counted twice,
    ``ΔW_out = 2·s·B_o A_o``, as PEFT 0.21.2 trains, runs and merges it (see the module docstring).

    :attr:`scaling` stays the config's ``s`` (what :meth:`describe` reports and what a combination of the stored
    factors scales); the factor :data:`PEFT_OUT_PROJ_FACTOR` is applied by :meth:`delta_weight`, :meth:`merge`,
    :meth:`unmerge` and :meth:`forward`. Code that reads the factors and :attr:`scaling` directly (a ΔW norm
    from ``s·B A``, a mixed batch, a combination through the dense ``ΔW``) multiplies / divides by
    :attr:`change_factor`."""

    #: the change this module adds is ``change_factor · scaling · B A`` (PEFT 0.21.2's doubled out-projection)
    change_factor = PEFT_OUT_PROJ_FACTOR

    def validate(self) -> None:
        owner = out_proj_owner(self.name)
        cfg = self.config
        on = [what for field_name, what in _VARIANTS.items()
              if (getattr(cfg, field_name, None) not in (None, False, {}))]
        if "lora_magnitude_vector" in self.params and not cfg.use_dora:
            on.append("DoRA (lora_magnitude_vector; PEFT refuses it on nn.MultiheadAttention)")
        if "lora_B.bias" in self.params and not cfg.lora_bias:
            on.append("lora_bias (lora_B.bias; PEFT never applies the in-projection's)")
        if on:
            raise UnsupportedError(
                f"{self.name}: the out-projection of the nn.MultiheadAttention {owner} with {'; '.join(on)}: peftmath "
                f"implements plain LoRA (and rsLoRA) on an attention, the layout PEFT 0.21.2 merges; retrain without it")
        super().validate()
        _warn_if_newer(getattr(cfg, "peft_version", None))

    @property
    def pattern_name(self) -> str:
        """The attention ``X``: PEFT creates its out-projection's LoRA with ``X``'s ``r`` and ``lora_alpha``."""
        return out_proj_owner(self.name) or self.name

    def _doubled(self) -> "AttentionOutModule":
        return self.scale_scaling(self.change_factor)  # type: ignore[return-value]

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        """``ΔW_out = 2s·B_o A_o``: what PEFT 0.21.2 adds to the out-projection (its inner Linear's
        ``get_delta_weight`` reports half of it). ``peft_compat=True``: PEFT's rounding order."""
        return LoraModule.delta_weight(self._doubled(), peft_compat=peft_compat)

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        """``W_out + 2s·B_o A_o``, PEFT 0.21.2's ``merge_and_unload`` (``peft_compat=True``: its rounding order)."""
        return LoraModule.merge(self._doubled(), weight, bias, copy=copy, safe=safe, peft_compat=peft_compat)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        """``W_out' − 2s·B_o A_o``, the inverse of :meth:`merge` (PEFT 0.21.2's unmerge subtracts both additions)."""
        return LoraModule.unmerge(self._doubled(), weight, bias, record=record, copy=copy, peft_compat=peft_compat)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        """The out-projection as PEFT 0.21.2's attention applies it: ``x (W_out + 2s·B_o A_o)ᵀ + b``, the same
        with or without ``peft_compat``. (PEFT's inner ``lora.Linear`` called on its own gives
        ``x (W_out + s·B_o A_o)ᵀ + b``, a forward the attention never runs.)"""
        return LoraModule.forward(self._doubled(), x, weight, bias, **layer_kwargs)


def initialize(name: str, config: Any, embed_dim: int, *, seed: Any = 0, xp: Any = None, device: Any = None,
               init: Any = None) -> dict[str, Array]:
    """Fresh ``lora_A`` / ``lora_B`` of module ``name`` of an adapted ``nn.MultiheadAttention`` ``X`` (``name`` is
    ``X``, the packed in-projection ``(3E, E)``, or ``X.base_layer.out_proj``, the out-projection ``(E, E)``), as
    PEFT 0.21.2's ``lora.MultiheadAttention`` creates them: plain LoRA's ``update_layer`` with ``X``'s ``r`` and
    ``lora_alpha`` (``rank_pattern`` / ``alpha_pattern`` matched against ``X``), float32, drawn on the host from
    ``seed`` (``init`` overrides ``config.init_lora_weights``)::

        True          A (r, E) ~ U(±1/√E) (kaiming-uniform a=√5), B = 0     no-op
        "gaussian"    A ~ N(0, (1/r)²), B = 0                              no-op
        False         A ~ U(±1/√E), B ~ U(±1/√r) (nn.Linear's init)         not a no-op

    Refused (:class:`UnsupportedError`, naming the attention): the LoRA variants and ``lora_bias`` (as
    :class:`AttentionOutModule` refuses them when it reads a checkpoint), and the inits that need the module's
    ``weight`` or data (PEFT's in-projection has no ``weight`` and fails on them)."""
    from ..layers import Layer
    from .lora import init_weights

    owner = out_proj_owner(name) or name
    on = [what for field_name, what in _VARIANTS.items() if getattr(config, field_name, None) not in (None, False, {})]
    how = config.init_lora_weights if init is None else init
    if how not in (True, False, "gaussian"):
        on.append(f"init_lora_weights={how!r} (PEFT's in-projection has no weight to run it on and fails)")
    if on:
        raise UnsupportedError(f"{name}: the nn.MultiheadAttention {owner} with {'; '.join(on)}: peftmath creates plain "
                               f"LoRA (and rsLoRA) on an attention with init_lora_weights true, false or 'gaussian'")
    r, _ = config.rank_and_alpha(owner)
    shape = (embed_dim, embed_dim) if owner != name else (3 * embed_dim, embed_dim)
    res = init_weights(Layer.of(shape), r, init_lora_weights=how, seed=seed, xp=xp, device=device)
    return {"lora_A.weight": res.A, "lora_B.weight": res.B}


def _warn_if_newer(version: str | None) -> None:
    """A :class:`PeftMathWarning` when ``peft_version`` (PEFT's ``0.22.0`` or ``0.22.0.dev0@<commit>``) is newer
    than 0.21.2: such a PEFT may count the out-projection's change once (open PEFT pull request #3774)."""
    if version is None or _version_tuple(str(version).partition("@")[0]) <= _PEFT_VERSION:
        return
    # one text per version (no module name): Python's default filter shows it once, not once per attention
    warnings.warn(
        f"an adapter saved by PEFT {version} (newer than 0.21.2) adapts an nn.MultiheadAttention: peftmath counts "
        f"its out-projection's LoRA change twice (W + 2·s·B·A), as PEFT 0.21.2 trains, runs and merges it; open "
        f"PEFT pull request #3774 counts it once. If the PEFT that trained this adapter has that change, its "
        f"out-projections differ from peftmath's by s·B·A (specs/lora.md, 12)",
        PeftMathWarning, stacklevel=3)
