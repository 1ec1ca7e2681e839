"""CUDA kernel for the in-place LoRA merge ``W += alpha * B @ A`` (rank r <= 64).

``W[i, j] = round(float(W[i, j]) + alpha * sum_k B[i, k] * A[k, j])`` for a float32, bfloat16 or float16
``W`` with float32 factors: W is read and written once (the memory floor, like a copy), the rank-r dot
product is accumulated in float32 and rounded once (round to nearest even).

Tiling: a block of 256 threads covers 256 consecutive columns and ``ROWS`` rows. Each thread keeps its
column of ``A`` (r floats) in registers and reuses it for every row of the tile; the tile's rows of ``B``
sit in shared memory. So ``A`` is read from L2 once per ``ROWS`` rows instead of once per element, and
the loads and stores of ``W`` are coalesced. The kernel is compiled once per rank (``-DRANK=r``) so the
dot product is fully unrolled.
"""

from __future__ import annotations

ROWS = 32
THREADS = 256
MAX_RANK = 64

_SOURCE = r"""
#include <cuda_fp16.h>

__device__ __forceinline__ float load_bf16(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}
__device__ __forceinline__ unsigned short store_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                                   // round to nearest even
    return (unsigned short)(u >> 16);
}
__device__ __forceinline__ float load_f32(float v) { return v; }
__device__ __forceinline__ float store_f32(float v) { return v; }

#define LORA_ADDMM(NAME, T, LOAD, STORE)                                                        \
extern "C" __global__ void NAME(T* __restrict__ W, const float* __restrict__ B,                  \
                                const float* __restrict__ A, const float alpha,                  \
                                const long long rows, const long long cols) {                    \
    __shared__ float sB[TILE_ROWS * RANK];                                                       \
    const long long row0 = (long long)blockIdx.y * TILE_ROWS;                                    \
    for (int i = threadIdx.x; i < TILE_ROWS * RANK; i += blockDim.x) {                           \
        const long long row = row0 + i / RANK;                                                   \
        sB[i] = row < rows ? B[row * RANK + (i % RANK)] : 0.0f;                                  \
    }                                                                                            \
    __syncthreads();                                                                             \
    const long long col = (long long)blockIdx.x * blockDim.x + threadIdx.x;                      \
    if (col >= cols) return;                                                                     \
    float a[RANK];                                                                               \
    _Pragma("unroll")                                                                            \
    for (int k = 0; k < RANK; ++k) a[k] = A[(long long)k * cols + col];                          \
    const int nrows = (int)((rows - row0) < TILE_ROWS ? (rows - row0) : TILE_ROWS);              \
    for (int rr = 0; rr < nrows; ++rr) {                                                         \
        float acc = 0.0f;                                                                        \
        _Pragma("unroll")                                                                        \
        for (int k = 0; k < RANK; ++k) acc = fmaf(sB[rr * RANK + k], a[k], acc);                 \
        const long long idx = (row0 + rr) * cols + col;                                          \
        W[idx] = STORE(LOAD(W[idx]) + alpha * acc);                                              \
    }                                                                                            \
}

LORA_ADDMM(lora_addmm_bf16, unsigned short, load_bf16, store_bf16)
LORA_ADDMM(lora_addmm_f16, __half, __half2float, __float2half_rn)
LORA_ADDMM(lora_addmm_f32, float, load_f32, store_f32)
"""

_MODULES: dict[int, object] = {}


def _module(rank: int):
    if rank not in _MODULES:
        import cupy

        _MODULES[rank] = cupy.RawModule(code=_SOURCE, options=("-std=c++14", f"-DRANK={rank}", f"-DTILE_ROWS={ROWS}"))
    return _MODULES[rank]


def lora_addmm_(W, B, A, alpha: float, kind: str) -> bool:
    """``W += alpha * B @ A`` in place for a C-contiguous ``W`` of ``kind`` bf16 / f16 / f32.

    Returns False (touching nothing) for ranks above :data:`MAX_RANK`.
    """
    import cupy

    rows, cols = W.shape
    r = A.shape[0]
    if r > MAX_RANK or r < 1:
        return False
    kernel = _module(r).get_function(f"lora_addmm_{kind}")
    A32 = cupy.ascontiguousarray(A, dtype=cupy.float32)
    B32 = cupy.ascontiguousarray(B, dtype=cupy.float32)
    grid = ((cols + THREADS - 1) // THREADS, (rows + ROWS - 1) // ROWS)
    kernel(grid, (THREADS,), (W, B32, A32, cupy.float32(alpha), cupy.int64(rows), cupy.int64(cols)))
    return True
