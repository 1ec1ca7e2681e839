"""Cartridges: the table's layout, its frozen rows, the cache round trip, composition and the adapter API,
against index formulas written out here (float64 / exact), on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import peftmath as pm
from peftmath.adapter import Adapter
from peftmath.errors import ConfigError, ShapeError, UnsupportedError
from peftmath.methods import cartridge
from tests.helpers import assert_same_namespace, to_np, to_xp


def _cfg(t, d, layers, heads, f=1, s=1):
    return cartridge.CartridgeConfig(num_virtual_tokens=t, token_dim=d, num_layers=layers, num_attention_heads=heads,
                                     num_transformer_submodules=s, num_frozen_tokens=f)


@given(t=st.integers(1, 4), heads=st.integers(1, 3), d=st.integers(1, 3), layers=st.integers(1, 3),
       batch=st.integers(1, 3))
def test_cache_layout_is_the_index_formula_and_its_inverse(xp, t, heads, d, layers, batch):
    """Element (t, ((2ℓ + j)·H + h)·d + e) of the table is layer ℓ's key (j=0) / value (j=1), head h, channel e;
    table_from_past_key_values of one batch row gives the table back exactly."""
    cfg = _cfg(t, heads * d, layers, heads, f=min(1, t))
    host = np.arange(t * 2 * layers * heads * d, dtype=np.float64).reshape(t, -1)
    pkv = cartridge.past_key_values(to_xp(xp, host), cfg, batch)
    assert len(pkv) == layers
    for layer, (k, v) in enumerate(pkv):
        assert_same_namespace(xp, k, v)
        for j, arr in enumerate((to_np(k), to_np(v))):
            assert arr.shape == (batch, heads, t, d)
            for h in range(heads):
                for e in range(d):
                    want = host[:, ((2 * layer + j) * heads + h) * d + e]
                    np.testing.assert_array_equal(arr[:, h, :, e], np.broadcast_to(want, (batch, t)))
    back = cartridge.table_from_past_key_values([(k[:1, ...], v[:1, ...]) for k, v in pkv], t)
    assert_same_namespace(xp, back)
    np.testing.assert_array_equal(to_np(back), host)


def test_table_from_a_longer_cache_takes_the_first_tokens():
    rng = np.random.default_rng(0)
    cache = [(rng.standard_normal((1, 2, 5, 3)), rng.standard_normal((1, 2, 5, 3))) for _ in range(2)]
    table = cartridge.table_from_past_key_values(cache, 3)
    # written out: row t = [k0[:, t], v0[:, t], k1[:, t], v1[:, t]], heads then channels
    want = np.stack([np.concatenate([a[0, :, i, :].ravel() for kv in cache for a in kv]) for i in range(3)])
    np.testing.assert_array_equal(table, want)
    # read-only, strided and Fortran-ordered caches give the same table
    odd = []
    for k, v in cache:
        k2 = np.asfortranarray(k)
        v2 = np.repeat(v, 2, axis=3)[..., ::2]
        k2.flags.writeable = False
        odd.append((k2, v2))
    np.testing.assert_array_equal(cartridge.table_from_past_key_values(odd, 3), want)


def test_frozen_rows_and_the_trainable_count(xp):
    for f in (0, 1, 3):
        cfg = _cfg(3, 4, 2, 2, f=f)
        table = cartridge.init_cartridge(cfg, seed=2, xp=xp)
        assert table.shape == (3, 16) and table.dtype == xp.float32
        frozen, trained = cartridge.split_frozen(table, cfg)
        assert (frozen is None) == (f == 0)
        joined = trained if frozen is None else xp.concat([frozen, trained], axis=0)
        np.testing.assert_array_equal(to_np(joined), to_np(table))
        assert cartridge.trainable_parameters(cfg) == int(np.prod(trained.shape)) == (3 - f) * 16


def test_init_is_standard_normal_and_seeded():
    cfg = _cfg(64, 32, 4, 4)
    a, b = (np.asarray(cartridge.init_cartridge(cfg, seed=s)) for s in (5, 5))
    np.testing.assert_array_equal(a, b)
    # 64·256 draws of N(0, 1): mean within 5 standard errors, variance within 5%
    assert abs(a.mean()) < 5 / np.sqrt(a.size) and abs(a.var() - 1) < 0.05
    assert not np.array_equal(a, np.asarray(cartridge.init_cartridge(cfg, seed=6)))


def test_compose_concatenates_and_keeps_the_first_frozen_count(xp):
    c1, c2 = _cfg(2, 4, 2, 2, f=1), _cfg(3, 4, 2, 2, f=2)
    t1 = to_xp(xp, np.arange(32.0).reshape(2, 16))
    t2 = to_xp(xp, -np.arange(48.0).reshape(3, 16))
    cfg, table = cartridge.compose([c1, c2], [t1, t2])
    assert_same_namespace(xp, table)
    assert (cfg.num_virtual_tokens, cfg.num_frozen_tokens) == (5, 1)
    np.testing.assert_array_equal(to_np(table), np.concatenate([to_np(t1), to_np(t2)]))
    with pytest.raises(ConfigError, match="num_layers"):
        cartridge.compose([c1, _cfg(2, 4, 3, 2)], [t1, to_xp(xp, np.zeros((2, 24)))])
    with pytest.raises(ConfigError, match="at least 2"):
        cartridge.compose([c1], [t1])
    with pytest.raises(ShapeError, match="prompt_embeddings"):
        cartridge.compose([c1, c2], [t1, t1])


def test_bad_configs_and_tables():
    with pytest.raises(ConfigError, match="num_frozen_tokens 5 exceeds"):
        _cfg(4, 4, 2, 2, f=5).validate()
    for bad in (-1, True, 1.5):
        with pytest.raises(ConfigError, match="num_frozen_tokens"):
            cartridge.CartridgeConfig.from_dict({"peft_type": "CARTRIDGE", "num_virtual_tokens": 2,
                                                 "num_frozen_tokens": bad})
    with pytest.raises(ConfigError, match="divisible"):
        _cfg(2, 10, 2, 3).validate()
    with pytest.raises(ConfigError, match="resolve"):
        cartridge.CartridgeConfig(num_virtual_tokens=2).table_shape()
    with pytest.raises(ShapeError, match="prompt_embeddings"):
        cartridge.past_key_values(np.zeros((2, 15)), _cfg(2, 4, 2, 2), 1)
    with pytest.raises(ShapeError, match="fewer than"):
        cartridge.table_from_past_key_values([(np.zeros((1, 2, 2, 3)), np.zeros((1, 2, 2, 3)))], 3)
    with pytest.raises(ShapeError, match="one sequence"):
        cartridge.table_from_past_key_values([(np.zeros((2, 2, 4, 3)), np.zeros((2, 2, 4, 3)))], 3)
    with pytest.raises(ShapeError, match="heads and head width"):
        cartridge.table_from_past_key_values([(np.zeros((1, 2, 4, 3)), np.zeros((1, 1, 4, 3)))], 3)


def test_adapter_round_trip_and_refusals(tmp_path):
    cfg = _cfg(3, 4, 2, 2)
    table = np.asarray(cartridge.init_cartridge(cfg, seed=3))
    before = table.copy()
    ad = Adapter(cfg, {}, shared={"prompt_embeddings": table})
    pm.save_adapter(ad, tmp_path)
    back = pm.load_adapter(tmp_path)
    assert back.config.num_frozen_tokens == 1
    np.testing.assert_array_equal(np.asarray(back.prompt_embeddings()), table)
    _, v = back.past_key_values(2)[1]
    np.testing.assert_array_equal(np.asarray(v)[1], np.asarray(cartridge.past_key_values(table, cfg, 1)[1][1])[0])
    with pytest.raises(UnsupportedError, match="virtual tokens"):
        back.merge({})
    np.testing.assert_array_equal(table, before)  # nothing modified the input
