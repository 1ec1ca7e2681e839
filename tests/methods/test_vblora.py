"""VB-LoRA's own math against an independent float64 computation (explicit loops over the sub-vectors,
Python's sort for the top-k), both saved forms, the tie rule, layouts and refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from peftmath import Adapter
from peftmath.errors import CheckpointError, ConfigError, ShapeError, UnsupportedError
from peftmath.layers import Layer
from peftmath.methods import vblora


def _mix_loop(logits, bank, k):
    """Per sub-vector: the k largest logits (ties: lower index first), their softmax, Σ w_j bank[j]."""
    lead = logits.shape[:-1]
    out = np.zeros((*lead, bank.shape[1]))
    for pos in np.ndindex(*lead):
        row = logits[pos]
        top = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        e = [math.exp(row[j] - row[top[0]]) for j in top]
        out[pos] = sum(ej / sum(e) * bank[j] for ej, j in zip(e, top))
    return out


def _factors_loop(la, lb, bank, k):
    ma, mb = _mix_loop(la, bank, k), _mix_loop(lb, bank, k)  # (r, in/L, L), (out/L, r, L)
    r, L = la.shape[0], bank.shape[1]
    A = np.array([[ma[i, c // L, c % L] for c in range(la.shape[1] * L)] for i in range(r)])
    B = np.array([[mb[o // L, i, o % L] for i in range(r)] for o in range(lb.shape[0] * L)])
    return A, B


def _case(out=8, inn=12, r=3, h=6, L=4, k=3, seed=0):
    cfg = vblora.VBLoRAConfig(target_modules=["m"], r=r, num_vectors=h, vector_length=L, topk=k, init_logits_std=1.0,
                              init_vector_bank_bound=1.0)
    layer = Layer.of((out, inn))
    shared = vblora.init_shared(cfg, [layer], seed=seed)
    params, _ = vblora.VBLoRAModule.initialize("m", cfg, layer, seed=seed + 1, shared=shared)
    f64 = {key: np.asarray(v, np.float64) for key, v in {**params, **shared}.items()}
    return cfg, layer, f64["vblora_logits_A"], f64["vblora_logits_B"], f64[vblora.BANK_KEY]


def test_delta_merge_forward_match_the_loops():
    cfg, layer, la, lb, bank = _case()
    A, B = _factors_loop(la, lb, bank, cfg.topk)
    want = B @ A
    np.testing.assert_allclose(vblora.delta_weight(la, lb, bank, topk=3), want, rtol=1e-13, atol=1e-14)
    W = np.random.default_rng(1).standard_normal((8, 12))
    merged = vblora.merge(W, la, lb, bank, topk=3)
    np.testing.assert_allclose(merged, W + want, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(vblora.unmerge(merged, la, lb, bank, topk=3), W, rtol=1e-13, atol=1e-14)
    x, b = np.random.default_rng(2).standard_normal((2, 3, 12)), np.random.default_rng(3).standard_normal(8)
    np.testing.assert_allclose(vblora.forward(x, W, la, lb, bank, topk=3, bias=b), x @ (W + want).T + b,
                               rtol=1e-12, atol=1e-12)
    # Conv1D stores (in, out): the transpose, through the same module class
    d_t = vblora.delta_weight(la, lb, bank, topk=3, layer="Conv1D")
    np.testing.assert_allclose(d_t, want.T, rtol=1e-13, atol=1e-14)


def test_topk_form_equals_the_logits_and_round_trips():
    cfg, layer, la, lb, bank = _case(h=300, k=2, seed=4)  # 300 vectors: int16 indices, as PEFT picks
    idx, w = vblora.to_saved(la.astype(np.float32), 2)
    assert idx.dtype == np.int16 and w.shape == (*la.shape[:-1], 1) and w.dtype == np.float32
    sel = vblora.from_saved(idx, w, 300)
    ref = vblora.select(la, 2)
    np.testing.assert_array_equal(sel.indices, ref.indices)
    np.testing.assert_allclose(sel.weights, ref.weights, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sel.weights.sum(-1), 1.0, rtol=0, atol=1e-7)
    compat = vblora.from_saved(idx, w, 300, peft_compat=True)  # softmax(log w): the same within rounding
    np.testing.assert_allclose(compat.weights, sel.weights, rtol=1e-6, atol=1e-7)
    # the module reads either form and gives the same merge
    cfg2 = cfg.replace(num_vectors=300, topk=2, save_only_topk_weights=True)
    shared = {vblora.BANK_KEY: vblora.init_vector_bank(300, 4, bound=1.0, seed=9)}
    logits = {"vblora_logits_A": la.astype(np.float32), "vblora_logits_B": lb.astype(np.float32)}
    saved = {}
    for key in vblora.LOGITS:
        saved[f"{key}_topk_indices"], saved[f"{key}_topk_weights"] = vblora.to_saved(logits[key], 2, 300)
    W = np.random.default_rng(5).standard_normal((8, 12)).astype(np.float32)
    m1 = Adapter(cfg2, {"m": logits}, shared=shared).merge({"m.weight": W})["m.weight"]
    m2 = Adapter(cfg2, {"m": saved}, shared=shared).merge({"m.weight": W})["m.weight"]
    np.testing.assert_allclose(m2, m1, rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(m1 - W)) > 0.1


def test_ties_pick_the_lower_index_and_inf_logits():
    bank = np.arange(10.0).reshape(5, 2)
    logits = np.array([[1.0, 3.0, 0.0, 3.0, 3.0]])  # a three-way tie at the top, k = 2
    s = vblora.select(logits, 2)
    assert s.indices.tolist() == [[1, 3]] and s.weights.tolist() == [[0.5, 0.5]]
    np.testing.assert_array_equal(vblora.mix(s, bank), [[(2 + 6) / 2, (3 + 7) / 2]])
    # PEFT's rebuilt logits of a top-k checkpoint: log w where saved, −inf elsewhere; a zero weight is −inf too
    rebuilt = np.array([[-np.inf, np.log(0.25), -np.inf, np.log(0.75), -np.inf]])
    s = vblora.select(rebuilt, 3)
    assert s.indices.tolist() == [[3, 1, 0]]
    np.testing.assert_allclose(s.weights, [[0.75, 0.25, 0.0]])
    np.testing.assert_allclose(vblora.mix(s, bank), [[0.75 * 6 + 0.25 * 2, 0.75 * 7 + 0.25 * 3]])


def test_saved_weights_clamp_and_refusals():
    idx = np.array([[0, 1, 2]], dtype=np.uint8)
    tiny = np.array([[0.6, 0.4 + 5e-8]], dtype=np.float32)  # 1 − Σ is −6e-8 by rounding: becomes 0
    s = vblora.from_saved(idx, tiny, 3)
    assert float(s.weights[0, 2]) == 0.0
    with pytest.raises(CheckpointError, match="sum to more than 1"):
        vblora.from_saved(idx, np.array([[0.7, 0.4]], dtype=np.float32), 3)
    with pytest.raises(CheckpointError, match=r"outside 0\.\.2"):
        vblora.from_saved(np.array([[0, 1, 3]], dtype=np.uint8), np.array([[0.5, 0.25]]), 3)
    with pytest.raises(ShapeError, match="k − 1 = 2"):
        vblora.from_saved(idx, np.array([[0.5, 0.25, 0.25]]), 3)
    with pytest.raises(CheckpointError, match="integer dtype"):
        vblora.from_saved(idx.astype(np.float32), np.array([[0.5, 0.25]]), 3)


def test_float32_in_place_layouts_read_only_and_scale():
    cfg, layer, la, lb, bank = _case(seed=6)
    args = [a.astype(np.float32) for a in (la, lb, bank)]
    W0 = np.random.default_rng(7).standard_normal((8, 12)).astype(np.float32)
    want = W0.astype(np.float64) + np.asarray(vblora.delta_weight(*args, topk=3), np.float64)
    for W in (W0.copy(), np.asfortranarray(W0), np.concatenate([W0, W0], 1)[:, ::2], W0.T.copy().T):
        W[...] = W0
        assert vblora.merge(W, *args, topk=3, copy=False) is W
        np.testing.assert_allclose(W, want, rtol=1e-6, atol=1e-6)
        vblora.unmerge(W, *args, topk=3, copy=False)
        np.testing.assert_allclose(W, W0, rtol=0, atol=4e-6)
    ro = W0.copy()
    ro.setflags(write=False)
    with pytest.raises(UnsupportedError, match="copy=True"):
        vblora.merge(ro, *args, topk=3, copy=False)
    np.testing.assert_array_equal(vblora.merge(ro, *args, topk=3), want.astype(np.float32))  # copy=True: one rounding
    ad = Adapter(cfg, {"m": {"vblora_logits_A": args[0], "vblora_logits_B": args[1]}},
                 shared={vblora.BANK_KEY: args[2]})
    d1 = ad.merge({"m.weight": W0})["m.weight"] - W0
    d2 = ad.scaled(-0.5).merge({"m.weight": W0})["m.weight"] - W0
    np.testing.assert_allclose(d2, -0.5 * d1, rtol=1e-5, atol=1e-6)


def test_torch_top_k_form_matches_numpy():
    torch = pytest.importorskip("torch")
    cfg, layer, la, lb, bank = _case(seed=8)
    cfg = cfg.replace(save_only_topk_weights=True)
    saved = {}
    for key, lg in zip(vblora.LOGITS, (la, lb)):
        saved[f"{key}_topk_indices"], saved[f"{key}_topk_weights"] = vblora.to_saved(lg.astype(np.float32), 3, 6)
    W = np.random.default_rng(9).standard_normal((8, 12)).astype(np.float32)
    bank32 = bank.astype(np.float32)
    want = Adapter(cfg, {"m": saved}, shared={vblora.BANK_KEY: bank32}).merge({"m.weight": W})["m.weight"]
    tparams = {k: torch.from_numpy(v.copy()) for k, v in saved.items()}
    got = Adapter(cfg, {"m": tparams}, shared={vblora.BANK_KEY: torch.from_numpy(bank32.copy())}).merge(
        {"m.weight": torch.from_numpy(W.copy())})["m.weight"]
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_module_refusals():
    cfg, layer, la, lb, bank = _case()
    shared = {vblora.BANK_KEY: bank}
    params = {"vblora_logits_A": la, "vblora_logits_B": lb}
    W = np.zeros((8, 12))
    with pytest.raises(CheckpointError, match="vector bank"):
        Adapter(cfg, {"m": params}).merge({"m.weight": W})
    with pytest.raises(ShapeError, match="vector_length=4, which must divide"):
        vblora.VBLoRAModule.initialize("m", cfg, Layer.of((8, 10)))
    with pytest.raises(ShapeError, match="VB-LoRA is not defined for a Conv2d"):
        vblora.VBLoRAModule.initialize("m", cfg, Layer.of((8, 4, 3, 3)))
    with pytest.raises(ShapeError, match="vector bank has shape"):
        Adapter(cfg, {"m": params}, shared={vblora.BANK_KEY: bank[:5]}).merge({"m.weight": W})
    with pytest.raises(ShapeError, match="needs vblora_logits_A / _B"):
        Adapter(cfg, {"m": {"vblora_logits_A": la}}, shared=shared).merge({"m.weight": W})
    with pytest.raises(ConfigError, match="no initialisation option"):
        vblora.VBLoRAModule.initialize("m", cfg, Layer.of((8, 12)), init=False)
    with pytest.raises(ConfigError, match="exceeds num_vectors"):
        vblora.VBLoRAConfig(target_modules=["m"], num_vectors=2, topk=3).validate()
