"""The number of threads of the OpenBLAS libraries loaded in this process, changed for a while.

The streamed merge (:func:`peftmath.io.stream.transform`) runs three threads of its own (read-ahead, the
computation, write-behind). Its gemms are rank-r updates (``W += s * B @ A``, r << the weight's sides):
memory-bound, so a second BLAS thread adds little, and OpenBLAS's idle workers spin for a while after each
call, taking a core from the reader and the writer (on 2 cores, measured: twice the CPU time of the merge,
most of it spinning). :func:`blas_threads` caps every loaded OpenBLAS (NumPy's and SciPy's, each ships its
own) at ``n`` threads and restores the previous counts on exit.

The bits of a gemm may depend on the thread count: OpenBLAS splits the output's rows and columns over its
threads, and a long summed dimension in blocks whose size depends on the count (measured: rank 1400 differs
between 1 and 2 threads, ranks up to 512 do not). :func:`peftmath.io.stream.transform` therefore caps the
threads only for plain LoRA merges of a rank up to ``stream.LOW_RANK`` (``tests/io/test_blas_threads.py``
checks that those give the same bits with any count). Where the libraries cannot be found (not Linux,
another BLAS, no OpenBLAS symbol), nothing changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["BlasThreads", "blas_threads", "openblas_libraries"]

#: the (get, set) symbol names of OpenBLAS builds: plain, 64-bit integer, and the scipy-openblas wheels'
_SYMBOLS = [(f"{p}_get_num_threads{s}", f"{p}_set_num_threads{s}")
            for p in ("openblas", "scipy_openblas") for s in ("", "64_")]


def openblas_libraries() -> list[tuple[Any, Any]]:
    """``(get_num_threads, set_num_threads)`` of each OpenBLAS shared library mapped into this process
    (:func:`peftmath._cblas.loaded_openblas`; empty elsewhere or when none is loaded)."""
    import ctypes

    from .._cblas import loaded_openblas

    found = []
    for _, lib in loaded_openblas():
        for get_name, set_name in _SYMBOLS:
            get, put = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and put is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                put.restype, put.argtypes = None, [ctypes.c_int]
                found.append((get, put))
                break
    return found


class BlasThreads:
    """At most ``n`` threads (at least 1) in every loaded OpenBLAS between :meth:`__enter__` and
    :meth:`__exit__` (the previous counts afterwards); a library already at or below ``n`` is left alone.

    A library loaded while the block runs (SciPy's, opened by the first gemm: :mod:`peftmath._cblas`) is
    capped by the next :meth:`refresh`, which looks again only when modules were imported or a gemm was
    bound since it last looked."""

    def __init__(self, n: int) -> None:
        self.n = max(1, int(n))
        self._changed: dict[Any, tuple[Any, int]] = {}  # set function -> (itself, the count before)
        self._seen: set[Any] = set()
        self._modules: tuple[int, int] | None = None

    def refresh(self) -> None:
        import sys

        from .. import _cblas

        state = (len(sys.modules), len(_cblas._GEMM))
        if state == self._modules:
            return
        self._modules = state
        for get, put in openblas_libraries():
            key = ctypes_address(put)
            if key in self._seen:
                continue
            self._seen.add(key)
            try:
                before = int(get())
                if before > self.n:
                    put(self.n)
                    self._changed[key] = (put, before)
            except Exception:  # noqa: BLE001 - a hint only: never fail a merge over the thread count
                continue

    def __enter__(self) -> BlasThreads:
        self.refresh()
        return self

    def __exit__(self, *exc: Any) -> None:
        for put, before in self._changed.values():
            put(before)
        self._changed.clear()


def ctypes_address(fn: Any) -> int:
    """The address of a ctypes function (the same symbol of the same library: the same address)."""
    import ctypes

    return ctypes.cast(fn, ctypes.c_void_p).value or 0


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[BlasThreads]:
    """:class:`BlasThreads` ``(n)`` as a context manager."""
    with BlasThreads(n) as limit:
        yield limit
