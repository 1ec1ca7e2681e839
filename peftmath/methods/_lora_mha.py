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
  3. PEFT 0.21.2's ``lora.MultiheadAttention.merge`` writes ``W_out + ΔW_out`` into the out-projection and then
     calls the inner ``lora.Linear.merge``, which adds ``ΔW_out`` again: its merged weight, and its forward (which
     merges, runs the attention, unmerges), use ``W_out + 2·ΔW_out`` (open PEFT pull request #3774 removes the
     second addition). The inner layer's own ``get_delta_weight`` and forward are ``ΔW_out``. peftmath's default
     is LoRA's ``W_out + ΔW_out`` and warns when it merges or unmerges; ``peft_compat=True`` gives PEFT
     0.21.2's numbers (``s → 2s`` for this module in merge, unmerge, delta and forward).
"""

from __future__ import annotations

import warnings
from typing import Any

from .._mha import out_proj_owner
from ..errors import PeftMathWarning, UnsupportedError
from ._base import MergeResult
from .lora import LoraModule

Array = Any

__all__ = ["AttentionOutModule", "PEFT_OUT_PROJ_FACTOR"]

#: how many times PEFT 0.21.2's lora.MultiheadAttention adds the out-projection's ΔW (merge and forward)
PEFT_OUT_PROJ_FACTOR = 2.0

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
    Linear ``(E, E)``): LoRA's math with the attention's ``r`` / ``alpha``; ``peft_compat=True`` counts ``ΔW``
    twice as PEFT 0.21.2 does (see the module docstring)."""

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

    @property
    def pattern_name(self) -> str:
        """The attention ``X``: PEFT creates its out-projection's LoRA with ``X``'s ``r`` and ``lora_alpha``."""
        return out_proj_owner(self.name) or self.name

    def _as_peft(self, peft_compat: bool) -> "AttentionOutModule":
        return self.scale_scaling(PEFT_OUT_PROJ_FACTOR) if peft_compat else self  # type: ignore[return-value]

    def _warn(self, what: str) -> None:
        # one text for every attention (no module name): Python's default filter shows it once per merge call site
        warnings.warn(
            f"the out-projection of an nn.MultiheadAttention (module X.base_layer.out_proj): PEFT 0.21.2 applies its "
            f"LoRA twice (W + 2·s·B·A, in merge_and_unload and in its forward); peftmath's {what} uses LoRA's s·B·A "
            f"once. Pass peft_compat=True (--peft-compat) for PEFT 0.21.2's numbers (specs/lora.md, 12)",
            PeftMathWarning, stacklevel=4)

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        """``s·B_o A_o`` (``peft_compat=True``: ``2s·B_o A_o``, what PEFT 0.21.2 adds to the out-projection)."""
        return LoraModule.delta_weight(self._as_peft(peft_compat), peft_compat=peft_compat)

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        if not peft_compat:
            self._warn("merge")
        return LoraModule.merge(self._as_peft(peft_compat), weight, bias, copy=copy, safe=safe, peft_compat=peft_compat)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        if not peft_compat:
            self._warn("unmerge")
        return LoraModule.unmerge(self._as_peft(peft_compat), weight, bias, record=record, copy=copy,
                                  peft_compat=peft_compat)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, **layer_kwargs: Any) -> Array:
        """The out-projection's adapted forward ``x (W + ΔW)ᵀ + b`` (``peft_compat=True``: ``2ΔW``, as inside PEFT
        0.21.2's attention forward)."""
        return LoraModule.forward(self._as_peft(bool(layer_kwargs.get("peft_compat", False))), x, weight, bias,
                                  **layer_kwargs)
