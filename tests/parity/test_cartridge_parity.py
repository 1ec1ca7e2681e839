"""PEFT 0.21.2 parity of CARTRIDGE on a tiny Llama (grouped-query attention) and a tiny T5.

Built from configs with random weights (no download). Checked: the sizes PEFT fills in, the saved table
(frozen rows first), past_key_values against PEFT's get_prompt cache, the logits of the base model given
peftmath's cache against the PEFT model's, the trainable count, the table of a real cache against PEFT's
prompt_embeddings_from_past_key_values, composition against compose_cartridge_adapters, and peftmath's
checkpoint loaded by PeftModel.from_pretrained.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import require_peft, t2n

torch, peft = require_peft()
transformers = pytest.importorskip("transformers")

import peftmath as pm
from peftmath.methods import cartridge
from tests.parity.test_prompt_parity import _llama as _model
from tests.parity.test_prompt_parity import _ours as _resolved


def _peft(model, **kw):
    task = kw.pop("task_type", "CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm_ = peft.get_peft_model(model, peft.CartridgeConfig(task_type=task, **kw))
    enc = pm_.prompt_encoder["default"]
    with torch.no_grad():  # a trained-looking table: not PEFT's N(0, 1) draw
        for p in (enc.frozen_embedding, enc.trainable_embedding):
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    return pm_


def _ours(peft_model, model):
    return _resolved(peft_model, cartridge.CartridgeConfig, model)


def _logits_with_cache(model, pkv, ids, mask):
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(pkv):
        cache.update(torch.tensor(np.asarray(k)), torch.tensor(np.asarray(v)), layer)
    t = pkv[0][0].shape[2]
    full = torch.cat([torch.ones(mask.shape[0], t, dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        return t2n(model(input_ids=ids, attention_mask=full, past_key_values=cache).logits)


@pytest.mark.parametrize("frozen", [0, 1, 3])
def test_table_cache_logits_and_count_match_peft(tmp_path, frozen):
    model = _model()
    pm_ = _peft(model, num_virtual_tokens=3, num_frozen_tokens=frozen)
    ours = _ours(pm_, model)
    saved = pm_.peft_config["default"]
    assert (ours.token_dim, ours.num_attention_heads, ours.num_layers) == (saved.token_dim, saved.num_attention_heads,
                                                                           saved.num_layers) == (8, 2, 2)
    assert cartridge.trainable_parameters(ours) == pm_.get_nb_trainable_parameters()[0] == (3 - frozen) * 32
    pm_.save_pretrained(tmp_path)
    ad = pm.load_adapter(tmp_path)
    table = np.asarray(ad.prompt_embeddings())
    enc = pm_.prompt_encoder["default"]
    f, tr = cartridge.split_frozen(table, ours)
    np.testing.assert_array_equal(tr, t2n(enc.trainable_embedding))
    if frozen:
        np.testing.assert_array_equal(f, t2n(enc.frozen_embedding))
    with torch.no_grad():
        peft_cache = pm_.get_prompt(2)
    pkv = ad.past_key_values(2)
    for layer, (k, v) in enumerate(pkv):
        np.testing.assert_array_equal(np.asarray(k), t2n(peft_cache.layers[layer].keys))
        np.testing.assert_array_equal(np.asarray(v), t2n(peft_cache.layers[layer].values))
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row
    with torch.no_grad():
        expected = t2n(pm_(input_ids=ids, attention_mask=mask).logits)
    got = _logits_with_cache(pm_.get_base_model(), pkv, ids, mask)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # peftmath writes -> PEFT loads the same table and gives the same logits
    pm.save_adapter(ad, tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(_model(), tmp_path / "again")
    np.testing.assert_array_equal(t2n(reloaded.get_prompt_embedding_to_save("default")), table)
    with torch.no_grad():
        np.testing.assert_allclose(t2n(reloaded(input_ids=ids, attention_mask=mask).logits), expected,
                                   rtol=1e-6, atol=1e-6)


def test_encoder_decoder_cache_matches_peft():
    model = _model(seq2seq=True)
    pm_ = _peft(model, num_virtual_tokens=3, task_type="SEQ_2_SEQ_LM")
    ours = _ours(pm_, model)
    table = t2n(pm_.get_prompt_embedding_to_save("default"))
    with torch.no_grad():
        cache = pm_.get_prompt(2).self_attention_cache
    for layer, entries in enumerate(cartridge.past_key_values(table, ours, 2)):
        assert len(entries) == 4
        np.testing.assert_array_equal(np.asarray(entries[0]), t2n(cache.layers[layer].keys))
        np.testing.assert_array_equal(np.asarray(entries[1]), t2n(cache.layers[layer].values))


def test_table_from_a_real_cache_matches_peft():
    model = _model()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    layers = [(t2n(layer.keys), t2n(layer.values)) for layer in out.past_key_values.layers]
    expected = t2n(peft.prompt_embeddings_from_past_key_values(out.past_key_values, num_virtual_tokens=4))
    np.testing.assert_array_equal(np.asarray(cartridge.table_from_past_key_values(layers, 4)), expected)
    # and PEFT's initializer loads exactly that table into a cartridge
    pm_ = _peft(_model(), num_virtual_tokens=4)
    peft.initialize_kv_prefix_from_past_key_values(pm_, past_key_values=out.past_key_values)
    np.testing.assert_array_equal(t2n(pm_.get_prompt_embedding_to_save("default")), expected)


def test_compose_matches_peft(tmp_path):
    dirs = []
    for i, t in enumerate((2, 3)):
        pm_ = _peft(_model(), num_virtual_tokens=t, num_frozen_tokens=i + 1)
        pm_.save_pretrained(tmp_path / str(i))
        dirs.append(tmp_path / str(i))
    peft.compose_cartridge_adapters(dirs, output_path=tmp_path / "both")
    ads = [pm.load_adapter(d) for d in dirs]
    cfg, table = cartridge.compose([a.config for a in ads], [np.asarray(a.prompt_embeddings()) for a in ads])
    theirs = pm.load_adapter(tmp_path / "both")
    np.testing.assert_array_equal(table, np.asarray(theirs.prompt_embeddings()))
    assert (cfg.num_virtual_tokens, cfg.num_frozen_tokens) == (theirs.config.num_virtual_tokens,
                                                               theirs.config.num_frozen_tokens) == (5, 1)


def test_inspect_counts_what_peft_trains(tmp_path):
    """``peftmath inspect`` and ``Adapter.num_trainable_parameters`` leave the frozen rows out, as PEFT does."""
    from peftmath.inspect import inspect_adapter

    pmodel = _peft(_model(), num_virtual_tokens=4, num_frozen_tokens=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel.save_pretrained(tmp_path)
    want = pmodel.get_nb_trainable_parameters()[0]
    assert pm.load_adapter(tmp_path).num_trainable_parameters() == want
    assert inspect_adapter(tmp_path)["trainable_parameters"] == want
