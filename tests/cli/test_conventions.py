"""One spelling per concept across commands (old spellings kept as hidden aliases), short dtype names on
every command that takes a dtype, `init --use-dora`, `unmerge --dtype`, and `merge --max-shard-size`
(transformers-named shards, a new index, base order, atomic)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from peftmath.cli import _size_arg, build_parser
from peftmath.io.safetensors import DTYPES, SafeTensorsFile, load_file
from peftmath.io.stream import INDEX_NAME, PROVENANCE_KEY, open_model

TARGETS = ["model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.2.v_proj"]
KINDS = ["--layer-kind", "model.layers.2.v_proj=Linear"]


def _help(*cmd):
    return build_parser()._subparsers._group_actions[0].choices[cmd[0]].format_help()


def _read(model):
    m = open_model(model)
    return {k: np.array(m.read(k)) for k in m.keys()}


def test_canonical_spellings_and_hidden_aliases(cli, tmp_path, h):
    p = build_parser()
    assert p.parse_args(["init", "b", "--rank", "8", "-o", "o"]).r == 8
    assert p.parse_args(["init", "b", "--r", "8", "-o", "o"]).r == 8  # the former spelling still works
    assert p.parse_args(["init", "b", "--lora-alpha", "16", "-o", "o"]).alpha == 16
    assert p.parse_args(["extract", "a", "b", "--r", "3", "-o", "o"]).rank == 3
    assert p.parse_args(["convert", "a", "--to", "peft", "--alpha", "4", "-o", "o"]).lora_alpha == 4
    assert p.parse_args(["convert", "a", "--to", "peft", "--lora-alpha", "4", "-o", "o"]).lora_alpha == 4
    init_help, convert_help = _help("init"), _help("convert")
    assert "--rank" in init_help and "--r " not in init_help and "--lora-alpha" not in init_help
    assert "--alpha" in convert_help and "--lora-alpha" not in convert_help
    # end to end: --rank and --r write the same adapter
    state = h.model_state()
    base = h.write_model(tmp_path / "base.safetensors", state)
    for flag, out in (("--rank", "a"), ("--r", "b")):
        rc, _, err = cli("init", base, flag, "3", "--alpha", "6", "--target", "q_proj", "--init", "false",
                         "-o", tmp_path / out, "-q")
        assert rc == 0, err
    a, b = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 6


def test_init_use_dora(cli, tmp_path, h):
    state = h.model_state()
    base = h.write_model(tmp_path / "base.safetensors", state)
    rc, _, err = cli("init", base, "--use-dora", "--rank", "2", "--target", "q_proj", "-o", tmp_path / "d", "-q")
    assert rc == 0, err
    assert json.loads((tmp_path / "d" / "adapter_config.json").read_text())["use_dora"] is True
    t = load_file(tmp_path / "d" / "adapter_model.safetensors")
    mags = {k: v for k, v in t.items() if k.endswith("lora_magnitude_vector")}
    assert len(mags) == 3
    for k, m in mags.items():  # PEFT's init: the magnitude is the base weight's row norm
        w = state[k.replace("base_model.model.", "").replace(".lora_magnitude_vector", ".weight")]
        np.testing.assert_allclose(m, np.linalg.norm(w.astype(np.float64), axis=1), rtol=1e-6)
    rc, _, err = cli("init", base, "--method", "loha", "--use-dora", "-o", tmp_path / "x")
    assert rc == 1 and "--use-dora" in err and "use_dora" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("short,dt", [("bf16", "BF16"), ("fp16", "F16"), ("f32", "F32")])
def test_unmerge_dtype_short_names(cli, tmp_path, h, short, dt):
    state = h.model_state(dtype=np.float64)
    base = h.write_model(tmp_path / "base.safetensors", state)
    h.make_lora(tmp_path / "a", state, TARGETS, seed=1, dtype=np.float64)
    rc, _, err = cli("merge", base, tmp_path / "a", "-o", tmp_path / "m.safetensors", *KINDS)
    assert rc == 0, err
    rc, _, err = cli("unmerge", tmp_path / "m.safetensors", tmp_path / "a", "-o", tmp_path / "u.safetensors",
                     "--dtype", short, *KINDS)
    assert rc == 0, err
    out = _read(tmp_path / "u.safetensors")
    for k, v in state.items():
        if v.dtype.kind != "f":
            assert np.array_equal(out[k], v)
            continue
        assert out[k].dtype == DTYPES[dt]
        # unmerged in float64, rounded once: the base rounded to the output dtype (up to the unmerge's error)
        np.testing.assert_allclose(out[k].astype(np.float64), v.astype(DTYPES[dt]).astype(np.float64),
                                   rtol=np.finfo(np.float32).eps * 8 if dt == "F32" else 0, atol=1e-12 if dt == "F32" else 0)
    rc, _, err = cli("unmerge", tmp_path / "m.safetensors", tmp_path / "a", "-o", tmp_path / "v", "--dtype", "f8")
    assert rc == 2 and "unknown dtype" in err


def test_size_arg():
    assert _size_arg("5GB") == 5 * 10**9 and _size_arg("2GiB") == 2 * 2**30 and _size_arg("1000") == 1000
    for bad in ("0", "5 parsecs", "-1GB", ""):
        with pytest.raises(Exception, match="invalid size"):
            _size_arg(bad)


@pytest.mark.parametrize("shards", [1, 3])
def test_merge_reshards(cli, tmp_path, h, shards):
    state = h.model_state()
    base = h.write_model(tmp_path / ("base.safetensors" if shards == 1 else "base"), state, shards=shards)
    h.make_lora(tmp_path / "a", state, TARGETS, seed=1)
    rc, _, err = cli("merge", base, tmp_path / "a", "-o", tmp_path / "ref" if shards > 1 else tmp_path / "ref.st",
                     *KINDS)
    assert rc == 0, err
    ref = _read(tmp_path / "ref" if shards > 1 else tmp_path / "ref.st")
    limit = 2000
    rc, _, err = cli("merge", base, tmp_path / "a", "-o", tmp_path / "out", "--max-shard-size", f"{limit}B", *KINDS)
    assert rc == 0, err
    out = tmp_path / "out"
    index = json.loads((out / INDEX_NAME).read_text())
    files = sorted(out.glob("*.safetensors"))
    n = len(files)
    assert n > 3
    assert [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == {f.name for f in files}
    order = []
    total = 0
    for f in files:
        sf = SafeTensorsFile(f)
        keys = sorted(sf, key=lambda k: sf.span(k)[0])  # as stored
        sizes = [sf.span(k)[1] - sf.span(k)[0] for k in keys]
        assert sum(sizes) <= limit or len(keys) == 1  # over the limit only as a single big tensor
        total += sum(sizes)
        assert all(index["weight_map"][k] == f.name for k in keys)
        assert json.loads(sf.metadata[PROVENANCE_KEY])[0]["adapter"] == "a"
        order += keys
    base_model = open_model(base)
    assert order == [k for fname in base_model.files for k in base_model.ordered(fname)]  # base order
    assert index["metadata"]["total_size"] == total
    got = _read(out)
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)
    if shards > 1:
        assert (out / "config.json").exists()
    # a limit above the whole model: one model.safetensors, no index (as transformers writes it)
    rc, _, err = cli("merge", base, tmp_path / "a", "-o", tmp_path / "one", "--max-shard-size", "5GB", *KINDS)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "one").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "one" / INDEX_NAME).exists()
    # atomic: an error leaves nothing (an existing output without --force), the old output untouched
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, _, err = cli("merge", base, tmp_path / "a", "-o", out, "--max-shard-size", "1KB", *KINDS)
    assert rc == 1 and {p.name: p.read_bytes() for p in out.iterdir()} == before
    rc, _, err = cli("merge", base, tmp_path / "a", "-o", tmp_path / "z", "--max-shard-size", "big")
    assert rc == 2 and "invalid size" in err
