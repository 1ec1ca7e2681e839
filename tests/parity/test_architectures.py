"""Architecture coverage: tiny transformers models (random weights from a config, no download), saved
in several safetensors shards with save_pretrained.

For each family:

* an adapter created by peftmath from the saved folder loads in PEFT (PeftModel.from_pretrained) and
  the merged weights peftmath computes give PEFT's outputs;
* an adapter created by PEFT (its default targets, plus a DoRA and an rsLoRA variant), loaded by
  peftmath and merged into the saved shards, equals PEFT's merge_and_unload.

The README's architecture table records these results.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import require_peft

torch, peft = require_peft()
transformers = pytest.importorskip("transformers")

import peftmath as pm  # noqa: E402
from peftmath.create import create_adapter, open_state  # noqa: E402

_LM = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4)
#: family -> (config class, model class, config fields, explicit targets when PEFT has no default, input kind)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_LM, num_key_value_heads=2), None, "ids"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_LM, num_key_value_heads=2), None, "ids"),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                          num_attention_heads=4), None, "ids"),
    "bert": ("BertConfig", "BertModel", dict(_LM), None, "ids"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(_LM, num_key_value_heads=2), None, "ids"),
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                                          num_heads=4), None, "seq2seq"),
    "resnet": ("ResNetConfig", "ResNetModel", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                   layer_type="basic"), r".*convolution", "image"),
    "mpt": ("MptConfig", "MptForCausalLM", dict(vocab_size=64, d_model=16, n_layers=2, n_heads=4, expansion_ratio=2),
            None, "ids"),
    "blip": ("BlipConfig", "BlipForConditionalGeneration",
             dict(text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, encoder_hidden_size=16),
                  vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     image_size=28, patch_size=14), projection_dim=16),
             ["query", "value", "qkv"], "blip"),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(vocab_size=64, n_embd=16, n_layer=2, n_head=4,
                                                                       n_positions=32), None, "ids"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(_LM, num_key_value_heads=2),
                   ["q_proj", "v_proj", "c_fc"], "ids"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=32),
             None, "ids"),
    # transformers 5 saves Dinov2's attention under other names (attention.attention.query is the module
    # attention.q_proj): peftmath maps them (peftmath.targets.CHECKPOINT_RENAMES)
    "dinov2": ("Dinov2Config", "Dinov2Model", dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=32, image_size=28, patch_size=14),
               ["q_proj", "v_proj", "o_proj", "fc1"], "dinov2"),
}


def _build(family: str):
    cfg_cls, model_cls, fields, targets, inputs = FAMILIES[family]
    if not hasattr(transformers, cfg_cls) or not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**fields)).eval()
    return model, targets, inputs


def _inputs(kind: str):
    g = torch.Generator().manual_seed(1)
    if kind == "ids":
        return {"input_ids": torch.randint(0, 64, (1, 7), generator=g)}
    if kind == "seq2seq":
        return {"input_ids": torch.randint(0, 64, (1, 7), generator=g),
                "decoder_input_ids": torch.randint(0, 64, (1, 5), generator=g)}
    if kind == "blip":
        return {"input_ids": torch.randint(0, 64, (1, 7), generator=g),
                "pixel_values": torch.randn(1, 3, 28, 28, generator=g)}
    if kind == "dinov2":
        return {"pixel_values": torch.randn(1, 3, 28, 28, generator=g)}
    return {"pixel_values": torch.randn(1, 3, 32, 32, generator=g)}


def _output(model, kind: str) -> np.ndarray:
    with torch.no_grad():
        out = model(**_inputs(kind))
    t = getattr(out, "logits", None)
    if t is None:
        t = out.last_hidden_state
    return t.detach().numpy()


def _save(model, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, max_shard_size="20KB")


def _load_merged(family: str, merged: dict) -> "torch.nn.Module":
    """A fresh model with the merged checkpoint tensors (under the model's own module names)."""
    from peftmath.targets import checkpoint_to_module

    model, _, _ = _build(family)
    model_type = model.config.model_type

    def rename(key: str) -> str:
        module, _, leaf = key.rpartition(".")
        return f"{checkpoint_to_module(module, model_type)}.{leaf}"

    missing, unexpected = model.load_state_dict({rename(k): torch.tensor(np.asarray(v)) for k, v in merged.items()},
                                                strict=False)
    assert not unexpected, unexpected
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_peftmath_adapter_loads_in_peft(tmp_path, family):
    model, targets, inputs = _build(family)
    _save(model, tmp_path / "base")
    state, model_type = open_state(tmp_path / "base")
    cfg = pm.LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False)
    ad = create_adapter(tmp_path / "base", cfg, seed=5)
    pm.save_adapter(ad, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(model, tmp_path / "adapter")
    expected = _output(loaded, inputs)
    merged = _load_merged(family, ad.merge(state))
    np.testing.assert_allclose(_output(merged, inputs), expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("variant", ["lora", "dora", "rslora"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_adapter_merges_like_merge_and_unload(tmp_path, family, variant):
    model, targets, inputs = _build(family)
    _save(model, tmp_path / "base")
    torch.manual_seed(2)
    cfg = peft.LoraConfig(r=4, lora_alpha=5, target_modules=targets, init_lora_weights=False,
                          use_dora=variant == "dora", use_rslora=variant == "rslora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, cfg)
        peft_model.save_pretrained(tmp_path / "adapter")
        reference = peft_model.merge_and_unload()
    _save(reference, tmp_path / "merged_by_peft")
    ref_state, _ = open_state(tmp_path / "merged_by_peft")
    state, model_type = open_state(tmp_path / "base")
    ad = pm.load_adapter(tmp_path / "adapter")
    kinds = None
    if model_type == "gpt2":  # GPT-2's square Conv1D layers: the architecture says so, not the shapes
        from peftmath.targets import module_kinds

        kinds = {m: k for m, k in module_kinds(state, model_type=model_type).items() if m in ad.params}
    ad.model_type = model_type  # checkpoint names where transformers renames modules (Dinov2)
    merged = ad.merge(state, layer_kinds=kinds)
    assert set(merged) == set(ref_state)
    for key, value in merged.items():
        np.testing.assert_allclose(np.asarray(value, dtype=np.float64), np.asarray(ref_state[key], dtype=np.float64),
                                   rtol=1e-5, atol=1e-5, err_msg=key)
    # the same through the command line, streamed over the shards (the model type comes from config.json)
    from peftmath.cli import main

    layer_kind_args = [a for m, k in (kinds or {}).items() for a in ("--layer-kind", f"{m}={k.value}")]
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), "-o", str(tmp_path / "merged"), "-q",
                 *layer_kind_args]) == 0
    streamed, _ = open_state(tmp_path / "merged")
    assert set(streamed) == set(ref_state)
    for key, value in streamed.items():
        np.testing.assert_allclose(np.asarray(value, dtype=np.float64), np.asarray(ref_state[key], dtype=np.float64),
                                   rtol=1e-5, atol=1e-5, err_msg=key)
