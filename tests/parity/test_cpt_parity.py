"""PEFT parity of CPT (context-aware prompt tuning) on a tiny Llama (grouped-query attention).

Checked against PEFT 0.21.2: the initial prompt (context embeddings), the projected delta and the prompt
PEFT prepends in eval mode, the saved prompt_embeddings, the logits with the prompt prepended, CPT's labels /
type mask and its (decayed) loss, the trainable count, and peftmath's checkpoint in
``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import require_peft

torch, peft = require_peft()
transformers = pytest.importorskip("transformers")

import peftmath as pm
from peftmath.methods import cpt, prompt_tuning
from tests.parity.test_prompt_parity import _llama

IDS = [5, 9, 1, 33, 7, 2, 40, 3]
TYPES = [1, 2, 2, 3, 4, 5, 6, 8]  # two examples: template, input x2, template, label; template, input, label


def _peft(model, **kw):
    kw = {"task_type": "CAUSAL_LM", "cpt_token_ids": IDS, "cpt_tokens_type_mask": TYPES,
          "cpt_mask": [1] * len(IDS), "opt_projection_epsilon": 0.3, "opt_projection_format_epsilon": 0.2, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.CPTConfig(**kw))


def _np(t) -> np.ndarray:
    return t.detach().numpy()


def _ours(pm_, model):
    raw = {k: (v.value if hasattr(v, "value") else v) for k, v in vars(pm_.peft_config["default"]).items()}
    for k in ("token_dim", "num_layers", "num_attention_heads", "is_prompt_learning", "encoder_hidden_size"):
        raw.pop(k, None)
    return cpt.CPTConfig.from_dict(raw).resolve(model.config.to_dict())


def _with_delta(pm_, seed=3, scale=0.3):
    """A delta with some rows longer than their radius and some shorter (radii 0.0177 / 0.0265 at D = 16)."""
    g = torch.Generator().manual_seed(seed)
    enc = pm_.prompt_encoder["default"]
    with torch.no_grad():
        d = torch.randn(enc.delta_embedding.weight.shape, generator=g)
        d *= torch.tensor([scale, 0.001, scale, 0.002, scale, scale, 0.001, scale])[:, None]
        enc.delta_embedding.weight.copy_(d)
    return d.numpy()


def test_init_projection_prompt_and_logits_match_peft(tmp_path):
    model = _llama()
    pm_ = _peft(model)
    ours = _ours(pm_, model)
    vocab = _np(model.get_input_embeddings().weight)
    emb, delta0 = cpt.init_prompt(ours, vocab)
    enc = pm_.prompt_encoder["default"]
    np.testing.assert_array_equal(emb, _np(enc.embedding.weight))
    np.testing.assert_array_equal(delta0, _np(enc.delta_embedding.weight))
    np.testing.assert_allclose(np.asarray(cpt.epsilon(ours), dtype=np.float32), _np(enc.get_epsilon()), rtol=1e-6)
    delta = _with_delta(pm_)
    with torch.no_grad():
        proj = _np(enc.get_projection())
    got = np.asarray(cpt.project(delta, ours))
    np.testing.assert_allclose(got, proj, rtol=1e-6, atol=1e-8)
    norms = np.linalg.norm(got, axis=1)  # independent check: the radii bound the rows
    assert np.all(norms <= np.asarray(cpt.epsilon(ours)) * (1 + 1e-6)) and norms.min() < 0.01
    table = np.asarray(cpt.prompt(emb, delta, ours))
    with torch.no_grad():
        theirs = _np(pm_.get_prompt(batch_size=2))
    np.testing.assert_allclose(np.broadcast_to(table, theirs.shape), theirs, rtol=1e-6, atol=1e-7)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 0] = 0
    with torch.no_grad():
        expected = _np(pm_(input_ids=ids, attention_mask=mask).logits)
        embeds = _np(model.get_input_embeddings()(ids))
    e, m, _ = prompt_tuning.prepend(table, embeds, attention_mask=_np(mask))
    with torch.no_grad():
        logits = _np(model(inputs_embeds=torch.tensor(e), attention_mask=torch.tensor(m)).logits)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    # what PEFT saves is the prompt it prepends; PEFT's count trains the whole delta
    pm_.save_pretrained(tmp_path)
    ad = pm.load_adapter(tmp_path)
    np.testing.assert_allclose(np.asarray(ad.prompt_embeddings()), table, rtol=1e-6, atol=1e-7)
    assert ad.num_trainable_parameters() == pm_.get_nb_trainable_parameters()[0] == cpt.trainable_parameters(ours)
    for k in ("cpt_token_ids", "cpt_tokens_type_mask", "opt_projection_epsilon"):
        assert getattr(ad.config, k) == getattr(ours, k)


@pytest.mark.parametrize("weighting", [("none", 1.0), ("decay", 0.5)])
@pytest.mark.parametrize("with_types", [False, True])
def test_labels_type_mask_and_loss_match_peft(weighting, with_types):
    model = _llama()
    pm_ = _peft(model, opt_weighted_loss_type=weighting[0], opt_loss_decay_factor=weighting[1])
    _with_delta(pm_, seed=4)
    ours = _ours(pm_, model)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (2, 6), generator=g)
    labels = torch.randint(0, 64, (2, 6), generator=g)
    kwargs = {}
    types = None
    if with_types:
        types = torch.tensor([[1, 2, 2, 3, 4, 4], [1, 2, 3, 4, 0, 0]])
        kwargs["input_type_mask"] = types.clone()  # PEFT shifts it in place
    with torch.no_grad():
        out = pm_(input_ids=ids, labels=labels, **kwargs)
    cl, ct = cpt.labels_and_type_mask(ours, _np(labels), None if types is None else _np(types))
    if types is not None:
        np.testing.assert_array_equal(_np(types), [[1, 2, 2, 3, 4, 4], [1, 2, 3, 4, 0, 0]])  # ours: untouched
        np.testing.assert_array_equal(ct[:, 8:], np.where(_np(types) > 0, _np(types) + 8, 0))
    assert ct.shape == cl.shape == (2, 14)
    np.testing.assert_array_equal(cl[:, :8], np.where(np.array(TYPES) % 4 == 0, IDS, -100)[None].repeat(2, 0))
    got = float(cpt.loss(_np(out.logits), cl, ct, ours))
    np.testing.assert_allclose(got, float(out.loss), rtol=1e-5)
    # float64 reference with its own loops: per-position cross-entropy, weight gamma^(label types above)
    z = _np(out.logits).astype(np.float64)[:, :-1]
    tgt, typ = cl[:, 1:], ct[:, 1:]
    total, n = 0.0, 0
    for b in range(2):
        labels_b = sorted({int(t) for t in typ[b] if t > 0 and t % 4 == 0})
        for j in range(tgt.shape[1]):
            if tgt[b, j] == -100:
                continue
            ce = np.log(np.exp(z[b, j] - z[b, j].max()).sum()) + z[b, j].max() - z[b, j, tgt[b, j]]
            w = weighting[1] ** sum(1 for t in labels_b if t > typ[b, j]) if weighting[0] == "decay" else 1.0
            total, n = total + ce * w, n + 1
    np.testing.assert_allclose(got, total / n, rtol=1e-5)


def test_peftmath_checkpoint_loads_in_peft(tmp_path):
    model = _llama()
    ours = cpt.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=IDS, cpt_tokens_type_mask=TYPES).resolve(
        model.config.to_dict())
    emb, delta = cpt.init_prompt(ours, _np(model.get_input_embeddings().weight))
    delta = np.random.default_rng(0).standard_normal(delta.shape).astype(np.float32)
    table = np.asarray(cpt.prompt(emb, delta, ours))
    pm.save_adapter(pm.Adapter(ours, {}, shared={"prompt_embeddings": table}), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(_llama(), tmp_path)
    with torch.no_grad():
        theirs = _np(reloaded.get_prompt(batch_size=1))[0]
    np.testing.assert_array_equal(theirs, table)
    assert reloaded.peft_config["default"].cpt_tokens_type_mask == TYPES
