"""FRoD parity with Hugging Face PEFT 0.21.2: forward, merge (``merge_and_unload``), unmerge with the merge
record, checkpoints both ways, on nn.Linear layers taller than wide and wider than tall and a transformers Conv1D
(one category each, plus two layers sharing a category); bfloat16 weights with ``peft_compat``; the
trainable-parameter count.

PEFT starts with ``λ = λ₀`` and ``S = 0``; ``λ`` and ``S`` are redrawn around them from a NumPy seed before saving."""

from __future__ import annotations

import numpy as np
import pytest

from tests.parity.conftest import (
    TOL_W,
    TOL_Y,
    assert_close,
    assert_saves_back_identically,
    base_state,
    bf16_ulps,
    bits_differ,
    build_model,
    layer_factory,
    load_in_peft,
    load_peft_checkpoint,
    make_input,
    peft_forward,
    require_peft,
    t2n,
)

torch, peft = require_peft()

import peftmath  # noqa: E402
from peftmath.errors import CheckpointError, NotInvertibleError  # noqa: E402
from peftmath.methods import frod  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

LAYERS = {"up": ("linear", {"in_f": 6, "out_f": 14}), "down": ("linear", {"in_f": 14, "out_f": 5, "bias": False}),
          "c": ("conv1d_t", {"in_f": 9, "out_f": 7})}
KINDS = {"up": "Linear", "down": "Linear", "c": "Conv1D"}
CONFIG = {"target_modules": list(LAYERS), "sparse_rate": 0.2, "progressbar": False}


def _model(dtype: str = "float32", layers=LAYERS):
    return build_model({n: layer_factory(k, **kw) for n, (k, kw) in layers.items()}, seed=0, dtype=dtype)


def _perturb(pm, seed: int = 3) -> None:
    """λ += N(0, 0.1²), S ~ N(0, 0.1²) (PEFT's own test init), from a NumPy seed."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "frod_lambda" in name:
                p.add_(torch.from_numpy(rng.normal(0.0, 0.1, tuple(p.shape)).astype(np.float32)).to(p.dtype))


def _peft(dtype: str = "float32", layers=LAYERS, **extra):
    model = _model(dtype, layers)
    state = base_state(model)
    pm = peft.get_peft_model(model, peft.FrodConfig(**{**CONFIG, "target_modules": list(layers), **extra}))
    _perturb(pm)
    pm.eval()
    return pm, state


def _merged(pm) -> dict:
    with torch.no_grad():
        return {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}


def test_peft_checkpoint_forward_merge_unmerge(tmp_path):
    pm, state = _peft()
    adapter = load_peft_checkpoint(pm, tmp_path)
    assert sorted(adapter.shared) == sorted(k for m in LAYERS for k in frod.shared_keys_of(m).values())
    assert adapter.params["up"]["frod_lambda_l"].shape == (6,)
    for name in LAYERS:
        x = make_input(pm, name)
        assert_close(adapter.forward(name, x, state, kind=KINDS[name]), peft_forward(pm, name, x), **TOL_Y,
                     what=f"forward {name}")
    records: dict = {}
    merged = adapter.merge(state, layer_kinds=KINDS, records=records)
    inplace = {k: v.copy() for k, v in state.items()}
    adapter.merge(inplace, copy=False, layer_kinds=KINDS)
    want = _merged(pm)
    assert sorted(merged) == sorted(want)
    for key, w in want.items():
        assert_close(merged[key], w, **TOL_W, what=f"merge {key}")
        assert_close(inplace[key], w, **TOL_W, what=f"merge copy=False {key}")
    for key in ("up.weight", "down.weight", "c.weight"):
        assert float(np.max(np.abs(merged[key] - state[key]))) > 0.05, key  # not a vacuous check
    back = adapter.unmerge(merged, layer_kinds=KINDS, records=records)
    for key, w in state.items():
        np.testing.assert_array_equal(back[key], w)  # the record is the base weight
    with pytest.raises(NotInvertibleError, match="record"):
        adapter.unmerge(merged, layer_kinds=KINDS)
    assert_saves_back_identically(adapter, tmp_path)


def test_shared_category(tmp_path):
    """Two layers of one category (``h.0.attn`` and ``h.1.attn``) share one ``V`` (PEFT's joint decomposition of
    both weights) and one ``S`` pattern; each has its own ``U`` from its own weight."""
    layers = {"h.0.attn": ("linear", {"in_f": 8, "out_f": 10}), "h.1.attn": ("linear", {"in_f": 8, "out_f": 10})}
    pm, state = _peft(layers=layers)
    adapter = load_peft_checkpoint(pm, tmp_path)
    assert sorted(adapter.shared) == sorted(frod.shared_keys_of("h.0.attn").values())  # category "attn"
    for name in layers:
        x = make_input(pm, name)
        assert_close(adapter.forward(name, x, state), peft_forward(pm, name, x), **TOL_Y, what=f"forward {name}")
    merged = adapter.merge(state)
    for key, w in _merged(pm).items():
        assert_close(merged[key], w, **TOL_W, what=f"merge {key}")


def test_peftmath_checkpoint_loads_in_peft(tmp_path):
    """A checkpoint written by ``peftmath.save_adapter`` (here: a PEFT adapter read and written back by peftmath,
    every tensor through peftmath's writer) loads in ``PeftModel.from_pretrained`` with the same forwards and merge.
    (PEFT recomputes ``V`` and ``U`` from the base weights when it loads and then reads the saved ``V`` without
    recomputing ``U``: a ``V`` computed elsewhere, e.g. by ``create_adapter``, loads consistently only where it equals
    PEFT's own computation; specs/frod.md.)"""
    pm, state = _peft()
    adapter = load_peft_checkpoint(pm, tmp_path / "peft")
    peftmath.save_adapter(adapter, tmp_path / "a")
    again = load_in_peft(_model(), tmp_path / "a")
    for name in LAYERS:
        x = make_input(pm, name)
        assert_close(peft_forward(again, name, x), adapter.forward(name, x, state, kind=KINDS[name]), **TOL_Y,
                     what=f"forward {name}")
    merged = adapter.merge(state, layer_kinds=KINDS)
    for key, w in _merged(again).items():
        assert_close(merged[key], w, **TOL_W, what=f"merge {key}")


def test_created_adapter_round_trip(tmp_path):
    """``create_adapter``: ``λ = λ₀`` from each weight, so with ``init_weights=True`` the adapter is a no-op (merge gives
    the base back), and saved and loaded by peftmath it merges the same."""
    model = _model()
    state = base_state(model)
    cfg = frod.FrodConfig(**CONFIG)
    adapter = peftmath.create_adapter(state, cfg, seed=5, layer_kinds={"c": "Conv1D"})
    merged = adapter.merge(state, layer_kinds=KINDS)
    for key in ("up.weight", "down.weight", "c.weight"):
        assert_close(merged[key], state[key], **TOL_W, what=f"no-op {key}")
    peftmath.save_adapter(adapter, tmp_path / "a")
    back = peftmath.load_adapter(tmp_path / "a")
    for key, w in back.merge(state, layer_kinds=KINDS).items():
        np.testing.assert_array_equal(w, merged[key])


def test_bfloat16_merge_with_peft_compat(tmp_path):
    """bfloat16 weights (PEFT casts the adapter to the weight's dtype and forms ``W + (W_FRoD − W)`` in it):
    ``peft_compat=True`` is within one bfloat16 rounding of PEFT; the default rounds the float64 ``W_FRoD`` once."""
    pm, state = _peft("bfloat16", layers={"up": LAYERS["up"]})
    adapter = load_peft_checkpoint(pm, tmp_path)
    compat = adapter.merge(state, peft_compat=True)
    default = adapter.merge(state)
    want = _merged(pm)
    key = "up.weight"
    assert np.all(bf16_ulps(compat[key], want[key]) <= 1.0), bf16_ulps(compat[key], want[key]).max()
    assert bits_differ(compat[key], want[key]) <= max(1, want[key].size // 10)
    assert float(np.max(np.abs(default[key].astype(np.float32) - want[key].astype(np.float32)))) < 0.02


def test_save_projection_false_is_refused(tmp_path):
    pm, state = _peft(save_projection=False)
    with pytest.raises(CheckpointError, match="save_projection=false"):
        load_peft_checkpoint(pm, tmp_path).merge(state, layer_kinds=KINDS)


def test_trainable_parameter_count_matches_peft(tmp_path):
    """``Adapter.num_trainable_parameters`` counts what PEFT trains (``get_nb_trainable_parameters``)."""
    pm, _ = _peft()
    ad = load_peft_checkpoint(pm, tmp_path)
    assert ad.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]
