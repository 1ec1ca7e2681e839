"""UniLoRA parity with Hugging Face PEFT 0.21.2: the index assignment and scales (bit for bit), forward,
merge (``merge_and_unload``), unmerge and checkpoints both ways (``save_indices=True``), on nn.Linear and
transformers Conv1D layers registered out of alphabetical order; PEFT's default checkpoint (θ_d only)
refused with the reason; PEFT's matrix rows with ``save_indices=True``; the trainable-parameter count.

PEFT draws ``θ_d`` ``U(±0.02)``; here it is redrawn ``N(0, 1)`` from a NumPy seed so that ΔW is visible."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    TOL_W,
    TOL_Y,
    assert_close,
    assert_saves_back_identically,
    base_state,
    bits_differ,
    build_model,
    layer_factory,
    load_peft_checkpoint,
    make_input,
    peft_forward,
    redraw,
    require_peft,
    t2n,
)

torch, peft = require_peft()

import peftmath  # noqa: E402
from peftmath.errors import UnsupportedError  # noqa: E402
from peftmath.layers import Layer  # noqa: E402
from peftmath.methods import unilora  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

#: registered in this order (PEFT's module order), which is not the names' sorted order
LAYERS = {"z_q": ("linear", dict(in_f=8, out_f=12)), "c": ("conv1d_t", dict(in_f=12, out_f=6)),
          "a_o": ("linear", dict(in_f=6, out_f=8, bias=False))}
KINDS = {"z_q": "Linear", "c": "Conv1D", "a_o": "Linear"}
CONFIG = dict(target_modules=list(LAYERS), r=3, theta_d_length=41)


def _model(dtype: str = "float32"):
    return build_model({n: layer_factory(k, **kw) for n, (k, kw) in LAYERS.items()}, seed=0, dtype=dtype)


def _peft(save_indices: bool = True, dtype: str = "float32"):
    model = _model(dtype)
    state = base_state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.UniLoraConfig(**CONFIG, save_indices=save_indices))
    redraw(pm, {"unilora_theta_d": (0.0, 1.0)}, seed=3)
    return pm.eval(), state


def _layers(state):
    return [Layer.of(state[f"{n}.weight"].shape, KINDS[n]) for n in LAYERS]


@pytest.mark.parametrize(("count", "length", "seed"), [(0, 5, 1), (7, 10, 42), (100, 7, 3), (1234, 101, 0)])
def test_generate_index_is_peft(count, length, seed):
    want = peft.tuners.unilora.model.UniLoraModel.generate_index(count, length, seed).numpy()
    got = unilora.generate_index(count, length, seed)
    assert got.dtype == np.int64 and np.array_equal(got, want)


def test_assignment_and_scales_are_peft_bits():
    """peftmath's indices and scales for the layers in the model's order are PEFT's, bit for bit."""
    pm, state = _peft()
    plan = unilora.assign(_layers(state), unilora.UniLoraConfig(**CONFIG, save_indices=True))
    for name, part in zip(LAYERS, plan):
        layer = pm.base_model.model.get_submodule(name)
        for key, got in part.items():
            want = t2n(getattr(layer, key)["default"])
            assert got.dtype == want.dtype and got.shape == want.shape, (name, key)
            assert bits_differ(got, want) == 0, (name, key)


def test_peft_checkpoint_forward_merge_unmerge(tmp_path):
    pm, state = _peft()
    adapter = load_peft_checkpoint(pm, tmp_path)
    assert adapter.modules == sorted(LAYERS) and list(adapter.shared) == [unilora.THETA_KEY]
    for name in LAYERS:
        x = make_input(pm, name)
        for compat in (False, True):
            assert_close(adapter.forward(name, x, state, peft_compat=compat), peft_forward(pm, name, x), **TOL_Y,
                         what=f"forward {name} compat={compat}")
    assert_saves_back_identically(adapter, tmp_path)
    with torch.no_grad():
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    merged = adapter.merge(state)
    assert sorted(merged) == sorted(want)
    for key, w in want.items():
        assert_close(merged[key], w, **TOL_W, what=f"merge {key}")
    inplace = {k: v.copy() for k, v in state.items()}
    adapter.merge(inplace, copy=False)
    for key, w in want.items():
        assert_close(inplace[key], w, **TOL_W, what=f"merge copy=False {key}")
    back = adapter.unmerge(merged)
    for key in state:
        assert_close(back[key], state[key], **TOL_W, what=f"unmerge {key}")


def test_default_checkpoint_is_refused_with_the_reason(tmp_path):
    """``save_indices=False`` (PEFT's default): the file holds θ_d only; refused, naming the fix."""
    pm, _ = _peft(save_indices=False)
    with pytest.raises(UnsupportedError, match=r"save_indices=False.*order of the adapted modules.*save_indices=True"):
        load_peft_checkpoint(pm, tmp_path)


def test_default_checkpoint_with_the_models_order_regenerates_peft(tmp_path):
    """PEFT's default checkpoint (θ_d only) and the adapted layers in the model's order: ``regenerate`` gives
    the indices and scales PEFT regenerates on load (bits), and the adapter PEFT's merge and forwards."""
    from safetensors.numpy import load_file

    pm, state = _peft(save_indices=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path)
    theta = load_file(str(tmp_path / "adapter_model.safetensors"))[unilora.THETA_KEY]
    layers = dict(zip(LAYERS, _layers(state)))  # the model's order: z_q, c, a_o
    cfg, params = unilora.regenerate(peftmath.read_config(tmp_path), layers)
    for name in LAYERS:
        layer = pm.base_model.model.get_submodule(name)
        for key, got in params[name].items():
            assert bits_differ(np.asarray(got), t2n(getattr(layer, key)["default"])) == 0, (name, key)
    adapter = peftmath.Adapter(cfg, params, shared={unilora.THETA_KEY: theta}, layer_kinds={"c": "Conv1D"})
    for name in LAYERS:
        x = make_input(pm, name)
        assert_close(adapter.forward(name, x, state), peft_forward(pm, name, x), **TOL_Y, what=f"forward {name}")
    with torch.no_grad():
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    merged = adapter.merge(state)
    for key, w in want.items():
        assert_close(merged[key], w, **TOL_W, what=f"merge {key}")
    wrong = dict(sorted(layers.items()))  # the names' order is not the model's: other indices
    assert not np.array_equal(unilora.regenerate(cfg, wrong)[1]["c"]["unilora_indices_A"], params["c"]["unilora_indices_A"])


def test_peftmath_checkpoint_loads_in_peft(tmp_path):
    """create_adapter (indices for the modules in name order, θ_d N(0, 1)), saved with save_indices=True and
    loaded by ``PeftModel.from_pretrained``: PEFT uses the saved indices; same outputs and merge."""
    model = _model()
    state = base_state(model)
    cfg = unilora.UniLoraConfig(**CONFIG, save_indices=True, init_weights=False)
    adapter = peftmath.create_adapter(state, cfg, seed=5, layer_kinds={"c": "Conv1D"})
    peftmath.save_adapter(adapter, tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, tmp_path / "a").eval()
    msgs = [str(w.message) for w in caught]
    assert not [m for m in msgs if any(s in m.lower() for s in ("missing", "unexpected", "not present"))], msgs
    for name in LAYERS:
        x = make_input(pm, name)
        assert_close(adapter.forward(name, x, state), peft_forward(pm, name, x), **TOL_Y, what=f"forward {name}")
        layer = pm.base_model.model.get_submodule(name)
        assert np.array_equal(t2n(layer.unilora_indices_A["default"]), adapter.params[name]["unilora_indices_A"])
    with torch.no_grad():
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    merged = adapter.merge(state)
    for key, w in want.items():
        assert_close(merged[key], w, **TOL_W, what=f"merge {key}")


MATRIX_ROWS = ["Vanilla MLP 1 UniLora", "Vanilla MLP 2 UniLora", "Vanilla MLP 3 UniLora", "Vanilla MLP 4 UniLora",
               "Vanilla MLP 5 UniLora", "Embedding + transformers Conv1D 1 UniLora"]


@pytest.mark.parametrize("row_id", MATRIX_ROWS)
def test_peft_matrix_rows_with_saved_indices(row_id, tmp_path):
    """PEFT's six UniLoRA matrix rows, each with ``save_indices=True`` (the default rows save θ_d only and
    are refused): every check of the sweep passes."""
    from tests.parity.peft_matrix import ROWS
    from tests.parity.test_peft_matrix import run_row

    name, model_id, cls, kwargs = next(r for r in ROWS if r[0] == row_id)
    res = run_row((name, model_id, cls, {**kwargs, "save_indices": True}), tmp_path)
    assert res.outcome == "pass" and not res.vacuous, res.notes


def test_bfloat16_merge_is_peft_bits(tmp_path):
    """A bfloat16 model: PEFT keeps θ_d in float32 and the scales in bfloat16, forms ΔW in float32 and adds it
    into the bfloat16 weight, rounding once; so does peftmath."""
    pm, state = _peft(dtype="bfloat16")
    adapter = load_peft_checkpoint(pm, tmp_path)
    with torch.no_grad():
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    merged = adapter.merge(state)
    for key in ("z_q.weight", "c.weight", "a_o.weight"):
        assert merged[key].dtype == want[key].dtype and bits_differ(merged[key], want[key]) == 0, key


def test_trainable_parameter_count_matches_peft(tmp_path):
    """``Adapter.num_trainable_parameters`` counts what PEFT trains: θ_d, not the indices or scales."""
    pm, _ = _peft()
    ad = load_peft_checkpoint(pm, tmp_path)
    assert ad.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0] == CONFIG["theta_d_length"]
