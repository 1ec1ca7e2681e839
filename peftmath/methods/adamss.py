r"""AdaMSS: adaptive multi-subspaces (PEFT's ``AdamssConfig``, ``peft_type: "ADAMSS"``).

AdaMSS reads the base weight's singular vectors, clusters the output rows into ``K`` subspaces by their left
singular vectors, and trains a small low-rank map per subspace. With ``W_b = [W | b]`` ``(out, n)`` (the bias
as an extra column when the layer has one, ``n = in + 1``; else ``W_b = W``, ``n = in``)::

    P = adamss_newB        (q, n)       the (approximate) top-q right singular vectors of W_b, frozen, saved
    A_i = adamss_A.<i>     (k_i, q)     per subspace, trained
    B_i = adamss_B.<i>     (s_i, k_i)   per subspace, trained; s_i = |S_i| rows of the output
    S_0, …, S_{K−1}                     a partition of the output rows: k-means of the rows of the left
                                        singular vectors U (out, q), recomputed from W_b (not saved)
    ΔW_b[S_i, :] = B_i A_i P            (out, n);   ΔW = ΔW_b[:, :in],  Δb = ΔW_b[:, in] (with a bias)
    y = x Wᵀ + b + [x, 1] ΔW_bᵀ

The partition is not in the checkpoint: PEFT recomputes it when it loads the adapter (a randomized SVD of
``W_b`` seeded with ``random_seed``, then scikit-learn's ``KMeans(init="random", n_init=1, max_iter=10,
random_state=123456789)``). peftmath recomputes it from the same base weight and the saved ``P``: the left
vectors follow exactly from ``W_b`` and ``P`` (:func:`left_vectors`, whatever random projection the SVD
drew), and :func:`kmeans_labels` is scikit-learn's Lloyd iteration written out. Merging writes over the
weight the partition came from, so merge returns the partition as its record and unmerge needs it.

PEFT adapts nn.Linear only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._array import as_compute, compute_dtype, dtype_name, is_low_precision, namespace, widest_float
from ..backends import backend_for, host_rng
from ..config import TunerConfig, check_choice, check_flags, check_number, check_positive_int
from ..errors import CheckpointError, ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from ..layers import Layer, LayerKind
from ._base import (MergeResult, ModuleAdapter, apply_delta, bias_update, require_kind, require_writeable,
                    write_back)
from ._contract import Method

Array = Any

__all__ = ["AdamssConfig", "weight_with_bias", "left_vectors", "kmeans_labels", "kmeans_margins", "NearTie",
           "row_error", "partition", "factors", "delta_weight", "forward", "initialize_subspaces", "AdamssModule"]

PEFT_TYPE = "ADAMSS"
SUPPORTED_KINDS = (LayerKind.LINEAR,)
_P = "adamss_newB"
#: subspaces a checkpoint may hold per module (its keys adamss_A.<i> / adamss_B.<i> are listed up to this)
MAX_SUBSPACES = 512
#: scikit-learn's KMeans as PEFT calls it (peft/tuners/adamss/utils.py, clustering_Z)
KMEANS_SEED = 123456789
KMEANS_MAX_ITER = 10
KMEANS_TOL = 1e-4
_KEY = re.compile(r"adamss_([AB])\.(\d+)$")
#: TunerConfig fields that PEFT's AdamssConfig does not have
_NOT_PEFT_FIELDS = ("exclude_modules",)


# --------------------------------------------------------------------------------------------------
# Config (specs/adamss.md, "1. Config")
# --------------------------------------------------------------------------------------------------
@dataclass
class AdamssConfig(TunerConfig):
    """PEFT's ``AdamssConfig`` (``peft_type: "ADAMSS"``), PEFT's names and defaults. The ASA fields
    (``use_asa``, ``asa_*``, ``init_warmup``, ``final_warmup``, ``mask_interval``) steer training only (which
    subspaces keep receiving gradients) and do not change what a checkpoint computes."""

    peft_type: ClassVar[str] = "ADAMSS"
    absent_fields: ClassVar[tuple[str, ...]] = _NOT_PEFT_FIELDS

    r: int = 100
    num_subspaces: int = 5
    subspace_rank: int = 1
    init_weights: str | None = "orthogonal"
    use_asa: bool = False
    asa_target_subspaces: int = 50
    init_warmup: int = 50
    final_warmup: int = 1000
    mask_interval: int = 100
    asa_importance_beta: float = 0.85
    asa_uncertainty_beta: float = 0.85
    asa_schedule_exponent: float = 3.0
    use_dynamic_rank: bool = False
    svd_threshold: float = 0.1
    random_seed: int = 0

    def validate(self, *, source: str = "config") -> None:
        super().validate(source=source)
        for name in ("r", "num_subspaces", "subspace_rank"):
            check_positive_int(source, name, getattr(self, name))
        if self.init_weights is False:  # PEFT reads False as None
            self.init_weights = None
        check_choice(source, "init_weights", self.init_weights, ("orthogonal", None))
        check_flags(source, self, "use_asa", "use_dynamic_rank")
        for name in ("asa_importance_beta", "asa_uncertainty_beta", "asa_schedule_exponent", "svd_threshold"):
            check_number(source, name, getattr(self, name))
        if not isinstance(self.random_seed, int) or isinstance(self.random_seed, bool):
            raise ConfigError(f"{source}: field 'random_seed' must be an integer, got {self.random_seed!r}")



def _check_kind(layer: Layer, where: str) -> None:
    require_kind(layer, where, "AdaMSS", SUPPORTED_KINDS, peft="PEFT's AdaMSS wraps nn.Linear only")


# --------------------------------------------------------------------------------------------------
# The partition of the output rows (specs/adamss.md, "2. The subspaces")
# --------------------------------------------------------------------------------------------------
def weight_with_bias(W: Array, bias: Array | None, *, dtype: Any = None) -> Array:
    """``W_b = [W | b]`` ``(out, in + 1)``, or ``W`` without a bias, in ``dtype`` (default float32 / float64)."""
    xp = namespace(W, bias, where="adamss.weight_with_bias")
    cd = dtype if dtype is not None else compute_dtype(xp, W.dtype, *(() if bias is None else (bias.dtype,)))
    Wc = as_compute(xp, W, cd)
    return Wc if bias is None else xp.concat([Wc, as_compute(xp, bias, cd)[:, None]], axis=1)


def left_vectors(Wb: Array, P: Array) -> Array:
    """The left singular vectors ``U (out, q)`` that go with the saved right ones ``P = adamss_newB (q, n)``.

    PEFT's ``torch.svd_lowrank(W_b, q, niter=2)`` returns ``U``, ``S``, ``V = Pᵀ`` with ``W_bᵀ U = Pᵀ diag(S)``
    and the columns of ``U`` orthonormal, in the range of ``W_b`` when ``out ≥ n`` (its last step orthonormalises
    ``W_b Q``); when ``out < n`` it works on ``W_bᵀ`` and ``W_b Pᵀ = U diag(S)``. So, whatever random projection it
    drew: ``U`` = the columns of ``W_b Pᵀ`` normalised (``out < n``), else of ``W_b (W_bᵀ W_b)⁻¹ Pᵀ`` (``W_b⁻ᵀ Pᵀ``
    for a square ``W_b``; ``W_b`` must have full column rank), solved in float64 where the library has it. NumPy
    arrays solve by LAPACK through SciPy (:func:`_numpy_solve`: a float32 LU refined to a float64 backward error for
    few right-hand sides, else the float64 LU), other libraries by ``xp.linalg.solve``.

    >>> import numpy as np
    >>> Wb = np.array([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0]])        # out = 3 > n = 2: the Gram branch
    >>> left_vectors(Wb, np.array([[0.0, -1.0]])).round(12).tolist()  # P's sign carries over to U
    [[0.0], [-1.0], [0.0]]
    """
    return _left_vectors_and_scales(Wb, P)[0]


#: Gaussian probes appended to the solve of :func:`left_vectors` when the partition is checked for near ties: they
#: estimate ``‖W_b⁺‖`` (specs/adamss.md §2, "Near ties")
PROBES = 16
#: the probe estimate of ``‖W_b⁺‖₂`` is multiplied by this (with 16 probes it falls below a third of
#: ``‖W_b⁺‖_F ≥ ‖W_b⁺‖₂`` with probability ≤ P(χ²₁₆ < 16/9) ≈ 4·10⁻⁶)
PROBE_SAFETY = 3.0


def _left_vectors_and_scales(Wb: Array, P: Array, *, probes: int = 0) -> tuple[Array, np.ndarray, float | None]:
    """``(U, s, inv)``: :func:`left_vectors`, the singular values ``s (q,)`` that go with it (host float64: the
    column norms of ``W_b Pᵀ`` for ``out < n``, else ``1 / ‖W_b⁻ᵀ p_j‖``), and, with ``probes`` Gaussian right-hand
    sides added to the solve (``out ≥ n``), the estimate ``PROBE_SAFETY · ‖W_b⁺‖_F`` of ``1 / σ_min(W_b)``
    (None for ``out < n`` or without probes)."""
    xp = namespace(Wb, P, where="adamss.left_vectors")
    out, n = int(Wb.shape[0]), int(Wb.shape[1])
    q = int(P.shape[0])
    # out < n: a product; out >= n: a solve with W_b (square) or its Gram matrix, in float64 where the library
    # has it (the Gram matrix squares W_b's condition number)
    cd = compute_dtype(xp, Wb.dtype, P.dtype) if out < n else widest_float(xp, Wb.dtype, P.dtype)
    Wc, Pt = as_compute(xp, Wb, cd), xp.matrix_transpose(as_compute(xp, P, cd))
    inv = None
    if out < n:
        G = xp.matmul(Wc, Pt)
    else:
        if probes:
            Z = np.random.default_rng(KMEANS_SEED).standard_normal((n, probes))
            Pt = xp.concat([Pt, as_compute(xp, backend_for(xp).from_host(Z, xp, _device(Wb)), cd)], axis=1)
        A = xp.matrix_transpose(Wc) if out == n else xp.matmul(xp.matrix_transpose(Wc), Wc)  # A G' = Pᵀ
        G = _numpy_solve(A, Pt) if isinstance(A, np.ndarray) and A.dtype == np.float64 else None
        if G is None:
            G = xp.linalg.solve(A, Pt)
        if probes:
            Y = np.asarray(backend_for(xp).to_host(G[:, q:]), dtype=np.float64)
            frob = float(np.sqrt(np.mean(np.sum(Y * Y, axis=0))))  # ≈ ‖A⁻¹‖_F
            inv = PROBE_SAFETY * (frob if out == n else np.sqrt(frob))  # the Gram matrix: ‖A⁻¹‖₂ = σ_min⁻²
            G = G[:, :q]
        if out > n:
            G = xp.matmul(Wc, G)
    norms = xp.sqrt(xp.sum(G * G, axis=0, keepdims=True))
    host = np.asarray(backend_for(xp).to_host(norms), dtype=np.float64).reshape(-1)
    return G / norms, (host if out < n else 1.0 / host), inv


#: mixed-precision refinement (specs/adamss.md §2): at most this many corrections, each at least halving the
#: backward error, before the float64 solve takes over
REFINE_MAX = 10
#: refine a float32 LU only for at most n / REFINE_RATIO right-hand sides: each correction costs ~4 n² q flops (a
#: float64 residual, a float32 solve) against the (2/3) n³ a float32 LU saves over a float64 one, and 3-4 corrections
#: are usual (measured on n = 4096, one OpenBLAS thread: 1.2x faster at q = 16, even at q = 32, slower at q ≥ 64)
REFINE_RATIO = 128


def _numpy_solve(A: np.ndarray, B: np.ndarray) -> np.ndarray | None:
    """``A⁻¹ B`` for float64 NumPy ``A (n, n)``, ``B (n, q)``: :func:`_refined_solve` when ``q ≤ n / REFINE_RATIO``,
    else (or where it does not converge) LAPACK's float64 LU (``dgetrf`` / ``dgetrs``, the ``gesv`` of
    ``numpy.linalg.solve``) on one private Fortran-ordered copy. None where that LU is singular or not finite: the
    caller's ``xp.linalg.solve`` then reports it. ``A`` and ``B`` are not written."""
    from scipy.linalg import lapack

    if int(B.shape[1]) * REFINE_RATIO <= int(A.shape[0]):
        X = _refined_solve(A, B)
        if X is not None:
            return X
    lu, piv, info = lapack.dgetrf(np.array(A, dtype=np.float64, order="F"), overwrite_a=True)
    if info != 0 or not bool(np.isfinite(lu).all()):
        return None
    X, info = lapack.dgetrs(lu, piv, B)
    return X if info == 0 else None


def _refined_solve(A: np.ndarray, B: np.ndarray) -> np.ndarray | None:
    """``X = A⁻¹ B`` (float64 ``A (n, n)``, ``B (n, q)``) as LAPACK's ``dsgesv``: LU of a float32 copy of ``A``
    (``sgetrf``, through SciPy), ``X₀`` from it, then ``X ← X + LU⁻¹ R`` with the residual ``R = B − A X`` in float64
    (each column of ``R`` scaled to max 1 before it is rounded to float32), until every column has
    ``‖r_j‖∞ ≤ √n · ε₆₄ · ‖A‖∞ · ‖x_j‖∞`` (a per-column backward error no larger than a float64 LU solve's, hence a
    forward error ``≲ κ∞(A) √n ε₆₄`` per column). None (the caller's float64 solve decides) when the float32 LU is
    singular or not finite, when a step does not halve the largest backward error (``κ(A)`` too large for float32),
    or after :data:`REFINE_MAX` corrections. ``A`` and ``B`` are not written."""
    from scipy.linalg import lapack

    n = int(A.shape[0])
    A32 = np.array(A, dtype=np.float32, order="F")
    bound = np.sqrt(n) * np.finfo(np.float64).eps * float(np.abs(A32).sum(axis=1, dtype=np.float64).max())
    lu, piv, info = lapack.sgetrf(A32, overwrite_a=True)
    if info != 0 or not bool(np.isfinite(lu).all()):
        return None

    def solve32(R: np.ndarray) -> np.ndarray:
        scale = np.abs(R).max(axis=0)
        scale[~(scale > 0)] = 1.0
        D, _ = lapack.sgetrs(lu, piv, np.array(R / scale, dtype=np.float32, order="F"), overwrite_b=True)
        return D.astype(np.float64) * scale

    X, last = solve32(B), np.inf
    for step in range(REFINE_MAX + 1):
        R = B - A @ X
        eta = np.abs(R).max(axis=0) / (np.abs(X).max(axis=0) * bound)  # backward error / its target, per column
        worst = float(eta.max()) if eta.size else 0.0
        if not np.isfinite(worst) or worst > 0.5 * last or step == REFINE_MAX and worst > 1:
            return None
        if worst <= 1:
            return X
        X += solve32(R)
        last = worst
    return None


def _left_vectors_of(W: Array, bias: Array | None, P: Array, cd: Any, *, scales: bool = False) -> Any:
    """:func:`left_vectors` ``(W_b, P)`` for ``out < n`` without forming ``W_b``: ``W_b Pᵀ = W P[:, :in]ᵀ + b P[:, in]``
    (no copy of ``W`` when it is in ``cd`` already), its columns normalised; ``scales=True``: ``(U, s)`` with the
    column norms ``s (q,)`` (host float64, the singular values)."""
    xp = namespace(W, bias, P)
    inn = int(W.shape[1])
    Pc = as_compute(xp, P, cd)
    G = xp.matmul(as_compute(xp, W, cd), xp.matrix_transpose(Pc[:, :inn]))
    if bias is not None:
        G = G + as_compute(xp, bias, cd)[:, None] * Pc[:, inn][None, :]
    norms = xp.sqrt(xp.sum(G * G, axis=0, keepdims=True))
    if not scales:
        return G / norms
    return G / norms, np.asarray(backend_for(xp).to_host(norms), dtype=np.float64).reshape(-1)


def kmeans_labels(X: np.ndarray, k: int, *, seed: int = KMEANS_SEED, max_iter: int = KMEANS_MAX_ITER,
                  tol: float = KMEANS_TOL) -> np.ndarray:
    """scikit-learn's ``KMeans(n_clusters=k, init="random", n_init=1, max_iter, tol, random_state=seed)
    .fit_predict(X)`` written out on the host, in float32 as scikit-learn runs it on float32 data: centre
    ``X``; seeds ``RandomState(seed).choice(n, k, replace=False, p=1/n)``; Lloyd steps (nearest centre by
    ``‖c‖² − 2 x·c``, first on ties; empty clusters moved to the farthest points; stop when the labels repeat
    or the squared centre shift ``≤ tol · mean(var(X))``); a last labelling when the labels did not repeat.

    >>> kmeans_labels(np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]], dtype=np.float32), 2).tolist()
    [1, 1, 0, 0]
    """
    return _lloyd(X, k, seed=seed, max_iter=max_iter, tol=tol)[0]


@dataclass
class NearTie:
    """The weakest decision of a checked k-means run (:func:`kmeans_margins`): ``margin`` against ``bound`` (the
    most the perturbation of the input can change it); ``below`` counts the decisions with ``margin ≤ bound``."""

    what: str
    iteration: int
    row: int
    margin: float
    bound: float
    below: int = 0

    @property
    def ratio(self) -> float:
        return self.margin / self.bound if self.bound > 0 else np.inf


def kmeans_margins(X: np.ndarray, k: int, row_error: float, *, seed: int = KMEANS_SEED,
                   max_iter: int = KMEANS_MAX_ITER, tol: float = KMEANS_TOL) -> tuple[np.ndarray, NearTie | None]:
    """:func:`kmeans_labels` and its weakest decision (None when there was none: ``k = 1``) for data known to within
    ``row_error``: another computation of ``X`` whose every row, and the whole matrix in Frobenius norm, are within
    ``row_error`` of this one (float32 rounding aside) takes every decision of the run the same way where each margin
    exceeds its bound (specs/adamss.md, "Near ties"). Checked, at every labelling: each row's squared-distance gap
    ``d_k − d_l`` to every other centre ``k`` against what a row moved by ``e = row_error`` and centres moved by
    ``row_error / √s`` (a mean of ``s`` rows) can change, plus float32 rounding; the stopping rule (``center shift ≤
    tol``) where its outcome changes the labels; an empty cluster's farthest row. ``O(out·k)`` per labelling."""
    return _lloyd(X, k, seed=seed, max_iter=max_iter, tol=tol, row_error=float(row_error))


def _lloyd(X: np.ndarray, k: int, *, seed: int, max_iter: int, tol: float,
           row_error: float | None = None) -> tuple[np.ndarray, NearTie | None]:
    X = np.array(X, dtype=np.float32)
    n = X.shape[0]
    tol_abs = np.mean(np.var(X, axis=0)) * tol
    X -= X.mean(axis=0)
    weights = np.ones(n, dtype=np.float32)
    seeds = np.random.RandomState(seed).choice(n, size=k, replace=False, p=weights / weights.sum())
    centers = X[seeds].copy()
    check = row_error is not None
    if check:  # float64 copies for the check; u: float32's unit roundoff (both sides round X, sums, distances)
        u = 2.0 ** -24
        xn = np.sqrt(np.sum(X.astype(np.float64) ** 2, axis=1))
        xmax = float(xn.max()) if n else 0.0
        e_row = row_error + 2 * u * xmax
        d_fl = 2 * np.sqrt(X.shape[1] + 1.0) * u  # one float32 distance ‖c‖² − 2 x·c, relative to its terms
    state: dict[str, Any] = {"weakest": None, "below": 0, "it": 0}

    def note(what: str, row: int, margin: float, bound: float, count: int, it: int | None = None) -> None:
        state["below"] += count
        w = state["weakest"]
        cand = NearTie(what, state["it"] if it is None else it, row, float(margin), float(bound))
        if w is None or cand.ratio < w.ratio:
            state["weakest"] = cand

    def center_error(count: np.ndarray) -> np.ndarray:  # per centre: a mean of s rows moves by ≤ δ/√s
        s_ = np.maximum(count.astype(np.float64), 1.0)
        return row_error / np.sqrt(s_) + 4 * np.sqrt(s_) * u * xmax

    def nearest(C: np.ndarray, e_c: np.ndarray) -> np.ndarray:  # ‖c‖² − 2 x·c, in place: as scikit-learn
        d = X @ C.T
        d *= np.float32(-2.0)
        d += (C * C).sum(axis=1)[None, :]
        labels = np.argmin(d, axis=1)
        if check and k > 1:
            _margins(d, labels, C, e_c)
        return labels

    def _margins(d: np.ndarray, labels: np.ndarray, C: np.ndarray, e_c: np.ndarray) -> None:
        """Note the weakest row; first for all rows against the second-nearest centre with the largest centre error
        (enough for every other centre: the gap grows faster with the distance than its bound), then, for the rows
        that fail that, against every centre with its own error. O(out·k)."""
        C64 = C.astype(np.float64)
        cn2 = np.sum(C64 * C64, axis=1)
        cn = np.sqrt(cn2)
        two = np.partition(d, 1, axis=1)[:, :2].astype(np.float64)
        r1, r2 = (np.sqrt(np.maximum(two[:, t] + xn * xn, 0.0)) for t in (0, 1))
        fl = 4 * d_fl * (cn.max() ** 2 + 2 * xn * cn.max())  # both sides' float32 rounding of both distances
        with np.errstate(invalid="ignore", over="ignore"):  # inf · 0 where row_error is infinite
            coarse = 2 * (e_row + e_c.max()) * (r1 + r2) + (e_row + e_c.max()) ** 2 + fl
        coarse[np.isnan(coarse)] = np.inf
        idx = np.flatnonzero(~(two[:, 1] - two[:, 0] > coarse))
        if idx.size == 0:  # every row passes; note the weakest by the coarse test
            j = int(np.argmin((two[:, 1] - two[:, 0]) / coarse))
            note(f"row {j}'s nearest centre against the second nearest", j, two[j, 1] - two[j, 0], coarse[j], 0)
            return
        lab = labels[idx]
        sub = idx.size
        sep = np.sqrt(np.maximum(cn2[:, None] + cn2[None, :] - 2 * (C64 @ C64.T), 0.0))[lab]  # ‖c_l − c_k‖
        d64 = d[idx].astype(np.float64)
        gap = d64 - d64[np.arange(sub), lab][:, None]
        r = np.sqrt(np.maximum(d64 + (xn[idx] * xn[idx])[:, None], 0.0))
        r_own, e_own = r[np.arange(sub), lab][:, None], e_c[lab][:, None]
        with np.errstate(invalid="ignore", over="ignore"):
            bound = (2 * e_row * sep + 2 * (e_own * r_own + e_c[None, :] * r)
                     + (e_row + np.maximum(e_own, e_c[None, :])) ** 2
                     + 2 * d_fl * (cn[lab][:, None] ** 2 + cn2[None, :]
                                   + 2 * xn[idx][:, None] * (cn[lab][:, None] + cn[None, :])))
        bound[np.isnan(bound)] = np.inf
        gap[np.arange(sub), lab] = np.inf
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(bound > 0, gap / bound, np.inf)
        i, c = np.unravel_index(int(np.argmin(ratio)), ratio.shape)
        note(f"row {idx[i]}'s nearest centre against centre {c}", int(idx[i]), gap[i, c], bound[i, c],
             int(np.count_nonzero(gap <= bound)))

    labels_old = np.full(n, -1)
    strict = False
    e_c = center_error(np.ones(k)) if check else None  # the seeds are rows
    pending = None  # a near-tie of the stopping rule: it matters if the next labelling changes the labels
    for it in range(max_iter):
        state["it"] = it
        labels = nearest(centers, e_c)
        if pending is not None and not np.array_equal(labels, labels_old):
            note(*pending)
        pending = None
        new, sizes = _cluster_sums(X, labels, k)
        count = sizes.astype(np.float32)
        empty = np.flatnonzero(count == 0)
        if empty.size:
            dist = ((X - centers[labels]) ** 2).sum(axis=1)
            far = np.argpartition(dist, -empty.size)[:-empty.size - 1:-1]
            if check:  # which rows are farthest (and, for several, argpartition's order of them) must not flip
                if empty.size > 1:
                    note(f"{empty.size} empty clusters at once (the order of their farthest rows)", int(far[0]), 0.0,
                         1.0, 1)
                elif n > 1:
                    r = np.sqrt(np.sort(dist.astype(np.float64))[-2:])
                    e = 2 * (e_row + float(e_c.max()))
                    note("an empty cluster's farthest row", int(far[0]), r[1] - r[0], e, int(r[1] - r[0] <= e))
            if dist.max() != 0:
                for e, f in zip(empty, far):
                    new[labels[f]] -= X[f]
                    new[e] = X[f]
                    count[e] = 1
                    count[labels[f]] -= 1
        biggest = int(np.argmax(count))
        full = count > 0
        new[full] *= (np.float32(1.0) / count[full])[:, None]
        new[~full] = new[biggest]
        shift = ((new - centers) ** 2).sum()
        e_old, e_c = e_c, (center_error(count) if check else None)
        centers = new
        if np.array_equal(labels, labels_old):
            strict = True
            break
        if check:  # √shift moves by ≤ ‖e_old + e_c‖, √tol_abs by ≤ √(tol / (q·n)) · row_error
            gap = abs(np.sqrt(float(shift)) - np.sqrt(float(tol_abs)))
            bound = (float(np.sqrt(np.sum((e_old + e_c) ** 2))) + np.sqrt(tol / (X.shape[1] * n)) * row_error
                     + 2 * np.sqrt(k * X.shape[1]) * u * np.sqrt(float(shift)))
            if gap <= bound:
                pending = ("the stopping rule (centre shift against tol)", 0, gap, bound, 1, it)
        if shift <= tol_abs:
            break
        labels_old = labels
    if not strict:
        state["it"] += 1
        final = nearest(centers, e_c)
        if pending is not None and not np.array_equal(final, labels):
            note(*pending)
        labels = final
    weakest = state["weakest"]
    if weakest is not None:
        weakest.below = state["below"]
    return labels, weakest


def _cluster_sums(X: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sums (k, d), sizes (k,))``: the rows of ``X`` added per label, each sum in row order in ``X``'s dtype
    (``((x_a + x_b) + x_c) + …``, the order of ``np.add.at``, bit for bit, and 2-4x faster): with the rows sorted
    by label (stable), step ``t`` adds the ``t``-th row of every cluster that has one, while many clusters do;
    the rows left in the few longest clusters are then added one by one."""
    sizes = np.bincount(labels, minlength=k)
    Xs = X[np.argsort(labels, kind="stable")]
    starts = np.cumsum(sizes) - sizes
    sums = np.zeros((k, X.shape[1]), dtype=X.dtype)
    live, t = np.flatnonzero(sizes), 0
    while live.size > 16:  # one vectorised step per row position
        sums[live] += Xs[starts[live] + t]
        t += 1
        live = live[sizes[live] > t]
    for j in live:  # the tails of the longest clusters
        acc = sums[j]
        for row in Xs[starts[j] + t:starts[j] + sizes[j]]:
            acc += row
    return sums, sizes


def partition(W: Array, bias: Array | None, P: Array, k: int, *, where: str = "adamss") -> np.ndarray:
    """The subspace of every output row, ``(out,)`` host integers in ``[0, k)``: :func:`kmeans_labels` of the rows
    of :func:`left_vectors` ``(W_b, P)``. Refused (:class:`UnsupportedError`) when ``q = out`` and ``k < out``:
    then ``U`` is square orthogonal, every pair of rows is equally far apart, and the clustering is decided by
    rounding (PEFT's too: it can change between machines). A ``P`` rounded to half precision (stored so, or
    upcast after rounding) is too coarse to recover ``U`` from: ``U`` is then the exact SVD's when PEFT's SVD
    was exact (``q = min(out, n)``), else refused. For ``out < n`` ``W_b`` is not formed (``W Pᵀ[:in] + b P[:, in]``).

    Refused (:class:`CheckpointError`) when a decision of the k-means is a near tie: its margin is at most what the
    difference between PEFT's float32 ``U`` and this one can change (:func:`row_error`, :func:`kmeans_margins`;
    specs/adamss.md, "Near ties"), so which way PEFT went cannot be told from the checkpoint."""
    return _partition(W, bias, P, k, where=where, refuse=CheckpointError)


#: float32's unit roundoff: PEFT's randomized SVD runs in float32 whatever the weight's dtype
U32 = 2.0 ** -24
#: up to this n (out ≥ n) the near-tie check takes cond(W_b) exactly (eigenvalues of W_bᵀ W_b, O(out·n²) on the host);
#: above, :data:`PROBES` solves estimate it
EXACT_COND_N = 256


def row_error(out: int, n: int, amplification: np.ndarray) -> float:
    """The bound ``δ`` on ``‖ΔU‖_F`` (hence on every row's displacement) between PEFT's float32 left vectors and
    peftmath's recomputation, ``(out, q)`` from ``W_b (out, n)`` (specs/adamss.md, "Near ties"): column ``j`` moves
    by at most ``η · a_j`` with ``η = 2 (√out + √n + √q) u₃₂`` (the backward error of PEFT's float32 products, QR and
    SVD and of the recomputation, relative to ``‖W_b‖₂``) and ``a_j = ‖W_b‖₂ / σ_j`` (``out < n``: a product) or
    ``‖W_b‖₂ ‖W_b⁺‖₂ = cond(W_b)`` (``out ≥ n``: a solve); ``δ = η √(Σ_j a_j²)``."""
    a = np.asarray(amplification, dtype=np.float64)
    eta = 2.0 * (np.sqrt(out) + np.sqrt(n) + np.sqrt(a.size)) * U32
    with np.errstate(over="ignore", invalid="ignore"):
        d = float(eta * np.sqrt(np.sum(a * a)))
    return d if np.isfinite(d) else np.inf


def _partition(W: Array, bias: Array | None, P: Array, k: int, *, where: str, refuse: type) -> np.ndarray:
    xp = namespace(W, bias, P, where=where)
    q, out = int(P.shape[0]), int(W.shape[0])
    if q >= out and k < out:
        raise UnsupportedError(
            f"{where}: adamss_newB has q={q} rows for a layer with {out} outputs, so the left singular vectors form a "
            f"square orthogonal matrix: its rows are all equally far apart and k-means into {k} subspaces is decided "
            f"by rounding noise (PEFT's own reload of this adapter can cluster differently on another machine). Use "
            f"r < {out} or num_subspaces >= {out}")
    U, amp, kind = _left_and_amplification(W, bias, P, where=where)
    n = int(W.shape[1]) + (bias is not None)
    host = np.asarray(backend_for(xp).to_host(U), dtype=np.float32)
    delta = row_error(out, n, amp)
    labels, tie = kmeans_margins(host, k, delta)
    if tie is not None and not tie.margin > tie.bound:
        raise refuse(
            f"{where}: the k-means partition of the output rows is decided by a near tie: {tie.what} (iteration "
            f"{tie.iteration}, row {tie.row}) has a margin of {tie.margin:.3g} against a bound of {tie.bound:.3g} "
            f"({tie.below} decision(s) at or below their bounds). The bound is what PEFT's float32 SVD can differ from "
            f"peftmath's recomputation from adamss_newB: rows of U within {delta:.3g} (float32 round-off amplified by "
            f"{kind} ≈ {float(np.max(amp)):.3g}), so PEFT's partition may differ from this one even with the same "
            f"subspace sizes, and merging with it would be silently wrong. It cannot be verified without PEFT's own "
            f"left singular vectors or partition: merge with PEFT (merge_and_unload), or pass PEFT's partition (the "
            f"layer's seg_result, as labels) to adamss.delta_weight / adamss.forward")
    return labels


def _left_and_amplification(W: Array, bias: Array | None, P: Array, *, where: str) -> tuple[Array, np.ndarray, str]:
    """``(U, a, name)``: the left vectors :func:`partition` clusters and, per column, the factor ``a_j`` by which their
    error exceeds the backward error ``η`` of the float32 computations (:func:`row_error`), with its name."""
    xp = namespace(W, bias, P, where=where)
    q, out = int(P.shape[0]), int(W.shape[0])
    cd = compute_dtype(xp, W.dtype, P.dtype)
    n = int(W.shape[1]) + (bias is not None)
    coarse = _half_precision_values(P)
    with np.errstate(divide="ignore", invalid="ignore"):
        if coarse is None and out < n:
            U, s = _left_vectors_of(W, bias, P, cd, scales=True)
            amp, kind = s.max() / s, "‖W_b‖₂ / σ_q"
        elif coarse is None and n <= EXACT_COND_N:  # small: cond(W_b) from the Gram matrix's eigenvalues, on the host
            Wb = weight_with_bias(W, bias, dtype=cd)
            U = left_vectors(Wb, P)
            Wh = np.asarray(backend_for(xp).to_host(Wb), dtype=np.float64)
            ev = np.linalg.eigvalsh(Wh.T @ Wh)
            amp, kind = np.full(q, np.sqrt(ev[-1] / ev[0]) if ev[0] > 0 else np.inf), "cond(W_b)"
        elif coarse is None:
            U, s, inv = _left_vectors_and_scales(weight_with_bias(W, bias, dtype=cd), P, probes=PROBES)
            amp, kind = np.full(q, s.max() * inv), "cond(W_b) (estimated)"
        elif q == min(out, n):  # PEFT's SVD was exact: take U from the SVD of W_b, not from the rounded P
            Us, S, _ = xp.linalg.svd(weight_with_bias(W, bias, dtype=cd), full_matrices=False)
            U, S = Us[:, :q], np.asarray(backend_for(xp).to_host(S), dtype=np.float64)
            amp, kind = np.full(q, S[0] / S[q - 1]), "cond(W_b)"
    if coarse is not None and q != min(out, n):
        raise UnsupportedError(
            f"{where}: adamss_newB holds {coarse} values, and with q={q} < min(out, n)={min(out, n)} PEFT's "
            f"subspaces come from its float32 randomized SVD, which peftmath recovers from adamss_newB only when it is "
            f"stored in float32 or float64: rounding it moves the left singular vectors by ~1e-3 and changes the "
            f"k-means partition PEFT recomputes at load. Save the adapter in float32 (PEFT: "
            f"model.to(torch.float32) before save_pretrained), or use r >= min(out, n)")
    return U, amp, kind


def _half_precision_values(P: Array) -> str | None:
    """``"bfloat16"`` / ``"float16"`` when ``P`` is stored in that dtype or all its values are (a half-precision
    adapter that PEFT's ``autocast_adapter_dtype`` upcast to float32 keeps its rounded values), else None."""
    if is_low_precision(P.dtype):
        return dtype_name(P.dtype)
    import ml_dtypes

    xp = namespace(P)
    sample = np.asarray(backend_for(xp).to_host(P[:1, :]), dtype=np.float32)  # one row settles most cases
    host = None
    for name, half in (("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)):
        if not np.array_equal(sample.astype(half).astype(np.float32), sample):
            continue
        host = np.asarray(backend_for(xp).to_host(P), dtype=np.float32) if host is None else host
        if np.array_equal(host.astype(half).astype(np.float32), host):
            return name
    return None


# --------------------------------------------------------------------------------------------------
# Delta weight (specs/adamss.md, "3. Delta, forward")
# --------------------------------------------------------------------------------------------------
def _check_sizes(labels: np.ndarray, Bs: list[Array], where: str) -> None:
    """Subspace ``i`` of the partition must have as many rows as ``B_i``."""
    sizes = [int(np.count_nonzero(labels == i)) for i in range(len(Bs))]
    want = [int(b.shape[0]) for b in Bs]
    if sizes != want or labels.size != sum(want):
        raise CheckpointError(
            f"{where}: the k-means partition of this base weight (with its bias, when the adapter has a bias column) "
            f"has subspaces of {sizes} rows, but the adapter's adamss_B.<i> have {want} rows: the adapter was made on "
            f"another base weight or bias (AdaMSS recomputes its subspaces from [W | b], as PEFT does on load; an "
            f"already merged W or b gives others), or a near tie in k-means went the other way")


def _stacked_products(As: list[Array], P: Array, *, dtype: Any = None, where: str = "adamss") -> Array:
    """``M = [A_0; A_1; …] P`` ``(Σk_i, n)``: the rows ``A_i P`` of every subspace, one product."""
    xp = namespace(P, *As, where=where)
    cd = dtype if dtype is not None else compute_dtype(xp, P.dtype, *(a.dtype for a in As))
    return xp.matmul(xp.concat([as_compute(xp, a, cd) for a in As], axis=0), as_compute(xp, P, cd))


def factors(labels: np.ndarray, As: list[Array], Bs: list[Array], P: Array, *, dtype: Any = None,
            where: str = "adamss") -> tuple[Array, Array]:
    """``(L (out, Σk_i), M (Σk_i, n))`` with ``ΔW_b = L M``: row ``j`` of ``L`` is row ``j``'s row of ``B_i`` (``i`` its
    subspace) in the columns of block ``i``, zero elsewhere; ``M`` stacks ``A_i P`` (:func:`_stacked_products`).
    Checks that subspace ``i`` has ``len(B_i)`` rows (the partition belongs to this adapter). ``L`` is one
    ``take`` from the flattened ``B_i`` (after a zero) by a host index."""
    xp = namespace(P, *As, *Bs, where=where)
    cd = dtype if dtype is not None else compute_dtype(xp, P.dtype, *(a.dtype for a in (*As, *Bs)))
    labels = np.asarray(labels)
    _check_sizes(labels, Bs, where)
    return _lift(labels, As, Bs, xp, cd, _device(P)), _stacked_products(As, P, dtype=cd, where=where)


def _row_entries(labels: np.ndarray, ks: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each output row's nonzeros of ``L`` are, ``(out, max k_i)`` host arrays: ``use`` (entry ``t < k_i``), the
    column of ``L`` (= the row of ``M``), and the position in ``B_0.ravel(), B_1.ravel(), …`` of its value."""
    col0 = np.cumsum(ks) - ks                    # block i's first column in L
    flat0 = np.cumsum(sizes * ks) - sizes * ks   # where B_i starts in the flattened B's
    rank = np.empty(labels.size, dtype=np.int64)  # j's row in B_i
    order = np.argsort(labels, kind="stable")
    rank[order] = np.arange(labels.size) - (np.cumsum(sizes) - sizes)[labels[order]]
    k_row, t = ks[labels][:, None], np.arange(int(ks.max()))[None, :]
    return t < k_row, col0[labels][:, None] + t, flat0[labels][:, None] + rank[:, None] * k_row + t


def _lift(labels: np.ndarray, As: list[Array], Bs: list[Array], xp: Any, cd: Any, dev: Any) -> Array:
    """:func:`factors`' ``L`` (the sizes already checked): one ``take`` from ``[0, B_0.ravel(), B_1.ravel(), …]``."""
    ks = np.array([int(a.shape[0]) for a in As], dtype=np.int64)
    use, col, flat = _row_entries(labels, ks, np.array([int(b.shape[0]) for b in Bs], dtype=np.int64))
    index = np.zeros((labels.size, int(ks.sum())), dtype=np.int64)
    index[np.broadcast_to(np.arange(labels.size)[:, None], use.shape)[use], col[use]] = flat[use] + 1
    values = xp.concat([xp.zeros((1,), dtype=cd, device=dev), *(xp.reshape(as_compute(xp, b, cd), (-1,)) for b in Bs)])
    return xp.reshape(xp.take(values, backend_for(xp).from_host(index.reshape(-1), xp, dev), axis=0), index.shape)


#: bytes of one row tile of the NumPy in-place update (:func:`_rows_update_`; a reused buffer, about L2-sized)
_TILE_BYTES = 1 << 20


def _rows_update_(target: np.ndarray, labels: np.ndarray, Bs: list[Array], M: np.ndarray, sign: int, *,
                  tile_rows: int | None = None) -> bool:
    """NumPy fast path of ``target += sign · L M`` in place (``target`` C-ordered, ``M (Σk_i, in)`` in ``target``'s
    dtype, float32 or float64): row ``j`` of subspace ``i`` gets ``±Σ_{t<k_i} B_i[j's row, t] · M[block i + t]``,
    computed for a tile of consecutive rows at a time in one reused buffer (the rows of ``M`` gathered, scaled,
    added: ``out·k_i·n`` products where the gemm on ``L`` does ``out·Σk_i·n``, ``L`` being zero outside each row's
    block), then added to the tile of ``target``: no temporary of ``W``'s size. For ``k_i = 1`` the same numbers as
    the gemm on ``L`` bit for bit, else to round-off. Used where it saves at least 4x the products
    (``4 · max k_i ≤ Σk_i``); False, touching nothing, where that or the layout does not hold."""
    if not (isinstance(target, np.ndarray) and isinstance(M, np.ndarray) and target.ndim == 2
            and target.flags.c_contiguous and target.flags.writeable and target.dtype == M.dtype
            and M.dtype in (np.float32, np.float64) and all(isinstance(b, np.ndarray) for b in Bs)):
        return False
    ks = np.array([int(b.shape[1]) for b in Bs], dtype=np.int64)
    if 4 * int(ks.max()) > int(ks.sum()):
        return False
    use, col, flat = _row_entries(labels, ks, np.array([int(b.shape[0]) for b in Bs], dtype=np.int64))
    values = np.concatenate([np.asarray(b, dtype=M.dtype).reshape(-1) for b in Bs])
    scale = np.where(use, values[np.where(use, flat, 0)], 0).astype(M.dtype)  # (out, max k): 0 past k_i
    col = np.where(use, col, 0)
    Mc = np.ascontiguousarray(M)
    out, n = target.shape
    rows = tile_rows or max(1, _TILE_BYTES // (n * target.itemsize))
    acc = np.empty((min(rows, out), n), dtype=M.dtype)
    term = np.empty_like(acc) if col.shape[1] > 1 else None
    for lo in range(0, out, rows):
        hi = min(lo + rows, out)
        a = acc[:hi - lo]
        np.take(Mc, col[lo:hi, 0], axis=0, out=a)
        a *= scale[lo:hi, 0:1]
        for t in range(1, col.shape[1]):
            u = term[:hi - lo]
            np.take(Mc, col[lo:hi, t], axis=0, out=u)
            u *= scale[lo:hi, t:t + 1]
            a += u
        if sign > 0:
            target[lo:hi] += a
        else:
            target[lo:hi] -= a
    return True


def _device(a: Array) -> Any:
    import array_api_compat

    return array_api_compat.device(a)


def delta_weight(W: Array, bias: Array | None, P: Array, As: list[Array], Bs: list[Array], *,
                 labels: np.ndarray | None = None, has_bias: bool | None = None, dtype: Any = None,
                 where: str = "adamss") -> tuple[Array, Array | None]:
    """``(ΔW (out, in), Δb (out,) or None)`` from ``ΔW_b = L M`` (:func:`factors`); the partition is ``labels`` or
    recomputed from ``W`` (and the bias, when the adapter has a bias column: ``has_bias``, default
    ``P.shape[1] == in + 1``)."""
    xp = namespace(W, P, where=where)
    inn = int(W.shape[1])
    has_bias = int(P.shape[1]) == inn + 1 if has_bias is None else has_bias
    if labels is None:
        labels = partition(W, bias if has_bias else None, P, len(Bs), where=where)
    L, M = factors(labels, As, Bs, P, dtype=dtype, where=where)
    d = xp.matmul(L, M)
    return (d[:, :inn], d[:, inn]) if has_bias else (d, None)


# --------------------------------------------------------------------------------------------------
# Forward (specs/adamss.md, "3. Delta, forward")
# --------------------------------------------------------------------------------------------------
def forward(x: Array, W: Array, P: Array, As: list[Array], Bs: list[Array], *, bias: Array | None = None,
            labels: np.ndarray | None = None, layer: Any = None, peft_compat: bool = False,
            where: str = "adamss.forward") -> Array:
    """``x Wᵀ + b + (([x, 1] Pᵀ) Mᵀ… ) = x Wᵀ + b + [x, 1] ΔW_bᵀ`` (``[x, 1]``: ``x`` with a column of ones when the
    adapter has a bias column), computed as ``((x̃ Pᵀ) Ãᵀ) Lᵀ`` (no ``out × in`` matrix), in float32 (float64
    for float64 inputs) and rounded once; ``peft_compat=True`` rounds the base output to the output dtype
    first, as PEFT does."""
    xp = namespace(x, W, P, bias, where=where)
    lay, _ = Layer.for_weight(layer, W).for_input(x, where)
    _check_kind(lay, where)
    lay.check_bias(bias)
    inn = lay.in_features
    has_bias = int(P.shape[1]) == inn + 1
    if has_bias and bias is None:
        raise ShapeError(f"{where}: adamss_newB has in + 1 = {inn + 1} columns (the adapter was made on a layer with a "
                         f"bias), but no bias was given")
    if labels is None:
        labels = partition(W, bias if has_bias else None, P, len(Bs), where=where)
    out_dtype = xp.result_type(x.dtype, W.dtype)
    cd = compute_dtype(xp, x.dtype, W.dtype, P.dtype)
    L, M = factors(labels, As, Bs, P, dtype=cd, where=where)
    xc = as_compute(xp, x, cd)
    h = xp.matmul(xc, xp.matrix_transpose(M[:, :inn]))
    if has_bias:
        h = h + M[:, inn]
    delta = xp.matmul(h, xp.matrix_transpose(L))
    base = lay.base_forward(xc, as_compute(xp, W, cd), None if bias is None else as_compute(xp, bias, cd), xp)
    if peft_compat:
        base = as_compute(xp, as_compute(xp, base, out_dtype), cd)
    return as_compute(xp, base + delta, out_dtype)


# --------------------------------------------------------------------------------------------------
# Initialisation (specs/adamss.md, "5. Initialisation")
# --------------------------------------------------------------------------------------------------
def initialize_subspaces(W: Array, bias: Array | None, config: AdamssConfig, *,
                         seed: int | np.random.Generator | None = 0, where: str = "adamss",
                         dtype: Any = None) -> dict[str, Array]:
    """``{adamss_newB, adamss_A.<i>, adamss_B.<i>}`` for a base weight, PEFT's procedure with the exact SVD.

    ``q = min(r, out, n)``. Refused (:class:`UnsupportedError`) when ``q < min(out, n)``: PEFT's ``P`` is then a
    randomized SVD drawn from torch's generator (``torch.svd_lowrank`` seeded with ``random_seed``), which
    peftmath does not reproduce, and a ``P`` that is not PEFT's makes PEFT cluster the rows differently when it
    loads the adapter. With ``q = min(out, n)`` the randomized SVD is exact, so ``P = Vᵀ[:q]`` of
    ``W_b = U diag(σ) Vᵀ`` is PEFT's up to the signs of its rows, which change nothing PEFT recomputes.
    Then: ``K = min(num_subspaces, out)`` subspaces from :func:`partition`; per subspace ``i`` with rows ``S_i``:
    ``k_i = min(|S_i|, subspace_rank)`` (``use_dynamic_rank``: the number of squared singular values of
    ``U[S_i]`` above ``svd_threshold`` times the largest, at most ``subspace_rank``), at least 1; ``A_i`` = the
    top ``k_i`` right singular vectors of ``U[S_i]`` ``(k_i, q)`` (PEFT's randomized ``svd_lowrank`` + QR of the
    same, up to signs); ``B_i = 0`` (``init_weights="orthogonal"``) or ``N(0, 0.01²)`` drawn on the host.
    """
    xp = namespace(W, bias, where=where)
    out, inn = int(W.shape[0]), int(W.shape[1])
    n = inn + (bias is not None)
    q = min(config.r, out, n)
    if q < min(out, n):
        raise UnsupportedError(
            f"{where}: AdaMSS with r={config.r} on a {out}x{n} weight{' (with its bias column)' if bias is not None else ''}"
            f" takes PEFT's randomized SVD (torch.svd_lowrank, niter=2, seeded from torch's generator with "
            f"random_seed={config.random_seed}), which peftmath does not reproduce; PEFT recomputes the subspaces from "
            f"it when it loads the adapter, so an adapter built from the exact SVD would be clustered differently "
            f"there. Use r >= {min(out, n)} (the SVD is then exact), or create the adapter with PEFT and load it")
    k = min(config.num_subspaces, out)
    cd = compute_dtype(xp, W.dtype, *(() if bias is None else (bias.dtype,)))
    Wb = weight_with_bias(W, bias, dtype=cd)
    _, _, Vh = xp.linalg.svd(Wb, full_matrices=False)
    P = Vh[:q, :]
    labels = _partition(W, bias, P, k, where=where, refuse=UnsupportedError)
    U = np.asarray(backend_for(xp).to_host(left_vectors(Wb, P)), dtype=np.float64)
    rng = host_rng(seed)
    target = dtype if dtype is not None else W.dtype
    host = np.float64 if target == xp.float64 else np.float32

    def put(a: np.ndarray) -> Array:
        out = backend_for(xp).from_host(np.ascontiguousarray(a, dtype=host), xp, _device(W))
        return out if out.dtype == target else xp.astype(out, target)

    params = {_P: xp.astype(P, target)}
    for i in range(k):
        rows = U[labels == i]
        s = rows.shape[0]
        if s == 0:
            raise UnsupportedError(f"{where}: k-means left subspace {i} empty (duplicate rows in the left singular "
                                   f"vectors?); PEFT cannot build this adapter either")
        _, sv, vh = np.linalg.svd(rows, full_matrices=False)
        if config.use_dynamic_rank:
            gram = sv ** 2
            rank = min(int(np.count_nonzero(gram > config.svd_threshold * gram[0])), config.subspace_rank, s)
        else:
            rank = min(s, config.subspace_rank)
        rank = max(rank, 1)
        params[f"adamss_A.{i}"] = put(vh[:rank])
        B = np.zeros((s, rank)) if config.init_weights == "orthogonal" else rng.standard_normal((s, rank)) * 0.01
        params[f"adamss_B.{i}"] = put(B)
    return params


# --------------------------------------------------------------------------------------------------
# One module of a checkpoint (merge / unmerge: specs/adamss.md, "4. Merge and unmerge")
# --------------------------------------------------------------------------------------------------
class AdamssModule(ModuleAdapter):
    """AdaMSS on one nn.Linear: ``adamss_newB (q, n)`` and per subspace ``adamss_A.<i> (k_i, q)``,
    ``adamss_B.<i> (s_i, k_i)``. Additive, with the partition of the output rows recomputed from the base weight:
    merge returns it as its record, unmerge needs it."""

    peft_type = "ADAMSS"
    supported_kinds = SUPPORTED_KINDS
    merge_record = True
    #: no standalone ΔW: the subspaces come from the base weight (merge / forward take it)
    additive: ClassVar[bool] = False

    @classmethod
    def infer_layer(cls, name: str, config: AdamssConfig, params: dict[str, Array],
                    weight_shape: tuple[int, ...] | None = None, kind: Any = None) -> Layer:
        """The base weight's shape is needed: ``adamss_newB`` has ``in`` or ``in + 1`` columns (with a bias)."""
        if weight_shape is None:
            raise ShapeError(f"{name}: AdaMSS's tensors do not tell the input size (adamss_newB has in or in + 1 "
                             f"columns); pass the base weight shape (weight_shape=...)")
        return Layer.of(tuple(int(s) for s in weight_shape), kind or LayerKind.LINEAR)

    def validate(self) -> None:
        _check_kind(self.layer, self.name)
        if _P not in self.params:
            raise ShapeError(f"{self.name}: AdaMSS needs {_P}, found {sorted(self.params)}")
        found: dict[str, dict[int, Array]] = {"A": {}, "B": {}}
        for key, value in self.params.items():
            m = _KEY.fullmatch(key)
            if m:
                found[m.group(1)][int(m.group(2))] = value
            elif key != _P:
                raise ShapeError(f"{self.name}: unexpected AdaMSS tensor {key!r}")
        K = len(found["A"])
        if sorted(found["A"]) != list(range(K)) or sorted(found["B"]) != list(range(K)) or K == 0:
            raise ShapeError(f"{self.name}: AdaMSS needs adamss_A.0..K-1 and adamss_B.0..K-1, found A "
                             f"{sorted(found['A'])}, B {sorted(found['B'])}")
        self.P = self.params[_P]
        self.As = [found["A"][i] for i in range(K)]
        self.Bs = [found["B"][i] for i in range(K)]
        out, inn = self.layer.out_features, self.layer.in_features
        q, n = (int(s) for s in self.P.shape) if self.P.ndim == 2 else (-1, -1)
        if n not in (inn, inn + 1) or not 0 < q <= min(out, n):
            raise ShapeError(f"{self.name}: adamss_newB {tuple(self.P.shape)} does not fit a {out}x{inn} layer "
                             f"((q, in) or (q, in + 1) with q <= {min(out, inn + 1)})")
        self.has_bias = n == inn + 1
        for i, (a, b) in enumerate(zip(self.As, self.Bs)):
            if a.ndim != 2 or b.ndim != 2 or int(a.shape[1]) != q or int(b.shape[1]) != int(a.shape[0]):
                raise ShapeError(f"{self.name}: adamss_A.{i} {tuple(a.shape)} and adamss_B.{i} {tuple(b.shape)} are not "
                                 f"(k, q={q}) and (rows, k)")
        rows = sum(int(b.shape[0]) for b in self.Bs)
        if rows != out:
            raise ShapeError(f"{self.name}: the adamss_B.<i> cover {rows} output rows, the layer has {out}")
        if K != min(self.config.num_subspaces, out):
            raise ShapeError(f"{self.name}: the checkpoint has {K} subspaces but the config gives min(num_subspaces="
                             f"{self.config.num_subspaces}, out={out}) = {min(self.config.num_subspaces, out)}; does the "
                             f"config belong to this checkpoint?")

    def describe(self) -> dict[str, Any]:
        return {"r": int(self.P.shape[0]), "subspaces": len(self.As), "ranks": [int(a.shape[0]) for a in self.As]}

    def changes_bias(self) -> bool:
        return self.has_bias

    def num_parameters(self) -> int:
        """Trainable scalars: the ``A_i`` and ``B_i`` (``adamss_newB`` is a frozen buffer)."""
        return sum(int(a.shape[0]) * int(a.shape[1]) for a in (*self.As, *self.Bs))

    def delta_weight(self, *, peft_compat: bool = False) -> Array:
        raise UnsupportedError(f"{self.name}: AdaMSS's ΔW depends on the base weight (its subspaces are recomputed "
                               f"from it); use merge or forward with the base weight")

    def _labels(self, weight: Array, bias: Array | None, record: Any) -> np.ndarray:
        if record is not None:
            labels = np.asarray(backend_for(namespace(record)).to_host(record)).astype(np.int64)
            if labels.shape != (self.layer.out_features,):
                raise ShapeError(f"{self.name}: the AdaMSS merge record has shape {labels.shape}, expected "
                                 f"({self.layer.out_features},) (one subspace per output row)")
            return labels
        if self.has_bias and bias is None:
            raise ShapeError(f"{self.name}: adamss_newB has in + 1 columns (the adapter was made on a layer with a "
                             f"bias), but no bias was given")
        return partition(weight, bias if self.has_bias else None, self.P, len(self.Bs), where=self.name)

    def merge(self, weight: Array, bias: Array | None = None, *, copy: bool = True, safe: bool = False,
              peft_compat: bool = False) -> MergeResult:
        """``W + ΔW`` (and ``b + Δb`` with a bias column), formed in float32 (float64) and rounded once, with no
        ``W``-sized temporary in place: a C-ordered float32 / float64 NumPy weight row tile by row tile, each row
        ``± Σ_t B_i[·, t] (A_i P)[t]`` (:func:`_rows_update_`: ``out·k_i·n`` products, not ``out·Σk_i·n``), any other
        through the backend's gemm on ``ΔW = L M``; ``peft_compat=True`` rounds ``ΔW`` to ``W``'s dtype first, as
        PEFT's ``weight += ΔW`` does. The record is the partition of the output rows."""
        self.layer.check_weight(weight)
        self.layer.check_bias(bias)
        labels = self._labels(weight, bias, None)
        xp = self.xp
        record = backend_for(xp).from_host(labels.astype(np.int64), xp, _device(self.P))
        return self._apply(weight, bias, labels, 1, record, copy=copy, safe=safe, peft_compat=peft_compat)

    def unmerge(self, weight: Array, bias: Array | None = None, *, record: Any = None, copy: bool = True,
                peft_compat: bool = False) -> MergeResult:
        """``W − ΔW`` (``b − Δb``) with the partition from the merge's ``record``; without it
        :class:`NotInvertibleError`: the partition came from the weight merge overwrote."""
        self.layer.check_weight(weight)
        self.layer.check_bias(bias)
        if record is None:
            raise NotInvertibleError(
                f"{self.name}: unmerging AdaMSS needs the partition of the output rows that merge computed from the "
                f"original weight (merge returns it as MergeResult.record; Adapter.merge keeps it when given "
                f"records={{}}); the merged weight clusters differently")
        return self._apply(weight, bias, self._labels(weight, bias, record), -1, None, copy=copy, safe=False,
                           peft_compat=peft_compat)

    def _apply(self, weight: Array, bias: Array | None, labels: np.ndarray, sign: int, record: Any, *, copy: bool,
               safe: bool, peft_compat: bool) -> MergeResult:
        xp = self.xp
        if self.has_bias and bias is None:
            raise ShapeError(f"{self.name}: the adapter changes the bias (adamss_newB has in + 1 columns) but the "
                             f"layer has no bias")
        if not copy and self.has_bias:
            require_writeable(self.name, bias, "bias")
        cd = compute_dtype(xp, weight.dtype, self.P.dtype)
        _check_sizes(labels, self.Bs, self.name)
        M = _stacked_products(self.As, self.P, dtype=cd, where=self.name)
        inn = self.layer.in_features
        Mw = M[:, :inn]
        round_to = weight.dtype if peft_compat and is_low_precision(weight.dtype) else None
        lifted: list[Array] = []

        def lift() -> Array:  # L, built once and only where needed
            if not lifted:
                lifted.append(_lift(labels, self.As, self.Bs, xp, cd, _device(self.P)))
            return lifted[0]

        def kernel(target: Array) -> bool:  # NumPy's row tiles where they apply, else the backend's gemm on L
            return _rows_update_(target, labels, self.Bs, Mw, sign) or backend_for(xp).addmm_(target, lift(), Mw,
                                                                                               float(sign))

        new_b = bias
        if self.has_bias:
            db = xp.matmul(lift(), M[:, inn])
            new_b = bias_update(self.name, bias, db, sign=sign, round_delta_to=round_to)
        new_w = apply_delta(self.name, weight, lambda: xp.matmul(lift(), Mw), sign=sign, copy=copy, safe=safe,
                            round_delta_to=round_to, layer=self.layer, inplace_kernel=kernel, xp=xp)
        if self.has_bias and not copy:
            new_b = write_back(self.name, bias, new_b)
        return MergeResult(new_w, new_b, record)

    def forward(self, x: Array, weight: Array, bias: Array | None = None, *, peft_compat: bool = False,
                **layer_kwargs: Any) -> Array:
        layer, _ = self.input_layer(x, weight, layer_kwargs)
        return forward(x, weight, self.P, self.As, self.Bs, bias=bias, layer=layer, peft_compat=peft_compat,
                       where=self.name)

    @classmethod
    def initialize(cls, name: str, config: AdamssConfig, layer: Layer, *, weight: Array | None = None,
                   bias: Array | None = None, seed: int | np.random.Generator | None = 0, xp: Any = None,
                   device: Any = None, dtype: Any = None, init: Any = None) -> tuple[dict[str, Array], Array | None]:
        """:func:`initialize_subspaces` of ``weight`` (required) and ``bias`` (pass the layer's bias when it has one:
        PEFT's ``adamss_newB`` then has a bias column); ``init`` overrides ``config.init_weights``. The base
        weight is not changed."""
        _check_kind(layer, name)
        if weight is None:
            raise UnsupportedError(f"{name}: AdaMSS starts from the base weight's SVD; pass the base weight")
        cfg = config if init is None else config.replace(init_weights=init or None)
        return initialize_subspaces(weight, bias, cfg, seed=seed, where=name, dtype=dtype), None


#: checkpoint suffixes of this method's per-module tensors (ParameterLists in ModuleDicts, a BufferDict)
PARAMETER_SUFFIXES = (_P, *(f"adamss_{m}.{i}" for m in "AB" for i in range(MAX_SUBSPACES)))
Config = AdamssConfig
Module = AdamssModule
#: demo / documentation examples: with r and num_subspaces at least every layer's size the SVD is exact and no
#: clustering is a tie, so peftmath's initialisation is PEFT's (random B: PEFT's init_weights=None)
EXAMPLES = {
    "AdaMSS": dict(r=128, num_subspaces=64, init_weights=None),
}

#: the method's description (peftmath.methods._contract.Method): what the rest of peftmath asks
METHOD = Method(
    peft_type=PEFT_TYPE, config=AdamssConfig, module=AdamssModule, spec="specs/adamss.md",
    parameter_suffixes=PARAMETER_SUFFIXES, layer_kinds=AdamssModule.supported_kinds, additive=True,
    init_field="init_weights", examples=EXAMPLES, needs_record_for=lambda config: True,
    frozen_suffixes=(_P,),
)
