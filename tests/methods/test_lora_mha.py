"""LoRA on ``nn.MultiheadAttention`` (specs/lora.md, 12, "nn.MultiheadAttention"), without torch or PEFT:
merges, forwards and unmerges against float64 NumPy (an attention computed from the unmerged projections plus
the adapter's terms, so that "merged" is checked as "the same attention"), the out-projection's change counted
twice as PEFT 0.21.2 does (by default, without a warning; ``peft_compat`` only changes the rounding order), the
warning for an adapter from a newer PEFT, in-place merges and other layouts, the refusals, and checkpoint round
trips. PEFT's own numbers: tests/parity/test_lora_mha_parity.py and the PEFT matrix's MHA rows."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import peftmath as pm
from peftmath import cli
from peftmath.errors import CheckpointError, PeftMathWarning, ShapeError, UnsupportedError
from peftmath.io.peft import adapter_from_tensors, config_from_dict
from tests.helpers import assert_same_namespace, skip_if_immutable, to_np, to_xp

E, H, R = 8, 2, 3
ATTN = "blocks.0.attn"
OUT = f"{ATTN}.base_layer.out_proj"


def _config(**kw):
    return config_from_dict({"peft_type": "LORA", "r": R, "lora_alpha": 6, "target_modules": ["attn"], **kw})


def _params(rng, r_in=R, r_out=R, dtype=np.float32):
    return {ATTN: {"lora_A.weight": rng.standard_normal((r_in, E)).astype(dtype),
                   "lora_B.weight": rng.standard_normal((3 * E, r_in)).astype(dtype)},
            OUT: {"lora_A.weight": rng.standard_normal((r_out, E)).astype(dtype),
                  "lora_B.weight": rng.standard_normal((E, r_out)).astype(dtype)}}


def _state(rng, dtype=np.float32, bias=True):
    s = {f"{ATTN}.in_proj_weight": rng.standard_normal((3 * E, E)), f"{ATTN}.out_proj.weight": rng.standard_normal((E, E)),
         "head.weight": rng.standard_normal((4, E))}
    if bias:
        s |= {f"{ATTN}.in_proj_bias": rng.standard_normal(3 * E), f"{ATTN}.out_proj.bias": rng.standard_normal(E)}
    return {k: (0.3 * v).astype(dtype) for k, v in s.items()}


def f64(a):
    return to_np(a)


def _deltas(params, s_in, s_out):
    A, B = (f64(params[ATTN][k]) for k in ("lora_A.weight", "lora_B.weight"))
    Ao, Bo = (f64(params[OUT][k]) for k in ("lora_A.weight", "lora_B.weight"))
    return s_in * B @ A, s_out * Bo @ Ao


def attention(x, W_in, b_in, W_out, b_out, *, proj=None, out=None):
    """Self-attention of ``x (T, E)`` in float64 (torch's packed layout: q, k, v = rows of ``W_in``); ``proj`` /
    ``out`` replace the two projections (the adapter's unmerged forwards)."""
    qkv = proj(x) if proj is not None else x @ W_in.T + (0 if b_in is None else b_in)
    q, k, v = np.split(qkv, 3, axis=-1)
    d = E // H
    heads = []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        s = q[:, sl] @ k[:, sl].T / np.sqrt(d)
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        heads.append((p / p.sum(axis=-1, keepdims=True)) @ v[:, sl])
    o = np.concatenate(heads, axis=-1)
    return out(o) if out is not None else o @ W_out.T + (0 if b_out is None else b_out)


@pytest.mark.parametrize("bias", [True, False])
def test_merge_forward_unmerge_against_float64(xp, bias):
    rng = np.random.default_rng(0)
    params = _params(rng, r_in=5, r_out=5)
    # the out-projection takes its attention's pattern (PEFT builds it with X's r and alpha): "out_proj" matches no
    # target of PEFT's and is ignored, as PEFT ignores it
    ad = pm.Adapter(_config(rank_pattern={"attn": 5}, alpha_pattern={"attn": 2.5, "out_proj": 100}), params)
    host = _state(rng, bias=bias)
    state = {k: to_xp(xp, v) for k, v in host.items()}
    d_in, d_out = _deltas(params, 0.5, 0.5)  # s·B A of each projection, float64
    assert sorted(ad.modules) == [ATTN, OUT]
    W_in, W_out = f64(host[f"{ATTN}.in_proj_weight"]), f64(host[f"{ATTN}.out_proj.weight"])
    x = rng.standard_normal((5, E)).astype(np.float32)
    b_in = f64(host[f"{ATTN}.in_proj_bias"]) if bias else None
    b_out = f64(host[f"{ATTN}.out_proj.bias"]) if bias else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT 0.21.2's meaning is the default: nothing to warn about
        for compat in (False, True):  # peft_compat changes the rounding order only
            merged = ad.merge(state, peft_compat=compat)
            assert_same_namespace(xp, *merged.values())
            # the out-projection's change twice (PEFT 0.21.2), the in-projection's once
            np.testing.assert_allclose(to_np(merged[f"{ATTN}.in_proj_weight"]), W_in + d_in, atol=1e-5)
            np.testing.assert_allclose(to_np(merged[f"{ATTN}.out_proj.weight"]), W_out + 2 * d_out, atol=1e-5)
            for k in host:  # biases and other tensors: the same objects
                if not k.endswith("_weight") and not k.endswith("out_proj.weight"):
                    assert merged[k] is state[k], k
            back = ad.unmerge(merged, peft_compat=compat)
            for k in host:
                np.testing.assert_allclose(to_np(back[k]), f64(host[k]), atol=1e-5, err_msg=k)
            np.testing.assert_allclose(to_np(ad.delta_weight(OUT, peft_compat=compat)), 2 * d_out, atol=1e-5)
            np.testing.assert_allclose(to_np(ad.delta_weight(ATTN, peft_compat=compat)), d_in, atol=1e-5)

            # the attention with the merged weights == the attention with the adapter's unmerged projections
            want = attention(f64(x), W_in + d_in, b_in, W_out + 2 * d_out, b_out)
            got = attention(f64(x), None, None, None, None,
                            proj=lambda t: to_np(ad.forward(ATTN, to_xp(xp, t.astype(np.float32)), state,
                                                            peft_compat=compat)),
                            out=lambda t: to_np(ad.forward(OUT, to_xp(xp, t.astype(np.float32)), state,
                                                           peft_compat=compat)))
            np.testing.assert_allclose(got, want, atol=1e-4)
            merged_att = attention(f64(x), to_np(merged[f"{ATTN}.in_proj_weight"]), b_in,
                                   to_np(merged[f"{ATTN}.out_proj.weight"]), b_out)
            np.testing.assert_allclose(merged_att, want, atol=1e-4)
            got = to_np(ad.forward(OUT, to_xp(xp, x), state, peft_compat=compat))
            np.testing.assert_allclose(got, f64(x) @ (W_out + 2 * d_out).T + (0 if b_out is None else b_out),
                                       atol=1e-4)
    # the stored scaling stays the config's s (a summary, a combination of the stored factors)
    assert ad.module(OUT).describe()["scaling"] == pytest.approx(0.5)


def test_rslora_scaling_and_summary():
    rng = np.random.default_rng(1)
    ad = pm.Adapter(_config(use_rslora=True, lora_alpha=4), _params(rng))
    state = _state(rng)
    s = 4 / np.sqrt(R)
    d_in, d_out = _deltas(ad.params, s, s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = ad.merge(state)
    np.testing.assert_allclose(merged[f"{ATTN}.in_proj_weight"], f64(state[f"{ATTN}.in_proj_weight"]) + d_in, atol=1e-5)
    np.testing.assert_allclose(merged[f"{ATTN}.out_proj.weight"], f64(state[f"{ATTN}.out_proj.weight"]) + 2 * d_out,
                               atol=1e-5)
    assert ad.num_trainable_parameters() == R * E + 3 * E * R + R * E + E * R
    for m in (ATTN, OUT):
        assert ad.module(m).describe() == {"r": R, "alpha": 4, "scaling": pytest.approx(s), "dora": False}


@pytest.mark.parametrize("layout", ["fortran", "transposed view", "read-only", "float64", "float16"])
def test_other_layouts_and_dtypes(layout):
    rng = np.random.default_rng(2)
    dt = {"float64": np.float64, "float16": np.float16}.get(layout, np.float32)
    ad = pm.Adapter(_config(), _params(rng, dtype=np.float32 if dt == np.float16 else dt))
    state = _state(rng, dtype=dt)
    d_in, d_out = _deltas(ad.params, 2.0, 2.0)
    want = {f"{ATTN}.in_proj_weight": f64(state[f"{ATTN}.in_proj_weight"]) + d_in,
            f"{ATTN}.out_proj.weight": f64(state[f"{ATTN}.out_proj.weight"]) + 2 * d_out}
    if layout == "fortran":
        state = {k: np.asfortranarray(v) for k, v in state.items()}
    elif layout == "transposed view":
        state = {k: (np.ascontiguousarray(v.T).T if v.ndim == 2 else v) for k, v in state.items()}
    elif layout == "read-only":
        for v in state.values():
            v.setflags(write=False)
    before = {k: v.copy() for k, v in state.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = ad.merge(state)
    tol = 2e-2 if dt == np.float16 else 1e-5
    for k, w in want.items():
        assert merged[k].dtype == dt and merged[k].shape == w.shape
        np.testing.assert_allclose(f64(merged[k]), w, atol=tol * max(1.0, np.abs(w).max()), err_msg=k)
        np.testing.assert_array_equal(state[k], before[k])  # copy=True: the input is untouched
    if layout == "read-only":
        with pytest.raises(UnsupportedError):
            ad.merge(state, copy=False)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inplace = ad.merge(state, copy=False)
    for k in want:
        assert inplace[k] is state[k]
        np.testing.assert_array_equal(inplace[k], merged[k])


def test_merge_in_place_is_all_or_nothing(xp):
    """copy=False writes both projections into the caller's arrays, or nothing when one cannot be written."""
    skip_if_immutable(xp)
    rng = np.random.default_rng(3)
    ad = pm.Adapter(_config(), _params(rng))
    host = _state(rng)
    state = {k: to_xp(xp, v) for k, v in host.items()}
    host = {k: v.copy() for k, v in host.items()}  # (NumPy's state shares the host arrays)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ad.merge(state, copy=False)
    for k in (f"{ATTN}.in_proj_weight", f"{ATTN}.out_proj.weight"):
        assert out[k] is state[k]
        assert not np.allclose(to_np(state[k]), f64(host[k]))
    if xp.__name__.startswith("array_api_compat.numpy") or xp is np:
        frozen = _state(np.random.default_rng(3))
        frozen[f"{ATTN}.out_proj.weight"].setflags(write=False)
        first = frozen[f"{ATTN}.in_proj_weight"].copy()
        with pytest.raises(UnsupportedError):
            ad.merge(frozen, copy=False)
        np.testing.assert_array_equal(frozen[f"{ATTN}.in_proj_weight"], first)


def _tensors(params):
    return {f"base_model.model.{m}.{s}": a for m, p in params.items() for s, a in p.items()}


def test_refusals():
    rng = np.random.default_rng(4)
    params = _params(rng)
    state = _state(rng)
    # a lone out-projection, or one under a method that never adapts an attention
    with pytest.raises(CheckpointError, match=rf"{OUT} adapted without the attention's in-projection \({ATTN}\)"):
        adapter_from_tensors(_tensors({OUT: params[OUT]}), _config())
    ia3 = config_from_dict({"peft_type": "IA3", "target_modules": ["attn"], "feedforward_modules": []})
    with pytest.raises(CheckpointError, match="a LoRA inside a wrapped layer|cannot account"):
        adapter_from_tensors({f"base_model.model.{OUT}.ia3_l": np.ones((E, 1), np.float32),
                              f"base_model.model.{ATTN}.ia3_l": np.ones((3 * E, 1), np.float32)}, ia3)
    # variants PEFT refuses or does not run on an attention; nothing written
    for kw, extra in [(dict(use_dora=True), {"lora_magnitude_vector": np.ones(E, np.float32)}),
                      (dict(lora_bias=True), {"lora_B.bias": np.ones(E, np.float32)}),
                      (dict(use_bdlora={"target_modules_bd_a": ["attn"], "nblocks": 1}), {})]:
        p = {ATTN: dict(params[ATTN]), OUT: {**params[OUT], **extra}}
        if "lora_magnitude_vector" in extra:
            p[ATTN]["lora_magnitude_vector"] = np.ones(3 * E, np.float32)
        if "lora_B.bias" in extra:
            p[ATTN]["lora_B.bias"] = np.ones(3 * E, np.float32)
        ad = pm.Adapter(_config(**kw), p)
        before = {k: v.copy() for k, v in state.items()}
        with pytest.raises(UnsupportedError, match=rf"{OUT}: the out-projection of the nn\.MultiheadAttention {ATTN}"):
            ad.merge(state, copy=False)
        assert all(np.array_equal(state[k], before[k]) for k in state)
    ad = pm.Adapter(_config(), params)
    with pytest.raises(ShapeError, match=r"a projection of an nn\.MultiheadAttention is a Linear"):
        ad.merge(state, layer_kinds={ATTN: "Conv1D"})
    # the base lacks the packed in-projection (kdim != embed_dim: q/k/v_proj_weight), or has the wrong one
    split = {k: v for k, v in state.items() if "in_proj" not in k}
    with pytest.raises(ShapeError, match=rf"{ATTN}: adapted module has no weight '{ATTN}\.in_proj_weight'"):
        ad.merge(split)
    wrong = {**state, f"{ATTN}.in_proj_weight": state[f"{ATTN}.in_proj_weight"][:E]}
    with pytest.raises(ShapeError, match=ATTN):
        ad.merge(wrong)


def test_checkpoint_round_trip_and_the_command(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(5)
    state = _state(rng)
    ad = pm.Adapter(_config(), _params(rng))
    pm.save_adapter(ad, tmp_path / "a")
    keys = sorted(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert keys == sorted(f"base_model.model.{m}.{s}" for m in (ATTN, OUT) for s in ("lora_A.weight", "lora_B.weight"))
    again = pm.load_adapter(tmp_path / "a")
    assert again.modules == ad.modules
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        api, api_c = ad.merge(state), ad.merge(state, peft_compat=True)
        for k in state:
            np.testing.assert_array_equal(again.merge(state)[k], api[k])
    base = str(tmp_path / "base.safetensors")
    save_file(state, base)
    for extra, want in (([], api), (["--peft-compat"], api_c)):
        out = tmp_path / f"m{len(extra)}.safetensors"
        assert cli.main(["merge", base, str(tmp_path / "a"), "-o", str(out), *extra]) == 0
        got = load_file(str(out))
        assert sorted(got) == sorted(state)
        for k in state:  # the streamed merge is Adapter.merge, bit for bit
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        # verify's exact merge is the same math (the doubled out-projection with or without --peft-compat)
        for vextra in ([], ["--peft-compat"]):
            assert cli.main(["verify", base, str(tmp_path / "a"), str(out), *vextra]) == 0, (extra, vextra)
    # a merge that adds the out-projection's change once (LoRA's usual merge) is not this adapter's model
    once = dict(api)
    once[f"{ATTN}.out_proj.weight"] = (f64(state[f"{ATTN}.out_proj.weight"])
                                       + _deltas(ad.params, 2.0, 2.0)[1]).astype(np.float32)
    save_file(once, str(tmp_path / "once.safetensors"))
    for vextra in ([], ["--peft-compat"]):
        assert cli.main(["verify", base, str(tmp_path / "a"), str(tmp_path / "once.safetensors"), *vextra]) == 1
    assert cli.main(["inspect", str(tmp_path / "a"), "--base", str(tmp_path / "base.safetensors")]) == 0


@pytest.mark.parametrize(("version", "warns"), [("0.21.2", False), ("0.20.0", False), (None, False),
                                                ("0.22.0", True), ("0.21.3.dev0@abc123", True)])
def test_an_adapter_from_a_newer_peft_is_warned_about(version, warns):
    """PEFT pull request #3774 (open at 0.21.2) counts the out-projection's change once: an attention adapter
    saved by a newer PEFT is merged with 0.21.2's meaning, with a warning naming the version and the pull request;
    a newer PEFT's adapter without an attention is not warned about."""
    rng = np.random.default_rng(6)
    params, state = _params(rng), _state(rng)
    d_out = _deltas(params, 2.0, 2.0)[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = pm.Adapter(_config(peft_version=version), params).merge(state)
    found = [w for w in caught if issubclass(w.category, PeftMathWarning)]
    assert [w for w in caught if not issubclass(w.category, PeftMathWarning)] == []
    if warns:
        assert found and all(f"PEFT {version} (newer than 0.21.2)" in str(w.message)
                             and "pull request #3774" in str(w.message) for w in found)
    else:
        assert found == []
    # the meaning is PEFT 0.21.2's either way
    np.testing.assert_allclose(merged[f"{ATTN}.out_proj.weight"], f64(state[f"{ATTN}.out_proj.weight"]) + 2 * d_out,
                               atol=1e-5)
    lin = config_from_dict({"peft_type": "LORA", "r": R, "lora_alpha": 6, "target_modules": ["head"],
                            "peft_version": version})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm.Adapter(lin, {"head": {"lora_A.weight": params[OUT]["lora_A.weight"],
                                  "lora_B.weight": rng.standard_normal((4, R)).astype(np.float32)}}).merge(state)


def test_combine_inspect_and_adapter_set_count_the_out_projection_as_merged():
    """Code that reads an attention module's s, A and B (combine's SVD, inspect's spectra, AdapterSet) gives the
    change the merge makes: the out-projection's 2·s·B_o·A_o, the in-projection's s·B·A; a mixed batch there is
    refused (PEFT refuses adapter_names on an attention too)."""
    from peftmath.inspect import low_rank_factors

    rng = np.random.default_rng(21)
    params, state = _params(rng), _state(rng, np.float64)
    ad = pm.Adapter(_config(), params)
    merged = ad.merge(state)
    d_in, d_out = (f64(merged[f"{ATTN}.{k}"]) - f64(state[f"{ATTN}.{k}"]) for k in ("in_proj_weight",
                                                                                      "out_proj.weight"))
    # combine: an SVD combination of two adapters at full rank merges to the sum of their changes
    other = pm.Adapter(_config(), _params(rng))
    both = other.merge(merged)
    svd = pm.combine([ad, other], [1.0, 1.0], combination_type="svd", svd_rank=2 * R)
    again = svd.merge(state)
    for k in (f"{ATTN}.in_proj_weight", f"{ATTN}.out_proj.weight"):
        np.testing.assert_allclose(f64(again[k]), f64(both[k]), rtol=1e-5, atol=1e-5, err_msg=k)  # float32 factors
    # inspect's factors: s·B·A equal to what the merge added
    for m, want in ((ATTN, d_in), (OUT, d_out)):
        B, A, s = low_rank_factors(ad.module(m, weight_shape=want.shape))
        np.testing.assert_allclose(s * f64(B) @ f64(A), want, atol=1e-10, err_msg=m)
    # AdapterSet's forward of each projection is the adapter's own
    aset = pm.AdapterSet({"a": ad})
    x = rng.standard_normal((3, E))
    for m in (ATTN, OUT):
        np.testing.assert_allclose(f64(aset.forward(m, x, state)), f64(ad.forward(m, x, state)), atol=1e-12)
    with pytest.raises(UnsupportedError, match="nn.MultiheadAttention projection or a raw parameter"):
        pm.mixed_batch_forward(OUT, x, state, {"a": ad}, ["a", "__base__", "a"])
