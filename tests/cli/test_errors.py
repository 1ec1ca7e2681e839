"""Bad inputs: exit 1, a one-line error naming the file / tensor / field, nothing written, inputs untouched."""

from __future__ import annotations

import argparse
import json
import struct

import numpy as np
import pytest

import peftmath as pm

TARGETS = ["model.layers.0.q_proj", "model.layers.1.v_proj"]


@pytest.fixture
def setup(tmp_path, h):
    state = h.model_state()
    base = h.write_model(tmp_path / "base.safetensors", state)
    h.make_lora(tmp_path / "lora", state, TARGETS)
    return tmp_path, base, state


def _raw_safetensors(path, header: dict | bytes, data: bytes = b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# each case prepares its inputs and returns (argv without the command's output path, expected text)
def case_missing_base(tmp, base, state, h):
    return ["merge", tmp / "nope.safetensors", tmp / "lora"], "nope.safetensors: no such file"


def case_missing_adapter(tmp, base, state, h):
    return ["merge", base, tmp / "no-adapter"], "no-adapter: no such adapter folder"


def case_truncated(tmp, base, state, h):
    data = base.read_bytes()
    base.write_bytes(data[: len(data) - 100])
    return ["merge", base, tmp / "lora"], "truncated"


def case_bad_header_json(tmp, base, state, h):
    _raw_safetensors(base, b'{"a": {"dtype": "F32", ', b"\0" * 16)
    return ["merge", base, tmp / "lora"], "header is not valid JSON"


def case_bad_header_length(tmp, base, state, h):
    base.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    return ["merge", base, tmp / "lora"], "runs past the end of the file"


def case_bad_offsets(tmp, base, state, h):
    _raw_safetensors(base, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, b"\0" * 8)
    return ["merge", base, tmp / "lora"], "'w' data_offsets [0, 800] fall outside"


def case_bad_byte_count(tmp, base, state, h):
    _raw_safetensors(base, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    return ["merge", base, tmp / "lora"], "is F32 (3,) (12 bytes) but data_offsets span 8 bytes"


def case_bad_dtype(tmp, base, state, h):
    _raw_safetensors(base, {"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    return ["merge", base, tmp / "lora"], "unknown dtype 'F99'"


def case_config_not_json(tmp, base, state, h):
    (tmp / "lora" / "adapter_config.json").write_text("{'r': 4,")
    return ["merge", base, tmp / "lora"], "adapter_config.json: not valid JSON"


def case_config_invalid_value(tmp, base, state, h):
    p = tmp / "lora" / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg["r"] = -4
    p.write_text(json.dumps(cfg))
    return ["merge", base, tmp / "lora"], "field 'r' must be a positive integer, got -4"


def case_unknown_peft_type(tmp, base, state, h):
    p = tmp / "lora" / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg["peft_type"] = "SUPERLORA"
    p.write_text(json.dumps(cfg))
    return ["merge", base, tmp / "lora"], "unknown peft_type 'SUPERLORA'"


def case_shape_mismatch(tmp, base, state, h):
    other = dict(state)
    other["model.layers.0.q_proj.weight"] = np.zeros((20, 12), np.float32)
    other["model.layers.0.q_proj.bias"] = np.zeros(20, np.float32)
    h.make_lora(tmp / "lora2", other, TARGETS)
    return ["merge", base, tmp / "lora2"], "model.layers.0.q_proj"


def case_module_missing(tmp, base, state, h):
    other = dict(state)
    other["model.layers.9.q_proj.weight"] = state["model.layers.0.q_proj.weight"]
    h.make_lora(tmp / "lora2", other, ["model.layers.9.q_proj"])
    return ["merge", base, tmp / "lora2"], "'model.layers.9.q_proj.weight'"


def case_pickle_adapter(tmp, base, state, h):
    d = tmp / "binlora"
    d.mkdir()
    (d / "adapter_config.json").write_text((tmp / "lora" / "adapter_config.json").read_text())
    (d / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: must never be loaded
    return ["merge", base, d], "pickle checkpoints are never loaded"


def _sharded(tmp, state, h, target):
    folder = h.write_model(tmp / "shards", state, shards=2)
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    key = next(iter(idx["weight_map"]))
    idx["weight_map"][key] = target
    (folder / "model.safetensors.index.json").write_text(json.dumps(idx))
    return folder


def case_index_dotdot(tmp, base, state, h):
    folder = _sharded(tmp, state, h, "../base.safetensors")
    return ["merge", folder, tmp / "lora"], "points outside the model folder"


def case_index_absolute(tmp, base, state, h):
    folder = _sharded(tmp, state, h, str(base.resolve()))
    return ["merge", folder, tmp / "lora"], "points outside the model folder"


def case_nan_safe(tmp, base, state, h):
    ad = pm.load_adapter(tmp / "lora")
    params = {m: {s: np.array(a) for s, a in p.items()} for m, p in ad.params.items()}
    params["model.layers.1.v_proj"]["lora_B.weight"][0, 0] = np.nan
    pm.save_adapter(pm.Adapter(ad.config, params), tmp / "nanlora")
    return ["merge", base, tmp / "nanlora", "--safe"], "NaN or infinity"


def case_out_exists(tmp, base, state, h):
    return ["merge", base, tmp / "lora"], "already exists; pass --force"


def case_out_is_input(tmp, base, state, h):
    return ["merge", base, tmp / "lora", "--force"], "would replace the input"


def case_out_inside_adapter(tmp, base, state, h):
    return ["merge", base, tmp / "lora", "-o", tmp / "lora" / "merged.safetensors"], "inside the input folder"


def case_inspect_base_mismatch(tmp, base, state, h):
    other = dict(state)
    other["model.layers.0.q_proj.weight"] = np.zeros((20, 12), np.float32)
    h.make_lora(tmp / "lora2", other, TARGETS)
    return ["inspect", tmp / "lora2", "--base", base], "do not fit"


def case_unmerge_missing_records(tmp, base, state, h):
    h.make_lora(tmp / "dora", state, TARGETS, use_dora=True)
    return ["unmerge", base, tmp / "dora"], "weight norms recorded at merge time"


def _write_config(tmp, name, **fields):
    d = tmp / name
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes((tmp / "lora" / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((tmp / "lora" / "adapter_config.json").read_text())
    cfg.update(fields)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def case_inspect_bad_rank_pattern_regex(tmp, base, state, h):
    return ["inspect", _write_config(tmp, "badre", rank_pattern={"(q_proj": 2})], "invalid regular expression"


def case_merge_bad_alpha_pattern_regex(tmp, base, state, h):
    return ["merge", base, _write_config(tmp, "badre", alpha_pattern={"[v": 2})], "invalid regular expression"


def case_init_flag_the_method_lacks(tmp, base, state, h):
    return ["init", base, "--method", "ia3", "--alpha", "3"], "--alpha: IA3 has no field 'alpha'"


def case_init_flag_init_the_method_lacks(tmp, base, state, h):
    """PREFIX_TUNING's description has no init field: --init is refused by name, not guessed."""
    return ["init", base, "--method", "prefix_tuning", "--init", "true"], "--init: PREFIX_TUNING has no initialisation field"


def case_init_changing_the_base_needs_base_out(tmp, base, state, h):
    """The message names the description's init field and its value."""
    return ["init", base, "--init", "pissa", "--target", "q_proj", "-o", tmp / "pa"], \
        "init_lora_weights='pissa' changes"


def case_init_needs_config_fields(tmp, base, state, h):
    return ["init", base, "--method", "adalora", "--target", "q_proj"], "total_step"


def case_init_base_out_is_output(tmp, base, state, h):
    return ["init", base, "--init", "pissa", "--target", "q_proj", "--base-out", tmp / "out.safetensors"], \
        "are the same path"


def case_init_unsupported_init(tmp, base, state, h):
    return ["init", base, "--init", "eva", "--target", "q_proj", "--base-out", tmp / "nb.safetensors"], "'eva'"


def case_init_config_is_missing(tmp, base, state, h):
    return ["init", base, "--config", tmp / "nope.json"], "nope.json: no such file"


def case_init_config_bad_target_regex(tmp, base, state, h):
    (tmp / "cfg.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ".*(q_proj"}))
    return ["init", base, "--config", tmp / "cfg.json"], "invalid regular expression"


def case_combine_adapter_is_a_file(tmp, base, state, h):
    return ["combine", tmp / "lora", base], "no such file"


def case_convert_missing_source(tmp, base, state, h):
    return ["convert", tmp / "nope", "--to", "kohya"], "nope: no such file"


def case_strict_skipped_module(tmp, base, state, h):
    # LoHa has no Embedding: PEFT skips model.embed_tokens with a warning, --strict refuses it
    return ["init", base, "--method", "loha", "--target", ".*(embed_tokens|q_proj)", "--strict"], \
        "LOHA does not support these layer kinds; skipped as PEFT skips them: model.embed_tokens (Embedding) " \
        "(a warning; --strict makes it an error)"


def case_out_parent_is_a_file(tmp, base, state, h):
    (tmp / "afile").write_bytes(b"x")
    return ["merge", base, tmp / "lora", "-o", tmp / "afile" / "out.safetensors"], "is not a folder"


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, setup, cli, h):
    tmp, base, state = setup
    argv, expected = CASES[name](tmp, base, state, h)
    out = tmp / "out.safetensors"
    if name == "out_exists":
        out.write_bytes(b"keep me")
    if name == "out_is_input":
        out = base
    if argv[0] != "inspect" and "-o" not in argv:
        argv = [*argv, "-o", out]
    before = h.tree_digest(tmp)
    rc, stdout, err = cli(*argv)
    assert rc == 1, (stdout, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("peftmath: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert h.tree_digest(tmp) == before  # inputs byte-identical, nothing written, no temporaries left
    if name == "out_exists":
        assert out.read_bytes() == b"keep me"


def test_verbose_gives_traceback(setup, cli):
    tmp, base, _ = setup
    rc, _, err = cli("merge", tmp / "nope.safetensors", tmp / "lora", "-o", tmp / "o.safetensors", "-v")
    assert rc == 1 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("peftmath: error:")


def test_usage_errors(cli, tmp_path):
    assert cli()[0] == 2
    assert cli("merge", tmp_path)[0] == 2  # no adapter, no -o
    assert cli("frobnicate")[0] == 2
    assert cli("merge", "a", "b", "-o", "c", "--dtype", "int8")[0] == 2
    assert cli("--help")[0] == 0


# a value malformed or out of range on its own is a usage error: exit 2, argparse's message naming the
# option, before anything is read or written. Each case: (argv, the option named, what the message says)
_A, _B, _M = "lora", "lora2", "base.safetensors"
USAGE = {
    "merge-layer-kind-no-equals": (["merge", _M, _A, "--layer-kind", "nokind"], "--layer-kind", "MODULE=KIND"),
    "merge-layer-kind-unknown": (["merge", _M, _A, "--layer-kind", "m=Conv4d"], "--layer-kind", "Conv4d"),
    "unmerge-layer-kind": (["unmerge", _M, _A, "--layer-kind", "foo"], "--layer-kind", "MODULE=KIND"),
    "inspect-layer-kind-no-module": (["inspect", _A, "--layer-kind", "=Linear"], "--layer-kind", "MODULE=KIND"),
    "init-layer-kind": (["init", _M, "--layer-kind", "q=Nope"], "--layer-kind", "Nope"),
    "extract-layer-kind": (["extract", _M, _M, "--rank", "2", "--layer-kind", "q"], "--layer-kind", "MODULE=KIND"),
    "inspect-top-negative": (["inspect", _A, "--top", "-1"], "--top", "integer >= 0"),
    "inspect-top-text": (["inspect", _A, "--top", "three"], "--top", "'three'"),
    "extract-rank-zero": (["extract", _M, _M, "--rank", "0"], "--rank", "positive integer"),
    "extract-rank-negative": (["extract", _M, _M, "--rank", "-4"], "--rank", "positive integer"),
    "extract-energy-above-1": (["extract", _M, _M, "--rank", "2", "--energy", "1.5"], "--energy", "(0, 1]"),
    "extract-energy-zero": (["extract", _M, _M, "--rank", "2", "--energy", "0"], "--energy", "(0, 1]"),
    "extract-energy-nan": (["extract", _M, _M, "--rank", "2", "--energy", "nan"], "--energy", "(0, 1]"),
    "extract-include-regex": (["extract", _M, _M, "--rank", "2", "--include", "(q_proj"], "--include",
                              "not a valid regular expression"),
    "extract-exclude-regex": (["extract", _M, _M, "--rank", "2", "--exclude", "[lm"], "--exclude",
                              "not a valid regular expression"),
    "combine-weight-nan": (["combine", _A, _B, "--weights", "nan", "1"], "--weights", "finite number"),
    "combine-weight-inf": (["combine", _A, _B, "--weights", "1", "inf"], "--weights", "finite number"),
    "combine-svd-rank-zero": (["combine", _A, _B, "--svd-rank", "0"], "--svd-rank", "positive integer"),
    "combine-svd-clamp-above-1": (["combine", _A, _B, "--svd-clamp", "2"], "--svd-clamp", "[0, 1]"),
    "combine-svd-clamp-negative": (["combine", _A, _B, "--svd-clamp", "-0.5"], "--svd-clamp", "[0, 1]"),
    "combine-density-zero": (["combine", _A, _B, "--method", "ties", "--density", "0"], "--density", "(0, 1]"),
    "combine-density-above-1": (["combine", _A, _B, "--method", "ties", "--density", "1.5"], "--density", "(0, 1]"),
    "combine-seed-negative": (["combine", _A, _B, "--seed", "-1"], "--seed", "integer >= 0"),
    "convert-num-layers-zero": (["convert", _A, "--to", "mlx", "--num-layers", "0"], "--num-layers", "-1 for all"),
    "convert-num-layers-negative": (["convert", _A, "--to", "mlx", "--num-layers", "-5"], "--num-layers",
                                    "-1 for all"),
    "convert-lora-alpha-nan": (["convert", _A, "--to", "peft", "--lora-alpha", "nan"], "--lora-alpha", "> 0"),
    "init-r-zero": (["init", _M, "--r", "0"], "--r", "positive integer"),
    "init-r-negative": (["init", _M, "--r", "-8"], "--r", "positive integer"),
    "init-alpha-nan": (["init", _M, "--alpha", "nan"], "--alpha", "finite number"),
    "init-seed-negative": (["init", _M, "--seed", "-1"], "--seed", "integer >= 0"),
    "init-target-regex": (["init", _M, "--target", "(q_proj"], "--target", "not a valid regular expression"),
}


@pytest.mark.parametrize("name", sorted(USAGE))
def test_bad_option_value_is_a_usage_error(name, setup, cli, h):
    tmp, base, state = setup
    h.make_lora(tmp / "lora2", state, TARGETS, seed=2)
    argv, option, expected = USAGE[name]
    argv = [tmp / a if a in (_A, _B, _M) else a for a in argv]
    if argv[0] != "inspect":
        argv += ["-o", tmp / "out"]
    before = h.tree_digest(tmp)
    rc, stdout, err = cli(*argv)
    assert rc == 2, (stdout, err)
    last = err.rstrip().splitlines()[-1]
    assert last.startswith(f"peftmath {argv[0]}: error: argument {option}"), err
    assert expected in last, last
    assert "Traceback" not in err and stdout == ""
    assert h.tree_digest(tmp) == before


def test_every_command_takes_strict_and_layer_kind_is_parsed_once():
    from peftmath.cli import _layer_kind_item, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        options = {o: a for a in parser._actions for o in a.option_strings}
        assert "--strict" in options, name
        if "--layer-kind" in options:
            assert options["--layer-kind"].type is _layer_kind_item, name


def test_warnings_are_one_plain_line(setup, cli):
    tmp, base, state = setup
    argv = ["init", base, "--method", "loha", "--target", ".*(embed_tokens|q_proj)"]
    rc, out, err = cli(*argv, "-o", tmp / "a")
    assert rc == 0, err
    warned = [ln for ln in err.splitlines() if ln.startswith("peftmath: warning")]
    assert warned == ["peftmath: warning: LOHA does not support these layer kinds; skipped as PEFT skips them: "
                      "model.embed_tokens (Embedding)"], err
    assert ".py" not in err and "PeftMathWarning" not in err
    rc, out, err = cli(*argv, "-o", tmp / "b", "-q")  # -q: data and errors only
    assert rc == 0 and "warning" not in err
    rc, out, err = cli("--strict", *argv, "-o", tmp / "c")  # --strict before the command works too
    assert rc == 1 and err.startswith("peftmath: error: LOHA does not support") and not (tmp / "c").exists()


def test_foreign_warnings_are_one_line_too(setup, cli, monkeypatch):
    """A warning from another library during a command (NumPy, a plugin) is one line naming its category,
    and --strict leaves it a warning (it is not peftmath's)."""
    import warnings

    from peftmath import cli as cli_module

    tmp, base, state = setup
    real = cli_module._cmd_inspect

    def noisy(args, log):
        warnings.warn("overflow encountered in multiply\n  (second line)", RuntimeWarning)
        return real(args, log)

    monkeypatch.setattr(cli_module, "_cmd_inspect", noisy)
    for strict in ([], ["--strict"]):
        rc, out, err = cli("inspect", tmp / "lora", *strict)
        assert rc == 0 and err == "peftmath: warning: RuntimeWarning: overflow encountered in multiply (second line)\n"
    with warnings.catch_warnings():  # python -W error::RuntimeWarning: the caller's filters still apply
        warnings.simplefilter("error", RuntimeWarning)
        rc, out, err = cli("inspect", tmp / "lora")
    assert rc == 1 and out == "" and err == ("peftmath: error: RuntimeWarning: overflow encountered in multiply "
                                             "(second line) (a warning that the warnings filter raises as an error)\n")


@pytest.mark.parametrize("shards", [1, 3])
def test_interrupted_run_leaves_nothing(setup, cli, h, monkeypatch, shards):
    """A run interrupted half-way (Ctrl-C while merging) leaves no OUT and no temporary files."""
    from peftmath.io import stream

    tmp, base, state = setup
    if shards > 1:
        base = h.write_model(tmp / "shards", state, shards=shards)
    real = stream.Model.read
    calls = []

    def read(self, key, **kw):  # (kw: the reused buffer the pipeline reads an adapted weight into)
        calls.append(key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, key, **kw)

    monkeypatch.setattr(stream.Model, "read", read)
    before = h.tree_digest(tmp)
    out = tmp / ("out" if shards > 1 else "out.safetensors")
    rc, _, err = cli("merge", base, tmp / "lora", "-o", out)
    assert rc == 130 and "interrupted" in err
    assert not out.exists()
    assert h.tree_digest(tmp) == before
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("command", ["inspect", "merge", "unmerge", "combine", "init", "convert"])
def test_strict_refuses_an_unknown_config_field_in_every_command(setup, cli, h, command):
    """`lora_alfa` for `lora_alpha`: a one-line warning naming the closest field; with --strict an error,
    exit 1, nothing written."""
    tmp, base, state = setup
    alfa = tmp / "alfa"
    alfa.mkdir()
    (alfa / "adapter_model.safetensors").write_bytes((tmp / "lora" / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((tmp / "lora" / "adapter_config.json").read_text())
    cfg["lora_alfa"] = cfg.pop("lora_alpha")
    (alfa / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp / "out"
    argv = {"inspect": ["inspect", alfa], "merge": ["merge", base, alfa, "-o", out],
            "unmerge": ["unmerge", base, alfa, "-o", out, "--ignore-provenance"],
            "combine": ["combine", alfa, tmp / "lora", "-o", out],
            "init": ["init", base, "--config", alfa / "adapter_config.json", "-o", out],
            "convert": ["convert", alfa, "--to", "peft", "-o", out]}[command]
    before = h.tree_digest(tmp)
    rc, stdout, err = cli(*argv, "--strict")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1, err
    assert lines[0].startswith("peftmath: error: ") and "'lora_alfa'" in lines[0] and "lora_alpha" in lines[0]
    assert h.tree_digest(tmp) == before and not out.exists()
    rc, stdout, err = cli(*argv)
    assert rc == 0, err
    warned = [ln for ln in err.splitlines() if ln.startswith("peftmath: warning: ")]
    assert any("unknown field 'lora_alfa' (did you mean 'lora_alpha'?)" in ln for ln in warned), err
