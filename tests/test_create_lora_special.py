"""``create_adapter`` for LoRA's special targets (issue 18): raw parameters (``target_parameters``, PEFT's
``ParamWrapper``; specs/lora.md 12) and ``nn.MultiheadAttention`` modules (PEFT's ``lora.MultiheadAttention``).

Checked without torch: the modules, factor shapes, nesting and saved keys PEFT 0.21.2 uses (the parity file
compares them with PEFT itself), the init distributions, the default init as an exact no-op, the merge of a
random init against an independent float64 sum of rank-one terms, seeds, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

import peftmath as pm
from peftmath.errors import ConfigError, UnsupportedError
from peftmath.io import config_from_dict

E, H, I, D = 4, 6, 5, 6


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {  # registration order, as torch's state_dict() gives it: gate_up_proj before down_proj
        "experts.gate_up_proj": w(E, 2 * I, H), "experts.down_proj": w(E, H, I),
        "attn.in_proj_weight": w(3 * D, D), "attn.in_proj_bias": w(3 * D),
        "attn.out_proj.weight": w(D, D), "attn.out_proj.bias": w(D),
        "lin.weight": w(H, D), "lin.bias": w(H),
    }


def _cfg(**kw):
    return config_from_dict({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **kw})


def _shapes(ad) -> dict[str, dict[str, tuple[int, ...]]]:
    return {m: {k: tuple(v.shape) for k, v in p.items()} for m, p in ad.params.items()}


# --------------------------------------------------------------------------------------------------
# modules, shapes, keys, config
# --------------------------------------------------------------------------------------------------
def test_one_experts_parameter_the_issue_example():
    ad = pm.create_adapter(_state(), _cfg(target_modules=[], target_parameters=["experts.gate_up_proj"]))
    # (E, 2I, H), is_transposed False: in = H, out = 2I; A (r·E, in), B (out, r·E)
    assert _shapes(ad) == {"experts": {"lora_A.weight": (2 * E, H), "lora_B.weight": (2 * I, 2 * E)}}
    assert ad.config.target_modules == [] and ad.config.target_parameters == ["experts.gate_up_proj"]


def test_two_parameters_of_one_module_nest_first_registered_innermost():
    ad = pm.create_adapter(_state(), _cfg(target_parameters=["down_proj", "experts.gate_up_proj"],
                                          rank_pattern={"experts.down_proj": 3}))
    assert _shapes(ad) == {
        "experts.base_layer": {"lora_A.weight": (2 * E, H), "lora_B.weight": (2 * I, 2 * E)},  # gate_up_proj, r = 2
        "experts": {"lora_A.weight": (3 * E, I), "lora_B.weight": (H, 3 * E)},  # down_proj, rank_pattern r = 3
    }
    assert ad.config.target_modules is None  # PEFT keeps null beside target_parameters on an unknown model type


def test_parameter_order_overrides_the_mapping_order_and_a_file_needs_it(tmp_path):
    from safetensors.numpy import save_file

    st = _state()
    flipped = {"experts.down_proj": st["experts.down_proj"], "experts.gate_up_proj": st["experts.gate_up_proj"]}
    cfg = _cfg(target_parameters=["gate_up_proj", "down_proj"])
    inner = {"lora_A.weight": (2 * E, I), "lora_B.weight": (H, 2 * E)}  # down_proj first: innermost
    assert _shapes(pm.create_adapter(flipped, cfg))["experts.base_layer"] == inner
    ordered = pm.create_adapter(flipped, cfg, parameter_order=["gate_up_proj", "down_proj"])
    assert _shapes(ordered)["experts.base_layer"]["lora_A.weight"] == (2 * E, H)
    save_file(flipped, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="experts.*registration order.*parameter_order"):
        pm.create_adapter(tmp_path / "model.safetensors", cfg)
    from peftmath.create import open_state

    with pytest.raises(ConfigError, match="experts.*registration order"):  # what the `init` command passes
        pm.create_adapter(open_state(tmp_path / "model.safetensors")[0], cfg)
    from_file = pm.create_adapter(tmp_path / "model.safetensors", cfg, parameter_order=["gate_up_proj", "down_proj"])
    assert _shapes(from_file) == _shapes(ordered)
    with pytest.raises(ConfigError, match="parameter_order.*down_proj"):
        pm.create_adapter(st, cfg, parameter_order=["gate_up_proj"])


def test_transposed_experts_from_the_model_type_or_the_argument():
    st = {"model.experts.gate_up_proj": np.zeros((E, H, 2 * I), np.float32)}  # (E, in, out): GPT-OSS's layout
    cfg = _cfg(target_modules=[], target_parameters=["gate_up_proj"])
    want = {"lora_A.weight": (2 * E, H), "lora_B.weight": (2 * I, 2 * E)}
    assert _shapes(pm.create_adapter(st, cfg, model_type="gpt_oss"))["model.experts"] == want
    assert _shapes(pm.create_adapter(st, cfg, is_transposed=True))["model.experts"] == want
    plain = _shapes(pm.create_adapter(st, cfg))["model.experts"]  # read as (E, out, in)
    assert plain == {"lora_A.weight": (2 * E, 2 * I), "lora_B.weight": (H, 2 * E)}
    one = {"m.experts.w": np.zeros((1, 3, 4), np.float32)}
    with pytest.raises(UnsupportedError, match="m.experts.*is_transposed.*one expert"):
        pm.create_adapter(one, _cfg(target_modules=[], target_parameters=["w"]), is_transposed=True)


def test_attention_gets_two_loras_with_its_rank():
    ad = pm.create_adapter(_state(), _cfg(target_modules=["attn", "lin"], rank_pattern={"attn": 3, "out_proj": 5}))
    assert _shapes(ad) == {
        "attn": {"lora_A.weight": (3, D), "lora_B.weight": (3 * D, 3)},
        "attn.base_layer.out_proj": {"lora_A.weight": (3, D), "lora_B.weight": (D, 3)},  # X's r, not out_proj's
        "lin": {"lora_A.weight": (2, D), "lora_B.weight": (H, 2)},
    }
    assert ad.weight_keys("attn", _state()) == ("attn.in_proj_weight", "attn.in_proj_bias")


def test_all_linear_adapts_the_out_projection_as_a_linear_not_the_attention():
    ad = pm.create_adapter(_state(), _cfg(target_modules="all-linear"))
    assert sorted(ad.params) == ["attn.out_proj", "lin"]  # PEFT: NonDynamicallyQuantizableLinear is an nn.Linear


def test_default_table_and_parameters_together_on_a_known_model_type():
    rng = np.random.default_rng(0)
    st = {f"model.layers.0.self_attn.{p}.weight": rng.standard_normal((4, 4)).astype(np.float32)
          for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    st["model.layers.0.mlp.experts.down_proj"] = rng.standard_normal((2, 4, 3)).astype(np.float32)
    ad = pm.create_adapter(st, _cfg(target_modules=None, target_parameters=["experts.down_proj"]), model_type="llama")
    assert sorted(ad.params) == ["model.layers.0.mlp.experts", "model.layers.0.self_attn.q_proj",
                                 "model.layers.0.self_attn.v_proj"]
    assert ad.config.target_modules == ["q_proj", "v_proj"]


def test_saved_keys_are_peft_keys_and_load_back(tmp_path):
    from safetensors.numpy import load_file

    st = _state()
    ad = pm.create_adapter(st, _cfg(target_modules=["attn"], target_parameters=["experts.gate_up_proj",
                                                                                "experts.down_proj"],
                                    init_lora_weights=False))
    pm.save_adapter(ad, tmp_path)
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == sorted(f"base_model.model.{m}.lora_{s}.weight" for m in
                          ("experts", "experts.base_layer", "attn", "attn.base_layer.out_proj") for s in "AB")
    back = pm.load_adapter(tmp_path)
    for m, p in ad.params.items():
        for k, v in p.items():
            assert np.array_equal(np.asarray(back.params[m][k]), np.asarray(v))
    merged, again = ad.merge(st), back.merge(st)
    for k in st:
        assert np.array_equal(np.asarray(merged[k]), np.asarray(again[k])), k


# --------------------------------------------------------------------------------------------------
# initialisation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("seed", [0, 7])
def test_default_init_merges_to_the_base_exactly(init, seed):
    st = _state(seed)
    ad = pm.create_adapter(st, _cfg(target_modules=["attn"], target_parameters=["gate_up_proj", "down_proj"],
                                    init_lora_weights=init), seed=seed)
    for m, p in ad.params.items():
        assert np.asarray(p["lora_A.weight"]).any(), m
        assert not np.asarray(p["lora_B.weight"]).any(), m
    merged = ad.merge(st)
    for k, w in st.items():
        assert np.array_equal(np.asarray(merged[k]), w), k


def _rank_one_sum(A, B, E_, r, s, transposed=False):
    """ΔP[e] = s Σ_k B[:, k·E + e] ⊗ A[e·r + k] in float64 (PEFT's split of A expert-major, B rank-major)."""
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    out = np.zeros((E_, B.shape[0], A.shape[1]))
    for e in range(E_):
        for k in range(r):
            out[e] += s * np.outer(B[:, k * E_ + e], A[e * r + k])
    return out.transpose(0, 2, 1) if transposed else out


def test_random_init_merges_as_an_independent_sum():
    st = _state()
    ad = pm.create_adapter(st, _cfg(target_modules=["attn"], target_parameters=["gate_up_proj", "down_proj"],
                                    rank_pattern={"experts.down_proj": 3}, alpha_pattern={"attn": 3.0},
                                    init_lora_weights=False), seed=1)
    merged = {k: np.asarray(v, np.float64) for k, v in ad.merge(st).items()}
    p = ad.params
    want = {
        "experts.gate_up_proj": _rank_one_sum(p["experts.base_layer"]["lora_A.weight"],
                                              p["experts.base_layer"]["lora_B.weight"], E, 2, 4 / 2),
        "experts.down_proj": _rank_one_sum(p["experts"]["lora_A.weight"], p["experts"]["lora_B.weight"], E, 3, 4 / 3),
        # the attention: s = 3 / 2; the out-projection's change counts twice (PEFT 0.21.2)
        "attn.in_proj_weight": 1.5 * np.asarray(p["attn"]["lora_B.weight"], np.float64)
        @ np.asarray(p["attn"]["lora_A.weight"], np.float64),
        "attn.out_proj.weight": 2 * 1.5 * np.asarray(p["attn.base_layer.out_proj"]["lora_B.weight"], np.float64)
        @ np.asarray(p["attn.base_layer.out_proj"]["lora_A.weight"], np.float64),
    }
    for k, delta in want.items():
        assert np.abs(delta).max() > 0.1, k
        np.testing.assert_allclose(merged[k] - st[k], delta, atol=2e-6, rtol=1e-5, err_msg=k)
    for k in ("lin.weight", "attn.in_proj_bias", "attn.out_proj.bias"):
        assert np.array_equal(merged[k], st[k]), k


def test_init_distributions():
    """Kaiming-uniform bounds 1/√fan_in (filled), gaussian std 1/r with r per expert (not r·E)."""
    rng = np.random.default_rng(0)
    st = {"m.experts.w": rng.standard_normal((4, 48, 64)).astype(np.float32),
          "m.attn.in_proj_weight": np.zeros((192, 64), np.float32), "m.attn.out_proj.weight": np.zeros((64, 64), np.float32)}
    ad = pm.create_adapter(st, _cfg(target_modules=["attn"], target_parameters=["w"], r=8, init_lora_weights=False))
    for m, p in ad.params.items():
        for k, v in p.items():
            v = np.asarray(v)
            bound = 1 / np.sqrt(v.shape[1])  # A: in (64); B: r·E (32) for the experts, r (8) for the attention
            assert v.dtype == np.float32 and np.abs(v).max() <= bound and np.abs(v).max() > 0.9 * bound, (m, k)
    g = pm.create_adapter(st, _cfg(target_modules=[], target_parameters=["w"], r=8, init_lora_weights="gaussian"))
    A = np.asarray(g.params["m.experts"]["lora_A.weight"])
    assert A.shape == (32, 64) and abs(A.std() - 1 / 8) < 0.01


def test_seeds_are_host_seeded_and_reproducible():
    st = _state()
    cfg = _cfg(target_modules=["attn"], target_parameters=["gate_up_proj"], init_lora_weights=False)
    a, b, c = (pm.create_adapter(st, cfg, seed=s) for s in (5, 5, 6))
    for m in a.params:
        assert np.array_equal(np.asarray(a.params[m]["lora_A.weight"]), np.asarray(b.params[m]["lora_A.weight"]))
        assert not np.array_equal(np.asarray(a.params[m]["lora_A.weight"]), np.asarray(c.params[m]["lora_A.weight"]))
    # each module has its own stream: the in- and out-projection of one attention differ
    assert not np.array_equal(np.asarray(a.params["attn"]["lora_A.weight"]),
                              np.asarray(a.params["attn.base_layer.out_proj"]["lora_A.weight"]))


def test_plain_modules_keep_their_streams_without_special_targets():
    st = _state()
    plain = pm.create_adapter(st, _cfg(target_modules=["lin", "out_proj"]), seed=2)
    rng = np.random.default_rng(np.random.SeedSequence(2, spawn_key=(1,)))  # "lin" is the second module, sorted
    bound = 1 / np.sqrt(D)
    want = rng.uniform(-bound, bound, (2, D)).astype(np.float32)
    assert np.array_equal(np.asarray(plain.params["lin"]["lora_A.weight"]), want)


# --------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, error, match", [
    (dict(target_modules=["lin"], target_parameters=["lin.weight"]), ConfigError, "lin.weight.*target_modules"),
    (dict(target_modules=["attn"], target_parameters=["attn.in_proj_weight"]), ConfigError,
     "attn.in_proj_weight.*nn.MultiheadAttention attn"),
    (dict(target_modules=["attn"], target_parameters=["out_proj.weight"]), ConfigError, "attn.out_proj.weight"),
    (dict(target_modules=["attn", "out_proj"]), ConfigError, "attn.out_proj.*both"),
    (dict(target_modules=[], target_parameters=["lin.bias"]), ConfigError, "lin.bias.*2-D and 3-D"),
    (dict(target_modules=[], target_parameters=["nothing"]), ConfigError, "match no parameter"),
    (dict(target_modules=[], target_parameters=["gate_up_proj"], lora_dropout=0.1), ConfigError,
     "experts: lora_dropout"),
    (dict(target_modules=[], target_parameters=["gate_up_proj"], use_dora=True), ConfigError, "experts: use_dora"),
    (dict(target_modules=[], target_parameters=["gate_up_proj"], init_lora_weights="pissa"), UnsupportedError,
     "experts: init_lora_weights='pissa'"),
    (dict(target_modules=["attn"], use_dora=True), UnsupportedError, "attn.*DoRA"),
    (dict(target_modules=["attn"], init_lora_weights="olora"), UnsupportedError, "attn.*init_lora_weights='olora'"),
    (dict(target_modules=["attn"], lora_bias=True), UnsupportedError, "attn.*lora_bias"),
])
def test_refusals_name_the_module_and_the_field(kw, error, match):
    with pytest.raises(error, match=match):
        pm.create_adapter(_state(), _cfg(**kw))


def test_separate_qkv_attention_and_top_level_parameters_are_refused():
    st = {"attn.q_proj_weight": np.zeros((4, 4), np.float32), "attn.k_proj_weight": np.zeros((4, 3), np.float32),
          "attn.v_proj_weight": np.zeros((4, 3), np.float32), "attn.out_proj.weight": np.zeros((4, 4), np.float32)}
    with pytest.raises(ConfigError, match="attn.*separate q/k/v"):
        pm.create_adapter(st, _cfg(target_modules=["attn"]))
    with pytest.raises(ConfigError, match="top-level"):
        pm.create_adapter({"w": np.zeros((3, 4), np.float32)}, _cfg(target_modules=[], target_parameters=["w"]))
