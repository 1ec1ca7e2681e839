"""Linear-algebra helpers the array API standard lacks, written once against it.

:func:`randomized_svd` is the truncated SVD behind PiSSA's fast init (``init_lora_weights="pissa_niter_k"``),
``peftmath extract --randomized`` and ``peftmath inspect`` on large deltas. It lives here, beside
:mod:`peftmath._array`, rather than in ``_array.py`` because it draws its test matrix through a backend
(``_array`` is imported by ``backends``, so it cannot import it back).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._array import namespace
from .backends import backend_for

Array = Any

__all__ = ["randomized_svd", "low_rank_singular_values"]


def low_rank_singular_values(B: np.ndarray, A: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The singular values of ``ΔW = scale · B A`` (``B (m, r)``, ``A (r, n)``) without forming ``ΔW``.

    Reduced QR of the factors, ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``, gives ``ΔW = Q_B (scale · R_B R_Aᵀ) Q_Aᵀ``;
    ``Q_B`` and ``Q_A`` have orthonormal columns, so ``ΔW`` has the singular values of the small core
    ``C = scale · R_B R_Aᵀ`` (``min(m, r) x min(n, r)``). Work ``O((m + n) r²)`` instead of the dense SVD's
    ``O(m n min(m, n))``, computed in float64 from the factors (more accurate than an SVD of the rounded
    product). Returns all ``min(m, n)`` singular values, descending, as float64 on the host: those of the
    core, then zeros (``ΔW`` has rank at most ``r``), so the result has the length of the dense SVD's.

    >>> rng = np.random.default_rng(0)
    >>> B, A = rng.standard_normal((50, 3)), rng.standard_normal((3, 40))
    >>> S = low_rank_singular_values(B, A, 0.5)
    >>> S.shape, bool(np.allclose(S, np.linalg.svd(0.5 * B @ A, compute_uv=False), rtol=1e-12, atol=1e-12))
    ((40,), True)
    """
    B = np.asarray(B, dtype=np.float64)
    A = np.asarray(A, dtype=np.float64)
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        from .errors import ShapeError

        raise ShapeError(f"low_rank_singular_values: factors B {B.shape} and A {A.shape} do not form B @ A "
                         f"(B must be (m, r), A (r, n))")
    m, n = B.shape[0], A.shape[1]
    R_B = np.linalg.qr(B, mode="r")      # (min(m, r), r); Q is never needed, so never formed
    R_A = np.linalg.qr(A.T, mode="r")    # (min(n, r), r)
    S = np.linalg.svd(float(scale) * (R_B @ R_A.T), compute_uv=False)
    out = np.zeros(min(m, n), dtype=np.float64)
    out[: S.shape[0]] = S
    return out


def randomized_svd(M: Array, q: int, *, niter: int, rng: np.random.Generator, backend: Any = None,
                   device: Any = None) -> tuple[Array, Array, Array]:
    """Top-``q`` SVD of ``M (m, n)`` by subspace iteration (Halko et al., the algorithm of
    ``torch.svd_lowrank``).

    With ``X = M`` (or ``Mᵀ`` when ``m < n``) and a Gaussian ``G (n, q)`` drawn on the host from ``rng``:
    ``Q = qr(X G)``, then ``niter`` times ``Q = qr(X qr(Xᵀ Q))``; the SVD of ``Qᵀ X = Û S Vh`` gives
    ``U = Q Û``. Exact when ``rank(M) <= q``.

    Returns ``(U (m, q), S (q,), Vh (q, n))`` in ``M``'s namespace, on its device.

    >>> rng = np.random.default_rng(0)
    >>> M = rng.standard_normal((30, 3)) @ rng.standard_normal((3, 20))   # rank 3
    >>> U, S, Vh = randomized_svd(M, 5, niter=2, rng=np.random.default_rng(1))
    >>> U.shape, S.shape, Vh.shape
    ((30, 5), (5,), (5, 20))
    >>> bool(np.allclose(S[:3], np.linalg.svd(M, compute_uv=False)[:3]))
    True
    """
    xp = namespace(M)
    backend = backend or backend_for(xp)
    m, n = M.shape
    transposed = m < n
    X = xp.matrix_transpose(M) if transposed else M
    m, n = X.shape
    G = backend.from_host(rng.standard_normal((n, q)).astype(np.float32), xp, device)
    G = xp.astype(G, X.dtype)
    Q, _ = xp.linalg.qr(xp.matmul(X, G))
    for _ in range(niter):
        Q, _ = xp.linalg.qr(xp.matmul(xp.matrix_transpose(X), Q))
        Q, _ = xp.linalg.qr(xp.matmul(X, Q))
    small = xp.matmul(xp.matrix_transpose(Q), X)
    U, S, Vh = xp.linalg.svd(small, full_matrices=False)
    U = xp.matmul(Q, U)
    if transposed:
        return xp.matrix_transpose(Vh), S, xp.matrix_transpose(U)
    return U, S, Vh
