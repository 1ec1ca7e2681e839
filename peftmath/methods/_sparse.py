"""In-place updates of a few entries of a weight matrix (the sparse merges: SHiRA, WaveFT).

A merge whose ``ΔW`` has ``nnz ≪ out·in`` nonzero entries need not build a dense ``ΔW``: it reads and writes
only those entries of ``W`` (``O(nnz)`` instead of ``O(out·in)`` memory traffic and no array of W's size).
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

from .._array import as_compute

Array = Any

__all__ = ["add_at"]


def add_at(xp: Any, M: Array, flat: np.ndarray, in_features: int, values: Array, cd: Any) -> bool:
    """``M[p, q] += v`` at the distinct row-major positions ``flat`` (``p = flat // in``, ``q = flat % in``) of
    the 2-D ``M`` ``(out, in)``, in place: each touched entry formed in ``cd`` (float32 / float64) and rounded
    once to ``M``'s dtype; the others are not read. ``values`` ``(len(flat),)`` in ``cd``.

    Through ``M``'s flat view where its layout gives one (one 1-D integer-array read and write, the cheap
    indexing path), else 2-D ``(rows, cols)`` indexing (a Fortran-ordered or strided ``M``). Returns False,
    touching nothing, where the namespace has no integer-array assignment (array-api-strict).

    >>> import array_api_compat.numpy as xp, numpy as np
    >>> M = np.zeros((2, 3), dtype=np.float32)
    >>> add_at(xp, M, np.array([1, 5]), 3, np.array([2.0, -1.0], dtype=np.float32), xp.float32), M.tolist()
    (True, [[0.0, 2.0, 0.0], [0.0, 0.0, -1.0]])
    """
    dev = array_api_compat.device(M)
    try:
        view = xp.reshape(M, (-1,), copy=False)
    except (ValueError, TypeError, AttributeError, RuntimeError, NotImplementedError):
        view = None
    try:
        if view is not None:
            idx = xp.asarray(flat, device=dev)
            view[idx] = as_compute(xp, as_compute(xp, view[idx], cd) + values, M.dtype)
        else:
            r = xp.asarray(flat // in_features, device=dev)
            c = xp.asarray(flat % in_features, device=dev)
            M[r, c] = as_compute(xp, as_compute(xp, M[r, c], cd) + values, M.dtype)
    except (TypeError, IndexError, NotImplementedError):
        return False
    return True
