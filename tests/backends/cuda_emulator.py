"""Run CUDA C++ kernel source on the CPU, to test a kernel's arithmetic without a GPU.

The source is compiled by the host C++ compiler with a small shim: ``__global__``/``__device__`` vanish,
``__shared__`` becomes a function-local ``static`` (one block runs at a time, so the block's threads
share it), ``threadIdx`` is thread-local, ``__syncthreads`` is a barrier, and the cuda_fp16 / bit-cast
intrinsics are plain C++ (``_Float16`` for ``__half``). A launch runs the grid's blocks one after
another, each block as ``blockDim`` real threads. A thread that returns leaves the barrier (as on
current GPUs, exited threads no longer count at ``__syncthreads``).

``EmulatedModule(code, options)`` mimics ``cupy.RawModule``: ``get_function(name)`` returns a callable
``f(grid, block, args)`` taking NumPy arrays (passed by pointer) and NumPy scalars (passed by value)
in the kernel's parameter order. Only ``-D`` options are used. What this cannot catch: nvrtc-specific
compile errors, races that a sequential-per-block schedule hides, and speed.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

_SHIM = r"""
#pragma once
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <cstring>
#include <math.h>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; };
static thread_local dim3 threadIdx;
static dim3 blockIdx, blockDim, gridDim;
// __syncthreads for the block's threads; a thread that returns leaves it (drop). A generation barrier
// on a mutex and a condition variable (C++17: no <barrier> needed).
struct EmuBarrier {
    std::mutex m;
    std::condition_variable cv;
    unsigned expected, count, generation = 0;
    explicit EmuBarrier(unsigned n) : expected(n), count(n) {}
    void next() { ++generation; count = expected; cv.notify_all(); }
    void arrive_and_wait() {
        std::unique_lock<std::mutex> lock(m);
        const unsigned g = generation;
        if (--count == 0) next();
        else cv.wait(lock, [&] { return generation != g; });
    }
    void arrive_and_drop() {
        std::unique_lock<std::mutex> lock(m);
        --expected;
        if (--count == 0) next();
    }
};
static EmuBarrier* emu_barrier = nullptr;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }

template <typename... P, std::size_t... I>
static void emu_invoke(void (*f)(P...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<P>*>(args[I])...);
}

template <typename... P>
static void emu_launch(void (*f)(P...), const unsigned* grid, const unsigned* block, void** args) {
    gridDim = {grid[0], grid[1], grid[2]};
    blockDim = {block[0], block[1], block[2]};
    const unsigned n = block[0] * block[1] * block[2];
    for (unsigned z = 0; z < grid[2]; ++z)
        for (unsigned y = 0; y < grid[1]; ++y)
            for (unsigned x = 0; x < grid[0]; ++x) {
                blockIdx = {x, y, z};
                EmuBarrier bar(n);
                emu_barrier = &bar;
                std::vector<std::thread> threads;
                threads.reserve(n);
                for (unsigned t = 0; t < n; ++t)
                    threads.emplace_back([&, t] {
                        threadIdx = {t % block[0], (t / block[0]) % block[1], t / (block[0] * block[1])};
                        emu_invoke(f, args, std::index_sequence_for<P...>{});
                        bar.arrive_and_drop();
                    });
                for (auto& th : threads) th.join();
            }
}

#define EMU_EXPORT(name) \
    extern "C" __attribute__((visibility("default"))) void emu_##name(const unsigned* g, const unsigned* b, void** a) { \
        emu_launch(name, g, b, a); }
"""

_FP16 = r"""
#pragma once
typedef _Float16 __half;
inline float __half2float(__half h) { return (float)h; }
inline __half __float2half_rn(float f) { return (__half)f; }
"""

_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')
_MACRO_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)##SUFFIX')
_MACRO_USE = re.compile(r"^[A-Z_]+\((\w+),", re.M)


def compiler() -> str | None:
    """The C++ compiler the emulator uses (g++ or clang++), or None."""
    return shutil.which("g++") or shutil.which("clang++")


def _kernel_names(code: str) -> list[str]:
    names = list(_KERNEL.findall(code))
    stems = _MACRO_KERNEL.findall(code)
    if stems:
        suffixes = [m for m in _MACRO_USE.findall(code) if m not in ("RANK",)]
        names += [f"{stem}{suffix}" for stem in stems for suffix in suffixes]
    return sorted(set(names))


class EmulatedModule:
    """A compiled CPU build of CUDA source ``code`` (see the module docstring)."""

    _cache_dir = Path(tempfile.gettempdir()) / "peftmath-cuda-emulator"

    def __init__(self, code: str, options: tuple[str, ...] = ()) -> None:
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler (g++ or clang++) to emulate CUDA kernels with")
        defines = [o for o in options if o.startswith("-D")]
        names = _kernel_names(code)
        key = hashlib.sha256("\0".join([code, *defines, _SHIM, _FP16]).encode()).hexdigest()[:24]
        root = self._cache_dir / key
        lib = root / "kernels.so"
        if not lib.exists():
            (root / "include").mkdir(parents=True, exist_ok=True)
            (root / "include" / "cuda_fp16.h").write_text(_FP16)
            (root / "include" / "emu_shim.h").write_text(_SHIM)
            source = root / "kernels.cpp"
            source.write_text('#include "emu_shim.h"\n' + code + "\n" + "\n".join(f"EMU_EXPORT({n})" for n in names) + "\n")
            tmp = root / f"kernels.{id(self)}.so"
            cmd = [cxx, "-std=c++17", "-O0", "-shared", "-fPIC", "-pthread", "-ffp-contract=off",
                   "-Wno-unknown-pragmas",
                   # each rank is its own library: keep their template statics (__shared__ arrays) apart
                   "-fvisibility=hidden", "-fno-gnu-unique", "-I", str(root / "include"), *defines, str(source), "-o", str(tmp)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"emulated CUDA build failed:\n{done.stderr[-4000:]}")
            tmp.replace(lib)
        self._lib = ctypes.CDLL(str(lib))
        self.names = names

    def get_function(self, name: str) -> "EmulatedFunction":
        return EmulatedFunction(getattr(self._lib, f"emu_{name}"))


class EmulatedFunction:
    def __init__(self, fn: Any) -> None:
        fn.restype = None
        self._fn = fn

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        keep = []
        for a in args:
            if isinstance(a, np.ndarray):
                keep.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, np.floating) and a.dtype == np.float32:
                keep.append(ctypes.c_float(float(a)))
            elif isinstance(a, np.floating) and a.dtype == np.float64:
                keep.append(ctypes.c_double(float(a)))
            elif isinstance(a, np.integer) and a.dtype.itemsize == 8:
                keep.append(ctypes.c_longlong(int(a)))
            elif isinstance(a, np.integer) and a.dtype.itemsize == 4:
                keep.append(ctypes.c_int(int(a)))
            else:
                raise TypeError(f"emulated kernel argument of type {type(a).__name__}: pass a NumPy array or scalar")
        pointers = (ctypes.c_void_p * len(keep))(*[ctypes.addressof(k) for k in keep])
        dims = [tuple(int(v) for v in d) + (1,) * (3 - len(d)) for d in (grid, block)]
        g = (ctypes.c_uint * 3)(*dims[0])
        b = (ctypes.c_uint * 3)(*dims[1])
        self._fn(g, b, pointers)


def emulated_cupy_backend(monkeypatch: Any) -> Any:
    """peftmath_cupy's ``CupyBackend`` on NumPy arrays, its kernels on this emulator.

    Its namespace is NumPy's and host transfer is a plain copy; the method modules (lora, dora, ia3,
    multi) are patched (through pytest's ``monkeypatch``) to use it. ``backend.used`` lists the kernels
    that ran (did not decline), so a test can tell them from the generic fallback.
    """
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "backends" / "cupy"))
    import array_api_compat.numpy as np_xp
    from peftmath_cupy import CupyBackend, _kernels

    from peftmath import multi
    from peftmath.methods import dora, ia3, lora

    backend = object.__new__(CupyBackend)
    backend._cupy = type("FakeCupy", (), {"ndarray": np.ndarray})
    backend._kernels = _kernels.Kernels(np, EmulatedModule)
    backend.namespace = lambda: np_xp
    backend.from_host = lambda a, xp, device=None: xp.asarray(a).copy()  # the pinned transfer needs CuPy
    backend.to_host = lambda x: np.asarray(x)
    backend.used = []

    def spy(name: str) -> Any:
        method = getattr(backend._kernels, name)

        def run(*args: Any, **kwargs: Any) -> Any:
            out = method(*args, **kwargs)
            if out is not None and out is not False:
                backend.used.append(name)
            return out

        return run

    for name in ("lora_addmm_", "dora_merge_", "dora_unmerge_", "ia3_scale_", "lora_gather_"):
        monkeypatch.setattr(backend._kernels, name, spy(name))
    for module in (dora, ia3, lora, multi):
        monkeypatch.setattr(module, "backend_for", lambda xp: backend)
    return backend
