"""LN tuning parity with Hugging Face PEFT 0.21.2 on LayerNorm and Linear targets: forward (LayerNorm with its
own eps), merge against ``merge_and_unload``, unmerge against PEFT's swap back, ``modules_to_save`` (PEFT's
merged model keeps its wrapper: the tensors are compared), checkpoints both ways and the trainable count."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    assert_saves_back_identically,
    base_state,
    build_model,
    load_peft_checkpoint,
    peft_forward,
    peft_layer,
    require_peft,
    t2n,
)

torch, peft = require_peft()

import peftmath as pmath  # noqa: E402
from peftmath.methods import ln_tuning  # noqa: E402

EPS = {"layernorm0": 10.0, "layernorm1": 1e-5}


def base_model():
    nn = torch.nn
    return build_model({"layernorm0": nn.LayerNorm(10, eps=EPS["layernorm0"]), "lin0": nn.Linear(10, 20),
                        "layernorm1": nn.LayerNorm(20, eps=EPS["layernorm1"]), "lin1": nn.Linear(20, 2)}, seed=0)


def make_peft(**config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(base_model(), peft.LNTuningConfig(**config))
    with torch.no_grad():  # a trained adapter: N(0, 0.3²) added to every trainable tensor
        rng = np.random.default_rng(1)
        for _, p in pmodel.named_parameters():
            if p.requires_grad:
                p.add_(torch.from_numpy(rng.normal(0.0, 0.3, tuple(p.shape)).astype(np.float32)))
    return pmodel.eval()


def _inputs(seed=5):
    rng = np.random.default_rng(seed)
    return {"layernorm0": rng.standard_normal((3, 4, 10)).astype(np.float32) * 2 + 1,
            "lin0": rng.standard_normal((3, 10)).astype(np.float32),
            "layernorm1": rng.standard_normal((5, 20)).astype(np.float32)}


def _merged(pmodel) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: t2n(v) for k, v in pmodel.merge_and_unload().state_dict().items()}


TARGETS = [["layernorm0"], ["lin0"], ["layernorm0", "lin0", "layernorm1"]]


@pytest.mark.parametrize("targets", TARGETS, ids="+".join)
def test_forward_merge_and_unmerge_match_peft(targets, tmp_path):
    pmodel = make_peft(target_modules=targets)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert isinstance(ad.config, ln_tuning.LNTuningConfig) and ad.modules == sorted(targets)
    state = base_state(base_model())
    xs = _inputs()
    for name in targets:
        kw = {"eps": EPS[name]} if name in EPS else {}
        np.testing.assert_allclose(ad.forward(name, xs[name], state, **kw), peft_forward(pmodel, name, xs[name]),
                                   atol=1e-5, rtol=1e-5, err_msg=name)
    records: dict = {}
    merged = ad.merge(state, records=records)
    pmodel.base_model.merge_adapter()
    swapped = {k: t2n(v) for k, v in pmodel.base_model.model.state_dict().items()}
    pmodel.base_model.unmerge_adapter()
    want = _merged(pmodel)
    assert sorted(merged) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(merged[key], value, err_msg=key)  # a replacement: bit for bit
    back = ad.unmerge(merged, records=records)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    for name in targets:  # PEFT's swapped-in copy is the merged tensor; its swap back the original
        assert np.array_equal(swapped[f"{name}.base_layer.weight"], merged[f"{name}.weight"])


def test_modules_to_save_tensors_match_peft_whose_merged_model_keeps_the_wrapper(tmp_path):
    pmodel = make_peft(target_modules=["layernorm0"], modules_to_save=["layernorm1"])
    ad = load_peft_checkpoint(pmodel, tmp_path)
    state = base_state(base_model())
    merged = ad.merge(state)
    want = _merged(pmodel)
    # PEFT 0.21.2's LN tuning unload does not unwrap modules_to_save (specs/ln_tuning.md, PEFT compatibility)
    assert "layernorm1.modules_to_save.default.weight" in want and "layernorm1.weight" not in want
    for leaf in ("weight", "bias"):
        np.testing.assert_array_equal(merged[f"layernorm1.{leaf}"], want[f"layernorm1.modules_to_save.default.{leaf}"])
        np.testing.assert_array_equal(merged[f"layernorm0.{leaf}"], want[f"layernorm0.{leaf}"])
        assert not np.array_equal(merged[f"layernorm1.{leaf}"], state[f"layernorm1.{leaf}"])


def test_checkpoints_both_ways(tmp_path):
    pmodel = make_peft(target_modules=["layernorm0", "lin0"])
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert_saves_back_identically(ad, tmp_path / "peft")
    pmath.save_adapter(ad, tmp_path / "ours")
    fresh = peft.PeftModel.from_pretrained(base_model(), tmp_path / "ours").eval()
    for name, x in _inputs().items():
        if name in ("layernorm0", "lin0"):
            np.testing.assert_array_equal(peft_forward(fresh, name, x), peft_forward(pmodel, name, x))
    assert peft_layer(fresh, "lin0").ln_tuning_layers["default"].weight.shape == (20, 10)


def test_trainable_parameter_count_matches_peft(tmp_path):
    pmodel = make_peft(target_modules=["layernorm0", "lin0", "layernorm1"])
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0] == 20 + 220 + 40
