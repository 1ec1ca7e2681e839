"""OSF's math against independent float64 computations: the merged weight is W's top singular part plus the
trained low part, the merge record makes unmerge exact, the rank rules, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

import peftmath as pm
from peftmath.errors import ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from peftmath.layers import Layer, LayerKind
from peftmath.methods import osf
from tests.methods.test_inplace_contract import _np_permuted, _np_sliced

#: memory layouts of the base weight (the in-place contract's permuted view and strided slice)
LAYOUTS = {"C": lambda a: a.copy(), "F": np.asfortranarray, "permuted": _np_permuted,
           "sliced": lambda a: _np_sliced(a, 1)}


def _factors(rng, out, inn, r, dtype):
    return (rng.standard_normal((out, r)).astype(dtype), rng.standard_normal(r).astype(dtype),
            rng.standard_normal((r, inn)).astype(dtype))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,r", [((8, 6), 2), ((5, 9), 3), ((6, 6), 6), ((4, 7), 0)])
def test_merge_is_top_part_plus_trained_low_part(layout, dtype, shape, r):
    rng = np.random.default_rng(sum(shape) + r)
    out, inn = shape
    U, S, V = _factors(rng, out, inn, r, dtype)
    mod = osf.OSFModule("m", osf.OSFConfig(), {osf._U: U, osf._S: S, osf._V: V}, Layer(LayerKind.LINEAR, shape))
    W = LAYOUTS[layout](rng.standard_normal(shape).astype(dtype))
    u, s, vt = np.linalg.svd(W.astype(np.float64), full_matrices=False)
    k = min(shape) - r
    want = (u[:, :k] * s[:k]) @ vt[:k] + (U.astype(np.float64) * S) @ V
    eps = float(np.finfo(dtype).eps)
    tol = 64 * eps * (np.linalg.norm(W, 2) + np.abs(want).max())
    res = mod.merge(W)
    np.testing.assert_allclose(res.weight, want, atol=tol)
    x = rng.standard_normal((3, inn)).astype(dtype)
    np.testing.assert_allclose(mod.forward(x, W), x.astype(np.float64) @ want.T, atol=tol * np.abs(x).sum(1).max())
    back = mod.unmerge(res.weight, record=res.record).weight
    np.testing.assert_allclose(back, W, atol=tol)
    with pytest.raises(NotInvertibleError, match="record"):
        mod.unmerge(res.weight)
    target = LAYOUTS[layout](W.copy())
    assert mod.merge(target, copy=False).weight is target
    np.testing.assert_array_equal(target, res.weight)


def test_ranks_and_config():
    assert [osf.resolve_rank(v, 10) for v in (None, 0.5, 1.0, 3, 12, 0)] == [5, 5, 10, 3, 10, 0]
    cfg = osf.OSFConfig(effective_rank=0.25, rank_pattern={r"lin1$": 1})
    assert osf.effective_rank_for(cfg, "a.lin1", 8) == 1 and osf.effective_rank_for(cfg, "a.lin0", 8) == 2
    with pytest.raises(ConfigError, match="exclude_modules"):
        osf.OSFConfig(exclude_modules=["x"]).validate()
    with pytest.raises(ConfigError, match="effective_rank"):
        osf.OSFConfig(effective_rank="half").validate()
    assert "layers_pattern" not in osf.OSFConfig().to_dict()


def test_refusals():
    rng = np.random.default_rng(0)
    U, S, V = _factors(rng, 6, 4, 2, np.float32)
    with pytest.raises(ShapeError, match="do not fit"):
        osf.OSFModule("m", osf.OSFConfig(), {osf._U: U, osf._S: S, osf._V: V[:, :3]}, Layer(LayerKind.LINEAR, (6, 4)))
    with pytest.raises(UnsupportedError):
        osf.OSFModule("m", osf.OSFConfig(), {osf._U: U, osf._S: S, osf._V: V}, Layer(LayerKind.EMBEDDING, (6, 4)))
    mod = osf.OSFModule("m", osf.OSFConfig(), {osf._U: U, osf._S: S, osf._V: V}, Layer(LayerKind.LINEAR, (6, 4)))
    with pytest.raises(UnsupportedError, match="base weight"):
        mod.delta_weight()
    with pytest.raises(ShapeError, match="record"):
        mod.unmerge(np.zeros((6, 4), np.float32), record=np.zeros(5, np.float32))
    with pytest.raises(UnsupportedError, match="base weight"):
        osf.OSFModule.initialize("m", osf.OSFConfig(), Layer(LayerKind.LINEAR, (6, 4)))


def test_default_init_is_exactly_a_no_op_and_records_through_the_adapter(tmp_path):
    rng = np.random.default_rng(3)
    state = {"a.weight": rng.standard_normal((8, 12)).astype(np.float32),
             "b.weight": rng.standard_normal((6, 6)).astype(np.float32)}
    ad = pm.create_adapter(state, osf.OSFConfig(target_modules=["a", "b"], rank_pattern={"b": 2}), seed=0)
    assert ad.params["a"][osf._S].shape == (4,) and ad.params["b"][osf._S].shape == (4,)
    merged = ad.merge(state)
    for key in state:  # float32: the init's SVD and the merge's Gram split are two roundings of one subspace
        np.testing.assert_allclose(merged[key], state[key], rtol=0,
                                   atol=32 * np.finfo(np.float32).eps * np.linalg.norm(state[key], 2))
    state64 = {k: v.astype(np.float64) for k, v in state.items()}  # float64: the one SVD twice, exactly
    ad64 = pm.create_adapter(state64, osf.OSFConfig(target_modules=["a", "b"], rank_pattern={"b": 2}), seed=0)
    merged64 = ad64.merge(state64)
    for key in state64:
        np.testing.assert_array_equal(merged64[key], state64[key])
    ad = pm.create_adapter(state, osf.OSFConfig(target_modules=["a", "b"], init_weights=False), seed=0)
    records: dict = {}
    merged = ad.merge(state, records=records)
    again = pm.load_adapter(pm.save_adapter(ad, tmp_path / "osf"))
    back = again.unmerge(merged, records=records)
    for key in state:
        np.testing.assert_allclose(back[key], state[key], atol=1e-4)
    assert ad.num_trainable_parameters() == (8 * 4 + 4 + 4 * 12) + (6 * 3 + 3 + 3 * 6)


@pytest.mark.parametrize("shape,r", [((12, 9), 2), ((9, 12), 2), ((12, 9), 7), ((9, 12), 7), ((10, 10), 5),
                                     ((10, 10), 4), ((40, 3), 1), ((3, 40), 2), ((7, 7), 7)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_low_split_is_the_projection_on_the_smallest_directions(shape, r, dtype):
    """_svd.low_split against the float64 SVD, every path: the Gram matrix on either side (tall / wide), the
    top or the bottom eigenvectors, the packed-triplets record or the dense one, float64's SVD route."""
    from peftmath.methods._svd import low_from_record, low_split

    rng = np.random.default_rng(sum(shape) + r)
    out, inn = shape
    m = min(shape)
    # a spectrum with a clear gap at the split, so that the split is well defined
    u, _ = np.linalg.qr(rng.standard_normal((out, m)))
    v, _ = np.linalg.qr(rng.standard_normal((inn, m)))
    sigma = np.concatenate([np.linspace(4.0, 2.0, m - r), np.linspace(1.0, 0.1, r)])
    W = ((u * sigma) @ v.T).astype(dtype)
    W64 = W.astype(np.float64)
    uu, ss, vv = np.linalg.svd(W64, full_matrices=False)
    want = (uu[:, m - r:] * ss[m - r:]) @ vv[m - r:]
    L, record = low_split(W, r)
    cd = np.float64 if dtype == np.float64 else np.float32
    assert L.dtype == cd and L.shape == shape
    tol = 64 * np.finfo(cd).eps * ss[0]
    np.testing.assert_allclose(L, want, rtol=0, atol=tol)
    triplets = r * (out + inn + 1) <= out * inn
    assert record.shape == ((r * (out + inn + 1),) if triplets else shape)
    np.testing.assert_allclose(low_from_record(record, out, inn, r, cd), want, rtol=0, atol=tol)
    if triplets and r:  # the packed triplets are the smallest singular triplets (up to their signs)
        U0, S0, V0 = osf.unpack_record(record, out, inn, r)
        np.testing.assert_allclose(S0, ss[m - r:], rtol=0, atol=tol)
        np.testing.assert_allclose(U0.T @ U0, np.eye(r), atol=64 * np.finfo(cd).eps)


def test_eigh_range_numpy_and_generic_agree():
    """NumpyBackend.eigh_range (SciPy's ?syevr, a subset) spans the same eigenspaces as the generic route (the
    namespace's full eigh, sliced)."""
    from peftmath.backends import ArrayAPIBackend, get_backend

    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 20))
    G = a @ a.T
    w = np.linalg.eigvalsh(G)
    for lo, hi in [(0, 4), (25, 30), (10, 30)]:
        for Q in (get_backend("numpy").eigh_range(G, lo, hi), ArrayAPIBackend.eigh_range(get_backend("numpy"), G, lo, hi)):
            assert Q.shape == (30, hi - lo)
            np.testing.assert_allclose(G @ Q, Q * w[lo:hi], atol=1e-10 * w[-1])  # eigenpairs, ascending


def test_unmerge_takes_records_of_earlier_versions():
    """A record of packed SVD triplets (what merge wrote before the split) still unmerges, also where merge now
    writes the dense form."""
    rng = np.random.default_rng(5)
    out, inn, r = 8, 8, 6  # r·(out + in + 1) = 102 > 64: merge writes the dense record now
    U, S, V = _factors(rng, out, inn, r, np.float32)
    mod = osf.OSFModule("m", osf.OSFConfig(), {osf._U: U, osf._S: S, osf._V: V}, Layer(LayerKind.LINEAR, (out, inn)))
    W = rng.standard_normal((out, inn)).astype(np.float32)
    res = mod.merge(W)
    assert res.record.shape == (out, inn)
    old = osf.pack_record(np, *osf.low_part(W, r))
    for record in (res.record, old):
        np.testing.assert_allclose(mod.unmerge(res.weight, record=record).weight, W, atol=1e-5)
    with pytest.raises(ShapeError, match="matrix"):
        mod.unmerge(res.weight, record=np.zeros((out, inn + 1), np.float32))
