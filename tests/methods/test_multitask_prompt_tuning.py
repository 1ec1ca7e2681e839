"""Multitask prompt tuning: task prompts against a float64 loop, init, source inits, checkpoint checks, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftmath as pm
from peftmath.errors import ConfigError, ShapeError, UnsupportedError
from peftmath.methods import multitask_prompt_tuning as mpt
from tests.helpers import assert_same_namespace, to_np, to_xp


def _cfg(t=3, d=4, tasks=2, ranks=2, s=1, **kw):
    return mpt.MultitaskPromptTuningConfig(num_virtual_tokens=t, token_dim=d, num_tasks=tasks, num_ranks=ranks,
                                           num_transformer_submodules=s, **kw)


def _tables(rng, cfg):
    return {k: rng.standard_normal(s) for k, s in cfg.table_shapes().items()}


def _reference(tables, ids):
    """Entry by entry: out[b, i, j] = P[i, j] * sum_k U[t_b, i, k] V[t_b, k, j]."""
    p, u, v = (np.asarray(tables[k], dtype=np.float64) for k in mpt.SHARED_KEYS)
    out = np.zeros((len(ids),) + p.shape)
    for b, t in enumerate(ids):
        for i in range(p.shape[0]):
            for j in range(p.shape[1]):
                out[b, i, j] = p[i, j] * sum(u[t, i, k] * v[t, k, j] for k in range(u.shape[2]))
    return out


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 3), d=st.integers(1, 4), tasks=st.integers(1, 3),
       ranks=st.integers(1, 3), s=st.sampled_from([1, 2]), batch=st.integers(0, 3))
def test_task_prompts_match_the_entrywise_formula(xp, seed, t, d, tasks, ranks, s, batch):
    rng = np.random.default_rng(seed)
    cfg = _cfg(t, d, tasks, ranks, s)
    tables = _tables(rng, cfg)
    ids = rng.integers(0, tasks, size=batch).tolist()
    got = mpt.task_prompts({k: to_xp(xp, v) for k, v in tables.items()}, ids)
    assert_same_namespace(xp, got)
    assert got.shape == (batch, t * s, d)
    np.testing.assert_allclose(to_np(got), _reference(tables, ids), rtol=1e-5, atol=1e-6)


def test_layouts_and_read_only_inputs_give_the_same_prompts():
    rng = np.random.default_rng(0)
    cfg = _cfg(4, 5, 3, 2)
    tables = _tables(rng, cfg)
    expected = _reference(tables, [2, 1])
    odd = {"prompt_embeddings": np.asfortranarray(tables["prompt_embeddings"]),
           "prefix_task_cols": np.ascontiguousarray(np.swapaxes(tables["prefix_task_cols"], 1, 2)).swapaxes(1, 2),
           "prefix_task_rows": np.repeat(tables["prefix_task_rows"], 2, axis=2)[:, :, ::2]}
    for a in odd.values():
        a.flags.writeable = False
    before = {k: v.copy() for k, v in odd.items()}
    np.testing.assert_allclose(mpt.task_prompts(odd, np.array([2, 1])), expected, rtol=1e-12)
    for k, a in odd.items():
        np.testing.assert_array_equal(a, before[k])
    torch = pytest.importorskip("torch")
    got = mpt.task_prompts({k: torch.tensor(v, dtype=torch.float32) for k, v in tables.items()}, torch.tensor([2, 1]))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_bad_task_ids_and_tables_are_refused():
    tables = _tables(np.random.default_rng(1), _cfg())
    for ids in ([2], [-1], np.array([0, 5]), [[0]]):
        with pytest.raises(ShapeError, match="task"):
            mpt.task_prompts(tables, ids)
    with pytest.raises(ShapeError, match="do not fit"):
        mpt.task_prompts({**tables, "prefix_task_rows": tables["prefix_task_rows"][:, :1]}, [0])


def test_init_shapes_distributions_and_text():
    cfg = _cfg(8, 64, 3, 4)
    tables = mpt.init_tables(cfg, seed=1)
    assert {k: tuple(v.shape) for k, v in tables.items()} == cfg.table_shapes()
    assert all(np.asarray(v).dtype == np.float32 for v in tables.values())
    assert abs(np.std(tables["prompt_embeddings"]) - 1) < 0.1
    for k in ("prefix_task_cols", "prefix_task_rows"):
        assert abs(np.std(tables[k]) - mpt.TASK_STD) < 0.005 and abs(np.mean(tables[k])) < 0.005
    vocab = np.random.default_rng(2).standard_normal((10, 64))
    text = mpt.init_tables(_cfg(8, 64, 3, 4, prompt_tuning_init="TEXT"), word_embeddings=vocab, token_ids=[3, 7, 1])
    np.testing.assert_array_equal(text["prompt_embeddings"], vocab[[3, 7, 1, 3, 7, 1, 3, 7]].astype(np.float32))
    again = mpt.init_tables(cfg, seed=1)
    for k in tables:
        np.testing.assert_array_equal(tables[k], again[k])


def test_source_inits_against_direct_indexing():
    rng = np.random.default_rng(3)
    src = _tables(rng, _cfg(tasks=4))
    exact = mpt.init_from_source(_cfg(tasks=1, prompt_tuning_init="EXACT_SOURCE_TASK", prompt_tuning_init_task=3), src)
    np.testing.assert_array_equal(exact["prefix_task_cols"][0], src["prefix_task_cols"][3])
    avg = mpt.init_from_source(_cfg(tasks=1, prompt_tuning_init="AVERAGE_SOURCE_TASKS"), src)
    np.testing.assert_allclose(avg["prefix_task_rows"][0], sum(src["prefix_task_rows"]) / 4, rtol=1e-12)
    shared = mpt.init_tables(_cfg(tasks=2, prompt_tuning_init="ONLY_SOURCE_SHARED"), source=src)
    np.testing.assert_array_equal(shared["prompt_embeddings"], src["prompt_embeddings"])
    assert shared["prefix_task_cols"].shape == (2, 3, 2)
    with pytest.raises(ShapeError, match="num_tasks"):
        mpt.init_from_source(_cfg(tasks=2, prompt_tuning_init="EXACT_SOURCE_TASK"), src)
    with pytest.raises(ShapeError, match="4 tasks"):
        mpt.init_from_source(_cfg(tasks=1, prompt_tuning_init="EXACT_SOURCE_TASK", prompt_tuning_init_task=4), src)
    with pytest.raises(ConfigError, match="source="):
        mpt.init_tables(_cfg(prompt_tuning_init="ONLY_SOURCE_SHARED"))
    with pytest.raises(ShapeError, match="prefix_task_rows"):
        mpt.init_from_source(_cfg(tasks=1, prompt_tuning_init="AVERAGE_SOURCE_TASKS"),
                             {k: v for k, v in src.items() if k != "prefix_task_rows"})


def test_config_checks():
    for bad in ({"num_tasks": 0}, {"num_ranks": None}, {"prompt_tuning_init": "NOPE"},
                {"prompt_tuning_init_task": -1}, {"num_ranks": True}):
        with pytest.raises(ConfigError):
            _cfg(tasks=2).replace(**bad).validate()
    _cfg(prompt_tuning_init="EXACT_SOURCE_TASK").validate()


def test_adapter_checkpoint_round_trip_and_refusals(tmp_path):
    cfg = _cfg(2, 4, 3, 2, s=2, task_type="SEQ_2_SEQ_LM")
    tables = mpt.init_tables(cfg, seed=4)
    ad = pm.Adapter(cfg, {}, shared=tables)
    assert ad.is_prompt_learning and ad.num_trainable_parameters() == 4 * 4 + 3 * 4 * 2 + 3 * 2 * 4
    pm.save_adapter(ad, tmp_path)
    back = pm.load_adapter(tmp_path)
    for k in mpt.SHARED_KEYS:
        np.testing.assert_array_equal(np.asarray(back.shared[k]), tables[k])
    np.testing.assert_array_equal(back.prompt_embeddings(), tables["prompt_embeddings"])
    with pytest.raises(UnsupportedError, match="virtual tokens"):
        back.merge({"x.weight": np.zeros((2, 2))})
    with pytest.raises(ShapeError, match="prefix_task_cols"):
        mpt.validate_checkpoint(cfg, {**tables, "prefix_task_cols": tables["prefix_task_cols"][:2]})
    with pytest.raises(ShapeError, match="no"):
        mpt.validate_checkpoint(cfg, {"prompt_embeddings": tables["prompt_embeddings"]})
