"""`peftmath inspect`: text and JSON output against independent numbers."""

from __future__ import annotations

import json

import numpy as np

import peftmath as pm


def test_inspect_json_numbers(cli, f32_model, tmp_path, lora_targets, h):
    base, state = f32_model
    ad = h.make_lora(tmp_path / "lora", state, lora_targets, rank_pattern={"v_proj": 2}, alpha=6)
    rc, out, err = cli("inspect", tmp_path / "lora", "--json", "--top", "2")
    assert rc == 0, err
    info = json.loads(out)
    assert info["peft_type"] == "LORA" and info["additive"] is True
    assert info["num_modules"] == len(lora_targets)
    assert info["trainable_parameters"] == ad.num_trainable_parameters()
    assert info["trainable_parameters"] == 3 * 4 * (16 + 12) + 3 * 2 * (12 + 12)
    assert info["dtypes"] == ["float32"]
    by = {e["module"]: e for e in info["modules"]}
    assert by["model.layers.0.q_proj"]["rank"] == 4 and by["model.layers.1.v_proj"]["rank"] == 2
    for m in lora_targets:  # delta norm and singular values from an independent float64 product
        p = ad.params[m]
        r = p["lora_A.weight"].shape[0]
        d = (6 / r) * p["lora_B.weight"].astype(np.float64) @ p["lora_A.weight"].astype(np.float64)
        s = np.linalg.svd(d, compute_uv=False)
        e = by[m]
        assert abs(e["delta_norm"] - np.linalg.norm(d)) <= 1e-5 * np.linalg.norm(d)
        assert np.allclose(e["top_singular_values"], s[:2], rtol=1e-5)
        assert e["parameters"]["lora_A.weight"] == {"shape": [r, 12], "dtype": "float32"}
        assert e["layer"] == "Linear"


def test_inspect_text_with_base(cli, tmp_path, lora_targets, h):
    state = h.model_state(h.BF16)
    base = h.write_model(tmp_path / "base", state, shards=2)
    h.make_lora(tmp_path / "lora", state, lora_targets + ["model.embed_tokens"], dtype=h.BF16)
    rc, out, err = cli("inspect", tmp_path / "lora", "--base", base)
    assert rc == 0, err
    assert "method:      LORA" in out and "bfloat16" in out
    assert any(ln.split()[:2] == ["model.embed_tokens", "Embedding"] for ln in out.splitlines())
    lines = [ln for ln in out.splitlines() if ln.startswith("model.")]
    assert len(lines) == len(lora_targets) + 1 and all(ln.endswith(" ok") for ln in lines)
    rc, out, _ = cli("inspect", tmp_path / "lora", "--base", base, "--json")
    assert rc == 0 and all(e["base"] == "ok" for e in json.loads(out)["modules"])


def test_inspect_reads_headers_only_for_base(cli, tmp_path, lora_targets, h, monkeypatch):
    """--base needs shapes only: no tensor data of the base is read."""
    from peftmath.io import stream

    state = h.model_state()
    base = h.write_model(tmp_path / "base.safetensors", state)
    h.make_lora(tmp_path / "lora", state, lora_targets)

    def boom(self, key):
        raise AssertionError(f"read {key}")

    monkeypatch.setattr(stream.Model, "read", boom)
    monkeypatch.setattr(pm.io.SafeTensorsFile, "__getitem__", boom)
    monkeypatch.setattr(pm.io.peft, "SafeTensorsFile", _AdapterOnly)
    rc, out, err = cli("inspect", tmp_path / "lora", "--base", base)
    assert rc == 0, err


class _AdapterOnly(pm.io.SafeTensorsFile):
    """The adapter's own tensors may be read (it is small); the base's may not."""

    def __getitem__(self, name):
        return np.array(np.memmap(self.path, dtype=np.uint8, mode="r")[self.span(name)[0]:self.span(name)[1]]) \
            .view(self.dtype(name)).reshape(self.shape(name))


def test_inspect_non_additive(cli, tmp_path):
    from peftmath.methods import describe_method, implemented_methods

    non_additive = [t for t in implemented_methods()
                    if describe_method(t).merges_weights and not describe_method(t).additive]
    if not non_additive:
        return
    d = tmp_path / "demo"
    assert cli("demo", d, "-q")[0] == 0
    for folder in sorted(d.glob("adapter-*")):
        rc, out, err = cli("inspect", folder, "--json", "--base", d / "model.safetensors",
                           "--layer-kind", "attn.c_attn=Conv1D", "--layer-kind", "embed=Embedding")
        if json.loads((folder / "adapter_config.json").read_text()).get("layer_replication"):
            assert rc == 1 and "load_replicated" in err, err  # an adapter of the replicated model: refused by name
            continue
        assert rc == 0, (folder, err)
        info = json.loads(out)
        for e in info["modules"]:
            if not info["additive"]:  # a rotation or scale has no delta; HiRA's needs the base weight too
                assert e["delta_norm"] is None, folder


def test_inspect_top_zero_and_negative(cli, f32_model, tmp_path, lora_targets, h):
    """--top 0 lists no singular value (the norms stay); a negative count is refused, by argparse in the
    command (exit 2) and by ``inspect_adapter`` itself (ConfigError)."""
    import pytest

    from peftmath.cli import inspect_adapter
    from peftmath.errors import ConfigError

    base, state = f32_model
    ad = h.make_lora(tmp_path / "lora", state, lora_targets)
    rc, out, err = cli("inspect", tmp_path / "lora", "--json", "--top", "0")
    assert rc == 0, err
    for e in json.loads(out)["modules"]:
        p = ad.params[e["module"]]
        d = 2.0 * p["lora_B.weight"].astype(np.float64) @ p["lora_A.weight"].astype(np.float64)
        assert e["top_singular_values"] == [] and abs(e["delta_norm"] - np.linalg.norm(d)) <= 1e-5 * np.linalg.norm(d)
    assert cli("inspect", tmp_path / "lora", "--top", "-1")[0] == 2
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match="top must be an integer >= 0"):
            inspect_adapter(tmp_path / "lora", top=bad)
