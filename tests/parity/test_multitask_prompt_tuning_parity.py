"""PEFT parity of multitask prompt tuning on a tiny Llama (grouped-query attention) and a tiny T5.

Checked against PEFT 0.21.2: the saved keys and shapes, the task prompts ``get_prompt(B, task_ids)``,
the logits with each batch row's task prompt prepended, the source-task inits, the trainable count, and
peftmath's checkpoint loaded by ``PeftModel.from_pretrained`` with the same prompts.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import require_peft

torch, peft = require_peft()
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import peftmath as pm
from peftmath.methods import multitask_prompt_tuning as mpt
from peftmath.methods import prompt_tuning
from tests.parity.test_prompt_parity import _llama as _model


def _peft(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.MultitaskPromptTuningConfig(**kw))


def _np(t) -> np.ndarray:
    return t.detach().numpy()


def _trained(pm_, seed=5):
    """Non-trivial tables (PEFT's init is random already; this makes U V far from 0 too)."""
    g = torch.Generator().manual_seed(seed)
    enc = pm_.prompt_encoder["default"]
    with torch.no_grad():
        for p in (enc.prefix_task_cols, enc.prefix_task_rows):
            p.copy_(torch.randn(p.shape, generator=g))
    return pm_


@pytest.mark.parametrize("seq2seq", [False, True])
def test_saved_keys_shapes_task_prompts_and_count(tmp_path, seq2seq):
    task = "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"
    pm_ = _trained(_peft(_model(seq2seq), task_type=task, num_virtual_tokens=3, num_tasks=3, num_ranks=2))
    pm_.save_pretrained(tmp_path)
    saved = safetensors_numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    ad = pm.load_adapter(tmp_path)
    s = 2 if seq2seq else 1
    assert {k: v.shape for k, v in saved.items()} == ad.config.table_shapes() == {
        "prompt_embeddings": (3 * s, 16), "prefix_task_cols": (3, 3 * s, 2), "prefix_task_rows": (3, 2, 16)}
    for k in mpt.SHARED_KEYS:
        np.testing.assert_array_equal(np.asarray(ad.shared[k]), saved[k])
    ids = [2, 0, 1, 2]
    with torch.no_grad():
        expected = _np(pm_.get_prompt(batch_size=4, task_ids=torch.tensor(ids)))
    got = np.asarray(mpt.task_prompts(ad.shared, ids))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    # float64 reference: P * (U_t V_t) row by row
    p, u, v = (saved[k].astype(np.float64) for k in mpt.SHARED_KEYS)
    np.testing.assert_allclose(got, np.stack([p * (u[t] @ v[t]) for t in ids]), rtol=1e-5, atol=1e-6)
    assert ad.num_trainable_parameters() == pm_.get_nb_trainable_parameters()[0] == mpt.trainable_parameters(ad.config)


def test_logits_with_each_rows_task_prompt_match_peft():
    model = _model()
    pm_ = _trained(_peft(model, task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=2, num_ranks=3))
    enc = pm_.prompt_encoder["default"]
    tables = {"prompt_embeddings": _np(enc.embedding.weight), "prefix_task_cols": _np(enc.prefix_task_cols),
              "prefix_task_rows": _np(enc.prefix_task_rows)}
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 0] = 0
    tasks = torch.tensor([1, 0, 1])
    with torch.no_grad():
        expected = _np(pm_(input_ids=ids, attention_mask=mask, task_ids=tasks).logits)
        embeds = _np(model.get_input_embeddings()(ids))
    prompts = np.asarray(mpt.task_prompts(tables, tasks.numpy()))
    rows = [prompt_tuning.prepend(prompts[b], embeds[b:b + 1], attention_mask=_np(mask[b:b + 1])) for b in range(3)]
    e = np.concatenate([r[0] for r in rows])
    m = np.concatenate([r[1] for r in rows])
    with torch.no_grad():
        got = _np(model(inputs_embeds=torch.tensor(e), attention_mask=torch.tensor(m)).logits)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_peftmath_checkpoint_loads_in_peft_with_the_same_prompts(tmp_path):
    cfg = mpt.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, num_tasks=2, num_ranks=2)
    cfg = cfg.resolve(_model().config.to_dict())
    tables = mpt.init_tables(cfg, seed=7)
    ad = pm.Adapter(cfg, {}, shared=dict(tables))
    pm.save_adapter(ad, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(_model(), tmp_path)
    with torch.no_grad():
        theirs = _np(reloaded.get_prompt(batch_size=2, task_ids=torch.tensor([1, 0])))
    np.testing.assert_allclose(np.asarray(mpt.task_prompts(tables, [1, 0])), theirs, rtol=1e-6, atol=1e-7)
    enc = reloaded.prompt_encoder["default"]
    np.testing.assert_array_equal(_np(enc.prefix_task_cols), tables["prefix_task_cols"])
    # PEFT's init distributions: U, V ~ N(0, 0.02^2); P ~ N(0, 1)
    assert abs(float(np.std(tables["prefix_task_rows"])) - 0.02) < 0.01
    assert abs(float(np.std(tables["prompt_embeddings"])) - 1.0) < 0.35


@pytest.mark.parametrize("init", ["EXACT_SOURCE_TASK", "AVERAGE_SOURCE_TASKS", "ONLY_SOURCE_SHARED"])
def test_source_task_inits_match_peft(tmp_path, init):
    source = _trained(_peft(_model(), task_type="CAUSAL_LM", num_virtual_tokens=3, num_tasks=3, num_ranks=2))
    source.save_pretrained(tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    saved = safetensors_numpy.load_file(path)
    kw = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "num_tasks": 1, "num_ranks": 2,
          "prompt_tuning_init": init, "prompt_tuning_init_state_dict_path": path, "prompt_tuning_init_task": 2}
    target = _peft(_model(), **kw)
    enc = target.prompt_encoder["default"]
    ours = mpt.init_from_source(mpt.MultitaskPromptTuningConfig(**kw).resolve(_model().config.to_dict()), saved)
    np.testing.assert_array_equal(np.asarray(ours["prompt_embeddings"]), _np(enc.embedding.weight))
    if init != "ONLY_SOURCE_SHARED":
        for k in ("prefix_task_cols", "prefix_task_rows"):
            np.testing.assert_allclose(np.asarray(ours[k]), _np(getattr(enc, k)), rtol=1e-6, atol=1e-7)
    else:
        assert set(ours) == {"prompt_embeddings"}
