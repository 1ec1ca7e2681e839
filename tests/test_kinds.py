"""peftmath.kinds and the Adapter's use of it: is a 2-D base weight an nn.Linear (stored (out, in)) or a
transformers Conv1D (stored (in, out))? Decided from evidence (explicit kinds, recorded kinds, model_type,
shapes), the config's fan_in_fan_out only when nothing contradicts it; otherwise a ConfigError naming the
module. NumPy only; the PEFT-built mixed model is in tests/parity/test_refusals_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftmath import Adapter, LayerKind
from peftmath.errors import ConfigError, ShapeError, UnsupportedError
from peftmath.kinds import CONV1D_MODEL_TYPES, Evidence, decide, kind_from_model_type, resolve
from peftmath.methods.lora import LoraConfig

LIN, C1D = LayerKind.LINEAR, LayerKind.CONV1D_TRANSPOSED
S = 6 / 2  # lora_alpha / r


def _mixed(flag: bool, seed: int = 0, order=("lin", "conv", "sq_lin", "sq_conv"), dtype=np.float64):
    """A base state and a LoRA over a model mixing both kinds, square and not (the truth by module)."""
    rng = np.random.default_rng(seed)
    truth = {"lin": (LIN, 10, 20), "conv": (C1D, 12, 8), "sq_lin": (LIN, 16, 16), "sq_conv": (C1D, 16, 16)}
    state, params = {}, {}
    for name in order:
        kind, out, inn = truth[name]
        state[f"{name}.weight"] = rng.standard_normal((out, inn) if kind is LIN else (inn, out)).astype(dtype)
        params[name] = {"lora_A.weight": rng.standard_normal((2, inn)).astype(dtype),
                        "lora_B.weight": rng.standard_normal((out, 2)).astype(dtype)}
    return state, params, {m: truth[m][0] for m in order}


def _expected(state, params, kinds):
    """The merged weights in float64 from the true kinds (ΔW transposed for a Conv1D)."""
    out = {}
    for name, kind in kinds.items():
        d = S * params[name]["lora_B.weight"].astype(np.float64) @ params[name]["lora_A.weight"].astype(np.float64)
        out[f"{name}.weight"] = state[f"{name}.weight"].astype(np.float64) + (d if kind is LIN else d.T)
    return out


# --------------------------------------------------------------------------------------------------
# the rule, as pure functions
# --------------------------------------------------------------------------------------------------
def test_decide_takes_the_first_evidence_in_order():
    assert decide("m", explicit="Conv1D", recorded="Linear", model_type="gpt2", shape_kind=LIN).kind is C1D
    assert decide("m", recorded="Linear", model_type="gpt2", shape_kind=C1D).kind is LIN
    assert decide("h.0.attn.c_proj", model_type="gpt2", shape_kind=LIN).kind is C1D
    ev = decide("m", model_type="llama", shape_kind=C1D, weight_shape=(4, 8))
    assert ev.kind is C1D and "(4, 8)" in ev.source and "(in, out)" in ev.source
    assert decide("m", model_type="llama") is None and decide("m") is None


def test_model_type_table():
    for model_type, leaves in CONV1D_MODEL_TYPES.items():
        for leaf in leaves:
            assert kind_from_model_type(f"transformer.h.3.mlp.{leaf}", model_type) is C1D
        assert kind_from_model_type("lm_head", model_type) is LIN  # the other 2-D weights are Linear
        assert kind_from_model_type(f"x.{leaves[0]}_extra", model_type) is LIN  # whole names only
    assert kind_from_model_type("transformer.h.0.attn.c_proj", None) is None
    assert kind_from_model_type("model.layers.0.mlp.c_proj", "starcoder2") is None  # a Linear named c_proj


def test_resolve_trusts_the_flag_only_without_contradiction():
    conv = {"c": Evidence(C1D, "its shape"), "e": Evidence(LayerKind.EMBEDDING, "its factors")}
    assert resolve("sq", fan_in_fan_out=True, others=conv) is C1D
    assert resolve("sq", fan_in_fan_out=False, others={"e": Evidence(LayerKind.CONV2D, "")}) is LIN
    assert resolve("sq", fan_in_fan_out=False, others={}) is LIN
    with pytest.raises(ConfigError) as info:
        resolve("sq", fan_in_fan_out=False, others=conv, weight_shapes={"sq": (16, 16)})
    msg = str(info.value)
    for part in ("sq:", "(16, 16) is square", "fan_in_fan_out=false", "c is a Conv1D by its shape",
                 "layer_kinds={'sq': 'Linear'}", "--layer-kind sq=Linear"):
        assert part in msg, part
    many = {f"m{i}": Evidence(LIN, "its shape") for i in range(5)}
    with pytest.raises(ConfigError, match=r"m0 is a Linear.*m2 is a Linear by its shape \(and 2 more\)"):
        resolve("sq", fan_in_fan_out=True, others=many)
    with pytest.raises(ConfigError, match=r"^a, b: cannot tell whether these modules.*no base weight shape.*"
                                          r"layer_kinds=\{'a': 'Linear', 'b': 'Linear'\}"):
        resolve(["b", "a"], fan_in_fan_out=True, others={**many, "a": None})


# --------------------------------------------------------------------------------------------------
# the Adapter: merge, unmerge, forward, delta, summary
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", [True, False])
def test_mixed_model_square_modules_are_refused_with_the_fix(flag):
    state, params, truth = _mixed(flag)
    ad = Adapter(LoraConfig(r=2, lora_alpha=6, fan_in_fan_out=flag), params)
    before = {k: v.copy() for k, v in state.items()}
    # whatever the flag says, one of the non-square modules contradicts it
    with pytest.raises(ConfigError, match=r"^sq_conv, sq_lin: cannot tell.*layer_kinds=\{'sq_conv': 'Linear', "
                                          r"'sq_lin': 'Linear'\}") as info:
        ad.merge(state)
    assert ("conv is a Conv1D" in str(info.value)) == (not flag)
    assert ("lin is a Linear" in str(info.value)) == flag
    with pytest.raises(ConfigError, match="sq_"):
        ad.unmerge(state)
    with pytest.raises(ConfigError, match="sq_"):
        ad.forward("sq_lin", np.ones((3, 16)), state)
    with pytest.raises(ConfigError, match="sq_"):
        ad.summary(state)
    assert all(np.array_equal(state[k], before[k]) for k in state)
    # the non-square modules are decided by their shapes
    for name in ("lin", "conv"):
        got = ad.delta_weight(name, weight_shape=state[f"{name}.weight"].shape)
        np.testing.assert_allclose(got, _expected(state, params, {name: truth[name]})[f"{name}.weight"]
                                   - state[f"{name}.weight"], rtol=1e-13, atol=1e-13)
    # the fix the message names
    kinds = {"sq_lin": "Linear", "sq_conv": "Conv1D"}
    merged = ad.merge(state, layer_kinds=kinds)
    for key, want in _expected(state, params, truth).items():
        np.testing.assert_allclose(merged[key], want, rtol=1e-13, atol=1e-13)
    back = ad.unmerge(merged, layer_kinds=kinds)
    for key in state:
        np.testing.assert_allclose(back[key], state[key], rtol=0, atol=1e-12)
    # recorded kinds (an adapter created by peftmath, or loaded with its metadata) are evidence too
    recorded = Adapter(ad.config, params, layer_kinds=kinds)
    for key, want in _expected(state, params, truth).items():
        np.testing.assert_allclose(recorded.merge(state)[key], want, rtol=1e-13, atol=1e-13)
    assert recorded.resolve_layer_kinds({m: state[f"{m}.weight"].shape for m in params}) == truth


def test_flag_decides_square_modules_when_nothing_contradicts_it():
    state, params, truth = _mixed(True)
    only_conv = {m: p for m, p in params.items() if truth[m] is C1D}
    ad = Adapter(LoraConfig(r=2, lora_alpha=6, fan_in_fan_out=True), only_conv)
    merged = ad.merge({k: v for k, v in state.items() if k.split(".")[0] in only_conv})
    for key, want in _expected(state, params, {m: C1D for m in only_conv}).items():
        np.testing.assert_allclose(merged[key], want, rtol=1e-13, atol=1e-13)
    only_lin = {m: p for m, p in params.items() if truth[m] is LIN}
    ad = Adapter(LoraConfig(r=2, lora_alpha=6), only_lin)
    merged = ad.merge(state)
    for key, want in _expected(state, params, {m: LIN for m in only_lin}).items():
        np.testing.assert_allclose(merged[key], want, rtol=1e-13, atol=1e-13)


def test_forward_uses_the_state_it_is_given_as_evidence():
    """A forward of one square module: with the whole state the contradiction is seen; with a state
    holding that module alone the flag is all the evidence there is."""
    state, params, truth = _mixed(False)
    ad = Adapter(LoraConfig(r=2, lora_alpha=6, fan_in_fan_out=False), params)
    x = np.random.default_rng(3).standard_normal((2, 5, 16))
    with pytest.raises(ConfigError, match="sq_lin"):
        ad.forward("sq_lin", x, state)
    W = state["sq_lin.weight"]
    p = params["sq_lin"]
    want = x @ W.T + S * (x @ p["lora_A.weight"].T) @ p["lora_B.weight"].T
    np.testing.assert_allclose(ad.forward("sq_lin", x, {"sq_lin.weight": W}), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ad.forward("sq_lin", x, state, kind="Linear"), want, rtol=1e-12, atol=1e-12)
    Wc = state["sq_conv.weight"]
    pc = params["sq_conv"]
    want_c = x @ Wc + S * (x @ pc["lora_A.weight"].T) @ pc["lora_B.weight"].T
    np.testing.assert_allclose(ad.forward("sq_conv", x, state, kind="Conv1D"), want_c, rtol=1e-12, atol=1e-12)


def test_model_type_decides_gpt2_modules():
    """GPT-2's c_attn / c_proj / c_fc are Conv1D, its lm_head a Linear, whatever the flag says."""
    rng = np.random.default_rng(5)
    state = {"transformer.h.0.attn.c_attn.weight": rng.standard_normal((16, 48)),
             "transformer.h.0.attn.c_proj.weight": rng.standard_normal((16, 16)),
             "transformer.h.0.mlp.c_fc.weight": rng.standard_normal((16, 64)),
             "lm_head.weight": rng.standard_normal((16, 16))}
    truth = {"transformer.h.0.attn.c_attn": (C1D, 48, 16), "transformer.h.0.attn.c_proj": (C1D, 16, 16),
             "transformer.h.0.mlp.c_fc": (C1D, 64, 16), "lm_head": (LIN, 16, 16)}
    params = {m: {"lora_A.weight": rng.standard_normal((2, inn)), "lora_B.weight": rng.standard_normal((out, 2))}
              for m, (_, out, inn) in truth.items()}
    for flag in (True, False):
        ad = Adapter(LoraConfig(r=2, lora_alpha=6, fan_in_fan_out=flag), params)
        if not flag:  # without the model type: c_attn (a Conv1D by its shape) contradicts the flag
            with pytest.raises(ConfigError, match="cannot tell"):
                ad.merge(state)
        for merged in (ad.merge(state, model_type="gpt2"), ad.merge(state, model_config={"model_type": "gpt2"}),
                       Adapter(ad.config, params, model_type="gpt2").merge(state)):
            for key, want in _expected(state, params, {m: k for m, (k, _, _) in truth.items()}).items():
                np.testing.assert_allclose(merged[key], want, rtol=1e-13, atol=1e-13)
        assert ad.module("lm_head", weight_shape=(16, 16), model_type="gpt2").layer.kind is LIN
        assert ad.module("transformer.h.0.attn.c_proj", model_type="gpt2").layer.kind is C1D


def test_evidence_that_contradicts_the_shape_is_an_error():
    rng = np.random.default_rng(6)
    params = {"h.0.attn.c_attn": {"lora_A.weight": rng.standard_normal((2, 16)),
                                  "lora_B.weight": rng.standard_normal((48, 2))}}
    state = {"h.0.attn.c_attn.weight": rng.standard_normal((48, 16))}  # a Linear's (out, in)
    ad = Adapter(LoraConfig(r=2, lora_alpha=6), params)
    with pytest.raises(ShapeError, match=r"h.0.attn.c_attn: the model_type 'gpt2' makes it a Conv1D, but its base "
                                         r"weight \(48, 16\) fits the adapter only as a Linear"):
        ad.merge(state, model_type="gpt2")
    recorded = Adapter(ad.config, params, layer_kinds={"h.0.attn.c_attn": "Conv1D"})
    with pytest.raises(ShapeError, match="recorded in the adapter"):
        recorded.merge(state)
    assert np.allclose(ad.merge(state)["h.0.attn.c_attn.weight"],
                       state["h.0.attn.c_attn.weight"] + S * params["h.0.attn.c_attn"]["lora_B.weight"]
                       @ params["h.0.attn.c_attn"]["lora_A.weight"])


def test_without_weight_shapes_recorded_kinds_are_the_context():
    """module() / delta_weight() without a base: the flag decides, unless the adapter's recorded kinds
    contradict it."""
    _, params, truth = _mixed(True)
    cfg = LoraConfig(r=2, lora_alpha=6, fan_in_fan_out=True)
    assert Adapter(cfg, params).module("sq_lin").layer.kind is C1D
    ad = Adapter(cfg, params, layer_kinds={"lin": "Linear"})
    with pytest.raises(ConfigError, match="sq_lin.*no base weight shape was given.*lin is a Linear by the kind recorded"):
        ad.delta_weight("sq_lin")
    assert ad.module("sq_lin", kind="Linear").layer.kind is LIN
    assert ad.resolve_layer_kinds({"lin": (10, 20), "conv": (8, 12)},
                                  layer_kinds={"sq_lin": "Linear", "sq_conv": "Conv1D"}) == truth


@pytest.mark.parametrize("layout", ["C", "F", "read-only", "float32"])
def test_resolution_does_not_depend_on_the_arrays_layout(layout):
    state, params, truth = _mixed(True)
    if layout == "F":
        state = {k: np.asfortranarray(v) for k, v in state.items()}
    elif layout == "read-only":
        for v in state.values():
            v.flags.writeable = False
    elif layout == "float32":
        state = {k: v.astype(np.float32) for k, v in state.items()}
        params = {m: {s: a.astype(np.float32) for s, a in p.items()} for m, p in params.items()}
    ad = Adapter(LoraConfig(r=2, lora_alpha=6, fan_in_fan_out=True), params)
    merged = ad.merge(state, layer_kinds={"sq_lin": "Linear", "sq_conv": "Conv1D"})
    tol = 1e-5 if layout == "float32" else 1e-12
    for key, want in _expected(state, params, truth).items():
        np.testing.assert_allclose(merged[key], want, rtol=tol, atol=tol)


def test_ia3_vera_adalora_follow_the_same_rule():
    from peftmath.methods.adalora import AdaLoraConfig
    from peftmath.methods.ia3 import IA3Config
    from peftmath.methods.vera import VeraConfig

    rng = np.random.default_rng(7)
    state = {"lin.weight": rng.standard_normal((10, 20)), "sq.weight": rng.standard_normal((16, 16))}
    ia3 = Adapter(IA3Config(target_modules=["lin", "sq"], fan_in_fan_out=True),
                  {"lin": {"ia3_l": rng.standard_normal((10, 1))}, "sq": {"ia3_l": rng.standard_normal((16, 1))}})
    with pytest.raises(ConfigError, match="sq: cannot tell.*IA3 adapter.*lin is a Linear"):
        ia3.merge(state)
    got = ia3.merge(state, layer_kinds={"sq": "Conv1D"})["sq.weight"]
    np.testing.assert_allclose(got, state["sq.weight"] * ia3.params["sq"]["ia3_l"].reshape(1, 16), rtol=1e-13)
    r = 4
    shared = {"base_model.vera_A": rng.standard_normal((r, 20)), "base_model.vera_B": rng.standard_normal((16, r))}
    vera = Adapter(VeraConfig(r=r, target_modules=["lin", "sq"], fan_in_fan_out=True),
                   {"lin": {"vera_lambda_b": rng.standard_normal(10), "vera_lambda_d": rng.standard_normal(r)},
                    "sq": {"vera_lambda_b": rng.standard_normal(16), "vera_lambda_d": rng.standard_normal(r)}},
                   shared=shared)
    with pytest.raises(ConfigError, match="sq: cannot tell.*VERA"):
        vera.merge(state)
    assert vera.module("sq", weight_shape=(16, 16), kind="Linear").layer.kind is LIN
    ada = Adapter(AdaLoraConfig(r=2, init_r=2, target_r=2, total_step=10, target_modules=["lin", "sq"],
                                fan_in_fan_out=True),
                  {"lin": {"lora_A": rng.standard_normal((2, 20)), "lora_E": rng.standard_normal((2, 1)),
                           "lora_B": rng.standard_normal((10, 2))},
                   "sq": {"lora_A": rng.standard_normal((2, 16)), "lora_E": rng.standard_normal((2, 1)),
                          "lora_B": rng.standard_normal((16, 2))}})
    with pytest.raises(ConfigError, match="sq: cannot tell.*ADALORA"):
        ada.merge(state)


def test_methods_without_conv1d_have_one_2d_kind():
    """LoHa has no fan_in_fan_out and no Conv1D: a square weight is a Linear; a model type that makes
    the module a Conv1D is refused by the method."""
    from peftmath.methods.loha import LoHaConfig

    rng = np.random.default_rng(8)
    params = {"h.0.attn.c_proj": {k: rng.standard_normal(s) for k, s in
                                  (("hada_w1_a", (16, 2)), ("hada_w1_b", (2, 16)), ("hada_w2_a", (16, 2)),
                                   ("hada_w2_b", (2, 16)))}}
    ad = Adapter(LoHaConfig(r=2, alpha=2, target_modules=["c_proj"]), params)
    state = {"h.0.attn.c_proj.weight": rng.standard_normal((16, 16))}
    assert ad.module("h.0.attn.c_proj", weight_shape=(16, 16)).layer.kind is LIN
    with pytest.raises(UnsupportedError, match="Conv1D"):
        ad.merge(state, model_type="gpt2")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=5), st.integers(0, 4), st.integers(0, 2**16))
def test_never_silently_wrong_where_the_evidence_decides(modules, last, seed):
    """A model of modules (is_conv1d, is_square) adapted by PEFT, whose saved flag is the kind of the
    last module it wrapped. peftmath either raises a ConfigError or merges every module as its true kind,
    except where the evidence cannot see it: a square module whose kind differs from the flag while every
    module the shapes decide agrees with the flag (then recorded kinds or the model type are needed)."""
    rng = np.random.default_rng(seed)
    state, params, truth = {}, {}, {}
    for i, (is_conv, square) in enumerate(modules):
        out, inn = (8, 8) if square else (6 + i, 9 + 2 * i)
        kind = C1D if is_conv else LIN
        name = f"m{i}"
        state[f"{name}.weight"] = rng.standard_normal((out, inn) if kind is LIN else (inn, out))
        params[name] = {"lora_A.weight": rng.standard_normal((2, inn)), "lora_B.weight": rng.standard_normal((out, 2))}
        truth[name] = kind
    flag_kind = truth[f"m{last % len(modules)}"]
    ad = Adapter(LoraConfig(r=2, lora_alpha=6, fan_in_fan_out=flag_kind is C1D), params)
    decided_against = any(not sq and truth[f"m{i}"] is not flag_kind for i, (_, sq) in enumerate(modules))
    square_against = any(sq and truth[f"m{i}"] is not flag_kind for i, (_, sq) in enumerate(modules))
    has_square = any(sq for _, sq in modules)
    try:
        merged = ad.merge(state)
    except ConfigError:
        assert has_square and decided_against
        return
    assert not (has_square and decided_against)
    wrong = [k for k, want in _expected(state, params, truth).items() if not np.allclose(merged[k], want, 1e-12, 1e-12)]
    assert bool(wrong) == square_against, wrong
    # the kinds recorded by peftmath (create_adapter, save_adapter) always settle it
    recorded = Adapter(ad.config, params, layer_kinds=truth)
    for key, want in _expected(state, params, truth).items():
        np.testing.assert_allclose(recorded.merge(state)[key], want, rtol=1e-12, atol=1e-12)
