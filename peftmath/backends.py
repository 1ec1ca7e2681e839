"""Backends: what the array API standard does not provide.

The method code in :mod:`peftmath.methods` is written once against the array API. A backend adds
only what the standard lacks:

* **random numbers** — initialisation draws on the host with :class:`numpy.random.Generator` and
  moves the result, so one seed gives the same numbers on every backend (:func:`host_rng`,
  :meth:`Backend.from_host`);
* **fast in-place kernels** — :meth:`Backend.addmm_` computes ``M += alpha * B @ A`` in place
  without a temporary of ``M``'s size; a backend that cannot returns ``False`` and the caller uses
  the generic array-API path, which gives the same result within rounding;
* **host transfer** for I/O (:meth:`Backend.to_host`, :meth:`Backend.from_host`);
* **stop_gradient** for the few places where PEFT detaches a value (DoRA's weight norm);
* **batched inverse and solve** (:meth:`Backend.inv`, :meth:`Backend.solve`) of ``(..., b, b)`` stacks
  (OFT's unmerge and exact Cayley map, BOFT): ``xp.linalg`` by default; dask, whose ``linalg`` takes one
  matrix only, solves each chunk of the stack with NumPy, lazily. A singular block is a
  :class:`~peftmath.errors.NotInvertibleError`; a library that cannot do it is an
  :class:`~peftmath.errors.UnsupportedError` naming the library, never reported as a singular block;
* **fused in-place passes** for DoRA (:meth:`Backend.rescale_rows_`, :meth:`Backend.dora_merge_`,
  :meth:`Backend.dora_unmerge_`), IA3 (:meth:`Backend.scale_`) and the mixed-batch forward
  (:meth:`Backend.lora_gather_`), with the same contract as ``addmm_``: do it in place and say so, or
  touch nothing and return False / None;
* **native convolution** (:meth:`Backend.conv`): the library's own convolution (torch's ``F.conv*d``,
  JAX's ``lax.conv_general_dilated``, shifted-window gemms on NumPy and CuPy) behind
  :func:`peftmath._array.conv`, or None and the portable reference runs.

**The kernels' side of the in-place contract** (design §3.9, :mod:`peftmath.methods._base`): the
caller gives an in-place kernel only arrays that alias the caller's memory (the weight itself, or a
matrix view proven to be a view by :meth:`peftmath.layers.Layer.matrix_view`), never a copy made by a
reshape. A kernel therefore writes its result through the array it was given, whatever its strides,
or declines (False / None) without touching it: it must not copy its target (``ascontiguousarray``,
an f2py copy) and report success. A layout a kernel cannot handle (NumPy's BLAS path takes C- or
F-contiguous matrices only) is declined, and the caller computes out of place and stores the result.

Backends are found through the entry-point group ``peftmath.backends``. NumPy, PyTorch, JAX, dask and the
generic array-API fallback register there from peftmath's own ``pyproject.toml``; the CuPy backend
lives in its own distribution (``backends/cupy``) and registers the same way.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import array_api_compat
import numpy as np

from ._array import all_finite, dtype_name, is_low_precision
from .errors import BackendError, NotInvertibleError, UnsupportedError

Array = Any
Namespace = Any

__all__ = [
    "Backend",
    "NumpyBackend",
    "TorchBackend",
    "JaxBackend",
    "DaskBackend",
    "ArrayAPIBackend",
    "host_rng",
    "get_backend",
    "backend_for",
    "available_backends",
    "register_backend",
]

ENTRY_POINT_GROUP = "peftmath.backends"


@runtime_checkable
class Backend(Protocol):
    """What a backend provides. Every method has a generic fallback in :class:`ArrayAPIBackend`."""

    name: str

    def handles(self, xp: Namespace) -> bool:
        """True when this backend serves arrays of namespace ``xp``."""

    def namespace(self) -> Namespace:
        """The array namespace this backend serves (``--backend NAME``, ``load_adapter(backend=...)``);
        :class:`~peftmath.errors.BackendError` when its library is not installed."""

    def from_host(self, a: np.ndarray, xp: Namespace, device: Any = None) -> Array:
        """A host (NumPy) array as an array of ``xp`` on ``device``."""

    def to_host(self, x: Array) -> np.ndarray:
        """An array of this backend as a NumPy array (bfloat16 through ml_dtypes)."""

    def addmm_(self, m: Array, b: Array, a: Array, alpha: float) -> bool:
        """``m += alpha * b @ a`` in place into ``m``'s own memory (``m`` aliases the caller's weight);
        return False (touching nothing) when not possible."""

    def stop_gradient(self, x: Array) -> Array:
        """``x`` with gradients blocked (identity for libraries without autodiff)."""

    def rescale_rows_(self, m: Array, magnitude: Array) -> Array:
        """DoRA's rescale, in place: ``n = ‖m_o‖`` per row, ``m_o *= magnitude_o / n_o`` (0 where
        ``n_o = 0``); returns ``n``."""

    def dora_merge_(self, m: Array, b: Array, a: Array, alpha: float, magnitude: Array) -> Array | None:
        """DoRA's merge in place: ``V = m + alpha·b@a``, ``n = ‖V_o‖`` per row, ``m ← (magnitude / n) ⊙ V``
        (rows with ``n_o = 0`` become 0); returns ``n``, or None (touching nothing) when not possible.
        ``magnitude`` is in the compute dtype."""

    def dora_unmerge_(self, m: Array, b: Array, a: Array, alpha: float, q: Array) -> bool:
        """DoRA's unmerge in place: ``m ← q ⊙ m + alpha·b@a`` row-wise (``q = n / magnitude``, ``alpha = −s``);
        False (touching nothing) when not possible."""

    def lora_gather_(self, y: Array, x: Array, a_stack: Array, b_stack: Array, idx: Array) -> bool:
        """The mixed batch's adapter terms, in place: ``y[b, t] += b_stack[idx[b]] @ (a_stack[idx[b]] @ x[b, t])``
        (``y`` (R, T, out), ``x`` (R, T, in), ``a_stack`` (N, r, in), ``b_stack`` (N, out, r)); False
        (touching nothing) when not possible."""

    def scale_(self, w: Array, s: Array, inverse: bool) -> bool:
        """IA3 in place: ``w ← w ⊙ s`` (``w / s`` when ``inverse``), ``s`` in the compute dtype and
        broadcast against ``w``, the product rounded once to ``w``'s dtype; False when not possible."""

    def conv(self, x: Array, weight: Array, bias: Array | None, *, stride: tuple[int, ...],
             padding: tuple[tuple[int, int], ...], dilation: tuple[int, ...], groups: int) -> Array | None:
        """The library's own N-d cross-correlation with :func:`peftmath._array.conv`'s semantics, the
        arguments already checked and normalised (one stride and dilation per spatial axis, one
        ``(lo, hi)`` zero-padding pair per axis, ``'same'`` resolved); None, touching nothing, when it
        has none for these arrays (then :func:`peftmath._array.reference_conv` runs)."""

    def inv(self, a: Array, *, where: str, what: str = "a block") -> Array:
        """The inverse of every ``(b, b)`` matrix of the stack ``a (..., b, b)``. A singular one raises
        :class:`~peftmath.errors.NotInvertibleError` (a lazy library: when the result is computed); a
        library that cannot invert the stack raises :class:`~peftmath.errors.UnsupportedError`."""

    def solve(self, a: Array, b: Array, *, where: str) -> Array:
        """``a⁻¹ b`` for every pair of ``(n, n)`` / ``(n, k)`` matrices of the stacks ``a`` and ``b``
        (same leading shape), with the errors of :meth:`inv`."""

    def eigh_range(self, a: Array, lo: int, hi: int) -> Array | None:
        """The eigenvectors ``(n, hi − lo)`` of the symmetric ``a (n, n)`` whose eigenvalues rank ``lo, …,
        hi − 1`` in ascending order (columns in that order); None when the library has no symmetric
        eigensolver (then the caller takes another route)."""


def _import_namespace(module: str, backend: str, package: str) -> Namespace:
    """Import the namespace module of ``backend``, or raise :class:`BackendError` saying what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendError(f"backend {backend!r} needs {package} ({exc}); pip install {package}, "
                           f"or leave out --backend") from exc


def host_rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    """The host random generator for ``seed`` (a Generator is passed through)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


class ArrayAPIBackend:
    """The generic fallback: any array-API namespace, no fast kernels."""

    name = "array_api"

    def handles(self, xp: Namespace) -> bool:
        return True

    def namespace(self) -> Namespace:
        """array-api-strict, the standard's reference namespace (the generic backend serves any namespace;
        asked for one by name, it gives the strict one)."""
        return _import_namespace("array_api_strict", self.name, "array-api-strict")

    def from_host(self, a: np.ndarray, xp: Namespace, device: Any = None) -> Array:
        if device is None:
            return xp.asarray(a)
        return xp.asarray(a, device=device)

    def to_host(self, x: Array) -> np.ndarray:
        return np.asarray(x)

    def addmm_(self, m: Array, b: Array, a: Array, alpha: float) -> bool:
        return False

    def stop_gradient(self, x: Array) -> Array:
        return x

    def rescale_rows_(self, m: Array, magnitude: Array) -> Array:
        import array_api_compat

        xp = array_api_compat.array_namespace(m)
        n = xp.sqrt(xp.vecdot(m, m, axis=-1))
        zero = n == 0
        g = xp.where(zero, xp.zeros_like(n), magnitude / xp.where(zero, xp.ones_like(n), n))
        m *= g[:, None]
        return n

    def dora_merge_(self, m: Array, b: Array, a: Array, alpha: float, magnitude: Array) -> Array | None:
        # W += alpha·BA in place (one pass), then the rows' norms and the rescale
        if m.dtype != magnitude.dtype or not self.addmm_(m, b, a, alpha):
            return None
        return self.rescale_rows_(m, magnitude)

    def dora_unmerge_(self, m: Array, b: Array, a: Array, alpha: float, q: Array) -> bool:
        return False

    def lora_gather_(self, y: Array, x: Array, a_stack: Array, b_stack: Array, idx: Array) -> bool:
        return False

    def scale_(self, w: Array, s: Array, inverse: bool) -> bool:
        return False

    def conv(self, x: Array, weight: Array, bias: Array | None, **kw: Any) -> Array | None:
        return None

    def inv(self, a: Array, *, where: str, what: str = "a block") -> Array:
        xp = array_api_compat.array_namespace(a)
        try:
            out = xp.linalg.inv(a)
        except Exception as exc:  # noqa: BLE001 — sorted into singular / unsupported below
            raise _linalg_error(exc, self.name, "inv", where, what, a) from exc
        if not all_finite(out, xp=xp):  # libraries that return inf/NaN instead of raising (JAX)
            raise NotInvertibleError(f"{where}: {what} is singular (its inverse is not finite); the weight is "
                                     f"unchanged")
        return out

    def solve(self, a: Array, b: Array, *, where: str) -> Array:
        xp = array_api_compat.array_namespace(a, b)
        try:
            return xp.linalg.solve(a, b)
        except Exception as exc:  # noqa: BLE001 — sorted into singular / unsupported below
            raise _linalg_error(exc, self.name, "solve", where, "a matrix", a) from exc

    def eigh_range(self, a: Array, lo: int, hi: int) -> Array | None:
        xp = array_api_compat.array_namespace(a)
        eigh = getattr(xp.linalg, "eigh", None)  # dask has none
        return None if eigh is None else eigh(a)[1][:, lo:hi]


def _is_singular(exc: BaseException) -> bool:
    """True for the error a library raises for a singular matrix (NumPy's and array-api-strict's
    ``LinAlgError``, torch's ``torch.linalg.LinAlgError``, CuPy's), not for a refusal of the call."""
    return isinstance(exc, np.linalg.LinAlgError) or "LinAlgError" in type(exc).__name__


def _linalg_error(exc: Exception, backend: str, op: str, where: str, what: str, a: Array) -> Exception:
    """A failed batched ``inv`` / ``solve`` as peftmath's error: a singular matrix is
    :class:`NotInvertibleError`; anything else is the library refusing the call (:class:`UnsupportedError`
    naming it and the shape), never reported as a singular block."""
    if _is_singular(exc):
        return NotInvertibleError(f"{where}: {what} is singular and cannot be inverted ({exc}); the weight is "
                                  f"unchanged")
    return UnsupportedError(
        f"{where}: the {backend!r} backend cannot compute a batched linalg.{op} of shape {tuple(a.shape)} "
        f"({type(exc).__name__}: {exc}); register a backend whose {op} handles stacks (peftmath.backends), "
        f"or use another array library"
    )


def _host_inv(a: np.ndarray, where: str, what: str) -> np.ndarray:
    """NumPy's batched inverse of one chunk, with peftmath's singular-block error (run by dask)."""
    try:
        out = np.linalg.inv(a)
    except np.linalg.LinAlgError as exc:
        raise NotInvertibleError(f"{where}: {what} is singular and cannot be inverted ({exc}); the weight "
                                 f"is unchanged") from exc
    if not np.all(np.isfinite(out)):
        raise NotInvertibleError(f"{where}: {what} is singular (its inverse is not finite); the weight is "
                                 f"unchanged")
    return out


def _host_solve(a: np.ndarray, b: np.ndarray, where: str) -> np.ndarray:
    """NumPy's batched solve of one chunk, with peftmath's singular-matrix error (run by dask)."""
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError as exc:
        raise NotInvertibleError(f"{where}: a matrix is singular and cannot be inverted ({exc}); the weight "
                                 f"is unchanged") from exc


def _gemm_(c: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float) -> bool:
    """``c ← c + alpha·(a @ b)`` in place for a float32 / float64 NumPy matrix ``c``, C- or F-contiguous
    (or a unit-stride view of one): OpenBLAS's CBLAS through ctypes (:mod:`peftmath._cblas`: no SciPy
    import, the same library and bits as SciPy's gemm), else ``scipy.linalg.blas``. False, touching
    nothing, for another dtype or layout."""
    from . import _cblas

    if _cblas.gemm_(c, a, b, alpha):
        return True
    from scipy.linalg import blas

    gemm = {np.dtype(np.float32): blas.sgemm, np.dtype(np.float64): blas.dgemm}.get(c.dtype)
    if gemm is None:
        return False
    a = a.astype(c.dtype, copy=False)
    b = b.astype(c.dtype, copy=False)
    if c.flags.f_contiguous:
        out = gemm(alpha, a, b, beta=1.0, c=c, overwrite_c=True)
        target = c
    elif c.flags.c_contiguous:
        # cᵀ is F-contiguous: cᵀ += alpha·bᵀ@aᵀ updates c's own memory.
        out = gemm(alpha, b.T, a.T, beta=1.0, c=c.T, overwrite_c=True)
        target = c.T
    else:
        return False
    if not np.shares_memory(out, target):  # f2py copied: never happens for the layouts above
        raise BackendError("numpy backend: BLAS gemm did not update the weight in place")
    return True


def _tile_gemm_(tile: np.ndarray, b: np.ndarray, a: np.ndarray, alpha: float) -> None:
    """:func:`_gemm_` on a C-contiguous float32 row tile, which every path accepts; a refusal would leave the
    tile unmerged, so it is an error, never skipped (every tile of a weight has the same layout: the first one
    would fail, before anything is written back)."""
    if not _gemm_(tile, b, a, alpha):
        raise BackendError(f"numpy backend: no BLAS gemm took the float32 row tile {tile.shape} (strides "
                           f"{tile.strides}); the weight is unchanged")


class NumpyBackend(ArrayAPIBackend):
    """NumPy: BLAS gemm with beta=1 for in-place merges, float32 row tiles for half precision."""

    name = "numpy"
    #: rows per float32 tile when updating a float16/bfloat16 matrix in place (about 4 MiB per tile)
    tile_bytes = 4 << 20
    #: threads for the row-wise passes NumPy runs on one core (DoRA's norm and rescale). 1 by default:
    #: on a 2-core machine OpenBLAS's own threads keep spinning after a gemm and extra threads here made
    #: the rescale slower (measured); raise it on machines with cores to spare
    threads = 1

    def rescale_rows_(self, m: Array, magnitude: Array) -> Array:
        """Norm and rescale fused per cache-sized tile of rows, tiles spread over :attr:`threads`."""
        if not isinstance(m, np.ndarray) or m.ndim != 2 or not isinstance(magnitude, np.ndarray):
            return super().rescale_rows_(m, magnitude)
        out = np.empty(m.shape[0], dtype=np.result_type(m.dtype, magnitude.dtype))
        rows = max(1, (256 << 10) // max(1, m.itemsize * m.shape[1]))  # a tile stays in L2 between the passes

        def work(start: int, stop: int) -> None:
            for a in range(start, stop, rows):
                b = min(a + rows, stop)
                tile = m[a:b]
                n = np.sqrt(np.einsum("ij,ij->i", tile, tile))
                g = np.divide(magnitude[a:b], n, out=np.zeros_like(n), where=n != 0)
                tile *= g[:, None].astype(tile.dtype, copy=False)
                out[a:b] = n

        count = min(self.threads, max(1, m.shape[0] // rows))
        if count <= 1:
            work(0, m.shape[0])
            return out
        from concurrent.futures import ThreadPoolExecutor

        bounds = np.linspace(0, m.shape[0], count + 1).astype(int)
        with ThreadPoolExecutor(count) as pool:  # NumPy releases the GIL in these loops
            list(pool.map(lambda i: work(int(bounds[i]), int(bounds[i + 1])), range(count)))
        return out

    def handles(self, xp: Namespace) -> bool:
        return array_api_compat.is_numpy_namespace(xp)

    def namespace(self) -> Namespace:
        """The namespace this backend serves (``load_adapter(backend="numpy")``)."""
        import array_api_compat.numpy as xp

        return xp

    def from_host(self, a: np.ndarray, xp: Namespace, device: Any = None) -> Array:
        return np.asarray(a)

    def eigh_range(self, a: Array, lo: int, hi: int) -> Array | None:
        """LAPACK's ``?syevr`` through SciPy for only the wanted eigenvectors: for 16 of 4096, about a third of
        the time of the full ``numpy.linalg.eigh`` (the tridiagonal reduction is left)."""
        if not isinstance(a, np.ndarray) or hi <= lo:
            return super().eigh_range(a, lo, hi)
        from scipy.linalg import eigh

        return eigh(a, subset_by_index=(lo, hi - 1), driver="evr", check_finite=False)[1]

    def conv(self, x: Array, weight: Array, bias: Array | None, **kw: Any) -> Array | None:
        from ._conv import numpy_conv

        return numpy_conv(x, weight, bias, **kw)

    def addmm_(self, m: Array, b: Array, a: Array, alpha: float) -> bool:
        if not (isinstance(m, np.ndarray) and isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            return False
        if m.ndim != 2 or not m.flags.writeable or m.shape != (b.shape[0], a.shape[1]):
            return False
        if m.dtype in (np.float32, np.float64):
            return _gemm_(m, b, a, alpha)
        if is_low_precision(m.dtype):
            return self._addmm_half_(m, b, a, alpha)
        return False

    def _float32_tiles(self, m: np.ndarray, update) -> None:
        """Run ``update(start, stop, tile)`` on float32 row tiles of ``m`` (about :attr:`tile_bytes`
        each), ``tile`` holding ``m[start:stop]`` widened, and round each tile once back into ``m``.

        One reused float32 buffer (a fresh tile per step costs page faults); ``copyto`` widens and rounds
        (round-to-nearest-even, as ``astype``) without temporaries, through any strides of ``m``. A C-ordered
        bfloat16 ``m`` is widened and rounded on its bits instead (:mod:`peftmath.io.bf16`: the same bits, 2x
        faster than ml_dtypes' casts)."""
        from .io.bf16 import is_bf16, round_bf16, widen_bf16

        bits = is_bf16(m.dtype) and m.flags.c_contiguous
        rows = max(1, self.tile_bytes // (4 * max(1, m.shape[1])))
        buf = np.empty((min(rows, m.shape[0]), m.shape[1]), dtype=np.float32)
        for start in range(0, m.shape[0], rows):
            stop = min(start + rows, m.shape[0])
            tile = buf[: stop - start]
            if bits:
                widen_bf16(m[start:stop], out=tile)
            else:
                np.copyto(tile, m[start:stop], casting="unsafe")
            update(start, stop, tile)
            if bits:
                round_bf16(tile, out=m[start:stop])
            else:
                np.copyto(m[start:stop], tile, casting="unsafe")

    def _addmm_half_(self, m: np.ndarray, b: np.ndarray, a: np.ndarray, alpha: float) -> bool:
        """Row tiles in float32: widen, gemm with beta=1, round once, write back."""
        a32 = np.asarray(a, dtype=np.float32)
        b32 = np.asarray(b, dtype=np.float32)
        self._float32_tiles(m, lambda i, j, tile: _tile_gemm_(tile, b32[i:j], a32, alpha))
        return True

    @staticmethod
    def _numpy_matrices(m: Array, *others: Array) -> bool:
        return (isinstance(m, np.ndarray) and m.ndim == 2 and m.flags.writeable
                and all(isinstance(x, np.ndarray) for x in others))

    def dora_merge_(self, m: Array, b: Array, a: Array, alpha: float, magnitude: Array) -> Array | None:
        """float32 / float64 ``m``: gemm with beta=1, then the fused tiled norm and rescale
        (:meth:`rescale_rows_`). float16 / bfloat16 ``m``: per float32 row tile, widen, gemm with beta=1,
        the rows' norms and the rescale, rounded once back into ``m`` (no float32 temporary of its size)."""
        if not (self._numpy_matrices(m, b, a, magnitude) and is_low_precision(m.dtype)
                and magnitude.dtype == np.float32 and m.shape == (b.shape[0], a.shape[1])):
            return super().dora_merge_(m, b, a, alpha, magnitude)
        a32 = np.asarray(a, dtype=np.float32)
        b32 = np.asarray(b, dtype=np.float32)
        norm = np.empty(m.shape[0], dtype=np.float32)

        def update(i: int, j: int, tile: np.ndarray) -> None:
            _tile_gemm_(tile, b32[i:j], a32, alpha)
            n = np.sqrt(np.einsum("ij,ij->i", tile, tile))
            tile *= np.divide(magnitude[i:j], n, out=np.zeros_like(n), where=n != 0)[:, None]
            norm[i:j] = n

        self._float32_tiles(m, update)
        return norm

    def dora_unmerge_(self, m: Array, b: Array, a: Array, alpha: float, q: Array) -> bool:
        """``m ← q ⊙ m + alpha·b@a`` for a float16 / bfloat16 ``m``: per float32 row tile, widen, scale the
        rows, gemm with beta=1, round once back (no float32 temporary of ``m``'s size). False (touching
        nothing) otherwise: a float32 / float64 ``m`` takes the caller's two passes (``m *= q``, then one
        gemm with beta=1 by :meth:`addmm_`), which is the floor itself."""
        if not (self._numpy_matrices(m, b, a, q) and is_low_precision(m.dtype) and q.dtype == np.float32
                and m.shape == (b.shape[0], a.shape[1]) and q.ndim == 1):
            return False
        a32 = np.asarray(a, dtype=np.float32)
        b32 = np.asarray(b, dtype=np.float32)

        def update(i: int, j: int, tile: np.ndarray) -> None:
            tile *= q[i:j, None]
            _tile_gemm_(tile, b32[i:j], a32, alpha)

        self._float32_tiles(m, update)
        return True


class TorchBackend(ArrayAPIBackend):
    """PyTorch (through array-api-compat): ``addmm_`` in place, ``detach``, bfloat16 transfer."""

    name = "torch"

    def handles(self, xp: Namespace) -> bool:
        return array_api_compat.is_torch_namespace(xp)

    def namespace(self) -> Namespace:
        return _import_namespace("array_api_compat.torch", self.name, "torch")

    def from_host(self, a: np.ndarray, xp: Namespace, device: Any = None) -> Array:
        import torch

        a = np.ascontiguousarray(a)
        if not a.flags.writeable:  # torch would share read-only memory (a memmap): writing to it segfaults
            a = a.copy()
        if dtype_name(a.dtype) == "bfloat16":
            t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
        return t.to(device) if device is not None else t

    def to_host(self, x: Array) -> np.ndarray:
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()

    #: bytes of one row tile of the product in :meth:`addmm_` (about 4 MiB)
    tile_bytes = 4 << 20

    def addmm_(self, m: Array, b: Array, a: Array, alpha: float) -> bool:
        """``m += alpha·b@a`` in place for a float32 / float64 ``m`` (factors of its dtype), per row tile:
        ``d = b_tile @ a`` into one reused buffer of about :attr:`tile_bytes`, ``d *= alpha``,
        ``m_tile += d``. The rounding of the out-of-place path ``W + s·(B A)`` (each entry of the product
        rounded, then added), so merge and unmerge add and subtract the same ``ΔŴ`` and the round trip
        stays within ``4·eps·(|W| + |ΔW|)`` (``Tensor.addmm_`` may round into ``m`` after every rank-1
        update). False (touching nothing) for half precision, mixed dtypes and tensors that require grad."""
        import torch

        if m.dtype not in (torch.float32, torch.float64) or m.requires_grad or m.ndim != 2:
            return False
        if a.dtype != m.dtype or b.dtype != m.dtype or m.shape != (b.shape[0], a.shape[1]):
            return False
        rows = max(1, self.tile_bytes // (m.element_size() * max(1, m.shape[1])))
        prod = torch.empty((min(rows, m.shape[0]), m.shape[1]), dtype=m.dtype, device=m.device)
        for start in range(0, m.shape[0], rows):
            stop = min(start + rows, m.shape[0])
            d = torch.mm(b[start:stop], a, out=prod[: stop - start])
            d.mul_(alpha)
            m[start:stop].add_(d)
        return True

    def conv(self, x: Array, weight: Array, bias: Array | None, **kw: Any) -> Array | None:
        from ._conv import torch_conv

        return torch_conv(x, weight, bias, **kw)

    def stop_gradient(self, x: Array) -> Array:
        return x.detach()


class JaxBackend(ArrayAPIBackend):
    """JAX: immutable arrays (no in-place kernels), ``lax.stop_gradient``."""

    name = "jax"

    def handles(self, xp: Namespace) -> bool:
        return array_api_compat.is_jax_namespace(xp)

    def namespace(self) -> Namespace:
        return _import_namespace("jax.numpy", self.name, "jax")

    def conv(self, x: Array, weight: Array, bias: Array | None, **kw: Any) -> Array | None:
        from ._conv import jax_conv

        return jax_conv(x, weight, bias, **kw)

    def stop_gradient(self, x: Array) -> Array:
        import jax

        return jax.lax.stop_gradient(x)


class DaskBackend(ArrayAPIBackend):
    """dask.array (through array-api-compat): lazy arrays, so no in-place kernels (``copy=False`` is
    refused before any work, :func:`peftmath._array.why_not_writeable`) and no hidden compute: every result
    is a task graph until the caller computes it. The one documented exception is ``safe=True``: the
    finiteness check must read the merged values before returning, one compute per module (the result is
    still lazy). Value checks that refuse an input (a zero scale) stay lazy through
    :func:`peftmath._array.refuse_where` and raise when the result is computed.

    dask's ``linalg.inv`` / ``solve`` take one 2-D matrix only; :meth:`inv` and :meth:`solve` run NumPy's
    batched ones on each chunk of the stack instead (``map_blocks``, the two matrix axes in one chunk), so a
    singular block raises :class:`~peftmath.errors.NotInvertibleError` when the result is computed."""

    name = "dask"

    def handles(self, xp: Namespace) -> bool:
        return array_api_compat.is_dask_namespace(xp)

    def namespace(self) -> Namespace:
        return _import_namespace("array_api_compat.dask.array", self.name, "dask[array]")

    def to_host(self, x: Array) -> np.ndarray:
        return np.asarray(x.compute() if hasattr(x, "compute") else x)

    @staticmethod
    def _whole_matrices(*arrays: Array) -> list[Array]:
        """``arrays`` (stacks of matrices) broadcast to one leading shape and chunked alike along it, each
        matrix in one chunk."""
        import dask.array as da

        lead = np.broadcast_shapes(*(tuple(x.shape[:-2]) for x in arrays))
        arrays = [da.broadcast_to(x, lead + tuple(x.shape[-2:])) for x in arrays]
        first = arrays[0].rechunk(arrays[0].chunks[:-2] + (-1, -1))
        return [first] + [x.rechunk(first.chunks[:-2] + (-1, -1)) for x in arrays[1:]]

    def inv(self, a: Array, *, where: str, what: str = "a block") -> Array:
        import dask.array as da

        (a,) = self._whole_matrices(a)
        return da.map_blocks(_host_inv, a, where, what, dtype=a.dtype)

    def solve(self, a: Array, b: Array, *, where: str) -> Array:
        import dask.array as da

        a, b = self._whole_matrices(a, b)
        # the result has b's shape and chunks (a (…, n, n), b (…, n, k)): map_blocks would take a's
        return da.map_blocks(_host_solve, a, b, where, dtype=np.result_type(a.dtype, b.dtype), chunks=b.chunks)


_REGISTRY: dict[str, Backend] | None = None
_BUILTIN = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend, "dask": DaskBackend,
            "array_api": ArrayAPIBackend}
_INSTALL_HINTS = {"cupy": "pip install -e backends/cupy  (and cupy-cuda12x or cupy-cuda13x for your CUDA)"}


def _load_registry() -> dict[str, Backend]:
    global _REGISTRY
    if _REGISTRY is not None:
        return _REGISTRY
    from importlib import metadata  # 25 ms with the scan: only when a backend is looked up by name or plugin

    registry: dict[str, Backend] = {}
    errors: dict[str, str] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if obj is _BUILTIN.get(ep.name):
                registry[ep.name] = _builtin(ep.name)
            else:
                registry[ep.name] = obj() if isinstance(obj, type) else obj
        except Exception as exc:  # a broken plugin must not break the core
            errors[ep.name] = f"{type(exc).__name__}: {exc}"
    # Running from a source tree that was never installed has no entry points: fall back to the
    # backends this distribution declares in its own pyproject.toml.
    for name in _BUILTIN:
        registry.setdefault(name, _builtin(name))
    _REGISTRY = registry
    _LOAD_ERRORS.update(errors)
    _BY_NAMESPACE.clear()  # a plugin may claim a namespace served before the scan (NumPy's)
    return registry


_BUILTIN_INSTANCES: dict[str, Backend] = {}


def _builtin(name: str) -> Backend:
    """The one instance of the built-in backend ``name`` (the registry and :func:`backend_for`'s NumPy
    path share it: attributes set on ``get_backend("numpy")`` apply to every NumPy computation)."""
    if name not in _BUILTIN_INSTANCES:
        _BUILTIN_INSTANCES[name] = _BUILTIN[name]()
    return _BUILTIN_INSTANCES[name]


_LOAD_ERRORS: dict[str, str] = {}


def register_backend(backend: Backend) -> None:
    """Register ``backend`` under ``backend.name`` (for plugins loaded without entry points)."""
    _load_registry()[backend.name] = backend
    _BY_NAMESPACE.clear()


def available_backends() -> list[str]:
    """Names of the registered backends."""
    return sorted(_load_registry())


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; :class:`BackendError` naming what to install otherwise."""
    registry = _load_registry()
    if name in registry:
        return registry[name]
    hint = _INSTALL_HINTS.get(name)
    detail = f" (it failed to load: {_LOAD_ERRORS[name]})" if name in _LOAD_ERRORS else ""
    raise BackendError(
        f"no peftmath backend named {name!r}{detail}; available: {', '.join(sorted(registry))}"
        + (f". To add it: {hint}" if hint else "")
    )


_BY_NAMESPACE: dict[int, Backend] = {}


def backend_for(xp: Namespace) -> Backend:
    """The backend serving namespace ``xp`` (the generic fallback when none claims it)."""
    cached = _BY_NAMESPACE.get(id(xp))
    if cached is not None:
        return cached
    if _REGISTRY is None and array_api_compat.is_numpy_namespace(xp):
        # NumPy needs no scan of the installed plugins (25 ms of every command's start-up)
        _BY_NAMESPACE[id(xp)] = _builtin("numpy")
        return _BY_NAMESPACE[id(xp)]
    registry = _load_registry()
    found = next((b for n, b in registry.items() if n != "array_api" and b.handles(xp)), registry["array_api"])
    _BY_NAMESPACE[id(xp)] = found
    return found


def kaiming_uniform_bound(fan_in: int) -> float:
    """PyTorch's ``kaiming_uniform_(a=sqrt(5))`` bound: ``1 / sqrt(fan_in)``."""
    return 1.0 / math.sqrt(fan_in)
