"""LoRA on raw parameters (PEFT's ``LoraConfig.target_parameters``, ``lora.ParamWrapper``): the delta of a 2-D
and a 3-D (experts) parameter against a float64 expert-by-expert loop written from the shapes of the spec
(specs/lora.md §12), merge / unmerge / save-load round trips through ``Adapter`` (nested wrappers
``<module>.base_layer``, rank_pattern keyed by the parameter's name), the streamed command, Fortran-ordered
and strided bases, and the refusals (square experts, ambiguous nesting, fields PEFT's wrapper refuses, a
3-D forward)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import peftmath as pm
from peftmath import cli
from peftmath.errors import ConfigError, ShapeError, UnsupportedError
from peftmath.inspect import inspect_adapter
from peftmath.io.safetensors import save_file
from peftmath.methods.lora import LoraConfig
from peftmath.methods.lora_params import parameter_delta

E, H, I = 3, 4, 5  # experts, hidden, intermediate


def _config(**kw):
    kw.setdefault("target_parameters", ["experts.gate_up_proj", "experts.down_proj"])
    cfg = LoraConfig(**{"r": 2, "lora_alpha": 3, "target_modules": ["lin"], **kw})
    cfg.validate()
    return cfg


def _reference(A, B, shape, s, transposed=False):
    """ΔP expert by expert in float64: A_e = rows e·r .. e·r+r-1 of A, B_e = columns k·E + e of B."""
    A, B = A.astype(np.float64), B.astype(np.float64)
    if len(shape) == 2:
        return s * B @ A
    n = shape[0]
    r = A.shape[0] // n
    out = np.empty(shape)
    for e in range(n):
        Ae = A[e * r:(e + 1) * r]
        Be = np.stack([B[:, k * n + e] for k in range(r)], axis=1)
        out[e] = (s * Be @ Ae).T if transposed else s * Be @ Ae
    return out


def _case(seed=0, transposed=False, dtype=np.float32):
    """A MoE-like model: experts.gate_up_proj (E, H, 2I) and experts.down_proj (E, I, H) (transformers' Llama4
    layout; ``transposed``: PEFT's is_transposed reading), and a Linear lin (H, H); down_proj has r=3."""
    rng = np.random.default_rng(seed)
    state = {"experts.gate_up_proj": rng.standard_normal((E, H, 2 * I)).astype(dtype),
             "experts.down_proj": rng.standard_normal((E, I, H)).astype(dtype),
             "lin.weight": rng.standard_normal((H, H)).astype(dtype), "lin.bias": rng.standard_normal(H).astype(dtype)}

    def pair(r, shape):
        inn, out = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
        return {"lora_A.weight": rng.standard_normal((r * E, inn)).astype(np.float32),
                "lora_B.weight": rng.standard_normal((out, r * E)).astype(np.float32)}

    params = {"experts.base_layer": pair(2, (E, H, 2 * I)), "experts": pair(3, (E, I, H)),
              "lin": {"lora_A.weight": rng.standard_normal((2, H)).astype(np.float32),
                      "lora_B.weight": rng.standard_normal((H, 2)).astype(np.float32)}}
    return params, state


def _expected(params, state, transposed=False):
    want = {k: v.astype(np.float64) for k, v in state.items()}
    gu, dn = params["experts.base_layer"], params["experts"]
    want["experts.gate_up_proj"] += _reference(gu["lora_A.weight"], gu["lora_B.weight"], (E, H, 2 * I), 1.5, transposed)
    want["experts.down_proj"] += _reference(dn["lora_A.weight"], dn["lora_B.weight"], (E, I, H), 1.0, transposed)
    want["lin.weight"] += 1.5 * params["lin"]["lora_B.weight"].astype(np.float64) @ params["lin"]["lora_A.weight"]
    return want


def _close(got, want, dtype=np.float32):
    eps = np.finfo(dtype).eps
    for k, w in want.items():
        g = np.asarray(got[k], np.float64)
        assert np.all(np.abs(g - w) <= 8 * eps * (1 + np.abs(w))), (k, np.max(np.abs(g - w)))


@pytest.mark.parametrize("shape, transposed", [((6, 7), False), ((1, 6, 7), False), ((3, 6, 7), False),
                                               ((4, 5, 8), False), ((3, 6, 7), True), ((4, 5, 8), True)])
def test_delta_matches_expert_loop(shape, transposed):
    """(PEFT reads 2-D and single-expert parameters without a transpose: no transposed case for them.)"""
    rng = np.random.default_rng(1)
    n = 1 if len(shape) == 2 else shape[0]
    r = 2
    inn, out = (shape[-1], shape[-2]) if not transposed else (shape[-2], shape[-1])
    A, B = rng.standard_normal((r * n, inn)), rng.standard_normal((out, r * n))
    got = parameter_delta(A, B, shape, scaling=0.75, transposed=transposed)
    np.testing.assert_allclose(got, _reference(A, B, shape, 0.75, transposed), rtol=1e-13, atol=1e-13)
    assert got.shape == shape and got.dtype == np.float64


@pytest.mark.parametrize("transposed", [False, True])
def test_merge_unmerge_nested_wrappers(transposed):
    params, state = _case(transposed=transposed)
    ad = pm.Adapter(_config(rank_pattern={"experts.down_proj": 3}), params)
    assert ad.modules == ["experts", "experts.base_layer", "lin"]
    assert ad.weight_keys("experts", state)[0] == "experts.down_proj"
    assert ad.weight_keys("experts.base_layer", state)[0] == "experts.gate_up_proj"
    before = {k: v.copy() for k, v in state.items()}
    merged = ad.merge(state)
    _close(merged, _expected(params, state, transposed))
    assert merged["lin.bias"] is state["lin.bias"]
    assert all(np.array_equal(state[k], before[k]) for k in state)  # nothing written
    back = ad.unmerge(merged)
    _close(back, {k: v.astype(np.float64) for k, v in state.items()})
    mod = ad.module("experts", weight_shape=(E, I, H))
    np.testing.assert_allclose(mod.delta_weight(), merged["experts.down_proj"] - state["experts.down_proj"],
                               atol=1e-5)
    assert mod.describe()["parameter"] == "experts.down_proj" and mod.describe()["experts"] == E


def test_rank_pattern_is_keyed_by_parameter_name():
    """rank_pattern {"experts.down_proj": 3} (PEFT's current_key: the parameter), not the wrapper's name."""
    params, state = _case()
    with pytest.raises(ShapeError, match="fit none"):  # without the pattern, down_proj's r=3 factors do not fit
        pm.Adapter(_config(), params).merge(state)
    ad = pm.Adapter(_config(rank_pattern={"experts.down_proj": 3}, alpha_pattern={"experts.down_proj": 6}), params)
    assert ad.module("experts", weight_shape=(E, I, H)).scaling == 2.0


def test_save_load_round_trip_and_command(tmp_path):
    params, state = _case(seed=3)
    ad = pm.Adapter(_config(rank_pattern={"experts.down_proj": 3}), params)
    pm.save_adapter(ad, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]
    back = pm.load_adapter(tmp_path / "ad")
    assert sorted(back.state_dict()) == sorted(f"base_model.model.{m}.lora_{s}.weight" for m in params for s in "AB")
    want = ad.merge(state)
    got = back.merge(state)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    save_file(state, tmp_path / "base.safetensors")
    assert cli.main(["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "ad"), "-o",
                     str(tmp_path / "merged.safetensors")]) == 0
    streamed = pm.io.safetensors.SafeTensorsFile(tmp_path / "merged.safetensors")
    for k in want:
        np.testing.assert_allclose(np.asarray(streamed[k]), want[k], rtol=1e-6, atol=1e-6)
    assert cli.main(["inspect", str(tmp_path / "ad"), "--base", str(tmp_path / "base.safetensors")]) == 0
    # inspect's rank per module: each wrapper's own r (the pattern is keyed by the parameter, not the module)
    ranks = {e["module"]: e["rank"] for e in inspect_adapter(tmp_path / "ad")["modules"]}
    # experts = down_proj (outer wrapper, rank_pattern 3); experts.base_layer = gate_up_proj and lin: r = 2
    assert ranks == {"experts": 3, "experts.base_layer": 2, "lin": 2}
    assert int(params["experts"]["lora_A.weight"].shape[0]) == 3 * E  # the checkpoint agrees: A is (r·E, in)
    # the spectra with the base: one per expert of each stack, ‖ΔP[e]‖ as the float64 expert loop gives it
    from peftmath.plot import spectra

    got = spectra(ad, state)
    assert sorted(got) == sorted([f"experts[{e}]" for e in range(E)] + [f"experts.base_layer[{e}]" for e in range(E)]
                                 + ["lin"])
    want = _expected(params, state)
    for e in range(E):
        d = want["experts.down_proj"][e].astype(np.float64) - state["experts.down_proj"][e]
        assert np.isclose(got[f"experts[{e}]"]["norm"], np.linalg.norm(d), rtol=1e-5)


def test_inspect_plot_of_expert_stacks(tmp_path):
    """``inspect --plot --base`` reads each wrapper's parameter (not ``<module>.weight``) and draws one spectrum
    per expert."""
    pytest.importorskip("matplotlib")
    params, state = _case(seed=4)
    pm.save_adapter(pm.Adapter(_config(rank_pattern={"experts.down_proj": 3}), params), tmp_path / "ad")
    save_file(state, tmp_path / "base.safetensors")
    assert cli.main(["inspect", str(tmp_path / "ad"), "--base", str(tmp_path / "base.safetensors"), "--plot",
                     str(tmp_path / "spectra.png"), "-q"]) == 0
    assert (tmp_path / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fortran_and_strided_bases():
    params, state = _case(seed=4)
    ad = pm.Adapter(_config(rank_pattern={"experts.down_proj": 3}), params)
    want = _expected(params, state)
    fortran = {k: np.asfortranarray(v) for k, v in state.items()}
    _close(ad.merge(fortran), want)
    big = {k: np.repeat(v, 2, axis=-1) for k, v in state.items()}
    strided = {k: v[..., ::2] for k, v in big.items()}  # non-contiguous views of the same values
    _close(ad.merge(strided), want)
    ad.merge(fortran, copy=False)  # in place into the Fortran arrays
    _close(fortran, want)
    ad.merge(strided, copy=False)  # through the strides into `big`
    _close({k: big[k][..., ::2] for k in big}, want)
    assert np.array_equal(big["experts.down_proj"][..., 1::2], state["experts.down_proj"])


def test_two_d_parameter_is_linear_lora_with_forward():
    """A 2-D target (``lin0.weight`` of an nn.Linear) is LoRA on an (out, in) weight; its forward the Linear's."""
    rng = np.random.default_rng(5)
    cfg = LoraConfig(r=2, lora_alpha=4, target_parameters=["lin0.weight"])
    cfg.validate()
    A, B = rng.standard_normal((2, 7)).astype(np.float32), rng.standard_normal((5, 2)).astype(np.float32)
    state = {"lin0.weight": rng.standard_normal((5, 7)).astype(np.float32), "lin0.bias": rng.standard_normal(5).astype(np.float32)}
    ad = pm.Adapter(cfg, {"lin0": {"lora_A.weight": A, "lora_B.weight": B}})
    W = state["lin0.weight"].astype(np.float64) + 2.0 * B.astype(np.float64) @ A
    _close(ad.merge(state), {"lin0.weight": W})
    x = rng.standard_normal((3, 7)).astype(np.float32)
    np.testing.assert_allclose(ad.forward("lin0", x, state), x @ W.T + state["lin0.bias"], rtol=1e-5, atol=1e-5)


def test_refusals():
    params, state = _case()
    cfg = _config(rank_pattern={"experts.down_proj": 3})
    ad = pm.Adapter(cfg, params)
    with pytest.raises(UnsupportedError, match="module's own forward"):
        ad.forward("experts", np.ones((2, I), np.float32), state)
    # square experts: both (E, out, in) and (E, in, out) fit
    sq = {"experts.gate_up_proj": np.ones((E, H, H), np.float32)}
    p = {"experts": {"lora_A.weight": np.ones((2 * E, H), np.float32), "lora_B.weight": np.ones((H, 2 * E), np.float32)}}
    with pytest.raises(UnsupportedError, match="is_transposed"):
        pm.Adapter(_config(target_parameters=["gate_up_proj"]), p).merge(sq)
    # two wrappers, two same-shaped parameters: the nesting order is not in the checkpoint
    two = {"m.p": np.ones((4, 5), np.float32), "m.q": np.ones((4, 5), np.float32)}
    f = {"lora_A.weight": np.ones((2, 5), np.float32), "lora_B.weight": np.ones((4, 2), np.float32)}
    with pytest.raises(UnsupportedError, match="registration order"):
        pm.Adapter(_config(target_parameters=["m.p", "m.q"]), {"m": f, "m.base_layer": f}).merge(two)
    # fields PEFT's ParamWrapper refuses
    with pytest.raises(ConfigError, match="fan_in_fan_out"):
        pm.Adapter(_config(fan_in_fan_out=True, rank_pattern={"experts.down_proj": 3}), params).merge(state)
    # a base whose parameter does not fit
    bad = dict(state, **{"experts.down_proj": np.ones((E, I + 1, H), np.float32)})
    with pytest.raises(ShapeError, match="experts"):
        ad.merge(bad)
    # single expert read transposed: PEFT's 2-D formula gives the wrong shape, so it cannot merge it either
    one = {"experts.gate_up_proj": np.ones((1, 3, 5), np.float32)}
    p1 = {"experts": {"lora_A.weight": np.ones((2, 3), np.float32), "lora_B.weight": np.ones((5, 2), np.float32)}}
    with pytest.raises(ShapeError):
        pm.Adapter(_config(target_parameters=["gate_up_proj"]), p1).merge(one)


def test_checkpoint_keys_of_nested_wrappers_load(tmp_path):
    """PEFT's keys ``experts.base_layer.lora_*`` load as the module ``experts.base_layer``; a ``base_layer``
    path deeper than the targeted parameters is still refused."""
    params, _ = _case()
    tensors = {f"base_model.model.{m}.{s}": a for m, p in params.items() for s, a in p.items()}
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    cfg = _config(rank_pattern={"experts.down_proj": 3}).to_dict()
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    assert pm.load_adapter(tmp_path).modules == sorted(params)
    tensors["base_model.model.experts.base_layer.base_layer.lora_A.weight"] = params["experts"]["lora_A.weight"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(pm.errors.CheckpointError):
        pm.load_adapter(tmp_path)
