"""peftmath.io.peft: PEFT adapter folders (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from tests.helpers import assert_same_namespace, to_np
from peftmath import Adapter, load_adapter, read_config, save_adapter
from peftmath.errors import CheckpointError, ConfigError
from peftmath.io.peft import split_key
from peftmath.io.safetensors import SafeTensorsFile, save_file
from peftmath.methods.lora import LoraConfig


def _adapter(dtype=np.float32, dora=False):
    rng = np.random.default_rng(0)
    cfg = LoraConfig.from_dict({
        "peft_type": "LORA", "r": 2, "lora_alpha": 6, "target_modules": ["q_proj", "c_attn", "embed_tokens"],
        "rank_pattern": {"c_attn": 4}, "use_dora": dora, "task_type": "CAUSAL_LM",
        "eva_config": {"rho": 2.0, "nested": [1, 2.5, None]}, "megatron_core": "megatron.core",
    })
    params = {
        "model.layers.0.self_attn.q_proj": {"lora_A.weight": rng.standard_normal((2, 8)).astype(dtype),
                                            "lora_B.weight": rng.standard_normal((6, 2)).astype(dtype)},
        "transformer.h.0.attn.c_attn": {"lora_A.weight": rng.standard_normal((4, 8)).astype(dtype),
                                        "lora_B.weight": rng.standard_normal((24, 4)).astype(dtype)},
        "model.embed_tokens": {"lora_embedding_A": rng.standard_normal((2, 30)).astype(dtype),
                               "lora_embedding_B": rng.standard_normal((8, 2)).astype(dtype)},
    }
    if dora:
        params["model.layers.0.self_attn.q_proj"]["lora_magnitude_vector"] = rng.uniform(0.5, 2, 6).astype(dtype)
    return Adapter(cfg, params, other={"lm_head.weight": rng.standard_normal((30, 8)).astype(dtype)})


def _bits(a):
    return np.ascontiguousarray(np.asarray(a)).view(np.uint8).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("dora", [False, True])
def test_save_load_round_trip_is_exact(tmp_path, dtype, dora):
    ad = _adapter(dtype, dora)
    folder = save_adapter(ad, tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    raw = json.loads((folder / "adapter_config.json").read_text())
    assert raw["eva_config"] == {"rho": 2.0, "nested": [1, 2.5, None]} and raw["megatron_core"] == "megatron.core"
    assert raw["peft_type"] == "LORA" and raw["inference_mode"] is True and raw["peft_version"]
    keys = set(SafeTensorsFile(folder / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    back = load_adapter(folder)
    assert back.config.to_dict() == {**ad.config.to_dict(), "inference_mode": True,
                                     "peft_version": raw["peft_version"]}
    assert back.config.extra["eva_config"] == {"rho": 2.0, "nested": [1, 2.5, None]}
    assert back.modules == ad.modules
    for m in ad.modules:
        assert set(back.params[m]) == set(ad.params[m])
        for s, a in ad.params[m].items():
            assert back.params[m][s].dtype == a.dtype and _bits(back.params[m][s]) == _bits(a), (m, s)
    assert _bits(back.other["lm_head.weight"]) == _bits(ad.other["lm_head.weight"])
    # save again from the loaded adapter: byte-identical files
    folder2 = save_adapter(back, tmp_path / "again")
    assert (folder2 / "adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()
    assert (folder2 / "adapter_config.json").read_text() == (folder / "adapter_config.json").read_text()


def test_keys_without_prefix_load_the_same(tmp_path):
    ad = _adapter()
    with_prefix = save_adapter(ad, tmp_path / "a")
    bare = tmp_path / "b"
    bare.mkdir()
    (bare / "adapter_config.json").write_bytes((with_prefix / "adapter_config.json").read_bytes())
    f = SafeTensorsFile(with_prefix / "adapter_model.safetensors")
    save_file({k.removeprefix("base_model.model."): np.array(f[k]) for k in f}, bare / "adapter_model.safetensors")
    a, b = load_adapter(with_prefix), load_adapter(bare)
    assert a.modules == b.modules and set(a.other) == set(b.other)
    for m in a.modules:
        for s in a.params[m]:
            assert _bits(a.params[m][s]) == _bits(b.params[m][s])
    # a file path instead of the folder works too
    assert load_adapter(bare / "adapter_model.safetensors").modules == a.modules


def test_split_key():
    sfx = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_magnitude_vector")
    assert split_key("base_model.model.a.b.lora_A.weight", sfx) == ("a.b", "lora_A.weight")
    assert split_key("a.b.lora_B.bias", sfx) == ("a.b", "lora_B.bias")
    assert split_key("base_model.model.emb.lora_embedding_A", sfx) == ("emb", "lora_embedding_A")
    assert split_key("base_model.model.lm_head.weight", sfx) is None


def test_base_layer_keys_become_base_tensors(tmp_path):
    ad = _adapter()
    folder = save_adapter(ad, tmp_path / "a")
    f = SafeTensorsFile(folder / "adapter_model.safetensors")
    tensors = {k: np.array(f[k]) for k in f}
    tensors["base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"] = np.ones(6, np.float32)
    save_file(tensors, folder / "adapter_model.safetensors")
    back = load_adapter(folder)
    np.testing.assert_array_equal(back.other["model.layers.0.self_attn.q_proj.bias"], np.ones(6))


def test_load_into_another_namespace(tmp_path):
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xt

    ad = _adapter(ml_dtypes.bfloat16)
    back = load_adapter(save_adapter(ad, tmp_path / "a"), xp=xt)
    A = back.params["model.layers.0.self_attn.q_proj"]["lora_A.weight"]
    assert isinstance(A, torch.Tensor) and A.dtype == torch.bfloat16
    assert_same_namespace(xt, A)
    A.mul_(1.0)  # the tensor is writeable (not a view of the read-only memory map)
    np.testing.assert_array_equal(to_np(A), ad.params["model.layers.0.self_attn.q_proj"]["lora_A.weight"].astype(np.float64))


def test_load_by_backend_name(tmp_path):
    import array_api_compat

    from peftmath.backends import available_backends
    from peftmath.errors import BackendError

    folder = save_adapter(_adapter(), tmp_path / "a")
    A = load_adapter(folder, backend="numpy").params["model.layers.0.self_attn.q_proj"]["lora_A.weight"]
    assert isinstance(A, np.ndarray)
    torch = pytest.importorskip("torch")
    A = load_adapter(folder, backend="torch").params["model.layers.0.self_attn.q_proj"]["lora_A.weight"]
    assert isinstance(A, torch.Tensor) and array_api_compat.is_torch_namespace(array_api_compat.array_namespace(A))
    if "cupy" not in available_backends():
        with pytest.raises(BackendError, match="backends/cupy"):
            load_adapter(folder, backend="cupy")


def test_bin_only_folder_refused_with_conversion_hint(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match="never loaded") as info:
        load_adapter(folder)
    msg = str(info.value)
    assert "adapter_model.bin" in msg and "save_pretrained" in msg and "safe_serialization=True" in msg


def test_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such adapter folder"):
        load_adapter(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        load_adapter(empty)
    (empty / "adapter_model.safetensors").write_bytes(b"")
    (empty / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config(empty)
    (empty / "adapter_config.json").write_text(json.dumps({"r": 2}))
    with pytest.raises(ConfigError, match="peft_type"):
        read_config(empty)
    (empty / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 0}))
    with pytest.raises(ConfigError, match="'r'"):
        read_config(empty / "adapter_config.json")
    (empty / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"base_model.model.lm_head.weight": np.zeros(2, np.float32)}, empty / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="no LORA parameters"):
        load_adapter(empty)


def test_peft_reads_our_folder(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(8, 6, bias=False)

    rng = np.random.default_rng(1)
    A, B = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((6, 2)).astype(np.float32)
    ad = Adapter(LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"]), {"q_proj": {"lora_A.weight": A, "lora_B.weight": B}})
    folder = save_adapter(ad, tmp_path / "a")
    model = peft.PeftModel.from_pretrained(Tiny(), str(folder))
    layer = model.base_model.model.q_proj
    np.testing.assert_array_equal(layer.lora_A["default"].weight.detach().numpy(), A)
    np.testing.assert_array_equal(layer.lora_B["default"].weight.detach().numpy(), B)
    assert layer.scaling["default"] == 3.0
