"""SHiRA's math against independent float64 computations: ΔW built entry by entry (repeated positions
adding), forward against the dense product, merges that touch only the k entries on several layouts and
dtypes, round trips, the checkpoint forms of the positions and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

import peftmath as pm
from peftmath.errors import CheckpointError, ConfigError, ShapeError, UnsupportedError
from peftmath.layers import Layer, LayerKind
from peftmath.methods import shira
from tests.methods.test_inplace_contract import _np_permuted, _np_sliced


def reference(values, indices, out, inn):
    d = np.zeros((out, inn))
    for w, p, q in zip(np.asarray(values, np.float64), indices[0], indices[1]):
        d[int(p), int(q)] += w
    return d


def _module(values, indices, shape):
    return shira.ShiraModule("m", shira.ShiraConfig(r=1), {"shira_weight": values, "shira_indices": indices},
                             Layer(LayerKind.LINEAR, shape))


@pytest.mark.parametrize("repeats", [False, True])
def test_delta_weight_entry_by_entry(repeats):
    rng = np.random.default_rng(0)
    idx = shira.random_positions(7, 9, 20, seed=1)
    assert len(set(zip(*idx.tolist()))) == 20 and np.all(np.diff(idx[0] * 9 + idx[1]) > 0)
    if repeats:  # a user mask may repeat positions, in any order: PEFT's sparse tensor sums them
        idx = np.concatenate([idx, idx[:, :5]], axis=1)[:, rng.permutation(25)]
    v = rng.standard_normal(idx.shape[1])
    np.testing.assert_allclose(shira.delta_weight(v, idx, 7, 9), reference(v, idx, 7, 9), rtol=1e-15, atol=0)
    np.testing.assert_array_equal(_module(v, idx, (7, 9)).delta_weight(), shira.delta_weight(v, idx, 7, 9))


#: memory layouts of the base weight (the in-place contract's permuted view and strided slice)
LAYOUTS = {"C": lambda a: a.copy(), "F": np.asfortranarray, "permuted": _np_permuted,
           "sliced": lambda a: _np_sliced(a, 1)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_merge_unmerge(layout, dtype):
    rng = np.random.default_rng(2)
    idx = shira.random_positions(6, 10, 16, seed=3)
    v = rng.standard_normal(16).astype(dtype)
    mod = _module(v, idx, (6, 10))
    W = LAYOUTS[layout](rng.standard_normal((6, 10)).astype(dtype))
    bias = rng.standard_normal(6).astype(dtype)
    x = rng.standard_normal((2, 3, 10)).astype(dtype)
    full = W.astype(np.float64) + reference(v, idx, 6, 10)
    want = x.astype(np.float64) @ full.T + bias
    eps = float(np.finfo(dtype).eps)
    np.testing.assert_allclose(mod.forward(x, W, bias), want, atol=32 * eps * np.abs(want).max())
    merged = mod.merge(W).weight
    np.testing.assert_array_equal(merged, full.astype(dtype))  # each touched entry rounded once
    untouched = reference(np.ones(16), idx, 6, 10) == 0
    np.testing.assert_array_equal(merged[untouched], W[untouched])
    back = mod.unmerge(merged).weight
    np.testing.assert_allclose(back, W, atol=4 * eps * np.abs(full).max())
    before = W.copy()
    target = LAYOUTS[layout](W.copy())
    assert mod.merge(target, copy=False).weight is target
    np.testing.assert_array_equal(target, merged)
    np.testing.assert_array_equal(W, before)


def test_torch_bfloat16_and_read_only():
    torch = pytest.importorskip("torch")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(4)
    idx = shira.random_positions(8, 8, 16, seed=0)
    v = rng.standard_normal(16).astype(np.float32)
    W = rng.standard_normal((8, 8)).astype(np.float32)
    ref = _module(v, idx, (8, 8))
    modt = _module(torch.from_numpy(v), torch.from_numpy(idx), (8, 8))
    np.testing.assert_array_equal(modt.merge(torch.from_numpy(W)).weight.numpy(), ref.merge(W).weight)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(modt.forward(torch.from_numpy(x), torch.from_numpy(W)).numpy(), ref.forward(x, W),
                               atol=1e-6)
    bf = W.astype(ml_dtypes.bfloat16)
    once = (bf.astype(np.float64) + reference(v, idx, 8, 8)).astype(np.float32).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(ref.merge(bf).weight.astype(np.float32), once.astype(np.float32))
    ro = W.copy()
    ro.setflags(write=False)
    with pytest.raises(UnsupportedError):
        ref.merge(ro, copy=False)


def test_array_api_strict_takes_the_generic_path():
    xp = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(5)
    idx = shira.random_positions(5, 4, 9, seed=2)
    v = rng.standard_normal(9).astype(np.float32)
    W = rng.standard_normal((5, 4)).astype(np.float32)
    mod = _module(xp.asarray(v), xp.asarray(idx), (5, 4))
    got = mod.merge(xp.asarray(W)).weight
    np.testing.assert_array_equal(np.asarray(got), _module(v, idx, (5, 4)).merge(W).weight)


def test_positions_in_checkpoint_forms():
    idx = shira.random_positions(4, 5, 6, seed=0)
    v = np.arange(6, dtype=np.float32)
    want = _module(v, idx, (4, 5)).delta_weight()
    np.testing.assert_array_equal(_module(v, idx.astype(np.float32), (4, 5)).delta_weight(), want)  # Windows
    np.testing.assert_array_equal(_module(v, idx.astype(np.int64), (4, 5)).delta_weight(), want)
    with pytest.raises(CheckpointError, match="non-integer"):
        _module(v, idx + 0.5, (4, 5))
    with pytest.raises(CheckpointError, match="outside"):
        _module(v, np.where(idx == idx.max(), 7, idx), (4, 5))
    with pytest.raises(ShapeError, match=r"\(2, 6\)"):
        _module(v, idx[:, :5], (4, 5))
    with pytest.raises(ShapeError, match="missing"):
        shira.ShiraModule("m", shira.ShiraConfig(), {"shira_weight": v}, Layer(LayerKind.LINEAR, (4, 5)))
    with pytest.raises(UnsupportedError):
        _module(v, idx, (4, 5)).__class__("m", shira.ShiraConfig(), {"shira_weight": v, "shira_indices": idx},
                                          Layer(LayerKind.EMBEDDING, (4, 5)))


def test_config_and_initialisation():
    with pytest.raises(ShapeError, match="r=3"):
        shira.num_shira_weights(4, 5, 3)
    with pytest.raises(ConfigError, match="exclude_modules"):
        shira.ShiraConfig(exclude_modules=["a"]).validate()
    assert "layers_pattern" not in shira.ShiraConfig().to_dict()
    layer = Layer(LayerKind.LINEAR, (6, 10))
    with pytest.raises(UnsupportedError, match="mask_type"):
        shira.ShiraModule.initialize("m", shira.ShiraConfig(r=1, mask_type="mine"), layer)
    params, new_w = shira.ShiraModule.initialize("m", shira.ShiraConfig(r=1), layer, seed=3)
    assert new_w is None and params["shira_indices"].dtype == np.int32 and params["shira_indices"].shape == (2, 16)
    assert not np.any(params["shira_weight"])  # PEFT's default: zeros
    params, _ = shira.ShiraModule.initialize("m", shira.ShiraConfig(r=1, init_weights=False), layer, seed=3)
    assert np.all(params["shira_weight"] != 0)


def test_adapter_end_to_end(tmp_path):
    state = {"a.weight": np.ones((8, 12), np.float32), "b.weight": np.zeros((6, 6), np.float32)}
    ad = pm.create_adapter(state, shira.ShiraConfig(target_modules=["a", "b"], r=1, init_weights=False), seed=0)
    merged = ad.merge(state)
    again = pm.load_adapter(pm.save_adapter(ad, tmp_path / "shira"))
    for key in state:
        np.testing.assert_array_equal(again.merge(state)[key], merged[key])
    assert ad.num_trainable_parameters() == (8 + 12) + (6 + 6)  # the positions are not trained
