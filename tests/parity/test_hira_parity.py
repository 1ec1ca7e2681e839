"""HiRA parity with Hugging Face PEFT 0.21.2: forward, merge, unmerge and checkpoints both ways, on
Linear, transformers Conv1D, Embedding and Conv1d/2d/3d layers of one tiny model.

PEFT draws ``hira_A`` / ``hira_B`` from ``N(0, 1)`` (``init_weights=False``); peftmath reads them from
PEFT's checkpoint. PEFT's merge is ``W₀ + W₀ ⊙ BA`` and its unmerge restores a saved copy of ``W₀``;
peftmath's unmerge divides by ``1 + BA`` (specs/hira.md), checked here against the base.
"""

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
    layer_kwargs,
    load_in_peft,
    load_peft_checkpoint,
    make_input,
    peft_forward,
    require_peft,
    t2n,
)

torch, peft = require_peft()

import peftmath  # noqa: E402
from peftmath.errors import NotInvertibleError  # noqa: E402
from peftmath.layers import Layer  # noqa: E402
from peftmath.methods import hira  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

LAYERS = {
    "lin": ("linear", dict(in_f=24, out_f=40)),
    "c_attn": ("conv1d_t", dict(in_f=24, out_f=40)),
    "emb": ("embedding", dict(vocab=30, dim=12)),
    "conv1": ("conv1d", dict(in_ch=6, out_ch=10, k=3, padding=1)),
    "conv2": ("conv2d", dict(in_ch=4, out_ch=8, k=3, stride=2)),
    "conv3": ("conv3d", dict(in_ch=3, out_ch=5, k=2)),
}
NAMES = list(LAYERS)


def _model(seed: int = 0):
    return build_model({n: layer_factory(k, **kw) for n, (k, kw) in LAYERS.items()}, seed=seed)


def _peft(**cfg):
    torch.manual_seed(3)
    model = _model()
    state = base_state(model)
    config = peft.HiraConfig(target_modules=NAMES, init_weights=False, **{"r": 3, **cfg})
    pm = peft.get_peft_model(model, config)
    pm.eval()
    return pm, state


def _inputs(pm):
    return {n: make_input(pm, n) for n in NAMES}


def test_peft_checkpoint_forward_merge_unmerge(tmp_path):
    pm, state = _peft(rank_pattern={"conv2": 2})
    adapter = load_peft_checkpoint(pm, tmp_path)
    assert sorted(adapter.modules) == sorted(NAMES)
    # PEFT 0.21.2 ignores rank_pattern for new modules (dispatch_default reads config.r): rank 3 everywhere
    assert adapter.params["conv2"]["hira_A"].shape == (3, 4, 3, 3)
    for name, x in _inputs(pm).items():
        got = adapter.forward(name, x, state, **layer_kwargs(pm, name))
        assert_close(got, peft_forward(pm, name, x), **TOL_Y, what=f"forward {name}")
    merged = adapter.merge(state)
    compat = adapter.merge(state, peft_compat=True)
    with torch.no_grad():
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    assert sorted(merged) == sorted(want)
    for key, w in want.items():
        assert_close(merged[key], w, **TOL_W, what=f"merge {key}")
        assert bits_differ(compat[key], w) == 0, key  # PEFT's W + W ⊙ BA in float32, same order
    back = adapter.unmerge(merged)
    for key, w in state.items():
        assert_close(back[key], w, **TOL_W, what=f"unmerge {key}")
    assert_saves_back_identically(adapter, tmp_path)


def test_peftmath_checkpoint_loads_in_peft(tmp_path):
    model = _model()
    state = base_state(model)
    cfg = hira.HiraConfig(target_modules=NAMES, r=2, init_weights=False)
    adapter = peftmath.create_adapter(state, cfg, seed=4,
                                      layer_kinds={"c_attn": "Conv1D", "emb": "Embedding"})
    peftmath.save_adapter(adapter, tmp_path / "a")
    pm = load_in_peft(model, tmp_path / "a")
    for name in NAMES:
        x = make_input(pm, name)
        got = adapter.forward(name, x, state, **layer_kwargs(pm, name))
        assert_close(got, peft_forward(pm, name, x), **TOL_Y, what=f"forward {name}")


def test_unmerge_refuses_where_the_modulation_zeroes_a_weight():
    """A is chosen so that 1 + BA has an exact zero: PEFT's merge sends that weight to 0 too."""
    W = np.ones((2, 3), np.float32)
    A = np.array([[1.0, 0.5, 2.0]], np.float32)
    B = np.array([[-1.0], [1.0]], np.float32)
    lin = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W))
    merged = hira.merge(W, A, B)
    assert merged[0, 0] == 0.0
    with pytest.raises(NotInvertibleError, match="1 \\+ B·A is 0 in 1 of 6"):
        hira.unmerge(merged, A, B, layer=Layer.of((2, 3)))
