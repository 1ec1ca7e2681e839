"""Poly's math against an independent float64 computation (a loop over batch rows, splits and skills building
each row's dense ΔW), the fixed mixtures as LoRA, the initialisation, layouts, backends and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

import peftmath as pm
from peftmath.errors import ConfigError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import poly


def _tensors(rng, inn=8, out=6, r=3, S=2, K=3, T=4):
    return (rng.standard_normal((S, K, inn // S, r)), rng.standard_normal((S, K, r, out // S)),
            rng.standard_normal((T, S * K)), rng.standard_normal((out, inn)), rng.standard_normal(out))


def _delta(A, B, Z, t):
    """Task t's dense ΔW (out, in) in float64, block by block: ΔW[out block p, in block q] = (1/r) B_p^T A_q^T."""
    S, K, din, r = A.shape
    dout = B.shape[3]
    sig = 1.0 / (1.0 + np.exp(-np.asarray(Z[t], np.float64).reshape(S, K)))
    w = sig / (sig.sum(axis=1, keepdims=True) + 1e-12)
    Am = [sum(w[q, s] * np.float64(A[q, s]) for s in range(K)) for q in range(S)]   # (din, r) each
    Bm = [sum(w[q, s] * np.float64(B[q, s]) for s in range(K)) for q in range(S)]   # (r, dout) each
    D = np.zeros((S * dout, S * din))
    for p in range(S):
        for q in range(S):
            D[p * dout:(p + 1) * dout, q * din:(q + 1) * din] = (Am[q] @ Bm[p]).T / r
    return D


def _reference(x, A, B, Z, W, b, tids):
    x = np.asarray(x, np.float64)
    return np.stack([x[i] @ (np.float64(W) + _delta(A, B, Z, t)).T + b for i, t in enumerate(tids)])


@pytest.mark.parametrize("S", [1, 2])
@pytest.mark.parametrize("shape", [(3, 8), (3, 4, 8), (3, 2, 2, 8)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_against_float64_blocks(S, shape, dtype):
    rng = np.random.default_rng(0)
    A, B, Z, W, b = (a.astype(dtype) for a in _tensors(rng, S=S))
    x = rng.standard_normal(shape).astype(dtype)
    tids = [3, 0, 2]
    got = poly.forward(x, W, A, B, Z, np.array(tids), bias=b)
    assert got.dtype == dtype and got.shape == (*shape[:-1], 6)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, _reference(x, A, B, Z, W, b, tids), rtol=tol, atol=tol)
    # one int: every row that task
    np.testing.assert_allclose(poly.forward(x, W, A, B, Z, 1, bias=b), _reference(x, A, B, Z, W, b, [1, 1, 1]),
                               rtol=tol, atol=tol)


def test_mixing_weights_normalise_per_split():
    rng = np.random.default_rng(1)
    Z = rng.standard_normal((5, 6))
    w = poly.mixing_weights(Z, [4, 1], n_splits=2)
    assert w.shape == (2, 2, 3)
    np.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=1e-11)  # the 1e-12 in the denominator
    sig = 1 / (1 + np.exp(-Z[4, 3:]))
    np.testing.assert_allclose(w[0, 1], sig / (sig.sum() + 1e-12), rtol=1e-14)


def test_layouts_and_read_only_inputs():
    rng = np.random.default_rng(3)
    A, B, Z, W, b = _tensors(rng)
    x = rng.standard_normal((3, 8))
    want = poly.forward(x, W, A, B, Z, [0, 1, 2], bias=b)
    Wf, xs = np.asfortranarray(W), np.repeat(x, 2, axis=1)[:, ::2]
    Ap = np.ascontiguousarray(np.moveaxis(A, 3, 0)).transpose(1, 2, 3, 0)  # a permuted view
    for a in (Wf, xs, Ap, B, Z):
        a.flags.writeable = False
    np.testing.assert_allclose(poly.forward(xs, Wf, Ap, B, Z, (0, 1, 2), bias=b), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lib", ["torch", "array_api_strict"])
def test_other_libraries_match_numpy(lib):
    mod = pytest.importorskip(lib)
    rng = np.random.default_rng(4)
    A, B, Z, W, b = (a.astype(np.float32) for a in _tensors(rng))
    x = rng.standard_normal((3, 2, 8)).astype(np.float32)
    want = poly.forward(x, W, A, B, Z, [2, 2, 0], bias=b)
    conv = (lambda a: mod.from_numpy(a)) if lib == "torch" else (lambda a: mod.asarray(a))
    got = poly.forward(*(conv(a) for a in (x, W, A, B, Z)), conv(np.array([2, 2, 0])), bias=conv(b))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _adapter(rng, S=2, dtype=np.float32):
    A, B, Z, W, b = (a.astype(dtype) for a in _tensors(rng, S=S))
    cfg = poly.PolyConfig(target_modules=["m"], r=3, n_splits=S, n_skills=3, n_tasks=4)
    ad = pm.Adapter(cfg, {"m": {"poly_lora_A": A, "poly_lora_B": B, "poly_router.module_logits": Z}})
    return ad, {"m.weight": W, "m.bias": b}


def test_module_binding_forward_and_refusals():
    rng = np.random.default_rng(5)
    ad, state = _adapter(rng)
    p = ad.params["m"]
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    want = _reference(x, p["poly_lora_A"], p["poly_lora_B"], p["poly_router.module_logits"], state["m.weight"],
                      state["m.bias"], [1, 3])
    np.testing.assert_allclose(ad.forward("m", x, state, task_ids=[1, 3]), want, rtol=1e-5, atol=1e-5)
    before = {k: v.copy() for k, v in state.items()}
    with pytest.raises(UnsupportedError, match="task id of each input row"):
        ad.merge(state)
    mod = ad.module("m", weight_shape=(6, 8))
    for call in (lambda: mod.unmerge(state["m.weight"]), lambda: mod.delta_weight(),
                 lambda: mod.merge(state["m.weight"], copy=False)):
        with pytest.raises(UnsupportedError, match="fixed_mixture"):
            call()
    assert all(np.array_equal(state[k], before[k]) for k in state)
    with pytest.raises(ConfigError, match="needs task_ids"):
        ad.forward("m", x, state)
    with pytest.raises(ConfigError, match=r"task ids \[-1\] are outside"):
        ad.forward("m", x, state, task_ids=[0, -1])
    with pytest.raises(ShapeError, match="2 task ids for a batch of 3"):
        ad.forward("m", x[[0, 1, 1]], state, task_ids=[0, 1])
    # scaled: linear in B
    W, b = state["m.weight"], state["m.bias"]
    np.testing.assert_allclose(mod.scaled(2.0).forward(x, W, b, task_ids=[1, 3]) - x @ W.T - b,
                               2 * (mod.forward(x, W, b, task_ids=[1, 3]) - x @ W.T - b), rtol=1e-4, atol=1e-5)
    # task_delta_weight is the float64 block reference
    want = _delta(p["poly_lora_A"], p["poly_lora_B"], p["poly_router.module_logits"], 2)
    np.testing.assert_allclose(mod.task_delta_weight(2), want, rtol=1e-5, atol=1e-6)
    # a config disagreeing with the tensors, a base of another shape
    with pytest.raises(ShapeError, match="n_tasks"):
        pm.Adapter(ad.config.replace(n_tasks=5), ad.params).module("m", weight_shape=(6, 8))
    with pytest.raises(ShapeError):
        ad.module("m", weight_shape=(6, 10))


@pytest.mark.parametrize("S", [1, 2])
def test_fixed_mixture_is_a_lora_merging_to_the_task_forward(S):
    rng = np.random.default_rng(6)
    ad, state = _adapter(rng, S=S, dtype=np.float64)
    x = rng.standard_normal((2, 8))
    for t in range(4):
        lora = poly.fixed_mixture(ad, t)
        assert (lora.config.peft_type, lora.config.r, lora.config.lora_alpha) == ("LORA", 3, 1)
        merged = lora.merge(state)
        np.testing.assert_allclose(x @ merged["m.weight"].T + merged["m.bias"],
                                   poly.forward(x, state["m.weight"], *ad.params["m"].values(), t,
                                                bias=state["m.bias"]), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(lora.unmerge(merged)["m.weight"], state["m.weight"], rtol=1e-12, atol=1e-12)


def test_expert_and_fixed_weights():
    rng = np.random.default_rng(7)
    ad, _ = _adapter(rng, S=2, dtype=np.float64)
    p = ad.params["m"]
    for s in range(3):
        d = poly.expert(ad, s).delta_weight("m", weight_shape=(6, 8))
        A, B = p["poly_lora_A"][:, s], p["poly_lora_B"][:, s]   # (S, in/S, r), (S, r, out/S)
        want = np.concatenate(B, axis=1).T @ np.concatenate(A, axis=0).T / 3
        np.testing.assert_allclose(d, want, rtol=1e-12, atol=1e-12)
    w = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    d = poly.fixed_mixture(ad, weights=w).delta_weight("m", weight_shape=(6, 8))
    Am = np.concatenate([sum(w[q, s] * p["poly_lora_A"][q, s] for s in range(3)) for q in range(2)], axis=0)
    Bm = np.concatenate([sum(w[q, s] * p["poly_lora_B"][q, s] for s in range(3)) for q in range(2)], axis=1)
    np.testing.assert_allclose(d, (Am @ Bm).T / 3, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError, match="exactly one of task_id"):
        poly.fixed_mixture(ad)
    with pytest.raises(ShapeError, match=r"must be \(n_splits, n_skills\)"):
        poly.fixed_mixture(ad, weights=np.ones((1, 3)))
    with pytest.raises(ConfigError, match="skill 3 is outside"):
        poly.expert(ad, 3)


def test_config_validation():
    with pytest.raises(ConfigError, match="poly_type"):
        poly.PolyConfig(target_modules=["m"], poly_type="mhr").validate()
    with pytest.raises(ConfigError, match="n_skills"):
        poly.PolyConfig(target_modules=["m"], n_skills=0).validate()
    with pytest.raises(ConfigError, match="layers_to_transform"):
        poly.PolyConfig(target_modules=["m"], layers_to_transform=[0]).validate()


def test_initialisation():
    cfg = poly.PolyConfig(target_modules=["m"], r=4, n_splits=2, n_skills=3, n_tasks=5)
    p = poly.init_module(cfg, Layer.of((64, 200)), seed=0)
    A, B, Z = p["poly_lora_A"], p["poly_lora_B"], p["poly_router.module_logits"]
    assert A.shape == (2, 3, 100, 4) and B.shape == (2, 3, 4, 32) and Z.shape == (5, 6)
    assert A.dtype == np.float32 and not B.any()
    assert np.abs(A).max() <= 0.1 and np.abs(A).max() > 0.09  # U(±1/sqrt(100))
    assert np.abs(Z).max() <= 1e-3
    pr = poly.init_module(cfg, Layer.of((64, 200)), seed=0, init_weights=False)
    np.testing.assert_array_equal(pr["poly_lora_A"], A)
    assert 0.45 < np.abs(pr["poly_lora_B"]).max() <= 0.5  # U(±1/sqrt(r))
    with pytest.raises(ShapeError, match="must divide"):
        poly.init_module(cfg, Layer.of((63, 200)))


def test_create_adapter_default_init_is_a_no_op():
    rng = np.random.default_rng(8)
    base = {f"layers.{i}.q.weight": rng.standard_normal((6, 8)).astype(np.float32) for i in range(3)}
    ad = pm.create_adapter(base, poly.PolyConfig(target_modules=["q"], r=2, n_tasks=2))
    x = rng.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(ad.forward("layers.1.q", x, base, task_ids=[1, 0]), x @ base["layers.1.q.weight"].T,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fixed_changes_merge_one_task_and_a_zero_bank(dtype):
    """The two inputs-independent cases merge: n_tasks = 1 (W + ΔW_0, equal to the forward with task 0, and
    unmerge inverts it), and a zero B (a fresh adapter: the base, bit for bit, for any number of tasks)."""
    rng = np.random.default_rng(9)
    A, B, Z, W, b = (a.astype(dtype) for a in _tensors(rng, T=1))
    cfg = poly.PolyConfig(target_modules=["m"], r=3, n_splits=2, n_skills=3, n_tasks=1)
    ad = pm.Adapter(cfg, {"m": {"poly_lora_A": A, "poly_lora_B": B, "poly_router.module_logits": Z}})
    state = {"m.weight": W, "m.bias": b}
    merged = ad.merge(state)
    x = rng.standard_normal((2, 8)).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(x @ merged["m.weight"].T + b, _reference(x, A, B, Z, W, b, [0, 0]), rtol=tol, atol=tol)
    np.testing.assert_allclose(ad.forward("m", x, state), _reference(x, A, B, Z, W, b, [0, 0]), rtol=tol, atol=tol)
    np.testing.assert_allclose(ad.unmerge(merged)["m.weight"], W, rtol=tol, atol=tol)
    Wc = W.copy()
    ad.merge({"m.weight": Wc, "m.bias": b}, copy=False)
    np.testing.assert_array_equal(Wc, merged["m.weight"])
    # a zero bank with several tasks: ΔW = 0 whatever the task
    A4, _, Z4, _, _ = (a.astype(dtype) for a in _tensors(rng, T=4))
    zero = pm.Adapter(cfg.replace(n_tasks=4), {"m": {"poly_lora_A": A4, "poly_lora_B": np.zeros_like(B),
                                                     "poly_router.module_logits": Z4}})
    np.testing.assert_array_equal(zero.merge(state)["m.weight"], W)
