"""Row blocks: which methods merge a block of a weight's output rows on their own, and that merge.

A 2-D ``nn.Linear`` weight ``W`` is stored ``(out, in)``: row ``i`` is output feature ``i``. For many methods
the merged row ``i`` depends only on row ``i`` of ``W`` and on parameters indexed by ``i`` (or on none):

=========  =============================================================================================
method     why rows are independent (block ``[r0, r1)``)
=========  =============================================================================================
LORA       ``W'[i] = W[i] + s·B[i]·A``: ``lora_B`` (and ``lora_B.bias``) sliced, ``lora_A`` whole. DoRA:
           the weight norm is ``‖W[i] + s·B[i]·A‖`` per output row, and ``m[i]`` (``lora_magnitude_vector``)
           is per row, so a block's norms are the block's own.
ADALORA    ``W'[i] = W[i] + B[i]·(E ⊙ A)·s/ranknum``: ``lora_B`` sliced, ``lora_A``, ``lora_E`` whole.
VERA       ``W'[i] = W[i] + λ_b[i]·B_l[i]·diag(λ_d)·A_l``: ``vera_lambda_b`` and the shared ``vera_B`` sliced.
IA3        not feedforward: ``W'[i] = l[i]·W[i]`` (``ia3_l`` (out, 1) sliced); feedforward:
           ``W'[i] = W[i] ⊙ l`` (``ia3_l`` (1, in) whole).
LOHA       ``ΔW[i] = (w1a[i]·w1b) ⊙ (w2a[i]·w2b)·s``: ``hada_w1_a``, ``hada_w2_a`` sliced.
OFT        ``W'[i] = W[i]·Rᵀ`` (the rotation acts on the input axis): ``oft_R`` whole.
BOFT       ``W'[i] = s[i]·(W[i]·Rᵀ)``: ``boft_R`` whole, ``boft_s`` (out, 1) sliced.
LOKR       ``ΔW = s·kron(w1, w2)``, ``w1`` (a, c), ``w2`` (b, d): rows ``[i·b, (i+1)·b)`` use row ``i`` of ``w1``
           (or ``w1_a``) and all of ``w2``; blocks start at multiples of ``b`` (:func:`row_alignment`).
=========  =============================================================================================

The additive methods give the NumPy merge's bits exactly (the gemm of each row does not depend on the
block); OFT and BOFT multiply a block by the rotation, whose BLAS blocking may differ from the whole
matrix's in the last bit (measured: 3e-8 on unit-scale float32 weights).

Refused (:class:`~peftmath.errors.UnsupportedError`, the reason named): :data:`NOT_ROW_LOCAL`, and every
method not in :data:`ROW_LOCAL`. Only the ``Linear`` layer kind is blocked (and ``Embedding`` for plain LoRA,
whose stored rows are tokens: ``ΔW[t] = s·(B·A[:, t])ᵀ``, ``lora_embedding_A`` sliced by columns); a
``Conv1D`` (``fan_in_fan_out``) stores its output axis as columns.

The proposed per-method field of :class:`peftmath.methods.Method` (kept here until the contract has it):
``row_blocks: RowRule | None`` (which parameters are sliced with the rows, which are used whole; None:
rows are not independent, with ``row_blocks_why``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ..methods.lora import TRAINING_STATE as _LORA_TRAINING_STATE

__all__ = ["RowRule", "ROW_LOCAL", "NOT_ROW_LOCAL", "row_rule", "rows_module", "merge_rows", "describe", "row_alignment"]


@dataclass(frozen=True)
class RowRule:
    """How a method's module is restricted to output rows ``[r0, r1)`` of a Linear weight: ``rows``:
    parameters sliced along their first axis with the weight's rows; ``whole``: parameters every block uses
    as they are; ``shared_rows``: shared tensors (by checkpoint key) sliced the same way; ``why``: the formula
    that makes the rows independent. ``ia3`` marks IA3's vector, sliced only when it is ``(out, 1)``."""

    rows: tuple[str, ...]
    whole: tuple[str, ...] = ()
    shared_rows: tuple[str, ...] = ()
    why: str = ""
    embedding: bool = False  # an Embedding layer too (plain LoRA: lora_embedding_A sliced by columns)
    kron: bool = False  # LoKr: rows come in groups of b = out / a (one row of w1 each); the geometry is rebound


ROW_LOCAL: dict[str, RowRule] = {
    # VeLoRA's / MonteCLoRA's training state takes no part in the merge: passed whole, unused
    "LORA": RowRule(rows=("lora_B.weight", "lora_B.bias", "lora_magnitude_vector"),
                    whole=("lora_A.weight", *(k for _, keys in _LORA_TRAINING_STATE.values() for k in keys)),
                    why="W'[i] = W[i] + s·B[i]·A; DoRA's weight norm and magnitude are per output row",
                    embedding=True),
    "ADALORA": RowRule(rows=("lora_B",), whole=("lora_A", "lora_E"), why="W'[i] = W[i] + B[i]·(E ⊙ A)·s/ranknum"),
    "VERA": RowRule(rows=("vera_lambda_b",), whole=("vera_lambda_d",), shared_rows=("base_model.vera_B",),
                    why="W'[i] = W[i] + λ_b[i]·vera_B[i]·diag(λ_d)·vera_A"),
    "IA3": RowRule(rows=("ia3_l",), why="W'[i] = l[i]·W[i] (feedforward: W[i] ⊙ l, l whole)"),
    "LOHA": RowRule(rows=("hada_w1_a", "hada_w2_a"), whole=("hada_w1_b", "hada_w2_b"),
                    why="ΔW[i] = (w1a[i]·w1b) ⊙ (w2a[i]·w2b)·s"),
    "LOKR": RowRule(rows=("lokr_w1", "lokr_w1_a"), whole=("lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
                    why="ΔW = s·kron(w1, w2): rows [i·b, (i+1)·b) use row i of w1 and all of w2 (b = out / a rows "
                        "of w2), so blocks start at multiples of b", kron=True),
    "OFT": RowRule(rows=(), whole=("oft_R.weight",), why="W'[i] = W[i]·Rᵀ: the rotation acts on the input axis"),
    "BOFT": RowRule(rows=("boft_s",), whole=("boft_R",), why="W'[i] = s[i]·W[i]·Rᵀ: the rotation acts on the input axis"),
}

#: methods whose merged rows depend on other rows, with the reason (refused by name)
NOT_ROW_LOCAL: dict[str, str] = {
    "FOURIERFT": "ΔW is a 2-D inverse DFT of the sparse spectrum: every row depends on every coefficient",
    "WAVEFT": "ΔW is a 2-D inverse wavelet transform: every row depends on coefficients of other rows",
    "OSF": "the merge recomputes an SVD of the whole base weight: every row depends on every other row",
    "ROAD": "RoAd rotates pairs of output features (i, i + out/2), which lie in different row blocks",
}


def row_rule(mod: Any) -> RowRule:
    """The :class:`RowRule` of bound module ``mod``, or :class:`UnsupportedError` naming the method and why."""
    kind = mod.layer.kind
    rule = ROW_LOCAL.get(mod.peft_type)
    if rule is None:
        why = NOT_ROW_LOCAL.get(mod.peft_type, "it is not described as row-local in peftmath.engines.rows.ROW_LOCAL")
        raise UnsupportedError(f"{mod.name}: a {mod.peft_type} module cannot be merged in blocks of output rows: "
                               f"{why}; merge the whole tensor (Adapter.merge, or the dask generic path)")
    if kind is not LayerKind.LINEAR and not (rule.embedding and kind is LayerKind.EMBEDDING):
        raise UnsupportedError(f"{mod.name}: blockwise merge supports Linear weights (and Embedding for LoRA); this "
                               f"{mod.peft_type} module's layer is {kind.value}")
    if kind is LayerKind.EMBEDDING and "lora_magnitude_vector" in mod.params:
        raise UnsupportedError(f"{mod.name}: DoRA on an Embedding normalises each embedding dimension over all "
                               f"tokens (the stored rows), so a block of rows is not independent; merge it whole")
    known = set(rule.rows) | set(rule.whole) | ({"lora_embedding_A", "lora_embedding_B"} if rule.embedding else set())
    extra = sorted(set(mod.params) - known)
    if extra:
        raise UnsupportedError(f"{mod.name}: the {mod.peft_type} parameters {extra} are not described as row-local "
                               f"(peftmath.engines.rows); merge the whole tensor")
    return rule


def row_alignment(mod: Any) -> int:
    """Row blocks of ``mod`` start (and end, but for the last) at multiples of this: ``b = out / a`` for LoKr
    (one row of ``w1`` per ``b`` rows), 1 for the other methods of :data:`ROW_LOCAL`."""
    return int(mod.geometry.b) if row_rule(mod).kron else 1


def rows_module(mod: Any, r0: int, r1: int) -> Any:
    """Bound module ``mod`` restricted to output rows ``[r0, r1)`` of its weight: a module of the same class
    over a ``(r1 - r0, in)`` layer whose row parameters are sliced (views, no copy), validated again, with a
    scale applied by ``ADAPTER:SCALE`` kept (``ModuleAdapter.scale_scaling``)."""
    rule = row_rule(mod)
    out = mod.layer.weight_shape[0]
    if not 0 <= r0 < r1 <= out:
        raise ShapeError(f"{mod.name}: row block [{r0}, {r1}) outside the weight's {out} rows")
    unit = row_alignment(mod)
    if r0 % unit or (r1 % unit and r1 != out):
        raise ShapeError(f"{mod.name}: a {mod.peft_type} row block must start and end at multiples of {unit} rows "
                         f"(got [{r0}, {r1}))")
    params = {}
    for k, v in mod.params.items():
        if mod.layer.kind is LayerKind.EMBEDDING and k == "lora_embedding_A":
            params[k] = v[:, r0:r1]  # (r, num_embeddings): a token's delta uses its column
        elif k in rule.rows and rule.kron:
            params[k] = v[r0 // unit:r1 // unit]  # w1's rows: one per b rows of the weight
        elif k in rule.rows and not (mod.peft_type == "IA3" and int(v.shape[0]) != out):
            params[k] = v[r0:r1]
        else:
            params[k] = v
    shared = {k: (v[r0:r1] if k in rule.shared_rows else v) for k, v in (mod.shared or {}).items()}
    sub = object.__new__(type(mod))  # a shallow copy (a module class may define __new__)
    sub.__dict__.update(mod.__dict__)
    sub.params, sub.shared = params, shared
    sub.layer = Layer.of((r1 - r0, *mod.layer.weight_shape[1:]), mod.layer.kind)
    if rule.kron:  # LoKr's validate() derives the geometry from the config and the whole layer: rebind it
        sub.geometry = dataclasses.replace(mod.geometry, a=(r1 - r0) // unit)
        return sub
    sub.validate()
    if "scaling" in mod.__dict__:  # a scale applied after binding (ADAPTER:SCALE) survives validate()
        sub.scaling = mod.scaling
    return sub


def merge_rows(mod: Any, block: Any, r0: int, *, peft_compat: bool = False, unmerge: bool = False,
               record: Any = None, copy: bool = True) -> Any:
    """Rows ``[r0, r0 + len(block))`` of ``mod``'s merged (``unmerge``: unmerged) weight, from the same rows of
    the base weight ``block``, through the method's own in-place kernel on a private copy of the block (the
    caller's block is never written). Returns the merged block (same namespace and dtype as ``block``).
    ``copy=False``: merged in ``block`` itself, which must be writeable in place (the method's
    :class:`~peftmath.errors.UnsupportedError` otherwise; :func:`peftmath.io.stream.transform` merges the
    float32 tiles of a bfloat16 weight this way)."""
    import array_api_compat

    xp = array_api_compat.array_namespace(block)
    sub = rows_module(mod, r0, r0 + int(block.shape[0]))
    if not copy:
        w = block
    elif array_api_compat.is_numpy_array(block):  # a C-ordered private copy: the in-place kernels' layout
        import numpy as np

        w = np.array(block, order="C", copy=True)
    else:
        w = xp.asarray(block, copy=True)
    if unmerge:
        res = sub.unmerge(w, None, record=record, copy=False, peft_compat=peft_compat)
    else:
        res = sub.merge(w, None, copy=False, peft_compat=peft_compat)
    return res.weight


def describe(table: Mapping[str, RowRule] = ROW_LOCAL) -> dict[str, str]:
    """``{method: why its rows are independent}``, and for the refused ones ``"refused: why"``."""
    return {**{m: r.why for m, r in table.items()}, **{m: f"refused: {w}" for m, w in NOT_ROW_LOCAL.items()}}
