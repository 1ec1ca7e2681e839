"""SHiRA parity with Hugging Face PEFT 0.21.2: ``ΔW`` against PEFT's sparse ``get_delta_weight``, forward /
merge / unmerge on nn.Linear, PEFT's checkpoint (the positions saved as a plain tensor) read and written
back, a user mask with repeated positions, bfloat16 merges, and the trainable-parameter count."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    check_module_math_as_peft,
    bits_differ,
    check_reloaded_in_peft,
    load_peft_checkpoint,
    peft_layer,
    peft_weights,
    redraw,
    require_peft,
    two_linear_inputs,
    two_linear_model,
    t2n,
)

torch, peft = require_peft()


from peftmath.methods import shira  # noqa: E402

MODULES = ("lin0", "lin1")


SIZES = (12, 10, 6)


def base_model(seed=0, dtype=torch.float32):
    return two_linear_model(SIZES, seed=seed, dtype=dtype)


def make_peft(seed=1, dtype=torch.float32, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.ShiraConfig(target_modules=list(MODULES), **{"r": 2, **config})
        pmodel = peft.get_peft_model(base_model(dtype=dtype), cfg)
    redraw(pmodel, {"shira_weight": (0.0, 1.0)}, seed=seed)
    return pmodel.eval()


def inputs(seed=5):
    return two_linear_inputs(SIZES, seed)


@pytest.mark.parametrize("config", [{}, dict(random_seed=56, r=1), "repeats"])
def test_forward_merge_unmerge(config, tmp_path):
    pmodel = make_peft(**(config if isinstance(config, dict) else {}))
    if config == "repeats":  # a user mask with repeated positions: PEFT's sparse tensor adds them
        layer = peft_layer(pmodel, "lin0")
        idx = layer.shira_indices["default"]
        layer.shira_indices["default"] = torch.cat([idx[:, 3:], idx[:, :3]], dim=1)
        layer.shira_indices["default"][:, :5] = idx[:, 7:8]
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.params["lin0"]["shira_indices"].dtype == np.int32
    state = peft_weights(pmodel, MODULES)
    xs = inputs()
    check_module_math_as_peft(ad, pmodel, state, xs, MODULES, delta_tol=1e-7, tol=1e-6)


def test_checkpoints_both_ways(tmp_path):
    pmodel = make_peft(random_seed=7)
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert isinstance(ad.config, shira.ShiraConfig) and ad.config.random_seed == 7
    for name in MODULES:
        np.testing.assert_array_equal(ad.params[name]["shira_indices"],
                                      t2n(peft_layer(pmodel, name).shira_indices["default"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_reloaded_in_peft(pmodel, ad, base_model(), tmp_path / "ours", inputs(), atol=1e-6, rtol=1e-6)


def test_bfloat16_merge(tmp_path):
    """bfloat16 base, float32 SHiRA weights (PEFT keeps them in float32): PEFT's in-place ``W += sparse``
    rounds each touched entry's float32 sum once, as peftmath's default does (``peft_compat`` the same)."""
    pmodel = make_peft(dtype=torch.bfloat16)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.params["lin0"]["shira_weight"].dtype == np.float32
    state = peft_weights(pmodel, MODULES)
    compat = ad.merge(state, peft_compat=True)
    default = ad.merge(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel.merge_adapter()
    for name in MODULES:
        key = f"{name}.weight"
        want = t2n(peft_layer(pmodel, name).base_layer.weight)
        assert compat[key].dtype == want.dtype
        assert bits_differ(compat[key], want) == 0 and bits_differ(default[key], want) == 0, key
        dw = ad.module(name, weight_shape=want.shape).delta_weight()
        once = (state[key].astype(np.float64) + dw).astype(np.float32).astype(want.dtype)
        assert bits_differ(default[key], once) == 0, key


def test_trainable_parameter_count_matches_peft(tmp_path):
    """``Adapter.num_trainable_parameters`` counts ``shira_weight`` only, as PEFT's
    ``get_nb_trainable_parameters``."""
    pmodel = make_peft()
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0] == 2 * (22 + 16)
