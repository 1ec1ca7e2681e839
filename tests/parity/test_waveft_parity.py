"""WaveFT parity with Hugging Face PEFT 0.21.2: the filters against PEFT's table, ``ΔW`` against PEFT's
``get_delta_weight`` (its ``waverec2d``) for every family peftmath computes, forward / merge / unmerge on
nn.Linear and transformers Conv1D, checkpoints both ways (the positions are not saved) and the
trainable-parameter count."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    check_module_math_as_peft,
    check_reloaded_in_peft,
    load_peft_checkpoint,
    peft_weights,
    redraw,
    require_peft,
)

torch, peft = require_peft()

from torch import nn  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from peftmath.methods import waveft  # noqa: E402

#: one model per layer kind (the spectrum does not tell a Linear from a Conv1D; specs/waveft.md)
KINDS = {"Linear": ("lin0", "lin1"), "Conv1D": ("c0", "c1")}


class Tiny(nn.Module):
    def __init__(self, kind):
        super().__init__()
        if kind == "Linear":
            self.lin0, self.lin1 = nn.Linear(12, 10), nn.Linear(10, 7)
        else:
            self.c0, self.c1 = Conv1D(9, 12), Conv1D(9, 9)  # weights (in, out) = (12, 9), (9, 9)


def base_model(kind, seed=0):
    model = Tiny(kind)
    redraw(model, seed=seed)
    return model


def make_peft(kind, seed=1, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.WaveFTConfig(target_modules=list(KINDS[kind]), **{"n_frequency": 20, "scaling": 7.0, **config})
        pmodel = peft.get_peft_model(base_model(kind), cfg)
    redraw(pmodel, {"waveft_spectrum": (0.0, 1.0)}, seed=seed)
    return pmodel.eval()


def inputs(kind, seed=5):
    rng = np.random.default_rng(seed)
    first, second = KINDS[kind]
    return {first: rng.standard_normal((3, 2, 12)).astype(np.float32),
            second: rng.standard_normal((4, 10 if kind == "Linear" else 9)).astype(np.float32)}


@pytest.mark.parametrize("family", waveft.SUPPORTED_FAMILIES)
def test_filters_equal_peft_table(family):
    from peft.tuners.waveft.constants import WAVELET_REDUCTIONS
    from peft.tuners.waveft.wavelet import Wavelet

    lo, hi = waveft.reconstruction_filters(family)
    np.testing.assert_allclose(lo, Wavelet(family).rec_lo, atol=1e-11, rtol=0)
    np.testing.assert_allclose(hi, Wavelet(family).rec_hi, atol=1e-11, rtol=0)
    assert WAVELET_REDUCTIONS[family] == (len(lo) - 2, len(lo) - 2)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("config", [{}, dict(wavelet_family="db2"), dict(wavelet_family="sym3", random_loc_seed=3),
                                    dict(wavelet_family="db6", n_frequency=70), dict(use_idwt=False),
                                    dict(n_frequency_pattern={"1": 7}), dict(proportional_parameters=True)])
def test_forward_merge_unmerge(kind, config, tmp_path):
    MODULES = KINDS[kind]
    pmodel = make_peft(kind, **config)
    ad = load_peft_checkpoint(pmodel, tmp_path)
    state = peft_weights(pmodel, MODULES)
    xs = inputs(kind)
    check_module_math_as_peft(ad, pmodel, state, xs, MODULES, delta_tol=2e-6, transposed=kind == "Conv1D")


@pytest.mark.parametrize("kind", list(KINDS))
def test_checkpoints_both_ways(kind, tmp_path):
    pmodel = make_peft(kind, random_loc_seed=99, wavelet_family="db2")
    ad = load_peft_checkpoint(pmodel, tmp_path / "peft")
    assert isinstance(ad.config, waveft.WaveFTConfig) and ad.config.random_loc_seed == 99
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_reloaded_in_peft(pmodel, ad, base_model(kind), tmp_path / "ours", inputs(kind), atol=1e-6, rtol=1e-6)


def test_unsupported_family_is_refused_at_load(tmp_path):
    """sym4 is in PEFT's filter table but is not a Daubechies filter peftmath computes: refused when the
    module is bound, not a wrong ΔW."""
    from peftmath.errors import UnsupportedError

    pmodel = make_peft("Linear", wavelet_family="sym4")
    ad = load_peft_checkpoint(pmodel, tmp_path)
    with pytest.raises(UnsupportedError, match="sym4"):
        ad.merge(peft_weights(pmodel, KINDS["Linear"]))


def test_trainable_parameter_count_matches_peft(tmp_path):
    pmodel = make_peft("Linear", n_frequency_pattern={"lin1": 5})
    ad = load_peft_checkpoint(pmodel, tmp_path)
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0]
