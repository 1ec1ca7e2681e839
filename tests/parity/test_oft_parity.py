"""OFT parity with Hugging Face PEFT 0.21.2: forward (Linear, Embedding, Conv2d 1x1, Conv2d kxk with
peft_compat=True), merge, unmerge and checkpoints both ways.

A tiny torch model is wrapped with ``peft.get_peft_model(OFTConfig(...))`` and every OFT parameter is
overwritten with values from a NumPy seed. The Conv2d 3x3 layer has ``in·k·k = 18``, so the requested
``oft_block_size=4`` is adjusted (to 3) by PEFT's rule, which peftmath must reproduce. Measured errors
are a few float32 ulps (tolerance ``1e-5``).
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
    n2t,
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
from peftmath.methods import oft  # noqa: E402

MODULES = ("lin", "emb", "conv1", "conv3")
CONV_KW = {"conv1": dict(stride=2, padding=1), "conv3": dict(stride=1, padding=1)}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 6)
        self.emb = nn.Embedding(10, 16)
        self.conv1 = nn.Conv2d(4, 3, 1, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2, 3, 3, padding=1)


def base_model(seed=0, dtype=torch.float32):
    model = Tiny()
    redraw(model, seed=seed)  # every weight and bias N(0, 1)
    return model.to(dtype)


def make_peft(seed=1, dtype=torch.float32, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.OFTConfig(target_modules=list(MODULES), **{"oft_block_size": 4, **config})
        pmodel = peft.get_peft_model(base_model(dtype=dtype), cfg)
    redraw(pmodel, {"oft_": (0.0, 0.15)}, seed=seed)
    return pmodel


def inputs(seed=5):
    rng = np.random.default_rng(seed)
    return {"lin": rng.standard_normal((3, 2, 16)).astype(np.float32),
            "emb": rng.integers(0, 10, (2, 5)),
            "conv1": rng.standard_normal((2, 4, 5, 5)).astype(np.float32),
            "conv3": rng.standard_normal((2, 2, 6, 7)).astype(np.float32)}


CONFIGS = {
    "neumann": {},
    "exact": dict(use_cayley_neumann=False),
    "coft": dict(coft=True, eps=0.3),
    "share": dict(block_share=True, num_cayley_neumann_terms=3),
    "r": dict(r=2, oft_block_size=0, use_cayley_neumann=False),
}


@pytest.mark.parametrize("label", list(CONFIGS))
def test_forward_merge_unmerge(label):
    pmodel = make_peft(**CONFIGS[label])
    ad = to_adapter(pmodel)
    state = peft_weights(pmodel, MODULES)
    xs = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            x = xs[name]
            want = peft_forward(pmodel, name, x)
            got = ad.forward(name, x, state, peft_compat=True, **CONV_KW.get(name, {}))
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"{label} {name} forward")
            if name != "conv3":  # the consistent forward equals PEFT's wherever PEFT's is consistent
                got2 = ad.forward(name, x, state, **CONV_KW.get(name, {}))
                np.testing.assert_allclose(got2, want, atol=1e-5, rtol=1e-5)
        peft_merged = check_merge_as_peft(ad, pmodel, state, MODULES, label)
        # the merged layers' output == peftmath's default (consistent) forward, conv3 included
        for name in MODULES:
            want = peft_forward(pmodel, name, xs[name])
            got = ad.forward(name, xs[name], state, **CONV_KW.get(name, {}))
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5, err_msg=f"{label} {name} merged forward")
        check_unmerge_as_peft(ad, pmodel, state, peft_merged, MODULES, label)


def test_conv_kxk_fold_quirk_at_identity():
    """PEFT's unmerged Conv2d kxk forward is not the base layer even at R = I; peftmath's default is."""
    pmodel = make_peft()
    with torch.no_grad():
        for p in peft_layer(pmodel, "conv3").oft_R.parameters():
            p.zero_()
    ad = to_adapter(pmodel)
    state = peft_weights(pmodel, MODULES)
    x = inputs()["conv3"]
    peft_y = peft_forward(pmodel, "conv3", x)
    base_y = t2n(peft_layer(pmodel, "conv3").base_layer(torch.from_numpy(x)))
    assert np.abs(peft_y - base_y).max() > 1.0
    np.testing.assert_allclose(ad.forward("conv3", x, state, peft_compat=True, padding=1), peft_y, atol=1e-5)
    np.testing.assert_allclose(ad.forward("conv3", x, state, padding=1), base_y, atol=1e-5)


@pytest.mark.parametrize("label", ["neumann", "exact", "share"])
def test_checkpoints_both_ways(label, tmp_path):
    pmodel = make_peft(**CONFIGS[label])
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert ad.config.use_cayley_neumann == CONFIGS[label].get("use_cayley_neumann", True)
    assert set(ad.modules) == set(MODULES)
    assert "oft_embedding_R.weight" in ad.params["emb"]
    state = peft_weights(pmodel, MODULES)
    xs = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            want = peft_forward(pmodel, name, xs[name])
            got = ad.forward(name, xs[name], state, peft_compat=True, **CONV_KW.get(name, {}))
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        check_reloaded_in_peft(pmodel, ad, base_model(), tmp_path / "ours", xs, atol=1e-6, rtol=1e-6)


def test_adapter_from_peftmath_init_loads_in_peft(tmp_path):
    """An adapter initialised by peftmath (shapes from its own block layout) loads into PEFT."""
    cfg = oft.OFTConfig(target_modules=list(MODULES), oft_block_size=4, init_weights=False,
                        use_cayley_neumann=False)
    state = peft_weights(make_peft(), MODULES)
    params = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            lay = Layer.of(state[f"{name}.weight"].shape, "Embedding" if name == "emb" else None)
            params[name], _ = oft.OFTModule.initialize(name, cfg, lay, seed=7)
        ad = pm.Adapter(cfg, params)
        pm.save_adapter(ad, tmp_path)
        fresh = peft.PeftModel.from_pretrained(base_model(), tmp_path)
        xs = inputs()
        for name in MODULES:
            want = peft_forward(fresh, name, xs[name])
            got = ad.forward(name, xs[name], state, peft_compat=True, **CONV_KW.get(name, {}))
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_bfloat16_base_merge():
    """bf16 base, fp32 adapter (PEFT's default autocast): both compute in float32 and round once."""
    import ml_dtypes

    pmodel = make_peft(dtype=torch.bfloat16)
    ad = to_adapter(pmodel)
    merged = ad.merge(peft_weights(pmodel, MODULES))  # bf16 weights and biases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            peft_layer(pmodel, name).merge()
            want = t2n(peft_layer(pmodel, name).base_layer.weight).astype(np.float32)
            got = merged[f"{name}.weight"].astype(np.float32)
            ulp = np.abs(np.spacing(want.astype(ml_dtypes.bfloat16)).astype(np.float32))
            assert (np.abs(got - want) <= ulp * 1.01).all(), name


def test_adjust_rule_and_dilation_match_peft():
    from peft.tuners.oft.layer import OFTLayer

    for n in range(1, 70):
        for p in range(1, 80):
            assert oft.adjust_oft_parameters(n, p) == OFTLayer.adjust_oft_parameters(None, n, p)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, dilation=2))
    with pytest.raises(ValueError, match="dilation"):
        peft.get_peft_model(model, peft.OFTConfig(target_modules=["0"], oft_block_size=3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(dtype):
    """Half base and input, fp32 adapter (PEFT's default): PEFT rotates in fp32, rounds x R to the input
    dtype, then runs the base layer in half; peft_compat=True follows that order."""
    import ml_dtypes

    pmodel = make_peft(dtype=dtype)
    ad = to_adapter(pmodel)
    np_dtype = ml_dtypes.bfloat16 if dtype == torch.bfloat16 else np.float16

    state = peft_weights(pmodel, MODULES)  # half-precision weights and biases
    x = inputs()["lin"].astype(np_dtype)
    want = peft_layer(pmodel, "lin")(n2t(x)).detach().float().numpy()
    compat = ad.forward("lin", x, state, peft_compat=True)
    assert compat.dtype == np.dtype(np_dtype)
    # measured bit-identical here; allow one ulp for other BLAS summation orders
    ulp = np.abs(np.spacing(want.astype(np_dtype)).astype(np.float32))
    assert (np.abs(compat.astype(np.float32) - want) <= ulp).all()
    # the default rounds once at the end: within a few half-precision ulps of the output scale
    got = ad.forward("lin", x, state)
    eps = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    np.testing.assert_allclose(got.astype(np.float32), want, atol=8 * eps * np.abs(want).max(), rtol=0)
