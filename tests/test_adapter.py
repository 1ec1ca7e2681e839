"""peftmath.Adapter over state dicts: merge/unmerge/forward/delta_weight, layer inference, errors."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import assert_same_namespace, to_np, to_xp
from peftmath import Adapter, LayerKind
from peftmath.errors import NotInvertibleError, ShapeError
from peftmath.methods.lora import LoraConfig

S = 6 / 2  # lora_alpha / r


def _model(dtype=np.float64, dora=False, seed=0):
    """A base state dict and a LoRA adapter on four kinds of modules (non-square weights)."""
    rng = np.random.default_rng(seed)
    g = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    state = {
        "model.q_proj.weight": g(6, 8), "model.q_proj.bias": g(6),        # Linear (out, in)
        "h.0.c_attn.weight": g(8, 24), "h.0.c_attn.bias": g(24),          # transformers Conv1D (in, out)
        "model.embed_tokens.weight": g(30, 8),                             # Embedding (V, D)
        "unet.conv.weight": g(5, 3, 3, 3), "unet.conv.bias": g(5),         # Conv2d
        "lm_head.weight": g(30, 8), "norm.weight": g(8),
    }
    params = {
        "model.q_proj": {"lora_A.weight": g(2, 8), "lora_B.weight": g(6, 2)},
        "h.0.c_attn": {"lora_A.weight": g(2, 8), "lora_B.weight": g(24, 2)},
        "model.embed_tokens": {"lora_embedding_A": g(2, 30), "lora_embedding_B": g(8, 2)},
        "unet.conv": {"lora_A.weight": g(2, 3, 3, 3), "lora_B.weight": g(5, 2, 1, 1)},
    }
    if dora:
        for name in ("model.q_proj", "h.0.c_attn"):
            params[name]["lora_magnitude_vector"] = rng.uniform(0.5, 3.0, params[name]["lora_B.weight"].shape[0]).astype(dtype)
        params["unet.conv"]["lora_magnitude_vector"] = rng.uniform(0.5, 3.0, (1, 5, 1, 1)).astype(dtype)
    cfg = LoraConfig(r=2, lora_alpha=6, use_dora=dora)
    return state, Adapter(cfg, params)


def hand_delta(ad, name):
    p = ad.params[name]
    if name == "model.embed_tokens":
        return (S * p["lora_embedding_B"] @ p["lora_embedding_A"]).T
    A, B = p["lora_A.weight"], p["lora_B.weight"]
    M = S * B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)
    if name == "h.0.c_attn":
        return M.T
    return M.reshape({"model.q_proj": (6, 8), "unet.conv": (5, 3, 3, 3)}[name])


def test_merge_returns_new_dict_and_keeps_untouched_objects(xp):
    state_np, ad = _model()
    state = {k: to_xp(xp, v) for k, v in state_np.items()}
    adx = Adapter(ad.config, {m: {s: to_xp(xp, a) for s, a in p.items()} for m, p in ad.params.items()})
    merged = adx.merge(state)
    assert merged is not state and set(merged) == set(state)
    for key in ("lm_head.weight", "norm.weight", "model.q_proj.bias", "h.0.c_attn.bias", "unet.conv.bias"):
        assert merged[key] is state[key], key
    for name in ad.modules:
        key = f"{name}.weight"
        assert merged[key] is not state[key]
        assert_same_namespace(xp, merged[key])
        np.testing.assert_allclose(to_np(merged[key]), state_np[key] + hand_delta(ad, name), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(to_np(adx.delta_weight(name, weight_shape=state_np[key].shape)), hand_delta(ad, name),
                                   rtol=1e-12, atol=1e-12)
    back = adx.unmerge(merged)
    for name in ad.modules:
        np.testing.assert_allclose(to_np(back[f"{name}.weight"]), state_np[f"{name}.weight"], rtol=0, atol=1e-12)


def test_copy_true_leaves_input_untouched_bytes():
    state, ad = _model(np.float32)
    before = {k: v.tobytes() for k, v in state.items()}
    records = {}
    ad.merge(state, records=records)
    ad.merge(state, safe=True, peft_compat=True)
    assert records == {}  # LoRA needs no record
    assert {k: v.tobytes() for k, v in state.items()} == before


def test_copy_false_updates_in_place():
    state, ad = _model(np.float32)
    originals = dict(state)
    expected = {f"{m}.weight": state[f"{m}.weight"].astype(np.float64) + hand_delta(ad, m) for m in ad.modules}
    merged = ad.merge(state, copy=False)
    for key, want in expected.items():
        assert merged[key] is originals[key]
        np.testing.assert_allclose(merged[key], want, rtol=1e-5, atol=1e-5)


def test_dora_records_round_trip():
    state, ad = _model(dora=True)
    records = {}
    merged = ad.merge(state, records=records)
    assert set(records) == {"model.q_proj", "h.0.c_attn", "unet.conv"}
    # q_proj by hand: rows scaled by m / ||W + ΔW||
    V = state["model.q_proj.weight"] + hand_delta(ad, "model.q_proj")
    n = np.linalg.norm(V, axis=1)
    np.testing.assert_allclose(records["model.q_proj"], n, rtol=1e-13)
    m = ad.params["model.q_proj"]["lora_magnitude_vector"]
    np.testing.assert_allclose(merged["model.q_proj.weight"], (m / n)[:, None] * V, rtol=1e-12)
    # c_attn (stored (in, out)): columns scaled
    V = state["h.0.c_attn.weight"] + hand_delta(ad, "h.0.c_attn")
    n = np.linalg.norm(V, axis=0)
    m = ad.params["h.0.c_attn"]["lora_magnitude_vector"]
    np.testing.assert_allclose(merged["h.0.c_attn.weight"], V * (m / n)[None, :], rtol=1e-12)
    assert merged["model.q_proj.bias"] is state["model.q_proj.bias"]  # DoRA leaves the bias alone
    back = ad.unmerge(merged, records=records)
    for name in ad.modules:
        np.testing.assert_allclose(back[f"{name}.weight"], state[f"{name}.weight"], rtol=0, atol=1e-12)
    with pytest.raises(NotInvertibleError, match="weight norm"):
        ad.unmerge(merged)


def test_forward_one_module():
    state, ad = _model()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8))
    W, b = state["model.q_proj.weight"], state["model.q_proj.bias"]
    want = x @ (W + hand_delta(ad, "model.q_proj")).T + b
    np.testing.assert_allclose(ad.forward("model.q_proj", x, state), want, rtol=1e-12, atol=1e-12)
    W, b = state["h.0.c_attn.weight"], state["h.0.c_attn.bias"]
    want = x @ (W + hand_delta(ad, "h.0.c_attn")) + b
    np.testing.assert_allclose(ad.forward("h.0.c_attn", x, state), want, rtol=1e-12, atol=1e-12)
    ids = np.array([[0, 29, 4]])
    want = (state["model.embed_tokens.weight"] + hand_delta(ad, "model.embed_tokens"))[ids]
    np.testing.assert_allclose(ad.forward("model.embed_tokens", ids, state), want, rtol=1e-12, atol=1e-12)
    xc = rng.standard_normal((1, 3, 6, 6))
    y = ad.forward("unet.conv", xc, state, padding=1, stride=2)
    merged = ad.merge(state)
    ym = ad.module("unet.conv", weight_shape=(5, 3, 3, 3)).layer.base_forward(
        xc, merged["unet.conv.weight"], state["unet.conv.bias"], np, padding=1, stride=2)
    np.testing.assert_allclose(y, ym, rtol=1e-12, atol=1e-12)


def test_layer_inference_linear_vs_conv1d_and_square():
    rng = np.random.default_rng(4)
    A, B = rng.standard_normal((2, 8)), rng.standard_normal((8, 2))
    params = {"sq": {"lora_A.weight": A, "lora_B.weight": B}}
    d = S * B @ A
    state = {"sq.weight": np.zeros((8, 8))}
    plain = Adapter(LoraConfig(r=2, lora_alpha=6), params)
    fifo = Adapter(LoraConfig(r=2, lora_alpha=6, fan_in_fan_out=True), params)
    assert plain.module("sq", weight_shape=(8, 8)).layer.kind is LayerKind.LINEAR
    assert fifo.module("sq", weight_shape=(8, 8)).layer.kind is LayerKind.CONV1D_TRANSPOSED
    np.testing.assert_allclose(plain.merge(state)["sq.weight"], d, rtol=1e-13)
    np.testing.assert_allclose(fifo.merge(state)["sq.weight"], d.T, rtol=1e-13)
    # an explicit kind overrides the config's flag
    np.testing.assert_allclose(plain.merge(state, layer_kinds={"sq": "Conv1D"})["sq.weight"], d.T, rtol=1e-13)
    np.testing.assert_allclose(fifo.merge(state, layer_kinds={"sq": "Linear"})["sq.weight"], d, rtol=1e-13)
    # non-square: the shape decides, whatever the flag says
    _, ad = _model()
    assert ad.module("model.q_proj", weight_shape=(6, 8)).layer.kind is LayerKind.LINEAR
    assert ad.module("h.0.c_attn", weight_shape=(8, 24)).layer.kind is LayerKind.CONV1D_TRANSPOSED
    assert ad.module("model.embed_tokens", weight_shape=(30, 8)).layer.kind is LayerKind.EMBEDDING
    assert ad.module("unet.conv", weight_shape=(5, 3, 3, 3)).layer.kind is LayerKind.CONV2D
    # without a base shape the config decides
    assert fifo.module("sq").layer.kind is LayerKind.CONV1D_TRANSPOSED


def test_missing_module_lists_close_keys():
    state, ad = _model()
    state["model.q_prj.weight"] = state.pop("model.q_proj.weight")
    with pytest.raises(ShapeError, match="model.q_prj.weight") as info:
        ad.merge(state)
    assert "model.q_proj.weight" in str(info.value)
    with pytest.raises(ShapeError, match="not adapted"):
        ad.module("model.k_proj")


def test_shape_mismatch_refused_before_anything_changes():
    state, ad = _model(np.float32)
    state["unet.conv.weight"] = np.zeros((5, 4, 3, 3), np.float32)  # wrong in-channels
    before = {k: v.tobytes() for k, v in state.items()}
    with pytest.raises(ShapeError, match=r"unet.conv.*\(5, 4, 3, 3\)|unet.conv.*lora_A"):
        ad.merge(state, copy=False)
    assert {k: v.tobytes() for k, v in state.items()} == before  # validated before any write
    state, ad = _model()
    state["model.q_proj.weight"] = np.zeros((6, 9))
    with pytest.raises(ShapeError, match=r"model.q_proj: base weight \(6, 9\)"):
        ad.merge(state)


def test_other_tensors_replace_base_tensors_and_bookkeeping():
    state, ad = _model()
    new_head = np.ones((30, 8))
    ad2 = Adapter(ad.config, ad.params, other={"lm_head.weight": new_head})
    merged = ad2.merge(state)
    assert merged["lm_head.weight"] is new_head
    assert ad2.num_trainable_parameters() == 2 * 8 + 6 * 2 + 2 * 8 + 24 * 2 + 2 * 30 + 8 * 2 + 2 * 27 + 5 * 2
    assert ad2.dtypes() == ["float64"]
    sd = ad2.state_dict()
    assert "base_model.model.model.q_proj.lora_A.weight" in sd and "base_model.model.lm_head.weight" in sd
    assert "LORA" in repr(ad2)


def test_copy_false_refuses_read_only_before_writing_anything():
    from peftmath.errors import UnsupportedError

    state, ad = _model(np.float32)
    state["unet.conv.weight"].flags.writeable = False  # e.g. a memory-mapped checkpoint tensor
    before = {k: v.tobytes() for k, v in state.items()}
    with pytest.raises(UnsupportedError, match="unet.conv"):
        ad.merge(state, copy=False)
    assert {k: v.tobytes() for k, v in state.items()} == before  # model.q_proj was not merged either
    with pytest.raises(UnsupportedError, match="unet.conv"):
        ad.unmerge(state, copy=False)
    assert {k: v.tobytes() for k, v in state.items()} == before


def test_inplace_merge_refuses_a_read_only_bias_before_writing_any_weight():
    """copy=False checks every array any module's merge writes (a moved bias too) before the first write: a
    read-only bias of the last module must not leave the first module's weight merged."""
    from peftmath import Adapter
    from peftmath.errors import UnsupportedError
    from peftmath.io.peft import config_from_dict

    rng = np.random.default_rng(0)
    cfg = config_from_dict({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["a", "b"],
                            "lora_bias": True, "init_lora_weights": False})
    params = {m: {"lora_A.weight": rng.standard_normal((2, 6)).astype(np.float32),
                  "lora_B.weight": rng.standard_normal((5, 2)).astype(np.float32),
                  "lora_B.bias": rng.standard_normal(5).astype(np.float32)} for m in ("a", "b")}
    ad = Adapter(cfg, params)
    state = {f"{m}.{t}": rng.standard_normal((5, 6) if t == "weight" else 5).astype(np.float32)
             for m in ("a", "b") for t in ("weight", "bias")}
    before = {k: v.copy() for k, v in state.items()}
    state["b.bias"].flags.writeable = False
    with pytest.raises(UnsupportedError, match="b"):
        ad.merge(state, copy=False)
    for k, v in state.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
