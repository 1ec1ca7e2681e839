"""PEFT 0.21.2 parity of ADAPTION_PROMPT on tiny Llama (grouped heads, with and without attention biases),
Mistral and GPT-2 built from configs with random weights (no download).

Checked: the adapted layer's output against PEFT's AdaptedAttention on the same inputs (captured from a
forward of the PEFT model), the whole model's logits with peftmath's term added to each adapted layer of
the base model, the modules PEFT adapts, the checkpoint keys and shapes, the trainable count, and
peftmath's checkpoint loaded by PeftModel.from_pretrained.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import require_peft, t2n

torch, peft = require_peft()
transformers = pytest.importorskip("transformers")

import peftmath as pm
from peftmath.methods import adaption_prompt as ap

CASES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2)),
    "llama_bias": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=3, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)),
}


def _base(case: str):
    """The tiny model with every parameter redrawn (biases too: PEFT's double o_proj bias shows)."""
    torch.manual_seed(0)
    model = CASES[case]().eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _peft(case: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm_ = peft.get_peft_model(_base(case), peft.AdaptionPromptConfig(task_type="CAUSAL_LM", **kw))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # trained-looking gates (PEFT starts them at 0)
        for n, p in pm_.named_parameters():
            if n.endswith("adaption_gate"):
                p.copy_(torch.randn(p.shape, generator=gen))
    return pm_


def _model_type(case: str) -> str:
    return case.split("_")[0]


def _inputs():
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 5, dtype=torch.long)
    return ids, mask


def _capture(module, run):
    """The (args, kwargs, output) of ``module``'s first call during ``run()``."""
    seen = {}

    def hook(mod, args, kwargs, out):
        seen.setdefault("call", (args, kwargs, out))

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen["call"]


def _hidden_and_rope(args, kwargs):
    hidden = args[0] if args else kwargs["hidden_states"]
    rope = kwargs.get("position_embeddings")
    return t2n(hidden), None if rope is None else tuple(t2n(t) for t in rope)


@pytest.mark.parametrize("case", list(CASES))
def test_adapted_layer_output_matches_peft(case):
    pm_ = _peft(case, adapter_len=3, adapter_layers=2)
    ids, mask = _inputs()
    mt = _model_type(case)
    state = {k: t2n(v) for k, v in _base(case).state_dict().items()}
    mods = ap.adapted_modules(list(state), ap.AdaptionPromptConfig(adapter_len=3, adapter_layers=2), mt)
    heads = pm_.get_base_model().config.num_attention_heads
    for module in mods:
        layer = pm_.get_base_model().get_submodule(module)
        assert isinstance(layer, (peft.tuners.adaption_prompt.layer.AdaptedAttention,
                                  peft.tuners.adaption_prompt.layer.AdaptedAttentionGPT))
        args, kwargs, out = _capture(layer, lambda: pm_(input_ids=ids, attention_mask=mask))
        with torch.no_grad():
            base_out = t2n(layer.model(*args, **kwargs)[0])
        hidden, rope = _hidden_and_rope(args, kwargs)
        weights = ap.attention_weights(state, module)
        prompt, gate = t2n(layer.adaption_prompt), t2n(layer.adaption_gate)
        got = ap.forward(base_out, hidden, prompt, gate, weights, num_heads=heads, model_type=mt,
                         position_embeddings=rope, peft_compat=True)
        np.testing.assert_allclose(got, t2n(out[0]), rtol=1e-6, atol=1e-6)
        default = ap.forward(base_out, hidden, prompt, gate, weights, num_heads=heads, model_type=mt,
                             position_embeddings=rope)
        if case == "llama_bias":  # PEFT adds o_proj's bias a second time; the default does not
            np.testing.assert_allclose(default + weights["o_proj.bias"], t2n(out[0]), rtol=1e-6, atol=1e-6)
            zero = ap.forward(base_out, hidden, prompt, np.zeros(1, np.float32), weights, num_heads=heads,
                              model_type=mt, position_embeddings=rope)
            np.testing.assert_array_equal(zero, base_out)
        else:
            np.testing.assert_array_equal(default, got)


def _logits_with_our_terms(case, ad, peft_compat=True):
    """The base model (no PEFT) with peftmath's term added to each adapted layer's output by a hook."""
    model = _base(case)
    state = {k: t2n(v) for k, v in model.state_dict().items()}
    heads = model.config.num_attention_heads
    handles = []
    for module, p in ad.params.items():
        weights = ap.attention_weights(state, module)

        def hook(mod, args, kwargs, out, weights=weights, p=p):
            hidden, rope = _hidden_and_rope(args, kwargs)
            delta = ap.adaption_delta(hidden, np.asarray(p["adaption_prompt"]), np.asarray(p["adaption_gate"]), weights,
                                      num_heads=heads, model_type=_model_type(case), position_embeddings=rope,
                                      peft_compat=peft_compat)
            return (out[0] + torch.from_numpy(np.ascontiguousarray(delta)),) + tuple(out[1:])

        handles.append(model.get_submodule(module).register_forward_hook(hook, with_kwargs=True))
    ids, mask = _inputs()
    try:
        with torch.no_grad():
            return t2n(model(input_ids=ids, attention_mask=mask).logits)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("case", ["llama", "llama_bias", "gpt2"])
def test_checkpoints_count_and_logits_match_peft(tmp_path, case):
    pm_ = _peft(case, adapter_len=4, adapter_layers=2)
    ids, mask = _inputs()
    with torch.no_grad():
        expected = t2n(pm_(input_ids=ids, attention_mask=mask).logits)
    pm_.save_pretrained(tmp_path)
    ad = pm.load_adapter(tmp_path)
    hidden = 16
    mods = ap.adapted_modules(list(_base(case).state_dict()), ad.config, _model_type(case))
    assert sorted(ad.params) == sorted(mods)
    assert ap.check_params(ad.config, ad.params) == hidden
    assert ad.num_trainable_parameters() == pm_.get_nb_trainable_parameters()[0] == 2 * (4 * hidden + 1)
    np.testing.assert_allclose(_logits_with_our_terms(case, ad), expected, rtol=1e-5, atol=1e-5)
    # peftmath writes -> PEFT loads the same tensors and gives the same logits
    pm.save_adapter(ad, tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(_base(case), tmp_path / "again")
    sd = reloaded.state_dict()
    for module, p in ad.params.items():
        for suffix, value in p.items():
            np.testing.assert_array_equal(t2n(sd[f"base_model.model.{module}.{suffix}"]), np.asarray(value))
    with torch.no_grad():
        np.testing.assert_allclose(t2n(reloaded(input_ids=ids, attention_mask=mask).logits), expected,
                                   rtol=1e-6, atol=1e-6)


def test_zero_init_adapter_is_the_base_model_in_peft_and_here():
    """PEFT's fresh adapter (gate 0) leaves a bias-free Llama unchanged, as peftmath's fresh adapter does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm_ = peft.get_peft_model(_base("llama"), peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=2,
                                                                            adapter_layers=3))
    ids, mask = _inputs()
    with torch.no_grad():
        base = t2n(_base("llama")(input_ids=ids, attention_mask=mask).logits)
        np.testing.assert_allclose(t2n(pm_(input_ids=ids, attention_mask=mask).logits), base, rtol=1e-6, atol=1e-6)
    cfg = ap.AdaptionPromptConfig(adapter_len=2, adapter_layers=3)
    mods = ap.adapted_modules(list(_base("llama").state_dict()), cfg, "llama")
    ours = pm.Adapter(cfg, ap.init_adaption_prompt(cfg, mods, 16, seed=0))
    np.testing.assert_array_equal(_logits_with_our_terms("llama", ours, peft_compat=False), base)


def test_bfloat16_layer_output_within_a_rounding_of_peft():
    """PEFT in bfloat16 rounds q, the prompt's keys / values, the scores, the gated term and the sum to bf16;
    peftmath computes in float32 and rounds once. The difference stays within a few bf16 roundings (2⁻⁸
    relative each) of the term's scale: measured 0.016 on outputs up to 3.7, terms up to 3.4."""
    pm_ = _peft("llama_bias", adapter_len=3, adapter_layers=2).to(torch.bfloat16)
    ids, mask = _inputs()
    layer = pm_.get_base_model().get_submodule("model.layers.2.self_attn")
    args, kwargs, out = _capture(layer, lambda: pm_(input_ids=ids, attention_mask=mask))
    with torch.no_grad():
        base = layer.model(*args, **kwargs)[0]
        got = ap.forward(base, kwargs["hidden_states"], layer.adaption_prompt.detach(), layer.adaption_gate.detach(),
                         dict(layer.model.state_dict()), num_heads=4, position_embeddings=kwargs["position_embeddings"],
                         peft_compat=True)
    assert got.dtype == torch.bfloat16
    want = out[0].float()
    scale = float((want - base.float()).abs().max())
    err = float((got.float() - want).abs().max())
    assert 0 < err <= 2.0**-6 * scale, (err, scale)  # 0 would mean one of them is not in bf16 at all
