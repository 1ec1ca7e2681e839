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

__all__ = ["randomized_svd"]


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
