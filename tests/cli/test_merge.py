"""`peftmath merge` / `peftmath unmerge` end to end on real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import peftmath as pm
from peftmath.io.safetensors import SafeTensorsFile, load_file
from peftmath.io.stream import PROVENANCE_KEY, RECORDS_NAME, open_model, records_path

EPS32 = float(np.finfo(np.float32).eps)


def _f64(a):
    return np.asarray(a).astype(np.float64)


def _ref_merge(adapters, state):
    """The float64 reference: every adapter cast to float64, merged in order with Adapter.merge."""
    st = {k: _f64(v) for k, v in state.items()}
    for ad in adapters:
        ad64 = pm.Adapter(ad.config, {m: {s: _f64(a) for s, a in p.items()} for m, p in ad.params.items()})
        st = ad64.merge(st)
    return st


def _read_model(path):
    m = open_model(path)
    return {k: m.read(k) for k in m.keys()}


def _check_close(out, ref, base, dtype_eps, n_roundings=1):
    """|out - ref| <= n * eps * (|ref| + |base|) + (float32 compute slack)."""
    for k, v in ref.items():
        o = _f64(out[k])
        bound = n_roundings * dtype_eps * (np.abs(v) + np.abs(_f64(base[k]))) + 64 * EPS32 * np.max(np.abs(v))
        assert np.all(np.abs(o - v) <= bound), k


def test_merge_single_file(cli, f32_model, tmp_path, lora_targets, h):
    base, state = f32_model
    ad = h.make_lora(tmp_path / "lora", state, lora_targets)
    before = h.tree_digest(base, tmp_path / "lora")
    out = tmp_path / "merged.safetensors"
    rc, stdout, err = cli("merge", base, tmp_path / "lora", "-o", out)
    assert rc == 0, err
    assert h.tree_digest(base, tmp_path / "lora") == before
    merged = load_file(out)
    ref = _ref_merge([ad], state)
    _check_close(merged, ref, state, EPS32)
    for k in state:  # untouched tensors bit for bit, adapted ones changed
        if not any(k.startswith(t + ".weight") for t in lora_targets):
            assert merged[k].tobytes() == state[k].tobytes(), k
        else:
            assert not np.array_equal(merged[k], state[k])
    meta = dict(SafeTensorsFile(out).metadata)
    assert json.loads(meta.pop(PROVENANCE_KEY))[0]["adapter"] == "lora"  # provenance: tests/cli/test_provenance.py
    assert meta == SafeTensorsFile(base).metadata  # every original entry kept
    assert list(SafeTensorsFile(out)) == list(SafeTensorsFile(base))  # same tensor order
    assert not records_path(out).exists()  # LoRA needs no records


def test_merge_sharded_bf16_and_unmerge(cli, tmp_path, lora_targets, h):
    state = h.model_state(h.BF16)
    base = h.write_model(tmp_path / "base", state, shards=3)
    ad = h.make_lora(tmp_path / "lora", state, lora_targets + ["model.embed_tokens"])
    out = tmp_path / "merged"
    rc, _, err = cli("merge", base, tmp_path / "lora", "-o", out)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    idx_in = json.loads((base / "model.safetensors.index.json").read_text())
    idx_out = json.loads((out / "model.safetensors.index.json").read_text())
    assert idx_in == idx_out
    assert (out / "config.json").read_text() == (base / "config.json").read_text()
    (base / "config.json").write_text(json.dumps({"model_type": "tiny", "torch_dtype": "bfloat16"}))
    rc, _, err = cli("merge", base, tmp_path / "lora", "-o", tmp_path / "m32", "--dtype", "float32")
    assert rc == 0, err
    assert json.loads((tmp_path / "m32" / "config.json").read_text())["torch_dtype"] == "float32"
    (base / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    for name in idx_in["weight_map"].values():
        assert SafeTensorsFile(out / name).dtype(next(iter(SafeTensorsFile(out / name)))) is not None
    merged = _read_model(out)
    assert all(merged[k].dtype == state[k].dtype for k in state)
    eps_bf16 = 2.0 ** -8
    _check_close(merged, _ref_merge([ad], state), state, eps_bf16)
    # unmerge: back to the base within one more bf16 rounding of |W| + |dW|
    back = tmp_path / "restored"
    rc, _, err = cli("unmerge", out, tmp_path / "lora", "-o", back)
    assert rc == 0, err
    restored = _read_model(back)
    ref = _ref_merge([ad], state)
    for k in state:
        d = np.abs(_f64(restored[k]) - _f64(state[k]))
        assert np.all(d <= 3 * eps_bf16 * (np.abs(_f64(state[k])) + np.abs(ref[k] - _f64(state[k])) + 1e-30)), k


def test_several_adapters_in_order_and_dtype(cli, f32_model, tmp_path, lora_targets, h):
    base, state = f32_model
    a = h.make_lora(tmp_path / "a", state, lora_targets[:4], seed=1)
    b = h.make_lora(tmp_path / "b", state, lora_targets[2:], seed=2, r=2, alpha=5)
    out = tmp_path / "m.safetensors"
    rc, _, err = cli("merge", base, tmp_path / "a", tmp_path / "b", "-o", out, "--dtype", "float16", "--safe")
    assert rc == 0, err
    merged = load_file(out)
    assert merged["model.layers.0.q_proj.weight"].dtype == np.float16
    assert merged["model.step"].dtype == np.int64  # integers are never cast
    _check_close(merged, _ref_merge([a, b], state), state, 2.0 ** -11)
    # float32 output: unmerge both (reverse order) gives back the base
    out32 = tmp_path / "m32.safetensors"
    assert cli("merge", base, tmp_path / "a", tmp_path / "b", "-o", out32)[0] == 0
    back = tmp_path / "back.safetensors"
    assert cli("unmerge", out32, tmp_path / "a", tmp_path / "b", "-o", back)[0] == 0
    restored = load_file(back)
    for k in state:
        assert np.allclose(restored[k], state[k], rtol=0, atol=64 * EPS32 * (1 + np.max(np.abs(state[k]))))


def test_dry_run_writes_nothing(cli, f32_model, tmp_path, lora_targets, h):
    base, state = f32_model
    h.make_lora(tmp_path / "lora", state, lora_targets)
    out = tmp_path / "never.safetensors"
    rc, stdout, _ = cli("merge", base, tmp_path / "lora", "-o", out, "--dry-run", "--dtype", "bfloat16")
    assert rc == 0
    assert not out.exists() and not list(tmp_path.glob(".never*"))
    assert "model.layers.0.q_proj.weight" in stdout and "merge" in stdout
    assert "float32 -> bfloat16" in stdout and "16x12" in stdout
    assert "14 tensors computed, 1 copied unchanged" in stdout  # every float tensor is cast, not the int64 one


def test_dora_records_and_unmerge(cli, f32_model, tmp_path, lora_targets, h):
    base, state = f32_model
    h.make_lora(tmp_path / "dora", state, lora_targets[:3], use_dora=True)
    out = tmp_path / "dm.safetensors"
    rc, _, err = cli("merge", base, tmp_path / "dora", "-o", out)
    assert rc == 0, err
    rec = records_path(out)
    assert rec.name == "dm.safetensors.merge-records.safetensors" and rec.exists()
    assert sorted(load_file(rec)) == [f"adapters.0.{m}" for m in sorted(lora_targets[:3])]
    back = tmp_path / "back.safetensors"
    rc, _, err = cli("unmerge", out, tmp_path / "dora", "-o", back)
    assert rc == 0, err
    restored = load_file(back)
    for k in state:
        assert np.allclose(restored[k], state[k], rtol=0, atol=1e-5), k
    # without the records: a clear error, nothing written
    rec.unlink()
    rc, _, err = cli("unmerge", out, tmp_path / "dora", "-o", tmp_path / "x.safetensors")
    assert rc == 1 and "weight norms recorded at merge time" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_dora_records_in_folder(cli, tmp_path, lora_targets, h):
    state = h.model_state()
    base = h.write_model(tmp_path / "base", state, shards=2)
    h.make_lora(tmp_path / "dora", state, lora_targets[:2], use_dora=True)
    out = tmp_path / "merged"
    rc, _, err = cli("merge", base, tmp_path / "dora", "-o", out)
    assert rc == 0, err
    # the records lie beside the folder, never in it: OUT holds exactly what the base folder holds
    assert records_path(out) == tmp_path / "merged.merge-records.safetensors" and records_path(out).is_file()
    assert f"merge records (2) in {records_path(out)}" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    back = tmp_path / "back"
    assert cli("unmerge", out, tmp_path / "dora", "-o", back)[0] == 0
    assert not records_path(back).exists() and not (back / RECORDS_NAME).exists()  # consumed
    restored = _read_model(back)
    for k in state:
        assert np.allclose(restored[k], state[k], rtol=0, atol=1e-5), k


def test_force_and_peft_compat(cli, f32_model, tmp_path, lora_targets, h):
    base, state = f32_model
    h.make_lora(tmp_path / "lora", state, lora_targets)
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")
    rc, _, err = cli("merge", base, tmp_path / "lora", "-o", out)
    assert rc == 1 and "--force" in err and out.read_bytes() == b"old"
    rc, _, err = cli("merge", base, tmp_path / "lora", "-o", out, "--force", "--peft-compat", "-q")
    assert rc == 0 and err == ""
    assert set(load_file(out)) == set(state)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_backend_torch(cli, f32_model, tmp_path, lora_targets, h):
    pytest.importorskip("torch")
    base, state = f32_model
    h.make_lora(tmp_path / "lora", state, lora_targets)
    o1, o2 = tmp_path / "np.safetensors", tmp_path / "torch.safetensors"
    assert cli("merge", base, tmp_path / "lora", "-o", o1)[0] == 0
    rc, _, err = cli("merge", base, tmp_path / "lora", "-o", o2, "--backend", "torch")
    assert rc == 0, err
    a, b = load_file(o1), load_file(o2)
    for k in a:
        assert np.allclose(a[k], b[k], rtol=0, atol=16 * EPS32 * (1 + np.max(np.abs(a[k])))), k


@pytest.mark.parametrize("use_dora", [False, True])
def test_backend_cupy_through_its_kernels_on_the_emulator(cli, f32_model, tmp_path, lora_targets, h, monkeypatch,
                                                         use_dora):
    """``peftmath merge --backend cupy`` / ``unmerge``: the command's wiring (namespace, transfer, in-place
    merge, DoRA records) with the CuPy backend's own kernels, run by the CPU emulator; on a GPU the same
    kernels run in CUDA (tests/backends/test_cuda_kernels.py)."""
    from peftmath import backends

    from ..backends.cuda_emulator import compiler, emulated_cupy_backend

    if compiler() is None:
        pytest.skip("no C++ compiler to emulate the CUDA kernels")
    base, state = f32_model
    h.make_lora(tmp_path / "lora", state, lora_targets, use_dora=use_dora)
    o1, o2 = tmp_path / "np", tmp_path / "cupy"
    assert cli("merge", base, tmp_path / "lora", "-o", o1)[0] == 0
    backend = emulated_cupy_backend(monkeypatch)
    monkeypatch.setitem(backends._load_registry(), "cupy", backend)
    rc, _, err = cli("merge", base, tmp_path / "lora", "-o", o2, "--backend", "cupy")
    assert rc == 0, err
    assert backend.used and set(backend.used) == {"dora_merge_" if use_dora else "lora_addmm_"}
    a, b = _read_model(o1), _read_model(o2)
    for k in a:
        assert np.allclose(a[k], b[k], rtol=0, atol=16 * EPS32 * (1 + np.max(np.abs(a[k])))), k
    back = tmp_path / "back"
    assert cli("unmerge", o2, tmp_path / "lora", "-o", back, "--backend", "cupy")[0] == 0
    assert backend.used[-1] == ("dora_unmerge_" if use_dora else "lora_addmm_")
    restored = _read_model(back)
    for k in state:
        assert np.allclose(restored[k], state[k], rtol=0, atol=1e-5), k


def test_subprocess_merge(f32_model, tmp_path, lora_targets, h):
    base, state = f32_model
    h.make_lora(tmp_path / "lora", state, lora_targets)
    out = tmp_path / "m.safetensors"
    p = subprocess.run([h.PYTHON, "-m", "peftmath.cli", "merge", str(base), str(tmp_path / "lora"), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and "merged 9 tensors" in p.stderr
    assert out.exists()
    p = subprocess.run([h.PYTHON, "-m", "peftmath.cli", "merge", str(base)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "usage" in p.stderr


def test_folder_with_single_file_and_progress(cli, tmp_path, lora_targets, h, monkeypatch):
    """A folder holding one model.safetensors (no index) gives a folder; the tqdm bar runs on a 'terminal'."""
    import sys

    state = h.model_state()
    folder = tmp_path / "base"
    folder.mkdir()
    h.write_model(folder / "model.safetensors", state)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not copied")
    h.make_lora(tmp_path / "lora", state, lora_targets)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    rc, _, err = cli("merge", folder, tmp_path / "lora", "-o", tmp_path / "out")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors", "tokenizer.json"]
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert merged["lm_head.weight"].tobytes() == state["lm_head.weight"].tobytes()


def test_two_dora_adapters_on_one_module(cli, f32_model, tmp_path, lora_targets, h):
    """Each DoRA adapter's record is kept apart (adapters.<i>.<module>) and unmerge uses the right one."""
    base, state = f32_model
    h.make_lora(tmp_path / "d1", state, lora_targets[:2], use_dora=True, seed=1)
    h.make_lora(tmp_path / "d2", state, lora_targets[:2], use_dora=True, seed=2)
    out = tmp_path / "m.safetensors"
    assert cli("merge", base, tmp_path / "d1", tmp_path / "d2", "-o", out)[0] == 0
    assert len(load_file(records_path(out))) == 4
    back = tmp_path / "b.safetensors"
    rc, _, err = cli("unmerge", out, tmp_path / "d1", tmp_path / "d2", "-o", back)
    assert rc == 0, err
    restored = load_file(back)
    for k in state:
        assert np.allclose(restored[k], state[k], rtol=0, atol=1e-5), k


def test_records_travel_through_successive_merges(cli, tmp_path, lora_targets, h):
    """merge d1, then merge d2 into the result, then unmerge d2 and d1 one at a time: back to the base."""
    state = h.model_state()
    base = h.write_model(tmp_path / "base", state, shards=2)
    h.make_lora(tmp_path / "d1", state, lora_targets[:2], use_dora=True, seed=1)
    h.make_lora(tmp_path / "d2", state, lora_targets[:2], use_dora=True, seed=2)
    steps = [("merge", base, "d1", "m1"), ("merge", "m1", "d2", "m2"), ("unmerge", "m2", "d2", "u1"),
             ("unmerge", "u1", "d1", "u0")]
    for cmd, src, ad, out in steps:
        src = src if isinstance(src, type(base)) else tmp_path / src
        rc, _, err = cli(cmd, src, tmp_path / ad, "-o", tmp_path / out)
        assert rc == 0, (cmd, out, err)
    assert sorted(load_file(records_path(tmp_path / "m2"))) == sorted(
        f"adapters.{i}.{m}" for i in (0, 1) for m in lora_targets[:2])
    assert sorted(load_file(records_path(tmp_path / "u1"))) == sorted(f"adapters.0.{m}" for m in lora_targets[:2])
    assert not records_path(tmp_path / "u0").exists()
    assert not [p for p in tmp_path.rglob(RECORDS_NAME)]  # never written inside a model folder
    restored = _read_model(tmp_path / "u0")
    for k in state:
        assert np.allclose(restored[k], state[k], rtol=0, atol=1e-5), k


# --- the streamed merge is Adapter.merge -----------------------------------------------------------
def _stream_cases():
    """Every method and example row of the demo (on all the layer kinds of its model that the method
    supports), plain, with replacements (a trained bias of every adapted module that has one, and a
    modules_to_save tensor), and, where the config has it, with lora_bias on top of the replaced bias."""
    import dataclasses

    from peftmath.methods import describe_method, implemented_methods

    cases = []
    for peft_type in implemented_methods():
        method = describe_method(peft_type)
        if not method.merges_weights:
            continue
        for label, fields in method.examples.items():
            variants = ["plain", "replacements"]
            if "lora_bias" in {f.name for f in dataclasses.fields(method.config)} and not fields.get("use_dora"):
                variants.append("lora_bias+replacements")
            cases += [pytest.param(peft_type, label, v, id=f"{label}-{v}") for v in variants]
    return cases


def _demo_adapter(peft_type, label, variant, seed=7):
    """(adapter, base state) of one demo example, with the variant's extra tensors."""
    from peftmath import demo
    from peftmath.methods import describe_method

    method = describe_method(peft_type)
    fields = dict(method.examples[label])
    if "lora_bias" in variant:
        fields["lora_bias"] = True
    state = demo.build_model()
    ad, new_weights = demo._build_adapter(method, label, fields, state, seed)
    state = {**state, **new_weights}
    if "lora_bias" in variant:  # lora_bias needs a base bias (PEFT cannot merge it either otherwise)
        ad = pm.Adapter(ad.config, {m: p for m, p in ad.params.items() if f"{m}.bias" in state}, shared=ad.shared)
    if "replacements" in variant:
        rng = np.random.default_rng(seed)
        other = {k: (0.3 * rng.standard_normal(state[k].shape)).astype(np.float32)
                 for k in [f"{m}.bias" for m in ad.modules] + ["norm.weight"] if k in state}
        ad = pm.Adapter(ad.config, ad.params, shared=ad.shared, other=other, layer_kinds=ad.layer_kinds)
    return ad, state


def _kind_args():
    from peftmath.demo import LAYER_KINDS

    return [a for m, k in LAYER_KINDS.items() for a in ("--layer-kind", f"{m}={k}")]


def _private(state):
    return {k: np.array(v) for k, v in state.items()}


@pytest.mark.parametrize("peft_type,label,variant", _stream_cases())
def test_streamed_merge_is_adapter_merge(cli, tmp_path, peft_type, label, variant):
    """`peftmath merge` == Adapter.merge of the loaded adapter, bit for bit (weights, biases, replaced
    tensors, untouched tensors, DoRA records); `peftmath unmerge` == Adapter.unmerge likewise. The
    command merges in place (``copy=False``) on private arrays, so the reference does too."""
    from peftmath.demo import LAYER_KINDS
    from peftmath.io.safetensors import save_file
    from peftmath.methods import describe_method
    from tests.helpers import skip_unless_requirements

    skip_unless_requirements(describe_method(peft_type))
    ad, state = _demo_adapter(peft_type, label, variant)
    save_file(state, tmp_path / "base.safetensors", metadata={"format": "pt"})
    pm.save_adapter(ad, tmp_path / "adapter")
    loaded = pm.load_adapter(tmp_path / "adapter")
    out = tmp_path / "merged.safetensors"
    rc, _, err = cli("merge", tmp_path / "base.safetensors", tmp_path / "adapter", "-o", out, *_kind_args())
    assert rc == 0, err
    streamed = load_file(out)
    records: dict = {}
    ref = loaded.merge(_private(state), layer_kinds=LAYER_KINDS, records=records, copy=False)
    assert set(streamed) == set(ref)
    for k in ref:
        want = np.asarray(ref[k])
        assert streamed[k].dtype == want.dtype and streamed[k].tobytes() == want.tobytes(), k
    from peftmath.methods import describe_method

    leaf = "bias" if describe_method(peft_type).bias_only else "weight"  # BEFT moves the bias only
    assert any(streamed[f"{m}.{leaf}"].tobytes() != state[f"{m}.{leaf}"].tobytes() for m in ad.modules)
    if records:
        assert {k: v.tobytes() for k, v in load_file(records_path(out)).items()} == {
            f"adapters.0.{m}": np.asarray(v).tobytes() for m, v in records.items()}
    else:
        assert not records_path(out).exists()
    # independent of Adapter.merge: a replaced bias is the replacement (plus s * lora_B.bias with lora_bias)
    for key, value in ad.other.items():
        m = key.rsplit(".", 1)[0]
        expected = _f64(value)
        terms = np.abs(expected)  # the size of the summands: b + s·lora_B.bias may cancel (then the sum is small)
        if key.endswith(".bias") and "lora_B.bias" in ad.params.get(m, {}):
            added = ad.module(m, kind=LAYER_KINDS.get(m)).scaling * _f64(ad.params[m]["lora_B.bias"])
            expected, terms = expected + added, terms + np.abs(added)
        if key.endswith(".bias") and peft_type == "IA3" and m in ad.modules and not ad.config.is_feedforward(m):
            expected = expected * _f64(ad.params[m]["ia3_l"]).reshape(-1)  # IA3 scales the layer's output
        elif (key.endswith(".bias") and m in ad.modules and "lora_B.bias" not in ad.params[m]
              and ad.module(m, weight_shape=state[f"{m}.weight"].shape, kind=LAYER_KINDS.get(m)).changes_bias()):
            # a method whose merge transforms the bias too (RoAd's R·b): the module's own merge of the replacement
            mod = ad.module(m, weight_shape=state[f"{m}.weight"].shape, kind=LAYER_KINDS.get(m))
            expected = _f64(mod.merge(_f64(state[f"{m}.weight"]), expected).bias)
            # R·b is a 2-term sum per entry, formed in float32 by the merge: a few ulps of the terms' size
            assert np.allclose(_f64(streamed[key]), expected, rtol=0, atol=8 * EPS32 * np.max(np.abs(expected))), key
            continue
        assert np.all(np.abs(_f64(streamed[key]) - expected) <= 2 * EPS32 * terms), key  # two float32 roundings
    if not ad.other:  # unmerge (replacements cannot be unmerged: refused, tested in test_errors)
        back = tmp_path / "back.safetensors"
        rc, _, err = cli("unmerge", out, tmp_path / "adapter", "-o", back, *_kind_args())
        assert rc == 0, err
        ref_back = loaded.unmerge(_private(ref), layer_kinds=LAYER_KINDS, records=records, copy=False)
        restored = load_file(back)
        for k in ref_back:
            assert restored[k].tobytes() == np.asarray(ref_back[k]).tobytes(), k


def test_streamed_stack_is_adapter_merge_in_turn(cli, tmp_path):
    """Three adapters merged by one command == Adapter.merge of each in turn, bit for bit: a LoRA with
    lora_bias that also replaces the biases (bias="all"), a DoRA, and an IA3 that scales the biases."""
    from peftmath.demo import LAYER_KINDS
    from peftmath.io.safetensors import save_file

    a, state = _demo_adapter("LORA", "LoRA", "lora_bias+replacements", seed=1)
    b, _ = _demo_adapter("LORA", "DoRA", "plain", seed=2)
    c, _ = _demo_adapter("IA3", "IA3", "plain", seed=3)
    save_file(state, tmp_path / "base.safetensors", metadata={"format": "pt"})
    dirs = []
    for name, ad in zip("abc", (a, b, c)):
        pm.save_adapter(ad, tmp_path / name)
        dirs.append(tmp_path / name)
    out = tmp_path / "m.safetensors"
    rc, _, err = cli("merge", tmp_path / "base.safetensors", *dirs, "-o", out, *_kind_args())
    assert rc == 0, err
    ref, records = state, {}
    for i, d in enumerate(dirs):
        rec: dict = {}
        ref = pm.load_adapter(d).merge(_private(ref), layer_kinds=LAYER_KINDS, records=rec, copy=False)
        records.update({f"adapters.{i}.{m}": v for m, v in rec.items()})
    streamed = load_file(out)
    for k in ref:
        assert streamed[k].tobytes() == np.asarray(ref[k]).tobytes(), k
    assert {k: v.tobytes() for k, v in load_file(records_path(out)).items()} == {
        k: np.asarray(v).tobytes() for k, v in records.items()}
    # the second and third can be unmerged (in reverse order) and give Adapter.unmerge's result
    back = tmp_path / "back.safetensors"
    rc, _, err = cli("unmerge", out, dirs[1], dirs[2], "-o", back, *_kind_args())
    assert rc == 0, err
    ref_back = pm.load_adapter(dirs[2]).unmerge(_private(ref), layer_kinds=LAYER_KINDS, copy=False)
    ref_back = pm.load_adapter(dirs[1]).unmerge(ref_back, layer_kinds=LAYER_KINDS, copy=False,
                                                records={k.split(".", 2)[2]: v for k, v in records.items()})
    restored = load_file(back)
    for k in ref_back:
        assert restored[k].tobytes() == np.asarray(ref_back[k]).tobytes(), k


# --- where the merge records go ----------------------------------------------------------------------
def test_records_option(cli, tmp_path, lora_targets, h):
    state = h.model_state()
    base = h.write_model(tmp_path / "base", state, shards=2)
    h.make_lora(tmp_path / "dora", state, lora_targets[:2], use_dora=True)
    h.make_lora(tmp_path / "lora", state, lora_targets[:2])
    (tmp_path / "keep").mkdir()
    rec = tmp_path / "keep" / "norms.safetensors"
    out = tmp_path / "m"
    rc, _, err = cli("merge", base, tmp_path / "dora", "-o", out, "--records", rec)
    assert rc == 0, err
    assert rec.is_file() and not records_path(out).exists() and f"merge records (2) in {rec}" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    rc, _, err = cli("unmerge", out, tmp_path / "dora", "-o", tmp_path / "x")  # not at the default place
    assert rc == 1 and "weight norms recorded at merge time" in err and not (tmp_path / "x").exists()
    rc, _, err = cli("unmerge", out, tmp_path / "dora", "-o", tmp_path / "u", "--records", rec)
    assert rc == 0, err
    restored = _read_model(tmp_path / "u")
    for k in state:
        assert np.allclose(restored[k], state[k], rtol=0, atol=1e-5), k
    # a chosen records file that exists needs --force; inside OUT it is refused whatever the flags
    rc, _, err = cli("merge", base, tmp_path / "dora", "-o", tmp_path / "m2", "--records", rec)
    assert rc == 1 and "already exists" in err and not (tmp_path / "m2").exists()
    stamp = rec.read_bytes()
    rc, _, err = cli("merge", base, tmp_path / "dora", "-o", tmp_path / "m2", "--records", rec, "--force")
    assert rc == 0, err
    assert rec.read_bytes() == stamp  # the same merge: the same records, rewritten
    rc, _, err = cli("merge", base, tmp_path / "dora", "-o", tmp_path / "m3", "--records", tmp_path / "m3" / "r.st",
                     "--force")
    assert rc == 1 and "never go inside the model" in err and not (tmp_path / "m3").exists()
    # nothing to record: the summary says so and writes nothing
    rc, _, err = cli("merge", base, tmp_path / "lora", "-o", tmp_path / "m4", "--records", tmp_path / "none.st")
    assert rc == 0 and "no merge records needed" in err and not (tmp_path / "none.st").exists()


def test_records_inside_a_folder_from_earlier_versions_are_read_never_written(cli, tmp_path, lora_targets, h):
    state = h.model_state()
    base = h.write_model(tmp_path / "base", state, shards=2)
    h.make_lora(tmp_path / "d1", state, lora_targets[:2], use_dora=True, seed=1)
    h.make_lora(tmp_path / "d2", state, lora_targets[:2], use_dora=True, seed=2)
    assert cli("merge", base, tmp_path / "d1", "-o", tmp_path / "m1")[0] == 0
    os.replace(records_path(tmp_path / "m1"), tmp_path / "m1" / RECORDS_NAME)  # the old layout
    # stacked on the old layout: the old records are carried to the new place; the old file is not copied
    rc, _, err = cli("merge", tmp_path / "m1", tmp_path / "d2", "-o", tmp_path / "m2")
    assert rc == 0, err
    assert f"not copied: {RECORDS_NAME} (merge records)" in err
    assert not (tmp_path / "m2" / RECORDS_NAME).exists()
    assert sorted(load_file(records_path(tmp_path / "m2"))) == sorted(
        f"adapters.{i}.{m}" for i in (0, 1) for m in lora_targets[:2])
    rc, _, err = cli("unmerge", tmp_path / "m1", tmp_path / "d1", "-o", tmp_path / "u")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == sorted(p.name for p in base.iterdir())
    restored = _read_model(tmp_path / "u")
    for k in state:
        assert np.allclose(restored[k], state[k], rtol=0, atol=1e-5), k


def test_stale_records_never_outlive_their_model(cli, tmp_path, lora_targets, h):
    """A records sibling left without its model (an interrupted run) or by a replaced output is removed
    or replaced when OUT is written, so unmerge never reads the records of another model."""
    state = h.model_state()
    base = h.write_model(tmp_path / "base", state, shards=2)
    h.make_lora(tmp_path / "dora", state, lora_targets[:2], use_dora=True)
    h.make_lora(tmp_path / "lora", state, lora_targets[:2])
    out = tmp_path / "m"
    records_path(out).write_bytes(b"orphan")
    assert cli("merge", base, tmp_path / "lora", "-o", out)[0] == 0
    assert not records_path(out).exists()
    assert cli("merge", base, tmp_path / "dora", "-o", out, "--force")[0] == 0
    fresh = load_file(records_path(out))
    assert cli("merge", base, tmp_path / "lora", "-o", out, "--force")[0] == 0  # replaced by a LoRA merge
    assert not records_path(out).exists()
    records_path(out).write_bytes(b"orphan")
    shutil.rmtree(out)
    assert cli("merge", base, tmp_path / "dora", "-o", out)[0] == 0
    again = load_file(records_path(out))
    assert {k: v.tobytes() for k, v in again.items()} == {k: v.tobytes() for k, v in fresh.items()}
    assert not [p for p in tmp_path.iterdir() if ".peftmath-" in p.name]
