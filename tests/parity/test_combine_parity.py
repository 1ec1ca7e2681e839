"""PEFT parity of add_weighted_adapter for every combination type (peftmath.combine)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import peft_layer, require_peft

torch, peft = require_peft()

import peftmath as pm  # noqa: E402
from peftmath.combine import COMBINATION_TYPES, combine  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(12, 10)
        self.emb = torch.nn.Embedding(14, 6)
        self.conv = torch.nn.Conv2d(3, 5, 3)
        self.pw = torch.nn.Conv2d(4, 6, 1)

    def forward(self, x):
        return self.lin(x)


TARGETS = ["lin", "emb", "conv", "pw"]


def _peft_model(configs, seed=0):
    torch.manual_seed(seed)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(model, configs[0], adapter_name="a0")
        for i, cfg in enumerate(configs[1:], start=1):
            pmodel.add_adapter(f"a{i}", cfg)
    return pmodel


def _ours(pmodel, names, tmp_path):
    out = []
    for n in names:
        pmodel.save_pretrained(tmp_path / "saved", selected_adapters=[n])
        folder = tmp_path / "saved" if n == "default" else tmp_path / "saved" / n
        out.append(pm.load_adapter(folder))
    return out


def _compare(pmodel, ours, new_name, modules, rtol=1e-5, atol=1e-6):
    for m in modules:
        layer = peft_layer(pmodel, m)
        if new_name not in layer.lora_A and new_name not in layer.lora_embedding_A:
            continue
        expected = layer.get_delta_weight(new_name).detach().numpy()
        np.testing.assert_allclose(np.asarray(ours.delta_weight(m)), expected, rtol=rtol, atol=atol, err_msg=m)


def _configs(ranks=(4, 4), rslora=False, alphas=(6, 3)):
    return [peft.LoraConfig(r=r, lora_alpha=a, target_modules=TARGETS, init_lora_weights=False, use_rslora=rslora)
            for r, a in zip(ranks, alphas)]


@pytest.mark.parametrize("ctype", ["cat", "linear", "ties", "magnitude_prune", "svd", "ties_svd",
                                   "magnitude_prune_svd"])
def test_deterministic_types_match_peft(tmp_path, ctype):
    pmodel = _peft_model(_configs())
    ours_in = _ours(pmodel, ["a0", "a1"], tmp_path)
    weights = [0.7, -0.4]
    kw = dict(density=0.6) if "prune" in ctype or "ties" in ctype else {}
    pmodel.add_weighted_adapter(["a0", "a1"], weights, "new", combination_type=ctype, **kw)
    ours = combine(ours_in, weights, combination_type=ctype, **kw)
    assert ours.config.r == (8 if ctype == "cat" else 4)
    _compare(pmodel, ours, "new", TARGETS, atol=2e-5)


@pytest.mark.parametrize("ctype", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_types_match_peft_with_the_same_masks(tmp_path, ctype, monkeypatch):
    pmodel = _peft_model(_configs())
    ours_in = _ours(pmodel, ["a0", "a1"], tmp_path)
    rng = np.random.default_rng(3)
    masks: dict[str, list] = {}

    for module in TARGETS:  # one module at a time, so that both draw their masks in the same order
        drawn: list[np.ndarray] = []

        def source(shape, drawn=drawn):
            m = rng.random(shape) < 0.5
            drawn.append(m)
            return m

        single = [pm.Adapter(a.config, {module: a.params[module]}) for a in ours_in]
        ours = combine(single, [0.8, 0.5], combination_type=ctype, density=0.5, mask_source=source)
        masks[module] = (ours, drawn)

    queue: list[np.ndarray] = []

    def bernoulli(p, *args, **kwargs):
        return torch.tensor(queue.pop(0), dtype=p.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    for module in TARGETS:
        ours, drawn = masks[module]
        queue.extend(drawn)
        sub = _peft_model(_configs())
        for cfg_name in ("a0", "a1"):  # the same factors as the source adapters
            for m in TARGETS:
                for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
                    src = getattr(peft_layer(pmodel, m), attr)
                    if cfg_name in src:
                        dst = getattr(peft_layer(sub, m), attr)[cfg_name]
                        (dst.weight if hasattr(dst, "weight") else dst).data.copy_(
                            src[cfg_name].weight if hasattr(src[cfg_name], "weight") else src[cfg_name])
        for c in sub.peft_config.values():
            c.target_modules = {module}
        sub.add_weighted_adapter(["a0", "a1"], [0.8, 0.5], "new", combination_type=ctype, density=0.5)
        assert not queue
        _compare(sub, ours, "new", [module], atol=2e-5)


def test_inherited_rslora_overscaling_is_reproduced_only_with_peft_compat(tmp_path):
    pmodel = _peft_model(_configs(rslora=True))
    ours_in = _ours(pmodel, ["a0", "a1"], tmp_path)
    pmodel.add_weighted_adapter(["a0", "a1"], [1.0, 1.0], "new", combination_type="cat")
    compat = combine(ours_in, [1.0, 1.0], combination_type="cat", peft_compat=True)
    _compare(pmodel, compat, "new", TARGETS)
    consistent = combine(ours_in, [1.0, 1.0], combination_type="cat")
    exact = sum(np.asarray(a.delta_weight("lin")) for a in ours_in)
    np.testing.assert_allclose(np.asarray(consistent.delta_weight("lin")), exact, rtol=1e-5, atol=1e-6)
    ratio = np.asarray(compat.delta_weight("lin")) / np.asarray(consistent.delta_weight("lin"))
    np.testing.assert_allclose(ratio, np.sqrt(8), rtol=1e-5)   # √(new_rank), new_rank = 4 + 4


def test_ia3_combination_matches_peft(tmp_path):
    torch.manual_seed(0)
    model = Net()
    cfgs = [peft.IA3Config(target_modules=["lin", "conv"], feedforward_modules=["lin"], init_ia3_weights=False)
            for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(model, cfgs[0], adapter_name="a0")
        pmodel.add_adapter("a1", cfgs[1])
    ours_in = _ours(pmodel, ["a0", "a1"], tmp_path)
    pmodel.add_weighted_adapter(["a0", "a1"], [0.3, 0.9], "new")
    ours = combine(ours_in, [0.3, 0.9])
    for m in ("lin", "conv"):
        np.testing.assert_allclose(np.asarray(ours.params[m]["ia3_l"]),
                                   peft_layer(pmodel, m).ia3_l["new"].detach().numpy(), rtol=1e-6)


def test_all_types_listed():
    assert set(COMBINATION_TYPES) == {"cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
                                      "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"}
