"""CPT: radii, projection, prompt, labels / type mask and loss against float64 loops, on every backend; refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftmath as pm
from peftmath.errors import ConfigError, ShapeError, UnsupportedError
from peftmath.methods import cpt
from tests.helpers import assert_same_namespace, to_np, to_xp


def _cfg(types, d=4, **kw):
    return cpt.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=list(range(len(types))), cpt_tokens_type_mask=types,
                         token_dim=d, **kw)


def _radius(t, d, eps_in=0.1, eps_fmt=0.1):
    if t > 0 and t % 4 in (1, 3):
        return eps_fmt * math.sqrt(d / 2048)
    if t > 0 and t % 4 == 2:
        return eps_in * math.sqrt(d / 2048)
    return 1e-10


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), types=st.lists(st.integers(0, 9), min_size=1, max_size=6),
       d=st.integers(1, 5), scale=st.sampled_from([0.0, 1e-3, 1.0]))
def test_projection_clips_each_row_to_its_radius(xp, seed, types, d, scale):
    cfg = _cfg(types, d, opt_projection_epsilon=0.3, opt_projection_format_epsilon=0.2)
    rng = np.random.default_rng(seed)
    delta = rng.standard_normal((len(types), d)) * scale
    emb = rng.standard_normal((len(types), d))
    got = cpt.prompt(to_xp(xp, emb), to_xp(xp, delta), cfg)
    assert_same_namespace(xp, got)
    expected = emb.copy()
    for i, t in enumerate(types):
        r, n = _radius(t, d, 0.3, 0.2), float(np.sqrt(np.sum(delta[i] ** 2)))
        expected[i] += delta[i] * (r / n if n > r else 1.0)
    np.testing.assert_allclose(to_np(got), expected, rtol=1e-5, atol=1e-12)
    assert cpt.epsilon(cfg) == pytest.approx([_radius(t, d, 0.3, 0.2) for t in types])


def test_projection_layouts_dtypes_and_idempotence():
    cfg = _cfg([1, 2, 3, 4, 0], d=6)
    rng = np.random.default_rng(1)
    delta = rng.standard_normal((6, 5)).T  # Fortran-ordered (5, 6)
    delta.flags.writeable = False
    once = cpt.project(delta, cfg)
    np.testing.assert_allclose(cpt.project(once, cfg), once, rtol=1e-12)
    np.testing.assert_allclose(cpt.project(np.ascontiguousarray(delta), cfg), once, rtol=0)
    torch = pytest.importorskip("torch")
    t = cpt.project(torch.tensor(delta, dtype=torch.float32), cfg)
    assert t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), once, rtol=1e-5, atol=1e-9)
    assert cpt.trained_rows(cfg) == [True, True, True, False, False]


def test_init_takes_the_context_rows():
    vocab = np.arange(30.0).reshape(10, 3)
    cfg = cpt.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[4, 0, 9], token_dim=3)
    emb, delta = cpt.init_prompt(cfg, vocab)
    np.testing.assert_array_equal(emb, vocab[[4, 0, 9]].astype(np.float32))
    assert emb.dtype == np.float32 and not delta.any() and delta.shape == (3, 3)
    with pytest.raises(ShapeError, match="outside the vocabulary"):
        cpt.init_prompt(cfg.replace(cpt_token_ids=[4, 0, 10]), vocab)
    with pytest.raises(ShapeError, match="columns"):
        cpt.init_prompt(cfg, vocab[:, :2])


def _loss_reference(logits, labels, types, factor):
    z, tgt, typ = logits[:, :-1].astype(np.float64), labels[:, 1:], types[:, 1:]
    total, n = 0.0, 0
    for b in range(z.shape[0]):
        above = sorted({int(t) for t in typ[b] if t > 0 and t % 4 == 0})
        for j in range(z.shape[1]):
            if tgt[b, j] == -100:
                continue
            ce = -z[b, j, tgt[b, j]] + np.log(np.sum(np.exp(z[b, j])))
            label = typ[b, j] > 0 and typ[b, j] % 4 == 0
            total += ce * (factor ** sum(1 for t in above if t > typ[b, j]) if factor is not None and label else 1.0)
            n += 1
    return total / n


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), decay=st.booleans(), given_types=st.booleans())
def test_labels_and_loss_match_float64_loops(xp, seed, decay, given_types):
    rng = np.random.default_rng(seed)
    cfg = _cfg([1, 2, 4, 1, 2, 4], d=3, opt_weighted_loss_type="decay" if decay else "none",
               opt_loss_decay_factor=0.7)
    b, length, v = 2, 5, 7
    labels = rng.integers(0, v, (b, length))
    types = rng.integers(0, 5, (b, length)) if given_types else None
    cl, ct = cpt.labels_and_type_mask(cfg, to_xp(xp, labels), None if types is None else to_xp(xp, types))
    assert_same_namespace(xp, cl, ct)
    cl, ct = to_np(cl).astype(np.int64), to_np(ct).astype(np.int64)
    raw_types = np.full((b, length), 4) if types is None else types
    exp_types = np.concatenate([np.tile([1, 2, 4, 1, 2, 4], (b, 1)), np.where(raw_types > 0, raw_types + 4, 0)], 1)
    np.testing.assert_array_equal(ct, exp_types)
    all_labels = np.concatenate([np.tile(np.arange(6), (b, 1)), labels], 1)
    np.testing.assert_array_equal(cl, np.where((exp_types > 0) & (exp_types % 4 == 0), all_labels, -100))
    logits = rng.standard_normal((b, 6 + length, v))
    got = cpt.loss(to_xp(xp, logits), to_xp(xp, cl), to_xp(xp, ct), cfg)
    np.testing.assert_allclose(float(got), _loss_reference(logits, cl, ct, 0.7 if decay else None), rtol=1e-5)


def test_config_defaults_and_checks():
    c = cpt.CPTConfig(task_type="CAUSAL_LM")
    assert (c.cpt_token_ids, c.cpt_mask, c.cpt_tokens_type_mask, c.num_virtual_tokens) == ([0], [1], [1], 1)
    c.validate()
    bad = [{"task_type": "SEQ_2_SEQ_LM"}, {"cpt_mask": [1, 1]}, {"num_virtual_tokens": 3},
           {"opt_weighted_loss_type": "linear"}, {"opt_projection_epsilon": -1.0}, {"cpt_token_ids": [-1]},
           {"num_transformer_submodules": 2}, {"cpt_tokens_type_mask": [1.5]}]
    for change in bad:
        with pytest.raises(ConfigError):
            c.replace(**change)


def test_checkpoint_round_trip_and_refusals(tmp_path):
    cfg = _cfg([1, 2, 4], d=4)
    table = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    ad = pm.Adapter(cfg, {}, shared={"prompt_embeddings": table})
    assert ad.num_trainable_parameters() == 12
    pm.save_adapter(ad, tmp_path)
    back = pm.load_adapter(tmp_path)
    np.testing.assert_array_equal(back.prompt_embeddings(), table)
    assert back.config.cpt_tokens_type_mask == [1, 2, 4]
    with pytest.raises(UnsupportedError, match="virtual tokens"):
        back.merge({"x.weight": np.zeros((2, 2))})
    with pytest.raises(ShapeError, match="prompt_embeddings"):
        cpt.validate_checkpoint(cfg, {"prompt_embeddings": table[:2]})
    with pytest.raises(ShapeError, match="delta"):
        cpt.project(table[:2], cfg)
    with pytest.raises(ShapeError, match="must be"):
        cpt.loss(np.zeros((1, 4, 3)), np.zeros((1, 3)), np.zeros((1, 4)), cfg)
