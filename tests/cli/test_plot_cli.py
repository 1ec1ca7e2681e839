"""`inspect --plot` and `extract --plot`: the pictures of peftmath.plot from the command; a missing
matplotlib is one error line before any work is done."""

from __future__ import annotations

import sys

import numpy as np
import pytest

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG, "not a PNG file"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return width, height


@pytest.fixture
def adapter(tmp_path, h, lora_targets):
    state = h.model_state()
    base = h.write_model(tmp_path / "base.safetensors", state)
    h.make_lora(tmp_path / "lora", state, lora_targets, use_dora=True)
    return tmp_path, base


def test_inspect_plot_draws_a_png(adapter, cli):
    pytest.importorskip("matplotlib")
    tmp, base = adapter
    for extra in ([], ["--base", base]):  # without the base: the additive part; with it: merge(W) - W
        out = tmp / f"spectra{len(extra)}.png"
        rc, _, err = cli("inspect", tmp / "lora", "--plot", out, *extra)
        assert rc == 0, err
        w, hgt = _png_size(out)
        assert w > 100 and hgt > 100


def test_extract_plot_draws_the_energy_curve(adapter, cli, h):
    pytest.importorskip("matplotlib")
    tmp, base = adapter
    state = h.model_state()
    rng = np.random.default_rng(3)
    tuned = {k: v.copy() for k, v in state.items()}
    k = "model.layers.0.q_proj.weight"
    tuned[k] = (tuned[k] + 0.1 * rng.standard_normal((tuned[k].shape[0], 2))
                @ rng.standard_normal((2, tuned[k].shape[1]))).astype(tuned[k].dtype)
    tuned_path = h.write_model(tmp / "tuned.safetensors", tuned)
    rc, _, err = cli("extract", base, tuned_path, "--rank", 2, "-o", tmp / "ex", "--plot", tmp / "energy.png")
    assert rc == 0, err
    assert _png_size(tmp / "energy.png")[0] > 100
    assert (tmp / "ex" / "adapter_model.safetensors").exists()


def test_missing_matplotlib_is_one_line_and_nothing_is_written(adapter, cli, monkeypatch):
    tmp, base = adapter
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc, _, err = cli("extract", base, base, "--rank", 2, "-o", tmp / "ex", "--plot", tmp / "e.png")
    assert rc == 1 and "pip install 'peftmath[plot]'" in err and "Traceback" not in err
    assert not (tmp / "ex").exists() and not (tmp / "e.png").exists()
    rc, _, err = cli("inspect", tmp / "lora", "--plot", tmp / "s.png")
    assert rc == 1 and "pip install 'peftmath[plot]'" in err
    assert not (tmp / "s.png").exists()
