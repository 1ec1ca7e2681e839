"""inspect / merge / unmerge / verify take kohya-LyCORIS files and MLX folders directly (converted in memory,
detected as `convert` detects them): the results equal those of the PEFT adapter they were converted from;
a candle-lora file (no alpha stored) is refused with the `peftmath convert` command to run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from peftmath.io.safetensors import SafeTensorsFile
from peftmath.io.stream import PROVENANCE_KEY, open_model

TARGETS = ["model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.2.v_proj"]
KINDS = ["--layer-kind", "model.layers.2.v_proj=Linear"]


def _read(model):
    m = open_model(model)
    return {k: np.array(m.read(k)).astype(np.float64) for k in m.keys()}


@pytest.fixture
def setup(cli, tmp_path, h):
    state = h.model_state()
    base = h.write_model(tmp_path / "base.safetensors", state)
    h.make_lora(tmp_path / "a", state, TARGETS, seed=1, alpha=6, r=4)  # s = 1.5: exact in binary
    for to, out in (("kohya", "k.safetensors"), ("mlx", "mlx"), ("candle-lora", "c.safetensors")):
        rc, _, err = cli("convert", tmp_path / "a", "--to", to, "-o", tmp_path / out, "-q")
        assert rc == 0, err
    rc, _, err = cli("merge", base, tmp_path / "a", "-o", tmp_path / "ref.safetensors", *KINDS)
    assert rc == 0, err
    return tmp_path, base, state


@pytest.mark.parametrize("src", ["k.safetensors", "mlx"])
def test_merge_unmerge_verify_foreign_adapter(cli, setup, src):
    tmp, base, state = setup
    out = tmp / "m.safetensors"
    rc, _, err = cli("merge", base, tmp / src, "-o", out, *KINDS)
    assert rc == 0, err
    got, ref = _read(out), _read(tmp / "ref.safetensors")
    for k in ref:  # the same delta: kohya/MLX hold the same factors (MLX transposed, its scale folded exactly)
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert np.abs(got["model.layers.0.q_proj.weight"] - state["model.layers.0.q_proj.weight"]).max() > 1e-3
    entry = json.loads(SafeTensorsFile(out).metadata[PROVENANCE_KEY])[0]
    assert entry["adapter"] == src and entry["peft_type"] == "LORA"
    assert ("adapter_config_sha256" in entry) == (src == "mlx")
    rc, _, err = cli("verify", base, tmp / src, out, *KINDS)
    assert rc == 0, err
    rc, _, err = cli("unmerge", out, tmp / src, "-o", tmp / "u.safetensors", *KINDS)
    assert rc == 0, err
    back = _read(tmp / "u.safetensors")
    for k, v in state.items():
        np.testing.assert_allclose(back[k], v.astype(np.float64), rtol=1e-5, atol=1e-6, err_msg=k)
    # another adapter's unmerge is still refused by the provenance check
    rc, _, err = cli("unmerge", out, tmp / "a", "-o", tmp / "u2.safetensors", *KINDS)
    assert rc == 1 and "never merged" in err


def test_inspect_foreign_adapter(cli, setup):
    tmp, base, _ = setup
    rc, out, err = cli("inspect", tmp / "k.safetensors", "--json", "--base", base, *KINDS)
    assert rc == 0, err
    info = json.loads(out)
    rc, out, err = cli("inspect", tmp / "a", "--json", "--base", base, *KINDS)
    assert rc == 0, err
    peft_info = json.loads(out)
    assert info["format"] == "kohya" and info["path"] == str(tmp / "k.safetensors")
    assert info["num_modules"] == peft_info["num_modules"] == 3
    assert info["trainable_parameters"] == peft_info["trainable_parameters"]
    assert [m["module"] for m in info["modules"]] == [m["module"] for m in peft_info["modules"]] == TARGETS
    for a, b in zip(info["modules"], peft_info["modules"]):  # the same ‖ΔW‖ and spectrum
        assert {k: v for k, v in a.items()} == b


def test_candle_lora_says_which_convert_to_run(cli, setup):
    tmp, base, _ = setup
    rc, _, err = cli("merge", base, tmp / "c.safetensors", "-o", tmp / "m.safetensors", *KINDS)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, err
    assert f"peftmath convert {tmp / 'c.safetensors'} --to peft --alpha ALPHA --modules-from {base}" in lines[0]
    assert not (tmp / "m.safetensors").exists()
