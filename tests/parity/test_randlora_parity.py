"""RandLoRA parity with Hugging Face PEFT 0.21.2: forward, merge (``merge_and_unload``), unmerge and
checkpoints both ways, on nn.Linear layers wider than tall and taller than wide and a transformers Conv1D
sharing one pair of bases (dense and sparse), a rank not dividing the layers' sizes, bfloat16 weights.

PEFT starts with ``λ = 0``; every ``λ`` and ``γ`` is redrawn from a NumPy seed before saving."""

from __future__ import annotations

import numpy as np
import pytest

from tests.parity.conftest import (
    check_state_merge_as_peft,
    TOL_W,
    TOL_Y,
    assert_close,
    base_state,
    bits_differ,
    build_model,
    layer_factory,
    load_in_peft,
    load_peft_checkpoint,
    make_input,
    peft_forward,
    redraw,
    require_peft,
    t2n,
)

torch, peft = require_peft()

import peftmath  # noqa: E402
from peftmath.errors import CheckpointError  # noqa: E402
from peftmath.methods import randlora  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

LAYERS = {"up": ("linear", dict(in_f=6, out_f=14)), "down": ("linear", dict(in_f=14, out_f=5, bias=False)),
          "c": ("conv1d_t", dict(in_f=9, out_f=7))}
CONFIG = dict(target_modules=list(LAYERS), r=4, randlora_alpha=3)
#: RandLoRA's tensors do not tell a Linear from a Conv1D, and PEFT's saved config says fan_in_fan_out=true for
#: all once one Conv1D is adapted: the kinds are given (or come from the model type, specs/randlora.md)
KINDS = {"up": "Linear", "down": "Linear", "c": "Conv1D"}


def _model(dtype: str = "float32"):
    return build_model({n: layer_factory(k, **kw) for n, (k, kw) in LAYERS.items()}, seed=0, dtype=dtype)


def _peft(dtype: str = "float32", **extra):
    model = _model(dtype)
    state = base_state(model)
    pm = peft.get_peft_model(model, peft.RandLoraConfig(**CONFIG, **extra))
    redraw(pm, {"randlora_lambda": (0.0, 1.0), "randlora_gamma": (0.1, 0.05)}, seed=3)
    pm.eval()
    return pm, state


@pytest.mark.parametrize("extra", [{}, {"sparse": True}, {"very_sparse": True}], ids=["dense", "sparse", "very-sparse"])
def test_peft_checkpoint_forward_merge_unmerge(tmp_path, extra):
    pm, state = _peft(**extra)
    adapter = load_peft_checkpoint(pm, tmp_path)
    assert sorted(adapter.shared) == sorted(randlora.SHARED_KEYS)
    assert sorted(adapter.params["up"]) == sorted(randlora.PARAMETER_SUFFIXES)  # PEFT saves the bases per module too
    assert adapter.params["down"]["randlora_lambda"].shape == (4, 2)  # n = ceil(5 / 4)
    kinds = KINDS
    for name in LAYERS:
        x = make_input(pm, name)
        want = peft_forward(pm, name, x)
        assert_close(adapter.forward(name, x, state, kind=kinds[name]), want, **TOL_Y, what=f"forward {name}")
    with torch.no_grad():
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    check_state_merge_as_peft(adapter, state, want, layer_kinds=kinds, tol=TOL_W,
                              moved=("up.weight", "down.weight", "c.weight"), folder=tmp_path)


def test_peftmath_checkpoint_loads_in_peft(tmp_path):
    model = _model()
    state = base_state(model)
    cfg = randlora.RandLoraConfig(**CONFIG, init_weights=False)
    adapter = peftmath.create_adapter(state, cfg, seed=5, layer_kinds={"c": "Conv1D"})
    # sized to the elementwise largest (out, in) = (14, 14), as PEFT's _find_dim: D_min = 14, N = ceil(14 / 4)
    assert adapter.shared[randlora.A_KEY].shape == (4, 1, 14) and adapter.shared[randlora.B_KEY].shape == (14, 4, 4)
    peftmath.save_adapter(adapter, tmp_path / "a")
    pm = load_in_peft(model, tmp_path / "a")
    for name in LAYERS:
        x = make_input(pm, name)
        assert_close(adapter.forward(name, x, state, kind=KINDS[name]), peft_forward(pm, name, x), **TOL_Y,
                     what=f"forward {name}")
    with torch.no_grad():
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    merged = adapter.merge(state, layer_kinds=KINDS)
    for key, w in want.items():
        assert_close(merged[key], w, **TOL_W, what=f"merge {key}")


def test_bfloat16_merge_bits_with_peft_compat(tmp_path):
    """bfloat16 weights: PEFT rounds ΔW (float32) to bfloat16 and adds in bfloat16; ``peft_compat=True`` gives
    its bits; the default is the float32 sum rounded once (PEFT's double rounding can be further from the exact
    sum than one ulp of the result where |ΔW| is not small against |W|)."""
    pm, state = _peft("bfloat16")
    adapter = load_peft_checkpoint(pm, tmp_path)
    kinds = KINDS
    assert adapter.params["up"]["randlora_lambda"].dtype == np.float32  # PEFT keeps the adapter in float32
    compat = adapter.merge(state, layer_kinds=kinds, peft_compat=True)
    default = adapter.merge(state, layer_kinds=kinds)
    once = adapter.merge({k: v.astype(np.float32) for k, v in state.items()}, layer_kinds=kinds)
    with torch.no_grad():
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    for key in ("up.weight", "down.weight", "c.weight"):
        assert bits_differ(compat[key], want[key]) <= max(1, want[key].size // 1000), key
        exact = once[key].astype(np.float64)  # float32: exact to 2^-24 relative, far below a bfloat16 ulp
        err = np.abs(default[key].astype(np.float64) - exact)
        assert np.all(err <= 0.5 * np.abs(np.spacing(default[key])).astype(np.float64) * (1 + 2**-15)), key


def test_save_projection_false_is_refused(tmp_path):
    pm, _ = _peft(save_projection=False)
    with pytest.raises(CheckpointError, match="save_projection=false"):
        adapter = load_peft_checkpoint(pm, tmp_path)
        adapter.merge(base_state(_model()), layer_kinds=KINDS)


def test_trainable_parameter_count_matches_peft(tmp_path):
    """``Adapter.num_trainable_parameters`` counts what PEFT trains (``get_nb_trainable_parameters``)."""
    pm, _ = _peft()
    ad = load_peft_checkpoint(pm, tmp_path)
    assert ad.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]
