"""A new VeLoRA / MonteCLoRA adapter holds the training-state tensors PEFT 0.21.2 creates and saves with it
(``lora_velora_embed``; ``lora_monteclora_sampler.{std_prior, expert_weights_prior, gaussian_var_prior,
expert_weights}``), of PEFT's shapes, initial values and distributions, drawn on the host after the factors (which
stay those of a plain LoRA of the same seed). ``tests/parity/test_lora_training_state_init_parity.py`` loads the
saved adapters in PEFT."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import peftmath as pm
from peftmath.errors import ConfigError
from peftmath.io import config_from_dict

SAMPLER = "lora_monteclora_sampler."


def _state(dtype=np.float32, sizes=((16, 24), (8, 16)), seed=0):
    rng = np.random.default_rng(seed)
    return {f"fc{i}.weight": rng.standard_normal(s).astype(dtype) for i, s in enumerate(sizes)}


def _create(state, seed=0, **extra):
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["fc0", "fc1"], "init_lora_weights": False,
           **extra}
    return pm.create_adapter(state, config_from_dict(cfg), seed=seed)


@pytest.mark.parametrize("groups, in_features, dim", [(4, 24, 6), (5, 24, 5), (5, 16, 4), (None, 24, 1)])
def test_velora_embed_shape_and_values(groups, in_features, dim):
    state = _state(sizes=((16, in_features),))
    velora = {"init_type": "random"} if groups is None else {"num_groups": groups, "init_type": "random"}
    ad = pm.create_adapter(state, config_from_dict({"peft_type": "LORA", "r": 2, "target_modules": ["fc0"],
                                                    "velora_config": velora}), seed=3)
    e = np.asarray(ad.params["fc0"]["lora_velora_embed"])
    assert e.shape == (dim,) and e.dtype == np.float32  # ⌈in / num_groups⌉ (PEFT's default num_groups: 64)
    assert abs(float(np.linalg.norm(e.astype(np.float64))) - 1) < 1e-6  # a unit direction
    for init_type in ("batch_average", "batch_average_once"):  # zeros until PEFT's first training batch
        cfg = {"peft_type": "LORA", "r": 2, "target_modules": ["fc0"], "velora_config": {**velora, "init_type": init_type}}
        z = np.asarray(pm.create_adapter(state, config_from_dict(cfg)).params["fc0"]["lora_velora_embed"])
        assert z.shape == (dim,) and not z.any()


def test_velora_random_direction_is_uniform_on_the_sphere():
    """``v/‖v‖`` with ``v ~ N(0, I)``: ``√dim · e`` has components of mean 0 and variance 1 (4096 of them)."""
    state = _state(sizes=((4, 4096),))
    ad = pm.create_adapter(state, config_from_dict({"peft_type": "LORA", "r": 2, "target_modules": ["fc0"],
                                                    "velora_config": {"num_groups": 1, "init_type": "random"}}))
    z = math.sqrt(4096) * np.asarray(ad.params["fc0"]["lora_velora_embed"], np.float64)
    assert abs(z.mean()) < 4 / 64 and abs(z.var() - 1) < 4 * math.sqrt(2 / 4096)


def test_monteclora_sampler_tensors():
    n, r = 6, 64
    ad = pm.create_adapter(_state(sizes=((80, 24),)), config_from_dict(
        {"peft_type": "LORA", "r": r, "target_modules": ["fc0"], "monteclora_config": {"num_samples": n}}), seed=5)
    p = {k: np.asarray(v) for k, v in ad.params["fc0"].items()}
    assert sorted(p) == sorted(["lora_A.weight", "lora_B.weight", *(SAMPLER + k for k in (
        "std_prior", "expert_weights_prior", "gaussian_var_prior", "expert_weights"))])
    std, prior = p[SAMPLER + "std_prior"], p[SAMPLER + "expert_weights_prior"]
    assert std.shape == (r,) and prior.shape == (n,)
    for u in (std, prior):  # torch.rand: U[0, 1)
        assert u.dtype == np.float32 and np.all((u >= 0) & (u < 1)) and len(np.unique(u)) == u.size
    assert abs(std.mean() - 0.5) < 4 * math.sqrt(1 / 12 / r)
    np.testing.assert_array_equal(p[SAMPLER + "gaussian_var_prior"], np.eye(r, dtype=np.float32))
    np.testing.assert_array_equal(p[SAMPLER + "expert_weights"], np.full(n, 1 / n, np.float32))
    # PEFT's default num_samples (8) where the config leaves it out
    ad8 = pm.create_adapter(_state(), config_from_dict({"peft_type": "LORA", "r": 2, "target_modules": ["fc0"],
                                                        "monteclora_config": {}}))
    assert ad8.params["fc0"][SAMPLER + "expert_weights"].shape == (8,)


@pytest.mark.parametrize("extra", [{"velora_config": {"num_groups": 4, "init_type": "random"}},
                                   {"monteclora_config": {"num_samples": 3}}])
def test_factors_are_those_of_a_plain_lora_and_the_adapter_round_trips(extra, tmp_path):
    state = _state()
    plain, ad = _create(state, seed=11), _create(state, seed=11, **extra)
    for m in plain.params:
        for k, v in plain.params[m].items():
            assert np.array_equal(np.asarray(ad.params[m][k]), np.asarray(v)), (m, k)
    merged, want = ad.merge(state), plain.merge(state)  # training-only state: plain LoRA's merge
    assert all(np.array_equal(np.asarray(merged[k]), np.asarray(want[k])) for k in state)
    # PEFT's trainable count: the factors and MonteCLoRA's two priors, never the buffers
    extra_trainable = sum(3 + 4 for _ in ad.modules) if "monteclora_config" in extra else 0  # num_samples + r
    assert ad.num_trainable_parameters() == plain.num_trainable_parameters() + extra_trainable
    pm.save_adapter(ad, tmp_path / "a")
    back = pm.load_adapter(tmp_path / "a")
    assert {m: sorted(p) for m, p in back.params.items()} == {m: sorted(p) for m, p in ad.params.items()}
    for m, p in ad.params.items():
        for k, v in p.items():
            assert np.array_equal(np.asarray(back.params[m][k]), np.asarray(v)), (m, k)


def test_half_precision_base_dtypes_as_peft_saves_them():
    """PEFT on a bfloat16 base casts the adapter's tensors to float32 and leaves the sampler's buffers in bfloat16
    (tests/parity/test_lora_training_state_init_parity.py checks this against PEFT)."""
    bf16 = np.dtype(ml_dtypes.bfloat16)
    state = _state(dtype=bf16)
    v = _create(state, velora_config={"num_groups": 4, "init_type": "random"}).params["fc0"]
    assert v["lora_velora_embed"].dtype == np.float32 and v["lora_A.weight"].dtype == np.float32
    m = _create(state, monteclora_config={"num_samples": 3}).params["fc0"]
    assert {k: m[SAMPLER + k].dtype for k in ("std_prior", "expert_weights_prior", "gaussian_var_prior",
                                              "expert_weights")} == {"std_prior": np.float32,
                                                                     "expert_weights_prior": np.float32,
                                                                     "gaussian_var_prior": bf16,
                                                                     "expert_weights": bf16}


def test_velora_init_type_is_checked():
    with pytest.raises(ConfigError, match=r"velora_config.init_type must be one of batch_average, "
                                          r"batch_average_once, random .*'gaussian'"):
        _create(_state(), velora_config={"num_groups": 4, "init_type": "gaussian"})


@pytest.mark.parametrize("other", [{"use_dora": True}, {"monteclora_config": {}}])
def test_a_sub_config_of_defaults_counts_as_its_variant(other):
    """``velora_config: {}`` is VeLoRA with PEFT's defaults: with a second variant it is refused as PEFT refuses it."""
    with pytest.raises(ConfigError, match="velora_config and|and velora_config"):
        _create(_state(), velora_config={}, **other)
