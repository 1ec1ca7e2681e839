"""Adaption prompts: the gated prompt attention against a float64 computation written out head by head
(rotary queries, grouped heads, biases, GPT-2's fused projection), zero-init, the module selection, the
checkpoint round trip and the refusals, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import peftmath as pm
from peftmath.adapter import Adapter
from peftmath.errors import ConfigError, ShapeError, UnsupportedError
from peftmath.methods import adaption_prompt as ap
from tests.helpers import assert_same_namespace, to_np, to_xp


def _llama_weights(rng, hidden, heads, kv, d, bias):
    w = {"q_proj.weight": rng.standard_normal((heads * d, hidden)),
         "k_proj.weight": rng.standard_normal((kv * d, hidden)),
         "v_proj.weight": rng.standard_normal((kv * d, hidden)),
         "o_proj.weight": rng.standard_normal((hidden, heads * d))}
    if bias:
        for p, n in (("q", heads * d), ("k", kv * d), ("v", kv * d), ("o", hidden)):
            w[f"{p}_proj.bias"] = rng.standard_normal(n)
    return {k: v / np.sqrt(hidden) for k, v in w.items()}


def _rope(rng, b, n, d):
    theta = rng.uniform(0, 2 * np.pi, (b, n, d // 2))
    return np.cos(np.concatenate([theta, theta], -1)), np.sin(np.concatenate([theta, theta], -1))


def _reference_llama(x, prompt, gate, w, heads, kv, cos, sin, with_o_bias):
    """Head by head in float64: q rotated, prompt keys / values not, softmax over the prompt, o_proj."""
    b, n, _ = x.shape
    d = w["q_proj.weight"].shape[0] // heads
    lin = lambda a, p: a @ w[f"{p}.weight"].T + w.get(f"{p}.bias", 0.0)
    q = lin(x, "q_proj").reshape(b, n, heads, d)
    k, v = lin(prompt[0], "k_proj").reshape(-1, kv, d), lin(prompt[0], "v_proj").reshape(-1, kv, d)
    out = np.zeros((b, n, heads * d))
    for bi in range(b):
        for h in range(heads):
            qh = q[bi, :, h]
            qh = qh * cos[bi] + np.concatenate([-qh[:, d // 2:], qh[:, :d // 2]], -1) * sin[bi]
            g = h // (heads // kv)
            s = qh @ k[:, g].T / np.sqrt(d)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[bi, :, h * d:(h + 1) * d] = gate[0] * (p / p.sum(-1, keepdims=True)) @ v[:, g]
    out = out @ w["o_proj.weight"].T
    return out + w["o_proj.bias"] if with_o_bias and "o_proj.bias" in w else out


@given(seed=st.integers(0, 2**31 - 1), group=st.sampled_from([1, 2]), bias=st.booleans(), compat=st.booleans(),
       t=st.integers(1, 4))
def test_llama_term_matches_the_written_out_heads(xp, seed, group, bias, compat, t):
    rng = np.random.default_rng(seed)
    kv, d, b, n = 2, 4, 2, 3
    heads = kv * group
    hidden = heads * d
    w = _llama_weights(rng, hidden, heads, kv, d, bias)
    x, prompt, gate = rng.standard_normal((b, n, hidden)), rng.standard_normal((1, t, hidden)), rng.standard_normal(1)
    cos, sin = _rope(rng, b, n, d)
    got = ap.adaption_delta(to_xp(xp, x), to_xp(xp, prompt), to_xp(xp, gate), {k: to_xp(xp, v) for k, v in w.items()},
                            num_heads=heads, position_embeddings=(to_xp(xp, cos), to_xp(xp, sin)), peft_compat=compat)
    assert_same_namespace(xp, got)
    want = _reference_llama(x, prompt, gate, w, heads, kv, cos, sin, compat)
    np.testing.assert_allclose(to_np(got), want, rtol=1e-10, atol=1e-12)


def test_gpt2_term_is_unprojected_and_uses_the_fused_thirds(xp):
    rng = np.random.default_rng(3)
    hidden, heads, t = 8, 2, 3
    w = {"c_attn.weight": rng.standard_normal((hidden, 3 * hidden)), "c_attn.bias": rng.standard_normal(3 * hidden),
         "c_proj.weight": rng.standard_normal((hidden, hidden)), "c_proj.bias": rng.standard_normal(hidden)}
    x, prompt, gate = rng.standard_normal((2, 4, hidden)), rng.standard_normal((1, t, hidden)), np.array([0.3])
    got = to_np(ap.adaption_delta(to_xp(xp, x), to_xp(xp, prompt), to_xp(xp, gate),
                                  {k: to_xp(xp, v) for k, v in w.items()}, num_heads=heads, model_type="gpt2"))
    qx = (x @ w["c_attn.weight"] + w["c_attn.bias"])[..., :hidden]
    kp = (prompt[0] @ w["c_attn.weight"] + w["c_attn.bias"])[:, hidden:2 * hidden]
    vp = (prompt[0] @ w["c_attn.weight"] + w["c_attn.bias"])[:, 2 * hidden:]
    d = hidden // heads
    want = np.zeros_like(x)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        s = np.exp(qx[..., sl] @ kp[:, sl].T / np.sqrt(d))
        want[..., sl] = 0.3 * (s / s.sum(-1, keepdims=True)) @ vp[:, sl]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_zero_gate_is_the_base_output_unless_peft_compat_adds_the_bias(xp):
    rng = np.random.default_rng(1)
    w = _llama_weights(rng, 8, 2, 1, 4, bias=True)
    x, prompt = rng.standard_normal((1, 3, 8)), rng.standard_normal((1, 2, 8))
    base = rng.standard_normal((1, 3, 8))
    cos, sin = _rope(rng, 1, 3, 4)
    args = {"num_heads": 2, "position_embeddings": (to_xp(xp, cos), to_xp(xp, sin))}
    wx = {k: to_xp(xp, v) for k, v in w.items()}
    out = ap.forward(to_xp(xp, base), to_xp(xp, x), to_xp(xp, prompt), to_xp(xp, np.zeros(1)), wx, **args)
    np.testing.assert_array_equal(to_np(out), base)
    out = ap.forward(to_xp(xp, base), to_xp(xp, x), to_xp(xp, prompt), to_xp(xp, np.zeros(1)), wx, peft_compat=True,
                     **args)
    np.testing.assert_allclose(to_np(out), base + w["o_proj.bias"], rtol=1e-12)


def test_layouts_dtypes_and_untouched_inputs():
    rng = np.random.default_rng(2)
    w = _llama_weights(rng, 8, 2, 2, 4, bias=False)
    x, prompt, gate = rng.standard_normal((2, 3, 8)), rng.standard_normal((1, 2, 8)), np.array([0.8])
    cos, sin = _rope(rng, 2, 3, 4)
    ref = ap.adaption_delta(x, prompt, gate, w, num_heads=2, position_embeddings=(cos, sin))
    # Fortran order, a strided view, read-only arrays: same numbers, inputs unchanged
    xf = np.asfortranarray(x)
    xs = np.repeat(x, 2, axis=2)[..., ::2]
    wr = {k: np.asfortranarray(v) for k, v in w.items()}
    for a in (xf, prompt, *wr.values()):
        a.flags.writeable = False
    for xx in (xf, xs):
        np.testing.assert_allclose(ap.adaption_delta(xx, prompt, gate, wr, num_heads=2, position_embeddings=(cos, sin)),
                                   ref, rtol=1e-13, atol=1e-14)
    np.testing.assert_array_equal(xf, x)
    # float32 and float16 inputs: computed in float32, returned in the input's dtype
    for dt, tol in ((np.float32, 1e-5), (np.float16, 3e-3)):
        got = ap.adaption_delta(x.astype(dt), prompt.astype(dt), gate.astype(np.float32),
                                {k: v.astype(dt) for k, v in w.items()}, num_heads=2,
                                position_embeddings=(cos.astype(dt), sin.astype(dt)))
        assert got.dtype == dt
        np.testing.assert_allclose(got.astype(np.float64), ref, rtol=tol * 10, atol=tol * 10)


def test_module_selection_init_and_checks():
    cfg = ap.AdaptionPromptConfig(adapter_len=2, adapter_layers=2)
    keys = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1, 2, 10) for p in "qk"]
    keys += ["model.layers.2.mlp.up_proj.weight"]
    mods = ap.adapted_modules(keys, cfg, "llama")
    assert mods == ["model.layers.2.self_attn", "model.layers.10.self_attn"]  # the model's order, not sorted
    gpt2 = ["h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight"]
    assert ap.adapted_modules(gpt2, cfg, "gpt2") == ["h.0.attn", "h.1.attn"]
    with pytest.raises(ConfigError, match="adapter_layers=3 but the model has 2"):
        ap.adapted_modules(keys[:4], cfg.replace(adapter_layers=3), "llama")
    with pytest.raises(UnsupportedError, match="model type 'opt'"):
        ap.adapted_modules(keys, cfg, "opt")
    params = ap.init_adaption_prompt(cfg, mods, 8, seed=4)
    assert ap.check_params(cfg, params) == 8
    for p in params.values():
        assert p["adaption_prompt"].shape == (1, 2, 8) and p["adaption_prompt"].dtype == np.float32
        np.testing.assert_array_equal(p["adaption_gate"], np.zeros(1))
    again = ap.init_adaption_prompt(cfg, mods, 8, seed=4)
    np.testing.assert_array_equal(params[mods[1]]["adaption_prompt"], again[mods[1]]["adaption_prompt"])
    big = ap.init_adaption_prompt(cfg.replace(adapter_len=500), mods[:2], 64, seed=0)
    draws = np.concatenate([np.ravel(p["adaption_prompt"]) for p in big.values()])
    assert abs(draws.mean()) < 5 / np.sqrt(draws.size) and abs(draws.var() - 1) < 0.03
    with pytest.raises(ShapeError, match="adapts 1 modules"):
        ap.check_params(cfg, {mods[0]: params[mods[0]]})
    bad = {m: dict(p) for m, p in params.items()}
    bad[mods[0]]["adaption_gate"] = np.zeros(2)
    with pytest.raises(ShapeError, match="expected \\(1, 2, D\\) and \\(1,\\)"):
        ap.check_params(cfg, bad)


def test_config_and_shape_refusals():
    for field, value in [("adapter_len", 0), ("adapter_layers", True), ("target_modules", ["self_attn"])]:
        with pytest.raises(ConfigError, match=field):
            ap.AdaptionPromptConfig.from_dict({"peft_type": "ADAPTION_PROMPT", field: value})
    with pytest.raises(ConfigError, match="must both be set"):
        ap.AdaptionPromptConfig(adapter_len=2).sizes()
    rng = np.random.default_rng(0)
    # head_dim 4, 4 query heads on 2 key/value heads, hidden 12 != 4·4: PEFT's grouping 12 // 8 = 1 != 2
    w = {"q_proj.weight": rng.standard_normal((16, 12)), "k_proj.weight": rng.standard_normal((8, 12)),
         "v_proj.weight": rng.standard_normal((8, 12)), "o_proj.weight": rng.standard_normal((12, 16))}
    cs = (np.ones((1, 2, 4)), np.zeros((1, 2, 4)))
    with pytest.raises(UnsupportedError, match="head_dim"):
        ap.adaption_delta(np.zeros((1, 2, 12)), np.zeros((1, 2, 12)), np.zeros(1), w, num_heads=4,
                          position_embeddings=cs)
    w = _llama_weights(rng, 8, 2, 2, 4, bias=False)
    with pytest.raises(ConfigError, match="position_embeddings"):
        ap.adaption_delta(np.zeros((1, 2, 8)), np.zeros((1, 2, 8)), np.zeros(1), w, num_heads=2)
    with pytest.raises(ShapeError, match="adaption_gate"):
        ap.adaption_delta(np.zeros((1, 2, 8)), np.zeros((1, 2, 8)), np.zeros(2), w, num_heads=2, position_embeddings=cs)
    with pytest.raises(ShapeError, match="differ"):
        ap.forward(np.zeros((1, 3, 8)), np.zeros((1, 2, 8)), np.zeros((1, 2, 8)), np.zeros(1), w, num_heads=2,
                   position_embeddings=(np.ones((1, 2, 4)), np.zeros((1, 2, 4))))
    with pytest.raises(ShapeError, match="no tensors under"):
        ap.attention_weights({"a.weight": np.zeros(1)}, "model.layers.0.self_attn")


def test_adapter_round_trip_count_and_refusals(tmp_path):
    cfg = ap.AdaptionPromptConfig(adapter_len=3, adapter_layers=2, target_modules="self_attn")
    mods = ["model.layers.1.self_attn", "model.layers.2.self_attn"]
    params = ap.init_adaption_prompt(cfg, mods, 8, seed=1)
    params[mods[0]]["adaption_gate"] = np.array([0.25], np.float32)
    ad = Adapter(cfg, params)
    assert ad.num_trainable_parameters() == 2 * (3 * 8 + 1)
    pm.save_adapter(ad, tmp_path)
    back = pm.load_adapter(tmp_path)
    assert sorted(back.params) == mods and back.config.adapter_len == 3
    for m in mods:
        for s in ap.PARAMETER_SUFFIXES:
            np.testing.assert_array_equal(np.asarray(back.params[m][s]), params[m][s])
    assert set(back.state_dict()) == {f"base_model.model.{m}.{s}" for m in mods for s in ap.PARAMETER_SUFFIXES}
    with pytest.raises(UnsupportedError, match="ADAPTION_PROMPT changes no weight"):
        back.merge({})
