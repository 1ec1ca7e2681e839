r"""Trainable tokens: train a few rows of an embedding table, replace them on merge (PEFT's ``TRAINABLE_TOKENS``).

PEFT's ``TrainableTokensConfig`` makes the rows ``token_indices`` of an embedding table trainable and leaves
every other row frozen: a new token (after resizing the vocabulary) or a re-trained one costs ``D`` numbers,
not the whole ``V × D`` table. The checkpoint holds the new rows themselves, not a difference::

    trainable_tokens_delta: (k, D)      W: (V, D)      token_indices: k integers in [0, V)

    merge:    W'[t_j] = delta_j   (rounded to W's dtype),   every other row of W' is W's row, bit for bit
    forward:  Embedding   y = W'[ids]  (times embed_scale for scaled embeddings)
              Linear      y = x W'ᵀ + b  (a tied lm_head (V, D): its rows are tokens too)

Merging *replaces* rows (PEFT's ``index_copy``), so the change ``W' − W`` depends on ``W``: there is no
standalone delta weight. PEFT keeps the original rows in a buffer it never saves; here merge returns them
as its record, and unmerge needs that record (:class:`~peftmath.errors.NotInvertibleError` without it).
The spec is ``specs/trainable_tokens.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import array_api_compat
import numpy as np

from .._array import as_compute, namespace, refuse_where
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_flags
from ..errors import ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._base import MergeResult, ModuleAdapter, check_shape, layer_of_weight_shape, require_kind, write_weight
from ._contract import Method

Array = Any

__all__ = ["TrainableTokensConfig", "TokenRows", "init_rows", "replace_rows", "merged_weight", "forward",
           "TrainableTokensModule"]

PEFT_TYPE = "TRAINABLE_TOKENS"
_KEY = "trainable_tokens_delta"
SUPPORTED_KINDS = (LayerKind.EMBEDDING, LayerKind.LINEAR)
#: TunerConfig fields that PEFT's TrainableTokensConfig does not have
_NOT_PEFT_FIELDS = ("exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern")


# --------------------------------------------------------------------------------------------------
# Config (specs/trainable_tokens.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainableTokensConfig(TunerConfig):
    """PEFT's ``TrainableTokensConfig`` (``peft_type: "TRAINABLE_TOKENS"``): ``token_indices`` (the trained
    rows), ``target_modules``, ``init_weights``. PEFT's config has no ``exclude_modules`` /
    ``modules_to_save`` / ``layers_to_transform`` / ``layers_pattern``: they must stay unset and are left out of
    the written config. ``target_modules`` null means PEFT's default, the model's input embedding; PEFT writes
    the resolved name into the saved config."""

    peft_type: ClassVar[str] = PEFT_TYPE
    absent_fields: ClassVar[tuple[str, ...]] = _NOT_PEFT_FIELDS

    token_indices: list[int] = field(default_factory=list)
    init_weights: bool = True

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        check_flags(source, self, "init_weights")
        idx = self.token_indices
        if not isinstance(idx, (list, tuple)) or any(not isinstance(i, int) or isinstance(i, bool) for i in idx):
            raise ConfigError(f"{source}: field 'token_indices' must be a list of integers (token ids), got {idx!r}")
        negative = [i for i in idx if i < 0]
        if negative:
            raise ConfigError(f"{source}: field 'token_indices' holds negative token ids {negative[:8]}; token ids "
                              f"are rows 0..V-1 of the embedding table (PEFT's index_copy refuses them too)")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["token_indices"] = list(self.token_indices)
        return out


def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "TRAINABLE_TOKENS", SUPPORTED_KINDS,
                 peft="PEFT's layer reads the rows of an nn.Embedding or of a (tied) nn.Linear output layer")


# --------------------------------------------------------------------------------------------------
# Parameters and token indices (specs/trainable_tokens.md, "2. Parameters")
# --------------------------------------------------------------------------------------------------
class TokenRows:
    """The token indices of one module, checked against a table of ``vocab`` rows, on the host.

    ``unique`` are the distinct indices, sorted; ``first[j]`` the position in ``token_indices`` (and in the
    ``(k, D)`` delta) of the first occurrence of ``unique[j]``; ``repeats`` the ``(position, first position)``
    pairs of the later occurrences of a repeated index (their delta rows must equal the first's).

    >>> t = TokenRows([5, 1, 5, 3], 8, "emb")
    >>> t.unique.tolist(), t.first.tolist(), t.repeats
    ([1, 3, 5], [1, 3, 0], [(2, 0)])
    >>> TokenRows([2, 8], 8, "emb")
    Traceback (most recent call last):
    ...
    peftmath.errors.ShapeError: emb: token index 8 (token_indices[1]) is outside the table of V = 8 rows ...
    """

    def __init__(self, token_indices: Any, vocab: int, where: str) -> None:
        idx = np.asarray(list(token_indices), dtype=np.int64).reshape(-1)
        bad = np.flatnonzero((idx < 0) | (idx >= vocab))
        if bad.size:
            j = int(bad[0])
            raise ShapeError(f"{where}: token index {int(idx[j])} (token_indices[{j}]) is outside the table of V = "
                             f"{vocab} rows (valid ids 0..{vocab - 1}); does the adapter belong to this base model "
                             f"(its vocabulary size)?")
        self.indices = idx
        self.vocab = int(vocab)
        self.unique, self.first = np.unique(idx, return_index=True)
        seen: dict[int, int] = {}
        self.repeats: list[tuple[int, int]] = []
        for j, i in enumerate(idx.tolist()):
            if i in seen:
                self.repeats.append((j, seen[i]))
            else:
                seen[i] = j

    def runs(self) -> list[tuple[int, int, int]]:
        """``(start, stop, j)``: maximal runs ``unique[j : j + stop − start] == start..stop−1`` of consecutive
        token ids (the slices of the table a merge replaces)."""
        out: list[tuple[int, int, int]] = []
        j = 0
        u = self.unique.tolist()
        while j < len(u):
            e = j
            while e + 1 < len(u) and u[e + 1] == u[e] + 1:
                e += 1
            out.append((u[j], u[e] + 1, j))
            j = e + 1
        return out


def distinct_rows(delta: Array, tokens: TokenRows, where: str) -> Array:
    """The rows of ``delta`` ``(k, D)`` for ``tokens.unique`` (sorted distinct ids), ``(n, D)``. A repeated
    index is accepted only when all its rows are equal (PEFT's ``index_copy`` keeps one of them, which one is
    unspecified): else :class:`UnsupportedError` naming the index and the positions. The check is eager
    (one ``bool``) except on dask, where it joins the result's task graph (raised when computed)."""
    xp = namespace(delta, where=where)
    if not tokens.repeats and np.array_equal(tokens.first, np.arange(tokens.first.size)):
        return delta  # distinct and already sorted: the delta itself
    dev = array_api_compat.device(delta)
    rows = xp.take(delta, xp.asarray(tokens.first, device=dev), axis=0)
    if not tokens.repeats:
        return rows
    later = xp.take(delta, xp.asarray([p for p, _ in tokens.repeats], device=dev), axis=0)
    earlier = xp.take(delta, xp.asarray([f for _, f in tokens.repeats], device=dev), axis=0)

    def error() -> Exception:
        pairs = ", ".join(f"token {int(tokens.indices[f])} at positions {f} and {p}" for p, f in tokens.repeats)
        return UnsupportedError(
            f"{where}: token_indices repeats a token with different trainable_tokens_delta rows ({pairs}); PEFT's "
            f"merge (index_copy) keeps one of them, and which one is unspecified, so the result is not defined. "
            f"Remove the repeated index from token_indices and its row from the delta (keep the row you want)")

    return refuse_where(rows, xp.any(later != earlier), error, xp=xp)


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/trainable_tokens.md, "3. Initialisation")
# --------------------------------------------------------------------------------------------------
def init_rows(token_indices: Any, embed_dim: int, *, weight: Array | None = None, init_weights: bool = True,
              seed: Any = 0, xp: Any = None, device: Any = None, dtype: Any = None, where: str = "init") -> Array:
    """``trainable_tokens_delta`` ``(k, D)``: the current rows ``W[token_indices]`` (``init_weights=True``, PEFT's
    default: the adapter starts as the identity; needs ``weight``), or ``N(0, 1)`` draws (``False``, PEFT's
    ``torch.randn``; drawn on the host with ``numpy.random.default_rng(seed)``: the same distribution, not the
    same numbers). A repeated index gets the row of its first occurrence (so the module is well defined). The
    dtype is ``dtype``, else ``weight``'s, else float32.

    >>> import numpy as np
    >>> W = np.arange(12.0, dtype=np.float32).reshape(4, 3)
    >>> init_rows([2, 0], 3, weight=W).tolist()
    [[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]]
    """
    idx = np.asarray(list(token_indices), dtype=np.int64).reshape(-1)
    if weight is not None:
        xp = xp or namespace(weight, where=where)
        if int(weight.shape[1]) != int(embed_dim):
            raise ShapeError(f"{where}: base weight {tuple(weight.shape)} does not have {embed_dim} columns")
        TokenRows(idx, int(weight.shape[0]), where)
    if xp is None:
        import array_api_compat.numpy as xp
    if init_weights:
        if weight is None:
            raise ShapeError(f"{where}: init_weights=true starts the trainable rows as the base rows "
                             f"W[token_indices]; pass the base weight (weight=...)")
        out = xp.take(weight, xp.asarray(idx, device=array_api_compat.device(weight)), axis=0)
    else:
        host = host_rng(seed).standard_normal((idx.size, int(embed_dim)))
        _, first, inverse = np.unique(idx, return_index=True, return_inverse=True)
        host = host[first[inverse.reshape(-1)]]  # a repeated index: the row of its first occurrence
        out = backend_for(xp).from_host(np.ascontiguousarray(host, dtype=np.float32), xp, device)
    target = dtype if dtype is not None else (weight.dtype if weight is not None else xp.float32)
    return as_compute(xp, out, target)


# --------------------------------------------------------------------------------------------------
# Merge: replace rows (specs/trainable_tokens.md, "5. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
#: above this many runs of consecutive ids, :func:`_spliced` selects rows with one ``where`` instead of concatenating
#: ``2·runs + 1`` slices (one operation, one gathered temporary of the table's size)
MAX_RUNS_SPLICED = 64


def _spliced(xp: Any, weight: Array, rows: Array, tokens: TokenRows) -> Array:
    """A new table: ``weight`` with rows ``tokens.unique`` replaced by ``rows`` (``(n, D)`` in the sorted order,
    ``weight``'s dtype), built as one concatenation of slices of ``weight`` and of ``rows`` (no gathered
    temporary of the table's size; autograd and lazy libraries keep their graphs); with more than
    :data:`MAX_RUNS_SPLICED` runs of consecutive ids, as ``where(mask, rows[pos], weight)`` with a host-built
    row mask and positions."""
    runs = tokens.runs()
    n_rows = int(weight.shape[0])
    if len(runs) > MAX_RUNS_SPLICED:
        dev = array_api_compat.device(weight)
        pos = np.zeros(n_rows, dtype=np.int64)
        pos[tokens.unique] = np.arange(tokens.unique.size)
        mask = np.zeros((n_rows, 1), dtype=bool)
        mask[tokens.unique] = True
        return xp.where(xp.asarray(mask, device=dev), xp.take(rows, xp.asarray(pos, device=dev), axis=0), weight)
    pieces, prev = [], 0
    for start, stop, j in runs:
        if start > prev:
            pieces.append(weight[prev:start, ...])
        pieces.append(rows[j:j + stop - start, ...])
        prev = stop
    if prev < n_rows:
        pieces.append(weight[prev:, ...])
    return xp.concat(pieces, axis=0) if len(pieces) > 1 else xp.asarray(pieces[0], copy=True)


def _write_rows(xp: Any, M: Array, rows: Array, tokens: TokenRows) -> bool:
    """``M[unique] = rows`` in place: one integer-array assignment (NumPy, torch, CuPy), else one basic-index
    assignment per run of consecutive ids (any mutable array-API library). Never fails half-way: the first
    form writes all rows or raises before writing."""
    if not tokens.unique.size:
        return True
    dev = array_api_compat.device(M)
    try:
        M[xp.asarray(tokens.unique, device=dev), ...] = rows
        return True
    except (TypeError, IndexError, NotImplementedError, ValueError):
        pass
    for start, stop, j in tokens.runs():
        M[start:stop, ...] = rows[j:j + stop - start, ...]
    return True


def replace_rows(weight: Array, rows: Array, tokens: TokenRows, *, copy: bool = True, safe: bool = False,
                 where: str = "trainable_tokens") -> Array:
    """``W'``: ``weight`` ``(V, D)`` with rows ``tokens.unique`` replaced by ``rows`` ``(n, D)`` (sorted order; cast
    to ``weight``'s dtype, PEFT's ``deltas.to(W)``), written by :func:`~peftmath.methods._base.write_weight`:
    ``copy=False`` writes the ``n`` rows into ``weight`` (refused, writing nothing, on an immutable or read-only
    array), ``copy=True`` returns a new table (a private copy with the rows written, or one concatenation on
    immutable / lazy / autograd arrays). Every other row is ``weight``'s, bit for bit.

    >>> import numpy as np
    >>> W = np.zeros((4, 2), dtype=np.float32)
    >>> replace_rows(W, np.array([[1.0, 2.0], [3.0, 4.0]]), TokenRows([3, 1], 4, "emb")).tolist()
    [[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 4.0]]
    """
    xp = namespace(weight, rows, where=where)
    if tuple(rows.shape) != (tokens.unique.size, int(weight.shape[1])):
        raise ShapeError(f"{where}: {tuple(rows.shape)} rows do not fit {tokens.unique.size} distinct tokens of a "
                         f"table {tuple(weight.shape)}")
    src = as_compute(xp, rows, weight.dtype)

    def compute() -> Array:
        return _spliced(xp, weight, src, tokens)

    def kernel(M: Array) -> bool:
        return _write_rows(xp, M, src, tokens)

    return write_weight(where, weight, compute, kernel=kernel, copy=copy, safe=safe, xp=xp)


def merged_weight(weight: Array, delta: Array, token_indices: Any, *, where: str = "trainable_tokens") -> Array:
    """``W'`` for a checkpoint's ``delta`` ``(k, D)`` and ``token_indices`` (a new array; :func:`replace_rows`)."""
    tokens = TokenRows(token_indices, int(weight.shape[0]), where)
    check_shape(where, _KEY, delta, (tokens.indices.size, int(weight.shape[1])))
    return replace_rows(weight, distinct_rows(delta, tokens, where), tokens, copy=True, where=where)


# --------------------------------------------------------------------------------------------------
# Forward (specs/trainable_tokens.md, "4. Forward")
# --------------------------------------------------------------------------------------------------
def lookup(ids: Array, weight: Array, rows: Array, tokens: TokenRows, *, embed_scale: float | None = None,
           where: str = "trainable_tokens") -> Array:
    """``W'[ids]`` ``(*ids.shape, D)`` without building ``W'``: the rows of ``W`` at ``ids``, with the ids in
    ``tokens.unique`` taken from ``rows`` (cast to ``W``'s dtype). Exact (no arithmetic), in ``W``'s dtype;
    ``embed_scale`` multiplies the result in that dtype, as a scaled embedding (Gemma) and PEFT do. An id
    outside ``[0, V)`` is a :class:`ShapeError` (on dask when computed)."""
    xp = namespace(ids, weight, rows, where=where)
    V, D = int(weight.shape[0]), int(weight.shape[1])
    dev = array_api_compat.device(weight)
    flat = xp.reshape(ids, (-1,))
    if flat.shape[0] and not array_api_compat.is_dask_array(flat):
        lo, hi = int(xp.min(flat)), int(xp.max(flat))
        if lo < 0 or hi >= V:
            raise ShapeError(f"{where}: token id {lo if lo < 0 else hi} is outside the table of V = {V} rows")
    lut = np.zeros(V, dtype=np.int64)
    lut[tokens.unique] = np.arange(1, tokens.unique.size + 1)
    sel = xp.take(xp.asarray(lut, device=dev), flat, axis=0)
    base = xp.take(weight, flat, axis=0)
    table = xp.concat([xp.zeros((1, D), dtype=weight.dtype, device=dev), as_compute(xp, rows, weight.dtype)], axis=0)
    out = xp.where(xp.expand_dims(sel > 0, axis=1), xp.take(table, sel, axis=0), base)
    if array_api_compat.is_dask_array(flat):
        out = refuse_where(out, xp.any((flat < 0) | (flat >= V)),
                           lambda: ShapeError(f"{where}: a token id is outside the table of V = {V} rows"), xp=xp)
    out = xp.reshape(out, (*ids.shape, D))
    if embed_scale is not None:
        out = out * xp.asarray(embed_scale, dtype=out.dtype, device=dev)
    return out


def forward(x: Array, weight: Array, delta: Array, token_indices: Any, *, bias: Array | None = None,
            layer: Any = None, embed_scale: float | None = None, peft_compat: bool = False,
            where: str = "trainable_tokens.forward") -> Array:
    """The adapted forward with the rows replaced: an Embedding looks ``x`` (integer ids) up in ``W'``
    (:func:`lookup`; ``embed_scale`` for scaled embeddings), a Linear computes ``x W'ᵀ + b`` (formed in
    float32, float64 for float64, rounded once). ``peft_compat=True`` drops a Linear's bias, as PEFT's unmerged
    forward does (``F.linear(x, W')``), although its merged layer adds it.

    >>> import numpy as np
    >>> W = np.arange(8.0, dtype=np.float32).reshape(4, 2)
    >>> forward(np.array([[3, 0]]), W, np.array([[-1.0, -2.0]], dtype=np.float32), [3], layer="Embedding").tolist()
    [[[-1.0, -2.0], [0.0, 1.0]]]
    """
    lay = Layer.for_weight(layer if layer is not None else LayerKind.EMBEDDING, weight)
    _check_kind(lay, where)
    tokens = TokenRows(token_indices, lay.weight_shape[0], where)
    check_shape(where, _KEY, delta, (tokens.indices.size, lay.weight_shape[1]))
    rows = distinct_rows(delta, tokens, where)
    xp = namespace(x, weight, delta, bias, where=where)
    if lay.kind is LayerKind.EMBEDDING:
        if xp.isdtype(x.dtype, ("real floating", "complex floating", "bool")):
            raise ShapeError(f"{where}: an Embedding takes integer token ids, got an input of dtype {x.dtype}; for a "
                             f"module that is an nn.Linear output layer (a tied lm_head), bind it with "
                             f"kind='Linear' (layer_kinds={{name: 'Linear'}})")
        return lookup(x, weight, rows, tokens, embed_scale=embed_scale, where=where)
    if embed_scale is not None:
        raise ShapeError(f"{where}: embed_scale applies to an Embedding, not to a Linear layer; leave it out")
    lay.for_input(x, where)
    lay.check_bias(bias)
    new = replace_rows(weight, rows, tokens, copy=True, where=where)
    return lay.base_forward(x, new, None if peft_compat else bias, xp)


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint
# --------------------------------------------------------------------------------------------------
def no_delta_weight(name: str, what: str) -> UnsupportedError:
    """The refusal of ``delta_weight`` for a module whose merge replaces rows (``what`` says which): ``W' − W``
    depends on ``W``, so there is no standalone delta weight (TRAINABLE_TOKENS, a LoRA adapter's token rows)."""
    return UnsupportedError(
        f"{name}: {what}, so W' − W depends on W and there is no standalone delta weight; use merge (it returns "
        f"the replaced rows as its record) or forward with the base weight. peftmath verify's error bound is "
        f"derived for additive, scale and rotation methods and cannot check this module yet")


class TrainableTokensModule(ModuleAdapter):
    """Trainable tokens on one nn.Embedding ``(V, D)`` or nn.Linear ``(V, D)`` output layer:
    ``trainable_tokens_delta (k, D)``, the rows ``token_indices`` of the merged table. Merge replaces the rows
    and returns the original ones as its record; unmerge needs it."""

    peft_type = PEFT_TYPE
    supported_kinds = SUPPORTED_KINDS
    merge_record = True
    #: no standalone ΔW: a replacement, W' − W depends on W
    additive: ClassVar[bool] = False

    @classmethod
    def infer_layer(cls, name: str, config: TrainableTokensConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """The layer of the base weight's shape: an Embedding unless ``kind`` says Linear (the delta ``(k, D)``
        tells neither ``V`` nor the kind; both kinds store ``(V, D)``, and only the forward differs)."""
        return layer_of_weight_shape(name, _KEY, params, weight_shape,
                                     LayerKind.EMBEDDING if kind is None else kind, False,
                                     "trainable tokens store k rows of D numbers")

    def validate(self) -> None:
        _check_kind(self.layer, self.name)
        extra = sorted(set(self.params) - {_KEY})
        if _KEY not in self.params or extra:
            raise ShapeError(f"{self.name}: TRAINABLE_TOKENS has exactly one tensor, {_KEY}; found "
                             f"{sorted(self.params)}")
        self.delta = self.params[_KEY]
        V, D = self.layer.weight_shape
        self.tokens = TokenRows(self.config.token_indices, V, self.name)
        k = self.tokens.indices.size
        if tuple(self.delta.shape) != (k, D):
            raise ShapeError(f"{self.name}: {_KEY} has shape {tuple(self.delta.shape)}, expected (k, D) = ({k}, {D}): "
                             f"{k} token_indices in the config, tables of D = {D} columns (base weight {(V, D)}); "
                             f"does the adapter belong to this base model and this adapter_config.json?")
        self.rows = distinct_rows(self.delta, self.tokens, self.name)

    def describe(self) -> dict[str, Any]:
        return {"tokens": int(self.tokens.unique.size)}

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        raise no_delta_weight(self.name, "TRAINABLE_TOKENS replaces rows of the base weight (W[token_indices] = "
                                         "trainable_tokens_delta)")

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        """``W'[t] = delta`` (rows cast to ``W``'s dtype; every other row and the bias unchanged); the record is the
        original rows ``W[unique ids]`` ``(n, D)`` in ``W``'s dtype, read before anything is written."""
        self.layer.check_weight(weight)
        xp = namespace(weight, self.delta, where=self.name)
        record = xp.take(weight, xp.asarray(self.tokens.unique, device=array_api_compat.device(weight)), axis=0)
        new = replace_rows(weight, self.rows, self.tokens, copy=copy, safe=safe, where=self.name)
        return MergeResult(new, bias, record)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        """Write back the rows the merge changed: row ``t`` becomes ``record[t]`` where the record differs from the
        delta row (in ``W``'s dtype), and is left as it is where they are equal (the merge did not change it).
        On the merge's own output this is exactly ``W`` again, bit for bit; it also undoes two merges into one
        shared table (a tied embedding and lm_head) in either order. :class:`NotInvertibleError` without the
        record: the original rows are not in the merged weight nor in the checkpoint."""
        self.layer.check_weight(weight)
        if record is None:
            raise NotInvertibleError(
                f"{self.name}: unmerging trainable tokens needs the original rows W[token_indices], which the merge "
                f"overwrote and the checkpoint does not hold (PEFT keeps them in a buffer it never saves); pass the "
                f"merge's record (MergeResult.record; Adapter.merge keeps it when given records={{}}), or unmerge "
                f"from the base model's tensors instead")
        xp = namespace(weight, self.delta, where=self.name)
        check_shape(self.name, "trainable-tokens merge record", record, (self.tokens.unique.size,
                                                                         self.layer.weight_shape[1]))
        rec = as_compute(xp, record, weight.dtype)
        written = as_compute(xp, self.rows, weight.dtype)
        now = xp.take(weight, xp.asarray(self.tokens.unique, device=array_api_compat.device(weight)), axis=0)
        same = xp.all(rec == written, axis=1)
        back = xp.where(xp.expand_dims(same, axis=1), now, rec)
        return MergeResult(replace_rows(weight, back, self.tokens, copy=copy, where=self.name), bias)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, *, embed_scale: float | None = None,
                peft_compat: bool = False, **layer_kwargs: Any) -> Array:
        """The unmerged forward (:func:`forward`); ``embed_scale`` for a scaled embedding. A keyword the layer does
        not take (``max_norm``: PEFT renormalises the looked-up rows) is refused."""
        layer, kw = self.input_layer(x, weight, layer_kwargs)
        if kw:
            raise UnsupportedError(f"{self.name}: the trainable-tokens forward takes no keyword {sorted(kw)} "
                                   f"(max_norm, which renormalises looked-up rows, is not implemented)")
        return forward(x, weight, self.delta, self.tokens.indices, bias=bias, layer=layer, embed_scale=embed_scale,
                       peft_compat=peft_compat, where=self.name)

    @classmethod
    def initialize(cls, name: str, config: TrainableTokensConfig, layer: Layer, *, weight: Array | None = None,
                   seed: Any = 0, xp: Any = None, device: Any = None, dtype: Any = None,
                   init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """``{"trainable_tokens_delta": ...}`` (:func:`init_rows`; ``init`` overrides ``config.init_weights``); the
        base weight is not changed."""
        _check_kind(layer, name)
        flag = config.init_weights if init is None else init
        if not isinstance(flag, bool):
            raise ConfigError(f"{name}: init_weights must be true or false, got {flag!r}")
        if weight is not None:
            check_shape(name, "base weight", weight, layer.weight_shape)
        else:
            TokenRows(config.token_indices, layer.weight_shape[0], name)
        return {_KEY: init_rows(config.token_indices, layer.weight_shape[1], weight=weight, init_weights=flag,
                                seed=seed, xp=xp, device=device, dtype=dtype, where=name)}, None


#: checkpoint suffixes of this method's per-module tensors (a ParameterDict entry: no ".weight")
PARAMETER_SUFFIXES = (_KEY,)
Config = TrainableTokensConfig
Module = TrainableTokensModule
#: demo / documentation examples: row label -> config fields (non-trivial: random rows; ids < 12 fit every
#: table of the contract tests and the demo)
EXAMPLES = {
    "Trainable tokens": dict(token_indices=[1, 4, 5, 6, 10], init_weights=False),
    "Trainable tokens (unsorted, repeated)": dict(token_indices=[9, 2, 7, 2, 0], init_weights=False),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=TrainableTokensConfig, module=TrainableTokensModule, spec="specs/trainable_tokens.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=TrainableTokensModule.supported_kinds, additive=True,
    init_field="init_weights", examples=EXAMPLES, orientation_in_tensors=False,
    needs_record_for=lambda config: True,
)
