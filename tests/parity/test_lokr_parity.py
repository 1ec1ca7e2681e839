"""LoKr against PEFT 0.21.2: factorization, delta, forward, merge, unmerge and checkpoints both ways.

Layers: Linear with full / low-rank / decompose_both / decompose_factor factors, Conv1d and Conv2d with
a full w2 (Conv1d: PEFT's kron layout quirk), a low-rank w2 and the effective-conv (lokr_t2) form, a
1×1 conv, a grouped conv, rank/alpha patterns; base models in float32 and bfloat16 (PEFT's default fp32
adapter), and a bf16 adapter with ``peft_compat=True``. PEFT's tensors are redrawn from a NumPy seed.
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
from peftmath.methods import lokr  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::UserWarning")]

#: case -> (layers {name: (kind, keywords)}, LoKrConfig fields, expected tensor names of the first module)
CASES = {
    "linear_full": ({"lin": ("linear", dict(in_f=24, out_f=40))}, dict(r=4, alpha=12), ["lokr_w1", "lokr_w2"]),
    "linear_lowrank": ({"lin": ("linear", dict(in_f=96, out_f=64))}, dict(r=2, alpha=5),
                       ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
    "linear_decompose_both": ({"lin": ("linear", dict(in_f=96, out_f=64))}, dict(r=2, alpha=3, decompose_both=True),
                              ["lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"]),
    "linear_factor": ({"lin": ("linear", dict(in_f=128, out_f=128))}, dict(r=4, alpha=6, decompose_factor=32),
                      ["lokr_w1", "lokr_w2"]),
    "linear_factor_not_dividing": ({"lin": ("linear", dict(in_f=128, out_f=96))},
                                   dict(r=2, alpha=6, decompose_factor=3), ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
    "conv1d_full_quirk": ({"c1": ("conv1d", dict(in_ch=8, out_ch=12, k=3, padding=1))}, dict(r=8, alpha=5),
                          ["lokr_w1", "lokr_w2"]),
    "conv1d_lowrank": ({"c1": ("conv1d", dict(in_ch=32, out_ch=48, k=3, stride=2))}, dict(r=2, alpha=5),
                       ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
    "conv1d_effective": ({"c1": ("conv1d", dict(in_ch=32, out_ch=48, k=3))},
                         dict(r=2, alpha=5, use_effective_conv2d=True), ["lokr_t2", "lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
    "conv2d_full": ({"c2": ("conv2d", dict(in_ch=8, out_ch=12, k=3, padding=1))}, dict(r=8, alpha=5),
                    ["lokr_w1", "lokr_w2"]),
    "conv2d_lowrank": ({"c2": ("conv2d", dict(in_ch=32, out_ch=48, k=3, stride=2, padding=1))}, dict(r=2, alpha=7),
                       ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
    "conv2d_effective": ({"c2": ("conv2d", dict(in_ch=32, out_ch=48, k=(3, 2), dilation=2))},
                         dict(r=2, alpha=7, use_effective_conv2d=True, decompose_both=True),
                         ["lokr_t2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"]),
    "conv2d_1x1_effective": ({"c2": ("conv2d", dict(in_ch=32, out_ch=48, k=1))},
                             dict(r=2, alpha=5, use_effective_conv2d=True), ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
    "conv2d_grouped": ({"g": ("conv2d_grouped", dict(in_ch=32, out_ch=24, k=3, groups=2))}, dict(r=2, alpha=3),
                       ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
    "patterns": ({"blk.0.q": ("linear", dict(in_f=96, out_f=64)), "blk.0.v": ("linear", dict(in_f=96, out_f=64)),
                  "conv": ("conv2d", dict(in_ch=32, out_ch=48, k=3))},
                 dict(r=2, alpha=8, rank_pattern={"v": 16}, alpha_pattern={"conv": 3}),
                 ["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
}


def _make(case, dtype="float32", *, autocast=True, seed=1):
    """(peft model, peftmath Adapter from PEFT's own state dict, base state dict)."""
    return H.make(CASES[case][:2], peft.LoKrConfig, "lokr_", lokr.PARAMETER_SUFFIXES, dtype, autocast=autocast, seed=seed)


_factory, _layer, _conv_kwargs, _input = H.factory, H.layer, H.conv_kwargs, H.test_input
_magnitude, _torch_adapter, _config_dict = H.magnitude, H.torch_adapter, H.config_dict


def _to_adapter(pm):
    return H.to_adapter(pm, lokr.PARAMETER_SUFFIXES)


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
        if name == ad.modules[0]:
            assert sorted(mod.params) == CASES[case][2]
        H.check_delta_forward_merge_unmerge(pm, layer, mod, tad, tstate, state, name, dtype)


def test_bf16_adapter_peft_compat():
    """autocast_adapter_dtype=False keeps bf16 adapter tensors; PEFT then rounds every intermediate."""
    pm, ad, state = _make("linear_decompose_both", "bfloat16", autocast=False)
    name = "lin"
    layer = _layer(pm, name)
    assert layer.lokr_w1_a["default"].dtype == torch.bfloat16
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
    those draws as ``row_mask`` gives PEFT's training forward (mask divided by its mean only with
    rank_dropout_scale)."""
    pm, ad, state = _make("conv2d_lowrank")
    name = "c2"
    layer = _layer(pm, name)
    for p, scale in ((0.3, False), (0.6, True)):
        layer.rank_dropout["default"] = p
        layer.module_dropout["default"] = 0.2
        layer.rank_dropout_scale["default"] = scale
        x = _input(pm, name, "float32")
        pm.train()
        torch.manual_seed(321)
        with torch.no_grad():
            y_peft = t2n(layer(n2t(x)))
        torch.manual_seed(321)
        keep_module = bool(torch.rand(1) > 0.2)
        drop = (torch.rand(48) > p).float()
        mask = (drop / drop.mean() if scale else drop).numpy()
        mod = ad.module(name, weight_shape=state[f"{name}.weight"].shape)
        W, b = state[f"{name}.weight"], state[f"{name}.bias"]
        kw = _conv_kwargs(pm, name)
        kw.pop("groups")
        if keep_module:
            y = lokr.forward(x, W, mod.params, scaling=mod.scaling, bias=b, layer=mod.layer, row_mask=mask, **kw)
        else:
            y = mod.layer.base_forward(x, W, b, np, **kw)
        assert_close(y, y_peft, atol=1e-5, rtol=1e-5, what=f"train forward p={p}")


def test_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 5, 7, 8, 16, 32, 64, 0, -2):
            assert lokr.factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)
    for dim in (768, 1024, 3072, 4096, 4097, 11008):
        assert lokr.factorization(dim) == peft_factorization(dim)


# --------------------------------------------------------------------------------------------------
# checkpoints both ways
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["linear_decompose_both", "linear_factor", "conv1d_full_quirk", "conv2d_effective",
                                  "conv1d_effective", "patterns"])
def test_peft_checkpoint_loads_in_peftmath(case, tmp_path):
    pm, _, state = _make(case)
    pm.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    ad = pmath.load_adapter(tmp_path)
    assert ad.config.peft_type == "LOKR"
    for field in ("r", "alpha", "rank_pattern", "alpha_pattern", "use_effective_conv2d", "init_weights",
                  "rank_dropout", "module_dropout", "decompose_both", "decompose_factor", "rank_dropout_scale"):
        assert ad.config.to_dict()[field] == raw[field], field
    theirs = {}
    for key, value in peft.get_peft_model_state_dict(pm).items():
        module, suffix = split_key(key, lokr.PARAMETER_SUFFIXES)
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


@pytest.mark.parametrize("init", [True, "lycoris"])
@pytest.mark.parametrize("case", ["linear_full", "linear_decompose_both", "linear_factor_not_dividing",
                                  "conv1d_full_quirk", "conv1d_effective", "conv2d_effective", "conv2d_grouped",
                                  "patterns"])
def test_peftmath_checkpoint_loads_in_peft(case, init, tmp_path):
    layers, fields, _ = CASES[case]
    model = build_model({n: _factory(k, kw) for n, (k, kw) in layers.items()}, seed=3)
    state = base_state(model)
    cfg = lokr.LoKrConfig(**fields, target_modules=list(layers), init_weights=init)
    params = {}
    for i, name in enumerate(layers):
        W = state[f"{name}.weight"]
        params[name], new_w = lokr.LoKrModule.initialize(name, cfg, Layer.of(W.shape), seed=i, init=False)
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
