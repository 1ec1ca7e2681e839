"""AdaMSS's near-tie check (specs/adamss.md, "Near ties"): a partition whose k-means decisions have margins within
what the difference between PEFT's float32 left vectors and peftmath's recomputation can change is refused
(CheckpointError), even where a flipped partition keeps every subspace's size and the size check would pass."""

from __future__ import annotations

import numpy as np
import pytest

import peftmath as pm
from peftmath.errors import CheckpointError, UnsupportedError
from peftmath.methods import adamss


#: two groups of 4 rows in 2-D, point-symmetric (the right group is minus the left one); the left group sums to
#: S = (−4.2, 0)
_LEFT = np.array([[-1.0, 0.3], [-1.2, -0.1], [-0.9, 0.2], [-1.1, -0.4]])


def _rows(a: np.ndarray) -> np.ndarray:
    """The 10 rows ``[left; a; −left; −a]``: with ``a`` in the left group the centres are ``±(S + a)/5``."""
    return np.concatenate([_LEFT, [a], -_LEFT, [-a]])


def _tied_rows(eps: float) -> np.ndarray:
    """Rows 4 (``a``) and 9 (``b = −a``) ``eps`` from the bisector of the converged centres (``a·(S + a) = 0``, then
    moved by ``eps`` toward the left centre): each is a near tie, and moving both across swaps them between two
    clusters of 5 rows."""
    a0 = np.array([(4.2 - np.sqrt(4.2 ** 2 - 4)) / 2, 1.0])  # a·S + ‖a‖² = 0: on the bisector
    c = _LEFT.sum(axis=0) + a0
    return _rows(a0 + eps * c / np.linalg.norm(c))


def test_a_swap_of_near_tied_rows_keeps_the_sizes_and_is_refused():
    """Rows 4 and 9 sit 1e-7 from the bisector; moving them by 2e-7 swaps them between the two clusters: another
    partition with the same sizes (5, 5), which the size check cannot tell apart; the margin check refuses both."""
    X, Y = _tied_rows(1e-7).astype(np.float32), _tied_rows(-1e-7).astype(np.float32)
    la, lb = adamss.kmeans_labels(X, 2), adamss.kmeans_labels(Y, 2)
    assert not np.array_equal(la, lb)
    assert list(np.bincount(la)) == list(np.bincount(lb)) == [5, 5]
    assert la[4] == la[0] != la[9] and lb[4] == lb[5] != lb[9]  # row 4 with the left group, then the right one
    rng = np.random.default_rng(0)
    As = [rng.standard_normal((1, 2)) for _ in range(2)]
    Bs = [rng.standard_normal((5, 1)) for _ in range(2)]
    P = np.eye(2, 3)
    L1, _ = adamss.factors(la, As, Bs, P)  # the size check passes for both partitions ...
    L2, _ = adamss.factors(lb, As, Bs, P)
    assert not np.array_equal(L1, L2)  # ... which give different ΔW
    delta = float(np.linalg.norm(X.astype(np.float64) - Y))  # ≈ 2.8e-7: the two inputs are this close
    for Z, want in ((X, la), (Y, lb)):
        labels, tie = adamss.kmeans_margins(Z, 2, delta)
        np.testing.assert_array_equal(labels, want)  # the check does not change the result
        assert tie.margin <= tie.bound and tie.row in (4, 9) and tie.below >= 1
    # the same rows 0.05 from the bisector: margins far above the bound
    _, tie = adamss.kmeans_margins(_tied_rows(0.05).astype(np.float32), 2, delta)
    assert tie.margin > 1e3 * tie.bound


#: three groups of 4 rows in 2-D
_CENTRES = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
_X0 = _CENTRES[np.arange(12) % 3] + 0.4 * np.random.default_rng(3).standard_normal((12, 2))


def _moved(t: float) -> np.ndarray:
    """The rows with row 0 moved by ``t`` toward the second group, columns normalised (as the recomputed left vectors
    are)."""
    X = _X0.copy()
    X[0] += t * (_CENTRES[1] - _CENTRES[0])
    return X / np.linalg.norm(X, axis=0)


def _at_a_tie() -> float:
    """Where, moving row 0, the k-means partition changes (bisection to float64 resolution): a tie."""
    first = adamss.kmeans_labels(_moved(0.0).astype(np.float32), 3)
    lo, hi = 0.0, 1.0
    assert not np.array_equal(adamss.kmeans_labels(_moved(hi).astype(np.float32), 3), first)
    for _ in range(60):
        mid = (lo + hi) / 2
        same = np.array_equal(adamss.kmeans_labels(_moved(mid).astype(np.float32), 3), first)
        lo, hi = (mid, hi) if same else (lo, mid)
    return lo


def _layer(U: np.ndarray, n: int = 14) -> tuple[np.ndarray, np.ndarray]:
    """``(W (out, n), P (2, n))`` float32 with ``W = U diag(3, 2) Vᵀ``, ``P = Vᵀ``: the left vectors recomputed from
    them (``W Pᵀ``, its columns normalised) are ``U`` (unit columns) to float32 round-off."""
    V = np.linalg.qr(np.random.default_rng(0).standard_normal((n, 2)))[0]
    return ((U * np.array([3.0, 2.0])) @ V.T).astype(np.float32), V.T.astype(np.float32)


def _adapter(P: np.ndarray, sizes: list[int]) -> pm.Adapter:
    rng = np.random.default_rng(1)
    params = {"adamss_newB": P}
    for i, s in enumerate(sizes):
        params[f"adamss_A.{i}"] = rng.standard_normal((1, P.shape[0])).astype(np.float32)
        params[f"adamss_B.{i}"] = rng.standard_normal((s, 1)).astype(np.float32)
    cfg = adamss.AdamssConfig(target_modules=["m"], r=P.shape[0], num_subspaces=len(sizes))
    return pm.Adapter(cfg, {"m": params})


def test_merge_refuses_a_layer_at_a_tie():
    """A layer whose k-means has a tie (row 0 moved to where the partition changes): the checkpoint's subspace sizes
    fit, the merge is refused, naming the module, the margin and the bound; initialisation refuses the same way
    (UnsupportedError: PEFT may go the other way at load). The layer with row 0 where it was merges."""
    W, P = _layer(_moved(_at_a_tie()))
    sizes = list(np.bincount(adamss.kmeans_labels(_moved(_at_a_tie()).astype(np.float32), 3), minlength=3))
    with pytest.raises(CheckpointError, match=r"m: the k-means partition .* near tie: .* margin of \S+ against a bound "
                                              r"of \S+ .* cannot be verified without PEFT's own"):
        _adapter(P, sizes).merge({"m.weight": W})
    with pytest.raises(UnsupportedError, match="near tie"):
        adamss._partition(W, None, P, 3, where="m", refuse=UnsupportedError)
    W, P = _layer(_moved(0.0))
    labels = adamss.partition(W, None, P, 3)
    np.testing.assert_array_equal(labels, adamss.kmeans_labels(_moved(0.0).astype(np.float32), 3))
    merged = _adapter(P, list(np.bincount(labels, minlength=3))).merge({"m.weight": W})
    assert not np.array_equal(merged["m.weight"], W)


def test_a_nearly_singular_layer_is_refused():
    """``out = n`` with ``W_b`` of rank 2 up to 1e-13: ``cond(W_b)`` ~ 1e13, nothing bounds the recomputed ``U``."""
    U = _moved(0.0)[:10]
    V = np.linalg.qr(np.random.default_rng(2).standard_normal((10, 2)))[0]
    W = (U * np.array([3.0, 2.0])) @ V.T + 1e-13 * np.random.default_rng(5).standard_normal((10, 10))
    with pytest.raises(CheckpointError, match="near tie"):
        adamss.partition(W, None, V.T.copy(), 3)


@pytest.mark.parametrize("seed", range(8))
def test_margins_do_not_change_the_labels(seed):
    """kmeans_margins computes scikit-learn's labels (kmeans_labels) whatever the bound; on data with no tie and a
    zero bound only float32 rounding is left, far below the margins of separated groups."""
    rng = np.random.default_rng(seed)
    n, d, k = int(rng.integers(8, 80)), int(rng.integers(1, 9)), int(rng.integers(2, 6))
    X = (rng.standard_normal((n, d)) + rng.integers(0, 3, (n, 1)) * 4).astype(np.float32)
    for delta in (0.0, 1e-3, 1.0):
        labels, tie = adamss.kmeans_margins(X, k, delta)
        np.testing.assert_array_equal(labels, adamss.kmeans_labels(X, k))
        assert tie is not None and tie.bound > 0
    assert adamss.kmeans_margins(X, 1, 1.0)[1] is None  # one cluster: nothing to decide


def test_row_error_follows_the_derivation():
    """δ = η √(Σ a_j²), η = 2 (√out + √n + √q) u₃₂; an infinite amplification (a zero singular value) is infinite."""
    a = np.array([1.0, 2.0, 5.0])
    eta = 2 * (np.sqrt(40) + np.sqrt(30) + np.sqrt(3)) * 2.0 ** -24
    assert adamss.row_error(40, 30, a) == pytest.approx(eta * np.sqrt(30.0), rel=1e-12)
    assert adamss.row_error(40, 30, np.array([1.0, np.inf])) == np.inf


def test_the_probe_estimate_bounds_the_inverse():
    """Above EXACT_COND_N the check estimates 1/σ_min(W_b) with Gaussian probes appended to the solve: at least the
    true value (×PROBE_SAFETY), square and tall, well and badly conditioned."""
    rng = np.random.default_rng(4)
    for out, n, cond in ((60, 60, 1e2), (60, 60, 1e5), (90, 60, 1e3)):
        Ua = np.linalg.qr(rng.standard_normal((out, n)))[0]
        Va = np.linalg.qr(rng.standard_normal((n, n)))[0]
        sv = np.logspace(0, -np.log10(cond), n)
        Wb = (Ua * sv) @ Va.T
        P = Va[:, :3].T
        U, s, inv = adamss._left_vectors_and_scales(Wb, P, probes=adamss.PROBES)
        np.testing.assert_allclose(U, adamss.left_vectors(Wb, P), rtol=0, atol=1e-9)  # the probes change nothing
        np.testing.assert_allclose(s, sv[:3], rtol=1e-8)  # the singular values that go with U
        assert 1 / sv[-1] <= inv <= adamss.PROBE_SAFETY * 4 / sv[-1]
