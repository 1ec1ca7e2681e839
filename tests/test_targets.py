"""Module selection (PEFT's rules), layer-kind inference and create_adapter, without PEFT."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftmath as pm
from peftmath.create import create_adapter
from peftmath.errors import ConfigError, ShapeError
from peftmath.layers import LayerKind
from peftmath.methods import describe_method, get_method, implemented_methods
from peftmath.targets import is_target, module_kinds, select_targets
from tests.helpers import skip_unless_requirements


def cfg(**kw):
    return pm.LoraConfig(**kw)


@pytest.mark.parametrize("key,fields,expected", [
    ("model.layers.0.q_proj", dict(target_modules=["q_proj"]), True),
    ("model.layers.0.xq_proj", dict(target_modules=["q_proj"]), False),          # suffix on a dot boundary
    ("q_proj", dict(target_modules=["q_proj"]), True),                           # equal name
    ("model.layers.0.q_proj", dict(target_modules=r".*q_proj"), True),            # regex full match
    ("model.layers.0.q_proj", dict(target_modules=r"q_proj"), False),
    ("model.layers.0.q_proj", dict(target_modules=["q_proj"], exclude_modules=["layers.0.q_proj"]), False),
    ("model.layers.0.q_proj", dict(target_modules=["q_proj"], exclude_modules=r".*\.0\..*"), False),
    ("model.layers.0.q_proj", dict(target_modules=["q_proj"], modules_to_save=["layers"]), False),
    ("model.layers.2.q_proj", dict(target_modules=["q_proj"], layers_to_transform=[0, 2]), True),
    ("model.layers.1.q_proj", dict(target_modules=["q_proj"], layers_to_transform=[0, 2]), False),
    ("model.layers.1.q_proj", dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers"), True),
    ("layers.1.q_proj", dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers"), True),
    ("h.1.q_proj", dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern=["layers", "h"]), True),
    ("model.q_proj", dict(target_modules=["q_proj"], layers_to_transform=0), False),  # no layer index at all
    ("q_proj", dict(target_modules=["q_proj"], layers_to_transform=0), True),   # PEFT: an exact name skips the check
])
def test_is_target_follows_peft_rules(key, fields, expected):
    assert is_target(cfg(**fields), key) is expected


def _state():
    rng = np.random.default_rng(0)
    return {
        "transformer.wte.weight": rng.standard_normal((30, 8)).astype(np.float32),
        "transformer.h.0.attn.c_attn.weight": rng.standard_normal((8, 24)).astype(np.float32),
        "transformer.h.0.attn.c_proj.weight": rng.standard_normal((8, 8)).astype(np.float32),
        "transformer.h.0.ln_1.weight": np.ones(8, np.float32),
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv1.weight": rng.standard_normal((4, 3, 5)).astype(np.float32),
        "lm_head.weight": rng.standard_normal((30, 8)).astype(np.float32),
    }


def test_module_kinds():
    kinds = module_kinds(_state(), model_type="gpt2")
    assert kinds["transformer.wte"] is LayerKind.EMBEDDING
    assert kinds["transformer.h.0.attn.c_attn"] is LayerKind.CONV1D_TRANSPOSED
    assert kinds["transformer.h.0.attn.c_proj"] is LayerKind.CONV1D_TRANSPOSED
    assert kinds["conv"] is LayerKind.CONV2D and kinds["conv1"] is LayerKind.CONV1D
    assert "transformer.h.0.ln_1" not in kinds
    assert module_kinds(_state())["transformer.h.0.attn.c_proj"] is LayerKind.LINEAR  # no model type: Linear
    over = module_kinds(_state(), layer_kinds={"transformer.h.0.attn.c_proj": "Conv1D"})
    assert over["transformer.h.0.attn.c_proj"] is LayerKind.CONV1D_TRANSPOSED
    with pytest.raises(ShapeError, match="c_prj"):
        module_kinds(_state(), layer_kinds={"transformer.h.0.attn.c_prj": "Conv1D"})


def test_all_linear_skips_output_layer_and_embeddings():
    kinds = module_kinds(_state(), model_type="gpt2")
    chosen = select_targets(cfg(target_modules="all-linear"), kinds)
    assert set(chosen) == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"}


def test_errors_name_the_closest_modules():
    kinds = module_kinds(_state(), model_type="gpt2")
    with pytest.raises(ConfigError, match="c_attn"):
        select_targets(cfg(target_modules=["c_atn"]), kinds)
    with pytest.raises(ConfigError, match="model type"):
        select_targets(cfg(target_modules=None), kinds, model_type="not-a-model")
    assert set(select_targets(cfg(target_modules=None), kinds, model_type="gpt2")) == {"transformer.h.0.attn.c_attn"}


def test_create_adapter_records_kinds_and_fan_in_fan_out(tmp_path):
    ad = create_adapter(_state(), cfg(r=2, target_modules=["c_attn", "c_proj"], init_lora_weights=False),
                        model_type="gpt2")
    assert ad.config.fan_in_fan_out is True
    assert set(ad.layer_kinds.values()) == {LayerKind.CONV1D_TRANSPOSED}
    pm.save_adapter(ad, tmp_path)
    assert pm.load_adapter(tmp_path).layer_kinds == ad.layer_kinds


def test_weight_changing_init_needs_return_base():
    with pytest.raises(ConfigError, match="return_base=True"):
        create_adapter(_state(), cfg(r=2, target_modules=["c_proj"], init_lora_weights="pissa"))


def _default_cases():
    for peft_type in implemented_methods():
        method = get_method(peft_type)
        module_cls = getattr(method, "Module", None)
        if module_cls is None or not hasattr(module_cls, "initialize"):
            continue
        if peft_type in _NOT_A_NO_OP:
            continue
        yield pytest.param(peft_type, id=peft_type)


#: methods whose PEFT default initialisation is not a no-op (FourierFT: init_weights=False draws the spectrum
#: from a standard normal, so a fresh adapter already changes W, in PEFT as here)
#: methods whose merge rebuilds W from a decomposition of it (FRoD: W' = U (S + diag λ) Vᵀ, λ = 0 at init)
_REBUILDS_W = {"FROD", "OSF"}  # OSF: the init's float32 SVD triplets against the merge's float64 Gram split
_NOT_A_NO_OP = {"FOURIERFT", "VBLORA", "C3A", "UNILORA"}  # PEFT draws these at random: no no-op init


@pytest.mark.parametrize("peft_type", list(_default_cases()))
@given(seed=st.integers(0, 2**31 - 1), out=st.integers(4, 12), inn=st.sampled_from([8, 16, 32]),
       k=st.sampled_from([1, 3]))
@settings(max_examples=10, deadline=None)  # PSOFT's first example imports torch (its SVD is PEFT's): seconds
def test_default_initialisation_is_a_no_op(peft_type, seed, out, inn, k):
    """PEFT places its zeros so that a fresh adapter leaves the model unchanged: merged == base, bit for bit."""
    method = get_method(peft_type)
    skip_unless_requirements(method.METHOD)
    out -= out % 2  # RoAd rotates pairs of output features
    rng = np.random.default_rng(seed)
    state = {"lin.weight": rng.standard_normal((out, inn)).astype(np.float32),
             "lin.bias": rng.standard_normal(out).astype(np.float32),
             "conv.weight": rng.standard_normal((out, 4, k, k)).astype(np.float32)}
    supported = method.Module.supported_kinds
    targets = [n for n, kind in (("lin", LayerKind.LINEAR), ("conv", LayerKind.CONV2D)) if kind in supported]
    # PEFT's defaults that do not fit these tiny layers (PEFT refuses them there too): the smallest valid sizes
    config = method.Config(target_modules=targets, **_TINY.get(peft_type, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # e.g. OFT adjusting its block size to the layer, as PEFT does
        ad = create_adapter(state, config, seed=seed)
        merged = ad.merge(state)
    for key in state:
        if (describe_method(peft_type).rotation or peft_type in _REBUILDS_W) and key.endswith(".weight"):
            # a product of reflections/rotations that is the identity in real arithmetic (HRA's paired
            # reflections), or W rebuilt from its decomposition (FRoD's U S Vᵀ, OSF's low part): the merge rounds, so equal
            # within a few ulps of the row norms, not bit for bit
            W = state[key].reshape(state[key].shape[0], -1).astype(np.float64)
            bound = 16 * np.finfo(np.float32).eps * np.linalg.norm(W, axis=1, keepdims=True)
            got = np.asarray(merged[key]).reshape(W.shape).astype(np.float64)
            assert np.all(np.abs(got - W) <= bound), (key, float(np.max(np.abs(got - W))))
        else:
            np.testing.assert_array_equal(np.asarray(merged[key]), state[key])


#: config overrides so that a method's default init fits the test's tiny layers (out 4..12, in 8..32)
_TINY = {"MISS": {"r": 2}, "ROAD": {"group_size": 2}, "FOURIERFT": {"n_frequency": 8}, "SHIRA": {"r": 1},
         "WAVEFT": {"n_frequency": 8}, "PSOFT": {"r": 2}, "SUPERTUNING": {"sparsity": 0.5},
         "ADAMSS": {"num_subspaces": 64}}  # AdaMSS: every row its own subspace (PEFT's defaults tie or sample)
