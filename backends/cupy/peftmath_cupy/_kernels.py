"""CUDA kernels of the CuPy backend: the in-place LoRA merge, DoRA's fused merge and unmerge, IA3's
scaling, for float32, bfloat16 and float16 weights.

Every kernel computes in float32; those that update ``W`` read it as float32 and round once back to
``W``'s dtype (round to nearest even). The low-rank kernels share one tiling (``tile`` in the source below): a block of
``THREADS`` threads covers ``THREADS`` consecutive columns and ``ROWS`` rows of a C-contiguous ``W``;
each thread keeps its column of ``A`` (``r`` floats) in registers and the tile's rows of ``B`` sit in
shared memory, so ``A`` is read once per ``ROWS`` rows and the loads and stores of ``W`` are coalesced.
A thread loads ``GROUP`` rows of its column before it stores any: the compiler cannot move a load of
``W`` above a store to ``W``, so a one-row loop keeps a single load in flight per thread, too few
bytes (2 per bfloat16) to cover the memory latency; ``GROUP`` loads at once give the memory system
``GROUP`` times more to do (the PTX test checks the order and that nothing spills to local memory).
With ``acc = Σ_k B[i, k] · A[k, j]`` (float32, fixed order):

* ``lora_addmm``  ``W[i, j] ← round(fma(α, acc, W[i, j]))``                     (W read and written once)
* ``dora_sumsq``  ``part[i, block] = Σ_j fma(α, acc, W[i, j])²`` over the block's columns      (W read once)
* ``dora_finalize`` ``n_i = sqrt(Σ_block part[i, block])``, ``g_i = m_i / n_i`` (0 where ``n_i = 0``)
* ``dora_apply``  ``W[i, j] ← round(g_i · fma(α, acc, W[i, j]))``                (W read and written once)
* ``dora_unmerge`` ``W[i, j] ← round(fma(α, acc, q_i · W[i, j]))`` with ``q = n / m``, ``α = −s``
* ``ia3_scale``   ``W[i, j] ← round(W[i, j] · s)`` or ``round(W[i, j] / s)``, ``s`` per row or per column
* ``lora_shrink`` / ``lora_expand`` (mixed batch) ``h = A_{a(b)} x_{b,t}``, then ``y_{b,t} += B_{a(b)} h``,
  reading each row's adapter factors where they are (no gathered copies), float32

So a DoRA merge reads W twice and writes it once, with the norm and the result formed from the same
float32 values (``dora_sumsq`` and ``dora_apply`` evaluate the same ``fma``), and a half-precision
weight is rounded once, not after the low-rank update and again after the rescale. The row norms are
summed in a fixed order (no atomics): the result does not depend on scheduling.

The rank is a compile-time constant (``-DRANK=r``) so the dot product unrolls; one module per rank is
compiled on first use. :class:`Kernels` takes the array module and the compiler as arguments: the
backend passes CuPy and ``cupy.RawModule``; the test suite passes NumPy and a CPU emulator of the same
source (``tests/backends/cuda_emulator.py``), so the kernels' index arithmetic and rounding are tested
on machines without a GPU.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

ROWS = 32
#: rows a thread loads together (so that many loads of W are in flight per thread); divides ROWS
GROUP = 8
THREADS = 256
MAX_RANK = 64
#: the grid's y dimension (row tiles) is capped at CUDA's limit; the IA3 kernel then steps over the rows
MAX_ROW_BLOCKS = 65535

_SOURCE = r"""
#include <cuda_fp16.h>

#ifndef RANK
#define RANK 1
#endif
#ifndef GROUP
#define GROUP 8
#endif

struct bf16 { unsigned short bits; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(bf16 v) { return __uint_as_float(((unsigned int)v.bits) << 16); }

template <typename T> __device__ __forceinline__ T from_float(float f);
template <> __device__ __forceinline__ float from_float<float>(float f) { return f; }
template <> __device__ __forceinline__ __half from_float<__half>(float f) { return __float2half_rn(f); }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float f) {
    unsigned int u = __float_as_uint(f);
    bf16 out;
    if ((u & 0x7fffffffu) > 0x7f800000u) {          // NaN stays a (quiet) NaN
        out.bits = (unsigned short)((u >> 16) | 0x40u);
        return out;
    }
    u += 0x7fffu + ((u >> 16) & 1u);                 // round to nearest, ties to even
    out.bits = (unsigned short)(u >> 16);
    return out;
}

// The low-rank tile: rows [row0, row0 + TILE_ROWS) x columns [blockIdx.x * blockDim.x, + blockDim.x),
// walked GROUP rows at a time. For each group: load(row, col, live, n) (the caller reads its n <= GROUP
// values of W, so GROUP loads are in flight at once), then store(rr, row, col, live, acc, n) with
// acc[u] = sum_k B[row + u, k] * A[k, col]. Every thread of the block runs the loop (live is false past
// the last column), so the callbacks may sync.
template <typename Load, typename Store>
__device__ __forceinline__ void tile(const float* __restrict__ B, const float* __restrict__ A,
                                     const long long rows, const long long cols, Load load, Store store) {
    __shared__ float sB[TILE_ROWS * RANK];
    const long long row0 = (long long)blockIdx.y * TILE_ROWS;
    for (int i = threadIdx.x; i < TILE_ROWS * RANK; i += blockDim.x) {
        const long long row = row0 + i / RANK;
        sB[i] = row < rows ? B[row * RANK + (i % RANK)] : 0.0f;
    }
    __syncthreads();
    const long long col = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool live = col < cols;
    float a[RANK];
#pragma unroll
    for (int k = 0; k < RANK; ++k) a[k] = live ? A[(long long)k * cols + col] : 0.0f;
    const int nrows = (int)((rows - row0) < TILE_ROWS ? (rows - row0) : TILE_ROWS);
    for (int rr = 0; rr < nrows; rr += GROUP) {
        const int n = nrows - rr < GROUP ? nrows - rr : GROUP;
        load(row0 + rr, col, live, n);
        float acc[GROUP];
#pragma unroll
        for (int u = 0; u < GROUP; ++u) {  // rows past nrows read sB's zero padding: harmless
            float s = 0.0f;
#pragma unroll
            for (int k = 0; k < RANK; ++k) s = fmaf(sB[(rr + u) * RANK + k], a[k], s);
            acc[u] = s;
        }
        store(rr, row0 + rr, col, live, acc, n);
    }
}

// w[u] = float(W[row + u, col]) for u < n (0 past n or past the last column).
template <typename T>
__device__ __forceinline__ void load_group(const T* __restrict__ W, const long long row, const long long col,
                                           const long long cols, const bool live, const int n, float* w) {
#pragma unroll
    for (int u = 0; u < GROUP; ++u) w[u] = (live && u < n) ? to_float(W[(row + u) * cols + col]) : 0.0f;
}

// W[i, j] <- round(f(float(W[i, j]), acc, i)) over the tile: the in-place low-rank updates.
template <typename T, typename F>
__device__ __forceinline__ void update(T* __restrict__ W, const float* __restrict__ B, const float* __restrict__ A,
                                       const long long rows, const long long cols, F f) {
    float w[GROUP];
    tile(B, A, rows, cols,
         [&](long long row, long long col, bool live, int n) { load_group(W, row, col, cols, live, n, w); },
         [&](int, long long row, long long col, bool live, const float* acc, int n) {
             if (!live) return;
#pragma unroll
             for (int u = 0; u < GROUP; ++u)
                 if (u < n) W[(row + u) * cols + col] = from_float<T>(f(w[u], acc[u], row + u));
         });
}

// Sums of squares of W + alpha * B @ A over the block's columns, one per row: part[row, blockIdx.x].
// Needs blockDim.x == THREADS (a multiple of TILE_ROWS).
template <typename T>
__device__ __forceinline__ void dora_sumsq(const T* __restrict__ W, const float* __restrict__ B,
                                           const float* __restrict__ A, const float alpha,
                                           const long long rows, const long long cols,
                                           float* __restrict__ part) {
    __shared__ float sq[TILE_ROWS][THREADS];
    __shared__ float sub[TILE_ROWS][THREADS / TILE_ROWS];
    float w[GROUP];
    tile(B, A, rows, cols,
         [&](long long row, long long col, bool live, int n) { load_group(W, row, col, cols, live, n, w); },
         [&](int rr, long long, long long, bool live, const float* acc, int n) {
#pragma unroll
             for (int u = 0; u < GROUP; ++u) {
                 const float v = live ? fmaf(alpha, acc[u], w[u]) : 0.0f;
                 if (u < n) sq[rr + u][threadIdx.x] = v * v;
             }
         });
    __syncthreads();
    const int parts = THREADS / TILE_ROWS;
    const int rr = threadIdx.x / parts, p = threadIdx.x % parts;
    float s = 0.0f;
    for (int k = p; k < THREADS; k += parts) s += sq[rr][k];
    sub[rr][p] = s;
    __syncthreads();
    const long long row = (long long)blockIdx.y * TILE_ROWS + threadIdx.x;
    if (threadIdx.x < TILE_ROWS && row < rows) {
        float t = 0.0f;
        for (int q = 0; q < parts; ++q) t += sub[threadIdx.x][q];
        part[row * gridDim.x + blockIdx.x] = t;
    }
}

// W viewed as (rows, cols); the scale of element (i, j) is s[i] (per_row) or s[(j / inner) % period].
// A block covers blockDim.x columns and TILE_ROWS rows per step, stepping over the rows by the grid.
template <typename T>
__device__ __forceinline__ void ia3_scale(T* __restrict__ W, const float* __restrict__ s,
                                          const long long rows, const long long cols, const int per_row,
                                          const long long inner, const long long period, const int inverse) {
    const long long col = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    const float sc = per_row ? 0.0f : s[(col / inner) % period];
    for (long long row0 = (long long)blockIdx.y * TILE_ROWS; row0 < rows; row0 += (long long)gridDim.y * TILE_ROWS) {
        const long long stop = row0 + TILE_ROWS < rows ? row0 + TILE_ROWS : rows;
        for (long long row = row0; row < stop; row += GROUP) {
            const int n = stop - row < GROUP ? (int)(stop - row) : GROUP;
            float w[GROUP];
            load_group(W, row, col, cols, true, n, w);  // GROUP loads in flight before the stores
#pragma unroll
            for (int u = 0; u < GROUP; ++u) {
                if (u >= n) break;
                const float f = per_row ? s[row + u] : sc;
                W[(row + u) * cols + col] = from_float<T>(inverse ? w[u] / f : w[u] * f);
            }
        }
    }
}

// Mixed batch, shrink: h[bt, k] = sum_i A[idx[bt / T], k, i] * x[bt, i] for one token row bt per block.
// Thread tid sums the columns i = j (mod P) of row k = tid / P (P = blockDim.x / r threads per row of A,
// so consecutive threads read consecutive columns); one shared-memory pass adds the P partial sums.
extern "C" __global__ void lora_shrink(const float* __restrict__ x, const float* __restrict__ A,
                                       const long long* __restrict__ idx, float* __restrict__ h,
                                       const long long T, const long long in, const int r) {
    __shared__ float partial[THREADS];
    const long long bt = blockIdx.x;
    const int P = THREADS / r;
    const int k = threadIdx.x / P, j = threadIdx.x % P;
    float acc = 0.0f;
    if (k < r) {
        const float* a = A + (idx[bt / T] * r + k) * in;
        const float* xr = x + bt * in;
        for (long long i = j; i < in; i += P) acc = fmaf(a[i], xr[i], acc);
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x < r) {
        float s = 0.0f;
        for (int q = 0; q < P; ++q) s += partial[threadIdx.x * P + q];
        h[bt * r + threadIdx.x] = s;
    }
}

// Mixed batch, expand: y[bt, o] += sum_k Bt[idx[bt / T], k, o] * h[bt, k] (Bt = B transposed to (r, out),
// scaling folded in); the token row is blockIdx.x, the output column blockIdx.y * blockDim.x + threadIdx.x.
extern "C" __global__ void lora_expand(const float* __restrict__ Bt, const float* __restrict__ h,
                                       const long long* __restrict__ idx, float* __restrict__ y,
                                       const long long T, const long long out, const int r) {
    const long long bt = blockIdx.x;
    const long long o = (long long)blockIdx.y * blockDim.x + threadIdx.x;
    if (o >= out) return;
    const float* b = Bt + idx[bt / T] * r * out + o;
    const float* hr = h + bt * r;
    float acc = 0.0f;
    for (int k = 0; k < r; ++k) acc = fmaf(b[k * out], hr[k], acc);
    y[bt * out + o] += acc;
}

extern "C" __global__ void dora_finalize(const float* __restrict__ part, const int nparts,
                                         const float* __restrict__ magnitude, float* __restrict__ norm,
                                         float* __restrict__ g, const long long rows) {
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    float s = 0.0f;
    for (int p = 0; p < nparts; ++p) s += part[row * nparts + p];
    const float n = sqrtf(s);
    norm[row] = n;
    g[row] = n == 0.0f ? 0.0f : magnitude[row] / n;
}

#define LOW_RANK_KERNELS(SUFFIX, T)                                                                   \
extern "C" __global__ void lora_addmm_##SUFFIX(T* W, const float* B, const float* A, const float alpha,  \
                                               const long long rows, const long long cols) {          \
    update<T>(W, B, A, rows, cols, [=](float w, float acc, long long) { return fmaf(alpha, acc, w); });   \
}                                                                                                     \
extern "C" __global__ void dora_sumsq_##SUFFIX(const T* W, const float* B, const float* A,            \
                                               const float alpha, const long long rows,               \
                                               const long long cols, float* part) {                   \
    dora_sumsq<T>(W, B, A, alpha, rows, cols, part);                                                  \
}                                                                                                     \
extern "C" __global__ void dora_apply_##SUFFIX(T* W, const float* B, const float* A, const float alpha,  \
                                               const long long rows, const long long cols,            \
                                               const float* g) {                                      \
    update<T>(W, B, A, rows, cols,                                                                    \
              [=](float w, float acc, long long row) { return g[row] * fmaf(alpha, acc, w); });       \
}                                                                                                     \
extern "C" __global__ void dora_unmerge_##SUFFIX(T* W, const float* B, const float* A,                \
                                                 const float alpha, const long long rows,             \
                                                 const long long cols, const float* q) {              \
    update<T>(W, B, A, rows, cols,                                                                    \
              [=](float w, float acc, long long row) { return fmaf(alpha, acc, q[row] * w); });       \
}                                                                                                     \
extern "C" __global__ void ia3_scale_##SUFFIX(T* W, const float* s, const long long rows,             \
                                              const long long cols, const int per_row,                \
                                              const long long inner, const long long period,          \
                                              const int inverse) {                                    \
    ia3_scale<T>(W, s, rows, cols, per_row, inner, period, inverse);                                  \
}

LOW_RANK_KERNELS(f32, float)
LOW_RANK_KERNELS(bf16, bf16)
LOW_RANK_KERNELS(f16, __half)
"""

def compile_options(rank: int) -> tuple[str, ...]:
    """The compiler options of the module for ``rank`` (the rank and the tiling are compile-time)."""
    return ("-std=c++14", f"-DRANK={rank}", f"-DTILE_ROWS={ROWS}", f"-DTHREADS={THREADS}", f"-DGROUP={GROUP}")


#: dtype name -> kernel suffix
KINDS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


class Kernels:
    """The kernels above, launched on arrays of ``xp``.

    ``xp`` is CuPy for the backend (NumPy under the CPU emulator); ``compile(code, options)`` returns a
    module with ``get_function(name)``, whose functions are called as ``f(grid, block, args)`` like
    ``cupy.RawKernel``. Each method returns False / None, touching nothing, when it does not apply
    (another dtype, a rank above :data:`MAX_RANK`, a layout the tiles do not cover); the backend then
    falls back to cuBLAS or the generic array-API path.
    """

    def __init__(self, xp: Any, compile: Callable[[str, tuple[str, ...]], Any]) -> None:
        self.xp = xp
        self._compile = compile
        self._modules: dict[int, Any] = {}
        self._functions: dict[tuple[str, int], Any] = {}  # looked up once: each call's host time counts

    def _function(self, name: str, rank: int = 1) -> Any:
        fn = self._functions.get((name, rank))
        if fn is None:
            if rank not in self._modules:
                self._modules[rank] = self._compile(_SOURCE, compile_options(rank))
            fn = self._functions[(name, rank)] = self._modules[rank].get_function(name)
        return fn

    # --- helpers ------------------------------------------------------------------------------
    @staticmethod
    def kind(dtype: Any) -> str | None:
        from peftmath._array import dtype_name

        return KINDS.get(dtype_name(dtype))

    def _factors(self, W: Any, B: Any, A: Any) -> tuple[Any, Any] | None:
        """float32 C-ordered copies (views when already so) of B (rows, r) and A (r, cols), or None."""
        r = A.shape[0]
        if W.ndim != 2 or not W.flags.c_contiguous or not 1 <= r <= MAX_RANK:
            return None
        if W.shape[0] > MAX_ROW_BLOCKS * ROWS:  # one row tile per grid row: beyond CUDA's grid, decline
            return None
        if B.shape != (W.shape[0], r) or A.shape != (r, W.shape[1]):
            return None
        xp = self.xp
        return xp.ascontiguousarray(B, dtype=xp.float32), xp.ascontiguousarray(A, dtype=xp.float32)

    @staticmethod
    def _tile_grid(rows: int, cols: int) -> tuple[int, int, int]:
        return ((cols + THREADS - 1) // THREADS, (rows + ROWS - 1) // ROWS, 1)

    # --- kernels --------------------------------------------------------------------------------
    def lora_addmm_(self, W: Any, B: Any, A: Any, alpha: float) -> bool:
        """``W += alpha * B @ A`` in place for a C-contiguous 2-D ``W`` (float32 / bfloat16 / float16)."""
        kind = self.kind(W.dtype)
        factors = self._factors(W, B, A) if kind else None
        if factors is None:
            return False
        B32, A32 = factors
        rows, cols = W.shape
        fn = self._function(f"lora_addmm_{kind}", A.shape[0])
        fn(self._tile_grid(rows, cols), (THREADS, 1, 1), (W, B32, A32, np.float32(alpha), np.int64(rows), np.int64(cols)))
        return True

    def dora_merge_(self, W: Any, B: Any, A: Any, alpha: float, magnitude: Any) -> Any:
        """``W ← g ⊙ (W + alpha·B@A)`` row-wise with ``g = m / n``, ``n = ‖W + alpha·B@A‖`` per row; in place.

        Returns ``n`` (float32, shape ``(rows,)``) or None. ``magnitude`` must be float32.
        """
        kind = self.kind(W.dtype)
        factors = self._factors(W, B, A) if kind else None
        if factors is None or self.kind(magnitude.dtype) != "f32" or magnitude.shape != (W.shape[0],):
            return None
        xp = self.xp
        B32, A32 = factors
        rows, cols = W.shape
        r = A.shape[0]
        grid = self._tile_grid(rows, cols)
        part = xp.empty((rows, grid[0]), dtype=xp.float32)
        norm = xp.empty((rows,), dtype=xp.float32)
        g = xp.empty((rows,), dtype=xp.float32)
        m = xp.ascontiguousarray(magnitude)
        shape = (np.float32(alpha), np.int64(rows), np.int64(cols))
        self._function(f"dora_sumsq_{kind}", r)(grid, (THREADS, 1, 1), (W, B32, A32, *shape, part))
        self._function("dora_finalize", r)(((rows + THREADS - 1) // THREADS, 1, 1), (THREADS, 1, 1),
                                           (part, np.int32(grid[0]), m, norm, g, np.int64(rows)))
        self._function(f"dora_apply_{kind}", r)(grid, (THREADS, 1, 1), (W, B32, A32, *shape, g))
        return norm

    def dora_unmerge_(self, W: Any, B: Any, A: Any, alpha: float, q: Any) -> bool:
        """``W ← q ⊙ W + alpha·B@A`` row-wise, in place (``q = n / m``, ``alpha = −s``); float32 ``q``."""
        kind = self.kind(W.dtype)
        factors = self._factors(W, B, A) if kind else None
        if factors is None or self.kind(q.dtype) != "f32" or q.shape != (W.shape[0],):
            return False
        B32, A32 = factors
        rows, cols = W.shape
        fn = self._function(f"dora_unmerge_{kind}", A.shape[0])
        fn(self._tile_grid(rows, cols), (THREADS, 1, 1),
           (W, B32, A32, np.float32(alpha), np.int64(rows), np.int64(cols), self.xp.ascontiguousarray(q)))
        return True

    def lora_gather_(self, y: Any, x: Any, A_stack: Any, B_stack: Any, idx: Any) -> bool:
        """The mixed batch's adapter terms, added in place: ``y[b, t] += B_{idx[b]} @ (A_{idx[b]} @ x[b, t])``.

        ``y`` (R, T, out) and ``x`` (R, T, in) float32, ``A_stack`` (N, r, in), ``B_stack`` (N, out, r)
        with the scalings folded in, ``idx`` (R,) integers in ``[0, N)``. Two kernels (shrink to
        ``h`` (R·T, r), expand into ``y``) read each row's factors in place: no gathered copies.
        """
        xp = self.xp
        arrays = (y, x, A_stack, B_stack)
        if any(self.kind(a.dtype) != "f32" for a in arrays) or y.ndim != 3 or x.ndim != 3 or not y.flags.c_contiguous:
            return False
        R, T, out = y.shape
        N, r, inn = A_stack.shape
        if x.shape != (R, T, inn) or B_stack.shape != (N, out, r) or tuple(idx.shape) != (R,) or not 1 <= r <= THREADS:
            return False
        if y.size == 0:
            return True
        xc = xp.ascontiguousarray(x)
        A = xp.ascontiguousarray(A_stack)
        Bt = xp.ascontiguousarray(xp.transpose(B_stack, (0, 2, 1)))
        index = xp.ascontiguousarray(idx, dtype=xp.int64)
        h = xp.empty((R * T, r), dtype=xp.float32)
        self._function("lora_shrink")((R * T, 1, 1), (THREADS, 1, 1), (xc, A, index, h, np.int64(T), np.int64(inn), np.int32(r)))
        self._function("lora_expand")((R * T, (out + THREADS - 1) // THREADS, 1), (THREADS, 1, 1),
                                      (Bt, h, index, y, np.int64(T), np.int64(out), np.int32(r)))
        return True

    def ia3_scale_(self, W: Any, s: Any, inverse: bool) -> bool:
        """``W ← W ⊙ s`` (or ``W / s``) in place; ``s`` broadcasts against ``W`` along one axis at most.

        ``s`` is float32 with ``s.ndim == W.ndim``; ``W`` is C-contiguous.
        """
        kind = self.kind(W.dtype)
        if kind is None or W.ndim < 1 or s.ndim != W.ndim or not W.flags.c_contiguous or self.kind(s.dtype) != "f32":
            return False
        axes = [i for i, (n, k) in enumerate(zip(W.shape, s.shape)) if k != 1]
        if len(axes) > 1 or any(k not in (1, n) for n, k in zip(W.shape, s.shape)):
            return False
        if W.size == 0:
            return True
        rows = W.shape[0]
        cols = W.size // rows
        per_row = axes == [0]
        # a scalar scale is the column scale with one period: s[(j / 1) % 1] = s[0]
        inner = 1 if per_row or not axes else math.prod(W.shape[axes[0] + 1:])
        period = W.shape[axes[0]] if axes else 1
        flat = self.xp.ascontiguousarray(self.xp.reshape(s, (-1,)))
        grid = ((cols + THREADS - 1) // THREADS, min((rows + ROWS - 1) // ROWS, MAX_ROW_BLOCKS), 1)
        self._function(f"ia3_scale_{kind}")(grid, (THREADS, 1, 1), (
            W, flat, np.int64(rows), np.int64(cols), np.int32(per_row), np.int64(inner), np.int64(period),
            np.int32(bool(inverse))))
        return True
