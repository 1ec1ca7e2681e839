"""The demo's rows for LoRA's trainable_token_indices and layer_replication (issue 18) against PEFT 0.21.2: the
adapter folders ``peftmath demo`` writes load with ``PeftModel.from_pretrained`` (no missing or unexpected key) onto a
torch model holding the demo model's tensors, and PEFT's model is the one the demo's merged file holds:
``merge_and_unload`` for the trainable tokens (rows replaced, LoRA's factors added), the unmerged forward of every
replicated layer for layer_replication (PEFT's own merge adds both copies' ΔW into the one weight they share,
specs/lora.md section 12)."""

from __future__ import annotations

import io
import json
import types
import warnings
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from tests.parity.conftest import load_in_peft, n2t, require_peft, t2n

torch, peft = require_peft()

from peftmath.demo import run_demo  # noqa: E402
from peftmath.io.safetensors import load_file  # noqa: E402

pytestmark = [pytest.mark.parity]


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(24, 16, bias=False)
        self.ln = torch.nn.LayerNorm(24, bias=False)


class DemoModel(torch.nn.Module):
    """The demo model's modules these two rows use (a Llama-like ``layers`` stack and a config, as PEFT's
    replicate_layers wants), loaded from its model.safetensors."""

    def __init__(self, state):
        super().__init__()
        self.config = types.SimpleNamespace(num_hidden_layers=3, model_type="custom", to_dict=lambda: {})
        self.embed = torch.nn.Embedding(40, 24)
        self.fc_in = torch.nn.Linear(24, 32)
        self.fc_out = torch.nn.Linear(32, 24, bias=False)
        self.layers = torch.nn.ModuleList([Block() for _ in range(3)])
        self.load_state_dict({k: n2t(state[k]) for k in self.state_dict()})
        self.eval()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo") / "d"
    with redirect_stdout(io.StringIO()) as out, redirect_stderr(io.StringIO()):
        assert run_demo(str(d), quiet=True, json_output=True) == 0
    rows = {e["example"]: e for e in json.loads(out.getvalue())["examples"]}
    return d, rows, load_file(d / "model.safetensors")


def _peft(state, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_in_peft(DemoModel(state), str(folder))


def test_trainable_tokens_row_is_peft_s_merge(demo):
    d, rows, state = demo
    assert rows["LoRA trainable_token_indices"]["check"] == "ok"
    pmodel = _peft(state, d / "adapter-lora-trainable-token-indices")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = {k: t2n(v) for k, v in pmodel.merge_and_unload().state_dict().items()}
    merged = load_file(d / "merged-lora-trainable-token-indices.safetensors")
    assert sorted(theirs) == sorted(k for k in DemoModel(state).state_dict())
    for k, w in theirs.items():
        if k == "embed.weight":  # rows copied: exact
            assert np.array_equal(merged[k], w)
            assert sorted(np.flatnonzero(np.any(w != state[k], axis=1))) == [1, 5, 6, 7, 30]
        else:
            np.testing.assert_allclose(merged[k], w, rtol=1e-5, atol=1e-6, err_msg=k)


def test_layer_replication_row_is_peft_s_model(demo):
    """(Loaded once: PEFT 0.21.2 replicates the layers again for every adapter loaded with layer_replication, so
    load_in_peft's second load would stack copies of copies: new layer 3 becomes a copy of base layer 1.)"""
    d, rows, state = demo
    assert rows["LoRA layer_replication"]["check"] == "ok"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pmodel = peft.PeftModel.from_pretrained(DemoModel(state), str(d / "adapter-lora-layer-replication")).eval()
    msgs = [str(w.message) for w in caught]
    assert not [m for m in msgs if any(s in m.lower() for s in ("missing", "unexpected", "not present"))], msgs
    layers = pmodel.base_model.model.layers
    assert len(layers) == 4
    merged = load_file(d / "merged-lora-layer-replication.safetensors")
    x = np.random.default_rng(0).standard_normal((5, 24)).astype(np.float32)
    outs = []
    with torch.no_grad():
        for j, layer in enumerate(layers):
            y = t2n(layer.q(n2t(x)))
            np.testing.assert_allclose(x @ merged[f"layers.{j}.q.weight"].T, y, rtol=1e-5, atol=1e-5, err_msg=str(j))
            assert np.array_equal(merged[f"layers.{j}.ln.weight"], t2n(layer.ln.weight))
            outs.append(y)
    # the two copies of base layer 1 share its weight in PEFT and differ by their own adapters
    assert layers[1].q.base_layer.weight is layers[2].q.base_layer.weight
    assert np.max(np.abs(outs[1] - outs[2])) > 1e-3
