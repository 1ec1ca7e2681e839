"""OFT / BOFT merges by row tiles (issue 20, item 2): in place really in place, ``copy=True`` filled in one pass.

Every result is checked against an independent float64 computation: the rotation assembled as a dense
``n × n`` matrix in float64 (``scipy.linalg.block_diag`` of the blocks, BOFT's permutation matrices built
here) and ``W @ Rᵀ``, within the rounding bound of a blocked float32 product (``γ_k = k·u / (1 − k·u)`` times
``|W| |R|ᵀ``, plus one rounding to the stored dtype). Layouts beside the happy path: Fortran order, permuted
and sliced views, Conv2d, torch ``channels_last``, block_share, Embedding, float16 / bfloat16, read-only;
the peak extra allocation of an in-place merge (``tracemalloc``, deterministic on NumPy) stays a small
fraction of W; JAX (immutable) still computes out of place.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import scipy.linalg

from peftmath._array import namespace
from peftmath.backends import backend_for
from peftmath.errors import NonFiniteError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import boft, oft
from tests.helpers import traced_peak

U = {"float32": 2.0**-24, "float64": 2.0**-53, "float16": 2.0**-11, "bfloat16": 2.0**-8}  # unit round-off
BF16 = np.dtype(ml_dtypes.bfloat16)


def gamma(k: int, dtype: str = "float32") -> float:
    u = U[dtype]
    return k * u / (1 - k * u)


def blocks_f32(rng, k, b, scale=0.2):
    """Rotation blocks (k, b, b) as merge receives them: the Neumann series of random skew blocks, float32."""
    q = rng.normal(0.0, scale, (k, b * (b - 1) // 2)).astype(np.float32)
    return oft.rotation_blocks(q, block_size=b)


def dense(blocks, n):
    """The dense float64 block-diagonal matrix of ``blocks`` (one shared block repeated for block_share)."""
    b = blocks.shape[-1]
    B = np.asarray(blocks, dtype=np.float64)
    return scipy.linalg.block_diag(*[B[i if B.shape[0] > 1 else 0] for i in range(n // b)])


def check_close(got, ref, scale, *, k, stored):
    """``|got − ref| ≤ γ_{k+2}·scale + u_stored·|ref|`` elementwise (float32 compute, one final rounding)."""
    got64 = np.asarray(got, dtype=np.float64)
    bound = gamma(k + 2) * scale + (U[stored] * np.abs(ref) if stored in ("float16", "bfloat16") else 0.0) + 1e-30
    err = np.abs(got64 - ref)
    assert np.all(err <= bound), f"max error / bound = {float(np.max(err / bound)):.3g}"


def oft_reference(W, blocks, lay):
    """float64 ``W_flat Rᵀ`` (Linear, Conv2d) or ``W R`` (Embedding) and the scale ``|W| |R|ᵀ`` of its bound."""
    W64 = np.asarray(W, dtype=np.float64).reshape(lay.weight_shape[0], -1)
    R = dense(blocks, W64.shape[1])
    F = R if lay.kind.value == "Embedding" else R.T
    return (W64 @ F).reshape(lay.weight_shape), (np.abs(W64) @ np.abs(F)).reshape(lay.weight_shape)


# --------------------------------------------------------------------------------------------------
# OFT: in place really in place, on every layout
# --------------------------------------------------------------------------------------------------
def _layouts(rng, shape):
    """(label, W, base): W of ``shape`` in a layout, ``base`` the array whose memory W views."""
    C = rng.standard_normal(shape).astype(np.float32)
    yield "C", C, C
    F = np.asfortranarray(rng.standard_normal(shape).astype(np.float32))
    yield "Fortran", F, F
    perm = tuple(reversed(range(len(shape))))
    P = np.ascontiguousarray(rng.standard_normal(tuple(reversed(shape))).astype(np.float32))
    yield "permuted", np.transpose(P, perm), P
    big = rng.standard_normal((2 * shape[0],) + shape[1:]).astype(np.float32)
    yield "row-strided", big[::2], big


@pytest.mark.parametrize("shape,b,share", [((40, 48), 8, False), ((33, 64), 16, False), ((12, 8, 3, 3), 8, False),
                                           ((12, 8, 3, 3), 9, True), ((20, 24), 4, True)])
def test_oft_in_place_on_every_layout(shape, b, share):
    rng = np.random.default_rng(hash((shape, b, share)) % 2**32)
    lay = Layer.of(shape)
    n = lay.matrix_shape[1]
    R = blocks_f32(rng, 1 if share else n // b, b)
    for label, W, base in _layouts(rng, shape):
        before = W.copy()
        ref, scale = oft_reference(before, R, lay)
        expected_copy = oft.merge(before, R, layer=lay)
        out = oft.merge(W, R, layer=lay, copy=False)
        assert out is W and np.shares_memory(W, base), label
        check_close(W, ref, scale, k=b, stored="float32")
        # the same bits as copy=True, which never touches its input
        np.testing.assert_array_equal(W, expected_copy, err_msg=label)
        assert expected_copy.flags.c_contiguous and expected_copy.dtype == np.float32


def test_oft_embedding_rotates_the_rows_in_place():
    rng = np.random.default_rng(3)
    lay = Layer(oft.LayerKind.EMBEDDING, (30, 24))
    R = blocks_f32(rng, 6, 4)
    W = np.asfortranarray(rng.standard_normal((30, 24)).astype(np.float32))
    ref, scale = oft_reference(W, R, lay)
    assert oft.merge(W, R, layer=lay, copy=False) is W
    check_close(W, ref, scale, k=4, stored="float32")


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("fortran", [False, True])
def test_oft_half_precision_widens_tiles_and_rounds_once(dtype, fortran):
    rng = np.random.default_rng(4)
    R = blocks_f32(rng, 8, 8)
    W = rng.standard_normal((50, 64)).astype(dtype)
    W = np.asfortranarray(W) if fortran else W
    lay = Layer.of(W.shape)
    ref, scale = oft_reference(W, R, lay)
    new = oft.merge(W, R)
    assert new.dtype == W.dtype and new.flags.c_contiguous
    check_close(new, ref, scale, k=8, stored=np.dtype(dtype).name)
    # rounded once: the float32 result rounded to the stored dtype, bit for bit
    exact32 = (np.asarray(W, np.float32).astype(np.float64) @ dense(R, 64).T).astype(np.float32)
    close = np.abs(new.astype(np.float64) - exact32.astype(dtype).astype(np.float64))
    assert np.all(close <= 2 * U[np.dtype(dtype).name] * np.abs(ref) + gamma(10) * scale)
    assert oft.merge(W, R, copy=False) is W
    np.testing.assert_array_equal(W.view(np.uint16), new.view(np.uint16))


def test_oft_unmerge_round_trip_and_inverse():
    """Unmerge applies each block's exact inverse (the Neumann R is not orthogonal): W R⁻ᵀ in float64."""
    rng = np.random.default_rng(5)
    R = blocks_f32(rng, 6, 8, scale=0.4)
    W0 = rng.standard_normal((37, 48)).astype(np.float32)
    Rinv = np.linalg.inv(np.asarray(R, np.float64))
    assert np.abs(np.einsum("kij,kjl->kil", Rinv, np.swapaxes(Rinv, 1, 2)) - np.eye(8)).max() > 1e-4  # not orthogonal
    W = W0.copy()
    assert oft.unmerge(W, R, copy=False) is W
    ref = W0.astype(np.float64) @ dense(Rinv, 48).T
    kappa = max(np.linalg.cond(np.asarray(R[i], np.float64)) for i in range(6))
    bound = (gamma(10) + 8 * 8 * U["float32"] * kappa) * (np.abs(W0) @ np.abs(dense(Rinv, 48)).T)
    assert np.all(np.abs(W - ref) <= bound)
    assert oft.merge(W, R, copy=False) is W
    bound = 2 * (gamma(10) + 8 * 8 * U["float32"] * kappa) * kappa * (np.abs(W0) @ np.ones((48, 48)) / 8)
    assert np.all(np.abs(W - W0) <= bound)


def test_oft_module_merge_matches_an_independent_float64_rotation():
    """The module path (parameters -> Neumann series in float32 -> tiles) against the series summed in
    float64 here from the same parameters, with numpy.triu_indices."""
    rng = np.random.default_rng(6)
    b, k = 8, 6
    q = rng.normal(0, 0.05, (k, b * (b - 1) // 2)).astype(np.float32)
    mod = oft.OFTModule("m", oft.OFTConfig(oft_block_size=b), {"oft_R.weight": q}, Layer.of((20, 48)))
    W0 = rng.standard_normal((20, 48)).astype(np.float32)
    blocks = []
    for row in q.astype(np.float64):
        U_ = np.zeros((b, b))
        U_[np.triu_indices(b, 1)] = row
        S = U_ - U_.T
        P = S @ S
        blocks.append(np.eye(b) + 2 * S + 2 * P + 2 * P @ S + P @ P)  # T = 5: I + 2(S + S² + S³) + S⁴
    R = dense(np.stack(blocks), 48)
    W = W0.copy()
    assert mod.merge(W, copy=False).weight is W
    ref = W0.astype(np.float64) @ R.T
    assert np.all(np.abs(W - ref) <= 64 * U["float32"] * (np.abs(W0) @ np.abs(R).T) + 1e-7)


def test_tiles_and_threads_do_not_change_the_numbers(monkeypatch):
    """Many uneven tiles over 1 and 3 threads: the same bits as one tile on one thread."""
    rng = np.random.default_rng(7)
    R = blocks_f32(rng, 12, 8)
    W0 = rng.standard_normal((101, 96)).astype(np.float32)
    s = rng.normal(1, 0.1, (101, 1)).astype(np.float32)
    Q = rng.normal(0, 0.1, (2, 12, 8, 8)).astype(np.float32)
    results = []
    for tile_bytes, threads in ((1 << 30, "1"), (7 * 96 * 4, "1"), (7 * 96 * 4, "3"), (96 * 4, "2")):
        monkeypatch.setattr(oft, "TILE_BYTES", tile_bytes)
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", threads)
        W = W0.copy()
        oft.merge(W, R, copy=False)
        Wb = W0.copy()
        boft.merge(Wb, Q, s, copy=False)
        results.append((W, Wb, oft.unmerge(W0, R), boft.unmerge(W0, Q, s)))
    for other in results[1:]:
        for a, c in zip(results[0], other):
            np.testing.assert_array_equal(a, c)


def test_tile_threads_reads_the_blas_limit(monkeypatch):
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert oft.tile_threads() == 3
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    assert oft.tile_threads() == 1
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "auto")  # not a positive integer: the next variable
    assert oft.tile_threads() == 3
    monkeypatch.setattr(oft, "TILE_THREADS", 1)  # the override wins
    assert oft.tile_threads() == 1


# --------------------------------------------------------------------------------------------------
# Memory: no temporary of W's size
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["oft merge", "oft unmerge", "boft m=1", "boft m=2", "boft m=4 (levels)"])
def test_peak_allocation_is_a_small_fraction_of_w(op):
    """At most 25% of W beyond what the adapter's own preparation allocates (BOFT's batched Cayley solve,
    measured alone: it scales with boft_R, not with W)."""
    rng = np.random.default_rng(8)
    W = rng.standard_normal((2048, 2048)).astype(np.float32)
    s = rng.normal(1, 0.1, (2048, 1)).astype(np.float32)
    own = 0
    if op.startswith("oft"):
        R = blocks_f32(rng, 64, 32)
        fn = oft.merge if op == "oft merge" else oft.unmerge
        call = lambda copy: fn(W, R, copy=copy)  # noqa: E731
    else:
        m = int(op.split("=")[1][0])
        b = 16 if m < 4 else 32  # m = 4, b = 32: composed blocks of 256 > 128, the levels one after the other
        Q = rng.normal(0, 0.05, (m, 2048 // b, b, b)).astype(np.float32)
        call = lambda copy: boft.merge(W, Q, s, copy=copy)  # noqa: E731
        _, own = traced_peak(lambda: boft.cayley(Q, dtype=np.float32))
    _, peak = traced_peak(lambda: call(False))
    assert peak <= 0.25 * W.nbytes + own, f"{op}: in-place peak {peak / W.nbytes:.2%} of W (own {own / W.nbytes:.2%})"
    _, peak = traced_peak(lambda: call(True))
    assert peak <= 1.25 * W.nbytes + own, f"{op}: copy=True peak {peak / W.nbytes:.2%} of W"


@pytest.mark.parametrize("op", ["oft merge", "oft unmerge", "boft m=1", "boft m=2"])
def test_in_place_peak_does_not_grow_with_w(op, monkeypatch):
    """float32 in place: the peak extra allocation is the tile buffers (one product buffer of
    ``factor_tile_rows`` rows per thread) and a few copies of the factors, the same for 512 and 8192 rows
    of W: no temporary of W's size, whatever its size."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    rng = np.random.default_rng(10)
    n, b = 1024, 32
    R = blocks_f32(rng, n // b, b)
    Q = {m: rng.normal(0, 0.05, (m, n // b, b, b)).astype(np.float32) for m in (1, 2)}
    peaks = {}
    for rows in (512, 8192):
        W = rng.standard_normal((rows, n)).astype(np.float32)
        s = rng.normal(1, 0.1, (rows, 1)).astype(np.float32)
        if op.startswith("oft"):
            fn = oft.merge if op == "oft merge" else oft.unmerge
            call = lambda: fn(W, R, copy=False)  # noqa: E731
        else:
            m = int(op[-1])
            call = lambda: boft.merge(W, Q[m], s, copy=False)  # noqa: E731
        before = W.copy()
        _, peaks[rows] = traced_peak(call)
        assert not np.array_equal(W, before)  # it did rotate W, in place
    size = b * 2 ** (int(op[-1]) - 1) if op.startswith("boft") else b  # the composed blocks of BOFT m=2: 64
    factors = (n // size) * size * size * 4
    tile = oft.factor_tile_rows(n, 4, factors) * n * 4
    own = 0  # BOFT: the rotation's own preparation (Cayley solve, composing the levels in float64), alone
    if op.startswith("boft"):
        _, own = traced_peak(lambda: boft.composed_blocks(boft.cayley(Q[int(op[-1])], dtype=np.float32)))
    # two threads' product buffers, the factors (blocks, their transposes or inverses), BOFT's preparation
    bound = 2 * tile + 8 * factors + own + (64 << 10)
    assert max(peaks.values()) <= bound, f"{op}: peaks {peaks} > bound {bound}"
    assert bound < 0.2 * 8192 * n * 4  # (threads finish at different times: the peak is not exact, its bound is)


def test_tiles_hold_the_factors_in_cache(monkeypatch):
    """The rows per rotation tile: two tiles beside the factors within oft.CACHE_BYTES, at least
    MIN_TILE_ROWS, at most TILE_BYTES."""
    n, f = 4096, 128 * 32 * 32 * 4  # Linear(4096) with blocks of 32: 512 KiB of factors
    t = oft.factor_tile_rows(n, 4, f)
    assert t == oft.MIN_TILE_ROWS == 8 and 2 * t * n * 4 + f <= oft.CACHE_BYTES
    t = oft.factor_tile_rows(1024, 4, 32 * 32 * 32 * 4)
    assert 2 * t * 1024 * 4 + 32 * 32 * 32 * 4 <= oft.CACHE_BYTES < 2 * (t + 1) * 1024 * 4 + 32 * 32 * 32 * 4
    assert oft.factor_tile_rows(n, 4, 10 * oft.CACHE_BYTES) == oft.MIN_TILE_ROWS  # factors beyond the cache
    assert oft.factor_tile_rows(64, 4, 0) == oft.CACHE_BYTES // (2 * 64 * 4)  # narrow rows, no factors
    monkeypatch.setattr(oft, "TILE_BYTES", 7 * 64 * 4)
    assert oft.factor_tile_rows(64, 4, 0) == 7  # the TILE_BYTES cap (tests use it to force many tiles)
    assert oft.factor_tile_rows(10**6, 4, 0) == 1  # rows wider than TILE_BYTES: one per tile


def test_split_stack_gives_the_numbers_of_one_call(monkeypatch):
    """Batched solves / inverses split over threads: bit for bit the single call's numbers, any leading
    shape; a singular matrix in a later run is NotInvertibleError, as from one call."""
    from peftmath.errors import NotInvertibleError

    rng = np.random.default_rng(11)
    S = oft.skew_blocks(rng.normal(0, 0.3, (37, 28)).astype(np.float32), 8)
    eye = np.eye(8, dtype=np.float32)
    Q = rng.normal(0, 0.3, (3, 13, 8, 8))
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    one = (oft.cayley_exact(S), oft._inverse_blocks(S + eye), boft.cayley(Q))
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    monkeypatch.setattr(oft, "MIN_SPLIT_MATRICES", 4)
    calls = []
    backend = type(backend_for(namespace(S)))
    for name in ("solve", "inv"):
        real = getattr(backend, name)
        monkeypatch.setattr(backend, name, lambda self, a, *args, _f=real, _n=name, **kw:
                            calls.append((_n, a.shape[0])) or _f(self, a, *args, **kw))
    split = (oft.cayley_exact(S), oft._inverse_blocks(S + eye), boft.cayley(Q))
    assert sorted(calls) == [("inv", 12), ("inv", 12), ("inv", 13)] + [("solve", 12), ("solve", 12), ("solve", 13)] \
        + [("solve", 13)] * 3  # 37 and 3·13 matrices, three runs each
    for a, c in zip(one, split):
        assert a.shape == c.shape and a.dtype == c.dtype
        np.testing.assert_array_equal(a, c)
    # against an independent float64 computation
    R64 = np.linalg.solve(np.eye(8) + S.astype(np.float64), np.eye(8) - S.astype(np.float64))
    np.testing.assert_allclose(split[0], R64, atol=1e-5)
    singular = S + eye
    singular[30] = 0.0
    with pytest.raises(NotInvertibleError, match="singular"):
        oft._inverse_blocks(singular)


def test_half_precision_peak_is_bounded_tiles(monkeypatch):
    """bfloat16 W: the float32 work is two tile buffers (widened rows, product) per thread, whatever the
    number of rows."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    rng = np.random.default_rng(9)
    R = blocks_f32(rng, 32, 32)
    peaks = []
    for rows in (512, 4096):
        W = rng.standard_normal((rows, 1024)).astype(BF16)
        before = W.copy()
        _, peak = traced_peak(lambda: oft.merge(W, R, copy=False))
        assert not np.array_equal(W.view(np.uint16), before.view(np.uint16))
        peaks.append(peak)
    # (threads finish at different times, so the peak is not exact; its bound is)
    assert max(peaks) <= 2 * 2 * oft.TILE_BYTES + 4 * R.nbytes + (64 << 10)  # 8 times the rows, the same bound


# --------------------------------------------------------------------------------------------------
# BOFT: composed butterfly blocks, scale, unmerge
# --------------------------------------------------------------------------------------------------
def perm_matrix(perm):
    P = np.zeros((len(perm), len(perm)))
    P[np.arange(len(perm)), perm] = 1.0
    return P


def dense_butterfly(C, *, absolute=False):
    """M = B_{m−1} ⋯ B_0 in float64 from the Cayley blocks ``C`` (m, N_b, b, b), with the permutations
    written here (even chunks of b/2 first, then odd ones, inside groups of n / (N_b / 2^i))."""
    m, nb, b, _ = C.shape
    n = nb * b
    M = np.eye(n)
    for i in range(m):
        D = scipy.linalg.block_diag(*np.asarray(C[i], np.float64))
        if m > 1:
            size, rr = n // (nb // 2**i), b // 2
            chunks = np.arange(size).reshape(size // rr, rr)
            order = np.concatenate([chunks[0::2], chunks[1::2]]).reshape(-1)
            P = perm_matrix(np.concatenate([g + order for g in range(0, n, size)]))
        else:
            P = np.eye(n)
        B = P @ D @ P.T
        M = (np.abs(B) if absolute else B) @ M
    return M


@pytest.mark.parametrize("m,nb,b", [(1, 6, 8), (2, 8, 4), (3, 8, 4), (4, 8, 32), (3, 16, 2)])
def test_composed_blocks_are_the_diagonal_of_the_butterfly(m, nb, b):
    rng = np.random.default_rng(m * 100 + b)
    C = boft.cayley(rng.normal(0, 0.3, (m, nb, b, b)))
    M = dense_butterfly(C)
    size = boft.composed_size(m, b)
    got = boft.composed_blocks(C)
    assert got.shape == (nb * b // size, size, size)
    np.testing.assert_allclose(scipy.linalg.block_diag(*got), M, atol=1e-12)  # M is block diagonal


@pytest.mark.parametrize("m", [2, 3])
def test_composed_blocks_in_chunks_on_threads(m, monkeypatch):
    """Chunks of groups (an uneven last one) on one or three threads: the same bits, the butterfly's diagonal."""
    rng = np.random.default_rng(m)
    C = boft.cayley(rng.normal(0, 0.3, (m, 40, 4, 4)))
    size = boft.composed_size(m, 4)
    monkeypatch.setattr(boft, "COMPOSE_ELEMENTS", 3 * size * size)  # chunks of 3 groups
    results = []
    for threads in ("1", "3"):
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", threads)
        results.append(boft.composed_blocks(C))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_allclose(scipy.linalg.block_diag(*results[1]), dense_butterfly(C), atol=1e-12)


@pytest.mark.parametrize("m,nb,b,shape", [(1, 8, 8, (40, 64)), (2, 8, 8, (40, 64)), (3, 8, 4, (24, 32)),
                                          (4, 8, 32, (17, 256)), (2, 4, 8, (12, 8, 2, 2))])
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["float32", "bfloat16"])
def test_boft_merge_unmerge_in_place_against_float64(m, nb, b, shape, dtype):
    rng = np.random.default_rng(m + nb + b)
    lay = Layer.of(shape)
    out = lay.weight_shape[0]
    Q = rng.normal(0, 0.2, (m, nb, b, b)).astype(np.float32)
    s = rng.normal(1, 0.2, (out, 1) if len(shape) == 2 else (1, out)).astype(np.float32)
    C = boft.cayley(Q, dtype=np.float32)
    M, Mabs = dense_butterfly(C), dense_butterfly(C, absolute=True)
    sv = s.reshape(-1).astype(np.float64)[:, None]
    W0 = np.asfortranarray(rng.standard_normal(shape).astype(dtype)) if len(shape) == 2 else \
        rng.standard_normal(shape).astype(dtype)
    X = np.asarray(W0, np.float64).reshape(out, -1)
    name = np.dtype(dtype).name
    k = boft.composed_size(m, b) + m * b + 4  # composed product, the level products, the scale
    for op, ref, scale in (("merge", (X @ M.T) * sv, (np.abs(X) @ Mabs.T) * np.abs(sv)),
                           ("unmerge", (X @ M) / sv, (np.abs(X) @ Mabs) / np.abs(sv))):
        fn = getattr(boft, op)
        new = fn(W0, Q, s)
        W = W0.copy(order="A")
        assert fn(W, Q, s, copy=False) is W
        np.testing.assert_array_equal(np.asarray(W, np.float64), np.asarray(new, np.float64))
        check_close(new.reshape(out, -1), ref, scale, k=k, stored=name)
    # PEFT's unmerge multiplies by 1/s (its rounding): within the same bound
    alt = boft.unmerge(W0, Q, s, peft_compat=True).reshape(out, -1)
    check_close(alt, (X @ M) / sv, (np.abs(X) @ Mabs) / np.abs(sv), k=k + 2, stored=name)


def test_boft_torch_channels_last_in_place():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    Wn = rng.standard_normal((6, 8, 2, 2)).astype(np.float32)
    Q = rng.normal(0, 0.2, (2, 4, 8, 8)).astype(np.float32)
    s = rng.normal(1, 0.2, (1, 6)).astype(np.float32)
    Wt = torch.from_numpy(Wn.copy()).to(memory_format=torch.channels_last)
    ptr = Wt.data_ptr()
    assert boft.merge(Wt, torch.from_numpy(Q), torch.from_numpy(s), copy=False) is Wt
    assert Wt.data_ptr() == ptr and Wt.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(Wt.numpy(), boft.merge(Wn, Q, s), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Other libraries, refusals
# --------------------------------------------------------------------------------------------------
def test_oft_torch_in_place_and_copy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    R = blocks_f32(rng, 8, 9)
    Wn = rng.standard_normal((10, 8, 3, 3)).astype(np.float32)
    ref, scale = oft_reference(Wn, R, Layer.of(Wn.shape))
    for fmt in (torch.contiguous_format, torch.channels_last):
        Wt = torch.from_numpy(Wn.copy()).to(memory_format=fmt)
        new = oft.merge(Wt, torch.from_numpy(R))
        assert isinstance(new, torch.Tensor) and np.array_equal(Wt.numpy(), Wn)
        check_close(new.numpy(), ref, scale, k=72, stored="float32")
        assert oft.merge(Wt, torch.from_numpy(R), copy=False) is Wt
        check_close(Wt.numpy(), ref, scale, k=72, stored="float32")
    Wb = torch.from_numpy(Wn.copy()).to(torch.bfloat16)
    assert oft.merge(Wb, torch.from_numpy(R), copy=False) is Wb
    check_close(Wb.float().numpy(), oft_reference(Wn.astype(BF16), R, Layer.of(Wn.shape))[0], scale, k=72,
                stored="bfloat16")


def test_oft_torch_keeps_the_autograd_graph():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    W = torch.from_numpy(rng.standard_normal((6, 8)).astype(np.float32))
    q = torch.from_numpy(rng.normal(0, 0.1, (2, 6)).astype(np.float32)).requires_grad_(True)
    mod = oft.OFTModule("m", oft.OFTConfig(oft_block_size=4), {"oft_R.weight": q}, Layer.of((6, 8)))
    out = mod.merge(W).weight
    out.sum().backward()
    assert q.grad is not None and float(q.grad.abs().sum()) > 0


def test_jax_computes_out_of_place():
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(14)
    R = blocks_f32(rng, 4, 4)
    Wn = rng.standard_normal((6, 16)).astype(np.float32)
    Q = rng.normal(0, 0.2, (2, 4, 4, 4)).astype(np.float32)
    s = rng.normal(1, 0.1, (6, 1)).astype(np.float32)
    W = jnp.asarray(Wn)
    np.testing.assert_allclose(np.asarray(oft.merge(W, jnp.asarray(R))), oft.merge(Wn, R), atol=1e-5)
    np.testing.assert_allclose(np.asarray(boft.merge(W, jnp.asarray(Q), jnp.asarray(s))), boft.merge(Wn, Q, s),
                               atol=1e-5)
    with pytest.raises(UnsupportedError, match="JAX"):
        oft.merge(W, jnp.asarray(R), copy=False)


def test_read_only_and_non_finite_leave_w_unchanged():
    rng = np.random.default_rng(15)
    R = blocks_f32(rng, 4, 4)
    W = rng.standard_normal((6, 16)).astype(np.float32)
    W.flags.writeable = False
    with pytest.raises(UnsupportedError, match="read-only"):
        oft.merge(W, R, copy=False)
    new = oft.merge(W, R)
    assert new.flags.writeable
    Wn = rng.standard_normal((6, 16)).astype(np.float32)
    Wn[2, 3] = np.nan
    before = Wn.copy()
    with pytest.raises(NonFiniteError):
        oft.merge(Wn, R, copy=False, safe=True)
    np.testing.assert_array_equal(Wn, before)
