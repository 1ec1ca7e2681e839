"""`peftmath extract`: LoRA by truncated SVD of TUNED - BASE; merge reproduces TUNED within the reported error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from peftmath.io import read_config
from peftmath.io.safetensors import SafeTensorsFile, load_file


def _tuned(state, seed=5):
    """Low-rank (rank 3) changes on q_proj, rank 2 on the embedding and a conv, a full-rank one on v_proj 0."""
    rng = np.random.default_rng(seed)
    t = {k: v.copy() for k, v in state.items()}
    for i in range(3):
        k = f"model.layers.{i}.q_proj.weight"
        t[k] = (t[k] + 0.1 * rng.standard_normal((16, 3)) @ rng.standard_normal((3, 12))).astype(t[k].dtype)
    t["model.layers.0.v_proj.weight"] = t["model.layers.0.v_proj.weight"] + 0.05 * rng.standard_normal((12, 12)).astype(np.float32)
    e = "model.embed_tokens.weight"
    t[e] = (t[e] + 0.1 * rng.standard_normal((30, 2)) @ rng.standard_normal((2, 12))).astype(np.float32)
    c = "model.conv.weight"
    t[c] = (t[c] + (0.1 * rng.standard_normal((8, 2)) @ rng.standard_normal((2, 36))).reshape(8, 4, 3, 3)).astype(np.float32)
    t["model.layers.1.norm.weight"] = t["model.layers.1.norm.weight"] + np.float32(0.01)
    return t


@pytest.fixture
def pair(tmp_path, h):
    state = h.model_state()
    state["model.conv.weight"] = np.random.default_rng(3).standard_normal((8, 4, 3, 3)).astype(np.float32)
    tuned = _tuned(state)
    base = h.write_model(tmp_path / "base.safetensors", state)
    tp = h.write_model(tmp_path / "tuned.safetensors", tuned)
    return base, tp, state, tuned


def _rel(tuned, merged, state, k):
    d = tuned[k].astype(np.float64) - state[k].astype(np.float64)
    return np.linalg.norm(merged[k].astype(np.float64) - tuned[k].astype(np.float64)) / np.linalg.norm(d)


def test_extract_then_merge_reproduces_tuned(cli, pair, tmp_path, h):
    base, tp, state, tuned = pair
    before = h.tree_digest(base, tp)
    rc, out, err = cli("extract", base, tp, "--rank", "4", "-o", tmp_path / "ex", "--json")
    assert rc == 0, err
    assert "1 changed tensors are not captured" in err  # the norm
    report = json.loads(out)
    assert set(report) == {f"model.layers.{i}.q_proj" for i in range(3)} | {
        "model.layers.0.v_proj", "model.embed_tokens", "model.conv"}
    assert report["model.embed_tokens"]["layer"] == "Embedding" and report["model.conv"]["layer"] == "Conv2d"
    for m in ("model.layers.0.q_proj", "model.embed_tokens", "model.conv"):
        assert report[m]["relative_error"] < 1e-6
    assert 0.3 < report["model.layers.0.v_proj"]["relative_error"] < 1  # rank 4 of a full-rank 12x12 change
    meta = json.loads(SafeTensorsFile(tmp_path / "ex" / "adapter_model.safetensors").metadata["peftmath.extract"])
    assert meta == {m: {"rank": v["rank"], "relative_error": v["relative_error"]} for m, v in report.items()}
    assert h.tree_digest(base, tp) == before
    rc, _, err = cli("merge", base, tmp_path / "ex", "-o", tmp_path / "m.safetensors")
    assert rc == 0, err
    merged = load_file(tmp_path / "m.safetensors")
    for m, v in report.items():
        assert _rel(tuned, merged, state, f"{m}.weight") <= v["relative_error"] + 1e-5, m
    # the truncation error of v_proj is the tail of its singular values
    d = tuned["model.layers.0.v_proj.weight"].astype(np.float64) - state["model.layers.0.v_proj.weight"]
    s = np.linalg.svd(d, compute_uv=False)
    assert abs(report["model.layers.0.v_proj"]["relative_error"] - np.sqrt(np.sum(s[4:] ** 2) / np.sum(s ** 2))) < 1e-5


def test_extract_energy_filters_randomized(cli, pair, tmp_path):
    base, tp, state, tuned = pair
    rc, out, err = cli("extract", base, tp, "--rank", "6", "--energy", "0.999999", "--include", r"q_proj|v_proj",
                       "--exclude", r"layers\.2", "--randomized", "-o", tmp_path / "ex", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert set(report) == {"model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.0.v_proj"}
    assert report["model.layers.0.q_proj"]["rank"] == 3  # the change has rank 3
    assert report["model.layers.0.v_proj"]["rank"] == 6
    cfg = read_config(tmp_path / "ex")
    assert cfg.r == 6 and cfg.rank_and_alpha("model.layers.1.q_proj") == (3, 3)
    assert cfg.scaling_for("model.layers.1.q_proj") == 1.0 and cfg.scaling_for("model.layers.0.v_proj") == 1.0
    rc, out, _ = cli("inspect", tmp_path / "ex", "--base", base, "--json")
    assert rc == 0 and {e["module"]: e["rank"] for e in json.loads(out)["modules"]}["model.layers.0.q_proj"] == 3


@pytest.mark.parity
def test_extract_loads_in_peft(cli, pair, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from torch import nn

    base, tp, state, tuned = pair
    rc, out, err = cli("extract", base, tp, "--rank", "4", "--exclude", "conv", "-o", tmp_path / "ex", "--json")
    assert rc == 0, err
    report = json.loads(out)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(12, 16), nn.Linear(12, 12, bias=False)
            self.norm = nn.Module()
            self.norm.weight = nn.Parameter(torch.ones(12))

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(30, 12)
            self.layers = nn.ModuleList([Layer() for _ in range(3)])

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()
            self.lm_head = nn.Linear(12, 30, bias=False)

    model = Tiny()
    sd = {k: torch.from_numpy(np.array(v)) for k, v in state.items() if k not in ("model.step", "model.conv.weight")}
    model.load_state_dict(sd)
    pm_model = peft.PeftModel.from_pretrained(model, str(tmp_path / "ex"))
    merged = pm_model.merge_and_unload().state_dict()
    got = {k: v.detach().numpy() for k, v in merged.items()}
    for m, v in report.items():
        assert _rel(tuned, got, state, f"{m}.weight") <= v["relative_error"] + 1e-5, m


@pytest.mark.parametrize("option", ["include", "exclude"])
def test_extract_lora_refuses_a_bad_regex_before_reading(pair, tmp_path, option):
    """The library function (not only the command's argparse type) names the option and the pattern."""
    from peftmath.cli import extract_lora
    from peftmath.errors import ConfigError

    base, tp, _, _ = pair
    with pytest.raises(ConfigError, match=rf"--{option} '\(q_proj' is not a valid regular expression"):
        extract_lora(str(base), str(tp), str(tmp_path / "out"), rank=2, **{option: "(q_proj"})
    assert not (tmp_path / "out").exists()
