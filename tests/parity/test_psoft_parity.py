"""PSOFT parity with Hugging Face PEFT 0.21.2: the basis is PEFT's cached A and B, forward and merge against
PEFT's layers for the config variants, unmerge with the merge record against PEFT's unmerge, checkpoints both
ways and the trainable-parameter count."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    adapter_to_torch,
    assert_saves_back_identically,
    bits_differ,
    check_reloaded_in_peft,
    load_peft_checkpoint,
    peft_forward,
    peft_layer,
    peft_weights,
    require_peft,
    t2n,
    two_linear_inputs,
    two_linear_model,
)

torch, peft = require_peft()

from peftmath.methods import psoft  # noqa: E402

MODULES = ("lin0", "lin1")
SIZES = (12, 10, 7)
CONFIGS = [dict(r=4, psoft_alpha=4), dict(r=3, psoft_alpha=9, ab_svd_init="pissa_init"),
           dict(r=4, psoft_alpha=2, psoft_svd="lowrank", psoft_svd_lowrank_niter=2, random_seed=3),
           dict(r=5, use_cayley_neumann=True, num_cayley_neumann_terms=4, cayley_neumann_eps=0.5),
           dict(r=3, psoft_orth=False, psoft_mag_b=False)]


def make_peft(seed=3, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(two_linear_model(SIZES),
                                     peft.PsoftConfig(target_modules=list(MODULES), init_weights=False, **config))
    with torch.no_grad():  # trained: R and the vectors away from their start
        rng = np.random.default_rng(seed)
        for _, p in pmodel.named_parameters():
            if p.requires_grad:
                p.add_(torch.from_numpy(rng.normal(0.0, 0.2, tuple(p.shape)).astype(np.float32)))
    return pmodel.eval()


@pytest.mark.parametrize("config", CONFIGS, ids=["psoft", "pissa", "lowrank", "neumann-eps", "free-R"])
def test_forward_merge_unmerge_as_peft(config, tmp_path):
    pmodel = make_peft(**config)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert isinstance(ad.config, psoft.PsoftConfig)
    state = peft_weights(pmodel, MODULES)
    for name in MODULES:  # the basis gives PEFT's cached A and B
        layer = peft_layer(pmodel, name)
        A, B = (t2n(t) for t in layer._get_psoft_ab_cache_buffers("default"))
        out, inn = state[f"{name}.weight"].shape
        basis = psoft.principal_basis(state[f"{name}.weight"], config["r"], svd=ad.config.psoft_svd,
                                      niter=ad.config.psoft_svd_lowrank_niter, seed=ad.config.random_seed)
        ours = psoft.factors(basis, out, inn, config["r"], scaling=ad.config.scaling,
                             ab_svd_init=ad.config.ab_svd_init)
        np.testing.assert_allclose(np.asarray(ours[0]), A, rtol=1e-6, atol=1e-7)  # the same signs
        np.testing.assert_allclose(np.asarray(ours[1]), B, rtol=1e-6, atol=1e-7)
    xs = two_linear_inputs(SIZES)
    for name in MODULES:
        np.testing.assert_allclose(ad.forward(name, xs[name], state), peft_forward(pmodel, name, xs[name]),
                                   atol=2e-5, rtol=1e-5)
    records: dict = {}
    merged = ad.merge(state, records=records)
    with torch.no_grad():
        for name in MODULES:
            peft_layer(pmodel, name).merge()
        want = {f"{n}.weight": t2n(peft_layer(pmodel, n).get_base_layer().weight) for n in MODULES}
    for key, w in want.items():
        np.testing.assert_allclose(merged[key], w, atol=2e-5, rtol=1e-5, err_msg=key)
        assert np.abs(w - state[key]).max() > 1e-2  # the adapter changes the layer
    back = ad.unmerge(merged, records=records)
    with torch.no_grad():
        for name in MODULES:
            peft_layer(pmodel, name).unmerge()
    for name in MODULES:
        key = f"{name}.weight"
        np.testing.assert_allclose(back[key], t2n(peft_layer(pmodel, name).get_base_layer().weight), atol=2e-5)
        np.testing.assert_allclose(back[key], state[key], atol=2e-5)


def test_torch_tensors_and_peft_compat_on_cpu_give_the_same_merge(tmp_path):
    pmodel = make_peft(r=3, psoft_alpha=6)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    state = peft_weights(pmodel, MODULES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            want = {k: t2n(v) for k, v in pmodel.merge_and_unload().state_dict().items()}
    tstate = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    tad = adapter_to_torch(ad)
    for got in (tad.merge(tstate), tad.merge(tstate, peft_compat=True), ad.merge(state, peft_compat=True)):
        for key, w in want.items():
            np.testing.assert_allclose(np.asarray(t2n(got[key]) if torch.is_tensor(got[key]) else got[key]), w,
                                       atol=2e-5, rtol=1e-5, err_msg=key)


def test_checkpoints_both_ways(tmp_path):
    pmodel = make_peft(r=4, psoft_alpha=8, use_cayley_neumann=True)
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert_saves_back_identically(ad, tmp_path / "peft")
    check_reloaded_in_peft(pmodel, ad, two_linear_model(SIZES), tmp_path / "ours", two_linear_inputs(SIZES),
                           atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("config", [dict(r=4), dict(r=3, psoft_orth=False, psoft_mag_a=False)], ids=["orth", "free"])
def test_trainable_parameter_count_matches_peft(config, tmp_path):
    pmodel = make_peft(**config)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0]


def test_bfloat16_merge_peft_compat_is_bit_identical(tmp_path):
    """PEFT adds ΔW rounded to bfloat16 (two roundings); peft_compat=True does the same, the default rounds once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(two_linear_model(SIZES, dtype=torch.bfloat16),
                                     peft.PsoftConfig(target_modules=list(MODULES), r=4, psoft_alpha=4,
                                                      init_weights=False))
    with torch.no_grad():
        rng = np.random.default_rng(0)
        for _, p in pmodel.named_parameters():
            if p.requires_grad:
                p.add_(torch.from_numpy(rng.normal(0.0, 0.2, tuple(p.shape)).astype(np.float32)).to(p.dtype))
    ad = load_peft_checkpoint(pmodel, tmp_path)
    state = peft_weights(pmodel, MODULES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = {k: t2n(v) for k, v in pmodel.merge_and_unload().state_dict().items()}
    compat = ad.merge(state, peft_compat=True)
    default = ad.merge(state)
    for key, w in want.items():
        assert bits_differ(np.asarray(compat[key]), w) == 0, key
        np.testing.assert_allclose(np.asarray(default[key], np.float32), w.astype(np.float32), atol=1e-2, rtol=1e-2)
