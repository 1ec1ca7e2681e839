"""Prompt tuning, P-tuning and prefix tuning: layouts, encoders and the reference attention, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from tests.helpers import assert_same_namespace, to_np, to_xp
from hypothesis import given
from hypothesis import strategies as st

import peftmath as pm
from peftmath.adapter import Adapter
from peftmath.errors import ConfigError, ShapeError, UnsupportedError
from peftmath.methods import p_tuning, prefix_tuning, prompt_tuning


def _prefix_cfg(t, d, layers, heads, s=1, **kw):
    return prefix_tuning.PrefixTuningConfig(num_virtual_tokens=t, token_dim=d, num_layers=layers,
                                            num_attention_heads=heads, num_transformer_submodules=s, **kw)


@given(t=st.integers(1, 4), heads=st.integers(1, 3), d=st.integers(1, 3), layers=st.integers(1, 3),
       s=st.sampled_from([1, 2]), batch=st.integers(1, 2))
def test_past_key_values_index_formula(t, heads, d, layers, s, batch):
    """Element (t, ((2ℓ + j)·H + h)·d + e) of the table is layer ℓ's key (j=0) / value (j=1)."""
    cfg = _prefix_cfg(t, heads * d, layers, heads, s)
    table = np.arange(t * 2 * layers * heads * d, dtype=np.float64).reshape(t, -1)
    pkv = prefix_tuning.past_key_values(table, cfg, batch)
    assert len(pkv) == layers and all(len(entry) == 2 * s for entry in pkv)
    for layer, entry in enumerate(pkv):
        for u, arr in enumerate(entry):
            row = (2 * s * layer + u) % (2 * layers)  # S = 2 reads the duplicated row list
            assert arr.shape == (batch, heads, t, d)
            for h in range(heads):
                for e in range(d):
                    np.testing.assert_array_equal(arr[:, h, :, e], np.broadcast_to(table[:, (row * heads + h) * d + e],
                                                                                  (batch, t)))


def _attention_reference(q, k, v, mask):
    """Plain float64 attention with keys already repeated per query head."""
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v


@given(seed=st.integers(0, 2**31 - 1), group=st.sampled_from([1, 2]), causal=st.booleans(),
       prefix=st.integers(0, 3), masked=st.booleans())
def test_attention_matches_the_textbook_formula(xp, seed, group, causal, prefix, masked):
    rng = np.random.default_rng(seed)
    b, hkv, lq, d = 2, 2, 4, 3
    hq = hkv * group
    q = rng.standard_normal((b, hq, lq, d))
    k, v = rng.standard_normal((b, hkv, lq, d)), rng.standard_normal((b, hkv, lq, d))
    pk, pv = rng.standard_normal((b, hkv, prefix, d)), rng.standard_normal((b, hkv, prefix, d))
    am = np.ones((b, lq), dtype=np.int64)
    if masked:
        am[0, 0] = 0
    out = prefix_tuning.scaled_dot_product_attention(
        to_xp(xp, q), to_xp(xp, k), to_xp(xp, v), prefix=(to_xp(xp, pk), to_xp(xp, pv)) if prefix else None,
        attention_mask=to_xp(xp, am), causal=causal)
    assert_same_namespace(xp, out)
    kk = np.repeat(np.concatenate([pk, k], 2), group, axis=1)
    vv = np.repeat(np.concatenate([pv, v], 2), group, axis=1)
    lk = prefix + lq
    mask = np.ones((b, 1, lq, lk), dtype=bool)
    if causal:
        mask &= np.arange(lk)[None, :] <= (np.arange(lq)[:, None] + prefix)
    mask &= np.concatenate([np.ones((b, prefix), bool), am.astype(bool)], 1)[:, None, None, :]
    np.testing.assert_allclose(to_np(out), _attention_reference(q, kk, vv, mask), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_p_tuning_encoder_on_every_backend(xp, kind):
    cfg = p_tuning.PromptEncoderConfig(num_virtual_tokens=3, token_dim=6, encoder_hidden_size=5,
                                       encoder_reparameterization_type=kind, encoder_num_layers=2)
    host = p_tuning.init_encoder(cfg, seed=1)
    ref = np.asarray(p_tuning.encode({k: np.asarray(v, np.float64) for k, v in host.items()}, cfg))
    params = {k: to_xp(xp, np.asarray(v), xp.float32) for k, v in host.items()}
    out = p_tuning.encode(params, cfg)
    assert_same_namespace(xp, out)
    assert out.shape == (3, 6)
    np.testing.assert_allclose(to_np(out), ref, rtol=1e-5, atol=1e-5)


def test_lstm_single_step_is_the_cell_equation():
    """One token, one layer: h = o·tanh(i·g) from the gate pre-activations (c0 = h0 = 0)."""
    cfg = p_tuning.PromptEncoderConfig(num_virtual_tokens=1, token_dim=2, encoder_hidden_size=3,
                                       encoder_reparameterization_type="LSTM", encoder_num_layers=1)
    p = {k: np.asarray(v, np.float64) for k, v in p_tuning.init_encoder(cfg, seed=2).items()}
    x = p["embedding.weight"]
    out = p_tuning.lstm(x[None], p, num_layers=1, hidden=3)[0, 0]
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    for suffix, half in (("l0", out[:3]), ("l0_reverse", out[3:])):
        g = x[0] @ p[f"lstm_head.weight_ih_{suffix}"].T + p[f"lstm_head.bias_ih_{suffix}"] + p[f"lstm_head.bias_hh_{suffix}"]
        i, gg, o = sig(g[:3]), np.tanh(g[6:9]), sig(g[9:])
        np.testing.assert_allclose(half, o * np.tanh(i * gg), rtol=1e-12)


def test_prompt_initialisations():
    cfg = prompt_tuning.PromptTuningConfig(num_virtual_tokens=3, token_dim=4, num_transformer_submodules=2,
                                           prompt_tuning_init="TEXT")
    vocab = np.arange(40.0).reshape(10, 4)
    table = np.asarray(prompt_tuning.init_prompt(cfg, word_embeddings=vocab, token_ids=[7, 2, 9, 1]))
    np.testing.assert_array_equal(table, vocab[[7, 2, 9, 1, 7, 2]])   # T·S = 6: repeated, then truncated
    with pytest.raises(ShapeError, match="outside the vocabulary"):
        prompt_tuning.init_prompt(cfg, word_embeddings=vocab, token_ids=[3, 10])
    sample = prompt_tuning.PromptTuningConfig(num_virtual_tokens=5, token_dim=4, prompt_tuning_init="SAMPLE_VOCAB")
    rows = np.asarray(prompt_tuning.init_prompt(sample, word_embeddings=vocab, seed=0))
    assert all(any((vocab == r).all(1)) for r in rows)
    rand = prompt_tuning.PromptTuningConfig(num_virtual_tokens=5, token_dim=4)
    a, b = (np.asarray(prompt_tuning.init_prompt(rand, seed=s)) for s in (0, 0))
    np.testing.assert_array_equal(a, b)


def test_prepend_and_seq2seq_split(xp):
    prompt = to_xp(xp, np.arange(12.0).reshape(6, 2))
    embeds = to_xp(xp, np.zeros((2, 3, 2)))
    enc, dec = prompt_tuning.split_seq2seq(prompt, 3)
    e, m, lab = prompt_tuning.prepend(enc, embeds, attention_mask=to_xp(xp, np.ones((2, 3), np.int64)),
                                      labels=to_xp(xp, np.full((2, 3), 5, np.int64)))
    assert_same_namespace(xp, e, m, lab)
    assert e.shape == (2, 6, 2) and to_np(dec).tolist() == [[6, 7], [8, 9], [10, 11]]
    assert to_np(lab)[0].tolist() == [-100, -100, -100, 5, 5, 5] and to_np(m).min() == 1


def test_bad_inputs():
    with pytest.raises(ConfigError, match="divisible"):
        _prefix_cfg(2, 10, 2, 3).validate()
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        prompt_tuning.PromptTuningConfig.from_dict({"peft_type": "PROMPT_TUNING"})
    with pytest.raises(ConfigError, match="prompt_tuning_init"):
        prompt_tuning.PromptTuningConfig.from_dict({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2,
                                                    "prompt_tuning_init": "WORDS"})
    cfg = _prefix_cfg(2, 4, 2, 2)
    with pytest.raises(ShapeError, match="prompt_embeddings"):
        prefix_tuning.past_key_values(np.zeros((2, 15)), cfg, 1)


def test_adapter_api_for_prompt_methods(tmp_path):
    cfg = _prefix_cfg(2, 4, 3, 2, prefix_projection=True, encoder_hidden_size=5)
    table = np.asarray(prefix_tuning.encode(prefix_tuning.init_prefix(cfg, seed=0), cfg))
    ad = Adapter(cfg, {}, shared={"prompt_embeddings": table})
    pm.save_adapter(ad, tmp_path)
    back = pm.load_adapter(tmp_path)
    np.testing.assert_array_equal(np.asarray(back.prompt_embeddings()), table)
    assert len(back.past_key_values(3)) == 3
    with pytest.raises(UnsupportedError, match="virtual tokens"):
        back.merge({})
    zero = _prefix_cfg(2, 4, 3, 2, init_weights="zero")
    assert not np.asarray(prefix_tuning.init_prefix(zero)["embedding.weight"]).any()
