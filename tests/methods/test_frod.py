"""FRoD's own math against an independent float64 computation (``U`` from the explicit inverse of ``V``, ``S`` filled
entry by entry), the identity at initialisation, the merge record, layouts and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from peftmath import Adapter
from peftmath.errors import CheckpointError, NotInvertibleError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import frod


def _case(out, inn, nnz=5, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out, inn))
    V = np.linalg.qr(rng.standard_normal((inn, inn)))[0] @ np.diag(rng.uniform(0.5, 2.0, inn))  # not orthogonal
    idx = frod.positions(inn, nnz / (inn * inn), seed=seed)
    lam = rng.uniform(0.5, 2.0, inn)
    values = rng.normal(0.0, 0.3, idx.shape[1])
    return W, V, idx, np.array([inn, inn]), lam, values


def _reference(W, V, idx, lam, values):
    """U (S + diag λ) Vᵀ with U = B / ‖B‖ per column, B = W (V⁻¹)ᵀ, S filled entry by entry."""
    B = W @ np.linalg.inv(V).T
    U = B / np.linalg.norm(B, axis=0)
    S = np.zeros((V.shape[0], V.shape[0]))
    for k in range(idx.shape[1]):
        S[idx[0, k], idx[1, k]] += values[k]
    return U @ (S + np.diag(lam)) @ V.T


@pytest.mark.parametrize("out,inn", [(10, 6), (7, 7)])
def test_adapted_weight_forward_merge_and_identity(out, inn):
    W, V, idx, size, lam, values = _case(out, inn)
    want = _reference(W, V, idx, lam, values)
    np.testing.assert_allclose(frod.frod_weight(W, V, idx, size, lam, values), want, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(frod.delta_weight(W, V, idx, size, lam, values), want - W, rtol=1e-10, atol=1e-11)
    x, b = np.random.default_rng(4).standard_normal((2, 3, inn)), np.random.default_rng(5).standard_normal(out)
    np.testing.assert_allclose(frod.forward(x, W, V, idx, size, lam, values, bias=b), x @ want.T + b, rtol=1e-10,
                               atol=1e-10)
    merged, record = frod.merge(W, V, idx, size, lam, values)
    np.testing.assert_allclose(merged, want, rtol=1e-11, atol=1e-12)
    np.testing.assert_array_equal(frod.unmerge(merged, V, idx, size, lam, values, record=record), W)
    # at initialisation λ = λ₀ (the column norms of W V⁻ᵀ) and S = 0: the adapted weight is W itself
    U, lam0 = frod.base_factors(W, V)
    np.testing.assert_allclose(lam0, np.linalg.norm(W @ np.linalg.inv(V).T, axis=0), rtol=1e-12)
    np.testing.assert_allclose(frod.frod_weight(W, V, idx, size, lam0, 0 * values), W, rtol=1e-10, atol=1e-11)
    conv1d = Layer.of((inn, out), "Conv1D")  # a transformers Conv1D stores the transposed weight
    np.testing.assert_allclose(frod.delta_weight(W.T.copy(), V, idx, size, lam, values, layer=conv1d), (want - W).T,
                               rtol=1e-10, atol=1e-11)


def test_in_place_layouts_float32_and_refusals():
    W, V, idx, size, lam, values = _case(9, 6, seed=1)
    args = [a.astype(np.float32) for a in (V,)] + [idx, size] + [a.astype(np.float32) for a in (lam, values)]
    W0 = W.astype(np.float32)
    want = _reference(W0.astype(np.float64), args[0].astype(np.float64), idx, args[3].astype(np.float64),
                      args[4].astype(np.float64))
    for Wl in (W0.copy(), np.asfortranarray(W0), np.concatenate([W0, W0], 1)[:, ::2]):
        Wl[...] = W0
        got, record = frod.merge(Wl, *args, copy=False)
        assert got is Wl
        np.testing.assert_allclose(Wl, want, rtol=1e-5, atol=1e-5)
        frod.unmerge(Wl, *args, record=record, copy=False)
        np.testing.assert_array_equal(Wl, W0)
    ro = W0.copy()
    ro.setflags(write=False)
    with pytest.raises(UnsupportedError, match="copy=True"):
        frod.merge(ro, *args, copy=False)
    with pytest.raises(NotInvertibleError, match="record"):
        frod.unmerge(want.astype(np.float32), *args, record=None)
    with pytest.raises(ShapeError, match="frod_s_size"):
        frod.merge(W0, args[0], idx, np.array([6, 5]), *args[3:])
    with pytest.raises(ShapeError, match="outside"):
        frod.merge(W0, args[0], idx + 6, size, *args[3:])


def test_adapter_categories_initialisation_and_missing_projections():
    layers = {"h.0.attn": Layer.of((10, 8)), "h.1.attn": Layer.of((10, 8)), "head": Layer.of((3, 10))}
    cfg = frod.FrodConfig(target_modules=list(layers), sparse_rate=0.1, init_weights=False)
    assert [frod.category(n) for n in layers] == ["attn", "attn", "head"]
    shared = frod.init_shared(cfg, layers, seed=0)
    assert sorted(shared) == sorted(frod.PREFIXES[a] + c for a in ("frod_s_indices", "frod_s_size")
                                    for c in ("attn", "head"))
    assert shared["base_model.frod_s_indices.attn"].shape == (2, 6)  # ⌊64 · 0.1⌋ off-diagonal positions
    rng = np.random.default_rng(1)
    state = {f"{n}.weight": rng.standard_normal(l.weight_shape) for n, l in layers.items()}
    params = {n: frod.FrodModule.initialize(n, cfg, l, weight=state[f"{n}.weight"], seed=2, shared=shared)[0]
              for n, l in layers.items()}
    assert "base_model.frod_V.attn" in shared and shared["base_model.frod_V.head"].shape == (10, 10)
    ad = Adapter(cfg, params, shared=shared)
    assert ad.num_trainable_parameters() == 8 + 6 + 8 + 6 + 10 + 10
    records: dict = {}
    merged = ad.merge(state, records=records)
    assert float(np.max(np.abs(merged["h.0.attn.weight"] - state["h.0.attn.weight"]))) > 0.01
    back = ad.unmerge(merged, records=records)
    for key, w in state.items():
        np.testing.assert_allclose(back[key], w, rtol=0, atol=1e-6)
    # init_weights=True: λ = λ₀, S = 0, a no-op
    p0, _ = frod.FrodModule.initialize("head", cfg, layers["head"], weight=state["head.weight"], init=True,
                                       shared=dict(shared))
    ad0 = Adapter(cfg, {"head": p0}, shared=shared)
    np.testing.assert_allclose(ad0.merge(state)["head.weight"], state["head.weight"], rtol=1e-5, atol=1e-5)
    # a wide layer (out < in): the null directions of W get no S entries and λ stays ≈ λ₀ ≈ 0 there
    U, lam0 = frod.base_factors(state["head.weight"], shared["base_model.frod_V.head"])
    null = lam0 < 1e-5 * lam0.max()
    assert null.sum() == 7 and np.all(np.abs(params["head"]["frod_lambda_l"][null]) < 1e-4)
    with pytest.raises(CheckpointError, match="frod_V.head"):
        Adapter(cfg, params, shared={k: v for k, v in shared.items() if k != "base_model.frod_V.head"})
    with pytest.raises(CheckpointError, match="save_projection=false"):
        Adapter(cfg.replace(save_projection=False), params, shared={})
    with pytest.raises(ShapeError, match="FRoD is not defined for a Conv2d"):
        frod.FrodModule.initialize("c", cfg, Layer.of((4, 8, 3, 3)), weight=np.zeros((4, 8, 3, 3)), shared={})
    with pytest.raises(UnsupportedError, match="weight="):
        ad.module("head", weight_shape=(3, 10)).delta_weight()


@pytest.mark.parametrize("out,inn", [(10, 6), (6, 10), (7, 7)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numpy_fast_path_equals_the_generic_path(out, inn, dtype):
    """NumPy's path (LAPACK's LU solve of V for B = W V⁻ᵀ, U rounded once, S + diag λ built on the host in place)
    against the generic path on the same numbers (array-api-strict: V⁻¹ then the product, S + eye·λ), for the
    factors, the merged weight and the forward; float64 to 1e-12, float32 within its round-off
    (``|ΔF| <= 8·eps·(|U| |S + diag λ| |Vᵀ|)`` componentwise)."""
    xps = pytest.importorskip("array_api_strict")
    W, V, idx, size, lam, values = (a.astype(dtype) if a.dtype.kind == "f" else a
                                    for a in _case(out, inn, seed=3))
    strict = [xps.asarray(a) for a in (W, V, idx, size, lam, values)]
    U, lam0 = frod.base_factors(W, V)
    Us, lam0s = (np.asarray(a) for a in frod.base_factors(strict[0], strict[1]))
    assert U.dtype == Us.dtype == dtype
    fast, record = frod.merge(W, V, idx, size, lam, values)
    generic = np.asarray(frod.merge(*strict)[0])
    x = np.random.default_rng(6).standard_normal((3, inn)).astype(dtype)
    y, ys = frod.forward(x, W, V, idx, size, lam, values), np.asarray(frod.forward(xps.asarray(x), *strict))
    if dtype == np.float64:
        for a, b in ((U, Us), (lam0, lam0s), (fast, generic), (y, ys)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * float(np.abs(b).max()))
    else:
        eps = float(np.finfo(np.float32).eps)
        np.testing.assert_allclose(U, Us, rtol=2 * eps, atol=eps)
        np.testing.assert_allclose(lam0, lam0s, rtol=2 * eps)
        S = frod.sparse_matrix(idx, values.astype(np.float64), inn) + np.diag(lam.astype(np.float64))
        bound = 8 * eps * (np.abs(Us.astype(np.float64)) @ np.abs(S) @ np.abs(V.astype(np.float64)).T)
        assert np.all(np.abs(fast.astype(np.float64) - generic) <= bound)
        assert np.all(np.abs(y.astype(np.float64) - ys) <= 8 * eps * (np.abs(x) @ bound.T + np.abs(ys)))
    np.testing.assert_array_equal(frod.unmerge(fast, V, idx, size, lam, values, record=record), W)


def test_numpy_path_leaves_its_inputs_alone_singular_v_and_duplicate_positions():
    """The LU solve works on private copies (a float64 W and V are not overwritten); a singular V (a zero column:
    an exact zero pivot, where torch.linalg.solve raises) takes the pseudo-inverse on both paths, as PEFT; S sums repeated positions
    (PEFT's coalesce)."""
    W, V, idx, size, lam, values = _case(8, 5, seed=4)
    W0, V0 = W.copy(), V.copy()
    frod.merge(W, V, idx, size, lam, values)
    np.testing.assert_array_equal(W, W0)
    np.testing.assert_array_equal(V, V0)
    V[:, 1] = 0
    U, lam0 = frod.base_factors(W, V)
    B = W @ np.linalg.pinv(V, rtol=1e-6).T
    np.testing.assert_allclose(lam0, np.linalg.norm(B, axis=0), rtol=1e-10, atol=1e-12)
    xps = pytest.importorskip("array_api_strict")
    np.testing.assert_allclose(U, np.asarray(frod.base_factors(xps.asarray(W), xps.asarray(V))[0]), rtol=1e-10,
                               atol=1e-12)
    dup = np.array([[0, 2, 0], [1, 1, 1]])
    S = frod.sparse_matrix(dup, np.array([0.25, -1.0, 0.5]), 3)
    np.testing.assert_array_equal(S, [[0, 0.75, 0], [0, 0, 0], [0, -1.0, 0]])
