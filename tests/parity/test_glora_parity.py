"""GLoRA parity with Hugging Face PEFT 0.21.2: forward, merge (weight and bias) and unmerge against PEFT's
layers for every support form, a bias-less layer, checkpoints both ways and the trainable-parameter count."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    assert_saves_back_identically,
    check_reloaded_in_peft,
    load_peft_checkpoint,
    peft_forward,
    peft_layer,
    peft_weights,
    redraw,
    require_peft,
    t2n,
    two_linear_inputs,
    two_linear_model,
)

torch, peft = require_peft()

from peftmath.methods import glora  # noqa: E402

MODULES = ("lin0", "lin1")
SIZES = (12, 10, 7)
FORMS = [dict(), dict(config_A_B="vector", config_C="vector", config_D_E="vector"),
         dict(config_A_B="constant", config_C="none", config_D_E="constant", r=3),
         dict(config_A_B="none", config_C="lora", config_D_E="none", r=2)]


def base_model(seed=0, *, bias=True):
    model = two_linear_model(SIZES, seed=seed)
    if not bias:
        model.lin1 = torch.nn.Linear(SIZES[1], SIZES[2], bias=False)
        redraw(model.lin1, seed=seed + 1)
    return model


def make_peft(*, bias=True, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(base_model(bias=bias),
                                     peft.GloraConfig(target_modules=list(MODULES), init_weights=False, **config))
    with torch.no_grad():  # trained: every support away from its initial value (constants included)
        rng = np.random.default_rng(3)
        for _, p in pmodel.named_parameters():
            if p.requires_grad:
                p.add_(torch.from_numpy(rng.normal(0.0, 0.2, tuple(p.shape)).astype(np.float32)))
    return pmodel.eval()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "lin1-no-bias"])
@pytest.mark.parametrize("config", FORMS, ids=lambda c: "-".join(str(v) for v in c.values()) or "default")
def test_forward_merge_unmerge_as_peft(config, bias, tmp_path):
    pmodel = make_peft(bias=bias, **config)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert isinstance(ad.config, glora.GloraConfig)
    state = peft_weights(pmodel, MODULES)
    xs = two_linear_inputs(SIZES)
    for name in MODULES:
        np.testing.assert_allclose(ad.forward(name, xs[name], state), peft_forward(pmodel, name, xs[name]),
                                   atol=2e-5, rtol=1e-5)
    merged = ad.merge(state)
    with torch.no_grad():
        for name in MODULES:
            peft_layer(pmodel, name).merge()
        want = {f"{n}.{k}": t2n(v) for n in MODULES for k, v in peft_layer(pmodel, n).get_base_layer()
                .state_dict().items()}
    assert set(want) <= set(merged)
    for key, w in want.items():
        np.testing.assert_allclose(merged[key], w, atol=2e-5, rtol=1e-5, err_msg=key)
    assert max(np.abs(w - state[k]).max() for k, w in want.items()) > 1e-2  # the adapter changes the layers
    back = ad.unmerge(merged)
    with torch.no_grad():
        for name in MODULES:
            peft_layer(pmodel, name).unmerge()
        peft_back = {f"{n}.{k}": t2n(v) for n in MODULES for k, v in peft_layer(pmodel, n).get_base_layer()
                     .state_dict().items()}
    for key, w in peft_back.items():
        np.testing.assert_allclose(back[key], w, atol=2e-5, rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(back[key], state[key], atol=2e-5, rtol=1e-5, err_msg=key)


def test_checkpoints_both_ways(tmp_path):
    pmodel = make_peft(config_A_B="vector", config_D_E="vector")
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert_saves_back_identically(ad, tmp_path / "peft")
    check_reloaded_in_peft(pmodel, ad, base_model(), tmp_path / "ours", two_linear_inputs(SIZES),
                           atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("config", FORMS[:3], ids=["default", "vector", "constant"])
def test_trainable_parameter_count_matches_peft(config, tmp_path):
    pmodel = make_peft(bias=False, **config)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0]
