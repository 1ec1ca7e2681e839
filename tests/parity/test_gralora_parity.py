"""GraLoRA parity with Hugging Face PEFT 0.21.2: forward, merge (``merge_and_unload``), unmerge and checkpoints
both ways, on nn.Linear layers (wider than tall, taller than wide) and a transformers Conv1D, with ``k`` = 1, 2,
4 and the hybrid LoRA part; bfloat16 weights and adapters; the trainable-parameter count.

PEFT starts with ``B = 0``; every adapter tensor is redrawn from a NumPy seed before saving."""

from __future__ import annotations

import numpy as np
import pytest

from tests.parity.conftest import (
    check_state_merge_as_peft,
    TOL_W,
    TOL_Y,
    assert_close,
    base_state,
    bits_differ,
    build_model,
    layer_factory,
    load_in_peft,
    load_peft_checkpoint,
    make_input,
    peft_forward,
    redraw,
    require_peft,
    t2n,
)

torch, peft = require_peft()

import peftmath  # noqa: E402
from peftmath.methods import gralora  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

LAYERS = {"up": ("linear", dict(in_f=8, out_f=16)), "down": ("linear", dict(in_f=16, out_f=4, bias=False)),
          "c": ("conv1d_t", dict(in_f=12, out_f=8))}
KINDS = {"up": "Linear", "down": "Linear", "c": "Conv1D"}


def _model(dtype: str = "float32"):
    return build_model({n: layer_factory(k, **kw) for n, (k, kw) in LAYERS.items()}, seed=0, dtype=dtype)


def _peft(config: dict, dtype: str = "float32", adapter_dtype=None):
    model = _model(dtype)
    state = base_state(model)
    pm = peft.get_peft_model(model, peft.GraloraConfig(target_modules=list(LAYERS), **config),
                             autocast_adapter_dtype=adapter_dtype is None)
    redraw(pm, {"gralora_": (0.0, 0.5)}, seed=3)
    pm.eval()
    return pm, state


CONFIGS = {
    "k2": dict(r=4, gralora_k=2, alpha=3),
    "k4-hybrid": dict(r=8, gralora_k=4, hybrid_r=3, alpha=5),
    "k1": dict(r=2, gralora_k=1, alpha=2),
}


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_peft_checkpoint_forward_merge_unmerge(tmp_path, config):
    pm, state = _peft(config)
    adapter = load_peft_checkpoint(pm, tmp_path)
    want_keys = {"gralora_A", "gralora_B"} | ({"gralora_A_general.weight", "gralora_B_general.weight"}
                                               if config.get("hybrid_r") else set())
    assert set(adapter.params["up"]) == want_keys
    for name in LAYERS:
        x = make_input(pm, name)
        want = peft_forward(pm, name, x)
        assert_close(adapter.forward(name, x, state, kind=KINDS[name]), want, **TOL_Y, what=f"forward {name}")
        assert_close(adapter.forward(name, x[0], state, kind=KINDS[name]), want[0], **TOL_Y, what=f"2-D {name}")
    with torch.no_grad():
        for name in LAYERS:  # PEFT's own ΔW, layer by layer
            layer = pm.base_model.model.get_submodule(name)
            mod = adapter.module(name, weight_shape=state[f"{name}.weight"].shape, kind=KINDS[name])
            assert_close(np.asarray(mod.delta_weight()), t2n(layer.get_delta_weight("default")), **TOL_W,
                         what=f"delta {name}")
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    check_state_merge_as_peft(adapter, state, want, layer_kinds=KINDS, tol=TOL_W,
                              moved=("up.weight", "down.weight", "c.weight"), folder=tmp_path)


def test_peftmath_checkpoint_loads_in_peft(tmp_path):
    model = _model()
    state = base_state(model)
    cfg = gralora.GraloraConfig(target_modules=list(LAYERS), r=4, gralora_k=2, hybrid_r=2, alpha=3,
                                init_weights=False)
    adapter = peftmath.create_adapter(state, cfg, seed=5, layer_kinds={"c": "Conv1D"})
    assert adapter.params["c"]["gralora_A"].shape == (2, 6, 4) and adapter.params["c"]["gralora_B"].shape == (2, 4, 4)
    peftmath.save_adapter(adapter, tmp_path / "a")
    pm = load_in_peft(model, tmp_path / "a")
    for name in LAYERS:
        x = make_input(pm, name)
        assert_close(adapter.forward(name, x, state, kind=KINDS[name]), peft_forward(pm, name, x), **TOL_Y,
                     what=f"forward {name}")
    with torch.no_grad():
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    merged = adapter.merge(state, layer_kinds=KINDS)
    for key, w in want.items():
        assert_close(merged[key], w, **TOL_W, what=f"merge {key}")
    for key in ("up.weight", "down.weight", "c.weight"):
        assert float(np.max(np.abs(merged[key] - state[key]))) > 0.05, key


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_bfloat16_merge(tmp_path, adapter_dtype):
    """bfloat16 weights. A float32 adapter: PEFT adds the float32 ΔW into the bfloat16 weight (one rounding),
    as peftmath's default does. A bfloat16 adapter: PEFT forms ΔW in float32 on CPU, rounds it to bfloat16 and
    adds (two roundings): ``peft_compat=True`` gives its bits, the default rounds the float32 sum once."""
    pm, state = _peft(CONFIGS["k4-hybrid"], "bfloat16", adapter_dtype=None if adapter_dtype == "float32" else True)
    adapter = load_peft_checkpoint(pm, tmp_path)
    assert str(adapter.params["up"]["gralora_A"].dtype) == adapter_dtype
    compat = adapter.merge(state, layer_kinds=KINDS, peft_compat=True)
    default = adapter.merge(state, layer_kinds=KINDS)
    once = adapter.merge({k: v.astype(np.float32) for k, v in state.items()}, layer_kinds=KINDS)
    with torch.no_grad():
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    for key in ("up.weight", "down.weight", "c.weight"):
        assert bits_differ(compat[key], want[key]) <= max(1, want[key].size // 1000), key
        if adapter_dtype == "float32":
            assert bits_differ(default[key], want[key]) <= max(1, want[key].size // 1000), key
        exact = once[key].astype(np.float64)  # float32: exact to 2^-24 relative, far below a bfloat16 ulp
        err = np.abs(default[key].astype(np.float64) - exact)
        assert np.all(err <= 0.5 * np.abs(np.spacing(default[key])).astype(np.float64) * (1 + 2**-15)), key


def test_trainable_parameter_count_matches_peft(tmp_path):
    """``Adapter.num_trainable_parameters`` counts what PEFT trains (``get_nb_trainable_parameters``)."""
    for config in CONFIGS.values():
        pm, _ = _peft(config)
        ad = load_peft_checkpoint(pm, tmp_path / str(len(config)))
        assert ad.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]
