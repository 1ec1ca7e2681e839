"""Format conversion (peftmath.formats, pm.convert): PEFT <-> kohya/LyCORIS, MLX, candle-lora.

Round trips PEFT -> X -> PEFT keep every tensor bit for bit and every delta identical (one rounding of
the scale where one is folded); layouts are checked against each format's grammar; bad inputs raise an
error of peftmath's hierarchy naming the key, and nothing is written.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftmath import formats as C
from peftmath.adapter import Adapter
from peftmath.create import create_adapter
from peftmath.errors import CheckpointError, ConfigError, PeftMathError, ShapeError, UnsupportedError
from peftmath.io import load_adapter, save_adapter
from peftmath.io.safetensors import SafeTensorsFile, save_file
from peftmath.methods.loha import LoHaConfig
from peftmath.methods.lokr import LoKrConfig
from peftmath.methods.lora import LoraConfig


# --------------------------------------------------------------------------------------------------
# local helpers (deliberately not shared with conftest)
# --------------------------------------------------------------------------------------------------
def _rand(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def _base(rng, *, out=6, inn=4, k=3, vocab=10, dim=5, layers=2, dtype=np.float32):
    """A tiny base state dict: per block a Linear (q_proj), a Conv2d (conv) and an Embedding (emb)."""
    state = {}
    for i in range(layers):
        state[f"model.layers.{i}.self_attn.q_proj.weight"] = _rand(rng, (out, inn), dtype)
        state[f"model.layers.{i}.conv.weight"] = _rand(rng, (out, inn, k, k), dtype)
    state["model.embed_tokens.weight"] = _rand(rng, (vocab, dim), dtype)
    return state


KINDS = {"model.embed_tokens": "Embedding"}


def _adapter(config, state, seed=0):
    return create_adapter(state, config, init=False, seed=seed, layer_kinds=KINDS)


def _quiet_convert(adapter, to, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", C.ConversionWarning)
        return C.convert(adapter, to, **kw)


def _roundtrip(adapter, fmt, convert_kw=None, read_kw=None):
    out = _quiet_convert(adapter, fmt, **(convert_kw or {}))
    return out, C.to_adapter(out.tensors, fmt, config=out.config, metadata=out.metadata, **(read_kw or {}))


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _check_deltas(ad, back, state, *, ulps=0):
    """Deltas equal: bit for bit (ulps=0) or within ``ulps`` of |delta| per element (a folded scale)."""
    assert sorted(back.params) == sorted(ad.params)
    for m in ad.modules:
        shape = tuple(state[m + ".weight"].shape)
        d1 = np.asarray(ad.delta_weight(m, weight_shape=shape, kind=KINDS.get(m)))
        d2 = np.asarray(back.delta_weight(m, weight_shape=shape, kind=KINDS.get(m)))
        assert d1.shape == d2.shape and d1.dtype == d2.dtype, m
        if ulps == 0:
            assert _same_bits(d1, d2), (m, np.max(np.abs(d1 - d2)))
        else:
            eps = np.finfo(d1.dtype).eps
            assert np.all(np.abs(d1 - d2) <= ulps * eps * np.abs(d1)), (m, np.max(np.abs(d1 - d2)))


def _targets(mods):
    return {"lin": ["q_proj"], "conv": ["conv"], "emb": ["embed_tokens"]}[mods]


# --------------------------------------------------------------------------------------------------
# round trips (hypothesis over shapes, ranks, alphas with alpha != r)
# --------------------------------------------------------------------------------------------------
shapes = st.tuples(st.integers(2, 9), st.integers(2, 9))
ranks = st.integers(1, 4)
alphas = st.sampled_from([0.5, 6, 7, 12.5, 32, 1 / 3])   # never equal to r in 1..4
seeds = st.integers(0, 2**16)


@given(shape=shapes, r=ranks, alpha=alphas, rslora=st.booleans(), seed=seeds,
       dtype=st.sampled_from([np.float32, np.float64, np.float16]))
def test_lora_kohya_roundtrip_linear_conv(shape, r, alpha, rslora, seed, dtype):
    rng = np.random.default_rng(seed)
    state = _base(rng, out=shape[0], inn=shape[1], dtype=dtype)
    ad = _adapter(LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["q_proj", "conv"]), state, seed)
    out, back = _roundtrip(ad, "kohya")
    for m in ad.modules:   # factors move unchanged: lora_down = lora_A, lora_up = lora_B
        k = C.kohya_name(m)
        assert _same_bits(out.tensors[f"{k}.lora_down.weight"], ad.params[m]["lora_A.weight"])
        assert _same_bits(out.tensors[f"{k}.lora_up.weight"], ad.params[m]["lora_B.weight"])
        assert _same_bits(back.params[m]["lora_A.weight"], ad.params[m]["lora_A.weight"])
        alpha_k = float(out.tensors[f"{k}.alpha"])
        assert out.tensors[f"{k}.alpha"].shape == ()
        if not rslora:
            assert alpha_k == alpha   # kohya scale = alpha / rank = PEFT's alpha / r, same division
            assert back.config.scaling_for(m) == ad.config.scaling_for(m)
        else:   # alpha_k = alpha * sqrt(r): kohya's alpha_k / r is PEFT's alpha / sqrt(r) within one rounding
            assert math.isclose(alpha_k / r, alpha / math.sqrt(r), rel_tol=4 * np.finfo(np.float64).eps)
    _check_deltas(ad, back, state, ulps=0 if not rslora else 2)


@given(shape=shapes, r=ranks, alpha=alphas, rslora=st.booleans(), seed=seeds, dora=st.booleans())
def test_lora_mlx_roundtrip_linear_embedding(shape, r, alpha, rslora, seed, dora):
    rng = np.random.default_rng(seed)
    state = _base(rng, out=shape[0], inn=shape[1], dim=shape[0])
    targets = ["q_proj"] + ([] if dora else ["embed_tokens"])
    ad = _adapter(LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, use_dora=dora, target_modules=targets), state, seed)
    out, back = _roundtrip(ad, "mlx")
    s = ad.config.scaling_for(ad.modules[0])
    assert out.config["lora_parameters"]["scale"] == s and out.config["lora_parameters"]["rank"] == r
    assert out.config["fine_tune_type"] == ("dora" if dora else "lora")
    for m in ad.modules:
        p = ad.params[m]
        if m == "model.embed_tokens":
            assert _same_bits(out.tensors[m + ".lora_a"], p["lora_embedding_A"].T)   # (num_embeddings, r)
            assert _same_bits(out.tensors[m + ".lora_b"], p["lora_embedding_B"].T)   # (r, dim)
        else:
            assert out.tensors[m + ".lora_a"].shape == (shape[1], r)              # (in, r)
            assert _same_bits(out.tensors[m + ".lora_a"], p["lora_A.weight"].T)
            assert _same_bits(out.tensors[m + ".lora_b"], p["lora_B.weight"].T)   # (r, out)
        for suffix, a in p.items():
            assert _same_bits(back.params[m][suffix], a), (m, suffix)
        # back: lora_alpha = scale * r, no rsLoRA; within one rounding of the scale
        assert back.config.use_rslora is False
        assert math.isclose(back.config.scaling_for(m), s, rel_tol=2 * np.finfo(np.float64).eps)
    _check_deltas(ad, back, state, ulps=2)


@given(shape=shapes, r=ranks, alpha=alphas, seed=seeds, typed=st.booleans())
def test_lora_candle_roundtrip(shape, r, alpha, seed, typed):
    rng = np.random.default_rng(seed)
    state = _base(rng, out=shape[0], inn=shape[1])
    ad = _adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "conv"]), state, seed)
    out, back = _roundtrip(ad, "candle-lora", {"typed": typed})
    _check_deltas(ad, back, state)
    # without peftmath's metadata: the module names and alpha given by the user
    back2 = C.to_adapter(out.tensors, "candle-lora", modules=ad.modules, lora_alpha=alpha)
    _check_deltas(ad, back2, state)


def _lycoris_configs():
    return [
        LoHaConfig(r=2, alpha=5, target_modules=["q_proj", "conv"]),
        LoHaConfig(r=3, alpha=1.5, target_modules=["q_proj", "conv"], use_effective_conv2d=True),
        LoKrConfig(r=2, alpha=5, target_modules=["q_proj", "conv"]),
        LoKrConfig(r=1, alpha=3, target_modules=["q_proj", "conv"], decompose_both=True, use_effective_conv2d=True),
        LoKrConfig(r=1, alpha=7, target_modules=["q_proj", "conv"], decompose_factor=2),
    ]


@pytest.mark.parametrize("config", _lycoris_configs(), ids=lambda c: f"{c.peft_type}-{c.r}")
@given(seed=seeds, shape=st.sampled_from([(6, 4), (8, 8), (12, 6), (16, 8)]))
@settings(max_examples=10)
def test_loha_lokr_kohya_roundtrip(config, seed, shape):
    rng = np.random.default_rng(seed)
    state = _base(rng, out=shape[0], inn=shape[1])
    ad = _adapter(config, state, seed)
    out, back = _roundtrip(ad, "kohya")
    assert back.peft_type == ad.peft_type
    full = {m for m, p in ad.params.items() if "lokr_w1" in p and "lokr_w2" in p}
    for m in ad.modules:
        k = C.kohya_name(m)
        for suffix, a in ad.params[m].items():
            if m in full and suffix == "lokr_w1":
                continue   # LyCORIS applies no alpha to two full factors: the scale is folded into w1
            assert _same_bits(out.tensors[f"{k}.{suffix}"], a), (m, suffix)
            assert _same_bits(back.params[m][suffix], a), (m, suffix)
        assert float(out.tensors[f"{k}.alpha"]) == (1.0 if m in full else config.alpha)
    _check_deltas(ad, back, state, ulps=0 if not full else 3)


def test_peft_roundtrip_through_files(tmp_path):
    rng = np.random.default_rng(1)
    state = _base(rng)
    ad = _adapter(LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "conv"]), state)
    save_adapter(ad, tmp_path / "peft")
    for fmt, dst in [("kohya", tmp_path / "k.safetensors"), ("mlx", tmp_path / "mlx"),
                     ("candle-lora", tmp_path / "c.safetensors")]:
        if fmt == "mlx":
            ad2 = _adapter(LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj"]), state)
            save_adapter(ad2, tmp_path / "peft_lin")
            src, ref = tmp_path / "peft_lin", ad2
        else:
            src, ref = tmp_path / "peft", ad
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", C.ConversionWarning)
            C.convert_path(src, dst, fmt)
        assert C.detect_format(dst) == fmt
        C.convert_path(dst, tmp_path / f"back_{fmt}", "peft")
        assert C.detect_format(tmp_path / f"back_{fmt}") == "peft"
        back = load_adapter(tmp_path / f"back_{fmt}")
        _check_deltas(ref, back, state, ulps=2)
    assert C.detect_format(tmp_path / "peft") == "peft"
    assert C.detect_format(tmp_path / "peft" / "adapter_model.safetensors") == "peft"
    assert isinstance(C.read_any(tmp_path / "k.safetensors"), Adapter)


# --------------------------------------------------------------------------------------------------
# each format's exact layout
# --------------------------------------------------------------------------------------------------
def _llama_adapter(rng, *, embed=False):
    state = {}
    for i in range(2):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"model.layers.{i}.self_attn.{p}.weight"] = _rand(rng, (8, 8))
        for p in ("gate_proj", "up_proj"):
            state[f"model.layers.{i}.mlp.{p}.weight"] = _rand(rng, (12, 8))
        state[f"model.layers.{i}.mlp.down_proj.weight"] = _rand(rng, (8, 12))
    state["lm_head.weight"] = _rand(rng, (20, 8))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] + (["lm_head"] if embed else [])
    return state, create_adapter(state, LoraConfig(r=2, lora_alpha=4, target_modules=targets), init=False)


def test_candle_plain_layout_is_candle_loras():
    """convert_peft_to_candle_lora: pairs sorted by PEFT base name, numbered a0/b0, a1/b1, ... under one prefix."""
    state, ad = _llama_adapter(np.random.default_rng(2))
    with pytest.warns(C.ConversionWarning, match="no module names and no alpha"):
        out = C.convert(ad, "candle-lora", prefix="lora_llama")
    bases = sorted(f"base_model.model.{m}" for m in ad.modules)
    assert sorted(out.tensors) == sorted([f"lora_llama.a{i}.weight" for i in range(len(bases))]
                                         + [f"lora_llama.b{i}.weight" for i in range(len(bases))])
    for i, b in enumerate(bases):
        m = b[len("base_model.model."):]
        assert _same_bits(out.tensors[f"lora_llama.a{i}.weight"], ad.params[m]["lora_A.weight"])   # (r, in)
        assert _same_bits(out.tensors[f"lora_llama.b{i}.weight"], ad.params[m]["lora_B.weight"])   # (out, r)


@pytest.mark.filterwarnings("ignore::peftmath.formats.ConversionWarning")
def test_candle_typed_layout_and_dummy_embedding():
    state, ad = _llama_adapter(np.random.default_rng(3))
    with pytest.warns(C.ConversionWarning, match="dummy embedding"):
        out = C.convert(ad, "candle-lora", typed=True, add_dummy_embeddings=True)
    csa = sorted(m for m in ad.modules if "self_attn" in m)
    block = sorted(m for m in ad.modules if "mlp" in m)
    for pfx, mods in (("lora_llama_csa", csa), ("lora_llama_block", block)):
        for i, m in enumerate(mods):
            assert _same_bits(out.tensors[f"{pfx}.a{i}.weight"], ad.params[m]["lora_A.weight"])
            assert _same_bits(out.tensors[f"{pfx}.b{i}.weight"], ad.params[m]["lora_B.weight"])
    a0, b0 = out.tensors["lora_llama.a0.weight"], out.tensors["lora_llama.b0.weight"]
    assert a0.shape == (4, 32000) and b0.shape == (2048, 4) and a0.dtype == np.float32
    assert not a0.any() and not b0.any()
    assert len(out.tensors) == 2 * (len(csa) + len(block)) + 2
    # an adapter with lm_head: no dummy, lm_head is lora_llama.0
    _, ad2 = _llama_adapter(np.random.default_rng(3), embed=True)
    out2 = _quiet_convert(ad2, "candle-lora", typed=True, add_dummy_embeddings=True)
    assert _same_bits(out2.tensors["lora_llama.a0.weight"], ad2.params["lm_head"]["lora_A.weight"])
    # both ways back: from metadata, and from the names alone (dummy pair recognised and dropped)
    back = C.to_adapter(out.tensors, "candle-lora", metadata=out.metadata)
    back2 = C.to_adapter(out.tensors, "candle-lora", modules=ad.modules, lora_alpha=4)
    for b in (back, back2):
        assert sorted(b.params) == ad.modules
        _check_deltas(ad, b, state)


@pytest.mark.filterwarnings("ignore::peftmath.formats.ConversionWarning")
def test_candle_drops_like_candle_lora_only_when_lossy():
    rng = np.random.default_rng(4)
    state = _base(rng)
    ad = _adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "embed_tokens"]), state)
    with pytest.raises(UnsupportedError, match="lora_embedding_A"):
        C.convert(ad, "candle-lora")
    with pytest.warns(C.ConversionWarning, match="dropped"):
        out = C.convert(ad, "candle-lora", lossy=True)
    assert len(out.tensors) == 4   # the two q_proj pairs; the embedding is dropped as candle-lora does
    dora = _adapter(LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=["q_proj"]), state)
    with pytest.raises(UnsupportedError, match="magnitude"):
        C.convert(dora, "candle-lora")


def test_candle_rslora_alpha_in_warning_and_metadata():
    state = _base(np.random.default_rng(5))
    ad = _adapter(LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj"]), state)
    with pytest.warns(C.ConversionWarning, match=r"\(4, 12\)"):   # candle alpha = scale * rank = 3 * 4
        out = C.convert(ad, "candle-lora")
    back = C.to_adapter(out.tensors, "candle-lora", metadata=out.metadata)
    assert back.config.scaling_for(ad.modules[0]) == 3.0


def test_kohya_names_and_prefix():
    state = _base(np.random.default_rng(6))
    ad = _adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"]), state)
    out = C.convert(ad, "kohya", prefix="lora_unet")
    assert sorted({k.split(".", 1)[0] for k in out.tensors}) == [
        "lora_unet_model_layers_0_self_attn_q_proj", "lora_unet_model_layers_1_self_attn_q_proj"]
    assert out.tensors["lora_unet_model_layers_0_self_attn_q_proj.alpha"].dtype == np.float32
    # without peftmath's metadata the base model's module names undo the rename
    back = C.to_adapter(out.tensors, "kohya", modules=list(state), prefix="lora_unet")
    assert sorted(back.params) == ad.modules
    with pytest.raises(CheckpointError, match="cannot be turned back"):
        C.to_adapter(out.tensors, "kohya")
    with pytest.raises(ConfigError, match="prefix"):
        C.convert(ad, "kohya", prefix="lora.unet")


def test_kohya_alpha_not_exact_in_float32_is_float64():
    state = _base(np.random.default_rng(7))
    ad = _adapter(LoraConfig(r=3, lora_alpha=1 / 3, target_modules=["q_proj"]), state)
    out = C.convert(ad, "kohya")
    a = out.tensors[C.kohya_name(ad.modules[0]) + ".alpha"]
    assert a.dtype == np.float64 and float(a) == 1 / 3


def test_kohya_missing_alpha_policy():
    state = _base(np.random.default_rng(8))
    ad = _adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]), state)
    out = C.convert(ad, "kohya")
    k = C.kohya_name(ad.modules[0]) + ".alpha"
    t = {n: v for n, v in out.tensors.items() if n != k}
    with pytest.raises(CheckpointError, match=k.replace(".", r"\.")):
        C.to_adapter(t, "kohya", metadata=out.metadata)
    back = C.to_adapter(t, "kohya", metadata=out.metadata, missing_alpha="rank")
    assert back.config.scaling_for(ad.modules[0]) == 1.0


def test_mlx_config_keys_and_layers():
    state, ad = _llama_adapter(np.random.default_rng(9), embed=True)
    out = C.convert(ad, "mlx")
    lp = out.config["lora_parameters"]
    assert out.config["num_layers"] == -1
    assert lp["keys"] == ["lm_head", "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                          "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert sorted(out.tensors)[0] == "lm_head.lora_a"
    assert "model.layers.0.self_attn.q_proj.lora_a" in out.tensors


# --------------------------------------------------------------------------------------------------
# what a target cannot hold
# --------------------------------------------------------------------------------------------------
def test_refusals_say_what_is_lost():
    state = _base(np.random.default_rng(10))
    emb = _adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["embed_tokens"]), state)
    with pytest.raises(UnsupportedError, match="Embedding"):
        C.convert(emb, "kohya")
    conv = _adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["conv"]), state)
    with pytest.raises(UnsupportedError, match="convolutions"):
        C.convert(conv, "mlx")
    mixed = _adapter(LoraConfig(r=2, lora_alpha=3, rank_pattern={"layers.1.self_attn.q_proj": 3},
                                target_modules=["q_proj"]), state)
    with pytest.raises(UnsupportedError, match="one rank"):
        C.convert(mixed, "mlx")
    scaled = _adapter(LoraConfig(r=2, lora_alpha=3, alpha_pattern={"layers.1.self_attn.q_proj": 5},
                                 target_modules=["q_proj"]), state)
    with pytest.raises(UnsupportedError, match="one scale"):
        C.convert(scaled, "mlx")
    # ... but kohya holds per-module rank and alpha, and they come back as rank_pattern / alpha_pattern
    out, back = _roundtrip(mixed, "kohya")
    _check_deltas(mixed, back, state)
    loha = _adapter(LoHaConfig(r=2, alpha=3, target_modules=["q_proj"]), state)
    for fmt in ("mlx", "candle-lora"):
        with pytest.raises(UnsupportedError, match="LOHA"):
            C.convert(loha, fmt)
    zero = _adapter(LoraConfig(r=2, lora_alpha=0, target_modules=["q_proj"]), state)
    with pytest.raises(UnsupportedError, match="alpha 0"):
        C.convert(zero, "kohya")


def test_names_the_kohya_grammar_cannot_express():
    rng = np.random.default_rng(11)
    params = {m: {"lora_A.weight": _rand(rng, (2, 4)), "lora_B.weight": _rand(rng, (3, 2))}
              for m in ("a_b.c", "a.b_c")}
    ad = Adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["c"]), params)
    with pytest.raises(UnsupportedError, match=r"'a\.b_c' and 'a_b\.c' both become 'lycoris_a_b_c'"):
        C.convert(ad, "kohya")


# --------------------------------------------------------------------------------------------------
# bad inputs: a clear error naming the key, nothing written
# --------------------------------------------------------------------------------------------------
def _file(tmp_path, tensors, name="x.safetensors", metadata=None):
    p = tmp_path / name
    save_file(tensors, p, metadata=metadata)
    return p


def test_unknown_and_mixed_formats(tmp_path):
    z = np.zeros((2, 2), np.float32)
    p = _file(tmp_path, {"foo.bar": z, "lycoris_x.lora_down.weight": z})
    with pytest.raises(CheckpointError, match="'foo.bar'"):
        C.detect_format(p)
    p = _file(tmp_path, {"lycoris_x.lora_down.weight": z, "lora_llama.a0.weight": z}, "m.safetensors")
    with pytest.raises(CheckpointError, match="several formats.*candle-lora.*lora_llama.a0.weight.*kohya"):
        C.detect_format(p)
    with pytest.raises(CheckpointError, match="several formats"):
        C.convert_path(p, tmp_path / "out", "peft")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="no such"):
        C.detect_format(tmp_path / "missing")
    with pytest.raises(ConfigError, match="unknown adapter format"):
        C.convert(None, "onnx")


def test_kohya_inconsistent_and_mixed_modules(tmp_path):
    rng = np.random.default_rng(12)
    down, up, alpha = _rand(rng, (2, 4)), _rand(rng, (3, 3)), np.array(2.0, np.float32)
    t = {"lycoris_q.lora_down.weight": down, "lycoris_q.lora_up.weight": up, "lycoris_q.alpha": alpha}
    with pytest.raises(ShapeError, match=r"lycoris_q\.lora_up\.weight \(3, 3\)"):
        C.to_adapter(t, "kohya", modules=["q"])
    t = {"lycoris_q.lora_down.weight": down, "lycoris_q.alpha": alpha}
    with pytest.raises(CheckpointError, match=r"lycoris_q\.lora_up\.weight is missing"):
        C.to_adapter(t, "kohya", modules=["q"])
    t = {"lycoris_q.lora_down.weight": down, "lycoris_q.lora_up.weight": _rand(rng, (3, 2)), "lycoris_q.alpha": alpha,
         "lycoris_q.hada_w1_a": down}
    with pytest.raises(CheckpointError, match="mixes formats"):
        C.to_adapter(t, "kohya", modules=["q"])
    t = {"lycoris_q.lora_down.weight": down, "lycoris_q.lora_up.weight": _rand(rng, (3, 2)), "lycoris_q.alpha": alpha,
         "lycoris_k.hada_w1_a": _rand(rng, (3, 2)), "lycoris_k.hada_w1_b": down, "lycoris_k.hada_w2_a": _rand(rng, (3, 2)),
         "lycoris_k.hada_w2_b": down, "lycoris_k.alpha": alpha}
    with pytest.raises(UnsupportedError, match="mixes"):
        C.to_adapter(t, "kohya", modules=["q", "k"])
    t = {"lycoris_q.lora_down.weight": _rand(rng, (2, 4, 3, 3)), "lycoris_q.lora_up.weight": _rand(rng, (3, 2, 1, 1)),
         "lycoris_q.lora_mid.weight": _rand(rng, (2, 2, 3, 3)), "lycoris_q.alpha": alpha}
    with pytest.raises(UnsupportedError, match=r"lycoris_q\.lora_mid\.weight"):
        C.to_adapter(t, "kohya", modules=["q"])
    t = {"lycoris_q.lokr_w1": _rand(rng, (2, 2)), "lycoris_q.lokr_w2_a": _rand(rng, (3, 2)),
         "lycoris_q.lokr_w2_b": _rand(rng, (1, 2)), "lycoris_q.alpha": alpha}
    with pytest.raises(ShapeError, match="lycoris_q.lokr_w2_a"):
        C.to_adapter(t, "kohya", modules=["q"])


def test_mlx_and_candle_bad_inputs():
    rng = np.random.default_rng(13)
    cfg = {"fine_tune_type": "lora", "num_layers": -1, "lora_parameters": {"rank": 2, "scale": 2.0, "dropout": 0.0}}
    with pytest.raises(ShapeError, match=r"q\.lora_a \(4, 3\)"):
        C.to_adapter({"q.lora_a": _rand(rng, (4, 3)), "q.lora_b": _rand(rng, (2, 5))}, "mlx", config=cfg)
    with pytest.raises(CheckpointError, match=r"q\.lora_b missing"):
        C.to_adapter({"q.lora_a": _rand(rng, (4, 2))}, "mlx", config=cfg)
    with pytest.raises(ConfigError, match="scale"):
        C.to_adapter({"q.lora_a": _rand(rng, (4, 2))}, "mlx", config={"lora_parameters": {"rank": 2, "alpha": 16}})
    with pytest.raises(CheckpointError, match=r"lora_llama\.b0\.weight is missing"):
        C.to_adapter({"lora_llama.a0.weight": _rand(rng, (2, 4))}, "candle-lora", modules=["q"], lora_alpha=2)
    t = {"lora_llama.a0.weight": _rand(rng, (2, 4)), "lora_llama.b0.weight": _rand(rng, (5, 3))}
    with pytest.raises(ShapeError, match="lora_llama.0"):
        C.to_adapter(t, "candle-lora", modules=["q"], lora_alpha=2)
    t = {"lora_llama.a0.weight": _rand(rng, (2, 4)), "lora_llama.b0.weight": _rand(rng, (5, 2))}
    with pytest.raises(CheckpointError, match="keep no names"):
        C.to_adapter(t, "candle-lora")
    with pytest.raises(ConfigError, match="lora_alpha"):
        C.to_adapter(t, "candle-lora", modules=["q"])
    with pytest.raises(CheckpointError, match="2 module name"):
        C.to_adapter(t, "candle-lora", modules=["q", "k"], lora_alpha=2)


def test_nothing_written_on_error(tmp_path):
    state = _base(np.random.default_rng(14))
    emb = _adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["embed_tokens"]), state)
    save_adapter(emb, tmp_path / "emb")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UnsupportedError):
        C.convert_path(tmp_path / "emb", tmp_path / "k.safetensors", "kohya")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    ad = _adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"]), state)
    save_adapter(ad, tmp_path / "lin")
    C.convert_path(tmp_path / "lin", tmp_path / "k.safetensors", "kohya")
    stamp = (tmp_path / "k.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already exist"):
        C.convert_path(tmp_path / "lin", tmp_path / "k.safetensors", "kohya", prefix="lora_te")
    assert (tmp_path / "k.safetensors").read_bytes() == stamp
    C.convert_path(tmp_path / "lin", tmp_path / "k.safetensors", "kohya", force=True, prefix="lora_te")
    assert next(iter(SafeTensorsFile(tmp_path / "k.safetensors"))).startswith("lora_te_")
    with pytest.raises(ConfigError, match=".safetensors"):
        C.convert_path(tmp_path / "lin", tmp_path / "kdir", "kohya")
    assert not (tmp_path / "kdir").exists()
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_errors_are_peftmath_errors():
    assert issubclass(CheckpointError, PeftMathError) and issubclass(UnsupportedError, PeftMathError)
    assert json.loads(C.convert(_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"]),
                                         _base(np.random.default_rng(0))), "kohya").metadata[C.META_KEY])["prefix"] == "lycoris"


def test_arrays_of_any_namespace_convert_to_the_same_bits():
    xp = pytest.importorskip("array_api_strict")
    state = _base(np.random.default_rng(15))
    ad = _adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"]), state)
    moved = Adapter(ad.config, {m: {s: xp.asarray(a) for s, a in p.items()} for m, p in ad.params.items()})
    for fmt in ("kohya", "mlx", "candle-lora"):
        a, b = _quiet_convert(ad, fmt), _quiet_convert(moved, fmt)
        assert sorted(a.tensors) == sorted(b.tensors)
        assert all(isinstance(t, np.ndarray) and _same_bits(t, a.tensors[k]) for k, t in b.tensors.items())


def test_fan_in_fan_out_factors_move_unchanged():
    """transformers Conv1D (GPT-2): PEFT's factors are already in the (out, in) orientation of the layer's
    math, whatever the stored weight layout; every format takes them as they are."""
    rng = np.random.default_rng(16)
    state = {f"transformer.h.{i}.attn.c_attn.weight": _rand(rng, (4, 12)) for i in range(2)}   # (in, out)
    ad = create_adapter(state, LoraConfig(r=2, lora_alpha=5, fan_in_fan_out=True, target_modules=["c_attn"]),
                        init=False, layer_kinds={f"transformer.h.{i}.attn.c_attn": "Conv1D" for i in range(2)})
    for fmt in ("kohya", "mlx", "candle-lora"):
        out, back = _roundtrip(ad, fmt)
        for m in ad.modules:
            assert _same_bits(back.params[m]["lora_A.weight"], ad.params[m]["lora_A.weight"])   # (r, in)
            assert back.params[m]["lora_B.weight"].shape == (12, 2)                             # (out, r)
            assert back.config.fan_in_fan_out and back.layer_kinds[m].value == "Conv1D"
        _check_deltas(ad, back, state, ulps=2)
    assert _quiet_convert(ad, "mlx").config["lora_parameters"]["keys"] == ["attn.c_attn"]


@pytest.mark.parametrize("config", [
    LoraConfig(r=2, lora_alpha=3, target_modules=["c1"]),
    LoHaConfig(r=2, alpha=3, target_modules=["c1"], use_effective_conv2d=True),
    LoKrConfig(r=1, alpha=3, target_modules=["c1"], use_effective_conv2d=True, decompose_both=True),
], ids=lambda c: c.peft_type)
def test_conv1d_cores_are_three_dimensional_in_lycoris(config):
    state = {"c1.weight": _rand(np.random.default_rng(17), (16, 16, 3))}
    ad = create_adapter(state, config, init=False)
    out, back = _roundtrip(ad, "kohya")
    for k, t in out.tensors.items():
        if k.endswith(("hada_t1", "hada_t2", "lokr_t2")):
            assert t.ndim == 3   # (r, r, k) in LyCORIS, (r, r, k, 1) in PEFT
    for s, a in ad.params["c1"].items():
        assert _same_bits(back.params["c1"][s], a), s
    _check_deltas(ad, back, state)


def test_conv1d_lokr_with_full_w2_is_refused_both_ways():
    state = {"c1.weight": _rand(np.random.default_rng(18), (6, 4, 3))}
    ad = create_adapter(state, LoKrConfig(r=2, alpha=3, target_modules=["c1"]), init=False)
    assert ad.params["c1"]["lokr_w2"].ndim == 3
    with pytest.raises(UnsupportedError, match="different kernels"):
        C.convert(ad, "kohya")
    t = {"lycoris_c1.lokr_w1": ad.params["c1"]["lokr_w1"], "lycoris_c1.lokr_w2": ad.params["c1"]["lokr_w2"],
         "lycoris_c1.alpha": np.array(1.0, np.float32)}
    with pytest.raises(UnsupportedError, match=r"lycoris_c1\.lokr_w2"):
        C.to_adapter(t, "kohya", modules=["c1"])


@given(seed=seeds, r=ranks, which=st.sampled_from(["down_rows", "up_cols", "up_kernel"]))
def test_inconsistent_kohya_factors_name_the_key(seed, r, which):
    rng = np.random.default_rng(seed)
    down, up = _rand(rng, (r, 4, 3, 3)), _rand(rng, (5, r, 1, 1))
    if which == "down_rows":
        down = _rand(rng, (r + 1, 4, 3, 3))
    elif which == "up_cols":
        up = _rand(rng, (5, r + 2, 1, 1))
    else:
        up = _rand(rng, (5, r, 3, 3))
    t = {"lora_unet_x_y.lora_down.weight": down, "lora_unet_x_y.lora_up.weight": up,
         "lora_unet_x_y.alpha": np.array(float(r + 1), np.float32)}
    with pytest.raises(ShapeError, match=r"lora_unet_x_y\.lora_up\.weight"):
        C.to_adapter(t, "kohya", modules=["x.y"], prefix="lora_unet")


def test_peft_rank_disagreeing_with_config_is_refused():
    rng = np.random.default_rng(19)
    ad = Adapter(LoraConfig(r=4, lora_alpha=3, target_modules=["q"]),
                 {"q": {"lora_A.weight": _rand(rng, (2, 4)), "lora_B.weight": _rand(rng, (3, 2))}})
    with pytest.raises(ShapeError, match="r=4"):
        C.convert(ad, "kohya")


# --------------------------------------------------------------------------------------------------
# kohya / LyCORIS DoRA (dora_scale)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("rslora", [False, True])
def test_dora_kohya_roundtrip(dtype, rslora):
    rng = np.random.default_rng(21)
    state = _base(rng, dtype=dtype)
    ad = _adapter(LoraConfig(r=2, lora_alpha=5, use_rslora=rslora, use_dora=True, target_modules=["q_proj", "conv"]),
                  state, seed=3)
    for m in ad.modules:   # a magnitude away from ‖W‖, so the decomposition matters
        mag = ad.params[m]["lora_magnitude_vector"]
        ad.params[m]["lora_magnitude_vector"] = (mag * (1 + rng.random(mag.shape))).astype(mag.dtype)
    out, back = _roundtrip(ad, "kohya")
    for m in ad.modules:
        k, mag = C.kohya_name(m), ad.params[m]["lora_magnitude_vector"]
        w = state[m + ".weight"]
        # LyCORIS' layout: one value per output row, as many axes as the weight
        assert out.tensors[k + ".dora_scale"].shape == (w.shape[0],) + (1,) * (w.ndim - 1)
        assert _same_bits(out.tensors[k + ".dora_scale"].reshape(-1), mag.reshape(-1))
        assert _same_bits(back.params[m]["lora_magnitude_vector"], mag)   # PEFT's shape back: (out,) / (1, out, 1, 1)
    assert back.config.use_dora and back.config.use_rslora is False
    kinds = {m: ("Conv2d" if state[m + ".weight"].ndim == 4 else "Linear") for m in ad.modules}
    m1, m2 = ad.merge(state, layer_kinds=kinds), back.merge(state, layer_kinds=kinds)
    for m in ad.modules:   # the same merged weights; rsLoRA's scale is folded into alpha (one rounding)
        a, b = np.asarray(m1[m + ".weight"], np.float64), np.asarray(m2[m + ".weight"], np.float64)
        tol = 0 if not rslora else 4 * np.finfo(dtype).eps * np.max(np.abs(a))
        assert np.max(np.abs(a - b)) <= tol, m
        assert np.max(np.abs(a - state[m + ".weight"])) > 1e-3


def _kohya_dora_file(rng, *, out=6, inn=4, scale_shape=None, extra=None):
    k = "lycoris_model_layers_0_self_attn_q_proj"
    t = {f"{k}.lora_down.weight": _rand(rng, (2, inn)), f"{k}.lora_up.weight": _rand(rng, (out, 2)),
         f"{k}.alpha": np.array(3.0, np.float32),
         f"{k}.dora_scale": np.abs(_rand(rng, scale_shape or (out, 1))) + 0.5}
    t.update(extra or {})
    return t, ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_kohya_dora_reads_rows_and_refuses_columns():
    rng = np.random.default_rng(22)
    t, mods = _kohya_dora_file(rng)
    ad = C.to_adapter(t, "kohya", modules=mods)
    m = "model.layers.0.self_attn.q_proj"
    assert ad.config.use_dora and ad.params[m]["lora_magnitude_vector"].shape == (6,)
    assert _same_bits(ad.params[m]["lora_magnitude_vector"], t[f"{C.kohya_name(m)}.dora_scale"].reshape(-1))
    # the merged weight is m / ‖W + s·BA‖_row · (W + s·BA), computed here in float64 by hand
    W = _rand(rng, (6, 4)).astype(np.float64)
    A, B = (t[f"{C.kohya_name(m)}.{s}"].astype(np.float64) for s in ("lora_down.weight", "lora_up.weight"))
    V = W + 1.5 * B @ A
    ref = t[f"{C.kohya_name(m)}.dora_scale"].astype(np.float64) / np.linalg.norm(V, axis=1, keepdims=True) * V
    np.testing.assert_allclose(ad.merge({m + ".weight": W})[m + ".weight"], ref, rtol=1e-12, atol=1e-12)
    # input columns (LyCORIS wd_on_output=False): another decomposition, refused
    t, mods = _kohya_dora_file(rng, scale_shape=(1, 4))
    with pytest.raises(UnsupportedError, match=r"dora_scale \(1, 4\).*input columns.*wd_on_output"):
        C.to_adapter(t, "kohya", modules=mods)
    t, mods = _kohya_dora_file(rng, scale_shape=(5, 1))
    with pytest.raises(ShapeError, match=r"dora_scale \(5, 1\) fits neither"):
        C.to_adapter(t, "kohya", modules=mods)
    # a 1x1 weight: rows and columns are the same single value
    t, mods = _kohya_dora_file(rng, out=1, inn=1, scale_shape=(1, 1))
    assert C.to_adapter(t, "kohya", modules=mods).config.use_dora


def test_kohya_dora_refusals():
    rng = np.random.default_rng(23)
    k1 = "lycoris_model_layers_1_self_attn_q_proj"
    plain = {f"{k1}.lora_down.weight": _rand(rng, (2, 4)), f"{k1}.lora_up.weight": _rand(rng, (6, 2)),
             f"{k1}.alpha": np.array(3.0, np.float32)}
    t, mods = _kohya_dora_file(rng, extra=plain)
    with pytest.raises(UnsupportedError, match="dora_scale on .*but not on.*use_dora"):
        C.to_adapter(t, "kohya", modules=mods)
    doha = {f"{k1}.{s}": _rand(rng, sh) for s, sh in [("hada_w1_a", (6, 2)), ("hada_w1_b", (2, 4)),
                                                      ("hada_w2_a", (6, 2)), ("hada_w2_b", (2, 4)), ("dora_scale", (6, 1))]}
    with pytest.raises(UnsupportedError, match="DoHa / DoKr"):
        C.to_adapter(doha, "kohya", modules=mods)
    # DoRA on a transformers Conv1D: the stored weight is (in, out), LyCORIS would normalise the wrong axis
    state = {"h.0.attn.c_attn.weight": _rand(rng, (4, 6))}
    ad = create_adapter(state, LoraConfig(r=2, lora_alpha=3, use_dora=True, fan_in_fan_out=True,
                                          target_modules=["c_attn"]), init=False, layer_kinds={"h.0.attn.c_attn": "Conv1D"})
    with pytest.raises(UnsupportedError, match="Conv1D"):
        C.convert(ad, "kohya")
    # an Embedding DoRA: kohya has no Embedding LoRA at all
    emb = _adapter(LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=["embed_tokens"]), _base(rng))
    with pytest.raises(UnsupportedError, match="Embedding"):
        C.convert(emb, "kohya")


def test_peft_tensors_in_memory_are_read_as_a_peft_folder(tmp_path):
    """``to_adapter(tensors, "peft", config=...)`` reads a VeRA checkpoint as ``load_adapter`` does: the shared
    projections are shared tensors (not replaced base tensors), and a tensor nobody owns is refused."""
    import numpy as np

    from peftmath.errors import CheckpointError
    from peftmath.formats import to_adapter

    rng = np.random.default_rng(0)
    r, out, inn = 4, 6, 5
    tensors = {"base_model.model.lin.vera_lambda_b": rng.standard_normal(out).astype(np.float32),
               "base_model.model.lin.vera_lambda_d": rng.standard_normal(r).astype(np.float32),
               "base_model.vera_A": rng.standard_normal((r, inn)).astype(np.float32),
               "base_model.vera_B": rng.standard_normal((out, r)).astype(np.float32)}
    config = {"peft_type": "VERA", "r": r, "target_modules": ["lin"]}
    ad = to_adapter(tensors, "peft", config=config)
    assert set(ad.shared) == {"base_model.vera_A", "base_model.vera_B"} and not ad.other
    W = rng.standard_normal((out, inn)).astype(np.float32)
    lam_b, lam_d = tensors["base_model.model.lin.vera_lambda_b"], tensors["base_model.model.lin.vera_lambda_d"]
    want = W + (lam_b[:, None] * tensors["base_model.vera_B"]) @ (lam_d[:, None] * tensors["base_model.vera_A"])
    np.testing.assert_allclose(ad.merge({"lin.weight": W})["lin.weight"], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="lin.hada_w1_a"):
        to_adapter({**tensors, "base_model.model.lin.hada_w1_a": np.ones(2, np.float32)}, "peft", config=config)
