"""DEFT parity with Hugging Face PEFT 0.21.2 on nn.Linear and transformers Conv1D: forward, merge
(``merge_and_unload``), PEFT's own merge / unmerge, peftmath's unmerge with the record and (relu) without it,
bfloat16 with ``peft_compat``, checkpoints both ways (an identity adapter created by peftmath included) and the
trainable-parameter count."""

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
    build_model,
    check_inplace_and_unmerge,
    check_reloaded_in_peft,
    layer_factory,
    load_in_peft,
    load_peft_checkpoint,
    make_input,
    peft_forward,
    peft_layer,
    peft_weights,
    redraw,
    require_peft,
    t2n,
    TOL_W,
    TOL_Y,
)

torch, peft = require_peft()

import peftmath  # noqa: E402
from peftmath.errors import NotInvertibleError  # noqa: E402
from peftmath.methods import deft  # noqa: E402

LINEAR = {"lin0": ("linear", dict(in_f=12, out_f=16)), "lin1": ("linear", dict(in_f=16, out_f=5))}
CONV1D = {"c_attn": ("conv1d_t", dict(in_f=10, out_f=18)), "c_proj": ("conv1d_t", dict(in_f=18, out_f=3))}
CONFIGS = {
    "relu": dict(r=4),
    "qr alpha": dict(r=4, decomposition_method="qr", alpha=6),
    "PaRa relu": dict(r=3, para=True),
    "PaRa qr": dict(r=3, decomposition_method="qr", para=True),
}


def _model(layers, seed=0, dtype="float32"):
    return build_model({n: layer_factory(k, **kw) for n, (k, kw) in layers.items()}, seed=seed, dtype=dtype)


def _peft(layers, config, *, dtype="float32", init_weights=False):
    model = _model(layers, dtype=dtype)
    state = base_state(model)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.DeftConfig(target_modules=list(layers), init_weights=init_weights,
                                                        fan_in_fan_out=layers is CONV1D, **config))
    redraw(pm, {"deft_P": (0.0, 0.3), "deft_R": (0.0, 0.5)}, seed=1)  # a trained adapter: a projector that matters
    return pm.eval(), state


@pytest.mark.parametrize("label", list(CONFIGS))
@pytest.mark.parametrize("layers", [LINEAR, CONV1D], ids=["Linear", "Conv1D"])
def test_forward_merge_unmerge_as_peft(layers, label, tmp_path):
    pm, state = _peft(layers, CONFIGS[label])
    ad = load_peft_checkpoint(pm, tmp_path)
    assert sorted(ad.modules) == sorted(layers)
    assert ad.params[list(layers)[1]]["deft_P"].shape[1] == min(CONFIGS[label]["r"], 5 if layers is LINEAR else 3)
    for name in layers:
        x = make_input(pm, name)
        assert_close(ad.forward(name, x, state), peft_forward(pm, name, x), **TOL_Y, what=f"forward {name}")
    records: dict = {}
    merged = ad.merge(state, records=records)
    pm.merge_adapter()  # PEFT's own layer merge (it caches M = Hᵀ W too)
    peft_merged = peft_weights(pm, layers)
    for key, want in peft_merged.items():
        assert_close(merged[key], want, **TOL_W, what=f"merge {key}")
        if key.endswith(".weight"):
            assert np.max(np.abs(want - state[key])) > 1e-2  # not vacuous
    # copy=False merge / unmerge, then PEFT's unmerge against peftmath's with the records
    check_inplace_and_unmerge(pm, ad, state, peft_merged, records=records)
    if CONFIGS[label].get("decomposition_method") == "qr":  # the removed component is gone
        with pytest.raises(NotInvertibleError, match="idempotent"):
            ad.unmerge(merged)
    else:  # relu: recovered by the r × r solve
        for key, want in ad.unmerge(merged).items():
            assert_close(want, state[key], atol=1e-4, rtol=1e-4, what=f"record-free unmerge {key}")


def test_merge_and_unload_with_modules_to_save(tmp_path):
    pm, state = _peft(LINEAR, dict(r=4), init_weights=True)
    ad = load_peft_checkpoint(pm, tmp_path)
    merged = ad.merge(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    assert sorted(merged) == sorted(want)
    for key, w in want.items():
        assert_close(merged[key], w, **TOL_W, what=f"merge_and_unload {key}")


@pytest.mark.parametrize("namespace", ["numpy", "torch"])
def test_bfloat16_peft_compat_is_peft_bits(namespace, tmp_path):
    pm, state = _peft(LINEAR, dict(r=4, alpha=8), dtype="bfloat16")
    ad = load_peft_checkpoint(pm, tmp_path)
    assert state["lin0.weight"].dtype == BF16
    if namespace == "torch":
        from tests.parity.conftest import in_namespace

        ad, to_x, to_n = in_namespace(ad, "torch")
    else:
        to_x = to_n = lambda d: d  # noqa: E731
    got = to_n(ad.merge(to_x(state), peft_compat=True))
    default = to_n(ad.merge(to_x(state)))
    for name in LINEAR:
        peft_layer(pm, name).merge()
    want = peft_weights(pm, LINEAR)
    assert_compat_bits({k: got[k] for k in want}, want, namespace=namespace)
    for key, w in want.items():  # the default rounds once; PEFT also rounds ΔW: one ulp of |W'| + |ΔW| apart
        w64, d64 = np.asarray(w, np.float64), np.asarray(default[key], np.float64)
        dw = np.abs(w64 - np.asarray(state[key], np.float64))
        assert np.all(np.abs(d64 - w64) <= 2 ** -7 * (np.abs(w64) + dw)), key
        if key.endswith(".weight"):
            assert bits_differ(default[key], w) > 0  # the two roundings are visible here


def test_checkpoints_both_ways(tmp_path):
    pm, _ = _peft(CONV1D, dict(r=4, decomposition_method="qr", alpha=2))
    ad = load_peft_checkpoint(pm, tmp_path / "peft")
    assert isinstance(ad.config, deft.DeftConfig) and ad.config.fan_in_fan_out
    assert_saves_back_identically(ad, tmp_path / "peft")
    check_reloaded_in_peft(pm, ad, _model(CONV1D), tmp_path / "ours",
                           {n: make_input(pm, n) for n in CONV1D}, **TOL_Y)


@pytest.mark.parametrize("config", [dict(r=4), dict(r=2, para=True, decomposition_method="qr")])
def test_peftmath_adapter_loads_in_peft(config, tmp_path):
    """A peftmath-created adapter (identity init: R = Hᵀ W) read by PeftModel.from_pretrained: same outputs;
    the identity DEFT adapter leaves the base output unchanged (PaRa does not)."""
    model = _model(LINEAR)
    state = base_state(model)
    ad = peftmath.create_adapter(state, deft.DeftConfig(target_modules=list(LINEAR), **config), seed=3)
    peftmath.save_adapter(ad, tmp_path / "a")
    pm = load_in_peft(_model(LINEAR), tmp_path / "a")
    for name in LINEAR:
        x = make_input(pm, name)
        y = peft_forward(pm, name, x)
        assert_close(ad.forward(name, x, state), y, **TOL_Y, what=f"forward {name}")
        base = x @ state[f"{name}.weight"].T + state[f"{name}.bias"]
        if config.get("para"):
            assert np.max(np.abs(y - base)) > 1e-4
        else:
            assert_close(y, base, atol=1e-5, rtol=1e-5, what=f"identity {name}")


@pytest.mark.parametrize("config", [dict(r=4), dict(r=8, para=True)])
def test_trainable_parameter_count_matches_peft(config, tmp_path):
    pm, _ = _peft(LINEAR, config)
    ad = load_peft_checkpoint(pm, tmp_path)
    assert ad.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]
