"""Whole-model merge and unmerge streamed over safetensors files, one tensor at a time.

A *model* is a ``.safetensors`` file or a folder of shards described by
``model.safetensors.index.json`` (a folder holding a single ``model.safetensors`` works too).
:func:`transform` writes a merged (or unmerged) copy of a model:

- tensors no adapter touches are copied byte for byte (``os.copy_file_range``: no page of them
  enters this process unless ``--dtype`` converts them);
- an adapted module's weight (and bias) is read into a private array, merged with each adapter in
  turn (unmerged in reverse order), rounded to the output dtype and written; nothing else is held, so
  peak memory is about one tensor plus the adapters;
- the output has the same shards, the same tensor order, the same ``__metadata__`` and index as the
  input; other small files of a model folder (``config.json``, tokenizer files) are copied;
- writing is atomic: everything goes into a temporary sibling of ``out`` which is renamed into place
  when complete; an existing ``out`` is replaced only with ``force=True``; inputs are never modified.

Merge records (DoRA's weight norms, which unmerge needs and cannot recompute) are written to
:func:`records_path` ``(out)``: ``out/peftmath_merge_records.safetensors`` for a folder, the sibling
``out + ".merge-records.safetensors"`` for a file. Keys are ``adapters.<i>.<module>`` where ``i`` is the
adapter's position in the merge.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._array import all_finite, dtype_name
from ..errors import CheckpointError, NonFiniteError, NotInvertibleError, ShapeError, UnsupportedError
from ..targets import module_to_checkpoint
from .atomic import clean_stale_siblings, temp_sibling
from .safetensors import DTYPES, SafeTensorsFile, dtype_code, save_file

__all__ = ["Model", "Plan", "TensorOp", "open_model", "plan", "transform", "records_path", "read_records",
           "INDEX_NAME", "RECORDS_NAME"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
RECORDS_NAME = "peftmath_merge_records.safetensors"
RECORDS_SUFFIX = ".merge-records.safetensors"
#: file name endings of weight files that are not copied beside a merged model (stale or pickles)
_WEIGHT_ENDINGS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".gguf")
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")
OUTPUT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                 "bfloat16": DTYPES["BF16"], "float64": np.dtype(np.float64)}


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
    def model_type(self) -> str | None:
        """The ``model_type`` of the folder's transformers ``config.json`` (None when absent or unreadable)."""
        cfg = (self.folder if self.folder is not None else self.path.parent) / "config.json"
        try:
            value = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return None
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

    def read(self, key: str) -> np.ndarray:
        """A private, writeable copy of tensor ``key`` (read with plain file I/O, not kept mapped)."""
        f = self.file_of(key)
        start, end = f.span(key)
        dt, shape = f.dtype(key), f.shape(key)
        if end == start:
            return np.zeros(shape, dtype=dt)
        try:
            raw = np.fromfile(f.path, dtype=np.uint8, count=end - start, offset=start)
        except OSError as exc:
            raise CheckpointError(f"{f.path}: cannot read tensor {key!r} ({exc.strerror or exc})") from exc
        if raw.size != end - start:
            raise CheckpointError(f"{f.path}: tensor {key!r} is cut short (file truncated while reading?)")
        return raw.view(dt).reshape(shape)

    def closest(self, key: str, n: int = 3) -> list[str]:
        import difflib

        return difflib.get_close_matches(key, self.keys(), n=n, cutoff=0.3)


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
    folder = path.parent.resolve()
    for k, v in wm.items():
        if any(ord(c) < 32 for c in v):
            raise CheckpointError(f"{path}: weight_map entry {k!r} names a shard with control characters ({v!r})")
        q = Path(v)
        if q.is_absolute() or ".." in q.parts or "\\" in v or v in ("", ".") or len(q.parts) != 1:
            raise CheckpointError(
                f"{path}: weight_map entry {k!r} -> {v!r} points outside the model folder; shard names must be "
                f"plain file names in {path.parent}")
        if (folder / q).resolve().parent != folder:
            raise CheckpointError(f"{path}: shard {v!r} resolves outside the model folder (a symlink?)")
    return data


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
class Plan:
    """The per-tensor plan of :func:`transform`, and the bound modules it will run."""

    ops: dict[str, TensorOp]
    groups: dict[str, list]  # weight key -> [(adapter index, module name, ModuleAdapter, bias key)]
    key_group: dict[str, str]  # weight or bias key -> weight key of its group
    replaced: dict[str, Any]  # base key -> replacement array (modules_to_save)

    def adapted(self) -> list[TensorOp]:
        return [op for op in self.ops.values() if op.operation not in ("copy",)]

    def bytes_out(self) -> int:
        return sum(op.nbytes for op in self.ops.values())


def _wider(a: np.dtype, b: np.dtype) -> np.dtype:
    order = [DTYPES["F16"], DTYPES["BF16"], np.dtype(np.float32), np.dtype(np.float64)]
    if a not in order or b not in order:
        return a
    if {a, b} == {DTYPES["F16"], DTYPES["BF16"]}:
        return np.dtype(np.float32)
    return max(a, b, key=order.index)


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

    Raises :class:`ShapeError` (naming the adapter, module and tensor) for a module missing from the
    base or whose shapes disagree, before anything is read or written.
    """
    names = list(names) if names is not None else [f"adapter {i}" for i in range(len(adapters))]
    layer_kinds = dict(layer_kinds or {})
    groups: dict[str, list] = {}
    key_group: dict[str, str] = {}
    replaced: dict[str, Any] = {}
    for i, ad in enumerate(adapters):
        if getattr(ad.method, "Module", None) is None:
            raise UnsupportedError(
                f"{names[i]}: {ad.peft_type} adapters add virtual tokens, not weights: there is nothing to "
                f"{direction} into a model (use them with the model's forward instead)")
        for m in ad.modules:
            key = m if f"{m}.weight" in base else module_to_checkpoint(m, base.model_type)
            wkey = f"{key}.weight"
            if wkey not in base:
                near = base.closest(wkey)
                raise ShapeError(
                    f"{names[i]}: adapted module {m!r} has no tensor {wkey!r} in {base.path}"
                    + (f" (closest: {', '.join(near)})" if near else "")
                    + "; is this the adapter's base model?")
            try:
                mod = ad.module(m, weight_shape=base.shape(wkey), kind=layer_kinds.get(m))
            except ShapeError as exc:
                raise ShapeError(f"{names[i]}: {exc} (base tensor {wkey!r} is {base.shape(wkey)} in {base.path})") from None
            bkey = f"{key}.bias"
            groups.setdefault(wkey, []).append((i, m, mod, bkey if bkey in base else None))
            key_group[wkey] = wkey
            if bkey in base:
                key_group[bkey] = wkey
        for k, v in ad.other.items():
            if k not in base:
                raise ShapeError(f"{names[i]}: the adapter replaces {k!r} (modules_to_save), which {base.path} lacks")
            if tuple(v.shape) != base.shape(k):
                raise ShapeError(f"{names[i]}: replacement {k!r} has shape {tuple(v.shape)}, the base has {base.shape(k)}")
            if direction != "merge":
                raise NotInvertibleError(
                    f"{names[i]}: the adapter replaces {k!r} (modules_to_save); the original tensor cannot be "
                    f"recovered from the merged model. Take it from the base model instead")
            replaced[k] = v
    if direction == "unmerge":
        for g in groups.values():
            g.reverse()
    ops: dict[str, TensorOp] = {}
    for fname in base.files:
        for key in base.ordered(fname):
            src = base.dtype(key)
            code = base.dtype_code(key)
            dst = dtype if (dtype is not None and code in _FLOAT_CODES) else src
            shape = base.shape(key)
            nbytes = math.prod(shape) * dst.itemsize
            if key in key_group or key in replaced:
                g = key_group.get(key)
                work = _wider(src, dst)
                mods = [f"{names[i]}:{m}" for i, m, _, _ in groups[g]] if g else []
                op = direction if g else "replace"
                ops[key] = TensorOp(key, op, shape, dtype_name(src), dtype_name(dst), dtype_name(work), nbytes, mods)
            else:
                op = "copy" if dst == src else "cast"
                ops[key] = TensorOp(key, op, shape, dtype_name(src), dtype_name(dst), dtype_name(src), nbytes)
    return Plan(ops, groups, key_group, replaced)


# --- records ----------------------------------------------------------------------------------
def records_path(out: str | os.PathLike, *, folder: bool | None = None) -> Path:
    """Where merge records of model ``out`` live (inside a folder; a sibling of a file).

    >>> records_path("merged.safetensors", folder=False).name
    'merged.safetensors.merge-records.safetensors'
    >>> records_path("merged", folder=True).as_posix()
    'merged/peftmath_merge_records.safetensors'
    """
    p = Path(out)
    is_folder = p.is_dir() if folder is None else folder
    return p / RECORDS_NAME if is_folder else Path(str(p) + RECORDS_SUFFIX)


def read_records(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The records file's tensors (``adapters.<i>.<module>`` -> array), empty when it does not exist."""
    p = Path(path)
    if not p.exists():
        return {}
    f = SafeTensorsFile(p)
    return {k: np.array(f[k]) for k in f}


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


# --- writing ----------------------------------------------------------------------------------
def _check_output(out: Path, inputs: Sequence[Path], force: bool) -> None:
    if out.parent.exists():
        clean_stale_siblings(out)  # leftovers of a killed run
    if not out.parent.exists():
        raise CheckpointError(f"{out}: the parent folder {out.parent} does not exist; create it first")
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


def _write_all(fd: int, data: memoryview) -> None:
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    while view.nbytes:
        n = os.write(fd, view[: 1 << 30])
        view = view[n:]


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    fast = hasattr(os, "copy_file_range")
    while count > 0:
        n = 0
        if fast:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(count, 1 << 30), offset)
            except OSError:
                fast = False
        if not fast:
            chunk = os.pread(src_fd, min(count, 1 << 24), offset)
            if not chunk:
                raise CheckpointError("input file shrank while it was being copied")
            _write_all(dst_fd, memoryview(chunk))
            n = len(chunk)
        if n == 0:
            raise CheckpointError("input file shrank while it was being copied")
        offset += n
        count -= n


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


def transform(
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
    force: bool = False,
    names: Sequence[str] | None = None,
    inputs: Sequence[Path] = (),
    to_xp: Callable[[np.ndarray], Any] | None = None,
    to_host: Callable[[Any], np.ndarray] | None = None,
    progress: Callable[[int], None] | None = None,
    precomputed_plan: Plan | None = None,
) -> Report:
    """Merge (``direction="merge"``) or unmerge ``adapters`` into a copy of ``base`` written at ``out``.

    ``records`` holds the merge records of ``base``, e.g. :func:`read_records` of its
    :func:`records_path`: unmerge takes what it needs from them and keeps the rest; merge keeps them
    all and numbers its own records after them. ``to_xp``/``to_host`` move a tensor to the compute backend and back (NumPy
    by default). ``progress(nbytes)`` is called after each tensor.
    """
    out = Path(out)
    _check_output(out, [base.path, *inputs], force)
    pl = precomputed_plan or plan(base, adapters, direction=direction, dtype=dtype, layer_kinds=layer_kinds, names=names)
    records = dict(records or {})
    if direction == "unmerge":
        for g in pl.groups.values():
            for i, m, mod, _ in g:
                if getattr(mod, "is_dora", False) and _record_for(records, m)[0] is None:
                    raise NotInvertibleError(
                        f"{m}: unmerging DoRA needs the weight norms recorded at merge time, and no record for this "
                        f"module was found (looked in {records_path(base.path)}); merge with `peftmath merge` keeps "
                        f"them there, or pass --records FILE")
    to_xp = to_xp or (lambda a: a)
    to_host = to_host or (lambda a: np.asarray(a))
    rep = Report(out)
    new_records: dict[str, np.ndarray] = {}
    used_records: set[str] = set()
    pending: dict[str, np.ndarray] = {}
    # merging into a model that already carries records (an earlier merge): keep them, number after them
    offset = 1 + max((int(k.split(".", 2)[1]) for k in records if k.startswith("adapters.")), default=-1)

    def compute(wkey: str) -> None:
        group = pl.groups[wkey]
        bkey = group[0][3]
        w_op = pl.ops[wkey]
        work = _np_dtype(w_op.work_dtype)
        W = base.read(wkey)
        if W.dtype != work:
            W = W.astype(work)
        b = None
        if bkey is not None:
            b = base.read(bkey)
            bwork = _np_dtype(pl.ops[bkey].work_dtype)
            if b.dtype != bwork:
                b = b.astype(bwork)
        Wx, bx = to_xp(W), (to_xp(b) if b is not None else None)
        for i, m, mod, _ in group:
            if direction == "merge":
                try:
                    res = mod.merge(Wx, bx, copy=False, safe=safe, peft_compat=peft_compat)
                except UnsupportedError:
                    res = mod.merge(Wx, bx, copy=True, safe=safe, peft_compat=peft_compat)
                if res.record is not None:
                    new_records[f"adapters.{i + offset}.{m}"] = np.ascontiguousarray(to_host(res.record))
            else:
                rkey, rec = _record_for(records, m, used_records) if getattr(mod, "is_dora", False) else (None, None)
                if rec is not None and getattr(mod, "is_dora", False):
                    used_records.add(rkey)
                    rec = to_xp(np.asarray(rec))
                else:
                    rec = None
                try:
                    res = mod.unmerge(Wx, bx, record=rec, copy=False, peft_compat=peft_compat)
                except UnsupportedError:
                    res = mod.unmerge(Wx, bx, record=rec, copy=True, peft_compat=peft_compat)
            Wx, bx = res.weight, (res.bias if res.bias is not None else bx)
        pending[wkey] = to_host(Wx)
        if bkey is not None:
            pending[bkey] = to_host(bx)

    is_folder = base.is_folder
    if is_folder:
        tmp = temp_sibling(out, folder=True)
        targets = {n: tmp / n for n in base.files}
    else:
        tmp = temp_sibling(out)
        targets = {n: tmp for n in base.files}
    rec_tmp: Path | None = None
    try:
        for fname, f in base.files.items():
            keys = base.ordered(fname)
            entries = []
            for k in keys:
                op = pl.ops[k]
                entries.append((k, dtype_code(_np_dtype(op.dst_dtype)), op.shape, op.nbytes))
            head = _header_bytes(entries, f.metadata)
            dst = os.open(targets[fname], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            src = os.open(f.path, os.O_RDONLY)
            try:
                _write_all(dst, memoryview(struct.pack("<Q", len(head)) + head))
                for k in keys:
                    op = pl.ops[k]
                    if op.operation == "copy":
                        start, end = f.span(k)
                        _copy_range(src, dst, start, end - start)
                    else:
                        if op.operation == "cast":
                            arr = base.read(k)
                        elif op.operation == "replace":
                            arr = np.asarray(to_host(pl.replaced[k]))
                        else:
                            if k not in pending:
                                compute(pl.key_group[k])
                            arr = pending.pop(k)
                            rep.adapted += 1
                        arr = np.ascontiguousarray(arr.astype(_np_dtype(op.dst_dtype), copy=False))
                        if safe and arr.dtype.kind == "f" and not all_finite(arr):
                            raise NonFiniteError(
                                f"{k}: the {op.operation} result contains NaN or infinity in {op.dst_dtype}; nothing "
                                f"was written. Check the adapter, or keep a wider --dtype")
                        if arr.dtype.byteorder == ">":
                            arr = arr.astype(arr.dtype.newbyteorder("<"))
                        _write_all(dst, memoryview(arr.reshape(-1).view(np.uint8)))
                    rep.tensors += 1
                    rep.bytes_written += op.nbytes
                    if progress is not None:
                        progress(op.nbytes)
                os.fsync(dst)
            finally:
                os.close(dst)
                os.close(src)
        if is_folder:
            if base.index is not None:
                idx = json.loads(json.dumps(base.index))
                meta = idx.get("metadata")
                if isinstance(meta, dict) and "total_size" in meta:
                    meta["total_size"] = pl.bytes_out()
                (tmp / INDEX_NAME).write_text(json.dumps(idx, indent=2) + "\n", encoding="utf-8")
            for q in sorted(base.folder.iterdir()):
                if (q.is_file() and not q.is_symlink() and q.name not in base.files and q.name != INDEX_NAME
                        and q.name != RECORDS_NAME and not q.name.endswith(_WEIGHT_ENDINGS) and not q.name.startswith(".")):
                    if q.name == "config.json" and dtype is not None and _retag_config(q, tmp / q.name, dtype):
                        continue
                    shutil.copyfile(q, tmp / q.name)
        keep = {k: v for k, v in records.items() if k not in used_records} if direction == "unmerge" else new_records
        if direction == "merge" and records:
            keep = {**records, **new_records}
        if keep:
            meta = {"format": "peftmath-merge-records",
                    "adapters": json.dumps([str(n) for n in (names or [])])}
            if is_folder:
                save_file(keep, tmp / RECORDS_NAME, metadata=meta)
            else:
                rec_tmp = Path(str(tmp) + ".records")
                save_file(keep, rec_tmp, metadata=meta)
            rep.records = len(keep)
        _commit(tmp, out, force, rec_tmp)
        if keep:
            rep.records_file = records_path(out, folder=is_folder)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if rec_tmp is not None:
            rec_tmp.unlink(missing_ok=True)
        raise
    return rep


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


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        return DTYPES["BF16"]
    if name.startswith("float8"):
        return DTYPES["F8_E4M3"] if "e4m3" in name else DTYPES["F8_E5M2"]
    return np.dtype(name)


def _commit(tmp: Path, out: Path, force: bool, rec_tmp: Path | None) -> None:
    """Move the finished ``tmp`` into place as ``out`` (replacing it when ``force``)."""
    old: Path | None = None
    if out.exists() or out.is_symlink():
        if not force:  # re-checked: someone may have created it meanwhile
            raise CheckpointError(f"{out}: already exists; pass --force to replace it")
        old = temp_sibling(out, folder=True, kind="old") / "old"
        os.replace(out, old)
    sidecar = records_path(out, folder=False)
    if not tmp.is_dir():
        if rec_tmp is not None:
            os.replace(rec_tmp, sidecar)
        elif force and sidecar.exists():
            sidecar.unlink()  # a stale record of the replaced output would mislead unmerge
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


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
            for item in base.folder.iterdir():
                if item.is_file() and item.name not in base.files:
                    shutil.copy2(item, tmp / item.name)
            _commit(tmp, out, force, None)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
