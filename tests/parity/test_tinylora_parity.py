"""TinyLoRA parity with Hugging Face PEFT 0.21.2: PEFT's projection stream, forward, merge
(``merge_and_unload``), unmerge and checkpoints both ways, on an nn.Linear, a transformers Conv1D and an
nn.Embedding registered out of alphabetical order, under the three kinds of weight tying (a vector per
module, groups of two, one vector), and the trainable-parameter count.

PEFT draws ``v`` with ``init_weights="uniform"``; here every ``v`` is then redrawn ``N(0, 1)`` from a NumPy
seed, so that each group's vector is visibly different and a module reading the wrong one fails."""

from __future__ import annotations

import json
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
from peftmath.errors import CheckpointError  # noqa: E402
from peftmath.methods import tinylora  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

#: registered in this order (PEFT's module order), which is not the names' sorted order
LAYERS = {"z_q": ("linear", dict(in_f=8, out_f=12)), "c": ("conv1d_t", dict(in_f=12, out_f=6)),
          "emb": ("embedding", dict(vocab=30, dim=8)), "a_o": ("linear", dict(in_f=6, out_f=8, bias=False))}
TYING = {"own": 0.0, "pairs": 0.5, "one": 1.0}


def _model(dtype: str = "float32"):
    return build_model({n: layer_factory(k, **kw) for n, (k, kw) in LAYERS.items()}, seed=0, dtype=dtype)


def _peft(weight_tying: float, dtype: str = "float32", **kw):
    model = _model(dtype)
    state = base_state(model)
    cfg = peft.TinyLoraConfig(target_modules=list(LAYERS), r=3, u=5, weight_tying=weight_tying,
                              init_weights="uniform", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, cfg)
    redraw(pm, {"tinylora_v": (0.0, 1.0)}, seed=3)
    return pm.eval(), state


def _load_in_peft(model, folder):
    """``PeftModel.from_pretrained`` without a warning about missing or unexpected keys. (conftest's
    ``load_in_peft`` also loads the folder as a second adapter: PEFT 0.21.2 then decomposes every layer with
    the saved config's ``fan_in_fan_out``, true once a Conv1D is adapted, and so transposes the Linear
    weights of this mixed model; specs/tinylora.md, "PEFT compatibility".)"""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, folder)
    msgs = [str(w.message) for w in caught]
    assert not [m for m in msgs if any(s in m.lower() for s in ("missing", "unexpected", "not present"))], msgs
    return pm.eval()


@pytest.mark.parametrize(("seed", "u", "r"), [(42, 64, 2), (43, 5, 3), (7, 3, 2), (0, 1, 1), (9, 13, 1),
                                              (2**32 + 5, 4, 4)])
def test_projection_is_torchs_stream(seed, u, r):
    """:func:`tinylora.projection` reproduces ``torch.normal(..., generator=manual_seed(seed))`` on the CPU
    (both of torch's paths: fewer than 16 values, and blocks of 16 with a redrawn last block)."""
    gen = torch.Generator().manual_seed(seed)
    want = torch.normal(mean=0.0, std=1.0 / r ** 0.5, size=(u, r, r), generator=gen).numpy()
    got = tinylora.projection(seed, u, r)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 8 * np.finfo(np.float32).eps * max(1.0, float(np.max(np.abs(want))))


@pytest.mark.parametrize("tying", list(TYING))
def test_peft_checkpoint_forward_merge_unmerge(tmp_path, tying):
    pm, state = _peft(TYING[tying])
    adapter = load_peft_checkpoint(pm, tmp_path)
    assert adapter.modules == sorted(LAYERS)
    n_groups = {"own": 4, "pairs": 2, "one": 1}[tying]
    assert sorted(adapter.shared) == [f"base_model.tinylora_v.{g}" for g in range(n_groups)]
    # each module reads the vector PEFT gave it, found from its projection although the file sorts the names
    for i, name in enumerate(LAYERS):
        layer = pm.base_model.model.get_submodule(name)
        want_key = f"base_model.tinylora_v.{layer._tinylora_v_key['default']}"
        assert adapter._links[name] == {"tinylora_v": want_key}, (name, i)
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


def test_peftmath_checkpoint_loads_in_peft(tmp_path):
    """A peftmath adapter (create_adapter: A, B from the SVD, P from PEFT's stream, one vector v uniform)
    saved and loaded by ``PeftModel.from_pretrained``: same outputs and merge."""
    model = _model()
    state = base_state(model)
    cfg = tinylora.TinyLoraConfig(target_modules=list(LAYERS), r=3, u=5, weight_tying=1.0, init_weights="uniform",
                                  init_v_bound=1.0)
    adapter = peftmath.create_adapter(state, cfg, seed=5, layer_kinds={"c": "Conv1D", "emb": "Embedding"})
    peftmath.save_adapter(adapter, tmp_path / "a")
    back = peftmath.load_adapter(tmp_path / "a")
    assert back._links == adapter._links
    pm = _load_in_peft(model, tmp_path / "a")
    for name in LAYERS:
        x = make_input(pm, name)
        assert_close(adapter.forward(name, x, state), peft_forward(pm, name, x), **TOL_Y, what=f"forward {name}")
    with torch.no_grad():
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    merged = adapter.merge(state)
    for key, w in want.items():
        assert_close(merged[key], w, **TOL_W, what=f"merge {key}")


def test_fresh_init_matches_peft_up_to_singular_vector_signs():
    """peftmath's initialisation of a module is PEFT's: the same P (bits up to torch's vectorised
    log/cos), A and B equal up to the sign of each singular pair, and B A equal."""
    pm, state = _peft(0.0)
    for i, name in enumerate(LAYERS):
        layer = pm.base_model.model.get_submodule(name)
        kind = {"c": "Conv1D", "emb": "Embedding"}.get(name, "Linear")
        lay = peftmath.layers.Layer.of(state[f"{name}.weight"].shape, kind)
        p, _ = tinylora.TinyLoraModule.initialize(name, tinylora.TinyLoraConfig(r=3, u=5), lay,
                                                  weight=state[f"{name}.weight"])
        A, B = t2n(layer.tinylora_A["default"]), t2n(layer.tinylora_B["default"])
        signs = np.sign(np.sum(np.asarray(p["tinylora_A"]) * A, axis=1))
        assert_close(np.asarray(p["tinylora_A"]) * signs[:, None], A, atol=1e-5, rtol=1e-4, what=f"A {name}")
        assert_close(np.asarray(p["tinylora_B"]) * signs[None, :], B, atol=1e-5, rtol=1e-4, what=f"B {name}")
        P_peft = t2n(layer.tinylora_P["default"])
        if i == 0:  # the first module: place 0, as initialize assumes without init_shared's plan
            assert np.max(np.abs(np.asarray(p["tinylora_P"]) - P_peft)) <= 1e-6
        assert np.max(np.abs(tinylora.projection(42 + i, 5, 3) - P_peft)) <= 1e-6


def test_unsettled_groups_are_refused(tmp_path):
    """Two groups whose modules' projections were replaced: the checkpoint no longer says which vector a
    module reads, and the load refuses; a checkpoint without P (save_projection=False) too."""
    pm, _ = _peft(0.0)
    with torch.no_grad():
        pm.base_model.model.get_submodule("c").tinylora_P["default"].mul_(-1.0)
    with pytest.raises(CheckpointError, match=r"c: with 4 weight-tying groups.*place"):
        load_peft_checkpoint(pm, tmp_path / "a")
    pm, _ = _peft(0.0, save_projection=False)
    with pytest.raises(CheckpointError, match="save_projection"):
        load_peft_checkpoint(pm, tmp_path / "b")
    pm, state = _peft(1.0, save_projection=False)
    with pytest.raises(CheckpointError, match="save_projection"):
        load_peft_checkpoint(pm, tmp_path / "c").merge(state)


def test_bfloat16_merge_within_one_rounding(tmp_path):
    """A bfloat16 model: PEFT keeps A, B, P and v in float32 (``autocast_adapter_dtype``) and adds the
    float32 ΔW into the bfloat16 weight, rounding once, as peftmath does (``peft_compat`` too, the factors
    being float32): the same bits; within one rounding of a float64 reference (plus the float32 error of
    ΔW where W + ΔW cancels)."""
    pm, state = _peft(0.5, "bfloat16")
    adapter = load_peft_checkpoint(pm, tmp_path)
    with torch.no_grad():
        want = {k: t2n(v) for k, v in pm.merge_and_unload().state_dict().items()}
    merged, compat = adapter.merge(state), adapter.merge(state, peft_compat=True)
    ad64 = peftmath.Adapter(adapter.config, {m: {k: np.asarray(a, np.float64) for k, a in p.items()}
                                             for m, p in adapter.params.items()},
                            shared={k: np.asarray(v, np.float64) for k, v in adapter.shared.items()},
                            layer_kinds={"c": "Conv1D", "emb": "Embedding"})
    ref = ad64.merge({k: np.asarray(v, np.float64) for k, v in state.items()})
    eps32 = float(np.finfo(np.float32).eps)
    for key in ("z_q.weight", "c.weight", "emb.weight", "a_o.weight"):
        assert merged[key].dtype == compat[key].dtype == want[key].dtype
        assert bits_differ(merged[key], want[key]) == 0 and bits_differ(compat[key], want[key]) == 0, key
        w64, m64 = state[key].astype(np.float64), merged[key].astype(np.float64)
        bound = np.abs(np.spacing(ref[key].astype(merged[key].dtype))).astype(np.float64) + \
            8 * eps32 * (np.abs(w64) + np.abs(ref[key] - w64))
        assert np.all(np.abs(m64 - ref[key]) <= bound), key


@pytest.mark.parametrize("tying", list(TYING))
def test_trainable_parameter_count_matches_peft(tmp_path, tying):
    """``Adapter.num_trainable_parameters`` counts what PEFT trains: the group vectors, not A, B or P."""
    pm, _ = _peft(TYING[tying])
    ad = load_peft_checkpoint(pm, tmp_path)
    assert ad.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0] == 5 * len(ad.shared)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "TINYLORA"
