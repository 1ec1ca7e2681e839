"""Super-tuning parity with Hugging Face PEFT 0.21.2: forward, merge (PEFT's own and ``merge_and_unload``) and
unmerge for the sparse support (top-k, bottom-k) and the Supra term; positions not saved (recomputed from the
base weight, as PEFT does on load); bfloat16 with ``peft_compat``; checkpoints both ways; the trainable count."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    BF16,
    assert_close,
    assert_compat_bits,
    assert_saves_back_identically,
    base_state,
    bits_differ,
    check_reloaded_in_peft,
    in_namespace,
    load_in_peft,
    load_peft_checkpoint,
    peft_forward,
    peft_layer,
    peft_weights,
    redraw,
    require_peft,
    t2n,
    two_linear_inputs,
    two_linear_model,
    TOL_W,
    TOL_Y,
)

torch, peft = require_peft()

import peftmath  # noqa: E402
from peftmath.errors import NotInvertibleError  # noqa: E402
from peftmath.methods import supertuning as st  # noqa: E402

MODULES = ("lin0", "lin1")
SIZES = (12, 10, 7)
CONFIGS = {
    "top-k": dict(sparsity=0.8),
    "bottom-k": dict(sparsity=0.7, select_top=False),
    "Supra": dict(sparsity=0.9, r=2, lora_alpha=3),
    "Supra default alpha": dict(sparsity=0.5, r=3),
}


def _peft(config, *, dtype=None, seed=1):
    model = two_linear_model(SIZES, dtype=dtype)
    state = base_state(model)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.SupertuningConfig(target_modules=list(MODULES), **config))
    redraw(pm, {"supertuning_values": (0.0, 0.5), "supertuning_lora": (0.0, 0.3)}, seed=seed)  # trained
    return pm.eval(), state


@pytest.mark.parametrize("label", list(CONFIGS))
def test_forward_merge_unmerge_as_peft(label, tmp_path):
    pm, state = _peft(CONFIGS[label])
    ad = load_peft_checkpoint(pm, tmp_path)
    assert ad.params["lin0"]["supertuning_indices"].dtype == np.int32
    xs = two_linear_inputs(SIZES)
    for name in MODULES:
        assert_close(ad.forward(name, xs[name], state), peft_forward(pm, name, xs[name]), **TOL_Y,
                     what=f"forward {name}")
    merged = ad.merge(state)
    for name in MODULES:
        peft_layer(pm, name).merge()
    peft_merged = peft_weights(pm, MODULES)
    for key, want in peft_merged.items():
        assert_close(merged[key], want, **TOL_W, what=f"merge {key}")
    inplace = {k: v.copy() for k, v in state.items()}
    ad.merge(inplace, copy=False)
    for name in MODULES:
        peft_layer(pm, name).unmerge()
    unmerged = peft_weights(pm, MODULES)
    back = ad.unmerge(peft_merged)
    for key in peft_merged:
        assert_close(inplace[key], peft_merged[key], **TOL_W, what=f"merge copy=False {key}")
        assert_close(back[key], unmerged[key], **TOL_W, what=f"unmerge {key}")
        assert_close(back[key], state[key], **TOL_W, what=f"unmerge -> base {key}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    assert sorted(merged) == sorted(want)
    for key, w in want.items():
        assert_close(merged[key], w, **TOL_W, what=f"merge_and_unload {key}")


def test_positions_not_saved_are_recomputed_as_peft_does(tmp_path):
    pm, state = _peft(dict(sparsity=0.75, r=2, save_precomputed_indices=False))
    ad = load_peft_checkpoint(pm, tmp_path)
    assert "supertuning_indices" not in ad.params["lin0"]
    for name in MODULES:  # the positions PEFT computed at creation, which it keeps in memory
        mod = ad.module(name, weight_shape=state[f"{name}.weight"].shape)
        pos = mod.support(state[f"{name}.weight"]).flat
        assert pos.tolist() == t2n(peft_layer(pm, name).supertuning_indices["default"]).astype(np.int64).tolist()
    xs = two_linear_inputs(SIZES)
    for name in MODULES:
        assert_close(ad.forward(name, xs[name], state), peft_forward(pm, name, xs[name]), **TOL_Y,
                     what=f"forward {name}")
    records: dict = {}
    merged = ad.merge(state, records=records)
    assert sorted(records) == list(MODULES)
    with pytest.raises(NotInvertibleError, match="record"):
        ad.unmerge(merged)
    back = ad.unmerge(merged, records=records)
    for key in state:
        assert_close(back[key], state[key], **TOL_W, what=f"unmerge {key}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    for key, w in want.items():
        assert_close(merged[key], w, **TOL_W, what=f"merge_and_unload {key}")
    assert_saves_back_identically(ad, tmp_path)
    # and PEFT reloads peftmath's checkpoint (no indices) into the same positions
    check_reloaded_in_peft(pm, ad, two_linear_model(SIZES), tmp_path / "ours", xs, **TOL_Y)


@pytest.mark.parametrize("label,namespace", [("top-k", "numpy"), ("top-k", "torch"), ("Supra", "numpy"),
                                             ("Supra", "torch")])
def test_bfloat16_peft_compat_is_peft_bits(label, namespace, tmp_path):
    pm, state = _peft(CONFIGS[label], dtype=torch.bfloat16)
    ad = load_peft_checkpoint(pm, tmp_path)
    assert state["lin0.weight"].dtype == BF16
    ad, to_x, to_n = in_namespace(ad, namespace)
    got = to_n(ad.merge(to_x(state), peft_compat=True))
    for name in MODULES:
        peft_layer(pm, name).merge()
    want = peft_weights(pm, MODULES)
    if label == "top-k":  # additions only: the same bits on every backend
        for key, w in want.items():
            assert bits_differ(got[key], w) == 0, key
    else:
        assert_compat_bits({k: got[k] for k in want}, want, namespace=namespace)
    back = to_n(ad.unmerge(to_x(want), peft_compat=True))
    for name in MODULES:
        peft_layer(pm, name).unmerge()
    for key, w in peft_weights(pm, MODULES).items():
        assert bits_differ(back[key], w) <= (0 if label == "top-k" else max(1, w.size // 1000)), key


@pytest.mark.parametrize("config", [dict(sparsity=0.8), dict(sparsity=0.6, r=2, lora_alpha=5, select_top=False)])
def test_checkpoints_both_ways(config, tmp_path):
    pm, _ = _peft(config)
    ad = load_peft_checkpoint(pm, tmp_path / "peft")
    assert isinstance(ad.config, st.SupertuningConfig)
    assert_saves_back_identically(ad, tmp_path / "peft")
    check_reloaded_in_peft(pm, ad, two_linear_model(SIZES), tmp_path / "ours", two_linear_inputs(SIZES), **TOL_Y)


def test_peftmath_adapter_loads_in_peft(tmp_path):
    model = two_linear_model(SIZES)
    state = base_state(model)
    cfg = st.SupertuningConfig(target_modules=list(MODULES), sparsity=0.7, r=2, init_weights=False)
    ad = peftmath.create_adapter(state, cfg, seed=4)
    assert ad.params["lin0"]["supertuning_indices"].tolist() == \
        st.select_positions(state["lin0.weight"], 36).tolist()
    peftmath.save_adapter(ad, tmp_path / "a")
    pm = load_in_peft(two_linear_model(SIZES), tmp_path / "a")
    for name, x in two_linear_inputs(SIZES).items():
        y = peft_forward(pm, name, x)
        assert_close(ad.forward(name, x, state), y, **TOL_Y, what=f"forward {name}")
        assert np.max(np.abs(y - (x @ state[f"{name}.weight"].T + state[f"{name}.bias"]))) > 1e-2


@pytest.mark.parametrize("config", [dict(sparsity=0.8), dict(sparsity=0.9, r=2),
                                    dict(sparsity=0.5, save_precomputed_indices=False)])
def test_trainable_parameter_count_matches_peft(config, tmp_path):
    pm, _ = _peft(config)
    ad = load_peft_checkpoint(pm, tmp_path)
    assert ad.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]
