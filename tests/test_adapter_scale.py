"""Per-adapter scale (Adapter.merge(state, scale=c), Adapter.scaled(c)): what it means per method, checked
against an independent computation (factors scaled by hand, c·ΔW), the exact unmerge, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

import peftmath as pm
from peftmath.adapter import Adapter
from peftmath.errors import UnsupportedError
from peftmath.methods import describe_method
from tests.test_adapter import _model


def _state(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return {"model.q_proj.weight": rng.standard_normal((6, 8)).astype(dtype),
            "model.q_proj.bias": rng.standard_normal(6).astype(dtype),
            "model.v_proj.weight": rng.standard_normal((8, 8)).astype(dtype),
            "model.norm.weight": rng.standard_normal(8).astype(dtype)}


def _adapter(peft_type, label, state):
    m = describe_method(peft_type)
    cfg = m.config(**dict(m.examples[label]), target_modules=["q_proj", "v_proj"])
    return pm.create_adapter(state, cfg, seed=3)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("c", [0.5, 0.3, -1.25])
def test_lora_scale_equals_lora_b_scaled(dora, c):
    """PEFT's scale_layer multiplies the scaling s: the same as B -> c·B (DoRA: magnitude unchanged)."""
    state, ad = _model(np.float64, dora=dora)
    by_hand = Adapter(ad.config, {m: {k: (v * c if k in ("lora_B.weight", "lora_embedding_B") else v)
                                      for k, v in p.items()} for m, p in ad.params.items()})
    rec: dict = {}
    out = ad.merge(state, scale=c, records=rec)
    ref = by_hand.merge(state)
    for k in state:
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-13, atol=1e-13)
    back = ad.unmerge(out, scale=c, records=rec)  # exact unmerge with the same scale
    for k in state:
        np.testing.assert_allclose(back[k], state[k], rtol=1e-12, atol=1e-12)
    same = ad.scaled(c).merge(state)  # the adapter-level form gives the same arrays
    for k in state:
        np.testing.assert_array_equal(same[k], out[k])
    np.testing.assert_allclose(ad.delta_weight("model.q_proj", scale=c) if not dora else 0,
                               c * ad.delta_weight("model.q_proj") if not dora else 0, rtol=1e-14)


@pytest.mark.parametrize("peft_type,label", [("LOHA", "LoHa"), ("LOKR", "LoKr"), ("LOKR", "LoKr (decompose both)"),
                                             ("VERA", "VeRA"), ("ADALORA", "AdaLoRA"), ("LORA", "rsLoRA")])
def test_additive_scale_is_c_times_delta(peft_type, label):
    state = _state()
    ad = _adapter(peft_type, label, state)
    one, half = ad.merge(state), ad.merge(state, scale=0.4)
    # VeRA scales λ_b, rounded once to its dtype (its factors may be float32 while W is float64)
    low = {np.dtype(a.dtype) for p in ad.params.values() for a in p.values()} != {np.dtype(np.float64)}
    tol = 4 * np.finfo(np.float32).eps if peft_type == "VERA" and low else 1e-11
    for k in ("model.q_proj.weight", "model.v_proj.weight"):
        np.testing.assert_allclose(half[k] - state[k], 0.4 * (one[k] - state[k]), rtol=tol, atol=1e-13)
        assert np.abs(one[k] - state[k]).max() > 1e-3  # the adapter does change the weight
    back = ad.unmerge(half, scale=0.4)
    for k in state:
        np.testing.assert_allclose(back[k], state[k], rtol=1e-12, atol=1e-12)


def test_ia3_scale_interpolates_toward_one():
    state = _state()
    ad = _adapter("IA3", "IA3", state)
    c = 0.25
    by_hand = Adapter(ad.config, {m: {k: 1.0 + c * (np.asarray(v, np.float64) - 1.0) for k, v in p.items()}
                                  for m, p in ad.params.items()})
    out, ref = ad.merge(state, scale=c), by_hand.merge(state)
    dt = np.dtype(next(iter(ad.params.values()))["ia3_l"].dtype)  # l' is computed in l's dtype
    for k in state:
        np.testing.assert_allclose(out[k], ref[k], rtol=4 * np.finfo(dt).eps, atol=1e-14)
    assert not np.allclose(out["model.q_proj.weight"], ad.merge(state)["model.q_proj.weight"])
    np.testing.assert_array_equal(ad.merge(state, scale=0.0)["model.q_proj.weight"], state["model.q_proj.weight"])
    back = ad.unmerge(out, scale=c)
    for k in state:
        np.testing.assert_allclose(back[k], state[k], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("peft_type,label", [("OFT", "OFT"), ("BOFT", "BOFT")])
def test_rotation_scale_refused(peft_type, label):
    state = _state()
    ad = _adapter(peft_type, label, state)
    with pytest.raises(UnsupportedError, match="rotation, which has no linear scale"):
        ad.merge(state, scale=0.5)
    with pytest.raises(UnsupportedError, match="rotation"):
        ad.scaled(0.5)
    out = ad.merge(state, scale=1.0)  # scale 1 is the plain merge
    np.testing.assert_array_equal(out["model.q_proj.weight"], ad.merge(state)["model.q_proj.weight"])


def test_replaced_tensors_refuse_a_scale():
    state, ad = _model(np.float64)
    ad.other = {"norm.weight": np.ones(8)}
    with pytest.raises(UnsupportedError, match="norm.weight.*not a change that can be scaled"):
        ad.merge(state, scale=0.5)
    with pytest.raises(pm.errors.ConfigError, match="finite"):
        ad.scaled(float("nan"))
