"""Understood or refused, against real PEFT 0.21.2 checkpoints (design rule 9, issue 15 items 2-5, 8).

* The field table of ``peftmath._peft_tables`` covers every field of PEFT's config dataclasses, and the
  Conv1D table of ``peftmath.kinds`` every Conv1D layer of transformers' modeling code: neither can rot.
* Checkpoints of the LoRA variants peftmath does not implement, written by PEFT, are refused by name.
* A model mixing nn.Linear and transformers Conv1D layers: PEFT's saved ``fan_in_fan_out`` is the last
  module's kind; peftmath refuses the square modules and, told their kinds, merges as PEFT does.
* modules_to_save, trained biases and saved embeddings merge as PEFT's merge_and_unload; unmerging them
  needs the originals.
* Tied embeddings (a tiny Llama with ``tie_word_embeddings=true``): a LoRA on embed_tokens merges as PEFT
  does, with a warning; one on lm_head is refused saying what is tied to what.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.parity.conftest import require_peft, t2n

torch, peft = require_peft()
transformers = pytest.importorskip("transformers")

import torch.nn as nn  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import peftmath as pm  # noqa: E402
from peftmath._peft_tables import CONFIG_FIELDS, IMPLEMENTED, Refused  # noqa: E402
from peftmath.errors import (CheckpointError, ConfigError, NotInvertibleError, PeftMathWarning,  # noqa: E402
                             UnsupportedError)
from peftmath.kinds import CONV1D_MODEL_TYPES  # noqa: E402

def _peft_configs() -> dict[str, str]:
    """Every PEFT type peftmath implements -> the name of PEFT 0.21.2's config class (from PEFT's own mapping, so
    a method added later is checked without an edit here)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from peftmath.methods import implemented_methods

    return {t: PEFT_TYPE_TO_CONFIG_MAPPING[t].__name__ for t in implemented_methods()}


PEFT_CONFIGS = _peft_configs()


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _seeded(model, seed: int, *, only_trainable: bool = False, scale: float = 0.3):
    """Redraw the parameters of ``model`` (the trainable ones only, if asked) from a NumPy seed."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if only_trainable and not p.requires_grad:
                continue
            p.copy_(torch.from_numpy(rng.normal(0.0, scale, tuple(p.shape)).astype(np.float32)))
    return model


def _state(model) -> dict[str, np.ndarray]:
    return {k: t2n(v) for k, v in model.state_dict().items()}


def _assert_states_close(got: dict, want: dict, *, tol: float = 1e-5):
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for key, value in want.items():
        np.testing.assert_allclose(np.asarray(got[key], np.float64), np.asarray(value, np.float64), rtol=tol, atol=tol,
                                   err_msg=key)


# --------------------------------------------------------------------------------------------------
# the tables cannot rot
# --------------------------------------------------------------------------------------------------
#: LoRA variant fields peftmath implements: DoRA, BD-LoRA, and VeLoRA / MonteCLoRA (training-time state only)
IMPLEMENTED_VARIANT_FIELDS = ("use_dora", "use_bdlora", "velora_config", "monteclora_config", "kasa_config",
                              "alora_invocation_tokens")


@pytest.mark.parametrize("peft_type", list(PEFT_CONFIGS))
def test_field_table_covers_every_field_of_peft_configs(peft_type):
    cls = getattr(peft, PEFT_CONFIGS[peft_type])
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(CONFIG_FIELDS[peft_type]) == set(fields), sorted(set(CONFIG_FIELDS[peft_type]) ^ set(fields))
    for name, rule in CONFIG_FIELDS[peft_type].items():
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if isinstance(rule, Refused):  # PEFT's default is never refused
            assert rule.allows(default), (name, default)
        # every LoRA variant PEFT's layers switch on is refused, but for those implemented (methods/lora.py)
        if peft_type == "LORA" and f.metadata.get("is_lora_variant"):
            assert isinstance(rule, Refused) or (name in IMPLEMENTED_VARIANT_FIELDS and rule == IMPLEMENTED), name
        if peft_type == "LORA" and name == "init_lora_weights":
            # the init options that are LoRA variants (MiCA) keep vanilla LoRA's merge / forward, by PEFT's
            # own account; all others that change the base are refused
            assert all(rule.allows(v) for v in f.metadata["lora_variants"])


def test_peft_saved_configs_have_no_unknown_fields(tmp_path):
    """Every field PEFT writes is known: reading its adapter_config.json strictly raises nothing."""
    kwargs = {"ADALORA": dict(total_step=10), "PROMPT_TUNING": dict(num_virtual_tokens=4, task_type="CAUSAL_LM"),
              "P_TUNING": dict(num_virtual_tokens=4, task_type="CAUSAL_LM"),
              "CARTRIDGE": dict(num_virtual_tokens=4, task_type="CAUSAL_LM"),
              "MULTITASK_PROMPT_TUNING": dict(num_virtual_tokens=4, task_type="CAUSAL_LM"),
              "CPT": dict(task_type="CAUSAL_LM"),
              "PREFIX_TUNING": dict(num_virtual_tokens=4, task_type="CAUSAL_LM")}
    for peft_type, name in PEFT_CONFIGS.items():
        folder = tmp_path / peft_type
        _quiet(getattr(peft, name)(**kwargs.get(peft_type, {})).save_pretrained, folder)
        with warnings.catch_warnings():
            warnings.simplefilter("error", PeftMathWarning)
            cfg = pm.read_config(folder, strict=True)
        assert cfg.peft_type == peft_type


def _conv1d_layers_in_transformers() -> dict[str, set[str]]:
    """``{models/<dir>: {layer names built as Conv1D}}`` from transformers' modeling source."""
    root = Path(transformers.__file__).parent / "models"
    out: dict[str, set[str]] = {}
    for path in root.glob("*/modeling_*.py"):
        found = set(re.findall(r"self\.(\w+)\s*=\s*Conv1D\(", path.read_text(encoding="utf-8")))
        if found:
            out.setdefault(path.parent.name, set()).update(found)
    return out


def _model_types(folder: str) -> set[str]:
    root = Path(transformers.__file__).parent / "models" / folder
    return {m for p in root.glob("configuration_*.py")
            for m in re.findall(r'^\s+model_type\s*=\s*"([^"]+)"', p.read_text(encoding="utf-8"), re.M)}


def test_conv1d_model_types_match_transformers_source():
    layers = _conv1d_layers_in_transformers()
    assert "gpt2" in layers  # the scan works
    covered = set()
    for folder, names in layers.items():
        types = _model_types(folder) & set(CONV1D_MODEL_TYPES)
        assert types, f"transformers' {folder} builds Conv1D layers {sorted(names)}; add its model_type"
        for t in types:
            assert names <= set(CONV1D_MODEL_TYPES[t]), (t, sorted(names - set(CONV1D_MODEL_TYPES[t])))
        covered |= types
    assert covered == set(CONV1D_MODEL_TYPES), sorted(set(CONV1D_MODEL_TYPES) - covered)


# --------------------------------------------------------------------------------------------------
# variants PEFT writes into ordinary LoRA checkpoints
# --------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 10)
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 10)
        self.norm = nn.LayerNorm(10)
        self.cls = nn.Linear(10, 3)


def _llama(**kw):
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, **kw)
    torch.manual_seed(0)
    return _quiet(transformers.LlamaForCausalLM, cfg).eval()


VARIANTS = {
    "PiSSA, not converted": (MLP, dict(target_modules=["lin0"], init_lora_weights="pissa"), UnsupportedError,
                             "init_lora_weights='pissa'.*runs this initialisation again"),
    "OLoRA, not converted": (MLP, dict(target_modules=["lin0"], init_lora_weights="olora"), UnsupportedError,
                             "init_lora_weights='olora'"),
    "layer replication": ("llama", dict(target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]]), UnsupportedError,
                          "layer_replication=.*layer replication"),
    "ensure_weight_tying": ("llama-tied", dict(target_modules=["embed_tokens"], ensure_weight_tying=True),
                            UnsupportedError, "ensure_weight_tying=True"),
}


#: LoRA variants whose tensors need their config field: KaSA's lora_diag, VeLoRA / MonteCLoRA's training state
#: (their parity: the PEFT matrix rows and tests/parity/test_lora_variants_parity.py)
TRAINING_STATE_VARIANTS = {
    "KaSA": (MLP, dict(target_modules=["lin0"], kasa_config="KasaConfig", r=4)),
    "VeLoRA": (MLP, dict(target_modules=["lin0"], velora_config=("VeloraConfig", dict(num_groups=2, init_type="random")))),
    "MonteCLoRA": (MLP, dict(target_modules=["lin0"], monteclora_config=("MontecloraConfig", dict(num_samples=2)))),
}


def _variant_config(kw: dict):
    out = {}
    for k, v in kw.items():
        if isinstance(v, str) and v.endswith("Config"):
            v = getattr(peft, v)()
        elif isinstance(v, tuple):
            v = getattr(peft, v[0])(**v[1])
        out[k] = v
    return peft.LoraConfig(**out)


def _peft_checkpoint(model_id, kw, folder: Path):
    model = {"llama": lambda: _llama(), "llama-tied": lambda: _llama(tie_word_embeddings=True)}.get(
        model_id, lambda: _seeded(model_id(), 0))()
    torch.manual_seed(1)
    pm_ = _quiet(peft.get_peft_model, model, _variant_config(kw))
    _quiet(pm_.save_pretrained, folder)
    return pm_


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_variants_are_refused_by_name(tmp_path, variant):
    model_id, kw, error, pattern = VARIANTS[variant]
    _peft_checkpoint(model_id, kw, tmp_path / "adapter")
    with pytest.raises(error, match=pattern):
        pm.load_adapter(tmp_path / "adapter")


def _drop_variant_fields(folder: Path) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.endswith("_config") or k in ("loftq_config",)}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def test_variant_tensors_are_refused_even_without_their_config_field(tmp_path):
    """A KaSA / VeLoRA / MonteCLoRA checkpoint whose config lost its field holds tensors its config no longer
    describes (KaSA's lora_diag, the others' training state): refused, not read as a plain LoRA."""
    for variant, (model_id, kw) in TRAINING_STATE_VARIANTS.items():
        folder = tmp_path / variant
        _peft_checkpoint(model_id, kw, folder)
        base = {k: t2n(v) for k, v in _seeded(model_id(), 0).state_dict().items()}
        pm.load_adapter(folder).merge(base)  # with its field: read and merged
        _drop_variant_fields(folder)
        with pytest.raises(CheckpointError, match=rf"lin0: the checkpoint holds lora_.*{variant}.*has no .*_config"):
            # (KaSA's message names lora_diag and "KaSA's learned singular values")
            pm.load_adapter(folder).merge(base)


def test_pissa_converted_by_peft_merges_into_the_original_base(tmp_path):
    """What the refusal of an unconverted PiSSA adapter points to: PEFT's conversion to a plain LoRA of
    the original base merges in peftmath as PEFT merges it."""
    base = _seeded(MLP(), 0)
    state = _state(base)
    init = tmp_path / "init"
    pm_ = _quiet(peft.get_peft_model, base, peft.LoraConfig(target_modules=["lin0", "lin1"], r=2, init_lora_weights="pissa"))
    _quiet(pm_.save_pretrained, init)  # the initial (untrained) PiSSA adapter, used for the conversion
    _seeded(pm_, 3, only_trainable=True, scale=0.2)  # "training"
    _quiet(pm_.save_pretrained, tmp_path / "converted", path_initial_model_for_weight_conversion=str(init))
    reference = _seeded(MLP(), 0)
    loaded = _quiet(peft.PeftModel.from_pretrained, reference, tmp_path / "converted")
    want = _state(_quiet(loaded.merge_and_unload))
    ad = pm.load_adapter(tmp_path / "converted")
    assert ad.config.init_lora_weights is True and ad.config.r == 4
    _assert_states_close(ad.merge(state), want)


# --------------------------------------------------------------------------------------------------
# a model mixing nn.Linear and transformers Conv1D
# --------------------------------------------------------------------------------------------------
def _mixed_model(conv_last: bool):
    layers = [("lin", nn.Linear(10, 20)), ("lin_sq", nn.Linear(16, 16)), ("c", Conv1D(20, 10)), ("c_sq", Conv1D(16, 16))]
    if not conv_last:
        layers = layers[2:] + layers[:2]
    root = nn.Module()
    for name, layer in layers:
        root.add_module(name, layer)
    return _seeded(root, 0)


@pytest.mark.parametrize("conv_last", [True, False])
def test_mixed_linear_and_conv1d_model(tmp_path, conv_last):
    model = _mixed_model(conv_last)
    state = _state(model)
    pm_ = _quiet(peft.get_peft_model, model, peft.LoraConfig(r=2, lora_alpha=6, target_modules=["lin", "lin_sq", "c", "c_sq"],
                                                             init_lora_weights=False))
    _seeded(pm_, 4, only_trainable=True)
    _quiet(pm_.save_pretrained, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is conv_last  # the kind of the last module PEFT wrapped
    want = _state(_quiet(pm_.merge_and_unload))
    ad = pm.load_adapter(tmp_path / "adapter")
    wrong = "lin_sq" if conv_last else "c_sq"
    with pytest.raises(ConfigError, match=r"c_sq, lin_sq: cannot tell.*layer_kinds=\{'c_sq': 'Linear', 'lin_sq': "
                                          r"'Linear'\}.*--layer-kind c_sq=Linear --layer-kind lin_sq=Linear"):
        ad.merge(state)
    merged = ad.merge(state, layer_kinds={"lin_sq": "Linear", "c_sq": "Conv1D"})
    _assert_states_close(merged, want)
    # the flag happens to be right for the square module of the last kind, but it is not evidence once
    # the adapter is known to mix kinds: that module must be named too
    other = "c_sq" if conv_last else "lin_sq"
    with pytest.raises(ConfigError, match=rf"{other}: cannot tell"):
        ad.merge(state, layer_kinds={wrong: "Linear" if wrong == "lin_sq" else "Conv1D"})


# --------------------------------------------------------------------------------------------------
# modules_to_save, trained biases, saved embeddings
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["modules_to_save", "bias=all", "bias=lora_only"])
def test_replacements_merge_as_peft_merges_them(tmp_path, case):
    base = _seeded(MLP(), 0)
    state = _state(base)
    kw = {"modules_to_save": dict(modules_to_save=["cls", "norm"]), "bias=all": dict(bias="all"),
          "bias=lora_only": dict(bias="lora_only")}[case]
    pm_ = _quiet(peft.get_peft_model, base, peft.LoraConfig(target_modules=["lin0"], init_lora_weights=False, **kw))
    _seeded(pm_, 5, only_trainable=True)
    _quiet(pm_.save_pretrained, tmp_path / "adapter")
    ad = pm.load_adapter(tmp_path / "adapter", strict=True)
    assert ad.other
    merged = ad.merge(state)
    fresh = _seeded(MLP(), 0)
    want = _state(_quiet(_quiet(peft.PeftModel.from_pretrained, fresh, tmp_path / "adapter").merge_and_unload))
    _assert_states_close(merged, want)
    assert any(not np.array_equal(merged[k], state[k]) for k in ad.other)  # the replacements did change something
    with pytest.raises(NotInvertibleError, match="cannot be recovered"):
        ad.unmerge(merged)
    _assert_states_close(ad.unmerge(merged, originals=state), state)


def test_saved_embedding_is_the_base_its_lora_merges_into(tmp_path):
    """PEFT saves a targeted embed_tokens' base layer (save_embedding_layers); loading it replaces the
    base embedding, and the LoRA then merges on top of it."""
    model = _llama()
    state = _state(model)
    pm_ = _quiet(peft.get_peft_model, model, peft.LoraConfig(target_modules=["embed_tokens", "q_proj"],
                                                             init_lora_weights=False))
    with torch.no_grad():  # an embedding that differs from the base (as after resizing / training it)
        emb = pm_.base_model.model.model.embed_tokens.base_layer.weight
        emb.add_(torch.from_numpy(np.random.default_rng(6).normal(0, 0.5, tuple(emb.shape)).astype(np.float32)))
    _quiet(pm_.save_pretrained, tmp_path / "adapter")
    ad = pm.load_adapter(tmp_path / "adapter")
    assert "model.embed_tokens.weight" in ad.other and "model.embed_tokens" in ad.params
    want = _state(_quiet(_quiet(peft.PeftModel.from_pretrained, _llama(), tmp_path / "adapter").merge_and_unload))
    _assert_states_close(ad.merge(state), want)


# --------------------------------------------------------------------------------------------------
# tied embeddings
# --------------------------------------------------------------------------------------------------
def _saved_llama(folder: Path, tie: bool):
    model = _llama(tie_word_embeddings=tie)
    _quiet(model.save_pretrained, folder)
    from peftmath.create import open_state

    state, _ = open_state(folder)
    return model, state, json.loads((folder / "config.json").read_text())


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.numpy()


def test_lora_on_a_tied_embedding_merges_as_peft_with_a_warning(tmp_path):
    model, state, config = _saved_llama(tmp_path / "base", tie=True)
    assert "lm_head.weight" not in state and config["tie_word_embeddings"] is True
    pm_ = _quiet(peft.get_peft_model, model, peft.LoraConfig(target_modules=["embed_tokens"], init_lora_weights=False))
    _seeded(pm_, 7, only_trainable=True)
    _quiet(pm_.save_pretrained, tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    merged_by_peft = _quiet(pm_.merge_and_unload)
    want = _logits(merged_by_peft, ids)
    ad = pm.load_adapter(tmp_path / "adapter")
    with pytest.warns(PeftMathWarning, match=r"model.embed_tokens: the model ties.*also the output layer's weight"):
        merged = ad.merge(state, model_config=config)
    fresh = _llama(tie_word_embeddings=True)
    missing, unexpected = fresh.load_state_dict({k: torch.from_numpy(np.asarray(v).copy()) for k, v in merged.items()},
                                                strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    fresh.tie_weights()
    np.testing.assert_allclose(_logits(fresh, ids), want, rtol=1e-4, atol=1e-4)
    # the output layer changed too: the logits differ from the base model's even where the embedding did not
    assert np.abs(_logits(_llama(tie_word_embeddings=True), ids) - want).max() > 1e-3


def test_lora_on_a_tied_output_layer_is_refused(tmp_path):
    model, state, config = _saved_llama(tmp_path / "base", tie=True)
    pm_ = _quiet(peft.get_peft_model, model, peft.LoraConfig(target_modules=["lm_head"], init_lora_weights=False))
    _quiet(pm_.save_pretrained, tmp_path / "adapter")
    ad = pm.load_adapter(tmp_path / "adapter")
    with pytest.raises(UnsupportedError, match=r"lm_head: this model ties lm_head.weight to model.embed_tokens.weight "
                                               r"\(tie_word_embeddings=true in its config.json\).*untie the model first"):
        ad.merge(state, model_config=config)
    # an untied model: the LoRA on lm_head merges as PEFT merges it
    model, state, config = _saved_llama(tmp_path / "untied", tie=False)
    pm_ = _quiet(peft.get_peft_model, model, peft.LoraConfig(target_modules=["lm_head"], init_lora_weights=False))
    _seeded(pm_, 8, only_trainable=True)
    _quiet(pm_.save_pretrained, tmp_path / "adapter2")
    want = _state(_quiet(pm_.merge_and_unload))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftMathWarning)
        _assert_states_close(pm.load_adapter(tmp_path / "adapter2").merge(state, model_config=config), want)
