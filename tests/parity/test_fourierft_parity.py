"""FourierFT parity with Hugging Face PEFT 0.21.2: the spectral positions against ``torch.randperm`` itself,
``ΔW`` against PEFT's ``get_delta_weight``, forward / merge / unmerge on nn.Linear and transformers Conv1D,
``n_frequency_pattern``, and checkpoints both ways (the positions are not saved: they must be recomputed
identically). Errors are float32 FFT round-off (tolerance ``1e-5``)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    check_module_math_as_peft,
    check_reloaded_in_peft,
    load_peft_checkpoint,
    peft_forward,
    peft_weights,
    redraw,
    require_peft,
    to_adapter,
)

torch, peft = require_peft()

from torch import nn  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from peftmath.methods import fourierft  # noqa: E402

#: one model per layer kind: FourierFT's tensors do not tell a Linear from a Conv1D, and PEFT rewrites the
#: config's single fan_in_fan_out flag per layer, so only a one-kind model has a reliable flag (specs/fourierft.md)
KINDS = {"Linear": ("lin0", "lin1"), "Conv1D": ("c0", "c1")}


class Tiny(nn.Module):
    def __init__(self, kind):
        super().__init__()
        if kind == "Linear":
            self.lin0, self.lin1 = nn.Linear(12, 10), nn.Linear(10, 10)
        else:
            self.c0, self.c1 = Conv1D(9, 12), Conv1D(9, 9)  # weights (in, out) = (12, 9), (9, 9)


def base_model(kind, seed=0):
    model = Tiny(kind)
    redraw(model, seed=seed)
    return model


def make_peft(kind, seed=1, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.FourierFTConfig(target_modules=list(KINDS[kind]), **{"n_frequency": 20, "scaling": 7.0, **config})
        pmodel = peft.get_peft_model(base_model(kind), cfg)
    redraw(pmodel, {"fourierft_spectrum": (0.0, 1.0)}, seed=seed)
    return pmodel


def inputs(kind, seed=5):
    rng = np.random.default_rng(seed)
    first, second = KINDS[kind]
    return {first: rng.standard_normal((3, 2, 12)).astype(np.float32),
            second: rng.standard_normal((4, 10 if kind == "Linear" else 9)).astype(np.float32)}


@pytest.mark.parametrize("n", [1, 2, 3, 17, 120, 4096, 65536, 10**6 + 3])
@pytest.mark.parametrize("seed", [0, 777, 2**31 - 1, 2**32 + 12, 987654321012])
def test_positions_equal_torch_randperm(n, seed):
    k = min(n, 257)
    want = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].numpy()
    rows, cols = fourierft.spectral_indices(n, 1, k, seed)
    np.testing.assert_array_equal(rows, want)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("config", [{}, dict(random_loc_seed=3, n_frequency=60),
                                    dict(n_frequency_pattern={"1": 7})])
def test_forward_merge_unmerge(kind, config):
    MODULES = KINDS[kind]
    pmodel = make_peft(kind, **config)
    ad = to_adapter(pmodel)
    state = peft_weights(pmodel, MODULES)
    xs = inputs(kind)
    check_module_math_as_peft(ad, pmodel, state, xs, MODULES, transposed=kind == "Conv1D")
    if "n_frequency_pattern" in config:  # PEFT's rule needs a dot before the key: top-level names never match
        assert ad.params[MODULES[1]]["fourierft_spectrum"].shape == (20,)


@pytest.mark.parametrize("kind", list(KINDS))
def test_checkpoints_both_ways(kind, tmp_path):
    MODULES = KINDS[kind]
    pmodel = make_peft(kind, random_loc_seed=99)
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert isinstance(ad.config, fourierft.FourierFTConfig) and ad.config.random_loc_seed == 99
    assert ad.config.fan_in_fan_out == (kind == "Conv1D")  # PEFT sets it on seeing a Conv1D
    state = peft_weights(pmodel, MODULES)
    xs = inputs(kind)
    for name in MODULES:
        np.testing.assert_allclose(ad.forward(name, xs[name], state), peft_forward(pmodel, name, xs[name]),
                                   atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_reloaded_in_peft(pmodel, ad, base_model(kind), tmp_path / "ours", xs, atol=1e-6, rtol=1e-6)
