"""OSF parity with Hugging Face PEFT 0.21.2: forward and merge against PEFT (the initial low part recomputed
from the base weight's SVD, as PEFT does on load), checkpoints both ways, the unmerge PEFT lacks, and the
trainable-parameter count."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    check_reloaded_in_peft,
    load_peft_checkpoint,
    peft_forward,
    peft_weights,
    require_peft,
    two_linear_inputs,
    two_linear_model,
    t2n,
)

torch, peft = require_peft()


from peftmath.methods import osf  # noqa: E402

MODULES = ("lin0", "lin1")


SIZES = (12, 10, 7)


def base_model(seed=0):
    return two_linear_model(SIZES, seed=seed)


def make_peft(seed=1, train=True, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(base_model(), peft.OSFConfig(target_modules=list(MODULES), **config))
    if train:  # a trained adapter: the low factors moved away from the base weight's own
        with torch.no_grad():
            rng = np.random.default_rng(seed)
            for name, p in pmodel.named_parameters():
                if "osf_svd_params" in name:
                    p.add_(torch.from_numpy(rng.normal(0.0, 0.2, tuple(p.shape)).astype(np.float32)))
    return pmodel.eval()


def inputs(seed=5):
    return two_linear_inputs(SIZES, seed)


@pytest.mark.parametrize("config", [{}, dict(effective_rank=3), dict(effective_rank=0.25, rank_pattern={"lin1": 6}),
                                    dict(train=False)])
def test_forward_merge_and_exact_unmerge(config, tmp_path):
    pmodel = make_peft(**config)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    state = peft_weights(pmodel, MODULES)
    xs = inputs()
    for name in MODULES:
        np.testing.assert_allclose(ad.forward(name, xs[name], state), peft_forward(pmodel, name, xs[name]),
                                   atol=2e-5, rtol=1e-5)
    records: dict = {}
    merged = ad.merge(state, records=records)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            want = {k: t2n(v) for k, v in pmodel.merge_and_unload().state_dict().items()}
    for key, w in want.items():
        np.testing.assert_allclose(merged[key], w, atol=1e-5, rtol=1e-5)
    back = ad.unmerge(merged, records=records)  # PEFT cannot unmerge OSF
    for name in MODULES:
        np.testing.assert_allclose(back[f"{name}.weight"], state[f"{name}.weight"], atol=2e-6)


def test_checkpoints_both_ways(tmp_path):
    pmodel = make_peft(effective_rank=4)
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert isinstance(ad.config, osf.OSFConfig) and ad.params["lin0"][osf._S].shape == (6,)
    check_reloaded_in_peft(pmodel, ad, base_model(), tmp_path / "ours", inputs(), atol=1e-5, rtol=1e-5)


def test_trainable_parameter_count_matches_peft(tmp_path):
    pmodel = make_peft(rank_pattern={"lin1": 2})
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0]
