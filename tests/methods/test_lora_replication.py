"""LoRA with ``layer_replication`` (peftmath.methods.lora_replication): where the stack of layers is (PEFT's walk,
on state-dict keys), the new order of layers, the replicated state dict (the base's arrays under new keys), and
an adapter saved for the replicated model merged into it against a float64 ``W_{base layer} + s·B A`` per copy;
the plain load refuses the field by name. (PEFT parity: tests/parity/test_lora_replication_parity.py.)"""

from __future__ import annotations

import numpy as np
import pytest

import peftmath as pm
from peftmath.errors import ConfigError, ShapeError, UnsupportedError
from peftmath.methods.lora import LoraConfig
from peftmath.methods.lora_replication import layer_stack, load_replicated, replicate_state, replicated_order

H = 4


@pytest.mark.parametrize("keys, want", [
    (["model.embed_tokens.weight", "model.layers.0.q.weight", "model.layers.2.q.weight", "lm_head.weight"],
     ("model.layers.", 3)),
    (["model.model.layers.1.q.weight", "model.model.norm.weight", "model.lm.weight"], ("model.model.layers.", 2)),
    (["layers.0.q.weight", "norm.weight"], ("layers.", 1)),
    (["bert.encoder.layer.3.attention.w", "bert.embeddings.w", "cls.w"], ("bert.encoder.layer.", 4)),
    (["encoder.layer.0.w", "pooler.w"], ("encoder.layer.", 1)),
    (["h.1.self_attention.w", "word_embeddings.w"], ("h.", 2)),
])
def test_the_stack_of_layers_is_found_as_peft_walks_the_model(keys, want):
    assert layer_stack(keys) == want


def test_a_model_without_a_known_stack_is_refused():
    # PEFT walks model.model... first: a GPT-2 LM head model (transformer.h) is not found either
    with pytest.raises(ShapeError, match=r"no stack of layers .*PEFT's replicate_layers refuses such a model too"):
        layer_stack(["transformer.h.0.attn.c_attn.weight", "lm_head.weight"])


@pytest.mark.parametrize("layer_map, count, want", [
    ([[0, 4], [2, 5]], 5, [0, 1, 2, 3, 2, 3, 4]),
    ([[1, 2]], 3, [1]),
    ([[0, 3], [0, 3]], 3, [0, 1, 2, 0, 1, 2]),
])
def test_replicated_order(layer_map, count, want):
    assert replicated_order(layer_map, count) == want


@pytest.mark.parametrize("layer_map", [[], [[0, 4]], [[2, 2]], [[-1, 1]], [[0, 1, 2]], [[0, True]], "0-2"])
def test_bad_ranges_are_refused(layer_map):
    with pytest.raises(ConfigError, match="layer_replication"):
        replicated_order(layer_map, 3)


def _base(rng, n=3):
    state = {"model.embed_tokens.weight": rng.standard_normal((10, H)).astype(np.float32),
             "model.norm.weight": np.ones(H, np.float32)}
    for i in range(n):
        state[f"model.layers.{i}.q.weight"] = rng.standard_normal((H, H)).astype(np.float32)
        state[f"model.layers.{i}.q.bias"] = rng.standard_normal(H).astype(np.float32)
        state[f"model.layers.{i}.ln.weight"] = rng.standard_normal(H).astype(np.float32)
    return state


def test_replicate_state_maps_keys_and_shares_the_arrays():
    state = _base(np.random.default_rng(0))
    new, cfg = replicate_state(state, [[2, 3], [0, 2]], model_config={"num_hidden_layers": 3, "model_type": "llama"})
    assert cfg == {"num_hidden_layers": 3, "model_type": "llama"}
    order = [2, 0, 1]
    assert len(new) == len(state)
    for j, i in enumerate(order):
        for leaf in ("q.weight", "q.bias", "ln.weight"):
            assert new[f"model.layers.{j}.{leaf}"] is state[f"model.layers.{i}.{leaf}"]
    assert new["model.norm.weight"] is state["model.norm.weight"]
    fewer, none = replicate_state(state, [[1, 2]])
    assert none is None and sorted(k for k in fewer if ".layers." in k) == [f"model.layers.0.{x}" for x in
                                                                            ("ln.weight", "q.bias", "q.weight")]


def test_an_adapter_for_the_replicated_model_merges_into_it(tmp_path):
    rng = np.random.default_rng(1)
    state = _base(rng)
    layer_map = [[0, 2], [1, 3]]
    order = [0, 1, 1, 2]
    cfg = LoraConfig(r=2, lora_alpha=6, target_modules=["q"], layer_replication=layer_map)
    params = {f"model.layers.{j}.q": {"lora_A.weight": rng.standard_normal((2, H)).astype(np.float32),
                                      "lora_B.weight": rng.standard_normal((H, 2)).astype(np.float32)}
              for j in range(4)}
    # the folder as PEFT writes it (the config keeps layer_replication)
    pm.save_adapter(pm.Adapter(cfg.replace(layer_replication=None), params), tmp_path / "a")
    import json

    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "layer_replication": layer_map}))
    with pytest.raises(UnsupportedError, match=r"layer_replication=\[\[0, 2\], \[1, 3\]\] .*load_replicated"):
        pm.load_adapter(tmp_path / "a")
    ad, replicated, model_cfg = load_replicated(tmp_path / "a", state, model_config={"num_hidden_layers": 3})
    assert model_cfg == {"num_hidden_layers": 4} and getattr(ad.config, "layer_replication") is None
    merged = ad.merge(replicated)
    for j, i in enumerate(order):
        A, B = (params[f"model.layers.{j}.q"][k].astype(np.float64) for k in ("lora_A.weight", "lora_B.weight"))
        want = state[f"model.layers.{i}.q.weight"].astype(np.float64) + 3.0 * B @ A
        np.testing.assert_allclose(merged[f"model.layers.{j}.q.weight"], want, rtol=0, atol=2e-5)
        assert merged[f"model.layers.{j}.ln.weight"] is state[f"model.layers.{i}.ln.weight"]
    # the two copies of base layer 1 are different tensors now; the base is untouched
    assert not np.array_equal(merged["model.layers.1.q.weight"], merged["model.layers.2.q.weight"])
    assert np.array_equal(replicated["model.layers.1.q.weight"], state["model.layers.1.q.weight"])
    with pytest.raises(ConfigError, match=r"range \[1, 3\] .*\(the base has 2 layers\)"):
        load_replicated(tmp_path / "a", {k: v for k, v in state.items() if ".layers.2." not in k})
