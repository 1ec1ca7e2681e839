"""Namespace resolution and the few array helpers the array API standard lacks.

Everything here takes arrays of any array-API-compatible library (NumPy, array-api-strict, PyTorch,
JAX, CuPy through array-api-compat) and returns arrays of the same library on the same device.
Nothing here converts to NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat
import array_api_extra as xpx
import numpy as np

from .errors import NamespaceError, ShapeError

Array = Any
Namespace = Any

#: NumPy submodules that NumPy imports on first access and no peftmath computation uses (numpy.random stays
#: eager: widely used, cheap, and Python 3.11's LazyLoader is not safe when two threads touch a module first)
_DEFERRED_NUMPY = ("f2py", "testing", "ma", "polynomial", "ctypeslib")


def _defer_numpy_submodules() -> None:
    """Make array_api_compat's NumPy namespace cheap to import, with the same contents.

    ``array_api_compat.numpy`` copies every public attribute of NumPy when it is first imported (``from numpy
    import *``), and so imports the submodules NumPy itself loads only on first access: ``numpy.f2py`` (with
    charset_normalizer), ``numpy.testing`` (with unittest), ``numpy.ma``, ... -- about 0.1 s of every merge's
    start-up, for modules no merge uses. Before that happens, each of :data:`_DEFERRED_NUMPY` not imported yet
    is registered as a lazy module (:class:`importlib.util.LazyLoader`): one module object, in ``sys.modules``
    and as NumPy's attribute (so ``xp.testing is numpy.testing``), executed on its first attribute access
    (``numpy.testing.assert_allclose`` works as before; ``import numpy.testing`` returns it). Nothing happens
    when ``array_api_compat.numpy`` is imported already, or for a submodule imported already.
    """
    import importlib.util
    import sys

    if "array_api_compat.numpy" in sys.modules:
        return
    for name in _DEFERRED_NUMPY:
        full = f"numpy.{name}"
        if full in sys.modules or name in vars(np):
            continue
        try:
            spec = importlib.util.find_spec(full)
        except (ImportError, ValueError):
            continue
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            continue
        loader = importlib.util.LazyLoader(spec.loader)
        spec.loader = loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        loader.exec_module(module)  # (executes nothing yet)
        setattr(np, name, module)


_defer_numpy_submodules()

__all__ = [
    "namespace",
    "refuse_where",
    "common_device",
    "is_low_precision",
    "compute_dtype",
    "eps",
    "as_compute",
    "kron",
    "conv",
    "reference_conv",
    "embedding_lookup",
    "all_finite",
    "is_writeable",
    "why_not_writeable",
    "is_immutable",
    "data_address",
    "is_view_of",
    "reshape_view",
    "transpose_view",
    "contiguous_copy",
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
    key = (type(dtype), dtype)  # the type first: dtypes of two libraries are never compared with each other
    try:
        return _DTYPE_NAMES[key]
    except (KeyError, TypeError):  # TypeError: an unhashable dtype object
        pass
    name = _dtype_name(dtype)
    try:
        _DTYPE_NAMES[key] = name
    except TypeError:
        pass
    return name


#: dtype -> its name: ``str(dtype)`` costs microseconds (NumPy builds the string each time), more than a
#: small merge's arithmetic; dtypes are few and immutable
_DTYPE_NAMES: dict[tuple[type, Any], str] = {}


def _dtype_name(dtype: Any) -> str:
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


def widest_float(xp: Namespace, *dtypes: Any) -> Any:
    """float64 where the array library computes in it (JAX without x64 does not: it would truncate with a
    warning), else :func:`compute_dtype` of ``dtypes`` (float32 for none): the dtype of a decomposition
    that must be as exact as the library allows (FRoD's U, AdaMSS's subspaces)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if xp.asarray(0.0, dtype=xp.float64).dtype == xp.float64:
                return xp.float64
        except Exception:  # noqa: BLE001 - a library without float64
            pass
    return compute_dtype(xp, *dtypes) if dtypes else xp.float32


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


def refuse_where(value: Array, bad: Array, error: Callable[[], Exception], *, xp: Namespace | None = None) -> Array:
    """``value``, refused with ``error()`` when any element of ``bad`` is true: a check on values (a zero
    scale, a singular factor) that must not compute a lazy input.

    Eager libraries check now (one ``bool``) and return ``value`` itself. On dask the check joins
    ``value``'s task graph and raises when ``value`` is computed: nothing is computed here, and a refused
    result can never be read. ``error`` may compute details for its message (it runs only on failure).

    >>> import numpy as np
    >>> refuse_where(np.ones(2), np.array([False, False]), lambda: ValueError("zero")).tolist()
    [1.0, 1.0]
    """
    xp = xp or namespace(value, bad, where="refuse_where")
    if array_api_compat.is_dask_array(value) or array_api_compat.is_dask_array(bad):
        import dask.array as da

        return da.map_blocks(_raise_if, da.asarray(value), da.any(bad), error, dtype=value.dtype)
    if bool(xp.any(bad)):
        raise error()
    return value


def _raise_if(block: Array, flag: Any, error: Callable[[], Exception]) -> Array:
    """One chunk of :func:`refuse_where` on dask: the chunk itself, or ``error()`` when ``flag``."""
    if bool(flag):
        raise error()
    return block


def is_writeable(x: Array) -> bool:
    """True when ``x`` can be updated in place (see :func:`why_not_writeable`)."""
    return why_not_writeable(x) is None


def why_not_writeable(x: Array) -> str | None:
    """Why an in-place write into ``x`` cannot happen (a phrase naming the layout), or None when it can.

    Refused: a read-only NumPy array (a read-only memory map, a broadcast view), a JAX array
    (immutable), a lazy dask array (``x[...] = v`` rebuilds its task graph instead of writing memory),
    a PyTorch leaf tensor that requires grad while autograd is on (PyTorch itself refuses the write),
    an expanded NumPy or torch view (a zero stride: one location holds several elements), and any
    other array that array-api-compat reports as not writeable.
    """
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:
            return "a read-only numpy.ndarray (a read-only memory map or a broadcast view)"
        return _overlap(x.shape, x.strides, "numpy.ndarray")
    if array_api_compat.is_torch_array(x):
        import torch

        if x.requires_grad and x.is_leaf and torch.is_grad_enabled():
            return ("a torch leaf tensor that requires grad (PyTorch refuses in-place writes to it; merge under "
                    "torch.no_grad() or pass weight.detach())")
        return _overlap(tuple(x.shape), x.stride(), "torch tensor")
    if array_api_compat.is_jax_array(x):
        return "a JAX array (JAX arrays are immutable)"
    if array_api_compat.is_dask_array(x):
        return "a lazy dask array (an assignment rebuilds its task graph instead of writing memory)"
    if not array_api_compat.is_writeable_array(x):
        return f"an immutable {type(x).__module__}.{type(x).__name__}"
    return None


def _overlap(shape: Sequence[int], strides: Sequence[int], what: str) -> str | None:
    """The reason a strided array cannot be written element by element: a zero stride over an axis of
    more than one element (an expanded / broadcast view) makes several elements share one location."""
    if any(st == 0 and n > 1 for n, st in zip(shape, strides)):
        return f"an expanded {what} (a stride of 0: several elements share one memory location)"
    return None


def is_immutable(x: Array) -> bool:
    """True for arrays of libraries that never write in place, copies included (JAX, dask)."""
    return bool(array_api_compat.is_jax_array(x) or array_api_compat.is_dask_array(x))


def data_address(x: Array) -> int | None:
    """The memory address of ``x``'s first element, or None where the library does not expose one.

    NumPy: ``__array_interface__``; PyTorch: ``data_ptr()`` (storage offset included); CuPy:
    ``data.ptr``; any other library through a zero-copy DLPack view on the host, when it has one.
    """
    if isinstance(x, np.ndarray):
        return int(x.__array_interface__["data"][0])
    if array_api_compat.is_torch_array(x):
        return int(x.data_ptr())
    if array_api_compat.is_cupy_array(x):
        return int(x.data.ptr)
    if is_immutable(x):
        return None
    try:
        return int(np.from_dlpack(x).__array_interface__["data"][0])
    except Exception:  # no host DLPack view (another device, no __dlpack__): the address is unknown
        return None


def is_view_of(view: Array, x: Array) -> bool:
    """True when ``view`` is proven to alias ``x``: writing ``view`` writes ``x``'s memory.

    For a reshape or a transpose of ``x`` (which keep element 0 first), equal first-element addresses
    are the proof: a copy is a fresh allocation and cannot start inside ``x``'s live memory. False when
    the library exposes no address (the caller then writes ``x[...] = result`` instead).
    """
    if math.prod(x.shape) == 0:
        return True
    a, b = data_address(x), data_address(view)
    return a is not None and a == b


def reshape_view(x: Array, shape: tuple[int, ...], *, xp: Namespace | None = None) -> Array | None:
    """``x`` reshaped to ``shape`` as a proven view of ``x`` (see :func:`is_view_of`), or None when that
    shape needs a copy: a Fortran-ordered, permuted or column-sliced conv weight, a torch
    ``channels_last`` tensor.

    Uses the standard's ``reshape(copy=False)`` (never copies; NumPy raises ValueError, array-api-strict
    AttributeError, PyTorch RuntimeError through ``view``) and checks the address on top.
    """
    if tuple(x.shape) == tuple(shape):
        return x
    xp = xp or namespace(x)
    try:
        v = xp.reshape(x, tuple(shape), copy=False)
    except (ValueError, AttributeError, RuntimeError, NotImplementedError, TypeError):
        return None
    return v if is_view_of(v, x) else None


def transpose_view(x: Array, *, xp: Namespace | None = None) -> Array | None:
    """``matrix_transpose(x)`` as a proven view of ``x``, or None (the standard does not promise a view)."""
    xp = xp or namespace(x)
    v = xp.matrix_transpose(x)
    return v if is_view_of(v, x) else None


def contiguous_copy(x: Array, *, xp: Namespace | None = None) -> Array:
    """A new C-ordered array equal to ``x`` (any layout in), so that its matrix views are views: the
    standard's ``reshape(copy=True)`` of the flattened array, reshaped back."""
    xp = xp or namespace(x)
    return xp.reshape(xp.reshape(x, (-1,), copy=True), tuple(x.shape))


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
    ``out = floor((in + 2 p - d (k - 1) - 1) / s) + 1`` per spatial axis; its dtype is the promotion of
    ``x``'s and ``weight``'s (then ``bias``'s). Zero padding only (PyTorch's default ``padding_mode``).
    ``padding="valid"`` is 0; ``padding="same"`` needs stride 1 and puts an odd total padding's extra
    element after the input (as PyTorch does).

    The arguments are checked here, once; the work goes to the array library's own convolution where
    :func:`peftmath._conv.native_conv` has one (torch's ``conv{1,2,3}d``, JAX's
    ``lax.conv_general_dilated``, a backend's ``conv`` hook, NumPy's shifted-window gemms), and to
    :func:`reference_conv` otherwise (array-api-strict, dask, any other namespace or dtype).
    """
    xp = xp or namespace(x, weight, bias, where="conv")
    stride, pads, dilation = _conv_arguments(x, weight, groups, stride, padding, dilation)
    from ._conv import native_conv

    out = native_conv(xp, x, weight, bias, stride=stride, padding=pads, dilation=dilation, groups=groups)
    if out is not None:
        return out
    return reference_conv(x, weight, bias, stride=stride, padding=pads, dilation=dilation, groups=groups, xp=xp)


def _conv_arguments(
    x: Array, weight: Array, groups: int, stride: Any, padding: Any, dilation: Any
) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...], tuple[int, ...]]:
    """:func:`conv`'s arguments checked and normalised: ``(stride, ((lo, hi) per axis), dilation)``."""
    nd = weight.ndim - 2
    if nd < 1 or x.ndim != nd + 2:
        raise ShapeError(f"conv: input of shape {tuple(x.shape)} does not fit a {nd}-d kernel {tuple(weight.shape)}")
    kernel = tuple(weight.shape[2:])
    stride = _ntuple(stride, nd, "stride")
    dilation = _ntuple(dilation, nd, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            pads = ((0, 0),) * nd
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ShapeError("conv: padding='same' needs stride 1 (as in PyTorch)")
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pads = tuple((t // 2, t - t // 2) for t in total)
        else:
            raise ShapeError(f"conv: padding={padding!r} is not 'valid', 'same' or a number")
    else:
        pads = tuple((p, p) for p in _ntuple(padding, nd, "padding"))
    c_in, c_out = x.shape[1], weight.shape[0]
    if c_in % groups or c_out % groups or weight.shape[1] * groups != c_in:
        raise ShapeError(
            f"conv: input channels {c_in}, kernel {tuple(weight.shape)} and groups={groups} disagree "
            f"(expected kernel shape[1] * groups == input channels)"
        )
    spatial = tuple(s + lo + hi for s, (lo, hi) in zip(x.shape[2:], pads))
    if any(s - d * (k - 1) - 1 < 0 for s, d, k in zip(spatial, dilation, kernel)):
        raise ShapeError(f"conv: input spatial size {spatial} is smaller than the dilated kernel {kernel}")
    return stride, pads, dilation


def reference_conv(
    x: Array,
    weight: Array,
    bias: Array | None,
    *,
    stride: tuple[int, ...],
    padding: tuple[tuple[int, int], ...],
    dilation: tuple[int, ...],
    groups: int,
    xp: Namespace,
) -> Array:
    """The portable convolution (arguments already checked by :func:`conv`: ``padding`` is one
    ``(lo, hi)`` pair per spatial axis). One matmul per kernel offset, accumulated:

    ``out[g, :, (n, l)] = Σ_offsets W[g, :, :, offset] @ x_pad[g, :, (n, offset·d + l·s)]``

    with the input laid out channels first, so that the shifted, strided window of the padded input
    (a slice) is one ``(C_in, N·L)`` matrix per offset. The memory beyond the output is the padded
    input, one window (input-sized), one product and the accumulated sum (output-sized), not the
    ``prod(kernel)``-fold column buffer of im2col. Half-precision operands (float16, bfloat16) are
    computed in float32, bias included, and the sum rounded once to the result dtype.
    """
    dt = xp.result_type(x.dtype, weight.dtype)
    if not is_low_precision(dt):
        return _offset_matmuls(x, weight, bias, stride, padding, dilation, groups, xp)
    final = dt if bias is None else xp.result_type(dt, bias.dtype)
    x, weight = as_compute(xp, x, xp.float32), as_compute(xp, weight, xp.float32)
    if bias is not None and is_low_precision(bias.dtype):
        bias = as_compute(xp, bias, xp.float32)
    return xp.astype(_offset_matmuls(x, weight, bias, stride, padding, dilation, groups, xp), final)


def _offset_matmuls(x: Array, weight: Array, bias: Array | None, stride: tuple[int, ...],
                    padding: tuple[tuple[int, int], ...], dilation: tuple[int, ...], groups: int,
                    xp: Namespace) -> Array:
    """:func:`reference_conv`'s sum of one matmul per kernel offset, in the operands' dtype."""
    nd = weight.ndim - 2
    kernel = tuple(weight.shape[2:])
    n, c_in = x.shape[0], x.shape[1]
    c_out = weight.shape[0]
    # channels first, so that one offset's window is one (C_in, N·L) matrix: one gemm per group and
    # offset rather than one per sample
    x = xp.permute_dims(x, (1, 0, *range(2, nd + 2)))
    if any(p for pair in padding for p in pair):
        x = xpx.pad(x, [(0, 0), (0, 0), *padding], xp=xp)
    spatial = tuple(x.shape[2:])
    out_sp = tuple((s - d * (k - 1) - 1) // st + 1 for s, d, k, st in zip(spatial, dilation, kernel, stride))
    cin_g, cout_g = c_in // groups, c_out // groups
    columns = n * math.prod(out_sp)
    taps = math.prod(kernel)
    # each reshape merges or splits axes, never both at once: chunked libraries (dask) refuse the mix.
    # The offsets first, as one C-ordered copy (the weight is small): each offset's matrices are then
    # contiguous (a strided slice of the last axis sends torch's and NumPy's matmul down slow paths)
    w = xp.permute_dims(xp.reshape(weight, (c_out, cin_g, taps)), (2, 0, 1))
    w = xp.reshape(contiguous_copy(w, xp=xp), (taps, groups, cout_g, cin_g))
    out = None
    for k, offset in enumerate(_offsets(kernel)):
        index = [slice(None), slice(None)]
        for o, d, st, size in zip(offset, dilation, stride, out_sp):
            index.append(slice(o * d, o * d + st * (size - 1) + 1, st))
        window = xp.reshape(x[tuple(index)], (c_in, columns))
        window = xp.reshape(window, (groups, cin_g, columns))
        term = xp.matmul(w[k, ...], window)  # (groups, C_out / groups, N·L)
        if out is None:
            out = term
        else:
            out += term  # in place where the library is mutable; a new array otherwise (dask, JAX)
    out = xp.reshape(xp.reshape(out, (c_out, columns)), (c_out, n, *out_sp))
    if bias is not None:
        b = xp.reshape(bias, (c_out, 1) + (1,) * nd)
        if xp.result_type(out.dtype, bias.dtype) == out.dtype:
            out += b
        else:
            out = out + b
    return contiguous_copy(xp.permute_dims(out, (1, 0, *range(2, nd + 2))), xp=xp)  # (N, C_out, *out_sp)


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
