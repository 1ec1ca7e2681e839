"""peftmath convert --to gguf: a llama.cpp LoRA adapter, read back with the gguf package's own GGUFReader.

Names come from gguf's TensorNameMap (checked against names spelled out here), the metadata is llama.cpp's
(general.type = adapter, adapter.type = lora, adapter.lora.alpha), values are the PEFT factors (the q / k
lora_b rows in llama.cpp's rope order, checked by computing attention scores with both ropes), and what
llama.cpp cannot hold is refused with nothing written. Skipped without the gguf package (peftmath[gguf]).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from peftmath import formats as C  # noqa: E402
from peftmath.cli import main  # noqa: E402
from peftmath.create import create_adapter  # noqa: E402
from peftmath.errors import ConfigError, UnsupportedError  # noqa: E402
from peftmath.io import save_adapter  # noqa: E402
from peftmath.io.safetensors import save_file  # noqa: E402
from peftmath.methods.loha import LoHaConfig  # noqa: E402
from peftmath.methods.lora import LoraConfig  # noqa: E402

HID, HEADS, KV, HD, FF, L = 16, 4, 2, 4, 24, 2


def _config(arch="LlamaForCausalLM", **kw):
    return {"architectures": [arch], "hidden_size": HID, "num_attention_heads": HEADS, "num_key_value_heads": KV,
            "num_hidden_layers": L, "intermediate_size": FF, **kw}


def _state(rng, dtype=np.float32):
    s = {"model.embed_tokens.weight": rng.standard_normal((32, HID))}
    for i in range(L):
        p = f"model.layers.{i}."
        s.update({p + "self_attn.q_proj.weight": rng.standard_normal((HEADS * HD, HID)),
                  p + "self_attn.k_proj.weight": rng.standard_normal((KV * HD, HID)),
                  p + "self_attn.v_proj.weight": rng.standard_normal((KV * HD, HID)),
                  p + "self_attn.o_proj.weight": rng.standard_normal((HID, HEADS * HD)),
                  p + "mlp.down_proj.weight": rng.standard_normal((HID, FF))})
    s["lm_head.weight"] = rng.standard_normal((32, HID))
    return {k: v.astype(dtype) for k, v in s.items()}


def _adapter(config, state, seed=0):
    return create_adapter(state, config, init=False, seed=seed, layer_kinds={"model.embed_tokens": "Embedding"})


def _read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: np.array(t.data) for t in r.tensors}
    return fields, tensors


def _rope_scores(q, k, split_half):
    """Attention scores q·k of one head after RoPE: HF's rotate_half (pairs i, i + d/2) or GGML's
    adjacent pairs (2i, 2i + 1), for positions 0..n-1."""
    n, d = q.shape
    theta = 10000.0 ** (-np.arange(d // 2) * 2 / d)
    ang = np.arange(n)[:, None] * theta[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rot(x):
        if split_half:
            a, b = x[:, : d // 2], x[:, d // 2:]
        else:
            a, b = x[:, 0::2], x[:, 1::2]
        ra, rb = a * cos - b * sin, a * sin + b * cos
        return np.concatenate([ra, rb], 1) if split_half else np.stack([ra, rb], -1).reshape(n, d)

    return rot(q) @ rot(k).T


@pytest.mark.parametrize("arch,permuted", [("LlamaForCausalLM", True), ("MistralForCausalLM", True),
                                           ("Qwen2ForCausalLM", False), ("Qwen3ForCausalLM", False)])
def test_gguf_reads_back_with_llama_cpp_names(tmp_path, arch, permuted):
    rng = np.random.default_rng(0)
    state = _state(rng)
    ad = _adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj", "lm_head"],
                             rank_pattern={"down_proj": 2}), state)
    C.convert(ad, "gguf", model_config=_config(arch)).save(tmp_path / "a.gguf")
    fields, tensors = _read(tmp_path / "a.gguf")
    name = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}.get(arch, arch[:5].lower())
    assert fields["general.architecture"] == name
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0 and fields["general.file_type"] == 0
    expect = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "mlp.down_proj": "ffn_down"}
    want = {"output.weight": "lm_head"}
    for i in range(L):
        want.update({f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}" for h, g in expect.items()})
    assert sorted(tensors) == sorted(f"{n}.lora_{x}" for n in want for x in "ab")
    assert json.loads(fields["peftmath.convert"])["modules"] == want
    for n, m in want.items():
        A, B = ad.params[m]["lora_A.weight"], ad.params[m]["lora_B.weight"]
        a, b = tensors[n + ".lora_a"], tensors[n + ".lora_b"]
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, A)
        # llama.cpp's scale alpha / rank, rank read from lora_b: PEFT's alpha / r per module (rank_pattern)
        assert b.shape[1] == ad.config.rank_and_alpha(m)[0]
        assert fields["adapter.lora.alpha"] / b.shape[1] == ad.config.scaling_for(m)
        if not (permuted and m.endswith(("q_proj", "k_proj"))):
            np.testing.assert_array_equal(b, B)
            continue
        heads = HEADS if m.endswith("q_proj") else KV
        assert sorted(map(tuple, b)) == sorted(map(tuple, B)) and not np.array_equal(b, B)   # same rows, reordered
        # the point of the reorder: GGML's adjacent-pair rope on the reordered rows gives the scores HF's
        # half-split rope gives on PEFT's rows (per head), so the adapter matches the converted base
        x = rng.standard_normal((5, HID))
        for h in range(heads):
            rows = slice(h * HD, (h + 1) * HD)
            q_hf, q_gg = x @ (B @ A)[rows].T, x @ (b @ a)[rows].T
            np.testing.assert_allclose(_rope_scores(q_gg, q_gg, False), _rope_scores(q_hf, q_hf, True),
                                       rtol=1e-10, atol=1e-10)


def test_gguf_scales_dtypes_and_rslora(tmp_path):
    rng = np.random.default_rng(1)
    state = _state(rng, np.float16)
    ad = _adapter(LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["v_proj"]), state)
    ad.params = {m: {s: a.astype(np.float16) for s, a in p.items()} for m, p in ad.params.items()}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        C.convert(ad, "gguf", model_config=_config("Qwen2ForCausalLM")).save(tmp_path / "a.gguf")
    assert not w   # rsLoRA r=4: alpha·√r = 12, exact in float32
    fields, tensors = _read(tmp_path / "a.gguf")
    # llama.cpp's scale alpha / rank = 12 / 4 = PEFT's 6 / √4
    assert fields["adapter.lora.alpha"] / 4 == ad.config.scaling_for("model.layers.0.self_attn.v_proj")
    assert fields["general.file_type"] == 1 and all(t.dtype == np.float16 for t in tensors.values())
    # bfloat16 factors: F32, exactly (every bfloat16 is a float32)
    from peftmath.io.safetensors import DTYPES

    bf = {m: {s: a.astype(np.float32).astype(DTYPES["BF16"]) for s, a in p.items()} for m, p in ad.params.items()}
    ad.params = bf
    out = C.convert(ad, "gguf", model_config=_config("Qwen2ForCausalLM"))
    for m, p in bf.items():
        b = out.tensors[f"blk.{m.split('.')[2]}.attn_v.weight.lora_b"]
        assert b.dtype == np.float32 and np.array_equal(b, p["lora_B.weight"].astype(np.float32))
    # float64 factors: rounded to float32, said once per tensor; a non-float32 alpha is warned too
    ad = _adapter(LoraConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=["v_proj"]), state)
    ad.params = {m: {s: a.astype(np.float64) / 3 for s, a in p.items()} for m, p in ad.params.items()}
    with pytest.warns(C.ConversionWarning) as rec:
        out = C.convert(ad, "gguf", model_config=_config("Qwen2ForCausalLM"))
    msgs = " ".join(str(r.message) for r in rec)
    assert "rounded to float32" in msgs and "alpha in float32" in msgs
    m = "model.layers.0.self_attn.v_proj"
    np.testing.assert_array_equal(out.tensors["blk.0.attn_v.weight.lora_a"],
                                  ad.params[m]["lora_A.weight"].astype(np.float32))


def test_gguf_refusals_write_nothing(tmp_path):
    rng = np.random.default_rng(2)
    state = _state(rng)
    cfg = _config()
    cases = [
        (LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["v_proj"]), UnsupportedError, "DoRA"),
        (LoHaConfig(r=2, alpha=4, target_modules=["v_proj"]), UnsupportedError, "LOHA"),
        (LoraConfig(r=2, lora_alpha=4, alpha_pattern={"layers.1.self_attn.v_proj": 8}, target_modules=["v_proj"]),
         UnsupportedError, "one alpha.*alpha_pattern"),
        (LoraConfig(r=2, lora_alpha=4, use_rslora=True, rank_pattern={"layers.1.self_attn.v_proj": 3},
                    target_modules=["v_proj"]), UnsupportedError, "rsLoRA"),
        (LoraConfig(r=2, lora_alpha=0, target_modules=["v_proj"]), UnsupportedError, "alpha 0"),
        (LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens"]), UnsupportedError, "Embedding"),
        (LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"], lora_bias=True), UnsupportedError, "lora_B.bias"),
    ]
    for config, exc, msg in cases:
        ad = _adapter(config, state)
        with pytest.raises(exc, match=msg):
            C.convert(ad, "gguf", model_config=cfg).save(tmp_path / "x.gguf")
    ad = _adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "lm_head"]), state)
    with pytest.raises(UnsupportedError, match="ties lm_head"):
        C.convert(ad, "gguf", model_config=_config(tie_word_embeddings=True))
    with pytest.raises(UnsupportedError, match="'GPT2LMHeadModel'.*convert_lora_to_gguf"):
        C.convert(ad, "gguf", model_config=_config("GPT2LMHeadModel"))
    with pytest.raises(ConfigError, match="model_config"):
        C.convert(ad, "gguf")
    odd = create_adapter({"model.layers.0.weird.weight": np.ones((4, 4), np.float32)},
                         LoraConfig(r=2, lora_alpha=4, target_modules=["weird"]), init=False)
    with pytest.raises(UnsupportedError, match="model.layers.0.weird.*no tensor"):
        C.convert(odd, "gguf", model_config=cfg)
    assert not list(tmp_path.iterdir())
    with pytest.raises(UnsupportedError, match="does not read"):
        C.to_adapter({}, "gguf")


def test_convert_to_gguf_command(tmp_path, capsys):
    rng = np.random.default_rng(3)
    state = _state(rng)
    (tmp_path / "base").mkdir()
    save_file(state, tmp_path / "base" / "model.safetensors")
    (tmp_path / "base" / "config.json").write_text(json.dumps(_config()))
    ad = _adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), state)
    save_adapter(ad, tmp_path / "a")
    out = tmp_path / "a.gguf"
    rc = main(["convert", str(tmp_path / "a"), "--to", "gguf", "-o", str(out)])
    assert rc == 1 and "--model-config" in capsys.readouterr().err and not out.exists()
    assert main(["convert", str(tmp_path / "a"), "--to", "gguf", "--model-config", str(tmp_path / "base"),
                 "-o", str(out), "-q"]) == 0
    fields, tensors = _read(out)
    assert fields["general.type"] == "adapter" and fields["adapter.lora.alpha"] == 4.0
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight.lora_b"],
                                  ad.params["model.layers.1.self_attn.v_proj"]["lora_B.weight"])
    stamp = out.read_bytes()
    rc = main(["convert", str(tmp_path / "a"), "--to", "gguf", "--model-config", str(tmp_path / "base"), "-o", str(out)])
    assert rc == 1 and "already exists" in capsys.readouterr().err and out.read_bytes() == stamp
    rc = main(["convert", str(tmp_path / "a"), "--to", "gguf", "--model-config", str(tmp_path / "base"),
               "-o", str(tmp_path / "a.safetensors")])
    assert rc == 1 and ".gguf" in capsys.readouterr().err
