"""PEANuT parity with Hugging Face PEFT 0.21.2: forward and merge against PEFT for several depths and
activations, every activation against transformers' ``ACT2FN``, the record-based unmerge against PEFT's
restored weight, bfloat16 with ``peft_compat=True``, checkpoints both ways, and the trainable-parameter count."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    BF16,
    assert_compat_bits,
    assert_saves_back_identically,
    check_reloaded_in_peft,
    load_peft_checkpoint,
    n2t,
    peft_forward,
    peft_layer,
    peft_weights,
    require_peft,
    t2n,
    two_linear_inputs,
    two_linear_model,
)

torch, peft = require_peft()

from peftmath.methods import peanut  # noqa: E402

MODULES = ("lin0", "lin1")
SIZES = (12, 10, 7)


def make_peft(*, dtype=None, seed=1, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(two_linear_model(SIZES, dtype=dtype),
                                     peft.PeanutConfig(target_modules=list(MODULES), **config))
    with torch.no_grad():  # a trained adapter: N(0, 0.3²) added to every tensor (B starts at zero)
        rng = np.random.default_rng(seed)
        for name, p in pmodel.named_parameters():
            if "peanut_" in name:
                p.add_(torch.from_numpy(rng.normal(0.0, 0.3, tuple(p.shape)).astype(np.float32)).to(p.dtype))
    return pmodel.eval()


CONFIGS = [dict(r=2), dict(r=3, depth=1, act_fn="gelu"), dict(r=4, depth=2, act_fn="silu", scaling=0.5),
           dict(r=2, depth=3, act_fn="gelu_new", scaling=2.0)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_forward_merge_and_unmerge_match_peft(config, tmp_path):
    pmodel = make_peft(**config)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert isinstance(ad.config, peanut.PeanutConfig)
    state = peft_weights(pmodel, MODULES)
    xs = two_linear_inputs(SIZES)
    for name in MODULES:
        np.testing.assert_allclose(ad.forward(name, xs[name], state), peft_forward(pmodel, name, xs[name]),
                                   atol=2e-5, rtol=1e-5)
    records: dict = {}
    merged = ad.merge(state, records=records)
    for name in MODULES:
        peft_layer(pmodel, name).merge()
    want = peft_weights(pmodel, MODULES)
    for key, w in want.items():
        np.testing.assert_allclose(merged[key], w, atol=1e-5, rtol=1e-5, err_msg=key)
    back = ad.unmerge(merged, records=records)
    for name in MODULES:
        peft_layer(pmodel, name).unmerge()  # PEFT restores its saved copy of the weight
    for key, w in peft_weights(pmodel, MODULES).items():
        np.testing.assert_allclose(back[key], w, atol=2e-6, rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", sorted(peanut.ACTIVATIONS))
def test_every_activation_matches_transformers(name):
    from transformers.activations import ACT2FN

    x = np.concatenate([np.linspace(-12.0, 12.0, 961), [40.0, -40.0]])
    want = t2n(ACT2FN[name](n2t(x)))
    np.testing.assert_allclose(peanut.activation(name)(np, x), want, rtol=1e-13, atol=1e-13)


def test_refused_activations_are_transformers_ones():
    from transformers.activations import ACT2FN

    assert set(peanut.ACTIVATIONS) | {"prelu", "xielu"} == set(ACT2FN)


def test_bfloat16_peft_compat_merge_and_forward(tmp_path):
    pmodel = make_peft(dtype=torch.bfloat16, r=3, depth=1, act_fn="gelu")
    ad = load_peft_checkpoint(pmodel, tmp_path)
    state = peft_weights(pmodel, MODULES)
    xs = {k: v.astype(BF16) for k, v in two_linear_inputs(SIZES).items()}
    fw = {f"{n}.out": np.asarray(ad.forward(n, xs[n], state, peft_compat=True)) for n in MODULES}
    assert_compat_bits(fw, {f"{n}.out": peft_forward(pmodel, n, xs[n]) for n in MODULES}, namespace="numpy")
    merged = ad.merge(state, peft_compat=True)
    for name in MODULES:
        peft_layer(pmodel, name).merge()
    assert_compat_bits({k: np.asarray(merged[k]) for k in state}, peft_weights(pmodel, MODULES), namespace="numpy")


def test_checkpoints_both_ways(tmp_path):
    pmodel = make_peft(r=3, depth=2, act_fn="tanh", scaling=0.7)
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert sorted(ad.params["lin0"]) == sorted(
        ["peanut_A.weight", "peanut_B.weight", "peanut_encoders.0.weight", "peanut_encoders.1.weight",
         "peanut_decoders.0.weight", "peanut_decoders.1.weight"])
    assert_saves_back_identically(ad, tmp_path / "peft")
    check_reloaded_in_peft(pmodel, ad, two_linear_model(SIZES), tmp_path / "ours", two_linear_inputs(SIZES),
                           atol=1e-5, rtol=1e-5)


def test_trainable_parameter_count_matches_peft(tmp_path):
    pmodel = make_peft(r=3, depth=2)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0]
