"""Provenance of `peftmath merge` outputs and its check by `peftmath unmerge`, end to end through the command.

Every output shard's safetensors ``__metadata__`` lists, under ``peftmath.merged``, the adapters merged
into the model (oldest first). The tests recompute each field independently (sha256 of the adapter
files with hashlib, the options given on the command line) and check that unmerge refuses, in one line
naming both adapters, anything but the last merged adapters.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import peftmath as pm
from peftmath.io.safetensors import SafeTensorsFile, load_file, save_file
from peftmath.io.stream import PROVENANCE_KEY, open_model, read_provenance, records_path

TARGETS = ["model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.2.v_proj"]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shards(model):
    return [model] if model.is_file() else sorted(model.glob("*.safetensors"))


def _provenance(model):
    values = {SafeTensorsFile(f).metadata.get(PROVENANCE_KEY) for f in _shards(model)}
    assert len(values) == 1, "every shard carries the same provenance"
    value = values.pop()
    return None if value is None else json.loads(value)


def _read(model):
    m = open_model(model)
    return {k: np.array(m.read(k)) for k in m.keys()}


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftmath: error: "), err
    return lines[0]


@pytest.fixture
def setup(tmp_path, h):
    state = h.model_state()
    base = h.write_model(tmp_path / "base", state, shards=3)
    h.make_lora(tmp_path / "a", state, TARGETS, seed=1)
    h.make_lora(tmp_path / "b", state, TARGETS[1:], seed=2, r=2)
    h.make_lora(tmp_path / "dora", state, TARGETS, seed=3, use_dora=True)
    # the same factors without DoRA: a different adapter that would unmerge to the wrong weights
    d = pm.load_adapter(tmp_path / "dora")
    twin = pm.Adapter(pm.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
                      {m: {s: a for s, a in p.items() if s != "lora_magnitude_vector"} for m, p in d.params.items()})
    pm.save_adapter(twin, tmp_path / "twin")
    return tmp_path, base, state


def test_merge_records_what_was_merged_and_keeps_metadata(cli, setup, h):
    tmp, base, state = setup
    out = tmp / "m1"
    rc, _, err = cli("merge", base, tmp / "a", "-o", out, "--safe", "--layer-kind", "model.layers.2.v_proj=Linear")
    assert rc == 0, err
    entries = _provenance(out)
    assert entries == [{
        "adapter": "a", "peft_type": "LORA",
        "adapter_config_sha256": _sha(tmp / "a" / "adapter_config.json"),
        "adapter_model_sha256": _sha(tmp / "a" / "adapter_model.safetensors"),
        "options": {"dtype": "keep", "safe": True, "peft_compat": False, "backend": "numpy",
                    "layer_kinds": {"model.layers.2.v_proj": "Linear"}},
        "peftmath": pm.__version__,
    }]
    for f in _shards(out):  # the original metadata entries are kept, in every shard
        meta = SafeTensorsFile(f).metadata
        assert meta["format"] == "pt" and meta["note"] == "cli test"
    # a second merge stacks: the first merge's entry is kept, the new one follows with its own options
    out2 = tmp / "m2"
    rc, _, err = cli("merge", out, tmp / "b", tmp / "dora", "-o", out2, "--dtype", "float32", "--peft-compat")
    assert rc == 0, err
    stacked = _provenance(out2)
    assert [e["adapter"] for e in stacked] == ["a", "b", "dora"] and stacked[0] == entries[0]
    assert stacked[1]["options"]["peft_compat"] and stacked[1]["options"]["dtype"] == "float32"
    assert stacked[2]["use_dora"] is True and "use_dora" not in stacked[1]
    assert stacked[2]["adapter_model_sha256"] == _sha(tmp / "dora" / "adapter_model.safetensors")
    assert read_provenance(open_model(out2)) == stacked


def test_unmerge_in_reverse_order_removes_the_entries(cli, setup, h):
    tmp, base, state = setup
    assert cli("merge", base, tmp / "a", tmp / "dora", "-o", tmp / "m")[0] == 0
    rc, _, err = cli("unmerge", tmp / "m", tmp / "dora", "-o", tmp / "u1")
    assert rc == 0, err
    assert [e["adapter"] for e in _provenance(tmp / "u1")] == ["a"]
    rc, _, err = cli("unmerge", tmp / "u1", tmp / "a", "-o", tmp / "u0")
    assert rc == 0, err
    assert _provenance(tmp / "u0") == []  # nothing merged any more (a missing key would mean "unknown")
    for f in _shards(tmp / "u0"):
        assert SafeTensorsFile(f).metadata == {"format": "pt", "note": "cli test", PROVENANCE_KEY: "[]"}
    restored = _read(tmp / "u0")
    for k in state:
        assert np.allclose(restored[k], state[k], rtol=0, atol=1e-5), k
    # several adapters at once: given in merge order, unmerged in reverse
    assert cli("merge", base, tmp / "a", tmp / "b", "-o", tmp / "ab")[0] == 0
    rc, _, err = cli("unmerge", tmp / "ab", tmp / "a", tmp / "b", "-o", tmp / "ab0")
    assert rc == 0, err
    assert _provenance(tmp / "ab0") == []


def test_unmerge_refuses_an_adapter_that_is_not_the_last_merged(cli, setup, h):
    tmp, base, state = setup
    assert cli("merge", base, tmp / "a", tmp / "b", "-o", tmp / "m")[0] == 0
    before = h.tree_digest(tmp / "m")
    rc, _, err = cli("unmerge", tmp / "m", tmp / "a", "-o", tmp / "x")
    assert rc == 1
    line = _one_error_line(err)
    assert "a (LORA" in line and "is not the last adapter merged" in line and "the last one is b (LORA" in line
    assert _sha(tmp / "a" / "adapter_model.safetensors")[:12] in line
    assert _sha(tmp / "b" / "adapter_model.safetensors")[:12] in line
    assert "--ignore-provenance" in line
    assert not (tmp / "x").exists() and h.tree_digest(tmp / "m") == before
    # given in the wrong order (b, a means: unmerge a first)
    rc, _, err = cli("unmerge", tmp / "m", tmp / "b", tmp / "a", "-o", tmp / "x")
    assert rc == 1 and "a (LORA" in _one_error_line(err) and not (tmp / "x").exists()
    # the dry run checks too
    rc, _, err = cli("unmerge", tmp / "m", tmp / "a", "-o", tmp / "x", "--dry-run")
    assert rc == 1 and "is not the last adapter merged" in err


def test_dora_merged_model_refuses_its_plain_lora_twin(cli, setup, h):
    """The twin has the same factors and no magnitude: before provenance, unmerge succeeded (wrong weights)."""
    tmp, base, state = setup
    out = tmp / "m"
    assert cli("merge", base, tmp / "dora", "-o", out)[0] == 0
    before = h.tree_digest(out, records_path(out))
    rc, _, err = cli("unmerge", out, tmp / "twin", "-o", tmp / "x")
    assert rc == 1
    line = _one_error_line(err)
    assert "twin (LORA, adapter_model sha256" in line and "was never merged" in line
    assert "dora (LORA with DoRA, adapter_model sha256" in line
    assert not (tmp / "x").exists() and not records_path(tmp / "x").exists()
    assert h.tree_digest(out, records_path(out)) == before
    # --ignore-provenance: the user's call; the command says what the metadata cannot describe
    rc, _, err = cli("unmerge", out, tmp / "twin", "-o", tmp / "x", "--ignore-provenance")
    assert rc == 0, err
    assert "peftmath: warning:" in err and "unmerging anyway" in err
    assert [e["adapter"] for e in _provenance(tmp / "x")] == ["dora"]  # the twin was never merged: dora stays
    # and the right adapter unmerges
    rc, _, err = cli("unmerge", out, tmp / "dora", "-o", tmp / "ok")
    assert rc == 0, err
    restored = _read(tmp / "ok")
    for k in state:
        assert np.allclose(restored[k], state[k], rtol=0, atol=1e-5), k


def test_unmerge_refuses_an_adapter_never_merged(cli, setup, h):
    tmp, base, state = setup
    assert cli("merge", base, tmp / "a", "-o", tmp / "m")[0] == 0
    rc, _, err = cli("unmerge", tmp / "m", tmp / "b", "-o", tmp / "x")
    line = _one_error_line(err)
    assert rc == 1 and "b (LORA" in line and "was never merged" in line and "the last one merged is a (LORA" in line
    # everything unmerged already: nothing left to unmerge
    assert cli("unmerge", tmp / "m", tmp / "a", "-o", tmp / "u")[0] == 0
    rc, _, err = cli("unmerge", tmp / "u", tmp / "a", "-o", tmp / "x")
    assert rc == 1 and "no adapter is left to unmerge" in _one_error_line(err)
    # forced: the entry of a matched adapter deeper in the stack is removed, the rest kept in order
    assert cli("merge", base, tmp / "a", tmp / "b", "-o", tmp / "ab")[0] == 0
    rc, _, err = cli("unmerge", tmp / "ab", tmp / "a", "-o", tmp / "forced", "--ignore-provenance")
    assert rc == 0 and "unmerging anyway" in err
    assert [e["adapter"] for e in _provenance(tmp / "forced")] == ["b"]


def test_model_merged_by_another_tool_unmerges_with_a_warning(cli, tmp_path, h):
    """No provenance metadata (merged with Adapter.merge and saved by hand): unmerge proceeds, warns once."""
    state = h.model_state()
    ad = h.make_lora(tmp_path / "a", state, TARGETS)
    merged = {k: np.asarray(v) for k, v in ad.merge(state).items()}
    save_file(merged, tmp_path / "merged.safetensors")  # no __metadata__ at all
    rc, _, err = cli("unmerge", tmp_path / "merged.safetensors", tmp_path / "a", "-o", tmp_path / "u.safetensors")
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("peftmath: warning:")]
    assert len(warnings) == 1 and "no peftmath provenance metadata" in warnings[0] and "a (LORA" in warnings[0]
    assert SafeTensorsFile(tmp_path / "u.safetensors").metadata == {}  # nothing invented
    restored = load_file(tmp_path / "u.safetensors")
    for k in state:
        assert np.allclose(restored[k], state[k], rtol=0, atol=1e-5), k


def test_metadata_without_format_gets_format_pt(cli, tmp_path, h):
    """transformers 4.x refuses safetensors metadata without a known "format": it is added with provenance."""
    state = h.model_state()
    save_file(state, tmp_path / "bare.safetensors")  # no metadata
    h.make_lora(tmp_path / "a", state, TARGETS)
    assert cli("merge", tmp_path / "bare.safetensors", tmp_path / "a", "-o", tmp_path / "m.safetensors")[0] == 0
    meta = SafeTensorsFile(tmp_path / "m.safetensors").metadata
    assert meta["format"] == "pt" and json.loads(meta[PROVENANCE_KEY])[0]["adapter"] == "a"


def test_shards_that_disagree_are_refused(cli, setup, h):
    tmp, base, state = setup
    out = tmp / "m"
    assert cli("merge", base, tmp / "a", "-o", out)[0] == 0
    first = _shards(out)[0]
    f = SafeTensorsFile(first)
    tensors = {k: np.array(f[k]) for k in f}
    meta = dict(f.metadata)
    meta[PROVENANCE_KEY] = "[]"
    del f
    save_file(tensors, first, metadata=meta)
    rc, _, err = cli("unmerge", out, tmp / "a", "-o", tmp / "x")
    assert rc == 1 and "shards disagree" in _one_error_line(err)


def test_a_warning_never_precedes_an_error_and_strict_refuses_before_writing(cli, tmp_path, h):
    state = h.model_state()
    ad = h.make_lora(tmp_path / "a", state, TARGETS)
    save_file({k: np.asarray(v) for k, v in ad.merge(state).items()}, tmp_path / "merged.safetensors")
    (tmp_path / "u.safetensors").write_bytes(b"taken")
    rc, _, err = cli("unmerge", tmp_path / "merged.safetensors", tmp_path / "a", "-o", tmp_path / "u.safetensors")
    assert rc == 1 and "already exists" in _one_error_line(err)  # the provenance warning is not printed
    # --strict: the warning is the error, and nothing is written
    rc, _, err = cli("unmerge", tmp_path / "merged.safetensors", tmp_path / "a", "-o", tmp_path / "v.safetensors",
                     "--strict")
    assert rc == 1 and "no peftmath provenance metadata" in _one_error_line(err)
    assert not (tmp_path / "v.safetensors").exists()


def test_an_adapter_from_the_hub_cache_is_named_by_its_repo(cli, tmp_path, h):
    from tests.cli.test_hub_cache import hub_snapshot

    state = h.model_state()
    base = h.write_model(tmp_path / "base", state, shards=2)
    h.make_lora(tmp_path / "lora", state, TARGETS)
    snap = hub_snapshot(tmp_path / "lora", tmp_path / "hub", repo="someone/my-lora", revision="c0ffee" * 6)
    rc, _, err = cli("merge", base, snap, "-o", tmp_path / "m")
    assert rc == 0, err
    [entry] = _provenance(tmp_path / "m")
    assert entry["adapter"] == "someone/my-lora@" + "c0ffee" * 6
    assert entry["adapter_model_sha256"] == _sha(tmp_path / "lora" / "adapter_model.safetensors")
