"""Lily's math against an independent float64 computation (a per-token loop over the router and the bank), the
batch map, the ties, the initialisation and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

import peftmath as pm
from peftmath.errors import ConfigError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import lily


def _tensors(rng, inn=7, out=5, r=3, num_B=4):
    return (rng.standard_normal((r, inn)), rng.standard_normal((num_B, r)), rng.standard_normal((num_B * r, out)),
            rng.standard_normal((out, inn)), rng.standard_normal(out))


def _reference(x, A, R, B, W, b, s):
    """Token by token in float64: the router's softmax per token, averaged, then the mixed bank."""
    tokens = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    num_B, r = R.shape
    probs = []
    for t in tokens:
        logits = R @ (A @ t)
        e = np.exp(logits - logits.max())
        probs.append(e / e.sum())
    pbar = np.mean(probs, axis=0)
    mix = sum(pbar[e] * B[e * r:(e + 1) * r] for e in range(num_B))
    out = [W @ t + b + s * (mix.T @ (A @ t)) for t in tokens]
    return np.asarray(out).reshape(*x.shape[:-1], W.shape[0])


@pytest.mark.parametrize("shape", [(7,), (6, 7), (2, 3, 7)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_against_float64_loop(shape, dtype):
    rng = np.random.default_rng(0)
    A, R, B, W, b = _tensors(rng)
    x = rng.standard_normal(shape)
    want = _reference(x, A, R, B, W, b, 0.6)
    got = lily.forward(*(a.astype(dtype) for a in (x, W, A, R, B)), bias=b.astype(dtype), scaling=0.6)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_batch_map_and_batch_coupling():
    """For one batch the adapter is the linear map ΔW_x; splitting the batch mixes the bank differently."""
    rng = np.random.default_rng(1)
    A, R, B, W, b = _tensors(rng)
    x = rng.standard_normal((6, 7)) * 3
    dw = lily.batch_delta_weight(x, A, R, B, scaling=0.6)
    np.testing.assert_allclose(lily.forward(x, W, A, R, B, bias=b, scaling=0.6), x @ (W + dw).T + b, rtol=1e-12,
                               atol=1e-12)
    halves = np.concatenate([lily.forward(x[:3], W, A, R, B, bias=b), lily.forward(x[3:], W, A, R, B, bias=b)])
    assert np.max(np.abs(halves - lily.forward(x, W, A, R, B, bias=b))) > 1e-3


def test_router_weights_sum_to_one_and_uniform_router():
    rng = np.random.default_rng(2)
    h = rng.standard_normal((4, 5, 3))
    p = lily.router_weights(h, rng.standard_normal((4, 3)))
    assert p.shape == (4,) and abs(float(p.sum()) - 1) < 1e-12 and (p > 0).all()
    # a zero router mixes the bank evenly: the combined B is the mean of the projectors
    B = rng.standard_normal((4 * 3, 2))
    np.testing.assert_allclose(lily.combined_B(lily.router_weights(h, np.zeros((4, 3))), B),
                               B.reshape(4, 3, 2).mean(axis=0), rtol=1e-12)


def test_layouts_and_read_only_inputs():
    rng = np.random.default_rng(3)
    A, R, B, W, b = _tensors(rng)
    x = rng.standard_normal((4, 7))
    want = lily.forward(x, W, A, R, B, bias=b)
    Wf, xs = np.asfortranarray(W), np.repeat(x, 2, axis=1)[:, ::2]  # a strided slice
    Bp = np.ascontiguousarray(B.T).T  # a permuted view
    for a in (Wf, xs, A, Bp):
        a.flags.writeable = False
    np.testing.assert_allclose(lily.forward(xs, Wf, A, R, Bp, bias=b), want, rtol=1e-12, atol=1e-12)


def test_torch_matches_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    A, R, B, W, b = (a.astype(np.float32) for a in _tensors(rng))
    x = rng.standard_normal((2, 3, 7)).astype(np.float32)
    want = lily.forward(x, W, A, R, B, bias=b, scaling=1.5)
    got = lily.forward(*(torch.from_numpy(a) for a in (x, W, A, R, B)), bias=torch.from_numpy(b), scaling=1.5)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_module_binding_forward_and_refusals():
    rng = np.random.default_rng(5)
    A, R, B, W, b = (a.astype(np.float32) for a in _tensors(rng, r=2, num_B=3))
    cfg = lily.LilyConfig(target_modules=["m"], r=2, num_B=3, scaling=0.5)
    ad = pm.Adapter(cfg, {"m": {"lily_A.weight": A, "lily_B.weight": B, "lily_router.weight": R}})
    state = {"m.weight": W, "m.bias": b}
    x = rng.standard_normal((3, 7)).astype(np.float32)
    np.testing.assert_allclose(ad.forward("m", x, state), _reference(x, A, R, B, W, b, 0.5), rtol=1e-5, atol=1e-5)
    before = {k: v.copy() for k, v in state.items()}
    with pytest.raises(UnsupportedError, match="projectors in lily_B over every token"):
        ad.merge(state)
    mod = ad.module("m", weight_shape=W.shape)
    for call in (lambda: mod.unmerge(W, b), lambda: mod.delta_weight(), lambda: mod.merge(W, b, copy=False)):
        with pytest.raises(UnsupportedError):
            call()
    assert all(np.array_equal(state[k], before[k]) for k in state)
    # scaled: linear in the scaling
    np.testing.assert_allclose(mod.scaled(2.0).forward(x, W, b) - x @ W.T - b, 2 * (mod.forward(x, W, b) - x @ W.T - b),
                               rtol=1e-4, atol=1e-5)
    # a config whose num_B disagrees with the tensors is refused (PEFT reshapes lily_B by the config)
    with pytest.raises(ShapeError, match="num_B"):
        pm.Adapter(cfg.replace(num_B=2), ad.params).module("m", weight_shape=W.shape)
    with pytest.raises(ShapeError):
        ad.module("m", weight_shape=(5, 8))


def test_config_validation():
    with pytest.raises(ConfigError, match="num_B"):
        lily.LilyConfig(target_modules=["m"], num_B=1).validate()
    with pytest.raises(ConfigError, match="stride_A"):
        lily.LilyConfig(target_modules=["m"], stride_A=0).validate()


def test_tie_groups_by_target_and_shape():
    cfg = lily.LilyConfig(target_modules=["q", "self.q", "v"], stride_A=2)
    layers = {"a.2.self.q": (4, 4), "a.10.self.q": (4, 4), "a.1.self.q": (4, 4), "a.1.v": (4, 4), "a.2.v": (3, 4)}
    groups = lily.tie_groups(cfg, layers)
    assert groups == [(["a.1.self.q", "a.2.self.q", "a.10.self.q"], [["a.1.self.q", "a.2.self.q"], ["a.10.self.q"]]),
                      (["a.1.v"], [["a.1.v"]]), (["a.2.v"], [["a.2.v"]])]
    # a regex target groups every module of one shape together
    regex = lily.LilyConfig(target_modules=r".*\.(q|v)$", stride_A=3)
    assert [g for g, _ in lily.tie_groups(regex, layers)] == [["a.1.self.q", "a.1.v", "a.2.self.q", "a.10.self.q"],
                                                             ["a.2.v"]]


def test_initialisation_and_ties():
    cfg = lily.LilyConfig(target_modules=["q"], r=4, num_B=3, stride_A=2, init_weights=False)
    layers = {f"b.{i}.q": Layer.of((6, 8)) for i in range(5)}
    params = lily.init_adapter(cfg, layers, seed=0)
    A0 = params["b.0.q"]["lily_A.weight"]
    assert A0.shape == (4, 8) and params["b.0.q"]["lily_B.weight"].shape == (12, 6)
    assert np.abs(A0).max() <= 1 / np.sqrt(8) and np.abs(params["b.0.q"]["lily_router.weight"]).max() <= 0.5
    assert np.array_equal(params["b.1.q"]["lily_A.weight"], A0) and not np.array_equal(params["b.2.q"]["lily_A.weight"], A0)
    assert all(np.array_equal(p["lily_B.weight"], params["b.0.q"]["lily_B.weight"]) for p in params.values())
    assert not np.array_equal(params["b.0.q"]["lily_router.weight"], params["b.1.q"]["lily_router.weight"])
    assert lily.num_trainable_parameters(cfg, params) == 3 * 4 * 8 + 12 * 6 + 5 * 3 * 4
    # one module alone cannot honour the ties: refused, naming init_adapter; the default ties nothing that differs
    with pytest.raises(UnsupportedError, match="init_adapter"):
        lily.LilyModule.initialize("b.0.q", cfg, Layer.of((6, 8)))
    p, new_w = lily.LilyModule.initialize("b.0.q", cfg.replace(stride_A=1, init_weights=True), Layer.of((6, 8)))
    assert new_w is None and not p["lily_B.weight"].any()
    with pytest.raises(UnsupportedError, match="Linear"):
        lily.LilyModule.initialize("c", cfg, Layer.of((6, 8, 3)))


def test_create_adapter_default_init_is_a_no_op():
    rng = np.random.default_rng(6)
    base = {f"layers.{i}.q.weight": rng.standard_normal((6, 8)).astype(np.float32) for i in range(3)}
    ad = pm.create_adapter(base, lily.LilyConfig(target_modules=["q"], r=2))
    x = rng.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_array_equal(ad.forward("layers.1.q", x, base), x @ base["layers.1.q.weight"].T)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_bank_of_equal_projectors_merges(dtype):
    """Equal projectors: the mixture is B_0 for every batch, so the merge is W + s B_0ᵀ A and forwards agree."""
    rng = np.random.default_rng(7)
    A, R, B, W, b = (a.astype(dtype) for a in _tensors(rng, r=2, num_B=3))
    B = np.tile(B[:2], (3, 1))
    cfg = lily.LilyConfig(target_modules=["m"], r=2, num_B=3, scaling=0.5)
    mod = pm.Adapter(cfg, {"m": {"lily_A.weight": A, "lily_B.weight": B, "lily_router.weight": R}}).module(
        "m", weight_shape=W.shape)
    x = rng.standard_normal((4, 7)).astype(dtype)
    want = W.astype(np.float64) + 0.5 * B[:2].astype(np.float64).T @ A.astype(np.float64)
    eps = float(np.finfo(dtype).eps)
    merged = mod.merge(W, b)
    np.testing.assert_allclose(merged.weight, want, rtol=0, atol=8 * eps * np.abs(want).max())
    np.testing.assert_allclose(x @ merged.weight.T + b, mod.forward(x, W, b), rtol=0, atol=64 * eps * 10)
    target = W.copy(order="F")
    assert mod.merge(target, b, copy=False).weight is target
    np.testing.assert_array_equal(target, merged.weight)
    back = mod.unmerge(merged.weight, b)
    np.testing.assert_allclose(back.weight, W, rtol=0, atol=8 * eps * np.abs(want).max())
    # one differing element anywhere in the bank: refused, nothing written
    B2 = B.copy()
    B2[-1, -1] += 1e-3
    mod2 = pm.Adapter(cfg, {"m": {"lily_A.weight": A, "lily_B.weight": B2, "lily_router.weight": R}}).module(
        "m", weight_shape=W.shape)
    W0 = W.copy()
    with pytest.raises(UnsupportedError):
        mod2.merge(W, b, copy=False)
    np.testing.assert_array_equal(W, W0)
