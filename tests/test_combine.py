"""Adapter combination (peftmath.combine): properties of each type, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from tests.helpers import assert_same_namespace, to_np, to_xp
from hypothesis import given
from hypothesis import strategies as st

import peftmath as pm
from peftmath.adapter import Adapter
from peftmath.combine import (
    combine,
    disjoint_merge,
    magnitude_prune_tensor,
    majority_sign_mask,
    random_prune_tensor,
)
from peftmath.errors import ConfigError, ShapeError, UnsupportedError


def _lora(xp, rng, *, r=3, alpha=5.0, modules=("lin", "conv", "emb"), rslora=False, dtype=None):
    params = {}
    if "lin" in modules:
        params["lin"] = {"lora_A.weight": rng.standard_normal((r, 9)), "lora_B.weight": rng.standard_normal((7, r))}
    if "conv" in modules:
        params["conv"] = {"lora_A.weight": rng.standard_normal((r, 3, 3, 3)),
                          "lora_B.weight": rng.standard_normal((5, r, 1, 1))}
    if "emb" in modules:
        params["emb"] = {"lora_embedding_A": rng.standard_normal((r, 11)), "lora_embedding_B": rng.standard_normal((4, r))}
    dtype = dtype or xp.float64
    params = {m: {k: to_xp(xp, v, dtype) for k, v in p.items()} for m, p in params.items()}
    cfg = pm.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(modules), use_rslora=rslora)
    return Adapter(cfg, params)


def _delta(ad, m):
    return to_np(ad.delta_weight(m))


@given(seed=st.integers(0, 2**31 - 1), w1=st.floats(-2, 2), w2=st.floats(-2, 2), r2=st.integers(1, 4))
def test_cat_is_the_exact_weighted_sum(xp, seed, w1, w2, r2):
    rng = np.random.default_rng(seed)
    a, b = _lora(xp, rng, r=3, alpha=4.0), _lora(xp, rng, r=r2, alpha=7.0, modules=("lin", "emb"))
    out = combine([a, b], [w1, w2], combination_type="cat")
    assert out.config.r == 3 + r2 and out.config.lora_alpha == 3 + r2
    for m in ("lin", "conv", "emb"):
        assert_same_namespace(xp, out.params[m]["lora_A.weight" if m != "emb" else "lora_embedding_A"])
        expected = w1 * _delta(a, m) + (w2 * _delta(b, m) if m in b.params else 0)
        scale = np.abs(_delta(a, m)).max() + (np.abs(_delta(b, m)).max() if m in b.params else 0)
        np.testing.assert_allclose(_delta(out, m), expected, atol=1e-12 * (1 + scale) * 16)


@given(seed=st.integers(0, 2**31 - 1))
def test_svd_of_full_rank_recovers_the_weighted_sum(xp, seed):
    rng = np.random.default_rng(seed)
    a, b = _lora(xp, rng, r=2), _lora(xp, rng, r=2)
    out = combine([a, b], [0.5, 1.5], combination_type="svd", svd_rank=4)
    for m in ("lin", "conv", "emb"):
        np.testing.assert_allclose(_delta(out, m), 0.5 * _delta(a, m) + 1.5 * _delta(b, m), atol=1e-10)
        assert out.truncation_error[m] < 1e-12
    low = combine([a, b], [0.5, 1.5], combination_type="svd", svd_rank=1)
    for m in low.truncation_error:  # rank 1 of a rank-4 sum: the error is the tail of the spectrum
        target = 0.5 * _delta(a, m) + 1.5 * _delta(b, m)
        M = target.reshape(target.shape[0], -1) if m != "emb" else target.T
        s = np.linalg.svd(M, compute_uv=False)
        assert low.truncation_error[m] == pytest.approx(np.sqrt((s[1:] ** 2).sum()) / np.sqrt((s**2).sum()), rel=1e-8)


def test_one_adapter_with_weight_one_is_the_identity():
    rng = np.random.default_rng(0)
    import array_api_compat.numpy as xp

    a = _lora(xp, rng)
    for ctype in ("svd", "cat", "ties"):
        out = combine([a], [1.0], combination_type=ctype, density=0.5)
        for m in a.params:
            np.testing.assert_allclose(_delta(out, m), _delta(a, m), atol=1e-12)


def test_linear_has_cross_terms():
    """Factor-space 'linear' is (Σβᵢ Bᵢ)(Σαⱼ Aⱼ), not Σ wᵢ ΔWᵢ."""
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(1)
    a, b = _lora(xp, rng, modules=("lin",)), _lora(xp, rng, modules=("lin",))
    out = combine([a, b], [1.0, 1.0], combination_type="linear")
    s = a.config.scaling_for("lin")
    A1, B1 = a.params["lin"]["lora_A.weight"], a.params["lin"]["lora_B.weight"]
    A2, B2 = b.params["lin"]["lora_A.weight"], b.params["lin"]["lora_B.weight"]
    expected = s * (B1 + B2) @ (A1 + A2)      # α = β = √s for both, new scaling 1
    np.testing.assert_allclose(_delta(out, "lin"), expected, atol=1e-12)
    assert not np.allclose(_delta(out, "lin"), _delta(a, "lin") + _delta(b, "lin"))


@given(seed=st.integers(0, 2**31 - 1), density=st.floats(0.05, 1.0))
def test_magnitude_pruning_keeps_the_requested_density(xp, seed, density):
    t = np.random.default_rng(seed).standard_normal((6, 7))
    out = to_np(magnitude_prune_tensor(to_xp(xp, t), density))
    k = int(density * t.size) if density < 1 else t.size
    assert np.count_nonzero(out) == k
    kept = np.abs(t)[out != 0]
    dropped = np.abs(t)[out == 0]
    assert kept.size == 0 or dropped.size == 0 or kept.min() >= dropped.max()
    np.testing.assert_array_equal(out[out != 0], t[out != 0])


def test_random_pruning_is_seeded_and_rescaled(xp):
    t = to_xp(xp, np.ones((40, 50)))
    a = to_np(random_prune_tensor(t, 0.3, rng=np.random.default_rng(5)))
    b = to_np(random_prune_tensor(t, 0.3, rng=np.random.default_rng(5)))
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a)) <= {0.0, 1 / 0.3} and abs((a != 0).mean() - 0.3) < 0.05


def test_ties_sign_election_and_disjoint_mean():
    t = np.array([[1.0, -2.0, 0.0], [-3.0, 1.0, 2.0], [1.0, 1.0, 0.0]])
    mask = majority_sign_mask(t, "total")
    np.testing.assert_array_equal(mask, np.sign(t) == np.array([-1, 1, 1]))
    freq = majority_sign_mask(t, "frequency")
    np.testing.assert_array_equal(freq, np.sign(t) == np.array([1, 1, 1]))
    merged = disjoint_merge(t, mask)
    np.testing.assert_allclose(merged, [-3.0, 1.0, 2.0])


def test_ia3_combination_is_linear():
    from peftmath.io import config_from_dict

    cfg = config_from_dict({"peft_type": "IA3", "target_modules": ["q"]})
    l1, l2 = np.array([[1.0], [2.0]]), np.array([[3.0], [-1.0]])
    out = combine([Adapter(cfg, {"q": {"ia3_l": l1}}), Adapter(cfg, {"q": {"ia3_l": l2}})], [0.5, 2.0])
    np.testing.assert_allclose(out.params["q"]["ia3_l"], 0.5 * l1 + 2.0 * l2)


def test_inherited_rslora_is_dropped_by_default():
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(2)
    a = _lora(xp, rng, rslora=True, modules=("lin",))
    assert combine([a], [1.0], combination_type="cat").config.use_rslora is False
    assert combine([a], [1.0], combination_type="cat", peft_compat=True).config.use_rslora is True


def test_bad_inputs():
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(3)
    a, b = _lora(xp, rng, r=2), _lora(xp, rng, r=3)
    with pytest.raises(ConfigError, match="2 weights for 1 adapters"):
        combine([a], [1.0, 2.0])
    with pytest.raises(ConfigError, match="one rank"):
        combine([a, b], [1.0, 1.0], combination_type="linear")
    with pytest.raises(ConfigError, match="density"):
        combine([a, a], [1.0, 1.0], combination_type="ties", density=1.5)
    with pytest.raises(ShapeError, match="svd_rank 10 exceeds"):
        combine([a, b], [1.0, 1.0], combination_type="svd", svd_rank=10)
    with pytest.raises(ConfigError, match="unknown combination_type"):
        combine([a, b], [1.0, 1.0], combination_type="average")
    with pytest.raises(ConfigError, match="svd_clamp is a quantile"):  # an IndexError deep in the SVD before
        combine([a, b], [1.0, 1.0], combination_type="svd", svd_clamp=1.5)
    with pytest.raises(ConfigError, match="finite"):  # a LinAlgError before
        combine([a, b], [float("nan"), 1.0], combination_type="svd")
    with pytest.raises(ConfigError, match="seed must be a non-negative"):
        combine([a, a], [1.0, 1.0], combination_type="dare_linear", density=0.5, seed=-1)
    with pytest.raises(ConfigError, match="svd_rank must be a positive"):
        combine([a, b], [1.0, 1.0], combination_type="svd", svd_rank=0)
    dora = Adapter(pm.LoraConfig(r=2, use_dora=True, target_modules=["lin"]),
                   {"lin": {**a.params["lin"], "lora_magnitude_vector": np.ones(7)}})
    with pytest.raises(UnsupportedError, match="DoRA adapters cannot be combined"):
        combine([dora, a], [1.0, 1.0])
    rows = {"token_adapter.trainable_tokens_delta": np.ones((1, 5))}
    tokens = Adapter(pm.LoraConfig(r=2, target_modules=["lin"], trainable_token_indices={"emb": [1]}),
                     {"lin": a.params["lin"], "emb": rows})
    with pytest.raises(UnsupportedError, match=r"trainable-token \(trainable_token_indices\) adapters cannot"):
        combine([tokens, a], [1.0, 1.0])


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd"])
def test_combine_refuses_adapters_of_two_libraries(combination_type):
    torch = pytest.importorskip("torch")
    from peftmath.errors import NamespaceError

    cfg = pm.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"])
    t = Adapter(cfg, {"lin": {"lora_A.weight": torch.ones(2, 6), "lora_B.weight": torch.ones(8, 2)}})
    n = Adapter(cfg, {"lin": {"lora_A.weight": np.ones((2, 6), np.float32), "lora_B.weight": np.ones((8, 2), np.float32)}})
    with pytest.raises(NamespaceError, match="combine: module lin: arrays from different array libraries"):
        pm.combine([n, t], [1.0, 0.5], combination_type=combination_type)
