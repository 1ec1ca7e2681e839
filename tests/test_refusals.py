"""Understood or refused (design rule 9), NumPy only: every checkpoint tensor is the method's, shared,
or a base tensor the adapter replaces; every PEFT config field that changes the math is implemented or
refused by name; unknown fields warn (strict: an error); replaced tensors are checked, applied before
merging and never silently kept by an unmerge; tied embeddings are reported. The same with checkpoints
PEFT writes: tests/parity/test_refusals_parity.py."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from peftmath import Adapter, load_adapter, read_config, save_adapter
from peftmath._peft_tables import CONFIG_FIELDS, IMPLEMENTED, IRRELEVANT, Refused
from peftmath.config import check_supported, strict_fields, unsupported_fields
from peftmath.errors import (CheckpointError, ConfigError, NotInvertibleError, PeftMathWarning, ShapeError,
                             UnsupportedError)
from peftmath.io.peft import config_from_dict
from peftmath.io.safetensors import save_file
from peftmath.methods import get_method
from peftmath.methods.lora import LoraConfig

S = 6 / 2  # lora_alpha / r


def _folder(tmp_path, config: dict, tensors: dict, name="ad"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, folder / "adapter_model.safetensors",
              metadata={"format": "pt"})
    return folder


def _lora_tensors(rng, modules=("lin0",), inn=10, out=20):
    t = {}
    for m in modules:
        t[f"base_model.model.{m}.lora_A.weight"] = rng.standard_normal((2, inn)).astype(np.float32)
        t[f"base_model.model.{m}.lora_B.weight"] = rng.standard_normal((out, 2)).astype(np.float32)
    return t


LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 6, "target_modules": ["lin0"]}


# --------------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, looks", [
    ("base_model.model.mha.base_layer.q_proj.lora_A.weight", "a LoRA inside a wrapped layer"),
    ("base_model.model.lin0.hada_w1_a", "another method or variant"),
    ("base_model.model.lin0.weight", "PEFT saves and loads as lin0.base_layer.weight"),
    ("base_model.model.norm.running_mean", "neither a parameter of this method nor a base-model parameter"),
])
def test_a_tensor_nobody_owns_fails_the_load(tmp_path, key, looks):
    rng = np.random.default_rng(0)
    tensors = {**_lora_tensors(rng), key: np.ones(4, np.float32)}
    with pytest.raises(CheckpointError) as info:
        load_adapter(_folder(tmp_path, LORA, tensors))
    msg = str(info.value)
    assert "1 tensor(s)" in msg and repr(key) in msg and looks in msg, msg
    assert "adapter_model.safetensors" in msg


@pytest.mark.parametrize("key, variant, field_name", [
    ("base_model.model.lin0.lora_velora_embed", "VeLoRA", "velora_config"),
    ("base_model.model.lin0.lora_monteclora_sampler.std_prior", "MonteCLoRA", "monteclora_config"),
])
def test_training_state_without_its_config_field_is_refused(tmp_path, key, variant, field_name):
    """VeLoRA / MonteCLoRA tensors are read (training state, no part of inference) only with their config field."""
    rng = np.random.default_rng(0)
    tensors = {**_lora_tensors(rng), key: np.ones(2, np.float32)}
    ad = load_adapter(_folder(tmp_path, LORA, tensors))
    with pytest.raises(CheckpointError, match=rf"lin0: the checkpoint holds {key.split('lin0.')[1]} \({variant}'s "
                                              rf"training state\) but adapter_config.json has no {field_name}"):
        ad.module("lin0")


def test_many_unknown_tensors_are_counted(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {**_lora_tensors(rng), **{f"base_model.model.l{i}.lora_zz": np.ones(2, np.float32) for i in range(8)}}
    with pytest.raises(CheckpointError, match=r"8 tensor\(s\).*and 3 more"):
        load_adapter(_folder(tmp_path, LORA, tensors))


def test_tensors_peft_writes_as_replacements_load(tmp_path):
    """modules_to_save copies (any tensor of the module), the base layer's bias of an adapted module
    (bias="lora_only" / "all"), other biases and saved embeddings: base tensors the adapter replaces."""
    rng = np.random.default_rng(1)
    tensors = {**_lora_tensors(rng),
               "base_model.model.lin0.base_layer.bias": np.ones(20, np.float32),
               "base_model.model.cls.weight": np.ones((3, 10), np.float32),
               "base_model.model.head.bn.running_mean": np.zeros(3, np.float32),
               "base_model.model.lin1.bias": np.ones(10, np.float32),
               "base_model.model.model.embed_tokens.weight": np.ones((5, 10), np.float32)}
    cfg = {**LORA, "bias": "all", "modules_to_save": ["head"]}
    ad = load_adapter(_folder(tmp_path, cfg, tensors))
    assert sorted(ad.other) == ["cls.weight", "head.bn.running_mean", "lin0.bias", "lin1.bias",
                                "model.embed_tokens.weight"]
    assert ad.modules == ["lin0"]
    # written back where PEFT reads them: the adapted module's bias on its base layer
    again = load_adapter(save_adapter(ad, tmp_path / "again"))
    assert sorted(again.other) == sorted(ad.other)
    from peftmath.io.safetensors import SafeTensorsFile

    keys = set(SafeTensorsFile(tmp_path / "again" / "adapter_model.safetensors"))
    assert "base_model.model.lin0.base_layer.bias" in keys and "base_model.model.lin0.bias" not in keys


# --------------------------------------------------------------------------------------------------
# config fields
# --------------------------------------------------------------------------------------------------
def _refused_cases():
    out = []
    for peft_type, table in CONFIG_FIELDS.items():
        for name, rule in table.items():
            if isinstance(rule, Refused):
                bad = {True: "pissa", None: {"x": 1}, False: True}.get(rule.allowed[0], [[0, 2]])
                if name == "init_lora_weights":
                    for value in ("pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"):
                        out.append(pytest.param(peft_type, name, value, rule, id=f"{peft_type}-{name}-{value}"))
                else:
                    out.append(pytest.param(peft_type, name, bad, rule, id=f"{peft_type}-{name}"))
    return out


@pytest.mark.parametrize("peft_type, name, value, rule", _refused_cases())
def test_fields_that_change_the_math_are_refused_by_name(tmp_path, peft_type, name, value, rule):
    rng = np.random.default_rng(2)
    base = {"peft_type": peft_type, "r": 2, "lora_alpha": 6, "target_modules": ["lin0"]}
    if peft_type == "ADALORA":
        base.update(init_r=2, target_r=2, total_step=10)
    data = {**base, name: value}
    if value == "loftq":
        data["loftq_config"] = {"loftq_bits": 4}
    config = config_from_dict(data)  # reading the config works (inspection), applying it does not
    assert [f for f, _, _ in unsupported_fields(config)] == [name]
    if peft_type == "ADALORA":
        tensors = {"base_model.model.lin0.lora_A": rng.standard_normal((2, 10)).astype(np.float32),
                   "base_model.model.lin0.lora_E": rng.standard_normal((2, 1)).astype(np.float32),
                   "base_model.model.lin0.lora_B": rng.standard_normal((20, 2)).astype(np.float32)}
    else:
        tensors = _lora_tensors(rng)
    folder = _folder(tmp_path, data, tensors)
    with pytest.raises(UnsupportedError) as info:
        load_adapter(folder)
    msg = str(info.value)
    assert f"{name}=" in msg and rule.variant in msg and "PEFT 0.21.2" in msg and "adapter_config.json" in msg
    assert repr(value)[:40] in msg
    # an Adapter built in memory with that config refuses every operation on its modules
    params = {"lin0": {k.rsplit("lin0.", 1)[1]: v for k, v in tensors.items()}}
    ad = Adapter(config, params)
    state = {"lin0.weight": rng.standard_normal((20, 10)).astype(np.float32)}
    for op in (lambda: ad.merge(state), lambda: ad.unmerge(state), lambda: ad.module("lin0"),
               lambda: ad.forward("lin0", np.ones((1, 10), np.float32), state), lambda: ad.summary(state)):
        with pytest.raises(UnsupportedError, match=name):
            op()


def test_defaults_and_harmless_values_are_not_refused():
    for peft_type, table in CONFIG_FIELDS.items():
        for name, rule in table.items():
            assert rule in (IMPLEMENTED, IRRELEVANT) or isinstance(rule, Refused), (peft_type, name)
    for init in (True, False, "gaussian", "eva", "orthogonal", "mica"):
        check_supported(config_from_dict({**LORA, "init_lora_weights": init}))
    check_supported(config_from_dict({**LORA, "target_parameters": [], "kasa_config": None, "use_qalora": False,
                                      "qalora_group_size": 32, "eva_config": {"rho": 2}, "lora_dropout": 0.1}))
    # AdaLoRA reads init_lora_weights as a flag only
    check_supported(config_from_dict({"peft_type": "ADALORA", "init_r": 2, "target_r": 2, "total_step": 10,
                                      "init_lora_weights": "pissa"}))


# --------------------------------------------------------------------------------------------------
# unknown fields
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("peft_type, wrong, right", [
    ("LORA", "lora_alfa", "lora_alpha"), ("LORA", "use_rslora_", "use_rslora"), ("LORA", "fan_in_fanout", "fan_in_fan_out"),
    ("LOHA", "alhpa", "alpha"), ("IA3", "feedforward_module", "feedforward_modules"),
    ("OFT", "oft_blocksize", "oft_block_size"), ("VERA", "projection_prng", "projection_prng_key"),
    ("PREFIX_TUNING", "num_virtual_token", "num_virtual_tokens"),
])
def test_unknown_fields_warn_with_the_closest_known_one(tmp_path, peft_type, wrong, right):
    method = get_method(peft_type)
    data = {"peft_type": peft_type, wrong: 16}
    if peft_type == "OFT":
        data.update(oft_block_size=4, peft_version="0.21.2")
    if peft_type == "PREFIX_TUNING":
        data["num_virtual_tokens"] = 4
    with pytest.warns(PeftMathWarning, match=rf"config: unknown field {wrong!r} \(did you mean {right!r}\?\)"):
        cfg = config_from_dict(data)
    assert cfg.extra[wrong] == 16 and isinstance(cfg, method.Config)
    with pytest.raises(ConfigError, match=rf"unknown field {wrong!r} \(did you mean {right!r}\?\).*strict"):
        config_from_dict(data, strict=True)
    with pytest.raises(ConfigError, match=wrong), strict_fields():  # every config class, overrides included
        method.Config.from_dict(data)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=wrong):
        read_config(path, strict=True)
    with pytest.warns(PeftMathWarning, match=str(path)):
        read_config(path)


def test_load_adapter_strict(tmp_path):
    rng = np.random.default_rng(3)
    folder = _folder(tmp_path, {"peft_type": "LORA", "r": 2, "lora_alfa": 16}, _lora_tensors(rng))
    with pytest.warns(PeftMathWarning, match="did you mean 'lora_alpha'"):
        ad = load_adapter(folder)
    assert ad.config.lora_alpha == 8  # PEFT's default: the misspelt field has no effect, as the warning says
    with pytest.raises(ConfigError, match="lora_alfa"):
        load_adapter(folder, strict=True)
    with pytest.warns(PeftMathWarning, match="not a field of PEFT 0.21.2's LoraConfig"):
        config_from_dict({**LORA, "qwertyuiop": 1})


def test_every_field_peft_writes_is_known():
    """No warning for any field of PEFT 0.21.2's config classes (the table lists them all; the parity
    test checks the table against PEFT's dataclasses)."""
    for peft_type, table in CONFIG_FIELDS.items():
        data = {name: None for name in table}
        data["peft_type"] = peft_type
        with warnings.catch_warnings():
            warnings.simplefilter("error", PeftMathWarning)
            from peftmath.config import check_unknown_fields

            check_unknown_fields(get_method(peft_type).Config, data, source="t", strict=True)


# --------------------------------------------------------------------------------------------------
# replaced base tensors: merge, unmerge, forward
# --------------------------------------------------------------------------------------------------
def _state_and_adapter(dtype=np.float64):
    rng = np.random.default_rng(4)
    state = {"lin0.weight": rng.standard_normal((20, 10)).astype(dtype), "lin0.bias": rng.standard_normal(20).astype(dtype),
             "emb.weight": rng.standard_normal((30, 10)).astype(dtype), "norm.weight": rng.standard_normal(10).astype(dtype)}
    params = {"lin0": {"lora_A.weight": rng.standard_normal((2, 10)).astype(dtype),
                       "lora_B.weight": rng.standard_normal((20, 2)).astype(dtype)},
              "emb": {"lora_embedding_A": rng.standard_normal((2, 30)).astype(dtype),
                      "lora_embedding_B": rng.standard_normal((10, 2)).astype(dtype)}}
    other = {"lin0.bias": rng.standard_normal(20).astype(dtype), "emb.weight": rng.standard_normal((30, 10)).astype(dtype),
             "norm.weight": rng.standard_normal(10).astype(dtype)}
    return state, Adapter(LoraConfig(r=2, lora_alpha=6), params, other=other)


def _hand_merge(ad, state):
    p = ad.params
    out = dict(state)
    out.update(ad.other)
    out["lin0.weight"] = state["lin0.weight"] + S * p["lin0"]["lora_B.weight"] @ p["lin0"]["lora_A.weight"]
    out["emb.weight"] = ad.other["emb.weight"] + (S * p["emb"]["lora_embedding_B"] @ p["emb"]["lora_embedding_A"]).T
    return out


@pytest.mark.parametrize("copy", [True, False])
def test_replacements_are_applied_before_merging(copy):
    """A saved embedding layer (base_layer.weight of an adapted embedding) is the base its LoRA merges
    into, as PEFT loads it; a replaced bias is the bias; other replacements replace."""
    state, ad = _state_and_adapter()
    want = _hand_merge(ad, state)
    private = {k: v.copy() for k, v in state.items()}
    merged = ad.merge(private, copy=copy)
    assert set(merged) == set(state)
    for key in state:
        np.testing.assert_allclose(merged[key], want[key], rtol=1e-13, atol=1e-13, err_msg=key)
        if copy:
            np.testing.assert_array_equal(private[key], state[key])  # nothing written
        else:
            assert merged[key] is private[key]  # in place: the caller's arrays hold the merged model
    for key, value in ad.other.items():
        assert not np.shares_memory(merged[key], value) or copy  # the adapter's tensors are never written
    # forward sees the replaced bias and the replaced embedding, as PEFT's loaded model does
    x = np.random.default_rng(5).standard_normal((2, 10))
    p = ad.params["lin0"]
    np.testing.assert_allclose(ad.forward("lin0", x, state),
                               x @ state["lin0.weight"].T + ad.other["lin0.bias"]
                               + S * x @ p["lora_A.weight"].T @ p["lora_B.weight"].T, rtol=1e-12, atol=1e-12)
    ids = np.array([[1, 4, 29]])
    np.testing.assert_allclose(ad.forward("emb", ids, state), want["emb.weight"][ids], rtol=1e-12, atol=1e-12)


def test_replacements_take_the_base_dtype_and_layout_does_not_matter():
    state, ad = _state_and_adapter(np.float64)
    state32 = {k: np.asfortranarray(v.astype(np.float32)) for k, v in state.items()}
    merged = ad.merge(state32)
    assert all(merged[k].dtype == np.float32 for k in merged)
    want = _hand_merge(ad, state)
    for key in state:
        np.testing.assert_allclose(merged[key], want[key], rtol=2e-5, atol=2e-5, err_msg=key)


def test_a_replacement_the_base_lacks_is_refused_before_anything_changes():
    state, ad = _state_and_adapter()
    ad.other["head.weight"] = np.ones((3, 10))
    ad.other["head.bias"] = np.ones(3)
    before = {k: v.copy() for k, v in state.items()}
    with pytest.raises(CheckpointError, match=r"replaces base tensors that the base state dict lacks: head.bias, "
                                              r"head.weight.*is this the adapter's base model"):
        ad.merge(state, copy=False)
    assert all(np.array_equal(state[k], before[k]) for k in state)
    state, ad = _state_and_adapter()
    ad.other["norm.weight"] = np.ones(11)
    with pytest.raises(ShapeError, match=r"replacement for 'norm.weight' has shape \(11,\).*\(10,\)"):
        ad.merge(state)
    state, ad = _state_and_adapter()
    ad.other = {"norm.weight": ad.other["norm.weight"]}
    state["norm.weight"].flags.writeable = False
    with pytest.raises(UnsupportedError, match="norm.weight"):
        ad.merge(state, copy=False)


def test_unmerge_needs_the_original_replaced_tensors():
    state, ad = _state_and_adapter()
    merged = ad.merge(state)
    with pytest.raises(NotInvertibleError, match=r"replaces emb.weight, lin0.bias, norm.weight.*cannot be recovered"
                                                 r".*originals="):
        ad.unmerge(merged)
    with pytest.raises(NotInvertibleError, match="norm.weight"):
        ad.unmerge(merged, originals={"emb.weight": state["emb.weight"], "lin0.bias": state["lin0.bias"]})
    back = ad.unmerge(merged, originals=state)
    for key in state:
        np.testing.assert_allclose(back[key], state[key], rtol=0, atol=1e-12, err_msg=key)
    for key in ad.other:
        assert back[key] is state[key]
    with pytest.raises(ShapeError, match="originals"):
        ad.unmerge(merged, originals={**state, "norm.weight": np.ones(3)})


# --------------------------------------------------------------------------------------------------
# tied embeddings
# --------------------------------------------------------------------------------------------------
def _tied(rng, target):
    V, D = 32, 8
    state = {"model.embed_tokens.weight": rng.standard_normal((V, D)), "model.layers.0.q_proj.weight": rng.standard_normal((D, D))}
    if target == "embed":
        params = {"model.embed_tokens": {"lora_embedding_A": rng.standard_normal((2, V)),
                                         "lora_embedding_B": rng.standard_normal((D, 2))}}
    else:
        params = {"lm_head": {"lora_A.weight": rng.standard_normal((2, D)), "lora_B.weight": rng.standard_normal((V, 2))}}
    return state, Adapter(LoraConfig(r=2, lora_alpha=6), params)


def test_a_lora_on_a_tied_embedding_warns_that_the_output_layer_changes():
    rng = np.random.default_rng(6)
    state, ad = _tied(rng, "embed")
    cfg = {"model_type": "llama", "tie_word_embeddings": True}
    with pytest.warns(PeftMathWarning, match=r"model.embed_tokens: the model ties its input embedding to its output "
                                             r"layer \(tie_word_embeddings=true.*no separate output-layer tensor.*also "
                                             r"the output layer's weight"):
        merged = ad.merge(state, model_config=cfg)
    p = ad.params["model.embed_tokens"]
    np.testing.assert_allclose(merged["model.embed_tokens.weight"], state["model.embed_tokens.weight"]
                               + (S * p["lora_embedding_B"] @ p["lora_embedding_A"]).T, rtol=1e-13)
    with warnings.catch_warnings():  # untied (or unknown): nothing to say
        warnings.simplefilter("error", PeftMathWarning)
        ad.merge(state, model_config={"tie_word_embeddings": False})
        ad.merge(state)
    # a state dict whose output layer shares the embedding's memory keeps them tied
    tied_state = {**state, "lm_head.weight": state["model.embed_tokens.weight"][:]}
    with pytest.warns(PeftMathWarning, match="lm_head.weight shares its storage"):
        merged = ad.merge(tied_state)
    assert merged["lm_head.weight"] is merged["model.embed_tokens.weight"]
    with pytest.warns(PeftMathWarning, match="also holds lm_head.weight"):
        ad.merge(tied_state, model_config=cfg)


def test_a_lora_on_a_tied_output_layer_is_refused_saying_what_is_tied():
    rng = np.random.default_rng(7)
    state, ad = _tied(rng, "head")
    with pytest.raises(UnsupportedError) as info:
        ad.merge(state, model_config={"tie_word_embeddings": True})
    msg = str(info.value)
    for part in ("lm_head: this model ties lm_head.weight to model.embed_tokens.weight", "tie_word_embeddings=true",
                 "(32, 8) table", "input embedding as well", "untie the model first",
                 "add lm_head.weight as a copy of model.embed_tokens.weight", "tie_word_embeddings=false"):
        assert part in msg, part
    with pytest.raises(ShapeError, match="no weight 'lm_head.weight'.*if this model ties lm_head.weight to "
                                         "model.embed_tokens.weight.*model_config="):
        ad.merge(state)
    # untied, as the message says: the output layer alone changes
    untied = {**state, "lm_head.weight": state["model.embed_tokens.weight"].copy()}
    merged = ad.merge(untied, model_config={"tie_word_embeddings": False})
    p = ad.params["lm_head"]
    np.testing.assert_allclose(merged["lm_head.weight"], untied["lm_head.weight"]
                               + S * p["lora_B.weight"] @ p["lora_A.weight"], rtol=1e-13)
    assert merged["model.embed_tokens.weight"] is untied["model.embed_tokens.weight"]


def test_check_base_works_on_shapes_alone():
    """What the streamed merge calls: the same checks from the base's key -> shape map."""
    rng = np.random.default_rng(8)
    state, ad = _tied(rng, "head")
    shapes = {k: v.shape for k, v in state.items()}
    with pytest.raises(UnsupportedError, match="ties lm_head.weight to model.embed_tokens.weight"):
        ad.check_base(shapes, model_config={"tie_word_embeddings": True}, source="model.safetensors")
    state, ad = _tied(rng, "embed")
    with pytest.warns(PeftMathWarning, match="model.embed_tokens"):
        ad.check_base({k: v.shape for k, v in state.items()}, model_config={"tie_word_embeddings": True})
    state, ad = _state_and_adapter()
    ad.other["x.weight"] = np.ones(2)
    with pytest.raises(CheckpointError, match="x.weight.*base.safetensors lacks|base.safetensors lacks: x.weight"):
        ad.check_base({k: v.shape for k, v in state.items()}, source="base.safetensors")
