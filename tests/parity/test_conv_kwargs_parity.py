"""Grouped convolutions against PEFT 0.21.2 (issue 15, item 6): ``Adapter.forward`` infers ``groups`` from
the input (no ``groups=`` given) and gives PEFT's outputs for LoRA, LoHa, LoKr and IA3; DoRA on a grouped
conv, which PEFT computes with a norm that mixes output channels (specs/dora.md), is refused."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    TOL_Y, assert_close, base_state, build_model, layer_kwargs, make_input, peft_forward, randomize_adapter, redraw,
    require_peft, to_adapter,
)

torch, peft = require_peft()

from peftmath.errors import ShapeError, UnsupportedError  # noqa: E402

CONVS = {  # name -> (module, spatial dims)
    "Conv1d-g2": lambda: torch.nn.Conv1d(4, 6, 3, groups=2, padding=1),
    "Conv2d-g3": lambda: torch.nn.Conv2d(6, 12, 3, groups=3, padding=1, stride=2),
    "Conv2d-depthwise": lambda: torch.nn.Conv2d(4, 8, 3, groups=4, padding=1),
}
CONFIGS = {
    "LoRA": lambda: peft.LoraConfig(target_modules=["conv"], r=12, lora_alpha=6, init_lora_weights=False),
    "LoHa": lambda: peft.LoHaConfig(target_modules=["conv"], r=2, alpha=3, init_weights=False),
    "LoKr": lambda: peft.LoKrConfig(target_modules=["conv"], r=2, alpha=3, init_weights=False),
    "IA3": lambda: peft.IA3Config(target_modules=["conv"], feedforward_modules=[], init_ia3_weights=False),
    "IA3-ff": lambda: peft.IA3Config(target_modules=["conv"], feedforward_modules=["conv"], init_ia3_weights=False),
}


def _model(conv, config, seed):
    model = build_model({"conv": conv()}, seed=seed)
    state = base_state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Merging is not supported" for grouped LoRA convs
        pm = peft.get_peft_model(model, config())
    if isinstance(pm.peft_config["default"], peft.LoraConfig):
        randomize_adapter(pm, seed=seed + 1)
    else:
        redraw(pm, {"hada_": (0.0, 0.5), "lokr_": (0.0, 0.5), "ia3_l": (1.0, 0.5)}, seed=seed + 1)
    pm.eval()
    return pm, state


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("conv", list(CONVS))
def test_grouped_conv_forward_matches_peft_without_groups_keyword(method, conv):
    if method.startswith("IA3") and conv.startswith("Conv1d"):
        pytest.skip("PEFT's IA3 adapts no nn.Conv1d")
    pm, state = _model(CONVS[conv], CONFIGS[method], seed=3)
    ad = to_adapter(pm)
    x = make_input(pm, "conv")
    kw = layer_kwargs(pm, "conv")  # stride, padding, dilation: no groups
    assert "groups" not in kw
    want = peft_forward(pm, "conv", x)
    with torch.no_grad():
        plain = pm.base_model.model.conv.get_base_layer()(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(want - plain)) > 1e-3  # the adapter changes the output
    assert_close(ad.forward("conv", x, state, **kw), want, **TOL_Y)
    groups = pm.base_model.model.conv.get_base_layer().groups
    assert_close(ad.forward("conv", x, state, groups=groups, **kw), want, **TOL_Y)
    with pytest.raises(ShapeError, match=f"conv: groups=1 contradicts the input .* = {groups}"):
        ad.forward("conv", x, state, groups=1, **kw)


def test_dora_on_a_grouped_conv_forwards_as_peft_and_refuses_merges():
    """PEFT's grouped-conv DoRA norm (specs/dora.md) defines the checkpoint: the forward equals PEFT's layer
    (groups inferred from the input, or given), while merge is refused as PEFT refuses it."""
    config = lambda: peft.LoraConfig(target_modules=["conv"], r=4, lora_alpha=4, use_dora=True,  # noqa: E731
                                     init_lora_weights=False)
    pm, state = _model(lambda: torch.nn.Conv2d(4, 8, 3, groups=2, padding=1), config, seed=4)
    x = make_input(pm, "conv")
    want = peft_forward(pm, "conv", x)
    ad = to_adapter(pm)
    kw = layer_kwargs(pm, "conv")
    assert_close(ad.forward("conv", x, state, **kw), want, **TOL_Y)
    assert_close(ad.forward("conv", x, state, groups=2, **kw), want, **TOL_Y)
    with pytest.raises(UnsupportedError, match="DoRA on a conv with groups=2.*cannot be merged"):
        ad.merge(state)
