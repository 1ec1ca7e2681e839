"""C3A parity with Hugging Face PEFT 0.21.2: ``ΔW`` against PEFT's ``get_delta_weight``, forward / merge /
unmerge on nn.Linear with ``block_size_pattern``, bfloat16 merges with ``peft_compat``, checkpoints both
ways and the trainable-parameter count. Errors are float32 FFT round-off in PEFT (tolerance ``1e-5``)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    check_module_math_as_peft,
    bits_differ,
    check_reloaded_in_peft,
    load_peft_checkpoint,
    peft_layer,
    peft_weights,
    redraw,
    require_peft,
    two_linear_inputs,
    two_linear_model,
    t2n,
)

torch, peft = require_peft()


from peftmath.methods import c3a  # noqa: E402

MODULES = ("lin0", "lin1")


SIZES = (12, 8, 16)


def base_model(seed=0, dtype=torch.float32):
    return two_linear_model(SIZES, seed=seed, dtype=dtype)


def make_peft(seed=1, dtype=torch.float32, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.C3AConfig(target_modules=list(MODULES), **{"block_size": 4, **config})
        pmodel = peft.get_peft_model(base_model(dtype=dtype), cfg)
    redraw(pmodel, {"c3a_kernel": (0.0, 1.0)}, seed=seed)
    return pmodel.eval()


def inputs(seed=5):
    return two_linear_inputs(SIZES, seed)


@pytest.mark.parametrize("config", [{}, dict(block_size=2), dict(block_size_pattern={"lin1": 8}),
                                    dict(init_weights="gaussian")])
def test_forward_merge_unmerge(config, tmp_path):
    pmodel = make_peft(**config)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    state = peft_weights(pmodel, MODULES)
    xs = inputs()
    check_module_math_as_peft(ad, pmodel, state, xs, MODULES, back_tol=1e-6)
    if "block_size_pattern" in config:  # the top-level name itself is looked up as a key
        assert ad.params["lin1"]["c3a_kernel"].shape == (2, 1, 8)
        assert ad.params["lin0"]["c3a_kernel"].shape == (2, 3, 4)


def test_checkpoints_both_ways(tmp_path):
    pmodel = make_peft(block_size_pattern={"lin0": 2})
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert isinstance(ad.config, c3a.C3AConfig) and ad.config.block_size_pattern == {"lin0": 2}
    assert ad.params["lin0"]["c3a_kernel"].dtype == np.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_reloaded_in_peft(pmodel, ad, base_model(), tmp_path / "ours", inputs(), atol=1e-6, rtol=1e-6)


def test_bfloat16_merge_with_peft_compat(tmp_path):
    """bfloat16 base: PEFT keeps the kernel in float32, rounds ``C(K)`` to bfloat16, divides by ``in`` in
    bfloat16 and adds; ``peft_compat=True`` gives its bits (up to the FFT round-off of PEFT's ``C(K)``
    landing on a rounding boundary: at most 0.1% of the elements)."""
    pmodel = make_peft(dtype=torch.bfloat16)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.params["lin0"]["c3a_kernel"].dtype == np.float32
    state = peft_weights(pmodel, MODULES)
    compat = ad.merge(state, peft_compat=True)
    default = ad.merge(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmodel.merge_adapter()
    for name in MODULES:
        want = t2n(peft_layer(pmodel, name).base_layer.weight)
        key = f"{name}.weight"
        assert compat[key].dtype == want.dtype
        assert bits_differ(compat[key], want) <= max(1, want.size // 1000), key
        exact = state[key].astype(np.float64) + ad.module(name).delta_weight().astype(np.float64)
        err = np.abs(default[key].astype(np.float64) - exact)
        assert np.all(err <= 0.5 * np.abs(np.spacing(default[key].astype(np.float32))) * 2**16 * (1 + 2**-7)), key


def test_trainable_parameter_count_matches_peft(tmp_path):
    """``Adapter.num_trainable_parameters`` counts what PEFT trains (``get_nb_trainable_parameters``)."""
    pmodel = make_peft(block_size_pattern={"lin1": 8})
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0]
