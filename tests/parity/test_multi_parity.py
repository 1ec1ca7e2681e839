"""PEFT parity of multi-adapter use: the mixed-batch forward (adapter_names), stacked active adapters,
and merging several adapters in order."""

from __future__ import annotations

import warnings

import numpy as np

from tests.parity.conftest import base_state, require_peft

torch, peft = require_peft()

import peftmath as pm  # noqa: E402
from peftmath.multi import AdapterSet, mixed_batch_forward  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(12, 10)
        self.emb = torch.nn.Embedding(15, 12)

    def forward(self, ids):
        return self.lin(self.emb(ids))


def _setup(tmp_path, n=3):
    torch.manual_seed(0)
    model = Net().eval()
    base = base_state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(n):
            cfg = peft.LoraConfig(r=2 + i, lora_alpha=3 + 2 * i, target_modules=["lin", "emb"], init_lora_weights=False)
            if i == 0:
                pmodel = peft.get_peft_model(model, cfg, adapter_name="a0")
            else:
                pmodel.add_adapter(f"a{i}", cfg)
    pmodel.eval()
    ours = {}
    for i in range(n):
        pmodel.save_pretrained(tmp_path / "s", selected_adapters=[f"a{i}"])
        ours[f"a{i}"] = pm.load_adapter(tmp_path / "s" / f"a{i}")
    return pmodel, base, ours


def test_mixed_batch_matches_peft_adapter_names(tmp_path):
    pmodel, base, ours = _setup(tmp_path)
    names = ["a2", "__base__", "a0", "a1", "a0", "a2"]
    ids = torch.randint(0, 15, (6, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = pmodel(ids, adapter_names=names).numpy()
    h = mixed_batch_forward("emb", ids.numpy(), base, ours, names)
    y = mixed_batch_forward("lin", np.asarray(h), base, ours, names)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_stacked_active_adapters_match_peft(tmp_path):
    pmodel, base, ours = _setup(tmp_path)
    pmodel.base_model.set_adapter(["a0", "a2"])
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = pmodel.base_model.model.lin(x).numpy()
    s = AdapterSet(ours)
    s.set_active(["a0", "a2"])
    np.testing.assert_allclose(np.asarray(s.forward("lin", x.numpy(), base)), expected, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel.base_model.merge_adapter(["a0", "a2"])
    merged = s.merge(base)
    np.testing.assert_allclose(merged["lin.weight"], pmodel.base_model.model.lin.base_layer.weight.detach().numpy(),
                               rtol=1e-5, atol=1e-6)
