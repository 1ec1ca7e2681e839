"""DeLoRA parity with Hugging Face PEFT 0.21.2 on Linear layers: forward, merge (``merge_and_unload``),
unmerge and checkpoints both ways, with per-module ranks (``rank_pattern``) and λ (``lambda_pattern``).

PEFT initialises ``delora_B = 0`` (or kaiming-uniform with ``init_weights=False``, used here) and stores
the base weight's column norms in ``delora_w_norm``; every adapter tensor but ``delora_w_norm`` is
redrawn from a NumPy seed before saving."""

from __future__ import annotations

import numpy as np
import pytest

from tests.parity.conftest import (
    TOL_W,
    TOL_Y,
    assert_close,
    assert_saves_back_identically,
    base_state,
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
from peftmath.methods import delora  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

LAYERS = {"q": ("linear", dict(in_f=12, out_f=8)), "o": ("linear", dict(in_f=8, out_f=12, bias=False)),
          "up": ("linear", dict(in_f=10, out_f=6))}
CONFIG = dict(target_modules=list(LAYERS), r=3, rank_pattern={"up": 2}, delora_lambda=5.0, lambda_pattern={"o": 2.0},
              init_weights=False)


def _model():
    return build_model({n: layer_factory(k, **kw) for n, (k, kw) in LAYERS.items()}, seed=0)


def test_peft_checkpoint_forward_merge_unmerge(tmp_path):
    model = _model()
    state = base_state(model)
    pm = peft.get_peft_model(model, peft.DeloraConfig(**CONFIG))
    rng = np.random.default_rng(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "delora_A" in n or "delora_B" in n or "delora_lambda" in n:
                p.copy_(torch.from_numpy(rng.normal(0.5, 1.0, tuple(p.shape)).astype(np.float32)))
    pm.eval()
    adapter = load_peft_checkpoint(pm, tmp_path)
    assert adapter.params["up"]["delora_A"].shape == (2, 10)
    np.testing.assert_allclose(adapter.params["q"]["delora_w_norm"], np.linalg.norm(state["q.weight"], axis=0),
                               rtol=1e-6)
    for name in LAYERS:
        x = make_input(pm, name)
        assert_close(adapter.forward(name, x, state), peft_forward(pm, name, x), **TOL_Y, what=f"forward {name}")
    merged = adapter.merge(state)
    inplace = {k: v.copy() for k, v in state.items()}
    adapter.merge(inplace, copy=False)
    with torch.no_grad():
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    assert sorted(merged) == sorted(want)
    for key, w in want.items():
        assert_close(merged[key], w, **TOL_W, what=f"merge {key}")
        assert_close(inplace[key], w, **TOL_W, what=f"merge copy=False {key}")
    back = adapter.unmerge(merged)
    for key, w in state.items():
        assert_close(back[key], w, **TOL_W, what=f"unmerge {key}")
    assert_saves_back_identically(adapter, tmp_path)


def test_peftmath_checkpoint_loads_in_peft(tmp_path):
    model = _model()
    state = base_state(model)
    adapter = peftmath.create_adapter(state, delora.DeloraConfig(**CONFIG), seed=5)
    assert float(adapter.params["o"]["delora_lambda"][0]) == 2.0
    peftmath.save_adapter(adapter, tmp_path / "a")
    pm = load_in_peft(model, tmp_path / "a")
    for name in LAYERS:
        x = make_input(pm, name)
        assert_close(adapter.forward(name, x, state), peft_forward(pm, name, x), **TOL_Y, what=f"forward {name}")
