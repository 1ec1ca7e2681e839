"""PVeRA parity with Hugging Face PEFT 0.21.2: forward (eval: the mean code), merge (``merge_and_unload``),
unmerge and checkpoints both ways, on nn.Linear layers of different sizes and a transformers Conv1D sharing one pair
of projections; the sampled forward against PEFT's with PEFT's own noise; ``sample_at_inference`` refused (and merged
as PEFT with ``peft_compat``); bfloat16; the trainable-parameter count.

PEFT starts with ``λ_b = 0``; every ``λ`` is redrawn from a NumPy seed before saving."""

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
    n2t,
    peft_forward,
    redraw,
    require_peft,
    t2n,
)

torch, peft = require_peft()

import peftmath  # noqa: E402
from peftmath.errors import CheckpointError, UnsupportedError  # noqa: E402
from peftmath.methods import pvera  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

LAYERS = {"up": ("linear", {"in_f": 6, "out_f": 14}), "down": ("linear", {"in_f": 14, "out_f": 5, "bias": False}),
          "c": ("conv1d_t", {"in_f": 9, "out_f": 7})}
CONFIG = {"target_modules": list(LAYERS), "r": 4}
KINDS = {"up": "Linear", "down": "Linear", "c": "Conv1D"}


def _model(dtype: str = "float32"):
    return build_model({n: layer_factory(k, **kw) for n, (k, kw) in LAYERS.items()}, seed=0, dtype=dtype)


def _peft(dtype: str = "float32", **extra):
    model = _model(dtype)
    state = base_state(model)
    pm = peft.get_peft_model(model, peft.PveraConfig(**CONFIG, **extra))
    redraw(pm, {"pvera_lambda": (0.0, 1.0)}, seed=3)
    pm.eval()
    return pm, state


def _merged(pm) -> dict:
    with torch.no_grad():
        return {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}


def test_peft_checkpoint_forward_merge_unmerge(tmp_path):
    pm, state = _peft()
    adapter = load_peft_checkpoint(pm, tmp_path)
    assert sorted(adapter.shared) == sorted(pvera.SHARED_KEYS)
    assert adapter.shared[pvera.PVERA_A_KEY].shape == (8, 14) and adapter.shared[pvera.PVERA_B_KEY].shape == (14, 4)
    assert adapter.params["up"]["pvera_lambda_d"].shape == (8,)  # 2r: the mean and log-variance halves
    for name in LAYERS:
        x = make_input(pm, name)
        assert_close(adapter.forward(name, x, state, kind=KINDS[name]), peft_forward(pm, name, x), **TOL_Y,
                     what=f"forward {name}")
    check_state_merge_as_peft(adapter, state, _merged(pm), layer_kinds=KINDS, tol=TOL_W,
                              moved=("up.weight", "down.weight", "c.weight"), folder=tmp_path)


def test_sampled_forward_with_peft_noise(tmp_path):
    """PEFT's training forward samples ``z = μ + ε·exp(½ log σ²)``; given the same ε (drawn here from PEFT's own
    seeded generator, as its ``_reparametrize`` does) peftmath's ``forward(noise=ε)`` gives PEFT's output."""
    pm, state = _peft(sample_at_inference=True, generator_seed=11)
    adapter = load_peft_checkpoint(pm, tmp_path)
    for name in ("up", "c"):
        layer = pm.base_model.model.get_submodule(name)
        x = make_input(pm, name)
        eps = torch.randn((*x.shape[:-1], 4), generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            want = t2n(layer(n2t(x)))  # PEFT's generator is fresh: its first draw is eps
        mod = adapter.module(name, weight_shape=state[f"{name}.weight"].shape, kind=KINDS[name])
        got = pvera.forward(x, state[f"{name}.weight"], *mod._args(), bias=state.get(f"{name}.bias"), layer=mod.layer,
                            noise=t2n(eps))
        assert_close(got, want, **TOL_Y, what=f"sampled forward {name}")
        mean = pvera.forward(x, state[f"{name}.weight"], *mod._args(), bias=state.get(f"{name}.bias"), layer=mod.layer)
        assert float(np.max(np.abs(got - mean))) > 0.05  # the noise matters
        with pytest.raises(UnsupportedError, match="sample_at_inference=true"):
            adapter.forward(name, x, state, kind=KINDS[name])
    with pytest.raises(UnsupportedError, match="peft_compat=True"):
        adapter.merge(state, layer_kinds=KINDS)
    compat = adapter.merge(state, layer_kinds=KINDS, peft_compat=True)  # PEFT merges the mean
    for key, w in _merged(pm).items():
        assert_close(compat[key], w, **TOL_W, what=f"merge {key}")


def test_peftmath_checkpoint_loads_in_peft(tmp_path):
    model = _model()
    state = base_state(model)
    cfg = pvera.PveraConfig(**CONFIG, init_weights=False)
    adapter = peftmath.create_adapter(state, cfg, seed=5, layer_kinds={"c": "Conv1D"})
    assert adapter.shared[pvera.PVERA_A_KEY].shape == (8, 14) and adapter.shared[pvera.PVERA_B_KEY].shape == (14, 4)
    peftmath.save_adapter(adapter, tmp_path / "a")
    pm = load_in_peft(model, tmp_path / "a")
    for name in LAYERS:
        x = make_input(pm, name)
        assert_close(adapter.forward(name, x, state, kind=KINDS[name]), peft_forward(pm, name, x), **TOL_Y,
                     what=f"forward {name}")
    merged = adapter.merge(state, layer_kinds=KINDS)
    for key, w in _merged(pm).items():
        assert_close(merged[key], w, **TOL_W, what=f"merge {key}")
    for key in ("up.weight", "down.weight", "c.weight"):
        assert float(np.max(np.abs(merged[key] - state[key]))) > 0.05, key


def test_bfloat16_merge(tmp_path):
    """bfloat16 weights with PEFT's float32 adapter: PEFT adds the float32 ΔW into the weight (one rounding), as
    peftmath's default does; ``peft_compat`` gives the same bits."""
    pm, state = _peft("bfloat16")
    adapter = load_peft_checkpoint(pm, tmp_path)
    compat = adapter.merge(state, layer_kinds=KINDS, peft_compat=True)
    default = adapter.merge(state, layer_kinds=KINDS)
    want = _merged(pm)
    for key in ("up.weight", "down.weight", "c.weight"):
        for got in (compat, default):
            assert bits_differ(got[key], want[key]) <= max(1, want[key].size // 1000), key


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
