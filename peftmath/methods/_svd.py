"""The smallest singular triplets of a base weight, and their merge record: shared by the methods whose
delta depends on the base weight's SVD (OSF replaces its low part, LoRA's KaSA variant drops it).

Both recompute the split from the base weight as PEFT does when it loads the adapter, and both lose the
low part when they merge; merge returns it packed into one vector (the record) so that unmerge is exact.
"""

from __future__ import annotations

from typing import Any

from .._array import as_compute, compute_dtype, namespace
from ..errors import ShapeError, UnsupportedError

Array = Any

__all__ = ["smallest_triplets", "triplet_product", "pack_triplets", "unpack_triplets"]


def smallest_triplets(weight: Array, r: int, *, dtype: Any = None, method: str = "OSF",
                      where: str = "svd") -> tuple[Array, Array, Array]:
    """``(U (out, r), S (r,), Vh (r, in))``: the ``r`` smallest singular triplets of the 2-D ``weight`` (its
    ``xp.linalg.svd``, in ``dtype``; default: the compute dtype, float32 for float32 weights as PEFT's float32
    SVD). ``method`` names the method in the refusal of a library that cannot compute the SVD."""
    xp = namespace(weight, where=where)
    cd = dtype if dtype is not None else compute_dtype(xp, weight.dtype)
    try:
        U, S, Vh = xp.linalg.svd(as_compute(xp, weight, cd), full_matrices=False)
    except NotImplementedError as exc:  # dask: the SVD of a matrix chunked along both axes
        raise UnsupportedError(
            f"{where}: {method} needs the SVD of the base weight {tuple(weight.shape)}, which this array library "
            f"cannot compute for this layout ({exc.__class__.__name__}: {str(exc).splitlines()[0]}); for dask, "
            f"rechunk the weight to one chunk along one axis (weight.rechunk({{1: -1}})) or use NumPy"
        ) from exc
    n = int(S.shape[0])
    return U[:, n - r:], S[n - r:], Vh[n - r:, :]


def triplet_product(xp: Any, U: Array, S: Array, V: Array, cd: Any) -> Array:
    """``U diag(S) V`` in ``cd`` (a new array)."""
    return xp.matmul(as_compute(xp, U, cd) * as_compute(xp, S, cd)[None, :], as_compute(xp, V, cd))


def pack_triplets(xp: Any, U: Array, S: Array, V: Array) -> Array:
    """The merge record: ``U``, ``S``, ``V`` flattened into one vector of ``r·(out + in + 1)``."""
    return xp.concat([xp.reshape(U, (-1,)), S, xp.reshape(V, (-1,))])


def unpack_triplets(record: Array, out: int, inn: int, r: int, *, method: str = "OSF",
                    where: str = "svd") -> tuple[Array, Array, Array]:
    """Inverse of :func:`pack_triplets`; :class:`ShapeError` for a record of another module."""
    xp = namespace(record, where=where)
    if tuple(record.shape) != (r * (out + inn + 1),):
        raise ShapeError(f"{where}: the {method} merge record has shape {tuple(record.shape)}, expected "
                         f"({r * (out + inn + 1)},) = r*(out+in+1) for r={r}, a {out}x{inn} layer")
    a, b = out * r, out * r + r
    return xp.reshape(record[:a], (out, r)), record[a:b], xp.reshape(record[b:], (r, inn))
