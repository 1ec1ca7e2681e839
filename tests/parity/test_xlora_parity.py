"""X-LoRA parity with Hugging Face PEFT 0.21.2 on a tiny Llama: the classifier on given hidden states, the
scalings PEFT computes in its two-pass forward (scaling pass = the base model's last hidden states), every
adapted layer's forward given the scalings (dense, top-k, top-k softmax, layerwise, global weight), PEFT's
refusal to merge, PEFT's saved keys (its save drops the classifier's first Linear) and the trainable count."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from tests.parity.conftest import require_peft, t2n

torch, peft = require_peft()
transformers = pytest.importorskip("transformers")

from peftmath.errors import CheckpointError, UnsupportedError  # noqa: E402
from peftmath.io.safetensors import save_file  # noqa: E402
from peftmath.methods import xlora  # noqa: E402

HIDDEN = 16
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
           "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=HIDDEN, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, use_cache=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    paths = {}
    for i, (r, alpha) in enumerate([(2, 4), (3, 3), (2, 8)]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(10 + i)
            m = peft.get_peft_model(llama(), peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=r, lora_alpha=alpha,
                                                             init_lora_weights=False))
            m.save_pretrained(root / f"e{i}")
        paths[str(i)] = str(root / f"e{i}")  # PEFT names the experts "0", "1", ... and activates these keys
    return paths


def make_xlora(experts, seed=3, **config):
    cfg = dict(task_type="CAUSAL_LM", hidden_size=HIDDEN, adapters=experts, xlora_depth=2, xlora_size=8)
    cfg.update(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xm = peft.get_peft_model(llama(), peft.XLoraConfig(**cfg))
    with torch.no_grad():  # a trained classifier
        rng = np.random.default_rng(seed)
        for n, p in xm.named_parameters():
            if "internal_xlora_classifier" in n:
                p.copy_(torch.from_numpy(rng.normal(0.0, 0.7, tuple(p.shape)).astype(np.float32)))
    return xm.eval()


def classifier_of(xm):
    seq = xm.base_model.internal_xlora_classifier.layers
    return [(t2n(m.weight), t2n(m.bias)) for m in seq if isinstance(m, torch.nn.Linear)]


def ours(xm):
    return xlora.XLoraConfig(**{k: v for k, v in xm.peft_config["default"].to_dict().items()
                                if k in xlora.XLoraConfig.field_names() and k != "peft_type"})


def lora_layer(xm, name):
    return xm.base_model.lora_model.model.get_submodule(name)


def experts_of(layer):
    return [(t2n(layer.lora_A[a].weight), t2n(layer.lora_B[a].weight), layer.scaling[a])
            for a in layer.active_adapters]


CONFIGS = [dict(), dict(xlora_depth=1), dict(layerwise_scalings=True, softmax_temperature=0.5),
           dict(enable_softmax=False, top_k_lora=2), dict(top_k_lora=1, enable_softmax_topk=True, enable_softmax=False),
           dict(xlora_depth=3, xlora_dropout_p=0.0, global_scaling_weight=0.7)]


@pytest.mark.parametrize("config", CONFIGS)
def test_classifier_on_given_hidden_states(experts, config):
    xm = make_xlora(experts, **config)
    h = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 5, HIDDEN)).astype(np.float32))

    class Out:
        hidden_states = (h,)

    with torch.no_grad():
        want = t2n(xm.base_model.internal_xlora_classifier(Out(), input_ids=torch.zeros((2, 5), dtype=torch.long)))
    cfg = ours(xm)
    layers = classifier_of(xm)
    assert list(xlora.classifier_keys(cfg, 3, 4)) == [
        k.removeprefix("internal_xlora_classifier.layers.")
        for k, _ in xm.base_model.state_dict().items() if k.startswith("internal_xlora_classifier.")]
    got = xlora.classifier_scalings(t2n(h), layers, cfg, n_layers=4)
    assert got.shape == want.shape == (2, 5, 4, 3)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("config", CONFIGS[:3])
def test_two_pass_scalings_are_the_classifier_on_the_base_hidden_states(experts, config):
    """scaling_pass_value = 0: PEFT's scaling pass is the base model, so the scalings of its forward are the
    classifier on the base model's last hidden state."""
    xm = make_xlora(experts, **config)
    ids = torch.tensor([[1, 5, 7, 2], [3, 3, 9, 4]])
    with torch.no_grad():
        xm(input_ids=ids)
        want = t2n(xm.base_model.get_latest_scalings())
        h = t2n(llama()(input_ids=ids, output_hidden_states=True).hidden_states[-1])
    got = xlora.classifier_scalings(h, classifier_of(xm), ours(xm), n_layers=4)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("config", CONFIGS)
def test_layer_forward_given_scalings(experts, config):
    xm = make_xlora(experts, **config)
    rng = np.random.default_rng(2)
    S = rng.random((2, 5, 4, 3)).astype(np.float32)
    cfg = ours(xm)
    for number, name in enumerate(MODULES):
        layer = lora_layer(xm, name)
        x = rng.standard_normal((2, 5, HIDDEN)).astype(np.float32)
        with torch.no_grad():
            want = t2n(layer(torch.from_numpy(x), scalings=torch.from_numpy(S)))
        W, b = t2n(layer.base_layer.weight), None
        got = xlora.lora_linear_forward(x, W, experts_of(layer), S, number, cfg, bias=b)
        np.testing.assert_allclose(got, want, atol=3e-6, rtol=1e-5)


def test_peft_merge_ignores_the_classifier_and_peftmath_refuses(experts):
    """PEFT's merge_and_unload on an X-LoRA model merges every expert at full weight (W + Σ_i c_i B_i A_i, the
    classifier dropped), which is no X-LoRA forward; peftmath refuses, and that sum is what pm.combine of the
    experts with weights 1 and combination_type="cat" merges to."""
    import peftmath

    xm = make_xlora(experts)
    layers = {name: experts_of(lora_layer(xm, name)) for name in MODULES}
    base = {k: t2n(v) for k, v in llama().state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = {k: t2n(v) for k, v in xm.merge_and_unload().state_dict().items()}
    combined = peftmath.combine([peftmath.load_adapter(p) for p in experts.values()], [1.0, 1.0, 1.0],
                                combination_type="cat").merge(base)
    for name, exps in layers.items():
        want = base[f"{name}.weight"] + sum(c * B @ A for A, B, c in exps)
        np.testing.assert_allclose(merged[f"{name}.weight"], want, atol=2e-6, rtol=1e-5)
        np.testing.assert_allclose(combined[f"{name}.weight"], want, atol=2e-6, rtol=1e-5)
    with pytest.raises(UnsupportedError, match="depends on the input"):
        raise xlora.refuse_merge()


def test_trainable_count_matches_peft(experts):
    for config in CONFIGS:
        xm = make_xlora(experts, **config)
        layers = classifier_of(xm)
        tensors = {f"{j}.{k}": a for j, wb in enumerate(layers) for k, a in enumerate(wb)}
        assert xlora.num_trainable_parameters(ours(xm), tensors) == xm.get_nb_trainable_parameters()[0]


def test_peft_save_drops_the_first_linear_and_the_loader_refuses_it(experts, tmp_path):
    xm = make_xlora(experts, xlora_depth=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xm.save_pretrained(tmp_path / "peft")
    from peftmath.io.safetensors import load_file

    keys = sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert keys == [xlora.PREFIX + "3.bias", xlora.PREFIX + "3.weight"]  # layers.0 is gone (PEFT 0.21.2)
    with pytest.raises(CheckpointError, match="drops layers.0"):
        xlora.load_xlora(tmp_path / "peft", experts)


def test_loader_reads_a_full_classifier_and_the_experts(experts, tmp_path):
    xm = make_xlora(experts, xlora_depth=3)
    folder = tmp_path / "full"
    folder.mkdir()
    sd = {f"base_model.{k}": t2n(v) for k, v in xm.base_model.state_dict().items() if "internal_xlora" in k}
    save_file(sd, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(xm.peft_config["default"].to_dict(), default=str))
    cfg, layers, loaded = xlora.load_xlora(folder)
    assert cfg.xlora_depth == 3 and list(loaded) == list(experts)
    for (w, b), (w2, b2) in zip(layers, classifier_of(xm)):
        np.testing.assert_array_equal(w, w2)
        np.testing.assert_array_equal(b, b2)
    # the experts' tensors, in PEFT's order, are those PEFT put into the layer
    layer = lora_layer(xm, MODULES[2])
    for (A, B, c), ad in zip(experts_of(layer), loaded.values()):
        p = ad.params[MODULES[2]]
        np.testing.assert_array_equal(p["lora_A.weight"], A)
        np.testing.assert_array_equal(p["lora_B.weight"], B)
        assert ad.module(MODULES[2], weight_shape=(B.shape[0], A.shape[1])).scaling == pytest.approx(c)


@pytest.fixture(scope="module")
def embedding_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb_experts")
    paths = {}
    for i, (r, alpha) in enumerate([(2, 4), (3, 5)]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(20 + i)
            m = peft.get_peft_model(llama(), peft.LoraConfig(target_modules=["embed_tokens", "q_proj"], r=r,
                                                             lora_alpha=alpha, init_lora_weights=False))
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "lora_embedding" in n:
                        p.normal_()
            m.save_pretrained(root / f"e{i}")
        paths[str(i)] = str(root / f"e{i}")
    return paths


@pytest.mark.parametrize("config", [dict(), dict(top_k_lora=1, global_scaling_weight=0.5)])
def test_embedding_layer_forward_given_scalings(embedding_experts, config):
    xm = make_xlora(embedding_experts, **config)
    layer = lora_layer(xm, "model.embed_tokens")
    n_layers = 3  # embed_tokens, then layers.0 / layers.1 q_proj, in the model's module order
    rng = np.random.default_rng(6)
    S = rng.random((2, 5, n_layers, 2)).astype(np.float32)
    ids = rng.integers(0, 50, (2, 5))
    with torch.no_grad():
        want = t2n(layer(torch.from_numpy(ids), scalings=torch.from_numpy(S)))
    exps = [(t2n(layer.lora_embedding_A[a]), t2n(layer.lora_embedding_B[a]), layer.scaling[a])
            for a in layer.active_adapters]
    got = xlora.lora_embedding_forward(ids, t2n(layer.base_layer.weight), exps, S, 0, ours(xm))
    np.testing.assert_allclose(got, want, atol=3e-6, rtol=1e-5)
