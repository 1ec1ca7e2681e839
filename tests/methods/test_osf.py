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
    for key in state:
        np.testing.assert_array_equal(merged[key], state[key])
    ad = pm.create_adapter(state, osf.OSFConfig(target_modules=["a", "b"], init_weights=False), seed=0)
    records: dict = {}
    merged = ad.merge(state, records=records)
    again = pm.load_adapter(pm.save_adapter(ad, tmp_path / "osf"))
    back = again.unmerge(merged, records=records)
    for key in state:
        np.testing.assert_allclose(back[key], state[key], atol=1e-4)
    assert ad.num_trainable_parameters() == (8 * 4 + 4 + 4 * 12) + (6 * 3 + 3 + 3 * 6)
