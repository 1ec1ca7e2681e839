r"""LyCORIS plumbing shared by LoHa (:mod:`peftmath.methods.loha`) and LoKr (:mod:`peftmath.methods.lokr`).

What PEFT's ``peft.tuners.lycoris_utils`` gives both methods, written once (specs/loha.md, specs/lokr.md):

* the config base :class:`LycorisConfig` (rank, alpha, dropouts, effective-conv switch, patterns) and its
  checks, with ``s = alpha / r`` per module (no rsLoRA);
* the layer kinds both adapt (Linear, Conv1d, Conv2d) and PEFT's effective-conv ("CP/Tucker") rule, with
  the CP factor ``F[p, q, h, w] = Σ_{i,j} t[i, j, h, w] · w_a[i, p] · w_b[j, q]``;
* training-time dropout: module dropout first, then rank dropout rows ``1[u_o > p] / mean``;
* the adapted forward ``base(x) + x ΔWᵀ`` / ``base(x) + conv(x, ΔW)``, rounded once;
* merge / unmerge by row blocks of ``ΔW`` (``W ± ΔW`` with no temporary of W's size; the ``copy=True``
  result is filled from ``W`` block by block);
* Kaiming-uniform(a=√5) draws on the host, moved to the caller's namespace.

Nothing here is method specific; a LyCORIS method module imports what it needs from here and never from
another method module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from .._array import as_compute, compute_dtype, conv, is_immutable, is_low_precision, namespace
from ..backends import backend_for, host_rng, kaiming_uniform_bound
from ..config import TunerConfig, check_flags, check_fraction, check_number, check_positive_int, resolve_pattern
from ..errors import ConfigError, ShapeError
from ..layers import Layer, LayerKind
from ._base import apply_delta, require_kind, write_weight
# the row-tile loop of the rotation kernels (per-thread buffers reused across tiles)
from .oft import fresh_result, run_row_tiles, tile_threads

Array = Any

__all__ = [
    "LycorisConfig", "validate_lycoris", "scaling", "SUPPORTED", "check_kind", "uses_effective_conv", "cp_weight",
    "round_to_dtype", "rank_dropout_mask", "draw_dropout", "masked", "adapted_forward", "BLOCK_ELEMENTS", "block_rows",
    "apply_row_blocks", "kaiming", "put_host", "default_xp", "run_row_tiles", "tile_threads",
]

#: the base layer kinds PEFT adapts with LoHa and LoKr
SUPPORTED = (LayerKind.LINEAR, LayerKind.CONV1D, LayerKind.CONV2D)


# --------------------------------------------------------------------------------------------------
# Config (specs/loha.md and specs/lokr.md, "Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class LycorisConfig(TunerConfig):
    """What PEFT's ``LycorisConfig`` gives LoHa and LoKr: rank, alpha, dropouts, the effective-conv
    switch and the per-module patterns, with ``s = alpha / r`` per module."""

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        validate_lycoris(self, source)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """``(r, alpha)`` for ``module_name`` after rank_pattern / alpha_pattern (PEFT's rule)."""
        r = resolve_pattern(self.rank_pattern or {}, module_name, self.r)
        alpha = resolve_pattern(self.alpha_pattern or {}, module_name, self.alpha)
        return r, alpha

    def scaling_for(self, module_name: str) -> float:
        """The scaling ``s = alpha / r`` of ``module_name``."""
        r, alpha = self.rank_and_alpha(module_name)
        return scaling(alpha, r)



def validate_lycoris(config: Any, source: str) -> None:
    """Checks shared by LoHa and LoKr configs."""
    check_positive_int(source, "r", config.r)
    check_number(source, "alpha", config.alpha)
    for name in ("rank_dropout", "module_dropout"):
        check_fraction(source, name, getattr(config, name), closed=True)
    check_flags(source, config, "use_effective_conv2d")
    for pattern in ("rank_pattern", "alpha_pattern"):
        value = getattr(config, pattern)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{source}: field {pattern!r} must be a mapping, got {value!r}")
    for name, value in (config.rank_pattern or {}).items():
        check_positive_int(source, f"rank_pattern[{name!r}]", value)
    for name, value in (config.alpha_pattern or {}).items():
        check_number(source, f"alpha_pattern[{name!r}]", value)


# --------------------------------------------------------------------------------------------------
# Scaling, layer kinds and the CP factor
# --------------------------------------------------------------------------------------------------
def scaling(alpha: float, r: int) -> float:
    """``s = alpha / r`` (LoHa and LoKr have no rsLoRA variant).

    >>> scaling(12, 4)
    3.0
    """
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"LoHa/LoKr rank r must be a positive integer, got {r!r}")
    return alpha / r


def check_kind(layer: Layer, where: str, method: str = "LoHa") -> None:
    """Raise :class:`UnsupportedError` for a layer kind PEFT does not adapt with LoHa / LoKr."""
    conv1d = " (a transformers Conv1D, fan_in_fan_out=True)" if layer.kind is LayerKind.CONV1D_TRANSPOSED else ""
    require_kind(layer, where, method, SUPPORTED,
                 peft=f"it raises TypeError for others{conv1d}. Remove this module from target_modules")


def uses_effective_conv(layer: Layer, use_effective_conv2d: bool) -> bool:
    """PEFT's rule: the CP form applies to Conv1d/Conv2d whose kernel is not all ones.

    >>> uses_effective_conv(Layer.of((8, 4, 3, 3)), True), uses_effective_conv(Layer.of((8, 4, 1, 1)), True)
    (True, False)
    """
    return bool(use_effective_conv2d) and layer.kind.is_conv and math.prod(layer.kernel_size) != 1


def cp_weight(t: Array, w_a: Array, w_b: Array) -> Array:
    """The CP/Tucker factor ``F[p, q, h, w] = Σ_{i,j} t[i, j, h, w] · w_a[i, p] · w_b[j, q]``.

    ``t`` is ``(r, r, kH, kW)``, ``w_a`` is ``(r, p)``, ``w_b`` is ``(r, q)``; the result is
    ``(p, q, kH, kW)`` (PEFT's ``einsum("ijkl,jr,ip->prkl")``, written with two ``tensordot``).

    >>> import numpy as np
    >>> t = np.ones((1, 1, 2, 1)); cp_weight(t, np.array([[2.0, 3.0]]), np.array([[5.0]]))[:, :, :, 0]
    array([[[10., 10.]],
    <BLANKLINE>
           [[15., 15.]]])
    """
    xp = namespace(t, w_a, w_b, where="cp_weight")
    tmp = xp.tensordot(w_b, t, axes=([0], [1]))         # (q, i, h, w)
    return xp.tensordot(w_a, tmp, axes=([0], [1]))      # (p, q, h, w), contiguous (torch.kron needs that)


def round_to_dtype(xp: Any, x: Array, dtype: Any) -> Array:
    """``x`` rounded to a half-precision ``dtype`` and widened back (PEFT's intermediate rounding)."""
    if dtype is None or not is_low_precision(dtype):
        return x
    return xp.astype(xp.astype(x, dtype), x.dtype)


# --------------------------------------------------------------------------------------------------
# Forward: training-time dropout and the adapted layer
# --------------------------------------------------------------------------------------------------
def rank_dropout_mask(
    n: int,
    p: float,
    *,
    seed: int | np.random.Generator | None = None,
    normalize: bool = True,
    xp: Any = None,
    device: Any = None,
) -> Array:
    """PEFT's rank-dropout row mask: keep row ``o`` when ``u_o > p`` (``u ~ U[0, 1)``), divided by its mean.

    Drawn on the host with ``numpy.random.default_rng(seed)`` (PEFT's torch stream cannot be
    reproduced) and returned as float32 of ``xp`` (NumPy by default), shape ``(n,)``. When every row is
    dropped PEFT divides by zero (NaN); here the mask is then all zeros.

    >>> rank_dropout_mask(4, 0.0)
    array([1., 1., 1., 1.], dtype=float32)
    """
    keep = (host_rng(seed).random(n) > p).astype(np.float32)
    if normalize:
        mean = keep.mean(dtype=np.float32)
        keep = keep / mean if mean > 0 else keep
    keep = np.ascontiguousarray(keep, dtype=np.float32)
    if xp is None:
        return keep
    return backend_for(xp).from_host(keep, xp, device)


def draw_dropout(out: int, rank_dropout: float, module_dropout: float, seed: Any, normalize: bool,
                  xp: Any, device: Any) -> tuple[bool, Array | None]:
    """(keep the module?, row mask or None), drawn in PEFT's order: module first, then rows."""
    if not rank_dropout and not module_dropout:
        return True, None
    rng = host_rng(seed)
    if module_dropout and not rng.random() > module_dropout:
        return False, None
    if not rank_dropout:
        return True, None
    return True, rank_dropout_mask(out, rank_dropout, seed=rng, normalize=normalize, xp=xp, device=device)


def masked(xp: Any, delta: Array, mask: Array | None) -> Array:
    if mask is None:
        return delta
    m = as_compute(xp, mask, delta.dtype)
    return delta * xp.reshape(m, (-1,) + (1,) * (delta.ndim - 1))


def adapted_forward(x: Array, W: Array, bias: Array | None, delta: Array, layer: Layer, xp: Any, *,
                    stride: Any = 1, padding: Any = 0, dilation: Any = 1) -> Array:
    """``base(x) + x ΔWᵀ`` or ``base(x) + conv(x, ΔW)``: the adapter term in ``delta``'s dtype, the
    result rounded once to x's dtype (PEFT adds in float32 and casts back to x's dtype)."""
    conv_kwargs = dict(stride=stride, padding=padding, dilation=dilation) if layer.kind.is_conv else {}
    base = layer.base_forward(x, W, bias, xp, **conv_kwargs)
    xin = as_compute(xp, x, delta.dtype)
    if layer.kind.is_conv:
        lo = conv(xin, delta, groups=layer.groups, xp=xp, **conv_kwargs)
    else:
        lo = xp.matmul(xin, xp.matrix_transpose(delta))
    if tuple(lo.shape) != tuple(base.shape):
        raise ShapeError(f"forward: adapter output {tuple(lo.shape)} does not match base output {tuple(base.shape)}")
    return as_compute(xp, as_compute(xp, base, lo.dtype) + lo, x.dtype)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge, row block by row block
# --------------------------------------------------------------------------------------------------
#: elements per row block of ΔW built at a time (1 MiB in float32: the block, its second factor and the
#: rows of W being updated stay in cache; measured fastest on Linear(4096, 4096) among 2^16 ... 2^22)
BLOCK_ELEMENTS = 1 << 18


def block_rows(in_flat: int) -> int:
    """Rows of ΔW's ``(out, in_flat)`` matrix per block: about :data:`BLOCK_ELEMENTS` elements, at least one."""
    return max(1, BLOCK_ELEMENTS // max(1, in_flat))


def update_rows(xp: Any, src: Array, dst: Array, blocks: Callable[[Any], Iterator], cd: Any, sign: int) -> bool:
    """``dst = src ± ΔW`` one row block of ΔW at a time. ``src`` and ``dst`` hold the rows of the
    ``(out, in_flat)`` matrix on their first axis (the stored weight in any layout, or its matrix view);
    ``dst`` may be ``src`` itself (in place)."""
    # NumPy rows C-ordered in cd: one pass per block, src rows ± block straight into dst rows
    plain = (isinstance(src, np.ndarray) and isinstance(dst, np.ndarray) and src.dtype == cd and dst.dtype == cd
             and src.flags.c_contiguous and dst.flags.c_contiguous)
    op = np.add if sign > 0 else np.subtract
    for start, stop, block in blocks(cd):
        cur = src[start:stop, ...]
        if plain:
            op(cur.reshape(block.shape), block, out=dst[start:stop, ...].reshape(block.shape))
        elif dst is src and cur.ndim == 2 and cur.dtype == cd:
            # augmented assignment: in place where getitem is a view, written back otherwise
            if sign > 0:
                dst[start:stop, ...] += block
            else:
                dst[start:stop, ...] -= block
        else:  # widen the rows, add, round once
            cur = as_compute(xp, xp.reshape(cur, tuple(block.shape)), cd)
            new = cur + block if sign > 0 else cur - block
            dst[start:stop, ...] = xp.reshape(as_compute(xp, new, dst.dtype), tuple(dst[start:stop, ...].shape))
            del cur, new
        del block  # free this block before the generator builds the next one
    return True


def apply_row_blocks(
    where: str,
    weight: Array,
    layer: Layer,
    blocks: Callable[[Any], Iterator[tuple[int, int, Array]]],
    full_delta: Callable[[], Array],
    *,
    param_dtypes: tuple = (),
    sign: int = 1,
    copy: bool = True,
    safe: bool = False,
    peft_compat: bool = False,
    numpy_rows: Callable[[np.ndarray, np.ndarray, Any, int], bool] | None = None,
    params: tuple = (),
) -> Array:
    """``W ± ΔW`` where ``ΔW`` is produced as row blocks of its ``(out, in_flat)`` matrix view.

    ``blocks(cd)`` yields ``(start, stop, block)`` with ``block`` the rows ``start:stop`` of ``ΔW`` in
    compute dtype ``cd``; ``full_delta()`` builds the whole ``ΔW`` (stored layout) for the generic path;
    ``numpy_rows(src, dst, cd, sign)``, when given, does the same on NumPy arrays with its own reused
    buffers and returns True (False: not handled, the blocks are used); ``params`` are the adapter's
    tensors (a torch parameter recording gradients keeps the out-of-place path). Each element is formed in
    float32 (float64 with float64 inputs) and rounded once to W's dtype, as
    :func:`~peftmath.methods._base.apply_delta` does, and written by its one write path:

    * ``copy=False``: updates ``W`` in place, row block by row block of its first axis (the matrix
      rows; views in any layout, Fortran order and torch ``channels_last`` included), with no temporary
      of W's size; arrays that cannot be written raise :class:`UnsupportedError`.
    * ``copy=True``: one allocation of W's size, a C-ordered copy of ``W`` that the same row-block kernel
      then updates in place (measured faster than filling a new array block by block from ``W``:
      ``benchmarks/bench_lycoris.py``); where the kernel declines, the result is filled from ``W``.
    * ``safe=True``: the result is formed in a new array and checked before anything is written.
    * ``peft_compat=True``, and arrays that are never written (JAX, dask): the whole ``ΔW`` is built
      (``full_delta``) and added.
    """
    xp = namespace(weight, where=where)
    layer.check_weight(weight)
    cd = compute_dtype(xp, weight.dtype, *param_dtypes)
    if peft_compat or is_immutable(weight):
        return apply_delta(where, weight, full_delta, sign=sign, copy=copy, safe=safe, kernel_on_copy=False, xp=xp)

    def rows(src: Array, dst: Array) -> bool:
        if numpy_rows is not None and isinstance(src, np.ndarray) and isinstance(dst, np.ndarray):
            if numpy_rows(src, dst, cd, sign):
                return True
        return update_rows(xp, src, dst, blocks, cd, sign)

    def new() -> Array:
        out = fresh_result(weight, *params)
        if out is None:  # torch recording gradients: the whole ΔW, added out of place (keeps the graph)
            return apply_delta(where, weight, full_delta, sign=sign, kernel_on_copy=False, xp=xp)
        rows(weight, out)
        return out

    # copy=True: the kernel on a private copy of W (kernel_on_copy); new() where it declines, and where a
    # parameter records gradients (new() then keeps the autograd graph)
    records = any(getattr(a, "requires_grad", False) for a in params if a is not None)
    if records:
        import torch

        records = torch.is_grad_enabled()
    return write_weight(where, weight, new, kernel=lambda W: rows(W, W), copy=copy, safe=safe,
                        kernel_on_copy=not records, xp=xp)


# --------------------------------------------------------------------------------------------------
# Initialisation helpers
# --------------------------------------------------------------------------------------------------
def kaiming(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch's ``kaiming_uniform_(a=√5)``: ``U(±1/sqrt(fan_in))``, ``fan_in = prod(shape[1:])``."""
    bound = kaiming_uniform_bound(math.prod(shape[1:]))
    return rng.uniform(-bound, bound, shape)


def put_host(arrays: dict[str, np.ndarray], xp: Any, device: Any, dtype: Any) -> dict[str, Array]:
    """Host float arrays as arrays of ``xp`` on ``device`` with ``dtype`` (float32 by default)."""
    backend = backend_for(xp)
    out = {}
    for key, arr in arrays.items():
        a = backend.from_host(np.ascontiguousarray(arr, dtype=np.float32), xp, device)
        target = dtype if dtype is not None else xp.float32
        out[key] = a if a.dtype == target else xp.astype(a, target)
    return out


def default_xp() -> Any:
    import array_api_compat.numpy as xp_np

    return xp_np
