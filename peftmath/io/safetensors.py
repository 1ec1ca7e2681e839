"""A small, strict safetensors reader and writer on NumPy (bfloat16 / float8 through ml_dtypes).

Format: 8 bytes little-endian header length ``N``, ``N`` bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the
data buffer; offsets are relative to the start of the buffer, tensors are C-ordered little-endian.

Reading parses the header with the standard library and memory-maps the data (no copy; the arrays are
read-only views). Every inconsistency raises :class:`~peftmath.errors.CheckpointError` naming the file
and the field: header length, JSON, dtype, shape, offsets (inside the buffer, matching
``prod(shape) * itemsize``, neither overlapping nor leaving gaps), duplicate names.

Writing goes to a temporary file beside the target that is renamed into place when complete, so a
crash never leaves a partial file under the target name.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError

__all__ = ["SafeTensorsFile", "load_file", "save_file", "DTYPES", "dtype_code", "atomic_path", "ml_dtypes"]

_NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
#: safetensors codes whose NumPy dtype comes from ml_dtypes (imported on first use: it takes ~0.9 s)
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_ORDER = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8",
          "BOOL")
#: bytes per element of every code, so that a header is checked without importing ml_dtypes
_ITEMSIZE = {**{c: dt.itemsize for c, dt in _NUMPY_DTYPES.items()}, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def ml_dtypes() -> Any:
    """The ``ml_dtypes`` module, imported on first use (bfloat16 and float8 arrays need it; nothing else does)."""
    import ml_dtypes as mod

    return mod


class _DtypeTable(Mapping):
    """safetensors dtype code -> NumPy dtype. The codes are fixed; the ml_dtypes ones (``BF16``,
    ``F8_*``) import ml_dtypes when first looked up, so reading a float32 model never imports it."""

    def __init__(self) -> None:
        self._known: dict[str, np.dtype] = dict(_NUMPY_DTYPES)

    def __getitem__(self, code: str) -> np.dtype:
        try:
            return self._known[code]
        except (KeyError, TypeError):
            pass
        if not isinstance(code, str) or code not in _ML_DTYPES:
            raise KeyError(code)
        dt = self._known[code] = np.dtype(getattr(ml_dtypes(), _ML_DTYPES[code]))
        return dt

    def __contains__(self, code: object) -> bool:
        return isinstance(code, str) and code in _ORDER

    def __iter__(self) -> Iterator[str]:
        return iter(_ORDER)

    def __len__(self) -> int:
        return len(_ORDER)


#: safetensors dtype code -> NumPy dtype (bfloat16 / float8 through ml_dtypes, imported when first needed)
DTYPES: Mapping[str, np.dtype] = _DtypeTable()
_NUMPY_CODES = {v: k for k, v in _NUMPY_DTYPES.items()}

MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library enforces
MAX_TENSORS = 1_000_000


def dtype_code(dtype: Any) -> str:
    """The safetensors code of a NumPy dtype (``"BF16"`` for ml_dtypes.bfloat16, ...)."""
    try:
        dt = np.dtype(dtype)
    except TypeError:  # a name such as "bfloat16" that NumPy knows once ml_dtypes is imported
        try:
            dt = np.dtype(getattr(ml_dtypes(), str(dtype), dtype))
        except TypeError as exc:
            raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from exc
    code = _NUMPY_CODES.get(dt)
    if code is None and dt.name in _ML_DTYPES.values():  # an ml_dtypes dtype: ml_dtypes is imported already
        code = next(c for c, n in _ML_DTYPES.items() if DTYPES[c] == dt)
    if code is None:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")
    return code


def _clean(name: str) -> str:
    """A tensor name safe to print on a terminal (control characters escaped)."""
    text = str(name)
    if text.isprintable():  # (the common case, one C loop: every header entry's name passes here)
        return text[:200]
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)[:200]


class SafeTensorsFile(Mapping):
    """A memory-mapped safetensors file: a read-only mapping ``name -> numpy array``.

    >>> import tempfile, os, numpy as np
    >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, p)
    >>> f = SafeTensorsFile(p); f.shape("w"), f.dtype_code("w"), float(f["w"][1, 2])
    ((2, 3), 'F32', 5.0)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        p = self.path
        if p.suffix == ".bin" or p.name.endswith((".pt", ".pth", ".ckpt", ".pkl")):
            raise CheckpointError(
                f"{p}: pickle checkpoints are never loaded (they can run arbitrary code); convert it to "
                f"safetensors with a trusted tool, e.g. PeftModel.from_pretrained(...).save_pretrained(dir)"
            )
        try:
            size = p.stat().st_size
            with open(p, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{p}: file of {size} bytes is too short for a safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES:
                    raise CheckpointError(f"{p}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
                if 8 + n > size:
                    raise CheckpointError(f"{p}: header length {n} runs past the end of the file ({size} bytes); truncated?")
                raw = fh.read(n)
        except OSError as exc:
            raise CheckpointError(f"{p}: cannot read ({exc.strerror or exc})") from exc
        self.data_offset = 8 + n
        self.data_size = size - self.data_offset
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{p}: header is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{p}: header is not valid JSON ({exc.msg} at char {exc.pos})") from exc
        except ValueError as exc:
            raise CheckpointError(f"{p}: {exc}") from exc
        if not isinstance(header, dict):
            raise CheckpointError(f"{p}: header is a JSON {type(header).__name__}, expected an object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise CheckpointError(f"{p}: __metadata__ must map strings to strings")
        if len(header) > MAX_TENSORS:
            raise CheckpointError(f"{p}: {len(header)} tensors exceed the limit of {MAX_TENSORS}")
        self.metadata: dict[str, str] = meta
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int, str]] = {}
        for name, info in header.items():
            self._entries[name] = self._check_entry(name, info)
        spans = sorted((b, e, k) for k, (_, _, b, e, _) in self._entries.items())
        pos = 0
        for b, e, k in spans:
            if b != pos:
                what = "overlaps the previous tensor" if b < pos else f"leaves a gap of {b - pos} bytes"
                raise CheckpointError(f"{p}: tensor {_clean(k)!r} at data offset {b} {what}")
            pos = e
        if pos != self.data_size:
            raise CheckpointError(
                f"{p}: tensors cover {pos} bytes of the {self.data_size}-byte data buffer (truncated or padded file)"
            )
        self._map: np.ndarray | None = None

    def _check_entry(self, name: str, info: Any) -> tuple[np.dtype, tuple[int, ...], int, int, str]:
        p, k = self.path, _clean(name)
        if not isinstance(info, dict):
            raise CheckpointError(f"{p}: entry {k!r} is not an object")
        code = info.get("dtype")
        if code not in DTYPES:
            raise CheckpointError(f"{p}: tensor {k!r} has unknown dtype {_clean(code)!r}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise CheckpointError(f"{p}: tensor {k!r} has an invalid shape {shape!r}")
        offs = info.get("data_offsets")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise CheckpointError(f"{p}: tensor {k!r} has invalid data_offsets {offs!r}")
        b, e = offs
        if not 0 <= b <= e <= self.data_size:
            raise CheckpointError(
                f"{p}: tensor {k!r} data_offsets [{b}, {e}] fall outside the {self.data_size}-byte data buffer"
            )
        dtype = _NUMPY_DTYPES.get(code)  # None for the ml_dtypes codes: resolved when a tensor is read (_dtype)
        nbytes = math.prod(shape) * _ITEMSIZE[code]
        if e - b != nbytes:
            raise CheckpointError(
                f"{p}: tensor {k!r} is {code} {tuple(shape)} ({nbytes} bytes) but data_offsets span {e - b} bytes"
            )
        return dtype, tuple(shape), b, e, code

    # --- Mapping ------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> np.ndarray:
        try:
            _, shape, b, e, _ = self._entries[name]
        except KeyError:
            raise KeyError(name) from None
        dtype = self.dtype(name)
        if b == e:
            return np.zeros(shape, dtype=dtype)
        if self._map is None:  # the map as a plain (read-only) ndarray: every slice, view and reshape of a
            # np.memmap subclass runs its __array_finalize__ (0.16 s over a 300-tensor adapter); the ndarray view
            # keeps the mapping alive through its base
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r").view(np.ndarray)
        start = self.data_offset + b
        return self._map[start:start + (e - b)].view(dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        """The tensor's NumPy dtype (bfloat16 / float8: ml_dtypes', imported here on first use, not when the header
        is read: a merge that reads bfloat16 as bits never imports it)."""
        dtype, _, _, _, code = self._entries[name]
        return dtype if dtype is not None else DTYPES[code]

    def dtype_code(self, name: str) -> str:
        return self._entries[name][4]

    def nbytes(self, name: str) -> int:
        _, _, b, e, _ = self._entries[name]
        return e - b

    def span(self, name: str) -> tuple[int, int]:
        """Absolute byte range ``[start, end)`` of tensor ``name``'s data in the file."""
        _, _, b, e, _ = self._entries[name]
        return self.data_offset + b, self.data_offset + e

    def close(self) -> None:
        self._map = None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {_clean(k)!r} in the header")
        out[k] = v
    return out


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as read-only memory-mapped NumPy arrays."""
    f = SafeTensorsFile(path)
    return {k: f[k] for k in f}


def atomic_path(target: Path) -> Path:
    """A fresh temporary path beside ``target`` (same folder, so a rename is atomic); the leftovers of
    killed runs beside ``target`` are removed first."""
    from .atomic import clean_stale_siblings, temp_sibling

    clean_stale_siblings(Path(target))
    return temp_sibling(Path(target))


def save_file(
    tensors: Mapping[str, Any],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (name -> NumPy array) to ``path`` atomically (temporary file, then rename).

    Tensors are written in sorted name order, as the safetensors library does.
    """
    target = Path(path)
    arrays = {}
    for k, v in tensors.items():
        a = np.asarray(v)
        if not a.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d tensor into shape (1,))
            a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":  # safetensors is little-endian
            a = a.astype(a.dtype.newbyteorder("<"))
        arrays[k] = a
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    names = sorted(arrays)
    for k in names:
        a = arrays[k]
        code = dtype_code(a.dtype)
        header[k] = {"dtype": code, "shape": list(a.shape), "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = atomic_path(target)
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for k in names:
                a = arrays[k]
                if a.dtype.byteorder == ">":
                    a = a.astype(a.dtype.newbyteorder("<"))
                fh.write(memoryview(a.reshape(-1).view(np.uint8)))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
