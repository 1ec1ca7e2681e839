"""`peftmath merge` end to end, judged by transformers and PEFT: the merged folder loads with
``AutoModelForCausalLM.from_pretrained`` and gives the logits of PEFT's ``merge_and_unload``.

Tiny models are built from a config with random weights (no download) and saved in safetensors shards
with ``save_pretrained``; PEFT adapters are made with ``get_peft_model`` and saved with
``save_pretrained``, every trained tensor redrawn so that nothing is zero or an identity: LoRA factors,
DoRA magnitudes, ``lora_bias``, and the biases trained with ``bias="lora_only"`` / ``"all"`` (which the
checkpoint carries as ``<module>.base_layer.bias`` and which PEFT loads into the base layer before
merging). A merge that kept the base biases was 0.10 off in the logits.

Tolerance (float32): each merged weight differs from PEFT's by a few roundings of ``|W| + |s·B·A|``
(another summation order of a rank-4 product), ``<= 8·eps·max|W|`` per entry. Through a 2-layer model
of width 16 (fan-in <= 32 per product, a handful of products per layer, softmax and RMSNorm being
1-Lipschitz-like at these scales) that gives a logit error well under ``1e-5·(1 + max|logit|)``; measured: 0
(bit-identical logits) for LoRA with trained biases and lora_bias, and for GPT-2; 7e-8 for DoRA. The
non-vacuity check asserts that dropping the trained biases moves the logits by more than 100 times that
tolerance.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from tests.cli.test_hub_cache import hub_snapshot
from tests.parity.conftest import randomize_adapter, require_peft

torch, peft = require_peft()
transformers = pytest.importorskip("transformers")

from peftmath.cli import main  # noqa: E402
from peftmath.io.stream import PROVENANCE_KEY, records_path  # noqa: E402

LLAMA = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
GPT2 = dict(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=32)
EPS_TOL = 1e-5

#: variant -> (model family, PEFT LoraConfig fields)
VARIANTS = {
    "bias=lora_only": ("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"], bias="lora_only")),
    "bias=all+lora_bias": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], bias="all",
                                         lora_bias=True)),
    "dora": ("llama", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"], use_dora=True)),
    "dora+bias=lora_only": ("llama", dict(target_modules=["q_proj", "v_proj"], use_dora=True, bias="lora_only")),
    "gpt2+bias=lora_only": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], bias="lora_only",
                                         fan_in_fan_out=True)),
}


def _model(family: str):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family == "gpt2":
            return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).eval()
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


def _save(model, folder, shard: str = "20KB"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, max_shard_size=shard)


def _logits(model) -> np.ndarray:
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits.detach().numpy().astype(np.float64)


def _load(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _peft_adapter(family: str, fields: dict, folder):
    """A PEFT adapter with every trained tensor redrawn, saved to ``folder``; returns PEFT's merged model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_model(family), peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights=False,
                                                                 **fields))
    randomize_adapter(pm, seed=11)
    rng = np.random.default_rng(12)
    trained = []
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and name.endswith("bias") and "lora_" not in name:  # bias="lora_only" / "all"
                p.add_(torch.from_numpy(rng.normal(0.0, 0.3, tuple(p.shape)).astype(np.float32)))
                trained.append(name)
    assert bool(trained) == ("bias" in fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(folder)
        return pm.merge_and_unload()


def _tol(ref: np.ndarray) -> float:
    return EPS_TOL * (1.0 + float(np.max(np.abs(ref))))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merged_folder_loads_in_transformers_with_peft_logits(tmp_path, variant):
    family, fields = VARIANTS[variant]
    base = tmp_path / "base"
    _save(_model(family), base)
    merged_by_peft = _peft_adapter(family, fields, tmp_path / "adapter")
    ref = _logits(merged_by_peft)
    out = tmp_path / "merged"
    assert main(["merge", str(base), str(tmp_path / "adapter"), "-o", str(out), "-q"]) == 0
    # OUT is exactly a model folder: what save_pretrained wrote, nothing more (records lie beside it)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    assert records_path(out).exists() == bool(fields.get("use_dora"))
    got = _logits(_load(out))
    diff = float(np.max(np.abs(got - ref)))
    assert diff <= _tol(ref), (variant, diff, _tol(ref))
    if "bias" in fields:  # non-vacuity: the trained biases matter far beyond the tolerance
        import peftmath as pm
        from peftmath.create import open_state

        from peftmath.targets import module_kinds

        state, model_type = open_state(base)
        ad = pm.load_adapter(tmp_path / "adapter")
        ad.other, ad.model_type = {}, model_type
        kinds = {m: k for m, k in module_kinds(state, model_type=model_type).items() if m in ad.params}
        without = ad.merge(state, layer_kinds=kinds)
        model = _model(family)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in without.items()}, strict=False)
        assert float(np.max(np.abs(_logits(model) - ref))) > 100 * _tol(ref)
    # the shards say what was merged (and transformers loaded them all the same)
    from peftmath.io.safetensors import SafeTensorsFile

    entries = json.loads(SafeTensorsFile(next(out.glob("*.safetensors"))).metadata[PROVENANCE_KEY])
    assert [e["adapter"] for e in entries] == ["adapter"]


def test_dora_unmerge_gives_the_base_back_in_transformers(tmp_path):
    base = tmp_path / "base"
    _save(_model("llama"), base)
    _peft_adapter("llama", VARIANTS["dora"][1], tmp_path / "adapter")
    assert main(["merge", str(base), str(tmp_path / "adapter"), "-o", str(tmp_path / "m"), "-q"]) == 0
    assert main(["unmerge", str(tmp_path / "m"), str(tmp_path / "adapter"), "-o", str(tmp_path / "u"), "-q"]) == 0
    ref = _logits(_load(base))
    got = _logits(_load(tmp_path / "u"))
    assert float(np.max(np.abs(got - ref))) <= _tol(ref)


@pytest.mark.parametrize("shard", ["20KB", "1GB"], ids=["sharded", "single-file"])
def test_hub_cache_snapshot_merges_and_loads(tmp_path, shard):
    """A snapshot folder of symlinks into blobs/ (the hub cache): the output is a plain model folder
    that from_pretrained loads (config.json and generation_config.json copied), with PEFT's logits."""
    family, fields = VARIANTS["bias=lora_only"]
    plain = tmp_path / "plain"
    _save(_model(family), plain, shard)
    assert (plain / "model.safetensors").exists() == (shard == "1GB")
    snap = hub_snapshot(plain, tmp_path / "hub")
    ref = _logits(_peft_adapter(family, fields, tmp_path / "adapter"))
    out = tmp_path / "merged"
    assert main(["merge", str(snap), str(tmp_path / "adapter"), "-o", str(out), "-q"]) == 0
    assert {"config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert not any(p.is_symlink() for p in out.iterdir())
    got = _logits(_load(out))
    assert float(np.max(np.abs(got - ref))) <= _tol(ref)
