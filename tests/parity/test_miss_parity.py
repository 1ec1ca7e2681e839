"""MiSS parity with Hugging Face PEFT 0.21.2: the default, "mini" and "bat" forms on Linear layers,
forward, merge (``merge_and_unload``), unmerge and checkpoints both ways.

PEFT initialises "bat" and "mini" blocks to zero, so every block is redrawn from a NumPy seed before
saving (a no-op block would make the comparisons vacuous)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.parity.conftest import (
    TOL_W,
    TOL_Y,
    assert_close,
    assert_saves_back_identically,
    base_state,
    bits_differ,
    build_model,
    layer_factory,
    load_in_peft,
    load_peft_checkpoint,
    make_input,
    peft_forward,
    require_peft,
    t2n,
)

torch, peft = require_peft()

import peftmath  # noqa: E402
from peftmath.methods import miss  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

LAYERS = {"q": ("linear", dict(in_f=12, out_f=8)), "o": ("linear", dict(in_f=8, out_f=12, bias=False)),
          "up": ("linear", dict(in_f=10, out_f=6))}
FORMS = {"default": dict(r=4, init_weights=False), "default_ragged": dict(r=3, init_weights=True),
         "mini": dict(r=2, init_weights="mini", mini_r=2), "bat": dict(r=2, init_weights="bat")}


def _model():
    return build_model({n: layer_factory(k, **kw) for n, (k, kw) in LAYERS.items()}, seed=0)


@pytest.mark.parametrize("form", list(FORMS))
def test_peft_checkpoint_forward_merge_unmerge(form, tmp_path):
    model = _model()
    state = base_state(model)
    pm = peft.get_peft_model(model, peft.MissConfig(target_modules=list(LAYERS), **FORMS[form]))
    rng = np.random.default_rng(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "miss_block" in n:
                p.copy_(torch.from_numpy((0.3 * rng.standard_normal(tuple(p.shape))).astype(np.float32)))
    pm.eval()
    adapter = load_peft_checkpoint(pm, tmp_path)
    for name in LAYERS:
        x = make_input(pm, name)
        assert_close(adapter.forward(name, x, state), peft_forward(pm, name, x), **TOL_Y, what=f"forward {name}")
    merged = adapter.merge(state)
    compat = adapter.merge(state, peft_compat=True)
    with torch.no_grad():
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    assert sorted(merged) == sorted(want)
    for key, w in want.items():
        assert_close(merged[key], w, **TOL_W, what=f"merge {key}")
        if form != "bat":  # W + ΔW in float32: PEFT's numbers bit for bit
            assert bits_differ(compat[key], w) == 0, key
    back = adapter.unmerge(merged)
    for key, w in state.items():
        assert_close(back[key], w, **TOL_W, what=f"unmerge {key}")
    assert_saves_back_identically(adapter, tmp_path)


@pytest.mark.parametrize("form", ["default", "bat"])
def test_peftmath_checkpoint_loads_in_peft(form, tmp_path):
    model = _model()
    state = base_state(model)
    adapter = peftmath.create_adapter(state, miss.MissConfig(target_modules=list(LAYERS), **FORMS[form]), seed=2)
    if form == "bat":  # a zero block would be a no-op: give it values
        adapter = peftmath.Adapter(adapter.config, {m: {k: v + 0.2 for k, v in p.items()}
                                                    for m, p in adapter.params.items()})
    peftmath.save_adapter(adapter, tmp_path / "a")
    pm = load_in_peft(model, tmp_path / "a")
    for name in LAYERS:
        x = make_input(pm, name)
        assert_close(adapter.forward(name, x, state), peft_forward(pm, name, x), **TOL_Y, what=f"forward {name}")
