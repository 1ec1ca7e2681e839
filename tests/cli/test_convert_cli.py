"""`peftmath convert` end to end: PEFT -> kohya / MLX / candle-lora -> PEFT keeps the deltas; refusals write nothing."""

from __future__ import annotations

import numpy as np
import pytest

import peftmath as pm
from peftmath.cli import main
from peftmath.io.safetensors import save_file


@pytest.fixture()
def adapter(tmp_path):
    rng = np.random.default_rng(0)
    save_file({"model.q_proj.weight": rng.standard_normal((8, 12)).astype(np.float32),
               "model.v_proj.weight": rng.standard_normal((8, 12)).astype(np.float32)}, tmp_path / "m.safetensors")
    assert main(["init", str(tmp_path / "m.safetensors"), "--r", "4", "--alpha", "6", "--target", "q_proj",
                 "--target", "v_proj", "--init", "false", "-o", str(tmp_path / "a"), "-q"]) == 0
    return tmp_path / "a"


@pytest.mark.parametrize("fmt,out", [("kohya", "k.safetensors"), ("mlx", "mlx"), ("candle-lora", "c.safetensors")])
def test_round_trip_keeps_the_deltas(tmp_path, adapter, fmt, out):
    assert main(["convert", str(adapter), "--to", fmt, "-o", str(tmp_path / out), "-q"]) == 0
    assert main(["convert", str(tmp_path / out), "--from", fmt, "--to", "peft", "-o", str(tmp_path / "back"), "-q"]) == 0
    a, b = pm.load_adapter(adapter), pm.load_adapter(tmp_path / "back")
    assert a.modules == b.modules
    for m in a.modules:
        np.testing.assert_allclose(np.asarray(b.delta_weight(m)), np.asarray(a.delta_weight(m)), rtol=1e-6, atol=1e-7)


def test_what_the_target_cannot_hold_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(1)
    save_file({"lin.weight": rng.standard_normal((6, 5)).astype(np.float32)}, tmp_path / "m.safetensors")
    cfg = tmp_path / "c.json"
    cfg.write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin"], "use_dora": true,'
                   ' "init_lora_weights": false}')
    assert main(["init", str(tmp_path / "m.safetensors"), "--config", str(cfg), "-o", str(tmp_path / "d"), "-q"]) == 0
    rc = main(["convert", str(tmp_path / "d"), "--to", "candle-lora", "-o", str(tmp_path / "c.safetensors")])
    assert rc == 1 and "DoRA" in capsys.readouterr().err
    assert not (tmp_path / "c.safetensors").exists()


def test_dora_to_kohya_and_back(tmp_path, capsys):
    """DoRA goes to kohya/LyCORIS as dora_scale (out, 1) and comes back as the same magnitude and merge;
    a dora_scale over input columns (LyCORIS wd_on_output=False) is refused by convert and by merge."""
    rng = np.random.default_rng(2)
    base = {"lin.weight": rng.standard_normal((6, 5)).astype(np.float32)}
    save_file(base, tmp_path / "m.safetensors")
    assert main(["init", str(tmp_path / "m.safetensors"), "--rank", "2", "--alpha", "4", "--target", "lin",
                 "--use-dora", "--init", "false", "-o", str(tmp_path / "d"), "-q"]) == 0
    assert main(["convert", str(tmp_path / "d"), "--to", "kohya", "-o", str(tmp_path / "k.safetensors"), "-q"]) == 0
    assert main(["convert", str(tmp_path / "k.safetensors"), "--to", "peft", "-o", str(tmp_path / "b"), "-q"]) == 0
    a, b = pm.load_adapter(tmp_path / "d"), pm.load_adapter(tmp_path / "b")
    assert b.config.use_dora
    np.testing.assert_array_equal(b.params["lin"]["lora_magnitude_vector"], a.params["lin"]["lora_magnitude_vector"])
    np.testing.assert_array_equal(b.merge(base)["lin.weight"], a.merge(base)["lin.weight"])
    # merge takes the kohya file directly: the same bits as merging the PEFT adapter
    for src, out in ((tmp_path / "d", "p.safetensors"), (tmp_path / "k.safetensors", "q.safetensors")):
        assert main(["merge", str(tmp_path / "m.safetensors"), str(src), "-o", str(tmp_path / out), "-q"]) == 0
    assert (pm.io.safetensors.SafeTensorsFile(tmp_path / "p.safetensors")["lin.weight"].tobytes()
            == pm.io.safetensors.SafeTensorsFile(tmp_path / "q.safetensors")["lin.weight"].tobytes())
    f = pm.io.safetensors.SafeTensorsFile(tmp_path / "k.safetensors")
    t = {k: np.array(f[k]) for k in f}
    t["lycoris_lin.dora_scale"] = np.ones((1, 5), np.float32)
    save_file(t, tmp_path / "cols.safetensors", metadata=f.metadata)
    capsys.readouterr()
    for cmd in (["convert", str(tmp_path / "cols.safetensors"), "--to", "peft", "-o", str(tmp_path / "x")],
                ["merge", str(tmp_path / "m.safetensors"), str(tmp_path / "cols.safetensors"), "-o", str(tmp_path / "x.safetensors")]):
        assert main(cmd) == 1 and "input columns" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.safetensors").exists()


def test_conversion_warnings_are_one_line_and_strict_refuses_them(tmp_path, adapter, capsys):
    """candle-lora stores no module names and no alpha: a ConversionWarning, one plain line; --strict makes
    it an error and writes nothing."""
    out = tmp_path / "c.safetensors"
    assert main(["convert", str(adapter), "--to", "candle-lora", "-o", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    warned = [ln for ln in err if ln.startswith("peftmath: warning: ")]
    assert len(warned) == 1 and warned[0].startswith("peftmath: warning: candle-lora files store no module names "
                                                     "and no alpha"), err
    assert not any(".py:" in ln or ln.startswith("  ") for ln in err), err
    out.unlink()
    assert main(["convert", str(adapter), "--to", "candle-lora", "-o", str(out), "--strict"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("peftmath: error: candle-lora files store no module names") and err.count("\n") == 1
    assert "(a warning; --strict makes it an error)" in err and not out.exists()
