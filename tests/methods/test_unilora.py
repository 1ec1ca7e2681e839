"""UniLoRA's own math against independent float64 computations (explicit gathers, a recount of the index
assignment), layouts, dtypes and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftmath import Adapter
from peftmath.errors import CheckpointError, ConfigError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import unilora


def _case(out=6, inn=5, r=3, d=11, seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(d)
    ia, ib = rng.integers(0, d, (r, inn)), rng.integers(0, d, (out, r))
    sa, sb = rng.uniform(0.2, 1.0, (r, inn)), rng.uniform(0.2, 1.0, (out, r))
    A = np.array([[theta[ia[i, j]] * sa[i, j] for j in range(inn)] for i in range(r)])
    B = np.array([[theta[ib[o, i]] * sb[o, i] for i in range(r)] for o in range(out)])
    return theta, ia, ib, sa, sb, A, B


@given(count=st.integers(0, 500), length=st.integers(1, 60), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=100, deadline=None)
def test_generate_index_is_balanced(count, length, seed):
    idx = unilora.generate_index(count, length, seed)
    assert idx.shape == (count,) and idx.dtype == np.int64
    counts = np.bincount(idx, minlength=length)
    assert counts.min() >= count // length and counts.max() <= -(-count // length)
    assert np.array_equal(idx, unilora.generate_index(count, length, seed))


def test_assign_cuts_one_assignment_in_order_and_normalises():
    cfg = unilora.UniLoraConfig(r=2, theta_d_length=7, proj_seed=5)
    layers = [Layer.of((4, 3)), Layer.of((3, 5), "Conv1D"), Layer.of((2, 2))]
    parts = unilora.assign(layers, cfg)
    flat = np.concatenate([np.concatenate([p["unilora_indices_A"].ravel(), p["unilora_indices_B"].ravel()])
                           for p in parts])
    np.testing.assert_array_equal(flat, unilora.generate_index(flat.size, 7, 5))
    counts = np.bincount(flat, minlength=7)
    for lay, p in zip(layers, parts):
        assert p["unilora_indices_A"].shape == (2, lay.in_features) and p["unilora_indices_B"].shape == (lay.out_features, 2)
        for k, s in (("unilora_indices_A", "unilora_scales_A"), ("unilora_indices_B", "unilora_scales_B")):
            assert p[s].dtype == np.float32
            np.testing.assert_allclose(p[s], 1.0 / np.sqrt(counts[p[k]]), rtol=1e-7)


@pytest.mark.parametrize("kind", ["Linear", "Conv1D"])
def test_delta_forward_merge_vs_float64_gathers(kind):
    theta, ia, ib, sa, sb, A, B = _case()
    shape = (5, 6) if kind == "Conv1D" else (6, 5)
    layer = Layer.of(shape, kind)
    D = B @ A
    want = D.T if kind == "Conv1D" else D
    np.testing.assert_allclose(unilora.delta_weight(theta, ia, ib, sa, sb, layer=layer), want, rtol=1e-12, atol=1e-14)
    rng = np.random.default_rng(1)
    W = rng.standard_normal(shape)
    np.testing.assert_allclose(unilora.merge(W, theta, ia, ib, sa, sb, layer=layer), W + want, rtol=1e-12)
    np.testing.assert_allclose(unilora.unmerge(W + want, theta, ia, ib, sa, sb, layer=layer), W, rtol=1e-12,
                               atol=1e-14)
    x, b = rng.standard_normal((2, 3, 5)), rng.standard_normal(6)
    Wm = W.T if kind == "Conv1D" else W
    np.testing.assert_allclose(unilora.forward(x, W, theta, ia, ib, sa, sb, bias=b, layer=layer), x @ (Wm + D).T + b,
                               rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("layout", ["F", "permuted", "readonly"])
def test_inplace_layouts_and_float32(layout):
    theta, ia, ib, sa, sb, A, B = _case(seed=2)
    f32 = [np.asarray(a, np.float32) for a in (theta, sa, sb)]
    W0 = np.random.default_rng(3).standard_normal((6, 5)).astype(np.float32)
    want = W0.astype(np.float64) + B @ A
    if layout == "readonly":
        W = W0.copy()
        W.flags.writeable = False
        with pytest.raises(UnsupportedError, match="copy=True"):
            unilora.merge(W, f32[0], ia, ib, f32[1], f32[2], copy=False)
        return
    W = np.asfortranarray(W0) if layout == "F" else np.ascontiguousarray(W0.T).T
    assert unilora.merge(W, f32[0], ia, ib, f32[1], f32[2], copy=False) is W
    np.testing.assert_allclose(W, want, atol=4e-6 * np.max(np.abs(want)))
    unilora.unmerge(W, f32[0], ia, ib, f32[1], f32[2], copy=False)
    np.testing.assert_allclose(W, W0, atol=8e-6 * np.max(np.abs(want)))


def _adapter(cfg, ia, ib, sa, sb, theta):
    return Adapter(cfg, {"m": {"unilora_indices_A": ia, "unilora_indices_B": ib, "unilora_scales_A": sa,
                               "unilora_scales_B": sb}}, shared={unilora.THETA_KEY: theta})


def test_adapter_checks_and_float_indices():
    theta, ia, ib, sa, sb, A, B = _case()
    cfg = unilora.UniLoraConfig(r=3, theta_d_length=11, save_indices=True)
    ad = _adapter(cfg, ia.astype(np.float32), ib, sa, sb, theta)  # whole numbers in a float tensor: read
    np.testing.assert_allclose(ad.delta_weight("m", weight_shape=(6, 5)), B @ A, rtol=1e-12)
    assert ad.num_trainable_parameters() == 11
    with pytest.raises(CheckpointError, match="non-integer"):
        _adapter(cfg, ia + 0.5, ib, sa, sb, theta).module("m", weight_shape=(6, 5))
    bad = ib.copy()
    bad[0, 0] = 11
    with pytest.raises(CheckpointError, match=r"outside 0\.\.10"):
        _adapter(cfg, ia, bad, sa, sb, theta).module("m", weight_shape=(6, 5))
    with pytest.raises(ShapeError, match="theta_d_length=11"):
        _adapter(cfg, ia, ib, sa, sb, theta[:10]).module("m", weight_shape=(6, 5))
    with pytest.raises(ShapeError, match="unilora_scales_A"):
        _adapter(cfg, ia, ib, sa[:, :4], sb, theta).module("m", weight_shape=(6, 5))


def test_initialize_and_init_shared():
    cfg = unilora.UniLoraConfig(r=2, theta_d_length=9, save_indices=True)
    layers = [Layer.of((4, 3)), Layer.of((3, 5), "Conv1D")]
    shared = unilora.init_shared(cfg, layers, seed=1)
    theta = shared[unilora.THETA_KEY]
    assert theta.dtype == np.float32 and np.all(np.abs(theta) <= 0.02)
    plan = unilora.assign(layers, cfg)
    for i in (1, 0):  # any order: each layer its planned part
        p, new = unilora.UniLoraModule.initialize(f"m{i}", cfg, layers[i], weight=np.zeros(layers[i].weight_shape,
                                                                                            np.float32), shared=shared)
        assert new is None
        for k, want in plan[i].items():
            np.testing.assert_array_equal(p[k], want)
    assert list(shared) == [unilora.THETA_KEY]  # the plan is gone
    p, _ = unilora.UniLoraModule.initialize("m", cfg.replace(init_weights=False), Layer.of((4, 3)))
    assert p[unilora.THETA_KEY].shape == (9,) and np.abs(p[unilora.THETA_KEY]).max() > 0.02  # N(0, 1)
    np.testing.assert_array_equal(p["unilora_indices_A"], unilora.assign([Layer.of((4, 3))], cfg)[0]["unilora_indices_A"])
    with pytest.raises(UnsupportedError, match="save_indices=True"):
        unilora.UniLoraModule.initialize("m", unilora.UniLoraConfig(r=2), Layer.of((4, 3)))
    with pytest.raises(ShapeError, match="Embedding"):
        unilora.UniLoraModule.initialize("m", cfg, Layer.of((4, 3), "Embedding"))


def test_config_and_checkpoint_refusals():
    for bad, match in ((dict(theta_d_length=0), "theta_d_length"), (dict(init_theta_d_bound=0.0), "init_theta_d_bound"),
                       (dict(bias="lora_only"), "bias"), (dict(exclude_modules=["x"]), "exclude_modules"),
                       (dict(proj_seed=-1), "proj_seed")):
        with pytest.raises(ConfigError, match=match):
            unilora.UniLoraConfig(**bad).validate()
    assert "exclude_modules" not in unilora.UniLoraConfig().to_dict()
    with pytest.raises(UnsupportedError, match="save_indices=False"):
        unilora.validate_checkpoint(unilora.UniLoraConfig(), {unilora.THETA_KEY: np.zeros(256)})
    with pytest.raises(CheckpointError, match="unilora_theta_d"):
        unilora.validate_checkpoint(unilora.UniLoraConfig(save_indices=True), {})
