"""Bad inputs: exit 1, a one-line error naming the file / tensor / field, nothing written, inputs untouched."""

from __future__ import annotations

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


def case_extract_rank(tmp, base, state, h):
    return ["extract", base, base, "--rank", "0"], "--rank must be a positive integer"


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
    assert cli("merge", "a", "b", "-o", "c", "--layer-kind", "nokind")[0] == 1
    assert cli("--help")[0] == 0


@pytest.mark.parametrize("shards", [1, 3])
def test_interrupted_run_leaves_nothing(setup, cli, h, monkeypatch, shards):
    """A run interrupted half-way (Ctrl-C while merging) leaves no OUT and no temporary files."""
    from peftmath.io import stream

    tmp, base, state = setup
    if shards > 1:
        base = h.write_model(tmp / "shards", state, shards=shards)
    real = stream.Model.read
    calls = []

    def read(self, key):
        calls.append(key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, key)

    monkeypatch.setattr(stream.Model, "read", read)
    before = h.tree_digest(tmp)
    out = tmp / ("out" if shards > 1 else "out.safetensors")
    rc, _, err = cli("merge", base, tmp / "lora", "-o", out)
    assert rc == 130 and "interrupted" in err
    assert not out.exists()
    assert h.tree_digest(tmp) == before
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]
