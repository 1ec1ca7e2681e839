"""The array libraries' own convolutions, behind :func:`peftmath._array.conv`.

:func:`peftmath._array.conv` checks and normalises its arguments once, then asks :func:`native_conv`
for the library's own convolution and uses :func:`peftmath._array.reference_conv` (portable, one matmul
per kernel offset) when there is none. Every function here takes the normalised arguments

* ``stride``, ``dilation``: one int per spatial axis;
* ``padding``: one ``(lo, hi)`` pair of zero padding per spatial axis (``"same"`` already resolved,
  an odd total's extra element in ``hi``, as PyTorch does);
* ``groups``: an int already checked against the shapes,

and returns the convolution with :func:`~peftmath._array.reference_conv`'s semantics (the same shape,
the result dtype ``result_type(x, weight)`` and then ``bias``'s promotion, the same values within
rounding), or ``None``, touching nothing, when it cannot (another array type, a dtype the library's
convolution does not take or would compute less precisely, more than 3 spatial axes): the caller then
runs the reference. A declined call is never an error.

Which function serves which arrays: the backend's ``conv`` hook (:meth:`peftmath.backends.Backend.conv`,
with this signature), which calls the function below for its library (the CuPy plugin calls
:func:`shifted_gemm_conv` with CuPy):

=========  ==================================================================================
torch      ``torch.nn.functional.conv{1,2,3}d`` (autograd flows; any device; channels_last
           inputs give channels_last outputs, equal values); asymmetric padding by ``F.pad`` first
jax        ``jax.lax.conv_general_dilated`` (``jax.grad`` and ``jit`` flow); half precision
           accumulated in float32 and rounded once
numpy      :func:`shifted_gemm_conv`: stride 1, float32/float64 (half precision computed in float32);
           other strides and dtypes: the reference
=========  ==================================================================================

array-api-strict (even wrapping NumPy), dask and any other namespace get the reference.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._array import Array, Namespace, _offsets, is_low_precision

__all__ = ["native_conv", "torch_conv", "jax_conv", "numpy_conv", "shifted_gemm_conv"]

Pads = tuple[tuple[int, int], ...]


def native_conv(xp: Namespace, x: Array, weight: Array, bias: Array | None, *, stride: tuple[int, ...],
                padding: Pads, dilation: tuple[int, ...], groups: int) -> Array | None:
    """The library's own convolution of ``x`` (``None`` when it has none for these arrays)."""
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    from .backends import backend_for

    hook = getattr(backend_for(xp), "conv", None)  # a plugin written before the hook may lack it
    return None if hook is None else hook(x, weight, bias, **kw)


def _add_bias(out: Array, bias: Array | None) -> Array:
    """``out + bias`` broadcast over the channel axis (the reference's promotion)."""
    if bias is None:
        return out
    return out + bias.reshape((1, bias.shape[0]) + (1,) * (out.ndim - 2))


# --------------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------------
def _torch_tf32_conv_possible(torch: Any) -> bool:
    """True when cuDNN may run a float32 convolution in TF32 while float32 matmuls (the reference's
    path) are IEEE: torch's defaults (``torch.backends.cudnn.allow_tf32`` / ``conv.fp32_precision``
    ``"tf32"``, ``torch.get_float32_matmul_precision() == "highest"``). Unknown flags count as TF32."""
    if torch.get_float32_matmul_precision() != "highest":
        return False  # the user accepts reduced-precision float32 products: the reference has them too
    cudnn = torch.backends.cudnn
    precision = getattr(getattr(cudnn, "conv", None), "fp32_precision", "none")
    if precision == "ieee":
        return False
    if precision == "tf32":
        return True
    try:
        return bool(cudnn.allow_tf32)
    except Exception:  # noqa: BLE001 — torch refuses to answer when legacy and new flags were mixed
        return True


def torch_conv(x: Array, weight: Array, bias: Array | None, *, stride: tuple[int, ...], padding: Pads,
               dilation: tuple[int, ...], groups: int) -> Array | None:
    """``torch.nn.functional.conv{1,2,3}d`` with the normalised arguments.

    Floating dtypes only (float16, bfloat16, float32, float64; the operands promoted to
    ``result_type(x, weight)``; half precision with a wider bias in float32); the bias goes into the
    call when it has that dtype and is added after it otherwise (the reference's promotion). Asymmetric padding (``"same"`` with an even dilated
    kernel) is done by ``F.pad`` first, so torch never pads on its own. On CUDA a float32 convolution
    is declined while cuDNN may use TF32 and float32 matmuls may not (:func:`_torch_tf32_conv_possible`):
    the reference's matmul is then more precise than cuDNN would be.
    """
    import torch
    import torch.nn.functional as F

    arrays = (x, weight) if bias is None else (x, weight, bias)
    if not all(isinstance(a, torch.Tensor) for a in arrays):
        return None
    nd = weight.ndim - 2
    dt = torch.promote_types(x.dtype, weight.dtype)
    if nd not in (1, 2, 3) or dt not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return None
    final = dt if bias is None else torch.promote_types(dt, bias.dtype)
    if final != dt and dt in (torch.float16, torch.bfloat16):
        dt = torch.float32  # a wider bias: the reference's float32 sum, rounded once to the bias's dtype
    if x.device.type == "cuda" and dt == torch.float32 and _torch_tf32_conv_possible(torch):
        return None
    x, weight = x.to(dt), weight.to(dt)
    if all(lo == hi for lo, hi in padding):
        pad: Any = tuple(lo for lo, _ in padding)
    else:
        x = F.pad(x, [v for lo_hi in reversed(padding) for v in lo_hi])
        pad = 0
    inner = bias if bias is not None and bias.dtype == dt else None
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    out = fn(x, weight, inner, stride=stride, padding=pad, dilation=dilation, groups=groups)
    return out if inner is not None else _add_bias(out, bias)


# --------------------------------------------------------------------------------------------------
# JAX
# --------------------------------------------------------------------------------------------------
def jax_conv(x: Array, weight: Array, bias: Array | None, *, stride: tuple[int, ...], padding: Pads,
             dilation: tuple[int, ...], groups: int) -> Array | None:
    """``jax.lax.conv_general_dilated`` (``rhs_dilation`` = dilation, ``feature_group_count`` = groups,
    NC(D)(H)W layouts) with the normalised arguments, at JAX's configured default precision (the
    precision of the reference's ``matmul``). Half precision is accumulated in float32
    (``preferred_element_type``), the bias added in float32 and the sum rounded once."""
    import jax
    import jax.numpy as jnp

    arrays = (x, weight) if bias is None else (x, weight, bias)
    if not all(isinstance(a, jax.Array) for a in arrays):
        return None
    nd = weight.ndim - 2
    dt = jnp.result_type(x.dtype, weight.dtype)
    names = ("float16", "bfloat16", "float32", "float64")
    if nd not in (1, 2, 3) or str(dt) not in names:
        return None
    half = str(dt) in names[:2]
    spatial = "DHW"[3 - nd:]
    out = jax.lax.conv_general_dilated(
        x.astype(dt), weight.astype(dt), window_strides=stride, padding=list(padding), rhs_dilation=dilation,
        dimension_numbers=("NC" + spatial, "OI" + spatial, "NC" + spatial), feature_group_count=groups,
        preferred_element_type=jnp.float32 if half else None,
    )
    if not half:
        return _add_bias(out, bias)
    final = dt if bias is None else jnp.result_type(dt, bias.dtype)
    return _add_bias(out, None if bias is None else bias.astype(jnp.float32)).astype(final)


# --------------------------------------------------------------------------------------------------
# NumPy (and CuPy, through the plugin): shifted windows of the flattened padded input, one gemm each
# --------------------------------------------------------------------------------------------------
def shifted_gemm_conv(lib: Any, x: Array, weight: Array, bias: Array | None, *, stride: tuple[int, ...],
                      padding: Pads, dilation: tuple[int, ...], groups: int,
                      chunk_bytes: int = 8 << 20) -> Array | None:
    """Stride-1 convolution for NumPy-like modules ``lib`` (``numpy``, ``cupy``) in float32/float64
    (half precision: computed in float32, bias included, and rounded once).

    Lay the zero-padded input out channels first, the samples' flattened padded grids side by side:
    ``flat[c, n·P + q]`` (``P = prod(padded)``, ``q = Σ q_i S_i`` with ``S_i = prod(padded[i+1:])``). For
    stride 1, output position ``p`` of sample ``n`` reads ``flat[:, n·P + Σ p_i S_i + o(k)]`` for kernel
    offset ``k``, ``o(k) = Σ k_i d_i S_i``: over the *wide* grid ``(N, out_1, padded_2, ..., padded_d)``
    every kernel offset reads one contiguous column range of ``flat``, a strided matrix view that BLAS
    takes with its leading dimension (no copy). Hence, per group ``g``,

    ``wide[g] = Σ_k W[g, :, :, k] @ flat[g, :, o(k) : o(k) + (N - 1)·P + out_1·S_1]``

    (one gemm per offset and column chunk of ``chunk_bytes`` of output, accumulated), and the result is
    the wide grid's first ``out_i`` positions of each trailing axis, moved to ``(N, C_out, ...)``. The
    other positions (a row's tail, the rows between samples) are computed and discarded; ``flat`` carries
    ``Σ_{i≥2} (k_i - 1) d_i S_i`` zeros after the last grid so that the last offset's range stays inside it.

    Memory beyond the result: the padded flat input (input-sized), the wide output (output-sized,
    slightly wider) and one product of at most ``chunk_bytes``; im2col's column buffer would be
    ``prod(kernel)`` times the input. Declines (``None``) other strides and dtypes.
    """
    arrays = (x, weight) if bias is None else (x, weight, bias)
    if not all(isinstance(a, lib.ndarray) for a in arrays) or any(s != 1 for s in stride):
        return None
    dt = np.dtype(lib.result_type(x.dtype, weight.dtype))  # CuPy's dtypes are NumPy's
    final = dt if bias is None else np.result_type(dt, bias.dtype)
    if is_low_precision(dt):
        dt = np.dtype(np.float32)  # half precision: computed in float32 (widened by the padding copy)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        return None
    nd = weight.ndim - 2
    n, c_in, c_out = x.shape[0], x.shape[1], weight.shape[0]
    kernel = tuple(weight.shape[2:])
    padded = tuple(s + lo + hi for s, (lo, hi) in zip(x.shape[2:], padding))
    out_sp = tuple(p - d * (k - 1) for p, d, k in zip(padded, dilation, kernel))
    size = math.prod(padded)
    steps = tuple(math.prod(padded[i + 1:]) for i in range(nd))
    tail = sum((k - 1) * d * s for k, d, s in zip(kernel[1:], dilation[1:], steps[1:]))
    # channels first, samples side by side: (C_in, N·P + tail), zero padded
    flat = lib.zeros((c_in, n * size + tail), dtype=dt)
    inner = flat[:, : n * size].reshape((c_in, n) + padded)
    inner[(slice(None), slice(None)) + tuple(slice(lo, lo + s) for (lo, _), s in zip(padding, x.shape[2:]))] = \
        lib.moveaxis(x, 1, 0)
    cin_g, cout_g = c_in // groups, c_out // groups
    taps = math.prod(kernel)
    # (taps, groups, C_out / groups, C_in / groups): one small contiguous matrix stack per offset
    w = lib.ascontiguousarray(lib.moveaxis(weight.astype(dt, copy=False).reshape((groups, cout_g, cin_g, taps)), 3, 0))
    used = (n - 1) * size + out_sp[0] * steps[0] if n else 0  # the last sample's wide grid ends here
    wide = lib.empty((groups, cout_g, n * size), dtype=dt)
    cols = max(1, chunk_bytes // max(1, c_out * dt.itemsize))
    product = lib.empty((groups, cout_g, min(cols, used)), dtype=dt) if taps > 1 and used else None
    starts = [sum(k * d * s for k, d, s in zip(off, dilation, steps)) for off in _offsets(kernel)]
    for a in range(0, used, cols):
        b = min(a + cols, used)
        for t, o in enumerate(starts):
            window = flat[:, a + o:b + o].reshape((groups, cin_g, b - a))  # a view (BLAS reads its stride)
            if t == 0:
                lib.matmul(w[0], window, out=wide[:, :, a:b])
            else:
                lib.matmul(w[t], window, out=product[:, :, : b - a])
                wide[:, :, a:b] += product[:, :, : b - a]
    del flat, product
    grid = wide.reshape((c_out, n) + padded)[(slice(None), slice(None)) + tuple(slice(0, o) for o in out_sp)]
    out = lib.ascontiguousarray(lib.moveaxis(grid, 0, 1))
    del wide, grid
    if bias is not None and np.result_type(dt, bias.dtype) == dt:
        out += bias.reshape((1, c_out) + (1,) * nd)
    else:
        out = _add_bias(out, bias)
    return out if out.dtype == final else out.astype(final)  # half precision: rounded once


def numpy_conv(x: Array, weight: Array, bias: Array | None, **kw: Any) -> Array | None:
    """NumPy's convolution: :func:`shifted_gemm_conv` (float32/float64, stride 1), else ``None``."""
    return shifted_gemm_conv(np, x, weight, bias, **kw)

