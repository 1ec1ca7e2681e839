"""`peftmath verify` and `peftmath diff` end to end: real merges pass, corrupted outputs fail by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

import peftmath as pm
from peftmath.io.safetensors import save_file
from peftmath.io.stream import open_model

F32, F16 = np.dtype(np.float32), np.dtype(np.float16)


def _read(path):
    m = open_model(path)
    return {k: m.read(k) for k in m.keys()}


def _ref(adapters, state):
    """Independent float64 reference: every adapter's tensors cast to float64, merged with Adapter.merge."""
    st = {k: np.asarray(v).astype(np.float64) for k, v in state.items() if v.dtype != np.int64}
    for ad in adapters:
        ad64 = pm.Adapter(ad.config, {m: {s: np.asarray(a).astype(np.float64) for s, a in p.items()}
                                      for m, p in ad.params.items()})
        st = ad64.merge(st)
    return st


def _write_like(src, dst, tensors, h):
    """Write ``tensors`` as a model shaped like ``src`` (a file, or a folder with the same number of shards)."""
    if src.is_dir():
        return h.write_model(dst, tensors, shards=len(list(src.glob("*.safetensors"))))
    save_file(tensors, dst, metadata={"format": "pt"})
    return dst


def _bump(value, dtype, ulps):
    """``value`` (a 0-d array of ``dtype``) moved ``ulps`` ulps away from zero, by its bit pattern."""
    a = np.array(value, dtype=dtype).reshape(1)
    bits = a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])
    return (bits + ulps).view(a.dtype)[0]


@pytest.fixture(params=["float32", "float16", "bfloat16"])
def dtype(request, h):
    return {"float32": F32, "float16": F16, "bfloat16": h.BF16}[request.param]


@pytest.fixture(params=[1, 3], ids=["file", "shards"])
def merged_case(request, tmp_path, dtype, lora_targets, h, cli):
    """(base, adapter, merged, state, adapter object): a LoRA merged by `peftmath merge`."""
    state = h.model_state(dtype)
    name = "base.safetensors" if request.param == 1 else "base"
    base = h.write_model(tmp_path / name, state, shards=request.param)
    ad = h.make_lora(tmp_path / "lora", state, lora_targets)
    out = tmp_path / ("merged.safetensors" if request.param == 1 else "merged")
    rc, _, err = cli("merge", base, tmp_path / "lora", "-o", out, "-q")
    assert rc == 0, err
    return base, tmp_path / "lora", out, state, ad


def test_verify_merge_output_passes(cli, merged_case, dtype):
    base, lora, out, state, ad = merged_case
    rc, stdout, err = cli("verify", base, lora, out, "--json")
    assert rc == 0, err
    assert "within bound" in err and len(err.strip().splitlines()) == 1
    rep = json.loads(stdout)
    assert rep["ok"] and rep["failures"] == []
    ref, merged = _ref([ad], state), _read(out)
    by_key = {t["key"]: t for t in rep["tensors"]}
    assert set(by_key) == set(state)
    for k, t in by_key.items():
        if t["kind"] == "untouched":
            assert merged[k].tobytes() == state[k].tobytes()
            continue
        err_abs = np.abs(merged[k].astype(np.float64) - ref[k])
        assert t["max_abs"] == pytest.approx(float(err_abs.max()), rel=1e-12, abs=0)  # independent float64 merge
        u = {F32: 2.0 ** -24, F16: 2.0 ** -11}.get(dtype, 2.0 ** -8)
        assert t["max_rel"] <= (1 if dtype != F32 else 64) * u * 1.01 or t["max_abs"] < 1e-6
        assert 0 <= t["ratio"] <= 1


@pytest.mark.parametrize("ulps_over", [3])
def test_verify_one_element_beyond_bound(cli, merged_case, dtype, tmp_path, h, ulps_over):
    base, lora, out, state, ad = merged_case
    rc, stdout, _ = cli("verify", base, lora, out, "--json")
    rep = json.loads(stdout)
    t = next(t for t in rep["tensors"] if t["key"] == "model.layers.1.v_proj.weight")
    idx = tuple(t["worst_index"])
    tensors = _read(out)
    ref = _ref([ad], state)["model.layers.1.v_proj.weight"][idx]
    value = tensors["model.layers.1.v_proj.weight"][idx]
    # ulps needed to leave the bound, plus a few: the bound is a few ulps wide, never more than 64
    ulp = float(np.abs(_bump(value, value.dtype, 1).astype(np.float64) - float(value)))
    need = int(np.ceil((t["bound"] + abs(float(value) - ref)) / ulp))
    assert need <= 64, need
    bad = tensors["model.layers.1.v_proj.weight"].copy()
    bad[idx] = _bump(value, value.dtype, need + ulps_over)  # away from zero: |bad - ref| >= bound + 3 ulps
    tensors["model.layers.1.v_proj.weight"] = bad
    corrupt = _write_like(out, tmp_path / ("bad" + out.suffix), tensors, h)
    rc, stdout, err = cli("verify", base, lora, corrupt)
    assert rc == 1
    assert "model.layers.1.v_proj.weight: exceeds bound" in err and len(err.strip().splitlines()) == 1
    assert "model.layers.1.v_proj.weight" in stdout and "exceeds bound" in stdout


def _corrupt(case, tmp_path, h, cli, edit):
    base, lora, out, state, ad = case
    tensors = _read(out)
    edit(tensors)
    corrupt = _write_like(out, tmp_path / ("bad" + out.suffix), tensors, h)
    return cli("verify", base, lora, corrupt, "--json")


def test_verify_untouched_changed(cli, merged_case, tmp_path, h):
    def edit(t):
        a = t["model.layers.2.norm.weight"].copy()
        a[3] = _bump(a[3], a.dtype, 1)  # one ulp
        t["model.layers.2.norm.weight"] = a

    rc, stdout, err = _corrupt(merged_case, tmp_path, h, cli, edit)
    assert rc == 1 and "model.layers.2.norm.weight: untouched but differs" in err
    rep = json.loads(stdout)
    assert rep["failures"] == ["model.layers.2.norm.weight"]


@pytest.mark.parametrize("what", ["missing", "dtype", "shape", "extra"])
def test_verify_layout_changes(cli, merged_case, tmp_path, h, what):
    key = "model.layers.0.q_proj.weight"

    def edit(t):
        if what == "missing":
            del t[key]
        elif what == "dtype":
            t[key] = t[key].astype(np.float64)
        elif what == "shape":
            t[key] = t[key][:-1]
        else:
            t["extra.weight"] = np.zeros(3, np.float32)

    rc, stdout, err = _corrupt(merged_case, tmp_path, h, cli, edit)
    assert rc == 1, err
    rep = json.loads(stdout)
    want = {"missing": (key, "missing"), "dtype": (key, "dtype"), "shape": (key, "shape"),
            "extra": ("extra.weight", "only in MERGED")}[what]
    assert rep["failures"] == [want[0]]
    assert next(t for t in rep["tensors"] if t["key"] == want[0])["status"] == want[1]
    assert f"{want[0]}: {want[1]}" in err


@pytest.mark.parametrize("method", ["dora", "loha"])
def test_verify_other_methods(cli, tmp_path, dtype, lora_targets, h, method):
    state = h.model_state(dtype)
    base = h.write_model(tmp_path / "base", state, shards=2)
    if method == "dora":
        ad = h.make_lora(tmp_path / "ad", state, lora_targets, use_dora=True)
    else:
        from peftmath.methods.loha import LoHaConfig

        ad = pm.create_adapter({k: v for k, v in state.items()}, LoHaConfig(r=3, alpha=6, init_weights=False,
                                                                            target_modules=lora_targets), seed=4)
        pm.save_adapter(ad, tmp_path / "ad")
    out = tmp_path / "merged"
    assert cli("merge", base, tmp_path / "ad", "-o", out, "-q")[0] == 0
    rc, stdout, err = cli("verify", base, tmp_path / "ad", out, "--json")
    assert rc == 0, err
    merged, ref = _read(out), _ref([pm.load_adapter(tmp_path / "ad")], state) if method != "dora" else None
    if ref is not None:
        for t in json.loads(stdout)["tensors"]:
            if t["kind"] == "merged":
                assert t["max_abs"] == pytest.approx(float(np.abs(merged[t["key"]].astype(np.float64)
                                                                  - ref[t["key"]]).max()), rel=1e-12)
    # one element moved by 1/64 of its value: far beyond the bound of every dtype
    k = lora_targets[0] + ".weight"
    a = merged[k].copy()
    a[0, 0] = (a[0, 0].astype(np.float32) * np.float32(1 + 1 / 64) + np.float32(1e-3)).astype(a.dtype)
    merged[k] = a
    bad = h.write_model(tmp_path / "bad", merged, shards=2)
    rc, _, err = cli("verify", base, tmp_path / "ad", bad)
    assert rc == 1 and f"{k}: exceeds bound" in err


def test_verify_two_adapters_and_wrong_order(cli, f32_model, tmp_path, lora_targets, h):
    base, state = f32_model
    h.make_lora(tmp_path / "a", state, lora_targets, seed=1)
    h.make_lora(tmp_path / "b", state, lora_targets[:2], seed=2, use_dora=True)
    out = tmp_path / "m.safetensors"
    assert cli("merge", base, tmp_path / "a", tmp_path / "b", "-o", out, "-q")[0] == 0
    assert cli("verify", base, tmp_path / "a", tmp_path / "b", out)[0] == 0
    rc, _, err = cli("verify", base, tmp_path / "a", out)  # one adapter left out
    assert rc == 1 and "exceeds bound" in err


def test_verify_usage_and_errors(cli, f32_model, tmp_path):
    base, _ = f32_model
    assert cli("verify", base, base)[0] == 2  # needs BASE ADAPTER MERGED
    rc, _, err = cli("verify", base, tmp_path / "nope", base)
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert cli("verify", base, "--dtype", "f64x", base, base)[0] == 2


def test_verify_dtype_option(cli, f32_model, tmp_path, lora_targets, h):
    base, state = f32_model
    h.make_lora(tmp_path / "lora", state, lora_targets)
    out = tmp_path / "m.safetensors"
    assert cli("merge", base, tmp_path / "lora", "-o", out, "--dtype", "bfloat16", "-q")[0] == 0
    rc, _, err = cli("verify", base, tmp_path / "lora", out)  # judged as a float32 model: every dtype differs
    assert rc == 1 and ": dtype" in err
    assert cli("verify", base, tmp_path / "lora", out, "--dtype", "bf16")[0] == 0


def test_diff(cli, tmp_path, h):
    state = h.model_state(h.BF16)
    a = h.write_model(tmp_path / "a", state, shards=2)
    rc, stdout, err = cli("diff", a, a)
    assert rc == 0 and "identical" in err and stdout.strip().endswith("--all lists them)")
    other = dict(state)
    w = state["lm_head.weight"].astype(np.float64)
    w2 = (w * 1.01).astype(h.BF16)
    other["lm_head.weight"] = w2
    del other["model.step"]
    other["new.bias"] = np.ones(2, np.float32)
    other["model.layers.0.norm.weight"] = state["model.layers.0.norm.weight"].astype(np.float32)
    b = h.write_model(tmp_path / "b", other, shards=3)
    rc, stdout, err = cli("diff", a, b, "--json")
    assert rc == 1 and len(err.strip().splitlines()) == 1
    rep = {t["key"]: t for t in json.loads(stdout)["tensors"]}
    d = np.abs(w2.astype(np.float64) - w)
    assert rep["lm_head.weight"]["status"] == "differs"
    assert rep["lm_head.weight"]["max_abs"] == pytest.approx(float(d.max()), rel=1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(w != 0, d / np.abs(w), np.where(d > 0, np.inf, 0))
    assert rep["lm_head.weight"]["max_rel"] == pytest.approx(float(rel.max()), rel=1e-12)
    assert rep["model.step"]["status"] == "only in A" and rep["new.bias"]["status"] == "only in B"
    assert rep["model.layers.0.norm.weight"]["status"] == "dtype"
    assert rep["model.layers.0.norm.weight"]["max_abs"] == 0
    assert rep["lm_head.weight"]["shape"] == [30, 12]
    assert all(t["status"] == "identical" for k, t in rep.items()
               if k not in ("lm_head.weight", "model.step", "new.bias", "model.layers.0.norm.weight"))


@pytest.mark.parametrize("spelling,name", [("bf16", "bfloat16"), ("fp16", "float16"), ("f16", "float16"),
                                           ("f32", "float32"), ("fp32", "float32"), ("BFloat16", "bfloat16")])
def test_short_dtype_names(cli, f32_model, tmp_path, lora_targets, h, spelling, name):
    base, state = f32_model
    h.make_lora(tmp_path / "lora", state, lora_targets)
    out = tmp_path / "m.safetensors"
    assert cli("merge", base, tmp_path / "lora", "-o", out, "--dtype", spelling, "-q")[0] == 0
    m = open_model(out)
    assert str(m.dtype("lm_head.weight")) == name and m.read("lm_head.weight").tobytes() == \
        state["lm_head.weight"].astype(m.dtype("lm_head.weight")).tobytes()
    assert cli("verify", base, tmp_path / "lora", out, "--dtype", spelling)[0] == 0
    rc, _, err = cli("merge", base, tmp_path / "lora", "-o", tmp_path / "x.safetensors", "--dtype", "f8")
    assert rc == 2 and "unknown dtype 'f8'" in err
