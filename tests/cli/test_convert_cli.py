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
    rc = main(["convert", str(tmp_path / "d"), "--to", "kohya", "-o", str(tmp_path / "k.safetensors")])
    assert rc == 1 and "DoRA" in capsys.readouterr().err
    assert not (tmp_path / "k.safetensors").exists()


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
