"""VB-LoRA parity with Hugging Face PEFT 0.21.2: forward, merge (``merge_and_unload``), unmerge and
checkpoints both ways, in both saved forms (the logits, and ``save_only_topk_weights``'s indices and
weights), on nn.Linear and transformers Conv1D layers sharing one vector bank.

PEFT draws the logits ``N(0, 0.1²)`` and the bank ``U(±0.02)``; here every adapter tensor is redrawn
``N(0, 1)`` from a NumPy seed (no ties among the logits: ``torch.topk`` orders ties arbitrarily)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from tests.parity.conftest import (
    TOL_W,
    TOL_Y,
    assert_close,
    base_state,
    bf16_ulps,
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
from peftmath.io.safetensors import load_file  # noqa: E402
from peftmath.methods import vblora  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

LAYERS = {"q": ("linear", dict(in_f=8, out_f=12)), "o": ("linear", dict(in_f=12, out_f=8, bias=False)),
          "c": ("conv1d_t", dict(in_f=8, out_f=4))}
CONFIG = dict(target_modules=list(LAYERS), r=3, num_vectors=7, vector_length=4, topk=3)


def _model(dtype: str = "float32"):
    return build_model({n: layer_factory(k, **kw) for n, (k, kw) in LAYERS.items()}, seed=0, dtype=dtype)


def _load_in_peft(model, folder):
    """``PeftModel.from_pretrained`` without a warning about missing or unexpected keys. (conftest's
    ``load_in_peft`` also loads a second adapter and requires an empty ``missing_keys``: PEFT 0.21.2 lists
    the shared bank there once per adapted module, ``<module>.vblora_vector_bank.<name>``, the layers'
    references to the one bank that ``base_model.vblora_vector_bank`` loads; specs/vblora.md.)"""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, folder)
    msgs = [str(w.message) for w in caught]
    assert not [m for m in msgs if any(s in m.lower() for s in ("missing", "unexpected", "not present"))], msgs
    again = pm.load_adapter(folder, adapter_name="again")
    assert again.unexpected_keys == [] and all(".vblora_vector_bank.again" in k for k in again.missing_keys), again
    pm.set_adapter("default")
    return pm.eval()


def _assert_saves_back_identically(adapter, folder):
    """peftmath writes PEFT's files again (the conftest helper compares bits of 2- and 4-byte dtypes only;
    the top-k indices are uint8)."""
    out = peftmath.save_adapter(adapter, folder / "again")
    assert json.loads((out / "adapter_config.json").read_text()) == \
        json.loads((folder / "adapter_config.json").read_text())
    t1, t2 = load_file(folder / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert sorted(t1) == sorted(t2)
    for key in t1:
        assert t1[key].dtype == t2[key].dtype and t1[key].tobytes() == t2[key].tobytes(), key


def _peft(topk_only: bool, dtype: str = "float32"):
    model = _model(dtype)
    state = base_state(model)
    pm = peft.get_peft_model(model, peft.VBLoRAConfig(**CONFIG, save_only_topk_weights=topk_only))
    redraw(pm, {"vblora_": (0.0, 1.0)}, seed=3)
    pm.eval()
    return pm, state


@pytest.mark.parametrize("topk_only", [False, True], ids=["logits", "topk-weights"])
def test_peft_checkpoint_forward_merge_unmerge(tmp_path, topk_only):
    pm, state = _peft(topk_only)
    adapter = load_peft_checkpoint(pm, tmp_path)
    suffixes = sorted(adapter.params["q"])
    assert suffixes == (sorted(vblora.TOPK_INDICES + vblora.TOPK_WEIGHTS) if topk_only else sorted(vblora.LOGITS))
    if topk_only:
        assert adapter.params["q"]["vblora_logits_A_topk_indices"].dtype == np.uint8
        assert adapter.params["q"]["vblora_logits_A_topk_weights"].shape == (3, 2, 2)
    assert list(adapter.shared) == [vblora.BANK_KEY]
    for name in LAYERS:
        x = make_input(pm, name)
        want = peft_forward(pm, name, x)
        assert_close(adapter.forward(name, x, state), want, **TOL_Y, what=f"forward {name}")
        assert_close(adapter.forward(name, x, state, peft_compat=True), want, **TOL_Y, what=f"compat forward {name}")
    merged = adapter.merge(state)
    inplace = {k: v.copy() for k, v in state.items()}
    adapter.merge(inplace, copy=False)
    with torch.no_grad():
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    assert sorted(merged) == sorted(want)
    for key, w in want.items():
        assert_close(merged[key], w, **TOL_W, what=f"merge {key}")
        assert_close(inplace[key], w, **TOL_W, what=f"merge copy=False {key}")
    assert float(np.max(np.abs(merged["q.weight"] - state["q.weight"]))) > 0.1  # not a vacuous check
    back = adapter.unmerge(merged)
    for key, w in state.items():
        assert_close(back[key], w, **TOL_W, what=f"unmerge {key}")
    _assert_saves_back_identically(adapter, tmp_path)


def test_topk_checkpoint_as_peft_reloads_it(tmp_path):
    """PEFT's own reload of a top-k checkpoint (logits log w, −inf elsewhere) computes what peftmath computes
    from the saved weights directly (default) and with PEFT's renormalisation (``peft_compat=True``)."""
    pm, state = _peft(True)
    adapter = load_peft_checkpoint(pm, tmp_path)
    fresh = _load_in_peft(_model(), tmp_path)
    for name in LAYERS:
        x = make_input(pm, name, seed=11)
        want = peft_forward(fresh, name, x)
        for compat in (False, True):
            assert_close(adapter.forward(name, x, state, peft_compat=compat), want, **TOL_Y, what=f"{name} {compat}")
    with torch.no_grad():
        want = {k: t2n(v) for k, v in fresh.merge_and_unload().state_dict().items()}
    for compat in (False, True):
        got = adapter.merge(state, peft_compat=compat)
        for key, w in want.items():
            assert_close(got[key], w, **TOL_W, what=f"merge {key} compat={compat}")


@pytest.mark.parametrize("topk_only", [False, True], ids=["logits", "topk-weights"])
def test_peftmath_checkpoint_loads_in_peft(tmp_path, topk_only):
    model = _model()
    state = base_state(model)
    cfg = vblora.VBLoRAConfig(**CONFIG, save_only_topk_weights=topk_only, init_logits_std=1.0,
                              init_vector_bank_bound=1.0)
    adapter = peftmath.create_adapter(state, cfg, seed=5, layer_kinds={"c": "Conv1D"})
    assert ("vblora_logits_A_topk_indices" in adapter.params["c"]) == topk_only
    peftmath.save_adapter(adapter, tmp_path / "a")
    pm = _load_in_peft(model, tmp_path / "a")
    assert pm.peft_config["default"].fan_in_fan_out  # PEFT's saved flag once a Conv1D is adapted
    for name in LAYERS:
        x = make_input(pm, name)
        assert_close(adapter.forward(name, x, state), peft_forward(pm, name, x), **TOL_Y, what=f"forward {name}")
    with torch.no_grad():
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    merged = adapter.merge(state)
    for key, w in want.items():
        assert_close(merged[key], w, **TOL_W, what=f"merge {key}")


def test_bfloat16_merge_within_one_rounding(tmp_path):
    """A bfloat16 model: PEFT keeps the adapter in float32 (autocast_adapter_dtype) and adds the float32
    ΔW into the bfloat16 weight, rounding once; peftmath's merge rounds the float32 sum once too."""
    pm, state = _peft(False, "bfloat16")
    adapter = load_peft_checkpoint(pm, tmp_path)
    assert adapter.params["q"]["vblora_logits_A"].dtype == np.float32
    merged = adapter.merge(state)
    with torch.no_grad():
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    for key in ("q.weight", "o.weight", "c.weight"):
        assert merged[key].dtype == want[key].dtype
        assert np.all(bf16_ulps(merged[key], want[key]) <= 1.0), key


def test_trainable_parameter_count_matches_peft(tmp_path):
    """``Adapter.num_trainable_parameters`` counts what PEFT trains (``get_nb_trainable_parameters``)."""
    pm, _ = _peft(False)
    ad = load_peft_checkpoint(pm, tmp_path)
    assert ad.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]
