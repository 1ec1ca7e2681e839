"""Compile CUDA source to PTX with NVRTC from the ``nvidia-cuda-nvrtc-cu12`` wheel: no GPU, no CUDA
toolkit, no CuPy. The ``gpu-build`` extra installs it (and ``nvidia-cuda-runtime-cu12`` for
``cuda_fp16.h``), so CI checks that the CuPy backend's kernels compile, as CuPy's ``RawModule`` will
compile them on a GPU machine.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def available() -> bool:
    return library() is not None and include_dir() is not None


def library() -> Path | None:
    root = _package_dir("nvidia.cuda_nvrtc")
    libs = sorted((root / "lib").glob("libnvrtc.so.*")) if root else []
    return libs[0] if libs else None


def include_dir() -> Path | None:
    root = _package_dir("nvidia.cuda_runtime")
    return root / "include" if root and (root / "include" / "cuda_fp16.h").exists() else None


def compile_ptx(code: str, options: tuple[str, ...], arch: str = "compute_90") -> tuple[str, str]:
    """``(ptx, log)`` for ``code``; raises RuntimeError with NVRTC's log when it does not compile."""
    lib = ctypes.CDLL(str(library()))
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), b"kernels.cu", 0, None, None) != 0:
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        opts = [o.encode() for o in (*options, f"--gpu-architecture={arch}", f"-I{include_dir()}")]
        result = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if result != 0:
            raise RuntimeError(f"NVRTC could not compile the kernels ({arch}):\n{log.value.decode()}")
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
        return ptx.value.decode(), log.value.decode().strip()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
