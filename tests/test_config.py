"""peftmath.config and LoraConfig: round trips, validation, PEFT's pattern rule, scaling."""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peftmath.config import get_pattern_key, resolve_pattern
from peftmath.errors import ConfigError, PeftMathWarning
from peftmath.methods.lora import LoraConfig, scaling


def test_round_trip_keeps_unknown_fields():
    data = {
        "peft_type": "LORA", "r": 4, "lora_alpha": 12, "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3.5}, "use_rslora": True,
        "megatron_config": None, "eva_config": {"rho": 2.0}, "future_field": [1, 2, {"x": "y"}],
        "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny",
    }
    with pytest.warns(PeftMathWarning, match="unknown field 'future_field'"):
        cfg = LoraConfig.from_dict(data)
    assert cfg.r == 4 and cfg.lora_alpha == 12 and cfg.use_rslora is True
    assert cfg.extra["future_field"] == [1, 2, {"x": "y"}] and cfg.extra["eva_config"] == {"rho": 2.0}
    out = cfg.to_dict()
    for k, v in data.items():
        assert out[k] == v, k
    # through JSON and back: identical
    with pytest.warns(PeftMathWarning):
        again = LoraConfig.from_dict(json.loads(json.dumps(out)))
    assert again.to_dict() == out
    assert again == cfg


def test_defaults_are_peft_defaults():
    cfg = LoraConfig()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias, cfg.init_lora_weights) == (8, 8, 0.0, "none", True)
    assert cfg.to_dict()["peft_type"] == "LORA"
    peft = pytest.importorskip("peft")
    ref = peft.LoraConfig()
    for name in ("r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "init_lora_weights",
                 "use_dora", "lora_bias", "rank_pattern", "alpha_pattern"):
        assert getattr(cfg, name) == getattr(ref, name), name


def test_sets_are_written_as_sorted_lists():
    cfg = LoraConfig(target_modules={"v_proj", "q_proj"})
    assert cfg.to_dict()["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("changes,field", [
    ({"r": 0}, "'r'"),
    ({"r": -3}, "'r'"),
    ({"r": 2.0}, "'r'"),
    ({"r": True}, "'r'"),
    ({"lora_alpha": "8"}, "'lora_alpha'"),
    ({"lora_dropout": 1.0}, "'lora_dropout'"),
    ({"init_lora_weights": "kaiming"}, "'init_lora_weights'"),
    ({"init_lora_weights": "pissa_niter_"}, "'init_lora_weights'"),
    ({"init_lora_weights": 1}, "'init_lora_weights'"),
    ({"lora_bias": True, "use_dora": True}, "lora_bias"),
    ({"lora_bias": True, "init_lora_weights": "pissa"}, "lora_bias"),
    ({"bias": "foo"}, "'bias'"),
    ({"use_rslora": "yes"}, "'use_rslora'"),
    ({"layers_pattern": "layers"}, "layers_pattern"),
    ({"target_modules": "q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern"),
    ({"inference_mode": "true"}, "'inference_mode'"),
    ({"init_lora_weights": "loftq"}, "loftq_config"),
])
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=re.escape(field)) as info:
        LoraConfig.from_dict({"peft_type": "LORA", **changes}, source="adapter_config.json")
    assert "adapter_config.json" in str(info.value)


def test_valid_strings():
    for init in ("gaussian", "pissa", "pissa_niter_4", "olora", "orthogonal"):
        LoraConfig.from_dict({"init_lora_weights": init})
    LoraConfig.from_dict({"layers_pattern": "layers", "layers_to_transform": [0, 1], "target_modules": ["q"]})


def test_wrong_peft_type_and_not_a_dict():
    with pytest.raises(ConfigError, match="'LOHA'"):
        LoraConfig.from_dict({"peft_type": "LOHA"})
    with pytest.raises(ConfigError, match="list"):
        LoraConfig.from_dict([1, 2])


def test_replace_validates():
    cfg = LoraConfig(r=4).replace(lora_alpha=16)
    assert cfg.scaling_for("x") == 4.0
    with pytest.raises(ConfigError, match="'r'"):
        LoraConfig().replace(r=0)


# --------------------------------------------------------------------------------------------------
# PEFT's pattern rule: first key k in insertion order with re.match(rf"(.*\.)?({k})$", name)
# --------------------------------------------------------------------------------------------------
def test_pattern_rule_examples():
    name = "model.layers.0.self_attn.q_proj"
    assert get_pattern_key(["q_proj"], name) == "q_proj"
    assert get_pattern_key(["proj"], name) is None  # must end at a dot boundary
    assert get_pattern_key(["_proj"], name) is None
    assert get_pattern_key(["self_attn.q_proj"], name) == "self_attn.q_proj"
    assert get_pattern_key([r"layers\.\d+\.self_attn\.q_proj"], name) == r"layers\.\d+\.self_attn\.q_proj"
    assert get_pattern_key(["q_proj", "layers.0.self_attn.q_proj"], name) == "q_proj"  # insertion order
    assert get_pattern_key(["layers.0.self_attn.q_proj", "q_proj"], name) == "layers.0.self_attn.q_proj"
    assert get_pattern_key(["q_proj|v_proj"], name) == "q_proj|v_proj"
    assert get_pattern_key(["model.layers.0.self_attn.q_proj"], name) == "model.layers.0.self_attn.q_proj"
    assert get_pattern_key([], name) is None
    assert resolve_pattern({"v_proj": 2, "q_proj": 16}, name, 8) == 16
    assert resolve_pattern({"v_proj": 2}, name, 8) == 8


@given(keys=st.lists(st.sampled_from(["q_proj", "proj", "0.q_proj", r"layers\.\d\.q_proj", "v_proj", "self_attn.v_proj",
                                      "layers", ".*proj", "q_proj|k_proj", "1.q_proj"]), max_size=5, unique=True),
       layer=st.integers(0, 2), leaf=st.sampled_from(["q_proj", "v_proj", "k_proj", "xq_proj"]))
def test_pattern_rule_matches_peft(keys, layer, leaf):
    name = f"model.layers.{layer}.self_attn.{leaf}"
    try:
        from peft.utils.other import get_pattern_key as peft_key
    except ImportError:  # pragma: no cover
        peft_key = None
    ours = get_pattern_key(keys, name)
    # independent restatement of the rule
    want = next((k for k in keys if re.match(rf"(.*\.)?({k})$", name)), None)
    assert ours == want
    if peft_key is not None:  # PEFT returns the module name itself when nothing matches
        assert peft_key(keys, name) == (name if want is None else want)


def test_rank_and_alpha_patterns():
    cfg = LoraConfig(r=8, lora_alpha=16, rank_pattern={"v_proj": 4, "layers.1.q_proj": 2},
                     alpha_pattern={"q_proj": 3})
    assert cfg.rank_and_alpha("model.layers.0.q_proj") == (8, 3)
    assert cfg.rank_and_alpha("model.layers.1.q_proj") == (2, 3)
    assert cfg.rank_and_alpha("model.layers.1.v_proj") == (4, 16)
    assert cfg.scaling_for("model.layers.1.q_proj") == 1.5
    assert cfg.scaling_for("model.layers.1.v_proj") == 4.0


@given(r=st.integers(1, 512), alpha=st.floats(0.125, 256))
def test_scaling_plain_and_rslora(r, alpha):
    assert scaling(alpha, r) == alpha / r
    assert scaling(alpha, r, use_rslora=True) == alpha / math.sqrt(r)
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=True)
    assert cfg.scaling_for("any") == alpha / math.sqrt(r)


def test_scaling_matches_peft_rslora():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = torch.nn.Sequential(torch.nn.Linear(6, 6))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["0"]))
    assert pm.base_model.model[0].scaling["default"] == scaling(6, 4, use_rslora=True) == 3.0


@pytest.mark.parametrize("r", [0, -1, 1.5, True, None])
def test_scaling_refuses_bad_rank(r):
    with pytest.raises(ConfigError, match="rank"):
        scaling(8, r)
