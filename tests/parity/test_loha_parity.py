"""LoHa against PEFT 0.21.2: delta, forward, merge, unmerge and checkpoints both ways.

Layers: Linear, Conv1d and Conv2d in the matrix form and the effective-conv (CP) form, a 1×1 conv
(PEFT drops the CP form there), a grouped conv, rank/alpha patterns; base models in float32 and
bfloat16 (PEFT's default fp32 adapter), and a bf16 adapter (``autocast_adapter_dtype=False``) with
``peft_compat=True``. PEFT's tensors are redrawn from a NumPy seed (non-zero ΔW).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from tests.parity import lycoris_harness as H  # noqa: E402
from tests.parity.conftest import BF16, assert_close, base_state, bf16_ulps, build_model, n2t, t2n  # noqa: E402

import peftmath as pmath  # noqa: E402
from peftmath.io.peft import split_key  # noqa: E402
from peftmath.io.safetensors import load_file  # noqa: E402
from peftmath.layers import Layer  # noqa: E402
from peftmath.methods import loha  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

#: case -> (layers {name: (kind, keywords)}, LoHaConfig fields)
CASES = {
    "linear": ({"lin": ("linear", dict(in_f=24, out_f=40))}, dict(r=4, alpha=12)),
    "conv1d": ({"c1": ("conv1d", dict(in_ch=6, out_ch=10, k=3, padding=1))}, dict(r=3, alpha=5)),
    "conv1d_effective": ({"c1": ("conv1d", dict(in_ch=6, out_ch=10, k=3, stride=2))},
                         dict(r=3, alpha=5, use_effective_conv2d=True)),
    "conv2d": ({"c2": ("conv2d", dict(in_ch=6, out_ch=10, k=3, stride=2, padding=1))}, dict(r=3, alpha=5)),
    "conv2d_effective": ({"c2": ("conv2d", dict(in_ch=6, out_ch=10, k=3, padding=1, dilation=2))},
                         dict(r=3, alpha=7, use_effective_conv2d=True)),
    "conv2d_1x1_effective": ({"c2": ("conv2d", dict(in_ch=6, out_ch=10, k=1))},
                             dict(r=3, alpha=5, use_effective_conv2d=True)),
    "conv2d_grouped": ({"g": ("conv2d_grouped", dict(in_ch=8, out_ch=12, k=3, groups=2))},
                       dict(r=2, alpha=3, use_effective_conv2d=True)),
    "patterns": ({"blk.0.q": ("linear", {}), "blk.0.v": ("linear", {}), "blk.1.q": ("linear", {}),
                  "conv": ("conv2d", dict(k=3))},
                 dict(r=4, alpha=8, rank_pattern={r"blk\.1\.q": 2, "conv": 5}, alpha_pattern={"v": 3})),
}


def _make(case, dtype="float32", *, autocast=True, seed=1):
    """(peft model, peftmath Adapter from PEFT's own state dict, base state dict)."""
    return H.make(CASES[case], peft.LoHaConfig, "hada_", loha.PARAMETER_SUFFIXES, dtype, autocast=autocast, seed=seed)


_factory, _layer, _conv_kwargs, _input = H.factory, H.layer, H.conv_kwargs, H.test_input
_magnitude, _torch_adapter, _config_dict = H.magnitude, H.torch_adapter, H.config_dict


def _to_adapter(pm):
    return H.to_adapter(pm, loha.PARAMETER_SUFFIXES)


# --------------------------------------------------------------------------------------------------
# delta, forward, merge, unmerge
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_delta_forward_merge_unmerge(case, dtype):
    pm, ad, state = _make(case, dtype)
    tad = _torch_adapter(ad)
    tstate = {k: n2t(v) for k, v in state.items()}
    for name in ad.modules:
        layer = _layer(pm, name)
        W = state[f"{name}.weight"]
        mod = ad.module(name, weight_shape=W.shape)
        assert layer.r["default"] == mod.r and layer.scaling["default"] == pytest.approx(mod.scaling, rel=1e-15)
        want_cp = case in ("conv1d_effective", "conv2d_effective", "conv2d_grouped")
        assert ("hada_t1" in mod.params) == want_cp, sorted(mod.params)
        H.check_delta_forward_merge_unmerge(pm, layer, mod, tad, tstate, state, name, dtype)


def test_bf16_adapter_peft_compat():
    """autocast_adapter_dtype=False keeps bf16 adapter tensors; PEFT then rounds every intermediate."""
    pm, ad, state = _make("linear", "bfloat16", autocast=False)
    name = "lin"
    layer = _layer(pm, name)
    assert layer.hada_w1_a["default"].dtype == torch.bfloat16
    mod = ad.module(name, weight_shape=state[f"{name}.weight"].shape)
    with torch.no_grad():
        d_peft = t2n(layer.get_delta_weight("default")).astype(np.float32)
        layer.merge()
        w_peft = t2n(layer.get_base_layer().weight)
    compat = np.asarray(mod.delta_weight(peft_compat=True))
    plain = np.asarray(mod.delta_weight())
    ulp = np.abs(np.spacing(d_peft.astype(BF16)).astype(np.float32))
    assert np.max(np.abs(compat - d_peft) / np.maximum(ulp, 1e-30)) <= 1
    assert np.max(np.abs(compat - d_peft)) <= np.max(np.abs(plain - d_peft))
    merged = mod.merge(state[f"{name}.weight"], peft_compat=True).weight
    assert bf16_ulps(merged, w_peft).max() <= 1


def test_rank_dropout_matches_peft_with_the_same_draws():
    """PEFT in train mode draws torch.rand(1) (module dropout) then torch.rand(out) (rows); replaying
    those draws as ``row_mask`` gives PEFT's training forward."""
    pm, ad, state = _make("conv2d")
    name = "c2"
    layer = _layer(pm, name)
    for p in (0.3, 0.6):
        layer.rank_dropout["default"] = p
        layer.module_dropout["default"] = 0.2
        x = _input(pm, name, "float32")
        pm.train()
        torch.manual_seed(123)
        with torch.no_grad():
            y_peft = t2n(layer(n2t(x)))
        torch.manual_seed(123)
        keep_module = bool(torch.rand(1) > 0.2)
        drop = (torch.rand(10) > p).float()
        mask = (drop / drop.mean()).numpy()
        mod = ad.module(name, weight_shape=state[f"{name}.weight"].shape)
        W, b = state[f"{name}.weight"], state[f"{name}.bias"]
        kw = _conv_kwargs(pm, name)
        kw.pop("groups")
        if keep_module:
            y = loha.forward(x, W, mod.w1_a, mod.w1_b, mod.w2_a, mod.w2_b, scaling=mod.scaling, bias=b,
                             layer=mod.layer, row_mask=mask, **kw)
        else:
            y = mod.layer.base_forward(x, W, b, np, **kw)
        assert_close(y, y_peft, atol=1e-5, rtol=1e-5, what=f"train forward p={p}")


# --------------------------------------------------------------------------------------------------
# checkpoints both ways
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["linear", "conv2d_effective", "conv1d_effective", "patterns"])
def test_peft_checkpoint_loads_in_peftmath(case, tmp_path):
    pm, _, state = _make(case)
    pm.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    ad = pmath.load_adapter(tmp_path)
    assert ad.config.peft_type == "LOHA"
    for field in ("r", "alpha", "rank_pattern", "alpha_pattern", "use_effective_conv2d", "init_weights",
                  "rank_dropout", "module_dropout"):
        assert ad.config.to_dict()[field] == raw[field], field
    theirs = {}
    for key, value in peft.get_peft_model_state_dict(pm).items():
        module, suffix = split_key(key, loha.PARAMETER_SUFFIXES)
        theirs.setdefault(module, {})[suffix] = t2n(value)
    assert sorted(ad.params) == sorted(theirs)
    for m in theirs:
        assert sorted(ad.params[m]) == sorted(theirs[m])
        for k in theirs[m]:
            np.testing.assert_array_equal(np.asarray(ad.params[m][k]), theirs[m][k])
    merged = ad.merge(state)
    for name in ad.modules:
        with torch.no_grad():
            _layer(pm, name).merge()
            w_peft = t2n(_layer(pm, name).get_base_layer().weight)
        assert_close(merged[f"{name}.weight"], w_peft, atol=1e-6, rtol=1e-6, what=f"{name} merge")
    out = pmath.save_adapter(ad, tmp_path / "again")
    assert json.loads((out / "adapter_config.json").read_text()) == raw
    t1, t2 = load_file(tmp_path / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert sorted(t1) == sorted(t2) and all(np.array_equal(t1[k], t2[k]) for k in t1)


@pytest.mark.parametrize("case", ["linear", "conv1d", "conv1d_effective", "conv2d_effective", "conv2d_grouped",
                                  "patterns"])
def test_peftmath_checkpoint_loads_in_peft(case, tmp_path):
    layers, fields = CASES[case]
    model = build_model({n: _factory(k, kw) for n, (k, kw) in layers.items()}, seed=3)
    state = base_state(model)
    cfg = loha.LoHaConfig(**fields, target_modules=list(layers), init_weights=False)
    params = {}
    for i, name in enumerate(layers):
        W = state[f"{name}.weight"]
        params[name], new_w = loha.LoHaModule.initialize(name, cfg, Layer.of(W.shape), seed=i)
        assert new_w is None
    ad = pmath.Adapter(cfg, params)
    pmath.save_adapter(ad, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, tmp_path)
    assert not [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    result = pm.load_adapter(tmp_path, adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == [], result
    pm.set_adapter("default")
    pm.eval()
    for name in layers:
        layer = _layer(pm, name)
        mod = ad.module(name, weight_shape=state[f"{name}.weight"].shape)
        assert layer.r["default"] == mod.r and layer.scaling["default"] == pytest.approx(mod.scaling, rel=1e-15)
        for key, value in params[name].items():
            np.testing.assert_array_equal(t2n(getattr(layer, key)["default"]), value)
        x = _input(pm, name, "float32")
        with torch.no_grad():
            y_peft = t2n(layer(n2t(x)))
        assert_close(ad.forward(name, x, state, **_conv_kwargs(pm, name)), y_peft, atol=1e-4, rtol=1e-4,
                     what=f"{name} forward")
