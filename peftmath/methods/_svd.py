"""The smallest singular triplets of a base weight, and their merge record: shared by the methods whose
delta depends on the base weight's SVD (OSF replaces its low part, LoRA's KaSA variant drops it).

Both recompute the split from the base weight as PEFT does when it loads the adapter, and both lose the
low part when they merge; merge returns it packed into one vector (the record) so that unmerge is exact.
"""

from __future__ import annotations

from typing import Any

from .._array import as_compute, common_device, compute_dtype, namespace
from ..backends import backend_for
from ..errors import ShapeError, UnsupportedError

Array = Any

__all__ = ["smallest_triplets", "low_split", "low_from_record", "triplet_product", "pack_triplets",
           "unpack_triplets"]


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


def low_split(weight: Array, r: int, *, dtype: Any = None, method: str = "OSF",
              where: str = "svd") -> tuple[Array, Array]:
    r"""``(L, record)``: the part ``L (out, in)`` of ``weight`` along its ``r`` smallest singular directions
    (``L = U_lo S_lo V_lo``, in ``dtype``, default the compute dtype) and the merge record that gives it back
    (:func:`low_from_record`). The record is the smaller of two forms: the triplets packed by
    :func:`pack_triplets` (``r·(out + in + 1)`` numbers) or ``L`` itself (``out·in``, 2-D).

    Only the split matters here, not the singular vectors: ``L = P W`` with ``P`` the projector on the
    ``r`` smallest left singular directions (right ones, ``L = W P``, when ``in < out``). For float32 and
    half-precision weights ``P`` comes from the eigenvectors of the Gram matrix ``W Wᵀ`` (``Wᵀ W``) formed
    and decomposed in float64, only the ``k = min(out, in) − r`` largest or the ``r`` smallest
    (:meth:`~peftmath.backends.Backend.eigh_range`), with ``L = W − Q Qᵀ W`` or ``L = Q Qᵀ W``: on a
    4096 x 4096 weight about 3.5 s instead of 20 s for NumPy's float32 SVD. Accuracy: the Gram squares the
    spread of the spectrum, so the subspace is accurate to about ``ε₆₄ σ₁² / (σ_k² − σ_{k+1}²)``; against
    a float32 SVD's ``ε₃₂ σ₁ / (σ_k − σ_{k+1})`` that is more accurate unless ``σ₁ / σ_k`` exceeds about
    ``10⁸``, where no float32 split is meaningful. Float64 weights keep the float64 SVD (its accuracy is
    what float64 asks for), and so does a library without a symmetric eigensolver (dask).

    >>> import numpy as np
    >>> W = np.diag([3.0, 2.0, 1.0]).astype(np.float32)
    >>> L, rec = low_split(W, 1)
    >>> np.round(L, 6).tolist(), rec.shape   # the triplets (1·(3 + 3 + 1) = 7) are smaller than L (9)
    ([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], (7,))
    """
    xp = namespace(weight, where=where)
    cd = dtype if dtype is not None else compute_dtype(xp, weight.dtype)
    out, inn = int(weight.shape[0]), int(weight.shape[1])
    m = min(out, inn)
    triplets = r * (out + inn + 1) <= out * inn
    if r == 0:
        dev = common_device(weight, where=where)
        return xp.zeros((out, inn), dtype=cd, device=dev), xp.zeros((0,), dtype=cd, device=dev)
    if r >= m:  # all of W is "low": the record is W (a copy: merge overwrites the weight)
        L = xp.asarray(weight, dtype=cd, copy=True)
        return L, L
    backend = backend_for(xp)
    Q = None
    if cd != xp.float64:
        W64 = as_compute(xp, weight, xp.float64)
        left = out <= inn
        G = xp.matmul(W64, xp.matrix_transpose(W64)) if left else xp.matmul(xp.matrix_transpose(W64), W64)
        # the r smallest eigenvectors when the triplets are the record (their small SVD needs them),
        # else whichever side is narrower
        bottom = triplets or r <= m - r
        Q = backend.eigh_range(G, 0, r) if bottom else backend.eigh_range(G, r, m)
        del G
    if Q is None:  # float64, or no eigensolver: the SVD itself
        U, S, V = smallest_triplets(weight, r, dtype=cd, method=method, where=where)
        L = triplet_product(xp, U, S, V, cd)
        return L, pack_triplets(xp, U, S, V) if triplets else L
    Qt = xp.matrix_transpose(Q)
    if not bottom:  # Q spans the top: L = W − (its projection)
        top = xp.matmul(Q, xp.matmul(Qt, W64)) if left else xp.matmul(xp.matmul(W64, Q), Qt)
        L = as_compute(xp, W64 - top, cd)
        return L, L
    M = xp.matmul(Qt, W64) if left else xp.matmul(W64, Q)  # (r, in) or (out, r): W's low part in Q's basis
    L64 = xp.matmul(Q, M) if left else xp.matmul(M, Qt)
    L = as_compute(xp, L64, cd)
    if not triplets:
        return L, L
    u, s, vh = xp.linalg.svd(M, full_matrices=False)  # r x in (or out x r): small
    U, V = (xp.matmul(Q, u), vh) if left else (u, xp.matmul(vh, Qt))
    return L, pack_triplets(xp, *(as_compute(xp, a, cd) for a in (U, s, V)))


def low_from_record(record: Array, out: int, inn: int, r: int, cd: Any, *, method: str = "OSF",
                    where: str = "svd") -> Array:
    """The low part ``L (out, in)`` in ``cd`` back from a :func:`low_split` record (either form) or from
    triplets packed by earlier versions; :class:`ShapeError` for a record of another module."""
    xp = namespace(record, where=where)
    if record.ndim == 2:
        if tuple(record.shape) != (out, inn):
            raise ShapeError(f"{where}: the {method} merge record is a {tuple(record.shape)} matrix, expected the "
                             f"low part of the {out}x{inn} weight, or the packed triplets")
        return as_compute(xp, record, cd)
    return triplet_product(xp, *unpack_triplets(record, out, inn, r, method=method, where=where), cd)


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
