"""LoRA on raw parameters (``LoraConfig.target_parameters``) against real PEFT 0.21.2: a tiny mixture-of-experts
block whose experts hold 3-D parameters ``gate_up_proj (E, H, 2I)`` and ``down_proj (E, I, H)`` (both targeted:
PEFT nests two ``ParamWrapper``; read with and without the experts module's ``is_transposed``) beside an
``nn.Linear`` targeted by ``target_modules``, and an MLP whose ``nn.Linear`` weight is targeted as a parameter.
PEFT saves -> peftmath merges equal to ``merge_and_unload`` and unmerges back; peftmath saves -> PEFT's
``from_pretrained`` gives the same model output as the PEFT model that trained it.

Tolerance: float32 sums of at most ~20 terms of size <= 10 here: ``1e-5·(1 + |want|)``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import n2t, require_peft, t2n

torch, peft = require_peft()

import peftmath as pm  # noqa: E402

pytestmark = [pytest.mark.parity]

E, H, I = 3, 4, 5


def _experts_class(transposed: bool):
    nn = torch.nn

    class Experts(nn.Module):
        """Per expert e: h = x @ gate_up_proj[e]; out = (relu(g) * u) @ down_proj[e] (weights stored (in, out))."""

        is_transposed = transposed

        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(E, H, 2 * I))
            self.down_proj = nn.Parameter(torch.zeros(E, I, H))

        def forward(self, x):  # x (E, T, H)
            g, u = torch.bmm(x, self.gate_up_proj).chunk(2, dim=-1)
            return torch.bmm(torch.relu(g) * u, self.down_proj)

    return Experts


def _moe(transposed: bool):
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = _experts_class(transposed)()
            self.lin = nn.Linear(H, H)

        def forward(self, x):
            return self.lin(self.experts(x))

    return Block()


def _mlp():
    nn = torch.nn

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.lin1 = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.lin1(torch.relu(self.lin0(x)))

    return Mlp()


CASES = {
    "moe": (lambda: _moe(False), dict(target_modules=["lin"], target_parameters=["experts.gate_up_proj",
                                                                                  "experts.down_proj"],
                                      rank_pattern={"experts.down_proj": 3}, alpha_pattern={"experts.gate_up_proj": 5}),
            lambda: torch.randn(E, 7, H)),
    "moe is_transposed": (lambda: _moe(True), dict(target_modules=["lin"], target_parameters=["down_proj",
                                                                                              "gate_up_proj"],
                                                   use_rslora=True), lambda: torch.randn(E, 7, H)),
    "mlp": (_mlp, dict(target_modules=["lin0"], target_parameters=["lin1.weight"]), lambda: torch.randn(5, 6)),
}


def _build(case: str, seed: int = 0):
    make, kw, data = CASES[case]
    torch.manual_seed(seed)
    model = make()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(n2t(rng.standard_normal(tuple(p.shape)).astype(np.float32)))
    state = {k: t2n(v).copy() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, **kw))
    pmodel.eval()
    torch.manual_seed(seed + 1)
    return pmodel, state, data()


def _close(got, want, what=""):
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert g.shape == w.shape, what
    assert np.all(np.abs(g - w) <= 1e-5 * (1 + np.abs(w))), (what, float(np.max(np.abs(g - w))))


def _saved(case: str, folder):
    """PEFT's model of ``case``, the base state, an input, PEFT's adapted output on it, and the adapter PEFT saved
    in ``folder`` as peftmath loads it."""
    pmodel, state, x = _build(case)
    with torch.no_grad():
        y_adapted = t2n(pmodel(x))
    pmodel.save_pretrained(folder)
    return pmodel, state, x, y_adapted, pm.load_adapter(folder)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_peftmath_merges(case, tmp_path):
    pmodel, state, x, y_adapted, ad = _saved(case, tmp_path / "ad")
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert ad.modules == sorted(n for n, m in pmodel.base_model.model.named_modules() if isinstance(m, BaseTunerLayer))
    merged = ad.merge(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = {k: t2n(v) for k, v in pmodel.merge_and_unload().state_dict().items()}
    assert sorted(merged) == sorted(want)
    for k in want:
        _close(merged[k], want[k], k)
        if k.endswith(("gate_up_proj", "down_proj")) or k in ("lin.weight", "lin1.weight"):
            assert not np.allclose(want[k], state[k])  # the adapter changes every targeted tensor
    back = ad.unmerge(merged)
    for k in state:
        _close(back[k], state[k], k)
    # the merged model computes what PEFT's adapted model computed
    model = CASES[case][0]()
    model.load_state_dict({k: n2t(np.asarray(v)) for k, v in merged.items()})
    with torch.no_grad():
        _close(t2n(model(x)), y_adapted, "merged forward")


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftmath_saves_peft_loads(case, tmp_path):
    _, state, x, y_adapted, ours = _saved(case, tmp_path / "theirs")
    pm.save_adapter(ours, tmp_path / "ours")
    model = CASES[case][0]()
    model.load_state_dict({k: n2t(v) for k, v in state.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(model, tmp_path / "ours")
    reloaded.eval()
    with torch.no_grad():
        _close(t2n(reloaded(x)), y_adapted, "PEFT output with peftmath's save")


def test_forward_of_linear_weight_target_matches_peft():
    """``lin1.weight`` targeted as a parameter of an nn.Linear: peftmath's module forward is PEFT's."""
    pmodel, state, _ = _build("mlp")
    ad = pm.Adapter(pm.io.peft.config_from_dict(pmodel.peft_config["default"].to_dict()),
                    {"lin1": {s: t2n(getattr(pmodel.base_model.model.lin1, f"lora_{s[5]}")["default"].weight)
                              for s in ("lora_A.weight", "lora_B.weight")},
                     "lin0": {s: t2n(getattr(pmodel.base_model.model.lin0, f"lora_{s[5]}")["default"].weight)
                              for s in ("lora_A.weight", "lora_B.weight")}})
    x = np.random.default_rng(9).standard_normal((4, 8)).astype(np.float32)
    with torch.no_grad():
        want = t2n(pmodel.base_model.model.lin1(n2t(x)))
    _close(ad.forward("lin1", x, state), want, "lin1 forward")
