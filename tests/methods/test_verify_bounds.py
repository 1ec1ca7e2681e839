"""peftmath.verify asks the method description (additive / scale / rotation, needs_record, rotation_factors,
output_scale_max), so every kind of method is verified: a real merge passes, a corrupted element fails."""

from __future__ import annotations

import numpy as np
import pytest

import peftmath as pm
from peftmath.io.safetensors import save_file
from peftmath.io.stream import open_model
from peftmath.layers import Layer
from peftmath.methods import describe_method
from peftmath.verify import verify

TARGETS = ("l0.q_proj", "l1.q_proj")
CASES = {  # peft_type -> config fields (non-trivial: random init; BOFT with m = 2 butterfly factors)
    "OFT": dict(r=0, oft_block_size=4, init_weights=False),
    "BOFT": dict(boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False),
    "IA3": dict(init_ia3_weights=False, feedforward_modules=[]),
    "LOHA": dict(r=2, alpha=6, init_weights=False),
}


def _adapter(peft_type, state):
    desc = describe_method(peft_type)
    cfg = desc.config(target_modules=list(TARGETS), **CASES[peft_type])
    cfg.validate()
    params = {}
    for j, m in enumerate(TARGETS):
        w = state[f"{m}.weight"].astype(np.float32)
        p, _ = desc.initialize(m, cfg, Layer.of(w.shape), weight=w, seed=10 + j)
        params[m] = {k: np.asarray(v, dtype=np.float32) for k, v in p.items()}
    return pm.Adapter(cfg, params)


@pytest.mark.parametrize("peft_type", sorted(CASES))
def test_verify_passes_a_merge_and_fails_a_corrupted_one(tmp_path, peft_type):
    rng = np.random.default_rng(0)
    state = {f"{m}.weight": (rng.standard_normal((16, 16)) / 4).astype(np.float16) for m in TARGETS}
    state["norm.weight"] = np.ones(16, dtype=np.float16)
    ad = _adapter(peft_type, state)
    st64 = {k: v.astype(np.float64) for k, v in state.items()}
    ad64 = pm.Adapter(ad.config, {m: {s: a.astype(np.float64) for s, a in p.items()} for m, p in ad.params.items()})
    exact = ad64.merge(st64)   # independent float64 merge, rounded once to float16
    merged = {k: np.asarray(v).astype(np.float16) for k, v in exact.items()}
    assert any(not np.array_equal(merged[k], state[k]) for k in state)  # the adapter changes something
    save_file(state, tmp_path / "base.safetensors", metadata={"format": "pt"})
    save_file(merged, tmp_path / "good.safetensors", metadata={"format": "pt"})
    rep = verify(open_model(tmp_path / "base.safetensors"), [ad], open_model(tmp_path / "good.safetensors"))
    assert rep.ok, rep.failures()
    bad = dict(merged)
    key = f"{TARGETS[1]}.weight"
    w = bad[key].copy()
    w[3, 5] = np.float16(float(w[3, 5]) + 0.25)   # far beyond any rounding bound of a |x| < 4 entry
    bad[key] = w
    save_file(bad, tmp_path / "bad.safetensors", metadata={"format": "pt"})
    rep = verify(open_model(tmp_path / "base.safetensors"), [ad], open_model(tmp_path / "bad.safetensors"))
    assert [c.key for c in rep.failures()] == [key]


def test_rotation_factors_and_output_scale_come_from_the_module():
    rng = np.random.default_rng(1)
    state = {f"{m}.weight": rng.standard_normal((16, 16)).astype(np.float16) for m in TARGETS}
    for peft_type, q in (("BOFT", 2), ("OFT", 1), ("IA3", 0), ("LOHA", 0)):
        ad = _adapter(peft_type, state)
        mod = ad.module(TARGETS[0], weight_shape=(16, 16))
        assert mod.rotation_factors() == q
        want = float(np.max(np.abs(ad.params[TARGETS[0]]["boft_s"]))) if peft_type == "BOFT" else 1.0
        assert mod.output_scale_max() == want
