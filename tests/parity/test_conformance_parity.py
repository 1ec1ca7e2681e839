"""PEFT 0.21.2's ``adapter_names`` forward against the mixed-batch conformance cases
(peftmath.conformance): the cases describe what PEFT computes."""

from __future__ import annotations

import warnings

import numpy as np

from tests.parity.conftest import require_peft

torch, peft = require_peft()

from peftmath.conformance import assert_mixed_batch, mixed_batch_cases  # noqa: E402


def test_peft_adapter_names_forward_conforms():
    """PEFT 0.21.2's own ``adapter_names`` forward passes the float32 cases."""
    def forward(case):
        out_f, in_f = case.weight.shape
        net = torch.nn.Sequential()
        net.add_module("lin", torch.nn.Linear(in_f, out_f))
        with torch.no_grad():
            net.lin.weight.copy_(torch.from_numpy(np.asarray(case.weight)))
            net.lin.bias.copy_(torch.from_numpy(np.asarray(case.bias)))
        model = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, (A, B, s) in case.adapters.items():
                r = A.shape[0]
                cfg = peft.LoraConfig(r=r, lora_alpha=s * r, target_modules=["lin"])
                if model is None:
                    model = peft.get_peft_model(net, cfg, adapter_name=name)
                else:
                    model.add_adapter(name, cfg)
                layer = model.base_model.model.lin
                with torch.no_grad():
                    layer.lora_A[name].weight.copy_(torch.from_numpy(np.asarray(A)))
                    layer.lora_B[name].weight.copy_(torch.from_numpy(np.asarray(B)))
        model.eval()
        with torch.no_grad():
            return model(torch.from_numpy(np.asarray(case.x)), adapter_names=list(case.names)).numpy()

    assert_mixed_batch(forward, mixed_batch_cases(dtypes=("float32",)))
