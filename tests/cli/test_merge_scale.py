"""`peftmath merge BASE ADAPTER:SCALE ...` end to end: the scaled merge equals the merge of an adapter with
lora_B scaled by hand, the scale is recorded in the provenance, unmerge needs the same scale (or
--ignore-provenance), and a path that merely contains ':' is still a path."""

from __future__ import annotations

import json

import numpy as np
import pytest

import peftmath as pm
from peftmath.io.safetensors import SafeTensorsFile
from peftmath.io.stream import PROVENANCE_KEY, open_model

TARGETS = ["model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.2.v_proj"]
KINDS = ["--layer-kind", "model.layers.2.v_proj=Linear"]


def _read(model):
    m = open_model(model)
    return {k: np.array(m.read(k)).astype(np.float64) for k in m.keys()}


def _provenance(model):
    files = [model] if model.is_file() else sorted(model.glob("*.safetensors"))
    values = {SafeTensorsFile(f).metadata.get(PROVENANCE_KEY) for f in files}
    assert len(values) == 1
    return json.loads(values.pop())


@pytest.mark.parametrize("dora", [False, True])
def test_scaled_merge_equals_b_scaled_by_hand_and_unmerges(cli, tmp_path, h, dora):
    state = h.model_state(dtype=np.float64)
    base = h.write_model(tmp_path / "base", state, shards=2)
    ad = h.make_lora(tmp_path / "a", state, TARGETS, seed=1, use_dora=dora, dtype=np.float64)
    h.make_lora(tmp_path / "b", state, TARGETS[:2], seed=2, r=2, dtype=np.float64)
    by_hand = pm.Adapter(ad.config, {m: {k: (v * 0.5 if k == "lora_B.weight" else v) for k, v in p.items()}
                                     for m, p in ad.params.items()})
    pm.save_adapter(by_hand, tmp_path / "a_half")
    rc, _, err = cli("merge", base, f"{tmp_path / 'a'}:0.5", tmp_path / "b", "-o", tmp_path / "m", *KINDS)
    assert rc == 0, err
    rc, _, err = cli("merge", base, tmp_path / "a_half", tmp_path / "b", "-o", tmp_path / "ref", *KINDS)
    assert rc == 0, err
    got, ref = _read(tmp_path / "m"), _read(tmp_path / "ref")
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-13, atol=1e-13, err_msg=k)
    assert np.abs(got["model.layers.0.q_proj.weight"] - state["model.layers.0.q_proj.weight"]).max() > 1e-3
    entries = _provenance(tmp_path / "m")
    assert [e["adapter"] for e in entries] == ["a", "b"]
    assert entries[0]["scale"] == 0.5 and "scale" not in entries[1]
    # unmerge with another scale: refused like another adapter, naming the recorded scale
    rc, _, err = cli("unmerge", tmp_path / "m", f"{tmp_path / 'a'}:0.25", tmp_path / "b", "-o", tmp_path / "u0", *KINDS)
    assert rc == 1 and "scale 0.5" in err and "ignore-provenance" in err and not (tmp_path / "u0").exists()
    rc, _, err = cli("unmerge", tmp_path / "m", f"{tmp_path / 'a'}:0.5", tmp_path / "b", "-o", tmp_path / "u", *KINDS)
    assert rc == 0, err
    back = _read(tmp_path / "u")
    for k in state:
        np.testing.assert_allclose(back[k], state[k], rtol=1e-10, atol=1e-12, err_msg=k)
    assert _provenance(tmp_path / "u") == []
    # --ignore-provenance unmerges with the scale given (here the wrong one: a different model)
    rc, _, err = cli("unmerge", tmp_path / "m", f"{tmp_path / 'a'}:0.25", tmp_path / "b", "-o", tmp_path / "u2",
                     *KINDS, "--ignore-provenance")
    assert rc == 0, err
    assert not np.allclose(_read(tmp_path / "u2")["model.layers.0.q_proj.weight"],
                           state["model.layers.0.q_proj.weight"])


def test_colon_in_an_existing_path_is_a_path(cli, tmp_path, h):
    state = h.model_state()
    base = h.write_model(tmp_path / "base.safetensors", state)
    h.make_lora(tmp_path / "run:2", state, TARGETS, seed=1)  # a folder whose name ends in ':2'
    rc, _, err = cli("merge", base, tmp_path / "run:2", "-o", tmp_path / "m.safetensors", *KINDS)
    assert rc == 0, err
    assert "scale" not in _provenance(tmp_path / "m.safetensors")[0]
    rc, _, err = cli("merge", base, f"{tmp_path / 'run:2'}:inf", "-o", tmp_path / "m2.safetensors", *KINDS)
    assert rc == 2 and "finite" in err


def test_rotation_scale_is_one_error_line(cli, tmp_path, h):
    state = h.model_state()
    base = h.write_model(tmp_path / "base.safetensors", state)
    rc, _, err = cli("init", base, "--method", "oft", "--target", "q_proj", "-o", tmp_path / "oft", "--init", "false")
    assert rc == 0, err
    rc, _, err = cli("merge", base, f"{tmp_path / 'oft'}:0.5", "-o", tmp_path / "m.safetensors")
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "no linear scale" in lines[0], err
    assert not (tmp_path / "m.safetensors").exists()


def test_verify_takes_the_scale(cli, tmp_path, h):
    state = h.model_state()
    base = h.write_model(tmp_path / "base.safetensors", state)
    h.make_lora(tmp_path / "a", state, TARGETS, seed=1)
    out = tmp_path / "m.safetensors"
    rc, _, err = cli("merge", base, f"{tmp_path / 'a'}:0.5", "-o", out, *KINDS)
    assert rc == 0, err
    rc, _, err = cli("verify", base, f"{tmp_path / 'a'}:0.5", out, *KINDS)
    assert rc == 0, err
    rc, _, err = cli("verify", base, tmp_path / "a", out, *KINDS)  # scale 1 is not what was merged
    assert rc == 1, err
