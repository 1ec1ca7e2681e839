"""PEFT parity of module selection and adapter creation (peftmath.targets, peftmath.create_adapter).

Tiny transformers models are built from configs with random weights (no download); the same config
is given to PEFT's get_peft_model and to peftmath.create_adapter on the model's state dict.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.parity.conftest import base_state, peft_layer, require_peft

torch, peft = require_peft()
transformers = pytest.importorskip("transformers")

import peftmath as pm  # noqa: E402
from peftmath import _peft_tables  # noqa: E402
from peftmath.create import create_adapter  # noqa: E402
from peftmath.io import save_adapter  # noqa: E402


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval(), "llama"


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval(), "gpt2"  # eval: no dropout


def test_default_tables_match_peft():
    from peft.utils import constants as c

    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    assert _peft_tables.LORA_FAMILY == c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    for name in ("LOHA", "LOKR", "OFT", "BOFT", "VERA", "ADALORA", "IA3"):
        assert _peft_tables.default_targets(name) == getattr(c, f"TRANSFORMERS_MODELS_TO_{name}_TARGET_MODULES_MAPPING")
    assert _peft_tables.IA3_FEEDFORWARD == c.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
    # every tuner's own table (its target_module_mapping), the types without one have none
    for peft_type, tuner in PEFT_TYPE_TO_TUNER_MAPPING.items():
        want = getattr(tuner, "target_module_mapping", None)
        if peft_type.value != "IA3":
            assert _peft_tables.default_targets(peft_type.value) == (want or {}), peft_type.value


CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules="all-linear"),
    dict(target_modules=r".*\.(k_proj|down_proj)"),
    dict(target_modules=["q_proj", "k_proj", "mlp.up_proj"], exclude_modules=["k_proj"]),
    dict(target_modules="all-linear", exclude_modules=r".*layers\.1\..*"),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2]),
    dict(target_modules=["q_proj", "o_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=None),
    dict(target_modules=["q_proj", "v_proj"], rank_pattern={"layers.0.self_attn.q_proj": 4, "v_proj": 3},
         alpha_pattern={r"layers\.\d\.self_attn\.q_proj": 7}),
    dict(target_modules=["q_proj", "embed_tokens"]),
]


@pytest.mark.parametrize("fields", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_llama_selection_and_counts_match_peft(fields):
    model, model_type = _llama()
    state = base_state(model)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=5, **fields))
    expected = set(peft_model.targeted_module_names)
    ad = create_adapter(state, pm.LoraConfig(r=2, lora_alpha=5, **fields), model_type=model_type)
    assert set(ad.modules) == expected
    assert ad.num_trainable_parameters() == peft_model.get_nb_trainable_parameters()[0]
    for name in ad.modules:  # the resolved r and alpha per module
        layer = peft_layer(peft_model, name)
        assert ad.config.rank_and_alpha(name) == (layer.r["default"], layer.lora_alpha["default"])
        assert ad.config.scaling_for(name) == pytest.approx(layer.scaling["default"])


def test_gpt2_conv1d_all_linear_matches_peft_and_loads():
    model, model_type = _gpt2()
    state = base_state(model)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=3, target_modules="all-linear"))
    ad = create_adapter(state, pm.LoraConfig(r=2, lora_alpha=3, target_modules="all-linear", init_lora_weights=False),
                        model_type=model_type)
    assert set(ad.modules) == set(peft_model.targeted_module_names)


@pytest.mark.parametrize("builder", [_llama, _gpt2])
@pytest.mark.parametrize("use_dora", [False, True])
def test_created_adapter_loads_in_peft_with_same_outputs(tmp_path, builder, use_dora):
    model, model_type = builder()
    state = base_state(model)
    cfg = pm.LoraConfig(r=4, lora_alpha=6, target_modules="all-linear", init_lora_weights=False, use_dora=use_dora,
                        use_rslora=not use_dora)
    ad = create_adapter(state, cfg, model_type=model_type, seed=3)
    save_adapter(ad, tmp_path / "ad")
    loaded = peft.PeftModel.from_pretrained(model, tmp_path / "ad")
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        adapted = loaded(ids).logits.numpy()
        merged_peft = {k: v.numpy() for k, v in loaded.merge_and_unload().state_dict().items()}
    merged = ad.merge(state)  # square GPT-2 Conv1D layers: the adapter knows their kind from create_adapter
    for key in ad.modules:
        np.testing.assert_allclose(merged[f"{key}.weight"], merged_peft[f"{key}.weight"], rtol=1e-5, atol=1e-5)
    ad2 = pm.load_adapter(tmp_path / "ad")  # the layer kinds travel in the safetensors metadata
    assert ad2.layer_kinds == ad.layer_kinds
    reloaded = ad2.merge(state)
    for key in ad.modules:
        np.testing.assert_array_equal(reloaded[f"{key}.weight"], merged[f"{key}.weight"])
    model2, _ = builder()
    model2.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in merged.items()}, strict=False)
    with torch.no_grad():
        np.testing.assert_allclose(model2(ids).logits.numpy(), adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_changing_inits_match_peft(init):
    model, model_type = _llama()
    state = base_state(model)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                            init_lora_weights=init))
    ad, new_base = create_adapter(state, pm.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                       init_lora_weights=init), return_base=True)
    for name in ad.modules:
        layer = peft_layer(peft_model, name)
        np.testing.assert_allclose(new_base[f"{name}.weight"], layer.base_layer.weight.detach().numpy(), atol=2e-5)
        ours = np.asarray(ad.delta_weight(name))
        np.testing.assert_allclose(ours, layer.get_delta_weight("default").detach().numpy(), atol=2e-5)


def test_trainable_parameters_line_matches_peft():
    model, model_type = _llama()
    state = base_state(model)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=3, target_modules=["q_proj", "down_proj"]))
    trainable, total = peft_model.get_nb_trainable_parameters()
    ad = create_adapter(state, pm.LoraConfig(r=3, target_modules=["q_proj", "down_proj"]), model_type=model_type)
    s = ad.summary(state)
    assert (s["trainable"], s["total"]) == (trainable, total - _tied(model))
    assert all(row["r"] == 3 for row in s["modules"])


def _tied(model) -> int:
    """Parameters PEFT counts once but a state dict lists twice (tied input/output embeddings)."""
    return sum(v.numel() for v in model.state_dict().values()) - sum(p.numel() for p in model.parameters())
