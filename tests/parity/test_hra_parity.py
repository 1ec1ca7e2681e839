"""HRA parity with Hugging Face PEFT 0.21.2: forward, merge, unmerge (Linear, Conv2d 3x3, Conv2d 1x1 with
stride and padding), with and without Gram-Schmidt, bfloat16 bases, PEFT's Conv2d keyword quirk, and
checkpoints both ways.

Every ``hra_u`` is redrawn from a NumPy seed (``N(0, 0.5²)``), so no pair of columns cancels. Errors
are float32 round-off (tolerance ``1e-5``).
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
from peftmath.methods import hra  # noqa: E402

MODULES = ("lin", "conv1", "conv3")
CONV_KW = {"conv1": dict(stride=2, padding=1), "conv3": dict(stride=1, padding=1)}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 6)
        self.conv1 = nn.Conv2d(4, 3, 1, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2, 3, 3, padding=1)


def base_model(seed=0, dtype=torch.float32):
    model = Tiny()
    redraw(model, seed=seed)
    return model.to(dtype)


def make_peft(seed=1, dtype=torch.float32, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.HRAConfig(target_modules=list(MODULES), **{"r": 4, "init_weights": False, **config})
        pmodel = peft.get_peft_model(base_model(dtype=dtype), cfg)
    redraw(pmodel, {"hra_u": (0.0, 0.5)}, seed=seed)
    return pmodel


def inputs(seed=5):
    rng = np.random.default_rng(seed)
    return {"lin": rng.standard_normal((3, 2, 16)).astype(np.float32),
            "conv1": rng.standard_normal((2, 4, 5, 5)).astype(np.float32),
            "conv3": rng.standard_normal((2, 2, 6, 7)).astype(np.float32)}


CONFIGS = {"householder": {}, "gram_schmidt": dict(apply_GS=True), "r3": dict(r=3)}


@pytest.mark.parametrize("label", list(CONFIGS))
def test_forward_merge_unmerge(label):
    pmodel = make_peft(**CONFIGS[label])
    ad = to_adapter(pmodel)
    state = peft_weights(pmodel, MODULES)
    xs = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            want = peft_forward(pmodel, name, xs[name])
            got = ad.forward(name, xs[name], state, **CONV_KW.get(name, {}))
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"{label} {name} forward")
            assert np.abs(want - t2n(peft_layer(pmodel, name).base_layer(torch.from_numpy(xs[name])))).max() > 1e-2
        peft_merged = check_merge_as_peft(ad, pmodel, state, MODULES, label)
        check_unmerge_as_peft(ad, pmodel, state, peft_merged, MODULES, label)


def test_conv_keyword_quirk():
    """PEFT's unmerged Conv2d passes stride[0] / padding[0] only: peft_compat=True reproduces it, the
    default equals PEFT's merged layer."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=(2, 1), padding=(1, 0)))
    redraw(model, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel = peft.get_peft_model(model, peft.HRAConfig(target_modules=["0"], r=2, init_weights=False))
    redraw(pmodel, {"hra_u": (0.0, 0.5)}, seed=1)
    ad = to_adapter(pmodel)
    state = peft_weights(pmodel, ["0"])
    x = np.random.default_rng(2).standard_normal((1, 2, 7, 8)).astype(np.float32)
    kw = dict(stride=(2, 1), padding=(1, 0))
    unmerged = peft_forward(pmodel, "0", x)
    np.testing.assert_allclose(ad.forward("0", x, state, peft_compat=True, **kw), unmerged, atol=1e-5)
    peft_layer(pmodel, "0").merge()
    merged_y = peft_forward(pmodel, "0", x)
    assert merged_y.shape != unmerged.shape  # PEFT's two forwards disagree
    np.testing.assert_allclose(ad.forward("0", x, state, **kw), merged_y, atol=1e-5)


@pytest.mark.parametrize("label", ["householder", "gram_schmidt"])
def test_checkpoints_both_ways(label, tmp_path):
    pmodel = make_peft(**CONFIGS[label])
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert isinstance(ad.config, hra.HRAConfig) and ad.config.apply_GS == (label == "gram_schmidt")
    assert set(ad.modules) == set(MODULES)
    state = peft_weights(pmodel, MODULES)
    xs = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            np.testing.assert_allclose(ad.forward(name, xs[name], state, **CONV_KW.get(name, {})),
                                       peft_forward(pmodel, name, xs[name]), atol=1e-5, rtol=1e-5)
        check_reloaded_in_peft(pmodel, ad, base_model(), tmp_path / "ours", xs, atol=1e-6, rtol=1e-6)


def test_peftmath_init_loads_in_peft(tmp_path):
    """peftmath's own initialisation (identity for even r) has PEFT's shapes and meaning."""
    state = peft_weights(make_peft(), MODULES)
    for init, r in ((True, 4), (False, 3)):
        cfg = hra.HRAConfig(target_modules=list(MODULES), r=r, init_weights=init)
        params = {}
        for name in MODULES:
            params[name], _ = hra.HRAModule.initialize(name, cfg, Layer.of(state[f"{name}.weight"].shape), seed=7)
        ad = pm.Adapter(cfg, params)
        folder = tmp_path / f"init{init}"
        pm.save_adapter(ad, folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = peft.PeftModel.from_pretrained(base_model(), folder)
        xs = inputs()
        for name in MODULES:
            want = peft_forward(fresh, name, xs[name])
            np.testing.assert_allclose(ad.forward(name, xs[name], state, **CONV_KW.get(name, {})), want,
                                       atol=1e-5, rtol=1e-5)
            if init:  # the identity: the base layer's output
                base = t2n(peft_layer(fresh, name).base_layer(torch.from_numpy(xs[name])))
                np.testing.assert_allclose(want, base, atol=1e-5)


def test_bfloat16_base_merge():
    """bf16 base, fp32 adapter: both compute in float32 and round once to bf16."""
    import ml_dtypes

    pmodel = make_peft(dtype=torch.bfloat16)
    ad = to_adapter(pmodel)
    merged = ad.merge(peft_weights(pmodel, MODULES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            peft_layer(pmodel, name).merge()
            want = t2n(peft_layer(pmodel, name).base_layer.weight).astype(np.float32)
            got = merged[f"{name}.weight"].astype(np.float32)
            ulp = np.abs(np.spacing(want.astype(ml_dtypes.bfloat16)).astype(np.float32))
            assert (np.abs(got - want) <= ulp * 1.01).all(), name
