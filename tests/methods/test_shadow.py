"""SHADOW: the per-block injection / update and the decoder loop against an independent float64 computation
(elementwise math.erf, explicit loops over tokens) on every backend; layouts; config and checkpoint refusals;
merges refused. PEFT parity is in tests/parity/test_shadow_parity.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from peftmath.errors import CheckpointError, ConfigError, ShapeError, UnsupportedError
from peftmath.methods import shadow as sh
from tests.helpers import assert_same_namespace, to_np, to_xp

D, R, U = 6, 2, 5
_erf = np.vectorize(math.erf)


def _params(seed=0, init_weights=False):
    cfg = sh.ShadowConfig(r=R, update_hidden_size=U, init_weights=init_weights)
    return cfg, sh.init_block(cfg, D, seed=seed, dtype=np.float64)


def _ref_inject(h, s, p, alpha):
    out = np.empty_like(h)
    for idx in np.ndindex(h.shape[:-1]):  # token by token
        low = p["shadow_down.default.weight"] @ (h[idx] - s[idx])
        out[idx] = h[idx] + alpha * (p["shadow_up.default.weight"] @ low)
    return out


def _ref_mlp(x, p, net):
    z = p[f"{net}.default.0.weight"] @ x + p[f"{net}.default.0.bias"]
    return p[f"{net}.default.2.weight"] @ (z * 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))) + p[f"{net}.default.2.bias"]


def _ref_update(h, s, p):
    out = np.empty_like(s)
    for idx in np.ndindex(h.shape[:-1]):
        g = 1.0 / (1.0 + np.exp(-_ref_mlp(h[idx], p, "shadow_update_gate")))
        out[idx] = (1.0 - g) * s[idx] + g * _ref_mlp(h[idx], p, "shadow_update_transform")
    return out


def _hs(seed=1, shape=(2, 3, D)):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), rng.standard_normal(shape)


def test_block_equations_vs_float64_reference(xp):
    _, p = _params()
    h, s = _hs()
    ph = {k: to_xp(xp, v) for k, v in p.items()}
    got_h = sh.inject(to_xp(xp, h), to_xp(xp, s), ph, shadow_alpha=0.4)
    got_s = sh.update(to_xp(xp, h), to_xp(xp, s), ph)
    assert_same_namespace(xp, got_h, got_s)
    np.testing.assert_allclose(to_np(got_h), _ref_inject(h, s, p, 0.4), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(to_np(got_s), _ref_update(h, s, p), rtol=1e-12, atol=1e-13)


def test_float32_rounded_once():
    _, p = _params()
    h, s = _hs()
    h32, s32 = h.astype(np.float32), s.astype(np.float32)
    p32 = {k: v.astype(np.float32) for k, v in p.items()}
    got = sh.update(h32, s32, p32)
    assert got.dtype == np.float32
    want = _ref_update(h32.astype(np.float64), s32.astype(np.float64), {k: v.astype(np.float64) for k, v in p32.items()})
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def test_layouts_and_inputs_untouched():
    _, p = _params()
    h, s = _hs(shape=(3, 4, D))
    want = sh.inject(h, s, p, shadow_alpha=0.3)
    hf, sf = np.asfortranarray(h), np.asfortranarray(s)
    hf.flags.writeable = False
    sf.flags.writeable = False
    np.testing.assert_allclose(sh.inject(hf, sf, p, shadow_alpha=0.3), want, rtol=1e-14, atol=1e-14)
    big = np.zeros((3, 8, D))
    big[:, ::2] = h
    np.testing.assert_allclose(sh.inject(big[:, ::2], s, p, shadow_alpha=0.3), want, rtol=1e-14, atol=1e-14)
    perm = np.ascontiguousarray(h.transpose(1, 0, 2)).transpose(1, 0, 2)
    np.testing.assert_allclose(sh.update(perm, s, p), _ref_update(h, s, p), rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(hf, h)


def test_zero_init_is_identity_and_gate_mixes():
    _cfg, p = _params(init_weights=True)
    assert not np.any(p["shadow_up.default.weight"])
    h, s = _hs()
    np.testing.assert_array_equal(sh.inject(h, s, p, shadow_alpha=2.0), h)
    # the update is a convex mix: each coordinate lies between s and T(h)
    new = sh.update(h, s, p)
    t = np.stack([_ref_mlp(x, p, "shadow_update_transform") for x in h.reshape(-1, D)]).reshape(h.shape)
    lo, hi = np.minimum(s, t), np.maximum(s, t)
    assert np.all(new >= lo - 1e-12) and np.all(new <= hi + 1e-12)


def test_decoder_loop_vs_explicit_composition():
    _, p0 = _params(seed=0)
    _, p1 = _params(seed=3)
    h, s = _hs()
    rng = np.random.default_rng(7)
    Ws = [rng.standard_normal((D, D)) / D for _ in range(4)]
    blocks = [lambda x, W=W: np.tanh(x @ W.T) + x for W in Ws]
    params = [None, p0, p1, None]
    got_h, got_s = sh.decoder_loop(h, s, blocks, params, shadow_alpha=0.6)
    x, st = blocks[0](h), s
    for i, p in ((1, p0), (2, p1)):
        x = blocks[i](_ref_inject(x, st, p, 0.6))
        st = _ref_update(x, st, p)
    x = blocks[3](x)
    np.testing.assert_allclose(got_h, x, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(got_s, st, rtol=1e-12, atol=1e-13)
    with pytest.raises(ConfigError, match="contiguous"):
        sh.decoder_loop(h, s, blocks, [p0, None, p1, None], shadow_alpha=0.6)
    with pytest.raises(ShapeError, match="3 parameter sets"):
        sh.decoder_loop(h, s, blocks, params[:3], shadow_alpha=0.6)


def test_shape_refusals():
    _, p = _params()
    h, s = _hs()
    with pytest.raises(ShapeError, match="same shape"):
        sh.inject(h, s[:, :2], p, shadow_alpha=0.1)
    with pytest.raises(ShapeError, match="hidden size is 4"):
        sh.update(h[..., :4], s[..., :4], p)


@pytest.mark.parametrize("fields, match", [
    ({"r": 0}, "'r'"),
    ({"update_hidden_size": -1}, "update_hidden_size"),
    ({"shadow_dropout": 1.5}, "shadow_dropout"),
    ({"target_modules": r".*\.layers\.\d+$", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"target_modules": r".*\.layers\.\d+$", "layers_pattern": "layers"}, "layers_pattern"),
    ({"target_modules": ["model.layers.0"], "layers_pattern": "layers"}, "needs 'layers_to_transform'"),
    ({"shadow_model": "some/model", "shadow_hidden_size": 8}, "shadow_hidden_size"),
])
def test_config_refusals(fields, match):
    with pytest.raises(ConfigError, match=match):
        sh.ShadowConfig(**fields).validate()


def test_config_defaults_and_round_trip():
    cfg = sh.ShadowConfig()
    cfg.validate()
    assert (cfg.r, cfg.shadow_alpha, cfg.shadow_dropout, cfg.update_width, cfg.shadow_model) == (8, 0.1, 0.2, 8, "mirror")
    back = sh.ShadowConfig.from_dict(sh.ShadowConfig(r=3, update_hidden_size=5).to_dict())
    assert (back.r, back.update_width) == (3, 5)


def test_checkpoint_split_round_trip_and_count():
    cfg, p = _params()
    blocks = {f"base_model.model.model.layers.{i}": p for i in range(2)}
    shared = {"base_model.shadow_backbone.default.norm.weight": np.ones(D),
              "base_model.shadow_projection.default.weight": np.zeros((D, 4))}
    flat = sh.checkpoint_tensors(blocks, shared)
    b2, s2, _ = sh.split_checkpoint(flat, cfg, D)
    assert set(b2) == set(blocks) and set(s2) == set(shared)
    per_block = R * D + D * R + 2 * (U * D + U + D * U + D)
    assert sh.num_trainable_parameters(b2, s2) == 2 * per_block + D + D * 4
    with pytest.raises(CheckpointError, match="no shadow backbone"):
        sh.split_checkpoint(sh.checkpoint_tensors(blocks, {}), cfg, D)
    with pytest.raises(ShapeError, match="expected"):
        sh.split_checkpoint(flat, sh.ShadowConfig(r=R + 1, update_hidden_size=U), D)


def test_merges_and_diffusion_refused():
    with pytest.raises(UnsupportedError, match="input-dependent"):
        sh.merge(np.eye(3))
    with pytest.raises(UnsupportedError, match="cannot be merged"):
        sh.unmerge(np.eye(3))
    with pytest.raises(UnsupportedError, match="Diffusers"):
        sh.refuse_diffusion()
