"""Super-tuning's math against an independent float64 computation: the support (a sort of the magnitudes), the
dense ΔW entry by entry, the forward, merge / unmerge (saved positions, and recomputed ones with the record),
PEFT's low-precision order, the in-place merge touching only its entries, layouts and the checkpoint checks."""

from __future__ import annotations

import numpy as np
import pytest

from peftmath import Adapter
from peftmath.errors import CheckpointError, ConfigError, NotInvertibleError, ShapeError, UnsupportedError
from peftmath.layers import Layer, LayerKind
from peftmath.methods import supertuning as st


def _top_k(W, k, top=True):
    """The reference support: positions sorted by magnitude with Python's stable sort."""
    mags = [(abs(float(v)), i) for i, v in enumerate(np.asarray(W).ravel())]
    order = sorted(mags, key=lambda t: (-t[0], t[1]) if top else (t[0], t[1]))
    return [i for _, i in order[:k]]


def _dense_reference(shape, idx, values, A=None, B=None, s=1.0):
    d = np.zeros(shape)
    for p, v in zip(np.asarray(idx).tolist(), np.asarray(values, np.float64).tolist()):
        d[p // shape[1], p % shape[1]] += v
    if A is not None:
        for o in range(shape[0]):
            for i in range(shape[1]):
                d[o, i] += s * sum(float(B[o, j]) * float(A[j, i]) for j in range(A.shape[0]))
    return d


@pytest.mark.parametrize("top", [True, False])
def test_support_is_the_top_or_bottom_magnitudes_in_order(top):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 7)).astype(np.float32)
    got = st.select_positions(W, 10, select_top=top)
    assert got.tolist() == _top_k(W, 10, top)
    ties = np.array([[1.0, -1.0], [0.5, 1.0]])  # ties keep index order
    assert st.select_positions(ties, 2).tolist() == [0, 1]


def test_num_trainable_and_scaling():
    assert st.num_trainable(200, 0.5) == 100 and st.num_trainable(1000, 0.99) == 10
    with pytest.raises(ConfigError, match="no trainable entry"):
        st.num_trainable(40, 0.99)
    assert st.lora_scaling(st.SupertuningConfig(r=3), 3) == 2.0  # alpha defaults to 2r
    assert st.lora_scaling(st.SupertuningConfig(r=2, lora_alpha=3), 2) == 1.5


def _module(*, r=None, saved=True, seed=1, shape=(8, 6), sparsity=0.75, top=True, dtype=np.float32, alpha=None):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape).astype(dtype)
    cfg = st.SupertuningConfig(target_modules=["m"], sparsity=sparsity, select_top=top, r=r, lora_alpha=alpha,
                               init_weights=False, save_precomputed_indices=saved)
    params, _ = st.SupertuningModule.initialize("m", cfg, Layer(LayerKind.LINEAR, shape), weight=W, seed=seed)
    params = {k: np.asarray(v).astype(dtype) if k != "supertuning_indices" else np.asarray(v)
              for k, v in params.items()}
    return Adapter(cfg, {"m": params}).module("m", weight_shape=shape), W


@pytest.mark.parametrize("r,top", [(None, True), (None, False), (2, True), (3, False)])
def test_delta_and_forward_match_the_reference(r, top):
    mod, W = _module(r=r, top=top, alpha=None if r is None else 5)
    k = mod.k
    idx = mod.params["supertuning_indices"]
    assert idx.dtype == np.int32 and idx.tolist() == _top_k(W, k, top)
    want = _dense_reference(W.shape, idx, mod.values, mod.A, mod.B, mod.scaling)
    np.testing.assert_allclose(mod.delta_weight(), want, atol=1e-6)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, W.shape[1])).astype(np.float32)
    b = rng.standard_normal(W.shape[0]).astype(np.float32)
    y = mod.forward(x, W, b)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x.astype(np.float64) @ (W + want).T + b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("r", [None, 2])
def test_merge_unmerge_round_trip_and_in_place(r):
    mod, W = _module(r=r)
    want = W.astype(np.float64) + _dense_reference(W.shape, mod.params["supertuning_indices"], mod.values, mod.A,
                                                   mod.B, mod.scaling)
    res = mod.merge(W)
    assert res.record is None and not mod.needs_record()
    np.testing.assert_allclose(res.weight, want, atol=1e-6)
    target = W.copy()
    assert mod.merge(target, copy=False).weight is target
    np.testing.assert_array_equal(target, res.weight)  # the kernel on the caller's array == on a private copy
    mod.unmerge(target, copy=False)
    np.testing.assert_allclose(target, W, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_write_paths_agree_bit_for_bit(dtype):
    """NumPy's one-pass ``np.add.at`` / ``np.subtract.at`` kernel, the integer-array assignment of the other
    namespaces (torch here) and the out-of-place path (``safe=True``) give the same bits: each touched entry is
    ``W ± v`` rounded once, the others untouched; checked against the float64 sum rounded to ``dtype``."""
    torch = pytest.importorskip("torch")
    mod, W = _module(dtype=dtype, sparsity=0.5, shape=(16, 12))
    idx = mod.params["supertuning_indices"].astype(np.int64)
    want = W.copy().ravel()
    want[idx] = (want[idx].astype(np.float64) + mod.values.astype(np.float64)).astype(dtype)
    want = want.reshape(W.shape)
    in_place = W.copy()
    mod.merge(in_place, copy=False)
    tw = torch.from_numpy(W.copy())
    mod_t = Adapter(mod.config, {"m": {k: torch.from_numpy(np.asarray(v)) for k, v in mod.params.items()}}).module(
        "m", weight_shape=W.shape)
    mod_t.merge(tw, copy=False)
    for got in (in_place, mod.merge(W).weight, mod.merge(W, safe=True).weight, tw.numpy()):
        np.testing.assert_array_equal(got, want)
    back = want.copy().ravel()
    back[idx] = (back[idx].astype(np.float64) - mod.values.astype(np.float64)).astype(dtype)
    mod.unmerge(in_place, copy=False)
    mod_t.unmerge(tw, copy=False)
    for got in (in_place, mod.unmerge(want).weight, tw.numpy()):
        np.testing.assert_array_equal(got, back.reshape(W.shape))


def test_in_place_merge_touches_only_the_support():
    mod, W = _module(sparsity=0.9)
    target = W.copy()
    mod.merge(target, copy=False)
    touched = np.flatnonzero(target.ravel() != W.ravel())
    assert set(touched.tolist()) <= set(mod.params["supertuning_indices"].tolist())


def test_unsaved_positions_are_recomputed_and_recorded():
    saved, W = _module(saved=True, r=2)
    unsaved, _ = _module(saved=False, r=2)
    assert "supertuning_indices" not in unsaved.params and unsaved.needs_record() and not unsaved.additive
    res = unsaved.merge(W)
    np.testing.assert_array_equal(res.weight, saved.merge(W).weight)
    assert res.record.tolist() == saved.params["supertuning_indices"].tolist()
    np.testing.assert_allclose(unsaved.forward(W[:2], W), saved.forward(W[:2], W), atol=1e-6)
    with pytest.raises(NotInvertibleError, match="record"):
        unsaved.unmerge(res.weight)
    np.testing.assert_allclose(unsaved.unmerge(res.weight, record=res.record).weight, W, atol=1e-6)
    with pytest.raises(UnsupportedError, match="not saved"):
        unsaved.delta_weight()


@pytest.mark.parametrize("layout", ["F", "strided", "readonly"])
def test_layouts(layout):
    mod, W = _module(r=2)
    want = mod.merge(W.copy()).weight
    if layout == "F":
        Wl = np.asfortranarray(W)
    elif layout == "strided":
        big = np.zeros((W.shape[0], 2 * W.shape[1]), np.float32)
        big[:, 1::2] = W
        Wl = big[:, 1::2]
    else:
        Wl = W.copy()
        Wl.setflags(write=False)
    np.testing.assert_array_equal(mod.merge(Wl).weight, want)
    if layout == "readonly":
        with pytest.raises(UnsupportedError, match="not writeable"):
            mod.merge(Wl, copy=False)
        return
    assert mod.merge(Wl, copy=False).weight is Wl
    np.testing.assert_allclose(Wl, want, atol=1e-6)


def test_float16_rounds_once_and_peft_compat_follows_peft():
    mod, W = _module(r=2, dtype=np.float16, alpha=3)
    idx = mod.params["supertuning_indices"].astype(np.int64)
    sparse = _dense_reference(W.shape, idx, mod.values)
    low = _dense_reference(W.shape, [], [], mod.A.astype(np.float64), mod.B.astype(np.float64), mod.scaling)
    once = mod.merge(W).weight
    np.testing.assert_array_equal(once, (W.astype(np.float64) + sparse + low).astype(np.float16))
    # PEFT: W.scatter_add_(values.to(fp16)), then W.add_(ΔL.to(fp16)), each in float16
    w1 = W.copy().ravel()
    w1[idx] = w1[idx] + mod.values.astype(np.float16)
    w2 = w1.reshape(W.shape) + low.astype(np.float16)
    compat = mod.merge(W, peft_compat=True).weight
    np.testing.assert_array_equal(compat, w2)
    # and its unmerge: ΔL first, then the values
    u1 = compat - low.astype(np.float16)
    u1 = u1.ravel()
    u1[idx] = u1[idx] - mod.values.astype(np.float16)
    np.testing.assert_array_equal(mod.unmerge(compat, peft_compat=True).weight, u1.reshape(W.shape))


def _bad(indices, k=3, shape=(2, 3)):
    return st.Support(np.asarray(indices), shape[0], shape[1], k, "m")


def test_support_checks():
    with pytest.raises(CheckpointError, match="outside"):
        _bad([0, 1, 6])
    with pytest.raises(CheckpointError, match="repeats"):
        _bad([0, 1, 1])
    with pytest.raises(CheckpointError, match="non-integer"):
        _bad([0.0, 1.5, 2.0])
    with pytest.raises(ShapeError, match="shape"):
        _bad([0, 1])
    ok = _bad(np.array([0.0, 4.0, 2.0], np.float32))  # whole-number floats
    assert ok.flat.tolist() == [0, 4, 2] and ok.sorted_flat.tolist() == [0, 2, 4] and ok.order.tolist() == [0, 2, 1]
    assert ok.rows.tolist() == [0, 0, 1] and ok.cols.tolist() == [0, 2, 1]


def test_config_checks():
    for kw, msg in [(dict(sparsity=1.0), "sparsity"), (dict(lora_alpha=4), "r is null"), (dict(r=0), "'r'"),
                    (dict(exclude_modules=["x"]), "no field 'exclude_modules'")]:
        with pytest.raises(ConfigError, match=msg):
            st.SupertuningConfig(**kw).validate()
    assert "layers_pattern" not in st.SupertuningConfig().to_dict()


def test_checkpoint_shapes_refused():
    v = np.zeros(3, np.float32)
    with pytest.raises(ShapeError, match="weight_shape"):
        Adapter(st.SupertuningConfig(target_modules=["m"]), {"m": {"supertuning_values": v}}).module("m")
    with pytest.raises(ShapeError, match="both"):
        Adapter(st.SupertuningConfig(target_modules=["m"], r=1),
                {"m": {"supertuning_values": v, "supertuning_lora_A.weight": np.zeros((1, 3), np.float32)}}).module(
            "m", weight_shape=(2, 3))
