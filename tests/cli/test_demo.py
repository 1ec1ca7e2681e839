"""`peftmath demo`: every example of every implemented method's description appears and verifies."""

from __future__ import annotations

import subprocess

import numpy as np

from peftmath.demo import CREATED_ROWS, build_model
from peftmath.methods import describe_method, implemented_methods
from tests.helpers import requirements_met


FORWARD_HEADING = "forward only (merge refused):"


def _expected_rows(which="examples"):
    rows = []
    for t in implemented_methods():
        m = describe_method(t)
        if m.merges_weights and requirements_met(m):  # the demo skips a method whose extra package is missing
            rows += list(getattr(m, which))
            if which == "examples":  # the rows create_adapter builds follow their method's examples
                rows += [label for label, row in CREATED_ROWS.items() if row.peft_type == t]
    return rows


def _tables(out):
    """(merge rows, forward-only rows) of the demo's text output, each without its two heading lines."""
    lines = out.splitlines()
    cut = lines.index(FORWARD_HEADING) if FORWARD_HEADING in lines else len(lines)
    merge = [ln for ln in lines[2:cut] if ln.strip()]
    forward = [ln for ln in lines[cut + 3:] if ln.strip()]
    return merge, forward


def test_demo_in_process(cli, tmp_path):
    rc, out, err = cli("demo", tmp_path / "d")
    assert rc == 0, err
    table, forward = _tables(out)
    labels = [ln.split("  ")[0].strip() for ln in table]
    assert labels == _expected_rows()
    assert [ln.split("  ")[0].strip() for ln in forward] == _expected_rows("forward_examples")
    assert all(ln.rstrip().endswith("ok") for ln in table + forward)
    for ln in table + forward:  # the errors printed are small (the bound is checked by the demo itself)
        cols = ln.split()
        assert any(c.endswith(("e-06", "e-07", "e-08", "e-09", "e-10")) or c == "0.00e+00" for c in cols), ln
    assert all(" refused " in ln for ln in forward)
    d = tmp_path / "d"
    assert (d / "model.safetensors").exists() and (d / "adapter-lora" / "adapter_config.json").exists()
    # the folder is not empty now: refused without --force
    rc, _, err = cli("demo", d)
    assert rc == 1 and "--force" in err
    assert cli("demo", d, "--force", "-q")[0] == 0


def test_demo_console_script(tmp_path, h):
    p = subprocess.run(["peftmath", "demo"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "example" in p.stdout.splitlines()[0] and "LORA" in p.stdout
    assert "examples in" in p.stderr  # logs on stderr


def test_demo_skips_a_broken_method(cli, monkeypatch):
    """A method whose example cannot be built is skipped with its reason on stderr; the rest still run."""
    import dataclasses

    from peftmath.methods import lora

    broken = dataclasses.replace(lora.METHOD, examples={**lora.METHOD.examples, "Broken": {"r": -3}})
    monkeypatch.setattr(lora, "METHOD", broken)  # the demo reads the examples from the description
    rc, out, err = cli("demo")
    assert rc == 0, err
    assert "skipping Broken (LORA)" in err and "Broken" not in out


def test_demo_is_warning_free_under_strict(cli, tmp_path):
    """The demo's own adapters raise no warning at all: --strict (every peftmath warning an error) passes,
    and nothing on stderr looks like a warning."""
    rc, out, err = cli("demo", tmp_path / "d", "--strict")
    assert rc == 0, err
    assert not [ln for ln in err.splitlines() if "warning:" in ln.lower()] and "Traceback" not in err
    table, forward = _tables(out)
    assert table and all(ln.rstrip().endswith("ok") for ln in table + forward)


def test_demo_skips_a_method_whose_extra_package_is_missing(cli, monkeypatch):
    """The README's first command runs without torch: a method that needs it (PSOFT: torch's SVD signs define
    the adapter) is skipped, saying what to install, and the demo succeeds."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    rc, out, err = cli("demo")
    assert rc == 0, err
    assert "PSOFT needs torch (pip install torch); skipped" in err and "PSOFT" not in out


def test_demo_lora_variant_rows(cli, tmp_path):
    """LoRA's variant rows (issue 18): each adapts the layer kinds its variant runs on (the others are left out,
    saying why), with the variant's own tensors and config, and verifies; aLoRA's forward is checked and its merge
    refused with the reason."""
    import json

    from peftmath.io import load_adapter

    d = tmp_path / "d"
    rc, out, err = cli("demo", d, "--json")
    assert rc == 0, err
    rep = json.loads(out)
    rows = {e["example"]: e for e in rep["examples"]}
    want = {"KaSA": 2, "VeLoRA": 3, "MonteCLoRA": 3, "BD-LoRA": 6}  # KaSA: nn.Linear only; VeLoRA, MonteCLoRA: + Conv1D
    for label, n in want.items():
        e = rows[label]
        assert e["check"] == "ok" and e["modules"] == n, e
        assert 0 < e["merge_error"] <= rep["bound"] and e["round_trip_error"] <= rep["bound"], e
    assert "KaSA (LORA) leaves out embed, conv3x3, conv1x1, attn.c_attn" in err and "nn.Linear only" in err
    kasa = load_adapter(d / "adapter-kasa")
    assert kasa.config.kasa_config == {"beta": 1e-4, "gamma": 1e-3} and sorted(kasa.modules) == ["fc_in", "fc_out"]
    diag = np.asarray(kasa.params["fc_in"]["lora_diag"])
    assert diag.shape == (4,) and np.all(diag != 0)  # PEFT's randn(r), not a placeholder
    bd = load_adapter(d / "adapter-bd-lora")
    assert bd.params["fc_in"]["lora_A.weight"].shape == (4, 12)  # compact block-diagonal factors, as PEFT saves
    assert bd.params["fc_out"]["lora_A.weight"].shape == (4, 16)
    assert bd.params["attn.c_attn"]["lora_A.weight"].shape == (4, 24)  # unmatched (match_strict false): plain LoRA
    assert load_adapter(d / "adapter-velora").config.velora_config["num_groups"] == 4
    assert load_adapter(d / "adapter-monteclora").config.monteclora_config["num_samples"] == 8

    (alora,) = [e for e in rep["forward_examples"] if e["example"] == "aLoRA"]
    assert alora["check"] == "ok" and alora["modules"] == 3
    assert alora["forward_error"] <= rep["bound"] < alora["adapter_effect"]
    assert "cannot be merged" in alora["merge_refused"] and "invocation sequence" in alora["merge_refused"]
    assert not (d / "merged-alora.safetensors").exists()  # the refused merge wrote nothing


def test_demo_lora_special_target_rows(cli, tmp_path):
    """LoRA on raw parameters (target_parameters: two nested 3-D experts stacks and a 2-D router) and on an
    nn.MultiheadAttention (issue 18): built by create_adapter on tensors the demo model holds for them alone, saved
    under PEFT's keys, merged through the files as specs/lora.md §12 writes it (checked here in float64 from the saved
    factors, independently of peftmath's merge), unmerged back."""
    import json

    from peftmath.io import load_adapter
    from peftmath.demo import EXTRA_TENSORS, build_extra
    from peftmath.io.safetensors import load_file
    from peftmath.methods._lora_mha import PEFT_OUT_PROJ_FACTOR

    d = tmp_path / "d"
    rc, out, err = cli("demo", d, "--json")
    assert rc == 0, err
    rep = json.loads(out)
    rows = {e["example"]: e for e in rep["examples"]}
    base = {k: v.astype(np.float64) for k, v in load_file(d / "model.safetensors").items()}
    model, extra = build_model(), build_extra()
    assert sorted(base) == sorted([*model, *EXTRA_TENSORS])
    assert all(np.array_equal(base[k], v) for k, v in model.items())  # the model the other rows adapt, as it was
    assert all(np.array_equal(base[k], v) for k, v in extra.items())
    s = 8 / 4  # lora_alpha / r
    for label, n, slug in [("LoRA target_parameters (MoE experts)", 3, "lora-target-parameters-moe-experts"),
                           ("LoRA nn.MultiheadAttention", 2, "lora-nn-multiheadattention")]:
        e = rows[label]
        assert e["check"] == "ok" and e["modules"] == n, e
        assert 0 < e["merge_error"] <= rep["bound"] and e["round_trip_error"] <= rep["bound"], e
        factors = {k: v.astype(np.float64) for k, v in load_file(d / f"adapter-{slug}" / "adapter_model.safetensors").items()}
        ab = {k[len("base_model.model."):-len(".lora_A.weight")]: (v, factors[k.replace("lora_A", "lora_B")])
              for k, v in factors.items() if ".lora_A." in k}
        want = dict(base)
        if n == 3:
            assert sorted(ab) == ["experts", "experts.base_layer", "router"]  # gate_up_proj innermost (registered first)
            cfg = load_adapter(d / f"adapter-{slug}").config
            assert cfg.target_modules == [] and cfg.init_lora_weights is False
            for wrapper, key in [("experts.base_layer", "experts.gate_up_proj"), ("experts", "experts.down_proj")]:
                a, b = ab[wrapper]
                n_exp, d1, d2 = base[key].shape  # (E, out, in): not transposed
                a_e, b_e = a.reshape(n_exp, 4, d2), b.reshape(d1, 4, n_exp)
                want[key] = base[key] + s * np.stack([b_e[:, :, i] @ a_e[i] for i in range(n_exp)])
            a, b = ab["router"]
            want["router.weight"] = base["router.weight"] + s * b @ a
        else:
            assert sorted(ab) == ["mha", "mha.base_layer.out_proj"]
            a, b = ab["mha"]
            want["mha.in_proj_weight"] = base["mha.in_proj_weight"] + s * b @ a
            a, b = ab["mha.base_layer.out_proj"]  # PEFT 0.21.2 adds the out-projection's change twice
            want["mha.out_proj.weight"] = base["mha.out_proj.weight"] + PEFT_OUT_PROJ_FACTOR * s * b @ a
        merged = load_file(d / f"merged-{slug}.safetensors")
        unmerged = load_file(d / f"unmerged-{slug}.safetensors")
        changed = sorted(k for k in base if not np.array_equal(want[k], base[k]))
        assert changed == sorted(k for k in CREATED_ROWS[label].extra if not k.endswith("bias"))
        for k in base:
            scale = np.max(np.abs(base[k]))
            assert np.max(np.abs(merged[k] - want[k])) <= rep["bound"] * scale, k
            assert np.max(np.abs(unmerged[k] - base[k])) <= rep["bound"] * scale, k
            if k in changed:  # init_lora_weights=False: the row does real work
                assert np.max(np.abs(want[k] - base[k])) > 100 * rep["bound"] * scale, k


def _demo_files(cli, tmp_path):
    import json

    d = tmp_path / "d"
    rc, out, err = cli("demo", d, "--json")
    assert rc == 0, err
    rep = json.loads(out)
    return d, rep, {e["example"]: e for e in rep["examples"]}


def _factors(folder):
    """The tensors of a saved adapter by PEFT key (without ``base_model.model.``), float64."""
    from peftmath.io.safetensors import load_file

    return {k[len("base_model.model."):]: v.astype(np.float64)
            for k, v in load_file(folder / "adapter_model.safetensors").items()}


def _replaced(table, rows, ids):
    """``table`` with ``table[ids[j]] = rows[j]`` (written in order: a repeated id gets its last row), by hand."""
    out = np.array(table, dtype=np.float64, copy=True)
    for j, t in enumerate(ids):
        out[t] = rows[j]
    return out


def test_demo_trainable_tokens_rows(cli, tmp_path):
    """TRAINABLE_TOKENS' rows: every adapted table of the merged file is the base with the rows token_indices replaced
    by the saved trainable_tokens_delta (written by hand here), every other row and tensor bit for bit; the unmerge
    (from the merge's record) gives the base back bit for bit."""
    from peftmath.io import load_adapter
    from peftmath.io.safetensors import load_file

    d, rep, rows = _demo_files(cli, tmp_path)
    base = load_file(d / "model.safetensors")
    for label, slug in [("Trainable tokens", "trainable-tokens"),
                        ("Trainable tokens (unsorted, repeated)", "trainable-tokens-unsorted-repeated")]:
        e = rows[label]
        assert e["check"] == "ok" and e["modules"] == 3 and e["merge_error"] == e["round_trip_error"] == 0.0, e
        ids = load_adapter(d / f"adapter-{slug}").config.token_indices
        deltas = {k[: -len(".trainable_tokens_delta")]: v for k, v in _factors(d / f"adapter-{slug}").items()}
        assert sorted(deltas) == ["embed", "fc_in", "fc_out"]  # the tables of the demo model (Embedding, Linear)
        merged, unmerged = load_file(d / f"merged-{slug}.safetensors"), load_file(d / f"unmerged-{slug}.safetensors")
        for k in base:
            m = k[: -len(".weight")]
            want = _replaced(base[k], deltas[m], ids) if m in deltas and k.endswith(".weight") else base[k]
            assert np.array_equal(merged[k], want), k  # a copy of float32 rows: exact
            assert np.array_equal(unmerged[k], base[k]), k
            if m in deltas and k.endswith(".weight"):
                assert sorted(np.flatnonzero(np.any(merged[k] != base[k], axis=1))) == sorted(set(ids)), k


def test_demo_lora_trainable_tokens_and_layer_replication_rows(cli, tmp_path):
    """LoRA's trainable_token_indices (rows of the embedding replaced beside the factors of fc_in, fc_out) and
    layer_replication (an adapter of the deeper model whose copies of base layer 1 share its weights and have their own
    factors), checked against a float64 computation by hand from the saved tensors; the replicated folder is written
    as PEFT writes it (load_adapter refuses it by name) and its base is the replicated model."""
    import json

    import pytest

    import peftmath as pm
    from peftmath.errors import UnsupportedError
    from peftmath.io.safetensors import load_file

    d, rep, rows = _demo_files(cli, tmp_path)
    bound = rep["bound"]
    base = {k: v.astype(np.float64) for k, v in load_file(d / "model.safetensors").items()}

    def check(slug, row_base, want, copied):
        merged, unmerged = load_file(d / f"merged-{slug}.safetensors"), load_file(d / f"unmerged-{slug}.safetensors")
        assert sorted(merged) == sorted(row_base)
        for k, v in row_base.items():
            scale = np.max(np.abs(v))
            w = want.get(k, v)
            assert np.max(np.abs(merged[k] - w)) <= bound * scale, k
            assert np.max(np.abs(unmerged[k] - v)) <= bound * scale, k
            if k in want:  # init_lora_weights=False / trained rows: the row does real work
                assert np.max(np.abs(w - v)) > 100 * bound * scale, k
            else:
                assert np.array_equal(merged[k], v), k
        for k in copied:  # replaced rows and untouched tensors come back bit for bit
            assert np.array_equal(unmerged[k], row_base[k].astype(np.float32)), k

    # trainable tokens beside LoRA
    e = rows["LoRA trainable_token_indices"]
    assert e["check"] == "ok" and e["modules"] == 3 and e["trainable_parameters"] == 2 * (4 * 24 + 32 * 4) + 5 * 24, e
    f = _factors(d / "adapter-lora-trainable-token-indices")
    assert sorted(f) == ["embed.token_adapter.trainable_tokens_delta", "fc_in.lora_A.weight", "fc_in.lora_B.weight",
                         "fc_out.lora_A.weight", "fc_out.lora_B.weight"]
    cfg = json.loads((d / "adapter-lora-trainable-token-indices" / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == {"embed": [1, 5, 6, 7, 30]}
    want = {f"{m}.weight": base[f"{m}.weight"] + 2.0 * f[f"{m}.lora_B.weight"] @ f[f"{m}.lora_A.weight"]
            for m in ("fc_in", "fc_out")}
    want["embed.weight"] = _replaced(base["embed.weight"], f["embed.token_adapter.trainable_tokens_delta"],
                                     [1, 5, 6, 7, 30])
    check("lora-trainable-token-indices", base, want, ["embed.weight"])

    # layer replication: new layers 0 1 2 3 = base layers 0 1 1 2
    e = rows["LoRA layer_replication"]
    assert e["check"] == "ok" and e["modules"] == 4 and e["trainable_parameters"] == 4 * (4 * 24 + 16 * 4), e
    folder = d / "adapter-lora-layer-replication"
    assert json.loads((folder / "adapter_config.json").read_text())["layer_replication"] == [[0, 2], [1, 3]]
    with pytest.raises(UnsupportedError, match="load_replicated"):
        pm.load_adapter(folder)
    f = _factors(folder)
    assert sorted({k.rsplit(".lora_", 1)[0] for k in f}) == [f"layers.{j}.q" for j in range(4)]
    row_base = {k: v.astype(np.float64) for k, v in load_file(d / "lora-layer-replication-base.safetensors").items()}
    order = [0, 1, 1, 2]
    assert sorted(row_base) == sorted([k for k in base if not k.startswith("layers.")]
                                      + [f"layers.{j}.{leaf}" for j in range(4) for leaf in ("q.weight", "ln.weight")])
    want = {}
    for j, i in enumerate(order):
        for leaf in ("q.weight", "ln.weight"):  # each copy holds its base layer's tensors
            assert np.array_equal(row_base[f"layers.{j}.{leaf}"], base[f"layers.{i}.{leaf}"])
        want[f"layers.{j}.q.weight"] = base[f"layers.{i}.q.weight"] + 2.0 * f[f"layers.{j}.q.lora_B.weight"] \
            @ f[f"layers.{j}.q.lora_A.weight"]
    assert not np.allclose(want["layers.1.q.weight"], want["layers.2.q.weight"])  # the copies have their own adapters
    check("lora-layer-replication", row_base, want, [k for k in row_base if k not in want])
