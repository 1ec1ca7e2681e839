"""`peftmath merge --max-shard-size`: transformers' ``from_pretrained`` loads the resharded tiny Llama, whose
logits are those of PEFT's ``merge_and_unload`` (tolerance and its derivation: test_merge_parity_e2e), and
whose tensors are bit for bit those of the merge written in the base's own layout."""

from __future__ import annotations

import json

import numpy as np

from tests.parity.conftest import require_peft

torch, peft = require_peft()

from peftmath.cli import main  # noqa: E402
from peftmath.io.stream import INDEX_NAME, open_model  # noqa: E402
from tests.parity.test_merge_parity_e2e import _load, _logits, _model, _peft_adapter, _save, _tol  # noqa: E402


def test_resharded_merge_loads_in_transformers(tmp_path):
    base = tmp_path / "base"
    _save(_model("llama"), base, shard="20KB")
    ref = _logits(_peft_adapter("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"]), tmp_path / "adapter"))
    assert main(["merge", str(base), str(tmp_path / "adapter"), "-o", str(tmp_path / "plain"), "-q"]) == 0
    out = tmp_path / "resharded"
    assert main(["merge", str(base), str(tmp_path / "adapter"), "-o", str(out), "--max-shard-size", "9KB", "-q"]) == 0
    names = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(names)
    assert n != len(list(base.glob("*.safetensors"))) and n > 2
    assert names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(json.loads((out / INDEX_NAME).read_text())["weight_map"].values()) == set(names)
    assert (out / "config.json").exists()
    got = _logits(_load(out))
    assert float(np.max(np.abs(got - ref))) <= _tol(ref)
    a, b = open_model(out), open_model(tmp_path / "plain")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert np.array_equal(np.asarray(a.read(k)), np.asarray(b.read(k))), k
