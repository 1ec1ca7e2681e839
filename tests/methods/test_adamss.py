"""AdaMSS's math against independent computations: the left vectors against a NumPy replay of the randomized
SVD (any random projection), ΔW against a float64 loop over the subspaces, forward, merge / unmerge with the record,
the initialisation against the exact SVD, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

import peftmath as pm
from peftmath.errors import CheckpointError, ConfigError, NotInvertibleError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import adamss


def _randomized_svd(A, q, rng, niter=2):
    """torch.svd_lowrank's algorithm in float64 with NumPy's random projection: returns (U, V) as PEFT uses them."""
    m, n = A.shape
    M = A.T if m < n else A
    Q = np.linalg.qr(M @ rng.standard_normal((M.shape[1], q)))[0]
    for _ in range(niter):
        Q = np.linalg.qr(M.T @ Q)[0]
        Q = np.linalg.qr(M @ Q)[0]
    Uq, _, Vh = np.linalg.svd(Q.T @ M, full_matrices=False)
    U, V = Q @ Uq, Vh.T
    return (V, U) if m < n else (U, V)


@pytest.mark.parametrize("shape", [(20, 11), (9, 21), (12, 12), (30, 7)])
@pytest.mark.parametrize("q", [2, 5])
def test_left_vectors_follow_from_the_saved_right_ones(shape, q):
    """Whatever projection the randomized SVD drew, U follows from W_b and P = Vᵀ."""
    rng = np.random.default_rng(sum(shape) + q)
    Wb = rng.standard_normal(shape)
    for draw in range(3):
        U, V = _randomized_svd(Wb, q, np.random.default_rng(draw))
        np.testing.assert_allclose(adamss.left_vectors(Wb, V.T), U, atol=1e-9)


def _subspace_tensors(rng, labels, q, ranks, n):
    K = len(ranks)
    As = [rng.standard_normal((ranks[i], q)) for i in range(K)]
    Bs = [rng.standard_normal((int(np.sum(labels == i)), ranks[i])) for i in range(K)]
    return As, Bs, rng.standard_normal((q, n))


def _delta_loop(labels, As, Bs, P, out):
    """ΔW_b row by row in float64: row j of subspace i is B_i[position of j in S_i] A_i P."""
    d = np.zeros((out, P.shape[1]))
    for i, (a, b) in enumerate(zip(As, Bs)):
        for pos, j in enumerate(np.flatnonzero(labels == i)):
            d[j] = b[pos] @ a @ P
    return d


def test_delta_and_forward_against_a_loop():
    rng = np.random.default_rng(0)
    out, inn, q = 11, 7, 4
    labels = np.array([2, 0, 1, 1, 0, 2, 2, 0, 1, 0, 2])
    As, Bs, P = _subspace_tensors(rng, labels, q, [1, 2, 3], inn + 1)
    W, b = rng.standard_normal((out, inn)), rng.standard_normal(out)
    want = _delta_loop(labels, As, Bs, P, out)
    dW, db = adamss.delta_weight(W, b, P, As, Bs, labels=labels)
    np.testing.assert_allclose(dW, want[:, :inn], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, want[:, inn], rtol=1e-12, atol=1e-12)
    x = rng.standard_normal((2, 3, inn))
    np.testing.assert_allclose(adamss.forward(x, W, P, As, Bs, bias=b, labels=labels),
                               x @ (W + want[:, :inn]).T + b + want[:, inn], rtol=1e-12, atol=1e-12)
    # without a bias column: Δb is None and the bias is only the base's
    As, Bs, P = _subspace_tensors(rng, labels, q, [1, 1, 2], inn)
    dW, db = adamss.delta_weight(W, None, P, As, Bs, labels=labels)
    assert db is None
    np.testing.assert_allclose(dW, _delta_loop(labels, As, Bs, P, out), rtol=1e-12, atol=1e-12)


def test_kmeans_finds_separated_clusters_and_partition_sizes_are_checked():
    rng = np.random.default_rng(1)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = rng.integers(0, 3, 30)
    X = (centers[truth] + 0.1 * rng.standard_normal((30, 2))).astype(np.float32)
    got = adamss.kmeans_labels(X, 3)
    assert all(len(set(got[truth == c])) == 1 for c in range(3)) and len(set(got)) == 3
    np.testing.assert_array_equal(adamss.kmeans_labels(X, 3), got)  # deterministic
    As, Bs, P = _subspace_tensors(rng, got, 2, [1, 1, 1], 4)
    Bs[0] = np.zeros((Bs[0].shape[0] + 1, 1))  # the adapter's subspace sizes are not this partition's
    with pytest.raises(CheckpointError, match="another base weight"):
        adamss.factors(got, As, Bs, P)


def _module(rng, out=20, inn=9, bias=True, r=5, k=4, dtype=np.float64):
    """A module whose subspaces are this base weight's: P from a randomized SVD, B_i sized by its partition."""
    W = rng.standard_normal((out, inn)).astype(dtype)
    b = rng.standard_normal(out).astype(dtype) if bias else None
    Wb = np.concatenate([W, b[:, None]], 1) if bias else W
    _, V = _randomized_svd(Wb.astype(np.float64), min(r, *Wb.shape), rng)
    P = V.T.astype(dtype)
    labels = adamss.partition(W, b, P, k)
    As, Bs, _ = _subspace_tensors(rng, labels, P.shape[0], [1, 2] * (k // 2) + [1] * (k % 2), Wb.shape[1])
    params = {"adamss_newB": P, **{f"adamss_A.{i}": a.astype(dtype) for i, a in enumerate(As)},
              **{f"adamss_B.{i}": x.astype(dtype) for i, x in enumerate(Bs)}}
    cfg = adamss.AdamssConfig(target_modules=["m"], r=r, num_subspaces=k)
    ad = pm.Adapter(cfg, {"m": params})
    return ad, ad.module("m", weight_shape=W.shape), W, b, labels


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_unmerge_round_trip_in_place_and_layouts(bias, dtype):
    rng = np.random.default_rng(2)
    _, mod, W, b, labels = _module(rng, bias=bias, dtype=dtype)
    want = _delta_loop(labels, mod.As, mod.Bs, mod.P.astype(np.float64), 20)
    eps = float(np.finfo(dtype).eps)
    merged = mod.merge(W, b)
    scale = 8 * eps * (np.abs(W).max() + np.abs(want).max())
    np.testing.assert_allclose(merged.weight, W + want[:, :9], rtol=0, atol=scale)
    if bias:
        np.testing.assert_allclose(merged.bias, b + want[:, 9], rtol=0, atol=scale)
    else:
        assert merged.bias is None
    np.testing.assert_array_equal(np.asarray(merged.record), labels)
    x = rng.standard_normal((3, 9)).astype(dtype)
    y = x @ merged.weight.T + (merged.bias if bias else 0)
    np.testing.assert_allclose(y, mod.forward(x, W, b), rtol=0, atol=64 * eps * np.abs(y).max())
    back = mod.unmerge(merged.weight, merged.bias, record=merged.record)
    np.testing.assert_allclose(back.weight, W, rtol=0, atol=scale)
    with pytest.raises(NotInvertibleError, match="record"):
        mod.unmerge(merged.weight, merged.bias)
    # copy=False into a Fortran-ordered weight and the caller's bias: the same numbers
    Wf, bf = np.asfortranarray(W), None if b is None else b.copy()
    res = mod.merge(Wf, bf, copy=False)
    assert res.weight is Wf and (not bias or res.bias is bf)
    np.testing.assert_allclose(Wf, merged.weight, rtol=0, atol=scale)
    # read-only: refused before anything is written
    Wr = W.copy()
    Wr.flags.writeable = False
    with pytest.raises(UnsupportedError, match="copy=True"):
        mod.merge(Wr, None if b is None else b.copy(), copy=False)


def test_partition_refusals_and_config():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((6, 10))
    P = np.linalg.svd(W, full_matrices=False)[2]  # q = out = 6: U is square orthogonal
    with pytest.raises(UnsupportedError, match="equally far apart"):
        adamss.partition(W, None, P, 3)
    assert sorted(adamss.partition(W, None, P, 6).tolist()) == list(range(6))  # one row per subspace: no tie
    with pytest.raises(ConfigError, match="exclude_modules"):
        adamss.AdamssConfig(target_modules=["m"], exclude_modules=["x"]).validate()
    cfg = adamss.AdamssConfig(target_modules=["m"], init_weights=False)
    cfg.validate()
    assert cfg.init_weights is None and "exclude_modules" not in cfg.to_dict()
    with pytest.raises(ConfigError):
        adamss.AdamssConfig(target_modules=["m"], init_weights="gaussian").validate()


@pytest.mark.parametrize("dynamic", [False, True])
def test_initialisation_is_the_exact_svd(dynamic):
    rng = np.random.default_rng(4)
    W, b = rng.standard_normal((24, 6)), rng.standard_normal(24)
    cfg = adamss.AdamssConfig(target_modules=["m"], r=50, num_subspaces=4, subspace_rank=3, init_weights=None,
                              use_dynamic_rank=dynamic, svd_threshold=0.5)
    params, new_w = adamss.AdamssModule.initialize("m", cfg, Layer.of(W.shape), weight=W, bias=b, seed=0)
    assert new_w is None
    Wb = np.concatenate([W, b[:, None]], 1)
    U, S, Vh = np.linalg.svd(Wb, full_matrices=False)
    P = np.asarray(params["adamss_newB"], np.float64)
    assert P.shape == (7, 7)
    np.testing.assert_allclose(np.abs(np.sum(P * Vh, axis=1)), 1, atol=1e-10)  # rows ±Vᵀ
    labels = adamss.partition(W, b, P, 4)
    for i in range(4):
        A, B = params[f"adamss_A.{i}"], params[f"adamss_B.{i}"]
        rows = adamss.left_vectors(Wb, P)[labels == i]
        sv = np.linalg.svd(rows, compute_uv=False)
        k = (min(int(np.sum(sv ** 2 > 0.5 * sv[0] ** 2)), 3) if dynamic else min(len(rows), 3)) or 1
        assert A.shape == (k, 7) and B.shape == (len(rows), k) and np.abs(B).max() < 0.1
        np.testing.assert_allclose(A @ A.T, np.eye(k), atol=1e-10)  # orthonormal rows: top right vectors
        np.testing.assert_allclose(np.linalg.norm(rows @ A.T), np.sqrt(np.sum(sv[:k] ** 2)), rtol=1e-10)
    # the whole adapter merges and forwards consistently
    ad = pm.Adapter(cfg, {"m": params})
    x = rng.standard_normal((2, 6))
    merged = ad.merge({"m.weight": W, "m.bias": b})
    np.testing.assert_allclose(x @ merged["m.weight"].T + merged["m.bias"], ad.forward("m", x, {"m.weight": W, "m.bias": b}),
                               rtol=1e-10, atol=1e-10)
    # orthogonal init: B = 0, a no-op
    p0, _ = adamss.AdamssModule.initialize("m", cfg.replace(init_weights="orthogonal"), Layer.of(W.shape), weight=W,
                                           bias=b)
    assert all(not np.asarray(v).any() for k_, v in p0.items() if k_.startswith("adamss_B"))


def test_initialisation_refuses_the_randomized_svd():
    rng = np.random.default_rng(5)
    W = rng.standard_normal((24, 10))
    with pytest.raises(UnsupportedError, match="randomized SVD"):
        adamss.AdamssModule.initialize("m", adamss.AdamssConfig(target_modules=["m"], r=4), Layer.of(W.shape), weight=W)
    with pytest.raises(UnsupportedError, match="base weight"):
        adamss.AdamssModule.initialize("m", adamss.AdamssConfig(target_modules=["m"]), Layer.of(W.shape))


def test_torch_matches_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    ad, mod, W, b, labels = _module(rng, dtype=np.float32)
    x = rng.standard_normal((2, 9)).astype(np.float32)
    tmod = pm.Adapter(ad.config, {"m": {k: torch.from_numpy(np.asarray(v)) for k, v in ad.params["m"].items()}}).module(
        "m", weight_shape=W.shape)
    Wt, bt = torch.from_numpy(W), torch.from_numpy(b)
    np.testing.assert_allclose(tmod.forward(torch.from_numpy(x), Wt, bt).numpy(), mod.forward(x, W, b),
                               rtol=1e-5, atol=1e-5)
    merged = tmod.merge(Wt, bt)
    np.testing.assert_array_equal(merged.record.numpy(), labels)
    np.testing.assert_allclose(merged.weight.numpy(), mod.merge(W, b).weight, rtol=1e-6, atol=1e-6)


def test_half_precision_newB():
    """A P rounded to half precision (stored so, or upcast after rounding) cannot give U back: the exact SVD's U where
    q = min(out, n), else refused."""
    import ml_dtypes

    rng = np.random.default_rng(7)
    W = rng.standard_normal((30, 8)).astype(np.float32)
    U, _, Vh = np.linalg.svd(W, full_matrices=False)
    want = adamss.kmeans_labels(U.astype(np.float32), 3)
    for P in (Vh.astype(ml_dtypes.bfloat16), Vh.astype(np.float16).astype(np.float32)):
        np.testing.assert_array_equal(adamss.partition(W, None, P, 3), want)
        with pytest.raises(UnsupportedError, match="holds (bfloat16|float16) values"):
            adamss.partition(W, None, P[:4], 3)
    np.testing.assert_array_equal(adamss.partition(W, None, Vh[:4], 3),
                                  adamss.kmeans_labels(adamss.left_vectors(W.astype(np.float64), Vh[:4]).astype(np.float32), 3))


@pytest.mark.parametrize("k", [1, 3, 40])
def test_cluster_sums_are_add_at_bit_for_bit(k):
    """k-means' per-cluster sums: the rows added in row order in float32, exactly as np.add.at (empty and
    lopsided clusters included)."""
    rng = np.random.default_rng(k)
    X = (rng.standard_normal((300, 17)) * 10.0 ** rng.uniform(-3, 3, (300, 1))).astype(np.float32)
    for labels in (rng.integers(0, k, 300), np.where(rng.random(300) < 0.9, 0, rng.integers(0, k, 300))):
        labels[labels == k - 1] = 0 if k > 2 else labels[labels == k - 1]  # an empty cluster where k > 2
        want = np.zeros((k, 17), np.float32)
        np.add.at(want, labels, X)
        sums, sizes = adamss._cluster_sums(X, labels, k)
        np.testing.assert_array_equal(sums, want)
        np.testing.assert_array_equal(sizes, np.bincount(labels, minlength=k))


@pytest.mark.parametrize("bias", [True, False])
def test_left_vectors_without_forming_Wb(bias):
    """out < n: U from W P[:, :in]ᵀ + b P[:, in] equals left_vectors of the concatenated [W | b]."""
    rng = np.random.default_rng(8)
    W, b = rng.standard_normal((9, 12)), rng.standard_normal(9) if bias else None
    Wb = adamss.weight_with_bias(W, b)
    P = np.linalg.svd(Wb, full_matrices=False)[2][:5]
    np.testing.assert_allclose(adamss._left_vectors_of(W, b, P, np.float64), adamss.left_vectors(Wb, P),
                               rtol=0, atol=1e-13)


def test_half_precision_check_reads_past_the_first_row():
    """The first row only settles 'not rounded'; a first row that happens to be half precision is not enough."""
    import ml_dtypes

    rng = np.random.default_rng(9)
    P = rng.standard_normal((4, 6)).astype(np.float32)
    assert adamss._half_precision_values(P) is None
    P[0] = P[0].astype(ml_dtypes.bfloat16).astype(np.float32)
    assert adamss._half_precision_values(P) is None
    assert adamss._half_precision_values(P.astype(ml_dtypes.bfloat16).astype(np.float32)) == "bfloat16"
    half = rng.standard_normal((4, 6)).astype(np.float16).astype(np.float32)
    assert adamss._half_precision_values(half) == ("bfloat16" if np.array_equal(
        half.astype(ml_dtypes.bfloat16).astype(np.float32), half) else "float16")


@pytest.mark.parametrize("ranks", [[1] * 8, [1, 2, 3, 1, 1, 1, 2, 1]])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_row_update_is_the_generic_gemm(ranks, dtype):
    """The NumPy in-place fast path (per tile of rows: the rows of A_i P gathered, scaled by B_i, added) against the
    generic ΔW_b = L M (the backend's gemm on L) and a float64 loop: bit for bit with one rank per subspace (the
    same products), to round-off otherwise; declined (nothing touched) where it does not apply."""
    from peftmath.backends import backend_for

    rng = np.random.default_rng(sum(ranks))
    out, inn, K = 50, 12, len(ranks)
    labels = np.concatenate([np.arange(K), rng.integers(0, K, out - K)])
    rng.shuffle(labels)
    As, Bs, P = _subspace_tensors(rng, labels, 5, ranks, inn)
    As, Bs, P = [a.astype(dtype) for a in As], [x.astype(dtype) for x in Bs], P.astype(dtype)
    L, M = adamss.factors(labels, As, Bs, P)
    W = rng.standard_normal((out, inn)).astype(dtype)
    eps = float(np.finfo(dtype).eps)
    for sign in (1, -1):
        generic = W.copy(order="F")  # the backend's gemm on L, the path of every other layout
        assert backend_for(np).addmm_(generic, L, M, float(sign))
        want = W + sign * _delta_loop(labels, As, Bs, P.astype(np.float64), out)
        for tile_rows in (None, 7):
            got = W.copy()
            assert adamss._rows_update_(got, labels, Bs, M, sign, tile_rows=tile_rows)
            if max(ranks) == 1:
                np.testing.assert_array_equal(got, generic)
            np.testing.assert_allclose(got, want, rtol=0, atol=32 * eps * np.abs(want).max())
            np.testing.assert_allclose(got, generic, rtol=0, atol=32 * eps * np.abs(want).max())
    other = np.float32 if dtype == np.float64 else np.float64
    for target, bs in ((np.asfortranarray(W), Bs), (W.astype(other), Bs), (W.copy(), Bs[:2])):
        before = target.copy()  # Fortran order, another dtype, too few subspaces for the saving (4·max k > Σk)
        assert not adamss._rows_update_(target, labels, bs, M, 1)
        np.testing.assert_array_equal(target, before)


def test_merge_fast_path_equals_the_generic_path(monkeypatch):
    """Module merge / unmerge in place on a C-ordered NumPy weight (the fast path) equal the generic path: a
    Fortran-ordered weight (the backend's gemm on L) and array-api-strict (ΔW = L M, then W + ΔW)."""
    xps = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(10)
    ad, mod, W, b, labels = _module(rng, out=40, inn=9, r=8, k=8, dtype=np.float32)  # ranks 1, 2, 1, 2, …
    ran = []
    real = adamss._rows_update_
    monkeypatch.setattr(adamss, "_rows_update_", lambda *a, **kw: ran.append(real(*a, **kw)) or ran[-1])
    fast = mod.merge(W.copy(), b.copy(), copy=False)
    assert ran == [True]
    fortran = mod.merge(np.asfortranarray(W), b.copy(), copy=False)
    smod = pm.Adapter(ad.config, {"m": {k: xps.asarray(np.asarray(v)) for k, v in ad.params["m"].items()}}).module(
        "m", weight_shape=W.shape)
    strict = smod.merge(xps.asarray(W), xps.asarray(b))
    np.testing.assert_array_equal(np.asarray(fast.record), labels)
    np.testing.assert_array_equal(np.asarray(strict.record), labels)
    tol = 16 * float(np.finfo(np.float32).eps) * float(np.abs(fast.weight).max())
    np.testing.assert_allclose(fast.weight, fortran.weight, rtol=0, atol=tol)
    np.testing.assert_allclose(fast.weight, np.asarray(strict.weight), rtol=0, atol=tol)
    np.testing.assert_allclose(fast.bias, np.asarray(strict.bias), rtol=0, atol=tol)
    back = mod.unmerge(fast.weight, fast.bias, record=fast.record, copy=False)
    sback = smod.unmerge(strict.weight, strict.bias, record=strict.record)
    np.testing.assert_allclose(back.weight, W, rtol=0, atol=tol)
    np.testing.assert_allclose(back.weight, np.asarray(sback.weight), rtol=0, atol=tol)


def _conditioned(rng, out, n, cond):
    """A float32 (out, n) matrix with singular values spread log-uniformly from 1 to 1/cond."""
    Ua = np.linalg.qr(rng.standard_normal((out, n)))[0]
    Va = np.linalg.qr(rng.standard_normal((n, n)))[0]
    return ((Ua * np.logspace(0, -np.log10(cond), n)) @ Va.T).astype(np.float32)


@pytest.mark.parametrize("out, cond, refined", [(96, 1e1, True), (96, 1e5, True), (96, 1e11, False),
                                                (150, 1e2, True), (150, 1e6, False)])
def test_numpy_solve_equals_the_generic_path(monkeypatch, out, cond, refined):
    """NumPy's left vectors (a float32 LU refined to a float64 backward error, or LAPACK's float64 LU where the
    refinement does not converge) equal the generic path's (array-api-strict: xp.linalg.solve in float64) within
    the bound of specs/adamss.md §2: per column, |ΔU| ≤ c·κ(A)·√n·ε₆₄ (A = W_bᵀ square, W_bᵀ W_b tall)."""
    xps = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(int(np.log10(cond)) + out)
    n, q = 96, 3
    Wb = _conditioned(rng, out, n, cond)
    P = np.linalg.qr(rng.standard_normal((n, q)))[0].T.astype(np.float32)
    monkeypatch.setattr(adamss, "REFINE_RATIO", 1)  # refine at this small size too
    ran = []
    real = adamss._refined_solve
    monkeypatch.setattr(adamss, "_refined_solve", lambda A, B: ran.append(real(A, B)) or ran[-1])
    fast = adamss.left_vectors(Wb, P)
    assert [x is not None for x in ran] == [refined]  # the fallback to the float64 LU ran where expected
    generic = np.asarray(adamss.left_vectors(xps.asarray(Wb), xps.asarray(P)))
    kappa = cond if out == n else cond ** 2
    bound = 8 * kappa * np.sqrt(n) * np.finfo(np.float64).eps
    assert np.abs(fast - generic).max() <= bound
    if refined:  # far below the float32 round-off the clustering sees, and the stated backward error per column
        assert np.abs(fast - generic).max() <= 1e-9
        A = Wb.astype(np.float64).T if out == n else Wb.astype(np.float64).T @ Wb.astype(np.float64)
        X = ran[0]
        r = np.abs(P.T.astype(np.float64) - A @ X).max(axis=0)
        assert np.all(r <= np.sqrt(n) * np.finfo(np.float64).eps * np.abs(A).sum(axis=1).max() * np.abs(X).max(axis=0))


def test_numpy_solve_singular_and_large_q_take_the_float64_lu(monkeypatch):
    """q > n / REFINE_RATIO skips the refinement; a singular W_b is refused by the float64 solve as before."""
    rng = np.random.default_rng(3)
    Wb = rng.standard_normal((40, 40))
    P = np.linalg.qr(rng.standard_normal((40, 5)))[0].T
    monkeypatch.setattr(adamss, "_refined_solve", lambda A, B: pytest.fail("refined with q > n / REFINE_RATIO"))
    G = np.linalg.solve(Wb.T, P.T)
    np.testing.assert_allclose(adamss.left_vectors(Wb, P), G / np.linalg.norm(G, axis=0), rtol=0, atol=1e-12)
    Wb[:, 7] = 0  # an exactly zero pivot, as numpy.linalg.solve reports a singular matrix
    assert adamss._numpy_solve(Wb.T.copy(), P.T.copy()) is None
    with pytest.raises(np.linalg.LinAlgError):
        adamss.left_vectors(Wb, P)
