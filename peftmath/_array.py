"""Namespace resolution and the few array helpers the array API standard lacks.

Everything here takes arrays of any array-API-compatible library (NumPy, array-api-strict, PyTorch,
JAX, CuPy through array-api-compat) and returns arrays of the same library on the same device.
Nothing here converts to NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_compat
import array_api_extra as xpx
import numpy as np

from .errors import NamespaceError, ShapeError

Array = Any
Namespace = Any

__all__ = [
    "namespace",
    "common_device",
    "is_low_precision",
    "compute_dtype",
    "eps",
    "as_compute",
    "kron",
    "conv",
    "embedding_lookup",
    "all_finite",
    "is_writeable",
    "dtype_name",
]


def namespace(*arrays: Array, where: str = "") -> Namespace:
    """Return the array API namespace shared by ``arrays`` (``None`` entries are skipped).

    Raises :class:`~peftmath.errors.NamespaceError` when the arrays come from different libraries or
    live on different devices: peftmath never copies between them silently.
    """
    present = [a for a in arrays if a is not None and not isinstance(a, (int, float, bool))]
    kind = type(present[0]) if present and all(type(a) is type(present[0]) for a in present) else None
    xp = _NAMESPACE_OF_TYPE.get(kind) if kind is not None else None
    if xp is not None:  # one array type whose namespace depends on the type alone
        if kind is not np.ndarray:  # NumPy arrays all live on the CPU
            common_device(*present, where=where)
        return xp
    try:
        xp = array_api_compat.array_namespace(*present)
    except TypeError as exc:
        kinds = sorted({type(a).__module__ + "." + type(a).__name__ for a in present})
        raise NamespaceError(
            f"{where + ': ' if where else ''}arrays from different array libraries in one call "
            f"({', '.join(kinds)}); convert them to one library first"
        ) from exc
    common_device(*present, where=where)
    if kind is not None and kind.__module__.split(".")[0] in _CACHEABLE:
        _NAMESPACE_OF_TYPE[kind] = xp
    return xp


#: array types whose namespace array_api_compat derives from the type alone (not from per-array
#: state, as array-api-strict's api_version is): cached, since the lookup dominates small calls
_CACHEABLE = ("numpy", "cupy", "torch")
_NAMESPACE_OF_TYPE: dict[type, Namespace] = {}


def common_device(*arrays: Array, where: str = "") -> Any:
    """Return the device all ``arrays`` live on, or raise :class:`NamespaceError`."""
    devices = []
    for a in arrays:
        if a is None or isinstance(a, (int, float, bool)):
            continue
        d = array_api_compat.device(a)
        if d is None:  # a traced value (jax.grad / jit) has no concrete device: it cannot disagree
            continue
        if not any(d == e for e in devices):  # devices need not be hashable (CuPy)
            devices.append(d)
    if len(devices) > 1:
        raise NamespaceError(
            f"{where + ': ' if where else ''}arrays on different devices in one call "
            f"({', '.join(map(str, devices))}); move them to one device first"
        )
    return devices[0] if devices else None


def dtype_name(dtype: Any) -> str:
    """A library-independent name for ``dtype``: ``"float32"``, ``"bfloat16"``, ..."""
    name = str(dtype)
    for prefix in ("torch.", "jnp.", "<class '"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.rstrip("'>").split(".")[-1]


_LOW_PRECISION = ("float16", "bfloat16", "float8")


def is_low_precision(dtype: Any) -> bool:
    """True for float16, bfloat16 and the float8 formats (storage dtypes computed in float32)."""
    name = dtype_name(dtype)
    return any(name.startswith(p) for p in _LOW_PRECISION)


def compute_dtype(xp: Namespace, *dtypes: Any) -> Any:
    """The dtype peftmath computes in for arrays of ``dtypes``.

    float64 if any input is float64, otherwise float32: half-precision storage (float16, bfloat16,
    float8) is widened to float32 and rounded once at the end.
    """
    if any(dtype_name(d) == "float64" for d in dtypes):
        return xp.float64
    return xp.float32


def as_compute(xp: Namespace, x: Array, dtype: Any) -> Array:
    """``x`` cast to ``dtype`` without a copy when it already has it."""
    return x if x.dtype == dtype else xp.astype(x, dtype)


def eps(dtype: Any) -> float:
    """Machine epsilon of ``dtype``, bfloat16 and float8 included."""
    name = dtype_name(dtype)
    table = {
        "float64": 2.0**-52,
        "float32": 2.0**-23,
        "float16": 2.0**-10,
        "bfloat16": 2.0**-7,
        "float8_e4m3fn": 2.0**-3,
        "float8_e5m2": 2.0**-2,
    }
    if name not in table:
        raise ShapeError(f"eps: {name} is not a floating dtype peftmath knows")
    return table[name]


def kron(a: Array, b: Array, *, xp: Namespace | None = None) -> Array:
    """Kronecker product (``numpy.kron`` semantics), from array-api-extra."""
    return xpx.kron(a, b, xp=xp)


def all_finite(x: Array, *, xp: Namespace | None = None) -> bool:
    """True when every element of ``x`` is finite (no NaN, no infinity)."""
    xp = xp or namespace(x)
    return bool(xp.all(xp.isfinite(x)))


def is_writeable(x: Array) -> bool:
    """True when ``x`` can be updated in place (False for JAX arrays and read-only NumPy views)."""
    return bool(array_api_compat.is_writeable_array(x))


def _ntuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ShapeError(f"conv: {name}={value} has {len(value)} entries, expected {n}")
    return value


def conv(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    xp: Namespace | None = None,
) -> Array:
    """N-d cross-correlation with PyTorch's ``conv{1,2,3}d`` semantics, in the array API.

    ``x`` is ``(N, C_in, *spatial)``, ``weight`` is ``(C_out, C_in / groups, *kernel)`` and the
    result is ``(N, C_out, *out_spatial)`` with
    ``out = floor((in + 2 p - d (k - 1) - 1) / s) + 1`` per spatial axis.

    The kernel offsets are gathered with strided slices (im2col) and contracted with one batched
    matmul per group, so the only memory beyond the output is the column buffer
    ``(N, C_in * prod(kernel), prod(out_spatial))``. Zero padding only (PyTorch's default
    ``padding_mode``). ``padding="valid"`` is 0; ``padding="same"`` needs stride 1.
    """
    xp = xp or namespace(x, weight, bias, where="conv")
    nd = weight.ndim - 2
    if x.ndim != nd + 2:
        raise ShapeError(f"conv: input of shape {tuple(x.shape)} does not fit a {nd}-d kernel {tuple(weight.shape)}")
    kernel = tuple(weight.shape[2:])
    stride = _ntuple(stride, nd, "stride")
    dilation = _ntuple(dilation, nd, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            pads = [(0, 0)] * nd
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ShapeError("conv: padding='same' needs stride 1 (as in PyTorch)")
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pads = [(t // 2, t - t // 2) for t in total]
        else:
            raise ShapeError(f"conv: padding={padding!r} is not 'valid', 'same' or a number")
    else:
        pads = [(p, p) for p in _ntuple(padding, nd, "padding")]
    n, c_in = x.shape[0], x.shape[1]
    c_out = weight.shape[0]
    if c_in % groups or c_out % groups or weight.shape[1] * groups != c_in:
        raise ShapeError(
            f"conv: input channels {c_in}, kernel {tuple(weight.shape)} and groups={groups} disagree "
            f"(expected kernel shape[1] * groups == input channels)"
        )
    if any(p for pair in pads for p in pair):
        x = xpx.pad(x, [(0, 0), (0, 0), *pads], xp=xp)
    spatial = tuple(x.shape[2:])
    out_sp = tuple((s - d * (k - 1) - 1) // st + 1 for s, d, k, st in zip(spatial, dilation, kernel, stride))
    if any(o <= 0 for o in out_sp):
        raise ShapeError(f"conv: input spatial size {spatial} is smaller than the dilated kernel {kernel}")
    columns = []
    for offset in _offsets(kernel):
        index = [slice(None), slice(None)]
        for o, d, st, size in zip(offset, dilation, stride, out_sp):
            start = o * d
            index.append(slice(start, start + st * (size - 1) + 1, st))
        columns.append(x[tuple(index)])
    patches = xp.stack(columns, axis=2)  # (N, C_in, K, *out_sp)
    k_total = math.prod(kernel)
    l_total = math.prod(out_sp)
    cols = xp.reshape(patches, (n, groups, (c_in // groups) * k_total, l_total))
    w = xp.reshape(weight, (1, groups, c_out // groups, (c_in // groups) * k_total))
    out = xp.matmul(w, cols)  # (N, groups, C_out / groups, L)
    out = xp.reshape(out, (n, c_out, *out_sp))
    if bias is not None:
        out = out + xp.reshape(bias, (1, c_out) + (1,) * nd)
    return out


def _offsets(kernel: tuple[int, ...]) -> list[tuple[int, ...]]:
    """All kernel offsets in C order (the order of the flattened kernel)."""
    out: list[tuple[int, ...]] = [()]
    for k in kernel:
        out = [o + (i,) for o in out for i in range(k)]
    return out


def embedding_lookup(ids: Array, table: Array, *, xp: Namespace | None = None) -> Array:
    """Rows of ``table`` (V, D) at integer ``ids`` of any shape: result ``(*ids.shape, D)``."""
    xp = xp or namespace(ids, table, where="embedding")
    flat = xp.reshape(ids, (-1,))
    rows = xp.take(table, flat, axis=0)
    return xp.reshape(rows, (*ids.shape, table.shape[1]))
