"""Whole-model merge and unmerge streamed over safetensors files, one tensor at a time.

A *model* is a ``.safetensors`` file or a folder of shards described by
``model.safetensors.index.json`` (a folder holding a single ``model.safetensors`` works too).
Files of a model folder may be symlinks to regular files anywhere (the Hugging Face hub cache keeps a
snapshot as links into ``../../blobs/``); shard *names* in the index must still be plain file names of
the folder (no ``..``, no absolute path, no separator). :func:`transform` writes a merged (or
unmerged) copy of a model:

- tensors no adapter touches are copied byte for byte (``os.copy_file_range``: no page of them
  enters this process unless ``--dtype`` converts them);
- an adapted module's weight and bias are read into private arrays and passed through each adapter in
  turn by :meth:`peftmath.Adapter.merge` itself (unmerged in reverse order with
  :meth:`~peftmath.Adapter.unmerge`), rounded to the output dtype and written. Reading, computing and
  writing overlap (:mod:`peftmath.io.pipeline`: a read-ahead thread, a write-behind thread, each holding
  at most two of the largest tensors and 1/16 of the model), so peak memory is about one group plus two
  stages plus the adapters. A bfloat16 weight merged in float32 (:func:`float32_weights`) is read as its
  bits into a reused buffer and merged there in float32 row tiles that stay in cache (widen, merge, round:
  :func:`_merge_bf16_bits`); during a plain low-rank LoRA merge the BLAS threads are capped
  (:mod:`peftmath.io._blas`: the same bits) so that they leave the cores to the pipeline. An adapter that replaces a tensor of the group
  (a bias trained with ``bias="all"`` / ``"lora_only"``) replaces it *before* its module is merged,
  as PEFT loads the bias into the base layer before ``merge_and_unload`` (which may then add
  ``lora_bias``);
- the output has the same shards, the same tensor order and index as the input, and the same
  ``__metadata__`` plus :data:`PROVENANCE_KEY` (see below); the other small files of a model folder
  (``config.json``, tokenizer files: :func:`side_files`) are copied as regular files, links followed;
- writing is atomic: everything goes into a temporary sibling of ``out`` which is renamed into place
  when complete; an existing ``out`` is replaced only with ``force=True``; inputs are never modified.

The work is a plan plus pure tasks: :func:`prepare` plans, lays out every output file byte by byte (the
header and each tensor's offset follow from the dtypes and shapes) and creates the temporary output with its
files pre-sized and their headers written; a :class:`Job` (picklable) lists the :class:`Unit` s, and
:func:`run_unit` runs one (copy a byte range of untouched tensors; or compute one tensor, or one group that
must be computed together, and write it at its offset); :meth:`Output.commit` fsyncs, writes the index, side
files and records, and renames everything into place (:meth:`Output.abort` removes it all). :func:`transform`
runs exactly these, through the read-ahead / write-behind pipeline; :mod:`peftmath.engines` runs the same
units as tasks on a cluster, so every engine writes the same bytes.

Merge records (DoRA's weight norms, which unmerge needs and cannot recompute) never go inside the
model: the rule, for a file and a folder alike, is the sibling :func:`records_path` ``(out)`` =
``out + ".merge-records.safetensors"`` (``merged/`` -> ``merged.merge-records.safetensors``), or a
path the caller chooses. They are renamed into place just before the model, so an existing model
always has its records; a records file left without its model by an interrupted run is replaced (or
removed) by the next run that writes that model. Records that earlier versions wrote inside a folder (``peftmath_merge_records.safetensors``)
are still read (:func:`find_records`), never written. Keys are ``adapters.<i>.<module>`` where ``i``
is the adapter's position in the merges that produced the model.

Provenance: the ``__metadata__`` of every output shard holds, under :data:`PROVENANCE_KEY`, a JSON
list of the adapters merged into the model, oldest first (:func:`adapter_provenance`: the adapter's
folder name, ``peft_type``, sha256 of ``adapter_config.json`` and of ``adapter_model.safetensors``,
the merge options and the peftmath version). A merge appends to the list of its input; an unmerge
checks that the adapters given are the last ones merged (:func:`unmerge_provenance`) and removes them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import stat
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._array import all_finite, dtype_name
from ..errors import (CheckpointError, ConfigError, NonFiniteError, NotInvertibleError, PeftMathError, ShapeError,
                      UnsupportedError)
from ..targets import module_to_checkpoint
from ._blas import BlasThreads
from .atomic import clean_stale_siblings, temp_sibling
from .bf16 import is_bf16, round_bf16, widen_bf16
from .pipeline import ReadAhead, WriteBehind, copy_range, write_all, write_at
from .safetensors import DTYPES, SafeTensorsFile, dtype_code, save_file

__all__ = ["Model", "Plan", "Step", "TensorOp", "Span", "Job", "Unit", "OutputFile", "Output", "open_model", "plan",
           "compute_group", "prepare", "run_unit", "compute_unit", "read_span", "transform", "records_path", "find_records",
           "read_records", "check_records", "side_files", "adapter_provenance", "read_provenance",
           "unmerge_provenance", "reshard_layout", "INDEX_NAME", "RECORDS_NAME", "PROVENANCE_KEY"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: where earlier versions wrote the merge records of a folder (inside it): still read, never written
RECORDS_NAME = "peftmath_merge_records.safetensors"
#: safetensors ``__metadata__`` key of the merge provenance (a JSON list, oldest merge first)
PROVENANCE_KEY = "peftmath.merged"
RECORDS_SUFFIX = ".merge-records.safetensors"
#: file name endings of weight files that are not copied beside a merged model (stale or pickles)
_WEIGHT_ENDINGS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".gguf")
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")
#: the float codes' dtype names and sizes: a bfloat16 model is planned and laid out without ml_dtypes
_FLOAT_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_FLOAT_CODE = {name: code for code, name in _FLOAT_NAMES.items()}
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


class _OutputDtypes(Mapping):
    """``--dtype`` name -> NumPy dtype; ``"bfloat16"`` imports ml_dtypes when first looked up."""

    _codes = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}

    def __getitem__(self, name: str) -> np.dtype:
        return DTYPES[self._codes[name]]

    def __contains__(self, name: object) -> bool:
        return name in self._codes

    def __iter__(self):
        return iter(self._codes)

    def __len__(self) -> int:
        return len(self._codes)


#: the output dtypes of ``--dtype`` (name -> NumPy dtype)
OUTPUT_DTYPES: Mapping[str, np.dtype] = _OutputDtypes()


# --- reading ----------------------------------------------------------------------------------
class Model:
    """A safetensors model on disk: one file, or a folder of shards with an index.

    ``files`` maps each file name (relative to the folder) to its :class:`SafeTensorsFile`, in index
    order; ``key_file`` maps each tensor name to its file name. Only headers are read on opening.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        p = Path(path)
        self.path = p
        self.index: dict[str, Any] | None = None
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or folder (expected a .safetensors file or a folder of shards)")
        if p.is_dir():
            self.folder = p
            idx = p / INDEX_NAME
            if idx.exists():
                self.index = _read_index(idx)
                names = list(dict.fromkeys(self.index["weight_map"].values()))
            elif (p / SINGLE_NAME).exists():
                names = [SINGLE_NAME]
            else:
                found = sorted(q.name for q in p.glob("*.safetensors"))
                if len(found) == 1:
                    names = found
                else:
                    pickles = sorted(q.name for q in p.iterdir() if q.suffix in (".bin", ".pt", ".pth"))
                    hint = (f"; {pickles[0]} is a pickle and is never loaded: convert it to safetensors with a trusted "
                            f"tool (e.g. transformers' save_pretrained(dir, safe_serialization=True))") if pickles else ""
                    raise CheckpointError(
                        f"{p}: no {INDEX_NAME} and no single .safetensors file in the folder "
                        f"({len(found)} .safetensors files){hint}")
        else:
            self.folder = None
            names = [p.name]
        base = p if p.is_dir() else p.parent
        self.files: dict[str, SafeTensorsFile] = {}
        for n in names:
            _require_regular(base / n)
            self.files[n] = SafeTensorsFile(base / n)
        self.key_file: dict[str, str] = {}
        for n, f in self.files.items():
            for k in f:
                if k in self.key_file:
                    raise CheckpointError(f"{base / n}: tensor {k!r} is also in {base / self.key_file[k]}")
                self.key_file[k] = n
        if self.index is not None:
            wm = self.index["weight_map"]
            for k, n in wm.items():
                if self.key_file.get(k) != n:
                    raise CheckpointError(f"{p / INDEX_NAME}: weight_map says {k!r} is in {n}, but {n} has no such tensor")
            extra = [k for k in self.key_file if k not in wm]
            if extra:
                raise CheckpointError(f"{p / INDEX_NAME}: weight_map lacks {len(extra)} tensors of the shards, e.g. {extra[0]!r}")

    @property
    def is_folder(self) -> bool:
        return self.folder is not None

    @property
    def config(self) -> dict[str, Any] | None:
        """The transformers ``config.json`` beside the model (None when absent or not a JSON object)."""
        cfg = (self.folder if self.folder is not None else self.path.parent) / "config.json"
        try:
            value = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return value if isinstance(value, dict) else None

    @property
    def model_type(self) -> str | None:
        """The ``model_type`` of the folder's transformers ``config.json`` (None when absent or unreadable)."""
        value = (self.config or {}).get("model_type")
        return value if isinstance(value, str) else None

    def __contains__(self, key: str) -> bool:
        return key in self.key_file

    def keys(self) -> list[str]:
        return list(self.key_file)

    def file_of(self, key: str) -> SafeTensorsFile:
        return self.files[self.key_file[key]]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file_of(key).shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self.file_of(key).dtype(key)

    def dtype_code(self, key: str) -> str:
        return self.file_of(key).dtype_code(key)

    def nbytes(self, key: str) -> int:
        return self.file_of(key).nbytes(key)

    def ordered(self, name: str) -> list[str]:
        """Tensor names of file ``name`` in the order of their data."""
        f = self.files[name]
        return sorted(f, key=lambda k: f.span(k)[0])

    def read(self, key: str, *, bits: bool = False, out: np.ndarray | None = None) -> np.ndarray:
        """A private, writeable copy of tensor ``key`` (read with plain file I/O, not kept mapped); ``bits``: a
        bfloat16 tensor as its ``uint16`` bits; ``out``: a flat ``uint8`` buffer to read into (:func:`read_span`)."""
        return read_span(self.span_of(key), key, bits=bits, out=out)

    def span_of(self, key: str) -> Span:
        """Where tensor ``key``'s bytes are: a picklable :class:`Span` (file, byte range, dtype, shape)."""
        f = self.file_of(key)
        start, end = f.span(key)
        return Span(str(f.path), start, end, f.dtype_code(key), f.shape(key))

    def closest(self, key: str, n: int = 3) -> list[str]:
        import difflib

        return difflib.get_close_matches(key, self.keys(), n=n, cutoff=0.3)


@dataclass(frozen=True)
class Span:
    """The bytes of one stored tensor: file ``path``, absolute byte range ``[start, end)``, safetensors dtype
    code and shape. Picklable (a task reads with it on another process or machine; no memory map travels)."""

    path: str
    start: int
    end: int
    code: str
    shape: tuple[int, ...]


def read_span(span: Span, key: str = "tensor", *, bits: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """A private, writeable array of the bytes ``span`` describes (plain file I/O, nothing kept mapped).
    ``bits``: a bfloat16 tensor comes as its ``uint16`` bits (no ml_dtypes needed; other dtypes as stored).
    ``out``: a flat ``uint8`` buffer of at least the tensor's size, read into from its start (a reused buffer:
    no fresh pages); the result is a view of it."""
    dt = np.dtype(np.uint16) if bits and span.code == "BF16" else DTYPES[span.code]
    if out is not None:
        return _read_into(span, key, out).view(dt).reshape(span.shape)
    if span.end == span.start:
        return np.zeros(span.shape, dtype=dt)
    try:
        raw = np.fromfile(span.path, dtype=np.uint8, count=span.end - span.start, offset=span.start)
    except OSError as exc:
        raise CheckpointError(f"{span.path}: cannot read tensor {key!r} ({exc.strerror or exc})") from exc
    if raw.size != span.end - span.start:
        raise CheckpointError(f"{span.path}: tensor {key!r} is cut short (file truncated while reading?)")
    return raw.view(dt).reshape(span.shape)


def _read_into(span: Span, key: str, out: np.ndarray) -> np.ndarray:
    """The bytes of tensor ``span`` read into the front of the flat ``uint8`` buffer ``out`` (``os.preadv``: no
    fresh pages per tensor, unlike :func:`read_span`), as a flat ``uint8`` array; the errors of :func:`read_span`."""
    n = span.end - span.start
    dst = out[:n]
    got = 0
    try:
        fd = os.open(span.path, os.O_RDONLY)
        try:
            view = memoryview(dst)
            while got < n:
                k = os.preadv(fd, [view[got:]], span.start + got)
                if k == 0:
                    break
                got += k
        finally:
            os.close(fd)
    except OSError as exc:
        raise CheckpointError(f"{span.path}: cannot read tensor {key!r} ({exc.strerror or exc})") from exc
    if got != n:
        raise CheckpointError(f"{span.path}: tensor {key!r} is cut short (file truncated while reading?)")
    return dst


class _Buffers:
    """The buffers :func:`transform` reads adapted weights into (its read-ahead thread; a bfloat16 weight merged
    in float32 is widened into one), merged in place, and given back by its write-behind thread once written,
    so that no weight costs fresh pages. Each holds ``nbytes`` bytes (the largest such weight); as many exist as
    are in use at once, which the pipeline's stages bound (each counts a buffer at its full size). Thread-safe."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._free: list[np.ndarray] = []
        self._lent: dict[int, Any] = {}  # id -> weak reference, of the buffers handed out
        self._lock = threading.Lock()

    def take(self, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        """A buffer as an uninitialised array of ``dtype`` and ``shape``."""
        import weakref

        with self._lock:
            buf = self._free.pop() if self._free else np.empty(self.nbytes, dtype=np.uint8)
            self._lent[id(buf)] = weakref.ref(buf)
        dt = np.dtype(dtype)
        return buf[: math.prod(shape) * dt.itemsize].view(dt).reshape(shape)

    def lent(self, arr: np.ndarray) -> bool:
        """Whether ``arr`` lies in a buffer handed out and not given back."""
        buf = arr.base if arr.base is not None else arr
        with self._lock:
            ref = self._lent.get(id(buf))
            return ref is not None and ref() is buf

    def give_back(self, arr: np.ndarray) -> None:
        """Return the buffer under ``arr`` (nothing when ``arr`` is not one of them: a copy the merge made)."""
        buf = arr.base if arr.base is not None else arr
        with self._lock:
            ref = self._lent.pop(id(buf), None)
            if ref is not None and ref() is buf:
                self._free.append(buf)


def _read_index(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CheckpointError(f"{path}: 'weight_map' must be an object mapping tensor names to shard file names")
    for k, v in wm.items():
        if any(ord(c) < 32 for c in v):
            raise CheckpointError(f"{path}: weight_map entry {k!r} names a shard with control characters ({v!r})")
        q = Path(v)
        if q.is_absolute() or ".." in q.parts or "\\" in v or v in ("", ".") or len(q.parts) != 1:
            raise CheckpointError(
                f"{path}: weight_map entry {k!r} -> {v!r} points outside the model folder; shard names must be "
                f"plain file names in {path.parent}")
    # a shard may be a symlink to a regular file anywhere (the hub cache links snapshots to ../../blobs/):
    # the name decides which files belong to the model, and the name cannot leave the folder
    return data


def _require_regular(path: Path) -> None:
    """Refuse a model file that is not (a symlink to) a regular file: a folder, a FIFO, a device, a broken link."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        what = f" (a broken symlink to {os.readlink(path)})" if path.is_symlink() else ""
        raise CheckpointError(f"{path}: no such model file{what}") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        target = f" (a symlink to {path.resolve()})" if path.is_symlink() else ""
        raise CheckpointError(f"{path}{target}: not a regular file; a model file must be a file or a link to one")


def open_model(path: str | os.PathLike) -> Model:
    """Open a ``.safetensors`` file or a sharded model folder (headers only)."""
    return Model(path)


# --- planning ---------------------------------------------------------------------------------
@dataclass
class TensorOp:
    """What happens to one tensor of the model."""

    key: str
    operation: str  # "copy", "cast", "merge", "unmerge", "replace"
    shape: tuple[int, ...]
    src_dtype: str
    dst_dtype: str
    work_dtype: str
    nbytes: int
    modules: list[str] = field(default_factory=list)


@dataclass
class Step:
    """One adapter's part in computing one group (an adapted weight and its bias): first the tensors of
    the group it replaces (``replaces``: base key -> array), then its module's merge (``module``, the
    bound ``mod``; None when the adapter only replaces tensors of the group)."""

    adapter: int
    module: str | None = None
    mod: Any = None
    replaces: dict[str, Any] = field(default_factory=dict)
    kind: Any = None  # the module's layer kind, decided on the whole model (None: its shape decides)


@dataclass
class Plan:
    """The per-tensor plan of :func:`transform`, and the bound modules it will run."""

    ops: dict[str, TensorOp]
    groups: dict[str, list[Step]]  # weight key -> the steps, in the order they run
    key_group: dict[str, str]  # weight or bias key -> weight key of its group
    replaced: dict[str, Any]  # base key outside every group -> its replacement (modules_to_save; the last wins)
    group_bias: dict[str, str | None] = field(default_factory=dict)  # weight key -> bias key (None: no bias)

    def adapted(self) -> list[TensorOp]:
        return [op for op in self.ops.values() if op.operation not in ("copy",)]

    def bytes_out(self) -> int:
        return sum(op.nbytes for op in self.ops.values())


def _wider(a: str, b: str) -> str:
    """The wider of two dtype names (float16 and bfloat16: float32); ``a`` when either is not a float."""
    order = ["float16", "bfloat16", "float32", "float64"]  # by name: no ml_dtypes import
    if a not in order or b not in order:
        return a
    if {a, b} == {"float16", "bfloat16"}:
        return "float32"
    return max(a, b, key=order.index)


def _base_key(base: Model, key: str) -> str:
    """The base tensor a replacement named after a module (``<module>.<leaf>``) stands for."""
    if key in base:
        return key
    module, _, leaf = key.rpartition(".")
    return f"{module_to_checkpoint(module, base.model_type)}.{leaf}" if module else key


def plan(
    base: Model,
    adapters: Sequence[Any],
    *,
    direction: str = "merge",
    dtype: np.dtype | None = None,
    layer_kinds: Mapping[str, Any] | None = None,
    names: Sequence[str] | None = None,
) -> Plan:
    """Bind every adapter module to the base tensors and decide each tensor's operation.

    Each adapter is first checked against the whole base (:meth:`Adapter.check_base`: every adapted
    weight and replaced tensor present with its shape, tied embeddings) and its modules' layer kinds are
    decided on the whole model (:meth:`Adapter.resolve_layer_kinds`), as :meth:`Adapter.merge` would on
    the full state dict. Raises :class:`ShapeError` (naming the adapter, module and tensor) for a module
    missing from the base or whose shapes disagree, before anything is read or written.
    """
    names = list(names) if names is not None else [f"adapter {i}" for i in range(len(adapters))]
    layer_kinds = dict(layer_kinds or {})
    shapes = {k: base.shape(k) for k in base.keys()}
    model_config, model_type = base.config, base.model_type
    groups: dict[str, list[Step]] = {}
    group_bias: dict[str, str | None] = {}
    key_group: dict[str, str] = {}
    replaced: dict[str, Any] = {}
    for i, ad in enumerate(adapters):
        if not ad.description.merges_weights:
            raise UnsupportedError(
                f"{names[i]}: {ad.peft_type} adapters add virtual tokens, not weights: there is nothing to "
                f"{direction} into a model (use them with the model's forward instead)")
        try:
            ad.check_base(shapes, model_config=model_config, model_type=model_type, source=str(base.path))
        except PeftMathError as exc:
            raise type(exc)(f"{names[i]}: {exc}") from None
        wkeys, bkeys = {}, {}
        for m in ad.modules:
            wkeys[m], bkeys[m] = ad.weight_keys(m, base, model_type=model_type)
            if wkeys[m] not in base:
                near = base.closest(wkeys[m])
                raise ShapeError(
                    f"{names[i]}: adapted module {m!r} has no tensor {wkeys[m]!r} in {base.path}"
                    + (f" (closest: {', '.join(near)})" if near else "")
                    + "; is this the adapter's base model?")
        try:
            kinds = ad.resolve_layer_kinds({m: base.shape(w) for m, w in wkeys.items()}, layer_kinds=layer_kinds,
                                           model_type=model_type)
        except PeftMathError as exc:
            raise type(exc)(f"{names[i]}: {exc}") from None
        for m in ad.modules:
            wkey, bkey = wkeys[m], bkeys[m]
            try:
                mod = ad.module(m, weight_shape=base.shape(wkey), kind=kinds[m], model_type=model_type)
            except ShapeError as exc:
                raise ShapeError(f"{names[i]}: {exc} (base tensor {wkey!r} is {base.shape(wkey)} in {base.path})") from None
            groups.setdefault(wkey, []).append(Step(i, m, mod, kind=kinds[m]))
            group_bias[wkey] = bkey if bkey in base else None
            key_group[wkey] = wkey
            if bkey in base:
                key_group[bkey] = wkey
    for i, ad in enumerate(adapters):
        for k, v in ad.other.items():
            kb = _base_key(base, k)
            if kb not in base:
                raise ShapeError(f"{names[i]}: the adapter replaces {k!r} (modules_to_save), which {base.path} lacks")
            if tuple(v.shape) != base.shape(kb):
                raise ShapeError(
                    f"{names[i]}: replacement {k!r} has shape {tuple(v.shape)}, the base has {base.shape(kb)}")
            if direction != "merge":
                from ..adapter import not_invertible_replacements

                raise not_invertible_replacements(list(ad.other), who=names[i],
                                                  how="`peftmath unmerge` cannot restore them")
            g = key_group.get(kb)
            if g is None:
                replaced[kb] = v
                continue
            steps = groups[g]
            step = next((s for s in steps if s.adapter == i), None)
            if step is None:
                step = Step(i)
                steps.append(step)
                steps.sort(key=lambda s: s.adapter)
            step.replaces[kb] = v
    if direction == "unmerge":
        for g in groups.values():
            g.reverse()
    ops: dict[str, TensorOp] = {}
    for fname in base.files:
        for key in base.ordered(fname):
            code = base.dtype_code(key)
            src = _FLOAT_NAMES.get(code) or dtype_name(base.dtype(key))  # (a float by its code: no ml_dtypes)
            dst = dtype_name(dtype) if (dtype is not None and code in _FLOAT_CODES) else src
            shape = base.shape(key)
            nbytes = math.prod(shape) * (_ITEMSIZE.get(dst) or base.dtype(key).itemsize)
            if key in key_group or key in replaced:
                g = key_group.get(key)
                work = _wider(src, dst)
                mods = []
                for s in groups.get(g, []):
                    if key in s.replaces:
                        mods.append(f"{names[s.adapter]}:replaces {key}")
                    if s.module is not None:
                        mods.append(f"{names[s.adapter]}:{s.module}")
                op = direction if g else "replace"
                ops[key] = TensorOp(key, op, shape, src, dst, work, nbytes, mods)
            else:
                op = "copy" if dst == src else "cast"
                ops[key] = TensorOp(key, op, shape, src, dst, src, nbytes)
    return Plan(ops, groups, key_group, replaced, group_bias)


# --- records ---------------------------------------------------------------------------------
def records_path(out: str | os.PathLike, *, folder: bool | None = None) -> Path:
    """Where the merge records of model ``out`` are written: the sibling ``out + ".merge-records.safetensors"``,
    for a file and a folder alike (never inside a model folder). ``folder`` is accepted for compatibility
    and ignored.

    >>> records_path("merged.safetensors").name
    'merged.safetensors.merge-records.safetensors'
    >>> records_path("out/merged/").as_posix()
    'out/merged.merge-records.safetensors'
    """
    p = Path(out)
    if not p.name:  # "." or "/"
        p = Path(os.path.abspath(p))
    return p.with_name(p.name + RECORDS_SUFFIX)


def find_records(model: str | os.PathLike) -> Path | None:
    """The merge records of ``model``: its sibling :func:`records_path`, else (a folder merged by an
    earlier version) ``model/peftmath_merge_records.safetensors``; None when neither exists."""
    p = Path(model)
    for q in (records_path(p), p / RECORDS_NAME if p.is_dir() else None):
        if q is not None and q.is_file():
            return q
    return None


def read_records(path: str | os.PathLike | None) -> dict[str, np.ndarray]:
    """The records file's tensors (``adapters.<i>.<module>`` -> array), empty when ``path`` is None or does
    not exist."""
    if path is None:
        return {}
    p = Path(path)
    if not p.exists():
        return {}
    f = SafeTensorsFile(p)
    return {k: np.array(f[k]) for k in f}


def check_records(pl: Plan, records: Mapping[str, Any], merged: str | os.PathLike) -> None:
    """Refuse (:class:`NotInvertibleError`) an unmerge of a module whose unmerge needs its merge's record (DoRA's
    weight norms, the rows trainable tokens replaced, ...) without one in ``records``."""
    for g in pl.groups.values():
        for st in g:
            if st.mod is not None and st.mod.needs_record() and _record_for(records, st.module)[0] is None:
                what = ("the weight norms recorded at merge time" if getattr(st.mod, "is_dora", False) is True
                        else "what its merge recorded (e.g. the original rows that trainable tokens replace)")
                raise NotInvertibleError(
                    f"{st.module}: unmerging this {st.mod.peft_type} module needs {what}, and no record for "
                    f"this module was found (`peftmath merge` writes them to {records_path(merged)}); pass "
                    f"--records FILE if they are elsewhere")


def _record_for(records: Mapping[str, Any], module: str, used: set[str] | frozenset = frozenset()) -> tuple[str | None, Any]:
    """The record of ``module`` from the latest merged adapter whose record is not ``used`` yet."""
    best = None
    for k in records:
        if k in used:
            continue
        if k.startswith("adapters.") and k.split(".", 2)[-1] == module:
            i = int(k.split(".", 2)[1])
            if best is None or i > best[0]:
                best = (i, k)
    return (None, None) if best is None else (best[1], records[best[1]])


# --- provenance --------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return h.hexdigest()


def adapter_provenance(path: str | os.PathLike, adapter: Any,
                       options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The provenance entry of adapter folder ``path`` (or its ``adapter_model.safetensors``): its folder
    name, ``peft_type`` (and ``use_dora``), the sha256 of ``adapter_config.json`` and of
    ``adapter_model.safetensors``, the adapter's ``scale`` when it is not 1 (:meth:`Adapter.scaled`), the
    merge ``options`` and the peftmath version. Unmerge matches entries by the two digests and the scale
    (absent: 1)."""
    from .. import __version__

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    weights = p if p.is_file() else folder / "adapter_model.safetensors"
    if not weights.exists() and (folder / "adapters.safetensors").exists():  # an MLX folder
        weights = folder / "adapters.safetensors"
    config = folder / "adapter_config.json"
    single = p.is_file() and p.name not in ("adapter_model.safetensors", "adapters.safetensors")
    entry: dict[str, Any] = {"adapter": p.name if single else _adapter_name(folder), "peft_type": adapter.peft_type}
    if getattr(adapter.config, "use_dora", False):
        entry["use_dora"] = True
    if not single or p.name == "adapter_model.safetensors":  # a kohya / LyCORIS file has no config
        entry["adapter_config_sha256"] = _sha256(config)
    entry["adapter_model_sha256"] = _sha256(weights)
    scale = float(getattr(adapter, "scale", 1.0))
    if scale != 1.0:  # applied with a scale (Adapter.scaled; ADAPTER:SCALE on the command line)
        entry["scale"] = scale
    if options:
        entry["options"] = dict(options)
    entry["peftmath"] = __version__
    return entry


def _adapter_name(folder: Path) -> str:
    """The folder's name; ``org/name@revision`` for a snapshot of the hub cache
    (``.../models--org--name/snapshots/<revision>``), whose folder name is only the revision.

    >>> _adapter_name(Path("/cache/models--org--my-lora/snapshots/0123abcd"))
    'org/my-lora@0123abcd'
    """
    p = Path(os.path.abspath(folder))
    repo = p.parent.parent.name
    if p.parent.name == "snapshots" and repo.startswith("models--"):
        return repo[len("models--"):].replace("--", "/") + "@" + p.name
    return p.name


def _describe(entry: Mapping[str, Any]) -> str:
    kind = str(entry.get("peft_type", "?")) + (" with DoRA" if entry.get("use_dora") else "")
    digest = str(entry.get("adapter_model_sha256", ""))[:12]
    scale = _scale_of(entry)
    return (f"{entry.get('adapter', '?')} ({kind}{f', scale {scale:g}' if scale != 1.0 else ''}, "
            f"adapter_model sha256 {digest}...)")


def _scale_of(entry: Mapping[str, Any]) -> float:
    try:
        return float(entry.get("scale", 1.0))
    except (TypeError, ValueError):
        return float("nan")  # an unreadable scale matches nothing


def _same_adapter(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """The same adapter files (a kohya file: its weights alone) applied with the same scale."""
    return (a.get("adapter_model_sha256") is not None and a.get("adapter_model_sha256") == b.get("adapter_model_sha256")
            and a.get("adapter_config_sha256") == b.get("adapter_config_sha256") and _scale_of(a) == _scale_of(b))


def read_provenance(model: Model) -> list[dict[str, Any]] | None:
    """The :data:`PROVENANCE_KEY` list of ``model`` (None when no shard has one: not merged by peftmath).
    Shards that disagree, or a value that is not a JSON list of objects, raise :class:`CheckpointError`."""
    found: dict[str, str] = {}
    for name, f in model.files.items():
        if PROVENANCE_KEY in f.metadata:
            found[name] = f.metadata[PROVENANCE_KEY]
    if not found:
        return None
    values = set(found.values())
    if len(values) > 1 or len(found) != len(model.files):
        raise CheckpointError(
            f"{model.path}: the shards disagree about which adapters were merged (metadata {PROVENANCE_KEY!r} "
            f"differs or is missing in some of {', '.join(model.files)}); the model was edited by hand?")
    raw = values.pop()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{model.path}: metadata {PROVENANCE_KEY!r} is not valid JSON ({exc})") from None
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise CheckpointError(f"{model.path}: metadata {PROVENANCE_KEY!r} must be a JSON list of objects")
    return data


def unmerge_provenance(
    merged: Model, recorded: list[dict[str, Any]] | None, given: Sequence[Mapping[str, Any]], *,
    ignore: bool = False,
) -> tuple[list[dict[str, Any]] | None, list[str]]:
    """Check that ``given`` (provenance entries of the adapters to unmerge, in merge order) are the last
    adapters merged into ``merged`` according to ``recorded``; return the provenance of the unmerged
    model and warnings.

    A mismatch (an adapter that is not the last one merged, e.g. the plain-LoRA twin of a DoRA adapter,
    or one never merged) raises :class:`CheckpointError` naming both sides, unless ``ignore``: then
    the entries of the given adapters are removed wherever they are, and a warning says what the
    metadata cannot describe. A model without provenance (merged by another tool) passes with a warning.
    """
    names = ", ".join(_describe(g) for g in given)
    if recorded is None:
        return None, [f"{merged.path} has no peftmath provenance metadata (merged by another tool?): cannot check "
                      f"that {names} {'was' if len(given) == 1 else 'were'} merged into it"]
    rest = list(recorded)
    problem = None
    for g in reversed(given):  # unmerge order: the last merged first
        if rest and _same_adapter(rest[-1], g):
            rest.pop()
            continue
        listed = "; ".join(_describe(e) for e in recorded) or "nothing"
        if any(_same_adapter(e, g) for e in rest):
            problem = (f"{merged.path}: {_describe(g)} is not the last adapter merged into it: its metadata says "
                       f"the last one is {_describe(rest[-1])} (merged, oldest first: {listed}); unmerge adapters in "
                       f"the reverse order of merging")
        else:
            last = f"the last one merged is {_describe(rest[-1])}" if rest else "no adapter is left to unmerge"
            problem = (f"{merged.path}: {_describe(g)} was never merged into it according to its metadata ({last}; "
                       f"merged, oldest first: {listed})")
            if rest and _same_adapter({**rest[-1], "scale": _scale_of(g)}, g):
                problem += (f"; the same adapter was merged with scale {_scale_of(rest[-1]):g}, not "
                            f"{_scale_of(g):g}: unmerge it with that scale (ADAPTER:{_scale_of(rest[-1]):g})")
        break
    if problem is None:
        return rest, []
    if not ignore:
        raise CheckpointError(f"{problem}. Pass --ignore-provenance to unmerge anyway")
    rest = list(recorded)
    for g in reversed(given):
        hit = next((j for j in range(len(rest) - 1, -1, -1) if _same_adapter(rest[j], g)), None)
        if hit is not None:
            rest.pop(hit)
    return rest, [f"{problem}; unmerging anyway (--ignore-provenance): the output's metadata may not describe it"]


# --- side files --------------------------------------------------------------------------------
def side_files(model: Model) -> tuple[list[Path], list[str]]:
    """The small files of a model folder copied beside its shards, and what is left out (and why).

    Copied: every file (or symlink to a regular file, as in the hub cache) that is not a shard, the
    index, hidden, old merge records or another weight file (``.bin``, ``.pt``, ``.safetensors``
    not in the index, ...). Left out, with the reason: subfolders, weight files, broken links and
    what is not a regular file.
    """
    if model.folder is None:
        return [], []
    copied: list[Path] = []
    left: list[str] = []
    for q in sorted(model.folder.iterdir()):
        name = q.name
        if name in model.files or name == INDEX_NAME or name.startswith("."):
            continue
        if name == RECORDS_NAME:
            left.append(f"{name} (merge records)")
        elif name.endswith(_WEIGHT_ENDINGS):
            left.append(f"{name} (weights not in the model)")
        else:
            try:
                mode = os.stat(q).st_mode
            except OSError:
                left.append(f"{name} (broken symlink)")
                continue
            if stat.S_ISREG(mode):
                copied.append(q)
            else:
                left.append(f"{name} ({'folder' if stat.S_ISDIR(mode) else 'not a regular file'})")
    return copied, left


def _copy_side_files(model: Model, dst: Path, dtype: np.dtype | None = None) -> tuple[list[str], list[str]]:
    """Copy :func:`side_files` of ``model`` into folder ``dst`` (contents, not links); ``config.json``
    retagged to ``dtype`` when given. Returns (copied names, left-out descriptions)."""
    copied, left = side_files(model)
    for q in copied:
        if q.name == "config.json" and dtype is not None and _retag_config(q, dst / q.name, dtype):
            continue
        shutil.copyfile(q, dst / q.name)
    return [q.name for q in copied], left


# --- writing ----------------------------------------------------------------------------------
def _check_output(out: Path, inputs: Sequence[Path], force: bool) -> None:
    """Refuse an output whose parent is missing, that would replace or lie inside an input, or that exists
    (unless ``force``); remove the temporary leftovers of killed runs beside it."""
    if out.parent.exists():
        clean_stale_siblings(out)  # leftovers of a killed run
    if not out.parent.exists():
        raise CheckpointError(f"{out}: the parent folder {out.parent} does not exist; create it first")
    if not out.parent.is_dir():
        raise CheckpointError(f"{out}: the parent {out.parent} is not a folder; choose an output path inside a folder")
    ro = out.resolve()
    for p in inputs:
        rp = Path(p).resolve()
        if rp == ro or ro in rp.parents:
            raise CheckpointError(f"{out}: the output would replace the input {p}; choose another output path")
        if rp.is_dir() and rp in ro.parents:
            raise CheckpointError(f"{out}: the output would be written inside the input folder {p}; choose a path outside it")
    if out.exists() or out.is_symlink():
        if not force:
            raise CheckpointError(f"{out}: already exists; pass --force to replace it, or choose another path")


def _header_bytes(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos = 0
    for key, code, shape, nbytes in entries:
        header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


@dataclass
class Report:
    """What :func:`transform` did."""

    out: Path
    tensors: int = 0
    adapted: int = 0
    bytes_written: int = 0
    records: int = 0
    records_file: Path | None = None
    side_files: list[str] = field(default_factory=list)  # names copied beside the shards
    left_out: list[str] = field(default_factory=list)  # other entries of the folder, with the reason


def _with_provenance(metadata: Mapping[str, str], provenance: Sequence[Mapping[str, Any]] | None) -> dict[str, str]:
    """``metadata`` with :data:`PROVENANCE_KEY` set to ``provenance`` (unchanged when None). An empty list
    is kept: it says that every adapter peftmath merged was unmerged again (a model without the key was
    never merged by peftmath, or by another tool).

    Every other entry is kept; ``"format": "pt"`` is added when absent, because transformers 4.x refuses
    safetensors metadata without a known format."""
    meta = dict(metadata)
    if provenance is None:
        return meta
    meta[PROVENANCE_KEY] = json.dumps(list(provenance), separators=(",", ":"), sort_keys=True)
    meta.setdefault("format", "pt")
    return meta


def _check_records_dest(rec: Path, out: Path, inputs: Sequence[Path], force: bool, explicit: bool) -> None:
    """The records destination must lie outside ``out`` and the inputs; a chosen one (``explicit``) that
    exists needs ``force``; the default sibling belongs to ``out`` and is replaced with it."""
    rr, ro = rec.resolve(), out.resolve()
    if rr == ro or ro in rr.parents:
        raise CheckpointError(f"{rec}: merge records never go inside the model {out}; choose a path outside it")
    _check_output(rec, inputs, force or not explicit)


def _part(adapter: Any, module: str | None, replaces: Mapping[str, Any], model_type: str | None) -> Any:
    """``adapter`` restricted to ``module`` (none: only the replacements) and the replacements ``replaces``,
    so that :meth:`Adapter.merge` / :meth:`Adapter.unmerge` compute one group of tensors of the model."""
    part = copy.copy(adapter)
    part.params = {module: adapter.params[module]} if module is not None else {}
    part.other = dict(replaces)
    if model_type is not None:
        part.model_type = model_type
    return part


def _in_place(fn: Callable[..., dict], state: dict, **kwargs: Any) -> dict:
    """``fn(state, copy=False)`` on private arrays, ``copy=True`` where the backend cannot write in place."""
    try:
        return fn(state, copy=False, **kwargs)
    except UnsupportedError:
        return fn(state, copy=True, **kwargs)


def _write_tensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write a small safetensors file straight into ``path`` (already a temporary sibling), sorted by name."""
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    arrays = {k: (a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else np.ascontiguousarray(a))
              for k, a in arrays.items()}
    names = sorted(arrays)
    head = _header_bytes([(k, dtype_code(arrays[k].dtype), arrays[k].shape, arrays[k].nbytes) for k in names], metadata)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # & ~umask
    try:
        write_all(fd, memoryview(struct.pack("<Q", len(head)) + head))
        for k in names:
            write_all(fd, memoryview(arrays[k].reshape(-1).view(np.uint8)))
        os.fsync(fd)
    finally:
        os.close(fd)


def compute_group(
    base: Model,
    pl: Plan,
    adapters: Sequence[Any],
    wkey: str,
    *,
    direction: str = "merge",
    work: np.dtype | None = None,
    safe: bool = False,
    peft_compat: bool = False,
    to_xp: Callable[[np.ndarray], Any] | None = None,
    to_host: Callable[[Any], np.ndarray] | None = None,
    on_record: Callable[[Step, Any], None] | None = None,
    record_for: Callable[[Step], Any] | None = None,
    read: Callable[[str], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The tensors of group ``wkey`` of plan ``pl`` (the adapted weight and its bias, if any) after every
    adapter's step, as host arrays in the compute dtype (not yet rounded to the output dtype).

    The group is read from ``base`` in ``work`` (default: the plan's work dtype, the wider of the stored
    and the output dtype); each step first replaces the tensors its adapter replaces (a trained bias: PEFT
    loads it into the base layer before ``merge_and_unload``), then merges (unmerges) its module with
    :meth:`Adapter.merge` (:meth:`~Adapter.unmerge`) on that group alone, in place on private arrays.
    This is the one per-tensor computation of :func:`transform`, of the engines' tasks (:func:`run_unit`)
    and of :mod:`peftmath.verify`. ``on_record(step, record)`` receives a merge's record (DoRA's weight
    norms); ``record_for(step)`` gives the record a DoRA unmerge needs (None: none). ``read(key)`` reads a
    stored tensor (default :meth:`Model.read`; :func:`transform` reads ahead in another thread): the weight
    first, then the bias.
    """
    return _group_tensors(pl, adapters, wkey, base.model_type, read or base.read, direction=direction, work=work,
                          safe=safe, peft_compat=peft_compat, to_xp=to_xp, to_host=to_host, on_record=on_record,
                          record_for=record_for)


def _group_tensors(pl: Plan, adapters: Sequence[Any], wkey: str, model_type: str | None,
                   read: Callable[[str], np.ndarray], *, direction: str, work: np.dtype | None, safe: bool,
                   peft_compat: bool, to_xp: Callable[[np.ndarray], Any] | None,
                   to_host: Callable[[Any], np.ndarray] | None, on_record: Callable[[Step, Any], None] | None,
                   record_for: Callable[[Step], Any] | None,
                   widen_into: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> dict[str, Any]:
    """:func:`compute_group` given the model's ``model_type`` and a ``read`` function instead of the model.

    ``widen_into(shape)`` (a bfloat16 weight of :func:`float32_weights`): a float32 buffer of ``shape`` to
    widen row tiles of the weight into; ``read`` returns the weight's bits (``uint16``, writeable), and the
    weight is merged tile by tile in them (:func:`_merge_bf16_bits`), so it comes back as its output bits."""
    to_xp = to_xp or (lambda a: a)
    to_host = to_host or (lambda a: np.asarray(a))

    def dtype_of(key: str) -> np.dtype:
        return work if work is not None else _np_dtype(pl.ops[key].work_dtype)

    def read_work(key: str) -> Any:
        return to_xp(_astype(read(key), dtype_of(key)))

    bkey = pl.group_bias.get(wkey)
    if widen_into is not None:
        (st,) = pl.groups[wkey]  # float32_weights: one plain LoRA module on a Linear weight, nothing replaced
        part = _part(adapters[st.adapter], st.module, {}, model_type)
        bits = read(wkey)
        mod = part.module(st.module, weight_shape=tuple(bits.shape), kind="linear", model_type=model_type)
        _merge_bf16_bits(mod, bits, widen_into, unmerge=direction != "merge")
        out = {wkey: bits}
        if bkey is not None:  # passes through (a plain LoRA module leaves the bias alone)
            out[bkey] = to_host(read_work(bkey))
        return out
    state = {wkey: read_work(wkey)}
    if bkey is not None:
        state[bkey] = read_work(bkey)
    for st in pl.groups[wkey]:
        reps = {k: to_xp(np.asarray(to_host(v)).astype(dtype_of(k))) for k, v in st.replaces.items()}
        part = _part(adapters[st.adapter], st.module, reps, model_type)
        if st.module is None:
            state = part.merge(state)
            continue
        kinds = {st.module: st.kind} if st.kind is not None else None
        if direction == "merge":
            rec: dict[str, Any] = {}
            state = _in_place(part.merge, state, safe=safe, peft_compat=peft_compat, layer_kinds=kinds, records=rec)
            if st.module in rec and on_record is not None:
                on_record(st, rec[st.module])
        else:
            given = None
            if record_for is not None and (st.mod is None or st.mod.needs_record()):  # None: a Job's pickled copy
                r = record_for(st)
                given = {st.module: r} if r is not None else None
            state = _in_place(part.unmerge, state, peft_compat=peft_compat, layer_kinds=kinds, records=given)
    out = {wkey: to_host(state[wkey])}
    if bkey is not None:
        out[bkey] = to_host(state[bkey])
    return out


#: bytes of the float32 row tiles a bfloat16 weight of :func:`float32_weights` is merged in (:func:`_merge_bf16_bits`):
#: a tile stays in cache between its widening, its gemm and its rounding. Measured (transform of the 603 MiB bf16
#: benchmark model, in process, idle, medians of 10): 4 MiB 0.83 s against 0.95 s with 1 MiB tiles (each tile also
#: pays the per-block module's set-up, about 65 µs), 2-16 MiB within 5% of each other
BF16_TILE_BYTES = 4 << 20


def _merge_bf16_bits(mod: Any, bits: np.ndarray, widen_into: Callable[[tuple[int, ...]], np.ndarray], *,
                     unmerge: bool) -> None:
    """Merge (``unmerge``: unmerge) the bound module ``mod`` into the bfloat16 weight whose bits are the writeable
    C-ordered ``uint16`` array ``bits``, in place: row tile by row tile, widened exactly into a float32 tile
    (``widen_into``, :data:`BF16_TILE_BYTES`), merged there by the method's own in-place kernel on those rows
    (:func:`peftmath.engines.rows.merge_rows`), rounded once back into the tile's bits (:mod:`peftmath.io.bf16`).

    Each output row is ``round(W[i] + s·B[i]·A)`` with the same float32 sums as the whole-matrix merge (a gemm's
    row does not depend on the rows beside it: ``tests/io/test_stream_bf16.py`` checks the bytes against the
    module's own bfloat16 path), and the weight goes through memory once instead of three times (widen,
    merge, round of the whole matrix)."""
    from ..engines.rows import merge_rows

    n_rows, width = bits.shape
    step = max(1, BF16_TILE_BYTES // (4 * max(1, width)))
    buf = widen_into((min(step, n_rows), width))
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        tile = buf[: r1 - r0]
        widen_bf16(bits[r0:r1], out=tile)
        merge_rows(mod, tile, r0, unmerge=unmerge, copy=False)
        round_bf16(tile, out=bits[r0:r1])


def float32_weights(pl: Plan, *, safe: bool, peft_compat: bool, backend: bool = False) -> frozenset[str]:
    """The adapted weights a task widens to float32 itself: a bfloat16 weight (stored and written) of a Linear
    layer changed by one plain LoRA module (A and B only: no DoRA, KaSA, BD-LoRA or ``lora_bias``), in a
    default merge or unmerge (not ``safe``, not ``peft_compat``) on NumPy (``backend`` False).

    The module then updates float32 row tiles of the weight's bits (one gemm with ``beta=1`` each:
    :func:`_merge_bf16_bits`), each rounded once (:func:`peftmath.io.bf16.round_bf16`): the same float32 sums,
    rounded the same way, as the module's own bfloat16 path, so the same bits, without ml_dtypes (the weight
    stays ``uint16`` bits from the file to the file). A bias of the group keeps its stored dtype (it passes through unchanged). Everything else
    (several adapters on one weight: the bfloat16 path rounds between them; ``peft_compat`` and ``safe``, which
    round or check in the weight's dtype; other methods) keeps the module's own path.
    """
    if safe or peft_compat or backend:
        return frozenset()
    from ..layers import LayerKind
    from ..methods.lora import LoraModule

    wide = set()
    for wkey, steps in pl.groups.items():
        op = pl.ops[wkey]
        if op.work_dtype != "bfloat16" or op.dst_dtype != "bfloat16" or len(op.shape) != 2 or len(steps) != 1:
            continue
        st = steps[0]
        mod = st.mod
        if (st.module is None or st.replaces or type(mod) is not LoraModule or mod.is_dora
                or set(mod.params) != {"lora_A.weight", "lora_B.weight"}
                or getattr(mod.layer, "kind", None) is not LayerKind.LINEAR):
            continue
        wide.add(wkey)
    return frozenset(wide)


# --- the job: the plan, the byte layout of every output file, and the tasks ---------------------
@dataclass
class OutputFile:
    """One file of a :class:`Job`'s output: its temporary path, its first bytes (the 8-byte header length
    and the header, which :func:`prepare` writes) and its size (the file is pre-sized to it)."""

    path: str
    head: bytes
    size: int


@dataclass
class Unit:
    """One task of a :class:`Job`. ``kind``: ``"copy"`` (untouched tensors stored side by side in one input
    file and written side by side in one output file: one byte range, ``copy = (input file, start, count)``),
    ``"cast"`` (a tensor converted to ``--dtype``), ``"replace"`` (a ``modules_to_save`` replacement) or
    ``"group"`` (an adapted weight and its bias, computed together). ``keys``: the output tensors it writes,
    in output order; ``nbytes``: the bytes it writes."""

    kind: str
    keys: tuple[str, ...]
    nbytes: int
    copy: tuple[str, int, int] | None = None


#: the most bytes one copy unit covers (contiguous untouched tensors are copied as one range, in pieces of
#: at most this size, so an engine spreads a large copy over its workers)
COPY_UNIT_BYTES = 256 << 20


@dataclass
class Job:
    """Everything a task needs, and nothing bound to this process: picklable (no open file, no memory map).

    ``files[i]`` is output file ``i`` (:class:`OutputFile`); ``where[key] = (i, offset)`` is where output
    tensor ``key``'s bytes go; ``spans[key]`` where a tensor read from the input is (:class:`Span`);
    ``units`` the tasks, in output order of their first tensor. Every byte of every output file is known
    before any task runs: the header (:func:`prepare` writes it) and each tensor's offset, from the dtypes
    and shapes of the plan. A task (:func:`run_unit`) computes its tensors and writes them at their
    offsets, so tasks run in any order, on any worker, any number of times, and write the same bytes.
    ``unmerge_records[wkey][i]`` is the record (DoRA's weight norms) step ``i`` of group ``wkey`` unmerges
    with; a merge's records are named ``adapters.<record_offset + adapter>.<module>``."""

    plan: Plan
    adapters: list[Any]
    files: list[OutputFile]
    where: dict[str, tuple[int, int]]
    spans: dict[str, Span]
    units: list[Unit]
    direction: str = "merge"
    safe: bool = False
    peft_compat: bool = False
    model_type: str | None = None
    unmerge_records: dict[str, dict[int, Any]] = field(default_factory=dict)
    record_offset: int = 0
    to_xp: Callable[[np.ndarray], Any] | None = None  # the serial command's backend; None (NumPy) in engines
    to_host: Callable[[Any], np.ndarray] | None = None
    #: adapted bfloat16 weights widened to float32 by the task itself (:func:`float32_weights`)
    float32_weights: frozenset[str] = frozenset()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the plan's bound modules (``Step.mod``: each task binds its own from the adapter)
        and without the serial command's backend hooks."""
        state = dict(self.__dict__)
        pl = self.plan
        groups = {g: [dataclasses.replace(st, mod=None) for st in steps] for g, steps in pl.groups.items()}
        state["plan"] = dataclasses.replace(pl, groups=groups)
        state["to_xp"] = state["to_host"] = None
        state.pop("_buffers", None)
        return state

    def float32_buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array of ``shape`` reused by the tasks this thread runs for this job (the row tiles a weight of
        :attr:`float32_weights` is widened into: no allocation per task; it goes with the job)."""
        local = self.__dict__.get("_buffers") or self.__dict__.setdefault("_buffers", threading.local())
        n = math.prod(shape)
        buf = getattr(local, "buf", None)
        if buf is None or buf.size < n:
            buf = local.buf = None  # (the old one freed first)
            buf = local.buf = np.empty(n, dtype=np.float32)
        return buf[:n].reshape(shape)

    def read(self, key: str) -> np.ndarray:
        """Input tensor ``key`` (plain file I/O on its :class:`Span`; a weight of :attr:`float32_weights` as its
        bfloat16 bits)."""
        return read_span(self.spans[key], key, bits=key in self.float32_weights)

    def write(self, i: int, offset: int, arr: np.ndarray) -> None:
        """Write ``arr``'s bytes at ``offset`` of output file ``i``. The file is opened without ``O_CREAT``:
        a task still running after its job was aborted (the temporary output removed) writes nothing."""
        fd = os.open(self.files[i].path, os.O_WRONLY)
        try:
            write_at(fd, offset, memoryview(arr.reshape(-1).view(np.uint8)))
        finally:
            os.close(fd)

    def copy(self, path: str, start: int, count: int, i: int, offset: int) -> None:
        """Copy ``count`` bytes of input file ``path`` from ``start`` to ``offset`` of output file ``i``."""
        src = os.open(path, os.O_RDONLY)
        try:
            dst = os.open(self.files[i].path, os.O_WRONLY)
            try:
                copy_range(src, dst, start, count, offset)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def reads(self) -> list[str]:
        """The input tensors the tasks read, in unit order (a group: weight, then bias)."""
        order: list[str] = []
        for u in self.units:
            if u.kind == "cast":
                order.append(u.keys[0])
            elif u.kind == "group":
                g = self.plan.key_group[u.keys[0]]
                order += [g] + ([self.plan.group_bias[g]] if self.plan.group_bias.get(g) is not None else [])
        return order


def _output_array(op: TensorOp, arr: np.ndarray, safe: bool) -> np.ndarray:
    """``arr`` as it is written: the output dtype (rounded once), C-contiguous, little-endian; with ``safe``,
    a NaN or infinity is a :class:`NonFiniteError`."""
    bits = arr.dtype == np.uint16 and op.dst_dtype == "bfloat16"  # a widened weight's result (no ml_dtypes)
    arr = np.ascontiguousarray(arr if bits else _astype(arr, _np_dtype(op.dst_dtype)))
    if safe and (bits or arr.dtype.kind == "f" or is_bf16(arr.dtype)) and not all_finite(widen_bf16(arr) if bits else arr):
        raise NonFiniteError(
            f"{op.key}: the {op.operation} result contains NaN or infinity in {op.dst_dtype}; nothing "
            f"was written. Check the adapter, or keep a wider --dtype")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr


def compute_unit(job: Job, unit: Unit, read: Callable[[str], np.ndarray] | None = None
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The bytes unit ``unit`` (not a copy) writes: ``({key: array as written}, {record name: record})``; a
    weight of :attr:`Job.float32_weights` comes as its bfloat16 bits (``uint16``). ``read`` reads an input
    tensor (default :meth:`Job.read`; a weight of :attr:`Job.float32_weights` as its bits, writeable: it is
    merged in them)."""
    pl, read = job.plan, read or job.read
    to_host = job.to_host or (lambda a: np.asarray(a))
    to_xp = job.to_xp or (lambda a: a)
    records: dict[str, np.ndarray] = {}
    if unit.kind == "cast":
        raw = {unit.keys[0]: read(unit.keys[0])}
    elif unit.kind == "replace":
        raw = {k: np.asarray(to_host(pl.replaced[k])) for k in unit.keys}
    else:
        wkey = pl.key_group[unit.keys[0]]
        steps = pl.groups[wkey]
        given = job.unmerge_records.get(wkey, {})

        def on_record(st: Step, value: Any) -> None:
            records[f"adapters.{st.adapter + job.record_offset}.{st.module}"] = np.ascontiguousarray(to_host(value))

        def record_for(st: Step) -> Any:
            r = next((given.get(i) for i, s in enumerate(steps) if s is st), None)
            return None if r is None else to_xp(np.asarray(r))

        raw = _group_tensors(pl, job.adapters, wkey, job.model_type, read, direction=job.direction, work=None,
                             safe=job.safe, peft_compat=job.peft_compat, to_xp=job.to_xp, to_host=job.to_host,
                             on_record=on_record, record_for=record_for,
                             widen_into=job.float32_buffer if wkey in job.float32_weights else None)
    return {k: _output_array(pl.ops[k], raw.pop(k), job.safe) for k in unit.keys}, records


def run_unit(job: Job, unit: int | Unit, *, read: Callable[[str], np.ndarray] | None = None,
             write: Callable[[int, int, Any], None] | None = None,
             copy: Callable[[str, int, int, int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Run one task of ``job`` (``unit``: its index in ``job.units``, or the unit): compute its tensors
    (:func:`compute_unit`) and write each at its offset, or copy its byte range; return the merge records it
    made (DoRA's weight norms; they are written once, by :meth:`Output.commit`).

    A picklable function of picklable arguments: an engine runs it on any worker (:mod:`peftmath.engines`);
    :func:`transform` runs it in order with its pipeline's ``read`` (read ahead), ``write(i, offset, arr)``
    and ``copy(path, start, count, i, offset)`` (write behind). The defaults open the files themselves
    (:meth:`Job.read`, :meth:`Job.write`, :meth:`Job.copy`). Run again, it writes the same bytes."""
    u = job.units[unit] if isinstance(unit, int) else unit
    write, copy = write or job.write, copy or job.copy
    if u.kind == "copy":
        path, start, count = u.copy
        i, offset = job.where[u.keys[0]]
        copy(path, start, count, i, offset)
        return {}
    arrays, records = compute_unit(job, u, read)
    for k in u.keys:
        i, offset = job.where[k]
        write(i, offset, arrays.pop(k))
    return records


def _units(base: Model, pl: Plan, layout: Sequence[tuple[Any, Any, list[tuple[str, str]]]],
           where: Mapping[str, tuple[int, int]]) -> list[Unit]:
    """The tasks of a job, in output order of their first tensor: runs of untouched tensors contiguous in
    one input and one output file (at most :data:`COPY_UNIT_BYTES` each) as one copy; each cast or
    replaced tensor; each group (weight and bias) once, at its first tensor."""
    units: list[Any] = []  # Unit, or a copy run still growing: [keys, input path, start, count, output end]
    seen: set[str] = set()
    for _, _, members in layout:
        run: list[Any] | None = None
        for fname, k in members:
            op = pl.ops[k]
            if op.operation == "copy":
                f = base.files[fname]
                start, end = f.span(k)
                offset = where[k][1]
                if (run is not None and run[1] == str(f.path) and run[2] + run[3] == start and run[4] == offset
                        and run[3] + (end - start) <= COPY_UNIT_BYTES):
                    run[0].append(k)
                    run[3] += end - start
                    run[4] += end - start
                else:
                    run = [[k], str(f.path), start, end - start, offset + end - start]
                    units.append(run)
                continue
            run = None
            if op.operation in ("cast", "replace"):
                units.append(Unit(op.operation, (k,), op.nbytes))
            elif pl.key_group[k] not in seen:
                g = pl.key_group[k]
                seen.add(g)
                keys = sorted([g] + ([pl.group_bias[g]] if pl.group_bias.get(g) is not None else []), key=where.get)
                units.append(Unit("group", tuple(keys), sum(pl.ops[x].nbytes for x in keys)))
    return [u if isinstance(u, Unit) else Unit("copy", tuple(u[0]), u[3], (u[1], u[2], u[3])) for u in units]


#: the most bytes one pipeline stage holds (read ahead, or waiting to be written), whatever the model
MAX_STAGE_BYTES = 256 << 20


def _stage_limit(base: Model, pl: Plan, reads: Sequence[str]) -> int:
    """Bytes each pipeline stage may hold: two of the largest tensors read or written (so one can be
    read or written while the next waits), at most 1/16 of the output and :data:`MAX_STAGE_BYTES`; a
    single larger tensor still passes alone. Both stages together stay under 1/8 of the model."""
    largest = max([base.nbytes(k) for k in reads] + [op.nbytes for op in pl.ops.values() if op.operation != "copy"],
                  default=0)
    return max(1, min(2 * largest, pl.bytes_out() // 16, MAX_STAGE_BYTES))


class Output:
    """A merge's output being written: the :class:`Job` (its files exist in a temporary sibling of ``out``,
    pre-sized, headers written) and what :meth:`commit` needs to put it in place. Made by :func:`prepare`.

    :meth:`commit` (after every unit ran) fsyncs the files, writes the index, the side files and the merge
    records, and renames everything into place (:func:`_commit`); :meth:`abort` removes the temporary
    output. Either way nothing partial is left at ``out`` and no temporary file or folder remains."""

    def __init__(self, base: Model, job: Job, out: Path, tmp: Path, *, force: bool, rec_dest: Path,
                 records: Mapping[str, Any], used_records: set[str], names: Sequence[str] | None,
                 dtype: np.dtype | None, max_shard_size: int | None,
                 layout: Sequence[tuple[Any, Any, list[tuple[str, str]]]]) -> None:
        self.base, self.job, self.out, self.tmp = base, job, out, tmp
        self.force, self.rec_dest, self.records, self.used_records = force, rec_dest, records, used_records
        self.names, self.dtype, self.max_shard_size, self.layout = names, dtype, max_shard_size, layout
        self.rec_tmp: Path | None = None

    def commit(self, new_records: Mapping[str, np.ndarray], *, synced: bool = False) -> Report:
        """Finish the output once every unit has run (``new_records``: what they returned, merged); ``synced``:
        the files were fsynced already (the pipeline does it as it goes)."""
        base, job, pl, tmp = self.base, self.job, self.job.plan, self.tmp
        rep = Report(self.out, tensors=len(pl.ops), bytes_written=pl.bytes_out(),
                     adapted=sum(op.operation in ("merge", "unmerge") for op in pl.ops.values()))
        try:
            if not synced:
                for f in job.files:
                    fd = os.open(f.path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            if self.max_shard_size is not None:
                if len(self.layout) > 1:  # one shard is model.safetensors alone, as transformers writes it
                    idx = json.loads(json.dumps(base.index)) if base.index is not None else {}
                    meta = idx.get("metadata") if isinstance(idx.get("metadata"), dict) else {}
                    meta["total_size"] = pl.bytes_out()
                    idx = {**idx, "metadata": meta,
                           "weight_map": {k: Path(t).name for t, _, members in self.layout for _, k in members}}
                    (tmp / INDEX_NAME).write_text(json.dumps(idx, indent=2) + "\n", encoding="utf-8")
                rep.side_files, rep.left_out = _copy_side_files(base, tmp, self.dtype)
            elif base.is_folder:
                if base.index is not None:
                    idx = json.loads(json.dumps(base.index))
                    meta = idx.get("metadata")
                    if isinstance(meta, dict) and "total_size" in meta:
                        meta["total_size"] = pl.bytes_out()
                    (tmp / INDEX_NAME).write_text(json.dumps(idx, indent=2) + "\n", encoding="utf-8")
                rep.side_files, rep.left_out = _copy_side_files(base, tmp, self.dtype)
            records, new_records = self.records, dict(new_records)
            if job.direction == "unmerge":
                keep = {k: v for k, v in records.items() if k not in self.used_records}
            else:
                keep = {**records, **new_records} if records else new_records
            if keep:
                meta = {"format": "peftmath-merge-records", "adapters": json.dumps([str(n) for n in (self.names or [])])}
                self.rec_tmp = temp_sibling(self.rec_dest)
                _write_tensors(self.rec_tmp, keep, meta)
                rep.records = len(keep)
            _commit(tmp, self.out, self.force, self.rec_tmp, self.rec_dest)
        except BaseException:
            self.abort()
            raise
        if keep:
            rep.records_file = self.rec_dest
        return rep

    def abort(self) -> None:
        """Remove the temporary output and records (idempotent)."""
        _remove(self.tmp)
        if self.rec_tmp is not None:
            self.rec_tmp.unlink(missing_ok=True)


def _remove(tmp: Path) -> None:
    """Remove a temporary output, a folder or a file (gone already: nothing to do)."""
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def prepare(
    base: Model,
    adapters: Sequence[Any],
    out: str | os.PathLike,
    *,
    direction: str = "merge",
    dtype: np.dtype | None = None,
    safe: bool = False,
    peft_compat: bool = False,
    layer_kinds: Mapping[str, Any] | None = None,
    records: Mapping[str, Any] | None = None,
    records_out: str | os.PathLike | None = None,
    provenance: Sequence[Mapping[str, Any]] | None = None,
    force: bool = False,
    names: Sequence[str] | None = None,
    inputs: Sequence[Path] = (),
    to_xp: Callable[[np.ndarray], Any] | None = None,
    to_host: Callable[[Any], np.ndarray] | None = None,
    precomputed_plan: Plan | None = None,
    max_shard_size: int | None = None,
) -> Output:
    """The first half of :func:`transform` (its options): check the output, plan, lay out every output
    file byte by byte, and create the temporary output with its files pre-sized and their headers written.
    Run every unit of ``.job`` (:func:`run_unit`, in any order, anywhere), then :meth:`Output.commit` the
    records they return; on any error :meth:`Output.abort`."""
    out = Path(out)
    inputs = [base.path, *(Path(q) for q in inputs)]
    _check_output(out, inputs, force)
    rec_dest = Path(records_out) if records_out is not None else records_path(out)
    _check_records_dest(rec_dest, out, inputs, force, explicit=records_out is not None)
    pl = precomputed_plan or plan(base, adapters, direction=direction, dtype=dtype, layer_kinds=layer_kinds, names=names)
    records = dict(records or {})
    if direction == "unmerge":
        check_records(pl, records, base.path)
    # merging into a model that already carries records (an earlier merge): keep them, number after them
    offset = 1 + max((int(k.split(".", 2)[1]) for k in records if k.startswith("adapters.")), default=-1)
    is_folder = base.is_folder or max_shard_size is not None
    tmp = temp_sibling(out, folder=True) if is_folder else temp_sibling(out)
    try:
        if max_shard_size is None:  # base's own layout: (output file, metadata, [(base file, key), ...])
            layout = [(tmp / n if base.is_folder else tmp, f.metadata, [(n, k) for k in base.ordered(n)])
                      for n, f in base.files.items()]
        else:
            first = next(iter(base.files.values())).metadata
            layout = [(tmp / n, first, group) for n, group in
                      reshard_layout([(n, k) for n in base.files for k in base.ordered(n)],
                                     lambda nk: pl.ops[nk[1]].nbytes, max_shard_size).items()]
        files: list[OutputFile] = []
        where: dict[str, tuple[int, int]] = {}
        for i, (target, file_meta, members) in enumerate(layout):
            entries = [(k, _FLOAT_CODE.get(pl.ops[k].dst_dtype) or dtype_code(_np_dtype(pl.ops[k].dst_dtype)),
                        pl.ops[k].shape, pl.ops[k].nbytes)
                       for _, k in members]
            head = _header_bytes(entries, _with_provenance(file_meta, provenance))
            head = struct.pack("<Q", len(head)) + head
            pos = len(head)
            for k, _, _, n in entries:
                where[k] = (i, pos)
                pos += n
            files.append(OutputFile(str(target), head, pos))
        units = _units(base, pl, layout, where)
        job = Job(pl, list(adapters), files, where, {}, units, direction=direction, safe=safe,
                  peft_compat=peft_compat, model_type=base.model_type, record_offset=offset, to_xp=to_xp,
                  to_host=to_host, float32_weights=float32_weights(pl, safe=safe, peft_compat=peft_compat,
                                                                   backend=to_xp is not None))
        job.spans = {k: base.span_of(k) for k in job.reads()}
        used: set[str] = set()
        if direction == "unmerge":  # which record each DoRA step unmerges with (the latest one first)
            for u in units:
                if u.kind != "group":
                    continue
                g = pl.key_group[u.keys[0]]
                for j, st in enumerate(pl.groups[g]):
                    if st.mod is not None and st.mod.needs_record():
                        rkey, r = _record_for(records, st.module, used)
                        if r is not None:
                            used.add(rkey)
                            job.unmerge_records.setdefault(g, {})[j] = r
        for f in files:
            fd = os.open(f.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # & ~umask
            try:
                os.ftruncate(fd, f.size)
                write_at(fd, 0, memoryview(f.head))
            finally:
                os.close(fd)
    except BaseException:
        _remove(tmp)
        raise
    return Output(base, job, out, tmp, force=force, rec_dest=rec_dest, records=records, used_records=used,
                  names=names, dtype=dtype, max_shard_size=max_shard_size, layout=layout)


def transform(base: Model, adapters: Sequence[Any], out: str | os.PathLike, *,
              progress: Callable[[int], None] | None = None, pipeline: bool = True, **options: Any) -> Report:
    """Merge (``direction="merge"``) or unmerge ``adapters`` into a copy of ``base`` written at ``out``.

    The output has ``base``'s layout (one file, or the same shards and index), unless ``max_shard_size``
    (bytes of tensor data per shard) is given: then ``out`` is a folder of transformers-named shards
    (:func:`reshard_layout`) with a new index, tensors in ``base``'s order, as ``save_pretrained(...,
    max_shard_size=)`` writes them.

    Each group of tensors (an adapted weight and its bias) goes through the adapters in order (in
    reverse to unmerge); each adapter first replaces the tensors of the group it replaces, then its
    module is merged by :meth:`~peftmath.Adapter.merge` (unmerged by :meth:`~peftmath.Adapter.unmerge`)
    on that group alone, in place on private arrays.

    ``records`` holds the merge records of ``base`` (:func:`read_records` of :func:`find_records`):
    unmerge takes what it needs from them and keeps the rest; merge keeps them all and numbers its own
    after them. The records of the output are written to ``records_out`` (default
    :func:`records_path` ``(out)``; an existing ``records_out`` needs ``force``). ``provenance``, when
    given, is the complete :data:`PROVENANCE_KEY` list written into every output shard (an empty list
    too: nothing merged any more); None leaves the metadata as it is. ``to_xp``/``to_host`` move a tensor to the
    compute backend and back (NumPy by default). ``progress(nbytes)`` is called after each tensor. The other
    options (keyword-only) are :func:`prepare`'s: ``direction``, ``dtype``, ``safe``, ``peft_compat``,
    ``layer_kinds``, ``records``, ``records_out``, ``provenance``, ``force``, ``names``, ``inputs``,
    ``to_xp``, ``to_host``, ``precomputed_plan``, ``max_shard_size``.

    It is :func:`prepare` (the plan, every output file's byte layout, the temporary output), then
    :func:`run_unit` on every unit in output order, then :meth:`Output.commit`: the same task functions an
    engine runs (:mod:`peftmath.engines`), so every engine writes the same bytes. ``pipeline`` (default)
    overlaps reading, computing and writing (:mod:`peftmath.io.pipeline`: a read-ahead thread, the
    computation in the caller's thread, a write-behind thread, each finished shard fsynced by another while
    the next is written), each stage holding at most :func:`_stage_limit` bytes; a bfloat16 weight of
    :attr:`Job.float32_weights` is read as its bits and merged in them by float32 row tiles
    (:func:`_merge_bf16_bits`); adapted weights are read into reused buffers (:class:`_Buffers`: those bits, and
    the weights merged in place in their own dtype; each stage counts one buffer at its full size), and a plain LoRA
    merge of rank <= :data:`LOW_RANK` caps the BLAS threads at the cores less two (:mod:`peftmath.io._blas`).
    ``pipeline=False`` does the same operations one after the other. The output is the same, byte for byte.
    """
    outp = prepare(base, adapters, out, **options)
    job = outp.job
    pl = job.plan
    reads = job.reads()
    limit = _stage_limit(base, pl, reads)
    # adapted weights merged in place in reused buffers: those in their own dtype (float32 and the like), and the
    # bits of the bfloat16 weights merged in float32 row tiles (Job.float32_weights)
    inplace = set(job.float32_weights) | {
        k for k in pl.groups if job.to_xp is None and base.dtype_code(k) in ("F64", "F32", "F16")
        and pl.ops[k].src_dtype == pl.ops[k].dst_dtype == pl.ops[k].work_dtype}
    buffers = _Buffers(max((base.nbytes(k) for k in inplace), default=0))

    def read(key: str) -> np.ndarray:
        if key in inplace:
            return base.read(key, bits=key in job.float32_weights, out=buffers.take(np.uint8, (buffers.nbytes,)))
        return base.read(key)

    reader = ReadAhead(read, reads, lambda k: buffers.nbytes if k in inplace else base.nbytes(k), limit,
                       threaded=pipeline)
    # room for two buffers, so that the merge does not wait on each write's jitter
    writer = WriteBehind(max(limit, 2 * buffers.nbytes), threaded=pipeline)

    sources: dict[str, int] = {}
    new_records: dict[str, np.ndarray] = {}
    # the pipeline's three threads share the cores with BLAS: its rank-r gemms are memory-bound, and OpenBLAS's
    # idle workers spin, taking the reader's and the writer's core (same bits with any count: io/_blas.py)
    limit_blas = BlasThreads(max(1, _cores() - 2)) if pipeline and _low_rank_gemms_only(pl) else None
    try:
        if limit_blas is not None:
            limit_blas.__enter__()
        fids = [writer.attach(f.path) for f in job.files]

        def write(i: int, offset: int, arr: Any) -> None:
            if buffers.lent(arr):  # merged in place in its buffer: given back once written
                writer.write_at(fids[i], offset, arr, done=buffers.give_back, nbytes=buffers.nbytes)
            else:
                writer.write_at(fids[i], offset, arr)

        def copy(path: str, start: int, count: int, i: int, offset: int) -> None:
            if path not in sources:
                sources[path] = os.open(path, os.O_RDONLY)
            writer.copy_at(fids[i], sources[path], start, count, offset)

        ended = 0
        for unit in job.units:
            first = job.where[unit.keys[0]][0]
            while ended < first:  # no later unit writes into a file before its first tensor's
                writer.end_file(fids[ended])
                ended += 1
            new_records.update(run_unit(job, unit, read=reader.take, write=write, copy=copy))
            if limit_blas is not None and unit.kind != "copy":
                limit_blas.refresh()  # SciPy's OpenBLAS is opened by the first gemm (peftmath._cblas)
            if progress is not None:
                for k in unit.keys:
                    progress(pl.ops[k].nbytes)
        for fid in fids[ended:]:
            writer.end_file(fid)
        writer.finish()  # every file written, fsynced and closed
        reader.close()
    except BaseException:
        writer.abort()  # no thread writes into the temporary output any more
        reader.close()
        outp.abort()
        raise
    finally:
        for fd in sources.values():
            os.close(fd)
        if limit_blas is not None:
            limit_blas.__exit__(None, None, None)
    return outp.commit(new_records, synced=True)


#: the largest rank whose gemms :func:`transform` runs with fewer BLAS threads: up to it, each output element is
#: one pass over the rank, the same sums in the same order with any thread count (tests/io/test_blas_threads.py
#: checks ranks up to it; measured the same up to 512); OpenBLAS splits a longer sum (1400: measured) in blocks
#: that depend on the thread count
LOW_RANK = 128


def _low_rank_gemms_only(pl: Plan) -> bool:
    """True when every module of the plan is a plain LoRA module (A and B only) of rank <= :data:`LOW_RANK`:
    its merge is one gemm of that rank, whose bits do not depend on the BLAS thread count."""
    from ..methods.lora import LoraModule

    for steps in pl.groups.values():
        for st in steps:
            mod = st.mod
            if st.module is None:
                continue
            if (type(mod) is not LoraModule or getattr(mod, "is_dora", False)
                    or set(mod.params) != {"lora_A.weight", "lora_B.weight"}
                    or int(mod.params["lora_A.weight"].shape[0]) > LOW_RANK):
                return False
    return bool(pl.groups)


def _cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def reshard_layout(items: Sequence[Any], nbytes: Callable[[Any], int], max_shard_size: int) -> dict[str, list[Any]]:
    """``items`` (in order) packed into shards of at most ``max_shard_size`` bytes of data, named as
    transformers names them: ``{"model-00001-of-00003.safetensors": [...], ...}``, or
    ``{"model.safetensors": items}`` when one shard holds them all. A shard is closed when the next item
    would take it over the limit; an item larger than the limit gets a shard of its own (transformers'
    ``save_pretrained(max_shard_size=)`` rule).

    >>> list(reshard_layout([1, 2, 3, 4], lambda n: n, 5).items())
    [('model-00001-of-00003.safetensors', [1, 2]), ('model-00002-of-00003.safetensors', [3]), ('model-00003-of-00003.safetensors', [4])]
    """
    if max_shard_size <= 0:
        raise ConfigError(f"max_shard_size must be a positive number of bytes, got {max_shard_size}")
    groups: list[list[Any]] = []
    size = 0
    for it in items:
        n = int(nbytes(it))
        if not groups or (size + n > max_shard_size and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(it)
        size += n
    if len(groups) <= 1:
        return {"model.safetensors": list(items)}
    total = len(groups)
    return {f"model-{i + 1:05d}-of-{total:05d}.safetensors": g for i, g in enumerate(groups)}


def _retag_config(src: Path, dst: Path, dtype: np.dtype) -> bool:
    """Copy a transformers config.json with its ``torch_dtype`` / ``dtype`` set to ``dtype``; False if not JSON."""
    try:
        cfg = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(cfg, dict) or not ({"torch_dtype", "dtype"} & set(cfg)):
        return False
    for key in ("torch_dtype", "dtype"):
        if key in cfg:
            cfg[key] = dtype_name(dtype)
    dst.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True


def _astype(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``a.astype(dtype, copy=False)``, with bfloat16 <-> float32 through :mod:`peftmath.io.bf16`'s integer
    operations (the same bits as ml_dtypes' casts, faster)."""
    if a.dtype == dtype:
        return a
    if is_bf16(a.dtype) and dtype == np.float32:
        return widen_bf16(a)
    if a.dtype == np.float32 and is_bf16(dtype):
        return round_bf16(a).view(dtype)
    return a.astype(dtype)


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        return DTYPES["BF16"]
    if name.startswith("float8"):
        return DTYPES["F8_E4M3"] if "e4m3" in name else DTYPES["F8_E5M2"]
    return np.dtype(name)


def _commit(tmp: Path, out: Path, force: bool, rec_tmp: Path | None = None, rec_dest: Path | None = None) -> None:
    """Move the finished ``tmp`` into place as ``out`` (replacing it when ``force``), and ``rec_tmp`` to
    ``rec_dest`` just before it (so an existing ``out`` always has its records).

    What is in the way (the replaced ``out``, the records at ``rec_dest`` and the default records
    sibling of ``out``: stale records of the replaced output, or left by an interrupted run) is moved
    aside first, deleted once everything is in place, and put back on an error."""
    parked: list[tuple[Path, Path]] = []
    placed: list[Path] = []

    def park(p: Path) -> None:
        spot = temp_sibling(p, folder=True, kind="old") / "old"
        os.replace(p, spot)
        parked.append((p, spot))

    try:
        if out.exists() or out.is_symlink():
            if not force:  # re-checked: someone may have created it meanwhile
                raise CheckpointError(f"{out}: already exists; pass --force to replace it")
            park(out)
        stale = [records_path(out)] + ([rec_dest] if rec_tmp is not None and rec_dest is not None else [])
        for r in dict.fromkeys(stale):
            if r.exists() or r.is_symlink():
                park(r)
        if rec_tmp is not None and rec_dest is not None:
            os.replace(rec_tmp, rec_dest)
            placed.append(rec_dest)
        os.replace(tmp, out)
    except BaseException:
        for p in placed:
            p.unlink(missing_ok=True)
        for orig, spot in reversed(parked):
            os.replace(spot, orig)
            shutil.rmtree(spot.parent, ignore_errors=True)
        raise
    for _, spot in parked:
        shutil.rmtree(spot.parent, ignore_errors=True)


def write_with_replacements(base: Model, replacements: Mapping[str, np.ndarray], out: str | os.PathLike, *,
                            force: bool = False) -> None:
    """A copy of ``base`` at ``out`` in which the tensors of ``replacements`` are replaced (same names,
    shapes and dtypes required), with the same files, sharding, index and metadata; written atomically."""
    out = Path(out)
    _check_output(out, [base.path], force)
    for key, value in replacements.items():
        if key not in base:
            raise CheckpointError(f"{base.path}: no tensor {key!r} to replace")
        if tuple(value.shape) != base.shape(key):
            raise ShapeError(f"{key}: replacement of shape {tuple(value.shape)} for a tensor of shape {base.shape(key)}")
    if base.is_folder:
        tmp = temp_sibling(out, folder=True)
        target_dir = tmp
    else:
        tmp = None
        target_dir = out.parent
    try:
        for name, f in base.files.items():
            tensors = {}
            for k in base.ordered(name):
                v = replacements.get(k)
                tensors[k] = np.asarray(v).astype(f.dtype(k), copy=False) if v is not None else f[k]
            save_file(tensors, (target_dir / name) if base.is_folder else out, metadata=f.metadata)
        if base.is_folder:
            if base.index is not None:
                shutil.copyfile(base.folder / INDEX_NAME, tmp / INDEX_NAME)
            _copy_side_files(base, tmp)
            _commit(tmp, out, force)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- model card ----------------------------------------------------------------------------------
CARD_NAME = "README.md"


def model_card_path(out: str | os.PathLike, folder: bool) -> Path:
    """Where ``--model-card`` writes: ``OUT/README.md`` for a folder output, ``README.md`` beside a
    single-file output (the Hugging Face layout: a model card next to the weights)."""
    out = Path(out)
    return out / CARD_NAME if folder else out.parent / CARD_NAME


def check_model_card(out: str | os.PathLike, force: bool, folder: bool) -> Path:
    """The card's path, refused (before anything is written) when a single-file output's README.md exists
    without ``force``; a folder output is new or replaced as a whole, so its README.md is the card."""
    path = model_card_path(out, folder)
    if not folder and path.exists() and not force:
        raise CheckpointError(f"{path} already exists (--model-card writes README.md beside {out}); pass --force "
                              f"to replace it, or write OUT as a folder")
    return path


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _options_lines(options: Mapping[str, Any]) -> list[str]:
    return [f"- `{k}`: `{json.dumps(v, sort_keys=True)}`" for k, v in options.items()]


def merge_model_card(base: str | os.PathLike, out: str | os.PathLike, provenance: Sequence[Mapping[str, Any]],
                     merged_now: int, commands: Sequence[str]) -> str:
    """The README.md of a merged model: which adapters its weights hold (oldest first; the last
    ``merged_now`` by this run), their sha256 digests, scale and method, the merge options and the
    peftmath version, as recorded under :data:`PROVENANCE_KEY`, and the commands that reproduce and
    verify it."""
    from .. import __version__

    entries = list(provenance)
    rows = ["| # | adapter | method | scale | adapter_model sha256 | adapter_config.json sha256 | merged by |",
            "|---|---|---|---|---|---|---|"]
    for i, e in enumerate(entries, 1):
        method = str(e.get("peft_type", "?")) + (" (DoRA)" if e.get("use_dora") else "")
        when = "this run" if i > len(entries) - merged_now else "an earlier merge"
        rows.append(f"| {i} | {_md(e.get('adapter', '?'))} | {_md(method)} | {e.get('scale', 1.0):g} | "
                    f"`{e.get('adapter_model_sha256', '-')}` | `{e.get('adapter_config_sha256', '-')}` | "
                    f"{when} (peftmath {_md(e.get('peftmath', '?'))}) |")
    options = dict(entries[-1].get("options") or {}) if merged_now else {}
    lines = ["---", "tags:", "- peftmath", "- merge", "---", "", f"# {Path(out).name}", "",
             f"`{Path(base).name}` with {len(entries)} adapter(s) merged into its weights by peftmath {__version__} "
             f"(`peftmath merge`). The same record is in every shard's safetensors metadata under "
             f"`{PROVENANCE_KEY}`; the base model's own card is not carried over.", "",
             "## Adapters", "", *rows, "", "## Options", "", *(_options_lines(options) or ["- (defaults)"]), "",
             "## Reproduce and check", "", "```", *commands, "```", ""]
    return "\n".join(lines)


def extract_model_card(base: str | os.PathLike, tuned: str | os.PathLike, out: str | os.PathLike,
                       options: Mapping[str, Any], report: Mapping[str, Mapping[str, Any]], command: str) -> str:
    """The README.md of an extracted adapter: the two models, the options, the sha256 of the written
    adapter files, per-module rank and relative error, the peftmath version and the command."""
    from .. import __version__

    out = Path(out)
    digests = [f"- `{n}`: `{_sha256(out / n)}`" for n in ("adapter_model.safetensors", "adapter_config.json")
               if (out / n).is_file()]
    rows = ["| module | rank | relative error ‖D − BA‖/‖D‖ |", "|---|---|---|"]
    rows += [f"| {_md(m)} | {v.get('rank')} | {float(v.get('relative_error', float('nan'))):.3e} |"
             for m, v in report.items()]
    lines = ["---", "library_name: peft", "tags:", "- peftmath", "- extracted-lora", "---", "", f"# {out.name}", "",
             f"A LoRA adapter extracted by peftmath {__version__} (`peftmath extract`): a truncated SVD of "
             f"`{Path(tuned).name}` − `{Path(base).name}`, per module.", "",
             "## Files", "", *digests, "", "## Options", "", *(_options_lines(options) or ["- (defaults)"]), "",
             f"## Modules ({len(report)})", "", *rows, "", "## Reproduce", "", "```", command, "```", ""]
    return "\n".join(lines)


def write_model_card(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a temporary sibling renamed into place)."""
    from .safetensors import atomic_path

    path = Path(path)
    tmp = atomic_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
