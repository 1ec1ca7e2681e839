"""`peftmath init`, every initialisation it accepts, judged by PEFT and transformers.

A tiny Llama (random weights from a config, no download) is saved in safetensors shards. For each
``--init`` value of each method the command accepts, ``peftmath init`` writes an adapter (and, when the
initialisation changes the base weights, ``--base-out NEW_BASE``); transformers loads NEW_BASE (or the
original folder) and ``PeftModel.from_pretrained`` loads the adapter onto it. Its logits must equal

* the original model's, when the initialisation is a no-op (PEFT's zeros) or moves the principal part
  of W into the adapter (PiSSA, OLoRA: ``W_res + s·BA = W``);
* in every case, the logits of the model whose weights are peftmath's merge of the same adapter into
  the same base (an independent computation: merged weights versus PEFT's unmerged forward).

Before the fix, PiSSA's saved config said ``"pissa"`` and PEFT ran PiSSA again on the residual base.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from tests.parity.conftest import require_peft

torch, peft = require_peft()
transformers = pytest.importorskip("transformers")

import peftmath as pm  # noqa: E402
from peftmath.cli import main  # noqa: E402
from peftmath.create import open_state  # noqa: E402

LLAMA = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
QV = ["--target", "q_proj", "--target", "v_proj"]
ADALORA = {"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "total_step": 10, "lora_alpha": 8,
           "target_modules": ["q_proj", "v_proj"]}
LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}

#: id -> (init arguments: flags, or a config dict for --config; what PEFT's logits must equal)
#:   "original": the original model's logits (a no-op adapter, or W_res + s·BA = W)
#:   "changed":  an adapter that changes the model (checked against peftmath's merge, and not a no-op)
#:   "loftq":    changed base and adapter; closer to the original than the quantized base alone
CASES = {
    "lora-default": (["--r", "4", "--alpha", "8", *QV], "original"),
    "lora-true": (["--r", "4", "--alpha", "8", "--init", "true", *QV], "original"),
    "lora-false": (["--r", "4", "--alpha", "8", "--init", "false", *QV], "changed"),
    "lora-gaussian": (["--r", "4", "--alpha", "8", "--init", "gaussian", *QV], "original"),
    "lora-orthogonal": (["--r", "4", "--alpha", "8", "--init", "orthogonal", *QV], "original"),
    "lora-pissa": (["--r", "4", "--alpha", "8", "--init", "pissa", *QV], "original"),
    "lora-pissa_niter_4": (["--r", "4", "--alpha", "8", "--init", "pissa_niter_4", *QV], "original"),
    "lora-olora": (["--r", "4", "--alpha", "8", "--init", "olora", "--target", "all-linear"], "original"),
    "lora-loftq": ({**LORA, "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}},
                   "loftq"),
    "dora-pissa": ({**LORA, "use_dora": True, "init_lora_weights": "pissa"}, "original"),
    "rslora-olora": ({**LORA, "use_rslora": True, "init_lora_weights": "olora"}, "original"),
    "dora-false": ({**LORA, "use_dora": True, "init_lora_weights": False}, "changed"),
    "adalora-true": (ADALORA, "original"),
    "adalora-false": ({**ADALORA, "init_lora_weights": False}, "changed"),
    "ia3-default-targets-true": (["--method", "ia3", "--init", "true"], "original"),
    "ia3-default-targets-false": (["--method", "ia3", "--init", "false"], "changed"),
    "loha-true": (["--method", "loha", "--r", "4", "--alpha", "8", "--init", "true", *QV], "original"),
    "loha-false": (["--method", "loha", "--r", "4", "--alpha", "8", "--init", "false", *QV], "changed"),
    "lokr-true": (["--method", "lokr", "--r", "4", "--alpha", "8", "--init", "true", *QV], "original"),
    "lokr-false": (["--method", "lokr", "--r", "4", "--alpha", "8", "--init", "false", *QV], "changed"),
    "lokr-lycoris": (["--method", "lokr", "--r", "4", "--alpha", "8", "--init", "lycoris", *QV], "original"),
    "oft-true": (["--method", "oft", "--init", "true", *QV], "original"),
    "oft-false": (["--method", "oft", "--init", "false", *QV], "changed"),
    "oft-r-false": (["--method", "oft", "--r", "4", "--init", "false", *QV], "changed"),
    "boft-true": (["--method", "boft", "--init", "true", *QV], "original"),
    "boft-false": (["--method", "boft", "--init", "false", *QV], "changed"),
    "vera-true": (["--method", "vera", "--r", "4", "--init", "true", *QV], "original"),
    "vera-false": (["--method", "vera", "--r", "4", "--init", "false", *QV], "changed"),
}

#: initialisations PEFT has and peftmath refuses (they need data, a quantizer or gradients)
REFUSED = {"eva": "needs data", "corda": "needs data", "lora_ga": "needs data", "mica": "needs data",
           "pissa_niter_x": "must be one of", "bogus": "must be one of"}

BASE_CHANGING = ("pissa", "olora", "loftq")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(folder of the saved model, its logits on fixed input ids, the input ids)."""
    folder = tmp_path_factory.mktemp("init-parity") / "llama"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
        model.save_pretrained(folder, max_shard_size="20KB")  # several shards, an index, config.json
    assert len(list(folder.glob("*.safetensors"))) > 1
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
    return folder, _logits(model, ids), ids


def _logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids).logits.double().numpy()


def _load_base(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM.from_pretrained(folder).eval()


def _merged_model(folder, adapter):
    """A Llama whose weights are peftmath's merge of ``adapter`` into the model at ``folder``."""
    state, _ = open_state(folder)
    merged = pm.load_adapter(adapter).merge(state)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    missing, unexpected = model.load_state_dict({k: torch.tensor(np.array(v)) for k, v in merged.items()},
                                                strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def _init_argv(tmp_path, spec) -> list:
    if isinstance(spec, dict):
        cfg = tmp_path / "adapter_config.json"
        cfg.write_text(json.dumps(spec))
        return ["--config", cfg]
    return list(spec)


@pytest.mark.parametrize("case", list(CASES))
def test_init_loads_in_peft_with_the_expected_logits(tmp_path, llama, case, capsys):
    folder, original, ids = llama
    spec, expect = CASES[case]
    argv = _init_argv(tmp_path, spec)
    init = str(spec.get("init_lora_weights", "")) if isinstance(spec, dict) else " ".join(map(str, spec))
    changes_base = any(s in init for s in BASE_CHANGING)
    new_base = tmp_path / "new-base"
    out = tmp_path / "adapter"
    extra = ["--base-out", new_base] if changes_base else []
    rc = main([str(a) for a in ["init", folder, *argv, "-o", out, "-q", *extra]])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert new_base.exists() == changes_base
    base = new_base if changes_base else folder

    saved = json.loads((out / "adapter_config.json").read_text())
    if changes_base:  # the factors belong to NEW_BASE: PEFT must not initialise them (and the base) again
        assert saved["init_lora_weights"] is True and not saved.get("loftq_config")
        assert json.loads((base / "config.json").read_text()) == json.loads((folder / "config.json").read_text())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_load_base(base), out).eval()
    got = _logits(loaded, ids)
    reference = _logits(_merged_model(base, out), ids)
    np.testing.assert_allclose(got, reference, atol=2e-5, rtol=1e-5)
    distance = np.abs(got - original).max()
    if expect == "original":
        np.testing.assert_allclose(got, original, atol=2e-5, rtol=1e-5)
    elif expect == "changed":
        assert distance > 1e-3, distance  # the comparison with the merge is not between two no-ops
    else:  # LoftQ: the adapter corrects part of the quantization error of the new base
        quantized_only = np.abs(_logits(_load_base(base), ids) - original).max()
        assert 0 < distance < quantized_only, (distance, quantized_only)


@pytest.mark.parametrize("init", list(REFUSED))
def test_unsupported_init_is_refused_in_one_line(tmp_path, llama, init, capsys):
    folder, _, _ = llama
    out = tmp_path / "adapter"
    rc = main([str(a) for a in ["init", folder, "--r", "4", "--init", init, "--base-out", tmp_path / "nb", "-o", out]])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("peftmath: error: "), err
    assert REFUSED[init] in lines[0] and init.split("_niter_")[0] in lines[0]
    assert not out.exists() and not (tmp_path / "nb").exists()
