"""`peftmath init` on a safetensors base with LoRA's target_parameters against PEFT 0.21.2 (issue 18): the adapter
written with ``--parameter-order`` (the experts' registration order, which the file's sorted keys lose) and
``--is-transposed`` loads with ``PeftModel.from_pretrained`` without missing or unexpected keys, onto the torch model
whose state the base holds, and PEFT's ``merge_and_unload`` equals peftmath's merge (float32 round-off). (Without
``--parameter-order`` the command refuses such a base: tests/cli/test_init_target_parameters.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.parity.conftest import require_peft

torch, peft = require_peft()

import peftmath as pm  # noqa: E402
from peftmath.cli import main  # noqa: E402
from peftmath.io.safetensors import save_file  # noqa: E402
from tests.parity.test_create_lora_special_parity import _build, _close, _merged_by_peft, _state  # noqa: E402

pytestmark = [pytest.mark.parity]


@pytest.mark.parametrize("case, flags", [
    ("experts nested, patterns", ["--parameter-order", "gate_up_proj,down_proj", "--no-is-transposed"]),
    ("transposed experts", ["--parameter-order", "gate_up_proj,down_proj", "--is-transposed"]),
])
def test_init_output_loads_in_peft_and_merges_as_peftmath(case, flags, tmp_path):
    state = _state(_build(case))
    save_file(state, tmp_path / "model.safetensors")  # sorted keys: down_proj before gate_up_proj
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "init_lora_weights": False,
           "target_parameters": ["experts.down_proj", "gate_up_proj"]}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "adapter"
    assert main(["init", str(tmp_path / "model.safetensors"), "--config", str(tmp_path / "cfg.json"), *flags,
                 "-o", str(out), "-q"]) == 0
    want = _merged_by_peft(case, out)  # load_in_peft: no missing / unexpected keys
    got = {k: np.asarray(v) for k, v in pm.load_adapter(out).merge(state).items()}
    assert sorted(got) == sorted(want)
    assert [k for k in state if not np.array_equal(want[k], state[k])] == ["experts.gate_up_proj", "experts.down_proj"]
    for k in want:
        _close(got[k], want[k], k)
