"""`peftmath init` (a new adapter for a model) and `peftmath combine` (add_weighted_adapter) end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

import peftmath as pm
from peftmath.cli import main
from peftmath.io.safetensors import load_file, save_file


@pytest.fixture()
def model(tmp_path):
    rng = np.random.default_rng(0)
    state = {f"model.layers.{i}.{n}.weight": rng.standard_normal((8, 12)).astype(np.float32)
             for i in range(2) for n in ("q_proj", "v_proj")}
    state["model.embed_tokens.weight"] = rng.standard_normal((20, 12)).astype(np.float32)
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    return path, state


def test_init_with_flags_selects_like_peft_and_is_a_no_op(tmp_path, model, capsys):
    path, state = model
    out = tmp_path / "lora"
    assert main(["init", str(path), "--r", "4", "--alpha", "8", "--target", "all-linear", "-o", str(out)]) == 0
    ad = pm.load_adapter(out)
    assert ad.modules == sorted(k[:-7] for k in state if "proj" in k)
    assert ad.config.r == 4 and ad.config.lora_alpha == 8
    merged = ad.merge(state)
    for k in state:
        np.testing.assert_array_equal(merged[k], state[k])       # PEFT's zeros: a fresh adapter is a no-op
    trainable = 4 * (4 * 12 + 8 * 4)                         # four modules, A (4, 12) and B (8, 4)
    total = trainable + sum(v.size for v in state.values())
    assert f"trainable params: {trainable:,} || all params: {total:,}" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "ia3", "loha", "oft"])
def test_init_flag_sets_the_described_init_field(tmp_path, model, method):
    """--init sets the field the method's description names (init_lora_weights, init_ia3_weights,
    init_weights), and only that one."""
    from peftmath.methods import describe_method

    path, _ = model
    out = tmp_path / method
    assert main(["init", str(path), "--method", method, "--target", "q_proj", "--init", "false", "-o", str(out),
                 "-q"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    field = describe_method(method.upper()).init_field
    assert saved[field] is False
    assert [f for f in ("init_lora_weights", "init_ia3_weights", "init_weights") if f in saved] == [field]


def test_init_from_config_file_and_base_out(tmp_path, model):
    path, state = model
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["v_proj"],
                               "init_lora_weights": "pissa"}))
    assert main(["init", str(path), "--config", str(cfg), "-o", str(tmp_path / "a")]) == 1   # needs --base-out
    assert not (tmp_path / "a").exists()
    assert main(["init", str(path), "--config", str(cfg), "-o", str(tmp_path / "a"),
                 "--base-out", str(tmp_path / "residual.safetensors")]) == 0
    residual = load_file(tmp_path / "residual.safetensors")
    merged = pm.load_adapter(tmp_path / "a").merge(residual)
    for k in state:
        np.testing.assert_allclose(merged[k], state[k], atol=2e-5)
    # the factors belong to the residual base: PEFT must not run PiSSA again when it loads them there
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 2


def test_init_base_out_is_not_written_for_an_init_that_keeps_the_base(tmp_path, model, capsys):
    path, _ = model
    rc = main(["init", str(path), "--target", "q_proj", "--base-out", str(tmp_path / "nb.safetensors"),
               "-o", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 0 and (tmp_path / "a").is_dir() and not (tmp_path / "nb.safetensors").exists()
    assert "peftmath: warning: --base-out" in err and "leaves the base model unchanged; not written" in err


def test_init_writes_no_new_base_without_its_adapter(tmp_path, model, capsys, monkeypatch):
    from peftmath import extract
    from peftmath.errors import CheckpointError

    def fail(*args, **kwargs):
        raise CheckpointError("disk full (simulated)")

    monkeypatch.setattr(extract, "write_adapter", fail)  # the command imports it from there when it runs
    path, _ = model
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["init", str(path), "--target", "q_proj", "--init", "olora", "--base-out", str(tmp_path / "nb"),
               "-o", str(tmp_path / "a")])
    assert rc == 1 and "disk full (simulated)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_init_flags_fill_the_method_defaults(tmp_path, model):
    """OFT from flags: PEFT's default oft_block_size, or --r with oft_block_size 0 (PEFT wants one of them)."""
    path, state = model
    for extra, want in (([], (0, 32)), (["--r", "4"], (4, 0))):
        out = tmp_path / f"oft{len(extra)}"
        assert main(["init", str(path), "--method", "oft", "--target", "v_proj", *extra, "-o", str(out), "-q"]) == 0
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["oft_block_size"]) == want
        merged = pm.load_adapter(out).merge(state)
        for k in state:                                          # a default OFT is the identity rotation
            np.testing.assert_allclose(merged[k], state[k], atol=1e-6)


def test_init_rank_zeroes_what_the_method_description_lists(tmp_path, model, monkeypatch, capsys):
    """--rank zeroes the fields of the method's ``rank_excludes``, read from its description (no method
    name in the command): OFT's lists oft_block_size; with the rule taken out of the description, the
    same command keeps PEFT's default oft_block_size and is refused for setting both."""
    import dataclasses

    from peftmath.methods import describe_method, get_method

    path, _ = model
    assert describe_method("OFT").rank_excludes == ("oft_block_size",)
    assert describe_method("BOFT").rank_excludes == ()                   # BOFT has no r: --rank is refused
    for peft_type in ("LORA", "IA3", "LOHA", "LOKR", "VERA", "ADALORA"):
        assert describe_method(peft_type).fields_for_rank() == {}
    args = ["init", str(path), "--method", "oft", "--target", "v_proj", "--r", "4", "-q"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["oft_block_size"] == 0
    oft = get_method("OFT")
    monkeypatch.setattr(oft, "METHOD", dataclasses.replace(oft.METHOD, rank_excludes=()))
    capsys.readouterr()
    assert main([*args, "-o", str(tmp_path / "b")]) != 0
    err = capsys.readouterr().err
    assert "oft_block_size" in err and not (tmp_path / "b").exists()
    with pytest.raises(TypeError, match="rank_excludes"):            # a field the config lacks is refused
        dataclasses.replace(oft.METHOD, rank_excludes=("oft_block_sizes",))


def test_ia3_feedforward_modules_from_the_model_type(tmp_path):
    """PEFT fills a null feedforward_modules from its table (Llama: down_proj) before saving; the saved list
    keeps only entries of an explicit target list (PEFT refuses to load a non-subset)."""
    from peftmath.create import create_adapter
    from peftmath.methods.ia3 import IA3Config

    rng = np.random.default_rng(0)
    state = {f"model.layers.0.{n}.weight": rng.standard_normal(s).astype(np.float32)
             for n, s in (("self_attn.k_proj", (8, 16)), ("self_attn.v_proj", (8, 16)), ("mlp.down_proj", (16, 32)))}
    ad = create_adapter(state, IA3Config(init_ia3_weights=False), model_type="llama")
    assert ad.config.feedforward_modules == ["down_proj"]
    assert ad.config.target_modules == ["down_proj", "k_proj", "v_proj"]   # PEFT's table entry, saved as a list
    assert ad.params["model.layers.0.mlp.down_proj"]["ia3_l"].shape == (1, 32)   # scales the input
    assert ad.params["model.layers.0.self_attn.k_proj"]["ia3_l"].shape == (8, 1)
    ad = create_adapter(state, IA3Config(target_modules=["k_proj", "v_proj"]), model_type="llama")
    assert ad.config.feedforward_modules == []
    ad = create_adapter(state, IA3Config(target_modules=["k_proj", "v_proj"]))   # no model type: left null
    assert ad.config.feedforward_modules is None


def test_init_bad_target_names_the_closest_module(tmp_path, model, capsys):
    path, _ = model
    assert main(["init", str(path), "--target", "q_prj", "-o", str(tmp_path / "x")]) == 1
    assert "q_proj" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["cat", "svd", "ties"])
def test_combine(tmp_path, model, capsys, method):
    path, state = model
    for i in (1, 2):
        assert main(["init", str(path), "--r", "2", "--alpha", str(3 * i), "--target", "q_proj", "--init", "false",
                     "--seed", str(i), "-o", str(tmp_path / f"a{i}")]) == 0
    out = tmp_path / f"c-{method}"
    args = ["combine", str(tmp_path / "a1"), str(tmp_path / "a2"), "--weights", "0.7", "-0.3", "--method", method,
            "-o", str(out)]
    if method == "ties":
        args += ["--density", "0.5"]
    if method == "svd":
        args += ["--svd-rank", "4"]
    assert main(args) == 0
    a1, a2, c = (pm.load_adapter(p) for p in (tmp_path / "a1", tmp_path / "a2", out))
    expected = pm.combine([a1, a2], [0.7, -0.3], combination_type=method, density=0.5 if method == "ties" else None,
                          svd_rank=4 if method == "svd" else None)
    for m in c.modules:
        np.testing.assert_allclose(np.asarray(c.delta_weight(m)), np.asarray(expected.delta_weight(m)), atol=1e-6)
    if method in ("cat", "svd"):
        exact = 0.7 * np.asarray(a1.delta_weight(m)) - 0.3 * np.asarray(a2.delta_weight(m))
        np.testing.assert_allclose(np.asarray(c.delta_weight(m)), exact, atol=1e-5)
    assert main(args) == 1 and "already exists" in capsys.readouterr().err   # no --force


def test_combine_refuses_mismatched_weights(tmp_path, model, capsys):
    path, _ = model
    assert main(["init", str(path), "--target", "q_proj", "-o", str(tmp_path / "a")]) == 0
    assert main(["combine", str(tmp_path / "a"), str(tmp_path / "a"), "--weights", "1", "-o", str(tmp_path / "c")]) == 1
    assert "1 weights for 2 adapters" in capsys.readouterr().err and not (tmp_path / "c").exists()
