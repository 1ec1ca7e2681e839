"""PEFT 0.21.2 parity of SHADOW (ShadowPEFT) on a tiny Llama built from a config (random weights, no download).

Checked: the checkpoint PEFT saves (every tensor's key and shape through ``split_checkpoint``), the trainable
count, the per-block injection / update against PEFT's ``ShadowLayer.shadow_inject`` / ``shadow_update`` on
given hidden states, the whole model's logits (peftmath's ``decoder_loop`` over the frozen base blocks, the
shadow backbone rebuilt from the checkpoint) against PEFT's, the merge refusals, and a checkpoint written by
peftmath loaded by ``PeftModel.from_pretrained`` with the same logits.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from tests.parity.conftest import require_peft, t2n

torch, peft = require_peft()
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import peftmath as pm
from peftmath.errors import CheckpointError, ShapeError, UnsupportedError
from peftmath.methods import shadow as sh

LLAMA = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
             "num_key_value_heads": 2}
CONFIGS = {
    "default_shape": {"r": 4},
    "wide_update": {"r": 3, "update_hidden_size": 7, "shadow_alpha": 0.7},
    "narrow_backbone": {"r": 3, "shadow_alpha": 0.9, "shadow_hidden_size": 8, "shadow_intermediate_size": 12},
    "trained_lm_head": {"r": 4, "shadow_alpha": 0.5, "modules_to_save": ["lm_head"]},
    "two_layer_backbone": {"r": 2, "shadow_alpha": 1.3, "shadow_num_hidden_layers": 2, "shadow_intermediate_size": 24},
}


def _base(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


def _peft(fields: dict, seed: int = 1):
    base = _base()
    torch.manual_seed(seed)
    cfg = peft.ShadowConfig(task_type="CAUSAL_LM", init_weights=False, shadow_dropout=0.0, **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, cfg).eval()
    return model


def _saved(model, tmp_path) -> tuple[dict, dict]:
    model.save_pretrained(tmp_path)
    tensors = safetensors_numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    return tensors, config


def _ours_config(config: dict) -> sh.ShadowConfig:
    cfg = sh.ShadowConfig.from_dict(config, strict=False)
    cfg.validate()
    return cfg


def _shadow_backbone(shared: dict, fields: dict):
    """The mirror backbone PEFT builds (the base's LlamaConfig with the shadow_* sizes set on it, as PEFT sets
    them on a copy), loaded with the checkpoint's backbone tensors. At the base width it has no embedding table
    (it reads the base embeddings); at another width it has its own and a projection to the base width."""
    cfg = transformers.LlamaConfig(**LLAMA)
    cfg.num_hidden_layers = fields.get("shadow_num_hidden_layers") or 1
    for ours, theirs in (("shadow_intermediate_size", "intermediate_size"), ("shadow_hidden_size", "hidden_size")):
        if fields.get(ours):
            setattr(cfg, theirs, fields[ours])
    backbone = transformers.LlamaModel(cfg).eval()
    prefix = "base_model.shadow_backbone.default."
    state = {k[len(prefix):]: torch.from_numpy(v) for k, v in shared.items() if k.startswith(prefix)}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    shares = cfg.hidden_size == LLAMA["hidden_size"]
    assert list(missing) == (["embed_tokens.weight"] if shares else []) and not unexpected
    projection = shared.get("base_model.shadow_projection.default.weight")
    assert (projection is None) == shares
    return backbone, shares, None if projection is None else torch.from_numpy(projection)


def _our_logits(base, blocks: dict, shared: dict, fields: dict, cfg: sh.ShadowConfig, ids, mask, replaced=None):
    """peftmath's forward: s0 from the backbone, decoder_loop over the frozen base blocks (called with the
    base model's own mask / rotary arguments, captured by a pre-hook), then the base's norm and head."""
    captured = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)
        raise _Stop

    layers = base.model.layers
    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        base(input_ids=ids, attention_mask=mask)
    except _Stop:
        pass
    finally:
        handle.remove()
    emb = base.model.embed_tokens(ids)
    backbone, shares, projection = _shadow_backbone(shared, fields)
    if shares:
        s0 = backbone(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    else:
        s0 = backbone(input_ids=ids, attention_mask=mask).last_hidden_state @ projection.T
    params = [{k: torch.from_numpy(v) for k, v in blocks[f"base_model.model.model.layers.{i}"].items()}
              for i in range(len(layers))]
    fns = [lambda x, L=L: L(x, **captured) for L in layers]
    h, _ = sh.decoder_loop(emb, s0, fns, params, shadow_alpha=cfg.shadow_alpha)
    head = (replaced or {}).get("base_model.model.lm_head.weight")
    if head is not None:  # the trained modules_to_save copy replaces the base head
        return base.model.norm(h) @ torch.from_numpy(head).T
    return base.lm_head(base.model.norm(h))


class _Stop(Exception):
    pass


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_peft_checkpoint_loads_and_logits_match(case, tmp_path):
    fields = CONFIGS[case]
    model = _peft(fields)
    if "modules_to_save" in fields:  # train the head copy so that it differs from the base head
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)
    tensors, config = _saved(model, tmp_path)
    cfg = _ours_config(config)
    blocks, shared, replaced = sh.split_checkpoint(tensors, cfg, LLAMA["hidden_size"])
    assert sorted(replaced) == (["base_model.model.lm_head.weight"] if "modules_to_save" in fields else [])
    assert sorted(blocks) == [f"base_model.model.model.layers.{i}" for i in range(3)]
    assert sh.num_trainable_parameters(blocks, shared, replaced) == model.get_nb_trainable_parameters()[0]
    # the core reads the same checkpoint (blocks as per-module tensors, the backbone as shared) and counts alike
    adapter = pm.load_adapter(tmp_path)
    assert adapter.num_trainable_parameters() == model.get_nb_trainable_parameters()[0]
    assert {f"base_model.model.{m}" for m in adapter.params} == set(blocks) and set(adapter.shared) == set(shared)
    torch.manual_seed(5)
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second row
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = _our_logits(_base(), blocks, shared, fields, cfg, ids, mask, replaced)
        plain = _base()(input_ids=ids, attention_mask=mask).logits
    assert float((want - plain).abs().max()) > 1e-3  # the shadow path changes the logits
    np.testing.assert_allclose(t2n(got), t2n(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_equations_match_peft_layer(dtype):
    model = _peft(CONFIGS["wide_update"]).to(dtype)
    layer = model.base_model.model.model.layers[1]
    torch.manual_seed(3)
    h = torch.randn(2, 5, 16, dtype=dtype)
    s = torch.randn(2, 5, 16, dtype=dtype)
    params = {k: v.detach() for k, v in
              ((f"{name}.default.{sub}", t) for name in ("shadow_down", "shadow_up", "shadow_update_transform",
                                                            "shadow_update_gate")
               for sub, t in getattr(layer, name)["default"].state_dict().items())}
    assert set(params) == set(sh.PARAMETER_SUFFIXES)
    with torch.no_grad():
        want_h = layer.shadow_inject(h, s, "default")
        want_s = layer.shadow_update(h, s, "default")
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-13}
    # on numpy (the reference backend) and on torch directly
    np_params = {k: t2n(v) for k, v in params.items()}
    np.testing.assert_allclose(sh.inject(t2n(h), t2n(s), np_params, shadow_alpha=0.7), t2n(want_h), **tol)
    np.testing.assert_allclose(sh.update(t2n(h), t2n(s), np_params), t2n(want_s), **tol)
    np.testing.assert_allclose(t2n(sh.inject(h, s, params, shadow_alpha=0.7)), t2n(want_h), **tol)
    np.testing.assert_allclose(t2n(sh.update(h, s, params)), t2n(want_s), **tol)


def test_ours_saved_peft_loads(tmp_path):
    fields = CONFIGS["wide_update"]
    model = _peft(fields)
    tensors, config = _saved(model, tmp_path / "peft")
    cfg = _ours_config(config)
    blocks, shared, _ = sh.split_checkpoint(tensors, cfg, LLAMA["hidden_size"])
    # new block tensors drawn by peftmath (random W_up so the injection is not a no-op)
    ours_cfg = sh.ShadowConfig(task_type="CAUSAL_LM", init_weights=False, **fields)
    new_blocks = {b: sh.init_block(ours_cfg, 16, seed=10 + i) for i, b in enumerate(sorted(blocks))}
    out = tmp_path / "ours"
    out.mkdir()
    safetensors_numpy.save_file(sh.checkpoint_tensors(new_blocks, shared), str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(ours_cfg.to_dict()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_base(), str(out)).eval()
    torch.manual_seed(6)
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = loaded(input_ids=ids, attention_mask=mask).logits
        got = _our_logits(_base(), new_blocks, shared, fields, ours_cfg, ids, mask)
    np.testing.assert_allclose(t2n(got), t2n(want), rtol=1e-4, atol=1e-5)
    layer = loaded.base_model.model.model.layers[2]
    np.testing.assert_array_equal(t2n(layer.shadow_up["default"].weight.detach()),
                                  new_blocks["base_model.model.model.layers.2"]["shadow_up.default.weight"])


def test_checkpoint_validation_refuses(tmp_path):
    model = _peft(CONFIGS["default_shape"])
    tensors, config = _saved(model, tmp_path)
    cfg = _ours_config(config)
    key = "base_model.model.model.layers.1.shadow_up.default.weight"
    bad = dict(tensors, **{key: np.zeros((16, 5), np.float32)})
    with pytest.raises(ShapeError, match="shadow_up"):
        sh.split_checkpoint(bad, cfg, 16)
    missing = {k: v for k, v in tensors.items() if k != key}
    with pytest.raises(CheckpointError, match="lacks"):
        sh.split_checkpoint(missing, cfg, 16)
    stray = dict(tensors, **{"base_model.model.lm_head.weight": np.zeros((64, 16), np.float32)})
    with pytest.raises(CheckpointError, match="lm_head"):
        sh.split_checkpoint(stray, cfg, 16)


def test_merge_refused_like_peft(tmp_path):
    model = _peft(CONFIGS["default_shape"])
    model.save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError):
        model.merge_and_unload()
    with pytest.raises(UnsupportedError):
        pm.load_adapter(tmp_path).merge({})
    with pytest.raises(UnsupportedError, match="input-dependent"):
        sh.merge(np.zeros((4, 4)))
    with pytest.raises(UnsupportedError, match="merged"):
        sh.unmerge(np.zeros((4, 4)))


def test_bfloat16_rounded_once_and_near_peft():
    """bfloat16: peftmath computes in float32 and rounds once (within half a bf16 ulp of float64); PEFT runs
    the adapter modules in bfloat16 and rounds after each op; the two are within a few bf16 ulps of each other."""
    model = _peft(CONFIGS["default_shape"]).to(torch.bfloat16)
    layer = model.base_model.model.model.layers[1]
    torch.manual_seed(4)
    h = torch.randn(2, 5, 16).to(torch.bfloat16)
    s = torch.randn(2, 5, 16).to(torch.bfloat16)
    params = {f"{name}.default.{sub}": t.detach() for name in ("shadow_down", "shadow_up", "shadow_update_transform",
                                                               "shadow_update_gate")
              for sub, t in getattr(layer, name)["default"].state_dict().items()}
    p64 = {k: v.double() for k, v in params.items()}
    alpha = model.peft_config["default"].shadow_alpha
    with torch.no_grad():
        peft_out = (layer.shadow_inject(h, s, "default"), layer.shadow_update(h, s, "default"))
    ours = (sh.inject(h, s, params, shadow_alpha=alpha), sh.update(h, s, params))
    ref = (sh.inject(h.double(), s.double(), p64, shadow_alpha=alpha), sh.update(h.double(), s.double(), p64))
    for got, theirs, want in zip(ours, peft_out, ref):
        assert got.dtype == torch.bfloat16
        err = (got.double() - want).abs()
        assert bool((err <= 2.0 ** -8 * want.abs() + 1e-30).all()), float(err.max())
        np.testing.assert_allclose(t2n(got.float()), t2n(theirs.float()), rtol=2.0 ** -6, atol=2.0 ** -6)


def test_sequence_classification_checkpoint_count_and_logits(tmp_path):
    """SEQ_CLS: PEFT saves the trained `score` copy (modules_to_save) and a classifier copy as
    `shadow_head` (used by the auxiliary loss only); the logits are the score head on the last token."""
    torch.manual_seed(0)
    cls_cfg = transformers.LlamaConfig(**LLAMA, num_labels=3, pad_token_id=0)
    base = transformers.LlamaForSequenceClassification(cls_cfg).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.ShadowConfig(task_type="SEQ_CLS", r=4, init_weights=False,
                                                            shadow_dropout=0.0)).eval()
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["default"].weight.mul_(1.5)
    tensors, config = _saved(model, tmp_path)
    cfg = _ours_config(config)
    blocks, shared, replaced = sh.split_checkpoint(tensors, cfg, LLAMA["hidden_size"])
    assert sorted(replaced) == ["base_model.model.score.weight"]
    assert "base_model.shadow_head.default.weight" in shared
    assert sh.num_trainable_parameters(blocks, shared, replaced) == model.get_nb_trainable_parameters()[0]
    assert pm.load_adapter(tmp_path).num_trainable_parameters() == model.get_nb_trainable_parameters()[0]
    ids = torch.randint(1, LLAMA["vocab_size"], (2, 5))  # no pad token: the last position is pooled
    mask = torch.ones_like(ids)
    plain = transformers.LlamaForSequenceClassification(cls_cfg).eval()
    plain.load_state_dict(state)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        hidden = _our_logits(_as_causal(plain), blocks, shared, {}, cfg, ids, mask,
                             {"base_model.model.lm_head.weight": tensors["base_model.model.score.weight"]})
    np.testing.assert_allclose(t2n(hidden[:, -1]), t2n(want), rtol=1e-4, atol=1e-5)


def _as_causal(cls_model):
    """The classifier's decoder as a causal-LM-shaped object (model + a head slot) for _our_logits."""
    wrapper = torch.nn.Module()
    wrapper.model = cls_model.model
    wrapper.lm_head = cls_model.score
    wrapper.forward = lambda **kw: cls_model.model(**kw)
    return wrapper
