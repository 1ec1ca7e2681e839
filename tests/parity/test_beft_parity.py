"""BEFT parity with Hugging Face PEFT 0.21.2: forward, merge and unmerge against PEFT's layers, bfloat16 with
``peft_compat=True`` bit for bit, the refused merge of a layer without a bias, checkpoints both ways, and the
trainable-parameter count."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    assert_saves_back_identically,
    bits_differ,
    check_merge_as_peft,
    check_reloaded_in_peft,
    check_unmerge_as_peft,
    load_peft_checkpoint,
    peft_forward,
    peft_weights,
    require_peft,
    two_linear_inputs,
    two_linear_model,
)

torch, peft = require_peft()

from peftmath.errors import UnsupportedError  # noqa: E402
from peftmath.methods import beft  # noqa: E402

MODULES = ("lin0", "lin1")
SIZES = (12, 10, 7)


def make_peft(*, dtype=None, bias=True, **config):
    model = two_linear_model(SIZES, dtype=dtype)
    if not bias:
        for name in MODULES:
            getattr(model, name).bias = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(model, peft.BeftConfig(target_modules=list(MODULES), **config))
    with torch.no_grad():  # a trained adapter: N(0, 0.3²) added to every bias shift
        rng = np.random.default_rng(1)
        for name, p in pmodel.named_parameters():
            if "beft_bias" in name:
                p.add_(torch.from_numpy(rng.normal(0.0, 0.3, tuple(p.shape)).astype(np.float32)).to(p.dtype))
    return pmodel.eval()


@pytest.mark.parametrize("init_weights", [True, False])
def test_forward_merge_and_unmerge_match_peft(init_weights, tmp_path):
    pmodel = make_peft(init_weights=init_weights)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert isinstance(ad.config, beft.BeftConfig) and ad.params["lin0"]["beft_bias"].shape == (1, SIZES[1])
    state = peft_weights(pmodel, MODULES)
    xs = two_linear_inputs(SIZES)
    for name in MODULES:
        np.testing.assert_allclose(ad.forward(name, xs[name], state), peft_forward(pmodel, name, xs[name]),
                                   atol=1e-6, rtol=1e-6)
    merged = check_merge_as_peft(ad, pmodel, state, MODULES, "beft", tol=1e-6)
    for name in MODULES:  # the weight is never touched
        np.testing.assert_array_equal(merged[f"{name}.weight"], state[f"{name}.weight"])
    check_unmerge_as_peft(ad, pmodel, state, merged, MODULES, "beft", tol=1e-6)


def test_bfloat16_peft_compat_forward_and_merge_bit_for_bit(tmp_path):
    pmodel = make_peft(dtype=torch.bfloat16)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    state = peft_weights(pmodel, MODULES)
    from tests.parity.conftest import BF16

    for name, x in two_linear_inputs(SIZES).items():
        xb = x.astype(BF16)
        want = peft_forward(pmodel, name, xb)
        got = ad.forward(name, xb, state, peft_compat=True)
        assert bits_differ(np.asarray(got), want) == 0, name
    merged = ad.merge(state)
    for name in MODULES:
        pmodel.base_model.model.get_submodule(name).merge()
    for key, want in peft_weights(pmodel, MODULES).items():
        assert bits_differ(np.asarray(merged[key]), want) == 0, key


def test_a_layer_without_bias_is_refused_as_peft_refuses(tmp_path):
    pmodel = make_peft(bias=False)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    state = peft_weights(pmodel, MODULES)
    x = two_linear_inputs(SIZES)["lin1"]
    np.testing.assert_allclose(ad.forward("lin1", x, state), peft_forward(pmodel, "lin1", x), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="no bias"):
        pmodel.base_model.model.lin1.merge()
    with pytest.raises(UnsupportedError, match="has no bias"):
        ad.merge(state)


def test_checkpoints_both_ways(tmp_path):
    pmodel = make_peft(init_weights=False)
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert_saves_back_identically(ad, tmp_path / "peft")
    check_reloaded_in_peft(pmodel, ad, two_linear_model(SIZES), tmp_path / "ours", two_linear_inputs(SIZES),
                           atol=1e-6, rtol=1e-6)


def test_trainable_parameter_count_matches_peft(tmp_path):
    pmodel = make_peft()
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0] == SIZES[1] + SIZES[2]
