"""Lily parity with Hugging Face PEFT 0.21.2: the forward (router mixture averaged over the batch) against PEFT's
layers, both refusing to merge, checkpoints both ways (PEFT's per-module copies of tied tensors), PEFT's ties
(tie_groups), peftmath's tied initialisation loaded by PEFT, and the trainable-parameter count."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    assert_saves_back_identically,
    BF16,
    build_model,
    load_in_peft,
    load_peft_checkpoint,
    peft_forward,
    require_peft,
    t2n,
)

torch, peft = require_peft()

import peftmath  # noqa: E402
from peftmath.errors import UnsupportedError  # noqa: E402
from peftmath.layers import Layer  # noqa: E402
from peftmath.methods import lily  # noqa: E402

# three blocks of (q, v) and an odd-shaped "v" in block 2: groups by (target, shape) as PEFT's
LAYERS = {"blocks.0.q": (12, 16), "blocks.0.v": (12, 10), "blocks.1.q": (12, 16), "blocks.1.v": (12, 10),
          "blocks.2.q": (12, 16), "blocks.2.v": (12, 8), "blocks.10.q": (12, 16)}


def base_model(seed=0, dtype="float32"):
    return build_model({n: torch.nn.Linear(i, o) for n, (i, o) in LAYERS.items()}, seed=seed, dtype=dtype)


def make_peft(seed=1, **config):
    cfg = dict(target_modules=["q", "v"], r=3, num_B=3, scaling=0.7)
    cfg.update(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        pm = peft.get_peft_model(base_model(), peft.LilyConfig(**cfg))
    with torch.no_grad():  # a trained adapter (PEFT's B starts at zero); a tied tensor moves once
        rng = np.random.default_rng(seed)
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.from_numpy(rng.normal(0.0, 0.3, tuple(p.shape)).astype(np.float32)))
    return pm.eval()


def inputs(seed=5, shape=(3, 4)):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((*shape, i)).astype(np.float32) for n, (i, _) in LAYERS.items()}


def state_of(pm):
    return {k.replace(".base_layer", ""): t2n(v) for k, v in pm.base_model.model.state_dict().items()
            if "lily_" not in k}


@pytest.mark.parametrize("config", [{}, dict(stride_A=2), dict(stride_A=3, num_B=2, r=4), dict(init_weights=False)])
@pytest.mark.parametrize("shape", [(3, 4), (5,), (2, 2, 3)])
def test_forward_matches_peft(config, shape, tmp_path):
    pm = make_peft(**config)
    ad = load_peft_checkpoint(pm, tmp_path)
    state = state_of(pm)
    for name, x in inputs(shape=shape).items():
        want = peft_forward(pm, name, x)
        np.testing.assert_allclose(ad.forward(name, x, state), want, atol=2e-6, rtol=1e-5)
        np.testing.assert_allclose(ad.forward(name, x, state, peft_compat=True), want, atol=2e-6, rtol=1e-5)


def test_no_merge_in_either(tmp_path):
    pm = make_peft()
    ad = load_peft_checkpoint(pm, tmp_path)
    with pytest.raises(NotImplementedError):
        pm.merge_and_unload()
    with pytest.raises(UnsupportedError, match="averages the mixing weights"):
        ad.merge(state_of(pm))


@pytest.mark.parametrize("stride_A", [1, 2, 3])
def test_tie_groups_are_peft_ties(stride_A):
    pm = make_peft(stride_A=stride_A)
    layers = {n: Layer.of((o, i)) for n, (i, o) in LAYERS.items()}
    groups = lily.tie_groups(pm.peft_config["default"], layers)
    model = pm.base_model.model
    same = lambda a, b, what: getattr(model.get_submodule(a), what)["default"] is \
        getattr(model.get_submodule(b), what)["default"]  # noqa: E731
    seen = set()
    for names, blocks in groups:
        for a in names:
            for b in names:
                assert same(a, b, "lily_B")
            seen.add(a)
        for block in blocks:
            assert all(same(block[0], n, "lily_A") for n in block)
        leaders = [block[0] for block in blocks]
        assert not any(same(a, b, "lily_A") for a in leaders for b in leaders if a != b)
    assert seen == set(LAYERS)
    others = [names[0] for names, _ in groups]
    assert not any(same(a, b, "lily_B") for a in others for b in others if a != b)


@pytest.mark.parametrize("config", [{}, dict(stride_A=2), dict(stride_A=3, num_B=2, r=4)])
def test_trainable_parameter_count_matches_peft(config, tmp_path):
    pm = make_peft(**config)
    ad = load_peft_checkpoint(pm, tmp_path)
    assert lily.num_trainable_parameters(ad.config, ad.params) == pm.get_nb_trainable_parameters()[0]


def test_checkpoints_both_ways(tmp_path):
    pm = make_peft(stride_A=2)
    ad = load_peft_checkpoint(pm, tmp_path / "peft")
    assert isinstance(ad.config, lily.LilyConfig) and ad.config.stride_A == 2
    assert_saves_back_identically(ad, tmp_path / "peft")
    peftmath.save_adapter(ad, tmp_path / "ours")
    fresh = load_in_peft(base_model(), tmp_path / "ours")
    for name, x in inputs().items():
        np.testing.assert_allclose(peft_forward(fresh, name, x), peft_forward(pm, name, x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("config", [dict(stride_A=2, init_weights=False), dict(stride_A=1)])
def test_peftmath_initialisation_loads_in_peft(config, tmp_path):
    """init_adapter's tied tensors: PEFT, loading one copy per module into its tied parameters, computes what
    peftmath computes (untied random copies would not survive PEFT's load)."""
    cfg = lily.LilyConfig(target_modules=["q", "v"], r=3, num_B=3, scaling=0.7, **config)
    layers = {n: Layer.of((o, i)) for n, (i, o) in LAYERS.items()}
    params = lily.init_adapter(cfg, layers, seed=3)
    ad = peftmath.Adapter(cfg, params)
    peftmath.save_adapter(ad, tmp_path)
    fresh = load_in_peft(base_model(), tmp_path)
    state = state_of(fresh)
    for name, x in inputs().items():
        np.testing.assert_allclose(ad.forward(name, x, state), peft_forward(fresh, name, x), atol=2e-6, rtol=1e-5)
    assert lily.num_trainable_parameters(cfg, params) == fresh.get_nb_trainable_parameters()[0]


def test_bfloat16_forward_within_one_rounding(tmp_path):
    pm = make_peft()
    pm = pm.to(torch.bfloat16)
    ad = load_peft_checkpoint(pm, tmp_path)
    state = state_of(pm)
    for name, x in inputs().items():
        xb = x.astype(BF16)
        want = peft_forward(pm, name, xb)
        got = np.asarray(ad.forward(name, xb, state, peft_compat=True))
        assert got.dtype == BF16
        # PEFT computes the adapter's term in bfloat16 (its matmuls and softmax round at every step); peftmath
        # in float32 and rounds once: within a few bfloat16 roundings of the output's scale
        scale = float(np.max(np.abs(want.astype(np.float32))))
        assert float(np.max(np.abs(got.astype(np.float32) - want.astype(np.float32)))) <= 2 ** -6 * scale
