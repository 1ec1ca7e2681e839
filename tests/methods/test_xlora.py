"""X-LoRA's math against an independent float64 computation (token by token: the classifier MLP, the softmax,
top-k by sorting, each expert's LoRA term), the constant-scalings case as pm.combine's "cat" LoRA, the
classifier's key layout, the loader's refusals and the config checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

import peftmath as pm
from peftmath.errors import CheckpointError, ConfigError, ShapeError, UnsupportedError
from peftmath.io.safetensors import save_file
from peftmath.methods import xlora
from peftmath.methods.lora import LoraConfig


def _classifier(rng, cfg, n, L, hidden=6):
    shapes = xlora.classifier_keys(cfg, n, L)
    keys = list(shapes)
    return [(rng.standard_normal(shapes[keys[i]]), rng.standard_normal(shapes[keys[i + 1]]))
            for i in range(0, len(keys), 2)]


def _ref_scalings(h, layers, cfg, L):
    out = np.zeros((*h.shape[:2], L, layers[-1][0].shape[0] // (L if cfg.layerwise_scalings else 1)))
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            z = np.float64(h[b, t])
            for k, (w, bias) in enumerate(layers):
                z = w @ z + bias
                if k < len(layers) - 1:
                    z = np.maximum(z, 0)
            rows = z.reshape(L, -1) if cfg.layerwise_scalings else np.tile(z, (L, 1))
            if cfg.enable_softmax:
                e = np.exp(rows / cfg.softmax_temperature - (rows / cfg.softmax_temperature).max(axis=1, keepdims=True))
                rows = e / e.sum(axis=1, keepdims=True)
            out[b, t] = rows
    return out


@pytest.mark.parametrize("config", [dict(), dict(xlora_depth=3, xlora_dropout_p=0.0),
                                    dict(layerwise_scalings=True, softmax_temperature=0.3),
                                    dict(enable_softmax=False, xlora_depth=2)])
def test_classifier_against_float64_tokens(config):
    cfg = xlora.XLoraConfig(hidden_size=6, xlora_size=5, **config)
    rng = np.random.default_rng(0)
    layers = _classifier(rng, cfg, 3, 4)
    h = rng.standard_normal((2, 3, 6))
    got = xlora.classifier_scalings(h, layers, cfg, n_layers=4)
    np.testing.assert_allclose(got, _ref_scalings(h, layers, cfg, 4), rtol=1e-12, atol=1e-12)
    got32 = xlora.classifier_scalings(h.astype(np.float32), [(w.astype(np.float32), b.astype(np.float32))
                                                             for w, b in layers], cfg, n_layers=4)
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, got, rtol=1e-4, atol=1e-5)


def test_classifier_keys_follow_peft_sequential_indices():
    cfg = xlora.XLoraConfig(hidden_size=16, xlora_depth=3, xlora_size=8)
    assert xlora.classifier_keys(cfg, 2, 5) == {"0.weight": (8, 16), "0.bias": (8,), "3.weight": (8, 8),
                                                "3.bias": (8,), "6.weight": (2, 8), "6.bias": (2,)}
    cfg = xlora.XLoraConfig(hidden_size=16, xlora_depth=2, xlora_size=8, xlora_dropout_p=0.0, layerwise_scalings=True)
    assert xlora.classifier_keys(cfg, 2, 5) == {"0.weight": (8, 16), "0.bias": (8,), "2.weight": (10, 8),
                                                "2.bias": (10,)}


def _experts(rng, inn=5, out=4, ranks=(2, 3, 1)):
    return [(rng.standard_normal((r, inn)), rng.standard_normal((out, r)), 0.5 + k) for k, r in enumerate(ranks)]


@pytest.mark.parametrize("config", [dict(), dict(top_k_lora=2), dict(top_k_lora=2, enable_softmax_topk=True),
                                    dict(global_scaling_weight=0.3)])
def test_layer_forward_against_float64_tokens(config):
    cfg = xlora.XLoraConfig(hidden_size=5, **config)
    rng = np.random.default_rng(1)
    exps = _experts(rng)
    W, b = rng.standard_normal((4, 5)), rng.standard_normal(4)
    x, S = rng.standard_normal((2, 3, 5)), rng.random((2, 3, 2, 3))
    got = xlora.lora_linear_forward(x, W, exps, S, 1, cfg, bias=b)
    want = np.zeros((2, 3, 4))
    for i in range(2):
        for t in range(3):
            s = S[i, t, 1].copy()
            if cfg.top_k_lora:
                s[np.argsort(-s)[cfg.top_k_lora:]] = 0
            if cfg.enable_softmax_topk:
                e = np.where(s != 0, np.exp(s - s.max()), 0)
                s = e / e.sum()
            want[i, t] = W @ x[i, t] + b + cfg.global_scaling_weight * sum(
                c * s[k] * (B @ (A @ x[i, t])) for k, (A, B, c) in enumerate(exps))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_constant_scalings_are_the_cat_combination_of_the_experts():
    """Scalings w_i for every token: the layer is W + g Σ_i w_i c_i B_i A_i, the LoRA that pm.combine(experts,
    g·w, combination_type="cat") merges to (the documented way to merge a fixed mixture)."""
    rng = np.random.default_rng(2)
    exps = _experts(rng)
    W = rng.standard_normal((4, 5))
    w = np.array([0.2, 0.5, 0.3])
    cfg = xlora.XLoraConfig(hidden_size=5, global_scaling_weight=0.8)
    adapters = [pm.Adapter(LoraConfig(r=A.shape[0], lora_alpha=c * A.shape[0], target_modules=["m"]),
                           {"m": {"lora_A.weight": A, "lora_B.weight": B}}) for A, B, c in exps]
    merged = pm.combine(adapters, list(0.8 * w), combination_type="cat").merge({"m.weight": W})["m.weight"]
    x = rng.standard_normal((2, 3, 5))
    S = np.broadcast_to(w, (2, 3, 1, 3))
    np.testing.assert_allclose(xlora.lora_linear_forward(x, W, exps, S, 0, cfg), x @ merged.T, rtol=1e-12, atol=1e-12)


def test_refusals_and_layouts():
    rng = np.random.default_rng(3)
    exps = _experts(rng)
    W = rng.standard_normal((4, 5))
    cfg = xlora.XLoraConfig(hidden_size=5)
    S = rng.random((2, 3, 2, 3))
    x = rng.standard_normal((2, 3, 5))
    want = xlora.lora_linear_forward(x, W, exps, S, 0, cfg)
    Wf, xs = np.asfortranarray(W), np.repeat(x, 2, axis=2)[:, :, ::2]
    for a in (Wf, xs, S):
        a.flags.writeable = False
    np.testing.assert_allclose(xlora.lora_linear_forward(xs, Wf, exps, S, 0, cfg), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ShapeError, match="3 experts, 2 given"):
        xlora.lora_linear_forward(x, W, exps[:2], S, 0, cfg)
    with pytest.raises(ShapeError, match="layer 2"):
        xlora.lora_linear_forward(x, W, exps, S, 2, cfg)
    with pytest.raises(ShapeError, match="must be \\(batch, seq, in\\)"):
        xlora.lora_linear_forward(x[:1], W, exps, S, 0, cfg)
    with pytest.raises(ConfigError, match="enable_softmax_topk needs top_k_lora"):
        xlora.XLoraConfig(hidden_size=5, enable_softmax_topk=True).validate()
    with pytest.raises(ConfigError, match="softmax_temperature"):
        xlora.XLoraConfig(hidden_size=5, softmax_temperature=0.0).validate()


def test_torch_matches_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    cfg = xlora.XLoraConfig(hidden_size=6, xlora_depth=2, xlora_size=5, top_k_lora=2)
    layers = [(w.astype(np.float32), b.astype(np.float32)) for w, b in _classifier(rng, cfg, 3, 2)]
    h = rng.standard_normal((2, 3, 6)).astype(np.float32)
    S = xlora.classifier_scalings(h, layers, cfg, n_layers=2)
    St = xlora.classifier_scalings(torch.from_numpy(h), [tuple(torch.from_numpy(a) for a in wb) for wb in layers], cfg,
                                   n_layers=2)
    np.testing.assert_allclose(St.numpy(), S, rtol=1e-5, atol=1e-6)
    exps = [(A.astype(np.float32), B.astype(np.float32), c) for A, B, c in _experts(rng, inn=6)]
    W = rng.standard_normal((4, 6)).astype(np.float32)
    want = xlora.lora_linear_forward(h, W, exps, S, 1, cfg)
    got = xlora.lora_linear_forward(torch.from_numpy(h), torch.from_numpy(W),
                                    [(torch.from_numpy(A), torch.from_numpy(B), c) for A, B, c in exps], St, 1, cfg)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_loader_round_trip_and_refusals(tmp_path):
    rng = np.random.default_rng(5)
    names = {}
    for i, (r, alpha) in enumerate([(2, 4), (1, 3)]):
        ad = pm.Adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=["q", "v"]),
                        {m: {"lora_A.weight": rng.standard_normal((r, 6)).astype(np.float32),
                             "lora_B.weight": rng.standard_normal((6, r)).astype(np.float32)} for m in ("a.q", "a.v")})
        pm.save_adapter(ad, tmp_path / f"e{i}")
        names[str(i)] = f"e{i}"
    cfg = xlora.XLoraConfig(hidden_size=6, xlora_depth=2, xlora_size=4, adapters={k: str(tmp_path / v)
                                                                                   for k, v in names.items()})
    layers = _classifier(rng, cfg, 2, 2)
    keys = list(xlora.classifier_keys(cfg, 2, 2))
    folder = tmp_path / "x"
    folder.mkdir()
    tensors = {xlora.PREFIX + keys[2 * j + k]: a.astype(np.float32)
               for j, wb in enumerate(layers) for k, a in enumerate(wb)}
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({**cfg.to_dict(), "peft_type": "XLORA"}))
    got_cfg, got_layers, experts = xlora.load_xlora(folder)
    assert got_cfg.xlora_depth == 2 and list(experts) == ["0", "1"]
    for (w, b), (w2, b2) in zip(got_layers, layers):
        np.testing.assert_array_equal(w, w2.astype(np.float32))
        np.testing.assert_array_equal(b, b2.astype(np.float32))
    trained = got_cfg.replace(use_trainable_adapters=True)
    lora_scalars = 2 * (2 * 6 * 2) + 2 * (1 * 6 * 2)  # two modules per expert, A (r, 6) and B (6, r)
    classifier_scalars = 6 * 4 + 4 + 4 * 2 + 2
    assert xlora.num_trainable_parameters(got_cfg, tensors) == classifier_scalars
    assert xlora.num_trainable_parameters(trained, tensors, list(experts.values())) == classifier_scalars + lora_scalars
    del tensors[xlora.PREFIX + "0.weight"]
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="missing .*layers.0.weight"):
        xlora.load_xlora(folder)


def test_embedding_forward_against_float64_tokens():
    rng = np.random.default_rng(7)
    cfg = xlora.XLoraConfig(hidden_size=4, top_k_lora=1, global_scaling_weight=0.6)
    E = rng.standard_normal((9, 4))
    exps = [(rng.standard_normal((r, 9)), rng.standard_normal((4, r)), c) for r, c in ((2, 1.5), (3, 0.5))]
    ids = rng.integers(0, 9, (2, 3))
    S = rng.random((2, 3, 1, 2))
    got = xlora.lora_embedding_forward(ids, E, exps, S, 0, cfg, embed_scale=2.0)
    for i in range(2):
        for t in range(3):
            s = S[i, t, 0] * (S[i, t, 0] == S[i, t, 0].max())
            want = E[ids[i, t]] + 2.0 * 0.6 * sum(c * s[k] * (B @ A[:, ids[i, t]]) for k, (A, B, c) in enumerate(exps))
            np.testing.assert_allclose(got[i, t], want, rtol=1e-12, atol=1e-12)


def test_load_adapter_points_to_load_xlora(tmp_path):
    """``pm.load_adapter`` reads one adapter; an X-LoRA folder is a classifier over experts in other folders:
    refused by name, pointing to ``xlora.load_xlora``."""
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "XLORA", "hidden_size": 8, "adapters": {"0": "e0"}, "xlora_depth": 1}))
    save_file({"base_model.internal_xlora_classifier.layers.0.weight": np.zeros((1, 8), np.float32)},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(UnsupportedError, match=r"X-LoRA .*xlora\.load_xlora\(folder"):
        pm.load_adapter(tmp_path)
