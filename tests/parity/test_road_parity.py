"""RoAd parity with Hugging Face PEFT 0.21.2: forward, merge (weight and bias), unmerge, bfloat16 bases with
peft_compat, and checkpoints both ways, for the three variants.

The adapter tensors are redrawn from a NumPy seed (``θ ~ N(0, 1)``, ``α ~ N(1, 0.3²)``). Errors are
float32 round-off (tolerance ``1e-5``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    check_merge_as_peft,
    check_unmerge_as_peft,
    check_reloaded_in_peft,
    load_peft_checkpoint,
    peft_forward,
    peft_layer,
    peft_weights,
    redraw,
    require_peft,
    t2n,
    to_adapter,
)

torch, peft = require_peft()

from torch import nn  # noqa: E402

import peftmath as pm  # noqa: E402
from peftmath.layers import Layer  # noqa: E402
from peftmath.methods import road  # noqa: E402

MODULES = ("a", "b")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 12, bias=False)


def base_model(seed=0, dtype=torch.float32):
    model = Tiny()
    redraw(model, seed=seed)
    return model.to(dtype)


def make_peft(variant, seed=1, dtype=torch.float32, group_size=4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.RoadConfig(target_modules=list(MODULES), variant=variant, group_size=group_size)
        pmodel = peft.get_peft_model(base_model(dtype=dtype), cfg)
    redraw(pmodel, {"road_theta": (0.0, 1.0), "road_alpha": (1.0, 0.3)}, seed=seed)
    return pmodel


def inputs(seed=5):
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((3, 2, 6)).astype(np.float32), "b": rng.standard_normal((4, 8)).astype(np.float32)}


def merged_state(pmodel, state):
    out = {}
    for k, v in state.items():
        mod, leaf = k.rsplit(".", 1)
        out[k] = t2n(getattr(peft_layer(pmodel, mod).base_layer, leaf))
    return out


@pytest.mark.parametrize("variant", road.VARIANTS)
def test_forward_merge_unmerge(variant):
    pmodel = make_peft(variant)
    ad = to_adapter(pmodel)
    state = peft_weights(pmodel, MODULES)
    assert "a.bias" in state and "b.bias" not in state
    xs = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            want = peft_forward(pmodel, name, xs[name])
            np.testing.assert_allclose(ad.forward(name, xs[name], state), want, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(ad.forward(name, xs[name], state, peft_compat=True), want, atol=1e-5, rtol=1e-5)
        peft_merged = check_merge_as_peft(ad, pmodel, state, MODULES, variant)
        check_unmerge_as_peft(ad, pmodel, state, peft_merged, MODULES, variant)


def test_bfloat16_peft_compat_merge():
    """bf16 base: PEFT rounds R to bf16 before R @ W; peft_compat=True reproduces it (to one bf16 ulp:
    the order of the two-term sums may differ), the default rounds once."""
    import ml_dtypes

    pmodel = make_peft("road_2", dtype=torch.bfloat16)
    ad = to_adapter(pmodel)
    state = peft_weights(pmodel, MODULES)
    compat = ad.merge(state, peft_compat=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            peft_layer(pmodel, name).merge()
    for key, want in merged_state(pmodel, state).items():
        want = want.astype(np.float32)
        ulp = np.abs(np.spacing(want.astype(ml_dtypes.bfloat16)).astype(np.float32))
        assert (np.abs(compat[key].astype(np.float32) - want) <= ulp * 1.01).all(), key


@pytest.mark.parametrize("variant", ["road_1", "road_4"])
def test_checkpoints_both_ways(variant, tmp_path):
    pmodel = make_peft(variant)
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert isinstance(ad.config, road.RoadConfig) and ad.config.variant == variant and ad.config.group_size == 4
    assert set(ad.modules) == set(MODULES)
    state = peft_weights(pmodel, MODULES)
    xs = inputs()
    for name in MODULES:
        np.testing.assert_allclose(ad.forward(name, xs[name], state), peft_forward(pmodel, name, xs[name]),
                                   atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_reloaded_in_peft(pmodel, ad, base_model(), tmp_path / "ours", xs, atol=1e-6, rtol=1e-6)


def test_peftmath_init_loads_in_peft(tmp_path):
    state = peft_weights(make_peft("road_1"), MODULES)
    cfg = road.RoadConfig(target_modules=list(MODULES), variant="road_4", group_size=2, init_weights=False)
    params = {name: road.RoadModule.initialize(name, cfg, Layer.of(state[f"{name}.weight"].shape), seed=3)[0]
              for name in MODULES}
    ad = pm.Adapter(cfg, params)
    pm.save_adapter(ad, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = peft.PeftModel.from_pretrained(base_model(), tmp_path)
    xs = inputs()
    for name in MODULES:
        want = peft_forward(fresh, name, xs[name])
        np.testing.assert_allclose(ad.forward(name, xs[name], state), want, atol=1e-5, rtol=1e-5)
        base = t2n(peft_layer(fresh, name).base_layer(torch.from_numpy(xs[name])))
        assert np.abs(want - base).max() > 1e-2
