"""Checkpoints both ways between PEFT 0.21.2 and peftmath (adapter_config.json + adapter_model.safetensors).

* PEFT ``save_pretrained`` -> ``peftmath.load_adapter``: every config field PEFT wrote comes back (and is
  written back unchanged by ``save_adapter``), every tensor is bit-identical with its dtype, and the
  merged weights equal PEFT's (float32 within 1e-5; bf16 bit-identical with ``peft_compat=True``).
* ``peftmath.save_adapter`` of an adapter that peftmath built (``LoraModule.initialize`` or plain
  arrays) -> ``PeftModel.from_pretrained(fresh base, dir)``: no missing and no unexpected adapter
  keys, PEFT holds exactly our tensors, and PEFT's forward equals peftmath's.

Configs: LoRA, DoRA, rsLoRA, rank/alpha patterns, lora_bias, Embedding, Conv2d, transformers Conv1D
(fan_in_fan_out), bf16 adapters.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.parity.conftest import (
    BF16,
    TOL_W,
    TOL_Y,
    assert_close,
    assert_same_tensors,
    assert_saves_back_identically,
    base_state,
    bits_differ,
    build_model,
    layer_factory,
    layer_kwargs,
    load_in_peft,
    make_input,
    make_peft,
    peft_config_dict,
    peft_forward,
    peft_layer,
    peft_tensors,
    peft_weights,
    require_peft,
)

torch, peft = require_peft()

import peftmath as pmath  # noqa: E402
from peftmath.layers import Layer  # noqa: E402
from peftmath.methods import lora  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

_PAT_LAYERS = {"blocks.0.q": ("linear", {}), "blocks.0.v": ("linear", {}), "blocks.1.q": ("linear", {}),
               "head": ("linear", dict(in_f=40, out_f=16))}

#: case -> (layers, LoraConfig fields, base dtype, adapter dtype)
CASES = {
    "lora": ({"lin": ("linear", {})}, dict(r=4, lora_alpha=12, target_modules=["lin"]), "float32", "float32"),
    "dora": ({"lin": ("linear", {})}, dict(r=4, lora_alpha=12, use_dora=True, target_modules=["lin"]),
             "float32", "float32"),
    "rslora": ({"lin": ("linear", {})}, dict(r=4, lora_alpha=12, use_rslora=True, target_modules=["lin"]),
               "float32", "float32"),
    "patterns": (_PAT_LAYERS, dict(r=4, lora_alpha=8, target_modules=["q", "v", "head"],
                                   rank_pattern={r"blocks\.1\.q": 2, "v": 6}, alpha_pattern={"head": 20}),
                 "float32", "float32"),
    "lora_bias": ({"lin": ("linear", {}), "conv": ("conv2d", dict(k=3, padding=1))},
                  dict(r=4, lora_alpha=12, lora_bias=True, target_modules=["lin", "conv"]), "float32", "float32"),
    "embedding": ({"emb": ("embedding", {})}, dict(r=4, lora_alpha=12, target_modules=["emb"]), "float32", "float32"),
    "conv2d": ({"conv": ("conv2d", dict(k=3, stride=2, padding=1))}, dict(r=4, lora_alpha=12, target_modules=["conv"]),
               "float32", "float32"),
    "conv1d_transformers": ({"attn.c_attn": ("conv1d_t", dict(in_f=24, out_f=40))},
                            dict(r=4, lora_alpha=12, fan_in_fan_out=True, target_modules=["c_attn"]),
                            "float32", "float32"),
    "dora_embedding_conv": ({"emb": ("embedding", {}), "conv": ("conv2d", dict(k=3, padding=1))},
                            dict(r=4, lora_alpha=12, use_dora=True, target_modules=["emb", "conv"]),
                            "float32", "float32"),
    "bf16_lora": ({"lin": ("linear", {}), "emb": ("embedding", {}), "attn.c_attn": ("conv1d_t", {})},
                  dict(r=4, lora_alpha=12, target_modules=["lin", "emb", "c_attn"]), "bfloat16", "bfloat16"),
    "bf16_dora": ({"lin": ("linear", {}), "conv": ("conv2d", dict(k=3, padding=1))},
                  dict(r=4, lora_alpha=12, use_dora=True, target_modules=["lin", "conv"]), "bfloat16", "bfloat16"),
    "bf16_base_fp32_adapter": ({"lin": ("linear", {}), "conv": ("conv2d", dict(k=3))},
                               dict(r=4, lora_alpha=12, lora_bias=True, target_modules=["lin", "conv"]),
                               "bfloat16", "float32"),
}

CONFIG_FIELDS = ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "lora_bias",
                 "fan_in_fan_out", "rank_pattern", "alpha_pattern", "init_lora_weights", "bias")


def _check_merge(pm, ad, state, names, *, low_precision: bool) -> None:
    pm.merge_adapter()
    want = peft_weights(pm, names)
    pm.unmerge_adapter()
    ours = ad.merge(state, peft_compat=low_precision)
    for key, w in want.items():
        if low_precision and w.dtype == BF16:
            assert bits_differ(np.asarray(ours[key]), w) == 0, key
        else:
            assert_close(ours[key], w, **TOL_W, what=f"merge {key}")


# --------------------------------------------------------------------------------------------------
# PEFT -> peftmath
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_peft_checkpoint_loads_in_peftmath(case, tmp_path):
    layers, config, dtype, adapter_dtype = CASES[case]
    pm, _, state = make_peft(layers, config, dtype=dtype, autocast_adapter_dtype=(adapter_dtype == "float32"))
    pm.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    ad = pmath.load_adapter(tmp_path)
    # config: the fields that define the math, and every field PEFT wrote survives a round trip
    want = peft_config_dict(pm)
    for f in CONFIG_FIELDS:
        assert ad.config.to_dict()[f] == want[f] == raw[f], f
    assert sorted(ad.config.target_modules) == sorted(raw["target_modules"])
    # tensors: the same bits in the same dtype (bf16 adapters stay bf16)
    assert_same_tensors(ad.params, peft_tensors(pm))
    assert all(np.asarray(a).dtype == np.dtype(BF16 if adapter_dtype == "bfloat16" else np.float32)
               for p in ad.params.values() for a in p.values())
    names = ad.modules
    _check_merge(pm, ad, state, names, low_precision=(dtype == "bfloat16"))
    if dtype == "float32":
        for name in names:
            x = make_input(pm, name)
            assert_close(ad.forward(name, x, state, **layer_kwargs(pm, name)), peft_forward(pm, name, x), **TOL_Y,
                         what=f"{name} forward")
    # writing it back with peftmath reproduces PEFT's files: same config JSON, same tensors
    assert_saves_back_identically(ad, tmp_path)


# --------------------------------------------------------------------------------------------------
# peftmath -> PEFT
# --------------------------------------------------------------------------------------------------
def _kind(kind: str) -> str | None:
    return {"conv1d_t": "Conv1D", "embedding": "Embedding"}.get(kind)


def _peftmath_adapter(layers, config, state, adapter_dtype, *, from_arrays=False):
    """An adapter built by peftmath: ``LoraModule.initialize`` (init False: both factors non-zero) or,
    with ``from_arrays``, an :class:`Adapter` from plain NumPy arrays of the right shapes."""
    cfg = lora.LoraConfig(**dict(config, init_lora_weights=False))
    dt = BF16 if adapter_dtype == "bfloat16" else np.dtype(np.float32)
    rng = np.random.default_rng(7)
    params = {}
    for i, (name, (kind, _)) in enumerate(layers.items()):
        W = state[f"{name}.weight"]
        geom = Layer.of(W.shape, _kind(kind))
        if from_arrays:
            r, _ = cfg.rank_and_alpha(name)
            p = {k: rng.normal(0, 0.3, shape).astype(dt) for k, shape in lora.parameter_shapes(geom, r).items()}
        else:
            p, new_w = lora.LoraModule.initialize(name, cfg, geom, weight=W, seed=i, dtype=dt)
            assert new_w is None
            if "lora_magnitude_vector" in p:  # m = ‖W + sBA‖ makes g = 1; move it away from 1
                m = np.asarray(p["lora_magnitude_vector"], np.float32)
                p["lora_magnitude_vector"] = (m * rng.uniform(0.5, 1.5, m.shape)).astype(dt)
            if "lora_B.bias" in p:  # initialised to zero
                p["lora_B.bias"] = rng.normal(0, 0.3, p["lora_B.bias"].shape).astype(dt)
        params[name] = p
    return pmath.Adapter(cfg, params)


FROM_PEFTMATH = [c for c in CASES] + ["patterns_from_arrays", "conv1d_transformers_from_arrays"]


@pytest.mark.parametrize("case", FROM_PEFTMATH)
def test_peftmath_checkpoint_loads_in_peft(case, tmp_path):
    from_arrays = case.endswith("_from_arrays")
    layers, config, dtype, adapter_dtype = CASES[case.removesuffix("_from_arrays")]
    model = build_model({n: layer_factory(k, **kw) for n, (k, kw) in layers.items()}, seed=3, dtype=dtype)
    state = base_state(model)
    ad = _peftmath_adapter(layers, config, state, adapter_dtype, from_arrays=from_arrays)
    pmath.save_adapter(ad, tmp_path)
    # no missing and no unexpected keys (PEFT's warnings, and its result when loaded a second time)
    pm = load_in_peft(model, tmp_path, autocast_adapter_dtype=(adapter_dtype == "float32"))
    # PEFT holds exactly our tensors (dtypes included) and resolved the same ranks and scalings
    assert_same_tensors(ad.params, peft_tensors(pm))
    names = ad.modules
    for name in names:
        mod = ad.module(name, weight_shape=state[f"{name}.weight"].shape)
        assert peft_layer(pm, name).r["default"] == mod.r
        assert peft_layer(pm, name).scaling["default"] == pytest.approx(mod.scaling, rel=1e-12)
        if dtype == "float32":
            x = make_input(pm, name)
            assert_close(peft_forward(pm, name, x), ad.forward(name, x, state, **layer_kwargs(pm, name)), **TOL_Y,
                         what=f"{name} forward")
    _check_merge(pm, ad, state, names, low_precision=(dtype == "bfloat16"))


@pytest.mark.parametrize("extra", [dict(bias="all"), dict(bias="lora_only"), dict(modules_to_save=["head"]),
                                   dict(bias="all", modules_to_save=["head"])], ids=str)
def test_trainable_count_includes_trained_base_tensors(extra, tmp_path):
    """PEFT trains the biases of ``bias="all"`` / ``"lora_only"`` and the ``modules_to_save`` copies, and counts
    them in ``get_nb_trainable_parameters``; the adapter holds them as replaced base tensors and counts them too."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.lin1, self.head = torch.nn.Linear(6, 6), torch.nn.Linear(6, 4), torch.nn.Linear(4, 3)

    torch.manual_seed(0)
    pmodel = peft.get_peft_model(Model(), peft.LoraConfig(target_modules=["lin0"], r=4, **extra))
    pmodel.save_pretrained(tmp_path)
    ad = pmath.load_adapter(tmp_path)
    assert ad.other, "the case must hold replaced base tensors"
    assert ad.num_trainable_parameters() == pmodel.get_nb_trainable_parameters()[0]
