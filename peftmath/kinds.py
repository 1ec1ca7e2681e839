"""Is a 2-D base weight an ``nn.Linear`` or a transformers ``Conv1D``? Decided from evidence, never guessed.

An ``nn.Linear`` stores its weight as ``(out, in)``, a transformers ``Conv1D`` (GPT-2 and its relatives) as
``(in, out)``. An adapter's factors give ``(out, in)`` but not the layout, so a *square* weight fits both,
and the two readings give transposed merges. PEFT's ``fan_in_fan_out`` flag does not settle it: PEFT
rewrites the shared config's flag for every module it wraps (true for a Conv1D, false for an
``nn.Linear``), so the saved flag is the kind of the *last* module PEFT created, and in a model that mixes
the two kinds it is wrong for some modules.

The rule (:func:`decide`), for one module, the first evidence that speaks decides:

1. an explicit kind: ``layer_kinds={module: kind}`` / ``--layer-kind MODULE=KIND``;
2. the kinds recorded in the adapter (safetensors metadata ``peftmath.layer_kinds``, written by
   :func:`~peftmath.create_adapter` / :func:`~peftmath.save_adapter`);
3. the base model's transformers ``model_type``: the architectures whose modeling code builds ``Conv1D``
   layers (:data:`CONV1D_MODEL_TYPES`, checked against transformers' source by
   ``tests/parity/test_refusals_parity.py``); in those, the listed module names are Conv1D and every other
   2-D weight is a Linear;
4. the weight's shape, when only one layout fits the factors (``(out, in) != (in, out)``);
5. only then the config's ``fan_in_fan_out`` — and only when it is trustworthy: when no other module of
   the adapter, decided by 1-4, has the other kind (:func:`resolve`). Otherwise the module is ambiguous
   and :class:`~peftmath.errors.ConfigError` names it and the fix.

A method without ``fan_in_fan_out`` (LoHa, LoKr; OFT and BOFT support no Conv1D) has one 2-D kind, the Linear.

The limit of the evidence: when every module that steps 1-4 decide agrees with the flag, a square module
of the other kind cannot be seen (a PEFT checkpoint does not record it). Adapters written by peftmath
record every kind, and a transformers ``model_type`` settles every module of its architecture; for
other models, pass ``layer_kinds`` (``tests/test_kinds.py`` has a property test of exactly this limit).

>>> from peftmath.layers import LayerKind
>>> kind_from_model_type("transformer.h.0.attn.c_proj", "gpt2").value, kind_from_model_type("lm_head", "gpt2").value
('Conv1D', 'Linear')
>>> kind_from_model_type("model.layers.0.q_proj", "llama") is None
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from .errors import ConfigError
from .layers import LayerKind

__all__ = ["CONV1D_MODEL_TYPES", "Evidence", "kind_from_model_type", "decide", "resolve", "TWO_D"]

#: the 2-D kinds a weight's shape alone cannot tell apart when it is square
TWO_D = (LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED)

#: transformers 5 architectures (``model_type``) whose modeling code builds ``pytorch_utils.Conv1D``
#: layers, and the names of those layers; every other 2-D weight of these architectures is an
#: ``nn.Linear`` (lm_head, score, summary, ...). Every other architecture of transformers builds none.
CONV1D_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "openai-gpt": ("c_attn", "c_proj", "c_fc"),
    "imagegpt": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "decision_transformer": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "clvp": ("c_fc", "c_proj"),
    "clvp_decoder": ("c_fc", "c_proj"),
}


class Evidence(NamedTuple):
    """A decided kind and where it came from (for messages)."""

    kind: LayerKind
    source: str


def kind_from_model_type(module: str, model_type: str | None) -> LayerKind | None:
    """The kind ``model_type`` gives module ``module`` (a 2-D weight): Conv1D or Linear in the
    architectures of :data:`CONV1D_MODEL_TYPES`, None (no evidence) for any other ``model_type``."""
    leaves = CONV1D_MODEL_TYPES.get(model_type or "")
    if leaves is None:
        return None
    return LayerKind.CONV1D_TRANSPOSED if module.rsplit(".", 1)[-1] in leaves else LayerKind.LINEAR


def decide(
    module: str,
    *,
    explicit: LayerKind | str | None = None,
    recorded: LayerKind | str | None = None,
    model_type: str | None = None,
    shape_kind: LayerKind | None = None,
    weight_shape: tuple[int, ...] | None = None,
) -> Evidence | None:
    """Steps 1-4 of the rule for one 2-D module: the first evidence, or None when only the config's
    flag is left. ``shape_kind`` is the kind the weight's shape allows when it allows only one."""
    if explicit is not None:
        return Evidence(LayerKind.parse(explicit), "the kind given for it (layer_kinds)")
    if recorded is not None:
        return Evidence(LayerKind.parse(recorded), "the kind recorded in the adapter (peftmath.layer_kinds)")
    by_type = kind_from_model_type(module, model_type)
    if by_type is not None:
        return Evidence(by_type, f"the model_type {model_type!r}")
    if shape_kind is not None:
        return Evidence(shape_kind, f"its base weight {tuple(weight_shape or ())}, which fits only "
                                    f"{'(out, in)' if shape_kind is LayerKind.LINEAR else '(in, out)'}")
    return None


def resolve(
    modules: str | Sequence[str],
    *,
    fan_in_fan_out: bool,
    others: Mapping[str, Evidence | None],
    weight_shapes: Mapping[str, tuple[int, ...] | None] | None = None,
    peft_type: str = "LORA",
) -> LayerKind:
    """Step 5: the kind of the ambiguous 2-D ``modules`` from the config's ``fan_in_fan_out``, unless a
    module of ``others`` (their evidence from :func:`decide`) has the other kind; then a
    :class:`~peftmath.errors.ConfigError` names every ambiguous module and the fix.

    >>> from peftmath.layers import LayerKind
    >>> resolve("a", fan_in_fan_out=True, others={"b": Evidence(LayerKind.CONV1D_TRANSPOSED, "shape")}).value
    'Conv1D'
    >>> resolve("a", fan_in_fan_out=True, others={"b": Evidence(LayerKind.LINEAR, "its shape")})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    peftmath.errors.ConfigError: a: ...
    """
    names = [modules] if isinstance(modules, str) else sorted(modules)
    flag_kind = LayerKind.CONV1D_TRANSPOSED if fan_in_fan_out else LayerKind.LINEAR
    against = sorted((m, ev) for m, ev in others.items()
                     if m not in names and ev is not None and ev.kind in TWO_D and ev.kind is not flag_kind)
    if not against:
        return flag_kind
    shown = "; ".join(f"{m} is a {ev.kind.value} by {ev.source}" for m, ev in against[:3])
    more = f" (and {len(against) - 3} more)" if len(against) > 3 else ""
    shapes = [(weight_shapes or {}).get(m) for m in names]
    if all(shapes):
        what = (f"its base weight {tuple(shapes[0])} is square" if len(names) == 1 else
                f"their base weights ({', '.join(str(tuple(x)) for x in shapes)}) are square")
    else:
        what = "no base weight shape was given"
    which = ("this module is an nn.Linear or a transformers Conv1D" if len(names) == 1 else
             "these modules are nn.Linear or transformers Conv1D layers")
    kinds = ", ".join(f"{m!r}: 'Linear'" for m in names)
    flags = " ".join(f"--layer-kind {m}=Linear" for m in names)
    raise ConfigError(
        f"{', '.join(names)}: cannot tell whether {which}: {what}, so both layouts fit the adapter, and the "
        f"config's fan_in_fan_out={str(fan_in_fan_out).lower()} cannot decide, because PEFT rewrites that flag "
        f"for every module it wraps (it is the kind of the last one) and this {peft_type} adapter has modules "
        f"of the other kind: {shown}{more}. Say which {'it is' if len(names) == 1 else 'each is'}: "
        f"layer_kinds={{{kinds}}} ('Linear' or 'Conv1D'), {flags} on the command line, or give the base "
        f"model's model_type when it is a transformers architecture"
    )
