"""PEFT parity of prompt tuning, P-tuning and prefix tuning on a tiny Llama (grouped-query attention).

The model is built from a config with random weights (no download). Checked: the sizes PEFT fills in
from the model config, the saved prompt_embeddings, the P-tuning encoder outputs (MLP and LSTM) from
PEFT's own parameters, past_key_values, the logits with a soft prompt prepended, and the reference
attention against Llama's own attention layer with a prefix in its cache.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import require_peft

torch, peft = require_peft()
transformers = pytest.importorskip("transformers")

import peftmath as pm  # noqa: E402
from peftmath.io import config_from_dict  # noqa: E402
from peftmath.methods import p_tuning, prefix_tuning, prompt_tuning  # noqa: E402


def _llama(seq2seq: bool = False):
    torch.manual_seed(0)
    if seq2seq:
        cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4)
        return transformers.T5ForConditionalGeneration(cfg).eval()
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def _peft(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def _np(t) -> np.ndarray:
    return t.detach().numpy()


def _ours(peft_model, method_cls, model):
    """peftmath's config from the same fields, resolved against the model config as PEFT does."""
    raw = {k: (v.value if hasattr(v, "value") else v) for k, v in vars(peft_model.peft_config["default"]).items()}
    for k in ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
        raw.pop(k, None)
    return method_cls.from_dict(raw).resolve(model.config.to_dict())


@pytest.mark.parametrize("peft_cls,ours_cls,extra", [
    ("PromptTuningConfig", prompt_tuning.PromptTuningConfig, {}),
    ("PromptEncoderConfig", p_tuning.PromptEncoderConfig, {}),
    ("PrefixTuningConfig", prefix_tuning.PrefixTuningConfig, {}),
    ("PrefixTuningConfig", prefix_tuning.PrefixTuningConfig, {"prefix_projection": True}),
])
@pytest.mark.parametrize("seq2seq", [False, True])
def test_sizes_filled_from_the_model_config_match_peft(peft_cls, ours_cls, extra, seq2seq):
    model = _llama(seq2seq)
    task = "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"
    pm_ = _peft(model, getattr(peft, peft_cls)(task_type=task, num_virtual_tokens=3, **extra))
    theirs = pm_.peft_config["default"]
    ours = ours_cls(task_type=task, num_virtual_tokens=3, **extra).resolve(model.config.to_dict())
    for field in ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
        assert getattr(ours, field) == getattr(theirs, field), field
    if hasattr(ours, "encoder_hidden_size"):
        assert ours.encoder_hidden_size == theirs.encoder_hidden_size


def test_prompt_tuning_checkpoint_and_logits(tmp_path):
    model = _llama()
    pm_ = _peft(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    pm_.save_pretrained(tmp_path)
    ad = pm.load_adapter(tmp_path)
    prompt = np.asarray(ad.prompt_embeddings())
    np.testing.assert_array_equal(prompt, _np(pm_.get_prompt_embedding_to_save("default")))
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        expected = _np(pm_(input_ids=ids, attention_mask=mask).logits)
        embeds = _np(model.get_input_embeddings()(ids))
    e, m, _ = prompt_tuning.prepend(prompt, embeds, attention_mask=_np(mask))
    with torch.no_grad():
        got = _np(model(inputs_embeds=torch.tensor(e), attention_mask=torch.tensor(m)).logits)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # a round trip through peftmath's writer loads back in PEFT with the same prompt
    pm.save_adapter(ad, tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(_llama(), tmp_path / "again")
    np.testing.assert_array_equal(_np(reloaded.get_prompt_embedding_to_save("default")), prompt)


def test_sample_vocab_rows_come_from_the_vocabulary():
    model = _llama()
    pm_ = _peft(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                               prompt_tuning_init="SAMPLE_VOCAB"))
    vocab = _np(model.get_input_embeddings().weight)
    ours = _ours(pm_, prompt_tuning.PromptTuningConfig, model)
    for table in (_np(pm_.get_prompt_embedding_to_save("default")),
                  np.asarray(prompt_tuning.init_prompt(ours, word_embeddings=vocab, seed=3))):
        assert all(np.any(np.all(vocab == row, axis=1)) for row in table)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_p_tuning_encoder_matches_peft(tmp_path, kind):
    model = _llama()
    pm_ = _peft(model, peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=12,
                                                encoder_reparameterization_type=kind))
    encoder = pm_.prompt_encoder["default"]
    params = {k: _np(v) for k, v in encoder.state_dict().items()}
    ours = _ours(pm_, p_tuning.PromptEncoderConfig, model)
    got = np.asarray(p_tuning.encode(params, ours))
    with torch.no_grad():
        expected = _np(encoder(torch.arange(5)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    pm_.save_pretrained(tmp_path)
    np.testing.assert_allclose(np.asarray(pm.load_adapter(tmp_path).prompt_embeddings()), got, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("seq2seq", [False, True])
def test_prefix_past_key_values_match_peft(tmp_path, projection, seq2seq):
    model = _llama(seq2seq)
    task = "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"
    pm_ = _peft(model, peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3, prefix_projection=projection))
    ours = _ours(pm_, prefix_tuning.PrefixTuningConfig, model)
    params = {k: _np(v) for k, v in pm_.prompt_encoder["default"].state_dict().items()}
    table = np.asarray(prefix_tuning.encode(params, ours))
    with torch.no_grad():
        cache = pm_.get_prompt(2)
    self_cache = cache.self_attention_cache if seq2seq else cache
    pkv = prefix_tuning.past_key_values(table, ours, 2)
    for layer, entries in enumerate(pkv):
        np.testing.assert_allclose(np.asarray(entries[0]), _np(self_cache.layers[layer].keys), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(entries[1]), _np(self_cache.layers[layer].values), rtol=1e-6, atol=1e-6)
    pm_.save_pretrained(tmp_path)
    ad = pm.load_adapter(tmp_path)
    np.testing.assert_allclose(np.asarray(ad.prompt_embeddings()), table, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ad.past_key_values(2)[1][0]), np.asarray(pkv[1][0]), rtol=1e-6, atol=1e-6)


def test_reference_attention_matches_llama_attention_with_prefix():
    """Llama's layer-0 attention (GQA, 4 query heads on 2 key/value heads) with PEFT's prefix in the
    cache, against peftmath's reference attention on the same projected, rotated q / k / v."""
    from transformers.cache_utils import DynamicCache

    model = _llama()
    pm_ = _peft(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ours = _ours(pm_, prefix_tuning.PrefixTuningConfig, model)
    table = _np(pm_.prompt_encoder["default"].embedding.weight)
    (pk, pv), _ = prefix_tuning.past_key_values(table, ours, 2)
    attn = model.model.layers[0].self_attn
    t, length = 3, 5
    h = torch.randn(2, length, 16, generator=torch.Generator().manual_seed(4))
    pos = torch.arange(t, t + length)[None, :].expand(2, -1)
    cos, sin = model.model.rotary_emb(h, pos)
    for with_prefix in (False, True):
        cache = DynamicCache()
        if with_prefix:
            cache.update(torch.tensor(np.asarray(pk)), torch.tensor(np.asarray(pv)), 0)
        lk = length + (t if with_prefix else 0)
        keep = torch.arange(lk)[None, :] <= (torch.arange(length)[:, None] + lk - length)
        mask = torch.zeros(2, 1, length, lk).masked_fill(~keep, float("-inf"))
        with torch.no_grad():
            expected, _ = attn(hidden_states=h, position_embeddings=(cos, sin), attention_mask=mask,
                               past_key_values=cache)
            q = attn.q_proj(h).view(2, length, 4, 4).transpose(1, 2)
            k = attn.k_proj(h).view(2, length, 2, 4).transpose(1, 2)
            v = attn.v_proj(h).view(2, length, 2, 4).transpose(1, 2)
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out = prefix_tuning.scaled_dot_product_attention(
            _np(q), _np(k), _np(v), prefix=(np.asarray(pk), np.asarray(pv)) if with_prefix else None, causal=True)
        got = np.asarray(out).transpose(0, 2, 1, 3).reshape(2, length, 16) @ _np(attn.o_proj.weight).T
        np.testing.assert_allclose(got, _np(expected), rtol=1e-5, atol=1e-6)


def test_checkpoint_shape_disagreeing_with_config_is_refused(tmp_path):
    model = _llama()
    pm_ = _peft(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    pm_.save_pretrained(tmp_path)
    import json

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["num_virtual_tokens"] = 5
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(pm.errors.ShapeError, match="prompt_embeddings"):
        pm.load_adapter(tmp_path)
    assert config_from_dict(cfg).num_virtual_tokens == 5
