"""A new VeLoRA / MonteCLoRA adapter made by peftmath (``create_adapter``, ``peftmath init``) against PEFT 0.21.2:
it saves the keys, shapes and dtypes PEFT's ``get_peft_model`` + ``save_pretrained`` write (the training-state
tensors included, also on a bfloat16 base), ``PeftModel.from_pretrained`` loads it with no missing or unexpected key
and holds exactly the saved tensors, and PEFT's eval forward and ``merge_and_unload`` equal peftmath's. (Before
peftmath created these tensors, PEFT loaded its adapters with "Found missing adapter keys".)"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from tests.parity.conftest import load_in_peft, n2t, require_peft, t2n, two_linear_inputs, two_linear_model

torch, peft = require_peft()

import peftmath as pm  # noqa: E402
from peftmath.cli import main  # noqa: E402
from peftmath.io import config_from_dict  # noqa: E402
from peftmath.io.safetensors import load_file, save_file  # noqa: E402

pytestmark = [pytest.mark.parity]

SIZES = (12, 8, 16)
VARIANTS = {
    "VeLoRA random": {"velora_config": {"num_groups": 5, "scale": 1.0, "init_type": "random"}},
    "VeLoRA batch_average": {"velora_config": {"num_groups": 3, "init_type": "batch_average"}},
    "VeLoRA defaults": {"velora_config": {}},
    "MonteCLoRA": {"monteclora_config": {"num_samples": 3, "buffer_size": 2}},
}


def _config(variant):
    return {"r": 4, "lora_alpha": 6, "target_modules": ["lin0", "lin1"], "init_lora_weights": False,
            **VARIANTS[variant]}


def _peft_saved(variant, folder, dtype=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(two_linear_model(SIZES, dtype=dtype), peft.LoraConfig(**_config(variant)))
        model.save_pretrained(folder)
    return load_file(folder / "adapter_model.safetensors")


def _state(dtype=None):
    return {k: t2n(v) for k, v in two_linear_model(SIZES, dtype=dtype).state_dict().items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_created_adapter_is_complete_and_loads_in_peft(variant, dtype, tmp_path):
    tdtype = getattr(torch, dtype) if dtype else None
    theirs = _peft_saved(variant, tmp_path / "peft", tdtype)
    state = _state(tdtype)
    ours = pm.create_adapter(state, config_from_dict({"peft_type": "LORA", **_config(variant)}), seed=2)
    pm.save_adapter(ours, tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in saved.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    # PEFT's fresh state where it is deterministic: zeros (batch_average), the sampler's identity and 1/n weights
    for k, v in theirs.items():
        if k.endswith(("gaussian_var_prior", "expert_weights")) or "batch_average" in variant or "defaults" in variant:
            if "lora_A" not in k and "lora_B" not in k:
                assert np.array_equal(saved[k], v), k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = two_linear_model(SIZES, dtype=tdtype)
    pmodel = load_in_peft(base, str(tmp_path / "ours"))  # no missing / unexpected keys
    loaded = {k.replace(".default", ""): t2n(v) for k, v in pmodel.state_dict().items() if "lora_" in k}
    for k, v in saved.items():  # PEFT holds the saved tensors (in the dtypes it made them in)
        assert np.array_equal(loaded[k].astype(np.float64), np.asarray(v).astype(np.float64)), k
    if dtype:
        return
    xs = two_linear_inputs(SIZES)
    with torch.no_grad():
        for name, x in xs.items():
            want = t2n(pmodel.base_model.model.get_submodule(name)(n2t(x)))
            got = np.asarray(ours.forward(name, x, state))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        merged = {k: t2n(v) for k, v in pmodel.merge_and_unload().state_dict().items()}
    ref = ours.merge(state)
    for k, v in merged.items():
        np.testing.assert_allclose(np.asarray(ref[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("variant", ["VeLoRA random", "MonteCLoRA"])
def test_init_command_writes_the_complete_adapter(variant, tmp_path):
    save_file(_state(), tmp_path / "model.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps({"peft_type": "LORA", **_config(variant)}))
    assert main(["init", str(tmp_path / "model.safetensors"), "--config", str(tmp_path / "cfg.json"), "-o",
                 str(tmp_path / "a"), "-q"]) == 0
    theirs = _peft_saved(variant, tmp_path / "peft")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(theirs)
    load_in_peft(two_linear_model(SIZES), str(tmp_path / "a"))
